//! Fetched signing keys through the in-memory host: the first fetch, requests held for it,
//! rotation, the refetch rate limit, stale-while-error, and sharing between VMs.

use serde_json::json;

use super::*;
use crate::jwt::testkeys::{jwk, jwks, sign};
use crate::jwt::Algorithm;

const IDP: &str = "http://127.0.0.1:8005";

fn config() -> serde_json::Value {
    let mut v = base();
    v["revocation"] = serde_json::Value::Null;
    v.as_object_mut().unwrap().remove("revocation");
    v["jwt"]["issuers"] = json!([{
        "name": "idp", "issuer": IDP, "algorithms": ["ES256", "EdDSA"],
        "remote_jwks": {"uri": "http://127.0.0.1:8005/.well-known/jwks.json", "cluster": "jwks_idp",
                        "refresh_interval": 5, "max_stale": 30, "min_refetch_interval": 1, "max_wait": 1}
    }]);
    v
}

fn idp_token(alg: Algorithm, kid: &str) -> String {
    sign(
        alg,
        Some(kid),
        json!({"sub": "user-9", "name": "kim", "role": "user", "iss": IDP, "iat": NOW_S, "exp": NOW_S + 1800}),
    )
}

fn doc(kids: &[(Algorithm, &str)]) -> String {
    jwks(&kids.iter().map(|(a, k)| jwk(*a, k, true)).collect::<Vec<_>>())
}

fn jwks_calls(t: &T) -> usize {
    t.host
        .dispatched
        .iter()
        .filter(|d| d.cluster == "jwks_idp")
        .count()
}

#[test]
fn the_first_request_waits_for_the_first_fetch_and_other_vms_share_it() {
    let mut t = T::new(config());
    let tok = idp_token(Algorithm::Es256, "ec-1");
    assert_eq!(t.send(2, "GET", "/api/v1/plain/1", Some(&tok)), Action::Pause);
    let call = t.host.dispatched.last().unwrap().clone();
    assert_eq!(
        (
            call.cluster.as_str(),
            call.authority.as_str(),
            call.path.as_str(),
            call.method.as_str()
        ),
        ("jwks_idp", "127.0.0.1:8005", "/.well-known/jwks.json", "GET")
    );
    // A second request joins the wait: no second fetch.
    assert_eq!(t.send(3, "GET", "/api/v1/plain/1", Some(&tok)), Action::Pause);
    assert_eq!(jwks_calls(&t), 1);
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    for ctx in [2, 3] {
        assert_eq!((t.req(ctx).resumed, t.status(ctx)), (1, 200));
        assert_eq!(t.req(ctx).header("x-user-id"), Some("user-9"));
    }
    // Another VM of the same Envoy takes the set from shared data: no fetch of its own.
    let cfg = Config::from_json(config().to_string().as_bytes()).unwrap();
    t.host.current = ROOT;
    let mut other = Gateway::new(cfg, &mut t.host).unwrap();
    other.on_tick(ROOT, &mut t.host);
    t.host.requests.insert(
        50,
        crate::host::fake::FakeRequest {
            headers: vec![
                (":method".into(), b"GET".to_vec()),
                (":path".into(), b"/api/v1/plain/1".to_vec()),
                ("authorization".into(), format!("Bearer {tok}").into_bytes()),
            ],
            ..Default::default()
        },
    );
    t.host.current = 50;
    assert_eq!(other.on_request_headers(50, &mut t.host), Action::Continue);
    assert_eq!(t.host.req(50).header("x-user-id"), Some("user-9"));
    assert_eq!(jwks_calls(&t), 1);
    // The reference's HS256 tokens never wait for anything.
    assert_eq!(
        t.send(4, "GET", "/api/v1/plain/1", Some(&token())),
        Action::Continue
    );
}

