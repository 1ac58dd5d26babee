//! The gateway file (`config/gateway.yaml`): the user's single source of truth, in the shape of
//! the reference `routes.yaml`. It is the filter's configuration plus what only Envoy needs;
//! this module splits the two. The filter's part is deserialized into the filter's own settings
//! types (each duty owns its fields, defaults and validation) and compiled once by the filter's
//! own code; the Envoy part (listener, admin, CORS, circuit breaking, upstreams, timeouts,
//! retries, load balancing, the webdis address) is modelled and validated here.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use gateway_filter::config::{Config, FilterConfig};
use gateway_filter::error::{check_name, ConfigError, KNOWN_METHODS};

/// The Envoy cluster the webdis address becomes.
pub const WEBDIS_CLUSTER: &str = "webdis";

/// The Envoy cluster of `logs.store.webdis`, the log store's own webdis.
pub const LOG_WEBDIS_CLUSTER: &str = "webdis-logs";
/// The replica-reading webdis of `redis_cluster.confirm`.
pub const CONFIRM_WEBDIS_CLUSTER: &str = "webdis-replica";

/// Keys of `gateway:` that only Envoy uses (the rest is the filter's: prefix, name, rate_limit).
const ENVOY_GATEWAY_KEYS: [&str; 14] = [
    "port",
    "address",
    "admin",
    "metrics",
    "health_path",
    "cors",
    "circuit_breaker",
    "outlier_detection",
    "connect_timeout",
    "failure_policy",
    "runtime",
    "limits",
    "headers_with_underscores",
    "escaped_slashes",
];
/// Keys of `routes[]` that only Envoy uses (besides `canary.upstream`).
const ENVOY_ROUTE_KEYS: [&str; 4] = ["upstream", "timeout", "retry", "lb_policy"];

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

fn default_request_headers_timeout() -> f64 {
    10.0
}
fn default_idle_timeout() -> f64 {
    300.0
}
fn default_stream_idle_timeout() -> f64 {
    60.0
}
fn default_max_connections() -> u64 {
    10_000
}
fn default_first_byte_timeout() -> f64 {
    5.0
}
fn default_max_heap_mb() -> u64 {
    1024
}
fn default_max_request_headers_kb() -> u32 {
    60
}
fn default_buffer_limit() -> u32 {
    32_768
}
fn default_h2_streams() -> u32 {
    100
}
fn default_request_timeout() -> f64 {
    60.0
}
fn default_max_request_body_kb() -> u32 {
    1024
}
fn default_max_connection_duration() -> f64 {
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
}

/// One route's Envoy side, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct EnvoyRoute {
    pub name: String,
    pub timeout: f64,
    pub retry: u32,
    pub lb_policy: LbPolicy,
    pub endpoints: RouteEndpoints,
}

/// An Envoy cluster the renderer defines for an issuer's `remote_jwks.uri`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwksCluster {
    pub name: String,
    pub endpoint: Endpoint,
    /// `https://`: TLS to the provider, verified against the system's CA bundle, with SNI.
    pub tls: bool,
}

/// Prefix of the clusters made for `remote_jwks.uri`s.
pub const JWKS_CLUSTER_PREFIX: &str = "jwks_";

/// The whole gateway file, split and validated.
#[derive(Debug)]
pub struct GatewayFile {
    pub gateway: Gateway,
    /// In file order.
    pub routes: Vec<EnvoyRoute>,
    pub webdis: Option<Endpoint>,
    /// The log store's own webdis (`logs.store.webdis`), when it has one.
    pub log_webdis: Option<Endpoint>,
    /// Clusters for identity providers' key sets.
    pub jwks_clusters: Vec<JwksCluster>,
    /// Envoy's `redis_proxy` in front of a Redis Cluster, for webdis (`redis_cluster:`).
    pub redis_cluster: Option<RedisCluster>,
    /// The filter's configuration (secret resolved), as it is sent to Envoy.
    pub filter: FilterConfig,
    /// The same, compiled by the filter's own code (route order, limits).
    pub config: Config,
}

fn typed<T: serde::de::DeserializeOwned>(field: &str, value: Value) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        let full = match (field.is_empty(), path.as_str()) {
            (_, ".") => field.to_string(),
            (true, p) => p.to_string(),
            (false, p) if p.starts_with('[') => format!("{field}{p}"),
            (false, p) => format!("{field}.{p}"),
        };
        ConfigError::new(full, inner)
    })
}

