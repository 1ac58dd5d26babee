"""The rendered bootstrap reshaped as Envoy Gateway's translator builds a proxy's configuration
for the manifests of `envoy/envoy-gateway/` (a Gateway `eg` in namespace `gateway` with an HTTP
listener on port 80, one HTTPRoute per route, the EnvoyExtensionPolicy `gateway-filter` on the
Gateway, the EnvoyProxy's bootstrap merge), each rule from Envoy Gateway's code at
envoyproxy/gateway d32f28294245 (main after v1.9.0):

- listener `gateway/eg/http` on container port 10080 (`internal/gatewayapi/helpers.go`
  irListenerName; `listener.go` servicePortToContainerPort: ports below 1024 + 10000); its route
  configuration named as the listener, virtual host `gateway/eg/http/*` with domain `*`
  (`internal/xds/translator/translator.go` virtualHostName), `ignore_port_in_host_matching`;
- HTTP connection manager (`internal/xds/translator/listener.go` buildXdsTCPListener /
  hcmStatPrefix): stat prefix `http-10080`, `use_remote_address: true`, `normalize_path`,
  `merge_slashes`, `path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT`,
  `headers_with_underscores_action: REJECT_REQUEST`, `server_header_transformation:
  PASS_THROUGH`, its HTTP/2 settings; none of the gateway file's own hardening (timeouts, local
  replies, the early removal of `x-forwarded-for`): Envoy Gateway takes those from a
  ClientTrafficPolicy, which the manifests do not set;
- http filters in Envoy Gateway's order (`httpfilters.go` newOrderedHTTPFilter: wasm 200+i,
  dynamic_modules 250+i, router last), the filter named
  `envoy.filters.http.wasm/envoyextensionpolicy/gateway/gateway-filter/wasm/0` (or
  `envoy.filters.http.dynamic_modules/.../dynamic-module/0`) and `disabled: true`, enabled on
  each route of the Gateway by `typed_per_filter_config` with an empty
  `envoy.config.route.v3.FilterConfig` (`utils.go` enableFilterOnRoute); the router with
  `suppress_envoy_headers: true` (`filters/wellknown.go`); no CORS or buffer filter (the
  manifests configure neither);
- the wasm filter as `wasm.go` wasmConfig builds it: plugin name the policy's wasm name, `root_id`
  the policy's rootID (unset: empty), `vm_id` the policy's IR name (one VM per filter), runtime
  v8, the code fetched by `remote` `http_uri` from `wasm_cluster` with its sha256 and Envoy
  Gateway's retry policy, `host_env_keys` from `env.hostKeys`, `fail_open: false`, the
  configuration a JSON StringValue, no `failure_policy`. Envoy Gateway serves the module from its
  own HTTPS server with mTLS (`internal/wasm/httpserver.go`); here `wasm_cluster` is a plain HTTP
  server of the test's (the one deviation);
- the dynamic module as `dynamicmodule.go` builds it: `dynamic_module_config` with only
  `do_not_close` and `module.local.filename`, `filter_name` from the policy, `filter_config` a
  JSON StringValue;
- route clusters named `httproute/gateway/<route>/rule/<i>` (`helpers.go`
  irRouteDestinationName; Envoy Gateway delivers them by EDS, here static), route names
  `httproute/gateway/<route>/rule/<i>/match/0/*`, the canary's header rule first, no retry
  policy (Envoy Gateway takes retries from a BackendTrafficPolicy);
- the callout clusters (webdis, key servers) static under the filter's names, the stats tags and
  a runtime layer, as the EnvoyProxy's `bootstrap.type: Merge` adds them
  (`internal/xds/bootstrap/util.go`);
  the bootstrap's own `stats_config` (`bootstrap.yaml.tpl`: `use_all_default_tags: true` and its
  four tags) under them;
- no network filter: an EnvoyExtensionPolicy is an HTTP filter, so the rendered connection cap is
  not there.
"""
import hashlib
import http.server
import json
import threading

NS = "gateway"
LISTENER = f"{NS}/eg/http"
PORT = 10080
IR = f"envoyextensionpolicy/{NS}/gateway-filter"
WASM_FILTER = f"envoy.filters.http.wasm/{IR}/wasm/0"
NATIVE_FILTER = f"envoy.filters.http.dynamic_modules/{IR}/dynamic-module/0"
ENABLE = {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig", "config": {}}
# internal/xds/bootstrap/bootstrap.yaml.tpl's stats_config, before the EnvoyProxy's merge
# appends ours; its runtime layer; its deferred stat creation.
EG_STATS_TAGS = [
    {"regex": r"\.zone(\.(([^\.]+)\.))", "tag_name": "from_zone"},
    {"regex": r"\.zone\.[^\.]+\.(([^\.]+)\.)", "tag_name": "to_zone"},
    {"regex": r"^cluster(\..+\.(.+))\.total_match_count$", "tag_name": "socket_match_name"},
    {"regex": r"circuit_breakers\.((.+?)\.).+", "tag_name": "priority"},
]
EG_RUNTIME = {"layers": [{"name": "global_config", "static_layer": {
    "re2.max_program_size.error_level": 4294967295, "re2.max_program_size.warn_level": 1000}}]}


class ModuleServer:
    """Serves the .wasm over HTTP at /<sha256>.wasm, as Envoy Gateway's wasm server does."""

    def __init__(self, path):
        data = path.read_bytes()
        self.sha256 = hashlib.sha256(data).hexdigest()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                ok = self.path == f"/{outer.sha256}.wasm"
                self.send_response(200 if ok else 404)
                self.send_header("Content-Length", str(len(data) if ok else 0))
                self.end_headers()
                if ok:
                    self.wfile.write(data)

            def log_message(self, *_):
                pass

        outer = self
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self):
        self.httpd.shutdown()


