"""Starts real processes for the end-to-end tests: demo services, and Envoy loaded with the built
filter and a configuration rendered from a gateway file by gateway-render. Everything listens on
free loopback ports; nothing is mocked."""

import base64
import hashlib
import hmac
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path

import yaml

import istio_stats

ROOT = Path(__file__).resolve().parents[2]
ENVOY = ROOT / ".venv" / "bin" / "envoy"
RENDER = ROOT / "target" / "release" / "gateway-render"
WASM = ROOT / "build" / "gateway_filter.wasm"
NATIVE = ROOT / "build" / "libgateway_filter.so"
# Which build of the filter every Gateway runs unless its file says (make test runs the suite
# with each): the portable module (wasm) or the Envoy dynamic module (native).
RUNTIME = os.environ.get("GATEWAY_RUNTIME", "wasm")
SERVICES = ROOT / "demo" / "services.py"
SECRET = "e2e-secret-e2e-secret-e2e-secret-e2e"


def require_build():
    missing = [p for p in (ENVOY, RENDER, WASM, *([NATIVE] if RUNTIME == "native" else [])) if not p.exists()]
    if missing:
        raise RuntimeError(f"missing {', '.join(map(str, missing))}: run `make build` (or `make test`) first")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=15.0, what="condition", interval=0.05):
    """The one way tests wait: poll a condition until it holds, or fail naming it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header, payload, secret=SECRET) -> str:
    """Builds an HS256-signed token from raw header/payload (dicts or strings), so tests can
    produce any shape, valid or hostile."""
    h = header if isinstance(header, str) else json.dumps(header, separators=(",", ":"))
    p = payload if isinstance(payload, str) else json.dumps(payload, separators=(",", ":"))
    signing_input = f"{b64url(h.encode())}.{b64url(p.encode())}"
    sig = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(sig)}"


def token(sub="user-001", name="admin", role="admin", ttl=1800, **extra) -> str:
    now = int(time.time())
    claims = {"sub": sub, "name": name, "role": role, "iat": now, "exp": now + ttl}
    claims.update(extra)
    return forge({"alg": "HS256", "typ": "JWT"}, claims)


class Response:
    def __init__(self, status, headers, body: bytes):
        self.status = status
        self.headers = headers  # list of (lowercase name, value)
        self.body = body

    def header(self, name):
        for k, v in self.headers:
            if k == name.lower():
                return v
        return None

    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<{self.status} {self.body[:300]!r}>"


def request(port, method, path, headers=(), body=None, timeout=10.0) -> Response:
    """One HTTP/1.1 request; headers is a list of (name, value) pairs, so duplicates and raw
    bytes are possible."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            conn.putheader("content-type", "application/json")
            conn.putheader("content-length", str(len(data)))
            conn.endheaders(data)
        else:
            conn.endheaders()
        r = conn.getresponse()
        return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


def bearer(tok):
    return [("Authorization", f"Bearer {tok}")]


