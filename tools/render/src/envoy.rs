//! Builds the Envoy bootstrap from a validated gateway file: listener with CORS, the wasm filter
//! (its JSON configuration embedded) and the router; one route per prefix; one cluster per route.

use gateway_filter::canary::{ROUTE_HEADER, ROUTE_VALUE};

use serde_json::{json, Value};

use crate::gateway::{
    AccessLog, Endpoint, EscapedSlashes, FailurePolicy, GatewayFile, LbPolicy, Rbac, Runtime, Tracing,
    UnderscoreAction, CONFIRM_WEBDIS_CLUSTER, LOG_WEBDIS_CLUSTER, WEBDIS_CLUSTER,
};

mod clusters;
mod http;
mod observe;
mod xds;
use clusters::*;
use http::*;
use observe::*;
pub use xds::*;

/// Tag extraction for the filter's metrics: the route, outcome, reason, scope... written into each
/// stat name in Istio's tag syntax (`route=.=user-service;.;outcome=.=allowed;.;gateway_requests_total`,
/// see `gateway_filter::stat`) become Prometheus labels of one family per measure
/// (`gateway_requests_total{route="user-service",outcome="allowed"}`), with the very regexes
/// Istio's bootstrap writes for its `extraStatTags`.
fn stats_tags() -> Value {
    let tags: Vec<Value> = gateway_filter::stat::TAGS
        .iter()
        .map(|tag| json!({"tag_name": tag, "regex": gateway_filter::stat::tag_regex(tag)}))
        .collect();
    Value::Array(tags)
}

/// Where Debian-based images (Envoy's included) keep the system's CA certificates: an
/// identity provider's key set over https is verified against them.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

/// Where the filter's `.wasm` lives, as Envoy will see it.
pub struct RenderOptions<'a> {
    pub wasm_path: &'a str,
    /// The native module (`gateway.runtime: native`); by default `libgateway_filter.so` beside
    /// the `.wasm`.
    pub native_path: Option<&'a str>,
}

impl RenderOptions<'_> {
    fn native_path(&self) -> String {
        match self.native_path {
            Some(p) => p.to_string(),
            None => match self.wasm_path.rsplit_once('/') {
                Some((dir, _)) => format!("{dir}/libgateway_filter.so"),
                None => "libgateway_filter.so".to_string(),
            },
        }
    }
}

/// Names used in the bootstrap, documented in the README.
pub const PLUGIN_NAME: &str = "gateway";
/// The HTTP filter's name with `gateway.runtime: native` (Envoy's dynamic-modules filter).
pub const NATIVE_FILTER_NAME: &str = "envoy.filters.http.dynamic_modules";
/// The same module as a network filter: connections per client.
pub const CONNECTIONS_PLUGIN_NAME: &str = "gateway-connections";
/// The Redis Cluster behind the `redis_proxy` listener (`redis_cluster:`).
pub const REDIS_CLUSTER: &str = "redis_cluster";
pub const LISTENER_NAME: &str = "gateway";
/// The cluster the metrics listener reaches the admin interface through.
pub const ADMIN_CLUSTER: &str = "envoy-admin";
/// Connections of the `redis_proxy` listener (webdis's pools, and `redis-cli`).
const REDIS_LISTENER_CONNECTIONS: u64 = 1024;

fn seconds(s: f64) -> String {
    // Envoy durations: up to nanosecond precision; keep it readable.
    let ms = (s * 1000.0).round() as u64;
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{}.{:03}s", ms / 1000, ms % 1000)
    }
}

/// The canary cluster (and Envoy route) of a route.
pub fn canary_cluster(route: &str) -> String {
    format!("{route}-canary")
}

