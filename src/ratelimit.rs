//! Token buckets in proxy-wasm shared data, exact across workers: bucket arithmetic with an
//! injected clock, a fixed-size encoding, and a bounded compare-and-swap loop over a
//! [`SharedStore`] (the host implements it with shared data; tests with a map).
//!
//! Memory is bounded by construction: route buckets have one key each; per-user and per-IP
//! buckets live in a fixed number of slot keys created at configure time (so every update is a
//! CAS on an existing key: shared data creates missing keys unconditionally). The slot of a
//! client is a keyed hash ([`SlotSeed`]), so clients cannot choose it. A per-user slot holds
//! one user's bucket, tagged with a fingerprint; a user hashing to a slot held by another takes
//! it over with a full bucket (eviction: the previous user starts afresh when it returns). A
//! per-IP slot is one bucket shared by the addresses that hash to it.
//!
//! This duty owns its settings (`gateway.rate_limit` and `routes[].rate_limit` in the gateway
//! file), their defaults and validation, and their compiled form ([`RateLimits`], [`RouteLimits`]).

use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::error::{check_range, seconds_to_ms, ConfigError};
use crate::outcome::Outcome;
use crate::reply::Reply;

/// `{max_calls, period}`: calls per `period` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_calls: u64,
    #[serde(default = "default_period")]
    pub period: u64,
}

fn default_period() -> u64 {
    1
}

fn default_true() -> bool {
    true
}

impl LimitSettings {
    /// Field names in errors are relative to the limit.
    pub fn compile(&self) -> Result<Limit, ConfigError> {
        check_range("max_calls", self.max_calls, 1, 1_000_000_000)?;
        check_range("period", self.period, 1, 86_400)?;
        Ok(Limit {
            max_calls: self.max_calls,
            period_ms: self.period * 1000,
        })
    }
}

/// `routes[].rate_limit`: the route bucket, and optional per-user / per-IP overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub max_calls: u64,
    #[serde(default = "default_period")]
    pub period: u64,
    /// Default: the gateway's `per_user`, else a tenth of the route limit (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<LimitSettings>,
    /// Default: the gateway's `per_ip`, one bucket per address shared by all routes. Set here,
    /// it is a bucket per (route, address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_ip: Option<LimitSettings>,
    /// Share the route bucket with other gateway instances through Redis (needs webdis).
    #[serde(default)]
    pub cluster_wide: bool,
}

/// `gateway.rate_limit`: settings shared by every limited route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Default per-IP limit (the reference: 1000 per second).
    #[serde(default = "default_per_ip")]
    pub per_ip: LimitSettings,
    /// Default per-user limit (else each route's max_calls / 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<LimitSettings>,
    /// Proxies in front of Envoy whose `X-Forwarded-For` entries are trusted; 0 = the peer.
    #[serde(default)]
    pub trusted_hops: u32,
    /// Slots (the memory bound) for per-user and for per-IP buckets.
    #[serde(default = "default_slots")]
    pub user_slots: u32,
    #[serde(default = "default_slots")]
    pub ip_slots: u32,
    /// Seconds between syncs of cluster-wide routes with Redis.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: f64,
    /// Timeout of one sync call, seconds.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout: f64,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_ip: default_per_ip(),
            per_user: None,
            trusted_hops: 0,
            user_slots: default_slots(),
            ip_slots: default_slots(),
            sync_interval: default_sync_interval(),
            sync_timeout: default_sync_timeout(),
        }
    }
}

fn default_per_ip() -> LimitSettings {
    LimitSettings {
        max_calls: 1000,
        period: 1,
    }
}
fn default_slots() -> u32 {
    8192
}
fn default_sync_interval() -> f64 {
    0.5
}
fn default_sync_timeout() -> f64 {
    0.2
}

/// Validated gateway-wide settings.
#[derive(Debug, Clone)]
pub struct RateLimits {
    pub per_ip: Limit,
    pub per_user: Option<Limit>,
    pub trusted_hops: u32,
    pub user_slots: u32,
    pub ip_slots: u32,
    /// Set when a route is cluster-wide.
    pub sync: Option<SyncTarget>,
}

/// Where and how often cluster-wide routes are synchronised.
#[derive(Debug, Clone)]
pub struct SyncTarget {
    pub cluster: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl RateLimitSettings {
    /// `cluster` is the webdis cluster, needed only when a route is cluster-wide. Field names
    /// in errors are relative to `gateway.rate_limit`.
    pub fn compile(&self, cluster_wide: bool, cluster: Option<&str>) -> Result<RateLimits, ConfigError> {
        let per_ip = self.per_ip.compile().map_err(|e| e.under("per_ip"))?;
        let per_user = match &self.per_user {
            Some(u) => Some(u.compile().map_err(|e| e.under("per_user"))?),
            None => None,
        };
        check_range("user_slots", self.user_slots, 1, 1_000_000)?;
        check_range("ip_slots", self.ip_slots, 1, 1_000_000)?;
        check_range("trusted_hops", self.trusted_hops, 0, 16)?;
        let interval_ms = seconds_to_ms("sync_interval", self.sync_interval, 0.05, 60.0)?;
        let timeout_ms = seconds_to_ms("sync_timeout", self.sync_timeout, 0.001, 60.0)?;
        let sync = match (cluster_wide, cluster) {
            (false, _) => None,
            (true, None) => {
                return Err(ConfigError::new(
                    "",
                    "cluster-wide rate limits need webdis (the `webdis` address in the gateway file)",
                ))
            }
            (true, Some(cluster)) => Some(SyncTarget {
                cluster: cluster.to_string(),
                interval_ms,
                timeout_ms,
            }),
        };
        Ok(RateLimits {
            per_ip,
            per_user,
            trusted_hops: self.trusted_hops,
            user_slots: self.user_slots,
            ip_slots: self.ip_slots,
            sync,
        })
    }
}

/// A validated bucket identity and limit.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub limit: Limit,
    /// Stable part of the bucket identity (the route name, or empty for the shared per-IP bucket).
    pub scope: String,
}

