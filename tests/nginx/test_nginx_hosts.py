"""The built module in real nginx-based proxy-wasm hosts, with real Redis, webdis and demo
services on free loopback ports:

- `make kong-test KONG_NGINX=/path/nginx`: an nginx built with Kong's ngx_wasm_module (its own
  build instructions: nginx `./configure --add-module=<ngx_wasm_module>` with a Wasm runtime
  such as Wasmtime's C API);
- `make apisix-test APISIX_NGINX=/path/nginx APISIX_LUA_PATH='...'`: an OpenResty-style nginx
  (lua-nginx-module) built with APISIX's wasm-nginx-module, and a `lua_package_path` that finds
  `resty.proxy-wasm` (the module's `lib/`), `resty.http` and `resty.core`, as an APISIX
  install has them.

Neither module is in the Debian, PyPI or npm registries, so these suites need the binaries
given; without them they fail (never skip). They are not part of `make test`.

Each nginx configuration is the one the README shows for that host. Kong: the module in `wasm{}`
with a `shm_kv *` zone (shared data, no eviction), the filter on the server with its JSON
configuration, `env JWT_SECRET` so the filter's `secret_env` reaches the workers. APISIX: the
filter driven from Lua as APISIX's wasm plugin does (`resty.proxy-wasm`: load, configure on
first use, `on_http_request_headers` in the access phase, callouts made by Lua's HTTP client),
one worker (APISIX has no shared data: each worker keeps its own buckets). nginx routes to each
service by path, and to the canary by the header the filter writes."""

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import (ROOT, SECRET, Redis, Services, Webdis, bearer, free_port, port_open,  # noqa: E402
                     request, token, wait_for)

WASM = ROOT / "build" / "gateway_filter.wasm"
HOSTS = [h for h in ("kong", "apisix") if os.environ.get(f"{h.upper()}_NGINX")] or ["kong", "apisix"]
ROUTES = ["user-service", "product-service", "order-service"]


def filter_config(webdis_port, failure_mode="deny"):
    return {
        "gateway": {"prefix": "/api/v1", "name": "kong-gateway"},
        "webdis_cluster": f"127.0.0.1:{webdis_port}",
        "jwt": {"algorithms": ["HS256"], "secret_env": "JWT_SECRET"},
        "revocation": {"cache_ttl": 0, "failure_mode": failure_mode},
        "logs": {"enabled": True},
        "routes": [
            {"name": "user-service", "prefix": "/users", "methods": ["GET"]},
            {"name": "product-service", "prefix": "/products", "methods": ["GET"], "auth_required": False},
            {"name": "limited", "prefix": "/limited", "methods": ["GET"], "auth_required": False,
             "rate_limit": {"max_calls": 3, "period": 60}},
            {"name": "order-service", "prefix": "/orders", "methods": ["GET"],
             "canary": {"users": ["user-001"]}},
            {"name": "auth-service", "prefix": "/auth", "methods": ["POST"], "auth_required": False},
        ],
    }


ROUTING = """
    # nginx routes; the filter decides. The canary header is the one the filter writes.
    map "$uri|$http_x_gateway_canary" $backend {{
        default                      127.0.0.1:{dead};
        ~^/api/v1/users              127.0.0.1:{users};
        ~^/api/v1/products           127.0.0.1:{products};
        ~^/api/v1/limited            127.0.0.1:{products};
        "~^/api/v1/orders[^|]*\\|1$" 127.0.0.1:{orders_v2};
        ~^/api/v1/orders             127.0.0.1:{orders};
        ~^/api/v1/auth               127.0.0.1:{auth};
    }}
"""

# What both hosts' configurations start with (`{workers}` nginx workers).
PREAMBLE = """
daemon off;
master_process on;
worker_processes {workers};
error_log {dir}/error.log info;
pid {dir}/nginx.pid;
env JWT_SECRET;

events {{ worker_connections 256; }}
"""

KONG_CONF = PREAMBLE + """
wasm {{
    module gateway {wasm};
    shm_kv * 16m eviction=none;
    metrics {{ max_metric_name_length 512; }}
}}

http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;

{routing}
    server {{
        listen 127.0.0.1:{port};
        proxy_wasm gateway '{config}';
        location / {{
            proxy_pass http://$backend;
        }}
    }}
}}
"""


