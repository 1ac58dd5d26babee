//! The whole request path through the in-memory host: order of checks, pause and resume on a
//! callout, the gateway's endpoints, failure modes, coalesced lookups, and the number of host
//! calls per request path.

use super::logs::RecordClass;
use super::*;
use crate::host::fake::{FakeHost, FakeRequest};
use crate::jwt::tests::{forge, SECRET};

const NOW_S: i64 = 1_800_000_000;
const ROOT: u32 = 1;
const CLEAN: &str = r#"{"MGET":[null,null,null]}"#;
const BLACKLISTED: &str = r#"{"MGET":["1",null,null]}"#;
const SETEX_OK: &str = r#"{"SETEX":[true,"OK"]}"#;
const SET_OK: &str = r#"{"SET":[true,"OK"]}"#;
const SET_LOST: &str = r#"{"SET":null}"#;

fn base() -> serde_json::Value {
    serde_json::json!({
        "gateway": {"prefix": "/api/v1", "name": "gw-test"},
        "passthrough_paths": ["/health"],
        "webdis_cluster": "webdis",
        "jwt": {"secret": String::from_utf8(SECRET.to_vec()).unwrap()},
        "revocation": {},
        "logs": {"enabled": false},
        "routes": [
            {"name": "users", "prefix": "/users", "methods": ["GET"],
             "rate_limit": {"max_calls": 100, "per_user": {"max_calls": 1}}},
            {"name": "open", "prefix": "/open", "auth_required": false},
            {"name": "products", "prefix": "/products", "auth_required": false,
             "rate_limit": {"max_calls": 100}},
            {"name": "orders", "prefix": "/orders", "methods": ["GET"],
             "canary": {"users": ["user-001"], "header": "X-Canary"}},
            {"name": "auth", "prefix": "/auth", "methods": ["POST"], "auth_required": false,
             "rate_limit": {"max_calls": 10, "per_user": {"max_calls": 1}}},
            {"name": "plain", "prefix": "/plain"}
        ]
    })
}

fn token_for(sub: &str, jti: &str) -> String {
    let payload = serde_json::json!({"sub": sub, "name": "n", "role": "user", "iat": NOW_S, "exp": NOW_S + 1800, "jti": jti});
    forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
}

fn token() -> String {
    token_for("user-001", "a")
}

struct T {
    gw: Gateway,
    host: FakeHost,
}

/// Every request a test paused must have ended by the test's end: answered, resumed, or its
/// context deleted (a request the filter forgot would hang its client).
impl Drop for T {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            assert_eq!(
                self.host.stuck(),
                Vec::<u32>::new(),
                "paused requests that never ended"
            );
        }
    }
}

impl T {
    fn new(v: serde_json::Value) -> T {
        let cfg = Config::from_json(v.to_string().as_bytes()).unwrap();
        let mut host = FakeHost::new(NOW_S as u64 * 1000);
        host.current = ROOT;
        let gw = Gateway::new(cfg, &mut host).unwrap();
        T { gw, host }
    }

    fn default() -> T {
        T::new(base())
    }

    /// The gateway of `v` on a host `shape` adjusts (no shared data, a single context...),
    /// started with timers.
    fn on_host(v: serde_json::Value, shape: impl FnOnce(&mut FakeHost)) -> T {
        let cfg = Config::from_json(v.to_string().as_bytes()).unwrap();
        let mut host = FakeHost::new(NOW_S as u64 * 1000);
        host.current = ROOT;
        shape(&mut host);
        let gw = Gateway::new(cfg, &mut host).unwrap();
        let mut t = T { gw, host };
        t.gw.started(true, &mut t.host).unwrap();
        t
    }

    /// A request arrives on context `ctx`.
    fn send(&mut self, ctx: u32, method: &str, path: &str, token: Option<&str>) -> Action {
        let mut headers = vec![
            (":method".to_string(), method.as_bytes().to_vec()),
            (":path".to_string(), path.as_bytes().to_vec()),
            (":authority".to_string(), b"gw".to_vec()),
        ];
        if let Some(t) = token {
            headers.push(("authorization".to_string(), format!("Bearer {t}").into_bytes()));
        }
        self.send_headers(ctx, headers)
    }

    fn send_headers(&mut self, ctx: u32, headers: Vec<HeaderPair>) -> Action {
        self.host.requests.insert(
            ctx,
            FakeRequest {
                headers,
                ..FakeRequest::default()
            },
        );
        self.host.current = ctx;
        let action = self.gw.on_request_headers(ctx, &mut self.host);
        let r = self.host.requests.entry(ctx).or_default();
        // The gateway says which: held for a call, or answered.
        assert_eq!(
            action == Action::Replied,
            r.reply.is_some(),
            "context {ctx}: {action:?}"
        );
        r.paused = action == Action::Pause;
        action
    }

    /// The request's context is gone without the filter being told (APISIX has no `on_done`).
    fn gone(&mut self, ctx: u32) {
        self.host.requests.entry(ctx).or_default().ended = true;
        self.host.gone.push(ctx);
    }

    /// The request's context is deleted (the client left, or the stream ended).
    fn done(&mut self, ctx: u32) {
        self.host.requests.entry(ctx).or_default().ended = true;
        self.gw.on_done(ctx, &mut self.host);
    }

    /// Webdis answers call `token_id`, delivered to the context that dispatched it: as webdis
    /// does, a 200 reply is wrapped in the call's JSONP callback (its nonce).
    fn answer(&mut self, token_id: u32, status: Option<u16>, body: &str) {
        let path = self
            .host
            .dispatched
            .iter()
            .find(|d| d.token_id == token_id)
            .map(|d| d.path.clone())
            .unwrap();
        let wrapped = match path.split_once("?jsonp=") {
            Some((_, cb)) if status == Some(200) => format!("{cb}({body});"),
            _ => body.to_string(),
        };
        self.answer_raw(token_id, status, &wrapped);
    }

    /// Call `token_id` gets exactly `body` (a reply webdis meant for another call, say).
    fn answer_raw(&mut self, token_id: u32, status: Option<u16>, body: &str) {
        let context = self
            .host
            .dispatched
            .iter()
            .find(|d| d.token_id == token_id)
            .map(|d| d.context)
            .unwrap();
        self.host.current = context;
        self.host.answer = (status, body.as_bytes().to_vec());
        self.host.delivering = true;
        self.gw
            .on_call_response(context, token_id, body.len(), &mut self.host);
        self.host.delivering = false;
    }

    fn answer_last(&mut self, status: Option<u16>, body: &str) {
        let token_id = self.host.dispatched.last().unwrap().token_id;
        self.answer(token_id, status, body);
    }

    /// The response goes back and the stream ends.
    fn finish(&mut self, ctx: u32) {
        self.host.current = ctx;
        let status = self.req(ctx).reply.as_ref().map_or(200, |r| r.status());
        self.host.requests.entry(ctx).or_default().response_status = Some(status);
        self.gw.on_response_headers(ctx, &mut self.host);
        self.gw.on_log(ctx, &mut self.host);
    }

    fn req(&self, ctx: u32) -> &FakeRequest {
        self.host.req(ctx)
    }

    fn status(&self, ctx: u32) -> u16 {
        self.req(ctx).reply.as_ref().map_or(200, |r| r.status())
    }

    fn reason(&self, ctx: u32) -> &'static str {
        self.req(ctx)
            .reply
            .as_ref()
            .map_or("allowed", |r| r.outcome.decision())
    }

    fn calls(&self) -> usize {
        self.host.dispatched.len()
    }

    fn tick(&mut self) {
        self.host.current = ROOT;
        self.gw.on_tick(ROOT, &mut self.host);
    }

    fn metric(&mut self, name: &str) -> i64 {
        self.host.now_ms += COUNTER_FLUSH_MS;
        self.tick();
        self.host.metric(name)
    }

    /// A full request that needs no callout; returns its status.
    fn get(&mut self, ctx: u32, path: &str, token: Option<&str>) -> u16 {
        self.send(ctx, "GET", path, token);
        let status = self.status(ctx);
        self.finish(ctx);
        status
    }
}

#[test]
fn public_request_is_forwarded_with_trace_headers_and_no_spoofed_identity() {
    let mut t = T::default();
    let mut h = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), b"/api/v1/open/1".to_vec()),
        ("x-user-id".to_string(), b"spoof".to_vec()),
    ];
    h.push(("x-gateway-canary".to_string(), b"1".to_vec()));
    assert_eq!(t.send_headers(2, h), Action::Continue);
    let r = t.req(2);
    assert_eq!(r.header("x-user-id"), None);
    assert_eq!(r.header("x-gateway-canary"), None);
    assert_eq!(r.header("x-gateway"), Some("gw-test"));
    assert!(r.header("x-trace-id").is_some());
    t.finish(2);
    assert!(t.req(2).response_header("x-response-time").is_some());
    assert_eq!(t.calls(), 0);
}

#[test]
fn authenticated_request_waits_for_the_lookup_then_carries_the_identity() {
    let mut t = T::default();
    assert_eq!(t.send(2, "GET", "/api/v1/plain/1", Some(&token())), Action::Pause);
    assert_eq!(t.calls(), 1);
    assert!(t.host.dispatched[0]
        .path
        .starts_with("/MGET/token%3Ablacklist%3A"));
    assert_eq!(
        t.req(2).header("x-user-id"),
        None,
        "nothing forwarded before the answer"
    );
    t.answer_last(Some(200), CLEAN);
    let r = t.req(2);
    assert_eq!(r.resumed, 1);
    assert_eq!(r.header("x-user-id"), Some("user-001"));
    assert_eq!(r.header("x-user-role"), Some("user"));
    // The answer is cached: the next request with the token makes no call.
    assert_eq!(
        t.send(3, "GET", "/api/v1/plain/1", Some(&token())),
        Action::Continue
    );
    assert_eq!(t.calls(), 1);
}

#[test]
fn a_revoked_token_charges_no_user_or_route_bucket_and_moves_no_canary_counter() {
    let mut t = T::default();
    let stolen = token_for("user-001", "stolen");
    t.send(2, "GET", "/api/v1/users/1", Some(&stolen));
    t.answer_last(Some(200), BLACKLISTED);
    assert_eq!((t.status(2), t.reason(2)), (401, "revoked"));
    t.finish(2);
    t.send(3, "GET", "/api/v1/orders/1", Some(&stolen));
    assert_eq!(t.reason(3), "revoked", "cached");
    t.finish(3);
    // The real user (limit 1 per second) still has their whole budget.
    let real = token();
    t.send(4, "GET", "/api/v1/users/1", Some(&real));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(4), 200);
    assert_eq!(t.req(4).header("x-user-id"), Some("user-001"));
    assert_eq!(
        t.metric("scope=.=user;.;decision=.=allowed;.;gateway_ratelimit_total"),
        1
    );
    assert_eq!(
        t.metric("scope=.=route;.;decision=.=allowed;.;gateway_ratelimit_total"),
        1
    );
    assert_eq!(
        t.metric("route=.=orders;.;target=.=canary;.;gateway_canary_total"),
        0
    );
    assert_eq!(
        t.metric("route=.=orders;.;target=.=stable;.;gateway_canary_total"),
        0
    );
    assert_eq!(t.metric("gateway_revocation_revoked_total"), 2);
}

#[test]
fn the_per_ip_bucket_comes_before_authentication() {
    let mut v = base();
    v["routes"][0]["rate_limit"]["per_ip"] = serde_json::json!({"max_calls": 1});
    let mut t = T::new(v);
    assert_eq!(t.get(2, "/api/v1/users/1", None), 401);
    // The unauthenticated request spent the address's budget: the next is shed before the
    // verifier and the store.
    t.send(3, "GET", "/api/v1/users/1", Some(&token()));
    assert_eq!((t.status(3), t.reason(3)), (429, "rate_limited_ip"));
    assert_eq!(t.calls(), 0, "no lookup for a shed request");
    assert_eq!(
        t.metric("scope=.=user;.;decision=.=allowed;.;gateway_ratelimit_total"),
        0
    );
    assert_eq!(
        t.metric("scope=.=route;.;decision=.=allowed;.;gateway_ratelimit_total"),
        0
    );
}

#[test]
fn a_refused_token_charges_no_user_or_route_bucket() {
    let mut t = T::default();
    assert_eq!(t.get(2, "/api/v1/users/1", Some("garbage")), 401);
    assert_eq!(
        t.metric("scope=.=ip;.;decision=.=allowed;.;gateway_ratelimit_total"),
        1
    );
    assert_eq!(
        t.metric("scope=.=user;.;decision=.=allowed;.;gateway_ratelimit_total"),
        0
    );
    assert_eq!(
        t.metric("scope=.=route;.;decision=.=allowed;.;gateway_ratelimit_total"),
        0
    );
}

#[test]
fn the_user_bucket_applies_after_revocation() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/users/1", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(2), 200);
    assert_eq!(
        t.send(3, "GET", "/api/v1/users/1", Some(&token())),
        Action::Replied
    );
    assert_eq!(
        (t.status(3), t.reason(3)),
        (429, "rate_limited_user"),
        "one call per second for this user"
    );
    let reply = t.req(3).reply.clone().unwrap();
    assert!(reply.headers.iter().any(|(k, v)| *k == "retry-after" && v == "1"));
}