/// A route's validated limits.
#[derive(Debug, Clone)]
pub struct RouteLimits {
    /// The route name (the Redis counter of a cluster-wide route is named after it).
    pub name: String,
    pub cluster_wide: bool,
    /// Shared-data counter of consumption not yet synced (cluster-wide routes).
    pub pending_key: String,
    pub route_key: String,
    pub route_fingerprint: u64,
    pub route: Limit,
    pub user: BucketSpec,
    pub ip: BucketSpec,
}

impl RouteRateLimit {
    /// The route's limits, `None` when disabled. Field names in errors are relative to
    /// `routes[i].rate_limit`.
    pub fn compile(&self, route: &str, global: &RateLimits) -> Result<Option<RouteLimits>, ConfigError> {
        let own = LimitSettings {
            max_calls: self.max_calls,
            period: self.period,
        }
        .compile()?;
        let per_user = match &self.per_user {
            Some(u) => Some(u.compile().map_err(|e| e.under("per_user"))?),
            None => None,
        };
        let per_ip = match &self.per_ip {
            Some(ip) => Some(ip.compile().map_err(|e| e.under("per_ip"))?),
            None => None,
        };
        if !self.enabled {
            return Ok(None);
        }
        // The reference: a user gets a tenth of the route's limit (at least 1).
        let user = per_user.or(global.per_user).unwrap_or(Limit {
            max_calls: (self.max_calls / 10).max(1),
            period_ms: own.period_ms,
        });
        let ip = match per_ip {
            Some(limit) => BucketSpec {
                limit,
                scope: route.to_string(),
            },
            None => BucketSpec {
                limit: global.per_ip,
                scope: String::new(),
            },
        };
        Ok(Some(RouteLimits {
            name: route.to_string(),
            cluster_wide: self.cluster_wide,
            pending_key: cluster::pending_key(route),
            route_key: route_key(route),
            route_fingerprint: fingerprint(&["r", route]),
            route: own,
            user: BucketSpec {
                limit: user,
                scope: route.to_string(),
            },
            ip,
        }))
    }
}

/// Milli-tokens per token (sub-token refill precision).
const SCALE: u128 = 1000;
/// CAS attempts before giving up on a contended bucket (then the request is allowed and counted).
pub const MAX_CAS_ATTEMPTS: u32 = 16;

/// A limit: `max_calls` per `period_ms`; capacity `max_calls`, refilled continuously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max_calls: u64,
    pub period_ms: u64,
}

impl Limit {
    fn capacity_milli(&self) -> u128 {
        u128::from(self.max_calls) * SCALE
    }

    /// Milli-tokens refilled over `elapsed_ms`.
    fn refill(&self, elapsed_ms: u64) -> u128 {
        u128::from(elapsed_ms) * self.capacity_milli() / u128::from(self.period_ms.max(1))
    }

    /// Milliseconds needed to refill `missing` milli-tokens (rounded up).
    fn time_for(&self, missing: u128) -> u64 {
        let cap = self.capacity_milli().max(1);
        let ms = (missing * u128::from(self.period_ms.max(1))).div_ceil(cap);
        u64::try_from(ms).unwrap_or(u64::MAX)
    }
}

/// A bucket as stored: 24 bytes (fingerprint, milli-tokens, last refill ms).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket {
    pub fingerprint: u64,
    pub tokens_milli: u64,
    pub last_ms: u64,
}

pub const BUCKET_LEN: usize = 24;

fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let chunk: [u8; 8] = bytes.get(at..at + 8)?.try_into().ok()?;
    Some(u64::from_le_bytes(chunk))
}

impl Bucket {
    pub fn full(fingerprint: u64, limit: &Limit, now_ms: u64) -> Bucket {
        Bucket {
            fingerprint,
            tokens_milli: u64::try_from(limit.capacity_milli()).unwrap_or(u64::MAX),
            last_ms: now_ms,
        }
    }