fn object(field: &str, value: Option<Value>) -> Result<Map<String, Value>, ConfigError> {
    match value {
        None | Some(Value::Null) => Ok(Map::new()),
        Some(Value::Object(m)) => Ok(m),
        Some(_) => Err(ConfigError::new(field, "must be a mapping")),
    }
}

/// Moves `keys` out of `from` into a new mapping.
fn take(from: &mut Map<String, Value>, keys: &[&str]) -> Map<String, Value> {
    keys.iter()
        .filter_map(|k| from.remove(*k).map(|v| (k.to_string(), v)))
        .collect()
}

impl GatewayFile {
    /// Parses the YAML text and validates both sides. Secrets are not needed: the filter reads
    /// `secret_env` from Envoy's environment at start-up.
    /// Errors name the field and the line it is on.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let located = crate::located::Located::parse(text).map_err(|e| ConfigError::new("", e))?;
        let value = located.value.clone();
        Self::from_value(value).map_err(|e| match located.line(&e.field) {
            Some(line) if !e.field.is_empty() => {
                ConfigError::new(e.field, format!("{} at line {line}", e.message))
            }
            _ => e,
        })
    }

    pub fn from_value(value: Value) -> Result<Self, ConfigError> {
        let mut root = object("", Some(value))?;
        let mut gateway = object("gateway", root.remove("gateway"))?;
        let envoy_gateway: Gateway =
            typed("gateway", Value::Object(take(&mut gateway, &ENVOY_GATEWAY_KEYS)))?;
        let webdis = match root.remove("webdis") {
            None | Some(Value::Null) => None,
            Some(Value::String(url)) => Some(parse_upstream("webdis", &url)?),
            Some(_) => return Err(ConfigError::new("webdis", "must be an http://host:port address")),
        };
        let redis_cluster = match root.remove("redis_cluster") {
            None | Some(Value::Null) => None,
            Some(v) => Some(typed::<RedisCluster>("redis_cluster", v)?.validated()?),
        };
        let mut upstreams = Vec::new();
        if let Some(Value::Array(routes)) = root.get_mut("routes") {
            for (i, route) in routes.iter_mut().enumerate() {
                let field = format!("routes[{i}]");
                let Value::Object(route) = route else {
                    return Err(ConfigError::new(field, "must be a mapping"));
                };
                let mut envoy = take(route, &ENVOY_ROUTE_KEYS);
                if let Some(Value::Object(canary)) = route.get_mut("canary") {
                    if let Some(up) = canary.remove("upstream") {
                        envoy.insert("canary_upstream".into(), up);
                    }
                }
                let upstream: RouteUpstream = typed(&field, Value::Object(envoy)).map_err(|e| {
                    ConfigError::new(e.field.replace("canary_upstream", "canary.upstream"), e.message)
                })?;
                upstreams.push(upstream);
            }
        }
        root.insert("gateway".into(), Value::Object(gateway));
        root.insert(
            "passthrough_paths".into(),
            Value::Array(vec![Value::String(envoy_gateway.health_path.clone())]),
        );
        if webdis.is_some() {
            root.insert("webdis_cluster".into(), Value::String(WEBDIS_CLUSTER.into()));
        }
        if let Some(c) = redis_cluster.as_ref().and_then(|r| r.confirm.as_ref()) {
            // Through the writes' webdis (or the log store's), a read-back would read the
            // primary and confirm nothing.
            let confirm_webdis = c.endpoints.as_ref().map(|(_, ep)| ep);
            let log_webdis = root
                .get("logs")
                .and_then(|l| l.get("store"))
                .and_then(|st| st.get("webdis"))
                .and_then(Value::as_str)
                .and_then(|url| parse_upstream("logs.store.webdis", url).ok());
            if confirm_webdis.is_some()
                && (confirm_webdis == webdis.as_ref() || confirm_webdis == log_webdis.as_ref())
            {
                return Err(ConfigError::new(
                    "redis_cluster.confirm.webdis",
                    "must be its own webdis (connected to confirm.listen), not the one writes or log records go to",
                ));
            }
            let Some(Value::Object(rv)) = root.get_mut("revocation") else {
                return Err(ConfigError::new(
                    "redis_cluster.confirm",
                    "confirms revocations: needs a revocation section",
                ));
            };
            if rv.contains_key("confirm") {
                return Err(ConfigError::new(
                    "revocation.confirm",
                    "is written by redis_cluster.confirm in a gateway file",
                ));
            }
            rv.insert(
                "confirm".into(),
                serde_json::json!({"cluster": CONFIRM_WEBDIS_CLUSTER, "timeout": c.timeout}),
            );
        }
        let jwks_clusters = jwks_clusters(&mut root)?;
        let log_webdis = match root
            .get_mut("logs")
            .and_then(|l| l.get_mut("store"))
            .and_then(Value::as_object_mut)
            .and_then(|st| st.remove("webdis"))
        {
            None | Some(Value::Null) => None,
            Some(Value::String(url)) => {
                let ep = parse_upstream("logs.store.webdis", &url)?;
                if let Some(Value::Object(st)) = root.get_mut("logs").and_then(|l| l.get_mut("store")) {
                    st.insert("cluster".into(), Value::String(LOG_WEBDIS_CLUSTER.into()));
                }
                Some(ep)
            }
            Some(_) => {
                return Err(ConfigError::new(
                    "logs.store.webdis",
                    "must be an http://host:port address",
                ));
            }
        };
        let filter: FilterConfig = typed("", Value::Object(root)).map_err(|e| {
            // `gateway` and `routes[i]` are shared with Envoy: the filter's list of expected
            // fields would mislead there.
            let shared = e.field.starts_with("gateway.") && e.field.matches('.').count() == 1
                || e.field.starts_with("routes[") && !e.field.contains('.')
                || e.field.starts_with("routes[") && e.field.matches('.').count() == 1;
            match e.message.split_once(", expected") {
                Some((head, _)) if shared && head.starts_with("unknown field") => {
                    ConfigError::new(e.field, head)
                }
                _ => e,
            }
        })?;
        // The secret itself is not needed here: the filter reads `secret_env` from Envoy's
        // environment at start-up. Everything else is validated by the filter's own code.
        let placeholder = |_: &str| Some("render-time:placeholder-not-a-secret".to_string());
        let config = Config::compile(filter.clone(), &placeholder).map_err(|e| {
            if e.field.starts_with("passthrough_paths") {
                ConfigError::new("gateway.health_path", e.message)
            } else {
                e
            }
        })?;
        let routes = validate_envoy_side(&envoy_gateway, &filter, upstreams, webdis.is_some())?;
        if let Some(r) = filter
            .routes
            .iter()
            .find(|r| jwks_clusters.iter().any(|c| c.name == r.name))
        {
            return Err(ConfigError::new(
                "routes",
                format!(
                    "a route named {:?} clashes with an identity provider's key-set cluster",
                    r.name
                ),
            ));
        }
        Ok(GatewayFile {
            gateway: envoy_gateway,
            routes,
            webdis,
            log_webdis,
            jwks_clusters,
            redis_cluster,
            filter,
            config,
        })
    }
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

