//! What the rest of Envoy does with the filter's decisions: RBAC on routes (`routes[].rbac`),
//! the access log (`gateway.access_log`) and tracing (`gateway.tracing`). The filter publishes
//! its decision where each runtime can: the `.wasm` as filter state `wasm.gateway.<key>` (proxy-wasm's
//! `set_property`: a CelState whose string form is the value), the native module as dynamic
//! metadata under `gateway` (the roles a list).

use super::*;

/// The RBAC filter's name, which routes' per-route policies are keyed by.
pub(super) const RBAC_FILTER: &str = "envoy.filters.http.rbac";
use crate::gateway::OTLP_CLUSTER;

/// The RBAC filter for the chain (after the gateway filter): no policy of its own, so only
/// routes with `rbac` are checked.
pub(super) fn rbac_filter() -> Value {
    json!({
        "name": RBAC_FILTER,
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC"},
    })
}

/// A route's RBAC policy: allowed when the caller holds one of `roles`.
pub(super) fn rbac_per_route(runtime: Runtime, rbac: &Rbac) -> Value {
    let principals: Vec<Value> = match runtime {
        // RBAC's `filter_state` principal reads the object's string form (`serializeAsString`:
        // the roles between commas, `,admin,user,`); `contains` of `,<role>,` is exact, as no
        // role holds a comma. No regex: RE2's program-size limit would refuse long role lists.
        Runtime::Wasm => rbac
            .roles
            .iter()
            .map(|r| {
                json!({"filter_state": {
                    "key": "wasm.gateway.roles",
                    "string_match": {"contains": format!(",{r},")},
                }})
            })
            .collect(),
        Runtime::Native => rbac
            .roles
            .iter()
            .map(|r| {
                json!({"sourced_metadata": {"metadata_matcher": {
                    "filter": "gateway",
                    "path": [{"key": "roles"}],
                    "value": {"list_match": {"one_of": {"string_match": {"exact": r}}}},
                }}})
            })
            .collect(),
    };
    json!({
        "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute",
        "rbac": {"rules": {"action": "ALLOW", "policies": {"roles": {
            "permissions": [{"any": true}],
            "principals": principals,
        }}}},
    })
}

/// A decision field as an access-log command for the runtime.
fn field(runtime: Runtime, key: &str) -> String {
    match runtime {
        Runtime::Wasm => format!("%FILTER_STATE(wasm.gateway.{key}:PLAIN)%"),
        Runtime::Native => format!("%DYNAMIC_METADATA(gateway:{key})%"),
    }
}

/// `gateway.access_log`: one JSON line per request, with the filter's decision.
pub(super) fn access_log(runtime: Runtime, log: &AccessLog) -> Value {
    let mut format = serde_json::Map::new();
    for (k, v) in [
        ("time", "%START_TIME%"),
        ("method", "%REQ(:METHOD)%"),
        ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
        ("status", "%RESPONSE_CODE%"),
        ("duration_ms", "%DURATION%"),
        ("route", "%ROUTE_NAME%"),
        // Who answered: `via_upstream`, the gateway filter's reason, `rbac_access_denied...`.
        ("details", "%RESPONSE_CODE_DETAILS%"),
    ] {
        format.insert(k.into(), json!(v));
    }
    for key in [
        "user_id", "roles", "issuer", "outcome", "decision", "canary", "trace_id",
    ] {
        format.insert(key.into(), json!(field(runtime, key)));
    }
    json!([{
        "name": "envoy.access_loggers.file",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog",
            "path": log.path,
            "log_format": {"json_format": format},
        },
    }])
}

/// `gateway.tracing`: Envoy's OpenTelemetry tracer over OTLP/HTTP (protobuf to `/v1/traces`).
pub(super) fn tracing(t: &Tracing, service: &str) -> Value {
    let base = t.otlp.trim_end_matches('/');
    json!({
        "random_sampling": {"value": t.sampling},
        // `x-client-trace-id` must not let any client have every request traced.
        "client_sampling": {"value": 0},
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.config.trace.v3.OpenTelemetryConfig",
                "service_name": t.service_name.as_deref().unwrap_or(service),
                "http_service": {"http_uri": {
                    "uri": format!("{base}/v1/traces"),
                    "cluster": OTLP_CLUSTER,
                    "timeout": "2s",
                }},
            },
        },
    })
}

/// The collector's cluster.
pub(super) fn tracing_cluster(file: &GatewayFile, t: &Tracing) -> Option<Value> {
    let (ep, tls) = crate::gateway::otlp_endpoint(&t.otlp).ok()?;
    let mut cluster = json!({
        "name": OTLP_CLUSTER,
        "type": if ep.is_ip() { "STATIC" } else { "STRICT_DNS" },
        "dns_lookup_family": "V4_PREFERRED",
        "connect_timeout": seconds(file.gateway.connect_timeout),
        "load_assignment": {"cluster_name": OTLP_CLUSTER, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": socket(&ep.host, ep.port)}}
        ]}]},
    });
    if tls {
        // Verified as the key servers are: the system's CAs, the collector's name.
        cluster["transport_socket"] = verified_tls(&ep.host);
    }
    Some(cluster)
}

/// The tracer's batching (Envoy's runtime keys: spans flushed every `flush_interval` or once
/// `flush_spans` are buffered).
pub(super) fn tracing_runtime(t: &Tracing, runtime: &mut serde_json::Map<String, Value>) {
    runtime.insert(
        "tracing.opentelemetry.flush_interval_ms".into(),
        json!((t.flush_interval * 1000.0).round() as u64),
    );
    runtime.insert(
        "tracing.opentelemetry.min_flush_spans".into(),
        json!(t.flush_spans),
    );
}
