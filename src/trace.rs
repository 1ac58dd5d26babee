//! Trace ids: keep a well-formed incoming `X-Trace-ID`, else continue an incoming W3C
//! `traceparent`, else generate a UUIDv4; always emit a `traceparent` whose trace-id is the same
//! 128 bits. Randomness is injected so the logic is deterministic under test.

/// Trace headers: the id the reference uses, and the W3C context.
pub const HEADER_TRACE_ID: &str = "x-trace-id";
pub const HEADER_TRACEPARENT: &str = "traceparent";

/// `trace:` in the gateway file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceSettings {
    /// Keep a well-formed incoming `X-Trace-ID` / continue an incoming `traceparent` (the
    /// reference keeps the caller's id). `false`: every request gets a new id, so clients cannot
    /// choose the ids that logs are filed and queried under.
    #[serde(default = "crate::error::default_true")]
    pub trust_incoming: bool,
}

impl Default for TraceSettings {
    fn default() -> Self {
        Self { trust_incoming: true }
    }
}

/// Random bytes one request needs: 16 for a UUID, 8 for the span id.
pub const RANDOM_BYTES: usize = 24;

/// The trace identity of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// Sent upstream and back to the client as `X-Trace-ID`, and put in error bodies.
    pub trace_id: String,
    /// W3C `traceparent` sent upstream: `00-<trace-id>-<span-id>-<flags>`.
    pub traceparent: String,
}

fn push_hex(out: &mut String, bytes: &[u8]) {
    for b in bytes {
        out.push(char::from_digit(u32::from(b >> 4), 16).unwrap_or('0'));
        out.push(char::from_digit(u32::from(b & 0x0f), 16).unwrap_or('0'));
    }
}

fn is_hex(s: &str) -> bool {
    s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The 32 lowercase hex digits of a well-formed trace id (a UUID in 8-4-4-4-12 form or 32 hex
/// digits, any case, not all zero), or `None`.
pub fn trace_hex(id: &str) -> Option<String> {
    let hex: String = match id.len() {
        36 => {
            let dashes_ok = id
                .char_indices()
                .all(|(i, c)| (c == '-') == matches!(i, 8 | 13 | 18 | 23));
            if !dashes_ok {
                return None;
            }
            id.chars().filter(|&c| c != '-').collect()
        }
        32 => id.to_string(),
        _ => return None,
    };
    if !is_hex(&hex) || hex.bytes().all(|b| b == b'0') {
        return None;
    }
    Some(hex.to_ascii_lowercase())
}

/// Parses a W3C `traceparent` (version 00): returns (trace-id hex, flags).
fn parse_traceparent(tp: &str) -> Option<(&str, &str)> {
    let mut parts = tp.split('-');
    let (version, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || version != "00" {
        return None;
    }
    let lower_hex =
        |s: &str, n: usize| s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    if !lower_hex(trace, 32) || !lower_hex(span, 16) || !lower_hex(flags, 2) {
        return None;
    }
    if trace.bytes().all(|b| b == b'0') || span.bytes().all(|b| b == b'0') {
        return None;
    }
    Some((trace, flags))
}

fn uuid_from_hex(hex: &str) -> String {
    let mut out = String::with_capacity(36);
    for (i, c) in hex.chars().enumerate() {
        if matches!(i, 8 | 12 | 16 | 20) {
            out.push('-');
        }
        out.push(c);
    }
    out
}

/// Formats 16 random bytes as a UUIDv4 (version and variant bits set).
pub fn uuid_v4(mut b: [u8; 16]) -> String {
    b[6] = (b[6] & 0x0f) | 0x40; // version 4
    b[8] = (b[8] & 0x3f) | 0x80; // RFC 4122 variant
    let mut hex = String::with_capacity(32);
    push_hex(&mut hex, &b);
    uuid_from_hex(&hex)
}

/// Builds the trace context for a request from its incoming headers and fresh random bytes.
pub fn trace_context(
    x_trace_id: Option<&str>,
    traceparent: Option<&str>,
    random: &[u8; RANDOM_BYTES],
) -> TraceContext {
    let (uuid_bytes, span_bytes) = random.split_at(16);
    let mut span = String::with_capacity(16);
    push_hex(&mut span, span_bytes);
    if span.bytes().all(|b| b == b'0') {
        span.replace_range(15..16, "1");
    }

    let (trace_id, hex, flags) = if let Some(hex) = x_trace_id.and_then(trace_hex) {
        let id = x_trace_id.unwrap_or_default().to_string();
        (id, hex, "01")
    } else if let Some((hex, flags)) = traceparent.and_then(parse_traceparent) {
        (uuid_from_hex(hex), hex.to_string(), flags)
    } else {
        let mut b = [0u8; 16];
        b.copy_from_slice(uuid_bytes);
        let id = uuid_v4(b);
        let hex = id.replace('-', "");
        (id, hex, "01")
    };
    TraceContext {
        trace_id,
        traceparent: format!("00-{hex}-{span}-{flags}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RND: [u8; RANDOM_BYTES] = [
        0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 1, 2,
        3, 4, 5, 6, 7, 8,
    ];

    #[test]
    fn generates_uuid_v4_and_consistent_traceparent() {
        let t = trace_context(None, None, &RND);
        assert_eq!(t.trace_id, "00112233-4455-4677-8899-aabbccddeeff");
        assert_eq!(
            t.traceparent,
            "00-00112233445546778899aabbccddeeff-0102030405060708-01"
        );
    }

    #[test]
    fn keeps_a_well_formed_incoming_id() {
        let t = trace_context(Some("ABCDEF01-2345-6789-abcd-ef0123456789"), None, &RND);
        assert_eq!(t.trace_id, "ABCDEF01-2345-6789-abcd-ef0123456789");
        assert_eq!(
            t.traceparent,
            "00-abcdef0123456789abcdef0123456789-0102030405060708-01"
        );
        let t = trace_context(Some("4bf92f3577b34da6a3ce929d0e0e4736"), None, &RND);
        assert_eq!(t.trace_id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn replaces_malformed_ids() {
        for bad in [
            "",
            "x",
            "not-a-uuid-not-a-uuid-not-a-uuid-xx",
            "00000000-0000-0000-0000-000000000000",
            "abcdef0123456789abcdef012345678g",
            "abcdef01-2345-6789-abcd-ef012345678\n",
            "a\r\nb",
            "abcdef0123-45-6789-abcd-ef012345678",
        ] {
            let t = trace_context(Some(bad), None, &RND);
            assert_eq!(t.trace_id, "00112233-4455-4677-8899-aabbccddeeff", "{bad:?}");
        }
    }

    #[test]
    fn continues_an_incoming_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
        let t = trace_context(None, Some(tp), &RND);
        assert_eq!(t.trace_id, "4bf92f35-77b3-4da6-a3ce-929d0e0e4736");
        assert_eq!(
            t.traceparent,
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0102030405060708-00"
        );
        for bad in [
            "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-xyz",
            "",
        ] {
            let t = trace_context(None, Some(bad), &RND);
            assert_eq!(t.trace_id, "00112233-4455-4677-8899-aabbccddeeff", "{bad:?}");
        }
    }

    #[test]
    fn span_id_is_never_zero() {
        let mut rnd = RND;
        rnd[16..].fill(0);
        let t = trace_context(None, None, &rnd);
        assert!(t.traceparent.contains("-0000000000000001-"), "{}", t.traceparent);
    }
}
