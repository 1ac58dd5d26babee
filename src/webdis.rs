//! The webdis codec every caller of Redis shares (revocation, the log store, cluster-wide rate
//! limits): command paths with percent-encoded arguments, and the checks on a reply. No host
//! calls here; the orchestrator dispatches and hands the reply back.

/// Percent-encodes one webdis argument: everything but `A-Z a-z 0-9 - _ ~` (so `.` and `/`
/// cannot be taken for a format extension or an argument separator).
pub fn encode_arg(arg: &str) -> String {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut out = String::with_capacity(arg.len() + 8);
    for b in arg.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX.get(usize::from(b >> 4)).copied().unwrap_or(b'0')));
            out.push(char::from(
                HEX.get(usize::from(b & 0x0f)).copied().unwrap_or(b'0'),
            ));
        }
    }
    out
}

/// A webdis command path: `/CMD/arg1/arg2.json` (the explicit `.json` fixes the reply format).
pub fn command_path(command: &str, args: &[&str]) -> String {
    let mut p = String::with_capacity(64);
    p.push('/');
    p.push_str(command);
    for a in args {
        p.push('/');
        p.push_str(&encode_arg(a));
    }
    p.push_str(".json");
    p
}

/// `path` with this call's nonce as webdis's JSONP callback: webdis wraps the reply as
/// `n<nonce>(<json>)`, formatting wrapper and content from the same command. A reply that
/// does not carry the nonce belongs to another call (webdis before 0.1.20 can write a reply to
/// a new client that reused the socket number of a client that went away) and is refused.
pub fn nonce_path(path: &str, nonce: u64) -> String {
    format!("{path}?jsonp=n{nonce:016x}")
}

/// The JSON inside a reply to a [`nonce_path`] call, or `None` when the reply is not this
/// call's (another nonce, or no wrapper).
pub fn unwrap_reply(nonce: u64, body: &[u8]) -> Option<&[u8]> {
    let prefix = format!("n{nonce:016x}(");
    let rest = body.strip_prefix(prefix.as_bytes())?;
    let end = rest.iter().rposition(|b| !b.is_ascii_whitespace())?;
    let rest = rest.get(..=end)?;
    let rest = rest.strip_suffix(b";").unwrap_or(rest);
    rest.strip_suffix(b")")
}

/// The `Authorization` value for webdis's HTTP basic authentication (`user:password`). Built
/// once at configure time; standard base64 written out here costs a few hundred bytes of
/// module, the `base64` crate about 6 KB.
/// The `Authorization` value for the `user:password` held by environment variable `var`
/// (looked up through `env`); `field` names the setting in the error.
pub fn auth_from_env(
    field: &str,
    var: &str,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<String, crate::error::ConfigError> {
    let credentials = env(var).filter(|v| v.contains(':')).ok_or_else(|| {
        crate::error::ConfigError::new(
            field,
            format!("environment variable {var} must hold user:password"),
        )
    })?;
    Ok(basic_auth(&credentials))
}

/// The `Authorization` value of HTTP basic credentials (`user:password`).
pub fn basic_auth(credentials: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// Why a store reply was not usable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// The call could not be made (unknown cluster, ...).
    Dispatch(String),
    /// No `:status`: timeout or connection failure.
    NoResponse,
    Status(u16),
    BadReply(&'static str),
}

impl std::fmt::Display for StoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dispatch(s) => write!(f, "dispatch failed: {s}"),
            Self::NoResponse => f.write_str("no response (timeout or connection failure)"),
            Self::Status(s) => write!(f, "status {s}"),
            Self::BadReply(why) => write!(f, "unparseable reply: {why}"),
        }
    }
}

/// A 200 reply whose body is JSON.
pub fn json_reply(status: Option<u16>, body: &[u8]) -> Result<serde_json::Value, StoreError> {
    match status {
        None => return Err(StoreError::NoResponse),
        Some(200) => {}
        Some(s) => return Err(StoreError::Status(s)),
    }
    serde_json::from_slice(body).map_err(|_| StoreError::BadReply("not JSON"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arguments_cannot_escape_their_segment() {
        assert_eq!(encode_arg("a.b/c d%"), "a%2Eb%2Fc%20d%25");
        assert_eq!(encode_arg("é"), "%C3%A9");
        assert_eq!(command_path("GET", &["k/1"]), "/GET/k%2F1.json");
    }

    #[test]
    fn replies_must_carry_their_nonce() {
        assert_eq!(
            nonce_path("/GET/k.json", 0xab),
            "/GET/k.json?jsonp=n00000000000000ab"
        );
        let n = 0x0123_4567_89ab_cdef;
        assert_eq!(
            unwrap_reply(n, b"n0123456789abcdef({\"GET\":null});\n"),
            Some(&b"{\"GET\":null}"[..])
        );
        assert_eq!(unwrap_reply(n, b"n0123456789abcdef({})"), Some(&b"{}"[..]));
        for other in [
            &b"n0123456789abcdee({\"GET\":null});"[..],
            b"{\"GET\":null}",
            b"n0123456789abcdef(",
            b"",
            b"n0123456789abcdef({}",
        ] {
            assert_eq!(
                unwrap_reply(n, other),
                None,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
    }

    #[test]
    fn basic_credentials() {
        use base64::Engine;
        for s in [
            "gateway:pw1",
            "a:",
            "ab:c",
            "user:päss",
            ":",
            "gateway:0123456789abcdef",
        ] {
            let expected = format!("Basic {}", base64::engine::general_purpose::STANDARD.encode(s));
            assert_eq!(basic_auth(s), expected, "{s}");
        }
    }

    #[test]
    fn replies() {
        assert_eq!(json_reply(None, b""), Err(StoreError::NoResponse));
        assert_eq!(json_reply(Some(403), b"{}"), Err(StoreError::Status(403)));
        assert_eq!(
            json_reply(Some(200), b"<html>"),
            Err(StoreError::BadReply("not JSON"))
        );
        assert!(json_reply(Some(200), b"{\"GET\":null}").is_ok());
    }
}