def _hcm(listener):
    return next(f for ch in listener["filter_chains"] for f in ch["filters"]
                if f["name"] == "envoy.filters.network.http_connection_manager")


def shape(bootstrap: dict, runtime: str, module_server=None) -> dict:
    b = json.loads(json.dumps(bootstrap))
    listener = next(x for x in b["static_resources"]["listeners"] if x["name"] == "gateway")
    hcm = _hcm(listener)["typed_config"]
    old_filters = {f["name"]: f for f in hcm["http_filters"]}
    route_clusters, renamed = set(), {}
    routes = []
    rules = {}
    for r in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        cluster = r.get("route", {}).get("cluster")
        if cluster is None:
            continue  # health and not_found: the gateway file's, no HTTPRoute has them
        name = r["name"][: -len("-canary")] if r["name"].endswith("-canary") else r["name"]
        i = rules.get(name, 0)
        rules[name] = i + 1
        new = f"httproute/{NS}/{name}/rule/{i}"
        renamed[cluster] = new
        route_clusters.add(cluster)
        action = {"cluster": new}
        if r["route"].get("timeout"):
            action["timeout"] = r["route"]["timeout"]
        shaped = {"name": f"{new}/match/0/*", "match": r["match"], "route": action,
                  "typed_per_filter_config": {(WASM_FILTER if runtime == "wasm" else NATIVE_FILTER): ENABLE}}
        if r.get("request_headers_to_remove"):
            shaped["request_headers_to_remove"] = r["request_headers_to_remove"]
        routes.append(shaped)

    if runtime == "wasm":
        old = old_filters["envoy.filters.http.wasm"]["typed_config"]["config"]
        env = old["vm_config"].get("environment_variables", {})
        gateway_filter = {"name": WASM_FILTER, "disabled": True, "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
            "config": {
                "name": "gateway-filter",
                "root_id": "",
                "vm_config": {
                    "vm_id": f"{IR}/wasm/0",
                    "runtime": "envoy.wasm.runtime.v8",
                    "code": {"remote": {
                        "http_uri": {"uri": f"http://127.0.0.1:{module_server.port}/{module_server.sha256}.wasm",
                                     "cluster": "wasm_cluster", "timeout": "10s"},
                        "sha256": module_server.sha256,
                        "retry_policy": {"num_retries": 10,
                                         "retry_back_off": {"base_interval": "1s", "max_interval": "30s"}}}},
                    "environment_variables": {"host_env_keys": env.get("host_env_keys", [])},
                },
                "configuration": old["configuration"],
                "fail_open": False,
            }}}
    else:
        old = old_filters["envoy.filters.http.dynamic_modules"]["typed_config"]
        gateway_filter = {"name": NATIVE_FILTER, "disabled": True, "typed_config": {
            "@type": old["@type"],
            "dynamic_module_config": {"do_not_close": True,
                                      "module": {"local": old["dynamic_module_config"]["module"]["local"]}},
            "filter_name": old["filter_name"],
            "filter_config": old["filter_config"],
        }}

    new_hcm = {
        "@type": hcm["@type"],
        "stat_prefix": f"http-{PORT}",
        "rds": None,
        "route_config": {"name": LISTENER, "ignore_port_in_host_matching": True, "virtual_hosts": [
            {"name": f"{LISTENER}/*", "domains": ["*"], "routes": routes}]},
        "http_filters": [gateway_filter, {"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router",
            "suppress_envoy_headers": True}}],
        "use_remote_address": True,
        "normalize_path": True,
        "merge_slashes": True,
        "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT",
        "common_http_protocol_options": {"headers_with_underscores_action": "REJECT_REQUEST"},
        "server_header_transformation": "PASS_THROUGH",
        "http2_protocol_options": {"max_concurrent_streams": 100, "initial_stream_window_size": 65536,
                                   "initial_connection_window_size": 1048576},
    }
    del new_hcm["rds"]
    listener["name"] = LISTENER
    listener["filter_chains"] = [{"filters": [{"name": "envoy.filters.network.http_connection_manager",
                                               "typed_config": new_hcm}]}]
    listener["per_connection_buffer_limit_bytes"] = 32768

    clusters = []
    for c in b["static_resources"]["clusters"]:
        if c["name"] in renamed:
            c["name"] = c["load_assignment"]["cluster_name"] = renamed[c["name"]]
            c.pop("circuit_breakers", None)
        clusters.append(c)
    if runtime == "wasm":
        clusters.append({"name": "wasm_cluster", "type": "STATIC", "connect_timeout": "10s",
                         "load_assignment": {"cluster_name": "wasm_cluster", "endpoints": [{"lb_endpoints": [
                             {"endpoint": {"address": {"socket_address": {
                                 "address": "127.0.0.1", "port_value": module_server.port}}}}]}]}})
    b["static_resources"]["clusters"] = clusters
    b["stats_config"] = {"use_all_default_tags": True,
                         "stats_tags": EG_STATS_TAGS + bootstrap["stats_config"].get("stats_tags", [])}
    b["deferred_stat_options"] = {"enable_deferred_creation_stats": True}
    # Envoy Gateway's runtime layer, then the one the EnvoyProxy's merge appends
    # (scripts/envoy_gateway.py runtime_layer: the rendered keys, less the listener limits).
    ours = {k: v for layer in bootstrap.get("layered_runtime", {}).get("layers", [])
            for k, v in layer.get("static_layer", {}).items() if not k.startswith("envoy.resource_limits.listener.")}
    b["layered_runtime"] = {"layers": EG_RUNTIME["layers"] + [{"name": "gateway-filter", "static_layer": ours}]}
    return b
