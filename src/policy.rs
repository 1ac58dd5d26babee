//! The request decision: route match, method check, JWT auth, roles, identity and trace headers.
//! Pure: takes the request head, the clock and random bytes; returns what the glue must do.

use crate::config::{Config, EndpointPath, Route, DEFAULT_TOKEN_TTL_SECONDS};
use crate::jwt::Identity;
use crate::trace::{trace_context, TraceContext, RANDOM_BYTES};

pub const HEADER_TRACE_ID: &str = "x-trace-id";
pub const HEADER_TRACEPARENT: &str = "traceparent";
pub const HEADER_GATEWAY: &str = "x-gateway";
pub const HEADER_USER_ID: &str = "x-user-id";
pub const HEADER_USER_NAME: &str = "x-user-name";
pub const HEADER_USER_ROLE: &str = "x-user-role";
/// Every client-supplied header with this prefix is removed before the request goes upstream.
pub const IDENTITY_HEADER_PREFIX: &str = "x-user-";

pub const MSG_AUTH_MISSING: &str = "Authorization header missing";
pub const MSG_AUTH_FORMAT: &str = "Invalid authorization format. Expected: Bearer <token>";
pub const MSG_ROUTE_NOT_FOUND: &str = "Route not found";

/// A header as the host hands it over: the name is ASCII, the value raw bytes (clients may send
/// bytes that are not UTF-8).
pub type HeaderPair = (String, Vec<u8>);

/// A local reply the glue sends instead of forwarding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: String,
    /// Why the gateway answered, machine-readable (logs and metrics): e.g. `expired`, `role`,
    /// `route_not_found`, `rate_limited_user`.
    pub reason: &'static str,
}

/// Authentication reasons besides the token errors ([`crate::jwt::TokenError::code`]).
pub const REASON_MISSING: &str = "missing_authorization";
pub const REASON_FORMAT: &str = "bad_authorization_format";
pub const REASON_ROLE: &str = "role";

/// A refusal before it becomes a reply.
#[derive(Debug)]
struct Deny {
    status: u16,
    message: String,
    reason: &'static str,
}

impl Deny {
    fn reply(self, trace_id: &str) -> Reply {
        let mut r = Reply::error(self.status, &self.message, trace_id);
        r.reason = self.reason;
        r
    }
}

impl Reply {
    /// A JSON error reply: `{"error": ..., "message": ..., "trace_id": ...}`.
    pub fn error(status: u16, message: &str, trace_id: &str) -> Self {
        let body = serde_json::json!({
            "error": reason_phrase(status),
            "message": message,
            "trace_id": trace_id,
        });
        Self::json(status, body.to_string(), trace_id)
    }

    /// 429 with `retry_after`, `Retry-After` and the `X-RateLimit-*` headers.
    pub fn too_many(
        kind: crate::ratelimit::Kind,
        v: &crate::ratelimit::Verdict,
        period_s: u64,
        trace_id: &str,
    ) -> Self {
        let message = format!(
            "{} rate limit exceeded: {} calls per {}s",
            kind.label(),
            v.limit,
            period_s
        );
        let body = serde_json::json!({
            "error": reason_phrase(429),
            "message": message,
            "retry_after": v.retry_after_s,
            "trace_id": trace_id,
        });
        let mut reply = Self::json(429, body.to_string(), trace_id);
        reply.reason = kind.reason();
        reply.headers.push(("retry-after", v.retry_after_s.to_string()));
        reply.headers.extend(ratelimit_headers(v));
        reply
    }

    /// Fills in the trace id of an error reply built before it was known.
    pub fn set_trace_id(&mut self, trace_id: &str) {
        if let Ok(mut body) = serde_json::from_str::<serde_json::Value>(&self.body) {
            if let Some(obj) = body.as_object_mut() {
                obj.insert("trace_id".into(), trace_id.into());
                self.body = body.to_string();
            }
        }
        for (name, value) in &mut self.headers {
            if *name == HEADER_TRACE_ID {
                *value = trace_id.to_string();
            }
        }
    }

