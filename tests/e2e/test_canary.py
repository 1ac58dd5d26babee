"""Canary routing end-to-end: the filter writes an internal header, Envoy routes on it."""

import hashlib
import time

import pytest

from harness import Gateway, Services, bearer, token


def reference_bucket(user_id: str) -> int:
    """The reference CanaryRouter's formula, computed here independently of the filter."""
    return int(hashlib.md5(user_id.encode()).hexdigest(), 16) % 100


@pytest.fixture(scope="module")
def canary_services():
    s = Services(["order-service", "order-service-v2", "catalog", "catalog-v2", "plain"], auth=None,
                 versions={"order-service-v2": "v2", "catalog-v2": "v2"})
    yield s
    s.stop()


@pytest.fixture(scope="module")
def cg(canary_services):
    p = canary_services.ports
    g = Gateway({
        "gateway": {"prefix": "/api/v1"},
        "jwt": {"secret_env": "JWT_SECRET"},
        "routes": [
            {"name": "order-service", "prefix": "/orders", "upstream": f"http://127.0.0.1:{p['order-service']}",
             "methods": ["GET", "POST"], "auth_required": True,
             "canary": {"upstream": f"http://127.0.0.1:{p['order-service-v2']}", "percent": 10,
                        "users": ["user-001"], "header": "X-Canary"}},
            {"name": "catalog", "prefix": "/catalog", "upstream": f"http://127.0.0.1:{p['catalog']}",
             "auth_required": False,
             "canary": {"upstream": f"http://127.0.0.1:{p['catalog-v2']}", "percent": 50, "sticky": "cookie:sid"}},
            {"name": "plain", "prefix": "/plain", "upstream": f"http://127.0.0.1:{p['plain']}", "auth_required": False},
        ],
    })
    yield g
    g.stop()


def version(r):
    assert r.status == 200, r
    return r.json()["version"]


def test_listed_user_goes_to_canary(cg):
    r = cg.get("/api/v1/orders/1", bearer(token(sub="user-001")))
    assert version(r) == "v2"
    seen = r.json()["headers"]
    assert seen["x-canary"] == "true"
    assert "x-gateway-canary" not in seen


def test_override_header_sends_anyone_to_canary(cg):
    tok = token(sub="user-002")  # bucket 42: stable by percentage
    assert version(cg.get("/api/v1/orders/1", bearer(tok))) == "v1"
    assert version(cg.get("/api/v1/orders/1", bearer(tok) + [("X-Canary", "1")])) == "v2"


def test_percentage_reproduces_the_reference_formula(cg):
    users = [f"user-{i:04d}" for i in range(200)]
    expected = {u: ("v2" if reference_bucket(u) < 10 else "v1") for u in users}
    assert 5 <= list(expected.values()).count("v2") <= 40, "the table exercises both sides"
    for u in users:
        r = cg.get("/api/v1/orders/1", bearer(token(sub=u)))
        assert version(r) == expected[u], (u, reference_bucket(u))
        assert r.json()["headers"]["x-canary"] == ("true" if expected[u] == "v2" else "false")


def test_same_user_always_lands_on_the_same_side(cg):
    for u in ["user-0007", "user-0042"]:
        sides = {version(cg.get("/api/v1/orders/1", bearer(token(sub=u)))) for _ in range(5)}
        assert len(sides) == 1


def test_clients_cannot_set_the_internal_routing_header(cg):
    tok = token(sub="user-002")
    r = cg.get("/api/v1/orders/1", bearer(tok) + [("x-gateway-canary", "1")])
    assert version(r) == "v1"
    assert "x-gateway-canary" not in r.json()["headers"]
    r = cg.get("/api/v1/plain/1", [("x-gateway-canary", "1")])
    assert "x-gateway-canary" not in r.json()["headers"]


def test_public_route_without_user_is_stable_unless_sticky_cookie(cg):
    assert {version(cg.get("/api/v1/catalog/1")) for _ in range(5)} == {"v1"}
    for sid in ["alice", "bob", "user-001", "user-002", "s-1", "s-2", "s-3", "s-4"]:
        want = "v2" if reference_bucket(sid) < 50 else "v1"
        assert version(cg.get("/api/v1/catalog/1", [("Cookie", f"theme=dark; sid={sid}")])) == want, sid


def test_route_without_canary_gets_no_client_canary_header(cg):
    r = cg.get("/api/v1/plain/1", [("X-Canary", "whatever")])
    assert "x-canary" not in r.json()["headers"], "the gateway's header: clients cannot set it"
    assert r.json()["service"] == "plain"


def test_canary_metrics_count_both_sides(cg):
    names = ("route=.=order-service;.;target=.=canary;.;gateway_canary_total", "route=.=order-service;.;target=.=stable;.;gateway_canary_total")
    before = cg.settled(*names)
    for _ in range(3):
        cg.get("/api/v1/orders/1", bearer(token(sub="user-001")))
        cg.get("/api/v1/orders/1", bearer(token(sub="user-002")))
    after = cg.settled(*names)
    assert {n: after[n] - before[n] for n in names} == dict.fromkeys(names, 3)
