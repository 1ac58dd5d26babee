//! The gateway file (`config/gateway.yaml`): the user's single source of truth, in the shape of
//! the reference `routes.yaml`. This module holds its serde model and validation; the renderer
//! (`tools/render`) parses YAML into it and turns it into the Envoy bootstrap, and
//! [`GatewayFile::filter_config`] derives the filter's JSON configuration from it, validated by
//! the very code the filter runs at `on_configure`.

use serde::{Deserialize, Serialize};

use crate::canary::{CanarySettings, Sticky};
use crate::config::{
    check_name, default_algorithms, default_ban_ttl, default_cache_slots, default_clock_skew,
    default_logout_path, default_methods, default_per_ip, default_refresh_path, default_revoke_roles,
    default_revoke_user_path, default_rl_slots, default_true, default_webdis_cluster, Config, ConfigError,
    FilterConfig, JwtSettings, LimitSettings, RateLimitSettings, RefreshSettings, RevocationSettings,
    RouteRateLimit, RouteSettings, SyncSettings, DEFAULT_GATEWAY_NAME, MAX_CLOCK_SKEW_SECONDS,
};
use crate::revocation::FailureMode as RevocationFailureMode;

/// The whole gateway file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayFile {
    pub gateway: Gateway,
    #[serde(default)]
    pub jwt: Option<JwtSection>,
    #[serde(default)]
    pub routes: Vec<RouteSection>,
    /// webdis (an HTTP front for Redis), needed by `revocation` and by cluster-wide rate limits;
    /// rendered as the Envoy cluster `webdis`.
    #[serde(default)]
    pub webdis: Option<String>,
    #[serde(default)]
    pub revocation: Option<RevocationSection>,
    #[serde(default)]
    pub logs: LogsSection,
}

/// `logs:`: the per-request JSON line and the optional store behind `GET .../admin/logs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default)]
    pub store: Option<LogStoreSection>,
}

impl Default for LogsSection {
    fn default() -> Self {
        Self {
            enabled: true,
            store: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogStoreSection {
    /// Seconds records are kept (default 24 h).
    #[serde(default = "default_ban_ttl")]
    pub retention: u64,
    #[serde(default = "crate::config::default_user_records")]
    pub user_records: u32,
    #[serde(default = "crate::config::default_logs_path")]
    pub query_path: String,
    #[serde(default = "default_revoke_roles")]
    pub query_roles: Vec<String>,
    #[serde(default = "crate::config::default_log_buffer")]
    pub buffer: u32,
    /// Seconds between writes of buffered records.
    #[serde(default = "default_revocation_cache_ttl")]
    pub flush_interval: f64,
}

/// `revocation:`: logout, refresh and bans kept in Redis, reached through webdis.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationSection {
    /// Callout timeout, seconds (default 0.2).
    #[serde(default = "default_revocation_timeout")]
    pub timeout: f64,
    /// Seconds an answer is reused from shared data (default 1; 0 asks every time).
    #[serde(default = "default_revocation_cache_ttl")]
    pub cache_ttl: f64,
    #[serde(default = "default_cache_slots")]
    pub cache_slots: u32,
    /// `deny` (503, the default) or `allow` (let through, counted) when webdis/Redis fails.
    #[serde(default)]
    pub failure_mode: RevocationFailureMode,
    /// Seconds a ban (`user:revoked_before:<sub>`) lives; at least the longest token lifetime.
    #[serde(default = "default_ban_ttl")]
    pub ban_ttl: u64,
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    #[serde(default = "default_revoke_user_path")]
    pub revoke_user_path: String,
    #[serde(default = "default_revoke_roles")]
    pub revoke_roles: Vec<String>,
    #[serde(default)]
    pub refresh: RefreshSection,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_refresh_path")]
    pub path: String,
    /// Only tokens expiring within this many seconds may be refreshed (default: any).
    #[serde(default)]
    pub window: Option<u64>,
    /// Lifetime of the new token in seconds (default: the old token's lifetime).
    #[serde(default)]
    pub token_ttl: Option<u64>,
}

impl Default for RefreshSection {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_refresh_path(),
            window: None,
            token_ttl: None,
        }
    }
}

