//! A reply the gateway sends itself: JSON bodies in the reference's shape
//! (`{"error", "message", "trace_id"}`), the trace id header, and the request's [`Outcome`].

use crate::outcome::{Outcome, Scope};
use crate::trace::HEADER_TRACE_ID;

/// A local reply the gateway sends instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// How the request ended (its status, log decision and metric labels come from it).
    pub outcome: Outcome,
}

impl Reply {
    /// A JSON refusal: `{"error": ..., "message": ..., "trace_id": ...}` with the outcome's
    /// status.
    pub fn refuse(outcome: Outcome, message: &str, trace_id: &str) -> Self {
        let status = outcome.status();
        let body = serde_json::json!({
            "error": reason_phrase(status),
            "message": message,
            "trace_id": trace_id,
        });
        Self::json(outcome, body.to_string(), trace_id)
    }

    /// A JSON reply with the trace id header.
    pub fn json(outcome: Outcome, body: String, trace_id: &str) -> Self {
        Reply {
            outcome,
            headers: vec![
                ("content-type", "application/json".to_string()),
                (HEADER_TRACE_ID, trace_id.to_string()),
            ],
            body,
        }
    }

    /// Its HTTP status: the outcome's, so the two never disagree.
    pub fn status(&self) -> u16 {
        self.outcome.status()
    }

    /// A 429 of a rate limit: the refusal's body with `retry_after` (seconds), and the
    /// `Retry-After` header.
    pub fn rate_limited(scope: Scope, message: &str, retry_after_s: u64, trace_id: &str) -> Self {
        let outcome = Outcome::RateLimited(scope);
        let body = serde_json::json!({
            "error": reason_phrase(outcome.status()),
            "message": message,
            "retry_after": retry_after_s,
            "trace_id": trace_id,
        });
        let mut reply = Self::json(outcome, body.to_string(), trace_id);
        reply.headers.push(("retry-after", retry_after_s.to_string()));
        reply
    }

    /// An endpoint's 200 JSON reply.
    pub fn ok(body: &serde_json::Value, trace_id: &str) -> Self {
        Self::json(Outcome::Answered, body.to_string(), trace_id)
    }
}

/// The standard reason phrase used as the `error` field.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_have_the_reference_shape() {
        let r = Reply::refuse(Outcome::Role, "nope", "t-1");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "Forbidden");
        assert_eq!(v["message"], "nope");
        assert_eq!(v["trace_id"], "t-1");
        assert_eq!((r.status(), r.outcome), (403, Outcome::Role));
        assert!(r.headers.contains(&("x-trace-id", "t-1".to_string())));
        assert_eq!(Reply::refuse(Outcome::NotFound, "x", "").status(), 404);
    }
}