#[test]
fn gateway_endpoints_pass_the_limits_of_the_route_they_sit_under() {
    let mut t = T::default();
    // `/api/v1/auth/refresh` sits under the `auth` route: one call per second per user.
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&token()));
    t.answer_last(Some(200), CLEAN); // lookup
    t.answer_last(Some(200), SETEX_OK); // the reference's blacklist key
    t.answer_last(Some(200), SET_OK); // revoke the old token
    assert_eq!(t.status(2), 200);
    let calls = t.calls();
    let other = token_for("user-001", "b");
    t.send(3, "POST", "/api/v1/auth/refresh", Some(&other));
    t.answer_last(Some(200), CLEAN);
    assert_eq!((t.status(3), t.reason(3)), (429, "rate_limited_user"));
    assert_eq!(t.calls(), calls + 1, "refused before any write: no token minted");
    // Per IP too.
    let mut v = base();
    v["routes"][4]["rate_limit"]["per_ip"] = serde_json::json!({"max_calls": 1});
    let mut t = T::new(v);
    t.send(2, "POST", "/api/v1/auth/logout", Some("garbage"));
    t.send(3, "POST", "/api/v1/auth/logout", Some(&token()));
    assert_eq!((t.status(3), t.reason(3)), (429, "rate_limited_ip"));
}

#[test]
fn logout_replies_only_after_the_store_confirmed() {
    let mut t = T::default();
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    assert!(t.req(2).reply.is_none(), "no reply before the write is confirmed");
    assert!(t
        .host
        .dispatched
        .last()
        .unwrap()
        .path
        .starts_with("/SETEX/token%3Ablacklist%3A"));
    t.answer_last(Some(200), SETEX_OK);
    assert!(
        t.req(2).reply.is_none(),
        "no reply before the deciding write is confirmed"
    );
    assert!(t
        .host
        .dispatched
        .last()
        .unwrap()
        .path
        .starts_with("/SET/token%3Arevoked%3A"));
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(2), 200);
    t.finish(2);
    // This instance knows at once, without asking the store.
    let calls = t.calls();
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.reason(3), "revoked");
    assert_eq!(t.calls(), calls);
}

#[test]
fn a_failed_write_says_so_and_changes_nothing_locally() {
    for failure in [Some(500), None] {
        let mut v = base();
        v["revocation"] = serde_json::json!({"cache_ttl": 0});
        let mut t = T::new(v);
        t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
        t.answer_last(Some(200), CLEAN);
        t.answer_last(failure, "");
        assert_eq!(t.status(2), 503);
        let body: serde_json::Value = serde_json::from_str(&t.req(2).reply.as_ref().unwrap().body).unwrap();
        assert_eq!(body["message"], MSG_WRITE_FAILED);
        // The token still works here, as it does everywhere else.
        t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
        t.answer_last(Some(200), CLEAN);
        assert_eq!(t.status(3), 200);
        assert_eq!(t.req(3).header("x-user-id"), Some("user-001"));
    }
    // A refresh whose write fails hands out no token.
    let mut t = T::default();
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), r#"{"SET":[false,"ERR"]}"#);
    assert_eq!(t.status(2), 503);
    assert!(!t.req(2).reply.as_ref().unwrap().body.contains("access_token"));
    // A ban that was not recorded is not applied locally either.
    let admin = forge(
        r#"{"alg":"HS256"}"#,
        &serde_json::json!({"sub": "root", "role": "admin", "iat": NOW_S, "exp": NOW_S + 60}).to_string(),
        SECRET,
    );
    let mut t = T::default();
    t.send(2, "POST", "/api/v1/admin/users/user-001/revoke", Some(&admin));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(503), "");
    assert_eq!(t.status(2), 503);
    t.host.now_ms += 1;
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(3), 200);
}

#[test]
fn concurrent_lookups_of_one_token_are_coalesced() {
    let mut t = T::default();
    for ctx in 2..=5 {
        assert_eq!(
            t.send(ctx, "GET", "/api/v1/plain/1", Some(&token())),
            Action::Pause
        );
    }
    t.send(6, "GET", "/api/v1/plain/1", Some(&token_for("user-002", "x")));
    assert_eq!(t.calls(), 2, "one lookup per token");
    let first = t.host.dispatched[0].token_id;
    t.answer(first, Some(200), CLEAN);
    for ctx in 2..=5 {
        assert_eq!(t.req(ctx).resumed, 1, "context {ctx} resumed once");
        assert_eq!(t.req(ctx).header("x-user-id"), Some("user-001"));
    }
    assert_eq!(t.req(6).resumed, 0, "another token's request still waits");
    assert_eq!(
        t.host.current, 2,
        "back on the context the answer was delivered to"
    );
    assert_eq!(t.metric("gateway_revocation_coalesced_total"), 3);
    assert_eq!(t.metric("gateway_revocation_lookups_total"), 2);
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.req(6).resumed, 1, "its own lookup answered");
}

#[test]
fn coalesced_requests_share_a_revoked_or_failed_answer() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    t.answer_last(Some(200), BLACKLISTED);
    assert_eq!((t.reason(2), t.reason(3)), ("revoked", "revoked"));
    assert_eq!((t.req(2).resumed, t.req(3).resumed), (0, 0));

    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    t.answer_last(None, "");
    assert_eq!((t.status(2), t.status(3)), (503, 503), "deny mode");

    let mut v = base();
    v["revocation"] = serde_json::json!({"failure_mode": "allow"});
    let mut t = T::new(v);
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    t.answer_last(Some(200), "<html>");
    assert_eq!((t.req(2).resumed, t.req(3).resumed), (1, 1), "allow mode");
    assert_eq!(t.metric("gateway_revocation_allowed_on_error_total"), 2);
}

#[test]
fn waiters_get_a_new_lookup_when_the_owner_leaves() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(4, "GET", "/api/v1/plain/1", Some(&token()));
    let lost = t.host.dispatched[0].token_id;
    // The first client disconnects: its call is cancelled with it.
    t.done(2);
    t.host.gone.push(2);
    t.tick();
    assert_eq!(t.calls(), 2, "the timer dispatched again, from the root context");
    assert_eq!(t.host.dispatched[1].context, ROOT);
    t.answer(lost, Some(200), CLEAN); // a late answer to the lost call is ignored
    assert_eq!(t.req(3).resumed, 0);
    t.answer_last(Some(200), CLEAN);
    assert_eq!((t.req(3).resumed, t.req(4).resumed), (1, 1));
    assert_eq!(t.host.current, ROOT);
    // A waiter that leaves is simply dropped.
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    t.gw.on_log(3, &mut t.host);
    t.gone(3);
    t.answer_last(Some(200), CLEAN);
    assert_eq!((t.req(2).resumed, t.req(3).resumed), (1, 0));
}

#[test]
fn endpoints_do_their_own_lookup() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.send(3, "POST", "/api/v1/auth/logout", Some(&token()));
    assert_eq!(
        t.calls(),
        2,
        "the endpoint's write must come from its own callback"
    );
    assert_eq!(t.host.dispatched[1].context, 3);
    // Both clients leave before the answers.
    t.done(2);
    t.done(3);
}

#[test]
fn canary_routing_after_every_check() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/orders/1", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    let r = t.req(2);
    assert_eq!(
        r.header("x-gateway-canary"),
        Some("1"),
        "user-001 is a canary user"
    );
    assert_eq!(r.header("x-canary"), Some("true"));
    assert_eq!(r.route_cache_cleared, 1);
    t.finish(2);
    t.send(3, "GET", "/api/v1/orders/1", Some(&token_for("user-002", "c")));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.req(3).header("x-gateway-canary"), None);
    assert_eq!(t.req(3).header("x-canary"), Some("false"));
    assert_eq!(
        t.metric("route=.=orders;.;target=.=canary;.;gateway_canary_total"),
        1
    );
    assert_eq!(
        t.metric("route=.=orders;.;target=.=stable;.;gateway_canary_total"),
        1
    );
}

#[test]
fn per_route_outcomes_and_auth_failures_are_counted() {
    let mut t = T::default();
    t.get(2, "/api/v1/open/x", None);
    t.get(3, "/api/v1/plain/x", None);
    t.get(4, "/api/v1/nope", None);
    assert_eq!(
        t.metric("route=.=open;.;outcome=.=allowed;.;gateway_requests_total"),
        1
    );
    assert_eq!(
        t.metric("route=.=plain;.;outcome=.=unauthorized;.;gateway_requests_total"),
        1
    );
    assert_eq!(
        t.metric("route=.=none;.;outcome=.=not_found;.;gateway_requests_total"),
        1
    );
    assert_eq!(
        t.metric("reason=.=missing_authorization;.;gateway_auth_failures_total"),
        1
    );
}

#[test]
fn log_lines_follow_the_configured_level() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": true});
    let mut t = T::new(v.clone());
    t.get(2, "/api/v1/open/x?a=1", None);
    let (level, line) = t.host.logs.last().cloned().unwrap();
    assert_eq!(level, LogLevel::Info);
    let rec: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(rec["path"], "/api/v1/open/x");
    assert_eq!(rec["route"], "open");
    assert_eq!(rec["status"], 200);
    // `logs.level: warn`: lines of 2xx requests are not even built.
    v["logs"]["level"] = "warn".into();
    let mut t = T::new(v);
    let n = t.host.logs.len();
    t.get(3, "/api/v1/open/x", None);
    assert_eq!(t.host.logs.len(), n, "info lines are not built at level warn");
    t.get(4, "/api/v1/nope", None);
    assert_eq!(t.host.logs.len(), n + 1);
    assert_eq!(t.host.logs.last().map(|l| l.0), Some(LogLevel::Warn));
}

/// Host calls of one request from its headers to the end of its stream (`on_log`).
fn host_calls(t: &mut T, ctx: u32, path: &str, token: Option<&str>, answer: Option<&str>) -> u32 {
    t.host.reset_calls();
    t.send(ctx, "GET", path, token);
    if let Some(body) = answer {
        t.answer_last(Some(200), body);
    }
    t.finish(ctx);
    t.host.host_calls()
}

/// The gateway file of the pinned paths: small limits (exact, one token at a time) on
/// `users`, and `big` with limits large enough to lease.
fn pinned_config() -> serde_json::Value {
    let mut v = base();
    v["revocation"] = serde_json::json!({"cache_ttl": 60});
    v["routes"][0]["rate_limit"]["per_user"] = serde_json::json!({"max_calls": 100});
    let big = serde_json::json!({"max_calls": 100000});
    v["routes"].as_array_mut().unwrap().push(serde_json::json!({
        "name": "big", "prefix": "/big", "methods": ["GET"],
        "rate_limit": {"max_calls": 100000, "per_user": big, "per_ip": big},
        "canary": {"users": ["someone-else"], "header": "X-Canary"}
    }));
    v
}

/// The host calls of each request path, pinned in sequence (their number is the README's "Per-
/// request cost" figure): a change that adds, drops or reorders calls on the hot path fails
/// here and must update the sequence on purpose (`make bench` prints this table).
#[test]
fn host_calls_per_request_path_are_pinned() {
    let mut t = T::new(pinned_config());
    // Warm up: lazy counters defined, the host's log level read, the token's answer cached,
    // leases taken.
    host_calls(&mut t, 90, "/api/v1/open/1", None, None);
    host_calls(&mut t, 91, "/api/v1/plain/1", Some(&token()), Some(CLEAN));
    host_calls(&mut t, 92, "/api/v1/products/1", None, None);
    host_calls(&mut t, 93, "/api/v1/orders/1", Some(&token()), None);
    host_calls(&mut t, 94, "/api/v1/users/1", Some(&token()), None);
    host_calls(&mut t, 95, "/api/v1/big/1", Some(&token()), None);
    host_calls(&mut t, 96, "/api/v1/big/1", Some(&token()), None);
    let other = token_for("user-004", "m");

    let got: Vec<(&str, String)> = PINNED_PATHS
        .iter()
        .enumerate()
        .map(|(i, (name, path, who, answer, _))| {
            let token = match who {
                Some("other") => Some(other.clone()),
                Some(_) => Some(token()),
                None => None,
            };
            let n = host_calls(&mut t, 2 + i as u32, path, token.as_deref(), *answer);
            let names = t.host.call_names().join(" ");
            assert_eq!(n as usize, t.host.call_names().len());
            // `make bench` prints this table (and runs this test to get it).
            if std::env::var_os("GATEWAY_PRINT_HOST_CALLS").is_some() {
                println!("host-calls\t{name}\t{n}\t{names}");
            }
            (*name, names)
        })
        .collect();
    let want: Vec<(&str, String)> = PINNED_PATHS
        .iter()
        .map(|(n, .., want)| (*n, want.to_string()))
        .collect();
    assert_eq!(got, want);
}

type Pinned = (
    &'static str,
    &'static str,
    Option<&'static str>,
    Option<&'static str>,
    &'static str,
);