class Services:
    """The demo services, on free ports: {name: port}."""

    def __init__(self, names, auth="auth-service", versions=None):
        every = list(names) + ([auth] if auth else [])
        versions = versions or {}
        env = dict(os.environ, JWT_SECRET=SECRET)
        # A port free_port saw free can be taken (or handed out twice) before the services
        # bind it: distinct ports, and a few tries with new ones.
        for attempt in range(3):
            ports = set()
            while len(ports) < len(every):
                ports.add(free_port())
            self.ports = dict(zip(every, sorted(ports)))
            args = [sys.executable, str(SERVICES)]
            for n in names:
                args += ["--echo", f"{n}={self.ports[n]}:{versions.get(n, 'v1')}"]
            if auth:
                args += ["--auth", f"{auth}={self.ports[auth]}"]
            self.proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, text=True)
            line = self.proc.stdout.readline()
            if line.startswith("ready"):
                return
            self.stop()
        raise RuntimeError(f"demo services failed to start: {line!r}")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Gateway:
    """Envoy with the filter, from a gateway file (a dict, rendered by gateway-render)."""

    def __init__(self, gateway_file: dict, concurrency=2, env=None, admin_socket=False, istio=None, xds=False,
                 istio_root_id=None, shape=None, waypoint=False):
        """`admin_socket`: the admin interface on a Unix socket in the gateway's directory, and
        `admin_port` a metrics listener serving only /stats/prometheus and /ready.
        `istio`: a namespace; the bootstrap is then reshaped as istiod would send it (see
        `istio_shape`). `xds`: listener, routes, clusters and the filter's configuration as
        filesystem-xDS files (`gateway-render --xds`), so `reload` can change them live.
        `shape`: a function from the rendered bootstrap to the one Envoy starts with (a host's
        shape, e.g. `eg_shape.shape`)."""
        require_build()
        self.dir = Path(tempfile.mkdtemp(prefix="gw-e2e-"))
        self.port = free_port()
        self.admin_port = free_port()
        gateway_file = json.loads(json.dumps(gateway_file))
        gateway_file["gateway"].setdefault("runtime", RUNTIME)
        self.runtime = gateway_file["gateway"]["runtime"]
        if admin_socket:
            self.admin_socket = self.dir / "admin.sock"
            gateway_file["gateway"].update(port=self.port, address="127.0.0.1",
                                           admin={"socket": str(self.admin_socket)},
                                           metrics={"address": "127.0.0.1", "port": self.admin_port})
        else:
            gateway_file["gateway"].update(port=self.port, address="127.0.0.1",
                                           admin={"address": "127.0.0.1", "port": self.admin_port})
        self.gateway_yaml = self.dir / "gateway.yaml"
        self.gateway_yaml.write_text(json.dumps(gateway_file, indent=1))  # JSON is YAML
        self.envoy_yaml = self.dir / "envoy.yaml"
        self.env = dict(os.environ, JWT_SECRET=SECRET, **(env or {}))
        if istio:
            rendered = self.dir / "envoy.rendered.json"
            render(self.gateway_yaml, rendered, self.env, check=True, extra=["--json"])
            shaped = istio_shape(json.loads(rendered.read_text()), istio, istio_root_id, waypoint)
            self.envoy_yaml.write_text(json.dumps(shaped, indent=1))
            self.istio_clusters = {c["name"] for c in shaped["static_resources"]["clusters"]}
        elif shape:
            rendered = self.dir / "envoy.rendered.json"
            render(self.gateway_yaml, rendered, self.env, check=True, extra=["--json"])
            self.envoy_yaml.write_text(json.dumps(shape(json.loads(rendered.read_text())), indent=1))
        elif xds:
            self.xds_dir = self.dir / "xds"
            render(self.gateway_yaml, self.envoy_yaml, self.env, check=True, extra=["--xds", str(self.xds_dir)])
        else:
            render(self.gateway_yaml, self.envoy_yaml, self.env, check=True)
        self.ports_overrides = {k: gateway_file["gateway"][k] for k in ("port", "address", "admin", "metrics")
                                if k in gateway_file["gateway"]}
        self.log_path = self.dir / "envoy.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [str(ENVOY), "-c", str(self.envoy_yaml), "--concurrency", str(concurrency),
             "--disable-hot-restart", "-l", "warn", "--component-log-level", "wasm:info,dynamic_modules:info"],
            stdout=self.log, stderr=subprocess.STDOUT, env=self.env)  # the filter reads JWT_SECRET here
        try:
            wait_for(self._ready, timeout=20, what="envoy ready")
        except Exception:
            self.stop()
            raise RuntimeError("envoy did not start:\n" + self.log_path.read_text()[-3000:])

    def reload(self, gateway_file: dict, wait=False):
        """Renders a new version of the gateway file into the running Envoy's xDS files (the
        listener address and admin kept). Returns the renderer's result; on an error nothing is
        swapped. `wait`: as `make reload`, through scripts/await_config.py, which returns once
        Envoy reports the new versions in force (exit 1 if Envoy refused them)."""
        f = json.loads(json.dumps(gateway_file))
        f["gateway"].update(self.ports_overrides)
        f["gateway"].setdefault("runtime", RUNTIME)
        path = self.dir / "gateway.next.yaml"
        path.write_text(json.dumps(f, indent=1))
        args = [str(RENDER), "--config", str(path), "--wasm", str(WASM), "--xds", str(self.xds_dir)]
        return self.await_config(args) if wait else subprocess.run(args, env=self.env, capture_output=True, text=True)

    def await_config(self, command=(), timeout=20):
        """scripts/await_config.py: runs `command`, then waits for the xDS files in force."""
        args = [sys.executable, str(ROOT / "scripts" / "await_config.py"), "--xds", str(self.xds_dir),
                "--admin", f"127.0.0.1:{self.admin_port}", "--timeout", str(timeout), "--", *command]
        return subprocess.run(args, env=self.env, capture_output=True, text=True)

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError("envoy exited:\n" + self.log_path.read_text()[-3000:])
        try:
            return request(self.admin_port, "GET", "/ready", timeout=1).status == 200 and port_open(self.port)
        except OSError:
            return False

    def request(self, method, path, headers=(), body=None, timeout=10.0):
        return request(self.port, method, path, headers, body, timeout)

    def get(self, path, headers=()):
        return self.request("GET", path, headers)

    def stats(self, prefix=""):
        r = request(self.admin_port, "GET", f"/stats?filter={urllib.parse.quote(re.escape(prefix))}")
        out = {}
        for line in r.body.decode().splitlines():
            k, _, v = line.partition(": ")
            out[k] = v
        return out

    @property
    def stat_prefix(self) -> str:
        """Where Envoy puts the filter's own stats: `wasmcustom.` for the proxy-wasm build,
        `dynamicmodulescustom.` for the native one (both dropped in Prometheus output)."""
        return "dynamicmodulescustom." if self.runtime == "native" else "wasmcustom."

    def stat_name(self, name) -> str:
        """The /stats name of a filter metric named as the filter names it (Istio's tag syntax,
        `route=.=users;.;outcome=.=allowed;.;gateway_requests_total`): the same for the .wasm;
        the native module's labelled family is `family.tag.value...`."""
        if self.runtime != "native":
            return f"{self.stat_prefix}{name}"
        *pairs, family = name.split(";.;")
        labels = "".join(f".{tag}.{value}" for tag, value in (p.split("=.=", 1) for p in pairs))
        return f"{self.stat_prefix}{family}{labels}"

    def counter(self, name) -> int:
        """A filter counter as Envoy reports it (`wasmcustom.<name>` or its native twin)."""
        key = self.stat_name(name)
        return int(self.stats(key).get(key, "0"))

    def settled(self, *names) -> dict:
        """The counters once nothing is pending: every VM hands its counts to Envoy once a
        second, so two equal reads 1.5 s apart mean every earlier request has been counted.
        Use it to take a baseline and to read a final value."""
        last = {}

        def stable():
            nonlocal last
            now = {n: self.counter(n) for n in names}
            same, last = now == last, now
            return same
        wait_for(stable, timeout=15, what=f"counters {names} to settle", interval=1.5)
        return last

    def alive(self):
        return self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


