"""Rate limits end-to-end: token buckets in shared data, Envoy with 2 workers."""

import concurrent.futures
import http.client
import json
import time
from pathlib import Path

import pytest

from harness import Gateway, bearer, free_port, request, token, wait_for


@pytest.fixture(scope="module")
def rl(services):
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    g = Gateway({
        "gateway": {"prefix": "/api/v1",
                    # Enough slots that the addresses of two tests almost never share a bucket.
                    "rate_limit": {"trusted_hops": 1, "ip_slots": 4096, "user_slots": 4096}},
        "jwt": {"secret_env": "JWT_SECRET"},
        "routes": [
            {"name": "burst", "prefix": "/burst", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 20, "period": 60}},
            {"name": "per-user", "prefix": "/per-user", "upstream": up, "auth_required": True,
             "rate_limit": {"max_calls": 100, "period": 60}},
            {"name": "per-ip", "prefix": "/per-ip", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 1000, "period": 60, "per_ip": {"max_calls": 3, "period": 60}}},
            {"name": "recover", "prefix": "/recover", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 2, "period": 1}},
            {"name": "refill", "prefix": "/refill", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 2, "period": 1}},
            {"name": "churn", "prefix": "/churn", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 1000000, "period": 1, "per_ip": {"max_calls": 1, "period": 3600}}},
            {"name": "free", "prefix": "/free", "upstream": up, "auth_required": False},
        ],
    }, concurrency=2)
    yield g
    g.stop()


def test_burst_across_two_workers_admits_exactly_the_bucket(rl):
    def worker(n):
        conn = http.client.HTTPConnection("127.0.0.1", rl.port, timeout=10)
        statuses = []
        for _ in range(n):
            conn.request("GET", "/api/v1/burst/x")
            r = conn.getresponse()
            r.read()
            statuses.append(r.status)
        conn.close()
        return statuses

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        statuses = [s for part in pool.map(worker, [25] * 8) for s in part]
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 429}, set(statuses)
    admitted = statuses.count(200)
    # Capacity 20, refill 20 per 60 s: one more token per 3 s of burst.
    assert admitted == 20 + int(elapsed * 20 / 60), (admitted, elapsed)
    assert statuses.count(429) == 200 - admitted


def test_refused_request_body_and_headers(rl):
    for _ in range(30):
        r = rl.get("/api/v1/burst/y")
        if r.status == 429:
            break
    assert r.status == 429, r
    body = r.json()
    assert body["error"] == "Too Many Requests"
    assert body["message"] == "API rate limit exceeded: 20 calls per 60s"
    assert body["trace_id"] == r.header("x-trace-id")
    assert 1 <= body["retry_after"] <= 3
    assert r.header("retry-after") == str(body["retry_after"])
    assert r.header("x-ratelimit-limit") == "20"
    assert r.header("x-ratelimit-remaining") == "0"
    assert 1 <= int(r.header("x-ratelimit-reset")) <= 60


def test_allowed_responses_carry_ratelimit_headers(rl):
    r = rl.get("/api/v1/recover/a")
    assert r.status == 200, r
    assert r.header("x-ratelimit-limit") == "2"
    assert r.header("x-ratelimit-remaining") in ("0", "1")
    assert r.header("x-ratelimit-reset") == "1"


def test_recovery_after_the_period(rl):
    statuses = [rl.get("/api/v1/refill/b").status for _ in range(4)]
    assert statuses == [200, 200, 429, 429]
    refused_at = time.monotonic()
    # 2 calls a second: one token is back within half a second, not much before.
    wait_for(lambda: rl.get("/api/v1/refill/b").status == 200, timeout=3, what="a refilled token", interval=0.1)
    assert time.monotonic() - refused_at >= 0.3


def test_per_user_limit_is_a_tenth_of_the_route(rl):
    a, b = token(sub="rl-user-a"), token(sub="rl-user-b")
    statuses = [rl.get("/api/v1/per-user/1", bearer(a)).status for _ in range(13)]
    assert statuses.count(200) == 10 and statuses[10:] == [429, 429, 429], statuses
    r = rl.get("/api/v1/per-user/1", bearer(a))
    assert r.json()["message"] == "User rate limit exceeded: 10 calls per 60s"
    assert rl.get("/api/v1/per-user/1", bearer(b)).status == 200


def test_per_ip_limit_from_trusted_forwarded_for(rl):
    ip1 = [("X-Forwarded-For", "203.0.113.7")]
    statuses = [rl.get("/api/v1/per-ip/1", ip1).status for _ in range(5)]
    assert statuses == [200, 200, 200, 429, 429], statuses
    assert rl.get("/api/v1/per-ip/1", ip1).json()["message"] == "IP rate limit exceeded: 3 calls per 60s"
    assert rl.get("/api/v1/per-ip/1", [("X-Forwarded-For", "203.0.113.8")]).status == 200


