//! JWT verification: parse, pick the issuer by `iss`, check the algorithm against that issuer's
//! allow-list, pick the key (by `kid`, of the algorithm's kind), verify the signature, then check
//! `exp` (required), `nbf`, `iat` and `aud` against an injected clock and map the claims to the
//! caller's identity. This duty owns its settings (`jwt:` in the gateway file), their defaults
//! and validation, and the compiled [`Verifier`]; keys are built once at configure time (or, for
//! a fetched JWKS, once per fetch: see [`remote`]). Verified tokens are remembered in a per-VM
//! [`TokenCache`], runtime state kept apart from the settings.

#[cfg(test)]
pub(crate) mod issuer_tests;
pub mod keys;
pub mod native;
pub mod remote;
#[cfg(test)]
pub(crate) mod testkeys;

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use jwt_compact::alg::{Hs256, Hs384, Hs512};
use jwt_compact::{AlgorithmExt, Claims, UntrustedToken};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use keys::{Algorithm, Key, KeySet, Lookup, Material};
pub use remote::{Remote, RemoteJwksSettings};

use crate::error::{check_name, ConfigError};
use crate::headers::is_safe_value as is_safe_header_value;

/// Default clock skew accepted on `exp`, `nbf` and `iat`, in seconds.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

/// Largest accepted clock skew (one day): anything larger is a configuration mistake.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 86_400;

/// Most issuers one gateway trusts.
pub const MAX_ISSUERS: usize = 16;

/// Name of the issuer the top-level `jwt:` fields describe.
pub const DEFAULT_ISSUER_NAME: &str = "default";

/// `jwt:`: how tokens are verified. The top-level fields describe one HMAC issuer (the form the
/// reference gateway uses: one shared secret, tokens without `iss`); `issuers` adds more, each
/// with its own keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<ClaimSettings>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub issuers: Vec<IssuerSettings>,
    /// Let the host check RSA and ECDSA signatures when it can (Envoy's `verify_signature`,
    /// BoringSSL); the filter's own code is used otherwise, and always for PSS and EdDSA.
    #[serde(default = "default_true")]
    pub host_verification: bool,
}

fn default_true() -> bool {
    true
}

/// `jwt.issuers[]`: one token issuer and where its keys come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IssuerSettings {
    /// A short name for logs, metrics and errors.
    pub name: String,
    /// The `iss` claim its tokens carry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Tokens without `iss` go to the default issuer.
    #[serde(default)]
    pub default: bool,
    /// When set, a token's `aud` must name one of these.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audiences: Vec<String>,
    pub algorithms: Vec<String>,
    #[serde(default = "default_clock_skew")]
    pub clock_skew: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<ClaimSettings>,
    // Key source: exactly one of these.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_env: Option<String>,
    /// A JWKS document inline (an object, or the document as a JSON string).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local_jwks: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remote_jwks: Option<RemoteJwksSettings>,
}

/// `claims:`: which claims become the caller's identity headers. A name with dots walks into
/// objects (`realm_access.roles`); an array claim gives its first string; other types are
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimSettings {
    #[serde(default = "claim_sub")]
    pub user_id: String,
    #[serde(default = "claim_name")]
    pub user_name: String,
    #[serde(default = "claim_role")]
    pub role: String,
}

impl Default for ClaimSettings {
    fn default() -> Self {
        Self {
            user_id: claim_sub(),
            user_name: claim_name(),
            role: claim_role(),
        }
    }
}

fn claim_sub() -> String {
    "sub".to_string()
}
fn claim_name() -> String {
    "name".to_string()
}
fn claim_role() -> String {
    "role".to_string()
}

fn default_algorithms() -> Vec<String> {
    vec!["HS256".to_string()]
}

fn default_clock_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

fn secret_from(
    secret: &Option<String>,
    secret_env: &Option<String>,
    env: Env<'_>,
) -> Result<Option<String>, ConfigError> {
    match (secret, secret_env) {
        (Some(_), Some(_)) => Err(ConfigError::new("", "set either secret or secret_env, not both")),
        (None, None) => Ok(None),
        (Some(s), None) if s.is_empty() => Err(ConfigError::new("secret", "must not be empty")),
        (Some(s), None) => Ok(Some(s.clone())),
        (None, Some(var)) => env(var)
            .filter(|v| !v.is_empty())
            .map(Some)
            .ok_or_else(|| ConfigError::new("secret_env", format!("environment variable {var} is not set"))),
    }
}

fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, ConfigError> {
    if names.is_empty() {
        return Err(ConfigError::new("algorithms", "must list at least one algorithm"));
    }
    let mut algorithms = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let alg = Algorithm::from_name(name).ok_or_else(|| {
            ConfigError::new(
                format!("algorithms[{i}]"),
                format!(
                    "unsupported algorithm {name:?} (expected one of {})",
                    Algorithm::names()
                ),
            )
        })?;
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    Ok(algorithms)
}

fn check_skew(skew: u64) -> Result<i64, ConfigError> {
    if skew > MAX_CLOCK_SKEW_SECONDS {
        return Err(ConfigError::new(
            "clock_skew",
            format!("must be at most {MAX_CLOCK_SKEW_SECONDS}"),
        ));
    }
    Ok(i64::try_from(skew).unwrap_or(i64::MAX))
}

fn compile_claims(c: &Option<ClaimSettings>) -> Result<ClaimSettings, ConfigError> {
    let c = c.clone().unwrap_or_default();
    for (field, v) in [
        ("user_id", &c.user_id),
        ("user_name", &c.user_name),
        ("role", &c.role),
    ] {
        if v.is_empty() || v.split('.').any(str::is_empty) {
            return Err(ConfigError::new(
                format!("claims.{field}"),
                "must be a claim name (dots walk into objects)",
            ));
        }
    }
    Ok(c)
}

/// The HMAC keys made from `secret` for every HMAC algorithm in `algorithms`.
fn hmac_keys(algorithms: &[Algorithm], secret: &[u8]) -> Result<KeySet, ConfigError> {
    let keys: Vec<Key> = algorithms
        .iter()
        .filter_map(|&a| {
            Material::hmac(a, secret).map(|material| Key {
                kid: None,
                alg: Some(a),
                material,
                spki: None,
            })
        })
        .collect();
    if keys.len() != algorithms.len() {
        return Err(ConfigError::new(
            "algorithms",
            "a secret signs only HS256, HS384 or HS512 (public-key algorithms need local_jwks or remote_jwks)",
        ));
    }
    Ok(KeySet::from_keys(keys))
}

impl JwtSettings {
    /// Validates the settings and builds the verifier. Secrets are inline (`secret`) or named by
    /// `secret_env` and looked up through `env` (in Envoy, the process environment the filter
    /// sees through `vm_config.environment_variables.host_env_keys`), so they never have to be
    /// written into Envoy's configuration. Field names in errors are relative to `jwt`.
    pub fn compile(&self, env: Env<'_>) -> Result<Verifier, ConfigError> {
        let mut list = Vec::new();
        let top_secret = secret_from(&self.secret, &self.secret_env, env)?;
        match top_secret {
            Some(secret) => {
                let algorithms = parse_algorithms(&self.algorithms)?;
                if self.issuer.as_deref() == Some("") {
                    return Err(ConfigError::new("issuer", "must not be empty when set"));
                }
                if self.audience.as_deref() == Some("") {
                    return Err(ConfigError::new("audience", "must not be empty when set"));
                }
                list.push(Issuer {
                    name: DEFAULT_ISSUER_NAME.to_string(),
                    iss: self.issuer.clone(),
                    default: true,
                    audiences: self.audience.iter().cloned().collect(),
                    clock_skew: check_skew(self.clock_skew)?,
                    claims: compile_claims(&self.claims)?,
                    source: Source::Secret(hmac_keys(&algorithms, secret.as_bytes())?),
                    algorithms,
                });
            }
            None if self.issuers.is_empty() => {
                return Err(ConfigError::new(
                    "secret_env",
                    "set secret_env (or secret), or list issuers",
                ));
            }
            None => {
                if self.issuer.is_some() || self.audience.is_some() || self.claims.is_some() {
                    return Err(ConfigError::new(
                        "",
                        "issuer, audience and claims at the top of jwt describe the secret's issuer: set secret_env too, or move them into issuers",
                    ));
                }
            }
        }
        if self.issuers.len() > MAX_ISSUERS {
            return Err(ConfigError::new(
                "issuers",
                format!("at most {MAX_ISSUERS} issuers"),
            ));
        }
        for (i, s) in self.issuers.iter().enumerate() {
            let issuer = s.compile(env).map_err(|e| e.under(&format!("issuers[{i}]")))?;
            if list.iter().any(|o: &Issuer| o.name == issuer.name) {
                return Err(ConfigError::new(
                    format!("issuers[{i}].name"),
                    format!("duplicate issuer name {:?}", issuer.name),
                ));
            }
            if issuer.iss.is_some() && list.iter().any(|o| o.iss == issuer.iss) {
                return Err(ConfigError::new(
                    format!("issuers[{i}].issuer"),
                    "another issuer has the same iss",
                ));
            }
            if issuer.default && list.iter().any(|o| o.default) {
                return Err(ConfigError::new(
                    format!("issuers[{i}].default"),
                    "only one issuer may be the default (the top-level secret already is)",
                ));
            }
            list.push(issuer);
        }
        let mut verifier = Verifier::from_issuers(list);
        verifier.host_verification = self.host_verification;
        Ok(verifier)
    }
}

