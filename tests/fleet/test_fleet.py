"""`make fleet-test`: three gateways (Envoy `--concurrency 2` each, the built filter) on one Redis
Cluster (3 primaries, 3 replicas) reached through each gateway's own `redis_proxy` listener
(`redis_cluster:` in the gateway file) by its own webdis. Loopback only, bounded in time.

What it measures and asserts (figures printed, and written to build/fleet-report.json):
- a logout on any gateway is refused on every gateway within the stated window;
- a cluster-wide route limit holds across the three within the README's bound;
- primaries killed with SIGKILL under steady load, again and again: acknowledged revocations
  lost, requests failed and for how long, time until full service with nobody's help;
- failovers aimed at the window Redis leaves open: a primary's replication stream dropped in one
  direction (iptables, in the test's own network namespace: the replica copies nothing but its
  acknowledgements still arrive, so the primary, which measures a replica's lag by the time since
  its last acknowledgement, keeps accepting writes), logouts and bans whose keys live on that
  primary sent through all three gateways, the primary killed, the replica promoted. The three gateways read every revocation back from a replica before
  answering (`redis_cluster.confirm`); a fourth, the control, does not, and must lose some of its
  acknowledged revocations, or the test did not reach the window;
- one gateway killed: the other two keep the revocations and the limit.
"""

import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (NODE_TIMEOUT_MS, ROOT, Gateway, RedisCluster, Services, Webdis, bearer, forge,  # noqa: E402
                     free_port, key_slot, revocation_id, wait_for)

FAILOVERS = int(os.environ.get("FLEET_FAILOVERS", "10"))
AIMED_FAILOVERS = int(os.environ.get("FLEET_AIMED_FAILOVERS", "20"))
CONFIRM_TIMEOUT = 1.0
REPORT = ROOT / "build" / "fleet-report.json"
RESULTS = {}


def gateway_file(services, webdis_port, redis_port, seeds, route_limit, confirm=None):
    def up(name):
        return f"http://127.0.0.1:{services.ports[name]}"
    return {
        "gateway": {"prefix": "/api/v1", "name": "fleet", "rate_limit": {"sync_interval": 0.5}},
        "jwt": {"algorithms": ["HS256"], "secret_env": "JWT_SECRET", "clock_skew": 60},
        "webdis": f"http://127.0.0.1:{webdis_port}",
        "redis_cluster": {"listen": f"127.0.0.1:{redis_port}", "seeds": [f"127.0.0.1:{p}" for p in seeds],
                          "refresh": 1, "op_timeout": 0.5,
                          **({"confirm": {"listen": f"127.0.0.1:{confirm[0]}",
                                          "webdis": f"http://127.0.0.1:{confirm[1]}",
                                          "timeout": CONFIRM_TIMEOUT}} if confirm else {})},
        "revocation": {"cache_ttl": 1, "timeout": 0.5, "failure_mode": "stale", "stale_window": 30},
        "routes": [
            {"name": "user-service", "prefix": "/users", "upstream": up("user-service"),
             "methods": ["GET"], "auth_required": True},
            {"name": "product-service", "prefix": "/products", "upstream": up("product-service"),
             "methods": ["GET"], "auth_required": False,
             "rate_limit": {"max_calls": route_limit, "period": 1, "cluster_wide": True,
                            "per_ip": {"max_calls": 100000, "period": 1}}},
            {"name": "auth-service", "prefix": "/auth", "upstream": up("auth-service"),
             "methods": ["POST"], "auth_required": False},
        ],
    }