fn default_revocation_timeout() -> f64 {
    0.2
}
fn default_revocation_cache_ttl() -> f64 {
    1.0
}

/// `gateway:`: the listener and everything that applies to all routes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_address")]
    pub address: String,
    #[serde(default)]
    pub prefix: String,
    /// Value of `X-Gateway` sent upstream.
    #[serde(default = "default_name")]
    pub name: String,
    #[serde(default)]
    pub admin: Admin,
    /// Answered by Envoy itself, outside the gateway prefix.
    #[serde(default = "default_health_path")]
    pub health_path: String,
    #[serde(default)]
    pub cors: Cors,
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    #[serde(default)]
    pub outlier_detection: OutlierDetection,
    /// Upstream connect timeout, seconds.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout: f64,
    /// What Envoy does if the filter's VM fails: `reload` (fail closed, then restart the VM),
    /// `closed` (fail closed for good) or `open` (skip the filter: bypasses auth).
    #[serde(default)]
    pub failure_policy: FailurePolicy,
    #[serde(default)]
    pub rate_limit: GatewayRateLimit,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default = "default_admin_address")]
    pub address: String,
    #[serde(default = "default_admin_port")]
    pub port: u16,
}

impl Default for Admin {
    fn default() -> Self {
        Self {
            address: default_admin_address(),
            port: default_admin_port(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Exact origins, or `*` for any.
    #[serde(default = "default_any")]
    pub allow_origins: Vec<String>,
    #[serde(default = "default_cors_methods")]
    pub allow_methods: Vec<String>,
    #[serde(default = "default_cors_headers")]
    pub allow_headers: Vec<String>,
    #[serde(default = "default_cors_expose")]
    pub expose_headers: Vec<String>,
    #[serde(default = "default_true")]
    pub allow_credentials: bool,
    #[serde(default = "default_cors_max_age")]
    pub max_age: u32,
}

impl Default for Cors {
    fn default() -> Self {
        Self {
            enabled: true,
            allow_origins: default_any(),
            allow_methods: default_cors_methods(),
            allow_headers: default_cors_headers(),
            expose_headers: default_cors_expose(),
            allow_credentials: true,
            max_age: default_cors_max_age(),
        }
    }
}

/// Envoy cluster circuit-breaker thresholds, applied to every upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CircuitBreaker {
    #[serde(default = "default_1024")]
    pub max_connections: u32,
    #[serde(default = "default_1024")]
    pub max_pending_requests: u32,
    #[serde(default = "default_1024")]
    pub max_requests: u32,
    #[serde(default = "default_3")]
    pub max_retries: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
        }
    }
}

/// Envoy outlier detection (passive health checking), applied to every upstream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierDetection {
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_5")]
    pub consecutive_5xx: u32,
    /// Seconds between ejection sweeps.
    #[serde(default = "default_10")]
    pub interval: u32,
    /// Seconds a host stays ejected (times the number of ejections).
    #[serde(default = "default_30")]
    pub base_ejection_time: u32,
    #[serde(default = "default_50")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_5xx: 5,
            interval: 10,
            base_ejection_time: 30,
            max_ejection_percent: 50,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    #[default]
    Reload,
    Closed,
    Open,
}

/// `jwt:`: how tokens are verified.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JwtSection {
    #[serde(default = "default_algorithms")]
    pub algorithms: Vec<String>,
    /// The HMAC secret inline (prefer `secret_env`).
    #[serde(default)]
    pub secret: Option<String>,
    /// Name of the environment variable holding the secret, read when rendering.
    #[serde(default)]
    pub secret_env: Option<String>,
    #[serde(default)]
    pub issuer: Option<String>,
    #[serde(default)]
    pub audience: Option<String>,
    /// Seconds of tolerance on `exp`, `nbf` and `iat`.
    #[serde(default = "default_clock_skew")]
    pub clock_skew: u64,
}

