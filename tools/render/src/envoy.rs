//! Builds the Envoy bootstrap from a validated gateway file: listener with CORS, the wasm filter
//! (its JSON configuration embedded) and the router; one route per prefix; one cluster per route.

use gateway_filter::canary::{ROUTE_HEADER, ROUTE_VALUE};

use serde_json::{json, Value};

use crate::gateway::{
    Endpoint, EscapedSlashes, FailurePolicy, GatewayFile, LbPolicy, Runtime, UnderscoreAction,
    CONFIRM_WEBDIS_CLUSTER, LOG_WEBDIS_CLUSTER, WEBDIS_CLUSTER,
};

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

/// The gateway as an Envoy filter, in either runtime: the `.wasm` in a V8 VM, or the native
/// module (`dynamic_modules`, kept loaded for the process's life).
struct GatewayModule<'a> {
    runtime: Runtime,
    vm_config: &'a Value,
    failure_policy: &'a str,
    native_path: String,
}

impl GatewayModule<'_> {
    /// The filter of `layer` (`http` or `network`) named `name` (its root id, or the module's
    /// filter name), configured with the JSON `configuration`.
    fn filter(&self, layer: &str, name: &str, configuration: String) -> Value {
        let configuration =
            json!({"@type": "type.googleapis.com/google.protobuf.StringValue", "value": configuration});
        match self.runtime {
            Runtime::Wasm => json!({
                "name": format!("envoy.filters.{layer}.wasm"),
                "typed_config": {
                    "@type": format!("type.googleapis.com/envoy.extensions.filters.{layer}.wasm.v3.Wasm"),
                    "config": {
                        "name": name,
                        "root_id": name,
                        "vm_config": self.vm_config,
                        "configuration": configuration,
                        "failure_policy": self.failure_policy,
                    }
                }
            }),
            Runtime::Native => {
                let kind = if layer == "http" {
                    "DynamicModuleFilter"
                } else {
                    "DynamicModuleNetworkFilter"
                };
                json!({
                    "name": format!("envoy.filters.{layer}.dynamic_modules"),
                    "typed_config": {
                        "@type": format!("type.googleapis.com/envoy.extensions.filters.{layer}.dynamic_modules.v3.{kind}"),
                        "dynamic_module_config": {
                            "module": {"local": {"filename": self.native_path}},
                            "do_not_close": true,
                        },
                        "filter_name": name,
                        "filter_config": configuration,
                    }
                })
            }
        }
    }
}

/// A listener with one filter chain of one network filter.
fn listener(name: &str, address: Value, filter: Value) -> Value {
    json!({"name": name, "address": address, "filter_chains": [{"filters": [filter]}]})
}