impl IssuerSettings {
    fn compile(&self, env: Env<'_>) -> Result<Issuer, ConfigError> {
        check_name("name", &self.name)?;
        if self.issuer.as_deref() == Some("") {
            return Err(ConfigError::new("issuer", "must not be empty when set"));
        }
        if self.issuer.is_none() && !self.default {
            return Err(ConfigError::new(
                "issuer",
                "set the iss its tokens carry (or mark the issuer default)",
            ));
        }
        if self.audiences.iter().any(String::is_empty) {
            return Err(ConfigError::new(
                "audiences",
                "must not contain an empty audience",
            ));
        }
        let algorithms = parse_algorithms(&self.algorithms)?;
        let secret = secret_from(&self.secret, &self.secret_env, env)?;
        let sources = usize::from(secret.is_some())
            + usize::from(self.local_jwks.is_some())
            + usize::from(self.remote_jwks.is_some());
        if sources != 1 {
            return Err(ConfigError::new(
                "",
                "set exactly one key source: secret_env (or secret), local_jwks or remote_jwks",
            ));
        }
        let source = if let Some(secret) = secret {
            Source::Secret(hmac_keys(&algorithms, secret.as_bytes())?)
        } else {
            if let Some(a) = algorithms.iter().find(|a| a.family() == keys::Family::Hmac) {
                return Err(ConfigError::new(
                    "algorithms",
                    format!("{} needs a secret; a JWKS only holds public keys", a.name()),
                ));
            }
            match (&self.local_jwks, &self.remote_jwks) {
                (Some(doc), _) => {
                    let text = match doc {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    let set =
                        KeySet::parse(text.as_bytes()).map_err(|m| ConfigError::new("local_jwks", m))?;
                    Source::Local(Rc::new(set))
                }
                (None, Some(remote)) => Source::Remote(remote.compile().map_err(|e| e.under("remote_jwks"))?),
                (None, None) => return Err(ConfigError::new("", "no key source")),
            }
        };
        Ok(Issuer {
            name: self.name.clone(),
            iss: self.issuer.clone(),
            default: self.default,
            audiences: self.audiences.clone(),
            clock_skew: check_skew(self.clock_skew)?,
            claims: compile_claims(&self.claims)?,
            source,
            algorithms,
        })
    }
}

/// Where an issuer's keys come from.
pub enum Source {
    /// HMAC keys from a shared secret (the only source that can also sign).
    Secret(KeySet),
    /// A JWKS from the configuration.
    Local(Rc<KeySet>),
    /// A JWKS fetched and refreshed at runtime: the keys live in the VM's state.
    Remote(Remote),
}

/// One compiled issuer.
pub struct Issuer {
    pub name: String,
    pub iss: Option<String>,
    pub default: bool,
    pub audiences: Vec<String>,
    pub algorithms: Vec<Algorithm>,
    pub clock_skew: i64,
    pub claims: ClaimSettings,
    pub source: Source,
}

impl Issuer {
    pub fn remote(&self) -> Option<&Remote> {
        match &self.source {
            Source::Remote(r) => Some(r),
            _ => None,
        }
    }
}

/// Longest token accepted; anything larger is refused before any parsing.
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Role assumed when a token carries none (as the reference gateway does).
pub const DEFAULT_ROLE: &str = "user";

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
    /// `iss` names no configured issuer.
    UnknownIssuer,
    /// No `iss`, and no default issuer.
    MissingIssuer,
    /// The issuer's key set holds no key with the token's `kid` (issuer index).
    UnknownKey(usize),
    /// The issuer's key set holds no key of the kind the token's algorithm needs.
    NoFittingKey,
    /// The issuer's keys are not available (never fetched, or older than `max_stale`).
    KeysUnavailable(usize),
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
            Self::UnknownIssuer => "unknown_issuer",
            Self::MissingIssuer => "missing_iss",
            Self::UnknownKey(_) => "unknown_kid",
            Self::NoFittingKey => "key_type",
            Self::KeysUnavailable(_) => "keys_unavailable",
        }
    }
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
            Self::UnknownIssuer => f.write_str("unknown issuer (iss)"),
            Self::MissingIssuer => f.write_str("missing iss claim"),
            Self::UnknownKey(_) => f.write_str("unknown signing key (kid)"),
            Self::NoFittingKey => f.write_str("no key of the kind the signing algorithm needs"),
            Self::KeysUnavailable(_) => f.write_str("the issuer's signing keys are not available yet"),
        }
    }
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
    /// `auth_time` (OIDC: when the user authenticated), unix seconds, when present. Tokens the
    /// gateway mints by refresh carry the original one on, so a ban reaches every token of a
    /// lineage that began before it.
    pub auth_time: Option<i64>,
    /// Index of the issuer that signed the token.
    pub issuer: usize,
    /// What revocation is keyed by: the SHA-256 of the signing input (`header.payload`, what
    /// the signature signs), base64url. Every valid encoding of one signed token (an ECDSA
    /// signature's `(r, n - s)` twin, another base64 spelling of the signature) has the same
    /// one, so a logout cannot be undone by re-encoding the token.
    pub revocation_id: String,
}