/// One upstream address or several.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Upstreams {
    One(String),
    Many(Vec<String>),
}

impl Upstreams {
    pub fn urls(&self) -> Vec<&str> {
        match self {
            Upstreams::One(u) => vec![u.as_str()],
            Upstreams::Many(v) => v.iter().map(String::as_str).collect(),
        }
    }
}

/// `routes[]`: one service behind a path prefix.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    pub name: String,
    pub prefix: String,
    pub upstream: Upstreams,
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
    #[serde(default = "default_true")]
    pub auth_required: bool,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Upstream request timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Retries on connect failure or reset; 0 means none.
    #[serde(default)]
    pub retry: u32,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// Canary release of this route: a second endpoint set and the rules that pick it.
    #[serde(default)]
    pub canary: Option<CanarySection>,
}

/// `routes[].canary`: the reference `CanaryRouter`'s settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CanarySection {
    /// The canary endpoint set (the route's `upstream` is the stable one).
    pub upstream: Upstreams,
    /// Share of users (by md5 of the user id) sent to the canary, 0 to 100.
    #[serde(default)]
    pub percent: u8,
    /// Users always sent to the canary.
    #[serde(default)]
    pub users: Vec<String>,
    /// A request carrying this header goes to the canary; absent or null disables the override.
    #[serde(default)]
    pub header: Option<String>,
    /// Key for requests without a user: none (stable), client_ip, cookie:<name>, header:<name>.
    #[serde(default)]
    pub sticky: Sticky,
}

/// The parsed endpoint sets of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEndpoints {
    pub stable: Vec<Endpoint>,
    pub canary: Option<Vec<Endpoint>>,
}

fn parse_upstreams(field: &str, upstream: &Upstreams) -> Result<Vec<Endpoint>, ConfigError> {
    let urls = upstream.urls();
    if urls.is_empty() {
        return Err(ConfigError::new(field, "must name at least one address"));
    }
    let mut endpoints = Vec::with_capacity(urls.len());
    for (j, u) in urls.iter().enumerate() {
        let f = match upstream {
            Upstreams::One(_) => field.to_string(),
            Upstreams::Many(_) => format!("{field}[{j}]"),
        };
        endpoints.push(parse_upstream(&f, u)?);
    }
    let first_kind = endpoints.first().map(Endpoint::is_ip);
    if endpoints.iter().any(|e| Some(e.is_ip()) != first_kind) {
        return Err(ConfigError::new(field, "mixes IP addresses and host names"));
    }
    Ok(endpoints)
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    #[serde(default = "default_true")]
    pub enabled: bool,
    pub max_calls: u32,
    #[serde(default = "default_period")]
    pub period: u32,
    /// Per-user limit on this route (default: gateway `rate_limit.per_user`, else max_calls / 10).
    #[serde(default)]
    pub per_user: Option<LimitSection>,
    /// Per-IP limit on this route (default: gateway `rate_limit.per_ip`, shared by all routes).
    #[serde(default)]
    pub per_ip: Option<LimitSection>,
    /// Share this route's limit with the other gateway instances through Redis.
    #[serde(default)]
    pub cluster_wide: bool,
}

/// `{max_calls, period}`: calls per period seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSection {
    pub max_calls: u32,
    #[serde(default = "default_period")]
    pub period: u32,
}

impl LimitSection {
    fn settings(&self) -> LimitSettings {
        LimitSettings {
            max_calls: u64::from(self.max_calls),
            period_seconds: u64::from(self.period),
        }
    }
}

/// `gateway.rate_limit`: settings shared by every limited route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayRateLimit {
    /// Default per-IP limit (the reference: 1000 per second).
    #[serde(default)]
    pub per_ip: Option<LimitSection>,
    /// Default per-user limit (else each route's max_calls / 10).
    #[serde(default)]
    pub per_user: Option<LimitSection>,
    /// Proxies in front of Envoy whose X-Forwarded-For entries are trusted (0: the peer address).
    #[serde(default)]
    pub trusted_hops: u32,
    #[serde(default = "default_rl_slots")]
    pub user_slots: u32,
    #[serde(default = "default_rl_slots")]
    pub ip_slots: u32,
    /// Seconds between syncs of cluster-wide routes with Redis.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: f64,
}