fn json_error(error: &str, message: &str) -> Value {
    json!({"json_format": {"error": error, "message": message, "trace_id": "%REQ(X-TRACE-ID)%"}})
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
    for cluster in &mut clusters {
        cluster["per_connection_buffer_limit_bytes"] = json!(g.limits.buffer_limit_bytes);
    }
    let listener_budgets = listener_budgets(file);
    // The admin interface: a Unix socket only Envoy's user can open (mode 0600), or TCP.
    let admin_address = match &g.admin.socket {
        Some(path) => json!({"pipe": {"path": path, "mode": 0o600}}),
        None => socket(&g.admin.address, g.admin.port),
    };
    let mut listeners = vec![json!({
        "name": LISTENER_NAME,
        "address": socket(&g.address, g.port),
        "per_connection_buffer_limit_bytes": g.limits.buffer_limit_bytes,
        "filter_chains": [{"filters": network_filters}],
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
        "overload_manager": overload(g, &listener_budgets),
        "stats_config": {"stats_tags": stats_tags()},
        "admin": {"address": admin_address},
        "static_resources": {
            "listeners": listeners,
            "clusters": clusters,
        },
    });
    bootstrap["layered_runtime"] = runtime_layer(g, &listener_budgets);
    Ok(bootstrap)
}

/// The routes, most specific prefix first (the filter's order), then health and 404; with CORS,
/// the virtual host's policy and the CORS filter that applies it.
fn virtual_host(file: &GatewayFile) -> (Value, Option<Value>) {
    let g = &file.gateway;
    // Route order must match the filter's: most specific prefix first.
    let validated = &file.config;
    let mut routes: Vec<Value> = Vec::new();
    for vr in &validated.routes {
        let Some(r) = file.routes.iter().find(|r| r.name == vr.name) else {
            continue;
        };
        let matcher = if vr.full_prefix == "/" {
            json!({"prefix": "/"})
        } else {
            json!({"path_separated_prefix": vr.full_prefix})
        };
        let mut action = json!({"cluster": r.name, "timeout": seconds(r.timeout)});
        if r.retry > 0 {
            action["retry_policy"] = json!({
                "retry_on": "connect-failure,refused-stream,reset",
                "num_retries": r.retry,
            });
        }
        if r.endpoints.canary.is_some() {
            // Matched first when the filter has chosen the canary; the internal header goes no further.
            let mut canary_match = matcher.clone();
            canary_match["headers"] = json!([{"name": ROUTE_HEADER, "string_match": {"exact": ROUTE_VALUE}}]);
            let mut canary_action = action.clone();
            canary_action["cluster"] = json!(canary_cluster(&r.name));
            routes.push(json!({
                "name": canary_cluster(&r.name),
                "match": canary_match,
                "route": canary_action,
                "request_headers_to_remove": [ROUTE_HEADER],
            }));
        }
        routes.push(json!({"name": r.name, "match": matcher, "route": action}));
    }
    routes.push(json!({
        "name": "health",
        "match": {"path": g.health_path},
        "direct_response": {"status": 200, "body": {"inline_string": "{\"status\":\"healthy\",\"service\":\"api-gateway\"}"}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }));
    routes.push(json!({
        "name": "not_found",
        "match": {"prefix": "/"},
        "direct_response": {"status": 404, "body": {"inline_string": "{\"error\":\"Not Found\",\"message\":\"Route not found\"}"}},
        "response_headers_to_add": [{"header": {"key": "content-type", "value": "application/json"}}],
    }));

    let mut vhost = json!({"name": "gateway", "domains": ["*"], "routes": routes});
    let mut cors = None;
    if g.cors.active() {
        let origins: Vec<Value> = g
            .cors
            .allow_origins
            .iter()
            .map(|o| {
                if o == "*" {
                    json!({"safe_regex": {"regex": ".*"}})
                } else {
                    json!({"exact": o})
                }
            })
            .collect();
        vhost["typed_per_filter_config"] = json!({
            "envoy.filters.http.cors": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.CorsPolicy",
                "allow_origin_string_match": origins,
                "allow_methods": g.cors.allow_methods.join(","),
                "allow_headers": g.cors.allow_headers.join(","),
                "expose_headers": g.cors.expose_headers.join(","),
                "max_age": g.cors.max_age.to_string(),
                "allow_credentials": g.cors.allow_credentials,
            }
        });
        cors = Some(json!({
            "name": "envoy.filters.http.cors",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"},
        }));
    }
    (vhost, cors)
}

fn failure_policy(g: &crate::gateway::Gateway) -> &'static str {
    match g.failure_policy {
        FailurePolicy::Reload => "FAIL_RELOAD",
        FailurePolicy::Closed => "FAIL_CLOSED",
        FailurePolicy::Open => "FAIL_OPEN",
    }
}

/// The wasm VM: the module file, and the environment variables its secrets come from (only the
/// variables' names are in the configuration, and in /config_dump).
fn vm_config(file: &GatewayFile, opts: &RenderOptions) -> Value {
    let mut vm_config = json!({
        "vm_id": PLUGIN_NAME,
        "runtime": "envoy.wasm.runtime.v8",
        "code": {"local": {"filename": opts.wasm_path}},
    });
    // Secrets named by `*_env` reach the filter from Envoy's own environment: only the
    // variable's name is in the configuration (and in /config_dump).
    let mut env_keys: Vec<&str> = [
        file.filter.jwt.as_ref().and_then(|j| j.secret_env.as_deref()),
        file.filter.webdis_auth_env.as_deref(),
        file.filter
            .logs
            .store
            .as_ref()
            .and_then(|st| st.auth_env.as_deref()),
    ]
    .into_iter()
    .flatten()
    .collect();
    for issuer in file.filter.jwt.iter().flat_map(|j| j.issuers.iter()) {
        if let Some(var) = issuer.secret_env.as_deref() {
            if !env_keys.contains(&var) {
                env_keys.push(var);
            }
        }
    }
    if !env_keys.is_empty() {
        vm_config["environment_variables"] = json!({"host_env_keys": env_keys});
    }
    vm_config
}