fn socket(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

/// A listener with one filter chain of one network filter.
fn listener(name: &str, address: Value, filter: Value) -> Value {
    json!({"name": name, "address": address, "filter_chains": [{"filters": [filter]}]})
}

fn json_error(error: &str, message: &str) -> Value {
    json!({"json_format": {"error": error, "message": message, "trace_id": "%REQ(X-TRACE-ID)%"}})
}

/// `gateway.tls` as Envoy's downstream TLS context. With a client CA, Envoy asks for a client
/// certificate and verifies it; the filter reads its SHA-256
/// (`connection.sha256_peer_certificate_digest`) for certificate-bound tokens.
fn downstream_tls(tls: &crate::gateway::Tls) -> Value {
    let mut context = json!({
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_certificates": [{
                "certificate_chain": {"filename": tls.certificate},
                "private_key": {"filename": tls.private_key},
            }],
        },
        "require_client_certificate": tls.require_client_certificate,
    });
    if let Some(ca) = &tls.client_ca {
        context["common_tls_context"]["validation_context"] = json!({"trusted_ca": {"filename": ca}});
    }
    json!({"name": "envoy.transport_sockets.tls", "typed_config": context})
}

/// The bootstrap as a JSON value (serialized to YAML by the caller).
pub fn bootstrap(file: &GatewayFile, opts: &RenderOptions) -> Result<Value, String> {
    let g = &file.gateway;
    let filter_json = serde_json::to_string(&file.filter).map_err(|e| e.to_string())?;
    let vm_config = vm_config(file, opts);
    // Native: the same policy in-process; secrets come from Envoy's environment by the same
    // `*_env` names, and the module stays loaded for the process's life (its shared state).
    let module = GatewayModule {
        runtime: g.runtime,
        vm_config: &vm_config,
        failure_policy: failure_policy(g),
        native_path: opts.native_path(),
    };
    let (vhost, cors) = virtual_host(file);
    let hcm = connection_manager(file, vhost, http_filters(file, &module, cors, filter_json));
    let network_filters = network_filters(file, &module, hcm);
    let mut clusters = upstream_clusters(file);
    clusters.extend(webdis_clusters(file));
    clusters.extend(jwks_clusters(file));
    clusters.extend(g.tracing.as_ref().and_then(|t| tracing_cluster(file, t)));
    for cluster in &mut clusters {
        cluster["per_connection_buffer_limit_bytes"] = json!(g.limits.buffer_limit_bytes);
    }
    let listener_budgets = listener_budgets(file);
    // The admin interface: a Unix socket only Envoy's user can open (mode 0600), or TCP.
    let admin_address = match &g.admin.socket {
        Some(path) => json!({"pipe": {"path": path, "mode": 0o600}}),
        None => socket(&g.admin.address, g.admin.port),
    };
    let mut chain = json!({"filters": network_filters});
    if let Some(tls) = &g.tls {
        chain["transport_socket"] = downstream_tls(tls);
    }
    let mut listeners = vec![json!({
        "name": LISTENER_NAME,
        "address": socket(&g.address, g.port),
        "per_connection_buffer_limit_bytes": g.limits.buffer_limit_bytes,
        "filter_chains": [chain],
    })];
    if let Some(m) = &g.metrics {
        let (listener, cluster) = metrics_listener(m, &admin_address);
        listeners.push(listener);
        clusters.push(cluster);
    }
    if let Some((redis_listeners, cluster)) = redis_proxy(file) {
        listeners.extend(redis_listeners);
        clusters.push(cluster);
    }
    let mut bootstrap = json!({
        // Envoy's SDS subscriptions (the native module's `secret_sds`) need a node id and
        // cluster (`Config::Utility::checkLocalInfo`).
        "node": {"id": file.filter.gateway.name, "cluster": file.filter.gateway.name},
        "overload_manager": overload(g, &listener_budgets),
        "stats_config": {"stats_tags": stats_tags()},
        "admin": {"address": admin_address},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    });
    bootstrap["layered_runtime"] = runtime_layer(g, &listener_budgets);
    if g.limits.memory_release_mb > 0 {
        // Free heap goes back to the system in the background: V8's compilation of the module
        // frees most of what it allocated, which tcmalloc would otherwise keep (README
        // "Memory").
        bootstrap["memory_allocator_manager"] = json!({
            "bytes_to_release": g.limits.memory_release_mb.saturating_mul(1 << 20),
            "memory_release_interval": "1s",
        });
    }
    Ok(bootstrap)
}