fn default_confirm_timeout() -> f64 {
    1.0
}

fn default_redis_refresh() -> f64 {
    1.0
}
fn default_redis_op_timeout() -> f64 {
    1.0
}

impl RedisCluster {
    fn validated(mut self) -> Result<Self, ConfigError> {
        let addr = |field: &str, a: &str| {
            parse_upstream(field, &format!("http://{a}"))
                .map_err(|_| ConfigError::new(field, format!("{a:?} must be host:port")))
        };
        let listen = addr("redis_cluster.listen", &self.listen)?;
        // The redis_proxy listeners take any command, writes included, without a password:
        // only processes of this host (the webdis beside Envoy) may reach them.
        let loopback = |field: &str, ep: &Endpoint| {
            let ok = ep.host == "localhost"
                || ep
                    .host
                    .trim_matches(|c| c == '[' || c == ']')
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback());
            if ok {
                Ok(())
            } else {
                Err(ConfigError::new(
                    field,
                    "must be a loopback address (127.0.0.1:port): the listener has no password",
                ))
            }
        };
        loopback("redis_cluster.listen", &listen)?;
        if self.seeds.is_empty() {
            return Err(ConfigError::new(
                "redis_cluster.seeds",
                "must name at least one node",
            ));
        }
        let seeds = self
            .seeds
            .iter()
            .enumerate()
            .map(|(i, a)| addr(&format!("redis_cluster.seeds[{i}]"), a))
            .collect::<Result<Vec<_>, _>>()?;
        check_seconds("redis_cluster.refresh", self.refresh, 60.0)?;
        check_seconds("redis_cluster.op_timeout", self.op_timeout, 60.0)?;
        if let Some(c) = self.confirm.as_mut() {
            let replica = addr("redis_cluster.confirm.listen", &c.listen)?;
            loopback("redis_cluster.confirm.listen", &replica)?;
            if replica == listen {
                return Err(ConfigError::new(
                    "redis_cluster.confirm.listen",
                    "must differ from redis_cluster.listen (it reads from replicas only)",
                ));
            }
            let webdis = parse_upstream("redis_cluster.confirm.webdis", &c.webdis)?;
            check_seconds("redis_cluster.confirm.timeout", c.timeout, 60.0)?;
            c.endpoints = Some((replica, webdis));
        }
        self.endpoints = Some((listen, seeds));
        Ok(self)
    }
}

