"""Regression tests for the findings of the outside attack on the gateway (one test per finding,
named after it). Real Envoy, webdis and Redis."""

import concurrent.futures
import json
import os
import socket
import stat
import subprocess
import time
import uuid

from conftest import gateway_file
from harness import SECRET, Gateway, Redis, Webdis, bearer, forge, free_port, request, wait_for


def user_token(sub=None, ttl=600, role="user", iat=None):
    sub = sub or f"u-{uuid.uuid4().hex[:8]}"
    now = int(time.time()) if iat is None else iat
    return sub, forge({"alg": "HS256", "typ": "JWT"},
                      {"sub": sub, "name": "n", "role": role, "iat": now, "exp": now + ttl,
                       "jti": uuid.uuid4().hex})


def admin():
    return user_token(sub="root", role="admin")[1]


def post(gw, path, tok):
    return gw.request("POST", path, bearer(tok))


def test_finding_1_a_logged_out_token_stays_refused_past_exp(gw):
    """The verifier accepts a token until exp + 60 s of skew: the blacklist entry must last as
    long, and refresh must refuse a token past exp."""
    _, tok = user_token(ttl=2)
    assert post(gw, "/api/v1/auth/logout", tok).status == 200
    exp = int(time.time()) + 2
    wait_for(lambda: time.time() > exp + 1, timeout=5, what="exp to pass", interval=0.2)
    r = gw.get("/api/v1/users/1", bearer(tok))
    assert r.status == 401 and r.json()["message"] == "Token has been revoked", r
    # A token past exp (still inside the skew) buys no new token.
    _, late = user_token(ttl=95, iat=int(time.time()) - 100)  # exp 5 s ago
    assert gw.get("/api/v1/users/1", bearer(late)).status == 200, "accepted within the skew"
    r = post(gw, "/api/v1/auth/refresh", late)
    assert r.status == 401 and r.json()["message"] == "Invalid token: token has expired", r


def test_finding_2_a_ban_cannot_be_outrun_by_refreshing(gw):
    sub, tok = user_token()
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200
    r = post(gw, f"/api/v1/admin/users/{sub}/revoke", admin())
    assert r.status == 200, r
    banned_at = r.json()["revoked_before"]
    # A token minted in the ban's second (a refresh racing the ban) is refused.
    _, same_second = user_token(sub=sub, iat=banned_at)
    assert gw.get("/api/v1/users/1", bearer(same_second)).status == 401
    # Refresh checks the ban before minting.
    r = post(gw, "/api/v1/auth/refresh", tok)
    assert r.status == 401 and r.json()["message"] == "Token has been revoked", r
    r = post(gw, "/api/v1/auth/refresh", same_second)
    assert r.status == 401, r
    # The next second's tokens work.
    _, after = user_token(sub=sub, iat=banned_at + 1)
    wait_for(lambda: time.time() >= banned_at + 1, timeout=3, what="the next second", interval=0.1)
    assert gw.get("/api/v1/users/1", bearer(after)).status == 200


def test_finding_8_concurrent_refreshes_mint_one_token(gw):
    for _ in range(3):
        _, tok = user_token()
        with concurrent.futures.ThreadPoolExecutor(12) as pool:
            replies = list(pool.map(lambda _: post(gw, "/api/v1/auth/refresh", tok), range(12)))
        minted = [r for r in replies if r.status == 200]
        assert len(minted) == 1, [r.status for r in replies]
        assert all(r.status == 401 for r in replies if r.status != 200), [r.status for r in replies]
        fresh = minted[0].json()["access_token"]
        assert gw.get("/api/v1/users/1", bearer(fresh)).status == 200


def forged_identity(seen):
    """Header names that spell an identity header with `_` for `-` (as WSGI reads them)."""
    return {k: v for k, v in seen.items() if k.replace("_", "-").startswith("x-user-") and "_" in k}


SPOOF = [("X_User_Id", "user-001"), ("X_User_Role", "admin"), ("X-User_Role", "admin"), ("X_User-Id", "user-001")]


