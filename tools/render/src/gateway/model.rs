//! The Envoy side of the gateway file as a model: the `gateway:` settings Envoy reads (listener,
//! admin, limits, CORS, circuit breaking, outlier detection), the routes' upstream side, the
//! Redis Cluster, and their defaults. Their validation is in `validate`.

use super::*;

/// `gateway:`, Envoy's part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gateway {
    #[serde(default = "default_port")]
    pub port: u16,
    #[serde(default = "default_address")]
    pub address: String,
    #[serde(default)]
    pub admin: Admin,
    #[serde(default)]
    pub metrics: Option<Metrics>,
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
    /// Which build of the filter Envoy runs: `wasm` (the portable module, proxy-wasm) or
    /// `native` (the same policy as an Envoy dynamic module, `libgateway_filter.so`).
    #[serde(default)]
    pub runtime: Runtime,
    /// Edge hardening: timeouts, connection and memory limits, HTTP/2 limits.
    #[serde(default)]
    pub limits: Limits,
    /// Request headers whose names contain `_` (upstreams such as WSGI read `X_User_Id` as
    /// `X-User-Id`): `drop` them (default), `reject` the request (400), or `allow` them.
    #[serde(default)]
    pub headers_with_underscores: UnderscoreAction,
    /// Paths with `%2F`/`%5C`: `reject` (400, default), `redirect` to the unescaped path, or
    /// `keep` them as they are.
    #[serde(default)]
    pub escaped_slashes: EscapedSlashes,
    /// TLS on the gateway's listener (with client certificates: what certificate-bound tokens,
    /// RFC 8705, are bound to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Tls>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<AccessLog>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracing: Option<Tracing>,
}