impl Identity {
    /// The time a ban is compared with: the earliest of `auth_time` and `iat` (a token without
    /// either counts as older than any ban).
    pub fn authenticated_at(&self) -> Option<i64> {
        match (self.auth_time, self.issued_at) {
            (Some(a), Some(i)) => Some(a.min(i)),
            (a, i) => a.or(i),
        }
    }
}

/// [`Identity::revocation_id`] of a token's signing input.
pub fn revocation_id(signing_input: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(signing_input))
}

/// The key sets of issuers whose keys are fetched, by issuer index (`None`: none yet). Runtime
/// state of a VM, shared with the verifier on each call.
pub type RemoteSets = [Option<Rc<KeySet>>];

/// Verifies tokens of the configured issuers with keys prepared at configure time.
pub struct Verifier {
    issuers: Vec<Issuer>,
    default: Option<usize>,
    /// Whether any issuer declares an `iss`: then a token's `iss` must name one. In the
    /// single-secret form nobody does, and `iss` is not checked (as the reference gateway).
    routes_by_iss: bool,
    /// Whether the host may check RSA/ECDSA signatures (when it can).
    pub host_verification: bool,
}

/// What verification needs besides the token and the configuration: the VM's fetched key sets,
/// and the host's signature check when it has one.
pub struct KeyContext<'a> {
    pub remote: &'a RemoteSets,
    pub native: Option<native::NativeVerify<'a>>,
}

impl<'a> KeyContext<'a> {
    pub fn remote(remote: &'a RemoteSets) -> Self {
        Self { remote, native: None }
    }
}

/// Tokens whose signature and claims were verified, with what the time checks need; a hit skips
/// the signature check and the JSON parsing (the time checks run again on every use, and a
/// fetched key must still be published). One per VM, bounded. Entries are keyed by a 128-bit
/// keyed hash of the token (two SipHash-1-3 with this VM's random keys), not the token: an
/// identity-provider token is often over 1 KB, and nobody without the keys can aim a forged
/// token at a cached one's key.
#[derive(Debug, Default)]
pub struct TokenCache {
    entries: HashMap<u128, Verified>,
    keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
}

