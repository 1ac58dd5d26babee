"""The core cases against an Envoy shaped as Envoy Gateway's translator configures a proxy for
`envoy/envoy-gateway/` (see `eg_shape.py`, each rule cited to Envoy Gateway's code): the filter
disabled on the listener and enabled per route, named and configured as an EnvoyExtensionPolicy
makes it (the .wasm fetched remotely with its sha256, one VM per policy, `fail_open: false`; or
the dynamic module), route clusters named after HTTPRoute rules, the callout clusters from the
EnvoyProxy's bootstrap merge, Envoy Gateway's connection manager settings. Runs on both
runtimes."""
import json

import pytest

import eg_shape
import shape_cases
from harness import RUNTIME, SECRET, WASM, Gateway, bearer, request, token, wait_for


@pytest.fixture(scope="module")
def eg(services, webdis, redis, canary_services):
    f = shape_cases.shaped_gateway_file(services, webdis, canary_services)
    server = eg_shape.ModuleServer(WASM) if RUNTIME == "wasm" else None
    g = Gateway(f, shape=lambda b: eg_shape.shape(b, RUNTIME, server))
    yield g
    g.stop()
    if server:
        server.stop()


def test_the_bootstrap_is_shaped_as_envoy_gateway_builds_it(eg):
    boot = json.loads(eg.envoy_yaml.read_text())
    listener = next(x for x in boot["static_resources"]["listeners"] if x["name"] == eg_shape.LISTENER)
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    first = hcm["http_filters"][0]
    assert first["disabled"] is True
    assert first["name"] == (eg_shape.WASM_FILTER if RUNTIME == "wasm" else eg_shape.NATIVE_FILTER)
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    assert all(r["name"].startswith("httproute/gateway/") and first["name"] in r["typed_per_filter_config"]
               for r in routes)
    clusters = {c["name"] for c in boot["static_resources"]["clusters"]}
    assert "httproute/gateway/order-service/rule/0" in clusters and "webdis" in clusters
    text = json.dumps(boot)
    assert SECRET not in text
    if RUNTIME == "wasm":
        code = first["typed_config"]["config"]["vm_config"]["code"]
        assert code["remote"]["http_uri"]["cluster"] == "wasm_cluster" and code["remote"]["sha256"]
        assert first["typed_config"]["config"]["fail_open"] is False
    # The listener really runs the filter (the remote module was fetched and verified).
    assert eg.get("/api/v1/users/1").status == 401


def test_auth_and_identity(eg):
    shape_cases.auth_and_identity(eg)


def test_a_forged_identity_is_stripped(eg):
    r = eg.get("/api/v1/products/1", [("X-User-Id", "admin"), ("x-user-role", "admin")])
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert "x-user-id" not in seen and "x-user-role" not in seen, seen
    # Envoy Gateway's connection manager refuses underscores in header names outright.
    assert eg.get("/api/v1/products/1", [("X_User_Id", "admin")]).status == 400


def test_revocation_through_webdis_by_the_merged_cluster(eg, redis):
    shape_cases.revocation(eg, redis)


def test_rate_limits(eg):
    shape_cases.rate_limits(eg)


def test_canary_by_the_httproutes_header_rule(eg):
    shape_cases.canary(eg)
    # A client's own canary header is no way in.
    r = eg.get("/api/v1/orders/1", bearer(token(sub="user-900")) + [("x-gateway-canary", "1")])
    assert r.status == 200 and r.json()["version"] == "v1", r


def test_identity_provider_keys_through_the_merged_cluster(eg):
    shape_cases.identity_provider_keys(eg)


def test_metrics_keep_their_names_and_labels(eg):
    """Envoy Gateway's bootstrap plus the EnvoyProxy's merge (stats tags, runtime layer): the
    dashboard's families, labelled, on both runtimes (without the merged runtime key the native
    module's would be `envoy_dynamicmodulescustom_gateway_*`)."""
    assert SECRET not in request(eg.admin_port, "GET", "/config_dump").body.decode()
    eg.get("/api/v1/users/1")
    eg.get("/api/v1/users/1", bearer(token(sub="user-555")))
    want = 'gateway_requests_total{route="user-service",outcome="allowed"}'

    def scraped():
        text = request(eg.admin_port, "GET", "/stats/prometheus").body.decode()
        return any(line.startswith(want) for line in text.splitlines())
    wait_for(scraped, timeout=10, what=want)
