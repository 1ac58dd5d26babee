//! The filter's configuration: the serde shape ([`FilterConfig`], the JSON Envoy hands to
//! `on_configure`) and its validated, precompiled form ([`Config`], what the request path uses).
//!
//! The JSON has the shape of the gateway file minus what only Envoy needs (upstreams, timeouts,
//! listener): `gateway.prefix`, `gateway.name`, `gateway.rate_limit`, `jwt`, `routes`,
//! `revocation`, `logs`, plus two keys the renderer fills in (`passthrough_paths`,
//! `webdis_cluster`). So an error names the field as the user wrote it in the gateway file.
//! Each duty owns its settings, defaults, validation and compiled form; this module composes
//! them and owns only what is the gateway's own: the prefix, the name and the routes.

use serde::{Deserialize, Serialize};

use crate::access_log::{LogSettings, Logs};
use crate::canary::CanarySettings;
use crate::error::{check_name, check_path_prefix, check_roles, ConfigError, KNOWN_METHODS};
use crate::headers;
use crate::jwt::{JwtSettings, Verifier};
use crate::ratelimit::{RateLimitSettings, RateLimits, RouteLimits, RouteRateLimit};
use crate::revocation::{Revocation, RevocationSettings};
use crate::trace::TraceSettings;

/// Default value of the `X-Gateway` header sent upstream.
pub const DEFAULT_GATEWAY_NAME: &str = "envoy-wasm-gateway";

/// The filter's configuration as JSON (the `configuration` value of the Envoy wasm filter).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    #[serde(default)]
    pub gateway: GatewaySettings,
    /// Exact paths outside the gateway prefix that Envoy answers itself (the health path);
    /// every other unmatched path gets the filter's 404.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub passthrough_paths: Vec<String>,
    /// The Envoy cluster of the webdis sidecar (revocation, log store, cluster-wide limits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webdis_cluster: Option<String>,
    /// The `:authority` sent to webdis (default: derived from `webdis_cluster`, see
    /// [`crate::error::default_authority`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webdis_authority: Option<String>,
    /// The environment variable holding webdis's HTTP basic credentials (`user:password`), read
    /// by the filter at start-up and sent on every webdis call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webdis_auth_env: Option<String>,
    /// JWT verification; required when any route has `auth_required`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtSettings>,
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Token revocation through webdis; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationSettings>,
    #[serde(default)]
    pub logs: LogSettings,
    #[serde(default)]
    pub trace: TraceSettings,
    /// The request headers Envoy's routes match on besides the canary's internal one (the
    /// renderer fills it in). Given, the route is picked again only after the gateway writes or
    /// removes one of them; absent (a hand-written configuration, whose routes may match on the
    /// identity headers), the native module has Envoy pick it again after every header written,
    /// as Envoy's proxy-wasm host does by itself.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_headers: Option<Vec<String>>,
    /// Higress's per-route and per-domain rules (`_rules_`, each a `_match_route_`,
    /// `_match_domain_` or `_match_service_` list and a whole configuration), which Higress adds
    /// to a plugin's configuration from its `matchRules`. Accepted empty; rules are refused
    /// with what to do instead: this filter selects its policy per path from `routes`.
    #[serde(default, rename = "_rules_", skip_serializing_if = "Vec::is_empty")]
    pub higress_rules: Vec<serde_json::Value>,
    /// Secrets from Envoy's SDS instead of the environment (native runtime only): each key is a
    /// variable a `*_env` field names, its value the generic secret that holds it. Rotated
    /// without a restart: the native module reads the secret again as Envoy delivers it.
    /// Kept as JSON here and read into [`SdsSecret`]s only where they can be used (the native
    /// module, the renderer): the `.wasm` refuses it whole, without the code to read it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_sds: Option<serde_json::Value>,
}

/// One `secret_sds` entry: an Envoy generic secret.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SdsSecret {
    /// The secret's name: a static secret of Envoy's bootstrap, or the resource asked of SDS.
    pub name: String,
    /// A filesystem SDS file (a DiscoveryResponse holding the secret), watched for moves: it is
    /// replaced atomically to rotate the secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Any `envoy.config.core.v3.ConfigSource` (e.g. `{"ads": {}}` where Istio's or Envoy
    /// Gateway's xDS server delivers secrets); exclusive with `path`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_source: Option<serde_json::Value>,
}

/// The most `secret_sds` entries.
#[cfg(not(target_arch = "wasm32"))]
const MAX_SDS_SECRETS: usize = 16;

impl SdsSecret {
    /// The ConfigSource Envoy subscribes with, as JSON (empty: a static secret).
    pub fn config_source_json(&self) -> String {
        match (&self.path, &self.config_source) {
            (Some(path), _) => {
                let dir = std::path::Path::new(path)
                    .parent()
                    .map(|d| d.to_string_lossy().into_owned())
                    .unwrap_or_default();
                serde_json::json!({"path_config_source": {"path": path, "watched_directory": {"path": dir}}})
                    .to_string()
            }
            (None, Some(source)) => source.to_string(),
            (None, None) => String::new(),
        }
    }
}

