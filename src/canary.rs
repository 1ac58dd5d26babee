//! Canary routing, decided exactly like the reference `CanaryRouter`: the override header is
//! present → canary; the user is listed → canary; `int(md5(user_id).hexdigest(), 16) % 100 <
//! percent` → canary; otherwise stable. Requests without a user use the route's stickiness key
//! (client address, a cookie or a header) in the percentage rule, or go to stable.
//! The orchestrator writes [`ROUTE_HEADER`] (Envoy routes on it) and `X-Canary: true|false`.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::headers::{self, HeaderPair};

/// Internal header Envoy's canary route matches on. Clients cannot set it: it is removed from
/// every request before the decision is written.
pub const ROUTE_HEADER: &str = "x-gateway-canary";
/// Its value for a request going to the canary (the header is absent otherwise).
pub const ROUTE_VALUE: &str = "1";
/// Sent upstream on canary routes, as the reference does.
pub const CANARY_HEADER: &str = "x-canary";

/// What identifies a request that carries no user, for the percentage rule. Written as
/// `none`, `client_ip`, `cookie:<name>` or `header:<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum Sticky {
    /// No user, no canary (the reference).
    #[default]
    None,
    ClientIp,
    Cookie(String),
    Header(String),
}

/// A route's canary rules (filter configuration).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySettings {
    #[serde(default)]
    pub percent: u8,
    #[serde(default)]
    pub users: Vec<String>,
    /// Override header: present (any value) → canary. `None` disables the override.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header: Option<String>,
    #[serde(default, skip_serializing_if = "is_default_sticky")]
    pub sticky: Sticky,
}

impl CanarySettings {
    /// Validates the rules and lower-cases the override header. Field names in errors are
    /// relative to `routes[i].canary`.
    pub fn compile(&self) -> Result<CanarySettings, ConfigError> {
        if self.percent > 100 {
            return Err(ConfigError::new("percent", "must be 0 to 100"));
        }
        let header = match &self.header {
            Some(h) if !headers::is_name(h) => {
                return Err(ConfigError::new("header", format!("{h:?} is not a header name")));
            }
            Some(h) if h.eq_ignore_ascii_case(ROUTE_HEADER) => {
                return Err(ConfigError::new(
                    "header",
                    "must not be the internal routing header",
                ));
            }
            h => h.as_ref().map(|h| h.to_ascii_lowercase()),
        };
        for (i, u) in self.users.iter().enumerate() {
            if u.is_empty() || !headers::is_safe_value(u) {
                return Err(ConfigError::new(
                    format!("users[{i}]"),
                    "must be a non-empty user id",
                ));
            }
        }
        Ok(CanarySettings {
            header,
            ..self.clone()
        })
    }
}

impl TryFrom<String> for Sticky {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        let named = |kind: &str, name: &str| {
            if name.is_empty()
                || !name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
            {
                Err(format!("{kind} name {name:?} is not a valid token"))
            } else {
                Ok(name.to_string())
            }
        };
        match s.as_str() {
            "none" => Ok(Sticky::None),
            "client_ip" => Ok(Sticky::ClientIp),
            other => match other.split_once(':') {
                Some(("cookie", name)) => Ok(Sticky::Cookie(named("cookie", name)?)),
                Some(("header", name)) => Ok(Sticky::Header(named("header", name)?.to_ascii_lowercase())),
                _ => Err(format!(
                    "unknown sticky {other:?} (expected none, client_ip, cookie:<name> or header:<name>)"
                )),
            },
        }
    }
}

impl From<Sticky> for String {
    fn from(s: Sticky) -> String {
        match s {
            Sticky::None => "none".into(),
            Sticky::ClientIp => "client_ip".into(),
            Sticky::Cookie(n) => format!("cookie:{n}"),
            Sticky::Header(n) => format!("header:{n}"),
        }
    }
}

fn is_default_sticky(s: &Sticky) -> bool {
    *s == Sticky::None
}

/// The reference's bucket: `int(md5(key).hexdigest(), 16) % 100`.
pub fn bucket(key: &str) -> u8 {
    let digest = md5::compute(key.as_bytes());
    // u128 of the 16 digest bytes, big-endian, is exactly int(hexdigest, 16).
    (u128::from_be_bytes(digest.0) % 100) as u8
}

/// What the request carries that the rules look at.
pub struct Inputs<'a> {
    /// Whether the override header is present (checked by the caller, case-insensitively).
    pub header_present: bool,
    pub user_id: Option<&'a str>,
    /// The stickiness key when there is no user (already resolved by the caller).
    pub sticky_key: Option<&'a str>,
}

/// `true` = canary.
pub fn choose(s: &CanarySettings, input: &Inputs<'_>) -> bool {
    if s.header.is_some() && input.header_present {
        return true;
    }
    if let Some(user) = input.user_id {
        if s.users.iter().any(|u| u == user) {
            return true;
        }
        return s.percent > 0 && bucket(user) < s.percent;
    }
    match input.sticky_key {
        Some(key) if s.percent > 0 => bucket(key) < s.percent,
        _ => false,
    }
}