    /// A JSON reply with the trace id header.
    pub fn json(status: u16, body: String, trace_id: &str) -> Self {
        Reply {
            reason: default_reason(status),
            status,
            headers: vec![
                ("content-type", "application/json".to_string()),
                (HEADER_TRACE_ID, trace_id.to_string()),
            ],
            body,
        }
    }
}

/// `X-RateLimit-Limit`, `-Remaining` and `-Reset` (seconds until the bucket is full), as Envoy's
/// `enable_x_ratelimit_headers` names them.
pub fn ratelimit_headers(v: &crate::ratelimit::Verdict) -> [(&'static str, String); 3] {
    [
        ("x-ratelimit-limit", v.limit.to_string()),
        ("x-ratelimit-remaining", v.remaining.to_string()),
        ("x-ratelimit-reset", v.reset_s.to_string()),
    ]
}

fn default_reason(status: u16) -> &'static str {
    match status {
        200 => "ok",
        400 => "bad_request",
        401 => "unauthorized",
        403 => "forbidden",
        404 => "route_not_found",
        405 => "method_not_allowed",
        429 => "rate_limited",
        500 => "internal_error",
        503 => "store_unavailable",
        _ => "error",
    }
}

/// `X-Response-Time` as the reference writes it (`12.34ms`), with integer arithmetic (no float
/// formatting code in the module).
pub fn response_time(elapsed: std::time::Duration) -> String {
    let us = elapsed.as_micros();
    let hundredths = (us + 5) / 10; // round to 0.01 ms
    format!("{}.{:02}ms", hundredths / 100, hundredths % 100)
}

/// The standard reason phrase used as the `error` field.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

/// What to do with the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send it upstream after removing and setting these request headers.
    Forward {
        remove: Vec<String>,
        set: Vec<(&'static str, String)>,
    },
    /// Answer it locally.
    Reply(Reply),
    /// A gateway-answered endpoint; the caller's token is valid (revocation still to check).
    Endpoint(Endpoint),
}

/// Endpoints the gateway answers itself (they need the revocation store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Logout,
    /// Issue a new token with this lifetime and blacklist the old one.
    Refresh {
        ttl_seconds: i64,
    },
    /// Revoke every token of this user issued before now.
    RevokeUser(String),
    /// The stored log records of one trace id.
    LogsByTrace(String),
    /// A user's most recent stored log records.
    LogsByUser {
        user_id: String,
        limit: u32,
    },
}

/// The decision plus what the rest of the request's life needs to know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    pub trace: TraceContext,
    /// Name of the matched route, if any.
    pub route: Option<String>,
    pub identity: Option<Identity>,
    /// The verified bearer token, when there is one.
    pub token: Option<String>,
    pub action: Action,
}

fn header<'a>(headers: &'a [HeaderPair], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_slice())
}

fn header_str<'a>(headers: &'a [HeaderPair], name: &str) -> Option<&'a str> {
    header(headers, name).and_then(|v| std::str::from_utf8(v).ok())
}

/// Extracts the bearer token the way the reference does: exactly one `Authorization` header,
/// exactly two space-separated parts, the first `bearer` in any case.
fn bearer_token(headers: &[HeaderPair]) -> Result<&str, &'static str> {
    let mut values = headers
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case("authorization"))
        .map(|(_, v)| v);
    let first = values.next().ok_or(MSG_AUTH_MISSING)?;
    if values.next().is_some() {
        return Err(MSG_AUTH_FORMAT);
    }
    let value = std::str::from_utf8(first).map_err(|_| MSG_AUTH_FORMAT)?;
    let mut parts = value.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(scheme), Some(token), None) if scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() => {
            Ok(token)
        }
        _ => Err(MSG_AUTH_FORMAT),
    }
}

