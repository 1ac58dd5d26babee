//! The headers only the gateway may send upstream, and how each host gets rid of a client's
//! copy: the filter itself (every header name read and checked) or Envoy before the filter (one
//! `header_mutation` pattern), when the filter is told so and then reads only what it needs.

use crate::canary;

/// Every client-supplied header with this prefix is removed before the request goes upstream.
pub const IDENTITY_HEADER_PREFIX: &str = "x-user-";

/// The fixed names [`is_client_forgery`] refuses besides the identity prefix.
const NAMES: [&str; 5] = [
    canary::ROUTE_HEADER,
    canary::CANARY_HEADER,
    "x-real-ip",
    "forwarded",
    "x-forwarded-host",
];

/// Headers a client must not send upstream: the identity headers (`X-User-*`), the gateway's
/// own canary headers, and the address headers an upstream would take for the gateway's word
/// (`X-Real-IP`, `Forwarded`, `X-Forwarded-Host`; Envoy itself writes `X-Forwarded-For`). `_`
/// counts as `-`: WSGI and CGI upstreams read `X_User_Id` as `X-User-Id`. Compared without
/// allocating (this runs for every header of every request).
pub fn is_client_forgery(name: &str) -> bool {
    fn starts(name: &str, prefix: &str) -> bool {
        name.len() >= prefix.len()
            && name
                .bytes()
                .zip(prefix.bytes())
                .all(|(a, b)| (if a == b'_' { b'-' } else { a.to_ascii_lowercase() }) == b)
    }
    starts(name, IDENTITY_HEADER_PREFIX) || NAMES.iter().any(|p| name.len() == p.len() && starts(name, p))
}

/// The headers only the gateway writes (identity and canary): on a host that cannot remove a
/// client's copy before the upstream sees it, a request carrying one is refused instead.
pub fn gateway_owned(name: &str) -> bool {
    fn lower(n: &str) -> impl Iterator<Item = u8> + '_ {
        n.bytes()
            .map(|b| if b == b'_' { b'-' } else { b.to_ascii_lowercase() })
    }
    lower(name)
        .take(IDENTITY_HEADER_PREFIX.len())
        .eq(IDENTITY_HEADER_PREFIX.bytes())
        || [canary::ROUTE_HEADER, canary::CANARY_HEADER]
            .iter()
            .any(|p| lower(name).eq(p.bytes()))
}

/// [`is_client_forgery`] as one RE2 pattern over Envoy's lower-case header names (Envoy's
/// `safe_regex` matches the whole name): what a `header_mutation` filter in front of this one
/// removes when `envoy_strips_forged_headers` is on. `keep_canary`: a route reads `x-canary` as
/// its override header, so only its `_` spellings go (the filter removes the exact name itself
/// after reading it, and writes its own).
pub fn forged_headers_regex(keep_canary: bool) -> String {
    let spell = |name: &str| name.replace('-', "[-_]");
    let mut alternatives = vec![format!("{}.*", spell(IDENTITY_HEADER_PREFIX))];
    for name in NAMES {
        if keep_canary && name == canary::CANARY_HEADER {
            alternatives.push(name.replace('-', "_"));
        } else {
            alternatives.push(spell(name));
        }
    }
    alternatives.join("|")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern's own grammar (alternatives of literals, `[-_]` and a final `.*`), evaluated
    /// here so the pattern is checked against [`is_client_forgery`] without a regex engine.
    fn matches(pattern: &str, name: &str) -> bool {
        fn one(p: &[u8], n: &[u8]) -> bool {
            match p {
                [] => n.is_empty(),
                [b'.', b'*'] => true,
                [b'[', b'-', b'_', b']', rest @ ..] => {
                    matches!(n.first(), Some(b'-' | b'_')) && one(rest, n.get(1..).unwrap_or(&[]))
                }
                [c, rest @ ..] => n.first() == Some(c) && one(rest, n.get(1..).unwrap_or(&[])),
            }
        }
        pattern.split('|').any(|alt| one(alt.as_bytes(), name.as_bytes()))
    }

    #[test]
    fn the_envoy_pattern_removes_exactly_the_forgeries() {
        let corpus = [
            "x-user-id",
            "x_user_id",
            "x-user_role",
            "x_user-name",
            "x-user-anything",
            "x-gateway-canary",
            "x_gateway_canary",
            "x-gateway_canary",
            "x-canary",
            "x_canary",
            "x-real-ip",
            "x_real_ip",
            "forwarded",
            "x-forwarded-host",
            "x_forwarded_host",
            "x-use",
            "x-userid",
            "x-users-id",
            "x-forwarded-for",
            "x-forwarded-hostname",
            "authorization",
            "x-trace-id",
            "x_trace_id",
            "x-canary-x",
            "xx-user-id",
            "forwarded-for",
            "cookie",
        ];
        let full = forged_headers_regex(false);
        let keep = forged_headers_regex(true);
        for name in corpus {
            assert_eq!(
                matches(&full, name),
                is_client_forgery(name),
                "{name} against {full}"
            );
            let expected = is_client_forgery(name) && name != canary::CANARY_HEADER;
            assert_eq!(matches(&keep, name), expected, "{name} against {keep}");
        }
    }
}
