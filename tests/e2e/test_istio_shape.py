"""The core cases against an Envoy shaped as istiod configures a gateway with our WasmPlugin:
Istio cluster names (`outbound|port||fqdn`) for every service including webdis and the identity
provider's key set, the plugin named `<namespace>.<name>` with `root_id` from `pluginName` (as shipped: unset, so empty; and set), its
configuration a JSON string, FAIL_RELOAD (the WasmPlugins' failStrategy), the secret only in the environment."""
import json
import uuid

import pytest

import shape_cases
from harness import SECRET, Gateway, bearer, request, token, wait_for

NS = "gateway"


@pytest.fixture(scope="module", params=[(None, False), ("gateway-policy", False), (None, True)],
                ids=["root_id-as-shipped", "root_id-set", "waypoint"])
def ig(request, services, webdis, redis, canary_services):
    root_id, waypoint = request.param
    f = shape_cases.shaped_gateway_file(services, webdis, canary_services)
    g = Gateway(f, istio=NS, istio_root_id=root_id, waypoint=waypoint)
    g.root_id, g.waypoint = root_id, waypoint
    yield g
    g.stop()


def test_the_bootstrap_is_shaped_as_istiod_sends_it(ig):
    boot = json.loads(ig.envoy_yaml.read_text())
    assert any(c.startswith("outbound|") and c.endswith("||webdis.gateway.svc.cluster.local")
               for c in ig.istio_clusters)
    routed = "inbound-vip|" if ig.waypoint else "outbound|"
    assert all(c.startswith(("outbound|", routed)) for c in ig.istio_clusters if c != "envoy-admin")
    assert any(c.startswith(routed) and "user-service" in c for c in ig.istio_clusters)
    text = json.dumps(boot)
    expected_root = "" if ig.root_id is None else ig.root_id
    plugin = "gateway.gateway-policy-waypoint" if ig.waypoint else "gateway.gateway-policy"
    assert f'"name": "{plugin}"' in text and f'"root_id": "{expected_root}"' in text
    if ig.waypoint:
        assert boot["node"]["id"].startswith("waypoint~") and '"use_remote_address": false' in text
    assert "FAIL_RELOAD" in text and SECRET not in text
    dump = request(ig.admin_port, "GET", "/config_dump").body.decode()
    assert SECRET not in dump


def test_auth_and_identity(ig):
    shape_cases.auth_and_identity(ig)


def test_revocation_through_webdis_by_its_istio_name(ig, redis):
    shape_cases.revocation(ig, redis)


def test_rate_limits(ig):
    shape_cases.rate_limits(ig)


def test_canary(ig):
    shape_cases.canary(ig)


def test_identity_provider_keys_through_an_istio_cluster(ig):
    shape_cases.identity_provider_keys(ig)


def test_logs_stored(ig, redis):
    tid = str(uuid.uuid4())
    assert ig.get("/api/v1/users/1", bearer(token()) + [("X-Trace-ID", tid)]).status == 200
    wait_for(lambda: redis.cli("EXISTS", f"gateway:log:trace:{tid}") == "1", timeout=10, what="record stored")
    record = json.loads(redis.cli("LINDEX", f"gateway:log:trace:{tid}", "0"))
    assert record["status"] == 200 and record["user_id"] == "user-001"


def test_metrics_keep_their_labels_under_istios_stats_configuration(ig):
    """istiod's bootstrap (use_all_default_tags false, its own stats_tags and stats matcher)
    plus the shipped `sidecar.istio.io/extraStatTags`: every family the dashboard queries is in
    the scrape, labelled, and no flattened per-route name is left."""
    import re
    from pathlib import Path
    boot = json.loads(ig.envoy_yaml.read_text())
    assert boot["stats_config"]["use_all_default_tags"] is False
    ig.get("/api/v1/users/1", bearer(token()))
    ig.get("/api/v1/users/1")
    ig.get("/api/v1/orders/1", bearer(token(sub="user-001")))
    ig.settled("route=.=user-service;.;outcome=.=allowed;.;gateway_requests_total")
    text = request(ig.admin_port, "GET", "/stats/prometheus").body.decode()
    assert 'gateway_requests_total{route="user-service",outcome="allowed"}' in text, text[:2000]
    assert 'gateway_auth_failures_total{reason="missing_authorization"}' in text
    assert 'gateway_canary_total{route="order-service",target="canary"}' in text
    assert not re.search(r"^[^#\s{]*(=\.=|;\.;)", text, re.M), "a tag left in a family name"
    families = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    families |= {f + s for f in families for s in ("_bucket", "_sum", "_count")}
    dash = json.loads((Path(__file__).resolve().parents[2] / "envoy" / "grafana" / "gateway-dashboard.json").read_text())
    lazily = {"gateway_jwks_fetch_errors_total", "gateway_jwks_unknown_kid_fetches_total"}
    for panel in dash["panels"]:
        for target in panel["targets"]:
            for name in re.findall(r"\b(gateway_[a-z_]+)\b", target["expr"]):
                assert name in families or name in lazily, f"{name} (panel {panel['title']!r}) is not in the scrape"