/// `gateway.tls`: the listener's certificate, and the client certificates it asks for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tls {
    /// PEM certificate chain file.
    pub certificate: String,
    /// PEM private key file.
    pub private_key: String,
    /// PEM file of the CAs client certificates must chain to; without it no client
    /// certificate is asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<String>,
    /// Refuse the TLS handshake without a client certificate (default: ask, do not require,
    /// so bearer tokens still work and only certificate-bound ones need one).
    #[serde(default)]
    pub require_client_certificate: bool,
}
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UnderscoreAction {
    #[default]
    Drop,
    Reject,
    Allow,
}
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EscapedSlashes {
    #[default]
    Reject,
    Redirect,
    Keep,
}
/// `gateway.limits`: Envoy's edge-proxy hardening, with the values of its "configuring Envoy as
/// an edge proxy" guidance where it gives one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Seconds for a client to send the whole request head (slow-header clients are cut off).
    #[serde(default = "default_request_headers_timeout")]
    pub request_headers_timeout: f64,
    /// Seconds a connection may stay open with no request in flight.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout: f64,
    /// Seconds a request may see no activity (headers or body, either way).
    #[serde(default = "default_stream_idle_timeout")]
    pub stream_idle_timeout: f64,
    /// Connections the gateway's listener takes (Envoy's limit for that listener; the metrics
    /// and Redis listeners have budgets of their own, and the process-wide limit of the
    /// overload manager is their sum); beyond it new connections are refused.
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    /// Of `max_connections`, how many only clients holding no connection may take: a client
    /// already connected cannot take the last ones (each new address, or IPv6 /64, still gets
    /// one). Default: a tenth. Needs the per-client cap.
    #[serde(default)]
    pub connection_reserve: Option<u64>,
    /// Seconds a new connection may stay silent: one that sends no byte by then is closed
    /// (Envoy's idle timeout would hold it for `idle_timeout`). 0: off.
    #[serde(default = "default_first_byte_timeout")]
    pub first_byte_timeout: f64,
    /// Heap in MiB: at 95% Envoy shrinks its heap, at 98% it stops accepting requests.
    #[serde(default = "default_max_heap_mb")]
    pub max_heap_mb: u64,
    /// MiB of free heap Envoy hands back to the system each second (tcmalloc background
    /// release, `memory_allocator_manager`); 0: none, as Envoy's own default. What a V8
    /// compilation of the module left free is otherwise kept for the life of the process.
    #[serde(default = "default_memory_release_mb")]
    pub memory_release_mb: u64,
    #[serde(default = "default_max_request_headers_kb")]
    pub max_request_headers_kb: u32,
    /// Bytes buffered per connection (listener and upstream).
    #[serde(default = "default_buffer_limit")]
    pub buffer_limit_bytes: u32,
    #[serde(default = "default_h2_streams")]
    pub http2_max_concurrent_streams: u32,
    /// Seconds for a client to send the whole request, head and body (edge practice: a
    /// request timeout; a slow body is cut off).
    #[serde(default = "default_request_timeout")]
    pub request_timeout: f64,
    /// Request bodies are buffered whole before the request goes upstream (Envoy's buffer
    /// filter), up to this many KiB (a larger body: 413), so a slow body holds no upstream
    /// connection or circuit-breaker slot; 0 streams bodies instead.
    #[serde(default = "default_max_request_body_kb")]
    pub max_request_body_kb: u32,
    /// Connections one client address may hold open at once (the module again, as a network
    /// filter). Default: a tenth of `max_connections` when clients connect directly
    /// (`rate_limit.trusted_hops: 0`), none behind proxies (every connection would come from
    /// the proxy's address); 0: no cap.
    #[serde(default)]
    pub max_connections_per_client: Option<u64>,
    /// Seconds after which a connection is closed gracefully (HTTP/1 `Connection: close` on
    /// its next response, HTTP/2 GOAWAY); it also bounds how long a per-client count can be
    /// held by a connection whose close was never seen.
    #[serde(default = "default_max_connection_duration")]
    pub max_connection_duration: f64,
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            request_headers_timeout: default_request_headers_timeout(),
            idle_timeout: default_idle_timeout(),
            stream_idle_timeout: default_stream_idle_timeout(),
            max_connections: default_max_connections(),
            connection_reserve: None,
            first_byte_timeout: default_first_byte_timeout(),
            max_heap_mb: default_max_heap_mb(),
            memory_release_mb: default_memory_release_mb(),
            max_request_headers_kb: default_max_request_headers_kb(),
            buffer_limit_bytes: default_buffer_limit(),
            http2_max_concurrent_streams: default_h2_streams(),
            request_timeout: default_request_timeout(),
            max_request_body_kb: default_max_request_body_kb(),
            max_connections_per_client: None,
            max_connection_duration: default_max_connection_duration(),
        }
    }
}
pub(super) fn default_request_headers_timeout() -> f64 {
    10.0
}
pub(super) fn default_idle_timeout() -> f64 {
    300.0
}
pub(super) fn default_stream_idle_timeout() -> f64 {
    60.0
}
pub(super) fn default_max_connections() -> u64 {
    10_000
}
pub(super) fn default_first_byte_timeout() -> f64 {
    5.0
}
pub(super) fn default_max_heap_mb() -> u64 {
    1024
}
pub(super) fn default_memory_release_mb() -> u64 {
    16
}
pub(super) fn default_max_request_headers_kb() -> u32 {
    60
}
pub(super) fn default_buffer_limit() -> u32 {
    32_768
}
pub(super) fn default_h2_streams() -> u32 {
    100
}
pub(super) fn default_request_timeout() -> f64 {
    60.0
}
pub(super) fn default_max_request_body_kb() -> u32 {
    1024
}
pub(super) fn default_max_connection_duration() -> f64 {
    3600.0
}
impl Limits {
    /// The per-client connection cap in force (`None`: no cap); `trusted_hops` is the rate
    /// limits' (behind proxies every connection comes from a proxy).
    pub fn connections_per_client(&self, trusted_hops: u32) -> Option<u64> {
        match self.max_connections_per_client {
            Some(0) => None,
            Some(n) => Some(n),
            None if trusted_hops == 0 => Some((self.max_connections / 10).max(1)),
            None => None,
        }
    }

