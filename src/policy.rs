//! The pure decisions of the request path, one per phase, in the order the orchestrator
//! (`pipeline`) runs them: which route or gateway endpoint a request is for and
//! whether its method is allowed ([`classify`]); who the caller is and whether the route lets
//! them in ([`authenticate`]); what a gateway endpoint is asked to do ([`endpoint`]); and the
//! request headers to strip and set before it goes upstream ([`forward_headers`]). No host calls.

use crate::config::{Config, Route};
use crate::headers::{self, HeaderPair};
use crate::jwt::{Identity, KeyContext, TokenCache, TokenError};
use crate::outcome::{Outcome, TokenFault};
use crate::reply::Reply;
use crate::revocation::{EndpointPath, DEFAULT_TOKEN_TTL_SECONDS};
use crate::trace::{trace_context, TraceContext, HEADER_TRACEPARENT, HEADER_TRACE_ID, RANDOM_BYTES};

pub const HEADER_GATEWAY: &str = "x-gateway";
pub const HEADER_USER_ID: &str = "x-user-id";
pub const HEADER_USER_NAME: &str = "x-user-name";
pub const HEADER_USER_ROLE: &str = "x-user-role";
/// Every client-supplied header with this prefix is removed before the request goes upstream.
pub const IDENTITY_HEADER_PREFIX: &str = "x-user-";

use crate::outcome::message;
pub use crate::outcome::message::{
    AUTH_FORMAT as MSG_AUTH_FORMAT, AUTH_MISSING as MSG_AUTH_MISSING, ROUTE_NOT_FOUND as MSG_ROUTE_NOT_FOUND,
};

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A gateway route (index into [`Config::routes`]).
    Route(usize),
    /// An endpoint the gateway answers itself, with the route its path sits under (whose per-IP
    /// and per-user limits apply to it).
    Endpoint {
        path: EndpointKind,
        under: Option<usize>,
    },
    /// A path outside the prefix that Envoy answers (the health path).
    Passthrough,
}

/// Which gateway endpoint a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointKind {
    Logs,
    Revocation(EndpointPath),
}

/// The first phase's result: the request's trace identity and what it is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Classified {
    pub trace: TraceContext,
    pub target: Result<Target, Reply>,
}

/// Endpoints the gateway answers itself, with what each needs.
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

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub identity: Identity,
    pub token: String,
    /// The `Authorization` scheme it came with.
    pub scheme: Scheme,
}

/// An `Authorization` scheme the gateway takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    Bearer,
    /// RFC 9449 7.1: a DPoP-bound token, with its proof in the `DPoP` header.
    Dpop,
}

/// Phase 1: trace identity, then route and method (or the gateway endpoint the path names).
pub fn classify(cfg: &Config, request: &[HeaderPair], random: &[u8; RANDOM_BYTES]) -> Classified {
    let trusted = |name| {
        if cfg.trace.trust_incoming {
            headers::get_str(request, name)
        } else {
            None
        }
    };
    let trace = trace_context(trusted(HEADER_TRACE_ID), trusted(HEADER_TRACEPARENT), random);
    let target = target(cfg, request, &trace.trace_id);
    Classified { trace, target }
}

fn method_not_allowed(method: &str, allow: &str, trace_id: &str) -> Reply {
    let mut reply = Reply::refuse(
        Outcome::MethodNotAllowed,
        &message::method_not_allowed(method),
        trace_id,
    );
    reply.headers.push(("allow", allow.to_string()));
    reply
}

/// A path as an endpoint is recognised: `;` parameters dropped from every segment, `%2F`
/// decoded, trailing `/` removed. Only used to recognise the gateway's own endpoints, so that
/// `/auth/logout/` or `/auth/logout;x` logs out rather than reaching the upstream.
fn endpoint_form(path: &str) -> std::borrow::Cow<'_, str> {
    let plain = !path.contains(';') && !path.contains('%') && (path.len() <= 1 || !path.ends_with('/'));
    if plain {
        return std::borrow::Cow::Borrowed(path);
    }
    let decoded = path.replace("%2F", "/").replace("%2f", "/");
    let mut out = String::with_capacity(decoded.len());
    for (i, segment) in decoded.split('/').enumerate() {
        if i > 0 {
            out.push('/');
        }
        out.push_str(segment.split(';').next().unwrap_or(""));
    }
    while out.len() > 1 && out.ends_with('/') {
        out.pop();
    }
    std::borrow::Cow::Owned(out)
}

fn endpoint_at(cfg: &Config, path: &str) -> Option<EndpointKind> {
    let form = endpoint_form(path);
    if cfg
        .logs
        .store
        .as_ref()
        .is_some_and(|s| s.query_path.eq_ignore_ascii_case(&form))
    {
        return Some(EndpointKind::Logs);
    }
    let rv = cfg.revocation.as_ref()?;
    rv.endpoint(&form)
        .or_else(|| rv.revoke_user_at(path, endpoint_form))
        .map(EndpointKind::Revocation)
}