#[test]
fn a_failed_first_fetch_is_a_503_and_retries_back_off() {
    let mut t = T::new(config());
    let tok = idp_token(Algorithm::Es256, "ec-1");
    t.send(2, "GET", "/api/v1/plain/1", Some(&tok));
    t.answer_last(Some(500), "oops");
    assert_eq!((t.status(2), t.reason(2)), (503, "keys_unavailable"));
    t.finish(2);
    let body: serde_json::Value = serde_json::from_str(&t.req(2).reply.as_ref().unwrap().body).unwrap();
    assert!(
        body["message"].as_str().unwrap().contains("issuer 'idp'"),
        "{body}"
    );
    // At once again: no new fetch (rate limit), the same clear 503.
    assert_eq!(t.send(3, "GET", "/api/v1/plain/1", Some(&tok)), Action::Replied);
    assert_eq!((t.status(3), jwks_calls(&t)), (503, 1));
    // The timer retries after the back-off; a garbage answer is a failure too, counted.
    t.host.now_ms += 1_000;
    t.tick();
    assert_eq!(jwks_calls(&t), 2);
    t.answer_last(Some(200), "{\"keys\": \"nope\"}");
    t.host.now_ms += 1_000;
    t.tick();
    assert_eq!(jwks_calls(&t), 2, "second failure: wait two seconds");
    t.host.now_ms += 1_000;
    t.tick();
    assert_eq!(jwks_calls(&t), 3);
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    assert_eq!(t.send(4, "GET", "/api/v1/plain/1", Some(&tok)), Action::Continue);
    assert_eq!(t.metric("issuer=.=idp;.;gateway_jwks_fetch_errors_total"), 2);
    assert_eq!(t.metric("issuer=.=idp;.;gateway_jwks_fetches_total"), 1);
    // A key server's outage is neither an unauthorized request nor an auth failure.
    assert_eq!(
        t.metric("route=.=plain;.;outcome=.=keys_unavailable;.;gateway_requests_total"),
        1
    );
    assert_eq!(
        t.metric("route=.=plain;.;outcome=.=unauthorized;.;gateway_requests_total"),
        0
    );
    assert_eq!(
        t.metric("reason=.=keys_unavailable;.;gateway_auth_failures_total"),
        0
    );
}

#[test]
fn a_rotated_key_is_fetched_on_first_use_and_refetches_are_rate_limited() {
    let mut t = T::new(config());
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    // The provider rotates: a token signed with the new key arrives.
    let new = idp_token(Algorithm::EdDsa, "ed-2");
    t.host.now_ms += 1_000;
    assert_eq!(t.send(2, "GET", "/api/v1/plain/1", Some(&new)), Action::Pause);
    assert_eq!(jwks_calls(&t), 2);
    t.answer_last(
        Some(200),
        &doc(&[(Algorithm::Es256, "ec-1"), (Algorithm::EdDsa, "ed-2")]),
    );
    assert_eq!((t.req(2).resumed, t.status(2)), (1, 200));
    // A kid nobody publishes: one fetch per second at most. Requests wait for the next one
    // the rate limit allows (within max_wait), which the timer sends; then 401.
    let bogus = idp_token(Algorithm::EdDsa, "nope");
    assert_eq!(t.send(3, "GET", "/api/v1/plain/1", Some(&bogus)), Action::Pause);
    assert_eq!(t.send(4, "GET", "/api/v1/plain/1", Some(&bogus)), Action::Pause);
    assert_eq!(jwks_calls(&t), 2, "not at once: the rate limit");
    t.host.now_ms += 1_000;
    t.tick();
    assert_eq!(jwks_calls(&t), 3, "one fetch for both");
    t.answer_last(Some(200), &doc(&[(Algorithm::EdDsa, "ed-2")]));
    for ctx in [3, 4] {
        assert_eq!((t.status(ctx), t.reason(ctx)), (401, "unknown_kid"));
    }
    // ec-1 was retired by that set: its tokens are refused now, even though one was accepted.
    let old = idp_token(Algorithm::Es256, "ec-1");
    t.send(5, "GET", "/api/v1/plain/1", Some(&old));
    t.host.now_ms += 1_000;
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::EdDsa, "ed-2")]));
    assert_eq!((t.status(5), t.reason(5)), (401, "unknown_kid"));
}

#[test]
fn a_failing_provider_keeps_the_last_good_set_until_max_stale() {
    let mut t = T::new(config());
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    let tok = idp_token(Algorithm::Es256, "ec-1");
    for step in 1..=5 {
        t.host.now_ms += 5_000;
        t.tick();
        if let Some(d) = t.host.dispatched.last() {
            if d.cluster == "jwks_idp" && t.gw.calls.holds(d.token_id) {
                t.answer_last(None, "");
            }
        }
        assert_eq!(
            t.send(10 + step, "GET", "/api/v1/plain/1", Some(&tok)),
            Action::Continue,
            "after {step} x 5 s"
        );
    }
    assert!(t.metric("issuer=.=idp;.;gateway_jwks_fetch_errors_total") >= 2);
    // Past max_stale (30 s) the set is dropped: requests get a 503, not a 401.
    t.host.now_ms += 10_000;
    t.tick();
    if t.gw.calls.any(|c| matches!(c, Call::Jwks { .. })) {
        t.answer_last(None, "");
    }
    t.send(30, "GET", "/api/v1/plain/1", Some(&tok));
    if t.req(30).reply.is_none() {
        // It waits for a fetch that fails.
        t.answer_last(Some(502), "");
    }
    assert_eq!((t.status(30), t.reason(30)), (503, "keys_unavailable"));
}