impl TokenCache {
    fn key(&self, token: &str) -> u128 {
        use std::hash::BuildHasher as _;
        (u128::from(self.keys.0.hash_one(token)) << 64) | u128::from(self.keys.1.hash_one(token))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies `token` at `now` through the cache.
    pub fn verify(&mut self, verifier: &Verifier, token: &str, now: i64) -> Result<Identity, TokenError> {
        self.verify_with(verifier, KeyContext::remote(&[]), token, now)
    }

    /// Verifies `token` at `now` through the cache, with the VM's fetched key sets.
    pub fn verify_with(
        &mut self,
        verifier: &Verifier,
        keys: KeyContext<'_>,
        token: &str,
        now: i64,
    ) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        let key = self.key(token);
        if let Some(v) = self.entries.get(&key) {
            let checked = verifier.recheck(v, keys.remote, now);
            return match checked {
                Ok(()) => Ok(v.identity.clone()),
                Err(e) => {
                    self.entries.remove(&key);
                    if matches!(e, TokenError::UnknownKey(_) | TokenError::KeysUnavailable(_)) {
                        // The key left the set: verify afresh (which reports the same, or
                        // finds the key under a new set).
                        return self.verify_with(verifier, keys, token, now);
                    }
                    Err(e)
                }
            };
        }
        let verified = verifier.verify_uncached(token, keys, now)?;
        let identity = verified.identity.clone();
        if self.entries.len() >= TOKEN_CACHE_ENTRIES {
            // Bounded: drop an arbitrary entry (HashMap order), never grow.
            if let Some(k) = self.entries.keys().next().copied() {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, verified);
        Ok(identity)
    }
}

#[derive(Debug, Clone)]
pub struct Verified {
    identity: Identity,
    not_before: Option<i64>,
    /// The fetched key that checked it (`kid`), when its issuer's keys are fetched.
    kid: Option<String>,
}

/// Verified tokens remembered per VM.
pub const TOKEN_CACHE_ENTRIES: usize = 1024;

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.issuers.iter().map(|i| i.name.as_str()).collect();
        f.debug_struct("Verifier")
            .field("issuers", &names)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// One signature check: by the host when it can check this algorithm, else compiled-in.
fn check_signature(
    key: &Key,
    alg: Algorithm,
    message: &[u8],
    signature: &[u8],
    host: Option<&mut native::HostCheck<'_>>,
) -> bool {
    if let (Some(host), Some(spki), Some(hash)) = (host, key.spki.as_deref(), alg.host_hash()) {
        let der;
        let for_host = match alg.family() {
            keys::Family::P256 | keys::Family::P384 => {
                let width = if alg.family() == keys::Family::P256 {
                    32
                } else {
                    48
                };
                match native::ecdsa_der(signature, width) {
                    Some(d) => {
                        der = d;
                        der.as_slice()
                    }
                    None => return false,
                }
            }
            _ => signature,
        };
        if let Some(valid) = host(hash, spki, for_host, message) {
            return valid;
        }
    }
    key.material.verify(alg, message, signature)
}

/// Follows a dotted claim name into nested objects.
fn claim<'a>(claims: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    let mut parts = path.split('.');
    let mut value = claims.get(parts.next()?)?;
    for part in parts {
        value = value.as_object()?.get(part)?;
    }
    Some(value)
}

/// A claim as a header value: a string, or the first string of an array (role lists).
fn claim_text(
    claims: &Map<String, Value>,
    path: &str,
    name: &'static str,
) -> Result<Option<String>, TokenError> {
    let text = match claim(claims, path) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Array(items)) => match items.first() {
            None => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(_) => return Err(TokenError::InvalidClaims),
        },
        Some(_) => return Err(TokenError::InvalidClaims),
    };
    if !is_safe_header_value(&text) {
        return Err(TokenError::UnsafeClaim(name));
    }
    Ok(Some(text))
}

fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenError::InvalidClaims),
    }
}