/// CORS (when on), the gateway filter, the body buffer (when bounded), the router.
fn http_filters(
    file: &GatewayFile,
    module: &GatewayModule,
    cors: Option<Value>,
    filter_json: String,
) -> Vec<Value> {
    let g = &file.gateway;
    let mut http_filters: Vec<Value> = cors.into_iter().collect();
    http_filters.push(module.filter("http", PLUGIN_NAME, filter_json));
    if g.limits.max_request_body_kb > 0 {
        // After the gateway filter (a refused request is never buffered), before the router:
        // the upstream request starts once the body is whole, so a slow body holds no upstream
        // connection and no circuit-breaker slot, only its own connection until
        // `request_timeout`.
        http_filters.push(json!({
            "name": "envoy.filters.http.buffer",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
                "max_request_bytes": u64::from(g.limits.max_request_body_kb) * 1024,
            },
        }));
    }
    http_filters.push(json!({
        "name": "envoy.filters.http.router",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
    }));

    http_filters
}

/// The HTTP connection manager: limits and timeouts, path handling, the routes, Envoy's own
/// error replies as JSON, the filters.
fn connection_manager(file: &GatewayFile, vhost: Value, http_filters: Vec<Value>) -> Value {
    let g = &file.gateway;
    // Envoy's own error replies become JSON too. Scoped by response flag, so the filter's
    // replies (which carry no flag) pass through untouched.
    let local_reply = json!({"mappers": [
        {"filter": {"response_flag_filter": {"flags": ["UT"]}}, "status_code": 504,
         "body_format_override": json_error("Gateway Timeout", "Upstream service did not respond in time")},
        {"filter": {"response_flag_filter": {"flags": ["UF", "UH", "UO", "URX", "UC", "UR"]}}, "status_code": 503,
         "body_format_override": json_error("Service Unavailable", "Cannot connect to upstream service")},
        {"filter": {"response_flag_filter": {"flags": ["NR"]}}, "status_code": 404,
         "body_format_override": json_error("Not Found", "Route not found")},
        {"filter": {"status_code_filter": {"comparison": {"op": "EQ",
            "value": {"default_value": 413, "runtime_key": "gateway.local_reply.payload_too_large"}}}},
         "body_format_override": json_error("Payload Too Large",
            &format!("Request body larger than {} KiB", g.limits.max_request_body_kb))},
        {"filter": {"status_code_filter": {"comparison": {"op": "EQ",
            "value": {"default_value": 408, "runtime_key": "gateway.local_reply.request_timeout"}}}},
         "body_format_override": json_error("Request Timeout", "The request was not received in time")},
    ]});

    let mut hcm = json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "gateway",
        "request_headers_timeout": seconds(g.limits.request_headers_timeout),
        "stream_idle_timeout": seconds(g.limits.stream_idle_timeout),
        "request_timeout": seconds(g.limits.request_timeout),
        "max_request_headers_kb": g.limits.max_request_headers_kb,
        "common_http_protocol_options": {
            "idle_timeout": seconds(g.limits.idle_timeout),
            "max_connection_duration": seconds(g.limits.max_connection_duration),
            "headers_with_underscores_action": match g.headers_with_underscores {
                UnderscoreAction::Drop => "DROP_HEADER",
                UnderscoreAction::Reject => "REJECT_REQUEST",
                UnderscoreAction::Allow => "ALLOW",
            },
        },
        "http2_protocol_options": {
            "max_concurrent_streams": g.limits.http2_max_concurrent_streams,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1_048_576,
        },
        "path_with_escaped_slashes_action": match g.escaped_slashes {
            EscapedSlashes::Reject => "REJECT_REQUEST",
            EscapedSlashes::Redirect => "UNESCAPE_AND_REDIRECT",
            EscapedSlashes::Keep => "KEEP_UNCHANGED",
        },
        "normalize_path": true,
        "merge_slashes": true,
        "use_remote_address": true,
        "route_config": {"name": "gateway", "virtual_hosts": [vhost]},
        "local_reply_config": local_reply,
        "http_filters": http_filters,
    });

    if file.config.rate_limits.trusted_hops == 0 {
        // No proxy in front is trusted: a client's own `X-Forwarded-For` is removed before
        // Envoy appends the peer (early header mutation runs first in the connection manager,
        // conn_manager_utility.cc), so the upstream sees the peer alone, never a spoofed
        // leftmost entry.
        hcm["early_header_mutation_extensions"] = json!([{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                "mutations": [{"remove": "x-forwarded-for"}],
            },
        }]);
    }

    hcm
}

