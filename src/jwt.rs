//! JWT verification: parse, check the algorithm against the configured allow-list, verify the
//! HMAC signature, then check `exp` (required), `nbf`, `iat`, `iss` and `aud` against an
//! injected clock. This duty owns its settings (`jwt:` in the gateway file), their defaults and
//! validation, and the compiled [`Verifier`]; keys are built once at configure time. Verified
//! tokens are remembered in a per-VM [`TokenCache`], runtime state kept apart from the settings.

use std::collections::HashMap;
use std::fmt;

use jwt_compact::alg::{Hs256, Hs256Key, Hs384, Hs384Key, Hs512, Hs512Key};
use jwt_compact::{AlgorithmExt, Claims, Token, UntrustedToken, ValidationError};
use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::headers::is_safe_value as is_safe_header_value;

/// Default clock skew accepted on `exp`, `nbf` and `iat`, in seconds.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

/// Largest accepted clock skew (one day): anything larger is a configuration mistake.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 86_400;

/// `jwt:`: how tokens are verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// The HMAC secret inline (prefer `secret_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Name of the environment variable holding the secret, read by the filter at start-up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Seconds of tolerance on `exp`, `nbf` and `iat`.
    #[serde(default = "default_clock_skew")]
    pub clock_skew: u64,
}

fn default_algorithms() -> Vec<String> {
    vec!["HS256".to_string()]
}

fn default_clock_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}

impl JwtSettings {
    /// Validates the settings and builds the verifier. The secret is `secret` inline, or the
    /// environment variable `secret_env` names, looked up through `env` (in Envoy, the process
    /// environment the filter sees through `vm_config.environment_variables.host_env_keys`), so
    /// it never has to be written into Envoy's configuration. Field names in errors are
    /// relative to `jwt`.
    pub fn compile(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<Verifier, ConfigError> {
        let from_env;
        let secret = match (&self.secret, &self.secret_env) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new("", "set either secret or secret_env, not both"));
            }
            (None, None) => return Err(ConfigError::new("secret_env", "set secret_env (or secret)")),
            (Some(s), None) if s.is_empty() => return Err(ConfigError::new("secret", "must not be empty")),
            (Some(s), None) => s,
            (None, Some(var)) => {
                from_env = env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                    ConfigError::new("secret_env", format!("environment variable {var} is not set"))
                })?;
                &from_env
            }
        };
        if self.algorithms.is_empty() {
            return Err(ConfigError::new("algorithms", "must list at least one algorithm"));
        }
        let mut algorithms = Vec::with_capacity(self.algorithms.len());
        for (i, name) in self.algorithms.iter().enumerate() {
            let alg = Algorithm::from_name(name).ok_or_else(|| {
                ConfigError::new(
                    format!("algorithms[{i}]"),
                    format!("unsupported algorithm {name:?} (expected HS256, HS384 or HS512)"),
                )
            })?;
            if !algorithms.contains(&alg) {
                algorithms.push(alg);
            }
        }
        if self.clock_skew > MAX_CLOCK_SKEW_SECONDS {
            return Err(ConfigError::new(
                "clock_skew",
                format!("must be at most {MAX_CLOCK_SKEW_SECONDS}"),
            ));
        }
        if self.issuer.as_deref() == Some("") {
            return Err(ConfigError::new("issuer", "must not be empty when set"));
        }
        if self.audience.as_deref() == Some("") {
            return Err(ConfigError::new("audience", "must not be empty when set"));
        }
        Ok(Verifier::new(
            &algorithms,
            secret.as_bytes(),
            self.issuer.clone(),
            self.audience.clone(),
            self.clock_skew,
        ))
    }
}

/// Longest token accepted; anything larger is refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Role assumed when a token carries none (as the reference gateway does).
pub const DEFAULT_ROLE: &str = "user";

/// The HMAC algorithms the filter supports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    Hs256,
    Hs384,
    Hs512,
}

impl Algorithm {
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "HS256" => Some(Self::Hs256),
            "HS384" => Some(Self::Hs384),
            "HS512" => Some(Self::Hs512),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Hs384 => "HS384",
            Self::Hs512 => "HS512",
        }
    }
}

enum Key {
    Hs256(Hs256Key),
    Hs384(Hs384Key),
    Hs512(Hs512Key),
}