def test_finding_3_identity_cannot_be_spoofed_with_underscores(gw, services):
    # Envoy drops headers with underscores (the rendered default).
    seen = gw.get("/api/v1/products/1", SPOOF).json()["headers"]
    assert forged_identity(seen) == {}, seen
    _, tok = user_token(sub="user-002")
    seen = gw.get("/api/v1/users/1", SPOOF + bearer(tok)).json()["headers"]
    assert forged_identity(seen) == {} and seen["x-user-id"] == "user-002", seen
    # Over HTTP/2 too.
    out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", f"http://127.0.0.1:{gw.port}/api/v1/products/1",
                          *sum((["-H", f"{k}: {v}"] for k, v in SPOOF), [])], capture_output=True, text=True, check=True)
    assert forged_identity(json.loads(out.stdout)["headers"]) == {}, out.stdout
    # Where underscores are allowed through Envoy (or the host is not ours), the filter strips them.
    g = Gateway(gateway_file(services.ports, free_port(), headers_with_underscores="allow"))
    try:
        seen = g.get("/api/v1/products/1", SPOOF + [("X_Trace_Note", "kept")]).json()["headers"]
        assert forged_identity(seen) == {}, seen
        assert seen.get("x_trace_note") == "kept", "other underscore headers pass when allowed"
    finally:
        g.stop()


def test_finding_4_a_slow_client_is_cut_off(services):
    g = Gateway(gateway_file(services.ports, free_port(), limits={"request_headers_timeout": 1}))
    try:
        s = socket.create_connection(("127.0.0.1", g.port))
        s.settimeout(5)
        started = time.monotonic()
        closed = False
        head = b"GET /api/v1/products/1 HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 50
        try:
            for byte in head:
                s.sendall(bytes([byte]))
                time.sleep(0.1)
        except OSError:
            closed = True
        if not closed:
            reply = s.recv(4096)
            closed = reply == b"" or reply.startswith(b"HTTP/1.1 408")
        assert closed, "the connection outlived the request headers timeout"
        assert time.monotonic() - started < 4
        s.close()
        assert g.get("/api/v1/products/1").status == 200
    finally:
        g.stop()


def test_finding_9_one_address_cannot_spend_the_routes_budget(services):
    """The shipped `auth` route: 10 per second, 3 per address."""
    up = f"http://127.0.0.1:{services.ports['auth-service']}"
    g = Gateway({"gateway": {"prefix": "/api/v1", "rate_limit": {"trusted_hops": 1}},
                 "routes": [{"name": "auth", "prefix": "/auth", "upstream": up, "methods": ["POST"],
                             "auth_required": False,
                             "rate_limit": {"max_calls": 10, "period": 1, "per_ip": {"max_calls": 3, "period": 1}}}]})
    try:
        attacker = [("X-Forwarded-For", "198.51.100.1")]
        statuses = [g.request("POST", "/api/v1/auth/login", attacker, body={"username": "x", "password": "y"}).status
                    for _ in range(20)]
        assert statuses.count(429) >= 15, statuses
        victim = [("X-Forwarded-For", "198.51.100.2")]
        r = g.request("POST", "/api/v1/auth/login", victim, body={"username": "admin", "password": "123456"})
        assert r.status == 200, r
    finally:
        g.stop()


def test_finding_11_near_miss_logout_paths_log_out(gw):
    for path in ["/api/v1/auth/logout/", "/api/v1/auth/Logout", "/api/v1/auth/logout;x=1"]:
        _, tok = user_token()
        r = post(gw, path, tok)
        assert r.status == 200 and r.json() == {"message": "Logged out successfully"}, (path, r)
        assert gw.get("/api/v1/users/1", bearer(tok)).status == 401, path
    _, tok = user_token()
    r = post(gw, "/api/v1/auth/logout%2F", tok)
    assert r.status == 400, r  # escaped slashes are rejected by Envoy
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200


def test_finding_12_escaped_slashes_are_rejected(gw):
    for path in ["/api/v1/products/..%2fadmin/x", "/api/v1/products/..%2Fadmin", "/api/v1/products/a%5cb"]:
        assert gw.get(path).status == 400, path


