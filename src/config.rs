//! The filter's JSON configuration: the serde shape ([`FilterConfig`], what Envoy hands to
//! `on_configure`) and its validated, precompiled form ([`Config`], what the request path uses).
//!
//! The renderer produces a [`FilterConfig`] from the gateway file and serializes it; the filter
//! deserializes the same type, so the two cannot drift. Everything that can be checked or
//! precomputed (route order, `Allow` header values, JWT keys) happens here, once.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::canary::CanarySettings;
use crate::jwt::{Algorithm, Verifier};
use crate::ratelimit::{self, Limit};
use crate::revocation::FailureMode;

/// Methods a route may list.
pub const KNOWN_METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// Default value of the `X-Gateway` header sent upstream.
pub const DEFAULT_GATEWAY_NAME: &str = "envoy-wasm-gateway";

/// Default clock skew accepted on `exp`, `nbf` and `iat`, in seconds.
pub const DEFAULT_CLOCK_SKEW_SECONDS: u64 = 60;

/// Largest accepted clock skew (one day): anything larger is a configuration mistake.
pub const MAX_CLOCK_SKEW_SECONDS: u64 = 86_400;

/// The filter's configuration as JSON (the `configuration` value of the Envoy wasm filter).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilterConfig {
    /// Path prefix every gateway route lives under, e.g. `/api/v1` (may be empty).
    #[serde(default)]
    pub prefix: String,
    /// Value of the `X-Gateway` header sent upstream.
    #[serde(default = "default_gateway_name")]
    pub gateway_name: String,
    /// Exact paths outside the gateway prefix that Envoy answers itself (e.g. `/health`);
    /// every other unmatched path gets the filter's 404.
    #[serde(default)]
    pub passthrough_paths: Vec<String>,
    /// JWT verification settings; required when any route has `auth_required`.
    #[serde(default)]
    pub jwt: Option<JwtSettings>,
    /// The gateway routes.
    #[serde(default)]
    pub routes: Vec<RouteSettings>,
    /// Gateway-wide rate-limit settings (per-IP limit, trusted hops, memory bounds).
    #[serde(default)]
    pub rate_limits: RateLimitSettings,
    /// Request logs (one JSON line per request) and the optional log store.
    #[serde(default)]
    pub logs: LogSettings,
    /// Token revocation through webdis; off when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation: Option<RevocationSettings>,
}

/// Request logging.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Emit one JSON line per request through Envoy's log.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Keep records in Redis (through webdis) for the admin query endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<LogStoreSettings>,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            store: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogStoreSettings {
    #[serde(default = "default_webdis_cluster")]
    pub cluster: String,
    #[serde(default = "default_ban_ttl")]
    pub retention_seconds: u64,
    /// Most recent records kept per user.
    #[serde(default = "default_user_records")]
    pub user_records: u32,
    #[serde(default = "default_logs_path")]
    pub query_path: String,
    #[serde(default = "default_revoke_roles")]
    pub query_roles: Vec<String>,
    /// Records waiting to be written, per VM; beyond it new records are dropped (counted).
    #[serde(default = "default_log_buffer")]
    pub buffer: u32,
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_log_timeout_ms")]
    pub timeout_ms: u64,
}

pub fn default_user_records() -> u32 {
    100
}
pub fn default_logs_path() -> String {
    "/admin/logs".to_string()
}
pub fn default_log_buffer() -> u32 {
    1000
}
pub fn default_flush_interval_ms() -> u64 {
    1000
}
pub fn default_log_timeout_ms() -> u64 {
    500
}

/// Revocation settings (JSON). Paths are relative to `prefix`; an empty path disables that endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationSettings {
    /// Envoy cluster of the webdis sidecar.
    #[serde(default = "default_webdis_cluster")]
    pub cluster: String,
    #[serde(default = "default_revocation_timeout_ms")]
    pub timeout_ms: u64,
    /// How long an answer is reused from shared data; 0 asks webdis every time.
    #[serde(default = "default_cache_ttl_ms")]
    pub cache_ttl_ms: u64,
    /// Number of shared-data cache slots (the memory bound).
    #[serde(default = "default_cache_slots")]
    pub cache_slots: u32,
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// Lifetime of `user:revoked_before:<sub>`: at least the longest token lifetime.
    #[serde(default = "default_ban_ttl")]
    pub ban_ttl_seconds: u64,
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    #[serde(default = "default_revoke_user_path")]
    pub revoke_user_path: String,
    #[serde(default = "default_revoke_roles")]
    pub revoke_roles: Vec<String>,
    #[serde(default)]
    pub refresh: RefreshSettings,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSettings {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_refresh_path")]
    pub path: String,
    /// Only tokens expiring within this many seconds may be refreshed; none = any valid token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window_seconds: Option<u64>,
    /// Lifetime of the new token; none = the old token's lifetime (`exp - iat`, else 30 minutes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl_seconds: Option<u64>,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_refresh_path(),
            window_seconds: None,
            token_ttl_seconds: None,
        }
    }
}