impl Verifier {
    /// One issuer with a shared secret (the reference gateway's form).
    pub fn new(
        algorithms: &[Algorithm],
        secret: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
        clock_skew_seconds: u64,
    ) -> Self {
        // Tests and fuzzing build it with HMAC algorithms only; anything else gives no key.
        let keys = hmac_keys(algorithms, secret).unwrap_or_default();
        Self::from_issuers(vec![Issuer {
            name: DEFAULT_ISSUER_NAME.to_string(),
            iss: issuer,
            default: true,
            audiences: audience.into_iter().collect(),
            algorithms: algorithms.to_vec(),
            clock_skew: i64::try_from(clock_skew_seconds).unwrap_or(i64::MAX),
            claims: ClaimSettings::default(),
            source: Source::Secret(keys),
        }])
    }

    pub fn from_issuers(issuers: Vec<Issuer>) -> Self {
        let default = issuers.iter().position(|i| i.default);
        let routes_by_iss = issuers.len() > 1;
        Self {
            issuers,
            default,
            routes_by_iss,
            host_verification: true,
        }
    }

    pub fn issuers(&self) -> &[Issuer] {
        &self.issuers
    }

    pub fn issuer(&self, index: usize) -> Option<&Issuer> {
        self.issuers.get(index)
    }

    /// Whether any issuer verifies with public keys (a JWKS).
    pub fn uses_public_keys(&self) -> bool {
        self.issuers
            .iter()
            .any(|i| !matches!(i.source, Source::Secret(_)))
    }

    /// Indexes and settings of the issuers whose keys are fetched.
    pub fn remotes(&self) -> impl Iterator<Item = (usize, &Issuer, &Remote)> {
        self.issuers
            .iter()
            .enumerate()
            .filter_map(|(i, iss)| iss.remote().map(|r| (i, iss, r)))
    }

    /// The clock skew of the issuer that signed a token.
    pub fn clock_skew(&self, issuer: usize) -> i64 {
        self.issuers.get(issuer).map_or(0, |i| i.clock_skew)
    }

    /// Whether the gateway can mint tokens for this issuer (it holds its secret).
    pub fn can_issue(&self, issuer: usize) -> bool {
        matches!(
            self.issuers.get(issuer).map(|i| &i.source),
            Some(Source::Secret(_))
        )
    }

    /// Issues a token for the same identity (`sub`, `name`, `role`, plus the issuer's `iss` and
    /// first audience) with new `iat`, `exp` and `jti`, signed with the issuer's first algorithm.
    /// Only issuers with a secret can do this.
    pub fn issue(&self, id: &Identity, now: i64, ttl_seconds: i64, jti: &str) -> Result<String, String> {
        let issuer = self.issuers.get(id.issuer).ok_or("unknown issuer")?;
        let Source::Secret(keys) = &issuer.source else {
            return Err(format!("issuer {} has no secret to sign with", issuer.name));
        };
        let mut custom = Map::new();
        if let Some(sub) = &id.user_id {
            custom.insert("sub".into(), sub.clone().into());
        }
        if let Some(name) = &id.user_name {
            custom.insert("name".into(), name.clone().into());
        }
        custom.insert("role".into(), id.role.clone().into());
        custom.insert("jti".into(), jti.into());
        // The lineage's authentication time: a ban compares with it, so refreshing cannot
        // outrun a ban (a token without `iat` counts as authenticated at 0, before any ban).
        custom.insert("auth_time".into(), id.authenticated_at().unwrap_or(0).into());
        if let Some(iss) = &issuer.iss {
            custom.insert("iss".into(), iss.clone().into());
        }
        if let Some(aud) = issuer.audiences.first() {
            custom.insert("aud".into(), aud.clone().into());
        }
        let mut claims = Claims::new(custom);
        claims.issued_at = chrono::DateTime::from_timestamp(now, 0);
        claims.expiration = chrono::DateTime::from_timestamp(now.saturating_add(ttl_seconds), 0);
        let header = jwt_compact::Header::empty().with_token_type("JWT");
        let key = keys.keys.first().ok_or("no signing key")?;
        let signed = match &key.material {
            Material::Hs256(k) => Hs256.token(&header, &claims, k),
            Material::Hs384(k) => Hs384.token(&header, &claims, k),
            Material::Hs512(k) => Hs512.token(&header, &claims, k),
            _ => return Err("not an HMAC key".to_string()),
        };
        signed.map_err(|e| e.to_string())
    }