impl Key {
    fn new(alg: Algorithm, secret: &[u8]) -> Self {
        match alg {
            Algorithm::Hs256 => Key::Hs256(Hs256Key::new(secret)),
            Algorithm::Hs384 => Key::Hs384(Hs384Key::new(secret)),
            Algorithm::Hs512 => Key::Hs512(Hs512Key::new(secret)),
        }
    }

    fn algorithm(&self) -> Algorithm {
        match self {
            Key::Hs256(_) => Algorithm::Hs256,
            Key::Hs384(_) => Algorithm::Hs384,
            Key::Hs512(_) => Algorithm::Hs512,
        }
    }

    fn validate(
        &self,
        token: &UntrustedToken<'_, ExtraHeader>,
    ) -> Result<Token<TokenClaims, ExtraHeader>, ValidationError> {
        match self {
            Key::Hs256(k) => Hs256.validator::<TokenClaims>(k).validate(token),
            Key::Hs384(k) => Hs384.validator::<TokenClaims>(k).validate(token),
            Key::Hs512(k) => Hs512.validator::<TokenClaims>(k).validate(token),
        }
    }
}

/// Why a token was refused. The `Display` text follows `Invalid token: ` in the 401 body, so it
/// never echoes token content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    TooLarge,
    Malformed,
    AlgorithmNotAllowed,
    BadSignature,
    MissingExpiration,
    Expired,
    NotYetValid,
    IssuedInFuture,
    InvalidClaims,
    WrongIssuer,
    WrongAudience,
    UnsafeClaim(&'static str),
    CriticalHeader,
}

/// Header fields read besides `alg`/`kid`/`typ`.
#[derive(Debug, Clone, Deserialize)]
struct ExtraHeader {
    #[serde(default)]
    crit: Option<serde::de::IgnoredAny>,
}

impl TokenError {
    /// A short machine-readable reason, for logs and metric names.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::AlgorithmNotAllowed => "algorithm",
            Self::BadSignature => "signature",
            Self::MissingExpiration => "missing_exp",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::InvalidClaims => "claims",
            Self::WrongIssuer => "issuer",
            Self::WrongAudience => "audience",
            Self::UnsafeClaim(_) => "unsafe_claim",
            Self::CriticalHeader => "crit",
        }
    }

    /// Every code, for defining metrics up front.
    pub const CODES: [&'static str; 13] = [
        "too_large",
        "malformed",
        "algorithm",
        "signature",
        "missing_exp",
        "expired",
        "not_yet_valid",
        "issued_in_future",
        "claims",
        "issuer",
        "audience",
        "unsafe_claim",
        "crit",
    ];
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => write!(f, "token is larger than {MAX_TOKEN_LEN} bytes"),
            Self::Malformed => f.write_str("malformed token"),
            Self::AlgorithmNotAllowed => f.write_str("signing algorithm not allowed"),
            Self::BadSignature => f.write_str("signature verification failed"),
            Self::MissingExpiration => f.write_str("missing exp claim"),
            Self::Expired => f.write_str("token has expired"),
            Self::NotYetValid => f.write_str("token is not yet valid (nbf)"),
            Self::IssuedInFuture => f.write_str("token issued in the future (iat)"),
            Self::InvalidClaims => f.write_str("invalid claims"),
            Self::WrongIssuer => f.write_str("invalid issuer"),
            Self::WrongAudience => f.write_str("invalid audience"),
            Self::UnsafeClaim(name) => write!(f, "claim {name} is not a valid header value"),
            Self::CriticalHeader => f.write_str("unsupported critical header (crit)"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims the gateway reads besides `exp`/`nbf`/`iat`. Wrong types fail deserialization.
#[derive(Debug, Deserialize)]
struct TokenClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    iss: Option<String>,
    #[serde(default)]
    aud: Option<Audience>,
    #[serde(default)]
    jti: Option<String>,
}

/// The verified identity of a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    pub role: String,
    pub jti: Option<String>,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// `iat`, unix seconds, when present.
    pub issued_at: Option<i64>,
}

/// Verifies HMAC-signed JWTs with keys prepared at configure time.
pub struct Verifier {
    keys: Vec<Key>,
    issuer: Option<String>,
    audience: Option<String>,
    clock_skew: i64,
}

/// Tokens whose signature and claims were verified, with what the time checks need; a hit skips
/// the HMAC and the JSON parsing (the time checks run again on every use). One per VM, bounded.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: HashMap<String, Verified>,
}

