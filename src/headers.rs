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
/// DEL, C1 controls), no invisible format characters (bidi overrides and isolates, zero-width
/// characters, line and paragraph separators: they make an identity display as another), no
/// leading or trailing whitespace, bounded length.
pub fn is_safe_value(value: &str) -> bool {
    value.len() <= 1024
        && !value.chars().any(|c| c.is_control() || is_format_char(c))
        && value.trim() == value
}

/// `%XX` escapes decoded (any other byte kept, `+` included); `None` for a malformed escape or
/// a result that is not UTF-8. Used where a client names a user or a trace in a URL.
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_string());
    }
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Unicode's format characters (general category Cf) and the line/paragraph separators.
fn is_format_char(c: char) -> bool {
    matches!(
        u32::from(c),
        0x00AD
            | 0x0600..=0x0605
            | 0x061C
            | 0x06DD
            | 0x070F
            | 0x0890..=0x0891
            | 0x08E2
            | 0x180E
            | 0x200B..=0x200F
            | 0x2028..=0x202E
            | 0x2060..=0x2064
            | 0x2066..=0x206F
            | 0xFEFF
            | 0xFFF9..=0xFFFB
            | 0x110BD
            | 0x110CD
            | 0x13430..=0x1343F
            | 0x1BCA0..=0x1BCA3
            | 0x1D173..=0x1D17A
            | 0xE0001
            | 0xE0020..=0xE007F
    )
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
        // Bidi overrides, isolates, zero-width and separators: refused (finding 10).
        for c in [
            '\u{202E}',
            '\u{2066}',
            '\u{200B}',
            '\u{FEFF}',
            '\u{2028}',
            '\u{E0041}',
        ] {
            assert!(!is_safe_value(&format!("adm{c}in")), "{:X}", u32::from(c));
        }
        assert!(is_safe_value("Zoë Łukasz 山田"), "letters of any script are fine");
        assert!(is_name("X-Canary"));
        assert!(!is_name("x canary"));
    }
}