APISIX_CONF = PREAMBLE + """
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    lua_package_path "{lua_path}";
    wasm_vm wasmtime;

    init_worker_by_lua_block {{
        local wasm = require("resty.proxy-wasm")
        gateway_plugin = assert(wasm.load("gateway", "{wasm}"))
    }}
{routing}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            access_by_lua_block {{
                -- As APISIX's wasm plugin: configure on first use, then the request headers.
                local wasm = require("resty.proxy-wasm")
                if not gateway_ctx then
                    gateway_ctx = assert(wasm.on_configure(gateway_plugin, [==[{config}]==]))
                end
                local ok, err = wasm.on_http_request_headers(gateway_ctx)
                if not ok then
                    ngx.log(ngx.ERR, "gateway filter: ", err)
                    return ngx.exit(500)
                end
            }}
            proxy_pass http://$backend;
        }}
    }}
}}
"""


class Nginx:
    def __init__(self, host, nginx, services, canary, webdis_port, failure_mode="deny"):
        self.host = host
        self.dir = Path(tempfile.mkdtemp(prefix=f"gw-{host}-"))
        self.port = free_port()
        ports = dict(
            dead=free_port(), users=services.ports["user-service"], products=services.ports["product-service"],
            orders=services.ports["order-service"], orders_v2=canary.ports["order-service"],
            auth=services.ports["auth-service"])
        template, self.workers = (KONG_CONF, 2) if host == "kong" else (APISIX_CONF, 1)
        conf = template.format(
            workers=self.workers, dir=self.dir, wasm=WASM, port=self.port, routing=ROUTING.format(**ports),
            lua_path=os.environ.get("APISIX_LUA_PATH", ""),
            config=json.dumps(filter_config(webdis_port, failure_mode)))
        (self.dir / "nginx.conf").write_text(conf)
        env = dict(os.environ, JWT_SECRET=SECRET)
        self.proc = subprocess.Popen([nginx, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for(lambda: port_open(self.port) or self.proc.poll() is not None, timeout=60, what=f"{host} nginx")
        except TimeoutError:
            self.stop()
            raise
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited {self.proc.returncode}:\n{self.log()[-4000:]}")

    def log(self) -> str:
        p = self.dir / "error.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def get(self, path, headers=()):
        return request(self.port, "GET", path, headers)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=20)


@pytest.fixture(scope="module", params=HOSTS)
def stack(request):
    host = request.param
    var = f"{host.upper()}_NGINX"
    path = os.environ.get(var)
    if not path or not Path(path).exists():
        pytest.fail(f"{var} must name an nginx built with the {host} module (see this file's docstring)")
    if host == "apisix" and not os.environ.get("APISIX_LUA_PATH"):
        pytest.fail("APISIX_LUA_PATH must find resty.proxy-wasm, resty.http and resty.core")
    if not WASM.exists():
        pytest.fail("build/gateway_filter.wasm is missing: run `make build` first")
    redis = Redis()
    webdis = Webdis(redis.port)
    services = Services(ROUTES, versions={})
    canary = Services(["order-service"], auth=None, versions={"order-service": "v2"})
    try:
        kong = Nginx(host, path, services, canary, webdis.port)
    except Exception:
        for p in (canary, services, webdis, redis):
            p.stop()
        raise
    yield kong, redis, webdis
    kong.stop()
    for p in (canary, services, webdis, redis):
        p.stop()


def body(r):
    return r.json() if r.body else {}


def test_loads_on_every_worker_without_a_trap(stack):
    kong, _, _ = stack
    if kong.host == "apisix":
        # Configured on first use, as APISIX does.
        kong.get("/api/v1/products/1")
    workers = kong.workers
    wait_for(lambda: kong.log().count("host offers:") >= workers, timeout=20, what="each worker's start-up line")
    log = kong.log()
    offers = re.findall(r"host offers: [^\n]*", log)
    expected = "shared data yes, timers yes" if kong.host == "kong" else "shared data no, timers no"
    assert len(offers) == workers and all(expected in o for o in offers), offers
    for bad in ("trap", "panicked", "[emerg]", "[crit]"):
        assert bad not in log, f"{bad!r} in the error log:\n{log[-4000:]}"


def test_public_route_goes_upstream(stack):
    kong, _, _ = stack
    r = kong.get("/api/v1/products/1")
    assert r.status == 200, r
    assert body(r)["service"] == "product-service"


def test_missing_and_bad_tokens_are_refused_with_json(stack):
    kong, _, _ = stack
    r = kong.get("/api/v1/users/1")
    assert r.status == 401 and r.header("content-type") == "application/json", r
    assert "message" in body(r) or "detail" in body(r), r
    tampered = token()[:-2] + "xx"
    r = kong.get("/api/v1/users/1", bearer(tampered))
    assert r.status == 401, r


def test_valid_token_reaches_upstream_with_the_identity(stack):
    kong, _, _ = stack
    r = kong.get("/api/v1/users/1", bearer(token(sub="user-007", role="user")))
    assert r.status == 200, r
    headers = {k.lower(): v for k, v in body(r)["headers"].items()}
    assert headers.get("x-user-id") == "user-007", headers
    assert headers.get("x-user-role") == "user", headers


@pytest.mark.parametrize("name", ["X-User-Id", "x-user-role", "X-Gateway-Canary"])
def test_a_forged_gateway_header_is_never_forwarded(stack, name):
    # Kong: nginx's proxy module forwards a request header Kong's module removed (it only marks
    # the entry), so the filter refuses a client's copy of a header only the gateway writes.
    # APISIX: OpenResty takes every copy out of nginx's list, so the filter strips them, as on
    # Envoy (two copies sent).
    kong, _, _ = stack
    for path, headers in (("/api/v1/products/1", []), ("/api/v1/users/1", bearer(token(sub="user-007")))):
        r = kong.get(path, headers + [(name, "forged"), (name.lower(), "forged")])
        if kong.host == "kong":
            assert r.status == 400, r
            assert "is set by the gateway" in body(r)["message"], r
        else:
            assert r.status == 200, r
            seen = {k.lower(): v for k, v in body(r)["headers"].items()}
            assert "forged" not in seen.get(name.lower(), ""), seen


def test_logout_revokes_through_webdis_and_redis(stack):
    kong, redis, _ = stack
    tok = token(sub="user-042", role="user")
    assert kong.get("/api/v1/users/1", bearer(tok)).status == 200
    r = request(kong.port, "POST", "/api/v1/auth/logout", bearer(tok))
    assert r.status == 200, r
    assert redis.cli("EXISTS", f"token:blacklist:{tok}") == "1"
    # Both workers, fresh connections: every one refuses the token.
    for _ in range(6):
        r = kong.get("/api/v1/users/1", bearer(tok))
        assert r.status == 401 and body(r)["message"] == "Token has been revoked", r


def test_route_limit_holds(stack):
    # Kong: two workers share the buckets (shm_kv); APISIX: one worker, its own buckets.
    kong, _, _ = stack
    statuses = [kong.get("/api/v1/limited/x").status for _ in range(6)]
    assert statuses[:3] == [200, 200, 200] and set(statuses[3:]) == {429}, statuses


def test_canary_user_is_routed_to_v2_by_the_filters_header(stack):
    kong, _, _ = stack
    r = kong.get("/api/v1/orders/1", bearer(token(sub="user-001", role="user")))
    assert r.status == 200 and body(r)["version"] == "v2", r
    r = kong.get("/api/v1/orders/1", bearer(token(sub="user-002", role="user")))
    assert r.status == 200 and body(r)["version"] == "v1", r
    # A client cannot pick the canary by sending the header itself: refused on Kong, stripped
    # on APISIX (see above).
    r = kong.get("/api/v1/orders/1", bearer(token(sub="user-002", role="user")) + [("x-gateway-canary", "1")])
    if kong.host == "kong":
        assert r.status == 400, r
    else:
        assert r.status == 200 and body(r)["version"] == "v1", r


def test_store_down_fails_closed(stack):
    kong, _, webdis = stack
    webdis.stop()
    try:
        r = kong.get("/api/v1/users/1", bearer(token(sub="user-099", role="user")))
        assert r.status == 503, r
        assert kong.get("/api/v1/products/x").status in (200, 429)
    finally:
        webdis.start()
    wait_for(lambda: kong.get("/api/v1/users/1", bearer(token(sub="user-099", role="user"))).status == 200,
             what="service back with webdis")


def test_no_trap_after_the_cases(stack):
    kong, _, _ = stack
    time.sleep(1.5)  # a counter flush on each worker
    log = kong.log()
    for bad in ("trap", "panicked", "[emerg]", "[crit]"):
        assert bad not in log, f"{bad!r} in the error log:\n{log[-4000:]}"
