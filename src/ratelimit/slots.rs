//! Which key a bucket lives at: route keys, and the per-user and per-IP slots (a keyed hash).

use super::*;
use crate::host::{fingerprint, SharedStore};

/// Key of a route's bucket.
pub fn route_key(route: &str) -> String {
    format!("gw:rl:r:{route}")
}

/// Key of the slot seed: 16 random bytes, written by the first VM that configures (Envoy's
/// main thread, before any worker) and read by every VM of the store.
pub const SEED_KEY: &str = "gw:rl:seed";

/// The secret key of the slot hash. Which slot a client address or user lands in is a keyed
/// SipHash of it: the same on every worker (one seed per shared-data store, kept across VM and
/// configuration reloads), unknown to clients, so no client can pick addresses that share a
/// slot with each other or with someone else.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SlotSeed(pub(super) u64, pub(super) u64);

impl SlotSeed {
    /// The store's seed; if there is none yet, `fresh` (random bytes) becomes it. Whatever the
    /// store holds after the write is used, so VMs racing to create it agree.
    pub fn load_or_create(store: &dyn SharedStore, fresh: [u8; 16]) -> SlotSeed {
        let stored = || store.get(SEED_KEY).and_then(|(v, _)| SlotSeed::decode(&v));
        if let Some(seed) = stored() {
            return seed;
        }
        let _ = store.set(SEED_KEY, &fresh, None);
        stored().unwrap_or_else(|| SlotSeed::decode(&fresh).unwrap_or_default())
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<SlotSeed> {
        let k0: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        let k1: [u8; 8] = bytes.get(8..16)?.try_into().ok()?;
        (bytes.len() == 16).then(|| SlotSeed(u64::from_le_bytes(k0), u64::from_le_bytes(k1)))
    }

    /// The keyed hash of a bucket's identity.
    pub fn hash(&self, parts: &[&str]) -> u64 {
        // SipHash-2-4 with a key: std's `SipHasher` is deprecated only in favour of hashers
        // that cannot take a key, which is the point here.
        #[allow(deprecated)]
        let mut h = std::hash::SipHasher::new_with_keys(self.0, self.1);
        for p in parts {
            p.hash(&mut h);
        }
        h.finish()
    }
}

/// Key of a slot for per-user (`kind` = "u") or per-IP ("i") buckets.
pub fn slot_key(kind: &str, fingerprint: u64, slots: u32) -> String {
    slot_key_at(kind, fingerprint % u64::from(slots.max(1)))
}

/// Key of slot number `index`.
pub fn slot_key_at(kind: &str, index: u64) -> String {
    format!("gw:rl:{kind}:{index}")
}

/// Which limit a bucket enforces.
pub use crate::outcome::Scope as Kind;

/// One bucket to take a token from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub kind: Kind,
    pub key: String,
    pub fingerprint: u64,
    pub limit: Limit,
}

impl RouteLimits {
    /// The per-IP bucket of `ip` under these limits. Addresses that share a slot share its
    /// bucket (the fingerprint names the slot, not the address): taking a slot over would hand
    /// a full bucket to whoever alternates two addresses of one slot.
    pub fn ip_check(&self, global: &RateLimits, seed: &SlotSeed, ip: &str) -> Check {
        let slots = u64::from(global.ip_slots.max(1));
        let index = seed.hash(&["i", &self.ip.scope, ip]) % slots;
        Check {
            kind: Kind::Ip,
            key: slot_key_at("i", index),
            fingerprint: fingerprint(&["i", &self.ip.scope]).wrapping_add(index).max(1),
            limit: self.ip.limit,
        }
    }

    /// The per-user bucket of `user` on this route (users come from verified tokens: a user
    /// who finds another in its slot takes the slot over, with a full bucket).
    pub fn user_check(&self, global: &RateLimits, seed: &SlotSeed, user: &str) -> Check {
        let fp = seed.hash(&["u", &self.user.scope, user]).max(1);
        Check {
            kind: Kind::User,
            key: slot_key("u", fp, global.user_slots),
            fingerprint: fp,
            limit: self.user.limit,
        }
    }

    /// The route's own bucket.
    pub fn route_check(&self) -> Check {
        Check {
            kind: Kind::Route,
            key: self.route_key.clone(),
            fingerprint: self.route_fingerprint,
            limit: self.route,
        }
    }
}
