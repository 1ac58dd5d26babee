#!/usr/bin/env python3
"""Envoy Gateway manifests from the gateway file: HTTPRoutes for its routes, the EnvoyProxy that
registers the native module, hands the filter its secrets and holds the callout clusters, and an
EnvoyExtensionPolicy for each artifact (the .wasm from an OCI image, or the dynamic module).

    scripts/envoy_gateway.py [--config config/gateway.yaml] [--out envoy/envoy-gateway]
                             [--registry REGISTRY] [--digest DIGEST] [--namespace gateway]

It reads what `gateway-render --json` renders (the renderer stays the one reader of the gateway
file) and maps it onto Envoy Gateway's API, as Envoy Gateway's translator would read it back
(envoyproxy/gateway d32f28294245, `internal/gatewayapi`, `internal/xds/translator`):
- each route is an HTTPRoute of the same name on the Gateway `eg`, its path prefix, timeout and,
  for a canary, a first rule on `x-gateway-canary: 1` (which the filter writes and clients
  cannot) to the `<route>-canary` Service. Envoy Gateway names each rule's cluster
  `httproute/<ns>/<route>/rule/<i>` (helpers.go irRouteDestinationName); the filter never calls
  those, it only decides;
- a route's upstream on this machine (127.0.0.1:<port>) is the Service named after the route,
  on that port; webdis and webdis-logs are the Services of `envoy/istio/redis-webdis.yaml`
  (port 7379); a key server on a loopback port is the route Service with that port;
- the callout clusters (webdis, the log store's webdis, key servers) keep the names the filter's
  configuration gives them, as static clusters merged into the proxies' bootstrap
  (`EnvoyProxy.spec.bootstrap.type: Merge`, internal/xds/bootstrap/util.go mergeBootstrap):
  Envoy Gateway makes no cluster for a Service no route points at, and names those it makes
  after routes;
- the stats tags that keep the filter's metric labels are merged into the bootstrap too, and a
  runtime layer: the callout reply limit, and the native module's metric names without Envoy's
  `dynamicmodulescustom` prefix (without it they are `envoy_dynamicmodulescustom_gateway_*`);
- the filter's configuration goes as the policy's JSON `config`, which Envoy Gateway hands over
  as a `google.protobuf.StringValue` (wasm.go wasmConfig, dynamicmodule.go).
Retries are not mapped: Envoy Gateway takes them from a BackendTrafficPolicy.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
RENDER = ROOT / "target" / "release" / "gateway-render"
POLICY = "gateway-filter"
GATEWAY = "eg"
MODULE_PATH = "/opt/gateway/libgateway_filter.so"
# envoy/istio/redis-webdis.yaml: webdis and webdis-logs serve HTTP on 7379.
WEBDIS_PORT = 7379
LOOPBACK = {"127.0.0.1", "::1", "localhost"}


def rendered(config: Path, runtime: str) -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "envoy.json"
        args = [str(RENDER), "--config", str(config), "--wasm", "/gateway_filter.wasm",
                "--native", MODULE_PATH, "--runtime", runtime, "--json", "--out", str(out)]
        r = subprocess.run(args, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"gateway-render failed: {r.stderr}")
        return json.loads(out.read_text())


def hcm(bootstrap: dict) -> dict:
    listener = next(x for x in bootstrap["static_resources"]["listeners"] if x["name"] == "gateway")
    return next(f["typed_config"] for ch in listener["filter_chains"] for f in ch["filters"]
                if f["name"] == "envoy.filters.network.http_connection_manager")


def socket(cluster: dict) -> dict:
    return cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]


def filter_of(bootstrap: dict, name: str) -> dict:
    return next(f for f in hcm(bootstrap)["http_filters"] if f["name"] == name)["typed_config"]


def routes(bootstrap: dict, ns: str) -> list:
    """HTTPRoutes, one per gateway route (its canary rule first)."""
    clusters = {c["name"]: c for c in bootstrap["static_resources"]["clusters"]}
    by_route = {}
    for r in hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]:
        cluster = r.get("route", {}).get("cluster")
        if cluster not in clusters:
            continue  # health, not_found: answered by the gateway itself
        name = r["name"][: -len("-canary")] if r["name"].endswith("-canary") else r["name"]
        match = {"path": {"type": "PathPrefix", "value": r["match"]["path_separated_prefix"]}}
        rule = {"matches": [match]}
        headers = r["match"].get("headers")
        if headers:
            match["headers"] = [{"name": h["name"], "value": h["string_match"]["exact"]} for h in headers]
        if r.get("request_headers_to_remove"):
            rule["filters"] = [{"type": "RequestHeaderModifier",
                                "requestHeaderModifier": {"remove": r["request_headers_to_remove"]}}]
        rule["backendRefs"] = [{"name": cluster, "port": socket(clusters[cluster])["port_value"]}]
        timeout = r["route"].get("timeout")
        if timeout and timeout != "0s":
            rule["timeouts"] = {"request": timeout}
        by_route.setdefault(name, []).append(rule)
    return [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
             "metadata": {"name": name, "namespace": ns},
             "spec": {"parentRefs": [{"name": GATEWAY}], "rules": rules}}
            for name, rules in by_route.items()]


def callout_clusters(bootstrap: dict, ns: str) -> list:
    """The clusters the filter calls, by the names its configuration gives them, reaching the
    cluster's Services by DNS."""
    route_clusters = {r["route"]["cluster"] for r in hcm(bootstrap)["route_config"]["virtual_hosts"][0]["routes"]
                      if "cluster" in r.get("route", {})}
    by_port = {}
    for c in bootstrap["static_resources"]["clusters"]:
        if c["name"] in route_clusters:
            by_port.setdefault(socket(c)["port_value"], c["name"])
    out = []
    for c in bootstrap["static_resources"]["clusters"]:
        if c["name"] in route_clusters or "pipe" in json.dumps(c["load_assignment"]):
            continue
        c = json.loads(json.dumps(c))
        sock = socket(c)
        if sock["address"] in LOOPBACK:
            if c["name"].startswith("webdis"):
                sock["address"], sock["port_value"] = f"{c['name']}.{ns}.svc.cluster.local", WEBDIS_PORT
            elif sock["port_value"] in by_port:
                sock["address"] = f"{by_port[sock['port_value']]}.{ns}.svc.cluster.local"
            else:
                sock["address"] = f"{c['name']}.{ns}.svc.cluster.local"
        c["type"] = "STRICT_DNS"
        c.pop("per_connection_buffer_limit_bytes", None)
        out.append(c)
    return out