/// The `secret_sds` entries of a configuration's JSON (the native module subscribes to them
/// before compiling it).
#[cfg(not(target_arch = "wasm32"))]
pub fn secret_sds_of(json: &[u8]) -> Result<Vec<(String, SdsSecret)>, ConfigError> {
    let raw: FilterConfig = serde_json::from_slice(json)
        .map_err(|e| ConfigError::new("", format!("invalid filter configuration JSON: {e}")))?;
    Ok(parse_secret_sds(raw.secret_sds.as_ref())?.into_iter().collect())
}

/// Reads and checks `secret_sds` (native builds: the module and the renderer).
#[cfg(not(target_arch = "wasm32"))]
fn parse_secret_sds(
    value: Option<&serde_json::Value>,
) -> Result<std::collections::BTreeMap<String, SdsSecret>, ConfigError> {
    let Some(value) = value else {
        return Ok(Default::default());
    };
    let sds: std::collections::BTreeMap<String, SdsSecret> =
        serde_json::from_value(value.clone()).map_err(|e| ConfigError::new("secret_sds", e.to_string()))?;
    check_secret_sds(&sds)?;
    Ok(sds)
}

/// The variables `secret_sds` gives (checked).
#[cfg(not(target_arch = "wasm32"))]
fn sds_vars(value: Option<&serde_json::Value>) -> Result<Vec<String>, ConfigError> {
    Ok(parse_secret_sds(value)?.into_keys().collect())
}

/// The `.wasm` cannot read Envoy's secrets: `secret_sds` is refused whole.
#[cfg(target_arch = "wasm32")]
fn sds_vars(value: Option<&serde_json::Value>) -> Result<Vec<String>, ConfigError> {
    match value.and_then(|v| v.as_object()).and_then(|m| m.keys().next()) {
        None if value.is_none_or(|v| v.as_object().is_some_and(|m| m.is_empty())) => Ok(Vec::new()),
        var => Err(ConfigError::new(
            format!("secret_sds.{}", var.map_or("", |v| v.as_str())).trim_end_matches('.'),
            "the .wasm cannot read Envoy's secrets (proxy-wasm has no secret ABI): give it through the \
             environment (*_env), or load the native module",
        )),
    }
}