    pub fn encode(&self) -> [u8; BUCKET_LEN] {
        let mut out = [0u8; BUCKET_LEN];
        for (chunk, v) in out
            .chunks_exact_mut(8)
            .zip([self.fingerprint, self.tokens_milli, self.last_ms])
        {
            chunk.copy_from_slice(&v.to_le_bytes());
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Bucket> {
        if bytes.len() != BUCKET_LEN {
            return None;
        }
        Some(Bucket {
            fingerprint: read_u64(bytes, 0)?,
            tokens_milli: read_u64(bytes, 8)?,
            last_ms: read_u64(bytes, 16)?,
        })
    }
}

/// The result of taking one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub allowed: bool,
    pub limit: u64,
    /// Whole tokens left after this request.
    pub remaining: u64,
    /// Seconds until one token is available (refused requests; 0 when allowed).
    pub retry_after_s: u64,
    /// Seconds until the bucket is full again.
    pub reset_s: u64,
}

fn ceil_s(ms: u64) -> u64 {
    ms.div_ceil(1000)
}

/// Takes one token from `current` (or a fresh full bucket when the slot is empty, unreadable or
/// held by another fingerprint). Returns the bucket to store and the verdict.
pub fn take(current: Option<Bucket>, fingerprint: u64, limit: &Limit, now_ms: u64) -> (Bucket, Verdict) {
    let (b, v, _) = take_n(current, fingerprint, limit, now_ms, 1);
    (b, v)
}

/// Takes up to `n` tokens (at least one, or none and a refusal). Returns the bucket to store,
/// the verdict of the first token, and how many were taken.
pub fn take_n(
    current: Option<Bucket>,
    fingerprint: u64,
    limit: &Limit,
    now_ms: u64,
    n: u64,
) -> (Bucket, Verdict, u64) {
    let cap = limit.capacity_milli();
    let mut b = match current {
        Some(b) if b.fingerprint == fingerprint => b,
        _ => Bucket::full(fingerprint, limit, now_ms),
    };
    let elapsed = now_ms.saturating_sub(b.last_ms);
    let tokens = (u128::from(b.tokens_milli) + limit.refill(elapsed)).min(cap);
    if now_ms > b.last_ms {
        b.last_ms = now_ms;
    }
    let taken = u64::try_from(tokens / SCALE).unwrap_or(u64::MAX).min(n.max(1));
    let allowed = taken > 0;
    let left = tokens - u128::from(taken) * SCALE;
    b.tokens_milli = u64::try_from(left).unwrap_or(u64::MAX);
    // The first token's view: the other taken tokens still count as remaining.
    let after_first = if allowed {
        left + u128::from(taken - 1) * SCALE
    } else {
        left
    };
    let verdict = Verdict {
        allowed,
        limit: limit.max_calls,
        remaining: u64::try_from(after_first / SCALE).unwrap_or(u64::MAX),
        retry_after_s: if allowed {
            0
        } else {
            ceil_s(limit.time_for(SCALE - left)).max(1)
        },
        reset_s: ceil_s(limit.time_for(cap - after_first)),
    };
    (b, verdict, taken)
}

/// The shared-data operations the limiter needs.
pub trait SharedStore {
    /// The value and its CAS token, if the key exists.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    /// Sets the value if the CAS token still matches; `Err(true)` on a CAS mismatch,
    /// `Err(false)` on any other failure.
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), bool>;
}

/// What happened to one bucket update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Update {
    Done(Verdict),
    /// Contention or a store failure kept the update from landing: let the request through.
    GaveUp {
        conflicts: u32,
    },
}

/// Takes up to `n` tokens (at least one, or a refusal) from the bucket at `key` with
/// compare-and-swap, retrying on conflicts: the first token's verdict, and how many were taken
/// (none when the update gave up). The key must already exist (see [`ensure_key`]); a missing key
/// is created unconditionally.
pub fn consume(
    store: &dyn SharedStore,
    key: &str,
    fingerprint: u64,
    limit: &Limit,
    now_ms: u64,
    n: u64,
) -> (Update, u64) {
    let mut conflicts = 0;
    for _ in 0..MAX_CAS_ATTEMPTS {
        let (current, cas) = match store.get(key) {
            Some((bytes, cas)) => (Bucket::decode(&bytes), Some(cas)),
            None => (None, None),
        };
        let (next, verdict, taken) = take_n(current, fingerprint, limit, now_ms, n);
        match store.set(key, &next.encode(), cas) {
            Ok(()) => return (Update::Done(verdict), taken),
            Err(true) => conflicts += 1,
            Err(false) => return (Update::GaveUp { conflicts }, 0),
        }
    }
    (Update::GaveUp { conflicts }, 0)
}

/// Bucket leases: a VM takes a small batch of tokens from a shared bucket with one CAS and spends
/// them locally, so a busy bucket costs shared-data traffic once per batch instead of once per
/// request.
///
/// Bounds, for a bucket of capacity `C` (`max_calls`) and `V` VMs (Envoy workers):
/// - a batch is `C / 100` tokens, at most [`LEASE_MAX_BATCH`]; limits below
///   [`LEASE_MIN_CAPACITY`] calls take one token at a time and stay exact;
/// - tokens leave the shared bucket before they are spent, so no VM spends a token the bucket did
///   not have; a leased token is spent within [`LEASE_MS`] of leaving it or dropped. Over any
///   window an exact bucket admits `A` requests, the leased one admits at most
///   `A + V × (batch − 1)` (the tokens other VMs held when the window opened), and at least
///   `A − V × (batch − 1)` per lease lifetime (tokens stranded in other VMs' leases).
pub mod lease {
    use std::collections::HashMap;

    use super::{Limit, Verdict};

