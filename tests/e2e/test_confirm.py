"""`redis_cluster.confirm` on a real Redis Cluster (3 primaries, 3 replicas) through Envoy's own
redis_proxy: a revocation is acknowledged only once a replica holds it. The read-back goes to
the replica (Envoy's `read_policy: REPLICA`), never to the primary that took the write: with the
replica stopped, the primary holds the key and the gateway still refuses to acknowledge it.
(`make fleet-test` adds aimed failovers under load; this is the part that fits `make test`.)"""

import signal
import subprocess
import time
import uuid

import pytest

from harness import (RedisCluster, Services, Gateway, Webdis, bearer, forge, free_port, key_slot,
                     revocation_id, wait_for)

CONFIRM_TIMEOUT = 0.5
NOT_REPLICATED = "Revocation service unavailable: the change is not yet on a replica and may be lost, retry"


def cluster_file(services, webdis_port, redis_port, seeds, replica_port, confirm_webdis_port):
    return {
        "gateway": {"prefix": "/api/v1", "name": "confirm"},
        "jwt": {"algorithms": ["HS256"], "secret_env": "JWT_SECRET"},
        "webdis": f"http://127.0.0.1:{webdis_port}",
        "redis_cluster": {"listen": f"127.0.0.1:{redis_port}", "seeds": [f"127.0.0.1:{p}" for p in seeds],
                          "refresh": 1, "op_timeout": 0.3,
                          "confirm": {"listen": f"127.0.0.1:{replica_port}",
                                      "webdis": f"http://127.0.0.1:{confirm_webdis_port}",
                                      "timeout": CONFIRM_TIMEOUT}},
        "revocation": {"cache_ttl": 1, "timeout": 0.5},
        "routes": [
            {"name": "user-service", "prefix": "/users", "methods": ["GET"],
             "upstream": f"http://127.0.0.1:{services.ports['user-service']}"},
        ],
    }


@pytest.fixture(scope="module")
def stack():
    redis = RedisCluster()
    services = Services(["user-service"])
    wd, rp, rr, cw = free_port(), free_port(), free_port(), free_port()
    gw = Gateway(cluster_file(services, wd, rp, redis.ports[:3], rr, cw), concurrency=1)
    webdis = [Webdis(rp, port=wd), Webdis(rr, port=cw)]
    try:
        # Envoy learns the replicas in its first second: until then a read-back can fail (503).
        redis.wait_healthy()
        streak = []

        def settled():
            ok = gw.request("POST", "/api/v1/auth/logout", bearer(user_token())).status == 200
            streak[:] = streak + [ok] if ok else []
            return len(streak) >= 10
        wait_for(settled, timeout=15, what="ten logouts in a row read back from replicas", interval=0.05)
        yield redis, gw
    finally:
        for w in webdis:
            w.stop()
        gw.stop()
        services.stop()
        redis.stop()


def user_token(sub=None, iat=None, role="user"):
    now = int(time.time())
    return forge({"alg": "HS256", "typ": "JWT"},
                 {"sub": sub or f"u-{uuid.uuid4().hex[:8]}", "role": role, "iat": now if iat is None else iat,
                  "exp": now + 600, "jti": uuid.uuid4().hex})


def aimed_token(slots):
    """A token both of whose revocation keys live on one primary (its `slots`)."""
    while True:
        tok = user_token()
        if key_slot(f"token:blacklist:{tok}") in slots and key_slot(f"token:revoked:{revocation_id(tok)}") in slots:
            return tok


def stopped_replica(redis, test):
    """Runs `test(primary, slots)` while the replica of one primary is stopped (it reads and
    answers nothing; for the next 2 s the primary still takes writes)."""
    redis.wait_healthy()
    primary = redis.primaries()[0]
    replica = redis.replica_of(primary)
    slots = redis.slots_of(primary)
    redis.procs[replica].send_signal(signal.SIGSTOP)
    try:
        return test(primary, slots)
    finally:
        redis.procs[replica].send_signal(signal.SIGCONT)


def test_a_logout_is_acknowledged_once_a_replica_holds_it(stack):
    redis, gw = stack
    redis.wait_healthy()
    tok = user_token()
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 200
    r = gw.request("POST", "/api/v1/auth/logout", bearer(tok))
    assert r.status == 200, r
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 401
    # Held by both nodes of its shard.
    key = f"token:revoked:{revocation_id(tok)}"
    primary = next(p for p in redis.primaries() if key_slot(key) in redis.slots_of(p))
    assert redis.cli(primary, "GET", key) == "1"
    read = subprocess.run(["redis-cli", "-p", str(redis.replica_of(primary))], input=f"READONLY\nGET {key}\n",
                          capture_output=True, text=True, timeout=5)
    assert read.stdout.split() == ["OK", "1"], read


def test_a_revocation_only_the_primary_holds_is_not_acknowledged(stack):
    redis, gw = stack

    def logout(primary, slots):
        tok = aimed_token(slots)
        started = time.monotonic()
        r = gw.request("POST", "/api/v1/auth/logout", bearer(tok))
        return tok, r, time.monotonic() - started, redis.cli(primary, "GET", f"token:revoked:{revocation_id(tok)}")

    tok, r, took, on_primary = stopped_replica(redis, logout)
    assert on_primary == "1", "the primary took the write: without the read-back this was a 200"
    assert r.status == 503 and r.json()["message"] == NOT_REPLICATED, r
    assert took < CONFIRM_TIMEOUT + 1.0, took
    # This gateway applies what the primary took (more revocation is never wrong) ...
    assert gw.get("/api/v1/users/1", bearer(tok)).status == 401
    # ... and once the replica has caught up, the caller's retry is acknowledged.
    redis.wait_healthy()
    r = gw.request("POST", "/api/v1/auth/logout", bearer(tok))
    assert r.status in (200, 401), r  # 401: the lookup already finds it revoked


def test_a_ban_only_the_primary_holds_is_not_acknowledged(stack):
    redis, gw = stack
    admin = user_token(sub="confirm-admin", role="admin")
    assert gw.get("/api/v1/users/1", bearer(admin)).status == 200

    def ban(primary, slots):
        while True:
            sub = f"b-{uuid.uuid4().hex[:8]}"
            if key_slot(f"user:revoked_before:{sub}") in slots:
                break
        r = gw.request("POST", f"/api/v1/admin/users/{sub}/revoke", bearer(admin))
        return sub, r, redis.cli(primary, "GET", f"user:revoked_before:{sub}")

    sub, r, on_primary = stopped_replica(redis, ban)
    assert on_primary, "the primary took the ban"
    assert r.status == 503 and r.json()["message"] == NOT_REPLICATED, r
    redis.wait_healthy()
    r = gw.request("POST", f"/api/v1/admin/users/{sub}/revoke", bearer(admin))
    assert r.status == 200, r