/// Decides what happens to a request. `now` is unix seconds.
pub fn decide(cfg: &Config, headers: &[HeaderPair], now: i64, random: &[u8; RANDOM_BYTES]) -> Outcome {
    let trace = trace_context(
        header_str(headers, HEADER_TRACE_ID),
        header_str(headers, HEADER_TRACEPARENT),
        random,
    );
    let method = header_str(headers, ":method").unwrap_or("");
    let full_path = header_str(headers, ":path").unwrap_or("");
    let path = full_path.split(['?', '#']).next().unwrap_or("");

    let mut outcome = Outcome {
        trace,
        route: None,
        identity: None,
        token: None,
        // Placeholder, always replaced below (cheap: no body is built on the hot path).
        action: Action::Forward {
            remove: Vec::new(),
            set: Vec::new(),
        },
    };
    let trace_id = outcome.trace.trace_id.as_str();

    let endpoint = if cfg.logs_query_path.as_deref() == Some(path) {
        Some(EndpointPath::Logs)
    } else {
        cfg.revocation.as_ref().and_then(|rv| rv.endpoint(path))
    };
    if let Some(endpoint) = endpoint {
        let query = full_path.split_once('?').map(|(_, q)| q).unwrap_or("");
        match endpoint_decision(cfg, endpoint, method, query, headers, now) {
            Ok((endpoint, identity, token)) => {
                outcome.identity = Some(identity);
                outcome.token = Some(token);
                outcome.action = Action::Endpoint(endpoint);
            }
            Err(mut reply) => {
                reply.set_trace_id(trace_id);
                outcome.action = Action::Reply(reply);
            }
        }
        return outcome;
    }

    let route: Option<&Route> = if cfg.under_prefix(path) {
        match cfg.route_for(path) {
            Some(r) => Some(r),
            None => {
                outcome.action = Action::Reply(Reply::error(404, MSG_ROUTE_NOT_FOUND, trace_id));
                return outcome;
            }
        }
    } else if cfg.passthrough_paths.iter().any(|p| p == path) {
        None
    } else {
        outcome.action = Action::Reply(Reply::error(404, MSG_ROUTE_NOT_FOUND, trace_id));
        return outcome;
    };

    let mut identity = None;
    let mut bearer = None;
    if let Some(route) = route {
        outcome.route = Some(route.name.clone());
        if !route.allows_method(method) {
            let mut reply = Reply::error(405, &format!("Method {method} not allowed"), trace_id);
            reply.headers.push(("allow", route.allow.clone()));
            outcome.action = Action::Reply(reply);
            return outcome;
        }
        if route.auth_required {
            match authenticate(cfg, route, headers, now) {
                Ok((id, token)) => {
                    identity = Some(id);
                    bearer = Some(token);
                }
                Err(deny) => {
                    outcome.action = Action::Reply(deny.reply(trace_id));
                    return outcome;
                }
            }
        }
    }

    let mut remove: Vec<String> = Vec::new();
    for (name, _) in headers {
        // Names come lower-case from Envoy; compare without allocating.
        let internal = name.eq_ignore_ascii_case(crate::canary::ROUTE_HEADER);
        let identity = name
            .get(..IDENTITY_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(IDENTITY_HEADER_PREFIX));
        if internal || identity {
            let lower = name.to_ascii_lowercase();
            if !remove.contains(&lower) {
                remove.push(lower);
            }
        }
    }
    let mut set: Vec<(&'static str, String)> = vec![
        (HEADER_TRACE_ID, outcome.trace.trace_id.clone()),
        (HEADER_TRACEPARENT, outcome.trace.traceparent.clone()),
        (HEADER_GATEWAY, cfg.gateway_name.clone()),
    ];
    if let Some(id) = &identity {
        if let Some(sub) = &id.user_id {
            set.push((HEADER_USER_ID, sub.clone()));
        }
        if let Some(name) = &id.user_name {
            set.push((HEADER_USER_NAME, name.clone()));
        }
        set.push((HEADER_USER_ROLE, id.role.clone()));
    }
    outcome.identity = identity;
    outcome.token = bearer;
    outcome.action = Action::Forward { remove, set };
    outcome
}

