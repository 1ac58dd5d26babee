//! Opaque access tokens read through the issuer's introspection endpoint (RFC 7662): the
//! per-issuer `introspection:` settings, their defaults and validation, the request the gateway
//! sends, the strict reading of the answer, and the shared-data cache entry that remembers it
//! (keyed by a hash of the token, never the token). Sending, coalescing and caching are the
//! orchestrator's.

use super::*;
use crate::error::{check_upstream, seconds_to_ms};
use sha2::Digest as _;

/// Largest introspection answer read.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;
/// Prefix of the cache slots' shared-data keys.
pub const CACHE_KEY_PREFIX: &str = "gw:in:";

/// `introspection:` on an issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IntrospectionSettings {
    /// The provider's introspection endpoint, `http(s)://host[:port]/path`.
    pub endpoint: String,
    /// The Envoy cluster that reaches it (the renderer names one for `endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The gateway's client id at the provider (HTTP basic authentication, RFC 7662 2.1).
    pub client_id: String,
    /// The environment variable holding the client secret.
    pub client_secret_env: String,
    /// Seconds an answer is remembered (never past the token's `exp`); negative answers too.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: f64,
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Shared-data slots the answers are cached in.
    #[serde(default = "default_cache_slots")]
    pub cache_slots: u32,
}

fn default_cache_ttl() -> f64 {
    60.0
}
fn default_timeout() -> f64 {
    2.0
}
fn default_cache_slots() -> u32 {
    1024
}

/// An issuer's compiled introspection settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Introspection {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    /// `Basic base64(urlencode(client_id):urlencode(secret))` (RFC 6749 2.3.1).
    pub authorization: String,
    pub cache_ttl_ms: u64,
    pub timeout_ms: u64,
    pub cache_slots: u32,
}

impl IntrospectionSettings {
    /// Validates the settings; field names in errors are relative to `introspection`.
    pub fn compile(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Introspection, ConfigError> {
        let (authority, path) = remote::split_uri(&self.endpoint).ok_or_else(|| {
            ConfigError::new(
                "endpoint",
                format!("{:?} is not an http(s)://host[:port]/path URL", self.endpoint),
            )
        })?;
        let cluster = self
            .cluster
            .clone()
            .ok_or_else(|| ConfigError::new("cluster", "name the Envoy cluster that reaches endpoint"))?;
        check_upstream("cluster", &cluster)?;
        if self.client_id.is_empty() || !is_safe_header_value(&self.client_id) {
            return Err(ConfigError::new(
                "client_id",
                "must be a non-empty printable string",
            ));
        }
        let secret = env(&self.client_secret_env)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| {
                ConfigError::new(
                    "client_secret_env",
                    format!("environment variable {} is not set", self.client_secret_env),
                )
            })?;
        if !(1..=65_536).contains(&self.cache_slots) {
            return Err(ConfigError::new("cache_slots", "must be 1 to 65536"));
        }
        let credentials = format!("{}:{}", form_encode(&self.client_id), form_encode(&secret));
        Ok(Introspection {
            cluster,
            authority: authority.to_string(),
            path: path.to_string(),
            authorization: crate::webdis::basic_auth(&credentials),
            // At least a second: a host with one call per request (APISIX) answers a token's
            // first request from the cache on its retry.
            cache_ttl_ms: seconds_to_ms("cache_ttl", self.cache_ttl, 1.0, 3600.0)?,
            timeout_ms: seconds_to_ms("timeout", self.timeout, 0.1, 30.0)?,
            cache_slots: self.cache_slots,
        })
    }
}

/// `application/x-www-form-urlencoded` for one value.
pub fn form_encode(value: &str) -> String {
    crate::webdis::encode_arg(value)
}

/// Whether a presented token is no JWT (not three base64url parts): the ones introspection
/// reads.
pub fn is_opaque(token: &str) -> bool {
    token.split('.').count() != 3
}

/// The request body: `token=<token>&token_type_hint=access_token`.
pub fn request_body(token: &str) -> String {
    format!("token={}&token_type_hint=access_token", form_encode(token))
}

/// The key a token's answer is remembered under: base64url(SHA-256(token)), which is also its
/// revocation id (what logout and bans record).
pub fn token_hash(token: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(token.as_bytes()))
}

/// What the provider said about a token.
#[derive(Debug, Clone, PartialEq)]
pub enum Answer {
    /// `active: true`, with the answer's members (its claims).
    Active(Map<String, Value>),
    /// `active: false` (or anything but the JSON `true`).
    Inactive,
}

/// Why an answer could not be read: the provider failed (the gateway cannot tell).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AnswerError(pub String);

impl fmt::Display for AnswerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Reads an answer strictly: 200, one JSON object (no key twice, bounded nesting), `active`
/// exactly `true` for an active token. `"active": "true"`, `1` or a missing `active` is an
/// inactive token, not an error: the provider answered, and did not say yes.
pub fn parse_answer(status: Option<u16>, body: &[u8]) -> Result<Answer, AnswerError> {
    if status != Some(200) {
        return Err(AnswerError(match status {
            Some(s) => format!("introspection answered {s}"),
            None => "introspection failed (no answer, or timed out)".into(),
        }));
    }
    if body.len() > MAX_ANSWER_BYTES {
        return Err(AnswerError("introspection answer too large".into()));
    }
    claims::check_strict(body).map_err(|e| AnswerError(format!("introspection answer refused: {e}")))?;
    let map: Map<String, Value> = serde_json::from_slice(body)
        .map_err(|_| AnswerError("introspection answer is not a JSON object".into()))?;
    Ok(match map.get("active") {
        Some(Value::Bool(true)) => Answer::Active(map),
        _ => Answer::Inactive,
    })
}

