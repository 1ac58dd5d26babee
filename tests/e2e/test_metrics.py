"""Metrics as Prometheus users expect them: one family per measure with labels (route, outcome,
reason, scope, decision, target, issuer), extracted by the rendered `stats_tags`; the plain
`/stats` names unchanged; and every family the shipped Grafana dashboard queries exists."""
import json
import re

import pytest

from conftest import gateway_file
from harness import ROOT, Gateway, Services, bearer, free_port, request, token


@pytest.fixture(scope="module")
def mg(services):
    canary = Services(["order-service-v2"], auth=None, versions={"order-service-v2": "v2"})
    f = gateway_file(services.ports, free_port())
    for r in f["routes"]:
        if r["name"] == "order-service":
            r["canary"] = {"upstream": f"http://127.0.0.1:{canary.ports['order-service-v2']}",
                           "users": ["user-001"], "header": "X-Canary"}
            r["rate_limit"] = {"max_calls": 1000, "per_user": {"max_calls": 1, "period": 60}}
    g = Gateway(f)
    yield g
    g.stop()
    canary.stop()


def scrape(g):
    return request(g.admin_port, "GET", "/stats/prometheus").body.decode()


def samples(text):
    out = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name, _, value = line.rpartition(" ")
        out[name] = float(value)
    return out


def test_one_family_per_measure_with_labels(mg):
    mg.get("/api/v1/users/1", bearer(token()))
    mg.get("/api/v1/users/1")
    mg.get("/api/v1/nope")
    mg.get("/api/v1/orders/1", bearer(token(sub="user-001")))
    mg.get("/api/v1/orders/1", bearer(token(sub="user-001")))  # the user's bucket: 429
    mg.get("/api/v1/orders/1", bearer(token(sub="user-900")))
    mg.settled("route=.=user-service;.;outcome=.=allowed;.;gateway_requests_total")
    s = samples(scrape(mg))
    expected = {
        'gateway_requests_total{route="user-service",outcome="allowed"}': 1,
        'gateway_requests_total{route="user-service",outcome="unauthorized"}': 1,
        'gateway_requests_total{route="none",outcome="not_found"}': 1,
        'gateway_requests_total{route="order-service",outcome="rate_limited"}': 1,
        'gateway_auth_failures_total{reason="missing_authorization"}': 1,
        'gateway_canary_total{route="order-service",target="canary"}': 1,
        'gateway_canary_total{route="order-service",target="stable"}': 1,
        'gateway_ratelimit_total{scope="user",decision="limited"}': 1,
    }
    for series, at_least in expected.items():
        assert s.get(series, 0) >= at_least, f"{series} missing from the scrape"
    assert not [n for n in s if re.match(r"gateway_requests_(?!total\b)", n)], "no per-route family names left"
    # /stats keeps the tagged name: Istio's tag syntax for the .wasm; the native module's
    # labelled family, as Envoy names it.
    plain = request(mg.admin_port, "GET", "/stats?filter=gateway_requests").body.decode()
    if mg.runtime == "native":
        assert "dynamicmodulescustom.gateway_requests_total.route.user-service.outcome.allowed: 1" in plain
    else:
        assert "wasmcustom.route=.=user-service;.;outcome=.=allowed;.;gateway_requests_total: 1" in plain


def test_the_dashboard_queries_families_that_exist(mg):
    dash = json.loads((ROOT / "envoy" / "grafana" / "gateway-dashboard.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    assert len(dash["panels"]) >= 8
    text = scrape(mg)
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    families |= {f + suffix for f in families for suffix in ("_bucket", "_sum", "_count")}
    # Key-set counters are defined when an issuer first fetches; this gateway has none.
    lazily = {"gateway_jwks_fetch_errors_total", "gateway_jwks_unknown_kid_fetches_total"}
    for expr in exprs:
        for name in re.findall(r"\b(gateway_[a-z_]+)\b", expr):
            assert name in families or name in lazily, f"{name} (in {expr!r}) is not in the scrape"
