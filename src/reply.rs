//! A reply the gateway sends itself: JSON bodies in the reference's shape
//! (`{"error", "message", "trace_id"}`), the trace id header, and a machine-readable reason for
//! logs and metrics.

use crate::trace::HEADER_TRACE_ID;

/// A local reply the gateway sends instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Why the gateway answered, machine-readable (logs and metrics): e.g. `expired`, `role`,
    /// `route_not_found`, `rate_limited_user`.
    pub reason: &'static str,
}

impl Reply {
    /// A JSON error reply: `{"error": ..., "message": ..., "trace_id": ...}`.
    pub fn error(status: u16, message: &str, trace_id: &str) -> Self {
        let body = serde_json::json!({
            "error": reason_phrase(status),
            "message": message,
            "trace_id": trace_id,
        });
        Self::json(status, body.to_string(), trace_id)
    }

    /// The same, with an explicit reason.
    pub fn refusal(status: u16, message: &str, reason: &'static str, trace_id: &str) -> Self {
        let mut r = Self::error(status, message, trace_id);
        r.reason = reason;
        r
    }

    /// A JSON reply with the trace id header.
    pub fn json(status: u16, body: String, trace_id: &str) -> Self {
        Reply {
            reason: default_reason(status),
            status,
            headers: vec![
                ("content-type", "application/json".to_string()),
                (HEADER_TRACE_ID, trace_id.to_string()),
            ],
            body,
        }
    }

    /// A 200 JSON reply built from a value.
    pub fn ok(body: &serde_json::Value, trace_id: &str) -> Self {
        Self::json(200, body.to_string(), trace_id)
    }
}

fn default_reason(status: u16) -> &'static str {
    match status {
        200 => "ok",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "route_not_found",
        405 => "method_not_allowed",
        429 => "rate_limited",
        500 => "internal_error",
        503 => "store_unavailable",
        _ => "error",
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
        let r = Reply::refusal(403, "nope", "role", "t-1");
        let v: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(v["error"], "Forbidden");
        assert_eq!(v["message"], "nope");
        assert_eq!(v["trace_id"], "t-1");
        assert_eq!(r.reason, "role");
        assert!(r.headers.contains(&("x-trace-id", "t-1".to_string())));
        assert_eq!(Reply::error(404, "x", "").reason, "route_not_found");
    }
}