    /// Limits below this many calls per period are never leased.
    pub const LEASE_MIN_CAPACITY: u64 = 200;
    pub const LEASE_MAX_BATCH: u64 = 32;
    /// How long a leased token may be spent after it left the shared bucket.
    pub const LEASE_MS: u64 = 1000;
    /// Leases held per VM; past it, expired ones are dropped, then all (they are only a cache of
    /// tokens already taken, so dropping one under-admits at most its batch).
    pub const MAX_LEASES: usize = 4096;

    /// Tokens to take from the shared bucket for one request under `limit`.
    pub fn batch(limit: &Limit) -> u64 {
        if limit.max_calls < LEASE_MIN_CAPACITY {
            1
        } else {
            (limit.max_calls / 100).clamp(1, LEASE_MAX_BATCH)
        }
    }

    #[derive(Debug, Clone, Copy)]
    struct Held {
        fingerprint: u64,
        /// Tokens left to spend.
        tokens: u64,
        /// Whole tokens the shared bucket had left when the lease was taken.
        shared_remaining: u64,
        taken_ms: u64,
        limit: Limit,
    }

    /// The leases one VM holds, by bucket key.
    #[derive(Debug, Default)]
    pub struct Leases {
        held: HashMap<String, Held>,
    }

    impl Leases {
        /// Spends one leased token of the bucket at `key`, if this VM holds a live one.
        pub fn spend(&mut self, key: &str, fingerprint: u64, limit: &Limit, now_ms: u64) -> Option<Verdict> {
            let h = self.held.get_mut(key)?;
            let live = h.fingerprint == fingerprint
                && h.limit == *limit
                && h.tokens > 0
                && now_ms >= h.taken_ms
                && now_ms - h.taken_ms < LEASE_MS;
            if !live {
                self.held.remove(key);
                return None;
            }
            h.tokens -= 1;
            let remaining = h.shared_remaining + h.tokens;
            let missing = limit.max_calls.saturating_sub(remaining);
            Some(Verdict {
                allowed: true,
                limit: limit.max_calls,
                remaining,
                retry_after_s: 0,
                reset_s: super::ceil_s(limit.time_for(u128::from(missing) * super::SCALE)),
            })
        }

        /// Records the tokens of a batch beyond the one spent now. `verdict` is the first
        /// token's (its `remaining` counts the leased tokens).
        pub fn hold(
            &mut self,
            key: &str,
            fingerprint: u64,
            limit: &Limit,
            now_ms: u64,
            taken: u64,
            verdict: &Verdict,
        ) {
            if taken <= 1 {
                self.held.remove(key);
                return;
            }
            if self.held.len() >= MAX_LEASES && !self.held.contains_key(key) {
                self.held
                    .retain(|_, h| now_ms >= h.taken_ms && now_ms - h.taken_ms < LEASE_MS);
                if self.held.len() >= MAX_LEASES {
                    self.held.clear();
                }
            }
            let tokens = taken - 1;
            self.held.insert(
                key.to_string(),
                Held {
                    fingerprint,
                    tokens,
                    shared_remaining: verdict.remaining.saturating_sub(tokens),
                    taken_ms: now_ms,
                    limit: *limit,
                },
            );
        }
    }
}

/// Creates `key` with an empty slot value if it does not exist yet (done at configure time, so
/// that request-time updates are always CAS on an existing key).
pub fn ensure_key(store: &dyn SharedStore, key: &str) {
    if store.get(key).is_none() {
        let _ = store.set(key, &[0u8; BUCKET_LEN], None);
    }
}