fn default_sync_interval() -> f64 {
    0.5
}

impl Default for GatewayRateLimit {
    fn default() -> Self {
        Self {
            per_ip: None,
            per_user: None,
            trusted_hops: 0,
            user_slots: default_rl_slots(),
            ip_slots: default_rl_slots(),
            sync_interval: default_sync_interval(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LbPolicy {
    #[default]
    RoundRobin,
    LeastRequest,
    Random,
}

/// A parsed `http://host:port` upstream address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    /// Whether the host is an IP literal (a STATIC cluster) rather than a DNS name.
    pub fn is_ip(&self) -> bool {
        self.host.parse::<std::net::IpAddr>().is_ok()
    }
}

fn default_port() -> u16 {
    8000
}
fn default_address() -> String {
    "0.0.0.0".to_string()
}
fn default_name() -> String {
    DEFAULT_GATEWAY_NAME.to_string()
}
fn default_admin_address() -> String {
    "127.0.0.1".to_string()
}
fn default_admin_port() -> u16 {
    9901
}
fn default_health_path() -> String {
    "/health".to_string()
}
fn default_connect_timeout() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    5.0
}
fn default_period() -> u32 {
    1
}
fn default_any() -> Vec<String> {
    vec!["*".to_string()]
}
fn default_cors_methods() -> Vec<String> {
    ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
        .map(String::from)
        .to_vec()
}
fn default_cors_headers() -> Vec<String> {
    ["Authorization", "Content-Type", "X-Trace-ID", "X-Canary"]
        .map(String::from)
        .to_vec()
}
fn default_cors_expose() -> Vec<String> {
    ["X-Trace-ID", "X-Response-Time"].map(String::from).to_vec()
}
fn default_cors_max_age() -> u32 {
    600
}
fn default_1024() -> u32 {
    1024
}
fn default_3() -> u32 {
    3
}
fn default_5() -> u32 {
    5
}
fn default_10() -> u32 {
    10
}
fn default_30() -> u32 {
    30
}
fn default_50() -> u32 {
    50
}

/// Parses `http://host[:port][/]`.
pub fn parse_upstream(field: &str, url: &str) -> Result<Endpoint, ConfigError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ConfigError::new(
            field,
            format!("{url:?} must start with http:// (TLS upstreams are not supported yet)"),
        )
    })?;
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty() || authority.contains(['/', '@', '?', '#', ' ']) {
        return Err(ConfigError::new(
            field,
            format!("{url:?} must be http://host:port with no path"),
        ));
    }
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6
            .split_once(']')
            .ok_or_else(|| ConfigError::new(field, format!("{url:?} has an unterminated IPv6 address")))?;
        (h, after.strip_prefix(':'))
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        }
    };
    let port = match port {
        None => 80,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| ConfigError::new(field, format!("{url:?} has an invalid port")))?,
    };
    if host.is_empty()
        || !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_' | ':'))
    {
        return Err(ConfigError::new(field, format!("{url:?} has an invalid host")));
    }
    Ok(Endpoint {
        host: host.to_string(),
        port,
    })
}

fn check_seconds(field: &str, value: f64, max: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value > 0.0 && value <= max) {
        return Err(ConfigError::new(
            field,
            format!("must be a number of seconds in (0, {max}]"),
        ));
    }
    Ok(())
}

/// Maps a filter-config field name back to where it lives in the gateway file.
fn gateway_field(field: &str) -> String {
    match field {
        "prefix" => "gateway.prefix".to_string(),
        "gateway_name" => "gateway.name".to_string(),
        f if f.starts_with("passthrough_paths") => "gateway.health_path".to_string(),
        "revocation.ban_ttl_seconds" => "revocation.ban_ttl".to_string(),
        "logs.store.retention_seconds" => "logs.store.retention".to_string(),
        "revocation.refresh.token_ttl_seconds" => "revocation.refresh.token_ttl".to_string(),
        "jwt.clock_skew_seconds" => "jwt.clock_skew".to_string(),
        f if f.starts_with("rate_limits.") => {
            format!("gateway.rate_limit.{}", f.trim_start_matches("rate_limits."))
                .replace("period_seconds", "period")
        }
        f if f.starts_with("routes[") && f.contains("period_seconds") => {
            f.replace("period_seconds", "period")
        }
        f => f.to_string(),
    }
}