pub fn default_webdis_cluster() -> String {
    "webdis".to_string()
}
pub fn default_revocation_timeout_ms() -> u64 {
    200
}
fn default_cache_ttl_ms() -> u64 {
    1000
}
pub(crate) fn default_cache_slots() -> u32 {
    4096
}
pub fn default_ban_ttl() -> u64 {
    86_400
}
pub(crate) fn default_logout_path() -> String {
    "/auth/logout".to_string()
}
pub(crate) fn default_revoke_user_path() -> String {
    "/admin/users/{id}/revoke".to_string()
}
pub fn default_revoke_roles() -> Vec<String> {
    vec!["admin".to_string()]
}
pub(crate) fn default_refresh_path() -> String {
    "/auth/refresh".to_string()
}

/// Token lifetime used by refresh when neither the settings nor the old token say (the
/// reference's 30 minutes).
pub const DEFAULT_TOKEN_TTL_SECONDS: u64 = 1800;

/// Validated revocation settings with full paths.
#[derive(Debug, Clone)]
pub struct Revocation {
    pub cluster: String,
    pub timeout_ms: u64,
    pub cache_ttl_ms: u64,
    pub cache_slots: u32,
    pub failure_mode: FailureMode,
    pub ban_ttl_seconds: u64,
    pub logout_path: Option<String>,
    pub refresh: Option<Refresh>,
    /// The revoke-user path split around `{id}`.
    pub revoke_user: Option<(String, String)>,
    pub revoke_roles: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Refresh {
    pub path: String,
    pub window_seconds: Option<u64>,
    pub token_ttl_seconds: Option<u64>,
}

/// A gateway-answered endpoint a path may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointPath {
    Logs,
    Logout,
    Refresh,
    RevokeUser(String),
}

impl Revocation {
    pub fn endpoint(&self, path: &str) -> Option<EndpointPath> {
        if self.logout_path.as_deref() == Some(path) {
            return Some(EndpointPath::Logout);
        }
        if self.refresh.as_ref().is_some_and(|r| r.path == path) {
            return Some(EndpointPath::Refresh);
        }
        let (head, tail) = self.revoke_user.as_ref()?;
        let id = path.strip_prefix(head.as_str())?.strip_suffix(tail.as_str())?;
        (!id.contains('/')).then(|| EndpointPath::RevokeUser(id.to_string()))
    }
}

/// JWT settings with the secret already resolved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSettings {
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    pub secret: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default = "default_clock_skew")]
    pub clock_skew_seconds: u64,
}

/// One route as the filter sees it (Envoy owns the upstream side).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSettings {
    pub name: String,
    pub prefix: String,
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    #[serde(default = "default_true")]
    pub auth_required: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub roles: Vec<String>,
    /// Token-bucket limits of this route; none = unlimited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RouteRateLimit>,
    /// Canary rules; Envoy has a second route for this prefix matched on the internal header.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary: Option<CanarySettings>,
}

/// `max_calls` per `period_seconds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_calls: u64,
    #[serde(default = "default_period")]
    pub period_seconds: u64,
}

fn default_period() -> u64 {
    1
}

/// A route's limits: the route bucket, and optional per-user / per-IP overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    pub max_calls: u64,
    #[serde(default = "default_period")]
    pub period_seconds: u64,
    /// Default: the gateway's `per_user`, else a tenth of the route limit (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<LimitSettings>,
    /// Default: the gateway's `per_ip`, one bucket per address shared by all routes.
    /// Set here, it is a bucket per (route, address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_ip: Option<LimitSettings>,
    /// Share the route bucket with other gateway instances through Redis (needs `rate_limits.sync`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cluster_wide: bool,
}