fn listener_budgets(file: &GatewayFile) -> Vec<(&'static str, u64)> {
    let g = &file.gateway;
    // Each listener's own connection limit (Envoy's `envoy.resource_limits.listener.<name>.
    // connection_limit`, checked at accept before the process-wide one): the gateway's clients
    // cannot take the metrics listener's connections, so /ready answers while they fill theirs.
    let mut listener_budgets: Vec<(&'static str, u64)> = vec![(LISTENER_NAME, g.limits.max_connections)];
    if let Some(m) = &g.metrics {
        listener_budgets.push(("metrics", m.max_connections));
    }
    if let Some(r) = file.redis_cluster.as_ref().filter(|r| r.endpoints.is_some()) {
        listener_budgets.push(("redis", REDIS_LISTENER_CONNECTIONS));
        if r.confirm.is_some() {
            listener_budgets.push(("redis_replica", REDIS_LISTENER_CONNECTIONS));
        }
    }
    listener_budgets
}

/// The overload manager: the heap bound and its actions, every listener's budget together.
fn overload(g: &crate::gateway::Gateway, listener_budgets: &[(&str, u64)]) -> Value {
    json!({
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {"name": "envoy.resource_monitors.fixed_heap", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                "max_heap_size_bytes": g.limits.max_heap_mb.saturating_mul(1 << 20)}},
            // Every listener's budget together (each listener has its own limit below).
            {"name": "envoy.resource_monitors.global_downstream_max_connections", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": listener_budgets.iter().map(|(_, n)| n).sum::<u64>()}},
        ],
        "actions": [
            {"name": "envoy.overload_actions.shrink_heap",
             "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.95}}]},
            {"name": "envoy.overload_actions.stop_accepting_requests",
             "triggers": [{"name": "envoy.resource_monitors.fixed_heap", "threshold": {"value": 0.98}}]},
            // Timeouts that shrink under load: from 85% of the heap to 95%, idle connections
            // and idle requests get down to a tenth of their timeouts. (Envoy's connection
            // count cannot drive this: it is a proactive monitor, which triggers ignore; the
            // per-client cap below is what keeps one client from holding every connection.)
            {"name": "envoy.overload_actions.reduce_timeouts",
             "triggers": [{"name": "envoy.resource_monitors.fixed_heap",
                           "scaled": {"scaling_threshold": 0.85, "saturation_threshold": 0.95}}],
             "typed_config": {
                "@type": "type.googleapis.com/envoy.config.overload.v3.ScaleTimersOverloadActionConfig",
                "timer_scale_factors": [
                    {"timer": "HTTP_DOWNSTREAM_CONNECTION_IDLE", "min_scale": {"value": 10}},
                    {"timer": "HTTP_DOWNSTREAM_STREAM_IDLE", "min_scale": {"value": 10}},
                ]}},
        ],
    })
}

/// The runtime layer: the callout answer bound, each listener's connection limit, the native
/// module's stat prefix.
fn runtime_layer(g: &crate::gateway::Gateway, listener_budgets: &[(&str, u64)]) -> Value {
    let mut runtime = serde_json::Map::new();
    // The largest answer Envoy buffers for a filter's callout (its async client's default is
    // 32 MiB, process-wide; a cluster's per_connection_buffer_limit_bytes does not bound it: the
    // async stream ignores watermarks, async_client_impl.h). Set to the largest answer the filter
    // reads (a log query); a key server's larger answer is cut by Envoy, and the filter already
    // refuses any key set over its own bound (256 KiB).
    runtime.insert(
        "http.async_response_buffer_limit".into(),
        json!(gateway_filter::pipeline::MAX_STORE_REPLY_BYTES),
    );
    for (name, budget) in listener_budgets {
        runtime.insert(
            format!("envoy.resource_limits.listener.{name}.connection_limit"),
            json!(budget),
        );
    }
    if let Some(t) = &g.tracing {
        tracing_runtime(t, &mut runtime);
    }
    if g.runtime == Runtime::Native {
        // The native module's metrics carry Envoy's dynamic-modules namespace; with this guard
        // Prometheus drops it as it drops `wasmcustom`, so both builds export the same families
        // (`gateway_requests_total{route,outcome}`), and the dashboard reads either.
        runtime.insert(
            "envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix".into(),
            json!(true),
        );
    }
    json!({"layers": [{"name": "gateway", "static_layer": runtime}]})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(yaml: &str) -> Value {
        let file = GatewayFile::parse(yaml).unwrap();
        bootstrap(
            &file,
            &RenderOptions {
                wasm_path: "/x.wasm",
                native_path: None,
            },
        )
        .unwrap()
    }

    const YAML: &str = r#"
gateway: {port: 8000, prefix: /api/v1, cors: {allow_origins: ["https://app.example"]}}
jwt: {secret_env: JWT_SECRET}
routes:
  - {name: users, prefix: /users, upstream: "http://127.0.0.1:8001", timeout: 5, retry: 2}
  - {name: orders, prefix: /orders, upstream: ["http://orders-a:8002", "http://orders-b:8002"], timeout: 0.5, retry: 0}
  - {name: order-items, prefix: /orders/items, upstream: "http://127.0.0.1:8009",
     canary: {upstream: "http://127.0.0.1:8010", percent: 10, users: [user-001], header: X-Canary}}
"#;

    #[test]
    fn xds_files_name_their_content_version() {
        let files = |yaml: &str| xds(&render(yaml), "/x").unwrap().1;
        let version = |fs: &Vec<(&str, Value)>, name: &str| {
            fs.iter().find(|(n, _)| *n == name).unwrap().1["version_info"]
                .as_str()
                .unwrap()
                .to_owned()
        };
        let (a, b) = (files(YAML), files(YAML));
        let changed = files(&YAML.replace("timeout: 5, retry: 2", "timeout: 6, retry: 2"));
        for name in ["lds.json", "cds.json", "rds.json", "ecds.json"] {
            assert_eq!(version(&a, name).len(), 16, "{name}");
            assert_eq!(
                version(&a, name),
                version(&b, name),
                "{name}: same content, same version"
            );
        }
        assert_ne!(version(&a, "rds.json"), version(&changed, "rds.json"));
        assert_eq!(version(&a, "cds.json"), version(&changed, "cds.json"));
    }

    fn hcm(v: &Value) -> &Value {
        let filters = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            .as_array()
            .unwrap();
        let last = filters.last().unwrap();
        assert_eq!(last["name"], "envoy.filters.network.http_connection_manager");
        &last["typed_config"]
    }

    #[test]
    fn confirm_reads_revocations_back_from_replicas_through_a_second_webdis() {
        let file = "gateway: {prefix: /api/v1}\njwt: {secret_env: S}\nwebdis: http://127.0.0.1:7379\nrevocation: {timeout: 0.3}\nredis_cluster:\n  listen: \"127.0.0.1:6390\"\n  seeds: [\"127.0.0.1:7001\"]\n  confirm: {listen: \"127.0.0.1:6391\", webdis: \"http://127.0.0.1:7380\", timeout: 2}\nroutes:\n  - {name: a, prefix: /a, upstream: \"http://127.0.0.1:9000\", auth_required: false}\n";
        let v = render(file);
        let listeners = v["static_resources"]["listeners"].as_array().unwrap();
        let replica = listeners.iter().find(|l| l["name"] == "redis_replica").unwrap();
        assert_eq!(replica["address"]["socket_address"]["port_value"], 6391);
        let settings = &replica["filter_chains"][0]["filters"][0]["typed_config"]["settings"];
        assert_eq!(settings["read_policy"], "REPLICA");
        assert_eq!(settings["enable_redirection"], false);
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let webdis = clusters
            .iter()
            .find(|c| c["name"] == CONFIRM_WEBDIS_CLUSTER)
            .unwrap();
        assert_eq!(
            webdis["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"],
            7380
        );
        let filters = hcm(&v)["http_filters"].as_array().unwrap();
        let wasm = filters
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.wasm")
            .unwrap();
        let filter: Value = serde_json::from_str(
            wasm["typed_config"]["config"]["configuration"]["value"]
                .as_str()
                .unwrap(),
        )
        .unwrap();
        assert_eq!(
            filter["revocation"]["confirm"],
            json!({"cluster": CONFIRM_WEBDIS_CLUSTER, "timeout": 2.0})
        );
        let runtime = &v["layered_runtime"]["layers"][0]["static_layer"];
        assert_eq!(
            runtime["envoy.resource_limits.listener.redis_replica.connection_limit"],
            REDIS_LISTENER_CONNECTIONS
        );
        // Errors name the field.
        for (from, to, field) in [
            ("6391", "6390", "redis_cluster.confirm.listen"),
            ("http://127.0.0.1:7380", "ftp://x", "redis_cluster.confirm.webdis"),
            ("timeout: 2}", "timeout: 0}", "redis_cluster.confirm.timeout"),
            ("revocation: {timeout: 0.3}\n", "", "redis_cluster.confirm"),
            ("timeout: 2}", "timeout: 2, tries: 3}", "redis_cluster.confirm"),
            (
                "http://127.0.0.1:7380",
                "http://127.0.0.1:7379",
                "redis_cluster.confirm.webdis",
            ),
            (
                "listen: \"127.0.0.1:6391\"",
                "listen: \"10.0.0.5:6391\"",
                "redis_cluster.confirm.listen",
            ),
            (
                "listen: \"127.0.0.1:6390\"",
                "listen: \"0.0.0.0:6390\"",
                "redis_cluster.listen",
            ),
        ] {
            let e = crate::gateway::GatewayFile::parse(&file.replace(from, to))
                .err()
                .unwrap();
            assert!(e.field.starts_with(field), "{from} -> {to}: {e:?}");
        }
    }

    #[test]
    fn a_redis_cluster_gets_envoys_redis_proxy() {
        let v = render(
            "gateway: {prefix: /api/v1}\nwebdis: http://127.0.0.1:7379\nredis_cluster: {listen: \"127.0.0.1:6390\", seeds: [\"127.0.0.1:7001\", \"127.0.0.1:7002\"]}\nroutes:\n  - {name: a, prefix: /a, upstream: \"http://127.0.0.1:9000\", auth_required: false}\n",
        );
        let listeners = v["static_resources"]["listeners"].as_array().unwrap();
        let redis = listeners.iter().find(|l| l["name"] == "redis").unwrap();
        assert_eq!(redis["address"]["socket_address"]["port_value"], 6390);
        let proxy = &redis["filter_chains"][0]["filters"][0];
        assert_eq!(proxy["name"], "envoy.filters.network.redis_proxy");
        assert_eq!(
            proxy["typed_config"]["prefix_routes"]["catch_all_route"]["cluster"],
            REDIS_CLUSTER
        );
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let cluster = clusters.iter().find(|c| c["name"] == REDIS_CLUSTER).unwrap();
        assert_eq!(cluster["cluster_type"]["name"], "envoy.clusters.redis");
        assert_eq!(
            cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn routes_timeouts_and_retries() {
        let v = render(YAML);
        let routes = &hcm(&v)["route_config"]["virtual_hosts"][0]["routes"];
        let names: Vec<&str> = routes
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert_eq!(
            names,
            [
                "order-items-canary",
                "order-items",
                "orders",
                "users",
                "health",
                "not_found"
            ],
            "most specific first, canary before stable"
        );
        let canary = &routes[0];
        assert_eq!(canary["match"]["headers"][0]["name"], "x-gateway-canary");
        assert_eq!(canary["route"]["cluster"], "order-items-canary");
        assert_eq!(canary["request_headers_to_remove"][0], "x-gateway-canary");
        let users = &routes[3];
        assert_eq!(users["match"]["path_separated_prefix"], "/api/v1/users");
        assert_eq!(users["route"]["timeout"], "5s");
        assert_eq!(users["route"]["retry_policy"]["num_retries"], 2);
        let orders = &routes[2];
        assert_eq!(orders["route"]["timeout"], "0.500s");
        assert!(
            orders["route"].get("retry_policy").is_none(),
            "retry: 0 means no retries"
        );
        assert_eq!(routes[4]["match"]["path"], "/health");
        assert_eq!(routes[5]["name"], "not_found");
    }

    #[test]
    fn clusters_and_filter_chain() {
        let v = render(YAML);
        let clusters = &v["static_resources"]["clusters"];
        assert_eq!(clusters[0]["type"], "STATIC");
        assert_eq!(clusters[1]["type"], "STRICT_DNS");
        assert_eq!(
            clusters[1]["load_assignment"]["endpoints"][0]["lb_endpoints"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(clusters[0]["circuit_breakers"]["thresholds"][0]["max_retries"], 3);
        assert_eq!(clusters[0]["outlier_detection"]["consecutive_5xx"], 5);
        let filters = hcm(&v)["http_filters"].as_array().unwrap();
        let names: Vec<&str> = filters.iter().map(|f| f["name"].as_str().unwrap()).collect();
        assert_eq!(
            names,
            [
                "envoy.filters.http.cors",
                "envoy.filters.http.wasm",
                "envoy.filters.http.buffer",
                "envoy.filters.http.router"
            ]
        );
        let wasm = &filters[1]["typed_config"]["config"];
        assert_eq!(wasm["failure_policy"], "FAIL_RELOAD");
        let embedded: gateway_filter::config::FilterConfig =
            serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(embedded.routes.len(), 3);
        let jwt = embedded.jwt.unwrap();
        assert_eq!(
            (jwt.secret, jwt.secret_env.as_deref()),
            (None, Some("JWT_SECRET"))
        );
        assert_eq!(
            wasm["vm_config"]["environment_variables"]["host_env_keys"][0],
            "JWT_SECRET"
        );
        assert_eq!(v["admin"]["address"]["socket_address"]["port_value"], 9901);
    }

    #[test]
    fn duration_formatting() {
        assert_eq!(seconds(30.0), "30s");
        assert_eq!(seconds(0.25), "0.250s");
        assert_eq!(seconds(1.5), "1.500s");
    }

    #[test]
    fn edge_hardening_is_rendered() {
        let v = render(YAML);
        let h = hcm(&v);
        assert_eq!(h["request_headers_timeout"], "10s");
        assert_eq!(h["stream_idle_timeout"], "60s");
        assert_eq!(h["common_http_protocol_options"]["idle_timeout"], "300s");
        assert_eq!(
            h["common_http_protocol_options"]["headers_with_underscores_action"],
            "DROP_HEADER"
        );
        assert_eq!(h["path_with_escaped_slashes_action"], "REJECT_REQUEST");
        assert_eq!(h["http2_protocol_options"]["max_concurrent_streams"], 100);
        let om = &v["overload_manager"];
        assert_eq!(
            om["resource_monitors"][1]["typed_config"]["max_active_downstream_connections"],
            10_000
        );
        assert_eq!(
            om["resource_monitors"][0]["typed_config"]["max_heap_size_bytes"],
            1024u64 << 20
        );
        assert_eq!(
            v["memory_allocator_manager"],
            json!({"bytes_to_release": 16u64 << 20, "memory_release_interval": "1s"})
        );
        let listener = &v["static_resources"]["listeners"][0];
        assert_eq!(listener["per_connection_buffer_limit_bytes"], 32_768);
        let v = render(&YAML.replace(
            "gateway: {port: 8000, prefix: /api/v1, cors: {allow_origins: [\"https://app.example\"]}}",
            "gateway: {port: 8000, prefix: /api/v1, headers_with_underscores: reject, escaped_slashes: redirect,\n  limits: {request_headers_timeout: 1.5, memory_release_mb: 0}}",
        ));
        assert!(
            v.get("memory_allocator_manager").is_none(),
            "0: Envoy's default, no release"
        );
        let h = hcm(&v);
        assert_eq!(h["request_headers_timeout"], "1.500s");
        assert_eq!(
            h["common_http_protocol_options"]["headers_with_underscores_action"],
            "REJECT_REQUEST"
        );
        assert_eq!(h["path_with_escaped_slashes_action"], "UNESCAPE_AND_REDIRECT");
        let filters: Vec<&str> = h["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["name"].as_str().unwrap())
            .collect();
        assert!(
            !filters.contains(&"envoy.filters.http.cors"),
            "no origins listed: no CORS"
        );
    }

    #[test]
    fn one_client_cannot_hold_every_connection_or_upstream_slot() {
        let v = render(YAML);
        let h = hcm(&v);
        assert_eq!(h["request_timeout"], "60s");
        assert_eq!(
            h["common_http_protocol_options"]["max_connection_duration"],
            "3600s"
        );
        let buffer = h["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.buffer")
            .unwrap();
        assert_eq!(buffer["typed_config"]["max_request_bytes"], 1024 * 1024);
        let actions = v["overload_manager"]["actions"].as_array().unwrap();
        let reduce = actions
            .iter()
            .find(|a| a["name"] == "envoy.overload_actions.reduce_timeouts")
            .unwrap();
        assert_eq!(reduce["triggers"][0]["scaled"]["scaling_threshold"], 0.85);
        // Clients connect directly: the module also runs as a network filter, a tenth of
        // max_connections per client, sharing the HTTP filter's VM.
        let filters = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            .as_array()
            .unwrap();
        assert_eq!(filters[0]["name"], "envoy.filters.network.wasm");
        let cfg = &filters[0]["typed_config"]["config"];
        let settings: Value = serde_json::from_str(cfg["configuration"]["value"].as_str().unwrap()).unwrap();
        assert_eq!(settings["connections"]["max_per_client"], 1000);
        assert_eq!(settings["connections"]["max_age"], 3660);
        // Fourth attack: silent sockets closed after 5 s; the last tenth of the listener's
        // connections only for clients holding none; the listener's own limit, the metrics
        // listener's own, the process-wide one their sum.
        assert_eq!(settings["connections"]["first_byte_timeout"], 5.0);
        assert_eq!(settings["connections"]["budget"], 10_000);
        assert_eq!(settings["connections"]["reserve"], 1_000);
        let rt = &v["layered_runtime"]["layers"][0]["static_layer"];
        assert_eq!(
            rt["envoy.resource_limits.listener.gateway.connection_limit"],
            10_000
        );
        assert_eq!(rt["http.async_response_buffer_limit"], 4 << 20);
        // A client's X-Forwarded-For is removed before Envoy appends the peer.
        assert_eq!(
            hcm(&v)["early_header_mutation_extensions"][0]["typed_config"]["mutations"][0]["remove"],
            "x-forwarded-for"
        );
        let http_vm = &hcm(&v)["http_filters"][1]["typed_config"]["config"]["vm_config"];
        assert_eq!(&cfg["vm_config"], http_vm);
        assert!(gateway_filter::connlimit::ConnectionLimit::from_json(
            cfg["configuration"]["value"].as_str().unwrap().as_bytes()
        )
        .is_some_and(|r| r.is_ok()));
        // Behind proxies (or 0): no per-client cap and no reserve, the first-byte bound stays;
        // with that off too, no network filter.
        for (from, to) in [
            (
                "prefix: /api/v1,",
                "prefix: /api/v1, rate_limit: {trusted_hops: 1},",
            ),
            (
                "prefix: /api/v1,",
                "prefix: /api/v1, limits: {max_connections_per_client: 0, max_request_body_kb: 0},",
            ),
        ] {
            let v = render(&YAML.replace(from, to));
            let filters = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
                .as_array()
                .unwrap();
            assert_eq!(filters.len(), 2, "{to}");
            let cfg = &filters[0]["typed_config"]["config"]["configuration"]["value"];
            let settings: Value = serde_json::from_str(cfg.as_str().unwrap()).unwrap();
            assert_eq!(settings["connections"]["max_per_client"], 10_000, "{to}");
            assert!(settings["connections"].get("budget").is_none(), "{to}");
            if to.contains("trusted_hops") {
                assert!(hcm(&v).get("early_header_mutation_extensions").is_none());
            }
        }
        let v = render(&YAML.replace(
            "prefix: /api/v1,",
            "prefix: /api/v1, limits: {max_connections_per_client: 0, first_byte_timeout: 0},",
        ));
        let filters = v["static_resources"]["listeners"][0]["filter_chains"][0]["filters"]
            .as_array()
            .unwrap();
        assert_eq!(filters.len(), 1);
        let v = render(&YAML.replace(
            "prefix: /api/v1,",
            "prefix: /api/v1, limits: {max_request_body_kb: 0},",
        ));
        assert!(!hcm(&v)["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["name"] == "envoy.filters.http.buffer"));
    }

    #[test]
    fn admin_on_a_private_socket_and_a_metrics_listener() {
        let v = render(&YAML.replace(
            "gateway: {port: 8000, prefix: /api/v1,",
            "gateway: {port: 8000, prefix: /api/v1, admin: {socket: /run/gw/admin.sock}, metrics: {port: 9902},",
        ));
        assert_eq!(v["admin"]["address"]["pipe"]["path"], "/run/gw/admin.sock");
        assert_eq!(v["admin"]["address"]["pipe"]["mode"], 0o600);
        let metrics = &v["static_resources"]["listeners"][1];
        assert_eq!(metrics["address"]["socket_address"]["port_value"], 9902);
        let rt = &v["layered_runtime"]["layers"][0]["static_layer"];
        assert_eq!(rt["envoy.resource_limits.listener.metrics.connection_limit"], 64);
        let total = &v["overload_manager"]["resource_monitors"][1]["typed_config"]
            ["max_active_downstream_connections"];
        assert_eq!(total, 10_000 + 64);
        let routes = &metrics["filter_chains"][0]["filters"][0]["typed_config"]["route_config"]
            ["virtual_hosts"][0]["routes"];
        assert_eq!(routes[0]["match"]["path"], "/stats/prometheus");
        assert_eq!(
            routes[2]["direct_response"]["status"], 404,
            "nothing else of the admin interface"
        );
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let admin = clusters.iter().find(|c| c["name"] == ADMIN_CLUSTER).unwrap();
        assert_eq!(
            admin["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["pipe"]
                ["path"],
            "/run/gw/admin.sock"
        );
    }

    #[test]
    fn identity_providers_get_clusters_and_secrets_stay_in_the_environment() {
        let yaml = r#"
gateway: {port: 8000, prefix: /api/v1}
jwt:
  secret_env: JWT_SECRET
  issuers:
    - name: demo-idp
      issuer: http://127.0.0.1:8005
      algorithms: [RS256, ES256, EdDSA]
      remote_jwks: {uri: "http://127.0.0.1:8005/.well-known/jwks.json", refresh_interval: 5}
    - name: corp
      issuer: https://login.example.com/realms/corp
      algorithms: [RS256]
      remote_jwks: {uri: "https://login.example.com/realms/corp/protocol/openid-connect/certs"}
    - name: partner
      issuer: partner
      algorithms: [HS512]
      secret_env: PARTNER_SECRET
    - name: mesh
      issuer: mesh
      algorithms: [ES256]
      remote_jwks: {uri: "http://jwks.mesh:80/keys", cluster: "outbound.80._.jwks.mesh"}
routes:
  - {name: users, prefix: /users, upstream: "http://127.0.0.1:8001"}
"#;
        let v = render(yaml);
        let clusters = v["static_resources"]["clusters"].as_array().unwrap();
        let find = |name: &str| clusters.iter().find(|c| c["name"] == name).cloned();
        let demo = find("jwks_demo-idp").unwrap();
        assert_eq!(demo["type"], "STATIC");
        assert_eq!(
            demo["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"],
            8005
        );
        assert!(demo.get("transport_socket").is_none());
        let corp = find("jwks_corp").unwrap();
        assert_eq!(corp["type"], "STRICT_DNS");
        assert_eq!(
            corp["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                ["socket_address"]["port_value"],
            443
        );
        assert_eq!(
            corp["transport_socket"]["typed_config"]["sni"],
            "login.example.com"
        );
        assert!(find("jwks_mesh").is_none(), "a named cluster is the operator's");
        let wasm = &hcm(&v)["http_filters"]
            .as_array()
            .unwrap()
            .iter()
            .find(|f| f["name"] == "envoy.filters.http.wasm")
            .unwrap()["typed_config"]["config"];
        assert_eq!(
            wasm["vm_config"]["environment_variables"]["host_env_keys"],
            json!(["JWT_SECRET", "PARTNER_SECRET"])
        );
        let filter: Value = serde_json::from_str(wasm["configuration"]["value"].as_str().unwrap()).unwrap();
        let issuers = &filter["jwt"]["issuers"];
        assert_eq!(issuers[0]["remote_jwks"]["cluster"], "jwks_demo-idp");
        assert_eq!(issuers[3]["remote_jwks"]["cluster"], "outbound.80._.jwks.mesh");
        // A route cannot take a key-set cluster's name.
        let clash = yaml.replace("name: users", "name: jwks_corp");
        let err = GatewayFile::parse(&clash).unwrap_err();
        assert!(err.message.contains("clashes"), "{err:?}");
    }
}