/// (path name, request path, token, webdis answer, host calls in order).
const PINNED_PATHS: [Pinned; 7] = [
    (
        "public",
        "/api/v1/open/1",
        None,
        None,
        concat!(
            "now_ms request_headers set_request_header set_request_header set_request_header ",
            "set_response_header now_ms set_response_header record_metric",
        ),
    ),
    (
        "public, exact limits (IP, route)",
        "/api/v1/products/1",
        None,
        None,
        concat!(
            "now_ms request_headers source_address get set set_request_header ",
            "set_request_header set_request_header set_response_header set_response_header ",
            "set_response_header set_response_header now_ms set_response_header record_metric",
        ),
    ),
    (
        "authenticated, revocation cache miss (request + answer)",
        "/api/v1/plain/1",
        Some("other"),
        Some(CLEAN),
        // + the client address and its budget of failed signature checks (a token not in the
        // verified-token cache: its signature is checked).
        concat!(
            "now_ms request_headers source_address get get get get dispatch call_response ",
            "now_ms get set set_request_header set_request_header set_request_header ",
            "set_request_header set_request_header set_request_header resume ",
            "set_response_header now_ms set_response_header record_metric",
        ),
    ),
    (
        "authenticated, revocation cache hit",
        "/api/v1/plain/1",
        Some("mine"),
        None,
        concat!(
            "now_ms request_headers get set_request_header set_request_header ",
            "set_request_header set_request_header set_request_header set_request_header ",
            "set_response_header now_ms set_response_header record_metric",
        ),
    ),
    (
        "canary, cache hit",
        "/api/v1/orders/1",
        Some("mine"),
        None,
        concat!(
            "now_ms request_headers get set_request_header set_request_header ",
            "set_request_header set_request_header set_request_header set_request_header ",
            "set_request_header set_request_header clear_route_cache set_response_header ",
            "now_ms set_response_header record_metric",
        ),
    ),
    (
        "exact limits (IP, user, route), cache hit",
        "/api/v1/users/1",
        Some("mine"),
        None,
        concat!(
            "now_ms request_headers source_address get get set get set set_request_header ",
            "set_request_header set_request_header set_request_header set_request_header ",
            "set_request_header set_response_header set_response_header set_response_header ",
            "set_response_header now_ms set_response_header record_metric",
        ),
    ),
    (
        "full policy: leased limits (IP, user, route), canary, cache hit",
        "/api/v1/big/1",
        Some("mine"),
        None,
        concat!(
            "now_ms request_headers source_address get set_request_header set_request_header ",
            "set_request_header set_request_header set_request_header set_request_header ",
            "set_request_header set_response_header set_response_header set_response_header ",
            "set_response_header now_ms set_response_header record_metric",
        ),
    ),
];

/// A busy bucket costs shared data once per batch: with limits of 100 000 calls, a batch is 32
/// tokens (1% of the capacity, at most 32).
#[test]
fn leased_buckets_touch_shared_data_once_per_batch() {
    let mut t = T::new(pinned_config());
    let shared_calls = |t: &T| {
        t.host
            .call_names()
            .iter()
            .filter(|n| **n == "get" || **n == "set")
            .count()
    };
    // The first request takes three batches (IP, user, route) and reads the revocation state.
    t.host.reset_calls();
    t.send(2, "GET", "/api/v1/big/1", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.finish(2);
    let first = shared_calls(&t);
    let mut later = Vec::new();
    for ctx in 3..40 {
        t.host.reset_calls();
        t.get(ctx, "/api/v1/big/1", Some(&token()));
        later.push(shared_calls(&t));
    }
    assert!(first >= 6, "{first}");
    // The second request reads the ban table and the cache once (then remembers the token is
    // clean); 31 leased tokens per bucket, then a new batch: the epoch read every request, plus
    // six reads and writes when the batches run out.
    assert_eq!(later[0], 3, "{later:?}");
    assert!(later[1..31].iter().all(|&n| n == 1), "{later:?}");
    assert_eq!(later[31], 7, "{later:?}");
    let remaining: u64 = t
        .req(39)
        .response_header("x-ratelimit-remaining")
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (100_000 - 39 - 3 * 31..100_000).contains(&remaining),
        "{remaining}"
    );
}

/// Another VM's revocation voids this VM's memo of clean tokens at once.
#[test]
fn a_revocation_in_one_vm_reaches_the_memo_of_another_at_once() {
    let mut t = T::new(pinned_config());
    let cfg = Config::from_json(pinned_config().to_string().as_bytes()).unwrap();
    t.host.current = ROOT;
    let mut other = Gateway::new(cfg, &mut t.host).unwrap();
    // This VM learns the token is clean, and remembers it (one shared read per request).
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.finish(2);
    assert_eq!(t.get(3, "/api/v1/plain/1", Some(&token())), 200);
    assert_eq!(t.get(4, "/api/v1/plain/1", Some(&token())), 200);
    // The other VM logs the token out.
    std::mem::swap(&mut t.gw, &mut other);
    t.send(5, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(5), 200);
    t.finish(5);
    std::mem::swap(&mut t.gw, &mut other);
    let calls = t.calls();
    t.send(6, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.reason(6), "revoked");
    assert_eq!(t.calls(), calls, "known from shared data, no lookup");
}

#[test]
fn counters_reach_the_host_on_every_tick_despite_jitter() {
    let mut t = T::default();
    t.tick();
    t.get(2, "/api/v1/open/1", None);
    // Ticks every 1000 ms, this one a millisecond early: the counters still go out.
    t.host.now_ms += 999;
    t.tick();
    assert_eq!(
        t.host
            .metric("route=.=open;.;outcome=.=allowed;.;gateway_requests_total"),
        1
    );
    t.get(3, "/api/v1/open/1", None);
    t.host.now_ms += 400;
    t.tick();
    assert_eq!(
        t.host
            .metric("route=.=open;.;outcome=.=allowed;.;gateway_requests_total"),
        1,
        "not twice a period"
    );
}

#[test]
fn a_logged_out_token_stays_blacklisted_while_any_check_would_accept_it() {
    let mut t = T::default();
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    // exp is 1800 s away and the verifier allows 60 s of skew past it.
    let path = t.host.dispatched.last().unwrap().path.clone();
    assert!(path.contains("/1861/1.json?jsonp="), "{path}");
    t.answer_last(Some(200), SETEX_OK);
    let path = t.host.dispatched.last().unwrap().path.clone();
    assert!(path.contains("/1/EX/1861/NX.json?jsonp="), "{path}");
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(2), 200);
}

#[test]
fn refresh_refuses_a_token_past_exp_even_within_the_clock_skew() {
    let mut t = T::default();
    let payload = serde_json::json!({"sub": "u-9", "role": "user", "iat": NOW_S - 100, "exp": NOW_S - 10});
    let late = forge(r#"{"alg":"HS256"}"#, &payload.to_string(), SECRET);
    assert_eq!(
        t.get(2, "/api/v1/plain/1", Some(&late)),
        200,
        "accepted within the skew"
    );
    t.send(3, "POST", "/api/v1/auth/refresh", Some(&late));
    assert_eq!((t.status(3), t.reason(3)), (401, "expired"));
    assert!(
        !t.host.dispatched.iter().any(|d| d.path.starts_with("/SET/")),
        "nothing written"
    );
    t.done(2); // the client of the accepted refresh leaves before its lookup is answered
}

#[test]
fn of_concurrent_refreshes_of_one_token_exactly_one_mints() {
    let mut v = base();
    v["routes"][4]["rate_limit"]["per_user"] = serde_json::json!({"max_calls": 10});
    let mut t = T::new(v);
    let tok = token_for("user-007", "r");
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&tok));
    t.send(3, "POST", "/api/v1/auth/refresh", Some(&tok));
    let lookups: Vec<u32> = t.host.dispatched.iter().map(|d| d.token_id).collect();
    assert_eq!(lookups.len(), 2, "endpoints look up for themselves");
    for id in lookups {
        t.answer(id, Some(200), CLEAN);
    }
    let writes: Vec<u32> = t.host.dispatched.iter().skip(2).map(|d| d.token_id).collect();
    assert_eq!(writes.len(), 2);
    for id in writes {
        t.answer(id, Some(200), SETEX_OK);
    }
    let writes: Vec<u32> = t.host.dispatched.iter().skip(4).map(|d| d.token_id).collect();
    assert_eq!(writes.len(), 2);
    t.answer(writes[0], Some(200), SET_OK);
    t.answer(writes[1], Some(200), SET_LOST);
    assert_eq!(t.status(2), 200);
    assert!(t.req(2).reply.as_ref().unwrap().body.contains("access_token"));
    assert_eq!((t.status(3), t.reason(3)), (401, "revoked"));
    assert!(!t.req(3).reply.as_ref().unwrap().body.contains("access_token"));
}

#[test]
fn a_ban_revokes_tokens_issued_in_its_second() {
    let admin = forge(
        r#"{"alg":"HS256"}"#,
        &serde_json::json!({"sub": "root", "role": "admin", "iat": NOW_S - 5, "exp": NOW_S + 60}).to_string(),
        SECRET,
    );
    let mut t = T::default();
    t.send(2, "POST", "/api/v1/admin/users/user-001/revoke", Some(&admin));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), r#"{"SETEX":[true,"OK"]}"#);
    assert_eq!(t.status(2), 200);
    // `token()` was issued at NOW_S, the ban's second: refused at once, from the local table.
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.reason(3), "revoked");
    let later = {
        let payload =
            serde_json::json!({"sub": "user-001", "role": "user", "iat": NOW_S + 1, "exp": NOW_S + 600});
        forge(r#"{"alg":"HS256"}"#, &payload.to_string(), SECRET)
    };
    t.host.now_ms += 1000;
    t.send(4, "GET", "/api/v1/plain/1", Some(&later));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(4), 200, "issued after the ban's second");
}

#[test]
fn log_records_are_bounded_and_anonymous_floods_cannot_crowd_out_users() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {"buffer": 10}});
    let mut t = T::new(v);
    // A huge User-Agent and query are stored clipped.
    let mut h = vec![
        (":method".to_string(), b"GET".to_vec()),
        (
            ":path".to_string(),
            format!("/api/v1/open/x?{}", "a=b&".repeat(100)).into_bytes(),
        ),
        ("user-agent".to_string(), vec![b'u'; 50_000]),
    ];
    h.push((":authority".to_string(), b"gw".to_vec()));
    t.send_headers(2, h);
    t.finish(2);
    assert!(
        t.gw.logs.buffer.iter().all(|r| r.json.len() < 4096),
        "record bounded"
    );
    // Anonymous noise (forwarded public requests) fills half the buffer, no more.
    for ctx in 10..40 {
        t.get(ctx, "/api/v1/open/x", None);
    }
    assert_eq!(t.gw.logs.buffer.len(), 5);
    // Authenticated callers' records still get in: the free half, then in place of noise.
    let ok = |t: &mut T, ctx: u32| {
        t.send(ctx, "GET", "/api/v1/plain/1", Some(&token_for("user-001", "z")));
        if t.req(ctx).reply.is_none() && t.req(ctx).resumed == 0 {
            t.answer_last(Some(200), CLEAN);
        }
        t.finish(ctx);
    };
    for ctx in 50..62 {
        ok(&mut t, ctx);
    }
    let users = t.gw.logs.buffer.iter().filter(|r| r.user_id.is_some()).count();
    assert_eq!((t.gw.logs.buffer.len(), users), (10, 10));
    // 26 refused at the anonymous cap, 5 pushed out by users; 2 users' records found no room.
    assert_eq!(t.metric("gateway_log_records_dropped_anonymous_total"), 31);
    assert_eq!(t.metric("gateway_log_records_dropped_authenticated_total"), 2);
    assert_eq!(t.metric("gateway_log_records_dropped_total"), 33);
}

#[test]
fn trace_lists_are_trimmed_in_the_store() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {}});
    let mut t = T::new(v);
    t.get(2, "/api/v1/open/x", None);
    t.host.now_ms += 2000;
    t.tick();
    let paths: Vec<String> = t.host.dispatched.iter().map(|d| d.path.clone()).collect();
    assert_eq!(paths.len(), 1, "the trim waits for the push: {paths:?}");
    assert!(
        paths[0].starts_with("/RPUSH/gateway%3Alog%3Atrace%3A"),
        "{paths:?}"
    );
    t.answer_last(Some(200), r#"{"RPUSH":1}"#);
    let paths: Vec<String> = t.host.dispatched.iter().map(|d| d.path.clone()).collect();
    assert!(
        paths[1].starts_with("/LTRIM/gateway%3Alog%3Atrace%3A") && paths[1].contains("/0/99.json?jsonp="),
        "{paths:?}"
    );
    assert!(paths[2].starts_with("/EXPIRE/"), "{paths:?}");
}

#[test]
fn webdis_calls_carry_the_configured_credentials() {
    let mut v = base();
    v["webdis_auth_env"] = "GW_TEST_WEBDIS_AUTH".into();
    let cfg = Config::from_json_with_env(v.to_string().as_bytes(), &|var| {
        (var == "GW_TEST_WEBDIS_AUTH").then(|| "gateway:pw1".to_string())
    })
    .unwrap();
    let mut host = FakeHost::new(NOW_S as u64 * 1000);
    let mut t = T {
        gw: Gateway::new(cfg, &mut host).unwrap(),
        host,
    };
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(
        t.host.dispatched[0].authorization.as_deref(),
        Some("Basic Z2F0ZXdheTpwdzE=")
    );
    let missing = Config::from_json_with_env(v.to_string().as_bytes(), &|_| None).unwrap_err();
    assert_eq!(
        missing.to_string(),
        "webdis_auth_env: environment variable GW_TEST_WEBDIS_AUTH must hold user:password"
    );
    t.done(2);
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.host.dispatched[0].authorization, None, "none configured");
    t.done(2);
}