def test_route_without_rate_limit_is_unaffected(rl):
    for _ in range(60):
        r = rl.get("/api/v1/free/x")
        assert r.status == 200
        assert r.header("x-ratelimit-limit") is None


def test_metrics_count_allowed_and_limited_per_kind(rl):
    names = ("scope=.=ip;.;decision=.=allowed;.;gateway_ratelimit_total", "scope=.=ip;.;decision=.=limited;.;gateway_ratelimit_total",
             "scope=.=route;.;decision=.=allowed;.;gateway_ratelimit_total", "scope=.=route;.;decision=.=limited;.;gateway_ratelimit_total",
             "scope=.=user;.;decision=.=allowed;.;gateway_ratelimit_total", "scope=.=user;.;decision=.=limited;.;gateway_ratelimit_total")
    before = rl.settled(*names)
    ip = [("X-Forwarded-For", "198.51.100.77")]
    for _ in range(5):  # 3 allowed by the address's bucket, then 2 refused
        rl.get("/api/v1/per-ip/2", ip)
    after = rl.settled(*names)
    moved = {n: after[n] - before[n] for n in names}
    assert moved == {"scope=.=ip;.;decision=.=allowed;.;gateway_ratelimit_total": 3, "scope=.=ip;.;decision=.=limited;.;gateway_ratelimit_total": 2,
                     "scope=.=route;.;decision=.=allowed;.;gateway_ratelimit_total": 3, "scope=.=route;.;decision=.=limited;.;gateway_ratelimit_total": 0,
                     "scope=.=user;.;decision=.=allowed;.;gateway_ratelimit_total": 0, "scope=.=user;.;decision=.=limited;.;gateway_ratelimit_total": 0}, moved


def memory(g):
    """Envoy's heap in use (shared data lives there) and the process's resident set (which also
    holds the wasm VMs' linear memory), in bytes."""
    allocated = int(json.loads(request(g.admin_port, "GET", "/memory").body)["allocated"])
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{g.proc.pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return allocated, rss


def test_100k_distinct_addresses_stay_within_the_slot_bound(services):
    """64 IP slots; 100 000 addresses, each allowed once per hour by the shared per-IP bucket.
    Memory cannot grow with the number of addresses (the slots are created at start); addresses
    of one slot share its bucket. The churn route's own bucket (1 call) refuses the flood locally, after
    the per-IP bucket has been updated, so the flood never reaches an upstream. Measured: the
    heap and the resident set after 100 000 addresses against after the first 20 000."""
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    g = Gateway({
        "gateway": {"prefix": "/api/v1", "rate_limit": {
            "trusted_hops": 1, "ip_slots": 64, "per_ip": {"max_calls": 1, "period": 3600}}},
        "routes": [
            {"name": "churn", "prefix": "/churn", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 1, "period": 3600}},
            {"name": "probe", "prefix": "/probe", "upstream": up, "auth_required": False,
             "rate_limit": {"max_calls": 1000000, "period": 1}},
        ],
    })
    try:
        first = [("X-Forwarded-For", "10.0.0.1")]
        assert g.get("/api/v1/probe/x", first).status == 200
        r = g.get("/api/v1/probe/x", first)
        assert r.status == 429 and r.json()["message"].startswith("IP rate limit exceeded"), r

        def worker(base, count=5_000):
            conn = http.client.HTTPConnection("127.0.0.1", g.port, timeout=10)
            statuses = set()
            for n in range(base, base + count):
                ip = f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"
                conn.request("GET", "/api/v1/churn/x", headers={"X-Forwarded-For": ip})
                r = conn.getresponse()
                r.read()
                statuses.add(r.status)
            conn.close()
            return statuses

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            statuses = set().union(*pool.map(worker, [1_000_000 + i * 5_000 for i in range(4)]))
            warm = memory(g)
            statuses |= set().union(*pool.map(worker, [2_000_000 + i * 20_000 for i in range(4)],
                                               [20_000] * 4))
        grown = [after - before for after, before in zip(memory(g), warm)]
        print(f"memory growth over 80 000 more addresses: heap {grown[0]} B, rss {grown[1]} B")
        # One entry per address would be megabytes (80 000 keys of ~100 bytes with their map
        # nodes); the slots hold it to noise.
        assert grown[0] < 1_000_000, grown
        assert grown[1] < 4_000_000, grown
        assert statuses <= {200, 429}, statuses
        # The first address shares its slot with about 1,500 others, which spent the slot's
        # bucket: addresses of one slot share its budget (stricter, never looser).
        r = g.get("/api/v1/probe/x", first)
        assert r.status == 429 and r.json()["message"].startswith("IP rate limit exceeded"), r
        assert g.alive()
    finally:
        g.stop()


