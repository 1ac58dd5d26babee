//! The per-client budget of failed signature checks: every token whose signature does not
//! verify takes one token from its client address's bucket, and a client whose bucket is empty
//! gets no signature checked (a token the verified-token cache already holds still passes). One
//! address cannot make the workers verify without bound (a key set that puts keys under one kid,
//! or any issuer's slow algorithm).
//!
//! The buckets live in shared data under `gw:rl:v:<slot>` (the slot a keyed hash of the address,
//! as for the per-IP buckets), created on first use: memory grows with the addresses that fail,
//! at most `ip_slots` buckets of 24 bytes.

use super::*;
use crate::host::SharedStore;

/// Key prefix of the budget slots.
pub const BUDGET_KIND: &str = "v";

/// The compiled `gateway.rate_limit.bad_signatures`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VerifyBudget {
    pub limit: Limit,
    pub slots: u32,
}

impl VerifyBudget {
    /// The slot of `ip`'s client (an IPv6 address's /64).
    fn slot(&self, seed: &SlotSeed, ip: &str) -> (String, u64) {
        let client = client_group(ip);
        let index = seed.hash(&[BUDGET_KIND, &client]) % u64::from(self.slots.max(1));
        (slot_key_at(BUDGET_KIND, index), index.wrapping_add(1))
    }

    /// Whether `ip` may still have a signature checked.
    pub fn allows(&self, store: &dyn SharedStore, seed: &SlotSeed, ip: &str, now_ms: u64) -> bool {
        let (key, fingerprint) = self.slot(seed, ip);
        let current = store.get(&key).and_then(|(v, _)| Bucket::decode(&v));
        peek(current, fingerprint, &self.limit, now_ms)
    }

    /// A signature check of `ip`'s failed: take one token.
    pub fn charge(&self, store: &dyn SharedStore, seed: &SlotSeed, ip: &str, now_ms: u64) {
        let (key, fingerprint) = self.slot(seed, ip);
        let _ = consume(store, &key, fingerprint, &self.limit, now_ms, 1);
    }
}

/// Whether `current` holds a whole token at `now_ms` (nothing is taken).
pub fn peek(current: Option<Bucket>, fingerprint: u64, limit: &Limit, now_ms: u64) -> bool {
    let (_, verdict, _) = take_n(current, fingerprint, limit, now_ms, 1);
    verdict.allowed
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LocalStore;

    #[test]
    fn failures_spend_the_budget_of_their_address_only() {
        let store = LocalStore::default();
        let seed = SlotSeed(1, 2);
        let budget = VerifyBudget {
            limit: Limit {
                max_calls: 3,
                period_ms: 60_000,
            },
            slots: 1 << 16,
        };
        for _ in 0..3 {
            assert!(budget.allows(&store, &seed, "10.0.0.1", 1_000));
            budget.charge(&store, &seed, "10.0.0.1", 1_000);
        }
        assert!(!budget.allows(&store, &seed, "10.0.0.1", 1_000));
        assert!(budget.allows(&store, &seed, "10.0.0.2", 1_000));
        // One token back after a third of the period.
        assert!(budget.allows(&store, &seed, "10.0.0.1", 21_000));
    }
}