def test_finding_13_lenient_pass_throughs_are_closed(gw, services):
    # A `crit` header the gateway does not understand: refused (RFC 7515).
    now = int(time.time())
    crit = forge({"alg": "HS256", "crit": ["x-ext"], "x-ext": 1}, {"sub": "u", "iat": now, "exp": now + 60})
    r = gw.get("/api/v1/users/1", bearer(crit))
    assert r.status == 401 and r.json()["message"] == "Invalid token: unsupported critical header (crit)", r
    # Address and canary headers are the gateway's to set, not the client's.
    sent = [("X-Real-IP", "10.9.9.9"), ("Forwarded", "for=10.9.9.9"), ("X-Forwarded-Host", "evil.example"),
            ("X-Canary", "true")]
    seen = gw.get("/api/v1/products/1", sent).json()["headers"]
    for name in ("x-real-ip", "forwarded", "x-forwarded-host", "x-canary"):
        assert name not in seen, (name, seen)
    # A client's trace id is kept by default (the reference does); `trace.trust_incoming: false`
    # makes every id the gateway's own.
    mine = "0af7651916cd43dd8448eb211c80319c"
    assert gw.get("/api/v1/products/1", [("X-Trace-ID", mine)]).header("x-trace-id") == mine
    f = gateway_file(services.ports, free_port())
    f["trace"] = {"trust_incoming": False}
    g = Gateway(f)
    try:
        r = g.get("/api/v1/products/1", [("X-Trace-ID", mine)])
        assert r.header("x-trace-id") != mine and r.json()["headers"]["x-trace-id"] == r.header("x-trace-id")
    finally:
        g.stop()


def test_finding_5_the_admin_interface_is_its_operators_alone(services):
    g = Gateway(gateway_file(services.ports, free_port()), admin_socket=True)
    try:
        # Only the user Envoy runs as can open the admin socket, or read the rendered bootstrap.
        assert stat.S_IMODE(os.stat(g.admin_socket).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(g.envoy_yaml).st_mode) == 0o600
        out = subprocess.run(["curl", "-s", "--unix-socket", str(g.admin_socket), "http://admin/ready"],
                             capture_output=True, text=True)
        assert out.stdout.strip() == "LIVE"
        # The metrics listener serves the scrape and readiness, nothing else of the admin.
        g.get("/api/v1/products/1")
        r = request(g.admin_port, "GET", "/stats/prometheus")
        assert r.status == 200 and b"envoy_server_live" in r.body, r
        assert request(g.admin_port, "GET", "/ready").status == 200
        for method, path in [("GET", "/config_dump"), ("POST", "/logging?http=debug"), ("GET", "/stats"),
                             ("POST", "/stats/prometheus"), ("GET", "/stats/prometheus/../config_dump")]:
            r = request(g.admin_port, method, path)
            assert r.status == 404 and b"secret" not in r.body, (method, path, r)
        assert SECRET not in request(g.admin_port, "GET", "/stats/prometheus").body.decode()
    finally:
        g.stop()


def test_finding_6_log_records_are_bounded_and_redis_never_evicts(gw, redis):
    assert redis.cli("CONFIG", "GET", "maxmemory-policy").split() == ["maxmemory-policy", "noeviction"]
    assert int(redis.cli("CONFIG", "GET", "maxmemory").split()[1]) > 0
    tid = str(uuid.uuid4())
    huge = [("User-Agent", "u" * 50_000), ("X-Trace-ID", tid)]
    for _ in range(150):  # one trace id, over and over
        gw.get("/api/v1/products/1", huge)  # forwarded: stored
    key = f"gateway:log:trace:{tid}"
    wait_for(lambda: int(redis.cli("LLEN", key)) >= 100, timeout=10, what="the records stored")
    wait_for(lambda: int(redis.cli("LLEN", key)) == 100, timeout=5, what="the trace list trimmed")
    record = json.loads(redis.cli("LINDEX", key, "0"))
    assert len(record["user_agent"]) == 256, len(record["user_agent"])
    assert int(redis.cli("MEMORY", "USAGE", key)) < 150_000, "100 clipped records, not 150 x 50 KB"


def test_finding_7_anonymous_floods_cannot_hide_authenticated_requests(services, webdis, redis):
    f = gateway_file(services.ports, free_port(), webdis.port)
    f["logs"] = {"store": {"buffer": 20, "flush_interval": 2}}
    g = Gateway(f, concurrency=1)
    try:
        for _ in range(200):
            g.get("/api/v1/products/1")
        tid = str(uuid.uuid4())
        assert g.get("/api/v1/users/1", bearer(admin()) + [("X-Trace-ID", tid)]).status == 200
        for _ in range(200):
            g.get("/api/v1/products/1")
        wait_for(lambda: redis.cli("EXISTS", f"gateway:log:trace:{tid}") == "1", timeout=10,
                 what="the admin's record stored despite the flood")
        dropped = g.settled("gateway_log_records_dropped_anonymous_total",
                            "gateway_log_records_dropped_authenticated_total")
        assert dropped["gateway_log_records_dropped_anonymous_total"] > 300, dropped
        assert dropped["gateway_log_records_dropped_authenticated_total"] == 0, dropped
    finally:
        g.stop()


