//! The gateway listener's chain: the virtual host and its routes, the wasm VM or the native
//! module, the HTTP filters, the connection manager, the network filters.

use super::*;

/// The gateway as an Envoy filter, in either runtime: the `.wasm` in a V8 VM, or the native
/// module (`dynamic_modules`, kept loaded for the process's life).
pub(super) struct GatewayModule<'a> {
    pub(super) runtime: Runtime,
    pub(super) vm_config: &'a Value,
    pub(super) failure_policy: &'a str,
    pub(super) native_path: String,
}

impl GatewayModule<'_> {
    /// The filter of `layer` (`http` or `network`) named `name` (its root id, or the module's
    /// filter name), configured with the JSON `configuration`.
    pub(super) fn filter(&self, layer: &str, name: &str, configuration: String) -> Value {
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
/// The routes, most specific prefix first (the filter's order), then health and 404; with CORS,
/// the virtual host's policy and the CORS filter that applies it.
pub(super) fn virtual_host(file: &GatewayFile) -> (Value, Option<Value>) {
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
        let mut route = json!({"name": r.name, "match": matcher, "route": action});
        if let Some(rbac) = &r.rbac {
            let policy = rbac_per_route(g.runtime, rbac);
            route["typed_per_filter_config"] = json!({RBAC_FILTER: policy.clone()});
            // The canary's route (pushed just before) answers the same callers.
            if r.endpoints.canary.is_some() {
                if let Some(canary) = routes.last_mut() {
                    canary["typed_per_filter_config"] = json!({RBAC_FILTER: policy});
                }
            }
        }
        routes.push(route);
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
pub(super) fn failure_policy(g: &crate::gateway::Gateway) -> &'static str {
    match g.failure_policy {
        FailurePolicy::Reload => "FAIL_RELOAD",
        FailurePolicy::Closed => "FAIL_CLOSED",
        FailurePolicy::Open => "FAIL_OPEN",
    }
}
/// The wasm VM: the module file, and the environment variables its secrets come from (only the
/// variables' names are in the configuration, and in /config_dump).
pub(super) fn vm_config(file: &GatewayFile, opts: &RenderOptions) -> Value {
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
        let introspection = issuer
            .introspection
            .as_ref()
            .map(|i| i.client_secret_env.as_str());
        for var in [issuer.secret_env.as_deref(), introspection]
            .into_iter()
            .flatten()
        {
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
pub(super) fn http_filters(
    file: &GatewayFile,
    module: &GatewayModule,
    cors: Option<Value>,
    filter_json: String,
) -> Vec<Value> {
    let g = &file.gateway;
    let mut http_filters: Vec<Value> = cors.into_iter().collect();
    http_filters.push(module.filter("http", PLUGIN_NAME, filter_json));
    if file.routes.iter().any(|r| r.rbac.is_some()) {
        // After the gateway filter, which publishes the roles it read from the token.
        http_filters.push(rbac_filter());
    }
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
pub(super) fn connection_manager(file: &GatewayFile, vhost: Value, http_filters: Vec<Value>) -> Value {
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

    if let Some(log) = &g.access_log {
        hcm["access_log"] = access_log(g.runtime, log);
    }
    if let Some(t) = &g.tracing {
        hcm["tracing"] = tracing(t, &file.filter.gateway.name);
    }
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
pub(super) fn network_filters(file: &GatewayFile, module: &GatewayModule, hcm: Value) -> Vec<Value> {
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