#[test]
fn a_wait_ends_at_max_wait_and_an_oversized_answer_is_not_read() {
    let mut t = T::new(config());
    let tok = idp_token(Algorithm::Es256, "ec-1");
    t.send(2, "GET", "/api/v1/plain/1", Some(&tok));
    let fetch = t.host.dispatched.last().unwrap().token_id;
    t.host.now_ms += 1_000;
    t.tick();
    assert_eq!((t.req(2).resumed, t.status(2)), (0, 503), "answered at max_wait");
    // The answer, when it comes, is too large to read.
    let context = t.host.dispatched.last().unwrap().context;
    t.host.current = context;
    t.host.answer = (Some(200), doc(&[(Algorithm::Es256, "ec-1")]).into_bytes());
    t.host.delivering = true;
    t.gw.on_call_response(context, fetch, crate::jwt::keys::MAX_JWKS_BYTES + 1, &mut t.host);
    t.host.delivering = false;
    assert!(t.gw.keys.sets[1].is_none());
    assert_eq!(t.metric("issuer=.=idp;.;gateway_jwks_fetch_errors_total"), 1);
    // A request gone while it waited is forgotten.
    t.host.now_ms += 2_000;
    t.send(3, "GET", "/api/v1/plain/1", Some(&tok));
    t.done(3);
    assert!(t.gw.keys.jwks[1].waiters.is_empty());
}

