//! Stat names: a family and its labels in the tag syntax Istio's bootstrap already extracts
//! (`meshConfig.defaultConfig.extraStatTags`, or the pod annotation `proxy.istio.io/config`):
//! `route=.=users;.;outcome=.=allowed;.;gateway_requests_total`. Envoy's Prometheus output then
//! shows `gateway_requests_total{route="users",outcome="allowed"}` under Istio's bootstrap and
//! under the rendered one alike (both extract the tags with [`tag_regex`]).

/// Every label the filter's families carry.
pub const TAGS: [&str; 7] = [
    "route", "outcome", "reason", "scope", "decision", "target", "issuer",
];

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