/// Bearer extraction and verification.
fn verified_token(cfg: &Config, headers: &[HeaderPair], now: i64) -> Result<(Identity, String), Deny> {
    let token = bearer_token(headers).map_err(|m| Deny {
        status: 401,
        message: m.to_string(),
        reason: if m == MSG_AUTH_MISSING {
            REASON_MISSING
        } else {
            REASON_FORMAT
        },
    })?;
    let verifier = cfg.verifier.as_ref().ok_or(Deny {
        status: 401,
        message: "Invalid token: no verifier configured".to_string(),
        reason: "no_verifier",
    })?;
    let id = verifier.verify(token, now).map_err(|e| Deny {
        status: 401,
        message: format!("Invalid token: {e}"),
        reason: e.code(),
    })?;
    Ok((id, token.to_string()))
}

fn role_error(role: &str, what: &str) -> Deny {
    Deny {
        status: 403,
        message: format!("Role '{role}' is not allowed to access {what}"),
        reason: REASON_ROLE,
    }
}

fn authenticate(
    cfg: &Config,
    route: &Route,
    headers: &[HeaderPair],
    now: i64,
) -> Result<(Identity, String), Deny> {
    let (id, token) = verified_token(cfg, headers, now)?;
    if !route.roles.is_empty() && !route.roles.contains(&id.role) {
        return Err(role_error(&id.role, &format!("route '{}'", route.name)));
    }
    Ok((id, token))
}

/// `?trace_id=<id>` or `?user_id=<id>[&limit=<n>]`.
fn logs_query(query: &str, max: u32) -> Result<Endpoint, Reply> {
    let mut trace = None;
    let mut user = None;
    let mut limit = max;
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "trace_id" => trace = Some(v),
            "user_id" => user = Some(v),
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| Reply::error(400, &format!("limit must be 1 to {max}"), ""))?
            }
            _ => {}
        }
    }
    let valid = |v: &str| crate::revocation::valid_user_id(v);
    match (trace, user) {
        (Some(t), None) if valid(t) => Ok(Endpoint::LogsByTrace(t.to_string())),
        (None, Some(u)) if valid(u) => Ok(Endpoint::LogsByUser {
            user_id: u.to_string(),
            limit,
        }),
        (Some(_), Some(_)) => Err(Reply::error(400, "Give trace_id or user_id, not both", "")),
        (None, None) => Err(Reply::error(400, "trace_id or user_id is required", "")),
        _ => Err(Reply::error(400, "Invalid trace_id or user_id", "")),
    }
}