def runtime_layer(bootstrap: dict) -> dict:
    """The gateway file's runtime keys that hold on any listener: the callout reply limit and,
    for the native module, metric names without Envoy's `dynamicmodulescustom` prefix (the
    listener connection limits name the renderer's listeners and are left out)."""
    keys = {}
    for layer in bootstrap.get("layered_runtime", {}).get("layers", []):
        keys.update({k: v for k, v in layer.get("static_layer", {}).items()
                     if not k.startswith("envoy.resource_limits.listener.")})
    return {"name": "gateway-filter", "static_layer": keys}


def envoyproxy(bootstrap: dict, native_boot: dict, ns: str, env_keys: list) -> dict:
    merge = {"static_resources": {"clusters": callout_clusters(bootstrap, ns)},
             "stats_config": {"stats_tags": bootstrap["stats_config"]["stats_tags"]},
             "layered_runtime": {"layers": [runtime_layer(native_boot)]}}
    container = {
        "image": "envoyproxy/envoy:distroless-v1.40.0",
        "env": [{"name": k, "valueFrom": {"secretKeyRef": {"name": "gateway-filter-env", "key": k}}}
                for k in env_keys],
        "volumeMounts": [{"name": "gateway-modules", "mountPath": "/opt/gateway", "readOnly": True}],
    }
    return {
        "apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyProxy",
        "metadata": {"name": "gateway-proxy", "namespace": ns},
        "spec": {
            "provider": {"type": "Kubernetes", "kubernetes": {"envoyDeployment": {
                "replicas": 2,
                "container": container,
                "initContainers": [{
                    "name": "gateway-module", "image": "REGISTRY/gateway-filter-native:0.1.0",
                    "command": ["cp", "/libgateway_filter.so", MODULE_PATH],
                    "volumeMounts": [{"name": "gateway-modules", "mountPath": "/opt/gateway"}]}],
                "pod": {"volumes": [{"name": "gateway-modules", "emptyDir": {}}]},
            }}},
            "dynamicModules": [{"name": POLICY, "source": {"type": "Local", "local": {"path": MODULE_PATH}},
                                "doNotClose": True}],
            "bootstrap": {"type": "Merge", "value": yaml.safe_dump(merge, sort_keys=False, width=120)},
        },
    }