def test_finding_10_webdis_and_redis_demand_credentials(services):
    """The filter authenticates to webdis (HTTP basic, credentials from Envoy's environment) and
    webdis to Redis; nobody else can read or write revocation data through either."""
    redis = Redis(password="redis-pw-" + uuid.uuid4().hex)
    creds = "gateway:" + uuid.uuid4().hex
    webdis = Webdis(redis.port, credentials=creds, redis_password=redis.password)
    f = gateway_file(services.ports, free_port(), webdis.port)
    f["webdis_auth_env"] = "E2E_WEBDIS_AUTH"
    g = Gateway(f, env={"E2E_WEBDIS_AUTH": creds})
    try:
        _, tok = user_token()
        assert gw_get(g, tok) == 200
        assert post(g, "/api/v1/auth/logout", tok).status == 200
        assert gw_get(g, tok) == 401
        assert redis.cli("EXISTS", f"token:blacklist:{tok}") == "1"
        # Without the credentials, webdis refuses reads and writes (re-enabling the token fails).
        for path in [f"/SETEX/token%3Ablacklist%3A{tok}/1/0.json", f"/GET/token%3Ablacklist%3A{tok}.json",
                     "/SET/user%3Arevoked_before%3Aroot/9999999999.json"]:
            r = request(webdis.port, "GET", path)
            assert r.status == 403, (path, r)
            r = request(webdis.port, "GET", path, [("Authorization", "Basic Z2F0ZXdheTp3cm9uZw==")])
            assert r.status == 403, (path, r)
        # And Redis refuses a client without its password.
        out = subprocess.run(["redis-cli", "-p", str(redis.port), "GET", "x"], capture_output=True, text=True)
        assert "NOAUTH" in out.stdout + out.stderr
        assert gw_get(g, tok) == 401
    finally:
        g.stop()
        webdis.stop()
        redis.stop()


def gw_get(g, tok):
    return g.get("/api/v1/users/1", bearer(tok)).status


def test_finding_6_log_records_in_their_own_redis_cannot_block_revocation(services, webdis, redis):
    """With `logs.store.webdis`, records go to a Redis of their own (own credentials from the
    environment): filling it to `maxmemory` makes log writes fail (counted) and leaves
    revocation writes, in the other Redis, working."""
    log_redis = Redis(password="logs-pw-" + uuid.uuid4().hex)
    creds = "logger:" + uuid.uuid4().hex
    log_webdis = Webdis(log_redis.port, credentials=creds, redis_password=log_redis.password)
    f = gateway_file(services.ports, free_port(), webdis.port)
    f["logs"] = {"store": {"flush_interval": 0.2, "webdis": f"http://127.0.0.1:{log_webdis.port}",
                           "auth_env": "E2E_LOG_WEBDIS_AUTH"}}
    g = Gateway(f, env={"E2E_LOG_WEBDIS_AUTH": creds})
    try:
        tid = str(uuid.uuid4())
        assert g.get("/api/v1/users/1", bearer(admin()) + [("X-Trace-ID", tid)]).status == 200
        key = f"gateway:log:trace:{tid}"
        wait_for(lambda: log_redis.cli("EXISTS", key) == "1", timeout=10, what="the record in the logs' Redis")
        assert redis.cli("EXISTS", key) == "0", "not in the revocation Redis"
        # The logs' Redis is full: log writes fail, revocation still works.
        log_redis.cli("CONFIG", "SET", "maxmemory", "1")
        errors = g.counter("gateway_log_store_errors_total")
        for _ in range(20):
            g.get("/api/v1/products/1", [("User-Agent", "u" * 200)])
        wait_for(lambda: g.counter("gateway_log_store_errors_total") > errors, timeout=10,
                 what="failed log writes counted")
        _, tok = user_token()
        assert gw_get(g, tok) == 200
        assert post(g, "/api/v1/auth/logout", tok).status == 200
        assert gw_get(g, tok) == 401
        assert redis.cli("EXISTS", f"token:blacklist:{tok}") == "1"
        # The query endpoint reads the logs' store.
        log_redis.cli("CONFIG", "SET", "maxmemory", "0")
        r = g.get(f"/api/v1/admin/logs?trace_id={tid}", bearer(admin()))
        assert r.status == 200 and r.json()["count"] >= 1, r
    finally:
        g.stop()
        log_webdis.stop()
        log_redis.stop()
