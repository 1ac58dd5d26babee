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

pub(super) fn claim_sub() -> String {
    "sub".to_string()
}
pub(super) fn claim_name() -> String {
    "name".to_string()
}
pub(super) fn claim_role() -> String {
    "role".to_string()
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