/// Defines a cluster for every `jwt.issuers[i].remote_jwks` that names no `cluster` of its own,
/// and writes its name into the filter's configuration.
fn jwks_clusters(root: &mut Map<String, Value>) -> Result<Vec<JwksCluster>, ConfigError> {
    let mut out = Vec::new();
    let Some(Value::Array(issuers)) = root.get_mut("jwt").and_then(|j| j.get_mut("issuers")) else {
        return Ok(out);
    };
    for (i, issuer) in issuers.iter_mut().enumerate() {
        let name = issuer
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        let Some(Value::Object(remote)) = issuer.get_mut("remote_jwks") else {
            continue;
        };
        if remote.get("cluster").is_some_and(|c| !c.is_null()) {
            continue;
        }
        let field = format!("jwt.issuers[{i}].remote_jwks.uri");
        let uri = remote
            .get("uri")
            .and_then(Value::as_str)
            .ok_or_else(|| ConfigError::new(&field, "must be an http(s)://host[:port]/path URL"))?;
        let (authority, _) = gateway_filter::jwt::remote::split_uri(uri).ok_or_else(|| {
            ConfigError::new(
                &field,
                format!("{uri:?} is not an http(s)://host[:port]/path URL"),
            )
        })?;
        let tls = uri.starts_with("https://");
        let mut endpoint = parse_upstream(&field, &format!("http://{authority}"))?;
        if tls && !authority.contains(':') {
            endpoint.port = 443;
        }
        let cluster = format!("{JWKS_CLUSTER_PREFIX}{name}");
        check_name(&format!("jwt.issuers[{i}].name"), &name)?;
        remote.insert("cluster".into(), Value::String(cluster.clone()));
        out.push(JwksCluster {
            name: cluster,
            endpoint,
            tls,
        });
    }
    Ok(out)
}

/// Checks everything the filter does not see (upstreams, timeouts, listener, Envoy settings).
/// The Envoy side of the file: the gateway's own settings, then each route's upstream side.
fn validate_envoy_side(
    g: &Gateway,
    filter: &FilterConfig,
    upstreams: Vec<RouteUpstream>,
    webdis: bool,
) -> Result<Vec<EnvoyRoute>, ConfigError> {
    check_gateway_side(g, filter, webdis)?;
    envoy_routes(filter, upstreams)
}