/// How cluster-wide route buckets are synchronised through webdis.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyncSettings {
    #[serde(default = "default_webdis_cluster")]
    pub cluster: String,
    #[serde(default = "default_sync_interval_ms")]
    pub interval_ms: u64,
    #[serde(default = "default_revocation_timeout_ms")]
    pub timeout_ms: u64,
}

pub fn default_sync_interval_ms() -> u64 {
    500
}

/// Gateway-wide rate-limit settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    #[serde(default = "default_per_ip")]
    pub per_ip: LimitSettings,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<LimitSettings>,
    /// Proxies in front of Envoy whose `X-Forwarded-For` entries are trusted; 0 = use the peer.
    #[serde(default)]
    pub trusted_hops: u32,
    /// Slots (the memory bound) for per-user and for per-IP buckets.
    #[serde(default = "default_rl_slots")]
    pub user_slots: u32,
    #[serde(default = "default_rl_slots")]
    pub ip_slots: u32,
    /// Synchronisation of `cluster_wide` routes; required when any route is cluster-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sync: Option<SyncSettings>,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_ip: default_per_ip(),
            per_user: None,
            trusted_hops: 0,
            user_slots: default_rl_slots(),
            ip_slots: default_rl_slots(),
            sync: None,
        }
    }
}

pub fn default_per_ip() -> LimitSettings {
    LimitSettings {
        max_calls: 1000,
        period_seconds: 1,
    }
}
pub fn default_rl_slots() -> u32 {
    8192
}

/// A validated bucket identity and limit. `key` is empty for per-client buckets (the slot key is
/// computed per request).
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub limit: Limit,
    /// Stable part of the bucket identity (the route name, or empty for the shared per-IP bucket).
    pub scope: String,
}

/// A route's validated limits.
#[derive(Debug, Clone)]
pub struct RouteLimits {
    /// The route name (the Redis counter of a cluster-wide route is named after it).
    pub name: String,
    pub cluster_wide: bool,
    /// Shared-data counter of consumption not yet synced (cluster-wide routes).
    pub pending_key: String,
    pub route_key: String,
    pub route_fingerprint: u64,
    pub route: Limit,
    pub user: BucketSpec,
    pub ip: BucketSpec,
}

fn default_gateway_name() -> String {
    DEFAULT_GATEWAY_NAME.to_string()
}
pub(crate) fn default_algorithms() -> Vec<String> {
    vec!["HS256".to_string()]
}
pub(crate) fn default_clock_skew() -> u64 {
    DEFAULT_CLOCK_SKEW_SECONDS
}
/// The reference router's default when a route lists no methods.
pub(crate) fn default_methods() -> Vec<String> {
    vec!["GET".to_string()]
}
/// The reference treats a route without `auth_required` as protected.
pub(crate) fn default_true() -> bool {
    true
}

/// A configuration error naming the offending field, e.g. `routes[2].methods[0]: unknown method "GTE"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

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
    pub roles: Vec<String>,
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
    pub rate_limits: RateLimitSettings,
    pub logs: LogSettings,
    /// Full path of the log query endpoint, when the store is on.
    pub logs_query_path: Option<String>,
}

impl Config {
    /// Parses and validates the JSON configuration handed to `on_configure`.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ConfigError> {
        let raw: FilterConfig = serde_json::from_slice(bytes)
            .map_err(|e| ConfigError::new("", format!("invalid filter configuration JSON: {e}")))?;
        Config::try_from(raw)
    }

    /// The route a path belongs to, if any.
    pub fn route_for(&self, path: &str) -> Option<&Route> {
        self.routes.iter().find(|r| r.matches(path))
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

/// A path prefix: starts with `/`, no trailing `/` (except the root), no query or fragment.
pub(crate) fn check_path_prefix(field: &str, value: &str, allow_empty: bool) -> Result<(), ConfigError> {
    if value.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(ConfigError::new(field, "must not be empty"))
        };
    }
    if !value.starts_with('/') {
        return Err(ConfigError::new(field, format!("must start with '/': {value:?}")));
    }
    if value.len() > 1 && value.ends_with('/') {
        return Err(ConfigError::new(
            field,
            format!("must not end with '/': {value:?}"),
        ));
    }
    if value.contains(['?', '#', ' ']) || value.contains("//") || value.chars().any(char::is_control) {
        return Err(ConfigError::new(field, format!("is not a plain path: {value:?}")));
    }
    Ok(())
}

