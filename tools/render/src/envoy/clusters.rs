//! The clusters (routes' upstreams, webdis, key sets, the Redis Cluster) and the listeners beside
//! the gateway's (metrics, redis_proxy).

use super::*;

/// One cluster per route (and per canary upstream).
pub(super) fn upstream_clusters(file: &GatewayFile) -> Vec<Value> {
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
pub(super) fn webdis_clusters(file: &GatewayFile) -> Vec<Value> {
    let g = &file.gateway;
    let mut clusters = Vec::new();
    let log_store_timeout = file
        .config
        .logs
        .store
        .as_ref()
        .map_or(0.5, |st| st.timeout_ms as f64 / 1000.0);
    // Revocation calls, and their read-backs, with the revocation timeout.
    let revocation_timeout = file
        .config
        .revocation
        .as_ref()
        .map_or(0.2, |rv| rv.timeout_ms as f64 / 1000.0);
    let webdis_clusters = [
        file.webdis
            .as_ref()
            .map(|ep| (WEBDIS_CLUSTER, ep, revocation_timeout)),
        file.log_webdis
            .as_ref()
            .map(|ep| (LOG_WEBDIS_CLUSTER, ep, log_store_timeout)),
        file.redis_cluster
            .as_ref()
            .and_then(|r| r.confirm.as_ref())
            .and_then(|c| c.endpoints.as_ref())
            .map(|(_, ep)| (CONFIRM_WEBDIS_CLUSTER, ep, revocation_timeout)),
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
/// TLS to a provider's server (a key server, an introspection endpoint, a trace collector),
/// verified against the system's CAs and the server's name, with SNI.
pub(super) fn verified_tls(host: &str) -> Value {
    json!({
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            "sni": host,
            "common_tls_context": {"validation_context": {
                "trusted_ca": {"filename": SYSTEM_CA_BUNDLE},
                "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": host}}],
            }},
        },
    })
}

/// The identity providers' key-set clusters.
pub(super) fn jwks_clusters(file: &GatewayFile) -> Vec<Value> {
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
            cluster["transport_socket"] = verified_tls(&ep.host);
        }
        clusters.push(cluster);
    }

    clusters
}
/// The metrics listener (Prometheus stats and readiness only) and its cluster to the admin
/// interface.
pub(super) fn metrics_listener(m: &crate::gateway::Metrics, admin_address: &Value) -> (Value, Value) {
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
pub(super) fn redis_proxy(file: &GatewayFile) -> Option<(Vec<Value>, Value)> {
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
