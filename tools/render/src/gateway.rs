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

mod model;
mod validate;
pub use model::*;
use validate::*;
pub use validate::{otlp_endpoint, parse_upstream};

/// The Envoy cluster the webdis address becomes.
pub const WEBDIS_CLUSTER: &str = "webdis";

/// The Envoy cluster of `logs.store.webdis`, the log store's own webdis.
pub const LOG_WEBDIS_CLUSTER: &str = "webdis-logs";
/// The replica-reading webdis of `redis_cluster.confirm`.
pub const CONFIRM_WEBDIS_CLUSTER: &str = "webdis-replica";

/// Keys of `gateway:` that only Envoy uses (the rest is the filter's: prefix, name, rate_limit).
const ENVOY_GATEWAY_KEYS: [&str; 17] = [
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
    "tls",
    "access_log",
    "tracing",
];
/// Keys of `routes[]` that only Envoy uses (besides `canary.upstream`).
const ENVOY_ROUTE_KEYS: [&str; 5] = ["upstream", "timeout", "retry", "lb_policy", "rbac"];

/// Prefix of the clusters made for `remote_jwks.uri`s.
pub const JWKS_CLUSTER_PREFIX: &str = "jwks_";
/// The tracer's collector cluster (`gateway.tracing`).
pub const OTLP_CLUSTER: &str = "otel_collector";
/// Prefix of the clusters made for `introspection.endpoint`s.
pub const INTROSPECTION_CLUSTER_PREFIX: &str = "introspect_";

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
        // Envoy's RBAC and access log read the filter's decisions: published when either is on.
        if upstreams.iter().any(|u| u.rbac.is_some()) || envoy_gateway.access_log.is_some() {
            gateway.insert("metadata".into(), Value::Bool(true));
        }
        root.insert("gateway".into(), Value::Object(gateway));
        root.insert(
            "passthrough_paths".into(),
            Value::Array(vec![Value::String(envoy_gateway.health_path.clone())]),
        );
        // Envoy's routes rendered here match on no request header the filter writes but the
        // canary's internal one, which the filter knows: the route is picked again only then.
        root.insert("routing_headers".into(), Value::Array(Vec::new()));
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
        if envoy_gateway.tracing.is_some() {
            if let Some(r) = filter.routes.iter().find(|r| r.name == OTLP_CLUSTER) {
                return Err(ConfigError::new(
                    "routes",
                    format!(
                        "a route named {:?} clashes with the tracer's collector cluster",
                        r.name
                    ),
                ));
            }
        }
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
            (
                Box::new(|v| {
                    v["routes"][0]["auth_required"] = false.into();
                    v["routes"][0]["rbac"] = serde_json::json!({"roles": ["admin"]});
                }),
                "routes[0].rbac: needs auth_required: true",
            ),
            (
                Box::new(|v| v["routes"][0]["rbac"] = serde_json::json!({"roles": ["a,b"]})),
                "routes[0].rbac.roles: must list roles",
            ),
            (
                Box::new(|v| v["routes"][0]["rbac"] = serde_json::json!({"roles": []})),
                "routes[0].rbac.roles: must list roles",
            ),
            (
                Box::new(|v| v["gateway"]["tracing"] = serde_json::json!({"otlp": "http://collector:0"})),
                "gateway.tracing.otlp",
            ),
            (
                Box::new(|v| v["gateway"]["tracing"] = serde_json::json!({"otlp": "http://c:4318/x?y"})),
                "gateway.tracing.otlp: must be an http(s)://host[:port] URL",
            ),
            (
                Box::new(|v| v["gateway"]["tracing"] = serde_json::json!({"otlp": "grpc://c:4317"})),
                "gateway.tracing.otlp: must be an http(s)://host[:port] URL",
            ),
            (
                Box::new(|v| {
                    v["gateway"]["tracing"] =
                        serde_json::json!({"otlp": "http://c:4318", "flush_interval": 0.0001})
                }),
                "gateway.tracing.flush_interval: must be at least 0.1 seconds",
            ),
            (
                Box::new(|v| {
                    v["gateway"]["tracing"] = serde_json::json!({"otlp": "http://c:4318"});
                    v["routes"][0]["name"] = "otel_collector".into();
                }),
                "clashes with the tracer's collector cluster",
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