    /// The reserve the per-client cap keeps for clients holding no connection.
    pub fn reserve(&self) -> u64 {
        self.connection_reserve.unwrap_or(self.max_connections / 10)
    }
}
impl Cors {
    /// Whether Envoy's CORS filter is rendered.
    pub fn active(&self) -> bool {
        self.enabled && !self.allow_origins.is_empty()
    }
}
/// `routes[]`, Envoy's part.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteUpstream {
    pub upstream: Upstreams,
    /// Upstream request timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Retries on connect failure or reset; 0 means none.
    #[serde(default)]
    pub retry: u32,
    #[serde(default)]
    pub lb_policy: LbPolicy,
    /// `canary.upstream`: the canary endpoint set (the route's `upstream` is the stable one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub canary_upstream: Option<Upstreams>,
    /// Envoy's RBAC on the route, reading the filter's published roles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rbac: Option<Rbac>,
}

/// `routes[].rbac`: Envoy's RBAC filter lets the route through only for a caller holding one
/// of `roles`, as the gateway filter published them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rbac {
    pub roles: Vec<String>,
}

/// `gateway.access_log`: Envoy's access log of every request, with the filter's decision.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLog {
    /// A file (`/dev/stdout` for the console).
    pub path: String,
}

/// `gateway.tracing`: Envoy's OpenTelemetry tracer, sending OTLP over HTTP.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tracing {
    /// The collector's OTLP/HTTP base URL (`http://collector:4318`); spans go to `/v1/traces`.
    pub otlp: String,
    /// `service.name` of the spans (default: the gateway's name).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_name: Option<String>,
    /// Percent of requests sampled when the client sent no sampling decision (default 100).
    #[serde(default = "default_sampling")]
    pub sampling: f64,
    /// Seconds between exports (default 5), and the spans that trigger one sooner (default 5).
    #[serde(default = "default_flush_interval")]
    pub flush_interval: f64,
    #[serde(default = "default_flush_spans")]
    pub flush_spans: u32,
}
fn default_sampling() -> f64 {
    100.0
}
fn default_flush_interval() -> f64 {
    5.0
}
fn default_flush_spans() -> u32 {
    5
}
/// One route's Envoy side, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyRoute {
    pub name: String,
    pub timeout: f64,
    pub retry: u32,
    pub lb_policy: LbPolicy,
    pub endpoints: RouteEndpoints,
    pub rbac: Option<Rbac>,
}
/// An Envoy cluster the renderer defines for an issuer's `remote_jwks.uri` or
/// `introspection.endpoint`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksCluster {
    pub name: String,
    pub endpoint: Endpoint,
    /// `https://`: TLS to the provider, verified against the system's CA bundle, with SNI.
    pub tls: bool,
}
/// `redis_cluster:`: the store as a Redis Cluster (primaries with replicas, failing over on
/// their own), reached through Envoy's own `redis_proxy`: Envoy follows the cluster's slot map
/// and its failovers, splits a multi-key `MGET` by slot, and webdis connects to `listen` as to
/// one Redis (webdis's `redis_host` and `redis_port`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisCluster {
    /// `host:port` where Envoy accepts Redis connections (keep it on loopback: no auth).
    pub listen: String,
    /// Some nodes of the cluster (`host:port`); Envoy learns the others from them.
    pub seeds: Vec<String>,
    /// Seconds between slot-map refreshes (a failover is also picked up from the first
    /// `MOVED`/error reply).
    #[serde(default = "default_redis_refresh")]
    pub refresh: f64,
    /// Seconds per command.
    #[serde(default = "default_redis_op_timeout")]
    pub op_timeout: f64,
    /// Acknowledge a revocation only once a replica holds it (see `revocation.confirm`).
    #[serde(default)]
    pub confirm: Option<RedisConfirm>,
    /// Parsed `listen` and `seeds` (filled by [`RedisCluster::validated`]).
    #[serde(skip)]
    pub endpoints: Option<(Endpoint, Vec<Endpoint>)>,
}
/// `redis_cluster.confirm`: a second `redis_proxy` listener that reads from replicas only
/// (`read_policy: REPLICA`, no redirection: a replica's `MOVED` must not turn into a read of the
/// primary), a second webdis connected to it, and how long a revocation waits for a replica.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfirm {
    /// `host:port` of the replica-reading listener (keep it on loopback).
    pub listen: String,
    /// The webdis connected to `listen` (`http://host:port`).
    pub webdis: String,
    /// Seconds a revocation waits for a replica before it is answered 503.
    #[serde(default = "default_confirm_timeout")]
    pub timeout: f64,
    /// Parsed `listen` and `webdis` (filled by [`RedisCluster::validated`]).
    #[serde(skip)]
    pub endpoints: Option<(Endpoint, Endpoint)>,
}
pub(super) fn default_confirm_timeout() -> f64 {
    1.0
}
pub(super) fn default_redis_refresh() -> f64 {
    1.0
}
pub(super) fn default_redis_op_timeout() -> f64 {
    1.0
}
/// `gateway.admin`: Envoy's admin interface. It shows the whole configuration (secrets
/// included) and can change log levels, so `socket` (a Unix socket with mode 0600: only the
/// user Envoy runs as can open it) is the safe choice; `address`/`port` is a TCP listener any
/// local user can reach.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    #[serde(default = "default_admin_address")]
    pub address: String,
    #[serde(default = "default_admin_port")]
    pub port: u16,
}
impl Default for Admin {
    fn default() -> Self {
        Self {
            socket: None,
            address: default_admin_address(),
            port: default_admin_port(),
        }
    }
}
/// `gateway.metrics`: a listener that serves only `GET /stats/prometheus` and `/ready` from the
/// admin interface, for scrapers and health checks that must not see the rest of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    #[serde(default = "default_admin_address")]
    pub address: String,
    pub port: u16,
    /// Connections of the metrics listener: its own budget, which the gateway's listener
    /// cannot take (health checks and scrapes go on while clients fill theirs).
    #[serde(default = "default_metrics_connections")]
    pub max_connections: u64,
}
pub(super) fn default_metrics_connections() -> u64 {
    64
}
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cors {
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Exact origins allowed to call the gateway from a browser; none (the default) renders no
    /// CORS filter. `*` allows any origin, and cannot be combined with `allow_credentials`.
    #[serde(default)]
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
            allow_origins: Vec::new(),
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
pub enum Runtime {
    #[default]
    Wasm,
    Native,
}
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailurePolicy {
    #[default]
    Reload,
    Closed,
    Open,
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
/// The parsed endpoint sets of one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteEndpoints {
    pub stable: Vec<Endpoint>,
    pub canary: Option<Vec<Endpoint>>,
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
pub(super) fn default_port() -> u16 {
    8000
}
pub(super) fn default_address() -> String {
    "0.0.0.0".to_string()
}
pub(super) fn default_admin_address() -> String {
    "127.0.0.1".to_string()
}
pub(super) fn default_admin_port() -> u16 {
    9901
}
pub(super) fn default_health_path() -> String {
    "/health".to_string()
}
pub(super) fn default_connect_timeout() -> f64 {
    1.0
}
pub(super) fn default_timeout() -> f64 {
    5.0
}
pub(super) fn default_true() -> bool {
    true
}
pub(super) fn default_cors_methods() -> Vec<String> {
    ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
        .map(String::from)
        .to_vec()
}
pub(super) fn default_cors_headers() -> Vec<String> {
    ["Authorization", "Content-Type", "X-Trace-ID", "X-Canary"]
        .map(String::from)
        .to_vec()
}
pub(super) fn default_cors_expose() -> Vec<String> {
    ["X-Trace-ID", "X-Response-Time"].map(String::from).to_vec()
}
pub(super) fn default_cors_max_age() -> u32 {
    600
}
pub(super) fn default_1024() -> u32 {
    1024
}
pub(super) fn default_3() -> u32 {
    3
}
pub(super) fn default_5() -> u32 {
    5
}
pub(super) fn default_10() -> u32 {
    10
}
pub(super) fn default_30() -> u32 {
    30
}
pub(super) fn default_50() -> u32 {
    50
}