/// A stable fingerprint of a bucket's identity.
pub fn fingerprint(parts: &[&str]) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    // 0 marks an empty slot.
    h.finish().max(1)
}

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
pub struct SlotSeed(u64, u64);

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

    fn decode(bytes: &[u8]) -> Option<SlotSeed> {
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
            fingerprint: fingerprint(&["i", &self.ip.scope, &index.to_string()]),
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

/// 429 with `retry_after`, `Retry-After` and the `X-RateLimit-*` headers.
pub fn too_many(kind: Kind, v: &Verdict, period_s: u64, trace_id: &str) -> Reply {
    let message = format!(
        "{} rate limit exceeded: {} calls per {}s",
        kind.label(),
        v.limit,
        period_s
    );
    let body = serde_json::json!({
        "error": crate::reply::reason_phrase(429),
        "message": message,
        "retry_after": v.retry_after_s,
        "trace_id": trace_id,
    });
    let mut reply = Reply::json(Outcome::RateLimited(kind), body.to_string(), trace_id);
    reply.headers.push(("retry-after", v.retry_after_s.to_string()));
    reply.headers.extend(headers(v));
    reply
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full), as Envoy's
/// `enable_x_ratelimit_headers` names them.
pub fn headers(v: &Verdict) -> [(&'static str, String); 3] {
    [
        ("x-ratelimit-limit", v.limit.to_string()),
        ("x-ratelimit-remaining", v.remaining.to_string()),
        ("x-ratelimit-reset", v.reset_s.to_string()),
    ]
}

/// The client address: the peer address, or with `trusted_hops` = N > 0 the N-th entry from the
/// right of `X-Forwarded-For` as the filter sees it (the rendered Envoy appends the peer address,
/// so N = 1 trusts one proxy in front of Envoy). Falls back to the peer when XFF is too short or
/// an entry is not an IP address.
pub fn client_ip(peer: Option<&str>, xff: Option<&str>, trusted_hops: u32) -> Option<String> {
    if trusted_hops > 0 {
        if let Some(xff) = xff {
            let entries: Vec<&str> = xff.split(',').map(str::trim).collect();
            let idx = entries.len().checked_sub(1 + trusted_hops as usize);
            if let Some(candidate) = idx.and_then(|i| entries.get(i)) {
                if let Ok(ip) = candidate.parse::<std::net::IpAddr>() {
                    return Some(ip.to_string());
                }
            }
        }
    }
    peer.map(strip_port)
}

/// `1.2.3.4:5678` → `1.2.3.4`, `[::1]:80` → `::1`.
pub fn strip_port(addr: &str) -> String {
    if let Some(rest) = addr.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest).to_string();
    }
    match addr.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => {
            host.to_string()
        }
        _ => addr.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::collections::HashMap;

    const L: Limit = Limit {
        max_calls: 10,
        period_ms: 1000,
    };

    #[test]
    fn bucket_arithmetic() {
        let (mut b, v) = take(None, 7, &L, 1_000);
        assert!(v.allowed);
        assert_eq!((v.limit, v.remaining), (10, 9));
        for i in 0..9 {
            let (nb, v) = take(Some(b), 7, &L, 1_000);
            assert!(v.allowed, "{i}");
            b = nb;
        }
        let (b2, v) = take(Some(b), 7, &L, 1_000);
        assert!(!v.allowed);
        assert_eq!(v.remaining, 0);
        assert_eq!(v.retry_after_s, 1, "one token takes 100 ms: rounded up to 1 s");
        assert_eq!(v.reset_s, 1);
        // 100 ms later exactly one token is back.
        let (b3, v) = take(Some(b2), 7, &L, 1_100);
        assert!(v.allowed);
        let (_, v) = take(Some(b3), 7, &L, 1_100);
        assert!(!v.allowed);
        // After a full period the bucket is full again, never fuller.
        let (_, v) = take(Some(b3), 7, &L, 60_000);
        assert_eq!(v.remaining, 9);
    }

    #[test]
    fn slow_limits_round_retry_after_up() {
        let l = Limit {
            max_calls: 1,
            period_ms: 60_000,
        };
        let (b, v) = take(None, 1, &l, 0);
        assert!(v.allowed);
        let (_, v) = take(Some(b), 1, &l, 15_000);
        assert!(!v.allowed);
        assert_eq!(v.retry_after_s, 45);
    }

    #[test]
    fn clock_going_backwards_refills_nothing() {
        let (b, _) = take(None, 1, &L, 5_000);
        let (b2, v) = take(Some(b), 1, &L, 4_000);
        assert_eq!(v.remaining, 8);
        assert_eq!(b2.last_ms, 5_000);
    }

    #[test]
    fn other_fingerprint_takes_the_slot_over() {
        let (mut b, _) = take(None, 1, &L, 0);
        for _ in 0..10 {
            b = take(Some(b), 1, &L, 0).0;
        }
        let (b2, v) = take(Some(b), 2, &L, 0);
        assert!(v.allowed);
        assert_eq!((b2.fingerprint, v.remaining), (2, 9));
    }

    #[test]
    fn encoding_round_trips() {
        let b = Bucket {
            fingerprint: u64::MAX,
            tokens_milli: 1234,
            last_ms: 99,
        };
        assert_eq!(Bucket::decode(&b.encode()), Some(b));
        assert_eq!(Bucket::decode(b"short"), None);
        assert_eq!(Bucket::decode(&[0u8; BUCKET_LEN]).map(|b| b.fingerprint), Some(0));
    }

    /// A shared-data double with real CAS semantics (a missing key is set unconditionally) and
    /// an optional number of injected conflicts.
    #[derive(Default)]
    struct FakeStore {
        map: RefCell<HashMap<String, (Vec<u8>, u32)>>,
        next_cas: RefCell<u32>,
        conflicts_to_inject: RefCell<u32>,
    }

    impl SharedStore for FakeStore {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.map.borrow().get(key).cloned()
        }
        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), bool> {
            let mut inject = self.conflicts_to_inject.borrow_mut();
            if *inject > 0 {
                *inject -= 1;
                return Err(true);
            }
            let mut map = self.map.borrow_mut();
            if let (Some(cas), Some((_, current))) = (cas, map.get(key)) {
                if cas != *current {
                    return Err(true);
                }
            }
            let mut next = self.next_cas.borrow_mut();
            *next += 1;
            map.insert(key.to_string(), (value.to_vec(), *next));
            Ok(())
        }
    }

    fn ip_limits(ip_slots: u32) -> (RateLimits, RouteLimits) {
        let global = RateLimitSettings {
            per_ip: LimitSettings {
                max_calls: 5,
                period: 60,
            },
            ip_slots,
            ..RateLimitSettings::default()
        }
        .compile(false, None)
        .unwrap();
        let route = serde_json::from_str::<RouteRateLimit>(r#"{"max_calls": 1000}"#).unwrap();
        let limits = route.compile("r", &global).unwrap().unwrap();
        (global, limits)
    }

    #[test]
    fn every_vm_of_a_store_uses_the_first_seed() {
        let store = FakeStore::default();
        let first = SlotSeed::load_or_create(&store, [1; 16]);
        let second = SlotSeed::load_or_create(&store, [2; 16]);
        assert_eq!(first, second);
        assert_eq!(first, SlotSeed::decode(&[1; 16]).unwrap());
        // A value that is not a seed (16 bytes) is replaced.
        let store = FakeStore::default();
        store.set(SEED_KEY, b"junk", None).unwrap();
        assert_eq!(
            SlotSeed::load_or_create(&store, [3; 16]),
            SlotSeed::decode(&[3; 16]).unwrap()
        );
    }

    #[test]
    fn a_client_cannot_know_its_slot_and_addresses_of_one_slot_share_its_bucket() {
        let (global, limits) = ip_limits(64);
        let (a, b) = (SlotSeed(1, 2), SlotSeed(3, 4));
        let ips: Vec<String> = (0..200).map(|i| format!("127.1.0.{i}")).collect();
        let slots = |seed: &SlotSeed| -> Vec<String> {
            ips.iter()
                .map(|ip| limits.ip_check(&global, seed, ip).key)
                .collect()
        };
        // Another seed, other slots: which addresses share a slot depends on the secret.
        let same = slots(&a).iter().zip(slots(&b)).filter(|(x, y)| **x == *y).count();
        assert!(
            same < 20,
            "{same} of 200 addresses kept their slot under another seed"
        );
        // Two addresses of one slot alternating: 5 calls a minute between them, not 5 each.
        let (global, limits) = ip_limits(2);
        let seed = SlotSeed(5, 6);
        let first = limits.ip_check(&global, &seed, "127.1.0.40");
        let twin = ips
            .iter()
            .filter(|ip| *ip != "127.1.0.40")
            .map(|ip| limits.ip_check(&global, &seed, ip))
            .find(|c| c.key == first.key)
            .unwrap();
        let store = FakeStore::default();
        ensure_key(&store, &first.key);
        let mut allowed = 0;
        for i in 0..20 {
            let c = if i % 2 == 0 { &first } else { &twin };
            if let Update::Done(v) = consume(&store, &c.key, c.fingerprint, &c.limit, 1_000, 1).0 {
                allowed += u32::from(v.allowed);
            }
        }
        assert_eq!(allowed, 5);
    }

    #[test]
    fn consume_retries_conflicts_and_is_exact() {
        let store = FakeStore::default();
        ensure_key(&store, "k");
        *store.conflicts_to_inject.borrow_mut() = 3;
        let mut allowed = 0;
        for _ in 0..25 {
            if let Update::Done(v) = consume(&store, "k", 5, &L, 0, 1).0 {
                allowed += u32::from(v.allowed);
            }
        }
        assert_eq!(allowed, 10);
    }

    #[test]
    fn consume_gives_up_after_bounded_conflicts() {
        let store = FakeStore::default();
        ensure_key(&store, "k");
        *store.conflicts_to_inject.borrow_mut() = 1000;
        assert_eq!(
            consume(&store, "k", 5, &L, 0, 1).0,
            Update::GaveUp {
                conflicts: MAX_CAS_ATTEMPTS
            }
        );
    }

    /// Leases never spend a token the shared bucket did not have, and strand at most
    /// `V × (batch − 1)` tokens: two VMs alternating on one bucket of 1 000 calls per second
    /// (batch 10), at one instant and then across the lease lifetime.
    #[test]
    fn leases_stay_within_the_stated_bounds() {
        use super::lease::{batch, Leases, LEASE_MS};
        let limit = Limit {
            max_calls: 1000,
            period_ms: 1000,
        };
        assert_eq!(batch(&limit), 10);
        assert_eq!(
            batch(&Limit {
                max_calls: 199,
                period_ms: 1000
            }),
            1,
            "small limits stay exact"
        );
        let store = FakeStore::default();
        ensure_key(&store, "k");
        let mut vms = [Leases::default(), Leases::default()];
        let charge = |vms: &mut [Leases; 2], vm: usize, now: u64| -> bool {
            if let Some(v) = vms[vm].spend("k", 5, &limit, now) {
                return v.allowed;
            }
            match consume(&store, "k", 5, &limit, now, batch(&limit)) {
                (Update::Done(v), taken) => {
                    vms[vm].hold("k", 5, &limit, now, taken, &v);
                    v.allowed
                }
                (Update::GaveUp { .. }, _) => panic!("no contention here"),
            }
        };
        // At one instant: never more than the capacity, at most 2 × 9 fewer.
        let admitted = (0..3000).filter(|i| charge(&mut vms, i % 2, 0)).count() as u64;
        assert!((1000 - 2 * 9..=1000).contains(&admitted), "{admitted}");
        // Tokens leased at t = 0 and spent just before their lease ends, on top of a window that
        // opens then: at most 2 × 9 over what an exact bucket admits in that window (refill
        // alone over 999 ms is 999).
        let mut vms = [Leases::default(), Leases::default()];
        let store2 = FakeStore::default();
        ensure_key(&store2, "k");
        let take = |vms: &mut [Leases; 2], vm: usize, now: u64| -> bool {
            if let Some(v) = vms[vm].spend("k", 5, &limit, now) {
                return v.allowed;
            }
            match consume(&store2, "k", 5, &limit, now, batch(&limit)) {
                (Update::Done(v), taken) => {
                    vms[vm].hold("k", 5, &limit, now, taken, &v);
                    v.allowed
                }
                (Update::GaveUp { .. }, _) => false,
            }
        };
        // At t = 0 the second VM leases a batch and keeps 9 tokens; the first drains the rest.
        assert!(take(&mut vms, 1, 0));
        while take(&mut vms, 0, 0) {}
        // The window [1 ms, 999 ms]: an exact bucket admits the refill, 999 at most.
        let in_window = (0..5000u64)
            .filter(|i| take(&mut vms, (i % 2) as usize, 1 + i * 998 / 4999))
            .count() as u64;
        assert!(in_window <= 999 + 2 * 9, "{in_window}");
        assert!(in_window >= 999 - 2 * 9, "{in_window}");
        // After the lease lifetime nothing leased earlier is spent.
        let mut late = Leases::default();
        let v = Verdict {
            allowed: true,
            limit: 1000,
            remaining: 500,
            retry_after_s: 0,
            reset_s: 1,
        };
        late.hold("k", 5, &limit, 0, 10, &v);
        assert!(late.spend("k", 5, &limit, LEASE_MS - 1).is_some());
        assert!(late.spend("k", 5, &limit, LEASE_MS).is_none());
        // Another fingerprint (a slot taken over) or another limit (reload) ignores the lease.
        late.hold("k", 5, &limit, 0, 10, &v);
        assert!(late.spend("k", 6, &limit, 1).is_none());
    }

    #[test]
    fn ensure_key_never_resets_a_bucket() {
        let store = FakeStore::default();
        ensure_key(&store, "k");
        consume(&store, "k", 5, &L, 0, 1);
        ensure_key(&store, "k");
        let (bytes, _) = store.get("k").unwrap();
        assert_eq!(Bucket::decode(&bytes).unwrap().tokens_milli, 9_000);
    }

    #[test]
    fn cluster_sync_arithmetic() {
        use super::cluster::*;
        let store = FakeStore::default();
        assert!(add(&store, "c", 3));
        assert!(add(&store, "c", 4));
        assert_eq!(take_all(&store, "c"), 7);
        assert_eq!(take_all(&store, "c"), 0);
        assert_eq!(others(None, 50, 7), 0, "first sync only sets the baseline");
        assert_eq!(others(Some(50), 70, 7), 13);
        assert_eq!(others(Some(50), 40, 7), 0, "counter reset in Redis");
        assert_eq!(parse_incrby(Some(200), br#"{"INCRBY":42}"#), Ok(42));
        assert!(parse_incrby(Some(200), b"nope").is_err());
        assert!(parse_incrby(None, b"").is_err());
        assert_eq!(
            incrby_path("orders", 5),
            "/INCRBY/gateway%3Aratelimit%3Aconsumed%3Aorders/5.json"
        );
    }

    #[test]
    fn cluster_drain_removes_tokens_after_refill() {
        use super::cluster::drain;
        let store = FakeStore::default();
        ensure_key(&store, "r");
        consume(&store, "r", 9, &L, 0, 1); // 9 left
        assert!(drain(&store, "r", 9, &L, 0, 5));
        let (bytes, _) = store.get("r").unwrap();
        assert_eq!(Bucket::decode(&bytes).unwrap().tokens_milli, 4_000);
        assert!(drain(&store, "r", 9, &L, 0, 50));
        let (bytes, _) = store.get("r").unwrap();
        assert_eq!(
            Bucket::decode(&bytes).unwrap().tokens_milli,
            0,
            "never below empty"
        );
    }

    #[test]
    fn leader_election_keeps_one_leader_until_stale() {
        use super::cluster::elect;
        let store = FakeStore::default();
        assert!(elect(&store, 1, 1_000, 3_000));
        assert!(!elect(&store, 2, 1_500, 3_000), "a fresh leader keeps the key");
        assert!(elect(&store, 1, 2_000, 3_000), "the leader renews");
        assert!(elect(&store, 2, 5_001, 3_000), "a stale leader is replaced");
        assert!(!elect(&store, 1, 5_100, 3_000));
    }

    #[test]
    fn client_ip_from_peer_or_trusted_xff() {
        assert_eq!(
            client_ip(Some("10.0.0.1:5555"), Some("1.2.3.4"), 0).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(
            client_ip(Some("10.0.0.1:5555"), Some("1.2.3.4, 192.0.2.2"), 1).as_deref(),
            Some("1.2.3.4")
        );
        assert_eq!(
            client_ip(Some("10.0.0.1:5555"), Some("9.9.9.9,1.2.3.4,192.0.2.2"), 2).as_deref(),
            Some("9.9.9.9")
        );
        assert_eq!(
            client_ip(Some("10.0.0.1:5555"), Some("192.0.2.2"), 1).as_deref(),
            Some("10.0.0.1"),
            "too short"
        );
        assert_eq!(
            client_ip(Some("10.0.0.1:5555"), Some("evil, 192.0.2.2"), 1).as_deref(),
            Some("10.0.0.1")
        );
        assert_eq!(client_ip(Some("[::1]:80"), None, 0).as_deref(), Some("::1"));
        assert_eq!(client_ip(None, None, 0), None);
        assert_eq!(strip_port("::1"), "::1");
    }
}

/// Cluster-wide limits: every instance keeps the route bucket locally and replicates
/// consumption. The leader VM of each instance adds its instance's consumption since the last
/// sync to a Redis counter (`INCRBY`) on a timer; the growth of that counter beyond its own share
/// is what the other instances consumed, and is drained from the local bucket. Every replica
/// refills at the route's rate, so all of them track one bucket, late by one sync interval.
pub mod cluster {
    use super::{take, Bucket, Limit, SharedStore, MAX_CAS_ATTEMPTS};
    use crate::webdis::{command_path, json_reply, StoreError};

    /// Redis counter of a route's total consumption across instances.
    pub fn redis_key(route: &str) -> String {
        format!("gateway:ratelimit:consumed:{route}")
    }

    /// Shared-data counter of this instance's consumption not yet sent to Redis.
    pub fn pending_key(route: &str) -> String {
        format!("gw:rl:cw:{route}")
    }

    pub const LEADER_KEY: &str = "gw:rl:leader";

    /// `INCRBY <key> <delta>` through webdis.
    pub fn incrby_path(route: &str, delta: u64) -> String {
        command_path("INCRBY", &[&redis_key(route), &delta.to_string()])
    }

    /// Parses `{"INCRBY": 42}`.
    pub fn parse_incrby(status: Option<u16>, body: &[u8]) -> Result<u64, StoreError> {
        let v = json_reply(status, body)?;
        v.get("INCRBY")
            .and_then(serde_json::Value::as_u64)
            .ok_or(StoreError::BadReply("no INCRBY integer"))
    }

    fn read(store: &dyn SharedStore, key: &str) -> (u64, Option<u32>) {
        match store.get(key) {
            Some((bytes, cas)) => {
                let v = bytes
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes);
                (v.unwrap_or(0), Some(cas))
            }
            None => (0, None),
        }
    }

    /// Adds `delta` to a shared counter (CAS, bounded retries).
    pub fn add(store: &dyn SharedStore, key: &str, delta: u64) -> bool {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (v, cas) = read(store, key);
            match store.set(key, &v.saturating_add(delta).to_le_bytes(), cas) {
                Ok(()) => return true,
                Err(true) => continue,
                Err(false) => return false,
            }
        }
        false
    }

    /// Reads a shared counter and resets it to zero (CAS, bounded retries).
    pub fn take_all(store: &dyn SharedStore, key: &str) -> u64 {
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (v, cas) = read(store, key);
            if v == 0 {
                return 0;
            }
            match store.set(key, &0u64.to_le_bytes(), cas) {
                Ok(()) => return v,
                Err(true) => continue,
                Err(false) => return 0,
            }
        }
        0
    }

    /// Removes up to `tokens` from the bucket at `key` (after refilling it to `now_ms`).
    pub fn drain(
        store: &dyn SharedStore,
        key: &str,
        fingerprint: u64,
        limit: &Limit,
        now_ms: u64,
        tokens: u64,
    ) -> bool {
        if tokens == 0 {
            return true;
        }
        for _ in 0..MAX_CAS_ATTEMPTS {
            let (current, cas) = match store.get(key) {
                Some((bytes, cas)) => (Bucket::decode(&bytes), Some(cas)),
                None => (None, None),
            };
            // Refill through `take`'s arithmetic, then give the token it took back with the rest.
            let (mut b, v) = take(current, fingerprint, limit, now_ms);
            let refilled = if v.allowed {
                b.tokens_milli.saturating_add(1000)
            } else {
                b.tokens_milli
            };
            b.tokens_milli = refilled.saturating_sub(tokens.saturating_mul(1000));
            match store.set(key, &b.encode(), cas) {
                Ok(()) => return true,
                Err(true) => continue,
                Err(false) => return false,
            }
        }
        false
    }

    /// One VM per instance syncs: the holder of the leader key, whose heartbeat is renewed every
    /// tick; a VM takes the key over (CAS) when the heartbeat is older than `stale_ms`.
    pub fn elect(store: &dyn SharedStore, me: u64, now_ms: u64, stale_ms: u64) -> bool {
        let (holder, heartbeat, cas) = match store.get(LEADER_KEY) {
            Some((bytes, cas)) if bytes.len() == 16 => {
                let h = bytes
                    .get(..8)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes);
                let t = bytes
                    .get(8..16)
                    .and_then(|b| <[u8; 8]>::try_from(b).ok())
                    .map(u64::from_le_bytes);
                (h.unwrap_or(0), t.unwrap_or(0), Some(cas))
            }
            Some((_, cas)) => (0, 0, Some(cas)),
            None => (0, 0, None),
        };
        if holder != 0 && holder != me && now_ms.saturating_sub(heartbeat) < stale_ms {
            return false;
        }
        let mut value = [0u8; 16];
        value[..8].copy_from_slice(&me.to_le_bytes());
        value[8..].copy_from_slice(&now_ms.to_le_bytes());
        store.set(LEADER_KEY, &value, cas).is_ok()
    }

    /// Tokens other instances consumed: the counter's growth since our last sync minus what we
    /// added. `None` on the first sync (no baseline yet).
    pub fn others(previous_total: Option<u64>, new_total: u64, our_delta: u64) -> u64 {
        match previous_total {
            Some(prev) => new_total.saturating_sub(prev).saturating_sub(our_delta),
            None => 0,
        }
    }
}