fn target(cfg: &Config, request: &[HeaderPair], trace_id: &str) -> Result<Target, Reply> {
    let not_found = || Reply::refuse(Outcome::NotFound, MSG_ROUTE_NOT_FOUND, trace_id);
    let method = headers::get_str(request, ":method").unwrap_or("");
    let full_path = headers::get_str(request, ":path").unwrap_or("");
    let path = full_path.split(['?', '#']).next().unwrap_or("");
    let endpoint = endpoint_at(cfg, path);
    let route_index = |path: &str| cfg.route_index(path);
    if let Some(kind) = endpoint {
        let expected = if kind == EndpointKind::Logs { "GET" } else { "POST" };
        if method != expected {
            return Err(method_not_allowed(method, expected, trace_id));
        }
        return Ok(Target::Endpoint {
            path: kind,
            under: route_index(path),
        });
    }
    if cfg.under_prefix(path) {
        let i = route_index(path).ok_or_else(not_found)?;
        let route = cfg.routes.get(i).ok_or_else(not_found)?;
        if !route.allows_method(method) {
            return Err(method_not_allowed(method, &route.allow, trace_id));
        }
        return Ok(Target::Route(i));
    }
    if cfg.passthrough_paths.iter().any(|p| p == path) {
        return Ok(Target::Passthrough);
    }
    Err(not_found())
}

/// Extracts the token the way the reference does: exactly one `Authorization` header, exactly
/// two space-separated parts, the first `bearer` (or, RFC 9449, `dpop`) in any case.
pub fn presented_token(request: &[HeaderPair]) -> Result<(Scheme, &str), &'static str> {
    let mut values = request
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
        (Some(scheme), Some(token), None) if !token.is_empty() => {
            if scheme.eq_ignore_ascii_case("bearer") {
                Ok((Scheme::Bearer, token))
            } else if scheme.eq_ignore_ascii_case("dpop") {
                Ok((Scheme::Dpop, token))
            } else {
                Err(MSG_AUTH_FORMAT)
            }
        }
        _ => Err(MSG_AUTH_FORMAT),
    }
}

/// The token of the `Authorization` header, whichever scheme it came with.
pub fn bearer_token(request: &[HeaderPair]) -> Result<&str, &'static str> {
    presented_token(request).map(|(_, token)| token)
}

/// RFC 9449 7.1's challenge: `DPoP` with the error and the proof algorithms the issuer takes.
pub fn dpop_challenge(
    error: &str,
    description: Option<&str>,
    algorithms: &[crate::jwt::Algorithm],
) -> String {
    let algs: Vec<&str> = algorithms.iter().map(|a| a.name()).collect();
    let mut c = format!("DPoP error=\"{error}\"");
    if let Some(d) = description {
        c.push_str(&format!(", error_description=\"{d}\""));
    }
    if !algs.is_empty() {
        c.push_str(&format!(", algs=\"{}\"", algs.join(" ")));
    }
    c
}

/// Whether the token came with the scheme its binding needs (RFC 9449 7.1, 7.2): a DPoP-bound
/// token only as `DPoP`, the `DPoP` scheme only with one, and an issuer with `dpop: required`
/// takes nothing else. The proof itself and a certificate's match are checked by the
/// orchestrator, which can read the connection and remember proofs.
pub fn check_scheme(cfg: &Config, identity: &Identity, scheme: Scheme, trace_id: &str) -> Result<(), Reply> {
    use crate::jwt::{Binding, DpopMode};
    let dpop = cfg
        .verifier
        .as_ref()
        .and_then(|v| v.issuer(identity.issuer))
        .map(|i| &i.dpop);
    let (mode, algorithms) = dpop.map_or((DpopMode::Off, &[][..]), |d| (d.mode, d.algorithms.as_slice()));
    let refused = |message: &str| {
        let mut reply = Reply::refuse(Outcome::InvalidToken(TokenFault::Binding), message, trace_id);
        if mode != DpopMode::Off {
            reply.headers.push((
                HEADER_WWW_AUTHENTICATE,
                dpop_challenge("invalid_token", None, algorithms),
            ));
        }
        reply
    };
    match (&identity.binding, scheme) {
        (Binding::Dpop(_), Scheme::Dpop) => Ok(()),
        (Binding::Dpop(_), Scheme::Bearer) => Err(refused(message::DPOP_AS_BEARER)),
        (_, Scheme::Dpop) => Err(refused(message::DPOP_UNBOUND)),
        (_, Scheme::Bearer) if mode == DpopMode::Required => Err(refused(message::DPOP_REQUIRED)),
        (_, Scheme::Bearer) => Ok(()),
    }
}

/// Why a caller was not let in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The answer to send.
    Reply(Reply),
    /// The token needs keys of this issuer that the VM does not hold yet (an unknown `kid`, or
    /// no key set yet): the orchestrator may fetch them and ask again with `may_wait` false.
    AwaitKeys(usize),
    /// The token is opaque: the orchestrator asks the introspecting issuer (its index).
    Introspect(usize),
}

impl From<Reply> for Refused {
    fn from(r: Reply) -> Self {
        Self::Reply(r)
    }
}