/// The network filters of the gateway listener: the connection cap (when on), then HTTP.
fn network_filters(file: &GatewayFile, module: &GatewayModule, hcm: Value) -> Vec<Value> {
    let g = &file.gateway;
    // The per-client connection cap: the same module (same VM and shared data) as a network
    // filter in front of the HTTP connection manager.
    // It also closes connections that send no byte within `first_byte_timeout`, and keeps the
    // last `connection_reserve` connections of the listener for clients holding none.
    let mut network_filters = Vec::new();
    let per_client = g
        .limits
        .connections_per_client(file.config.rate_limits.trusted_hops);
    let first_byte = (g.limits.first_byte_timeout > 0.0).then_some(g.limits.first_byte_timeout);
    if per_client.is_some() || first_byte.is_some() {
        let mut connections = json!({
            // Behind proxies (no per-client cap): only the first-byte bound.
            "max_per_client": per_client.unwrap_or(g.limits.max_connections).min(1_000_000),
            "slots": file.config.rate_limits.ip_slots,
            // Every connection closes within max_connection_duration and a drain.
            "max_age": (g.limits.max_connection_duration.ceil() as u64).saturating_add(60),
        });
        if let Some(s) = first_byte {
            connections["first_byte_timeout"] = json!(s);
        }
        if per_client.is_some() && g.limits.reserve() > 0 {
            connections["budget"] = json!(g.limits.max_connections);
            connections["reserve"] = json!(g.limits.reserve());
        }
        let settings = json!({ "connections": connections });
        // Native: the same duty from the same `.so` (its shared memory), no wasm VM at all.
        network_filters.push(module.filter("network", CONNECTIONS_PLUGIN_NAME, settings.to_string()));
    }
    network_filters.push(json!({
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": hcm,
    }));

    network_filters
}

/// One cluster per route (and per canary upstream).
fn upstream_clusters(file: &GatewayFile) -> Vec<Value> {
    let g = &file.gateway;
    let cb = &g.circuit_breaker;
    let od = &g.outlier_detection;
    let mut clusters: Vec<Value> = Vec::new();
    let sets = file
        .routes
        .iter()
        .map(|r| (r, &r.endpoints))
        .flat_map(|(r, eps)| {
            let stable = Some((r, r.name.clone(), &eps.stable));
            let canary = eps.canary.as_ref().map(|c| (r, canary_cluster(&r.name), c));
            stable.into_iter().chain(canary)
        });
    for (r, name, eps) in sets {
        let lb_endpoints: Vec<Value> = eps
            .iter()
            .map(|e| json!({"endpoint": {"address": socket(&e.host, e.port)}}))
            .collect();
        let is_ip = eps.first().is_some_and(Endpoint::is_ip);
        let mut cluster = json!({
            "name": name,
            "type": if is_ip { "STATIC" } else { "STRICT_DNS" },
            "connect_timeout": seconds(g.connect_timeout),
            "lb_policy": match r.lb_policy {
                LbPolicy::RoundRobin => "ROUND_ROBIN",
                LbPolicy::LeastRequest => "LEAST_REQUEST",
                LbPolicy::Random => "RANDOM",
            },
            "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": lb_endpoints}]},
            "circuit_breakers": {"thresholds": [{
                "priority": "DEFAULT",
                "max_connections": cb.max_connections,
                "max_pending_requests": cb.max_pending_requests,
                "max_requests": cb.max_requests,
                "max_retries": cb.max_retries,
            }]},
        });
        if od.enabled {
            cluster["outlier_detection"] = json!({
                "consecutive_5xx": od.consecutive_5xx,
                "interval": format!("{}s", od.interval),
                "base_ejection_time": format!("{}s", od.base_ejection_time),
                "max_ejection_percent": od.max_ejection_percent,
            });
        }
        clusters.push(cluster);
    }

    clusters
}