/// One cached answer: the token's hash, when it was stored, and the answer (its members, or
/// none for an inactive token).
#[derive(Debug, Clone, PartialEq)]
pub struct CacheEntry {
    pub hash: String,
    pub stored_at_ms: u64,
    /// The members of an active answer, as JSON text; `None`: inactive.
    pub active: Option<String>,
}

impl CacheEntry {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{}\n{}\n", self.hash, self.stored_at_ms).into_bytes();
        if let Some(json) = &self.active {
            out.extend_from_slice(json.as_bytes());
        }
        out
    }

    /// The entry for `hash` when it is still fresh at `now_ms` (within `ttl_ms` of being
    /// stored; an active one's `exp` is checked again with the claims).
    pub fn fresh(stored: &[u8], hash: &str, now_ms: u64, ttl_ms: u64) -> Option<CacheEntry> {
        let text = std::str::from_utf8(stored).ok()?;
        let mut parts = text.splitn(3, '\n');
        let (h, at, rest) = (parts.next()?, parts.next()?, parts.next()?);
        let stored_at_ms: u64 = at.parse().ok()?;
        if h != hash || now_ms >= stored_at_ms.saturating_add(ttl_ms) || stored_at_ms > now_ms {
            return None;
        }
        Some(CacheEntry {
            hash: h.to_string(),
            stored_at_ms,
            active: (!rest.is_empty()).then(|| rest.to_string()),
        })
    }
}

/// The shared-data key of cache slot `index` (taken modulo `slots`).
pub fn cache_key(index: u64, slots: u32) -> String {
    format!("{CACHE_KEY_PREFIX}{}", index % u64::from(slots.max(1)))
}

impl Verifier {
    /// The issuer whose introspection endpoint reads opaque tokens, if any.
    pub fn introspecting(&self) -> Option<(usize, &Issuer, &Introspection)> {
        self.issuers
            .iter()
            .enumerate()
            .find_map(|(i, iss)| iss.introspection.as_ref().map(|x| (i, iss, x)))
    }

    /// The caller's identity from an active answer, checked as a token's claims are: `exp`
    /// (required), `nbf`, `iat`, `iss` and `aud`, the claim mapping, and the binding (`cnf`).
    pub fn identity_from_answer(
        &self,
        index: usize,
        members: &Map<String, Value>,
        token: &str,
        now: i64,
    ) -> Result<Identity, TokenError> {
        let issuer = self.issuers.get(index).ok_or(TokenError::UnknownIssuer)?;
        // RFC 7662 2.1: the provider looks the token up among every type it issues, so a
        // refresh token comes back active too; it is no access token.
        for name in ["token_type", "token_use"] {
            if members
                .get(name)
                .and_then(Value::as_str)
                .is_some_and(|t| t.to_ascii_lowercase().contains("refresh"))
            {
                return Err(TokenError::WrongType);
            }
        }
        let claims: Claims<Map<String, Value>> =
            serde_json::from_value(Value::Object(members.clone())).map_err(|_| TokenError::InvalidClaims)?;
        let iss = string_claim(&claims.custom, "iss")?;
        let mut identity = self.check_claims(issuer, index, &claims, iss.as_deref(), now)?;
        identity.revocation_id = token_hash(token);
        Ok(identity)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_read_strictly() {
        let ok = |b: &str| parse_answer(Some(200), b.as_bytes());
        assert!(matches!(
            ok(r#"{"active":true,"sub":"u"}"#),
            Ok(Answer::Active(_))
        ));
        for lie in [
            r#"{"active":"true"}"#,
            r#"{"active":1}"#,
            r#"{"sub":"u"}"#,
            r#"{"active":false}"#,
            r#"{"active":null}"#,
        ] {
            assert_eq!(ok(lie), Ok(Answer::Inactive), "{lie}");
        }
        for broken in [r#"{"active":true,"active":false}"#, "[true]", "", "{"] {
            assert!(ok(broken).is_err(), "{broken}");
        }
        assert!(parse_answer(Some(500), b"{}").is_err());
        assert!(parse_answer(None, b"").is_err());
    }

    #[test]
    fn cache_entries_round_trip_and_expire() {
        let e = CacheEntry {
            hash: "h".into(),
            stored_at_ms: 1000,
            active: Some(r#"{"active":true}"#.into()),
        };
        let stored = e.encode();
        assert_eq!(CacheEntry::fresh(&stored, "h", 1500, 1000), Some(e.clone()));
        assert_eq!(CacheEntry::fresh(&stored, "other", 1500, 1000), None);
        assert_eq!(CacheEntry::fresh(&stored, "h", 2000, 1000), None);
        let inactive = CacheEntry { active: None, ..e };
        assert_eq!(
            CacheEntry::fresh(&inactive.encode(), "h", 1500, 1000).map(|e| e.active),
            Some(None)
        );
        assert_eq!(CacheEntry::fresh(b"junk", "h", 1500, 1000), None);
    }

    #[test]
    fn opaque_tokens_and_the_request() {
        assert!(is_opaque("2YotnFZFEjr1zCsicMWpAA"));
        assert!(!is_opaque("a.b.c"));
        assert_eq!(
            request_body("a+b/c="),
            "token=a%2Bb%2Fc%3D&token_type_hint=access_token"
        );
    }
}
