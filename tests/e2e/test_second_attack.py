"""Regression tests for the second outside attack (issue: revocation that cannot be undone):
real Envoy, real webdis and Redis, two gateways on one store where the finding needs them."""
import base64
import hashlib
import json
import os
import signal
import threading
import time
import uuid

import pytest

from conftest import gateway_file
from harness import (Gateway, Redis, StaticServer, Webdis, bearer, closed_by_peer, connect_from, forge, free_port,
                     get_from, wait_for)

REVOKED = "Token has been revoked"
P256_N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def b64d(s):
    return base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))


def b64e(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def es256_twin(tok):
    """The same signing input with the signature (r, n - s): a second valid ES256 token."""
    head, payload, sig = tok.split(".")
    raw = b64d(sig)
    r, s = raw[:32], int.from_bytes(raw[32:], "big")
    return f"{head}.{payload}.{b64e(r + (P256_N - s).to_bytes(32, 'big'))}"


def user_token(sub=None, iat_offset=0, ttl=600, role="user"):
    sub = sub or f"u-{uuid.uuid4().hex[:8]}"
    now = int(time.time()) + iat_offset
    return sub, forge({"alg": "HS256", "typ": "JWT"},
                      {"sub": sub, "name": "n", "role": role, "iat": now, "exp": now + ttl, "jti": uuid.uuid4().hex})


def post(gw, path, tok):
    return gw.request("POST", path, bearer(tok))


@pytest.fixture(scope="module")
def store():
    r = Redis()
    w = Webdis(r.port)
    yield r, w
    w.stop()
    r.stop()


@pytest.fixture(scope="module")
def pair(services, store):
    """Two gateways rendered from one file on one Redis, the demo identity provider trusted."""
    _, w = store
    f = gateway_file(services.ports, free_port(), w.port)
    auth = services.ports["auth-service"]
    f["jwt"]["issuers"] = [
        {"name": "demo-idp", "issuer": f"http://127.0.0.1:{auth}", "algorithms": ["RS256", "ES256", "EdDSA"],
         "remote_jwks": {"uri": f"http://127.0.0.1:{auth}/.well-known/jwks.json", "refresh_interval": 5}},
    ]
    a, b = Gateway(f), Gateway(f)
    yield a, b
    a.stop()
    b.stop()


def test_a_logged_out_es256_token_does_not_revive_as_its_twin(pair, store):
    redis, _ = store
    a, b = pair
    r = a.request("POST", "/api/v1/auth/login", body={"username": "alice", "password": "alice123", "alg": "ES256"})
    tok = r.json()["access_token"]
    twin = es256_twin(tok)
    assert twin != tok
    assert a.get("/api/v1/users/1", bearer(twin)).status == 200, "the twin is a valid token"
    assert post(a, "/api/v1/auth/logout", tok).status == 200
    for gw in (a, b):
        for t in (tok, twin):
            r = gw.get("/api/v1/users/1", bearer(t))
            assert r.status == 401 and r.json()["message"] == REVOKED, (gw.port, t == twin, r)
    # Logging the twin out again is refused as revoked; a refresh of either mints nothing.
    assert post(b, "/api/v1/auth/logout", twin).status == 401
    # The keys: the reference's (by token string) and the one by signing input.
    signing_input = tok.rsplit(".", 1)[0].encode()
    rid = b64e(hashlib.sha256(signing_input).digest())
    assert redis.cli("GET", f"token:revoked:{rid}") == "1"
    assert redis.cli("GET", f"token:blacklist:{tok}") == "1"


def test_a_ban_is_not_outrun_by_a_refresh_on_another_gateway(pair, store):
    a, b = pair
    admin = user_token(sub="admin-1", role="admin")[1]
    sub, old = user_token(iat_offset=-10)
    assert a.get("/api/v1/users/1", bearer(old)).status == 200  # A's cache: clean
    assert post(b, f"/api/v1/admin/users/{sub}/revoke", admin).status == 200
    # At once, within A's cache time: the refresh asks the store, not A's cache.
    r = post(a, "/api/v1/auth/refresh", old)
    assert r.status == 401 and r.json()["message"] == REVOKED, r


def test_a_token_refreshed_from_a_banned_lineage_stays_banned(pair, store):
    redis, _ = store
    a, b = pair
    sub, old = user_token(iat_offset=-100)
    r = post(a, "/api/v1/auth/refresh", old)
    assert r.status == 200, r
    fresh = r.json()["access_token"]
    claims = json.loads(b64d(fresh.split(".")[1]))
    assert claims["auth_time"] == json.loads(b64d(old.split(".")[1]))["iat"]
    assert a.get("/api/v1/users/1", bearer(fresh)).status == 200
    # A ban from before the refresh but after the login (another gateway's, straight into Redis):
    # the new token's iat is later than the ban, its lineage is not.
    redis.cli("SETEX", f"user:revoked_before:{sub}", 600, claims["iat"] - 50)

    def refused():
        return all(gw.get("/api/v1/users/1", bearer(fresh)).status == 401 for gw in (a, b))
    wait_for(refused, timeout=5, what="the ban to reach the refreshed token")


def test_webdis_replies_for_other_calls_are_never_taken_as_answers(services):
    """Freeze webdis (SIGSTOP) while lookups time out, resume it (SIGCONT), then many
    concurrent lookups: no revoked token may pass. webdis before 0.1.20 can write a reply to a
    new client that reused a gone client's socket; the nonce catches it."""
    redis = Redis()
    w = Webdis(redis.port)
    f = gateway_file(services.ports, free_port(), w.port, cache_ttl=0, timeout=0.2)
    gw = Gateway(f)
    try:
        revoked = [user_token()[1] for _ in range(40)]
        clean = [user_token()[1] for _ in range(40)]
        for t in revoked:
            redis.cli("SETEX", f"token:blacklist:{t}", 600, 1)
        passed, statuses = [], {}
        lock = threading.Lock()

        def hit(tok, bad):
            try:
                s = gw.get("/api/v1/users/1", bearer(tok)).status
            except OSError:
                s = 0
            with lock:
                statuses[s] = statuses.get(s, 0) + 1
                if bad and s == 200:
                    passed.append(tok)

        def burst(n):
            ts = [threading.Thread(target=hit, args=((revoked if i % 2 else clean)[i % 40], i % 2 == 1))
                  for i in range(n)]
            for t in ts:
                t.start()
            for t in ts:
                t.join()
        for _ in range(4):
            os.kill(w.proc.pid, signal.SIGSTOP)
            burst(60)  # every lookup times out: 503
            os.kill(w.proc.pid, signal.SIGCONT)
            burst(120)
        assert passed == [], f"revoked tokens let through: {len(passed)} ({statuses})"
        assert statuses.get(200, 0) > 0, statuses
    finally:
        try:
            os.kill(w.proc.pid, signal.SIGCONT)
        except OSError:
            pass
        gw.stop()
        w.stop()
        redis.stop()


def test_a_huge_key_set_does_not_crash_the_vm(services):
    """A key server answering 70 MiB (over Envoy's async-client buffer): the fetch fails, the
    VM lives, and unrelated HS256 traffic is served throughout."""
    server = StaticServer(b'{"keys":[' + b" " * (70 << 20) + b"]}")
    f = gateway_file(services.ports, free_port())
    f["jwt"]["issuers"] = [{"name": "huge", "issuer": "https://huge.example", "algorithms": ["RS256"],
                            "remote_jwks": {"uri": f"http://127.0.0.1:{server.port}/jwks",
                                            "refresh_interval": 1, "min_refetch_interval": 0.5, "timeout": 3}}]
    gw = Gateway(f)
    try:
        _, tok = user_token()
        deadline = time.monotonic() + 5
        statuses = set()
        while time.monotonic() < deadline:
            statuses.add(gw.get("/api/v1/users/1", bearer(tok)).status)
            time.sleep(0.1)
        assert statuses == {200}, statuses
        log = gw.log_path.read_text()
        assert "panicked" not in log and "unexpected status" not in log, log[-2000:]
        assert gw.counter("issuer=.=huge;.;gateway_jwks_fetch_errors_total") >= 1 or "jwks fetch for issuer huge failed" in log
    finally:
        gw.stop()
        server.stop()


def test_unrouted_and_refused_anonymous_requests_cost_the_store_nothing(gw, redis):
    """Finding 3: unrouted 404s with long paths and queries, and requests with revoked or
    invalid tokens, are printed and counted, never stored."""
    tid = str(uuid.uuid4())
    before = gw.settled("gateway_log_records_skipped_total")["gateway_log_records_skipped_total"]
    for i in range(50):
        path = "/api/v1/nope/" + "x" * 1000 + "?" + "&".join(f"q{j}={'v' * 100}" for j in range(20))
        assert gw.get(path, [("X-Trace-ID", tid)]).status == 404
        assert gw.get("/api/v1/users/1", [("X-Trace-ID", tid), ("Authorization", "Bearer garbage")]).status == 401
    # A forwarded request with the same trace id is stored: the store works.
    assert gw.get("/api/v1/products/1", [("X-Trace-ID", tid)]).status == 200
    key = f"gateway:log:trace:{tid}"
    wait_for(lambda: redis.cli("LLEN", key) == "1", timeout=10, what="the one forwarded record")
    after = gw.settled("gateway_log_records_skipped_total")["gateway_log_records_skipped_total"]
    assert after - before == 100, (before, after)
    time.sleep(1.5)
    assert redis.cli("LLEN", key) == "1", "nothing else stored"


def test_near_miss_endpoint_paths_do_not_look_like_success(gw):
    """Finding 13: paths next to the logout endpoint go to the auth service, which must not
    answer 200 to anything (the client would believe it logged out)."""
    for path in ["/api/v1/auth/logout.", "/api/v1/auth/logout%2e", "/api/v1/auth/logout%20",
                 "/api/v1/auth/logout%3b", "/api/v1/auth/logout.json"]:
        _, tok = user_token()
        r = post(gw, path, tok)
        if r.status == 200:
            # Only the gateway's own endpoint may answer 200, and then the token is revoked.
            assert r.json() == {"message": "Logged out successfully"}, (path, r)
            assert gw.get("/api/v1/users/1", bearer(tok)).status == 401, path
        else:
            assert r.status in (400, 404), (path, r)
            assert gw.get("/api/v1/users/1", bearer(tok)).status == 200, path


def test_reload_returns_once_the_new_version_is_in_force(services):
    """Finding 14: after `make reload` (render, then scripts/await_config.py) returns, the very
    next request runs the new version: the filter's configuration (ECDS) and the routes (RDS)."""
    f = gateway_file(services.ports, free_port())
    g = Gateway(f, xds=True)
    try:
        assert g.await_config().returncode == 0
        anonymous_ok = False
        for i in range(6):
            anonymous_ok = not anonymous_ok
            nxt = json.loads(json.dumps(f))
            for r in nxt["routes"]:
                if r["name"] == "user-service":
                    r["auth_required"] = not anonymous_ok
            nxt["routes"].append({"name": f"extra-{i}", "prefix": f"/extra{i}", "methods": ["GET"],
                                  "upstream": f"http://127.0.0.1:{services.ports['search-service']}",
                                  "auth_required": False})
            r = g.reload(nxt, wait=True)
            assert r.returncode == 0, r.stderr
            assert g.get("/api/v1/users/1").status == (200 if anonymous_ok else 401), i
            assert g.get(f"/api/v1/extra{i}/1").status == 200, i
        # An update Envoy refuses is reported, not waited for until the timeout.
        broken = g.xds_dir / ".rds.json.new"
        broken.write_text(json.dumps({"version_info": "broken", "resources": [
            {"@type": "type.googleapis.com/envoy.config.route.v3.RouteConfiguration", "name": "gateway",
             "virtual_hosts": [{"name": "x", "domains": []}]}]}))  # domains: at least one
        started = time.monotonic()
        w = g.await_config(["mv", str(broken), str(g.xds_dir / "rds.json")], timeout=15)
        assert w.returncode == 1 and time.monotonic() - started < 10, (w.stdout, w.stderr)
    finally:
        g.stop()


def test_any_subject_is_bannable_through_a_percent_encoded_path(pair, services, store):
    """Finding 9: `auth0|…`, non-ASCII, `a;b` (which must not ban `a`) and, where Envoy keeps
    escaped slashes, `org/7` are banned by their percent-encoded path; a malformed one is 400."""
    from urllib.parse import quote
    a, b = pair
    admin = user_token(sub="admin-9", role="admin")[1]
    tag = uuid.uuid4().hex[:6]
    bystander, bystander_tok = user_token(sub=f"a{tag}", iat_offset=-10)
    for sub in [f"auth0|{tag}", f"用户-{tag}", f"a{tag};b", f"x {tag}"]:
        _, tok = user_token(sub=sub, iat_offset=-10)
        assert b.get("/api/v1/users/1", bearer(tok)).status == 200, sub
        # As a client library sends it (`;` and `|` escaped), and `;` as is.
        for path_id in {quote(sub, safe=""), quote(sub, safe=";")}:
            r = post(a, f"/api/v1/admin/users/{path_id}/revoke", admin)
            assert r.status == 200, (sub, path_id, r)
        r = a.get("/api/v1/users/1", bearer(tok))
        assert r.status == 401 and r.json()["message"] == REVOKED, (sub, r)
        # B saw the token clean a moment ago: the ban reaches it within its cache time (1 s).
        wait_for(lambda: b.get("/api/v1/users/1", bearer(tok)).status == 401, timeout=5, what=sub)
    assert a.get("/api/v1/users/1", bearer(bystander_tok)).status == 200, "a;b banned a"
    for bad in ["%ZZ", "a%00b", "%E2%80%AEx", "%20x"]:
        r = post(a, f"/api/v1/admin/users/{bad}/revoke", admin)
        # Envoy's path normalisation refuses some itself (400, before the filter).
        assert r.status == 400, (bad, r)
        assert not r.body or r.json()["message"] == "Invalid user id", (bad, r)
    # A subject with a slash: Envoy rejects %2F by default (escaped_slashes: reject); with `keep`
    # it reaches the filter, which decodes it.
    _, w = store
    f = gateway_file(services.ports, free_port(), w.port)
    f["gateway"]["escaped_slashes"] = "keep"
    g = Gateway(f)
    try:
        sub, tok = user_token(sub=f"org/{tag}", iat_offset=-10)
        assert g.get("/api/v1/users/1", bearer(tok)).status == 200
        assert post(g, f"/api/v1/admin/users/{quote(sub, safe='')}/revoke", admin).status == 200
        assert g.get("/api/v1/users/1", bearer(tok)).status == 401
    finally:
        g.stop()
    assert post(a, f"/api/v1/admin/users/org%2F{tag}/revoke", admin).status == 400


def test_addresses_sharing_a_slot_share_its_budget(services):
    """Finding 11: with one per-IP slot every address lands in the same one; alternating two
    addresses must not reset the bucket (it gave each a full budget). Which addresses share a
    slot otherwise depends on a secret seed in shared data (native tests)."""
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    g = Gateway({"gateway": {"prefix": "/api/v1", "rate_limit": {
                    "trusted_hops": 1, "ip_slots": 1, "per_ip": {"max_calls": 5, "period": 60}}},
                 "routes": [{"name": "p", "prefix": "/p", "upstream": up, "methods": ["GET"], "auth_required": False,
                             "rate_limit": {"max_calls": 1000, "period": 60}}]})
    try:
        statuses = [g.get("/api/v1/p/1", [("X-Forwarded-For", f"127.1.0.{40 if i % 2 else 97}")]).status
                    for i in range(20)]
        assert statuses.count(200) == 5 and statuses.count(429) == 15, statuses
    finally:
        g.stop()


def test_one_clients_idle_or_slow_connections_cannot_deny_another(services):
    """Finding 7: one address opening idle sockets holds at most its per-client share of
    Envoy's connections (the module as a network filter, counts in shared data across workers);
    slow request bodies are buffered before the router, so they hold no circuit-breaker slot,
    and are cut off by the request timeout with a JSON 408."""
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    g = Gateway({"gateway": {"prefix": "/api/v1",
                             "limits": {"max_connections": 20, "max_connections_per_client": 5,
                                        "request_timeout": 8},
                             "circuit_breaker": {"max_connections": 4, "max_pending_requests": 4,
                                                 "max_requests": 4, "max_retries": 1}},
                 "routes": [{"name": "p", "prefix": "/p", "upstream": up, "methods": ["GET", "POST"],
                             "auth_required": False}]})
    idle, slow = [], []
    try:
        # 20 idle sockets from one address: 5 stay, the others are closed at once.
        idle = [connect_from(g.port, "127.0.0.2") for _ in range(20)]
        time.sleep(0.5)
        closed = [s for s in idle if closed_by_peer(s, 0.2)]
        assert len(closed) == 15, len(closed)
        # The network filter of the runtime in use (the .wasm's, or the native module's).
        name = g.stat_name("gateway_connections_refused_total")
        refused = g.stats("gateway_connections_refused_total").get(name)
        assert int(refused or 0) == 15
        # Another address is served, again and again, while they are held.
        assert [get_from(g.port, "127.0.0.3", "/api/v1/p/1") for _ in range(10)] == [200] * 10
        # Closing them gives the address its share back (the count is released).
        for s in idle:
            s.close()
        idle = []
        time.sleep(0.5)
        idle = [connect_from(g.port, "127.0.0.2") for _ in range(5)]
        time.sleep(0.3)
        assert not any(closed_by_peer(s, 0.2) for s in idle)
        for s in idle:
            s.close()
        idle = []

        # Slow bodies from other addresses: more than the circuit breaker's 4 slots.
        for i in range(8):
            s = connect_from(g.port, f"127.0.1.{i + 1}")
            s.sendall(b"POST /api/v1/p/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 100000\r\n\r\nslow")
            slow.append(s)
        time.sleep(0.5)
        assert [get_from(g.port, "127.0.0.3", "/api/v1/p/1") for _ in range(5)] == [200] * 5
        # The request timeout (8 s: without the buffering, the requests above would wait on the
        # slow bodies' slots for longer than the client's 5 s) cuts the slow bodies off: a JSON 408.
        s = slow[0]
        s.settimeout(12)
        data = s.recv(65536)
        assert data.startswith(b"HTTP/1.1 408"), data[:200]
        assert b'"Request Timeout"' in data, data
    finally:
        for s in idle + slow:
            s.close()
        g.stop()