    /// Verifies `token` at unix time `now` (seconds), without a cache or fetched keys.
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        self.verify_uncached(token, KeyContext::remote(&[]), now)
            .map(|v| v.identity)
    }

    fn check_times(
        skew: i64,
        exp: i64,
        nbf: Option<i64>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<(), TokenError> {
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

    /// The checks a cached token goes through again: times, and that a fetched key is still
    /// published.
    fn recheck(&self, v: &Verified, remote: &RemoteSets, now: i64) -> Result<(), TokenError> {
        let id = &v.identity;
        let issuer = self.issuers.get(id.issuer).ok_or(TokenError::UnknownIssuer)?;
        if issuer.remote().is_some() {
            match remote.get(id.issuer).and_then(Option::as_ref) {
                None => return Err(TokenError::KeysUnavailable(id.issuer)),
                Some(set) => {
                    if let Some(kid) = &v.kid {
                        if !set.contains_kid(kid) {
                            return Err(TokenError::UnknownKey(id.issuer));
                        }
                    }
                }
            }
        }
        Self::check_times(issuer.clock_skew, id.expires_at, v.not_before, id.issued_at, now)
    }

    /// Which issuer a token with this `iss` belongs to.
    fn select(&self, iss: Option<&str>) -> Result<usize, TokenError> {
        match iss {
            None => self.default.ok_or(TokenError::MissingIssuer),
            Some(iss) => {
                if let Some(i) = self.issuers.iter().position(|i| i.iss.as_deref() == Some(iss)) {
                    return Ok(i);
                }
                match self.default {
                    // The single-secret form checks `iss` only when it declares one.
                    Some(d) if !self.routes_by_iss => Ok(d),
                    _ => Err(TokenError::UnknownIssuer),
                }
            }
        }
    }

    /// Verifies `token` at `now` without the cache (with the host's check when given).
    pub fn verify_uncached(
        &self,
        token: &str,
        mut keys: KeyContext<'_>,
        now: i64,
    ) -> Result<Verified, TokenError> {
        let remote = keys.remote;
        let untrusted = UntrustedToken::<ExtraHeader>::try_from(token).map_err(|_| TokenError::Malformed)?;
        let header = untrusted.header();
        // RFC 7515 4.1.11: a recipient that does not understand a `crit` extension must refuse.
        if header.other_fields.crit.is_some() {
            return Err(TokenError::CriticalHeader);
        }
        let claims: Claims<Map<String, Value>> = untrusted
            .deserialize_claims_unchecked()
            .map_err(|_| TokenError::InvalidClaims)?;
        let iss = string_claim(&claims.custom, "iss")?;
        let index = self.select(iss.as_deref())?;
        let issuer = self.issuers.get(index).ok_or(TokenError::UnknownIssuer)?;
        let alg = Algorithm::from_name(untrusted.algorithm())
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or(TokenError::AlgorithmNotAllowed)?;
        let (set, kid): (&KeySet, Option<&str>) = match &issuer.source {
            // HMAC tokens (the reference's) carry no `kid`; a secret is one key per algorithm.
            Source::Secret(set) => (set, None),
            Source::Local(set) => (set, header.key_id.as_deref()),
            Source::Remote(_) => (
                remote
                    .get(index)
                    .and_then(Option::as_deref)
                    .ok_or(TokenError::KeysUnavailable(index))?,
                header.key_id.as_deref(),
            ),
        };
        let candidates = match set.lookup(alg, kid) {
            Lookup::Found(keys) => keys,
            Lookup::UnknownKid => return Err(TokenError::UnknownKey(index)),
            Lookup::NoFittingKey => return Err(TokenError::NoFittingKey),
        };
        let signature = untrusted.signature_bytes();
        let message = token
            .rsplit_once('.')
            .map(|(m, _)| m.as_bytes())
            .ok_or(TokenError::Malformed)?;
        let host = if self.host_verification {
            keys.native.as_mut()
        } else {
            None
        };
        let key = match host {
            Some(host) => candidates
                .into_iter()
                .find(|k| check_signature(k, alg, message, signature, Some(&mut **host))),
            None => candidates
                .into_iter()
                .find(|k| check_signature(k, alg, message, signature, None)),
        }
        .ok_or(TokenError::BadSignature)?;
        let mut identity = self.check_claims(issuer, index, &claims, iss.as_deref(), now)?;
        identity.revocation_id = revocation_id(message);
        Ok(Verified {
            identity,
            not_before: claims.not_before.map(|t| t.timestamp()),
            kid: match issuer.source {
                Source::Remote(_) => key.kid.clone(),
                _ => None,
            },
        })
    }

    fn check_claims(
        &self,
        issuer: &Issuer,
        index: usize,
        claims: &Claims<Map<String, Value>>,
        iss: Option<&str>,
        now: i64,
    ) -> Result<Identity, TokenError> {
        let exp = claims
            .expiration
            .map(|t| t.timestamp())
            .ok_or(TokenError::MissingExpiration)?;
        let iat = claims.issued_at.map(|t| t.timestamp());
        Self::check_times(
            issuer.clock_skew,
            exp,
            claims.not_before.map(|t| t.timestamp()),
            iat,
            now,
        )?;
        let c = &claims.custom;
        if let Some(expected) = &issuer.iss {
            if iss != Some(expected.as_str()) {
                return Err(TokenError::WrongIssuer);
            }
        }
        if !issuer.audiences.is_empty() {
            let ok = match c.get("aud") {
                Some(Value::String(a)) => issuer.audiences.contains(a),
                Some(Value::Array(list)) => list.iter().any(|a| {
                    a.as_str()
                        .is_some_and(|a| issuer.audiences.iter().any(|x| x == a))
                }),
                _ => false,
            };
            if !ok {
                return Err(TokenError::WrongAudience);
            }
        }
        let jti = string_claim(c, "jti")?;
        if jti.as_deref().is_some_and(|j| !is_safe_header_value(j)) {
            return Err(TokenError::UnsafeClaim("jti"));
        }
        let auth_time = match c.get("auth_time") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_i64().ok_or(TokenError::InvalidClaims)?),
            Some(_) => return Err(TokenError::InvalidClaims),
        };
        let map = &issuer.claims;
        Ok(Identity {
            // An empty subject names nobody (and could not be banned): refused.
            user_id: match claim_text(c, &map.user_id, "sub")? {
                Some(s) if s.is_empty() => return Err(TokenError::InvalidClaims),
                other => other,
            },
            user_name: claim_text(c, &map.user_name, "name")?,
            role: claim_text(c, &map.role, "role")?.unwrap_or_else(|| DEFAULT_ROLE.to_string()),
            jti,
            expires_at: exp,
            issued_at: iat,
            auth_time,
            issuer: index,
            revocation_id: String::new(),
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
                "empty sub",
                hs256(serde_json::json!({"exp": exp, "sub": ""})),
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
            auth_time: None,
            issuer: 0,
            revocation_id: String::new(),
        };
        let t = v.issue(&old, NOW, 1800, "new-jti").unwrap();
        let id = v.verify(&t, NOW).unwrap();
        assert_eq!(id.user_id, old.user_id);
        assert_eq!(id.user_name, old.user_name);
        assert_eq!(id.role, "admin");
        assert_eq!(id.jti.as_deref(), Some("new-jti"));
        assert_eq!((id.issued_at, id.expires_at), (Some(NOW), NOW + 1800));
        // The lineage keeps the first authentication time through any number of refreshes.
        assert_eq!(id.auth_time, Some(NOW - 100));
        assert_eq!(id.authenticated_at(), Some(NOW - 100));
        let again = v
            .verify(&v.issue(&id, NOW + 10, 1800, "third").unwrap(), NOW + 10)
            .unwrap();
        assert_eq!(again.authenticated_at(), Some(NOW - 100));
        let signing_input = t.rsplit_once('.').unwrap().0;
        assert_eq!(id.revocation_id, revocation_id(signing_input.as_bytes()));
        assert_eq!(id.revocation_id.len(), 43);
    }

    #[test]
    fn hs384_and_hs512_when_configured() {
        let v = Verifier::new(&[Algorithm::Hs384, Algorithm::Hs512], SECRET, None, None, 60);
        let key = jwt_compact::alg::Hs512Key::new(SECRET);
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