#[test]
fn webdis_calls_go_to_the_cluster_with_the_authority_the_host_routes_by() {
    let mut v = base();
    v["webdis_cluster"] = "outbound|7379||webdis.gateway.svc.cluster.local".into();
    let mut t = T::new(v);
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    let call = t.host.dispatched.last().unwrap();
    assert_eq!(call.cluster, "outbound|7379||webdis.gateway.svc.cluster.local");
    assert_eq!(call.authority, "webdis.gateway.svc.cluster.local:7379");
    // Without Istio's form the authority stays the cluster name, as Envoy clusters expect.
    t.done(2);
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.host.dispatched.last().unwrap().authority, "webdis");
    t.done(2);
}

fn host_line(t: &T) -> String {
    t.host
        .logs
        .iter()
        .find(|(_, l)| l.starts_with("host offers"))
        .map(|(_, l)| l.clone())
        .unwrap_or_default()
}

#[test]
fn on_envoy_nothing_is_degraded_and_the_line_says_so() {
    let mut t = T::default();
    t.gw.started(true, &mut t.host).unwrap();
    assert_eq!(
        host_line(&t),
        "host offers: shared data yes, timers yes, verify_signature no; nothing degraded"
    );
}

#[test]
fn without_shared_data_limits_and_the_revocation_cache_work_per_vm() {
    // APISIX answers every shared-data call with an error.
    let mut t = T::on_host(base(), |h| h.no_shared_data = true);
    assert!(host_line(&t).contains("shared data no"), "{}", host_line(&t));
    assert!(host_line(&t).contains("rate limits, the revocation cache and bans are per worker"));
    // users: one request per second per user.
    t.send(2, "GET", "/api/v1/users/1", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(2), 200);
    let calls = t.calls();
    t.send(3, "GET", "/api/v1/users/1", Some(&token()));
    assert_eq!(
        t.calls(),
        calls,
        "the revocation answer was cached, in the VM's own store"
    );
    assert_eq!((t.status(3), t.reason(3)), (429, "rate_limited_user"));
    assert!(
        t.host.shared.is_empty(),
        "nothing reached the host's (missing) shared data"
    );
}

#[test]
fn without_timers_a_log_store_or_a_cluster_wide_limit_is_refused_naming_the_field() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": true, "store": {}});
    let mut t = T::new(v);
    let e = t.gw.started(false, &mut t.host).unwrap_err();
    assert!(e.starts_with("logs.store: this host runs no timers"), "{e}");
    let mut v = base();
    v["routes"][2]["rate_limit"] = serde_json::json!({"max_calls": 10, "cluster_wide": true});
    let mut t = T::new(v);
    let e = t.gw.started(false, &mut t.host).unwrap_err();
    assert!(e.starts_with("rate_limit.cluster_wide of route products:"), "{e}");
    // Without them, a host without timers runs, degraded as it says.
    let mut t = T::default();
    t.gw.started(false, &mut t.host).unwrap();
    let line = host_line(&t);
    assert!(line.contains("timers no"), "{line}");
    t.send(2, "GET", "/api/v1/open/1", None);
    t.finish(2);
    assert!(t.gw.logs.buffer.is_empty());
}

#[test]
fn without_on_log_the_request_is_logged_when_its_context_goes() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/open/1", None);
    t.host.current = 2;
    t.host.requests.entry(2).or_default().response_status = Some(200);
    t.gw.on_response_headers(2, &mut t.host);
    // No on_log (APISIX): the context is deleted.
    t.done(2);
    assert_eq!(
        t.metric("route=.=open;.;outcome=.=allowed;.;gateway_requests_total"),
        1
    );
    // With on_log (Envoy) it is logged once, not twice.
    t.send(3, "GET", "/api/v1/open/1", None);
    t.finish(3);
    t.done(3);
    assert_eq!(
        t.metric("route=.=open;.;outcome=.=allowed;.;gateway_requests_total"),
        2
    );
}

#[path = "keys_tests.rs"]
mod keys_tests;

/// Finding 1 of the second outside attack: a logged-out ES256 token revived as its twin
/// (`s` -> `n - s`). Revocation is keyed by the signing input, so the twin's lookup asks for
/// the key its logout wrote.
#[test]
fn a_logged_out_token_stays_revoked_in_every_encoding() {
    use crate::jwt::testkeys::{jwk, jwks, sign};
    let mut v = base();
    v["jwt"]["issuers"] = serde_json::json!([{
        "name": "idp", "issuer": "https://idp.example.com", "algorithms": ["ES256"],
        "local_jwks": serde_json::from_str::<serde_json::Value>(&jwks(&[jwk(crate::jwt::Algorithm::Es256, "ec-1", true)])).unwrap(),
    }]);
    let mut t = T::new(v);
    let claims = serde_json::json!({"sub": "user-009", "role": "user", "iss": "https://idp.example.com",
                                    "iat": NOW_S, "exp": NOW_S + 600});
    let es = sign(crate::jwt::Algorithm::Es256, Some("ec-1"), claims);
    let twin = crate::jwt::issuer_tests::es256_twin(&es);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&es));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    let written = t.host.dispatched.last().unwrap().path.clone();
    let key = written
        .strip_prefix("/SET/")
        .and_then(|p| p.split('/').next())
        .unwrap()
        .to_string();
    assert!(key.starts_with("token%3Arevoked%3A"), "{written}");
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(2), 200);
    t.finish(2);
    // This instance knows at once: the twin shares the logged-out token's cache entry.
    let calls = t.calls();
    t.send(4, "GET", "/api/v1/plain/1", Some(&twin));
    assert_eq!((t.status(4), t.reason(4), t.calls()), (401, "revoked", calls));
    t.finish(4);
    // Once that entry is old (or on another gateway), it asks the store, for the same key.
    t.host.now_ms += 2_000;
    t.send(3, "GET", "/api/v1/plain/1", Some(&twin));
    let lookup = t.host.dispatched.last().unwrap().path.clone();
    assert!(lookup.starts_with("/MGET/"), "{lookup}");
    assert!(lookup.contains(&format!("/{key}/")), "{lookup} asks for {key}");
    t.answer_last(Some(200), r#"{"MGET":[null,"1",null]}"#);
    assert_eq!((t.status(3), t.reason(3)), (401, "revoked"));
}

/// Finding 2: a refresh on a gateway whose cache called the token clean a moment ago minted a
/// token after a ban made elsewhere. The endpoints ask the store, and a minted token carries
/// its lineage's authentication time, which a later ban reaches.
#[test]
fn a_ban_cannot_be_outrun_by_refreshing() {
    let mut t = T::default();
    let old = {
        let payload =
            serde_json::json!({"sub": "user-001", "role": "user", "iat": NOW_S - 100, "exp": NOW_S + 1800});
        forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
    };
    // The cache holds a clean answer for the token...
    t.send(2, "GET", "/api/v1/plain/1", Some(&old));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(2), 200);
    t.finish(2);
    // ... when another gateway bans the user; the refresh here still asks the store.
    t.host.now_ms += 300;
    let before = t.calls();
    t.send(3, "POST", "/api/v1/auth/refresh", Some(&old));
    assert_eq!(t.calls(), before + 1, "the refresh looked the token up itself");
    t.answer_last(Some(200), &format!(r#"{{"MGET":[null,null,"{}"]}}"#, NOW_S));
    assert_eq!((t.status(3), t.reason(3)), (401, "revoked"));
    t.finish(3);

    // A refresh that won before a ban: the new token is issued after the ban's second, but
    // its lineage began before it, so the ban reaches it.
    let mut t = T::default();
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&old));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    let body: serde_json::Value = serde_json::from_str(&t.req(2).reply.as_ref().unwrap().body).unwrap();
    let fresh = body["access_token"].as_str().unwrap().to_string();
    t.finish(2);
    t.host.now_ms += 5_000;
    t.send(3, "GET", "/api/v1/plain/1", Some(&fresh));
    // Banned at NOW_S + 2: after the new token's iat (NOW_S), but it descends from a login
    // at NOW_S - 100.
    t.answer_last(Some(200), &format!(r#"{{"MGET":[null,null,"{}"]}}"#, NOW_S + 2));
    assert_eq!((t.status(3), t.reason(3)), (401, "revoked"));
}

/// Finding 6: webdis can hand one call's reply to another. Every call carries a nonce the
/// reply must echo; a reply without it is a store failure, never an answer.
#[test]
fn a_reply_meant_for_another_call_is_a_store_failure() {
    let mut t = T::default();
    let revoked = token_for("user-003", "x");
    t.send(2, "GET", "/api/v1/plain/1", Some(&revoked));
    let path = t.host.dispatched.last().unwrap().path.clone();
    assert!(path.contains(".json?jsonp=n"), "{path}");
    // Another request's clean answer arrives with that request's nonce.
    let token_id = t.host.dispatched.last().unwrap().token_id;
    t.answer_raw(
        token_id,
        Some(200),
        r#"n0000000000000001({"MGET":[null,null,null]});"#,
    );
    assert_eq!((t.status(2), t.reason(2)), (503, "store_unavailable"));
    assert_eq!(t.metric("gateway_store_misrouted_replies_total"), 1);
    // An unwrapped reply is refused too.
    t.send(3, "GET", "/api/v1/plain/1", Some(&revoked));
    t.answer_raw(t.host.dispatched.last().unwrap().token_id, Some(200), CLEAN);
    assert_eq!(t.status(3), 503);
}

/// Findings 3 and 8: refused anonymous requests (unrouted paths, missing, invalid or revoked
/// tokens) are counted, not stored; a revoked token's flood cannot crowd out the records of
/// callers whose token is valid, and never lands in its user's list.
#[test]
fn refused_unauthenticated_requests_are_counted_not_stored() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {"buffer": 10}});
    let mut t = T::new(v);
    for ctx in 10..20 {
        t.get(ctx, &format!("/api/v1/nope/{}", "x".repeat(1000)), None);
    }
    t.get(20, "/api/v1/plain/1", None);
    t.get(21, "/api/v1/plain/1", Some("garbage"));
    assert_eq!(t.gw.logs.buffer.len(), 0, "nothing stored");
    // Alice's revoked token, flooding.
    let alice = token_for("alice", "old");
    for ctx in 30..60 {
        t.send(ctx, "GET", "/api/v1/plain/1", Some(&alice));
        if t.req(ctx).reply.is_none() && t.req(ctx).resumed == 0 {
            t.answer_last(Some(200), BLACKLISTED);
        }
        assert_eq!(t.reason(ctx), "revoked");
        t.finish(ctx);
    }
    assert_eq!(
        t.gw.logs.buffer.len(),
        0,
        "revoked: not authenticated, not stored"
    );
    // An admin's requests are all kept.
    for ctx in 60..70 {
        t.send(ctx, "GET", "/api/v1/plain/1", Some(&token_for("root", "a")));
        if t.req(ctx).reply.is_none() && t.req(ctx).resumed == 0 {
            t.answer_last(Some(200), CLEAN);
        }
        t.finish(ctx);
    }
    assert_eq!(t.gw.logs.buffer.len(), 10);
    assert!(t
        .gw
        .logs
        .buffer
        .iter()
        .all(|r| r.user_id.as_deref() == Some("root")));
    assert_eq!(t.metric("gateway_log_records_skipped_total"), 42);
    assert_eq!(t.metric("gateway_log_records_dropped_total"), 0);
}

