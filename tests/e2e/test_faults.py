"""Faults in the parts around the filter, under load: webdis frozen and killed, Redis killed behind
a live webdis, an upstream that resets connections. Envoy keeps serving; every answer arrives
within the configured bounds with the documented status and a JSON body; nothing hangs; service
returns by itself when the part comes back."""

import concurrent.futures
import os
import signal
import socket
import struct
import threading
import time
import uuid

import pytest

from conftest import gateway_file
from harness import Gateway, Redis, Webdis, bearer, forge, free_port, wait_for

STORE_DOWN = "Revocation service unavailable"


def fresh_token():
    now = int(time.time())
    return forge({"alg": "HS256"}, {"sub": f"u-{uuid.uuid4().hex[:8]}", "role": "user", "iat": now,
                                    "exp": now + 600})


def timed_get(g, path, headers=()):
    started = time.monotonic()
    r = g.get(path, headers)
    return r, time.monotonic() - started


def under_load(g, seconds, check):
    """8 clients send requests with new tokens (every one needs a lookup) for `seconds`; each
    answer goes through `check(response, elapsed)`. Returns the number of requests."""
    deadline = time.monotonic() + seconds

    def client(_):
        n = 0
        while time.monotonic() < deadline:
            r, elapsed = timed_get(g, "/api/v1/users/1", bearer(fresh_token()))
            check(r, elapsed)
            n += 1
        return n
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        return sum(pool.map(client, range(8)))


def answered_within_bounds(r, elapsed):
    # The revocation callout times out after 0.2 s: a 503 must come well within a second.
    assert elapsed < 1.5, (r, elapsed)
    assert r.status in (200, 503), r
    body = r.json()
    if r.status == 503:
        assert body["message"] == STORE_DOWN and body["trace_id"], body


@pytest.fixture
def stack(services):
    """A gateway with its own Redis and webdis, which the test may stop, freeze or restart."""
    redis = Redis()
    webdis = Webdis(redis.port)
    g = Gateway(gateway_file(services.ports, free_port(), webdis.port))
    yield g, redis, webdis
    g.stop()
    if webdis.proc.poll() is None:
        os.kill(webdis.proc.pid, signal.SIGCONT)
    webdis.stop()
    redis.stop()


def test_webdis_frozen_then_thawed_under_load(stack):
    g, _, webdis = stack
    assert g.get("/api/v1/users/1", bearer(fresh_token())).status == 200
    os.kill(webdis.proc.pid, signal.SIGSTOP)
    try:
        seen = []
        n = under_load(g, 3, lambda r, e: (answered_within_bounds(r, e), seen.append(r.status)))
        assert n > 20 and set(seen) == {503}, (n, set(seen))
    finally:
        os.kill(webdis.proc.pid, signal.SIGCONT)
    wait_for(lambda: g.get("/api/v1/users/1", bearer(fresh_token())).status == 200, timeout=5,
             what="service back after webdis thawed")
    # Public routes never depended on it.
    assert g.get("/api/v1/products/1").status == 200
    assert g.alive()


def test_webdis_killed_under_load_then_restarted(stack):
    g, _, webdis = stack
    statuses = []

    def kill_soon():
        time.sleep(1)
        webdis.stop()
    threading.Thread(target=kill_soon).start()
    under_load(g, 3, lambda r, e: (answered_within_bounds(r, e), statuses.append(r.status)))
    assert 200 in statuses and 503 in statuses, set(statuses)
    webdis.start()
    wait_for(lambda: g.get("/api/v1/users/1", bearer(fresh_token())).status == 200, timeout=5,
             what="service back after webdis restarted")


def test_redis_killed_behind_a_live_webdis(stack):
    g, redis, _ = stack
    assert g.get("/api/v1/users/1", bearer(fresh_token())).status == 200
    redis.stop()
    seen = []
    under_load(g, 2, lambda r, e: (answered_within_bounds(r, e), seen.append(r.status)))
    assert set(seen) == {503}, set(seen)
    redis.start()
    wait_for(lambda: g.get("/api/v1/users/1", bearer(fresh_token())).status == 200, timeout=10,
             what="service back after redis restarted")


class ResettingServer:
    """Accepts connections and resets them at once (RST, no reply)."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.running = True
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    def stop(self):
        self.running = False
        self.sock.close()


def test_an_upstream_that_resets_connections(services):
    resetting = ResettingServer()
    f = gateway_file(services.ports, resetting.port)  # the `down` route points at it
    g = Gateway(f)
    try:
        for _ in range(20):
            r, elapsed = timed_get(g, "/api/v1/down/x")
            assert r.status == 503 and elapsed < 3, (r, elapsed)
            assert r.json()["message"] == "Cannot connect to upstream service"
        assert g.get("/api/v1/products/1").status == 200
        assert g.alive()
    finally:
        g.stop()
        resetting.stop()