/// The webdis clusters: revocation and limits, the log store's own, the replica-reading one.
fn webdis_clusters(file: &GatewayFile) -> Vec<Value> {
    let g = &file.gateway;
    let mut clusters = Vec::new();
    let log_store_timeout = file
        .config
        .logs
        .store
        .as_ref()
        .map_or(0.5, |st| st.timeout_ms as f64 / 1000.0);
    let webdis_clusters = [
        file.webdis.as_ref().map(|ep| {
            let timeout = file
                .config
                .revocation
                .as_ref()
                .map_or(0.2, |rv| rv.timeout_ms as f64 / 1000.0);
            (WEBDIS_CLUSTER, ep, timeout)
        }),
        file.log_webdis
            .as_ref()
            .map(|ep| (LOG_WEBDIS_CLUSTER, ep, log_store_timeout)),
        file.redis_cluster
            .as_ref()
            .and_then(|r| r.confirm.as_ref())
            .and_then(|c| c.endpoints.as_ref())
            .map(|(_, ep)| {
                let timeout = file
                    .config
                    .revocation
                    .as_ref()
                    .map_or(0.2, |rv| rv.timeout_ms as f64 / 1000.0);
                (CONFIRM_WEBDIS_CLUSTER, ep, timeout)
            }),
    ];
    for (cluster, ep, timeout) in webdis_clusters.into_iter().flatten() {
        clusters.push(json!({
            "name": cluster,
            "type": if ep.is_ip() { "STATIC" } else { "STRICT_DNS" },
            "connect_timeout": seconds(timeout.min(g.connect_timeout)),
            "load_assignment": {"cluster_name": cluster, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": socket(&ep.host, ep.port)}}
            ]}]},
            "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": 1024,
                "max_pending_requests": 1024, "max_requests": 1024, "max_retries": 0}]},
        }));
    }

    clusters
}

/// The identity providers' key-set clusters.
fn jwks_clusters(file: &GatewayFile) -> Vec<Value> {
    let g = &file.gateway;
    let mut clusters = Vec::new();
    for jwks in &file.jwks_clusters {
        let ep = &jwks.endpoint;
        let mut cluster = json!({
            "name": jwks.name,
            "type": if ep.is_ip() { "STATIC" } else { "STRICT_DNS" },
            "dns_lookup_family": "V4_PREFERRED",
            "connect_timeout": seconds(g.connect_timeout),
            "load_assignment": {"cluster_name": jwks.name, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": socket(&ep.host, ep.port)}}
            ]}]},
            "circuit_breakers": {"thresholds": [{"priority": "DEFAULT", "max_connections": 4,
                "max_pending_requests": 16, "max_requests": 16, "max_retries": 0}]},
        });
        if jwks.tls {
            cluster["transport_socket"] = json!({
                "name": "envoy.transport_sockets.tls",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                    "sni": ep.host,
                    "common_tls_context": {"validation_context": {
                        "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": ep.host}}],
                    }},
                },
            });
        }
        clusters.push(cluster);
    }

    clusters
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