#[test]
fn cluster_sync_on_a_host_without_shared_data_drains_the_vms_own_bucket() {
    // Issue 21's first defect: the sync's drain went to the host's (missing) shared data.
    let mut v = base();
    v["routes"][2]["rate_limit"] = serde_json::json!({"max_calls": 10, "period": 60, "cluster_wide": true});
    let mut t = T::on_host(v, |h| h.no_shared_data = true);
    assert_eq!(t.get(2, "/api/v1/products/1", None), 200);
    let sync = |t: &mut T, total: u64| {
        t.host.now_ms += 1000;
        let before = t.calls();
        t.tick();
        let call = t
            .host
            .dispatched
            .get(before..)
            .unwrap()
            .iter()
            .find(|d| d.path.contains("INCRBY"));
        let token_id = call.expect("a sync call").token_id;
        t.answer(token_id, Some(200), &format!(r#"{{"INCRBY":{total}}}"#));
    };
    sync(&mut t, 1); // our one call: the baseline
    sync(&mut t, 9); // eight calls through other gateways
    let statuses: Vec<u16> = (10..15)
        .map(|ctx| t.get(ctx, "/api/v1/products/1", None))
        .collect();
    assert_eq!(statuses, [200, 429, 429, 429, 429], "10 - 1 here - 8 elsewhere");
    assert!(t.host.shared.is_empty(), "nothing reached the host's shared data");
}

/// Kong's and APISIX's `set_effective_context` does nothing: a request must never wait on
/// another request's lookup there, or it would be resumed (unchecked) by a callback of another
/// context, or never.
fn single_context_host() -> T {
    T::on_host(base(), |h| {
        h.single_context = true;
        h.no_shared_data = true; // APISIX
    })
}

#[test]
fn on_a_single_context_host_every_request_makes_its_own_lookup() {
    let mut t = single_context_host();
    let tok = token();
    for ctx in 2..=4 {
        assert_eq!(t.send(ctx, "GET", "/api/v1/plain/1", Some(&tok)), Action::Pause);
    }
    assert_eq!(t.calls(), 3, "one lookup per request, none joined");
    assert!(t
        .host
        .dispatched
        .iter()
        .zip(2..=4)
        .all(|(d, ctx)| d.context == ctx));
    // The answers arrive in another order, each on its own request's context.
    let ids: Vec<u32> = t.host.dispatched.iter().map(|d| d.token_id).collect();
    t.answer(ids[2], Some(200), CLEAN);
    assert_eq!((t.req(4).resumed, t.req(2).resumed, t.req(3).resumed), (1, 0, 0));
    t.answer(ids[0], Some(200), BLACKLISTED);
    assert_eq!((t.status(2), t.reason(2)), (401, "revoked"));
    assert_eq!(t.req(3).resumed, 0, "still waiting for its own answer");
    t.answer(ids[1], Some(200), CLEAN);
    assert_eq!(t.req(3).resumed, 1);
    assert_eq!(t.metric("gateway_revocation_coalesced_total"), 0);
}

/// Kong behind nginx's proxy forwards a request header the filter removed: a client's copy of
/// a header only the gateway writes is refused there, never forwarded beside the gateway's.
#[test]
fn where_removed_headers_still_reach_the_upstream_a_forged_identity_is_refused() {
    let mut t = T::on_host(base(), |h| h.keeps_removed_headers = true);
    for (ctx, name) in [(2, "X-User-Id"), (3, "x_user_role"), (4, "X-Gateway-Canary")] {
        let h = vec![
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), b"/api/v1/open/1".to_vec()),
            (name.to_string(), b"admin".to_vec()),
        ];
        t.send_headers(ctx, h);
        assert_eq!(t.status(ctx), 400, "{name}");
        let body = t
            .req(ctx)
            .reply
            .as_ref()
            .map(|r| r.body.clone())
            .unwrap_or_default();
        assert!(body.contains("is set by the gateway"), "{body}");
        t.finish(ctx);
    }
    // Address headers are still removed (the host's own configuration rewrites them), and a
    // request without a gateway-owned header goes on as anywhere else.
    let h = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), b"/api/v1/open/1".to_vec()),
        ("x-real-ip".to_string(), b"1.2.3.4".to_vec()),
    ];
    assert_eq!(t.send_headers(5, h), Action::Continue);
    assert_eq!(t.req(5).header("x-real-ip"), None);
    // Where removal works (Envoy, which hands the filter lower-case names), the same forged
    // header is stripped, not refused.
    let mut t = T::default();
    let h = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), b"/api/v1/open/1".to_vec()),
        ("x-user-id".to_string(), b"admin".to_vec()),
    ];
    assert_eq!(t.send_headers(2, h), Action::Continue);
    assert_eq!(t.req(2).header("x-user-id"), None);
}

/// `failure_mode: stale`: while the store is down, a token this gateway found clean within the
/// window is admitted (counted); one it never saw, one seen too long ago, one it revoked itself,
/// and the gateway's own endpoints get the 503.
#[test]
fn stale_mode_admits_only_recently_clean_tokens() {
    let mut v = base();
    v["revocation"] = serde_json::json!({"failure_mode": "stale", "stale_window": 30, "cache_ttl": 1});
    let mut t = T::new(v);
    let seen = token_for("user-001", "seen");
    let unseen = token_for("user-002", "unseen");
    let logged_out = token_for("user-003", "out");
    // This gateway logs one token out (confirmed by the store)...
    t.send(3, "GET", "/api/v1/plain/1", Some(&logged_out));
    t.answer_last(Some(200), CLEAN);
    t.send(4, "POST", "/api/v1/auth/logout", Some(&logged_out));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(4), 200);
    // ...and later finds another clean while the store answers.
    t.host.now_ms += 1_000;
    t.send(2, "GET", "/api/v1/plain/1", Some(&seen));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(2), 200);

    // The store goes down; the cache's 1 s is over, so each request asks it.
    t.host.now_ms += 5_000;
    t.send(5, "GET", "/api/v1/plain/1", Some(&seen));
    t.answer_last(None, "");
    assert_eq!(
        (t.status(5), t.req(5).resumed),
        (200, 1),
        "clean 5 s ago: admitted"
    );
    t.tick();
    assert_eq!(t.metric("gateway_revocation_allowed_stale_total"), 1);
    t.send(6, "GET", "/api/v1/plain/1", Some(&unseen));
    t.answer_last(None, "");
    assert_eq!(t.status(6), 503, "never seen: refused");
    t.send(7, "GET", "/api/v1/plain/1", Some(&logged_out));
    if t.req(7).paused {
        t.answer_last(None, "");
    }
    assert_ne!(t.status(7), 200, "logged out here: never admitted");
    t.send(8, "POST", "/api/v1/auth/refresh", Some(&seen));
    t.answer_last(None, "");
    assert_eq!(t.status(8), 503, "no refresh on a stale answer");

    // Past the window the seen token is refused too.
    t.host.now_ms += 26_000;
    t.send(9, "GET", "/api/v1/plain/1", Some(&seen));
    t.answer_last(None, "");
    assert_eq!(t.status(9), 503, "clean 31 s ago: refused");
}

/// A revocation this gateway records voids every clean answer cached before it, whatever slot
/// it sits in (a ban's local entry can be overwritten by another user's), and a clean answer to
/// a lookup that may have left before that revocation is not cached at all.
#[test]
fn stale_mode_forgets_clean_answers_older_than_a_local_revocation() {
    let mut v = base();
    v["revocation"] = serde_json::json!({"failure_mode": "stale", "stale_window": 30, "cache_ttl": 1});
    let mut t = T::new(v);
    let seen = token_for("user-001", "seen");
    let other = token_for("user-002", "other");
    t.send(2, "GET", "/api/v1/plain/1", Some(&seen));
    t.answer_last(Some(200), CLEAN);
    t.host.now_ms += 1_000;
    // Another token is logged out here; `seen`'s lookup leaves just before and answers clean after.
    t.send(3, "GET", "/api/v1/plain/1", Some(&other));
    t.answer_last(Some(200), CLEAN);
    t.send(4, "POST", "/api/v1/auth/logout", Some(&other));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.host.now_ms += 2_000;
    t.send(5, "GET", "/api/v1/plain/1", Some(&seen));
    let lookup = t.host.dispatched.last().unwrap().token_id;
    let write = t.host.dispatched.iter().rev().nth(1).unwrap().token_id;
    t.answer(write, Some(200), SET_OK); // the logout is confirmed...
    t.host.now_ms += 100;
    t.answer(lookup, Some(200), CLEAN); // ...then the lookup sent before it answers
    assert_eq!((t.status(4), t.status(5)), (200, 200));
    // The store goes down.
    t.host.now_ms += 2_000;
    t.send(6, "GET", "/api/v1/plain/1", Some(&seen));
    t.answer_last(None, "");
    assert_eq!(
        t.status(6),
        503,
        "no clean answer newer than the local revocation"
    );
}

#[test]
fn stale_mode_needs_the_cache() {
    let mut v = base();
    v["revocation"] = serde_json::json!({"failure_mode": "stale", "cache_ttl": 0});
    let err = Config::from_json(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(err.field, "revocation.failure_mode");
}

/// The summary records sent to the log store (those with `repeated`).
fn summaries_sent(host: &FakeHost) -> Vec<serde_json::Value> {
    host.dispatched
        .iter()
        .filter_map(|d| d.body.as_deref())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
        .filter(|v| v.get("repeated").is_some())
        .collect()
}

fn admin_token(sub: &str) -> String {
    let payload = serde_json::json!({"sub": sub, "name": "n", "role": "admin", "iat": NOW_S, "exp": NOW_S + 1800, "jti": "adm"});
    forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
}

/// Fourth attack: one user's flood of 429s, each stored as an authenticated record, pushed the
/// records of admins working at the same time out of the buffer. A caller's refusals are now
/// one record per window with a count, and privileged records are never evicted by lower ones.
#[test]
fn one_users_flood_of_429s_keeps_every_admin_record() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {"buffer": 30}});
    v["routes"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "admin", "prefix": "/admin", "roles": ["admin"]}));
    let mut t = T::new(v);
    let run = |t: &mut T, ctx: u32, path: &str, token: &str| {
        t.send(ctx, "GET", path, Some(token));
        if t.req(ctx).reply.is_none() && t.req(ctx).resumed == 0 && t.req(ctx).paused {
            t.answer_last(Some(200), CLEAN);
        }
        let status = t.status(ctx);
        t.finish(ctx);
        status
    };
    let flood = token_for("user-001", "f");
    let admin = admin_token("admin-1");
    let mut ctx = 2;
    let mut limited = 0;
    for round in 0..20 {
        for _ in 0..50 {
            limited += u32::from(run(&mut t, ctx, "/api/v1/users/1", &flood) == 429);
            ctx += 1;
        }
        assert_eq!(run(&mut t, ctx, &format!("/api/v1/admin/{round}"), &admin), 200);
        ctx += 1;
    }
    assert!(limited >= 990, "{limited}");
    let class = |t: &T, c: RecordClass| t.gw.logs.buffer.iter().filter(|r| r.class == c).count();
    assert_eq!(class(&t, RecordClass::Privileged), 20, "every admin record kept");
    // The flood: its allowed request and its first 429 as they came; the rest counted.
    assert_eq!(class(&t, RecordClass::Ordinary), 2);
    assert_eq!(t.metric("gateway_log_records_dropped_total"), 0);
    assert_eq!(
        t.metric("gateway_log_records_summarized_total"),
        i64::from(limited - 1)
    );
    // The window ends: one summary record carries the count.
    t.host.now_ms += logs::SUMMARY_WINDOW_MS;
    t.tick();
    let summaries: Vec<serde_json::Value> =
        t.gw.logs
            .buffer
            .iter()
            .filter(|r| r.class == RecordClass::Summary)
            .map(|r| serde_json::from_str(&r.json).unwrap())
            .collect();
    let written = summaries_sent(&t.host);
    let all: Vec<&serde_json::Value> = summaries.iter().chain(written.iter()).collect();
    assert_eq!(
        all.len(),
        2,
        "one summary, written to its trace and its user: {all:?}"
    );
    assert_eq!(all[0]["repeated"], i64::from(limited - 1));
    assert_eq!(all[0]["user_id"], "user-001");
    assert_eq!(all[0]["decision"], "rate_limited_user");
}

/// When the buffer is full of privileged records, lower records are dropped, never them; a
/// privileged record pushes out the oldest of the lowest class.
#[test]
fn the_buffer_evicts_the_lowest_class_first() {
    let mut t = T::new({
        let mut v = base();
        v["logs"] = serde_json::json!({"enabled": false, "store": {"buffer": 4}});
        v
    });
    let rec = |class, n: u32| StoredRecord {
        trace_id: format!("t{n}"),
        user_id: (class != RecordClass::Anonymous).then(|| "u".to_string()),
        json: String::new(),
        class,
        repeat: None,
    };
    for (n, c) in [
        RecordClass::Anonymous,
        RecordClass::Ordinary,
        RecordClass::Summary,
        RecordClass::Ordinary,
    ]
    .into_iter()
    .enumerate()
    {
        t.gw.buffer_record(rec(c, n as u32), 4);
    }
    t.gw.buffer_record(rec(RecordClass::Privileged, 10), 4);
    t.gw.buffer_record(rec(RecordClass::Privileged, 11), 4);
    t.gw.buffer_record(rec(RecordClass::Ordinary, 12), 4);
    let traces: Vec<&str> = t.gw.logs.buffer.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(traces, ["t2", "t3", "t10", "t11"]);
    t.gw.buffer_record(rec(RecordClass::Privileged, 13), 4);
    t.gw.buffer_record(rec(RecordClass::Privileged, 14), 4);
    t.gw.buffer_record(rec(RecordClass::Privileged, 15), 4);
    let traces: Vec<&str> = t.gw.logs.buffer.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(traces, ["t10", "t11", "t13", "t14"]);
    assert_eq!(t.metric("gateway_log_records_dropped_privileged_total"), 1);
    assert_eq!(t.metric("gateway_log_records_dropped_anonymous_total"), 1);
    assert_eq!(t.metric("gateway_log_records_dropped_authenticated_total"), 3);
    assert_eq!(t.metric("gateway_log_records_dropped_summary_total"), 1);
    // The native glue's hand-over queue drops in the same order.
    let mut q = vec![
        rec(RecordClass::Privileged, 1),
        rec(RecordClass::Ordinary, 2),
        rec(RecordClass::Anonymous, 3),
        rec(RecordClass::Summary, 4),
    ];
    assert_eq!(bound_records(&mut q, 2), [1, 1, 0, 0]);
    assert_eq!(q.len(), 2);
    // Refusals a summary would count go first, even privileged ones: a flood of them cannot
    // push out a privileged record on its way to the main thread (native).
    let repeat = |n| StoredRecord {
        repeat: Some(("u".to_string(), "rate_limited_user")),
        ..rec(RecordClass::Privileged, n)
    };
    let mut q = vec![
        rec(RecordClass::Privileged, 1),
        repeat(2),
        repeat(3),
        rec(RecordClass::Ordinary, 4),
    ];
    assert_eq!(bound_records(&mut q, 2), [0, 0, 2, 0]);
    let traces: Vec<&str> = q.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(traces, ["t1", "t4"]);
}