#[cfg(test)]
#[test]
fn an_sds_secret_names_its_config_source() {
    let file = |path: Option<&str>, source: Option<serde_json::Value>| SdsSecret {
        name: "jwt".into(),
        path: path.map(str::to_string),
        config_source: source,
    };
    assert_eq!(file(None, None).config_source_json(), "");
    let fs: serde_json::Value =
        serde_json::from_str(&file(Some("/etc/sds/jwt.json"), None).config_source_json()).unwrap();
    assert_eq!(
        fs,
        serde_json::json!({"path_config_source": {"path": "/etc/sds/jwt.json", "watched_directory": {"path": "/etc/sds"}}})
    );
    let ads = file(None, Some(serde_json::json!({"ads": {}}))).config_source_json();
    assert_eq!(ads, r#"{"ads":{}}"#);
}

/// Checks `secret_sds` (field names relative to the configuration).
#[cfg(not(target_arch = "wasm32"))]
fn check_secret_sds(sds: &std::collections::BTreeMap<String, SdsSecret>) -> Result<(), ConfigError> {
    if sds.len() > MAX_SDS_SECRETS {
        return Err(ConfigError::new(
            "secret_sds",
            format!("at most {MAX_SDS_SECRETS} secrets"),
        ));
    }
    for (var, secret) in sds {
        let field = format!("secret_sds.{var}");
        let var_ok = var
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_uppercase() || b == b'_')
            && var
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'_')
            && var.len() <= 64;
        if !var_ok {
            return Err(ConfigError::new(
                field,
                "must be a variable name (A-Z, 0-9, _) a *_env field names",
            ));
        }
        let name = &secret.name;
        if name.is_empty() || name.len() > 255 || !name.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(ConfigError::new(
                format!("{field}.name"),
                "must be a secret name (1 to 255 visible ASCII characters)",
            ));
        }
        match (&secret.path, &secret.config_source) {
            (Some(_), Some(_)) => {
                return Err(ConfigError::new(field, "give path or config_source, not both"));
            }
            (Some(p), None) if !p.starts_with('/') || p.ends_with('/') => {
                return Err(ConfigError::new(
                    format!("{field}.path"),
                    "must be an absolute file path",
                ));
            }
            (None, Some(v)) if !v.is_object() => {
                return Err(ConfigError::new(
                    format!("{field}.config_source"),
                    "must be an object (an envoy.config.core.v3.ConfigSource)",
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// The most `routing_headers` entries.
const MAX_ROUTING_HEADERS: usize = 64;

/// The filter's part of `gateway:`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewaySettings {
    /// Path prefix every gateway route lives under, e.g. `/api/v1` (may be empty).
    #[serde(default)]
    pub prefix: String,
    /// Value of the `X-Gateway` header sent upstream.
    #[serde(default = "default_gateway_name")]
    pub name: String,
    #[serde(default)]
    pub rate_limit: RateLimitSettings,
    /// Publish each request's decision (identity, roles, outcome, canary, trace id) for Envoy's
    /// RBAC and access logs: filter state (`.wasm`) or dynamic metadata (native).
    #[serde(default, skip_serializing_if = "crate::error::is_false")]
    pub metadata: bool,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        Self {
            prefix: String::new(),
            name: default_gateway_name(),
            rate_limit: RateLimitSettings::default(),
            metadata: false,
        }
    }
}

fn default_gateway_name() -> String {
    DEFAULT_GATEWAY_NAME.to_string()
}

/// One route as the filter sees it (Envoy owns the upstream side).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub name: String,
    pub prefix: String,
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    /// The reference treats a route without `auth_required` as protected.
    #[serde(default = "crate::error::default_true")]
    pub auth_required: bool,
    /// The caller must hold at least one of these roles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// The caller must hold every one of these roles.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles_all: Vec<String>,
    /// The token must carry every one of these OAuth scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Token-bucket limits of this route; none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RouteRateLimit>,
    /// Canary rules; Envoy has a second route for this prefix matched on the internal header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySettings>,
}

/// The reference router's default when a route lists no methods.
fn default_methods() -> Vec<String> {
    vec!["GET".to_string()]
}

/// A validated route, ready for matching.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Gateway prefix + route prefix, e.g. `/api/v1/users`.
    pub full_prefix: String,
    pub methods: Vec<String>,
    /// Precomputed `Allow` header value for 405 replies.
    pub allow: String,
    pub auth_required: bool,
    /// Any one of these admits (empty: any role).
    pub roles: Vec<String>,
    /// Every one of these is needed.
    pub roles_all: Vec<String>,
    /// Every one of these scopes is needed.
    pub scopes: Vec<String>,
    /// The `WWW-Authenticate` value of a refusal for want of a scope.
    pub scope_challenge: String,
    pub limits: Option<RouteLimits>,
    pub canary: Option<CanarySettings>,
}

impl Route {
    /// Segment-aware prefix match: `/api/v1/users` matches itself and `/api/v1/users/...`,
    /// not `/api/v1/usersx` (the same rule as Envoy's `path_separated_prefix`).
    pub fn matches(&self, path: &str) -> bool {
        match path.strip_prefix(self.full_prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/') || self.full_prefix == "/",
            None => false,
        }
    }

    pub fn allows_method(&self, method: &str) -> bool {
        self.methods.iter().any(|m| m == method)
    }
}

/// The validated configuration the request path works from.
#[derive(Debug)]
pub struct Config {
    pub prefix: String,
    pub gateway_name: String,
    pub passthrough_paths: Vec<String>,
    pub verifier: Option<Verifier>,
    /// Routes ordered longest prefix first, so the most specific one wins.
    pub routes: Vec<Route>,
    pub revocation: Option<Revocation>,
    pub rate_limits: RateLimits,
    pub logs: Logs,
    pub trace: TraceSettings,
    /// The `Authorization` value for webdis calls, when credentials are configured.
    pub webdis_auth: Option<String>,
    /// The `:authority` of webdis calls.
    pub webdis_authority: Option<String>,
    /// Lowercased: see [`FilterConfig::routing_headers`].
    pub routing_headers: Option<Vec<String>>,
    /// `gateway.metadata`: publish each request's decision.
    pub publish: bool,
}

impl Config {
    /// Parses and validates the JSON configuration handed to `on_configure`; secrets named by
    /// `*_env` fields come from the process environment.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        Self::from_json_with_env(bytes, &|var| std::env::var(var).ok())
    }

    /// The same, with the environment given.
    pub fn from_json_with_env(
        bytes: &[u8],
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        let raw: FilterConfig = serde_json::from_slice(bytes)
            .map_err(|e| ConfigError::new("", format!("invalid filter configuration JSON: {e}")))?;
        Config::compile(raw, env)
    }

    /// The index of the route a path belongs to (the first that matches), if any.
    pub fn route_index(&self, path: &str) -> Option<usize> {
        self.routes.iter().position(|r| r.matches(path))
    }

    /// The route a path belongs to, if any.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.route_index(path).and_then(|i| self.routes.get(i))
    }

    /// Whether the path lies under the gateway prefix (segment-aware).
    pub fn under_prefix(&self, path: &str) -> bool {
        if self.prefix.is_empty() {
            return true;
        }
        match path.strip_prefix(self.prefix.as_str()) {
            Some(rest) => rest.is_empty() || rest.starts_with('/'),
            None => false,
        }
    }
}