def policies(wasm_boot: dict, native_boot: dict, ns: str):
    wasm = filter_of(wasm_boot, "envoy.filters.http.wasm")["config"]
    native = filter_of(native_boot, "envoy.filters.http.dynamic_modules")
    config = json.loads(wasm["configuration"]["value"])
    env_keys = wasm["vm_config"].get("environment_variables", {}).get("host_env_keys", [])
    target = [{"group": "gateway.networking.k8s.io", "kind": "Gateway", "name": GATEWAY}]
    meta = {"name": POLICY, "namespace": ns}
    w = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy", "metadata": meta,
         "spec": {"targetRefs": target, "wasm": [{
             "name": POLICY,
             "code": {"type": "Image", "image": {"url": "REGISTRY/gateway-filter@sha256:DIGEST"}},
             "config": config,
             "failOpen": False,
             "env": {"hostKeys": env_keys}}]}}
    n = {"apiVersion": "gateway.envoyproxy.io/v1alpha1", "kind": "EnvoyExtensionPolicy", "metadata": meta,
         "spec": {"targetRefs": target, "dynamicModule": [{
             "name": POLICY, "filterName": native["filter_name"],
             "config": json.loads(native["filter_config"]["value"])}]}}
    return w, n, env_keys


HEADERS = {
    "routes.yaml": """# Generated by scripts/envoy_gateway.py from config/gateway.yaml: its routes as HTTPRoutes on
# the Gateway `eg` (gateway.yaml). The canary's first rule routes on `x-gateway-canary: 1`, which
# the filter writes for a request it sends to the canary and removes from clients.
""",
    "envoyproxy.yaml": """# Generated by scripts/envoy_gateway.py from config/gateway.yaml: the proxies of the
# `gateway-filter` class. The Envoy image the native module is built for (1.40; Envoy Gateway's
# default image is older); the filter's secrets in the proxy's environment from the Secret
# `gateway-filter-env`; the dynamic module registered by name and copied onto the proxy's
# filesystem by an init container (push the image holding it as REGISTRY/gateway-filter-native);
# the clusters the filter calls, by the names its configuration gives them, merged into the
# bootstrap (Envoy Gateway makes none for a Service no route points at), with the stats tags
# that keep the filter's metric labels.
""",
    "policy-wasm.yaml": """# Generated by scripts/envoy_gateway.py from config/gateway.yaml: the .wasm on every route of the
# Gateway `eg`, from the OCI image `make oci` builds (`make oci` writes this file with REGISTRY
# and DIGEST filled in, into build/envoy-gateway/). failOpen false: a module that cannot load
# answers 503, never lets a request through unchecked. Secrets stay in the proxy's environment
# (env.hostKeys names them).
""",
    "policy-native.yaml": """# Generated by scripts/envoy_gateway.py from config/gateway.yaml: the dynamic module (registered
# in envoyproxy.yaml) on every route of the Gateway `eg`. Apply this or policy-wasm.yaml, not both.
""",
}


def manifests(config: Path, ns: str) -> dict:
    wasm_boot, native_boot = rendered(config, "wasm"), rendered(config, "native")
    w, n, env_keys = policies(wasm_boot, native_boot, ns)
    return {
        "routes.yaml": routes(wasm_boot, ns),
        "envoyproxy.yaml": [envoyproxy(wasm_boot, native_boot, ns, env_keys)],
        "policy-wasm.yaml": [w],
        "policy-native.yaml": [n],
    }


class _Dumper(yaml.SafeDumper):
    pass


def _text(dumper, value):
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _text)


def dump(name: str, docs: list) -> str:
    return HEADERS[name] + yaml.dump_all(docs, Dumper=_Dumper, sort_keys=False, width=110)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default=str(ROOT / "config" / "gateway.yaml"))
    ap.add_argument("--out", default=str(ROOT / "envoy" / "envoy-gateway"))
    ap.add_argument("--namespace", default="gateway")
    ap.add_argument("--registry")
    ap.add_argument("--digest", help="the OCI image's manifest digest (hex, without sha256:)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, docs in manifests(Path(args.config), args.namespace).items():
        text = dump(name, docs)
        if args.registry:
            text = text.replace("REGISTRY", args.registry)
        if args.digest:
            text = text.replace("DIGEST", args.digest)
        (out / name).write_text(text)
    if out != ROOT / "envoy" / "envoy-gateway":
        (out / "gateway.yaml").write_text((ROOT / "envoy" / "envoy-gateway" / "gateway.yaml").read_text())
    print(f"Envoy Gateway manifests in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