impl TokenCache {
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies `token` at `now` through the cache.
    pub fn verify(&mut self, verifier: &Verifier, token: &str, now: i64) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        if let Some(v) = self.entries.get(token) {
            let checked =
                verifier.check_times(v.identity.expires_at, v.not_before, v.identity.issued_at, now);
            return match checked {
                Ok(()) => Ok(v.identity.clone()),
                Err(e) => {
                    self.entries.remove(token);
                    Err(e)
                }
            };
        }
        let (identity, not_before) = verifier.verify_uncached(token, now)?;
        if token.len() <= TOKEN_CACHE_MAX_LEN {
            if self.entries.len() >= TOKEN_CACHE_ENTRIES {
                // Bounded: drop an arbitrary entry (HashMap order), never grow.
                if let Some(k) = self.entries.keys().next().cloned() {
                    self.entries.remove(&k);
                }
            }
            self.entries.insert(
                token.to_string(),
                Verified {
                    identity: identity.clone(),
                    not_before,
                },
            );
        }
        Ok(identity)
    }
}

#[derive(Debug, Clone)]
struct Verified {
    identity: Identity,
    not_before: Option<i64>,
}

/// Verified tokens remembered per VM, and the longest token worth remembering.
pub const TOKEN_CACHE_ENTRIES: usize = 1024;
const TOKEN_CACHE_MAX_LEN: usize = 2048;

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algs: Vec<&str> = self.keys.iter().map(|k| k.algorithm().name()).collect();
        f.debug_struct("Verifier")
            .field("algorithms", &algs)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("clock_skew", &self.clock_skew)
            .finish_non_exhaustive()
    }
}

impl Verifier {
    pub fn new(
        algorithms: &[Algorithm],
        secret: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
        clock_skew_seconds: u64,
    ) -> Self {
        Self {
            keys: algorithms.iter().map(|&a| Key::new(a, secret)).collect(),
            issuer,
            audience,
            clock_skew: i64::try_from(clock_skew_seconds).unwrap_or(i64::MAX),
        }
    }

    pub fn clock_skew(&self) -> i64 {
        self.clock_skew
    }

    /// Issues a token for the same identity (`sub`, `name`, `role`, plus the configured `iss` and
    /// `aud`) with new `iat`, `exp` and `jti`, signed with the first configured algorithm.
    pub fn issue(&self, id: &Identity, now: i64, ttl_seconds: i64, jti: &str) -> Result<String, String> {
        let mut custom = serde_json::Map::new();
        if let Some(sub) = &id.user_id {
            custom.insert("sub".into(), sub.clone().into());
        }
        if let Some(name) = &id.user_name {
            custom.insert("name".into(), name.clone().into());
        }
        custom.insert("role".into(), id.role.clone().into());
        custom.insert("jti".into(), jti.into());
        if let Some(iss) = &self.issuer {
            custom.insert("iss".into(), iss.clone().into());
        }
        if let Some(aud) = &self.audience {
            custom.insert("aud".into(), aud.clone().into());
        }
        let mut claims = Claims::new(custom);
        claims.issued_at = chrono::DateTime::from_timestamp(now, 0);
        claims.expiration = chrono::DateTime::from_timestamp(now.saturating_add(ttl_seconds), 0);
        let header = jwt_compact::Header::empty().with_token_type("JWT");
        let key = self.keys.first().ok_or("no signing key")?;
        let signed = match key {
            Key::Hs256(k) => Hs256.token(&header, &claims, k),
            Key::Hs384(k) => Hs384.token(&header, &claims, k),
            Key::Hs512(k) => Hs512.token(&header, &claims, k),
        };
        signed.map_err(|e| e.to_string())
    }

