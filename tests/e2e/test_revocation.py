"""Revocation end-to-end: real Envoy, real webdis, real Redis."""

import json
import time
import uuid

import pytest

from conftest import gateway_file
from harness import GarbageServer, Gateway, Webdis, bearer, forge, free_port, token, wait_for

REVOKED = "Token has been revoked"
STORE_DOWN = "Revocation service unavailable"


def user_token(role="user", ttl=600, iat_offset=0, sub=None):
    sub = sub or f"u-{uuid.uuid4().hex[:8]}"
    now = int(time.time()) + iat_offset
    return sub, forge({"alg": "HS256", "typ": "JWT"},
                      {"sub": sub, "name": "n", "role": role, "iat": now, "exp": now + ttl,
                       "jti": uuid.uuid4().hex})


def post(gw, path, tok=None):
    return gw.request("POST", path, bearer(tok) if tok else [])


def test_logout_then_reuse_is_401_and_key_outlives_the_token(gw, redis):
    _, tok = user_token(ttl=600)
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200
    r = post(gw, "/api/v1/auth/logout", tok)
    assert r.status == 200, r
    assert r.json() == {"message": "Logged out successfully"}
    r = gw.get("/api/v1/users/1", bearer(tok))
    assert r.status == 401 and r.json()["message"] == REVOKED, r
    assert redis.cli("GET", f"token:blacklist:{tok}") == "1"
    ttl = int(redis.cli("TTL", f"token:blacklist:{tok}"))
    assert 650 <= ttl <= 661, f"remaining lifetime (600 s) + clock skew (60 s): {ttl}"
    # Logging out twice: the token is already revoked.
    assert post(gw, "/api/v1/auth/logout", tok).status == 401


def test_logout_needs_a_valid_token_and_post(gw):
    assert post(gw, "/api/v1/auth/logout").json()["message"] == "Authorization header missing"
    r = post(gw, "/api/v1/auth/logout", "garbage")
    assert r.status == 401 and r.json()["message"].startswith("Invalid token: ")
    assert post(gw, "/api/v1/auth/logout", token(ttl=-3600)).status == 401
    r = gw.get("/api/v1/auth/logout", bearer(token()))
    assert r.status == 405 and r.header("allow") == "POST"


def test_key_written_straight_into_redis_in_reference_format(gw, redis):
    _, tok = user_token()
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200  # now cached as clean
    redis.cli("SETEX", f"token:blacklist:{tok}", 60, 1)
    started = time.monotonic()

    def refused():
        return gw.get("/api/v1/users/1", bearer(tok)).status == 401
    wait_for(refused, timeout=3, what="the blacklist to take effect")
    assert time.monotonic() - started < 2.5, "cache time is 1 s"
    assert gw.get("/api/v1/users/1", bearer(tok)).json()["message"] == REVOKED


def test_ban_revokes_older_tokens_only(gw, redis):
    sub, old = user_token(iat_offset=-10)
    _, other = user_token()  # another user is unaffected
    assert gw.get("/api/v1/orders/1", bearer(old)).status == 200
    alice = post(gw, "/api/v1/admin/users/" + sub + "/revoke", user_token(role="user")[1])
    assert alice.status == 403, alice
    r = post(gw, f"/api/v1/admin/users/{sub}/revoke", token(role="admin", sub="admin-1"))
    assert r.status == 200, r
    body = r.json()
    assert body["user_id"] == sub and abs(body["revoked_before"] - time.time()) < 5
    # At once on this instance, though the clean answer was cached.
    r = gw.get("/api/v1/orders/1", bearer(old))
    assert r.status == 401 and r.json()["message"] == REVOKED
    assert int(redis.cli("GET", f"user:revoked_before:{sub}")) == body["revoked_before"]
    assert 86000 < int(redis.cli("TTL", f"user:revoked_before:{sub}")) <= 86400
    # A token issued afterwards works.
    _, newer = user_token(sub=sub, iat_offset=1)
    assert gw.get("/api/v1/orders/1", bearer(newer)).status == 200
    assert gw.get("/api/v1/orders/1", bearer(other)).status == 200


