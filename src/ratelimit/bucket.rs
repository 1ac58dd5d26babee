//! A token bucket: its fixed-size encoding, the arithmetic with an injected clock, and the
//! verdict's 429 reply and headers.

use super::*;

/// Milli-tokens per token (sub-token refill precision).
pub(super) const SCALE: u128 = 1000;
/// CAS attempts before giving up on a contended bucket (then the request is allowed and counted).
pub const MAX_CAS_ATTEMPTS: u32 = 16;

/// A limit: `max_calls` per `period_ms`; capacity `max_calls`, refilled continuously.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub max_calls: u64,
    pub period_ms: u64,
}

impl Limit {
    pub(super) fn capacity_milli(&self) -> u128 {
        u128::from(self.max_calls) * SCALE
    }

    /// Milli-tokens refilled over `elapsed_ms`.
    pub(super) fn refill(&self, elapsed_ms: u64) -> u128 {
        u128::from(elapsed_ms) * self.capacity_milli() / u128::from(self.period_ms.max(1))
    }

    /// Milliseconds needed to refill `missing` milli-tokens (rounded up).
    pub(super) fn time_for(&self, missing: u128) -> u64 {
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
            fingerprint: crate::host::read_u64(bytes, 0)?,
            tokens_milli: crate::host::read_u64(bytes, 8)?,
            last_ms: crate::host::read_u64(bytes, 16)?,
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

pub(super) fn ceil_s(ms: u64) -> u64 {
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

/// 429 with `retry_after` and `Retry-After` (the rate-limit headers are added with every reply
/// of the request, see [`response_headers`]).
pub fn too_many(kind: Kind, v: &Verdict, period_s: u64, trace_id: &str) -> Reply {
    let message = crate::outcome::message::rate_limited(kind.label(), v.limit, period_s);
    Reply::rate_limited(kind, &message, v.retry_after_s, trace_id)
}

/// The buckets a request was charged to, and the binding one (fewest tokens left).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Charged {
    /// Each bucket's scope and limit, in the order they were charged.
    pub policies: Vec<(Kind, Limit)>,
    pub binding: Option<(Kind, Verdict)>,
}

/// A scope's policy name in `RateLimit-Policy` and `RateLimit`.
fn policy_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Route => "route",
        Kind::User => "user",
        Kind::Ip => "ip",
    }
}

/// The response headers for what a request was charged, in `style`:
/// - legacy: `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full)
///   of the binding bucket, as Envoy's `enable_x_ratelimit_headers` names them;
/// - ietf (draft-ietf-httpapi-ratelimit-headers-09): `RateLimit-Policy`, a Structured Fields
///   List with one item per bucket charged (`"user";q=10;w=60`: quota and window in seconds),
///   and `RateLimit` with the binding bucket's item (`"user";r=3;t=20`: tokens left, seconds
///   until it is full again).
pub fn response_headers(style: super::HeaderStyle, charged: &Charged) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let Some((kind, v)) = &charged.binding else {
        return out;
    };
    if style.legacy() {
        out.push(("x-ratelimit-limit", v.limit.to_string()));
        out.push(("x-ratelimit-remaining", v.remaining.to_string()));
        out.push(("x-ratelimit-reset", v.reset_s.to_string()));
    }
    if style.ietf() {
        let mut policies = String::new();
        for (k, limit) in &charged.policies {
            if !policies.is_empty() {
                policies.push_str(", ");
            }
            policies.push_str(&format!(
                "\"{}\";q={};w={}",
                policy_name(*k),
                limit.max_calls,
                (limit.period_ms / 1000).max(1)
            ));
        }
        out.push(("ratelimit-policy", policies));
        out.push((
            "ratelimit",
            format!("\"{}\";r={};t={}", policy_name(*kind), v.remaining, v.reset_s),
        ));
    }
    out
}