/// Decides for one request from its headers (raw bytes, as the host gives them), the verified
/// user and the client address. Returns the request headers to set.
pub fn route_headers(
    s: &CanarySettings,
    request: &[HeaderPair],
    user_id: Option<&str>,
    client_ip: Option<&str>,
) -> (bool, Vec<(&'static str, String)>) {
    let value = |name: &str| headers::get_str(request, name);
    let header_present = s
        .header
        .as_deref()
        .is_some_and(|h| headers::get(request, h).is_some());
    let sticky_key = match (&s.sticky, user_id) {
        (_, Some(_)) | (Sticky::None, None) => None,
        (Sticky::ClientIp, None) => client_ip,
        (Sticky::Cookie(name), None) => value("cookie").and_then(|c| cookie(c, name)),
        (Sticky::Header(name), None) => value(name),
    };
    let canary = choose(
        s,
        &Inputs {
            header_present,
            user_id,
            sticky_key,
        },
    );
    // The internal header is only ever set for the canary (and removed by Envoy's canary route);
    // the stable route never sees it.
    let mut set = vec![(CANARY_HEADER, if canary { "true" } else { "false" }.to_string())];
    if canary {
        set.push((ROUTE_HEADER, ROUTE_VALUE.to_string()));
    }
    (canary, set)
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|pair| {
        let (k, v) = pair.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Computed with Python, independently of this code:
    /// `int(hashlib.md5(u.encode()).hexdigest(), 16) % 100`.
    const REFERENCE: [(&str, u8); 7] = [
        ("user-001", 58),
        ("user-002", 42),
        ("alice", 0),
        ("bob", 32),
        ("u-42", 33),
        ("用户", 7),
        ("", 66),
    ];

    #[test]
    fn md5_bucket_matches_python() {
        for (user, expected) in REFERENCE {
            assert_eq!(bucket(user), expected, "{user:?}");
        }
    }

    fn settings(percent: u8) -> CanarySettings {
        CanarySettings {
            percent,
            users: vec!["user-001".into()],
            header: Some("X-Canary".into()),
            sticky: Sticky::None,
        }
    }

    fn user(u: &str) -> Inputs<'_> {
        Inputs {
            header_present: false,
            user_id: Some(u),
            sticky_key: None,
        }
    }

    #[test]
    fn rules_in_reference_order() {
        let s = settings(33);
        assert!(choose(
            &s,
            &Inputs {
                header_present: true,
                user_id: None,
                sticky_key: None
            }
        ));
        assert!(
            choose(&s, &user("user-001")),
            "listed user, though its bucket is 58"
        );
        assert!(choose(&s, &user("bob")), "32 < 33");
        assert!(!choose(&s, &user("u-42")), "33 is not < 33");
        assert!(!choose(&s, &user("user-002")));
        assert!(!choose(&settings(0), &user("alice")), "percent 0: nobody by hash");
        assert!(choose(&settings(100), &user("user-002")));
        let mut no_header = settings(0);
        no_header.header = None;
        assert!(!choose(
            &no_header,
            &Inputs {
                header_present: true,
                user_id: Some("x"),
                sticky_key: None
            }
        ));
    }

    #[test]
    fn no_user_goes_stable_unless_sticky() {
        let s = settings(50);
        assert!(!choose(
            &s,
            &Inputs {
                header_present: false,
                user_id: None,
                sticky_key: None
            }
        ));
        assert!(choose(
            &s,
            &Inputs {
                header_present: false,
                user_id: None,
                sticky_key: Some("bob")
            }
        ));
        assert!(!choose(
            &s,
            &Inputs {
                header_present: false,
                user_id: None,
                sticky_key: Some("user-001")
            }
        ));
    }

    #[test]
    fn headers_for_a_request() {
        let mut s = settings(40);
        s.sticky = Sticky::Cookie("sid".into());
        let h = |pairs: &[(&str, &str)]| -> Vec<HeaderPair> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        let (c, set) = route_headers(&s, &h(&[("X-CANARY", "")]), None, None);
        assert!(c, "presence of the header, any case, any value");
        assert_eq!(
            set,
            vec![
                (CANARY_HEADER, "true".to_string()),
                (ROUTE_HEADER, "1".to_string())
            ]
        );
        let (c, set) = route_headers(&s, &h(&[]), Some("user-002"), None);
        assert!(!c);
        assert_eq!(set, vec![(CANARY_HEADER, "false".to_string())]);
        assert!(
            route_headers(&s, &h(&[("cookie", "a=1; sid=bob")]), None, None).0,
            "bob's bucket is 32"
        );
        assert!(
            !route_headers(&s, &h(&[("cookie", "sid=user-001")]), None, None).0,
            "58 >= 40"
        );
        s.sticky = Sticky::ClientIp;
        assert!(route_headers(&s, &h(&[]), None, Some("alice")).0);
    }

    #[test]
    fn sticky_parsing() {
        let p = |s: &str| Sticky::try_from(s.to_string());
        assert_eq!(p("none"), Ok(Sticky::None));
        assert_eq!(p("client_ip"), Ok(Sticky::ClientIp));
        assert_eq!(p("cookie:sid"), Ok(Sticky::Cookie("sid".into())));
        assert_eq!(p("header:X-Session"), Ok(Sticky::Header("x-session".into())));
        assert!(p("cookie:").is_err());
        assert!(p("ip").is_err());
        assert!(p("header:a b").is_err());
    }

    #[test]
    fn cookies() {
        assert_eq!(cookie("a=1; sid=xyz; b=2", "sid"), Some("xyz"));
        assert_eq!(cookie("sid=", "sid"), Some(""));
        assert_eq!(cookie("a=1", "sid"), None);
        assert_eq!(cookie("garbage", "sid"), None);
    }
}
