//! Tokens as identity providers write them: where a claim lives ([`ClaimPath`]), roles as a set
//! (a string, a list, or one space-separated string), OAuth scopes (`scope`, `scp`), explicit
//! typing (`typ`), bound tokens (`cnf`), and the strict JSON reading that refuses duplicate keys
//! and deep nesting before anything else reads the token.

use std::collections::HashSet;
use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::TokenError;
use crate::error::ConfigError;

/// Most roles (and most scopes) taken from one token.
pub const MAX_ROLES: usize = 64;
/// Longest role or scope taken from a token, bytes.
pub const MAX_ROLE_LEN: usize = 256;
/// Deepest nesting of objects and arrays in a token's header or payload.
pub const MAX_JSON_DEPTH: usize = 32;
/// Default and largest `jwt.max_payload_bytes`.
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 16 * 1024;
/// Most segments in a claim path.
const MAX_SEGMENTS: usize = 8;

/// Where a claim lives: a dotted name that walks into objects (`realm_access.roles`), or a list
/// of literal segments for names that contain dots or anything else
/// (`["https://example.com/claims", "roles"]`, `[resource_access, my-client, roles]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ClaimPath {
    Dotted(String),
    Segments(Vec<String>),
}

impl ClaimPath {
    pub fn named(name: &str) -> Self {
        ClaimPath::Dotted(name.to_string())
    }

    /// The claim's value, if every segment is there.
    pub fn get<'a>(&self, claims: &'a Map<String, Value>) -> Option<&'a Value> {
        match self {
            ClaimPath::Dotted(path) => {
                let mut parts = path.split('.');
                let mut value = claims.get(parts.next()?)?;
                for part in parts {
                    value = value.as_object()?.get(part)?;
                }
                Some(value)
            }
            ClaimPath::Segments(segments) => {
                let (first, rest) = segments.split_first()?;
                let mut value = claims.get(first)?;
                for part in rest {
                    value = value.as_object()?.get(part)?;
                }
                Some(value)
            }
        }
    }

    /// `field` names it in errors.
    pub fn validate(&self, field: &str) -> Result<(), ConfigError> {
        let ok = match self {
            ClaimPath::Dotted(p) => !p.is_empty() && !p.split('.').any(str::is_empty),
            ClaimPath::Segments(s) => {
                !s.is_empty() && s.len() <= MAX_SEGMENTS && !s.iter().any(String::is_empty)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(ConfigError::new(
                field,
                format!("must be a claim name (dots walk into objects) or a list of 1 to {MAX_SEGMENTS} non-empty segments"),
            ))
        }
    }
}

/// Writes `value` at `path`, making the objects on the way (a refreshed token carries the
/// claims where its issuer's map reads them). A segment already holding something else than an
/// object is replaced.
pub fn set(claims: &mut Map<String, Value>, path: &ClaimPath, value: Value) {
    let segments: Vec<&str> = match path {
        ClaimPath::Dotted(p) => p.split('.').collect(),
        ClaimPath::Segments(s) => s.iter().map(String::as_str).collect(),
    };
    let Some((last, parents)) = segments.split_last() else {
        return;
    };
    let mut map = claims;
    for part in parents {
        let entry = map
            .entry(part.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        if !entry.is_object() {
            *entry = Value::Object(Map::new());
        }
        let Value::Object(inner) = entry else {
            return;
        };
        map = inner;
    }
    map.insert(last.to_string(), value);
}

impl fmt::Display for ClaimPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClaimPath::Dotted(p) => f.write_str(p),
            ClaimPath::Segments(s) => write!(f, "{s:?}"),
        }
    }
}

/// How the role claim is written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoleFormat {
    /// A string (one role) or a list of strings (Keycloak, Entra ID, Okta, Auth0).
    #[default]
    List,
    /// One string of space-separated roles (opt-in: a plain string is otherwise one role).
    SpaceSeparated,
}

