"""The request path as one design: the order of checks, the gateway endpoints' limits, revocation
writes that tell the truth, and coalesced lookups. Real Envoy, real webdis, real Redis."""

import concurrent.futures
import time
import uuid

from harness import DelayProxy, Gateway, Webdis, bearer, forge


def user_token(sub, ttl=600, role="user"):
    now = int(time.time())
    return forge({"alg": "HS256", "typ": "JWT"},
                 {"sub": sub, "name": "n", "role": role, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex})


def gateway(services, webdis_port, revocation=None, concurrency=2):
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    return Gateway({
        "gateway": {"prefix": "/api/v1"},
        "jwt": {"secret_env": "JWT_SECRET"},
        "webdis": f"http://127.0.0.1:{webdis_port}",
        "revocation": revocation or {},
        "routes": [
            {"name": "users", "prefix": "/users", "upstream": up, "methods": ["GET"],
             "rate_limit": {"max_calls": 1000, "period": 60, "per_user": {"max_calls": 3, "period": 60}}},
            {"name": "auth", "prefix": "/auth", "upstream": up, "methods": ["POST"], "auth_required": False,
             "rate_limit": {"max_calls": 100, "period": 60, "per_user": {"max_calls": 1, "period": 60}}},
            {"name": "admin", "prefix": "/admin", "upstream": up, "methods": ["GET"], "roles": ["admin"]},
            {"name": "plain", "prefix": "/plain", "upstream": up, "methods": ["GET"]},
        ],
    }, concurrency=concurrency)


def test_a_stolen_revoked_token_does_not_throttle_its_owner(services, webdis, redis):
    g = gateway(services, webdis.port)
    try:
        sub = f"victim-{uuid.uuid4().hex[:8]}"
        stolen, real = user_token(sub), user_token(sub)
        redis.cli("SETEX", f"token:blacklist:{stolen}", 600, 1)
        for _ in range(10):
            r = g.get("/api/v1/users/1", bearer(stolen))
            assert r.status == 401 and r.json()["message"] == "Token has been revoked", r
        # The owner still has the whole budget of 3 calls a minute.
        statuses = [g.get("/api/v1/users/1", bearer(real)).status for _ in range(4)]
        assert statuses == [200, 200, 200, 429], statuses
    finally:
        g.stop()


def test_refresh_is_rate_limited_like_the_route_it_sits_under(services, webdis, redis):
    g = gateway(services, webdis.port)
    try:
        sub = f"refresher-{uuid.uuid4().hex[:8]}"
        r = g.request("POST", "/api/v1/auth/refresh", bearer(user_token(sub)))
        assert r.status == 200, r
        fresh = r.json()["access_token"]
        r = g.request("POST", "/api/v1/auth/refresh", bearer(fresh))
        assert r.status == 429 and r.json()["message"].startswith("User rate limit exceeded"), r
        # Refused before the write: the token it would have replaced is not blacklisted.
        assert redis.cli("EXISTS", f"token:blacklist:{fresh}") == "0"
        assert g.get("/api/v1/plain/1", bearer(fresh)).status == 200
    finally:
        g.stop()


def test_a_write_the_store_refuses_is_reported_and_changes_nothing(services, redis):
    refusing = Webdis(redis.port, disabled=["SETEX"])
    g = gateway(services, refusing.port)
    try:
        tok = user_token(f"u-{uuid.uuid4().hex[:8]}")
        assert g.get("/api/v1/plain/1", bearer(tok)).status == 200
        r = g.request("POST", "/api/v1/auth/logout", bearer(tok))
        assert r.status == 503, r
        assert "the token may still be valid" in r.json()["message"]
        # Nothing recorded anywhere, so nothing applied here either: the token still works.
        assert redis.cli("EXISTS", f"token:blacklist:{tok}") == "0"
        assert g.get("/api/v1/plain/1", bearer(tok)).status == 200
        victim = f"u-{uuid.uuid4().hex[:8]}"
        victim_token = user_token(victim)
        r = g.request("POST", f"/api/v1/admin/users/{victim}/revoke", bearer(user_token("root", role="admin")))
        assert r.status == 503, r
        assert g.get("/api/v1/plain/1", bearer(victim_token)).status == 200
    finally:
        g.stop()
        refusing.stop()


def test_concurrent_requests_with_one_token_make_one_lookup(services, webdis):
    """20 requests with the same new token arrive while its lookup is out (webdis answers after
    0.3 s): one worker VM, one MGET on the wire, 20 answers."""
    proxy = DelayProxy(webdis.port, delay=0.3)
    g = gateway(services, proxy.port, revocation={"timeout": 3}, concurrency=1)
    try:
        tok = user_token(f"u-{uuid.uuid4().hex[:8]}")
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            statuses = list(pool.map(lambda _: g.get("/api/v1/plain/1", bearer(tok)).status, range(20)))
        assert statuses == [200] * 20, statuses
        assert proxy.count("MGET") == 1, proxy.commands
        assert g.settled("gateway_revocation_coalesced_total")["gateway_revocation_coalesced_total"] >= 1
        # Different tokens are not coalesced.
        others = [user_token(f"u-{uuid.uuid4().hex[:8]}") for _ in range(3)]
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            assert list(pool.map(lambda t: g.get("/api/v1/plain/1", bearer(t)).status, others)) == [200] * 3
        assert proxy.count("MGET") == 4, proxy.commands
    finally:
        g.stop()
        proxy.stop()
