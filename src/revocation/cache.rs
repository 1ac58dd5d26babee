//! The bounded local cache of lookup answers and the local ban table, both in shared data, and
//! the revocation epoch that voids every VM's memo of clean answers.

use super::{Lookup, BAN_KEY_PREFIX, CACHE_KEY_PREFIX};

/// The bounded cache: `slots` shared-data keys; an entry is found by fingerprint, and a
/// colliding newcomer simply replaces it (a miss, never a wrong answer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub index: u64,
    pub fingerprint: u64,
}

impl Slot {
    pub fn of(kind: &str, value: &str, slots: u32) -> Slot {
        let fp = crate::host::fingerprint(&[kind, value]);
        Slot {
            index: fp % u64::from(slots.max(1)),
            fingerprint: fp,
        }
    }

    pub fn cache_key(&self) -> String {
        format!("{CACHE_KEY_PREFIX}{}", self.index)
    }

    pub fn ban_key(&self) -> String {
        format!("{BAN_KEY_PREFIX}{}", self.index)
    }
}

const ENTRY_LEN: usize = 25;
const NONE_I64: i64 = i64::MIN;

/// A cached answer: fingerprint, when it was stored (ms), and the lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheEntry {
    pub fingerprint: u64,
    pub stored_at_ms: u64,
    pub lookup: Lookup,
}

impl CacheEntry {
    pub fn encode(&self) -> [u8; ENTRY_LEN] {
        let mut out = [0u8; ENTRY_LEN];
        let rb = self.lookup.revoked_before.unwrap_or(NONE_I64);
        out[..8].copy_from_slice(&self.fingerprint.to_le_bytes());
        out[8..16].copy_from_slice(&self.stored_at_ms.to_le_bytes());
        out[16] = u8::from(self.lookup.blacklisted);
        out[17..25].copy_from_slice(&rb.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<CacheEntry> {
        if bytes.len() != ENTRY_LEN {
            return None;
        }
        let rb = crate::host::read_u64(bytes, 17)? as i64;
        Some(CacheEntry {
            fingerprint: crate::host::read_u64(bytes, 0)?,
            stored_at_ms: crate::host::read_u64(bytes, 8)?,
            lookup: Lookup {
                blacklisted: *bytes.get(16)? != 0,
                revoked_before: (rb != NONE_I64).then_some(rb),
            },
        })
    }

    /// The entry if it is for `slot` and younger than `ttl_ms`.
    pub fn fresh(bytes: Option<&[u8]>, slot: &Slot, now_ms: u64, ttl_ms: u64) -> Option<CacheEntry> {
        let e = CacheEntry::decode(bytes?)?;
        (e.fingerprint == slot.fingerprint && now_ms.saturating_sub(e.stored_at_ms) < ttl_ms).then_some(e)
    }
}

/// The shared key whose CAS is the revocation epoch: every local write that revokes (a
/// blacklist entry, a ban, a cached answer that revokes) touches it after its own entry.
pub const EPOCH_KEY: &str = "gw:rv:epoch";

/// Marks a revocation at `now_ms`: every VM's [`CleanMemo`] is void from now on, and so is
/// every clean answer cached before it for `failure_mode: stale` ([`last_local_revocation`]).
pub fn bump_epoch(store: &dyn crate::host::SharedStore, now_ms: u64) {
    // Never empty: the proxy-wasm SDK reads an empty value back as no value.
    let _ = store.set(EPOCH_KEY, &now_ms.to_le_bytes(), None);
}

/// When this gateway last recorded a revocation (ms), from the epoch key's value; 0 when none
/// (or an older module's value, which carried no time).
pub fn last_local_revocation(store: &dyn crate::host::SharedStore) -> u64 {
    store
        .get(EPOCH_KEY)
        .and_then(|(v, _)| <[u8; 8]>::try_from(v.as_slice()).ok())
        .map_or(0, u64::from_le_bytes)
}

/// Memo entries per VM; past it the memo starts over (it only saves reads).
const CLEAN_MEMO_MAX: usize = 8192;

/// Tokens one VM found neither banned nor blacklisted, each valid until its cache entry would
/// expire and only while the revocation epoch it was seen at is current. With it a cache hit
/// costs one shared-data read (the epoch) instead of two (the ban table and the cache).
#[derive(Debug, Default)]
pub struct CleanMemo {
    entries: std::collections::HashMap<u64, (Option<u32>, u64)>,
}

impl CleanMemo {
    /// Whether the token (its slot fingerprint) is known clean at `epoch` and `now_ms`.
    pub fn holds(&self, fingerprint: u64, epoch: Option<u32>, now_ms: u64) -> bool {
        self.entries
            .get(&fingerprint)
            .is_some_and(|(e, until)| *e == epoch && now_ms < *until)
    }

    pub fn remember(&mut self, fingerprint: u64, epoch: Option<u32>, until_ms: u64) {
        if self.entries.len() >= CLEAN_MEMO_MAX {
            self.entries.clear();
        }
        self.entries.insert(fingerprint, (epoch, until_ms));
    }
}

/// A local ban entry (same encoding; `stored_at_ms` holds the entry's expiry).
pub fn ban_entry(slot: &Slot, revoked_before: i64, expires_at_ms: u64) -> [u8; ENTRY_LEN] {
    CacheEntry {
        fingerprint: slot.fingerprint,
        stored_at_ms: expires_at_ms,
        lookup: Lookup {
            blacklisted: false,
            revoked_before: Some(revoked_before),
        },
    }
    .encode()
}

/// The local ban's `revoked_before` for `slot`, if present and not expired.
pub fn local_ban(bytes: Option<&[u8]>, slot: &Slot, now_ms: u64) -> Option<i64> {
    let e = CacheEntry::decode(bytes?)?;
    if e.fingerprint != slot.fingerprint || now_ms >= e.stored_at_ms {
        return None;
    }
    e.lookup.revoked_before
}