/// The caller's roles, in token order without repeats. An absent claim gives `default`; a
/// present one is taken as it is (`""` is one empty role, which no route admits).
pub fn roles(value: Option<&Value>, format: RoleFormat, default: &str) -> Result<Vec<String>, TokenError> {
    let items: Vec<&str> = match value {
        None | Some(Value::Null) => return Ok(vec![default.to_string()]),
        Some(Value::String(s)) => match format {
            RoleFormat::List => vec![s.as_str()],
            RoleFormat::SpaceSeparated => s.split(' ').filter(|r| !r.is_empty()).collect(),
        },
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().ok_or(TokenError::InvalidClaims))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(TokenError::InvalidClaims),
    };
    // The roles are forwarded comma-separated: a comma inside one would forge another.
    bounded(items, "role", |r| {
        crate::headers::is_safe_value(r) && !r.contains(',')
    })
}

/// The caller's OAuth scopes: from `path` when the issuer names one, else `scope` (RFC 9068: a
/// space-separated string), else `scp` (Okta: a list; Entra ID: a space-separated string).
pub fn scopes(claims: &Map<String, Value>, path: Option<&ClaimPath>) -> Result<Vec<String>, TokenError> {
    let value = match path {
        Some(p) => p.get(claims),
        None => claims
            .get("scope")
            .filter(|v| !v.is_null())
            .or_else(|| claims.get("scp")),
    };
    let items: Vec<&str> = match value {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => s.split(' ').filter(|r| !r.is_empty()).collect(),
        Some(Value::Array(list)) => list
            .iter()
            .map(|v| v.as_str().ok_or(TokenError::InvalidClaims))
            .collect::<Result<_, _>>()?,
        Some(_) => return Err(TokenError::InvalidClaims),
    };
    bounded(items, "scope", is_scope_token)
}

/// RFC 6749 §3.3: `scope-token = 1*( %x21 / %x23-5B / %x5D-7E )`.
pub fn is_scope_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b == 0x21 || (0x23..=0x5B).contains(&b) || (0x5D..=0x7E).contains(&b))
}

fn bounded(
    items: Vec<&str>,
    name: &'static str,
    valid: impl Fn(&str) -> bool,
) -> Result<Vec<String>, TokenError> {
    if items.len() > MAX_ROLES {
        return Err(TokenError::TooManyValues(name));
    }
    let mut out: Vec<String> = Vec::with_capacity(items.len());
    for item in items {
        if item.len() > MAX_ROLE_LEN {
            return Err(TokenError::TooManyValues(name));
        }
        if !valid(item) {
            return Err(TokenError::UnsafeClaim(name));
        }
        if !out.iter().any(|o| o == item) {
            out.push(item.to_string());
        }
    }
    Ok(out)
}

/// The `typ` values a token may carry; empty list entries are not allowed. `none` stands for a
/// token without `typ`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Types(Vec<String>);

/// RFC 9068 access tokens, generic JWTs, and tokens that do not say.
pub const DEFAULT_TYPES: [&str; 3] = ["none", "JWT", "at+jwt"];

impl Default for Types {
    fn default() -> Self {
        Types(DEFAULT_TYPES.iter().map(|t| normalize_type(t)).collect())
    }
}

/// `typ` compared without letter case and without the optional `application/` (RFC 7515
/// §4.1.9).
fn normalize_type(t: &str) -> String {
    let lower = t.to_ascii_lowercase();
    match lower.strip_prefix("application/") {
        Some(rest) => rest.to_string(),
        None => lower,
    }
}

impl Types {
    /// `field` names the list in errors.
    pub fn compile(list: Option<&[String]>, field: &str) -> Result<Self, ConfigError> {
        let Some(list) = list else {
            return Ok(Types::default());
        };
        if list.is_empty() {
            return Err(ConfigError::new(
                field,
                "must list at least one type (none: no typ header)",
            ));
        }
        let mut out = Vec::with_capacity(list.len());
        for (i, t) in list.iter().enumerate() {
            if t.is_empty() || !t.bytes().all(|b| b.is_ascii_graphic()) {
                return Err(ConfigError::new(
                    format!("{field}[{i}]"),
                    "must be a media type such as at+jwt",
                ));
            }
            out.push(normalize_type(t));
        }
        Ok(Types(out))
    }

