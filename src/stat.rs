//! Stat names: a family and its labels in the tag syntax Istio's bootstrap already extracts
//! (`meshConfig.defaultConfig.extraStatTags`, or the pod annotation `proxy.istio.io/config`):
//! `route=.=users;.;outcome=.=allowed;.;gateway_requests_total`. Envoy's Prometheus output then
//! shows `gateway_requests_total{route="users",outcome="allowed"}` under Istio's bootstrap and
//! under the rendered one alike (both extract the tags with [`tag_regex`]).

/// Every label the filter's families carry.
pub const TAGS: [&str; 7] = [
    "route", "outcome", "reason", "scope", "decision", "target", "issuer",
];

/// Every family the filter names at run time, with its labels in the order its names carry
/// them: a host that must declare metrics up front (Envoy's dynamic modules) declares these.
pub const FAMILIES: [(&str, &[&str]); 10] = [
    ("gateway_requests_total", &["route", "outcome"]),
    ("gateway_auth_failures_total", &["reason"]),
    ("gateway_canary_total", &["route", "target"]),
    ("gateway_ratelimit_total", &["scope", "decision"]),
    ("gateway_jwks_fetches_total", &["issuer"]),
    ("gateway_jwks_fetch_errors_total", &["issuer"]),
    ("gateway_jwks_unknown_kid_fetches_total", &["issuer"]),
    ("gateway_jwks_keys_dropped_total", &["issuer"]),
    ("gateway_store_misrouted_replies_total", &[]),
    ("gateway_log_records_skipped_total", &[]),
];

/// A stat name split back into its family and `(tag, value)` pairs ([`name`] reversed).
pub fn parse(name: &str) -> (&str, Vec<(&str, &str)>) {
    let mut tags = Vec::new();
    let mut rest = name;
    while let Some((pair, tail)) = rest.split_once(";.;") {
        let Some((tag, value)) = pair.split_once("=.=") else {
            break;
        };
        tags.push((tag, value));
        rest = tail;
    }
    (rest, tags)
}

/// The stat name of `family` with `tags` (values made safe for the syntax: `.`, `;`, `=` become
/// `_`).
pub fn name(family: &str, tags: &[(&str, &str)]) -> String {
    let mut out = String::with_capacity(family.len() + tags.len() * 24);
    for (tag, value) in tags {
        out.push_str(tag);
        out.push_str("=.=");
        out.extend(
            value
                .chars()
                .map(|c| if matches!(c, '.' | ';' | '=') { '_' } else { c }),
        );
        out.push_str(";.;");
    }
    out.push_str(family);
    out
}

/// The tag-extraction regex of `tag`, as Istio's bootstrap template writes it for each of its
/// `extraStatTags`: the first group is cut from the name, the inner one is the value.
pub fn tag_regex(tag: &str) -> String {
    format!(r"({tag}=\.=(.*?);\.;)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_back_into_family_and_tags() {
        let n = name(
            "gateway_requests_total",
            &[("route", "a.b"), ("outcome", "allowed")],
        );
        assert_eq!(
            parse(&n),
            (
                "gateway_requests_total",
                vec![("route", "a_b"), ("outcome", "allowed")]
            )
        );
        assert_eq!(
            parse("gateway_log_records_stored_total"),
            ("gateway_log_records_stored_total", vec![])
        );
        for (family, labels) in FAMILIES {
            let values: Vec<(&str, &str)> = labels.iter().map(|l| (*l, "x")).collect();
            let full = name(family, &values);
            let (f, tags) = parse(&full);
            assert_eq!((f, tags.len()), (family, labels.len()));
            assert!(labels.iter().all(|l| TAGS.contains(l)), "{family}");
        }
    }

    #[test]
    fn names_in_istios_tag_syntax() {
        assert_eq!(
            name(
                "gateway_requests_total",
                &[("route", "user-service"), ("outcome", "allowed")]
            ),
            "route=.=user-service;.;outcome=.=allowed;.;gateway_requests_total"
        );
        assert_eq!(
            name("x_total", &[("issuer", "a.b;c=d")]),
            "issuer=.=a_b_c_d;.;x_total"
        );
        assert_eq!(tag_regex("route"), r"(route=\.=(.*?);\.;)");
    }
}
