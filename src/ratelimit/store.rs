//! Buckets in a [`SharedStore`]: the bounded compare-and-swap loop, and keys created up front.

use super::*;
use crate::host::{SetError, SharedStore};

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
            Err(SetError::CasMismatch) => conflicts += 1,
            Err(SetError::Failed) => return (Update::GaveUp { conflicts }, 0),
        }
    }
    (Update::GaveUp { conflicts }, 0)
}

/// Creates `key` with an empty slot value if it does not exist yet (done at configure time, so
/// that request-time updates are always CAS on an existing key).
pub fn ensure_key(store: &dyn SharedStore, key: &str) {
    if store.get(key).is_none() {
        let _ = store.set(key, &[0u8; BUCKET_LEN], None);
    }
}