fn compile_route(
    r: &RouteSettings,
    prefix: &str,
    rate_limits: &RateLimits,
    others: &[Route],
) -> Result<Route, ConfigError> {
    check_name("name", &r.name)?;
    if others.iter().any(|o| o.name == r.name) {
        return Err(ConfigError::new(
            "name",
            format!("duplicate route name {:?}", r.name),
        ));
    }
    check_path_prefix("prefix", &r.prefix, false)?;
    let full_prefix = if r.prefix == "/" && !prefix.is_empty() {
        prefix.to_string()
    } else {
        format!("{prefix}{}", r.prefix)
    };
    if others.iter().any(|o| o.full_prefix == full_prefix) {
        return Err(ConfigError::new(
            "prefix",
            format!("{:?} is used by another route", r.prefix),
        ));
    }
    if r.methods.is_empty() {
        return Err(ConfigError::new("methods", "must list at least one method"));
    }
    let mut methods: Vec<String> = Vec::with_capacity(r.methods.len());
    for (j, m) in r.methods.iter().enumerate() {
        let upper = m.to_ascii_uppercase();
        if !KNOWN_METHODS.contains(&upper.as_str()) {
            return Err(ConfigError::new(
                format!("methods[{j}]"),
                format!(
                    "unknown method {m:?} (expected one of {})",
                    KNOWN_METHODS.join(", ")
                ),
            ));
        }
        if !methods.contains(&upper) {
            methods.push(upper);
        }
    }
    check_roles("roles", &r.roles)?;
    check_roles("roles_all", &r.roles_all)?;
    for (field, list) in [
        ("roles", r.roles.is_empty()),
        ("roles_all", r.roles_all.is_empty()),
        ("scopes", r.scopes.is_empty()),
    ] {
        if !list && !r.auth_required {
            return Err(ConfigError::new(
                field,
                format!("{field} need auth_required: true"),
            ));
        }
    }
    for (i, scope) in r.scopes.iter().enumerate() {
        if !crate::jwt::claims::is_scope_token(scope) {
            return Err(ConfigError::new(
                format!("scopes[{i}]"),
                "must be an OAuth scope (visible ASCII without space, quote or backslash)",
            ));
        }
    }
    let limits = match &r.rate_limit {
        None => None,
        Some(rl) => rl
            .compile(&r.name, rate_limits)
            .map_err(|e| e.under("rate_limit"))?,
    };
    let canary = match &r.canary {
        None => None,
        Some(c) => Some(c.compile().map_err(|e| e.under("canary"))?),
    };
    Ok(Route {
        canary,
        name: r.name.clone(),
        full_prefix,
        allow: methods.join(", "),
        methods,
        auth_required: r.auth_required,
        roles: r.roles.clone(),
        roles_all: r.roles_all.clone(),
        scope_challenge: format!(
            "Bearer error=\"insufficient_scope\", scope=\"{}\"",
            r.scopes.join(" ")
        ),
        scopes: r.scopes.clone(),
        limits,
    })
}