/// `gateway:` as Envoy reads it (ports, admin, limits, CORS, outlier detection), and names that
/// would clash with the clusters the renderer adds.
fn check_gateway_side(g: &Gateway, filter: &FilterConfig, webdis: bool) -> Result<(), ConfigError> {
    if g.port != 0 && g.admin.socket.is_none() && g.port == g.admin.port {
        return Err(ConfigError::new(
            "gateway.admin.port",
            "must differ from gateway.port",
        ));
    }
    if let Some(path) = &g.admin.socket {
        // sun_path holds 108 bytes with its terminator.
        if path.is_empty() || path.len() > 100 || path.contains('\0') {
            return Err(ConfigError::new(
                "gateway.admin.socket",
                "must be a path of 1 to 100 bytes",
            ));
        }
    }
    if let Some(m) = &g.metrics {
        if m.address.parse::<std::net::IpAddr>().is_err() {
            return Err(ConfigError::new(
                "gateway.metrics.address",
                format!("{:?} is not an IP address", m.address),
            ));
        }
        let admin_port = g.admin.socket.is_none().then_some(g.admin.port);
        if m.port == 0 || m.port == g.port || Some(m.port) == admin_port {
            return Err(ConfigError::new(
                "gateway.metrics.port",
                "must be set and differ from gateway.port and gateway.admin.port",
            ));
        }
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
    let l = &g.limits;
    check_seconds(
        "gateway.limits.request_headers_timeout",
        l.request_headers_timeout,
        3600.0,
    )?;
    check_seconds("gateway.limits.idle_timeout", l.idle_timeout, 86_400.0)?;
    check_seconds("gateway.limits.request_timeout", l.request_timeout, 86_400.0)?;
    check_seconds(
        "gateway.limits.max_connection_duration",
        l.max_connection_duration,
        7.0 * 86_400.0,
    )?;
    if l.first_byte_timeout != 0.0 {
        check_seconds("gateway.limits.first_byte_timeout", l.first_byte_timeout, 3600.0)?;
        if l.first_byte_timeout < 0.1 {
            return Err(ConfigError::new(
                "gateway.limits.first_byte_timeout",
                "must be 0 (off) or at least 0.1 seconds",
            ));
        }
    }
    if l.connection_reserve.is_some_and(|r| r > 0)
        && l.connections_per_client(filter.gateway.rate_limit.trusted_hops)
            .is_none()
    {
        return Err(ConfigError::new(
            "gateway.limits.connection_reserve",
            "needs the per-client connection cap (max_connections_per_client, or trusted_hops: 0)",
        ));
    }
    if l.connection_reserve.is_some_and(|r| r >= l.max_connections) {
        return Err(ConfigError::new(
            "gateway.limits.connection_reserve",
            "must be below max_connections",
        ));
    }
    if let Some(m) = &g.metrics {
        if !(1..=100_000).contains(&m.max_connections) {
            return Err(ConfigError::new(
                "gateway.metrics.max_connections",
                "must be 1 to 100000",
            ));
        }
    }
    if l.max_connections_per_client
        .is_some_and(|n| n > l.max_connections)
    {
        return Err(ConfigError::new(
            "gateway.limits.max_connections_per_client",
            "must not exceed max_connections (0 turns the cap off)",
        ));
    }
    check_seconds(
        "gateway.limits.stream_idle_timeout",
        l.stream_idle_timeout,
        86_400.0,
    )?;
    for (field, value, min, max) in [
        ("max_connections", l.max_connections, 1, 10_000_000),
        ("max_heap_mb", l.max_heap_mb, 64, 1_048_576),
        (
            "max_request_headers_kb",
            u64::from(l.max_request_headers_kb),
            1,
            8192,
        ),
        (
            "buffer_limit_bytes",
            u64::from(l.buffer_limit_bytes),
            1024,
            1 << 30,
        ),
        (
            "http2_max_concurrent_streams",
            u64::from(l.http2_max_concurrent_streams),
            1,
            1 << 31,
        ),
        (
            "max_request_body_kb",
            u64::from(l.max_request_body_kb),
            0,
            1 << 20,
        ),
    ] {
        gateway_filter::error::check_range(&format!("gateway.limits.{field}"), value, min, max)?;
    }
    check_policies(g, filter, webdis)
}

/// CORS, outlier detection, and the names of the clusters the renderer adds.
fn check_policies(g: &Gateway, filter: &FilterConfig, webdis: bool) -> Result<(), ConfigError> {
    if g.cors.active() {
        if g.cors.allow_credentials && g.cors.allow_origins.iter().any(|o| o == "*") {
            return Err(ConfigError::new(
                "gateway.cors.allow_origins",
                "\"*\" with allow_credentials would let any site send credentialed requests: list the origins, or set allow_credentials: false",
            ));
        }
        for (i, m) in g.cors.allow_methods.iter().enumerate() {
            if !KNOWN_METHODS.contains(&m.to_ascii_uppercase().as_str()) {
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
    if g.metrics.is_some() && filter.routes.iter().any(|r| r.name == "envoy-admin") {
        return Err(ConfigError::new(
            "gateway.metrics",
            "a route named \"envoy-admin\" clashes with the metrics listener's cluster",
        ));
    }
    if filter.routes.iter().any(|r| r.name == LOG_WEBDIS_CLUSTER) {
        return Err(ConfigError::new(
            "routes",
            "a route named \"webdis-logs\" clashes with the log store's webdis cluster",
        ));
    }
    if filter.routes.iter().any(|r| r.name == CONFIRM_WEBDIS_CLUSTER) {
        return Err(ConfigError::new(
            "routes",
            "a route named \"webdis-replica\" clashes with the replica-reading webdis cluster",
        ));
    }
    if webdis && filter.routes.iter().any(|r| r.name == WEBDIS_CLUSTER) {
        return Err(ConfigError::new(
            "webdis",
            "a route named \"webdis\" clashes with the webdis cluster",
        ));
    }
    Ok(())
}

/// Each route's upstream side: name, timeout, retries, endpoints (stable and canary).
fn envoy_routes(
    filter: &FilterConfig,
    upstreams: Vec<RouteUpstream>,
) -> Result<Vec<EnvoyRoute>, ConfigError> {
    let mut all = Vec::with_capacity(upstreams.len());
    for (i, (r, up)) in filter.routes.iter().zip(upstreams).enumerate() {
        check_name(&format!("routes[{i}].name"), &r.name)?;
        check_seconds(&format!("routes[{i}].timeout"), up.timeout, 3600.0)?;
        if up.retry > 10 {
            return Err(ConfigError::new(
                format!("routes[{i}].retry"),
                "must be at most 10",
            ));
        }
        let stable = parse_upstreams(&format!("routes[{i}].upstream"), &up.upstream)?;
        let canary = match (&r.canary, &up.canary_upstream) {
            (Some(_), Some(c)) => Some(parse_upstreams(&format!("routes[{i}].canary.upstream"), c)?),
            (Some(_), None) => {
                return Err(ConfigError::new(
                    format!("routes[{i}].canary.upstream"),
                    "is required (the canary endpoint set)",
                ))
            }
            (None, _) => None,
        };
        if r.canary.is_some()
            && filter
                .routes
                .iter()
                .any(|o| o.name == format!("{}-canary", r.name))
        {
            return Err(ConfigError::new(
                format!("routes[{i}].canary"),
                "clashes with a route named <name>-canary",
            ));
        }
        all.push(EnvoyRoute {
            name: r.name.clone(),
            timeout: up.timeout,
            retry: up.retry,
            lb_policy: up.lb_policy,
            endpoints: RouteEndpoints { stable, canary },
        });
    }
    Ok(all)
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

fn default_metrics_connections() -> u64 {
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

fn default_true() -> bool {
    true
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Value {
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

    fn parse(v: Value) -> Result<GatewayFile, ConfigError> {
        GatewayFile::from_value(v)
    }

    #[test]
    fn splits_the_file_and_keeps_the_secret_out() {
        let g = parse(sample()).unwrap();
        assert_eq!(g.filter.gateway.prefix, "/api/v1");
        assert_eq!(g.filter.passthrough_paths, vec!["/health"]);
        let jwt = g.filter.jwt.as_ref().unwrap();
        assert_eq!(
            jwt.secret, None,
            "read by the filter from its environment, never rendered"
        );
        assert_eq!(jwt.secret_env.as_deref(), Some("JWT_SECRET"));

        assert_eq!(jwt.clock_skew, 60);
        assert_eq!(g.filter.routes.len(), 2);
        assert!(!g.filter.routes[1].auth_required);
        assert_eq!(
            g.routes[0].endpoints.stable,
            vec![Endpoint {
                host: "127.0.0.1".into(),
                port: 8001
            }]
        );
        assert_eq!(g.routes[1].endpoints.stable.len(), 2);
        assert_eq!(g.routes[0].retry, 2);
        // The filter's JSON carries nothing only Envoy needs.
        let json = serde_json::to_value(&g.filter).unwrap();
        assert!(json["routes"][0].get("upstream").is_none());
        assert!(json["gateway"].get("port").is_none());
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
        type Mutate = Box<dyn Fn(&mut Value)>;
        let cases: Vec<(Mutate, &str)> = vec![
            (
                Box::new(|v| v["gateway"]["prefix"] = "api".into()),
                "gateway.prefix: must start with '/'",
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
            (
                Box::new(|v| v["gateway"]["prot"] = 1.into()),
                "gateway.prot: unknown field `prot`",
            ),
            (
                Box::new(|v| v["routes"][0]["upstreams"] = 1.into()),
                "routes[0].upstreams: unknown field `upstreams`",
            ),
            (
                Box::new(|v| v["routes"][0]["rate_limit"]["max_calls"] = "many".into()),
                "routes[0].rate_limit.max_calls: invalid type",
            ),
            (
                Box::new(|v| v["routes"][0]["rate_limit"]["max_calls"] = 0.into()),
                "routes[0].rate_limit.max_calls: must be 1 to",
            ),
            (
                Box::new(|v| v["routes"][0]["rate_limit"]["period"] = 0.into()),
                "routes[0].rate_limit.period: must be 1 to 86400",
            ),
            (
                Box::new(|v| {
                    v["gateway"]["limits"] =
                        serde_json::json!({"max_connections": 10, "max_connections_per_client": 11})
                }),
                "gateway.limits.max_connections_per_client: must not exceed max_connections",
            ),
            (
                Box::new(|v| v["gateway"]["limits"] = serde_json::json!({"request_timeout": 0})),
                "gateway.limits.request_timeout: must be a number of seconds",
            ),
            (
                Box::new(|v| v["gateway"]["rate_limit"] = serde_json::json!({"sync_interval": 0})),
                "gateway.rate_limit.sync_interval: must be 0.05 to 60 seconds",
            ),
            (
                Box::new(|v| v["revocation"] = serde_json::json!({})),
                "revocation: needs webdis",
            ),
            (
                Box::new(|v| {
                    v["webdis"] = "http://127.0.0.1:7379".into();
                    v["revocation"] = serde_json::json!({"cache_ttl": -1});
                }),
                "revocation.cache_ttl: must be 0 to 3600 seconds",
            ),
            (
                Box::new(|v| {
                    v["webdis"] = "http://127.0.0.1:7379".into();
                    v["logs"] = serde_json::json!({"store": {"retention": 0}});
                }),
                "logs.store.retention: must be 1 to",
            ),
            (
                Box::new(|v| v["gateway"]["health_path"] = "health".into()),
                "gateway.health_path: must start with '/'",
            ),
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
                Box::new(|v| v["routes"][0]["canary"] = serde_json::json!({"percent": 5})),
                "routes[0].canary.upstream: is required",
            ),
            (
                Box::new(|v| v["routes"][0]["canary"] = serde_json::json!({"upstream": 5})),
                "routes[0].canary.upstream",
            ),
            (
                Box::new(|v| v["gateway"]["admin"] = serde_json::json!({"port": 8000, "address": "0.0.0.0"})),
                "gateway.admin.port: must differ",
            ),
            (
                Box::new(|v| v["gateway"]["address"] = "localhost".into()),
                "gateway.address: \"localhost\" is not an IP address",
            ),
            (
                Box::new(|v| v["webdis"] = "https://x:1".into()),
                "webdis: \"https://x:1\" must start with http://",
            ),
            (
                Box::new(|v| v["gateway"]["cors"] = serde_json::json!({"allow_origins": ["*"]})),
                "gateway.cors.allow_origins: \"*\" with allow_credentials",
            ),
            (
                Box::new(|v| v["gateway"]["limits"] = serde_json::json!({"request_headers_timeout": 0})),
                "gateway.limits.request_headers_timeout: must be a number of seconds",
            ),
            (
                Box::new(|v| v["gateway"]["limits"] = serde_json::json!({"max_connections": 0})),
                "gateway.limits.max_connections: must be 1 to",
            ),
            (
                Box::new(|v| v["gateway"]["headers_with_underscores"] = "keep".into()),
                "gateway.headers_with_underscores: unknown variant `keep`",
            ),
        ];
        for (mutate, expected) in cases {
            let mut v = sample();
            mutate(&mut v);
            let err = parse(v).unwrap_err().to_string();
            assert!(err.contains(expected), "expected {expected:?}, got {err:?}");
        }
    }
}
