"""The Envoy Gateway manifests (`envoy/envoy-gateway/`, as `make oci` writes them with the image
digest) against Envoy Gateway's and the Gateway API's own CRD schemas, vendored with the commit
they came from (`envoy/envoy-gateway/schemas/SOURCE.md`), made strict (an unknown field is an
error, except where the CRD keeps unknown fields, as a policy's `config`). Then: the checked-in
manifests are what `scripts/envoy_gateway.py` makes of `config/gateway.yaml` (they cannot drift
from the gateway file), and they hold together (every cluster the filter calls exists, the
module the policy names is registered, every route has its HTTPRoute)."""
import json
import os
import re
import subprocess
import sys

import jsonschema
import pytest
import yaml

from harness import ROOT, require_build
from test_istio_manifests import oci_manifests, strict, validate_each

EG = ROOT / "envoy" / "envoy-gateway"


def _schemas():
    out = {}
    for path in sorted((EG / "schemas").glob("*.yaml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd:
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for v in crd["spec"]["versions"]:
                out[f"{group}/{v['name']}/{kind}"] = v["schema"]["openAPIV3Schema"]
    return out


SCHEMAS = _schemas()


def validate(doc):
    key = f"{doc['apiVersion']}/{doc['kind']}"
    assert key in SCHEMAS, f"no schema for {key}: vendor it"
    schema = strict(SCHEMAS[key])
    # metadata is Kubernetes' ObjectMeta (the CRD leaves it open): names and namespaces checked
    # below.
    schema["properties"].pop("metadata", None)
    body = {k: v for k, v in doc.items() if k != "metadata"}
    jsonschema.Draft7Validator(schema).validate(body)
    assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]), doc["metadata"]
    if doc["kind"] != "GatewayClass":
        assert doc["metadata"]["namespace"] == "gateway", doc["metadata"]


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return oci_manifests(tmp_path_factory.mktemp("eg"), "eg")


def test_every_manifest_is_valid_against_envoy_gateways_crds(manifests):
    _, docs = manifests
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == ["EnvoyExtensionPolicy", "EnvoyProxy", "Gateway", "GatewayClass", "HTTPRoute"], kinds
    validate_each(docs, validate)


def test_the_validation_can_fail(manifests):
    _, docs = manifests
    policy = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "EnvoyExtensionPolicy"
                                        and "wasm" in d["spec"])))
    policy["spec"]["wasm"][0]["failopen"] = policy["spec"]["wasm"][0].pop("failOpen")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate(policy)
    proxy = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "EnvoyProxy")))
    proxy["spec"]["dynamicModules"][0]["source"]["type"] = "Somewhere"
    with pytest.raises(jsonschema.ValidationError):
        validate(proxy)
    route = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "HTTPRoute")))
    route["spec"]["rules"][0]["matches"][0]["path"]["type"] = "Prefix"  # Istio's word, not Gateway API's
    with pytest.raises(jsonschema.ValidationError):
        validate(route)


def test_the_checked_in_manifests_are_the_gateway_files(tmp_path):
    require_build()
    subprocess.run([sys.executable, str(ROOT / "scripts" / "envoy_gateway.py"), "--out", str(tmp_path)],
                   check=True, capture_output=True, text=True)
    for name in ("routes.yaml", "envoyproxy.yaml", "policy-wasm.yaml", "policy-native.yaml"):
        assert (tmp_path / name).read_text() == (EG / name).read_text(), \
            f"envoy/envoy-gateway/{name} is stale: run scripts/envoy_gateway.py"


def _filter_config():
    r = subprocess.run([str(ROOT / "target" / "release" / "gateway-render"), "--config",
                        str(ROOT / "config" / "gateway.yaml"), "--filter-config"],
                       capture_output=True, text=True, check=True, env={**os.environ, "JWT_SECRET": "x" * 32})
    return json.loads(r.stdout)


def test_the_manifests_hold_together(manifests):
    digest, docs = manifests
    of = lambda kind: [d for _, d in docs if d["kind"] == kind]  # noqa: E731
    (proxy,) = of("EnvoyProxy")
    wasm = next(p for p in of("EnvoyExtensionPolicy") if "wasm" in p["spec"])["spec"]["wasm"][0]
    native = next(p for p in of("EnvoyExtensionPolicy") if "dynamicModule" in p["spec"])["spec"]["dynamicModule"][0]
    # The .wasm pinned by digest, failing closed; secrets named, never given.
    assert wasm["code"] == {"type": "Image", "image": {"url": f"registry.example.com/gateway-filter@{digest}"}}
    assert wasm["failOpen"] is False
    config = _filter_config()
    assert wasm["config"] == config and native["config"] == config
    text = json.dumps(config)
    assert '"secret"' not in text
    assert set(wasm["env"]["hostKeys"]) >= set(re.findall(r'"(?:secret_env|webdis_auth_env|auth_env)": "([A-Z_]+)"', text))
    env = {e["name"] for e in proxy["spec"]["provider"]["kubernetes"]["envoyDeployment"]["container"]["env"]}
    assert env >= set(wasm["env"]["hostKeys"])
    # The module the policy names is registered.
    assert native["name"] in {m["name"] for m in proxy["spec"]["dynamicModules"]}
    # Every cluster the filter calls is in the proxies' bootstrap, under that name.
    merged = yaml.safe_load(proxy["spec"]["bootstrap"]["value"])
    clusters = {c["name"] for c in merged["static_resources"]["clusters"]}
    called = {config["webdis_cluster"]}
    called |= {i["remote_jwks"]["cluster"] for i in config["jwt"].get("issuers", []) if "remote_jwks" in i}
    if (config.get("logs") or {}).get("store"):
        called.add(config["logs"]["store"]["cluster"])
    assert called <= clusters, (called, clusters)
    assert {t["tag_name"] for t in merged["stats_config"]["stats_tags"]} >= {"route", "outcome", "reason"}
    runtime = {k: v for layer in merged["layered_runtime"]["layers"] for k, v in layer["static_layer"].items()}
    assert runtime.get("envoy.reloadable_features.dynamic_modules_strip_custom_stat_prefix") is True, runtime
    assert not any(k.startswith("envoy.resource_limits.listener.") for k in runtime), "names the renderer's listeners"
    # Every route of the gateway file has its HTTPRoute on the Gateway, at the filter's prefix.
    routes = {r["metadata"]["name"]: r for r in of("HTTPRoute")}
    for r in config["routes"]:
        assert r["name"] in routes, r["name"]
        prefixes = {m["path"]["value"] for rule in routes[r["name"]]["spec"]["rules"] for m in rule["matches"]}
        assert prefixes == {config["gateway"]["prefix"] + r["prefix"]}
        assert routes[r["name"]]["spec"]["parentRefs"] == [{"name": of("Gateway")[0]["metadata"]["name"]}]
    canary = routes["order-service"]["spec"]["rules"][0]
    assert canary["matches"][0]["headers"] == [{"name": "x-gateway-canary", "value": "1"}]
    assert canary["filters"][0]["requestHeaderModifier"]["remove"] == ["x-gateway-canary"]
