//! Validation of the Envoy side: the gateway's settings, their policies and the names of the
//! clusters the renderer adds, each route's upstream, the Redis Cluster, and the URLs.

use super::*;

impl RedisCluster {
    pub(super) fn validated(mut self) -> Result<Self, ConfigError> {
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
/// Defines a cluster for every `jwt.issuers[i].remote_jwks.uri` and
/// `jwt.issuers[i].introspection.endpoint` that names no `cluster` of its own, and writes its
/// name into the filter's configuration.
pub(super) fn jwks_clusters(root: &mut Map<String, Value>) -> Result<Vec<JwksCluster>, ConfigError> {
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
        for (member, url_field, prefix) in [
            ("remote_jwks", "uri", JWKS_CLUSTER_PREFIX),
            ("introspection", "endpoint", INTROSPECTION_CLUSTER_PREFIX),
        ] {
            let Some(Value::Object(remote)) = issuer.get_mut(member) else {
                continue;
            };
            if remote.get("cluster").is_some_and(|c| !c.is_null()) {
                continue;
            }
            let field = format!("jwt.issuers[{i}].{member}.{url_field}");
            let uri = remote
                .get(url_field)
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
            let cluster = format!("{prefix}{name}");
            check_name(&format!("jwt.issuers[{i}].name"), &name)?;
            remote.insert("cluster".into(), Value::String(cluster.clone()));
            out.push(JwksCluster {
                name: cluster,
                endpoint,
                tls,
            });
        }
    }
    Ok(out)
}
/// Checks everything the filter does not see (upstreams, timeouts, listener, Envoy settings).
/// The Envoy side of the file: the gateway's own settings, then each route's upstream side.
pub(super) fn validate_envoy_side(
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
pub(super) fn check_gateway_side(
    g: &Gateway,
    filter: &FilterConfig,
    webdis: bool,
) -> Result<(), ConfigError> {
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
    if let Some(log) = &g.access_log {
        if log.path.is_empty() || log.path.contains('\0') {
            return Err(ConfigError::new("gateway.access_log.path", "must be a file path"));
        }
    }
    if let Some(t) = &g.tracing {
        otlp_endpoint(&t.otlp)?;
        if !(0.0..=100.0).contains(&t.sampling) {
            return Err(ConfigError::new(
                "gateway.tracing.sampling",
                "must be 0 to 100 (percent)",
            ));
        }
        check_seconds("gateway.tracing.flush_interval", t.flush_interval, 60.0)?;
        if t.flush_interval < 0.1 {
            return Err(ConfigError::new(
                "gateway.tracing.flush_interval",
                "must be at least 0.1 seconds",
            ));
        }
        if t.flush_spans == 0 || t.flush_spans > 10_000 {
            return Err(ConfigError::new(
                "gateway.tracing.flush_spans",
                "must be 1 to 10000",
            ));
        }
    }
    if let Some(tls) = &g.tls {
        for (f, path) in [
            ("gateway.tls.certificate", Some(&tls.certificate)),
            ("gateway.tls.private_key", Some(&tls.private_key)),
            ("gateway.tls.client_ca", tls.client_ca.as_ref()),
        ] {
            if path.is_some_and(|p| p.is_empty() || p.contains('\0')) {
                return Err(ConfigError::new(f, "must be a file path"));
            }
        }
        if tls.require_client_certificate && tls.client_ca.is_none() {
            return Err(ConfigError::new(
                "gateway.tls.require_client_certificate",
                "needs gateway.tls.client_ca (the CAs client certificates are checked against)",
            ));
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
        ("memory_release_mb", l.memory_release_mb, 0, 65_536),
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
pub(super) fn check_policies(g: &Gateway, filter: &FilterConfig, webdis: bool) -> Result<(), ConfigError> {
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
pub(super) fn envoy_routes(
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
        if up.rbac.is_some() && !r.auth_required {
            return Err(ConfigError::new(
                format!("routes[{i}].rbac"),
                "needs auth_required: true (a public route reads no token: no roles to check)",
            ));
        }
        if let Some(rbac) = &up.rbac {
            let ok = |role: &String| {
                !role.is_empty()
                    && role.len() <= 256
                    && !role.contains(',')
                    && role.chars().all(|c| c.is_ascii_graphic())
            };
            if rbac.roles.is_empty() || !rbac.roles.iter().all(ok) {
                return Err(ConfigError::new(
                    format!("routes[{i}].rbac.roles"),
                    "must list roles: printable, no commas, at most 256 characters each",
                ));
            }
        }
        all.push(EnvoyRoute {
            name: r.name.clone(),
            timeout: up.timeout,
            retry: up.retry,
            lb_policy: up.lb_policy,
            rbac: up.rbac.clone(),
            endpoints: RouteEndpoints { stable, canary },
        });
    }
    Ok(all)
}
pub(super) fn parse_upstreams(field: &str, upstream: &Upstreams) -> Result<Vec<Endpoint>, ConfigError> {
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
/// Parses `http://host[:port][/]`.
/// `gateway.tracing.otlp`: the collector's endpoint, and whether it is `https://`.
pub fn otlp_endpoint(url: &str) -> Result<(Endpoint, bool), ConfigError> {
    let field = "gateway.tracing.otlp";
    let bad = || {
        ConfigError::new(
            field,
            "must be an http(s)://host[:port] URL (spans go to its /v1/traces)",
        )
    };
    let (tls, rest) = match (url.strip_prefix("https://"), url.strip_prefix("http://")) {
        (Some(rest), _) => (true, rest),
        (None, Some(rest)) => (false, rest),
        _ => return Err(bad()),
    };
    let authority = rest.trim_end_matches('/');
    if authority.is_empty() || authority.contains(['/', '?', '#', '@']) {
        return Err(bad());
    }
    let has_port = match authority.rsplit_once(':') {
        Some((_, port)) => !port.contains(']'),
        None => false,
    };
    let mut ep = parse_upstream(field, &format!("http://{authority}"))?;
    if tls && !has_port {
        ep.port = 443;
    }
    Ok((ep, tls))
}

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
pub(super) fn check_seconds(field: &str, value: f64, max: f64) -> Result<(), ConfigError> {
    if !(value.is_finite() && value > 0.0 && value <= max) {
        return Err(ConfigError::new(
            field,
            format!("must be a number of seconds in (0, {max}]"),
        ));
    }
    Ok(())
}