impl GatewayFile {
    /// Checks everything the filter does not see (upstreams, timeouts, listener, Envoy
    /// settings); returns each route's parsed endpoints, in route order.
    pub fn validate_envoy_side(&self) -> Result<Vec<RouteEndpoints>, ConfigError> {
        let g = &self.gateway;
        if g.port != 0 && g.port == g.admin.port {
            return Err(ConfigError::new(
                "gateway.admin.port",
                "must differ from gateway.port",
            ));
        }
        for (f, a) in [
            ("gateway.address", &g.address),
            ("gateway.admin.address", &g.admin.address),
        ] {
            if a.parse::<std::net::IpAddr>().is_err() {
                return Err(ConfigError::new(f, format!("{a:?} is not an IP address")));
            }
        }
        check_seconds("gateway.connect_timeout", g.connect_timeout, 60.0)?;
        if g.cors.enabled {
            if g.cors.allow_origins.is_empty() {
                return Err(ConfigError::new(
                    "gateway.cors.allow_origins",
                    "must list at least one origin (or *)",
                ));
            }
            for (i, m) in g.cors.allow_methods.iter().enumerate() {
                if !crate::config::KNOWN_METHODS.contains(&m.to_ascii_uppercase().as_str()) {
                    return Err(ConfigError::new(
                        format!("gateway.cors.allow_methods[{i}]"),
                        format!("unknown method {m:?}"),
                    ));
                }
            }
        }
        let od = &g.outlier_detection;
        if od.enabled && (od.consecutive_5xx == 0 || od.interval == 0 || od.base_ejection_time == 0) {
            return Err(ConfigError::new(
                "gateway.outlier_detection",
                "consecutive_5xx, interval and base_ejection_time must be positive",
            ));
        }
        if od.max_ejection_percent > 100 {
            return Err(ConfigError::new(
                "gateway.outlier_detection.max_ejection_percent",
                "must be at most 100",
            ));
        }
        if let Some(webdis) = &self.webdis {
            parse_upstream("webdis", webdis)?;
            if self.routes.iter().any(|r| r.name == default_webdis_cluster()) {
                return Err(ConfigError::new(
                    "webdis",
                    "a route named \"webdis\" clashes with the webdis cluster",
                ));
            }
        }
        let mut all = Vec::with_capacity(self.routes.len());
        for (i, r) in self.routes.iter().enumerate() {
            check_name(&format!("routes[{i}].name"), &r.name)?;
            check_seconds(&format!("routes[{i}].timeout"), r.timeout, 3600.0)?;
            if r.retry > 10 {
                return Err(ConfigError::new(
                    format!("routes[{i}].retry"),
                    "must be at most 10",
                ));
            }
            if let Some(rl) = &r.rate_limit {
                if rl.max_calls == 0 {
                    return Err(ConfigError::new(
                        format!("routes[{i}].rate_limit.max_calls"),
                        "must be positive",
                    ));
                }
                if rl.period == 0 {
                    return Err(ConfigError::new(
                        format!("routes[{i}].rate_limit.period"),
                        "must be positive",
                    ));
                }
            }
            let stable = parse_upstreams(&format!("routes[{i}].upstream"), &r.upstream)?;
            let canary = match &r.canary {
                Some(c) => Some(parse_upstreams(
                    &format!("routes[{i}].canary.upstream"),
                    &c.upstream,
                )?),
                None => None,
            };
            if r.canary.is_some() && self.routes.iter().any(|o| o.name == format!("{}-canary", r.name)) {
                return Err(ConfigError::new(
                    format!("routes[{i}].canary"),
                    "clashes with a route named <name>-canary",
                ));
            }
            all.push(RouteEndpoints { stable, canary });
        }
        Ok(all)
    }