ISTIO_PLUGIN = "gateway-policy"


WAYPOINT_PLUGIN = "gateway-policy-waypoint"


def shipped_plugin(waypoint=False):
    """The ingress (or waypoint) WasmPlugin as shipped."""
    path, name = ("waypoint.yaml", WAYPOINT_PLUGIN) if waypoint else ("wasmplugin.yaml", ISTIO_PLUGIN)
    docs = yaml.safe_load_all((ROOT / "envoy" / "istio" / path).read_text())
    return next(d for d in docs if d and d["kind"] == "WasmPlugin" and d["metadata"]["name"] == name)


def shipped_plugin_name(waypoint=False):
    """The WasmPlugin's `pluginName` as shipped ("" when unset, as there)."""
    return shipped_plugin(waypoint)["spec"].get("pluginName", "")


def istio_shape(bootstrap: dict, namespace: str, root_id=None, waypoint=False) -> dict:
    """The rendered bootstrap as istiod would shape it for a gateway with our WasmPlugin, each rule
    from istiod's code (istio/istio `pilot/pkg/model/extensions.go` @5add517bf6e0,
    `buildWasmPluginConfigCommon` and `buildVMConfig`; `pilot/pkg/model/service.go` @db913ee00a54,
    `BuildSubsetKey`): the plugin named `<ns>.<name>`, `root_id` from `pluginName`, no `vm_id`,
    runtime v8, the configuration a JSON StringValue, `failStrategy` mapped as is
    (FAIL_RELOAD -> FAIL_RELOAD), `valueFrom: HOST` -> `host_env_keys`, clusters
    `outbound|<port>||<host>`; a WasmPlugin of the default type is an HTTP filter only
    (`BuildHTTPWasmFilter`). istiod delivers the filter by ECDS under the name
    `extensions.istio.io/wasmplugin/<ns>.<name>`; here it stays inline. Concretely: every
    cluster (routes, canaries, webdis, key sets) named `outbound|<port>||<name>.<ns>.svc.cluster.local`,
    the Wasm filter named `<ns>.<plugin>` with `root_id` = the WasmPlugin's `pluginName` ("" as
    shipped, or `root_id`) and no `vm_id`, its
    configuration a JSON string referring to those cluster names, `FAIL_RELOAD`; secrets stay
    in the environment (`host_env_keys`). The stats configuration is istiod's
    (`istio_stats.py`, from Istio's bootstrap template) with the extra stat tags the shipped
    gateway values annotate, not the rendered one; the WasmPlugin is an HTTP filter, so the
    rendered connection cap (a network filter) is not there. Istio 1.28 (istio/istio
    #51861/#52031) suffixes every cluster's `alt_stat_name` and the connection manager's stat
    prefix with `;`.

    `waypoint`: the shape of an ambient waypoint (istio/istio tag 1.28.10) with the shipped
    `waypoint.yaml`: the plugin `<ns>.gateway-policy-waypoint`; the node id `waypoint~...`, so
    metadata discovery and its stats prefix (`pkg/bootstrap/config.go`); the extra stat tags
    from the waypoint Gateway's infrastructure annotations; the connection manager with
    `use_remote_address: false` and nothing done to `x-forwarded-for`
    (`pilot/pkg/networking/core/listener_waypoint.go`); the routed services' clusters
    `inbound-vip|<port>|http|<fqdn>` (`cluster_waypoint.go` buildWaypointInboundVIP) and the
    callout services' `outbound|<port>||<fqdn>`, built because the shipped EnvoyFilter names them
    in `envoyfilter.istio.io/referenced-services` (`waypoint.go`
    filterWaypointOutboundServices)."""
    b = json.loads(json.dumps(bootstrap))
    if waypoint:
        docs = yaml.safe_load_all((ROOT / "envoy" / "istio" / "waypoint.yaml").read_text())
        gw = next(d for d in docs if d and d["kind"] == "Gateway")
        extra = gw["spec"]["infrastructure"]["annotations"]["sidecar.istio.io/extraStatTags"].split(",")
        b["node"] = {"id": f"waypoint~127.0.0.1~waypoint-0.{namespace}~{namespace}.svc.cluster.local",
                     "cluster": f"waypoint.{namespace}",
                     "metadata": {"LABELS": {"gateway.networking.k8s.io/gateway-name": "waypoint",
                                             "gateway.networking.k8s.io/gateway-class-name": "istio-waypoint"}}}
    else:
        values = yaml.safe_load((ROOT / "envoy" / "istio" / "helm" / "gateway-values.yaml").read_text())
        extra = values["podAnnotations"]["sidecar.istio.io/extraStatTags"].split(",")
    b["stats_config"] = istio_stats.stats_config(extra, waypoint=waypoint)
    callouts = set()
    for listener in b["static_resources"]["listeners"]:
        for chain in listener.get("filter_chains", []):
            for f in chain.get("filters", []):
                for hf in f.get("typed_config", {}).get("http_filters", []):
                    if hf["name"] == "envoy.filters.http.wasm":
                        text = hf["typed_config"]["config"]["configuration"]["value"]
                        callouts |= set(re.findall(r'"cluster": ?"([^"]+)"', text))
                        callouts |= set(re.findall(r'"webdis_cluster": ?"([^"]+)"', text))
    renamed = {}
    for c in b["static_resources"]["clusters"]:
        if c["name"] == "envoy-admin":
            continue
        ep = c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
        fqdn = f"{c['name']}.{namespace}.svc.cluster.local"
        if waypoint and c["name"] not in callouts:
            new = f"inbound-vip|{ep['port_value']}|http|{fqdn}"
        else:
            new = f"outbound|{ep['port_value']}||{fqdn}"
        renamed[c["name"]] = new
        c["name"] = new
        c["alt_stat_name"] = new + ";"
        c["load_assignment"]["cluster_name"] = new

    def walk(node):
        if isinstance(node, dict):
            for k, v in node.items():
                if k == "cluster" and isinstance(v, str) and v in renamed:
                    node[k] = renamed[v]
                else:
                    walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)
    for listener in b["static_resources"]["listeners"]:
        walk(listener.get("filter_chains", []))
        for chain in listener.get("filter_chains", []):
            chain["filters"] = [f for f in chain.get("filters", []) if f["name"] != "envoy.filters.network.wasm"]
            for f in chain.get("filters", []):
                tc = f.get("typed_config", {})
                if "stat_prefix" in tc and "http_filters" in tc and listener["name"] == "gateway":
                    tc["stat_prefix"] += ";"
                    if waypoint:
                        tc["use_remote_address"] = False
                        tc.pop("early_header_mutation_extensions", None)
                for hf in tc.get("http_filters", []):
                    if hf["name"] != "envoy.filters.http.wasm":
                        continue
                    cfg = hf["typed_config"]["config"]
                    cfg["name"] = f"{namespace}.{WAYPOINT_PLUGIN if waypoint else ISTIO_PLUGIN}"
                    # istiod (pilot/pkg/model/extensions.go) sets root_id from the WasmPlugin's
                    # pluginName, empty unless set: the shipped manifests leave it unset.
                    cfg["root_id"] = shipped_plugin_name(waypoint) if root_id is None else root_id
                    cfg["vm_config"].pop("vm_id", None)
                    cfg["failure_policy"] = "FAIL_RELOAD"  # the WasmPlugins' failStrategy
                    plugin = json.loads(cfg["configuration"]["value"])
                    if "webdis_cluster" in plugin:
                        plugin["webdis_cluster"] = renamed[plugin["webdis_cluster"]]
                    store = plugin.get("logs", {}).get("store") or {}
                    if store.get("cluster"):
                        store["cluster"] = renamed[store["cluster"]]
                    for issuer in plugin.get("jwt", {}).get("issuers", []):
                        remote = issuer.get("remote_jwks")
                        if remote and remote.get("cluster") in renamed:
                            remote["cluster"] = renamed[remote["cluster"]]
                    cfg["configuration"]["value"] = json.dumps(plugin)
    return b