/// The metrics listener (Prometheus stats and readiness only) and its cluster to the admin
/// interface.
fn metrics_listener(m: &crate::gateway::Metrics, admin_address: &Value) -> (Value, Value) {
    let cluster = json!({
            "name": ADMIN_CLUSTER,
            "type": "STATIC",
            "connect_timeout": "1s",
            "load_assignment": {"cluster_name": ADMIN_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": admin_address.clone()}}
            ]}]},
    });
    let only = |path: &str| {
        json!({"match": {"path": path, "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
                   "route": {"cluster": ADMIN_CLUSTER, "timeout": "5s"}})
    };
    let metrics = listener(
        "metrics",
        socket(&m.address, m.port),
        json!({
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": "metrics",
                "request_headers_timeout": "5s",
                "route_config": {"name": "metrics", "virtual_hosts": [{"name": "metrics", "domains": ["*"], "routes": [
                    only("/stats/prometheus"),
                    only("/ready"),
                    {"match": {"prefix": "/"}, "direct_response": {"status": 404}},
                ]}]},
                "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
            },
        }),
    );
    (metrics, cluster)
}

/// `redis_cluster:`: Envoy's own redis_proxy listeners in front of a Redis Cluster, and the
/// cluster.
fn redis_proxy(file: &GatewayFile) -> Option<(Vec<Value>, Value)> {
    let g = &file.gateway;
    // `redis_cluster:`: Envoy's own redis_proxy in front of a Redis Cluster, for webdis.
    let (r, (address, nodes)) = file
        .redis_cluster
        .as_ref()
        .and_then(|r| r.endpoints.as_ref().map(|e| (r, e)))?;
    let mut listeners = vec![listener(
        "redis",
        socket(&address.host, address.port),
        json!({
            "name": "envoy.filters.network.redis_proxy",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
                "stat_prefix": "redis",
                "settings": {"op_timeout": seconds(r.op_timeout), "enable_redirection": true,
                             "enable_hashtagging": true},
                "prefix_routes": {"catch_all_route": {"cluster": REDIS_CLUSTER}},
            },
        }),
    )];
    // `redis_cluster.confirm`: the same cluster read from replicas only, for the read-back
    // of revocations. No redirection: a replica answering `MOVED` (it lost the slot) must
    // not become a read of the primary, which would confirm nothing.
    if let Some((replica, _)) = r.confirm.as_ref().and_then(|c| c.endpoints.as_ref()) {
        listeners.push(listener(
            "redis_replica",
            socket(&replica.host, replica.port),
            json!({
                "name": "envoy.filters.network.redis_proxy",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.redis_proxy.v3.RedisProxy",
                    "stat_prefix": "redis_replica",
                    "settings": {"op_timeout": seconds(r.op_timeout), "enable_redirection": false,
                                 "enable_hashtagging": true, "read_policy": "REPLICA"},
                    "prefix_routes": {"catch_all_route": {"cluster": REDIS_CLUSTER}},
                },
            }),
        ));
    }
    let cluster = json!({
        "name": REDIS_CLUSTER,
        "connect_timeout": seconds(g.connect_timeout),
        "lb_policy": "CLUSTER_PROVIDED",
        "cluster_type": {"name": "envoy.clusters.redis", "typed_config": {
            "@type": "type.googleapis.com/google.protobuf.Struct",
            "value": {"cluster_refresh_rate": seconds(r.refresh),
                      "cluster_refresh_timeout": seconds(r.op_timeout),
                      "redirect_refresh_interval": "0.2s", "redirect_refresh_threshold": 1},
        }},
        "load_assignment": {"cluster_name": REDIS_CLUSTER, "endpoints": [{"lb_endpoints":
            nodes.iter().map(|n| json!({"endpoint": {"address": socket(&n.host, n.port)}})).collect::<Vec<_>>()
        }]},
    });
    Some((listeners, cluster))
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

/// Files of the filesystem-xDS form (`gateway-render --xds DIR`), in the order they are swapped
/// in: clusters first (new routes may point at them), then routes, the filter's configuration,
/// and the listener (unchanged from one version to the next, so no connection is drained).
pub const XDS_FILES: [&str; 4] = ["cds.json", "rds.json", "ecds.json", "lds.json"];

