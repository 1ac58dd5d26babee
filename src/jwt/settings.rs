//! The duty's settings (`jwt:` in the gateway file: issuers, algorithms, secrets, claims),
//! their defaults and validation, and the compiled [`Issuer`]s.

use super::*;

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
    #[serde(default = "crate::error::default_true")]
    pub host_verification: bool,
    /// The `typ` values the secret's tokens may carry (default: none, `JWT`, `at+jwt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
    /// Largest decoded payload accepted, bytes (default and most: 16 KiB).
    #[serde(default = "default_max_payload")]
    pub max_payload_bytes: usize,
    /// Forward the caller's scopes upstream under this header (an `X-User-*` name, so a
    /// client's copy is stripped like the other identity headers); off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes_header: Option<String>,
    /// DPoP (RFC 9449) for this issuer's tokens: `off` (default), `allowed`, `required`, or
    /// `{mode, proof_window, algorithms}`.
    #[serde(
        default,
        deserialize_with = "dpop::deserialize_dpop",
        skip_serializing_if = "Option::is_none"
    )]
    pub dpop: Option<DpopSettings>,
}

fn default_max_payload() -> usize {
    claims::DEFAULT_MAX_PAYLOAD_BYTES
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
    /// The algorithms its JWTs may be signed with (none for an issuer of opaque tokens only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub algorithms: Vec<String>,
    #[serde(default = "default_clock_skew")]
    pub clock_skew: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claims: Option<ClaimSettings>,
    /// The `typ` values its tokens may carry (default: none, `JWT`, `at+jwt`; `none` stands for
    /// a token without `typ`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub types: Option<Vec<String>>,
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
    /// Opaque tokens read by the issuer's introspection endpoint (RFC 7662).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub introspection: Option<IntrospectionSettings>,
    /// DPoP (RFC 9449) for this issuer's tokens: `off` (default), `allowed`, `required`, or
    /// `{mode, proof_window, algorithms}`.
    #[serde(
        default,
        deserialize_with = "dpop::deserialize_dpop",
        skip_serializing_if = "Option::is_none"
    )]
    pub dpop: Option<DpopSettings>,
}

/// `claims:`: which claims become the caller's identity. Each is a dotted name that walks into
/// objects (`realm_access.roles`) or a list of literal segments (`["https://example.com/roles"]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClaimSettings {
    #[serde(default = "claim_sub")]
    pub user_id: ClaimPath,
    #[serde(default = "claim_name")]
    pub user_name: ClaimPath,
    /// A string, or a list of strings: every role the caller holds.
    #[serde(default = "claim_role")]
    pub role: ClaimPath,
    /// `space_separated`: the role claim is one string of space-separated roles.
    #[serde(default, skip_serializing_if = "is_default_format")]
    pub role_format: RoleFormat,
    /// Where the scopes are (default: `scope`, else `scp`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scopes: Option<ClaimPath>,
}

fn is_default_format(f: &RoleFormat) -> bool {
    *f == RoleFormat::List
}

impl Default for ClaimSettings {
    fn default() -> Self {
        Self {
            user_id: claim_sub(),
            user_name: claim_name(),
            role: claim_role(),
            role_format: RoleFormat::List,
            scopes: None,
        }
    }
}

pub(super) fn claim_sub() -> ClaimPath {
    ClaimPath::named("sub")
}
pub(super) fn claim_name() -> ClaimPath {
    ClaimPath::named("name")
}
pub(super) fn claim_role() -> ClaimPath {
    ClaimPath::named("role")
}

pub(super) fn default_algorithms() -> Vec<String> {
    vec!["HS256".to_string()]
}

pub(super) fn default_clock_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}

type Env<'a> = &'a dyn Fn(&str) -> Option<String>;