/// Bearer extraction and verification (through the VM's verified-token cache, with the VM's
/// fetched key sets and the host's signature check). With `may_wait`, a token whose issuer's keys are missing is
/// [`Refused::AwaitKeys`]; without, it is refused: 401 for an unknown `kid`, 503 when the
/// issuer has no keys at all (the gateway cannot tell, not the token is bad).
pub fn verified_caller(
    cfg: &Config,
    cache: &mut TokenCache,
    keys: KeyContext<'_>,
    request: &[HeaderPair],
    now: i64,
    trace_id: &str,
    may_wait: bool,
) -> Result<Caller, Refused> {
    let (scheme, token) = presented_token(request).map_err(|m| {
        let outcome = if m == MSG_AUTH_MISSING {
            Outcome::MissingAuthorization
        } else {
            Outcome::BadAuthorizationFormat
        };
        Reply::refuse(outcome, m, trace_id)
    })?;
    let verifier = cfg
        .verifier
        .as_ref()
        .ok_or_else(|| Reply::refuse(Outcome::NoVerifier, message::NO_VERIFIER, trace_id))?;
    if crate::jwt::introspection::is_opaque(token) {
        if let Some((index, _, _)) = verifier.introspecting() {
            return Err(Refused::Introspect(index));
        }
    }
    let identity = cache
        .verify_with(verifier, keys, token, now)
        .map_err(|e| match e {
            TokenError::UnknownKey(i) | TokenError::KeysUnavailable(i) if may_wait => Refused::AwaitKeys(i),
            TokenError::VerificationBudget => {
                let mut reply = Reply::refuse(
                    Outcome::RateLimited(crate::outcome::Scope::Ip),
                    message::VERIFICATION_BUDGET,
                    trace_id,
                );
                reply.headers.push(("retry-after", "1".to_string()));
                Refused::Reply(reply)
            }
            TokenError::KeysUnavailable(i) => {
                let name = verifier.issuer(i).map_or("?", |s| s.name.as_str());
                Refused::Reply(Reply::refuse(
                    Outcome::KeysUnavailable,
                    &message::keys_unavailable(name),
                    trace_id,
                ))
            }
            e => Refused::Reply(Reply::refuse(
                Outcome::InvalidToken(e.fault()),
                &message::invalid_token(&e),
                trace_id,
            )),
        })?;
    check_scheme(cfg, &identity, scheme, trace_id)?;
    Ok(Caller {
        identity,
        token: token.to_string(),
        scheme,
    })
}

/// The caller's roles may not use `what`: named as the reference names its one role (the roles
/// comma-separated when there are several).
fn role_error(id: &Identity, what: &str, trace_id: &str) -> Reply {
    Reply::refuse(Outcome::Role, &message::role(&id.role_header(), what), trace_id)
}

/// A route's role and scope conditions: any of `roles`, every one of `roles_all`, every one of
/// `scopes` (a refusal for want of a scope carries RFC 6750's challenge).
pub fn check_access(route: &Route, id: &Identity, trace_id: &str) -> Result<(), Reply> {
    let what = || format!("route '{}'", route.name);
    if !route.roles.is_empty() && !id.has_any_role(&route.roles) {
        return Err(role_error(id, &what(), trace_id));
    }
    if let Some(missing) = route.roles_all.iter().find(|r| !id.roles.contains(r)) {
        return Err(Reply::refuse(
            Outcome::Role,
            &message::role_required(missing, &what()),
            trace_id,
        ));
    }
    if let Some(missing) = route.scopes.iter().find(|s| !id.scopes.contains(s)) {
        let mut reply = Reply::refuse(
            Outcome::InsufficientScope,
            &message::scope_required(missing, &what()),
            trace_id,
        );
        reply
            .headers
            .push((HEADER_WWW_AUTHENTICATE, route.scope_challenge.clone()));
        return Err(reply);
    }
    Ok(())
}

pub const HEADER_WWW_AUTHENTICATE: &str = "www-authenticate";

/// Phase 3 for a route: the caller, when the route requires one, with the route's roles checked.
#[allow(clippy::too_many_arguments)]
pub fn authenticate(
    cfg: &Config,
    cache: &mut TokenCache,
    keys: KeyContext<'_>,
    route: &Route,
    request: &[HeaderPair],
    now: i64,
    trace_id: &str,
    may_wait: bool,
) -> Result<Option<Caller>, Refused> {
    if !route.auth_required {
        return Ok(None);
    }
    let caller = verified_caller(cfg, cache, keys, request, now, trace_id, may_wait)?;
    check_access(route, &caller.identity, trace_id).map_err(Refused::Reply)?;
    Ok(Some(caller))
}