impl Config {
    /// Validates and compiles the configuration; `env` resolves the `*_env` secrets.
    pub fn compile(raw: FilterConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let g = &raw.gateway;
        check_path_prefix("gateway.prefix", &g.prefix, true)?;
        if g.name.is_empty() || !headers::is_safe_value(&g.name) {
            return Err(ConfigError::new(
                "gateway.name",
                "must be a non-empty header-safe string",
            ));
        }
        for (i, p) in raw.passthrough_paths.iter().enumerate() {
            check_path_prefix(&format!("passthrough_paths[{i}]"), p, false)?;
        }
        if let Some(rule) = raw.higress_rules.first() {
            let matcher = ["_match_route_", "_match_domain_", "_match_service_"]
                .into_iter()
                .find(|k| rule.get(k).is_some())
                .unwrap_or("a match");
            return Err(ConfigError::new(
                "_rules_[0]",
                format!(
                    "Higress rules ({matcher}) are not supported: this filter chooses its policy per path from `routes` \
                     (auth, roles, limits, canary per route); give the plugin one global configuration without matchRules"
                ),
            ));
        }
        // Checked here (the native module reads the entries again to subscribe to them).
        sds_vars(raw.secret_sds.as_ref())?;
        if let Some(list) = &raw.routing_headers {
            if list.len() > MAX_ROUTING_HEADERS {
                return Err(ConfigError::new(
                    "routing_headers",
                    format!("at most {MAX_ROUTING_HEADERS} names"),
                ));
            }
            if let Some((i, h)) = list.iter().enumerate().find(|(_, h)| !headers::is_name(h)) {
                return Err(ConfigError::new(
                    format!("routing_headers[{i}]"),
                    format!("{h:?} is not a header name"),
                ));
            }
        }
        let webdis = raw.webdis_cluster.as_deref();
        if let Some(cluster) = webdis {
            crate::error::check_upstream("webdis_cluster", cluster)?;
        }
        let webdis_authority = match (&raw.webdis_authority, webdis) {
            (Some(a), _) => {
                crate::error::check_authority("webdis_authority", a)?;
                Some(a.clone())
            }
            (None, Some(cluster)) => Some(crate::error::default_authority(cluster)),
            (None, None) => None,
        };
        let webdis_auth = match &raw.webdis_auth_env {
            None => None,
            Some(var) => Some(crate::webdis::auth_from_env("webdis_auth_env", var, env)?),
        };
        let cluster_wide = raw
            .routes
            .iter()
            .filter_map(|r| r.rate_limit.as_ref())
            .any(|l| l.enabled && l.cluster_wide);
        let rate_limits = g
            .rate_limit
            .compile(cluster_wide, webdis)
            .map_err(|e| e.under("gateway.rate_limit"))?;

        let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.iter().enumerate() {
            let route = compile_route(r, &g.prefix, &rate_limits, &routes)
                .map_err(|e| e.under(&format!("routes[{i}]")))?;
            routes.push(route);
        }
        // Longest prefix first; stable, so equal lengths keep file order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.full_prefix.len()));

        let verifier = match &raw.jwt {
            Some(jwt) => Some(jwt.compile(env).map_err(|e| e.under("jwt"))?),
            None => None,
        };
        if verifier.is_none() {
            if let Some(i) = raw.routes.iter().position(|r| r.auth_required) {
                return Err(ConfigError::new(
                    format!("routes[{i}].auth_required"),
                    "a route requires auth but no jwt section is configured",
                ));
            }
        }
        let revocation = match &raw.revocation {
            None => None,
            Some(rv) => {
                if verifier.is_none() {
                    return Err(ConfigError::new("revocation", "needs a jwt section"));
                }
                let cluster = webdis.ok_or_else(|| {
                    ConfigError::new(
                        "revocation",
                        "needs webdis (the `webdis` address in the gateway file)",
                    )
                })?;
                Some(
                    rv.compile(&g.prefix, cluster)
                        .map_err(|e| e.under("revocation"))?,
                )
            }
        };
        let logs = raw
            .logs
            .compile(
                &g.prefix,
                (webdis, webdis_auth.as_deref(), webdis_authority.as_deref()),
                env,
            )
            .map_err(|e| e.under("logs"))?;
        if logs.store.is_some() && verifier.is_none() {
            return Err(ConfigError::new(
                "logs.store",
                "the query endpoint needs a jwt section",
            ));
        }
        Ok(Config {
            prefix: g.prefix.clone(),
            gateway_name: g.name.clone(),
            passthrough_paths: raw.passthrough_paths.clone(),
            verifier,
            routes,
            revocation,
            rate_limits,
            logs,
            trace: raw.trace,
            webdis_auth,
            webdis_authority,
            routing_headers: raw
                .routing_headers
                .as_ref()
                .map(|l| l.iter().map(|h| h.to_ascii_lowercase()).collect()),
            publish: raw.gateway.metadata,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "gateway": {"prefix": "/api/v1"},
            "jwt": {"secret": "s3cret-s3cret-s3cret-s3cret-s3cret"},
            "routes": [
                {"name": "users", "prefix": "/users", "methods": ["GET", "post"], "auth_required": true},
                {"name": "admin", "prefix": "/admin", "methods": ["GET"], "roles": ["admin"]},
                {"name": "admin-reports", "prefix": "/admin/reports", "methods": ["GET"], "auth_required": false},
                {"name": "products", "prefix": "/products", "auth_required": false,
                 "rate_limit": {"max_calls": 50, "period": 2}}
            ]
        })
    }

    fn parse(v: serde_json::Value) -> Result<Config, ConfigError> {
        Config::from_json(v.to_string().as_bytes())
    }

    #[test]
    fn happy_path_normalises_and_orders_routes() {
        let cfg = parse(base()).unwrap();
        assert_eq!(cfg.gateway_name, DEFAULT_GATEWAY_NAME);
        assert_eq!(cfg.routes[0].full_prefix, "/api/v1/admin/reports");
        let users = cfg.routes.iter().find(|r| r.name == "users").unwrap();
        assert_eq!(users.methods, vec!["GET", "POST"]);
        assert_eq!(users.allow, "GET, POST");
        let products = cfg.routes.iter().find(|r| r.name == "products").unwrap();
        assert_eq!(products.methods, vec!["GET"], "reference default is GET");
        let limits = products.limits.as_ref().unwrap();
        assert_eq!(limits.route.period_ms, 2000);
        assert_eq!(limits.user.limit.max_calls, 5, "a tenth of the route's limit");
        assert_eq!(
            limits.ip.limit.max_calls, 1000,
            "the gateway default per-IP limit"
        );
        let admin = cfg.routes.iter().find(|r| r.name == "admin").unwrap();
        assert!(admin.auth_required, "reference default is auth_required: true");
        assert_eq!(cfg.verifier.as_ref().unwrap().clock_skew(0), 60);
        assert!(cfg.logs.enabled);
    }