def webdis_calls(g):
    """Calls `g` has completed to webdis (Envoy's cluster stats)."""
    return int(g.stats("cluster.webdis.upstream_rq_completed").get("cluster.webdis.upstream_rq_completed", "0"))


def synced_after(g):
    """Waits until `g` has completed two more webdis calls (syncs) than now: at least one
    INCRBY was sent and answered after this moment, so its drain has been applied."""
    start = webdis_calls(g)
    wait_for(lambda: webdis_calls(g) >= start + 2, timeout=5, what="two more syncs")


def test_cluster_wide_limit_is_shared_by_two_instances(services, redis, webdis):
    """Two Envoys (separate shared data) share a 20-per-minute route through Redis. Requests
    admitted by one instance are drained from the other's bucket within a sync interval."""
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    route = f"shared-{int(time.time() * 1000) % 100000}"

    def instance():
        return Gateway({
            "gateway": {"prefix": "/api/v1", "rate_limit": {"sync_interval": 0.2}},
            "webdis": f"http://127.0.0.1:{webdis.port}",
            "routes": [
                {"name": route, "prefix": "/shared", "upstream": up, "auth_required": False,
                 "rate_limit": {"max_calls": 20, "period": 60, "cluster_wide": True}},
                {"name": "local", "prefix": "/local", "upstream": up, "auth_required": False,
                 "rate_limit": {"max_calls": 20, "period": 60}},
            ],
        })

    a, b = instance(), instance()
    try:
        consumed = f"gateway:ratelimit:consumed:{route}"
        # Both have synced once: each has its baseline of the shared counter.
        wait_for(lambda: webdis_calls(a) >= 1 and webdis_calls(b) >= 1, timeout=5, what="the first syncs")
        syncs_before = int(redis.cli("GET", consumed) or 0)
        assert [a.get("/api/v1/shared/x").status for _ in range(12)].count(200) == 12
        # A's 12 reach Redis, then B's next sync drains them: B has 8 left, not 20.
        wait_for(lambda: int(redis.cli("GET", consumed) or 0) >= syncs_before + 12, timeout=5, what="A's sync")
        synced_after(b)  # B drains what A consumed
        statuses = [b.get("/api/v1/shared/x").status for _ in range(12)]
        assert statuses.count(200) == 8, statuses
        # B's 8 reach A the same way: the shared bucket is empty everywhere (refill: 1 per 3 s).
        wait_for(lambda: int(redis.cli("GET", consumed) or 0) >= syncs_before + 20, timeout=5, what="B's sync")
        synced_after(a)
        assert [a.get("/api/v1/shared/x").status for _ in range(3)].count(200) <= 1
        # A route that is not cluster-wide keeps a bucket per instance.
        assert [a.get("/api/v1/local/x").status for _ in range(20)].count(200) == 20
        assert [b.get("/api/v1/local/x").status for _ in range(20)].count(200) == 20
        assert a.counter("gateway_ratelimit_sync_errors_total") == 0
    finally:
        a.stop()
        b.stop()


@pytest.mark.parametrize("style", ["ietf", "both"])
def test_ietf_rate_limit_headers(services, style):
    """`gateway.rate_limit.headers`: RateLimit-Policy lists every bucket the request was charged
    to, RateLimit reports the binding one (draft-ietf-httpapi-ratelimit-headers), on allowed
    requests and on the 429; `ietf` alone drops the X-RateLimit-* headers."""
    up = f"http://127.0.0.1:{services.ports['product-service']}"
    g = Gateway({
        "gateway": {"prefix": "/api/v1", "rate_limit": {"headers": style}},
        "jwt": {"secret_env": "JWT_SECRET"},
        "routes": [{"name": "orders", "prefix": "/orders", "upstream": up, "auth_required": True,
                    "rate_limit": {"max_calls": 100, "period": 1, "per_user": {"max_calls": 2, "period": 60}}}],
    })
    try:
        tok = token(sub="user-ietf")
        r = g.get("/api/v1/orders/1", bearer(tok))
        assert r.status == 200, r
        h = dict(r.headers)
        assert h["ratelimit-policy"] == '"ip";q=1000;w=1, "user";q=2;w=60, "route";q=100;w=1', h
        assert h["ratelimit"].startswith('"user";r=1;t='), h
        assert ("x-ratelimit-limit" in h) == (style == "both"), h
        g.get("/api/v1/orders/1", bearer(tok))
        r = g.get("/api/v1/orders/1", bearer(tok))
        assert r.status == 429, r
        h = dict(r.headers)
        assert h["ratelimit"].startswith('"user";r=0;t='), h
        assert "retry-after" in h and ("x-ratelimit-remaining" in h) == (style == "both"), h
    finally:
        g.stop()