    /// Verifies `token` at unix time `now` (seconds), without a cache.
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        self.verify_uncached(token, now).map(|(id, _)| id)
    }

    fn check_times(&self, exp: i64, nbf: Option<i64>, iat: Option<i64>, now: i64) -> Result<(), TokenError> {
        let skew = self.clock_skew;
        if now > exp.saturating_add(skew) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = nbf {
            if now < nbf.saturating_sub(skew) {
                return Err(TokenError::NotYetValid);
            }
        }
        if let Some(iat) = iat {
            if now < iat.saturating_sub(skew) {
                return Err(TokenError::IssuedInFuture);
            }
        }
        Ok(())
    }

    fn verify_uncached(&self, token: &str, now: i64) -> Result<(Identity, Option<i64>), TokenError> {
        let untrusted = UntrustedToken::<ExtraHeader>::try_from(token).map_err(|_| TokenError::Malformed)?;
        // RFC 7515 4.1.11: a recipient that does not understand a `crit` extension must refuse.
        if untrusted.header().other_fields.crit.is_some() {
            return Err(TokenError::CriticalHeader);
        }
        let alg = untrusted.algorithm();
        let key = self
            .keys
            .iter()
            .find(|k| k.algorithm().name() == alg)
            .ok_or(TokenError::AlgorithmNotAllowed)?;
        let verified = key.validate(&untrusted).map_err(|e| match e {
            ValidationError::MalformedClaims(_) => TokenError::InvalidClaims,
            ValidationError::AlgorithmMismatch { .. } => TokenError::AlgorithmNotAllowed,
            _ => TokenError::BadSignature,
        })?;
        let claims = verified.claims();
        let nbf = claims.not_before.map(|t| t.timestamp());
        self.check_claims(claims, now).map(|id| (id, nbf))
    }

    fn check_claims(&self, claims: &Claims<TokenClaims>, now: i64) -> Result<Identity, TokenError> {
        let exp = claims
            .expiration
            .map(|t| t.timestamp())
            .ok_or(TokenError::MissingExpiration)?;
        let iat = claims.issued_at.map(|t| t.timestamp());
        self.check_times(exp, claims.not_before.map(|t| t.timestamp()), iat, now)?;
        let c = &claims.custom;
        if let Some(expected) = &self.issuer {
            if c.iss.as_ref() != Some(expected) {
                return Err(TokenError::WrongIssuer);
            }
        }
        if let Some(expected) = &self.audience {
            let ok = match &c.aud {
                Some(Audience::One(a)) => a == expected,
                Some(Audience::Many(list)) => list.iter().any(|a| a == expected),
                None => false,
            };
            if !ok {
                return Err(TokenError::WrongAudience);
            }
        }
        let safe = |name: &'static str, v: &Option<String>| match v {
            Some(s) if !is_safe_header_value(s) => Err(TokenError::UnsafeClaim(name)),
            _ => Ok(()),
        };
        safe("sub", &c.sub)?;
        safe("name", &c.name)?;
        safe("role", &c.role)?;
        safe("jti", &c.jti)?;
        Ok(Identity {
            user_id: c.sub.clone(),
            user_name: c.name.clone(),
            role: c.role.clone().unwrap_or_else(|| DEFAULT_ROLE.to_string()),
            jti: c.jti.clone(),
            expires_at: exp,
            issued_at: iat,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    use hmac::{Hmac, Mac};
    use sha2::Sha256;

    pub const SECRET: &[u8] = b"unit-test-secret-unit-test-secret";
    const NOW: i64 = 1_800_000_000;

    /// Builds a token by hand, independently of jwt-compact, so hostile shapes are possible.
    pub fn forge(header: &str, payload: &str, secret: &[u8]) -> String {
        let signing_input = format!("{}.{}", B64.encode(header), B64.encode(payload));
        let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
        mac.update(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(mac.finalize().into_bytes()))
    }

    fn hs256(payload: serde_json::Value) -> String {
        forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
    }

    fn verifier() -> Verifier {
        Verifier::new(&[Algorithm::Hs256], SECRET, None, None, 60)
    }

    #[test]
    fn valid_token_yields_identity() {
        let t = hs256(
            serde_json::json!({"sub": "user-001", "name": "admin", "role": "admin", "exp": NOW + 1800, "iat": NOW, "jti": "j1"}),
        );
        let id = verifier().verify(&t, NOW).unwrap();
        assert_eq!(id.user_id.as_deref(), Some("user-001"));
        assert_eq!(id.user_name.as_deref(), Some("admin"));
        assert_eq!(id.role, "admin");
        assert_eq!(id.jti.as_deref(), Some("j1"));
        assert_eq!(id.expires_at, NOW + 1800);
        assert_eq!(id.issued_at, Some(NOW));
    }

    #[test]
    fn role_defaults_to_user() {
        let t = hs256(serde_json::json!({"sub": "u", "exp": NOW + 10}));
        assert_eq!(verifier().verify(&t, NOW).unwrap().role, "user");
    }

    #[test]
    fn hostile_tokens_are_refused_with_a_reason() {
        let v = verifier();
        let exp = NOW + 100;
        let good = hs256(serde_json::json!({"sub": "u", "exp": exp}));
        let truncated = &good[..good.len() - 3];
        let cases: Vec<(&str, String, TokenError)> = vec![
            ("garbage", "garbage".into(), TokenError::Malformed),
            ("empty", "".into(), TokenError::Malformed),
            ("bad base64", "a$b.c$d.e$f".into(), TokenError::Malformed),
            (
                "payload not an object",
                forge(r#"{"alg":"HS256"}"#, "[1,2]", SECRET),
                TokenError::InvalidClaims,
            ),
            (
                "payload not json",
                forge(r#"{"alg":"HS256"}"#, "not json", SECRET),
                TokenError::InvalidClaims,
            ),
            (
                "header not json",
                forge("nope", r#"{"exp":1}"#, SECRET),
                TokenError::Malformed,
            ),
            (
                "unknown critical extension",
                forge(
                    r#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#,
                    &format!(r#"{{"exp":{exp}}}"#),
                    SECRET,
                ),
                TokenError::CriticalHeader,
            ),
            (
                "alg none",
                format!(
                    "{}.{}.",
                    B64.encode(r#"{"alg":"none"}"#),
                    B64.encode(format!(r#"{{"exp":{exp}}}"#))
                ),
                TokenError::AlgorithmNotAllowed,
            ),
            (
                "RS256 header, HMAC signature",
                forge(r#"{"alg":"RS256"}"#, &format!(r#"{{"exp":{exp}}}"#), SECRET),
                TokenError::AlgorithmNotAllowed,
            ),
            (
                "HS512 not configured",
                forge(r#"{"alg":"HS512"}"#, &format!(r#"{{"exp":{exp}}}"#), SECRET),
                TokenError::AlgorithmNotAllowed,
            ),
            (
                "wrong secret",
                forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"exp":{exp}}}"#), b"other"),
                TokenError::BadSignature,
            ),
            (
                "truncated signature",
                truncated.to_string(),
                TokenError::BadSignature,
            ),
            (
                "expired beyond skew",
                hs256(serde_json::json!({"exp": NOW - 61})),
                TokenError::Expired,
            ),
            (
                "nbf beyond skew",
                hs256(serde_json::json!({"exp": exp, "nbf": NOW + 61})),
                TokenError::NotYetValid,
            ),
            (
                "iat in the future",
                hs256(serde_json::json!({"exp": exp, "iat": NOW + 3600})),
                TokenError::IssuedInFuture,
            ),
            (
                "no exp",
                hs256(serde_json::json!({"sub": "u"})),
                TokenError::MissingExpiration,
            ),
            (
                "exp as string",
                hs256(serde_json::json!({"exp": "tomorrow"})),
                TokenError::InvalidClaims,
            ),
            (
                "sub as number",
                hs256(serde_json::json!({"exp": exp, "sub": 42})),
                TokenError::InvalidClaims,
            ),
            (
                "huge exp",
                hs256(serde_json::json!({"exp": 1e300})),
                TokenError::InvalidClaims,
            ),
            (
                "CRLF in name",
                hs256(serde_json::json!({"exp": exp, "name": "a\r\nX-User-Role: admin"})),
                TokenError::UnsafeClaim("name"),
            ),
            (
                "NUL in sub",
                hs256(serde_json::json!({"exp": exp, "sub": "a\u{0}"})),
                TokenError::UnsafeClaim("sub"),
            ),
            ("16 KB token", "a".repeat(16 * 1024), TokenError::TooLarge),
        ];
        for (what, token, expected) in cases {
            assert_eq!(v.verify(&token, NOW), Err(expected), "{what}");
        }
    }

    #[test]
    fn cached_tokens_still_expire_and_stay_bounded() {
        let v = Verifier::new(&[Algorithm::Hs256], SECRET, None, None, 0);
        let mut c = TokenCache::default();
        let t = hs256(serde_json::json!({"sub": "u", "exp": NOW + 10, "nbf": NOW - 5}));
        assert!(c.verify(&v, &t, NOW).is_ok());
        assert_eq!(c.len(), 1);
        assert!(c.verify(&v, &t, NOW).is_ok(), "served from the cache");
        assert_eq!(
            c.verify(&v, &t, NOW + 11),
            Err(TokenError::Expired),
            "time checks run on hits"
        );
        assert!(c.verify(&v, &t, NOW).is_ok());
        assert_eq!(c.verify(&v, &t, NOW - 6), Err(TokenError::NotYetValid));
        // A tampered copy never matches a cached entry.
        let mut tampered = t.clone();
        tampered.push('A');
        assert!(c.verify(&v, &tampered, NOW).is_err());
        for i in 0..(TOKEN_CACHE_ENTRIES + 50) {
            let t = hs256(serde_json::json!({"sub": format!("u{i}"), "exp": NOW + 10}));
            assert!(c.verify(&v, &t, NOW).is_ok());
        }
        assert!(c.len() <= TOKEN_CACHE_ENTRIES);
    }

    #[test]
    fn skew_is_honoured_on_both_sides() {
        let v = verifier();
        assert!(v
            .verify(&hs256(serde_json::json!({"exp": NOW - 59})), NOW)
            .is_ok());
        assert!(v
            .verify(&hs256(serde_json::json!({"exp": NOW + 10, "nbf": NOW + 59})), NOW)
            .is_ok());
        assert!(v
            .verify(&hs256(serde_json::json!({"exp": NOW + 10, "iat": NOW + 59})), NOW)
            .is_ok());
        let strict = Verifier::new(&[Algorithm::Hs256], SECRET, None, None, 0);
        assert_eq!(
            strict.verify(&hs256(serde_json::json!({"exp": NOW - 1})), NOW),
            Err(TokenError::Expired)
        );
    }

    #[test]
    fn issuer_and_audience() {
        let v = Verifier::new(
            &[Algorithm::Hs256],
            SECRET,
            Some("gw".into()),
            Some("api".into()),
            60,
        );
        let ok = hs256(serde_json::json!({"exp": NOW + 10, "iss": "gw", "aud": ["x", "api"]}));
        assert!(v.verify(&ok, NOW).is_ok());
        let ok_single = hs256(serde_json::json!({"exp": NOW + 10, "iss": "gw", "aud": "api"}));
        assert!(v.verify(&ok_single, NOW).is_ok());
        let bad_iss = hs256(serde_json::json!({"exp": NOW + 10, "iss": "other", "aud": "api"}));
        assert_eq!(v.verify(&bad_iss, NOW), Err(TokenError::WrongIssuer));
        let no_aud = hs256(serde_json::json!({"exp": NOW + 10, "iss": "gw"}));
        assert_eq!(v.verify(&no_aud, NOW), Err(TokenError::WrongAudience));
    }

    #[test]
    fn issued_tokens_verify_and_keep_the_identity() {
        let v = Verifier::new(
            &[Algorithm::Hs256],
            SECRET,
            Some("gw".into()),
            Some("api".into()),
            0,
        );
        let old = Identity {
            user_id: Some("user-001".into()),
            user_name: Some("admin".into()),
            role: "admin".into(),
            jti: Some("old".into()),
            expires_at: NOW + 5,
            issued_at: Some(NOW - 100),
        };
        let t = v.issue(&old, NOW, 1800, "new-jti").unwrap();
        let id = v.verify(&t, NOW).unwrap();
        assert_eq!(id.user_id, old.user_id);
        assert_eq!(id.user_name, old.user_name);
        assert_eq!(id.role, "admin");
        assert_eq!(id.jti.as_deref(), Some("new-jti"));
        assert_eq!((id.issued_at, id.expires_at), (Some(NOW), NOW + 1800));
    }

    #[test]
    fn hs384_and_hs512_when_configured() {
        let v = Verifier::new(&[Algorithm::Hs384, Algorithm::Hs512], SECRET, None, None, 60);
        let key = Hs512Key::new(SECRET);
        let mut claims = Claims::new(serde_json::json!({"sub": "u"}));
        claims.expiration = chrono::DateTime::from_timestamp(NOW + 10, 0);
        let t512 = Hs512.token(&jwt_compact::Header::empty(), &claims, &key).unwrap();
        assert_eq!(v.verify(&t512, NOW).unwrap().user_id.as_deref(), Some("u"));
        assert_eq!(
            v.verify(&hs256(serde_json::json!({"exp": NOW + 10})), NOW),
            Err(TokenError::AlgorithmNotAllowed)
        );
    }
}
