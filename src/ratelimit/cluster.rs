//! Cluster-wide limits: every instance keeps the route bucket locally and replicates
//! consumption. The leader VM of each instance adds its instance's consumption since the last
//! sync to a Redis counter (`INCRBY`) on a timer; the growth of that counter beyond its own share
//! is what the other instances consumed, and is drained from the local bucket. Every replica
//! refills at the route's rate, so all of them track one bucket, late by one sync interval.

use super::{take, Bucket, Limit, MAX_CAS_ATTEMPTS};
use crate::host::{SetError, SharedStore};
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
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return false,
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
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return 0,
        }
    }
    0
}

/// Removes `tokens` from the bucket at `key` (after refilling it to `now_ms`). What the bucket
/// does not hold becomes a debt: its refill clock is moved ahead by the time the missing tokens
/// take to refill (at most one period), so the next tokens pay it before anyone is admitted.
/// Without the debt, instances that each empty their bucket between syncs would drain nothing
/// and the route would admit its limit once per instance.
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
        let wanted = tokens.saturating_mul(1000);
        if refilled >= wanted {
            b.tokens_milli = refilled - wanted;
        } else {
            b.tokens_milli = 0;
            let debt = u128::from(wanted - refilled);
            let latest = now_ms.saturating_add(limit.period_ms);
            b.last_ms = b
                .last_ms
                .max(now_ms)
                .saturating_add(limit.time_for(debt))
                .min(latest);
        }
        match store.set(key, &b.encode(), cas) {
            Ok(()) => return true,
            Err(SetError::CasMismatch) => continue,
            Err(SetError::Failed) => return false,
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