/// `?trace_id=<id>` or `?user_id=<id>[&limit=<n>]`, the ids percent-decoded (`%7C` is `|`;
/// `+` stays a plus).
fn logs_query(query: &str, max: u32, trace_id: &str) -> Result<Endpoint, Reply> {
    let mut trace = None;
    let mut user = None;
    let mut limit = max;
    let bad = |m: &str| Reply::refuse(Outcome::BadRequest, m, trace_id);
    for pair in query.split('&') {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        match k {
            "trace_id" => trace = Some(crate::headers::percent_decode(v).unwrap_or_default()),
            "user_id" => user = Some(crate::headers::percent_decode(v).unwrap_or_default()),
            "limit" => {
                limit = v
                    .parse::<u32>()
                    .ok()
                    .filter(|n| (1..=max).contains(n))
                    .ok_or_else(|| bad(&message::logs_limit(max)))?
            }
            _ => {}
        }
    }
    let valid = |v: &str| crate::revocation::valid_user_id(v);
    match (trace, user) {
        (Some(t), None) if valid(&t) => Ok(Endpoint::LogsByTrace(t)),
        (None, Some(u)) if valid(&u) => Ok(Endpoint::LogsByUser { user_id: u, limit }),
        (Some(_), Some(_)) => Err(bad(message::LOGS_BOTH)),
        (None, None) => Err(bad(message::LOGS_NONE)),
        _ => Err(bad(message::LOGS_INVALID_ID)),
    }
}

