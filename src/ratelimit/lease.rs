//! Bucket leases: a VM takes a small batch of tokens from a shared bucket with one CAS and spends
//! them locally, so a busy bucket costs shared-data traffic once per batch instead of once per
//! request.
//!
//! Bounds, for a bucket of capacity `C` (`max_calls`) and `V` VMs (Envoy workers):
//! - a batch is `C / 100` tokens, at most [`LEASE_MAX_BATCH`]; limits below
//!   [`LEASE_MIN_CAPACITY`] calls take one token at a time and stay exact;
//! - tokens leave the shared bucket before they are spent, so no VM spends a token the bucket did
//!   not have; a leased token is spent within [`LEASE_MS`] of leaving it or dropped. Over any
//!   window an exact bucket admits `A` requests, the leased one admits at most
//!   `A + V × (batch − 1)` (the tokens other VMs held when the window opened), and at least
//!   `A − V × (batch − 1)` per lease lifetime (tokens stranded in other VMs' leases).

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