def test_ban_written_by_another_instance_applies_within_cache_time(gw, redis):
    sub, tok = user_token(iat_offset=-10)
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200
    redis.cli("SET", f"user:revoked_before:{sub}", int(time.time()))
    wait_for(lambda: gw.get("/api/v1/users/1", bearer(tok)).status == 401, timeout=3, what="the ban")


def test_ban_rejects_bad_user_ids(gw):
    admin = token(role="admin")
    # Not a subject a token may carry: a bidi override, a leading space.
    for bad in ["a%E2%80%AEb", "%20ab"]:
        r = post(gw, f"/api/v1/admin/users/{bad}/revoke", admin)
        assert r.status == 400 and r.json()["message"] == "Invalid user id", (bad, r)
    assert post(gw, "/api/v1/admin/users/a%2Fb/revoke", admin).status == 400  # Envoy: escaped slash


def test_refresh_issues_a_new_token_and_revokes_the_old(gw, redis):
    sub, old = user_token(role="user", ttl=900)
    r = post(gw, "/api/v1/auth/refresh", old)
    assert r.status == 200, r
    body = r.json()
    assert body["token_type"] == "bearer"
    new = body["access_token"]
    assert new != old
    seen = gw.get("/api/v1/users/1", bearer(new)).json()["headers"]
    assert (seen["x-user-id"], seen["x-user-role"]) == (sub, "user")
    r = gw.get("/api/v1/users/1", bearer(old))
    assert r.status == 401 and r.json()["message"] == REVOKED
    assert redis.cli("EXISTS", f"token:blacklist:{old}") == "1"
    # The old one cannot be refreshed again; the new one can.
    assert post(gw, "/api/v1/auth/refresh", old).status == 401
    assert post(gw, "/api/v1/auth/refresh", new).status == 200


def test_revocation_metrics_move(services, webdis):
    # Its own gateway: counts left by other tests cannot mix in.
    g = _gateway(services, webdis.port, cache_ttl=5)
    try:
        names = ("gateway_revocation_lookups_total", "gateway_revocation_cache_hits_total",
                 "gateway_revocation_revoked_total")
        _, tok = user_token()
        g.get("/api/v1/users/1", bearer(tok))   # lookup
        g.get("/api/v1/users/1", bearer(tok))   # cache hit (shared data: whichever worker)
        post(g, "/api/v1/auth/logout", tok)     # endpoints ask the store: a lookup, then the writes
        g.get("/api/v1/users/1", bearer(tok))   # revoked, from the cache entry the logout wrote
        assert g.settled(*names) == {"gateway_revocation_lookups_total": 2,
                                     "gateway_revocation_cache_hits_total": 2,
                                     "gateway_revocation_revoked_total": 1}
    finally:
        g.stop()


# --- failure modes, each with its own webdis ---------------------------------------------------

@pytest.fixture
def lonely_webdis(redis):
    w = Webdis(redis.port)
    yield w
    w.stop()


def _gateway(services, webdis_port, **revocation):
    return Gateway(gateway_file(services.ports, free_port(), webdis_port, **revocation))


def test_store_down_deny_then_recovery(services, lonely_webdis):
    g = _gateway(services, lonely_webdis.port, failure_mode="deny", cache_ttl=0, timeout=0.2)
    try:
        _, tok = user_token()
        assert g.get("/api/v1/users/1", bearer(tok)).status == 200
        lonely_webdis.stop()
        started = time.monotonic()
        r = g.get("/api/v1/users/1", bearer(tok))
        assert r.status == 503 and r.json()["message"] == STORE_DOWN, r
        assert time.monotonic() - started < 1.5
        assert post(g, "/api/v1/auth/logout", tok).status == 503
        # Public routes never touch the store.
        assert g.get("/api/v1/products/1").status == 200
        lonely_webdis.start()
        wait_for(lambda: g.get("/api/v1/users/1", bearer(tok)).status == 200, timeout=10, what="recovery")
        wait_for(lambda: g.counter("gateway_revocation_store_errors_total") >= 1, timeout=8, what="store errors")
    finally:
        g.stop()