#[test]
fn a_request_that_joined_a_fetch_from_before_a_rotation_fetches_again() {
    let mut t = T::new(config());
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    // The timed refresh goes out; the provider rotates; a token with the new kid arrives.
    t.host.now_ms += 5_000;
    t.tick();
    assert_eq!(jwks_calls(&t), 2);
    let refresh = t.host.dispatched.last().unwrap().token_id;
    let new = idp_token(Algorithm::EdDsa, "ed-2");
    assert_eq!(t.send(2, "GET", "/api/v1/plain/1", Some(&new)), Action::Pause);
    assert_eq!(jwks_calls(&t), 2, "it joins the fetch in flight");
    // That fetch brings the set from before the rotation: the request fetches again at once.
    t.answer(refresh, Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    assert_eq!(t.req(2).reply, None);
    assert_eq!(jwks_calls(&t), 3);
    t.answer_last(
        Some(200),
        &doc(&[(Algorithm::Es256, "ec-1"), (Algorithm::EdDsa, "ed-2")]),
    );
    assert_eq!((t.req(2).resumed, t.status(2)), (1, 200));
}

#[test]
fn the_gateway_refreshes_only_tokens_it_can_sign() {
    let mut v = config();
    v["revocation"] = json!({});
    let mut t = T::new(v);
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    let tok = idp_token(Algorithm::Es256, "ec-1");
    t.send(2, "POST", "/api/v1/auth/refresh", Some(&tok));
    t.answer_last(Some(200), CLEAN);
    assert_eq!(t.status(2), 400);
    let body: serde_json::Value = serde_json::from_str(&t.req(2).reply.as_ref().unwrap().body).unwrap();
    assert_eq!(
        body["message"],
        "Tokens of issuer 'idp' are refreshed by their identity provider"
    );
    assert!(
        !t.host.dispatched.iter().any(|d| d.path.starts_with("/SET/")),
        "nothing blacklisted"
    );
    // The reference's tokens still refresh.
    t.send(3, "POST", "/api/v1/auth/refresh", Some(&token()));
    t.answer_last(Some(200), CLEAN);
    t.answer_last(Some(200), SETEX_OK);
    t.answer_last(Some(200), SET_OK);
    assert_eq!(t.status(3), 200);
}

/// Finding 4 of the second outside attack: a client that resets each request carrying an
/// unknown kid cancelled every fetch with it, each leaving its lease, and the timed refresh
/// never ran (a retired key stayed accepted). A cancelled fetch releases its lease and goes out
/// again from the root context on the next tick, which no client can cancel.
#[test]
fn a_client_reset_cannot_cancel_the_key_fetch() {
    let mut t = T::new(config());
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    assert_eq!(jwks_calls(&t), 1);
    t.host.now_ms += 1_500;
    let tok = idp_token(Algorithm::Es256, "ec-2");
    assert_eq!(t.send(2, "GET", "/api/v1/plain/1", Some(&tok)), Action::Pause);
    assert_eq!(jwks_calls(&t), 2);
    assert_eq!(
        t.host.dispatched.last().unwrap().context,
        2,
        "sent from the request"
    );
    // The client resets: the request is gone, and its callout with it.
    t.host.gone.push(2);
    t.done(2);
    // The next tick sends it again, from the root context (subject to the refetch limit).
    t.host.now_ms += 1_000;
    t.tick();
    assert_eq!(
        jwks_calls(&t),
        3,
        "fetched again at once, not after the lease ran out"
    );
    let last = t.host.dispatched.last().unwrap().clone();
    assert_eq!(last.context, ROOT, "owned by the root context");
    // Requests that come and go meanwhile do not touch it.
    let tok3 = idp_token(Algorithm::Es256, "ec-3");
    t.send(3, "GET", "/api/v1/plain/1", Some(&tok3));
    t.host.gone.push(3);
    t.done(3);
    t.answer(last.token_id, Some(200), &doc(&[(Algorithm::Es256, "ec-2")]));
    assert_eq!(t.get(4, "/api/v1/plain/1", Some(&tok)), 200, "the new key is in");
    let retired = idp_token(Algorithm::Es256, "ec-1");
    assert_eq!(t.send(5, "GET", "/api/v1/plain/1", Some(&retired)), Action::Pause);
    assert!(t.req(5).resumed == 0, "the retired key is out: never forwarded");
    t.done(5); // its client gives up
}

/// Finding 4, related: a key rotated in right after another unknown-kid fetch was refused at
/// once; it is held until the next fetch the rate limit allows, within `max_wait`.
#[test]
fn a_kid_rotated_in_right_after_a_fetch_waits_for_the_next_allowed_one() {
    let mut v = config();
    v["jwt"]["issuers"][0]["remote_jwks"]["max_wait"] = json!(2);
    let mut t = T::new(v);
    t.tick();
    t.answer_last(Some(200), &doc(&[(Algorithm::Es256, "ec-1")]));
    t.host.now_ms += 1_500;
    // An unknown kid: fetched at once, and that set does not have the next one yet.
    t.send(
        2,
        "GET",
        "/api/v1/plain/1",
        Some(&idp_token(Algorithm::Es256, "ec-2")),
    );
    t.answer_last(
        Some(200),
        &doc(&[(Algorithm::Es256, "ec-1"), (Algorithm::Es256, "ec-2")]),
    );
    assert_eq!(t.status(2), 200);
    // 100 ms later a token with a kid rotated in since: the rate limit allows the next forced
    // fetch in 900 ms, within max_wait, so it waits.
    t.host.now_ms += 100;
    let calls = jwks_calls(&t);
    let tok = idp_token(Algorithm::Es256, "ec-3");
    assert_eq!(t.send(3, "GET", "/api/v1/plain/1", Some(&tok)), Action::Pause);
    assert!(t.req(3).reply.is_none(), "held, not refused");
    assert_eq!(jwks_calls(&t), calls);
    t.host.now_ms += 500;
    t.tick();
    assert_eq!(jwks_calls(&t), calls, "not before the rate limit allows");
    t.host.now_ms += 500;
    t.tick();
    assert_eq!(jwks_calls(&t), calls + 1, "the timer fetches it");
    t.answer_last(
        Some(200),
        &doc(&[(Algorithm::Es256, "ec-2"), (Algorithm::Es256, "ec-3")]),
    );
    assert_eq!((t.req(3).resumed, t.status(3)), (1, 200));
}

#[test]
fn on_a_single_context_host_no_request_waits_for_keys() {
    // Kong, APISIX: a request held for a key fetch could only be resumed from the fetch's
    // context, which their set_effective_context cannot do: it is answered at once instead.
    let mut t = T::on_host(config(), |h| h.single_context = true);
    let tok = idp_token(Algorithm::Es256, "ec-1");
    t.send(2, "GET", "/api/v1/plain/1", Some(&tok));
    assert_eq!((t.status(2), t.reason(2)), (503, "keys_unavailable"));
}
