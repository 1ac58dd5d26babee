//! Request headers as the host hands them over, and the rules for header values we send.

/// A header: the name is ASCII (lower-case from Envoy), the value raw bytes (clients may send
/// bytes that are not UTF-8).
pub type HeaderPair = (String, Vec<u8>);

/// The first value of `name` (case-insensitive).
pub fn get<'a>(headers: &'a [HeaderPair], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

/// The first value of `name`, if it is UTF-8.
pub fn get_str<'a>(headers: &'a [HeaderPair], name: &str) -> Option<&'a str> {
    get(headers, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Whether a string may be sent as an HTTP header value: no control characters (CR, LF, NUL,
/// DEL, C1 controls), no leading or trailing whitespace, bounded length.
pub fn is_safe_value(value: &str) -> bool {
    value.len() <= 1024 && !value.chars().any(char::is_control) && value.trim() == value
}

/// Whether a string is a header name we accept in configuration: letters, digits, `-`, `_`.
pub fn is_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_is_case_insensitive_and_bytes_safe() {
        let h = vec![
            ("x-a".to_string(), b"1".to_vec()),
            ("x-b".to_string(), b"\xff".to_vec()),
        ];
        assert_eq!(get_str(&h, "X-A"), Some("1"));
        assert_eq!(get(&h, "x-b"), Some(&b"\xff"[..]));
        assert_eq!(get_str(&h, "x-b"), None);
        assert!(is_safe_value("admin"));
        assert!(!is_safe_value("a\r\nb"));
        assert!(!is_safe_value(" a"));
        assert!(is_name("X-Canary"));
        assert!(!is_name("x canary"));
    }
}