def test_store_down_allow_lets_through_and_counts(services, lonely_webdis):
    g = _gateway(services, lonely_webdis.port, failure_mode="allow", cache_ttl=0)
    try:
        lonely_webdis.stop()
        _, tok = user_token()
        for _ in range(3):
            r = g.get("/api/v1/users/1", bearer(tok))
            assert r.status == 200, r
        wait_for(lambda: g.counter("gateway_revocation_allowed_on_error_total") >= 3, timeout=8,
                 what="allowed_on_error counter")
        wait_for(lambda: g.counter("gateway_revocation_store_errors_total") >= 3, timeout=8, what="store errors")
    finally:
        g.stop()


def test_store_down_stale_admits_only_tokens_found_clean_within_the_window(services, lonely_webdis):
    """`failure_mode: stale`: a failover of a few seconds does not refuse the callers this gateway
    just saw; a token it never saw, or one it logged out itself, is not admitted."""
    g = _gateway(services, lonely_webdis.port, failure_mode="stale", stale_window=4, cache_ttl=0.5, timeout=0.2)
    try:
        _, seen = user_token()
        _, out = user_token()
        assert g.get("/api/v1/users/1", bearer(out)).status == 200
        assert post(g, "/api/v1/auth/logout", out).status == 200
        # A revocation here voids the clean answers cached before it: `seen` is found clean after.
        time.sleep(0.3)
        assert g.get("/api/v1/users/1", bearer(seen)).status == 200
        lonely_webdis.stop()
        time.sleep(0.6)  # past the cache: every request asks the store, which is gone
        for _ in range(3):
            r = g.get("/api/v1/users/1", bearer(seen))
            assert r.status == 200, r
        r = g.get("/api/v1/users/1", bearer(user_token()[1]))
        assert r.status == 503 and r.json()["message"] == STORE_DOWN, r
        assert g.get("/api/v1/users/1", bearer(out)).status in (401, 503)
        assert post(g, "/api/v1/auth/refresh", seen).status == 503, "no refresh on a stale answer"
        wait_for(lambda: g.counter("gateway_revocation_allowed_stale_total") >= 3, timeout=8,
                 what="allowed_stale counter")
        assert "admitted" in g.log_path.read_text()
        time.sleep(4)  # past the window
        assert g.get("/api/v1/users/1", bearer(seen)).status == 503
    finally:
        g.stop()


@pytest.mark.parametrize("mode,status", [("deny", 503), ("allow", 200)])
def test_webdis_answering_garbage(services, mode, status):
    garbage = GarbageServer()
    g = _gateway(services, garbage.port, failure_mode=mode, cache_ttl=0)
    try:
        for _ in range(4):
            assert g.get("/api/v1/users/1", bearer(user_token()[1])).status == status
        assert g.alive()
        log = g.log_path.read_text()
        assert "panicked" not in log and "Uncaught" not in log
        # Not a webdis reply: it does not even carry the call's nonce.
        assert "without this call's nonce" in log
    finally:
        g.stop()
        garbage.stop()


def test_cache_off_asks_every_time(services, webdis):
    g = _gateway(services, webdis.port, cache_ttl=0)
    try:
        _, tok = user_token()
        for _ in range(5):
            assert g.get("/api/v1/users/1", bearer(tok)).status == 200
        after = g.settled("gateway_revocation_lookups_total", "gateway_revocation_cache_hits_total")
        assert after == {"gateway_revocation_lookups_total": 5, "gateway_revocation_cache_hits_total": 0}, after
    finally:
        g.stop()


def test_request_body_survives_the_revocation_pause(gw):
    """A POST whose headers wait for the webdis lookup still reaches the upstream with its body."""
    _, tok = user_token()  # never seen: the lookup is a real callout
    body = {"item": "x" * 50_000, "qty": 3}
    r = gw.request("POST", "/api/v1/orders", bearer(tok), body=body)
    assert r.status == 200, r
    echo = r.json()
    assert echo["method"] == "POST"
    assert echo["body_bytes"] == len(json.dumps(body).encode())