    /// The `typ` of tokens the gateway mints for this issuer: `JWT` when accepted, else the
    /// first type listed.
    pub fn minted(&self) -> &str {
        if self.0.iter().any(|t| t == "jwt") {
            return "JWT";
        }
        self.0.iter().find(|t| *t != "none").map_or("JWT", String::as_str)
    }

    /// Whether a token with this header's `typ` is accepted.
    pub fn admit(&self, typ: Option<&Value>) -> Result<(), TokenError> {
        let name = match typ {
            None => "none".to_string(),
            Some(Value::String(t)) => normalize_type(t),
            Some(_) => return Err(TokenError::WrongType),
        };
        if self.0.contains(&name) {
            Ok(())
        } else {
            Err(TokenError::WrongType)
        }
    }
}

/// Keycloak writes its token kind in the payload (`"typ": "Bearer"` for access tokens) and
/// `typ: JWT` in every header: an ID token (`ID`), a refresh token (`Refresh`), an offline or
/// logout token, signed by the same keys, would otherwise pass where an access token is due.
pub fn payload_kind(claims: &Map<String, Value>) -> Result<(), TokenError> {
    match claims.get("typ") {
        Some(Value::String(t))
            if ["id", "refresh", "offline", "logout"].contains(&t.to_ascii_lowercase().as_str()) =>
        {
            Err(TokenError::WrongType)
        }
        _ => Ok(()),
    }
}

/// What a sender-constrained token is bound to (its `cnf` claim).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Binding {
    /// A bearer token.
    #[default]
    None,
    /// DPoP (RFC 9449): the JWK SHA-256 thumbprint of the client's proof key (`cnf.jkt`).
    Dpop(String),
    /// Mutual TLS (RFC 8705): the SHA-256 of the client certificate (`cnf.x5t#S256`), decoded.
    Certificate(Vec<u8>),
}

/// The token's binding (`cnf`): exactly one `jkt` or one `x5t#S256`. Any other confirmation
/// (a `jwk`, a `kid`, both at once, a wrong type) is refused: a binding the gateway cannot check
/// must not turn the token into a bearer token.
pub fn binding(claims: &Map<String, Value>) -> Result<Binding, TokenError> {
    let Some(cnf) = claims.get("cnf") else {
        return Ok(Binding::None);
    };
    let other = TokenError::BoundToken("bound to a key (cnf) in a way this gateway cannot check");
    let Some(members) = cnf.as_object() else {
        return Err(other);
    };
    let mut entries = members.iter();
    match (entries.next(), entries.next()) {
        (Some((name, Value::String(v))), None) if name == "jkt" && !v.is_empty() && v.len() <= 128 => {
            Ok(Binding::Dpop(v.clone()))
        }
        (Some((name, Value::String(v))), None) if name == "x5t#S256" => {
            use base64::Engine as _;
            // Lenient on the last character's unused bits: RFC 8705's own example sets them.
            const LENIENT: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
                &base64::alphabet::URL_SAFE,
                base64::engine::GeneralPurposeConfig::new()
                    .with_encode_padding(false)
                    .with_decode_allow_trailing_bits(true)
                    .with_decode_padding_mode(base64::engine::DecodePaddingMode::RequireNone),
            );
            match LENIENT.decode(v) {
                Ok(d) if d.len() == 32 => Ok(Binding::Certificate(d)),
                _ => Err(TokenError::InvalidClaims),
            }
        }
        _ => Err(other),
    }
}