    #[test]
    fn minimal_config_is_valid() {
        let cfg = parse(serde_json::json!({})).unwrap();
        assert!(cfg.routes.is_empty());
        assert!(cfg.verifier.is_none());
    }

    #[test]
    fn route_matching_is_segment_aware_and_most_specific() {
        let cfg = parse(base()).unwrap();
        let name = |p: &str| cfg.route_for(p).map(|r| r.name.as_str());
        assert_eq!(name("/api/v1/users"), Some("users"));
        assert_eq!(name("/api/v1/users/123"), Some("users"));
        assert_eq!(name("/api/v1/usersx"), None);
        assert_eq!(name("/api/v1/admin/reports/1"), Some("admin-reports"));
        assert_eq!(name("/api/v1/admin/users"), Some("admin"));
        assert_eq!(name("/api/v2/users"), None);
        assert!(cfg.under_prefix("/api/v1"));
        assert!(cfg.under_prefix("/api/v1/x"));
        assert!(!cfg.under_prefix("/api/v10"));
        assert!(!cfg.under_prefix("/health"));
    }

    #[test]
    fn rejections_name_the_field_as_written_in_the_gateway_file() {
        type Mutate = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutate, &str)> = vec![
            (
                "bad prefix",
                Box::new(|v| v["gateway"]["prefix"] = "api".into()),
                "gateway.prefix: must start with '/'",
            ),
            (
                "trailing slash",
                Box::new(|v| v["gateway"]["prefix"] = "/api/".into()),
                "gateway.prefix: must not end with '/'",
            ),
            (
                "unknown field",
                Box::new(|v| v["prefx"] = "/x".into()),
                "unknown field `prefx`",
            ),
            (
                "bad method",
                Box::new(|v| v["routes"][0]["methods"][1] = "GTE".into()),
                "routes[0].methods[1]: unknown method \"GTE\"",
            ),
            (
                "no methods",
                Box::new(|v| v["routes"][0]["methods"] = serde_json::json!([])),
                "routes[0].methods: must list",
            ),
            (
                "dup name",
                Box::new(|v| v["routes"][1]["name"] = "users".into()),
                "routes[1].name: duplicate route name",
            ),
            (
                "dup prefix",
                Box::new(|v| v["routes"][1]["prefix"] = "/users".into()),
                "routes[1].prefix: \"/users\" is used",
            ),
            (
                "bad name",
                Box::new(|v| v["routes"][0]["name"] = "a b".into()),
                "routes[0].name: \"a b\" may only contain",
            ),
            (
                "roles without auth",
                Box::new(|v| v["routes"][1]["auth_required"] = false.into()),
                "routes[1].roles: roles need auth_required",
            ),
            (
                "unsafe role",
                Box::new(|v| v["routes"][1]["roles"][0] = "a\nb".into()),
                "routes[1].roles[0]: must be",
            ),
            (
                "empty secret",
                Box::new(|v| v["jwt"]["secret"] = "".into()),
                "jwt.secret: must not be empty",
            ),
            (
                "unset env",
                Box::new(|v| v["jwt"] = serde_json::json!({"secret_env": "GW_TEST_UNSET_SECRET_VAR"})),
                "jwt.secret_env: environment variable GW_TEST_UNSET_SECRET_VAR is not set",
            ),
            (
                "both secrets",
                Box::new(|v| v["jwt"]["secret_env"] = "X".into()),
                "jwt: set either secret or secret_env, not both",
            ),
            (
                "alg none",
                Box::new(|v| v["jwt"]["algorithms"] = serde_json::json!(["none"])),
                "jwt.algorithms[0]: unsupported algorithm \"none\"",
            ),
            (
                "RS256 with a secret",
                Box::new(|v| v["jwt"]["algorithms"] = serde_json::json!(["HS256", "RS256"])),
                "jwt.algorithms: a secret signs only HS256",
            ),
            (
                "unknown algorithm",
                Box::new(|v| v["jwt"]["algorithms"] = serde_json::json!(["HS256", "none"])),
                "jwt.algorithms[1]: unsupported algorithm \"none\"",
            ),
            (
                "huge skew",
                Box::new(|v| v["jwt"]["clock_skew"] = 100_000.into()),
                "jwt.clock_skew: must be at most",
            ),
            (
                "no jwt",
                Box::new(|v| {
                    v.as_object_mut().unwrap().remove("jwt");
                }),
                "routes[0].auth_required: a route requires auth",
            ),
            (
                "header-unsafe gateway name",
                Box::new(|v| v["gateway"]["name"] = "a\r\nb".into()),
                "gateway.name: must be",
            ),
            (
                "wrong type",
                Box::new(|v| v["routes"][0]["auth_required"] = "yes".into()),
                "invalid type: string \"yes\", expected a boolean",
            ),
            (
                "zero calls",
                Box::new(|v| v["routes"][3]["rate_limit"]["max_calls"] = 0.into()),
                "routes[3].rate_limit.max_calls: must be 1 to",
            ),
            (
                "zero period",
                Box::new(|v| {
                    v["routes"][3]["rate_limit"]["per_user"] =
                        serde_json::json!({"max_calls": 1, "period": 0})
                }),
                "routes[3].rate_limit.per_user.period: must be 1 to 86400",
            ),
            (
                "global per-ip",
                Box::new(|v| v["gateway"]["rate_limit"] = serde_json::json!({"per_ip": {"max_calls": 0}})),
                "gateway.rate_limit.per_ip.max_calls: must be 1 to",
            ),
            (
                "slots",
                Box::new(|v| v["gateway"]["rate_limit"] = serde_json::json!({"ip_slots": 0})),
                "gateway.rate_limit.ip_slots: must be 1 to 1000000",
            ),
            (
                "sds variable",
                Box::new(|v| v["secret_sds"] = serde_json::json!({"jwt_secret": {"name": "s"}})),
                "secret_sds.jwt_secret: must be a variable name",
            ),
            (
                "sds both sources",
                Box::new(
                    |v| v["secret_sds"] = serde_json::json!({"JWT_SECRET": {"name": "s", "path": "/a/b.json", "config_source": {"ads": {}}}}),
                ),
                "secret_sds.JWT_SECRET: give path or config_source, not both",
            ),
            (
                "sds relative path",
                Box::new(|v| {
                    v["secret_sds"] = serde_json::json!({"JWT_SECRET": {"name": "s", "path": "b.json"}})
                }),
                "secret_sds.JWT_SECRET.path: must be an absolute file path",
            ),
            (
                "sds empty name",
                Box::new(|v| v["secret_sds"] = serde_json::json!({"JWT_SECRET": {"name": ""}})),
                "secret_sds.JWT_SECRET.name: must be a secret name",
            ),
            (
                "hops",
                Box::new(|v| v["gateway"]["rate_limit"] = serde_json::json!({"trusted_hops": 17})),
                "gateway.rate_limit.trusted_hops: must be 0 to 16",
            ),
            (
                "cluster-wide without webdis",
                Box::new(|v| v["routes"][3]["rate_limit"]["cluster_wide"] = true.into()),
                "gateway.rate_limit: cluster-wide rate limits need webdis",
            ),
            (
                "canary percent",
                Box::new(|v| v["routes"][0]["canary"] = serde_json::json!({"percent": 101})),
                "routes[0].canary.percent: must be 0 to 100",
            ),
            (
                "canary header",
                Box::new(|v| v["routes"][0]["canary"] = serde_json::json!({"header": "x-gateway-canary"})),
                "routes[0].canary.header: must not be the internal",
            ),
            (
                "canary sticky",
                Box::new(|v| v["routes"][0]["canary"] = serde_json::json!({"sticky": "cookie:"})),
                "cookie name",
            ),
            (
                "revocation without webdis",
                Box::new(|v| v["revocation"] = serde_json::json!({})),
                "revocation: needs webdis",
            ),
            (
                "revocation timeout",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["revocation"] = serde_json::json!({"timeout": 0});
                }),
                "revocation.timeout: must be 0.001 to 60 seconds",
            ),
            (
                "revocation path",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["revocation"] = serde_json::json!({"revoke_user_path": "/admin/users"});
                }),
                "revocation.revoke_user_path: must contain a /{id} segment",
            ),
            (
                "refresh ttl",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["revocation"] = serde_json::json!({"refresh": {"token_ttl": 0}});
                }),
                "revocation.refresh.token_ttl: must be positive",
            ),
            (
                "same paths",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["revocation"] = serde_json::json!({"refresh": {"path": "/auth/logout"}});
                }),
                "revocation.refresh.path: must differ",
            ),
            (
                "log store without webdis",
                Box::new(|v| v["logs"] = serde_json::json!({"store": {}})),
                "logs.store: the log store needs webdis",
            ),
            (
                "log flush",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["logs"] = serde_json::json!({"store": {"flush_interval": 0.01}});
                }),
                "logs.store.flush_interval: must be 0.05 to 60 seconds",
            ),
            (
                "log roles",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["logs"] = serde_json::json!({"store": {"query_roles": []}});
                }),
                "logs.store.query_roles: must name",
            ),
            (
                "webdis name",
                Box::new(|v| v["webdis_cluster"] = "a b".into()),
                "webdis_cluster: \"a b\" must be an Envoy cluster name or host:port",
            ),
            (
                "webdis authority",
                Box::new(|v| {
                    v["webdis_cluster"] = "webdis".into();
                    v["webdis_authority"] = "a/b".into();
                }),
                "webdis_authority: \"a/b\" is not a host[:port]",
            ),
        ];
        for (what, mutate, expected) in cases {
            let mut v = base();
            mutate(&mut v);
            let err = parse(v).err().unwrap_or_else(|| panic!("{what}: accepted"));
            assert!(err.to_string().contains(expected), "{what}: got {err}");
        }
    }

    #[test]
    fn durations_are_converted_once_by_their_duty() {
        let mut v = base();
        v["webdis_cluster"] = "webdis".into();
        v["revocation"] = serde_json::json!({"timeout": 0.25, "cache_ttl": 0});
        v["logs"] = serde_json::json!({"store": {"flush_interval": 0.5}});
        v["routes"][3]["rate_limit"]["cluster_wide"] = true.into();
        v["gateway"]["rate_limit"] = serde_json::json!({"sync_interval": 0.1});
        let cfg = parse(v).unwrap();
        let rv = cfg.revocation.as_ref().unwrap();
        assert_eq!(
            (rv.timeout_ms, rv.cache_ttl_ms, rv.cluster.as_str()),
            (250, 0, "webdis")
        );
        let store = cfg.logs.store.as_ref().unwrap();
        assert_eq!((store.flush_interval_ms, store.timeout_ms), (500, 500));
        assert_eq!(store.query_path, "/api/v1/admin/logs");
        let sync = cfg.rate_limits.sync.as_ref().unwrap();
        assert_eq!((sync.interval_ms, sync.timeout_ms), (100, 200));
    }

    #[test]
    fn serialized_defaults_round_trip() {
        let raw: FilterConfig = serde_json::from_value(base()).unwrap();
        let again: FilterConfig = serde_json::from_str(&serde_json::to_string(&raw).unwrap()).unwrap();
        assert_eq!(raw, again);
    }

    #[test]
    fn disabled_route_limits_compile_to_none() {
        let mut v = base();
        v["routes"][3]["rate_limit"]["enabled"] = false.into();
        let cfg = parse(v).unwrap();
        assert!(cfg.route_for("/api/v1/products").unwrap().limits.is_none());
    }

    #[test]
    fn callout_targets_take_the_forms_hosts_name_them() {
        let with = |cluster: &str, authority: Option<&str>| {
            let mut v = base();
            v["webdis_cluster"] = cluster.into();
            v["revocation"] = serde_json::json!({});
            if let Some(a) = authority {
                v["webdis_authority"] = a.into();
            }
            Config::from_json(v.to_string().as_bytes()).unwrap()
        };
        // Istio names its clusters direction|port|subset|fqdn and routes callouts by host.
        let istio = with("outbound|7379||webdis.gateway.svc.cluster.local", None);
        assert_eq!(
            istio.revocation.as_ref().unwrap().cluster,
            "outbound|7379||webdis.gateway.svc.cluster.local"
        );
        assert_eq!(
            istio.webdis_authority.as_deref(),
            Some("webdis.gateway.svc.cluster.local:7379")
        );
        // Kong and APISIX dispatch to host:port.
        let kong = with("10.0.0.5:7379", None);
        assert_eq!(kong.webdis_authority.as_deref(), Some("10.0.0.5:7379"));
        // A plain Envoy cluster: its name, as before; or what the operator says.
        assert_eq!(with("webdis", None).webdis_authority.as_deref(), Some("webdis"));
        assert_eq!(
            with("webdis", Some("redis-http.internal:80"))
                .webdis_authority
                .as_deref(),
            Some("redis-http.internal:80")
        );
    }

    /// Higress's envelope: `_rules_` empty is taken as no rules; a rule is refused, naming it.
    #[test]
    fn higress_rules_are_accepted_empty_and_refused_otherwise() {
        let mut v = base();
        v["_rules_"] = serde_json::json!([]);
        assert!(parse(v.clone()).is_ok());
        v["_rules_"] = serde_json::json!([{"_match_route_": ["route-a"], "gateway": {"prefix": "/x"}}]);
        let e = parse(v.clone()).unwrap_err();
        assert_eq!(e.field, "_rules_[0]");
        assert!(
            e.message.contains("_match_route_") && e.message.contains("routes"),
            "{}",
            e.message
        );
        v["_rules_"] = serde_json::json!([{"_match_domain_": ["*.example.com"]}]);
        assert!(parse(v).unwrap_err().message.contains("_match_domain_"));
    }
}