/// A route or cluster name: letters, digits, `-`, `_`, `.`.
pub(crate) fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 64 {
        return Err(ConfigError::new(field, "must be 1 to 64 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ConfigError::new(
            field,
            format!("{value:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// Whether a string may be sent as an HTTP header value: no control characters (CR, LF, NUL,
/// DEL, C1 controls), no leading or trailing whitespace, bounded length.
pub fn is_safe_header_value(value: &str) -> bool {
    value.len() <= 1024 && !value.chars().any(char::is_control) && value.trim() == value
}

impl TryFrom<FilterConfig> for Config {
    type Error = ConfigError;

    fn try_from(raw: FilterConfig) -> Result<Self, ConfigError> {
        check_path_prefix("prefix", &raw.prefix, true)?;
        if raw.gateway_name.is_empty() || !is_safe_header_value(&raw.gateway_name) {
            return Err(ConfigError::new(
                "gateway_name",
                "must be a non-empty header-safe string",
            ));
        }
        for (i, p) in raw.passthrough_paths.iter().enumerate() {
            check_path_prefix(&format!("passthrough_paths[{i}]"), p, false)?;
        }

        let mut routes: Vec<Route> = Vec::with_capacity(raw.routes.len());
        for (i, r) in raw.routes.iter().enumerate() {
            let at = |f: &str| format!("routes[{i}].{f}");
            check_name(&at("name"), &r.name)?;
            if routes.iter().any(|o| o.name == r.name) {
                return Err(ConfigError::new(
                    at("name"),
                    format!("duplicate route name {:?}", r.name),
                ));
            }
            check_path_prefix(&at("prefix"), &r.prefix, false)?;
            let full_prefix = if r.prefix == "/" && !raw.prefix.is_empty() {
                raw.prefix.clone()
            } else {
                format!("{}{}", raw.prefix, r.prefix)
            };
            if routes.iter().any(|o| o.full_prefix == full_prefix) {
                return Err(ConfigError::new(
                    at("prefix"),
                    format!("{:?} is used by another route", r.prefix),
                ));
            }
            if r.methods.is_empty() {
                return Err(ConfigError::new(at("methods"), "must list at least one method"));
            }
            let mut methods: Vec<String> = Vec::with_capacity(r.methods.len());
            for (j, m) in r.methods.iter().enumerate() {
                let upper = m.to_ascii_uppercase();
                if !KNOWN_METHODS.contains(&upper.as_str()) {
                    return Err(ConfigError::new(
                        format!("routes[{i}].methods[{j}]"),
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
            for (j, role) in r.roles.iter().enumerate() {
                if role.is_empty() || !is_safe_header_value(role) {
                    return Err(ConfigError::new(
                        format!("routes[{i}].roles[{j}]"),
                        "must be a non-empty header-safe string",
                    ));
                }
            }
            if !r.roles.is_empty() && !r.auth_required {
                return Err(ConfigError::new(at("roles"), "roles need auth_required: true"));
            }
            let limits = match &r.rate_limit {
                None => None,
                Some(rl) => Some(route_limits(
                    &format!("routes[{i}].rate_limit"),
                    &r.name,
                    rl,
                    &raw.rate_limits,
                )?),
            };
            let canary = match &r.canary {
                None => None,
                Some(c) => {
                    if c.percent > 100 {
                        return Err(ConfigError::new(at("canary.percent"), "must be 0 to 100"));
                    }
                    let header = match &c.header {
                        Some(h)
                            if h.is_empty()
                                || !h
                                    .bytes()
                                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_') =>
                        {
                            return Err(ConfigError::new(
                                at("canary.header"),
                                format!("{h:?} is not a header name"),
                            ));
                        }
                        Some(h) if h.eq_ignore_ascii_case(crate::canary::ROUTE_HEADER) => {
                            return Err(ConfigError::new(
                                at("canary.header"),
                                "must not be the internal routing header",
                            ));
                        }
                        h => h.as_ref().map(|h| h.to_ascii_lowercase()),
                    };
                    Some(CanarySettings { header, ..c.clone() })
                }
            };
            routes.push(Route {
                canary,
                name: r.name.clone(),
                full_prefix,
                allow: methods.join(", "),
                methods,
                auth_required: r.auth_required,
                roles: r.roles.clone(),
                limits,
            });
        }
        // Longest prefix first; stable, so equal lengths keep file order.
        routes.sort_by_key(|r| std::cmp::Reverse(r.full_prefix.len()));

        let verifier = match &raw.jwt {
            Some(jwt) => Some(build_verifier(jwt)?),
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
                Some(build_revocation(&raw.prefix, rv)?)
            }
        };

        let rl = &raw.rate_limits;
        check_limit("rate_limits.per_ip", &rl.per_ip)?;
        if let Some(u) = &rl.per_user {
            check_limit("rate_limits.per_user", u)?;
        }
        if !(1..=1_000_000).contains(&rl.user_slots) {
            return Err(ConfigError::new("rate_limits.user_slots", "must be 1 to 1000000"));
        }
        if !(1..=1_000_000).contains(&rl.ip_slots) {
            return Err(ConfigError::new("rate_limits.ip_slots", "must be 1 to 1000000"));
        }
        if let Some(sync) = &rl.sync {
            check_name("rate_limits.sync.cluster", &sync.cluster)?;
            if !(50..=60_000).contains(&sync.interval_ms) {
                return Err(ConfigError::new(
                    "rate_limits.sync.interval_ms",
                    "must be 50 to 60000",
                ));
            }
            if !(1..=60_000).contains(&sync.timeout_ms) {
                return Err(ConfigError::new(
                    "rate_limits.sync.timeout_ms",
                    "must be 1 to 60000",
                ));
            }
        }
        if rl.trusted_hops > 16 {
            return Err(ConfigError::new("rate_limits.trusted_hops", "must be at most 16"));
        }

        let logs_query_path = match &raw.logs.store {
            None => None,
            Some(st) => {
                check_name("logs.store.cluster", &st.cluster)?;
                check_path_prefix("logs.store.query_path", &st.query_path, false)?;
                if st.query_roles.is_empty() {
                    return Err(ConfigError::new(
                        "logs.store.query_roles",
                        "must name at least one role",
                    ));
                }
                if st.retention_seconds == 0 {
                    return Err(ConfigError::new(
                        "logs.store.retention_seconds",
                        "must be positive",
                    ));
                }
                if !(1..=10_000).contains(&st.user_records) {
                    return Err(ConfigError::new("logs.store.user_records", "must be 1 to 10000"));
                }
                if !(1..=100_000).contains(&st.buffer) {
                    return Err(ConfigError::new("logs.store.buffer", "must be 1 to 100000"));
                }
                if !(50..=60_000).contains(&st.flush_interval_ms) {
                    return Err(ConfigError::new(
                        "logs.store.flush_interval_ms",
                        "must be 50 to 60000",
                    ));
                }
                if !(1..=60_000).contains(&st.timeout_ms) {
                    return Err(ConfigError::new("logs.store.timeout_ms", "must be 1 to 60000"));
                }
                if raw.jwt.is_none() {
                    return Err(ConfigError::new(
                        "logs.store",
                        "the query endpoint needs a jwt section",
                    ));
                }
                Some(format!("{}{}", raw.prefix, st.query_path))
            }
        };

        Ok(Config {
            logs_query_path,
            logs: raw.logs.clone(),
            rate_limits: raw.rate_limits.clone(),
            revocation,
            prefix: raw.prefix,
            gateway_name: raw.gateway_name,
            passthrough_paths: raw.passthrough_paths,
            verifier,
            routes,
        })
    }
}

fn check_limit(field: &str, l: &LimitSettings) -> Result<(), ConfigError> {
    if l.max_calls == 0 || l.max_calls > 1_000_000_000 {
        return Err(ConfigError::new(
            format!("{field}.max_calls"),
            "must be 1 to 1000000000",
        ));
    }
    if l.period_seconds == 0 || l.period_seconds > 86_400 {
        return Err(ConfigError::new(
            format!("{field}.period_seconds"),
            "must be 1 to 86400",
        ));
    }
    Ok(())
}

fn limit_of(l: &LimitSettings) -> Limit {
    Limit {
        max_calls: l.max_calls,
        period_ms: l.period_seconds * 1000,
    }
}

fn route_limits(
    field: &str,
    name: &str,
    rl: &RouteRateLimit,
    global: &RateLimitSettings,
) -> Result<RouteLimits, ConfigError> {
    let own = LimitSettings {
        max_calls: rl.max_calls,
        period_seconds: rl.period_seconds,
    };
    check_limit(field, &own)?;
    if let Some(u) = &rl.per_user {
        check_limit(&format!("{field}.per_user"), u)?;
    }
    if let Some(ip) = &rl.per_ip {
        check_limit(&format!("{field}.per_ip"), ip)?;
    }
    // The reference: a user gets a tenth of the route's limit (at least 1).
    let user = rl.per_user.or(global.per_user).unwrap_or(LimitSettings {
        max_calls: (rl.max_calls / 10).max(1),
        period_seconds: rl.period_seconds,
    });
    let ip = match &rl.per_ip {
        Some(own) => BucketSpec {
            limit: limit_of(own),
            scope: name.to_string(),
        },
        None => BucketSpec {
            limit: limit_of(&global.per_ip),
            scope: String::new(),
        },
    };
    if rl.cluster_wide && global.sync.is_none() {
        return Err(ConfigError::new(
            format!("{field}.cluster_wide"),
            "needs rate_limits.sync (the webdis cluster)",
        ));
    }
    Ok(RouteLimits {
        name: name.to_string(),
        cluster_wide: rl.cluster_wide,
        pending_key: ratelimit::cluster::pending_key(name),
        route_key: ratelimit::route_key(name),
        route_fingerprint: ratelimit::fingerprint(&["r", name]),
        route: limit_of(&own),
        user: BucketSpec {
            limit: limit_of(&user),
            scope: name.to_string(),
        },
        ip,
    })
}

fn build_revocation(prefix: &str, rv: &RevocationSettings) -> Result<Revocation, ConfigError> {
    check_name("revocation.cluster", &rv.cluster)?;
    if !(1..=60_000).contains(&rv.timeout_ms) {
        return Err(ConfigError::new("revocation.timeout_ms", "must be 1 to 60000"));
    }
    if rv.cache_ttl_ms > 3_600_000 {
        return Err(ConfigError::new(
            "revocation.cache_ttl_ms",
            "must be at most 3600000",
        ));
    }
    if !(1..=1_000_000).contains(&rv.cache_slots) {
        return Err(ConfigError::new("revocation.cache_slots", "must be 1 to 1000000"));
    }
    if rv.ban_ttl_seconds == 0 {
        return Err(ConfigError::new("revocation.ban_ttl_seconds", "must be positive"));
    }
    let full = |field: &str, p: &str| -> Result<Option<String>, ConfigError> {
        if p.is_empty() {
            return Ok(None);
        }
        check_path_prefix(field, p, false)?;
        Ok(Some(format!("{prefix}{p}")))
    };
    let logout_path = full("revocation.logout_path", &rv.logout_path)?;
    let refresh = if rv.refresh.enabled {
        let path = full("revocation.refresh.path", &rv.refresh.path)?
            .ok_or_else(|| ConfigError::new("revocation.refresh.path", "must not be empty when enabled"))?;
        if rv.refresh.token_ttl_seconds == Some(0) {
            return Err(ConfigError::new(
                "revocation.refresh.token_ttl_seconds",
                "must be positive",
            ));
        }
        Some(Refresh {
            path,
            window_seconds: rv.refresh.window_seconds,
            token_ttl_seconds: rv.refresh.token_ttl_seconds,
        })
    } else {
        None
    };
    let revoke_user = if rv.revoke_user_path.is_empty() {
        None
    } else {
        let field = "revocation.revoke_user_path";
        let (head, tail) = rv
            .revoke_user_path
            .split_once("/{id}")
            .ok_or_else(|| ConfigError::new(field, "must contain a /{id} segment"))?;
        if tail.contains("{id}") || !(tail.is_empty() || tail.starts_with('/')) {
            return Err(ConfigError::new(field, "must contain exactly one /{id} segment"));
        }
        check_path_prefix(field, &format!("{head}{tail}"), false)?;
        Some((format!("{prefix}{head}/"), tail.to_string()))
    };
    if revoke_user.is_some() && rv.revoke_roles.is_empty() {
        return Err(ConfigError::new(
            "revocation.revoke_roles",
            "must name at least one role",
        ));
    }
    let paths = [logout_path.as_deref(), refresh.as_ref().map(|r| r.path.as_str())];
    if paths[0].is_some() && paths[0] == paths[1] {
        return Err(ConfigError::new(
            "revocation.refresh.path",
            "must differ from logout_path",
        ));
    }
    Ok(Revocation {
        cluster: rv.cluster.clone(),
        timeout_ms: rv.timeout_ms,
        cache_ttl_ms: rv.cache_ttl_ms,
        cache_slots: rv.cache_slots,
        failure_mode: rv.failure_mode,
        ban_ttl_seconds: rv.ban_ttl_seconds,
        logout_path,
        refresh,
        revoke_user,
        revoke_roles: rv.revoke_roles.clone(),
    })
}

fn build_verifier(jwt: &JwtSettings) -> Result<Verifier, ConfigError> {
    if jwt.secret.is_empty() {
        return Err(ConfigError::new("jwt.secret", "must not be empty"));
    }
    if jwt.algorithms.is_empty() {
        return Err(ConfigError::new(
            "jwt.algorithms",
            "must list at least one algorithm",
        ));
    }
    let mut algorithms = Vec::with_capacity(jwt.algorithms.len());
    for (i, name) in jwt.algorithms.iter().enumerate() {
        let alg = Algorithm::from_name(name).ok_or_else(|| {
            ConfigError::new(
                format!("jwt.algorithms[{i}]"),
                format!("unsupported algorithm {name:?} (expected HS256, HS384 or HS512)"),
            )
        })?;
        if !algorithms.contains(&alg) {
            algorithms.push(alg);
        }
    }
    if jwt.clock_skew_seconds > MAX_CLOCK_SKEW_SECONDS {
        return Err(ConfigError::new(
            "jwt.clock_skew_seconds",
            format!("must be at most {MAX_CLOCK_SKEW_SECONDS}"),
        ));
    }
    if jwt.issuer.as_deref() == Some("") {
        return Err(ConfigError::new("jwt.issuer", "must not be empty when set"));
    }
    if jwt.audience.as_deref() == Some("") {
        return Err(ConfigError::new("jwt.audience", "must not be empty when set"));
    }
    Ok(Verifier::new(
        &algorithms,
        jwt.secret.as_bytes(),
        jwt.issuer.clone(),
        jwt.audience.clone(),
        jwt.clock_skew_seconds,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> serde_json::Value {
        serde_json::json!({
            "prefix": "/api/v1",
            "jwt": {"secret": "s3cret-s3cret-s3cret-s3cret-s3cret"},
            "routes": [
                {"name": "users", "prefix": "/users", "methods": ["GET", "post"], "auth_required": true},
                {"name": "admin", "prefix": "/admin", "methods": ["GET"], "roles": ["admin"]},
                {"name": "admin-reports", "prefix": "/admin/reports", "methods": ["GET"], "auth_required": false},
                {"name": "products", "prefix": "/products", "auth_required": false}
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
        let admin = cfg.routes.iter().find(|r| r.name == "admin").unwrap();
        assert!(admin.auth_required, "reference default is auth_required: true");
        assert_eq!(cfg.verifier.as_ref().unwrap().clock_skew(), 60);
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
    fn rejections_name_the_field() {
        type Mutate = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(&str, Mutate, &str)> = vec![
            (
                "bad prefix",
                Box::new(|v| v["prefix"] = "api".into()),
                "prefix: must start with '/'",
            ),
            (
                "trailing slash",
                Box::new(|v| v["prefix"] = "/api/".into()),
                "prefix: must not end with '/'",
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
                "empty secret",
                Box::new(|v| v["jwt"]["secret"] = "".into()),
                "jwt.secret: must not be empty",
            ),
            (
                "alg none",
                Box::new(|v| v["jwt"]["algorithms"] = serde_json::json!(["none"])),
                "jwt.algorithms[0]: unsupported algorithm \"none\"",
            ),
            (
                "RS256",
                Box::new(|v| v["jwt"]["algorithms"] = serde_json::json!(["HS256", "RS256"])),
                "jwt.algorithms[1]: unsupported algorithm \"RS256\"",
            ),
            (
                "huge skew",
                Box::new(|v| v["jwt"]["clock_skew_seconds"] = 100_000.into()),
                "jwt.clock_skew_seconds: must be at most",
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
                Box::new(|v| v["gateway_name"] = "a\r\nb".into()),
                "gateway_name: must be",
            ),
            (
                "wrong type",
                Box::new(|v| v["routes"][0]["auth_required"] = "yes".into()),
                "invalid type: string \"yes\", expected a boolean",
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
    fn revocation_endpoints() {
        let mut v = base();
        v["revocation"] = serde_json::json!({});
        let cfg = parse(v).unwrap();
        let rv = cfg.revocation.unwrap();
        assert_eq!(rv.timeout_ms, 200);
        assert_eq!(rv.cache_ttl_ms, 1000);
        assert_eq!(rv.endpoint("/api/v1/auth/logout"), Some(EndpointPath::Logout));
        assert_eq!(rv.endpoint("/api/v1/auth/refresh"), Some(EndpointPath::Refresh));
        assert_eq!(
            rv.endpoint("/api/v1/admin/users/user-001/revoke"),
            Some(EndpointPath::RevokeUser("user-001".into()))
        );
        assert_eq!(rv.endpoint("/api/v1/admin/users/a/b/revoke"), None);
        assert_eq!(rv.endpoint("/api/v1/admin/users/revoke"), None);
        assert_eq!(rv.endpoint("/api/v1/auth/login"), None);
    }

    #[test]
    fn revocation_rejections() {
        let cases = [
            (serde_json::json!({"timeout_ms": 0}), "revocation.timeout_ms"),
            (serde_json::json!({"cache_slots": 0}), "revocation.cache_slots"),
            (
                serde_json::json!({"failure_mode": "maybe"}),
                "unknown variant `maybe`",
            ),
            (
                serde_json::json!({"revoke_user_path": "/admin/users/revoke"}),
                "revocation.revoke_user_path: must contain",
            ),
            (
                serde_json::json!({"logout_path": "auth/logout"}),
                "revocation.logout_path: must start with",
            ),
            (
                serde_json::json!({"refresh": {"path": "/auth/logout"}}),
                "revocation.refresh.path: must differ",
            ),
            (serde_json::json!({"cluster": "web dis"}), "revocation.cluster"),
        ];
        for (rv, expected) in cases {
            let mut v = base();
            v["revocation"] = rv;
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected}: {err}");
        }
    }

    #[test]
    fn rate_limit_defaults_follow_the_reference() {
        let mut v = base();
        v["routes"][0]["rate_limit"] = serde_json::json!({"max_calls": 100, "period_seconds": 1});
        v["routes"][1]["rate_limit"] =
            serde_json::json!({"max_calls": 5, "per_ip": {"max_calls": 3, "period_seconds": 2}});
        let cfg = parse(v).unwrap();
        let users = cfg
            .routes
            .iter()
            .find(|r| r.name == "users")
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!(
            users.route,
            Limit {
                max_calls: 100,
                period_ms: 1000
            }
        );
        assert_eq!(users.user.limit.max_calls, 10, "a tenth of the route limit");
        assert_eq!(
            users.ip.limit,
            Limit {
                max_calls: 1000,
                period_ms: 1000
            }
        );
        assert_eq!(users.ip.scope, "", "shared by all routes");
        let admin = cfg
            .routes
            .iter()
            .find(|r| r.name == "admin")
            .unwrap()
            .limits
            .clone()
            .unwrap();
        assert_eq!(admin.user.limit.max_calls, 1, "at least 1");
        assert_eq!(
            admin.ip.limit,
            Limit {
                max_calls: 3,
                period_ms: 2000
            }
        );
        assert_eq!(admin.ip.scope, "admin");
        assert!(cfg
            .routes
            .iter()
            .find(|r| r.name == "products")
            .unwrap()
            .limits
            .is_none());
        let mut v = base();
        v["routes"][0]["rate_limit"] = serde_json::json!({"max_calls": 0});
        assert!(parse(v)
            .unwrap_err()
            .to_string()
            .contains("routes[0].rate_limit.max_calls: must be"));
        let mut v = base();
        v["rate_limits"] = serde_json::json!({"ip_slots": 0});
        assert!(parse(v).unwrap_err().to_string().contains("rate_limits.ip_slots"));
    }

    #[test]
    fn not_json_is_a_clear_error() {
        let err = Config::from_json(b"{not json").unwrap_err();
        assert!(
            err.to_string().starts_with("invalid filter configuration JSON"),
            "{err}"
        );
    }

    #[test]
    fn header_safety() {
        assert!(is_safe_header_value("Alice Smith"));
        assert!(is_safe_header_value("张三"));
        assert!(!is_safe_header_value("a\r\nX-Evil: 1"));
        assert!(!is_safe_header_value("a\u{0}b"));
        assert!(!is_safe_header_value("tab\tinside"));
        assert!(!is_safe_header_value(" padded"));
        assert!(!is_safe_header_value("c1\u{85}control"));
        assert!(!is_safe_header_value(&"x".repeat(2000)));
    }
}