class Fleet:
    """Three gateways that read revocations back from a replica (`redis_cluster.confirm`: a
    second redis_proxy listener and a second webdis each), and a control gateway that does not."""

    def __init__(self, route_limit=60):
        self.redis = RedisCluster()
        self.services = Services(["user-service", "product-service"])
        self.gateways, self.webdis = [], []
        for i in range(4):
            wd_port, rp_port = free_port(), free_port()
            confirm = (free_port(), free_port()) if i < 3 else None
            g = Gateway(gateway_file(self.services, wd_port, rp_port, self.redis.ports[:3], route_limit, confirm),
                        concurrency=2)
            self.webdis.append(Webdis(rp_port, port=wd_port))
            if confirm:
                self.gateways.append(g)
                self.webdis.append(Webdis(confirm[0], port=confirm[1]))
            else:
                self.control = g

    def stop(self):
        for w in self.webdis:
            w.stop()
        for g in self.gateways + [self.control]:
            g.stop()
        self.services.stop()
        self.redis.stop()


def user_token(ttl=3600, sub=None, iat=None, role="user"):
    sub = sub or f"u-{uuid.uuid4().hex[:10]}"
    now = int(time.time())
    iat = now if iat is None else iat
    return forge({"alg": "HS256", "typ": "JWT"},
                 {"sub": sub, "name": "n", "role": role, "iat": iat, "exp": now + ttl, "jti": uuid.uuid4().hex})


def aimed_token(slots):
    """A fresh token both of whose revocation keys live in `slots` (one primary's)."""
    while True:
        tok = user_token()
        if key_slot(f"token:blacklist:{tok}") in slots and key_slot(f"token:revoked:{revocation_id(tok)}") in slots:
            return tok


def aimed_user(slots):
    """A user whose ban key lives in `slots`."""
    while True:
        sub = f"b-{uuid.uuid4().hex[:10]}"
        if key_slot(f"user:revoked_before:{sub}") in slots:
            return sub


def status(g, method, path, tok=None, timeout=5):
    try:
        return g.request(method, path, bearer(tok) if tok else [], timeout=timeout).status
    except OSError:
        return None


def settled(fleet):
    """Envoy learns the replicas from its first slot-map refreshes; until then a read-back can
    fail (the revocation is answered 503, and nothing is acknowledged). Settled: five logouts
    in a row acknowledged through every gateway."""
    for g in fleet.gateways + [fleet.control]:
        streak = []

        def five():
            ok = status(g, "POST", "/api/v1/auth/logout", user_token()) == 200
            streak[:] = streak + [ok] if ok else []
            return len(streak) >= 5
        wait_for(five, timeout=30, what="logouts acknowledged through every gateway", interval=0.1)


@pytest.fixture(scope="module")
def fleet():
    f = Fleet()
    try:
        f.redis.wait_healthy()
        settled(f)
        yield f
    finally:
        f.stop()
        REPORT.parent.mkdir(exist_ok=True)
        REPORT.write_text(json.dumps(RESULTS, indent=1))
        print("\nfleet report:", json.dumps(RESULTS, indent=1))


def refused_everywhere(gateways, tok):
    return all(status(g, "GET", "/api/v1/users/1", tok) == 401 for g in gateways)


def test_a_logout_on_any_gateway_is_refused_on_every_gateway(fleet):
    """The window: the revocation cache (1 s) plus one lookup."""
    windows = []
    for i, g in enumerate(fleet.gateways):
        tok = user_token()
        for other in fleet.gateways:  # cached as clean everywhere first
            assert status(other, "GET", "/api/v1/users/1", tok) == 200
        assert status(g, "POST", "/api/v1/auth/logout", tok) == 200
        started = time.monotonic()
        wait_for(lambda: refused_everywhere(fleet.gateways, tok), timeout=5, what=f"logout on gateway {i} everywhere",
                 interval=0.05)
        windows.append(time.monotonic() - started)
    RESULTS["logout_refused_everywhere_within_s"] = round(max(windows), 2)
    assert max(windows) <= 1.0 + 0.5 + 0.3, windows