pub(super) fn secret_from(
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

pub(super) fn parse_algorithms(names: &[String]) -> Result<Vec<Algorithm>, ConfigError> {
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

pub(super) fn check_skew(skew: u64) -> Result<i64, ConfigError> {
    if skew > MAX_CLOCK_SKEW_SECONDS {
        return Err(ConfigError::new(
            "clock_skew",
            format!("must be at most {MAX_CLOCK_SKEW_SECONDS}"),
        ));
    }
    Ok(i64::try_from(skew).unwrap_or(i64::MAX))
}

pub(super) fn compile_claims(c: &Option<ClaimSettings>) -> Result<ClaimSettings, ConfigError> {
    let c = c.clone().unwrap_or_default();
    for (field, v) in [
        ("user_id", Some(&c.user_id)),
        ("user_name", Some(&c.user_name)),
        ("role", Some(&c.role)),
        ("scopes", c.scopes.as_ref()),
    ] {
        if let Some(v) = v {
            v.validate(&format!("claims.{field}"))?;
        }
    }
    Ok(c)
}

/// The HMAC keys made from `secret` for every HMAC algorithm in `algorithms`.
pub(super) fn hmac_keys(algorithms: &[Algorithm], secret: &[u8]) -> Result<KeySet, ConfigError> {
    let keys: Vec<Key> = algorithms
        .iter()
        .filter_map(|&a| {
            Material::hmac(a, secret).map(|material| Key::new(None, Some(a), material, None, secret))
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
                    types: Types::compile(self.types.as_deref(), "types")?,
                    source: Source::Secret(hmac_keys(&algorithms, secret.as_bytes())?),
                    algorithms,
                    dpop: compile_dpop(&self.dpop)?,
                    introspection: None,
                });
            }
            None if self.issuers.is_empty() => {
                return Err(ConfigError::new(
                    "secret_env",
                    "set secret_env (or secret), or list issuers",
                ));
            }
            None => {
                if self.issuer.is_some()
                    || self.dpop.is_some()
                    || self.audience.is_some()
                    || self.claims.is_some()
                    || self.types.is_some()
                {
                    return Err(ConfigError::new(
                        "",
                        "issuer, audience, claims, types and dpop at the top of jwt describe the secret's issuer: set secret_env too, or move them into issuers",
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
            if issuer.introspection.is_some() && list.iter().any(|o| o.introspection.is_some()) {
                return Err(ConfigError::new(
                    format!("issuers[{i}].introspection"),
                    "only one issuer may introspect (an opaque token names no issuer)",
                ));
            }
            list.push(issuer);
        }
        if !(256..=claims::DEFAULT_MAX_PAYLOAD_BYTES).contains(&self.max_payload_bytes) {
            return Err(ConfigError::new(
                "max_payload_bytes",
                format!("must be 256 to {}", claims::DEFAULT_MAX_PAYLOAD_BYTES),
            ));
        }
        if let Some(h) = &self.scopes_header {
            let lower = h.to_ascii_lowercase();
            let token = lower.len() > 7
                && lower
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
            if !token || !lower.starts_with("x-user-") {
                return Err(ConfigError::new(
                    "scopes_header",
                    "must be a header name starting with X-User- (clients' copies are stripped like the other identity headers)",
                ));
            }
            if ["x-user-id", "x-user-name", "x-user-role"].contains(&lower.as_str()) {
                return Err(ConfigError::new(
                    "scopes_header",
                    "must not be one of the identity headers (X-User-ID, X-User-Name, X-User-Role): the scopes would replace it",
                ));
            }
        }
        let mut verifier = Verifier::from_issuers(list);
        verifier.host_verification = self.host_verification;
        verifier.max_payload_bytes = self.max_payload_bytes;
        verifier.scopes_header = self.scopes_header.as_ref().map(|h| h.to_ascii_lowercase());
        Ok(verifier)
    }
}

impl IssuerSettings {
    pub(super) fn compile(&self, env: Env<'_>) -> Result<Issuer, ConfigError> {
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
        let secret = secret_from(&self.secret, &self.secret_env, env)?;
        let sources = usize::from(secret.is_some())
            + usize::from(self.local_jwks.is_some())
            + usize::from(self.remote_jwks.is_some());
        // An issuer of opaque tokens only signs nothing the gateway checks.
        let algorithms = if sources == 0 && self.algorithms.is_empty() {
            Vec::new()
        } else {
            parse_algorithms(&self.algorithms)?
        };
        if sources > 1 || (sources == 0 && self.introspection.is_none()) {
            return Err(ConfigError::new(
                "",
                "set exactly one key source: secret_env (or secret), local_jwks or remote_jwks (or only introspection, for opaque tokens)",
            ));
        }
        let introspection = match &self.introspection {
            Some(i) => Some(i.compile(env).map_err(|e| e.under("introspection"))?),
            None => None,
        };
        let source = if sources == 0 {
            Source::None
        } else if let Some(secret) = secret {
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
            types: Types::compile(self.types.as_deref(), "types")?,
            source,
            algorithms,
            dpop: compile_dpop(&self.dpop)?,
            introspection,
        })
    }
}

fn compile_dpop(s: &Option<DpopSettings>) -> Result<Dpop, ConfigError> {
    match s {
        None => Ok(Dpop::default()),
        Some(s) => s.compile().map_err(|e| e.under("dpop")),
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
    /// No keys: the issuer's tokens are opaque, read by introspection only.
    None,
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
    /// The `typ` values its tokens may carry.
    pub types: Types,
    pub source: Source,
    /// DPoP (RFC 9449) for its tokens.
    pub dpop: Dpop,
    /// Its introspection endpoint, for opaque tokens (RFC 7662).
    pub introspection: Option<Introspection>,
}

impl Issuer {
    pub fn remote(&self) -> Option<&Remote> {
        match &self.source {
            Source::Remote(r) => Some(r),
            _ => None,
        }
    }
}