/// Fourth attack: bad signatures from one address made the workers verify without bound. Each
/// spends the address's budget; once it is spent no signature of that address is checked,
/// while a token the cache holds still passes and other addresses are untouched.
#[test]
fn bad_signatures_spend_the_clients_budget() {
    let mut v = base();
    v["gateway"]["rate_limit"] = serde_json::json!({"bad_signatures": {"max_calls": 3, "period": 60}});
    let mut t = T::new(v);
    t.host.peer = Some("10.0.0.7:4321".to_string());
    let good = token();
    assert_eq!(t.get(2, "/api/v1/open/1", None), 200);
    t.send(3, "GET", "/api/v1/plain/1", Some(&good));
    t.answer_last(Some(200), CLEAN);
    t.finish(3);
    let forged = forge(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        r#"{"sub":"x","exp":9999999999}"#,
        b"not-the-secret-at-all-not-the-secret",
    );
    let mut ctx = 10;
    for _ in 0..3 {
        assert_eq!(t.get(ctx, "/api/v1/plain/1", Some(&forged)), 401);
        ctx += 1;
    }
    assert_eq!(t.get(ctx, "/api/v1/plain/1", Some(&forged)), 429);
    assert_eq!(t.reason(ctx), "rate_limited_ip");
    ctx += 1;
    // A fresh valid token of this address is not checked either; the cached one passes.
    assert_eq!(
        t.get(ctx, "/api/v1/plain/1", Some(&token_for("user-002", "z"))),
        429
    );
    ctx += 1;
    t.send(ctx, "GET", "/api/v1/plain/1", Some(&good));
    if t.req(ctx).paused {
        t.answer_last(Some(200), CLEAN);
    }
    assert_eq!(t.status(ctx), 200);
    t.finish(ctx);
    ctx += 1;
    // Another address has its own budget.
    t.host.peer = Some("10.9.9.9:5555".to_string());
    assert_eq!(t.get(ctx, "/api/v1/plain/1", Some(&forged)), 401);
}

/// The native module's workers hand every record to the main thread's gateway, which has the
/// timer: refusals are summarised there, not on a worker that may never see another request.
#[test]
fn handed_over_refusals_are_summarised_by_the_gateway_that_writes_them() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {"buffer": 30}});
    let mut worker = T::new(v.clone());
    worker.gw.hand_over_records();
    let flood = token_for("user-001", "f");
    let mut records = Vec::new();
    for ctx in 2..40 {
        worker.send(ctx, "GET", "/api/v1/users/1", Some(&flood));
        if worker.req(ctx).paused {
            worker.answer_last(Some(200), CLEAN);
        }
        worker.finish(ctx);
        // As the native glue does after every request.
        records.extend(worker.gw.take_stored_records());
    }
    assert_eq!(records.len(), 38, "nothing summarised on the worker");
    assert!(worker.gw.logs.summaries.by_caller.is_empty());
    let mut main = T::new(v);
    main.host.current = ROOT;
    main.gw.add_stored_records(records, &mut main.host);
    // The allowed request and the first 429, sent at once (trace and user lists each).
    assert_eq!(main.host.dispatched.len(), 4);
    assert!(main.gw.logs.buffer.is_empty());
    main.host.now_ms += logs::SUMMARY_WINDOW_MS + 1000;
    main.tick();
    let repeated = summaries_sent(&main.host);
    assert_eq!(repeated.len(), 2, "trace and user lists: {repeated:?}");
    assert_eq!(repeated[0]["repeated"], 36);
}

/// Third attack (differential corpus): the native runtime left `X-RateLimit-*` off the
/// filter's own replies, which Envoy runs no response callback of a dynamic module on; and an
/// empty `role` claim reached the upstream as an empty header on one runtime, none on the other.
#[test]
fn own_replies_carry_the_buckets_headers_and_empty_claims_are_not_forwarded() {
    let mut t = T::default();
    t.send(2, "GET", "/api/v1/products/1", Some("not-a-token"));
    t.finish(2);
    t.send(3, "GET", "/api/v1/users/1", Some("garbage"));
    let reply = t.req(3).reply.clone().unwrap();
    assert_eq!(reply.status(), 401);
    let names: Vec<&str> = reply.headers.iter().map(|(n, _)| *n).collect();
    assert!(
        names.contains(&"x-ratelimit-limit") && names.contains(&"x-ratelimit-remaining"),
        "{names:?}"
    );
    t.finish(3);
    let payload =
        serde_json::json!({"sub": "user-009", "name": "", "role": "", "iat": NOW_S, "exp": NOW_S + 1800});
    let tok = forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET);
    t.send(4, "GET", "/api/v1/plain/1", Some(&tok));
    if t.req(4).paused {
        t.answer_last(Some(200), CLEAN);
    }
    let r = t.req(4);
    assert_eq!(r.header("x-user-id"), Some("user-009"));
    assert_eq!(r.header("x-user-role"), None);
    assert_eq!(r.header("x-user-name"), None);
    t.finish(4);
}

/// The native main thread takes what its buffer has room for and keeps the rest for later: a
/// refusal its summary counts needs no room, a privileged record takes a lower one's place.
#[test]
fn handed_over_records_beyond_the_room_are_given_back_in_order() {
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {"buffer": 2}});
    let mut main = T::new(v);
    main.host.current = ROOT;
    // Room for no call: every record stays buffered.
    main.gw.logs.calls = MAX_LOG_CALLS_IN_FLIGHT;
    let rec = |class, n: u32| StoredRecord {
        trace_id: format!("t{n}"),
        user_id: Some("u".to_string()),
        json: String::new(),
        class,
        repeat: None,
    };
    let records = vec![
        rec(RecordClass::Ordinary, 1),
        rec(RecordClass::Ordinary, 2),
        rec(RecordClass::Ordinary, 3),
        rec(RecordClass::Privileged, 4),
        rec(RecordClass::Ordinary, 5),
    ];
    let left = main.gw.add_stored_records(records, &mut main.host);
    let kept: Vec<&str> = main.gw.logs.buffer.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(kept, ["t2", "t4"]);
    let given_back: Vec<&str> = left.iter().map(|r| r.trace_id.as_str()).collect();
    assert_eq!(given_back, ["t3", "t5"]);
}

fn confirming(timeout: f64) -> T {
    let mut v = base();
    v["revocation"] = serde_json::json!({"confirm": {"cluster": "webdis-replica", "timeout": timeout}});
    T::on_host(v, |_| {})
}

fn last_call(t: &T) -> (String, String) {
    let d = t.host.dispatched.last().unwrap();
    (d.cluster.clone(), d.path.clone())
}