def test_a_cluster_wide_route_limit_holds_across_the_three(fleet):
    """README bound: on top of the limit (the bucket's capacity plus its rate over the time), what
    the other gateways can admit between two syncs: (N-1)·(capacity + rate·(interval + 0.2 s))."""
    limit, seconds = 60, 4
    admitted = [0, 0, 0]
    sent = [0, 0, 0]
    stop = time.monotonic() + seconds

    def drive(i):
        while time.monotonic() < stop:
            s = status(fleet.gateways[i], "GET", "/api/v1/products/1", timeout=2)
            sent[i] += 1
            if s == 200:
                admitted[i] += 1
    threads = [threading.Thread(target=drive, args=(i,)) for i in range(3) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    total = sum(admitted)
    bound = limit + limit * seconds + 2 * (limit + limit * (0.5 + 0.2))
    RESULTS["cluster_wide_limit"] = {"limit_per_s": limit, "seconds": seconds, "sent": sum(sent),
                                     "admitted": total, "bound": round(bound)}
    assert sum(sent) > 3 * limit * seconds, "the load must exceed the limit"
    assert total <= bound, (total, bound, admitted)


def test_primary_failovers_under_load_lose_no_acknowledged_revocation(fleet):
    results = []  # (time, kind, status)
    acked = []  # tokens whose logout was answered 200
    users = [user_token() for _ in range(200)]
    lock = threading.Lock()
    done = threading.Event()

    def load(seed):
        rnd = random.Random(seed)
        while not done.is_set():
            g = rnd.choice(fleet.gateways)
            s = status(g, "GET", "/api/v1/users/1", rnd.choice(users), timeout=3)
            with lock:
                results.append((time.monotonic(), "get", s))
            time.sleep(0.01)

    def logouts(seed):
        rnd = random.Random(seed)
        while not done.is_set():
            tok = user_token()
            g = rnd.choice(fleet.gateways)
            status(g, "GET", "/api/v1/users/1", tok, timeout=3)
            s = status(g, "POST", "/api/v1/auth/logout", tok, timeout=3)
            with lock:
                results.append((time.monotonic(), "logout", s))
                if s == 200:
                    acked.append(tok)
            time.sleep(0.05)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    threads += [threading.Thread(target=logouts, args=(100 + i,)) for i in range(2)]
    before = fleet.redis.commands()
    started = time.monotonic()
    for t in threads:
        t.start()
    # Store traffic per request with the caches on, before any failover.
    time.sleep(5)
    with lock:
        served = len(results)
    after = fleet.redis.commands()
    traffic = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    traffic = {k: v for k, v in traffic.items() if v > 0 and k not in ("info", "cluster", "ping", "command")}
    RESULTS["store_traffic"] = {"seconds": round(time.monotonic() - started, 1), "gateway_requests": served,
                                "users": len(users), "commands": traffic,
                                "commands_per_request": round(sum(traffic.values()) / max(served, 1), 3)}
    failovers = []
    try:
        for n in range(FAILOVERS):
            primary = fleet.redis.primaries()[n % 3]
            killed_at = time.monotonic()
            fleet.redis.kill(primary)
            # Full service: the first moment from which a second of requests all succeeded.
            time.sleep(NODE_TIMEOUT_MS / 1000)
            wait_for(lambda: fleet.redis.primaries() and len(fleet.redis.primaries()) == 3, timeout=30,
                     what="a replica promoted", interval=0.1)
            promoted_at = time.monotonic()
            fleet.redis.start(primary)  # back as a replica of the promoted one
            fleet.redis.wait_healthy()
            time.sleep(1.5)
            failovers.append({"killed_at": killed_at, "promoted_after_s": round(promoted_at - killed_at, 2)})
    finally:
        done.set()
        for t in threads:
            t.join()

    def ok(s, kind):
        return s == 200 or (kind == "logout" and s == 401)
    ends = [f["killed_at"] for f in failovers[1:]] + [time.monotonic()]
    for f, end in zip(failovers, ends):
        window = [(t, k, s) for t, k, s in results if f["killed_at"] <= t < end]
        failed = [(t, k, s) for t, k, s in window if not ok(s, k)]
        f["failed_requests"] = len(failed)
        f["failed_gets"] = sum(1 for _, k, _ in failed if k == "get")
        f["failed_logouts"] = sum(1 for _, k, _ in failed if k == "logout")
        f["failed_for_s"] = round(max(t for t, _, _ in failed) - f["killed_at"], 2) if failed else 0.0
        f["failed_statuses"] = sorted({str(s) for _, _, s in failed})
    for f in failovers:
        del f["killed_at"]
    # Every acknowledged logout must hold on every gateway once the caches have expired.
    time.sleep(1.5)
    lost = [tok for tok in acked if not refused_everywhere(fleet.gateways, tok)]
    RESULTS["failovers"] = {"count": len(failovers), "requests": len(results),
                            "acknowledged_logouts": len(acked), "acknowledged_revocations_lost": len(lost),
                            "per_failover": failovers,
                            "failed_requests_total": sum(f["failed_requests"] for f in failovers),
                            "failed_gets_total": sum(f["failed_gets"] for f in failovers),
                            "longest_failure_s": max((f["failed_for_s"] for f in failovers), default=0.0)}
    assert len(failovers) == FAILOVERS
    assert len(acked) > 20, "logouts were acknowledged throughout"
    assert not lost, f"{len(lost)} acknowledged revocations lost"


def timed_logouts(g, n):
    """Milliseconds per acknowledged logout, one at a time."""
    out = []
    for _ in range(n):
        tok = user_token()
        started = time.monotonic()
        s = status(g, "POST", "/api/v1/auth/logout", tok)
        if s == 200:
            out.append((time.monotonic() - started) * 1000)
    return sorted(out)


def percentile(xs, p):
    return round(xs[min(len(xs) - 1, int(len(xs) * p))], 2) if xs else None


def test_aimed_failovers_lose_no_acknowledged_revocation(fleet):
    """Each round: logouts and bans whose keys live on one primary go through the three gateways
    (and the control) without pause; the primary's replica is stopped (it copies nothing, and
    the primary, which measures a replica's lag by its last acknowledgement, keeps accepting
    writes for `min-replicas-max-lag`); 1.5 s later the primary is killed, the replica resumed
    and promoted. Whatever a gateway acknowledged must survive on every gateway."""
    assert os.environ.get("FLEET_NETNS") == "1", \
        "run through `make fleet-test`: the cut needs iptables in a network namespace of the test's own"
    fleet.redis.wait_healthy()
    # What the read-back costs per logout, before any failover: the same logouts through a
    # confirming gateway and through the control.
    confirmed_ms = timed_logouts(fleet.gateways[0], 200)
    control_ms = timed_logouts(fleet.control, 200)
    latency = {"confirmed_p50_ms": percentile(confirmed_ms, 0.5), "confirmed_p95_ms": percentile(confirmed_ms, 0.95),
               "primary_only_p50_ms": percentile(control_ms, 0.5), "primary_only_p95_ms": percentile(control_ms, 0.95)}
    latency["cost_p50_ms"] = round(latency["confirmed_p50_ms"] - latency["primary_only_p50_ms"], 2)
    print("\nlogout latency, read back from a replica vs the primary's word only:", latency)

    admin = user_token(sub="fleet-admin", role="admin")
    acked, control_acked = [], []  # (kind, gateway index or -1, token or (sub, old token))
    refused = {"confirmed": 0, "control": 0}
    rounds = []
    lock = threading.Lock()
    for n in range(AIMED_FAILOVERS):
        fleet.redis.wait_healthy()
        primary = fleet.redis.primaries()[n % 3]
        replica = fleet.redis.replica_of(primary)
        slots = fleet.redis.slots_of(primary)
        done = threading.Event()
        before = (len(acked), len(control_acked), dict(refused))

        def revoke(i, g, seed):
            rnd = random.Random(seed)
            control = g is fleet.control
            while not done.is_set():
                if rnd.random() < 0.25:
                    sub = aimed_user(slots)
                    old = user_token(sub=sub, iat=int(time.time()) - 5)
                    s = status(g, "POST", f"/api/v1/admin/users/{sub}/revoke", admin, timeout=5)
                    item = ("ban", i, old)
                else:
                    tok = aimed_token(slots)
                    s = status(g, "POST", "/api/v1/auth/logout", tok, timeout=5)
                    item = ("logout", i, tok)
                with lock:
                    if s == 200:
                        (control_acked if control else acked).append(item)
                    else:
                        refused["control" if control else "confirmed"] += 1
                time.sleep(0.02)

        senders = [threading.Thread(target=revoke, args=(i, g, 1000 * n + i))
                   for i, g in enumerate(fleet.gateways + [fleet.control])]
        for t in senders:
            t.start()
        try:
            time.sleep(0.5)
            cut_at = time.monotonic()
            rule = fleet.redis.cut(primary, replica)
            try:
                time.sleep(1.5)
                fleet.redis.kill(primary)
            finally:
                fleet.redis.heal(rule)
            wait_for(lambda: replica in fleet.redis.primaries(), timeout=30, what="the cut-off replica promoted",
                     interval=0.1)
            promoted_after = time.monotonic() - cut_at
        finally:
            done.set()
            for t in senders:
                t.join()
        fleet.redis.start(primary)  # back as a replica of the promoted one
        rounds.append({"primary": primary, "replica": replica, "promoted_after_s": round(promoted_after, 2),
                       "acknowledged": len(acked) - before[0], "control_acknowledged": len(control_acked) - before[1],
                       "refused": refused["confirmed"] - before[2]["confirmed"]})
    fleet.redis.wait_healthy()
    time.sleep(1.5)  # every gateway's cache has expired: they ask the store

    def lost(items):
        return [item for item in items if not refused_everywhere(fleet.gateways + [fleet.control], item[2])]
    lost_confirmed, lost_control = lost(acked), lost(control_acked)
    RESULTS["aimed_failovers"] = {
        "count": len(rounds), "acknowledged_revocations": len(acked),
        "acknowledged_revocations_lost": len(lost_confirmed),
        "lost_by_kind": {k: sum(1 for item in lost_confirmed if item[0] == k) for k in ("logout", "ban")},
        "refused_503": refused["confirmed"],
        "control_without_read_back": {"acknowledged": len(control_acked),
                                      "acknowledged_revocations_lost": len(lost_control)},
        "logout_latency_ms": latency, "per_failover": rounds}
    print("\naimed failovers:", json.dumps(RESULTS["aimed_failovers"], indent=1))
    assert len(rounds) == AIMED_FAILOVERS
    assert len(acked) > 2 * AIMED_FAILOVERS, "revocations were acknowledged around every failover"
    assert lost_control, "the control lost nothing: the rounds did not reach the window they aim at"
    assert not lost_confirmed, f"{len(lost_confirmed)} acknowledged revocations lost: {lost_confirmed[:5]}"


def test_one_gateway_killed_the_others_keep_revocations_and_limits(fleet):
    victim = fleet.gateways[2]
    victim.proc.send_signal(signal.SIGKILL)
    victim.proc.wait(timeout=10)
    alive = fleet.gateways[:2]
    tok = user_token()
    assert status(alive[1], "GET", "/api/v1/users/1", tok) == 200
    assert status(alive[0], "POST", "/api/v1/auth/logout", tok) == 200
    wait_for(lambda: refused_everywhere(alive, tok), timeout=3, what="the logout on the other gateway")
    # The limit still holds across the two.
    admitted = 0
    stop = time.monotonic() + 2
    while time.monotonic() < stop:
        for g in alive:
            admitted += status(g, "GET", "/api/v1/products/1", timeout=2) == 200
    RESULTS["one_gateway_killed"] = {"admitted_in_2_s": admitted, "limit_per_s": 60}
    assert admitted <= 60 + 60 * 2 + (60 + 60 * 0.7), admitted