/// The static bootstrap of the xDS form, and the files (name, resource) it reads.
pub type Xds = (Value, Vec<(&'static str, Value)>);

/// Splits a rendered bootstrap into a static bootstrap that reads the gateway's listener and
/// clusters from files in `dir` (LDS, CDS), the listener's routes from RDS and the filter's
/// configuration from extension config discovery (ECDS), plus those files: a new version of the
/// gateway file then reaches a running Envoy by swapping the files, without a restart. The
/// admin interface, the metrics listener and its cluster stay static.
pub fn xds(bootstrap: &Value, dir: &str) -> Result<Xds, String> {
    let source = |file: &str| {
        json!({"path_config_source": {"path": format!("{dir}/{file}"), "watched_directory": {"path": dir}},
               "resource_api_version": "V3"})
    };
    let mut b = bootstrap.clone();
    let listeners = b["static_resources"]["listeners"]
        .as_array_mut()
        .ok_or("no listeners")?;
    let at = listeners
        .iter()
        .position(|l| l["name"] == LISTENER_NAME)
        .ok_or("no gateway listener")?;
    let mut listener = listeners.remove(at);
    let hcm = listener["filter_chains"][0]["filters"]
        .as_array_mut()
        .and_then(|fs| {
            fs.iter_mut()
                .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        })
        .map(|f| &mut f["typed_config"])
        .ok_or("no http connection manager")?;
    let mut routes = hcm["route_config"].take();
    if let Some(m) = hcm.as_object_mut() {
        m.remove("route_config");
    }
    hcm["rds"] = json!({"route_config_name": routes["name"].clone(), "config_source": source("rds.json")});
    let filters = hcm["http_filters"].as_array_mut().ok_or("no http filters")?;
    let gateway = filters
        .iter_mut()
        .find(|f| f["name"] == "envoy.filters.http.wasm" || f["name"] == NATIVE_FILTER_NAME)
        .ok_or("no gateway filter")?;
    let typed = gateway["typed_config"].take();
    let type_url = typed["@type"].clone();
    *gateway = json!({"name": PLUGIN_NAME, "config_discovery": {
        "config_source": source("ecds.json"),
        "type_urls": [type_url]}});
    let clusters = b["static_resources"]["clusters"]
        .as_array_mut()
        .ok_or("no clusters")?;
    let (keep, dynamic): (Vec<Value>, Vec<Value>) =
        clusters.drain(..).partition(|c| c["name"] == ADMIN_CLUSTER);
    *clusters = keep;
    b["dynamic_resources"] = json!({"lds_config": source("lds.json"), "cds_config": source("cds.json")});
    // xDS needs a node identity, even from files.
    b["node"] = json!({"id": PLUGIN_NAME, "cluster": PLUGIN_NAME});
    let typed_resources = |kind: &str, items: Vec<Value>| {
        let resources: Vec<Value> = items
            .into_iter()
            .map(|mut r| {
                r["@type"] = json!(kind);
                r
            })
            .collect();
        json!({ "resources": resources })
    };
    routes["@type"] = json!("type.googleapis.com/envoy.config.route.v3.RouteConfiguration");
    let mut files = vec![
        (
            "cds.json",
            typed_resources("type.googleapis.com/envoy.config.cluster.v3.Cluster", dynamic),
        ),
        ("rds.json", json!({ "resources": [routes] })),
        (
            "ecds.json",
            json!({"resources": [{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                                      "name": PLUGIN_NAME, "typed_config": typed}]}),
        ),
        (
            "lds.json",
            typed_resources(
                "type.googleapis.com/envoy.config.listener.v3.Listener",
                vec![listener],
            ),
        ),
    ];
    // Each file names its version (a digest of its resources): Envoy reports the version it
    // has in force in `/config_dump`, which is how `make reload` knows when to return.
    for (_, file) in &mut files {
        file["version_info"] = json!(content_version(file));
    }
    Ok((b, files))
}

/// The first 16 hex digits of the SHA-256 of a value's JSON: equal content, equal version.
pub fn content_version(value: &Value) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(value.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
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
        let listener = &v["static_resources"]["listeners"][0];
        assert_eq!(listener["per_connection_buffer_limit_bytes"], 32_768);
        let v = render(&YAML.replace(
            "gateway: {port: 8000, prefix: /api/v1, cors: {allow_origins: [\"https://app.example\"]}}",
            "gateway: {port: 8000, prefix: /api/v1, headers_with_underscores: reject, escaped_slashes: redirect,\n  limits: {request_headers_timeout: 1.5}}",
        ));
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