#[test]
fn with_confirm_a_logout_is_acknowledged_only_once_a_replica_holds_it() {
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    assert!(t.req(2).reply.is_none(), "the primary's word is not enough");
    let (cluster, path) = last_call(&t);
    assert_eq!(cluster, "webdis-replica");
    assert!(path.starts_with("/MGET/token%3Ablacklist%3A"), "{path}");
    assert!(path.contains("/token%3Arevoked%3A"), "{path}");
    // One key copied, the other not yet: read back again at once.
    let calls = t.calls();
    t.answer_last(Some(200), r#"{"MGET":[null,"1"]}"#);
    assert!(t.req(2).reply.is_none());
    assert_eq!(t.calls(), calls + 1);
    // Still missing: the next read-back waits for the timer.
    t.answer_last(Some(200), r#"{"MGET":[null,null]}"#);
    assert_eq!(t.calls(), calls + 1);
    // Meanwhile this gateway already refuses the token (the primary has it).
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.reason(3), "revoked");
    t.host.now_ms += rv::CONFIRM_RETRY_MS;
    t.tick();
    assert_eq!(t.calls(), calls + 2);
    assert_eq!(last_call(&t).0, "webdis-replica");
    t.answer_last(Some(200), r#"{"MGET":["1","1"]}"#);
    assert_eq!(t.status(2), 200);
    assert!(t.req(2).reply.as_ref().unwrap().body.contains("Logged out"));
    t.finish(2);
    assert_eq!(t.metric("gateway_revocation_confirm_retries_total"), 1);
}

#[test]
fn a_revocation_no_replica_holds_in_time_is_not_acknowledged() {
    let mut t = confirming(0.2);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    // The replica is cut off: errors, timeouts and missing keys alike are not a confirmation.
    let replies = [
        (Some(200), r#"{"MGET":[null,null]}"#),
        (None, ""),
        (Some(200), r#"{"MGET":["1"]}"#),
        (Some(200), r#"{"GET":"1"}"#),
        (Some(502), "MOVED 1234 127.0.0.1:7000"),
    ];
    for (status, body) in replies.iter().cycle() {
        if t.req(2).reply.is_some() {
            break;
        }
        let pending = t.host.dispatched.last().unwrap().token_id;
        t.answer(pending, *status, body);
        if t.host.dispatched.last().unwrap().token_id == pending && t.req(2).reply.is_none() {
            t.host.now_ms += rv::CONFIRM_RETRY_MS;
            t.tick();
        }
    }
    assert_eq!(t.status(2), 503);
    let body: serde_json::Value = serde_json::from_str(&t.req(2).reply.as_ref().unwrap().body).unwrap();
    assert_eq!(body["message"], message::NOT_REPLICATED);
    t.finish(2);
    // What the primary took still counts here.
    t.send(3, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!(t.reason(3), "revoked");
    t.finish(3);
    assert_eq!(t.metric("gateway_revocation_unconfirmed_total"), 1);
}

#[test]
fn a_ban_is_confirmed_by_its_own_value_or_a_later_one() {
    let admin = forge(
        r#"{"alg":"HS256"}"#,
        &serde_json::json!({"sub": "root", "role": "admin", "iat": NOW_S - 5, "exp": NOW_S + 60}).to_string(),
        SECRET,
    );
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/admin/users/user-001/revoke", Some(&admin));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    let (_, path) = last_call(&t);
    assert!(
        path.starts_with("/MGET/user%3Arevoked_before%3Auser-001."),
        "{path}"
    );
    // An older ban on the replica is not this one.
    t.answer_last(Some(200), &format!(r#"{{"MGET":["{}"]}}"#, NOW_S - 100));
    assert!(t.req(2).reply.is_none());
    t.answer_last(Some(200), r#"{"MGET":["not a number"]}"#);
    assert!(t.req(2).reply.is_none());
    t.host.now_ms += rv::CONFIRM_RETRY_MS;
    t.tick();
    t.answer_last(Some(200), &format!(r#"{{"MGET":["{}"]}}"#, NOW_S + 1));
    assert_eq!(t.status(2), 200);
}

#[test]
fn a_client_that_leaves_during_the_read_back_leaves_nothing_behind() {
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    t.answer_last(Some(200), r#"{"MGET":[null,null]}"#);
    t.answer_last(Some(200), r#"{"MGET":[null,null]}"#);
    t.done(2);
    let calls = t.calls();
    t.host.now_ms += rv::CONFIRM_RETRY_MS;
    t.tick();
    assert_eq!(t.calls(), calls, "nobody to read back for");
    // A read-back still out when the client left is answered into the void.
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    t.done(2);
    t.answer_last(Some(200), r#"{"MGET":["1","1"]}"#);
    assert!(t.req(2).reply.is_none());
}

#[test]
fn a_refresh_that_lost_the_race_reads_nothing_back() {
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    let calls = t.calls();
    t.answer_last(Some(200), SET_LOST);
    assert_eq!(t.reason(2), "revoked");
    assert_eq!(t.calls(), calls);
    // A refresh that won hands out its token only once a replica holds the old one's revocation.
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    assert!(t.req(2).reply.is_none());
    t.answer_last(Some(200), r#"{"MGET":["1","1"]}"#);
    assert_eq!(t.status(2), 200);
    assert!(t.req(2).reply.as_ref().unwrap().body.contains("access_token"));
}

#[test]
fn confirm_settings_are_checked_naming_the_field() {
    for (confirm, field) in [
        (
            serde_json::json!({"cluster": "webdis"}),
            "revocation.confirm.cluster",
        ),
        (
            serde_json::json!({"cluster": "r", "timeout": 0}),
            "revocation.confirm.timeout",
        ),
        (serde_json::json!({"cluster": ""}), "revocation.confirm.cluster"),
    ] {
        let mut v = base();
        v["revocation"] = serde_json::json!({ "confirm": confirm });
        let e = Config::from_json(v.to_string().as_bytes()).err().unwrap();
        assert!(e.field.starts_with(field), "{e:?}");
    }
    let mut v = base();
    v["revocation"] = serde_json::json!({"confirm": {"cluster": "r", "tries": 3}});
    let e = Config::from_json(v.to_string().as_bytes()).err().unwrap();
    assert!(e.message.contains("unknown field `tries`"), "{e:?}");
    // The timer ticks often enough to read back.
    let t = confirming(1.0);
    assert!(t.gw.tick_period_ms() <= rv::CONFIRM_RETRY_MS);
}

#[test]
fn without_a_random_source_the_gateway_refuses_to_start() {
    let cfg = Config::from_json(base().to_string().as_bytes()).unwrap();
    let mut host = FakeHost::new(NOW_S as u64 * 1000);
    host.no_random = true;
    let e = Gateway::new(cfg, &mut host).err().unwrap();
    assert!(e.contains("no random source"), "{e}");
}

/// Up to the deciding write of a logout with `revocation.confirm`; the read-back is out.
fn logout_written(t: &mut T, ctx: u32) {
    t.send(ctx, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
}

#[test]
fn a_read_back_that_cannot_be_sent_is_answered_at_once() {
    let mut t = confirming(1.0);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.host.fail_dispatch = true;
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(2), 503, "no retry of a refused dispatch");
}

#[test]
fn where_the_timer_cannot_resume_a_request_read_backs_are_few() {
    let mut v = base();
    v["revocation"] = serde_json::json!({"confirm": {"cluster": "webdis-replica", "timeout": 60}});
    let mut t = T::on_host(v, |h| h.single_context = true);
    logout_written(&mut t, 2);
    let first = t.calls();
    for _ in 0..10 {
        if t.req(2).reply.is_some() {
            break;
        }
        t.answer_last(Some(200), r#"{"MGET":[null,null]}"#);
    }
    assert_eq!(t.status(2), 503);
    assert_eq!(t.calls() - first + 1, rv::MAX_IMMEDIATE_READBACKS as usize);
}

#[test]
fn a_retried_logout_of_a_revoked_token_is_refused_only_once_a_replica_says_so() {
    let mut t = confirming(0.2);
    t.send(2, "POST", "/api/v1/auth/logout", Some(&token()));
    // The primary has it (the first attempt's 503 left it there).
    t.answer_last(Some(200), BLACKLISTED);
    assert!(t.req(2).reply.is_none(), "a 401 here reads as logged out");
    let (cluster, path) = last_call(&t);
    assert_eq!(cluster, "webdis-replica");
    assert!(path.starts_with("/MGET/token%3Ablacklist%3A"), "{path}");
    t.answer_last(Some(200), r#"{"MGET":["1",null,null]}"#);
    assert_eq!(t.reason(2), "revoked");
    // The replica does not have it: 503 until it does.
    let mut t = confirming(0.2);
    t.send(3, "POST", "/api/v1/auth/logout", Some(&token()));
    t.answer_last(Some(200), BLACKLISTED);
    while t.req(3).reply.is_none() {
        let pending = t.host.dispatched.last().unwrap().token_id;
        t.answer(pending, Some(200), CLEAN);
        if t.req(3).reply.is_none() && t.host.dispatched.last().unwrap().token_id == pending {
            t.host.now_ms += rv::CONFIRM_RETRY_MS;
            t.tick();
        }
    }
    assert_eq!(t.status(3), 503);
}

#[test]
fn a_request_that_leaves_takes_its_calls_with_it() {
    let mut t = confirming(1.0);
    logout_written(&mut t, 2);
    assert_eq!(t.gw.calls.len(), 1);
    assert_eq!(t.gw.calls.nonces(), 1);
    t.done(2);
    assert_eq!((t.gw.calls.len(), t.gw.calls.nonces()), (0, 0));
}

/// Every kind of request callout that cannot go out is answered by the duty it was for, with
/// its own outcome, and leaves nothing behind (no call entry, no lookup others would join).
#[test]
fn a_callout_that_cannot_go_out_is_answered_by_the_duty_that_asked() {
    // The revocation lookup: 503 store_unavailable; the next request sends its own lookup.
    let mut t = T::default();
    t.host.fail_dispatch = true;
    t.send(2, "GET", "/api/v1/plain/1", Some(&token()));
    assert_eq!((t.status(2), t.reason(2)), (503, "store_unavailable"));
    assert_eq!(t.gw.calls.len(), 0);
    assert!(
        t.gw.revocation.inflight.is_empty(),
        "a lookup that never went out is not joined"
    );
    t.host.fail_dispatch = false;
    assert_eq!(t.send(3, "GET", "/api/v1/plain/1", Some(&token())), Action::Pause);
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(3), 200);
    // The logout's write: 503 with the write's own message.
    t.send(
        4,
        "POST",
        "/api/v1/auth/logout",
        Some(&token_for("user-002", "w")),
    );
    t.host.fail_dispatch = true;
    t.answer_last(Some(200), CLEAN);
    assert_eq!((t.status(4), t.reason(4)), (503, "store_unavailable"));
    let body = &t.req(4).reply.as_ref().unwrap().body;
    assert!(body.contains(MSG_WRITE_FAILED), "{body}");
    // The log query: 503 with the log store's message, counted as a log-store error.
    let mut v = base();
    v["logs"] = serde_json::json!({"enabled": false, "store": {"query_roles": ["user"]}});
    let mut t = T::new(v);
    t.send(5, "GET", "/api/v1/admin/logs?trace_id=abc", Some(&token()));
    t.host.fail_dispatch = true;
    t.answer_last(Some(200), CLEAN);
    assert_eq!((t.status(5), t.reason(5)), (503, "store_unavailable"));
    let body = &t.req(5).reply.as_ref().unwrap().body;
    assert!(body.contains(message::LOG_STORE_DOWN), "{body}");
    assert_eq!(t.metric("gateway_log_store_errors_total"), 1);
    assert_eq!(t.gw.calls.len(), 0);
}

/// The route is picked again after the gateway writes or removes a header a route matches on:
/// the canary's internal one always, the configuration's `routing_headers` too, and no other.
#[test]
fn the_route_is_picked_again_only_after_a_header_routes_match_on() {
    let picks = |v: serde_json::Value, ctx: u32, extra: Vec<HeaderPair>| {
        let mut t = T::new(v);
        t.send(9, "GET", "/api/v1/plain/1", Some(&token()));
        t.answer_last(Some(200), CLEAN);
        t.host.reset_calls();
        let mut headers: Vec<HeaderPair> = vec![
            (":method".to_string(), b"GET".to_vec()),
            (":path".to_string(), b"/api/v1/plain/1".to_vec()),
            (":authority".to_string(), b"gw".to_vec()),
            (
                "authorization".to_string(),
                format!("Bearer {}", token()).into_bytes(),
            ),
        ];
        headers.extend(extra);
        t.send_headers(ctx, headers);
        let n = t
            .host
            .call_names()
            .iter()
            .filter(|c| **c == "clear_route_cache")
            .count();
        t.finish(ctx);
        t.finish(9);
        n
    };
    // Identity headers written, no route matches on them: no new pick.
    assert_eq!(picks(base(), 2, vec![]), 0);
    let mut v = base();
    v["routing_headers"] = serde_json::json!([]);
    assert_eq!(picks(v.clone(), 3, vec![]), 0);
    // A route matches on X-User-Role, which the gateway writes: one new pick.
    v["routing_headers"] = serde_json::json!(["X-User-Role"]);
    assert_eq!(picks(v, 4, vec![]), 1);
    // A client's copy of the internal routing header, removed: one new pick (Envoy may have
    // routed on it already).
    assert_eq!(
        picks(base(), 5, vec![("x-gateway-canary".to_string(), b"1".to_vec())]),
        1
    );
    // A name that is not a header name is refused, naming the entry.
    let mut v = base();
    v["routing_headers"] = serde_json::json!(["ok", "bad name"]);
    let e = Config::from_json(v.to_string().as_bytes()).unwrap_err();
    assert_eq!(e.field, "routing_headers[1]");
}

/// Kong's shared memory tells keys apart by CRC32 alone: a configuration two of whose keys
/// share one is refused there at configure time, naming the fields; Envoy takes it.
#[test]
fn a_configuration_whose_keys_share_a_crc32_is_refused_where_keys_are_hashed() {
    let mut v = base();
    v["gateway"]["rate_limit"] = serde_json::json!({"ip_slots": 1_000_000});
    v["revocation"] = serde_json::json!({"cache_slots": 1_000_000});
    let build = |by_hash: bool| {
        let cfg = Config::from_json(v.to_string().as_bytes()).unwrap();
        let mut host = FakeHost::new(NOW_S as u64 * 1000);
        host.current = ROOT;
        host.keys_by_crc32 = by_hash;
        Gateway::new(cfg, &mut host).map(|_| ())
    };
    let err = build(true).unwrap_err();
    assert!(err.contains("same CRC32") && err.contains("_slots"), "{err}");
    assert_eq!(build(false), Ok(()));
    // The shipped defaults pass on Kong too.
    let cfg = Config::from_json(base().to_string().as_bytes()).unwrap();
    let mut host = FakeHost::new(NOW_S as u64 * 1000);
    host.keys_by_crc32 = true;
    assert!(Gateway::new(cfg, &mut host).is_ok());
}

/// A host that says it removes request headers but refuses to remove a client's copy of a
/// gateway-owned one: the request is refused, never forwarded with the client's identity.
#[test]
fn a_refused_removal_of_a_gateway_owned_header_refuses_the_request() {
    let mut t = T::on_host(base(), |h| h.refuse_header_removal = true);
    let h = vec![
        (":method".to_string(), b"GET".to_vec()),
        (":path".to_string(), b"/api/v1/open/1".to_vec()),
        ("x-user-id".to_string(), b"admin".to_vec()),
    ];
    t.send_headers(2, h);
    assert_eq!(t.status(2), 500);
    assert_eq!(t.req(2).resumed, 0);
    t.finish(2);
    // Without a client copy nothing needs removing: the request goes on.
    t.send(3, "GET", "/api/v1/open/1", None);
    assert_eq!(t.req(3).reply.as_ref().map(|r| r.status()), None);
}

// ------------------------------------------------------------ sender-constrained tokens

mod bound_tokens {
    use super::*;
    use crate::jwt::testkeys;
    use base64::Engine as _;
    use serde_json::json;
    use sha2::Digest as _;

    fn b64(bytes: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    fn client_jwk() -> serde_json::Value {
        let mut jwk = testkeys::jwk(crate::jwt::Algorithm::Es256, "x", false);
        jwk.as_object_mut().unwrap().remove("kid");
        jwk
    }

    fn jkt() -> String {
        crate::jwt::keys::public_jwk(client_jwk().as_object().unwrap())
            .unwrap()
            .1
    }

    fn bound_token(cnf: serde_json::Value) -> String {
        let payload =
            json!({"sub": "user-001", "role": "user", "iat": NOW_S, "exp": NOW_S + 1800, "cnf": cnf});
        forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
    }

    fn proof(token: &str, jti: &str, method: &str, uri: &str) -> String {
        testkeys::sign_raw(
            crate::jwt::Algorithm::Es256,
            &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": client_jwk()}),
            &json!({"jti": jti, "htm": method, "htu": uri, "iat": NOW_S,
                    "ath": b64(&sha2::Sha256::digest(token.as_bytes()))}),
        )
    }

    fn send(t: &mut T, ctx: u32, scheme: &str, token: &str, proofs: &[String]) -> Action {
        let mut headers: Vec<HeaderPair> = vec![
            (":method".into(), b"GET".to_vec()),
            (":path".into(), b"/api/v1/orders?page=2".to_vec()),
            (":authority".into(), b"gw".to_vec()),
            ("authorization".into(), format!("{scheme} {token}").into_bytes()),
        ];
        for p in proofs {
            headers.push(("dpop".into(), p.clone().into_bytes()));
        }
        t.send_headers(ctx, headers)
    }

    fn dpop_gateway() -> T {
        let mut v = base();
        v["jwt"]["dpop"] = json!("allowed");
        T::new(v)
    }

    #[test]
    fn a_dpop_bound_token_passes_with_its_proof_once_per_proof_fleet_wide() {
        let mut t = dpop_gateway();
        let token = bound_token(json!({"jkt": jkt()}));
        let p = proof(&token, "p-1", "GET", "http://gw/api/v1/orders");
        assert_eq!(
            send(&mut t, 2, "DPoP", &token, std::slice::from_ref(&p)),
            Action::Pause
        );
        let set = t.host.dispatched.last().unwrap().path.clone();
        assert!(
            set.starts_with("/SET/dpop%3A") && set.contains("/EX/181/NX.json"),
            "{set}"
        );
        t.answer_last(Some(200), SET_OK);
        // Then the revocation lookup, as for any token.
        assert!(t.host.dispatched.last().unwrap().path.starts_with("/MGET/"));
        t.answer_last(Some(200), CLEAN);
        assert_eq!(t.status(2), 200);
        assert_eq!(t.req(2).resumed, 1);
        t.finish(2);

        // The same proof again: this gateway remembers it, no call.
        let calls = t.calls();
        assert_eq!(send(&mut t, 3, "DPoP", &token, &[p]), Action::Replied);
        assert_eq!((t.status(3), t.reason(3), t.calls()), (401, "dpop_replay", calls));
        let challenge = t
            .req(3)
            .reply
            .as_ref()
            .unwrap()
            .headers
            .iter()
            .find(|(k, _)| *k == "www-authenticate")
            .map(|(_, v)| v.clone())
            .unwrap();
        assert!(
            challenge.starts_with(r#"DPoP error="invalid_dpop_proof""#),
            "{challenge}"
        );

        // A proof another gateway saw first: the store says so.
        let p2 = proof(&token, "p-2", "GET", "http://gw/api/v1/orders");
        assert_eq!(send(&mut t, 4, "DPoP", &token, &[p2]), Action::Pause);
        t.answer_last(Some(200), SET_LOST);
        assert_eq!((t.status(4), t.reason(4)), (401, "dpop_replay"));

        // The store down: denied (the revocation store's failure mode, deny by default).
        let p3 = proof(&token, "p-3", "GET", "http://gw/api/v1/orders");
        assert_eq!(send(&mut t, 5, "DPoP", &token, &[p3]), Action::Pause);
        t.answer_last(None, "");
        assert_eq!(t.status(5), 503);
    }

    #[test]
    fn a_bound_token_without_its_binding_is_refused() {
        let mut t = dpop_gateway();
        let token = bound_token(json!({"jkt": jkt()}));
        let uri = "http://gw/api/v1/orders";
        let cases: Vec<(&str, &str, Vec<String>, &str)> = vec![
            (
                "Bearer for a DPoP-bound token",
                "Bearer",
                vec![proof(&token, "a", "GET", uri)],
                "binding",
            ),
            ("no proof", "DPoP", vec![], "dpop_proof"),
            (
                "two proofs",
                "DPoP",
                vec![proof(&token, "b", "GET", uri), proof(&token, "c", "GET", uri)],
                "dpop_proof",
            ),
            (
                "a proof for POST",
                "DPoP",
                vec![proof(&token, "d", "POST", uri)],
                "dpop_proof",
            ),
            (
                "a proof for another path",
                "DPoP",
                vec![proof(&token, "e", "GET", "http://gw/api/v1/users")],
                "dpop_proof",
            ),
            (
                "a proof for another token",
                "DPoP",
                vec![proof(&token_for("user-001", "z"), "f", "GET", uri)],
                "dpop_proof",
            ),
        ];
        for (i, (what, scheme, proofs, reason)) in cases.into_iter().enumerate() {
            let ctx = 10 + i as u32;
            assert_eq!(
                send(&mut t, ctx, scheme, &token, &proofs),
                Action::Replied,
                "{what}"
            );
            assert_eq!((t.status(ctx), t.reason(ctx)), (401, reason), "{what}");
        }
        // The DPoP scheme with a bearer token.
        assert_eq!(
            send(
                &mut t,
                30,
                "DPoP",
                &super::token(),
                &[proof(&super::token(), "g", "GET", uri)]
            ),
            Action::Replied
        );
        assert_eq!((t.status(30), t.reason(30)), (401, "binding"));
        assert_eq!(t.calls(), 0);
    }

    #[test]
    fn dpop_off_refuses_bound_tokens_and_required_refuses_bearer_tokens() {
        let mut t = T::default();
        let token = bound_token(json!({"jkt": jkt()}));
        let p = proof(&token, "a", "GET", "http://gw/api/v1/orders");
        assert_eq!(send(&mut t, 2, "DPoP", &token, &[p]), Action::Replied);
        assert_eq!((t.status(2), t.reason(2)), (401, "bound_token"));
        let mut v = base();
        v["jwt"]["dpop"] = json!({"mode": "required", "proof_window": 30});
        let mut t = T::new(v);
        assert_eq!(send(&mut t, 2, "Bearer", &super::token(), &[]), Action::Replied);
        assert_eq!((t.status(2), t.reason(2)), (401, "binding"));
    }

    #[test]
    fn a_certificate_bound_token_passes_only_with_its_certificate() {
        let cert = [7u8; 32];
        let hex: String = cert.iter().map(|b| format!("{b:02x}")).collect();
        let token = bound_token(json!({"x5t#S256": b64(&cert)}));
        for (ctx, presented, status) in [
            (2, Some(hex.clone()), 200),
            (3, Some(hex.replace("7", "8")), 401),
            (4, None, 401),
        ] {
            let mut t = T::new(base());
            t.host.peer_certificate = presented;
            let action = send(&mut t, ctx, "Bearer", &token, &[]);
            if status == 200 {
                assert_eq!(action, Action::Pause);
                t.answer_last(Some(200), CLEAN);
            }
            assert_eq!(t.status(ctx), status, "{ctx}");
            if status == 401 {
                assert_eq!(t.reason(ctx), "binding");
            } else {
                t.finish(ctx);
            }
        }
    }
}

// ------------------------------------------------------------ opaque tokens (RFC 7662)

mod opaque_tokens {
    use super::*;
    use serde_json::json;

    const OPAQUE: &str = "2YotnFZFEjr1zCsicMWpAA";

    fn gateway() -> T {
        let mut v = base();
        v["jwt"]["issuers"] = json!([{
            "name": "idp", "issuer": "https://idp.example.com",
            "claims": {"role": "groups"},
            "introspection": {"endpoint": "https://idp.example.com/oauth2/introspect",
                              "cluster": "introspect_idp", "client_id": "gateway",
                              "client_secret_env": "INTROSPECTION_SECRET", "cache_ttl": 30}
        }]);
        let env = |var: &str| (var == "INTROSPECTION_SECRET").then(|| "s3cret".to_string());
        let cfg = Config::from_json_with_env(v.to_string().as_bytes(), &env).unwrap();
        let mut host = FakeHost::new(NOW_S as u64 * 1000);
        host.current = ROOT;
        let gw = Gateway::new(cfg, &mut host).unwrap();
        T { gw, host }
    }

    fn active(sub: &str) -> String {
        json!({"active": true, "sub": sub, "groups": ["user"], "scope": "orders:read",
               "iss": "https://idp.example.com", "exp": NOW_S + 600, "token_type": "Bearer"})
        .to_string()
    }

    fn introspections(t: &T) -> Vec<usize> {
        t.host
            .dispatched
            .iter()
            .enumerate()
            .filter(|(_, d)| d.cluster == "introspect_idp")
            .map(|(i, _)| i)
            .collect()
    }

    #[test]
    fn an_opaque_token_is_introspected_once_per_cache_period() {
        let mut t = gateway();
        assert_eq!(t.send(2, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
        let call = t.host.dispatched.last().unwrap().clone();
        assert_eq!(
            (call.cluster.as_str(), call.method.as_str()),
            ("introspect_idp", "POST")
        );
        assert_eq!(call.path, "/oauth2/introspect");
        assert_eq!(call.authority, "idp.example.com");
        assert_eq!(call.authorization.as_deref(), Some("Basic Z2F0ZXdheTpzM2NyZXQ="));
        assert_eq!(
            call.body.as_deref(),
            Some(&b"token=2YotnFZFEjr1zCsicMWpAA&token_type_hint=access_token"[..])
        );
        t.answer(call.token_id, Some(200), &active("u-9"));
        // Revocation still applies: its lookup follows.
        assert!(t.host.dispatched.last().unwrap().path.starts_with("/MGET/"));
        t.answer_last(Some(200), CLEAN);
        assert_eq!(t.status(2), 200);
        assert_eq!(t.req(2).header("x-user-id"), Some("u-9"));
        t.finish(2);
        // The same token again: from the cache, no second introspection (and the revocation
        // cache's clean answer: no lookup either).
        assert_eq!(
            t.send(3, "GET", "/api/v1/orders/1", Some(OPAQUE)),
            Action::Continue
        );
        assert_eq!(introspections(&t).len(), 1);
        assert_eq!(t.req(3).header("x-user-id"), Some("u-9"));
        t.finish(3);
        // Past the cache period: asked again.
        t.host.now_ms += 31_000;
        assert_eq!(t.send(4, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
        assert_eq!(introspections(&t).len(), 2);
        t.answer_last(Some(200), &active("u-9"));
        t.answer_last(Some(200), CLEAN);
        t.finish(4);
    }

    #[test]
    fn concurrent_requests_for_one_token_share_one_call() {
        let mut t = gateway();
        assert_eq!(t.send(2, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
        assert_eq!(t.send(3, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
        assert_eq!(introspections(&t).len(), 1);
        let first = t.host.dispatched[introspections(&t)[0]].token_id;
        t.answer(first, Some(200), &active("u-9"));
        // One revocation lookup, shared.
        t.answer_last(Some(200), CLEAN);
        assert_eq!((t.status(2), t.status(3)), (200, 200));
        assert_eq!((t.req(2).resumed, t.req(3).resumed), (1, 1));
        t.finish(2);
        t.finish(3);
    }

    #[test]
    fn lying_or_failing_answers_refuse_the_token() {
        for (answer, status, reason) in [
            (
                Some((
                    200,
                    json!({"active": "true", "sub": "x", "exp": NOW_S + 60}).to_string(),
                )),
                401,
                "inactive",
            ),
            (
                Some((
                    200,
                    json!({"active": 1, "sub": "x", "exp": NOW_S + 60}).to_string(),
                )),
                401,
                "inactive",
            ),
            (Some((200, json!({"active": false}).to_string())), 401, "inactive"),
            (
                Some((
                    200,
                    json!({"active": true, "sub": "x", "exp": NOW_S - 600, "iss": "https://idp.example.com"})
                        .to_string(),
                )),
                401,
                "expired",
            ),
            (
                Some((
                    200,
                    json!({"active": true, "sub": "x", "exp": NOW_S + 60, "iss": "https://evil"}).to_string(),
                )),
                401,
                "issuer",
            ),
            (
                Some((
                    200,
                    json!({"active": true, "sub": "x", "iss": "https://idp.example.com"}).to_string(),
                )),
                401,
                "missing_exp",
            ),
            // RFC 7662 2.1: a refresh token comes back active too; it is no access token.
            (
                Some((
                    200,
                    json!({"active": true, "sub": "x", "exp": NOW_S + 60, "iss": "https://idp.example.com",
                           "token_type": "refresh_token"})
                    .to_string(),
                )),
                401,
                "typ",
            ),
            (
                Some((
                    200,
                    json!({"active": true, "sub": "x", "exp": NOW_S + 60, "iss": "https://idp.example.com",
                           "token_use": "refresh_token"})
                    .to_string(),
                )),
                401,
                "typ",
            ),
            (
                Some((200, r#"{"active":true,"active":true,"sub":"x"}"#.to_string())),
                503,
                "keys_unavailable",
            ),
            (Some((500, "{}".to_string())), 503, "keys_unavailable"),
            // A timeout: Envoy answers the call with no response.
            (None, 503, "keys_unavailable"),
        ] {
            let mut t = gateway();
            assert_eq!(t.send(2, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
            let id = t.host.dispatched.last().unwrap().token_id;
            match &answer {
                Some((s, body)) => t.answer(id, Some(*s), body),
                None => t.answer(id, None, ""),
            }
            assert_eq!((t.status(2), t.reason(2)), (status, reason), "{answer:?}");
            // A late second answer for the same call is nobody's.
            t.answer_raw(id, Some(200), &active("someone-else"));
            assert_eq!(t.status(2), status);
        }
    }

    #[test]
    fn a_call_whose_owner_left_is_sent_again_for_the_waiters() {
        let mut t = gateway();
        t.gw.started(true, &mut t.host).unwrap();
        assert_eq!(t.send(2, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
        assert_eq!(t.send(3, "GET", "/api/v1/orders/1", Some(OPAQUE)), Action::Pause);
        t.done(2);
        t.tick();
        assert_eq!(introspections(&t).len(), 2);
        t.answer_last(Some(200), &active("u-9"));
        t.answer_last(Some(200), CLEAN);
        assert_eq!(t.status(3), 200);
        t.finish(3);
    }
}

// ------------------------------------------------------------ decisions for the rest of Envoy

#[test]
fn the_decision_is_published_once_before_the_request_goes_on_or_is_answered() {
    let mut v = base();
    v["gateway"]["metadata"] = serde_json::json!(true);
    let mut t = T::new(v);
    assert_eq!(
        t.send(2, "GET", "/api/v1/orders/1", Some(&token())),
        Action::Pause
    );
    assert!(t.req(2).published.is_empty(), "not before the request is decided");
    t.answer_last(Some(200), CLEAN);
    let published = &t.req(2).published;
    assert_eq!(published.len(), 1);
    let get = |k: &str| published[0].iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone());
    assert_eq!(get("user_id").as_deref(), Some("user-001"));
    assert_eq!(get("roles").as_deref(), Some("user"));
    assert_eq!(get("outcome").as_deref(), Some("allowed"));
    assert_eq!(get("issuer").as_deref(), Some("default"));
    t.finish(2);
    // A refusal is published too (access logs print it).
    assert_eq!(
        t.send(3, "GET", "/api/v1/orders/1", Some("a.b.c")),
        Action::Replied
    );
    let get = |k: &str| {
        t.req(3).published[0]
            .iter()
            .find(|(n, _)| *n == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(get("outcome").as_deref(), Some("unauthorized"));
    assert_eq!(get("user_id").as_deref(), Some(""));
    // Off (the default): nothing, and no host call.
    let mut t = T::default();
    assert_eq!(t.send(2, "GET", "/api/v1/products/1", None), Action::Continue);
    assert!(t.req(2).published.is_empty());
}

#[test]
fn each_wait_is_a_span_closed_when_the_wait_ends() {
    let mut t = T::default();
    assert_eq!(
        t.send(2, "GET", "/api/v1/orders/1", Some(&token())),
        Action::Pause
    );
    assert_eq!(t.req(2).open_span, Some("gateway.revocation_lookup"));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.req(2).open_span, None);
    let names: Vec<&str> = t.req(2).spans.iter().map(|(n, _)| *n).collect();
    assert_eq!(names, ["gateway.jwt", "gateway.revocation_lookup"]);
    assert_eq!(t.req(2).spans[0].1, "gateway.decision=allowed");
    t.finish(2);
}