    /// Derives the filter's configuration, resolving the JWT secret through `env`, and validates
    /// it exactly as the filter will.
    pub fn filter_config(&self, env: &dyn Fn(&str) -> Option<String>) -> Result<FilterConfig, ConfigError> {
        let jwt = match &self.jwt {
            None => None,
            Some(j) => {
                if j.clock_skew > MAX_CLOCK_SKEW_SECONDS {
                    return Err(ConfigError::new(
                        "jwt.clock_skew",
                        format!("must be at most {MAX_CLOCK_SKEW_SECONDS}"),
                    ));
                }
                let secret = match (&j.secret, &j.secret_env) {
                    (Some(_), Some(_)) => {
                        return Err(ConfigError::new(
                            "jwt",
                            "set either secret or secret_env, not both",
                        ))
                    }
                    (None, None) => {
                        return Err(ConfigError::new("jwt.secret_env", "set secret_env (or secret)"))
                    }
                    (Some(s), None) => s.clone(),
                    (None, Some(var)) => env(var).filter(|v| !v.is_empty()).ok_or_else(|| {
                        ConfigError::new("jwt.secret_env", format!("environment variable {var} is not set"))
                    })?,
                };
                Some(JwtSettings {
                    algorithms: j.algorithms.clone(),
                    secret,
                    issuer: j.issuer.clone(),
                    audience: j.audience.clone(),
                    clock_skew_seconds: j.clock_skew,
                })
            }
        };
        let revocation = match &self.revocation {
            None => None,
            Some(rv) => {
                if self.webdis.is_none() {
                    return Err(ConfigError::new("webdis", "revocation needs the webdis address"));
                }
                check_seconds("revocation.timeout", rv.timeout, 60.0)?;
                if !(rv.cache_ttl.is_finite() && (0.0..=3600.0).contains(&rv.cache_ttl)) {
                    return Err(ConfigError::new(
                        "revocation.cache_ttl",
                        "must be 0 to 3600 seconds",
                    ));
                }
                Some(RevocationSettings {
                    cluster: default_webdis_cluster(),
                    timeout_ms: (rv.timeout * 1000.0).round() as u64,
                    cache_ttl_ms: (rv.cache_ttl * 1000.0).round() as u64,
                    cache_slots: rv.cache_slots,
                    failure_mode: rv.failure_mode,
                    ban_ttl_seconds: rv.ban_ttl,
                    logout_path: rv.logout_path.clone(),
                    revoke_user_path: rv.revoke_user_path.clone(),
                    revoke_roles: rv.revoke_roles.clone(),
                    refresh: RefreshSettings {
                        enabled: rv.refresh.enabled,
                        path: rv.refresh.path.clone(),
                        window_seconds: rv.refresh.window,
                        token_ttl_seconds: rv.refresh.token_ttl,
                    },
                })
            }
        };
        let grl = &self.gateway.rate_limit;
        let any_cluster_wide = self
            .routes
            .iter()
            .any(|r| r.rate_limit.as_ref().is_some_and(|l| l.enabled && l.cluster_wide));
        let sync = if any_cluster_wide {
            if self.webdis.is_none() {
                return Err(ConfigError::new(
                    "webdis",
                    "cluster-wide rate limits need the webdis address",
                ));
            }
            if !(grl.sync_interval.is_finite() && (0.05..=60.0).contains(&grl.sync_interval)) {
                return Err(ConfigError::new(
                    "gateway.rate_limit.sync_interval",
                    "must be 0.05 to 60 seconds",
                ));
            }
            Some(SyncSettings {
                cluster: default_webdis_cluster(),
                interval_ms: (grl.sync_interval * 1000.0).round() as u64,
                timeout_ms: crate::config::default_revocation_timeout_ms(),
            })
        } else {
            None
        };
        let rate_limits = RateLimitSettings {
            sync,
            per_ip: grl.per_ip.map(|l| l.settings()).unwrap_or_else(default_per_ip),
            per_user: grl.per_user.map(|l| l.settings()),
            trusted_hops: grl.trusted_hops,
            user_slots: grl.user_slots,
            ip_slots: grl.ip_slots,
        };
        let logs = crate::config::LogSettings {
            enabled: self.logs.enabled,
            store: match &self.logs.store {
                None => None,
                Some(st) => {
                    if self.webdis.is_none() {
                        return Err(ConfigError::new(
                            "webdis",
                            "the log store needs the webdis address",
                        ));
                    }
                    if !(st.flush_interval.is_finite() && (0.05..=60.0).contains(&st.flush_interval)) {
                        return Err(ConfigError::new(
                            "logs.store.flush_interval",
                            "must be 0.05 to 60 seconds",
                        ));
                    }
                    Some(crate::config::LogStoreSettings {
                        cluster: default_webdis_cluster(),
                        retention_seconds: st.retention,
                        user_records: st.user_records,
                        query_path: st.query_path.clone(),
                        query_roles: st.query_roles.clone(),
                        buffer: st.buffer,
                        flush_interval_ms: (st.flush_interval * 1000.0).round() as u64,
                        timeout_ms: crate::config::default_log_timeout_ms(),
                    })
                }
            },
        };
        let fc = FilterConfig {
            logs,
            rate_limits,
            revocation,
            prefix: self.gateway.prefix.clone(),
            gateway_name: self.gateway.name.clone(),
            passthrough_paths: vec![self.gateway.health_path.clone()],
            jwt,
            routes: self
                .routes
                .iter()
                .map(|r| RouteSettings {
                    name: r.name.clone(),
                    prefix: r.prefix.clone(),
                    methods: r.methods.clone(),
                    auth_required: r.auth_required,
                    roles: r.roles.clone(),
                    rate_limit: r
                        .rate_limit
                        .as_ref()
                        .filter(|rl| rl.enabled)
                        .map(|rl| RouteRateLimit {
                            max_calls: u64::from(rl.max_calls),
                            period_seconds: u64::from(rl.period),
                            per_user: rl.per_user.map(|l| l.settings()),
                            per_ip: rl.per_ip.map(|l| l.settings()),
                            cluster_wide: rl.cluster_wide,
                        }),
                    canary: r.canary.as_ref().map(|c| CanarySettings {
                        percent: c.percent,
                        users: c.users.clone(),
                        header: c.header.clone(),
                        sticky: c.sticky.clone(),
                    }),
                })
                .collect(),
        };
        Config::try_from(fc.clone()).map_err(|e| ConfigError::new(gateway_field(&e.field), e.message))?;
        Ok(fc)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(v: serde_json::Value) -> GatewayFile {
        serde_json::from_value(v).unwrap()
    }

    fn sample() -> serde_json::Value {
        serde_json::json!({
            "gateway": {"port": 8000, "prefix": "/api/v1"},
            "jwt": {"secret_env": "JWT_SECRET"},
            "routes": [
                {"name": "user-service", "prefix": "/users", "upstream": "http://127.0.0.1:8001",
                 "methods": ["GET", "POST"], "auth_required": true,
                 "rate_limit": {"enabled": true, "max_calls": 100, "period": 1}, "timeout": 5, "retry": 2},
                {"name": "product-service", "prefix": "/products",
                 "upstream": ["http://10.0.0.1:8003", "http://10.0.0.2:8003/"], "auth_required": false}
            ]
        })
    }

    fn env(var: &str) -> Option<String> {
        (var == "JWT_SECRET").then(|| "from-env-secret".to_string())
    }

    #[test]
    fn derives_filter_config_with_secret_from_env() {
        let g = file(sample());
        let fc = g.filter_config(&env).unwrap();
        assert_eq!(fc.prefix, "/api/v1");
        assert_eq!(fc.passthrough_paths, vec!["/health"]);
        let jwt = fc.jwt.unwrap();
        assert_eq!(jwt.secret, "from-env-secret");
        assert_eq!(jwt.clock_skew_seconds, 60);
        assert_eq!(fc.routes.len(), 2);
        assert!(!fc.routes[1].auth_required);
        let eps = g.validate_envoy_side().unwrap();
        assert_eq!(
            eps[0].stable,
            vec![Endpoint {
                host: "127.0.0.1".into(),
                port: 8001
            }]
        );
        assert_eq!(eps[1].stable.len(), 2);
    }

    #[test]
    fn upstream_parsing() {
        let ok = |u: &str| parse_upstream("f", u).unwrap();
        assert_eq!(
            ok("http://user-service:8001"),
            Endpoint {
                host: "user-service".into(),
                port: 8001
            }
        );
        assert_eq!(
            ok("http://svc"),
            Endpoint {
                host: "svc".into(),
                port: 80
            }
        );
        assert_eq!(
            ok("http://[::1]:81"),
            Endpoint {
                host: "::1".into(),
                port: 81
            }
        );
        assert!(!ok("http://svc:1").is_ip());
        assert!(ok("http://[::1]:81").is_ip());
        for bad in [
            "https://a:1",
            "a:1",
            "http://",
            "http://a:0",
            "http://a:99999",
            "http://a:1/path",
            "http://u@a:1",
            "http://a b:1",
        ] {
            assert!(parse_upstream("routes[0].upstream", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn rejections_name_the_gateway_field() {
        type Mutate = Box<dyn Fn(&mut serde_json::Value)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (
                Box::new(|v| v["gateway"]["prefix"] = "api".into()),
                "gateway.prefix: must start with '/'",
            ),
            (
                Box::new(|v| v["jwt"]["secret_env"] = "NOPE".into()),
                "jwt.secret_env: environment variable NOPE is not set",
            ),
            (
                Box::new(|v| v["jwt"]["secret"] = "x".into()),
                "jwt: set either secret or secret_env",
            ),
            (
                Box::new(|v| v["jwt"]["clock_skew"] = 10_000_000.into()),
                "jwt.clock_skew: must be at most",
            ),
            (
                Box::new(|v| v["routes"][0]["methods"][0] = "FETCH".into()),
                "routes[0].methods[0]: unknown method",
            ),
            (
                Box::new(|v| v["gateway"]["name"] = "a\nb".into()),
                "gateway.name: must be",
            ),
        ];
        for (mutate, expected) in cases {
            let mut v = sample();
            mutate(&mut v);
            let err = file(v).filter_config(&env).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
        }
        let envoy_cases: Vec<(Mutate, &str)> = vec![
            (
                Box::new(|v| v["routes"][0]["timeout"] = 0.into()),
                "routes[0].timeout: must be a number of seconds",
            ),
            (
                Box::new(|v| v["routes"][0]["retry"] = 11.into()),
                "routes[0].retry: must be at most 10",
            ),
            (
                Box::new(|v| v["routes"][0]["upstream"] = "https://x:1".into()),
                "routes[0].upstream: \"https://x:1\" must start with http://",
            ),
            (
                Box::new(|v| v["routes"][1]["upstream"][1] = "http://x:0".into()),
                "routes[1].upstream[1]: \"http://x:0\" has an invalid port",
            ),
            (
                Box::new(|v| v["routes"][1]["upstream"][1] = "http://name:1".into()),
                "routes[1].upstream: mixes IP addresses and host names",
            ),
            (
                Box::new(|v| v["routes"][0]["rate_limit"]["max_calls"] = 0.into()),
                "routes[0].rate_limit.max_calls: must be positive",
            ),
            (
                Box::new(|v| v["gateway"]["admin"] = serde_json::json!({"port": 8000, "address": "0.0.0.0"})),
                "gateway.admin.port: must differ",
            ),
            (
                Box::new(|v| v["gateway"]["address"] = "localhost".into()),
                "gateway.address: \"localhost\" is not an IP address",
            ),
        ];
        for (mutate, expected) in envoy_cases {
            let mut v = sample();
            mutate(&mut v);
            let err = file(v).validate_envoy_side().unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
        }
    }
}