/// Phase 3 for a gateway endpoint: what the (authenticated) caller asks for, with the
/// endpoint's own conditions (roles, refresh window, a valid user id or query).
pub fn endpoint(
    cfg: &Config,
    kind: &EndpointKind,
    caller: &Caller,
    request: &[HeaderPair],
    now: i64,
    trace_id: &str,
) -> Result<Endpoint, Reply> {
    let id = &caller.identity;
    let not_found = || Reply::refuse(Outcome::NotFound, MSG_ROUTE_NOT_FOUND, trace_id);
    match kind {
        EndpointKind::Logs => {
            let store = cfg.logs.store.as_ref().ok_or_else(not_found)?;
            if !id.has_any_role(&store.query_roles) {
                return Err(role_error(id, "request logs", trace_id));
            }
            let full_path = headers::get_str(request, ":path").unwrap_or("");
            let query = full_path.split_once('?').map(|(_, q)| q).unwrap_or("");
            logs_query(query, store.user_records, trace_id)
        }
        EndpointKind::Revocation(path) => {
            let rv = cfg.revocation.as_ref().ok_or_else(not_found)?;
            match path {
                EndpointPath::Logout => Ok(Endpoint::Logout),
                EndpointPath::Refresh => {
                    // The verifier's clock skew lets a token be used a little past `exp`; it
                    // never buys a new one.
                    if now >= id.expires_at {
                        return Err(Reply::refuse(
                            Outcome::InvalidToken(TokenError::Expired.fault()),
                            &message::invalid_token(TokenError::Expired),
                            trace_id,
                        ));
                    }
                    let refresh = rv.refresh.as_ref();
                    let remaining = id.expires_at.saturating_sub(now);
                    if let Some(window) = refresh.and_then(|r| r.window_seconds) {
                        if remaining > i64::try_from(window).unwrap_or(i64::MAX) {
                            return Err(Reply::refuse(
                                Outcome::BadRequest,
                                &message::refresh_window(window),
                                trace_id,
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
                    Ok(Endpoint::Refresh { ttl_seconds: ttl })
                }
                EndpointPath::RevokeUser(user) => {
                    if !id.has_any_role(&rv.revoke_roles) {
                        return Err(role_error(id, "user revocation", trace_id));
                    }
                    if !crate::revocation::valid_user_id(user) {
                        return Err(Reply::refuse(
                            Outcome::BadRequest,
                            message::INVALID_USER_ID,
                            trace_id,
                        ));
                    }
                    Ok(Endpoint::RevokeUser(user.clone()))
                }
            }
        }
    }
}

/// Request-header changes before a request goes upstream.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Forward {
    pub remove: Vec<String>,
    pub set: Vec<(&'static str, String)>,
    /// The caller's scopes, space-separated, under `jwt.scopes_header`.
    pub scopes: Option<(String, String)>,
}

/// Phase 6 (after limits and canary): strip every client-sent identity header and the internal
/// canary header; set the trace headers, `X-Gateway` and the caller's identity.
pub fn forward_headers(
    cfg: &Config,
    request: &[HeaderPair],
    trace: &TraceContext,
    identity: Option<&Identity>,
) -> Forward {
    let mut remove: Vec<String> = Vec::new();
    for (name, _) in request {
        if is_client_forgery(name) {
            let lower = name.to_ascii_lowercase();
            if !remove.contains(&lower) {
                remove.push(lower);
            }
        }
    }
    let mut set: Vec<(&'static str, String)> = vec![
        (HEADER_TRACE_ID, trace.trace_id.clone()),
        (HEADER_TRACEPARENT, trace.traceparent.clone()),
        (HEADER_GATEWAY, cfg.gateway_name.clone()),
    ];
    if let Some(id) = identity {
        // An empty claim is forwarded as no header, as an absent one (`X-User-Role` is then
        // absent, not the default role: the role checks saw the empty value). Envoy's
        // dynamic-module ABI cannot set an empty value (it removes the header), and an empty
        // identity header says nothing an absent one does not.
        if let Some(sub) = id.user_id.as_ref().filter(|s| !s.is_empty()) {
            set.push((HEADER_USER_ID, sub.clone()));
        }
        if let Some(name) = id.user_name.as_ref().filter(|s| !s.is_empty()) {
            set.push((HEADER_USER_NAME, name.clone()));
        }
        // Every role, comma-separated in token order (a role with a comma is refused at
        // verification, so the list cannot be forged from inside one role).
        let roles = id.role_header();
        if !roles.is_empty() {
            set.push((HEADER_USER_ROLE, roles));
        }
    }
    let scopes = match (
        identity,
        cfg.verifier.as_ref().and_then(|v| v.scopes_header.as_ref()),
    ) {
        (Some(id), Some(name)) if !id.scopes.is_empty() => Some((name.clone(), id.scopes.join(" "))),
        _ => None,
    };
    Forward { remove, set, scopes }
}

/// Headers a client must not send upstream: the identity headers (`X-User-*`), the gateway's
/// own canary headers, and the address headers an upstream would take for the gateway's word
/// (`X-Real-IP`, `Forwarded`, `X-Forwarded-Host`; Envoy itself writes `X-Forwarded-For`). `_`
/// counts as `-`: WSGI and CGI upstreams read `X_User_Id` as `X-User-Id`. Compared without
/// allocating (this runs for every header of every request).
pub fn is_client_forgery(name: &str) -> bool {
    fn starts(name: &str, prefix: &str) -> bool {
        name.len() >= prefix.len()
            && name
                .bytes()
                .zip(prefix.bytes())
                .all(|(a, b)| (if a == b'_' { b'-' } else { a.to_ascii_lowercase() }) == b)
    }
    starts(name, IDENTITY_HEADER_PREFIX)
        || [
            crate::canary::ROUTE_HEADER,
            crate::canary::CANARY_HEADER,
            "x-real-ip",
            "forwarded",
            "x-forwarded-host",
        ]
        .iter()
        .any(|p| name.len() == p.len() && starts(name, p))
}

/// The headers only the gateway writes (identity and canary): on a host that cannot remove a
/// client's copy before the upstream sees it, a request carrying one is refused instead.
pub fn gateway_owned(name: &str) -> bool {
    fn lower(n: &str) -> impl Iterator<Item = u8> + '_ {
        n.bytes()
            .map(|b| if b == b'_' { b'-' } else { b.to_ascii_lowercase() })
    }
    lower(name)
        .take(IDENTITY_HEADER_PREFIX.len())
        .eq(IDENTITY_HEADER_PREFIX.bytes())
        || [crate::canary::ROUTE_HEADER, crate::canary::CANARY_HEADER]
            .iter()
            .any(|p| lower(name).eq(p.bytes()))
}

/// `X-Response-Time` as the reference writes it (`12.34ms`), with integer arithmetic (no float
/// formatting code in the module).
pub fn response_time(elapsed_us: u64) -> String {
    let hundredths = (elapsed_us + 5) / 10; // round to 0.01 ms
    format!("{}.{:02}ms", hundredths / 100, hundredths % 100)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::{forge, SECRET};

    const NOW: i64 = 1_800_000_000;
    const RND: [u8; RANDOM_BYTES] = [7; RANDOM_BYTES];

    fn cfg() -> Config {
        let v = serde_json::json!({
            "gateway": {"prefix": "/api/v1", "name": "gw-test"},
            "passthrough_paths": ["/health"],
            "webdis_cluster": "webdis",
            "jwt": {"secret": String::from_utf8(SECRET.to_vec()).unwrap()},
            "revocation": {"refresh": {"window": 600, "token_ttl": 60}},
            "routes": [
                {"name": "users", "prefix": "/users", "methods": ["GET", "POST"], "auth_required": true},
                {"name": "products", "prefix": "/products", "methods": ["GET"], "auth_required": false},
                {"name": "admin", "prefix": "/admin", "methods": ["GET"], "auth_required": true, "roles": ["admin"]},
                {"name": "auth", "prefix": "/auth", "methods": ["POST"], "auth_required": false}
            ]
        });
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

    fn auth(
        c: &Config,
        route: &Route,
        h: &[HeaderPair],
        now: i64,
        trace: &str,
    ) -> Result<Option<Caller>, Reply> {
        authenticate(
            c,
            &mut TokenCache::default(),
            KeyContext::remote(&[]),
            route,
            h,
            now,
            trace,
            false,
        )
        .map_err(|r| match r {
            Refused::Reply(r) => r,
            Refused::AwaitKeys(i) => panic!("waits for keys of issuer {i}"),
            Refused::Introspect(i) => panic!("introspects with issuer {i}"),
        })
    }

    fn body(r: &Reply) -> serde_json::Value {
        serde_json::from_str(&r.body).unwrap()
    }

    fn route_name(c: &Config, t: &Target) -> String {
        match t {
            Target::Route(i) => c.routes[*i].name.clone(),
            other => panic!("expected a route, got {other:?}"),
        }
    }

    #[test]
    fn classify_routes_endpoints_and_refusals() {
        let c = cfg();
        let t = classify(&c, &req("GET", "/api/v1/users/1?x=1", &[]), &RND);
        assert_eq!(route_name(&c, &t.target.unwrap()), "users");
        let t = classify(&c, &req("POST", "/api/v1/auth/logout", &[]), &RND)
            .target
            .unwrap();
        let auth = c.routes.iter().position(|r| r.name == "auth");
        assert_eq!(
            t,
            Target::Endpoint {
                path: EndpointKind::Revocation(EndpointPath::Logout),
                under: auth
            },
            "an endpoint knows the route it sits under"
        );
        assert_eq!(
            classify(&c, &req("GET", "/health", &[]), &RND).target,
            Ok(Target::Passthrough)
        );
        for (m, p, status) in [
            ("GET", "/api/v1/nope", 404),
            ("GET", "/elsewhere", 404),
            ("DELETE", "/api/v1/products/1", 405),
            ("GET", "/api/v1/auth/logout", 405),
        ] {
            let cl = classify(&c, &req(m, p, &[]), &RND);
            let r = cl.target.unwrap_err();
            assert_eq!(r.status(), status, "{m} {p}");
            assert_eq!(body(&r)["trace_id"], cl.trace.trace_id.as_str());
            assert!(r.headers.contains(&("x-trace-id", cl.trace.trace_id.clone())));
        }
        // Near misses of an endpoint's path are that endpoint, never the upstream's.
        for near in [
            "/api/v1/auth/logout/",
            "/api/v1/auth/Logout",
            "/api/v1/auth/logout;x=1",
            "/api/v1/auth%2flogout",
            "/api/v1/AUTH/logout//",
        ] {
            let t = classify(&c, &req("POST", near, &[]), &RND).target.unwrap();
            assert!(
                matches!(
                    t,
                    Target::Endpoint {
                        path: EndpointKind::Revocation(EndpointPath::Logout),
                        ..
                    }
                ),
                "{near}: {t:?}"
            );
        }
        let t = classify(&c, &req("POST", "/api/v1/admin/users/Bob;x/revoke/", &[]), &RND)
            .target
            .unwrap();
        assert!(
            matches!(&t, Target::Endpoint { path: EndpointKind::Revocation(EndpointPath::RevokeUser(u)), .. } if u == "Bob;x"),
            "{t:?}"
        );
        // The id segment is taken as sent, then percent-decoded: any subject can be named, and
        // `a;b` is the user `a;b`, never `a`. One that does not decode comes back empty (400).
        for (path, want) in [
            ("/api/v1/admin/users/a;b/revoke", "a;b"),
            ("/api/v1/admin/users/auth0%7Cabc/revoke", "auth0|abc"),
            ("/api/v1/admin/users/%E7%94%A8%E6%88%B7/revoke", "用户"),
            ("/api/v1/admin/users/org%2F7/revoke", "org/7"),
            ("/api/v1/ADMIN;v=1/users/x%20y/Revoke;z", "x y"),
            ("/api/v1/admin/users/%ZZ/revoke", ""),
        ] {
            let t = classify(&c, &req("POST", path, &[]), &RND).target.unwrap();
            assert!(
                matches!(&t, Target::Endpoint { path: EndpointKind::Revocation(EndpointPath::RevokeUser(u)), .. } if u == want),
                "{path}: {t:?}"
            );
        }
        for other in [
            "/api/v1/admin/users/x/revoked",
            "/api/v1/admin/users/x/y/revoke",
            "/api/v1/admin/userz/x/revoke",
        ] {
            let t = classify(&c, &req("GET", other, &[]), &RND).target;
            assert!(!matches!(t, Ok(Target::Endpoint { .. })), "{other}: {t:?}");
        }
        let r = classify(&c, &req("DELETE", "/api/v1/products/1", &[]), &RND)
            .target
            .unwrap_err();
        assert!(r.headers.contains(&("allow", "GET".to_string())));
        assert_eq!(
            classify(&c, &[], &RND).target.unwrap_err().status(),
            404,
            "no pseudo headers"
        );
    }

    #[test]
    fn incoming_trace_id_is_kept_and_appears_in_errors() {
        let id = "0af7651916cd43dd8448eb211c80319c";
        let cl = classify(&cfg(), &req("GET", "/api/v1/nope", &[("x-trace-id", id)]), &RND);
        assert_eq!(cl.trace.trace_id, id);
        assert_eq!(body(&cl.target.unwrap_err())["trace_id"], id);
        let mut c = cfg();
        c.trace.trust_incoming = false;
        let cl = classify(&c, &req("GET", "/api/v1/nope", &[("x-trace-id", id)]), &RND);
        assert_ne!(cl.trace.trace_id, id, "not trusted: a new id");
    }

    #[test]
    fn auth_errors_match_the_reference_messages() {
        let c = cfg();
        let users = c.routes.iter().find(|r| r.name == "users").unwrap();
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
            let h = req("GET", "/api/v1/users/1", &extra);
            let got = auth(&c, users, &h, NOW, "t-1");
            if status == 200 {
                assert_eq!(
                    got.unwrap().unwrap().identity.user_id.as_deref(),
                    Some("user-001")
                );
                continue;
            }
            let r = got.unwrap_err();
            assert_eq!(r.status(), status, "{extra:?}");
            let b = body(&r);
            assert_eq!(b["message"], message);
            assert_eq!(b["error"], "Unauthorized");
            assert_eq!(b["trace_id"], "t-1");
        }
        let mut h = req("GET", "/api/v1/users/1", &[]);
        h.push(("authorization".into(), b"Bearer \xff\xfe".to_vec()));
        let r = auth(&c, users, &h, NOW, "").unwrap_err();
        assert_eq!(body(&r)["message"], MSG_AUTH_FORMAT);
    }

    #[test]
    fn roles_are_enforced() {
        let c = cfg();
        let admin = c.routes.iter().find(|r| r.name == "admin").unwrap();
        let h = |role: &str| {
            req(
                "GET",
                "/api/v1/admin/x",
                &[("authorization", &format!("Bearer {}", token(role)))],
            )
        };
        let r = auth(&c, admin, &h("user"), NOW, "").unwrap_err();
        assert_eq!((r.status(), r.outcome), (403, Outcome::Role));
        assert_eq!(body(&r)["error"], "Forbidden");
        assert!(auth(&c, admin, &h("admin"), NOW, "").is_ok());
    }

    #[test]
    fn any_role_all_roles_and_scopes_per_route() {
        let v = serde_json::json!({
            "gateway": {"prefix": "/api/v1", "name": "gw-test"},
            "jwt": {"secret": String::from_utf8(SECRET.to_vec()).unwrap(),
                    "claims": {"role": "realm_access.roles"}, "scopes_header": "X-User-Scopes"},
            "routes": [
                {"name": "admin", "prefix": "/admin", "roles": ["admin", "ops"]},
                {"name": "audit", "prefix": "/audit", "roles_all": ["admin", "auditor"]},
                {"name": "orders", "prefix": "/orders", "scopes": ["orders:read", "orders:write"]}
            ]
        });
        let c = Config::from_json(v.to_string().as_bytes()).unwrap();
        let route = |n: &str| c.routes.iter().find(|r| r.name == n).unwrap();
        let h = |roles: serde_json::Value, scope: &str| {
            let payload = serde_json::json!({"sub": "u", "exp": NOW + 60, "scope": scope,
                                             "realm_access": {"roles": roles}});
            let t = forge(r#"{"alg":"HS256"}"#, &payload.to_string(), SECRET);
            req("GET", "/api/v1/x", &[("authorization", &format!("Bearer {t}"))])
        };
        // Admin as the third of three roles passes; none of the listed roles gets 403 naming them.
        let keycloak = serde_json::json!(["offline_access", "default-roles-demo", "admin"]);
        assert!(auth(&c, route("admin"), &h(keycloak.clone(), ""), NOW, "").is_ok());
        let r = auth(
            &c,
            route("admin"),
            &h(serde_json::json!(["offline_access", "viewer"]), ""),
            NOW,
            "",
        )
        .unwrap_err();
        assert_eq!((r.status(), r.outcome), (403, Outcome::Role));
        assert_eq!(
            body(&r)["message"],
            "Role 'offline_access,viewer' is not allowed to access route 'admin'"
        );
        // roles_all: every one.
        let r = auth(&c, route("audit"), &h(keycloak, ""), NOW, "").unwrap_err();
        assert_eq!(
            body(&r)["message"],
            "Role 'auditor' is required to access route 'audit'"
        );
        assert!(auth(
            &c,
            route("audit"),
            &h(serde_json::json!(["auditor", "admin"]), ""),
            NOW,
            ""
        )
        .is_ok());
        // Scopes: every one, refused with RFC 6750's challenge.
        let r = auth(
            &c,
            route("orders"),
            &h(serde_json::json!([]), "openid orders:read"),
            NOW,
            "",
        )
        .unwrap_err();
        assert_eq!((r.status(), r.outcome), (403, Outcome::InsufficientScope));
        assert_eq!(r.outcome.decision(), "insufficient_scope");
        assert_eq!(
            body(&r)["message"],
            "Scope 'orders:write' is required to access route 'orders'"
        );
        let challenge = r
            .headers
            .iter()
            .find(|(n, _)| *n == "www-authenticate")
            .map(|(_, v)| v.as_str());
        assert_eq!(
            challenge,
            Some(r#"Bearer error="insufficient_scope", scope="orders:read orders:write""#)
        );
        let ok = auth(
            &c,
            route("orders"),
            &h(serde_json::json!(["a", "b"]), "orders:write orders:read"),
            NOW,
            "",
        )
        .unwrap()
        .unwrap();
        // Upstream: every role in token order, the scopes under the configured header, and a
        // client's copies of both stripped.
        let mut sent = h(serde_json::json!(["a", "b"]), "orders:write orders:read");
        sent.push(("x-user-scopes".into(), b"admin:all".to_vec()));
        sent.push(("X-User-Role".into(), b"admin".to_vec()));
        let trace = crate::trace::trace_context(None, None, &RND);
        let f = forward_headers(&c, &sent, &trace, Some(&ok.identity));
        assert!(f.remove.contains(&"x-user-scopes".to_string()));
        assert!(f.remove.contains(&"x-user-role".to_string()));
        assert!(f.set.contains(&(HEADER_USER_ROLE, "a,b".to_string())));
        assert_eq!(
            f.scopes,
            Some((
                "x-user-scopes".to_string(),
                "orders:write orders:read".to_string()
            ))
        );
        // Roles and scopes are route settings that need authentication, named in errors.
        for (route, field) in [
            (
                serde_json::json!({"name": "x", "prefix": "/x", "auth_required": false, "scopes": ["a"]}),
                "routes[0].scopes",
            ),
            (
                serde_json::json!({"name": "x", "prefix": "/x", "auth_required": false, "roles_all": ["a"]}),
                "routes[0].roles_all",
            ),
            (
                serde_json::json!({"name": "x", "prefix": "/x", "scopes": ["a b"]}),
                "routes[0].scopes[0]",
            ),
        ] {
            let mut v = v.clone();
            v["routes"] = serde_json::json!([route]);
            let e = Config::from_json(v.to_string().as_bytes()).err().unwrap();
            assert_eq!(e.field, field, "{e:?}");
        }
    }

    #[test]
    fn endpoints() {
        let c = cfg();
        let caller = |role: &str| Caller {
            identity: crate::jwt::Verifier::new(&[crate::jwt::Algorithm::Hs256], SECRET, None, None, 60)
                .verify(&token(role), NOW)
                .unwrap(),
            token: token(role),
            scheme: Scheme::Bearer,
        };
        let rv = |p: EndpointPath| EndpointKind::Revocation(p);
        let h = req("POST", "/x", &[]);
        assert_eq!(
            endpoint(&c, &rv(EndpointPath::Logout), &caller("user"), &h, NOW, ""),
            Ok(Endpoint::Logout)
        );
        // The token expires in 1800 s: outside the 600 s refresh window.
        let r = endpoint(&c, &rv(EndpointPath::Refresh), &caller("user"), &h, NOW, "").unwrap_err();
        assert_eq!(r.status(), 400);
        assert_eq!(
            endpoint(
                &c,
                &rv(EndpointPath::Refresh),
                &caller("user"),
                &h,
                NOW + 1300,
                ""
            ),
            Ok(Endpoint::Refresh { ttl_seconds: 60 })
        );
        let ban = |u: &str| rv(EndpointPath::RevokeUser(u.to_string()));
        assert_eq!(
            endpoint(&c, &ban("user-9"), &caller("admin"), &h, NOW, ""),
            Ok(Endpoint::RevokeUser("user-9".into()))
        );
        assert_eq!(
            endpoint(&c, &ban("user-9"), &caller("user"), &h, NOW, "")
                .unwrap_err()
                .status(),
            403
        );
        assert_eq!(
            endpoint(&c, &ban("a\u{202e}b"), &caller("admin"), &h, NOW, "")
                .unwrap_err()
                .status(),
            400
        );
        let r = endpoint(&c, &EndpointKind::Logs, &caller("admin"), &h, NOW, "").unwrap_err();
        assert_eq!(r.status(), 404, "no log store configured");
    }

    #[test]
    fn logs_queries() {
        assert_eq!(
            logs_query("trace_id=abc", 100, ""),
            Ok(Endpoint::LogsByTrace("abc".into()))
        );
        assert_eq!(
            logs_query("user_id=u1&limit=5", 100, ""),
            Ok(Endpoint::LogsByUser {
                user_id: "u1".into(),
                limit: 5
            })
        );
        for bad in [
            "",
            "limit=0&user_id=u",
            "trace_id=a&user_id=b",
            "user_id=%ZZ",
            "user_id=a%00b",
            "user_id=%E2%80%AEx",
            "limit=x&user_id=u",
        ] {
            assert_eq!(logs_query(bad, 100, "").unwrap_err().status(), 400, "{bad}");
        }
    }

    #[test]
    fn forward_strips_identity_and_internal_headers() {
        let c = cfg();
        let h = req(
            "GET",
            "/api/v1/products/1",
            &[
                ("x-user-id", "spoof"),
                ("X-User-Role", "admin"),
                ("x-user-anything", "1"),
                ("x-gateway-canary", "1"),
            ],
        );
        let cl = classify(&c, &h, &RND);
        let f = forward_headers(&c, &h, &cl.trace, None);
        assert_eq!(
            f.remove,
            vec!["x-user-id", "x-user-role", "x-user-anything", "x-gateway-canary"]
        );
        for forged in [
            "x_user_id",
            "X_User_Role",
            "x-user_role",
            "X_USER-ID",
            "x_gateway_canary",
            "x-canary",
            "X-Real-IP",
            "forwarded",
            "x_forwarded_host",
        ] {
            assert!(is_client_forgery(forged), "{forged}");
        }
        for fine in [
            "x-use",
            "x-userid",
            "x-forwarded-for",
            "x-forwarded-hostname",
            "authorization",
            "x_trace_id",
        ] {
            assert!(!is_client_forgery(fine), "{fine}");
        }
        assert!(f.set.iter().any(|(k, v)| *k == "x-gateway" && v == "gw-test"));
        assert!(f
            .set
            .iter()
            .any(|(k, v)| *k == "x-trace-id" && *v == cl.trace.trace_id));
        assert!(!f.set.iter().any(|(k, _)| k.starts_with("x-user-")));
    }

    #[test]
    fn response_time_format() {
        assert_eq!(response_time(0), "0.00ms");
        assert_eq!(response_time(1234), "1.23ms");
        assert_eq!(response_time(1235), "1.24ms");
        assert_eq!(response_time(99_999), "100.00ms");
    }
}