/// Checks a request to a gateway-answered endpoint: POST, a valid token, and the endpoint's own
/// conditions. The error reply gets its trace id from the caller.
fn endpoint_decision(
    cfg: &Config,
    endpoint: EndpointPath,
    method: &str,
    query: &str,
    headers: &[HeaderPair],
    now: i64,
) -> Result<(Endpoint, Identity, String), Reply> {
    let expected = if endpoint == EndpointPath::Logs {
        "GET"
    } else {
        "POST"
    };
    if method != expected {
        let mut reply = Reply::error(405, &format!("Method {method} not allowed"), "");
        reply.headers.push(("allow", expected.to_string()));
        return Err(reply);
    }
    let (id, token) = verified_token(cfg, headers, now).map_err(|d| d.reply(""))?;
    if endpoint == EndpointPath::Logs {
        let store = cfg
            .logs
            .store
            .as_ref()
            .ok_or_else(|| Reply::error(404, MSG_ROUTE_NOT_FOUND, ""))?;
        if !store.query_roles.contains(&id.role) {
            return Err(role_error(&id.role, "request logs").reply(""));
        }
        return logs_query(query, store.user_records).map(|e| (e, id, token));
    }
    let Some(rv) = cfg.revocation.as_ref() else {
        return Err(Reply::error(404, MSG_ROUTE_NOT_FOUND, ""));
    };
    let endpoint = match endpoint {
        EndpointPath::Logs => return Err(Reply::error(404, MSG_ROUTE_NOT_FOUND, "")),
        EndpointPath::Logout => Endpoint::Logout,
        EndpointPath::Refresh => {
            let refresh = rv.refresh.as_ref();
            let remaining = id.expires_at.saturating_sub(now);
            if let Some(window) = refresh.and_then(|r| r.window_seconds) {
                if remaining > i64::try_from(window).unwrap_or(i64::MAX) {
                    return Err(Reply::error(
                        400,
                        &format!("Token can only be refreshed in its last {window} seconds"),
                        "",
                    ));
                }
            }
            let lifetime = id
                .issued_at
                .map(|iat| id.expires_at.saturating_sub(iat))
                .filter(|l| *l > 0);
            let ttl = refresh
                .and_then(|r| r.token_ttl_seconds)
                .map(|t| i64::try_from(t).unwrap_or(i64::MAX))
                .or(lifetime)
                .unwrap_or(DEFAULT_TOKEN_TTL_SECONDS as i64);
            Endpoint::Refresh { ttl_seconds: ttl }
        }
        EndpointPath::RevokeUser(user) => {
            if !rv.revoke_roles.contains(&id.role) {
                return Err(role_error(&id.role, "user revocation").reply(""));
            }
            if !crate::revocation::valid_user_id(&user) {
                return Err(Reply::error(400, "Invalid user id", ""));
            }
            Endpoint::RevokeUser(user)
        }
    };
    Ok((endpoint, id, token))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::{forge, SECRET};

    const NOW: i64 = 1_800_000_000;
    const RND: [u8; RANDOM_BYTES] = [7; RANDOM_BYTES];

    fn cfg() -> Config {
        cfg_with(serde_json::Value::Null)
    }

    fn cfg_with(revocation: serde_json::Value) -> Config {
        let mut v = serde_json::json!({
            "prefix": "/api/v1",
            "gateway_name": "gw-test",
            "passthrough_paths": ["/health"],
            "jwt": {"secret": String::from_utf8(SECRET.to_vec()).unwrap()},
            "routes": [
                {"name": "users", "prefix": "/users", "methods": ["GET", "POST"], "auth_required": true},
                {"name": "products", "prefix": "/products", "methods": ["GET"], "auth_required": false},
                {"name": "admin", "prefix": "/admin", "methods": ["GET"], "auth_required": true, "roles": ["admin"]}
            ]
        });
        if !revocation.is_null() {
            v["revocation"] = revocation;
        }
        Config::from_json(v.to_string().as_bytes()).unwrap()
    }

    fn token(role: &str) -> String {
        let payload = serde_json::json!({"sub": "user-001", "name": "admin", "role": role, "exp": NOW + 1800, "iat": NOW});
        forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
    }

    fn req(method: &str, path: &str, extra: &[(&str, &str)]) -> Vec<HeaderPair> {
        let mut h = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
            (":authority".to_string(), b"gw".to_vec()),
        ];
        h.extend(extra.iter().map(|(k, v)| (k.to_string(), v.as_bytes().to_vec())));
        h
    }

    fn reply(o: &Outcome) -> &Reply {
        match &o.action {
            Action::Reply(r) => r,
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    fn forward(o: &Outcome) -> (&Vec<String>, &Vec<(&'static str, String)>) {
        match &o.action {
            Action::Forward { remove, set } => (remove, set),
            other => panic!("expected forward, got {other:?}"),
        }
    }

    fn body(r: &Reply) -> serde_json::Value {
        serde_json::from_str(&r.body).unwrap()
    }

    #[test]
    fn public_route_forwards_with_trace_and_strips_identity_headers() {
        let h = req(
            "GET",
            "/api/v1/products/1?x=1",
            &[
                ("x-user-id", "spoof"),
                ("X-User-Role", "admin"),
                ("x-user-anything", "1"),
                ("x-gateway-canary", "1"),
            ],
        );
        let o = decide(&cfg(), &h, NOW, &RND);
        let (remove, set) = forward(&o);
        assert_eq!(
            remove,
            &vec!["x-user-id", "x-user-role", "x-user-anything", "x-gateway-canary"]
        );
        assert_eq!(o.route.as_deref(), Some("products"));
        assert!(set.iter().any(|(k, v)| *k == "x-gateway" && v == "gw-test"));
        assert!(set
            .iter()
            .any(|(k, v)| *k == "x-trace-id" && *v == o.trace.trace_id));
        assert!(!set.iter().any(|(k, _)| k.starts_with("x-user-")));
    }

    #[test]
    fn authenticated_route_injects_identity() {
        let h = req(
            "GET",
            "/api/v1/users/123",
            &[("authorization", &format!("Bearer {}", token("user")))],
        );
        let o = decide(&cfg(), &h, NOW, &RND);
        let (_, set) = forward(&o);
        let get = |name: &str| set.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str());
        assert_eq!(get("x-user-id"), Some("user-001"));
        assert_eq!(get("x-user-name"), Some("admin"));
        assert_eq!(get("x-user-role"), Some("user"));
    }

    #[test]
    fn auth_errors_match_the_reference_messages() {
        let c = cfg();
        type Case<'a> = (Vec<(&'a str, String)>, u16, &'a str);
        let cases: Vec<Case> = vec![
            (vec![], 401, MSG_AUTH_MISSING),
            (vec![("authorization", "Basic abc".into())], 401, MSG_AUTH_FORMAT),
            (vec![("authorization", "Bearer".into())], 401, MSG_AUTH_FORMAT),
            (vec![("authorization", "Bearer a b".into())], 401, MSG_AUTH_FORMAT),
            (
                vec![
                    ("authorization", format!("Bearer {}", token("user"))),
                    ("authorization", format!("Bearer {}", token("user"))),
                ],
                401,
                MSG_AUTH_FORMAT,
            ),
            (
                vec![("authorization", "Bearer garbage".into())],
                401,
                "Invalid token: malformed token",
            ),
            (
                vec![("authorization", format!("bearer {}", token("user")))],
                200,
                "",
            ),
        ];
        for (extra, status, message) in cases {
            let extra: Vec<(&str, &str)> = extra.iter().map(|(k, v)| (*k, v.as_str())).collect();
            let o = decide(&c, &req("GET", "/api/v1/users/1", &extra), NOW, &RND);
            if status == 200 {
                forward(&o);
                continue;
            }
            let r = reply(&o);
            assert_eq!(r.status, status, "{extra:?}");
            let b = body(r);
            assert_eq!(b["message"], message);
            assert_eq!(b["error"], "Unauthorized");
            assert_eq!(b["trace_id"], o.trace.trace_id.as_str());
        }
    }

    #[test]
    fn non_utf8_authorization_is_a_format_error() {
        let mut h = req("GET", "/api/v1/users/1", &[]);
        h.push(("authorization".into(), b"Bearer \xff\xfe".to_vec()));
        let o = decide(&cfg(), &h, NOW, &RND);
        assert_eq!(body(reply(&o))["message"], MSG_AUTH_FORMAT);
    }

    #[test]
    fn roles_are_enforced() {
        let c = cfg();
        let user = decide(
            &c,
            &req(
                "GET",
                "/api/v1/admin/x",
                &[("authorization", &format!("Bearer {}", token("user")))],
            ),
            NOW,
            &RND,
        );
        let r = reply(&user);
        assert_eq!(r.status, 403);
        assert_eq!(body(r)["error"], "Forbidden");
        let admin = decide(
            &c,
            &req(
                "GET",
                "/api/v1/admin/x",
                &[("authorization", &format!("Bearer {}", token("admin")))],
            ),
            NOW,
            &RND,
        );
        forward(&admin);
    }

    #[test]
    fn unknown_paths_and_methods() {
        let c = cfg();
        let r = decide(&c, &req("GET", "/api/v1/nope", &[]), NOW, &RND);
        assert_eq!(reply(&r).status, 404);
        assert_eq!(body(reply(&r))["message"], MSG_ROUTE_NOT_FOUND);
        let r = decide(&c, &req("GET", "/elsewhere", &[]), NOW, &RND);
        assert_eq!(reply(&r).status, 404);
        let r = decide(&c, &req("DELETE", "/api/v1/products/1", &[]), NOW, &RND);
        let rep = reply(&r);
        assert_eq!(rep.status, 405);
        assert!(rep.headers.contains(&("allow", "GET".to_string())));
        let r = decide(&c, &req("GET", "/health", &[]), NOW, &RND);
        forward(&r);
        let r = decide(&c, &[], NOW, &RND);
        assert_eq!(reply(&r).status, 404, "no pseudo headers at all");
    }

    #[test]
    fn gateway_endpoints() {
        let c = cfg_with(serde_json::json!({"refresh": {"window_seconds": 600, "token_ttl_seconds": 60}}));
        let auth = |role: &str| format!("Bearer {}", token(role));
        let endpoint = |method: &str, path: &str, role: &str| {
            decide(
                &c,
                &req(method, path, &[("authorization", &auth(role))]),
                NOW,
                &RND,
            )
        };
        let o = endpoint("POST", "/api/v1/auth/logout", "user");
        assert_eq!(o.action, Action::Endpoint(Endpoint::Logout));
        assert_eq!(o.token.as_deref(), Some(token("user").as_str()));
        let o = endpoint("GET", "/api/v1/auth/logout", "user");
        assert_eq!(reply(&o).status, 405);
        assert_eq!(body(reply(&o))["trace_id"], o.trace.trace_id.as_str());
        // The token expires in 1800 s: outside the 600 s refresh window.
        let o = endpoint("POST", "/api/v1/auth/refresh", "user");
        assert_eq!(reply(&o).status, 400);
        let o = decide(
            &c,
            &req(
                "POST",
                "/api/v1/auth/refresh",
                &[("authorization", &auth("user"))],
            ),
            NOW + 1300,
            &RND,
        );
        assert_eq!(o.action, Action::Endpoint(Endpoint::Refresh { ttl_seconds: 60 }));
        let o = endpoint("POST", "/api/v1/admin/users/user-9/revoke", "admin");
        assert_eq!(o.action, Action::Endpoint(Endpoint::RevokeUser("user-9".into())));
        let o = endpoint("POST", "/api/v1/admin/users/user-9/revoke", "user");
        assert_eq!(reply(&o).status, 403);
        let o = endpoint("POST", "/api/v1/admin/users/a%20b/revoke", "admin");
        assert_eq!(reply(&o).status, 400);
        let o = decide(&c, &req("POST", "/api/v1/auth/logout", &[]), NOW, &RND);
        assert_eq!(body(reply(&o))["message"], MSG_AUTH_MISSING);
    }

    #[test]
    fn refresh_keeps_the_token_lifetime_by_default() {
        let c = cfg_with(serde_json::json!({}));
        let o = decide(
            &c,
            &req(
                "POST",
                "/api/v1/auth/refresh",
                &[("authorization", &format!("Bearer {}", token("user")))],
            ),
            NOW,
            &RND,
        );
        assert_eq!(
            o.action,
            Action::Endpoint(Endpoint::Refresh { ttl_seconds: 1800 })
        );
    }

    #[test]
    fn response_time_format() {
        use std::time::Duration;
        assert_eq!(response_time(Duration::from_micros(0)), "0.00ms");
        assert_eq!(response_time(Duration::from_micros(1234)), "1.23ms");
        assert_eq!(response_time(Duration::from_micros(1235)), "1.24ms");
        assert_eq!(response_time(Duration::from_micros(99_999)), "100.00ms");
    }

    #[test]
    fn method_check_comes_before_auth() {
        let o = decide(&cfg(), &req("DELETE", "/api/v1/users/1", &[]), NOW, &RND);
        assert_eq!(reply(&o).status, 405);
    }

    #[test]
    fn incoming_trace_id_is_kept_and_appears_in_errors() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        let o = decide(
            &cfg(),
            &req("GET", "/api/v1/users/1", &[("x-trace-id", id)]),
            NOW,
            &RND,
        );
        assert_eq!(o.trace.trace_id, id);
        assert_eq!(body(reply(&o))["trace_id"], id);
        assert!(reply(&o).headers.contains(&("x-trace-id", id.to_string())));
    }
}
