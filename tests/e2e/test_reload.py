"""Reload without restart: Envoy reads the gateway's listener, routes, clusters and the filter's
configuration from filesystem-xDS files (`gateway-render --xds`); a new gateway file is rendered
and swapped in while a load of authenticated requests runs. Nothing fails, no connection is
reset, the new policy is in force within seconds, an invalid file changes nothing, and the
buckets (shared data) survive."""
import copy
import hashlib
import http.client
import threading
import time

import pytest

from conftest import gateway_file
from harness import Gateway, Services, bearer, free_port, token, wait_for


@pytest.fixture(scope="module")
def v2(services):
    s = Services(["search-v2"], auth=None, versions={"search-v2": "v2"})
    yield s
    s.stop()


def first_version(services, v2):
    f = gateway_file(services.ports, free_port())
    for r in f["routes"]:
        if r["name"] == "order-service":
            r["canary"] = {"upstream": f"http://127.0.0.1:{v2.ports['search-v2']}", "percent": 0}
        if r["name"] == "comment-service":
            r["rate_limit"] = {"max_calls": 1000, "per_user": {"max_calls": 2, "period": 60}}
        if r["name"] == "product-service":
            r["rate_limit"] = {"max_calls": 1000, "per_user": {"max_calls": 1000, "period": 60},
                               "per_ip": {"max_calls": 1000, "period": 1}}
    return f


class Load:
    """Authenticated requests on keep-alive connections, counting anything but a 200 and any
    connection the server closed."""

    def __init__(self, port, workers=4):
        self.port, self.stop, self.ok, self.failed, self.reconnects = port, threading.Event(), 0, [], 0
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(workers)]
        for t in self.threads:
            t.start()

    def run(self, i):
        tok = token(sub=f"load-{i}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        while not self.stop.is_set():
            try:
                conn.request("GET", "/api/v1/users/1", headers={"Authorization": f"Bearer {tok}"})
                r = conn.getresponse()
                r.read()
                if r.status == 200:
                    self.ok += 1
                else:
                    self.failed.append(r.status)
                if r.getheader("connection", "").lower() == "close":
                    self.reconnects += 1
                    conn.close()
            except Exception as e:  # a reset or a closed connection
                self.failed.append(repr(e))
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.close()

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=15)


def digest(directory):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.glob("*.json"))}


def test_a_new_version_applies_live_and_an_invalid_one_changes_nothing(services, v2):
    f = first_version(services, v2)
    g = Gateway(f, xds=True)
    try:
        user = bearer(token(sub="user-reload"))
        assert g.get("/api/v1/extra/1").status == 404
        orders = bearer(token(sub="user-orders"))
        assert g.get("/api/v1/orders/1", orders).json()["version"] == "v1"
        # The user spends the comment route's budget (2 per minute).
        assert [g.get("/api/v1/comments/1", user).status for _ in range(3)] == [200, 200, 429]
        pid = g.proc.pid
        load = Load(g.port)
        time.sleep(1)

        # Version 2: a new route, a canary at 100%, a per-address limit of 1 a minute on products.
        nxt = copy.deepcopy(f)
        for r in nxt["routes"]:
            if r["name"] == "order-service":
                r["canary"]["percent"] = 100
            if r["name"] == "product-service":
                r["rate_limit"]["per_ip"] = {"max_calls": 1, "period": 60}
        nxt["routes"].append({"name": "extra-service", "prefix": "/extra", "methods": ["GET"],
                              "upstream": f"http://127.0.0.1:{services.ports['search-service']}",
                              "auth_required": False})
        swapped = time.monotonic()
        r = g.reload(nxt)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: g.get("/api/v1/extra/1").status == 200, timeout=10, what="the new route")
        wait_for(lambda: g.get("/api/v1/orders/1", orders).json()["version"] == "v2", timeout=10,
                 what="the filter's new configuration (canary at 100%)")
        took = time.monotonic() - swapped
        wait_for(lambda: g.get("/api/v1/products/1").status == 429, timeout=10, what="the new per-address limit")

        # An invalid version: refused with the field named, nothing swapped, version 2 in force.
        before = digest(g.xds_dir)
        bad = copy.deepcopy(nxt)
        bad["routes"][0]["methods"] = ["GTE"]
        r = g.reload(bad)
        assert r.returncode == 1 and "routes[0].methods[0]" in r.stderr, r.stderr
        assert digest(g.xds_dir) == before
        time.sleep(1)
        assert g.get("/api/v1/extra/1").status == 200

        load.finish()
        assert load.ok > 100, load.ok
        assert load.failed == [] and load.reconnects == 0, (load.failed[:5], load.reconnects)
        assert g.proc.pid == pid and g.alive(), "the same Envoy process throughout"
        # Buckets live in shared data: the user's spent comment budget survived both versions.
        assert g.get("/api/v1/comments/1", user).status == 429
        assert took < 10
    finally:
        g.stop()