def render(gateway_yaml, out, env, check=False, extra=()):
    args = [str(RENDER), "--config", str(gateway_yaml), "--wasm", str(WASM), "--out", str(out), *extra]
    r = subprocess.run(args, env=env, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"gateway-render failed: {r.stderr}")
    return r


class Redis:
    """redis-server from config/redis.conf on a free port."""

    def __init__(self, password=None):
        self.port = free_port()
        self.password = password
        self.dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))
        self.start()

    def start(self):
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            ["redis-server", str(ROOT / "config" / "redis.conf"), "--port", str(self.port), "--dir", str(self.dir),
             *auth],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what="redis")

    def cli(self, *args) -> str:
        auth = ["--no-auth-warning", "-a", self.password] if self.password else []
        r = subprocess.run(["redis-cli", "-p", str(self.port), *auth, *map(str, args)], capture_output=True, text=True,
                           check=True)
        return r.stdout.strip()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        wait_for(lambda: not port_open(self.port), what="redis to stop")


class Webdis:
    """webdis from config/webdis.json (ports and log file changed) in front of a Redis;
    `disabled` lists commands to refuse besides the shipped ACL."""

    def __init__(self, redis_port, port=None, disabled=(), credentials=None, redis_password=None):
        """`credentials` (`user:password`): the shipped command list only for callers that
        present them (HTTP basic), nothing for anyone else."""
        self.port = port or free_port()
        self.redis_port = redis_port
        self.disabled = list(disabled)
        self.credentials = credentials
        self.redis_password = redis_password
        self.dir = Path(tempfile.mkdtemp(prefix="gw-webdis-"))
        self.start()

    def start(self):
        cfg = json.loads((ROOT / "config" / "webdis.json").read_text())
        cfg.update(redis_port=self.redis_port, http_port=self.port, logfile=str(self.dir / "webdis.log"))
        if self.disabled:
            cfg["acl"].append({"disabled": self.disabled})
        if self.credentials:
            for rule in cfg["acl"]:
                if "enabled" in rule:
                    rule["http_basic_auth"] = self.credentials
        if self.redis_password:
            cfg["redis_auth"] = self.redis_password
        path = self.dir / "webdis.json"
        path.write_text(json.dumps(cfg))
        self.proc = subprocess.Popen(["webdis", str(path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: port_open(self.port), what="webdis")

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        wait_for(lambda: not port_open(self.port), what="webdis to stop")


class StaticServer:
    """An HTTP/1.1 server that answers every GET 200 with `self.body` (a test may change it at
    any time): a key server, or a body that is not a webdis reply. A client that leaves in the
    middle of a large body is ignored."""

    def __init__(self, body=b"<html>not webdis</html>"):
        import http.server
        import threading
        self.body = body
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                body = outer.body
                self.send_response(200)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                try:
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


GarbageServer = StaticServer


def connect_from(port, source):
    """A TCP connection to the gateway from loopback address `source` (127.x.y.z)."""
    import socket
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.settimeout(5)
    s.connect(("127.0.0.1", port))
    return s


def get_from(port, source, path, headers=()):
    """The status of one request from `source`; None when the connection was refused."""
    try:
        s = connect_from(port, source)
    except (ConnectionResetError, ConnectionRefusedError):
        return None
    try:
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers)
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: gw\r\n{extra}Connection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        return int(data.split(b" ", 2)[1]) if data else None
    except (ConnectionResetError, BrokenPipeError):
        return None
    finally:
        s.close()


def closed_by_peer(s, within=2.0):
    """Whether the gateway closed socket `s` within `within` seconds."""
    s.settimeout(within)
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except OSError:  # timeout: still open
        return False


class DelayProxy:
    """A TCP relay that holds each request from Envoy for `delay` seconds before passing it to
    the real webdis, and counts the webdis commands it sees: it widens the window in which
    concurrent requests overlap, and measures the calls on the wire."""

    def __init__(self, target_port, delay):
        import socketserver
        import threading

        self.commands = []
        self.lock = threading.Lock()
        proxy = self

        class Relay(socketserver.BaseRequestHandler):
            def handle(self):
                upstream = socket.create_connection(("127.0.0.1", target_port))
                done = threading.Event()

                def back():
                    try:
                        while (data := upstream.recv(65536)):
                            self.request.sendall(data)
                    except OSError:
                        pass
                    done.set()
                threading.Thread(target=back, daemon=True).start()
                try:
                    while (data := self.request.recv(65536)):
                        for line in data.split(b"\r\n"):
                            if line[:4] in (b"GET ", b"PUT ") and b" HTTP/" in line:
                                with proxy.lock:
                                    proxy.commands.append(line.split(b" ")[1].split(b"/")[1].decode())
                        time.sleep(delay)
                        upstream.sendall(data)
                except OSError:
                    pass
                upstream.close()
                done.wait(1)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", 0), Relay)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def count(self, command):
        with self.lock:
            return self.commands.count(command)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def _crc16_table():
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        table.append(crc & 0xFFFF)
    return table


CRC16 = _crc16_table()


def key_slot(key: str) -> int:
    """Redis Cluster's hash slot of a key (CRC16/XMODEM mod 16384, hash tags honoured)."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1:end]
    crc = 0
    for b in data:
        crc = ((crc << 8) & 0xFFFF) ^ CRC16[((crc >> 8) ^ b) & 0xFF]
    return crc % 16384


def revocation_id(tok: str) -> str:
    """The filter's revocation id: SHA-256 of the signing input, base64url without padding."""
    signing_input = tok.rsplit(".", 1)[0].encode()
    return base64.urlsafe_b64encode(hashlib.sha256(signing_input).digest()).rstrip(b"=").decode()


NODE_TIMEOUT_MS = 2000


class RedisCluster:
    """Six redis-server processes in cluster mode, three primaries with a replica each."""

    def __init__(self):
        self.dir = Path(tempfile.mkdtemp(prefix="gw-fleet-redis-"))
        self.ports = sorted({free_port() for _ in range(12)})[:6]
        self.procs = {}
        for p in self.ports:
            (self.dir / str(p)).mkdir()
            self.start(p)
        nodes = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create", *nodes, "--cluster-replicas", "1", "--cluster-yes"],
                       check=True, capture_output=True, text=True, timeout=60)
        self.wait_healthy()

    def start(self, port):
        d = self.dir / str(port)
        self.procs[port] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
             "--cluster-config-file", "nodes.conf", "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--save", "", "--appendonly", "no", "--dir", str(d),
             # A primary without a replica in sync (2 s) refuses writes instead of acknowledging
             # what one more failure would lose.
             "--min-replicas-to-write", "1", "--min-replicas-max-lag", "2"],
            stdout=open(d / "redis.log", "a"), stderr=subprocess.STDOUT)
        wait_for(lambda: port_open(port), what=f"redis {port}")

    def cli(self, port, *args, timeout=5):
        r = subprocess.run(["redis-cli", "-p", str(port), *map(str, args)], capture_output=True, text=True,
                           timeout=timeout)
        return r.stdout.strip()

    def live(self):
        return [p for p in self.ports if self.procs[p].poll() is None]

    def nodes(self):
        """(port, role, master_port or None, failed) of every node, as a live node sees them."""
        out = []
        text = self.cli(self.live()[0], "cluster", "nodes")
        ids = {}
        rows = [line.split() for line in text.splitlines() if line.strip()]
        for r in rows:
            ids[r[0]] = int(r[1].split("@")[0].rsplit(":", 1)[1])
        for r in rows:
            port = ids[r[0]]
            flags = r[2]
            role = "master" if "master" in flags else "replica"
            out.append((port, role, ids.get(r[3]), "fail" in flags))
        return out

    def primaries(self):
        return [p for p, role, _, failed in self.nodes() if role == "master" and not failed and p in self.live()]

    def replica_of(self, primary):
        return next(p for p, role, master, failed in self.nodes()
                    if role == "replica" and master == primary and not failed and p in self.live())

    def slots_of(self, primary):
        """The hash slots a primary serves, from `CLUSTER NODES`."""
        slots = set()
        for line in self.cli(primary, "cluster", "nodes").splitlines():
            fields = line.split()
            if len(fields) < 9 or "myself" not in fields[2]:
                continue
            for r in fields[8:]:
                if r.startswith("["):
                    continue
                lo, _, hi = r.partition("-")
                slots.update(range(int(lo), int(hi or lo) + 1))
        return slots

    def healthy(self):
        try:
            live = self.live()
            if any("cluster_state:ok" not in self.cli(p, "cluster", "info") for p in live):
                return False
            nodes = self.nodes()
            masters = [p for p, role, _, failed in nodes if role == "master" and not failed and p in live]
            if len(masters) != 3:
                return False
            # Every primary has a live replica that is in sync.
            for m in masters:
                replicas = [p for p, role, master, failed in nodes if role == "replica" and master == m
                            and not failed and p in live]
                if not any("master_link_status:up" in self.cli(r, "info", "replication") for r in replicas):
                    return False
            return True
        except (subprocess.SubprocessError, IndexError, ValueError):
            return False

    def wait_healthy(self, timeout=60):
        wait_for(self.healthy, timeout=timeout, what="the Redis cluster to be whole", interval=0.25)

    def commands(self):
        """Calls per command summed over the live primaries (`INFO commandstats`)."""
        out = {}
        for p in self.primaries():
            for line in self.cli(p, "info", "commandstats").splitlines():
                if line.startswith("cmdstat_"):
                    name, _, rest = line.partition(":")
                    calls = int(rest.split(",")[0].split("=")[1])
                    out[name[8:]] = out.get(name[8:], 0) + calls
        return out

    def cut(self, primary, replica):
        """Drops what `primary` sends on its replication link to `replica` (one direction: the
        replica's acknowledgements still arrive). Returns the rule, for `heal`."""
        link = None
        for line in self.cli(primary, "client", "list", "type", "replica").splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            link = int(fields["addr"].rsplit(":", 1)[1])
        assert link, f"no replication link on {primary}"
        rule = ["OUTPUT", "-p", "tcp", "--sport", str(primary), "--dport", str(link), "-j", "DROP"]
        subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True, timeout=10)
        return rule

    @staticmethod
    def heal(rule):
        subprocess.run(["iptables", "-D", *rule], check=True, capture_output=True, timeout=10)

    def kill(self, port):
        self.procs[port].send_signal(signal.SIGKILL)
        self.procs[port].wait(timeout=10)

    def stop(self):
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
        shutil.rmtree(self.dir, ignore_errors=True)