/// Reads `json` strictly: one value, no key twice in any object (after unescaping: `"r\u006fle"`
/// is `"role"`), nesting at most [`MAX_JSON_DEPTH`]. Another parser (an upstream that re-reads
/// the token, a library that keeps the first key instead of the last) must not be able to see
/// other claims than the gateway did.
pub fn check_strict(json: &[u8]) -> Result<(), TokenError> {
    let mut de = serde_json::Deserializer::from_slice(json);
    Strict { depth: 0 }
        .deserialize(&mut de)
        .map_err(|e| match e.to_string() {
            m if m.starts_with(DUPLICATE) => TokenError::DuplicateKey,
            m if m.starts_with(TOO_DEEP) => TokenError::TooDeep,
            _ => TokenError::Malformed,
        })?;
    de.end().map_err(|_| TokenError::Malformed)
}

const DUPLICATE: &str = "duplicate key";
const TOO_DEEP: &str = "nested too deep";

#[derive(Clone, Copy)]
struct Strict {
    depth: usize,
}

impl<'de> DeserializeSeed<'de> for Strict {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Strict {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<(), E> {
        Ok(())
    }
    fn visit_i64<E>(self, _: i64) -> Result<(), E> {
        Ok(())
    }
    fn visit_u64<E>(self, _: u64) -> Result<(), E> {
        Ok(())
    }
    fn visit_f64<E>(self, _: f64) -> Result<(), E> {
        Ok(())
    }
    fn visit_str<E>(self, _: &str) -> Result<(), E> {
        Ok(())
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        Ok(())
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let inner = self.nested::<A::Error>()?;
        while seq.next_element_seed(inner)?.is_some() {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let inner = self.nested::<A::Error>()?;
        let mut seen: HashSet<String> = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            if !seen.insert(key) {
                return Err(serde::de::Error::custom(DUPLICATE));
            }
            map.next_value_seed(inner)?;
        }
        Ok(())
    }
}

impl Strict {
    fn nested<E: serde::de::Error>(self) -> Result<Strict, E> {
        if self.depth >= MAX_JSON_DEPTH {
            return Err(E::custom(TOO_DEEP));
        }
        Ok(Strict {
            depth: self.depth + 1,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    #[test]
    fn paths_walk_dotted_names_or_literal_segments() {
        let c = claims(serde_json::json!({
            "realm_access": {"roles": ["a"]},
            "https://example.com/roles": ["ns"],
            "resource_access": {"my-client": {"roles": ["c"]}},
            "a.b": 1
        }));
        let dotted = ClaimPath::named("realm_access.roles");
        assert_eq!(dotted.get(&c), Some(&serde_json::json!(["a"])));
        // Split on the dots, a namespaced claim is never found; as one segment it is.
        assert_eq!(ClaimPath::named("https://example.com/roles").get(&c), None);
        let ns = ClaimPath::Segments(vec!["https://example.com/roles".into()]);
        assert_eq!(ns.get(&c), Some(&serde_json::json!(["ns"])));
        let client = ClaimPath::Segments(vec!["resource_access".into(), "my-client".into(), "roles".into()]);
        assert_eq!(client.get(&c), Some(&serde_json::json!(["c"])));
        assert_eq!(
            ClaimPath::Segments(vec!["a.b".into()]).get(&c),
            Some(&serde_json::json!(1))
        );
        for bad in [
            ClaimPath::named(""),
            ClaimPath::named("a..b"),
            ClaimPath::Segments(vec![]),
            ClaimPath::Segments(vec!["".into()]),
            ClaimPath::Segments(vec!["x".into(); 9]),
        ] {
            assert!(bad.validate("claims.role").is_err(), "{bad:?}");
        }
        let parsed: ClaimPath = serde_json::from_str(r#"["https://example.com/claims", "roles"]"#).unwrap();
        assert_eq!(
            parsed,
            ClaimPath::Segments(vec!["https://example.com/claims".into(), "roles".into()])
        );
    }

    #[test]
    fn roles_are_a_set_in_token_order() {
        let r = |v: Value, f| roles(Some(&v), f, "user");
        assert_eq!(
            r(
                serde_json::json!(["offline_access", "default-roles-demo", "admin", "admin"]),
                RoleFormat::List
            )
            .unwrap(),
            ["offline_access", "default-roles-demo", "admin"]
        );
        assert_eq!(
            r(serde_json::json!("admin"), RoleFormat::List).unwrap(),
            ["admin"]
        );
        assert_eq!(r(serde_json::json!("a b"), RoleFormat::List).unwrap(), ["a b"]);
        assert_eq!(
            r(serde_json::json!("a  b"), RoleFormat::SpaceSeparated).unwrap(),
            ["a", "b"]
        );
        assert_eq!(r(serde_json::json!(""), RoleFormat::List).unwrap(), [""]);
        assert_eq!(roles(None, RoleFormat::List, "user").unwrap(), ["user"]);
        assert_eq!(
            r(serde_json::json!([]), RoleFormat::List).unwrap(),
            Vec::<String>::new()
        );
        assert_eq!(
            r(serde_json::json!([1]), RoleFormat::List),
            Err(TokenError::InvalidClaims)
        );
        assert_eq!(
            r(serde_json::json!({"a": 1}), RoleFormat::List),
            Err(TokenError::InvalidClaims)
        );
        assert_eq!(
            r(serde_json::json!(["a,admin"]), RoleFormat::List),
            Err(TokenError::UnsafeClaim("role"))
        );
        assert_eq!(
            r(serde_json::json!(["a\nb"]), RoleFormat::List),
            Err(TokenError::UnsafeClaim("role"))
        );
        let many: Vec<String> = (0..65).map(|i| format!("r{i}")).collect();
        assert_eq!(
            r(serde_json::json!(many), RoleFormat::List),
            Err(TokenError::TooManyValues("role"))
        );
        assert_eq!(
            r(serde_json::json!(["x".repeat(257)]), RoleFormat::List),
            Err(TokenError::TooManyValues("role"))
        );
        assert!(r(serde_json::json!(["x".repeat(256)]), RoleFormat::List).is_ok());
    }

    #[test]
    fn scopes_come_from_scope_then_scp() {
        let s = |v: Value| scopes(&claims(v), None);
        assert_eq!(
            s(serde_json::json!({"scope": "openid orders:read"})).unwrap(),
            ["openid", "orders:read"]
        );
        assert_eq!(
            s(serde_json::json!({"scp": ["orders:read", "orders:write"]})).unwrap(),
            ["orders:read", "orders:write"]
        );
        assert_eq!(
            s(serde_json::json!({"scp": "User.Read Mail.Send"})).unwrap(),
            ["User.Read", "Mail.Send"]
        );
        assert_eq!(s(serde_json::json!({"scope": "a", "scp": ["b"]})).unwrap(), ["a"]);
        assert_eq!(s(serde_json::json!({})).unwrap(), Vec::<String>::new());
        assert_eq!(s(serde_json::json!({"scope": 3})), Err(TokenError::InvalidClaims));
        assert_eq!(
            s(serde_json::json!({"scp": ["a\"b"]})),
            Err(TokenError::UnsafeClaim("scope"))
        );
        let custom = ClaimPath::named("permissions");
        assert_eq!(
            scopes(
                &claims(serde_json::json!({"permissions": ["read:x"], "scope": "y"})),
                Some(&custom)
            )
            .unwrap(),
            ["read:x"]
        );
    }

    #[test]
    fn types_accept_jwt_at_jwt_or_none_by_default() {
        let t = Types::default();
        for ok in [
            None,
            Some("JWT"),
            Some("jwt"),
            Some("at+jwt"),
            Some("application/at+JWT"),
        ] {
            assert_eq!(
                t.admit(ok.map(|s| Value::String(s.into())).as_ref()),
                Ok(()),
                "{ok:?}"
            );
        }
        for bad in ["dpop+jwt", "logout+jwt", "secevent+jwt", "JOSE", ""] {
            assert_eq!(
                t.admit(Some(&Value::String(bad.into()))),
                Err(TokenError::WrongType),
                "{bad}"
            );
        }
        assert_eq!(t.admit(Some(&Value::Null)), Err(TokenError::WrongType));
        let strict = Types::compile(Some(&["at+jwt".to_string()]), "types").unwrap();
        assert_eq!(strict.admit(None), Err(TokenError::WrongType));
        assert!(Types::compile(Some(&[]), "types").is_err());
        assert!(Types::compile(Some(&["a b".to_string()]), "types").is_err());
    }

    #[test]
    fn duplicate_keys_and_deep_nesting_are_refused() {
        assert_eq!(check_strict(br#"{"role":"user","sub":"a"}"#), Ok(()));
        assert_eq!(
            check_strict(br#"{"role":"user","role":"admin"}"#),
            Err(TokenError::DuplicateKey)
        );
        assert_eq!(
            check_strict(br#"{"role":"user","r\u006fle":"admin"}"#),
            Err(TokenError::DuplicateKey)
        );
        assert_eq!(
            check_strict(br#"{"a":{"x":1,"x":2}}"#),
            Err(TokenError::DuplicateKey)
        );
        assert_eq!(
            check_strict(br#"{"a":[{"x":1},{"x":1,"x":1}]}"#),
            Err(TokenError::DuplicateKey)
        );
        assert_eq!(check_strict(br#"{"a":1} {"b":2}"#), Err(TokenError::Malformed));
        assert_eq!(check_strict(b"{\"a\":1"), Err(TokenError::Malformed));
        let deep = |n: usize| format!("{}1{}", "[".repeat(n), "]".repeat(n));
        assert_eq!(check_strict(format!("{{\"a\":{}}}", deep(31)).as_bytes()), Ok(()));
        assert_eq!(
            check_strict(format!("{{\"a\":{}}}", deep(32)).as_bytes()),
            Err(TokenError::TooDeep)
        );
        assert_eq!(check_strict(deep(10_000).as_bytes()), Err(TokenError::TooDeep));
    }

    #[test]
    fn keycloak_id_and_refresh_tokens_are_not_access_tokens() {
        for kind in ["ID", "Refresh", "Offline", "Logout", "id"] {
            assert_eq!(
                payload_kind(&claims(serde_json::json!({"typ": kind}))),
                Err(TokenError::WrongType)
            );
        }
        for ok in [
            serde_json::json!({"typ": "Bearer"}),
            serde_json::json!({}),
            serde_json::json!({"typ": 3}),
        ] {
            assert_eq!(payload_kind(&claims(ok)), Ok(()));
        }
    }

    #[test]
    fn bindings_are_one_jkt_or_one_certificate_hash() {
        let b = |v: Value| binding(&claims(v));
        assert_eq!(b(serde_json::json!({})), Ok(Binding::None));
        assert_eq!(
            b(serde_json::json!({"cnf": {"jkt": "abc"}})),
            Ok(Binding::Dpop("abc".into()))
        );
        let hash = "bwcK0esc3ACC3DB2Y5_lESsXE8o9ltc05O89jdN-dg2";
        assert!(
            matches!(b(serde_json::json!({"cnf": {"x5t#S256": hash}})), Ok(Binding::Certificate(d)) if d.len() == 32)
        );
        assert_eq!(
            b(serde_json::json!({"cnf": {"x5t#S256": "x"}})),
            Err(TokenError::InvalidClaims)
        );
        for other in [
            serde_json::json!({"cnf": null}),
            serde_json::json!({"cnf": {}}),
            serde_json::json!({"cnf": {"jkt": ""}}),
            serde_json::json!({"cnf": {"jkt": 1}}),
            serde_json::json!({"cnf": {"jwk": {"kty": "EC"}}}),
            serde_json::json!({"cnf": {"jkt": "a", "x5t#S256": hash}}),
        ] {
            assert!(
                matches!(b(other.clone()), Err(TokenError::BoundToken(_))),
                "{other}"
            );
        }
    }
}
