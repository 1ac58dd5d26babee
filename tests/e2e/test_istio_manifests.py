"""The Istio manifests (`envoy/istio/`, as `make oci` writes them with the image digest) against
published schemas, offline: Kubernetes kinds with `kubernetes-validate` (its bundled schemas,
strict), Istio kinds with the CRD schemas vendored from istio/api (`envoy/istio/schemas/`), made
strict (an unknown field is an error, except where the CRD keeps unknown fields, as
`pluginConfig`). Then what the issue asks of the WasmPlugins in particular."""
import json
import os
import re
import subprocess
import sys

import jsonschema
import kubernetes_validate
import pytest
import yaml

from harness import ROOT, require_build

K8S_VERSION = "1.33"
SCHEMAS = json.loads((ROOT / "envoy" / "istio" / "schemas" / "istio-crds.json").read_text())["schemas"]


def strict(schema):
    """Closes every object schema that lists its properties, unless the CRD preserves unknown
    fields there."""
    if isinstance(schema, dict):
        out = {k: strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields") \
                and "additionalProperties" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [strict(v) for v in schema]
    return schema


def oci_manifests(out, which):
    """`make oci` (scripts/oci.py) into `out`: the image's digest, and the (file, document)
    pairs of the manifests it wrote for `which` (`istio` or `eg`)."""
    require_build()
    r = subprocess.run([sys.executable, str(ROOT / "scripts" / "oci.py"), "--out", str(out / "image.tar"),
                        "--istio-dir", str(out / "istio"), "--envoy-gateway-dir", str(out / "eg"),
                        "--registry", "registry.example.com"], capture_output=True, text=True, check=True)
    digest = re.search(r"@(sha256:[0-9a-f]{64})", r.stdout).group(1)
    docs = []
    for path in sorted((out / which).glob("*.yaml")):
        docs += [(path.name, d) for d in yaml.safe_load_all(path.read_text()) if d]
    return digest, docs


def validate_each(docs, validate):
    """`validate` on every document; a failure names the file and the document."""
    for name, doc in docs:
        try:
            validate(doc)
        except Exception as e:
            raise AssertionError(f"{name}: {doc['kind']} {doc['metadata']['name']}: {e}") from e


@pytest.fixture(scope="module")
def manifests(tmp_path_factory):
    return oci_manifests(tmp_path_factory.mktemp("istio"), "istio")


def validate(doc):
    group_version, kind = doc["apiVersion"], doc["kind"]
    key = f"{group_version}/{kind}"
    if group_version.startswith("gateway.networking.k8s.io/"):
        # The waypoint's Gateway: Gateway API's own CRD (vendored with Envoy Gateway's).
        from test_envoy_gateway_manifests import validate as validate_gateway_api
        validate_gateway_api(doc)
    elif key in SCHEMAS:
        body = {k: v for k, v in doc.items() if k not in ("apiVersion", "kind", "metadata")}
        jsonschema.Draft7Validator(strict(SCHEMAS[key])).validate(body)
        assert doc["metadata"]["name"] and doc["metadata"]["namespace"]
    else:
        assert "." not in group_version.split("/")[0], f"no schema for {key}: vendor it"
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_every_manifest_is_valid(manifests):
    _, docs = manifests
    kinds = sorted({d["kind"] for _, d in docs})
    assert kinds == ["AuthorizationPolicy", "ConfigMap", "Deployment", "DestinationRule", "EnvoyFilter", "Gateway",
                     "Service", "ServiceAccount", "ServiceEntry", "VirtualService", "WasmPlugin"], kinds
    validate_each(docs, validate)


def test_the_validation_can_fail(manifests):
    _, docs = manifests
    plugin = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "WasmPlugin")))
    plugin["spec"]["vmconfig"] = plugin["spec"].pop("vmConfig")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate(plugin)
    plugin["spec"]["vmConfig"] = plugin["spec"].pop("vmconfig")
    plugin["spec"]["failStrategy"] = "FAIL_SOMETIMES"
    with pytest.raises(jsonschema.ValidationError):
        validate(plugin)
    service = json.loads(json.dumps(next(d for _, d in docs if d["kind"] == "Service")))
    service["spec"]["ports"][0]["prot"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(service)


def test_the_wasm_plugins_are_what_istio_operators_need(manifests):
    digest, docs = manifests
    plugins = [d for _, d in docs if d["kind"] == "WasmPlugin"]
    assert len(plugins) == 3
    for p in plugins:
        spec = p["spec"]
        assert spec["url"] == f"oci://registry.example.com/gateway-filter@{digest}", "pinned by digest"
        assert spec["imagePullPolicy"] == "IfNotPresent"
        assert spec["phase"] == "AUTHN" and isinstance(spec["priority"], int)
        assert spec["failStrategy"] == "FAIL_RELOAD", "a crashed VM fails closed, then reloads"
        env = spec["vmConfig"]["env"]
        assert env and all(e["valueFrom"] == "HOST" and "value" not in e for e in env)
        text = json.dumps(spec["pluginConfig"])
        assert '"secret"' not in text and "secret_env" in text, "no secret, only the variable's name"
        assert {e["name"] for e in env} >= {v for v in re.findall(r'"(?:secret_env|webdis_auth_env)": "([A-Z_]+)"', text)}
    gateway = next(p for p in plugins if p["spec"].get("selector", {}).get("matchLabels", {}).get("istio"))
    assert gateway["spec"]["pluginConfig"]["webdis_cluster"].startswith("outbound|7379||webdis.")
    # Log records have their own store (its Service and Deployment are among the manifests).
    store = gateway["spec"]["pluginConfig"]["logs"]["store"]["cluster"]
    assert store.startswith("outbound|7379||webdis-logs.") and store != gateway["spec"]["pluginConfig"]["webdis_cluster"]
    services = {d["metadata"]["name"] for _, d in docs if d["kind"] == "Service"}
    assert {"redis", "webdis", "redis-logs", "webdis-logs"} <= services, services
    sidecar = next(p for p in plugins if p["spec"].get("match"))
    assert sidecar["spec"]["match"][0]["mode"] == "SERVER"


def test_the_waypoint_takes_the_plugin_and_reaches_its_callouts(manifests):
    """istiod 1.28: a waypoint attaches a WasmPlugin only by targetRefs (selector ignored), never
    with `match` ports; it builds an outbound cluster for a service only when told, here by an
    EnvoyFilter's referenced-services annotation; webdis admits the waypoint's identity."""
    _, docs = manifests
    (gw,) = [d for _, d in docs if d["kind"] == "Gateway" and d["apiVersion"].startswith("gateway.networking")]
    assert gw["spec"]["gatewayClassName"] == "istio-waypoint"
    plugin = next(d for _, d in docs if d["kind"] == "WasmPlugin" and d["spec"].get("targetRefs"))
    spec = plugin["spec"]
    assert "selector" not in spec and "match" not in spec
    assert plugin["metadata"]["namespace"] == gw["metadata"]["namespace"], "ECDS serves only the proxy's namespace"
    assert {"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": gw["metadata"]["name"]} in spec["targetRefs"]
    (ef,) = [d for _, d in docs if d["kind"] == "EnvoyFilter"]
    assert ef["spec"]["targetRefs"] == spec["targetRefs"][:1] and not ef["spec"].get("configPatches")
    referenced = set(ef["metadata"]["annotations"]["envoyfilter.istio.io/referenced-services"].split(","))
    cfg = spec["pluginConfig"]
    called = [cfg["webdis_cluster"], cfg["logs"]["store"]["cluster"]]
    for cluster in called:
        host = cluster.split("|")[3]
        assert f"{host.split('.')[1]}/{host}" in referenced, (cluster, referenced)
    env = {e["name"] for e in spec["vmConfig"]["env"]}
    overlay = yaml.safe_load(next(d for _, d in docs if d["kind"] == "ConfigMap")["data"]["deployment"])
    proxy = overlay["spec"]["template"]["spec"]["containers"][0]
    assert proxy["name"] == "istio-proxy" and {e["name"] for e in proxy["env"]} >= env
    policy = next(d for _, d in docs if d["kind"] == "AuthorizationPolicy" and d["metadata"]["name"] == "webdis-from-the-filter")
    principals = policy["spec"]["rules"][0]["from"][0]["source"]["principals"]
    assert f"cluster.local/ns/{gw['metadata']['namespace']}/sa/{gw['metadata']['name']}" in principals


def _virtual_hosts(bootstrap):
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                yield from f.get("typed_config", {}).get("route_config", {}).get("virtual_hosts", [])


def test_the_canary_is_routed_on_the_filters_header(manifests):
    _, docs = manifests
    vs = next(d for _, d in docs if d["kind"] == "VirtualService")
    canary = vs["spec"]["http"][0]
    # The value the filter writes, as the rendered Envoy route matches it.
    rendered = json.loads(subprocess.run(
        [str(ROOT / "target" / "release" / "gateway-render"), "--config", str(ROOT / "config" / "gateway.yaml"),
         "--wasm", "/x.wasm", "--json"], capture_output=True, text=True, check=True,
        env={**os.environ, "JWT_SECRET": "x" * 32}).stdout)
    matches = [h for vh in _virtual_hosts(rendered) for r in vh["routes"]
               for h in r.get("match", {}).get("headers", []) if h["name"] == "x-gateway-canary"]
    assert matches, "the rendered canary route matches the header"
    assert canary["match"][0]["headers"] == {"x-gateway-canary": matches[0]["string_match"]}
    assert canary["route"][0]["destination"]["subset"] == "canary"
    dr = next(d for _, d in docs if d["kind"] == "DestinationRule" and "subsets" in d["spec"])
    assert {s["name"] for s in dr["spec"]["subsets"]} == {"stable", "canary"}


def test_the_kubernetes_side_is_complete(manifests):
    _, docs = manifests
    by_kind = {}
    for _, d in docs:
        by_kind.setdefault(d["kind"], []).append(d)
    # The VirtualService's gateway is shipped.
    vs = by_kind["VirtualService"][0]
    gateways = {f"{g['metadata']['namespace']}/{g['metadata']['name']}" for g in by_kind["Gateway"]
                if g["apiVersion"].startswith("networking.istio.io")}
    assert set(vs["spec"]["gateways"]) <= gateways, (vs["spec"]["gateways"], gateways)
    # webdis answers only the filter's workloads; Redis only webdis (by service account).
    policies = {p["spec"]["selector"]["matchLabels"]["app"]: p for p in by_kind["AuthorizationPolicy"]}
    assert {"webdis", "redis", "redis-logs"} <= set(policies)
    accounts = {(a["metadata"]["namespace"], a["metadata"]["name"]) for a in by_kind["ServiceAccount"]}
    # istiod makes a waypoint's ServiceAccount, named after its Gateway (deploymentcontroller.go).
    accounts |= {(g["metadata"]["namespace"], g["metadata"]["name"]) for g in by_kind["Gateway"]
                 if g["spec"].get("gatewayClassName") == "istio-waypoint"}
    deployments = {d["metadata"]["name"]: d for d in by_kind["Deployment"]}
    for app, policy in policies.items():
        for rule in policy["spec"]["rules"]:
            for source in rule["from"]:
                for principal in source["source"]["principals"]:
                    _, ns, _, sa = principal.removeprefix("cluster.local/").split("/")
                    if ns == "gateway":
                        assert (ns, sa) in accounts, f"{app}: {principal} has no ServiceAccount"
    assert deployments["webdis"]["spec"]["template"]["spec"]["serviceAccountName"] == "webdis"
    # Secrets: the sidecar override takes JWT_SECRET from a Secret; no pluginConfig holds one.
    proxy = next(c for c in deployments["user-service"]["spec"]["template"]["spec"]["containers"]
                 if c["name"] == "istio-proxy")
    assert proxy["image"] == "auto"
    assert {e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in proxy["env"]} == {"JWT_SECRET": "gateway-filter-env"}
    for plugin in by_kind["WasmPlugin"]:
        assert "secret" not in {k.lower() for k in plugin["spec"]["pluginConfig"].get("jwt", {})}
    # An identity provider outside the mesh: ServiceEntry plus TLS origination.
    se = by_kind["ServiceEntry"][0]
    dr = next(d for d in by_kind["DestinationRule"] if d["spec"]["host"] == se["spec"]["hosts"][0])
    assert dr["spec"]["trafficPolicy"]["portLevelSettings"][0]["tls"]["mode"] == "SIMPLE"


def test_the_gateway_chart_values_hand_the_secret_to_the_proxy():
    values = yaml.safe_load((ROOT / "envoy" / "istio" / "helm" / "gateway-values.yaml").read_text())
    # The chart's own values schema (vendored with its source commit): `envVarFrom` is a key the
    # chart knows (additionalProperties is false, so a misspelt key fails here), an array of
    # {name, valueFrom}; its deployment template copies the entries into the proxy's `env`.
    chart = json.loads((ROOT / "envoy" / "istio" / "schemas" / "gateway-chart-values.json").read_text())
    assert "istio/istio" in chart["source"]
    jsonschema.validate(values, chart["schema"])
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**values, "envFrom": values["envVarFrom"]}, chart["schema"])
    env = values["envVarFrom"]
    # Each entry is a container EnvVar: validated as part of a Pod.
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x", "namespace": "istio-system"},
           "spec": {"containers": [{"name": "istio-proxy", "image": "auto", "env": env}]}}
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    assert {e["name"] for e in env} == {"JWT_SECRET", "WEBDIS_AUTH"}
    assert all(e["valueFrom"]["secretKeyRef"]["name"] == "gateway-filter-env" for e in env)
