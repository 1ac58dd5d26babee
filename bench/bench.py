#!/usr/bin/env python3
"""`make bench`: the cost per request of the gateway filter against plain Envoy and Envoy's
native filters, measured in one run on this machine.

Systems (each an Envoy with --concurrency 1 in front of one nginx returning a small JSON body):
  A        the router alone
  B        native jwt_authn (HS256, inline JWKS with an oct key, claims to headers),
           local_ratelimit (never reached) and a header mutation
  C        this filter, full policy: JWT, revocation with its 1 s cache (webdis + Redis), the
           three buckets (never reached), canary decision, trace ids, the JSON log line
  C-jwt    this filter, JWT and trace ids only
  N, N-jwt C's and C-jwt's configurations with `gateway.runtime: native`: the same policy as an
           Envoy dynamic module (build/libgateway_filter.so) instead of the .wasm
  C-nocache  full policy with the revocation cache off (a webdis call per request)
  E        C's configuration with the filter disabled on every route (Envoy's per-route
           `disabled`): the module is loaded, configured and ticking, no request enters it. Its
           peak RSS is the memory floor of a VM with this module; its CPU is A's plus the ticks
  F        A plus an HTTP dynamic-module filter whose hooks all return at once
           (bench/empty_module.c): the floor of any native module, N's baseline
  X        C's chain with an empty proxy-wasm module (bench/empty_filter.wat: every callback returns
           at once) in place of this one: V8's cost for any module; C over X is this module's own
  R        the reference Python gateway as the tutorial builds it (bench/reference_gateway.py:
           FastAPI, httpx, python-jose, Redis with the Lua sliding window, one uvicorn worker),
           in its own virtualenv (.venv-bench); its CPU is uvicorn's
  K-*      JWT only, tokens of an identity provider (local JWKS): RS256, ES256 and EdDSA with
           one token (verified once, then from the token cache), and RS256 with 10 000
           distinct tokens in turn (almost every request a cache miss), its signature checked by
           Envoy's verify_signature (K-rs256-distinct) or by the module's own code in V8
           (K-rs256-distinct-wasm)

Rounds are interleaved (A B C ... A B C ...); wrk keeps connections alive at fixed concurrency
and every request carries a valid token. Per system: Envoy CPU microseconds per request
(utime+stime from /proc over each run / completed requests), requests per second, p50 and p99
latency, peak RSS (VmHWM) and the error count (any non-2xx fails the run). Medians over rounds.
The CPU of webdis and Redis is read over each run too: for the systems that use them (C,
C-nocache; Redis for R) the table shows Envoy alone and Envoy + sidecars per request.
`--compare-wasm OLD.wasm` adds C-alt and C-jwt-alt (the same configuration with another module,
for before/after figures side by side); `--compare-native OTHER.so` adds N-alt and N-jwt-alt. The host calls per request path come from the filter's
pinned native test (FakeHost counts every call).
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import memory  # noqa: E402  (bench/memory.py, which imports this module back for its helpers)
ENVOY = ROOT / ".venv" / "bin" / "envoy"
RENDER = ROOT / "target" / "release" / "gateway-render"
WASM = ROOT / "build" / "gateway_filter.wasm"
SECRET = "bench-secret-bench-secret-bench-secret"
CLK_TCK = os.sysconf("SC_CLK_TCK")
README = ROOT / "README.md"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=15):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} did not open")


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def hs256(claims):
    h = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    p = b64url(json.dumps(claims).encode())
    sig = hmac.new(SECRET.encode(), f"{h}.{p}".encode(), hashlib.sha256).digest()
    return f"{h}.{p}.{b64url(sig)}"


def cpu_ticks(pid):
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def peak_rss_mb(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def socket_address(port):
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def static_cluster(name, port):
    return {"name": name, "type": "STATIC", "load_assignment": {"cluster_name": name, "endpoints": [
        {"lb_endpoints": [{"endpoint": {"address": socket_address(port)}}]}]}}


def plain_bootstrap(port, admin, upstream, filters, route_extra=None):
    route = {"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}
    route.update(route_extra or {})
    return {
        "admin": {"address": socket_address(admin)},
        "static_resources": {
            "listeners": [{"name": "l", "address": socket_address(port), "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                    "stat_prefix": "bench",
                    "route_config": {"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [route]}]},
                    "http_filters": filters + [{"name": "envoy.filters.http.router", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}],
                }}]}]}],
            "clusters": [static_cluster("upstream", upstream)],
        },
    }


def empty_module_filter(path):
    """An HTTP dynamic-module filter from `path` (system F's: bench/empty_module.c)."""
    return {"name": "envoy.filters.http.dynamic_modules", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.dynamic_modules.v3.DynamicModuleFilter",
        "dynamic_module_config": {"module": {"local": {"filename": str(path)}}, "do_not_close": True},
        "filter_name": "empty", "filter_config": {
            "@type": "type.googleapis.com/google.protobuf.StringValue", "value": ""}}}


def native_filters():
    jwks = json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": b64url(SECRET.encode())}]})
    return [
        {"name": "envoy.filters.http.jwt_authn", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            "providers": {"gw": {
                "local_jwks": {"inline_string": jwks},
                "forward": True,
                "claim_to_headers": [{"header_name": "x-user-id", "claim_name": "sub"},
                                     {"header_name": "x-user-name", "claim_name": "name"},
                                     {"header_name": "x-user-role", "claim_name": "role"}],
            }},
            "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "gw"}}],
        }},
        {"name": "envoy.filters.http.local_ratelimit", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
            "stat_prefix": "rl",
            "token_bucket": {"max_tokens": 1000000000, "tokens_per_fill": 1000000000, "fill_interval": "1s"},
            "filter_enabled": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl_on"},
            "filter_enforced": {"default_value": {"numerator": 100, "denominator": "HUNDRED"}, "runtime_key": "rl_enf"},
            "enable_x_ratelimit_headers": "DRAFT_VERSION_03",
        }},
        {"name": "envoy.filters.http.header_mutation", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
            "mutations": {"request_mutations": [
                {"append": {"header": {"key": "x-gateway", "value": "envoy-native"},
                            "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}}]},
        }},
    ]


VECTORS = json.loads((ROOT / "bench" / "verify_vectors.json").read_text())


class DistinctSigner:
    """A fresh RSA key (made for this run, never stored) that signs distinct RS256 tokens."""

    def __init__(self):
        from cryptography.hazmat.primitives.asymmetric import rsa  # in the repository's .venv
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        n = self.key.public_key().public_numbers()
        as_b64 = lambda i: b64url(i.to_bytes((i.bit_length() + 7) // 8, "big"))  # noqa: E731
        self.jwk = {"kty": "RSA", "kid": "bench-distinct", "alg": "RS256", "n": as_b64(n.n), "e": as_b64(n.e)}

    def write_tokens(self, n, path):
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric import padding
        now = int(time.time())
        head = b64url(json.dumps({"alg": "RS256", "kid": "bench-distinct"}).encode())
        with open(path, "w") as out:
            for i in range(n):
                body = b64url(json.dumps({"sub": f"u{i % 100}", "role": "user", "iss": "https://bench.example",
                                          "iat": now, "exp": now + 86400, "jti": str(i)}).encode())
                sig = self.key.sign(f"{head}.{body}".encode(), padding.PKCS1v15(), hashes.SHA256())
                out.write(f"{head}.{body}.{b64url(sig)}\n")


def keys_file(upstream, extra_jwk, host_verification=True):
    """JWT only, with an identity provider whose keys are the bench vectors' (and one more)."""
    f = gateway_file(upstream, None, full=False)
    f["jwt"]["host_verification"] = host_verification
    jwks = {"keys": VECTORS["jwks"]["keys"] + [extra_jwk]}
    f["jwt"]["issuers"] = [{"name": "bench-idp", "issuer": "https://bench.example",
                            "algorithms": ["RS256", "ES256", "EdDSA"], "local_jwks": jwks}]
    return f


def gateway_file(upstream, webdis, full=True, cache_ttl=1.0):
    up = f"http://127.0.0.1:{upstream}"
    route = {"name": "bench", "prefix": "/bench", "upstream": up, "methods": ["GET"], "auth_required": True}
    f = {"gateway": {"prefix": "/api/v1", "cors": {"enabled": False}},
         "jwt": {"secret_env": "JWT_SECRET"}, "routes": [route], "logs": {"enabled": full}}
    if full:
        big = {"max_calls": 1000000000, "period": 1}
        route["rate_limit"] = dict(big, per_user=big, per_ip=big)
        route["canary"] = {"upstream": up, "percent": 10, "users": ["someone-else"], "header": "X-Canary"}
        f["webdis"] = f"http://127.0.0.1:{webdis}"
        f["revocation"] = {"cache_ttl": cache_ttl}
    return f


class Proc:
    def __init__(self, args, log, env=None):
        self.log = open(log, "w")
        self.p = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                  start_new_session=True)

    def stop(self):
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
        self.log.close()


class ReferenceSystem:
    """System R: the Python gateway under uvicorn, one worker."""

    def __init__(self, tmp, upstream, redis_port):
        self.name = "R"
        self.port = free_port()
        env = dict(os.environ, JWT_SECRET=SECRET, UPSTREAM=f"http://127.0.0.1:{upstream}",
                   REDIS_URL=f"redis://127.0.0.1:{redis_port}", PYTHONPATH=str(ROOT / "bench"))
        self.proc = Proc([str(ROOT / ".venv-bench" / "bin" / "uvicorn"), "reference_gateway:app", "--host", "127.0.0.1",
                          "--port", str(self.port), "--workers", "1", "--no-access-log", "--log-level", "warning"],
                         tmp / "R.log", env=env)
        wait_port(self.port)
        self.runs = []

    @property
    def pid(self):
        return self.proc.p.pid


class System:
    def __init__(self, name, bootstrap, tmp):
        self.name = name
        self.port = bootstrap["static_resources"]["listeners"][0]["address"]["socket_address"]["port_value"]
        cfg = tmp / f"{name}.json"
        cfg.write_text(json.dumps(bootstrap))
        self.proc = Proc([str(ENVOY), "-c", str(cfg), "--concurrency", "1", "--disable-hot-restart", "-l", "warn"],
                         tmp / f"{name}.log", env=dict(os.environ, JWT_SECRET=SECRET))
        wait_port(self.port)
        self.runs = []

    @property
    def pid(self):
        return self.proc.p.pid


def wrk(port, path, token, seconds, connections, script=None):
    """`token`: one token for every request; `script`: a wrk Lua script that sets its own."""
    auth = ["-s", str(script)] if script else ["-H", f"Authorization: Bearer {token}"]
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", *auth,
            f"http://127.0.0.1:{port}{path}"]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    total = int(re.search(r"(\d+) requests in", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    err = (int(non2xx.group(1)) if non2xx else 0) + (sum(map(int, errors.groups())) if errors else 0)

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)", out)
        v, unit = float(m.group(1)), m.group(2)
        return v * {"us": 1, "ms": 1000, "s": 1_000_000}[unit]
    return {"rps": rps, "total": total, "errors": err, "p50": pct(50), "p99": pct(99)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--connections", type=int, default=8)
    ap.add_argument("--no-readme", action="store_true")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory systems (bench/memory.py)")
    ap.add_argument("--only", default="", help="comma-separated systems to run besides A (for profiling)")
    ap.add_argument("--compare-wasm", default="", help="another .wasm: adds C-alt and C-jwt-alt systems")
    ap.add_argument("--compare-native", default="", help="another native module: adds N-alt and N-jwt-alt")
    args = ap.parse_args()

    for tool in ("wrk", "nginx", "redis-server", "webdis"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"bench: {tool} is missing (make bench installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-"))
    procs = []
    systems = []
    try:
        nginx_port = free_port()
        (tmp / "nginx.conf").write_text(f"""
worker_processes 1; daemon off; pid {tmp}/nginx.pid; error_log {tmp}/nginx.err warn;
events {{ worker_connections 1024; }}
http {{ access_log off; keepalive_requests 1000000;
  server {{ listen 127.0.0.1:{nginx_port};
    location / {{ default_type application/json; return 200 '{{"service":"bench","ok":true}}'; }} }} }}
""")
        procs.append(Proc(["nginx", "-c", str(tmp / "nginx.conf"), "-p", str(tmp)], tmp / "nginx.log"))
        redis_port, webdis_port = free_port(), free_port()
        procs.append(Proc(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                           "--appendonly", "no"], tmp / "redis.log"))
        wd = json.loads((ROOT / "config" / "webdis.json").read_text())
        wd.update(redis_port=redis_port, http_port=webdis_port, logfile=str(tmp / "webdis.log"))
        (tmp / "webdis.json").write_text(json.dumps(wd))
        procs.append(Proc(["webdis", str(tmp / "webdis.json")], tmp / "webdis.out"))
        for port in (nginx_port, redis_port, webdis_port):
            wait_port(port)
        redis_pid, webdis_pid = procs[1].p.pid, procs[2].p.pid

        specs = []
        pa, aa = free_port(), free_port()
        specs.append(("A", plain_bootstrap(pa, aa, nginx_port, [])))
        pb, ab = free_port(), free_port()
        specs.append(("B", plain_bootstrap(pb, ab, nginx_port, native_filters())))
        native_full, native_jwt = gateway_file(nginx_port, webdis_port), gateway_file(nginx_port, webdis_port, full=False)
        for gw in (native_full, native_jwt):
            gw["gateway"]["runtime"] = "native"
        for name, gw in [("C", gateway_file(nginx_port, webdis_port)),
                         ("C-jwt", gateway_file(nginx_port, webdis_port, full=False)),
                         ("C-nocache", gateway_file(nginx_port, webdis_port, cache_ttl=0)),
                         ("N", native_full), ("N-jwt", native_jwt)]:
            port, admin = free_port(), free_port()
            gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin})
            specs.append((name, render_to_json(gw, tmp, name)))
        gw = gateway_file(nginx_port, webdis_port)
        port, admin = free_port(), free_port()
        gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin})
        specs.append(("E", disable_filter(render_to_json(gw, tmp, "E"))))
        empty = tmp / "empty_filter.wasm"
        subprocess.run(["wasm-opt", str(ROOT / "bench" / "empty_filter.wat"), "-o", str(empty)], check=True,
                       capture_output=True)
        gw = gateway_file(nginx_port, webdis_port)
        port, admin = free_port(), free_port()
        gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin})
        specs.append(("X", render_to_json(gw, tmp, "X", empty)))
        # F: the floor of a dynamic-module filter, A plus one whose hooks return at once.
        floor = tmp / "libempty_module.so"
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", str(ROOT / "bench" / "empty_module.c"), "-o", str(floor)],
                       check=True, capture_output=True)
        pf, af = free_port(), free_port()
        specs.append(("F", plain_bootstrap(pf, af, nginx_port, [empty_module_filter(floor)])))
        signer = DistinctSigner()
        jwk = signer.jwk
        for name, gw in [("K-rs256", keys_file(nginx_port, jwk)), ("K-es256", keys_file(nginx_port, jwk)),
                         ("K-eddsa", keys_file(nginx_port, jwk)), ("K-rs256-distinct", keys_file(nginx_port, jwk)),
                         ("K-rs256-distinct-wasm", keys_file(nginx_port, jwk, host_verification=False))]:
            port, admin = free_port(), free_port()
            gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin})
            specs.append((name, render_to_json(gw, tmp, name)))
        if args.compare_wasm:
            for name, gw in [("C-alt", gateway_file(nginx_port, webdis_port)),
                             ("C-jwt-alt", gateway_file(nginx_port, webdis_port, full=False))]:
                port, admin = free_port(), free_port()
                gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin})
                specs.append((name, render_to_json(gw, tmp, name, Path(args.compare_wasm).resolve())))
        if args.compare_native:
            for name, full in [("N-alt", True), ("N-jwt-alt", False)]:
                gw = gateway_file(nginx_port, webdis_port, full=full)
                port, admin = free_port(), free_port()
                gw["gateway"].update(port=port, address="127.0.0.1", admin={"address": "127.0.0.1", "port": admin},
                                     runtime="native")
                specs.append((name, render_to_json(gw, tmp, name, native=Path(args.compare_native).resolve())))
        only = {n for n in args.only.split(",") if n}
        for name, bootstrap in specs:
            if not only or name in only or name in ("A", "B"):
                systems.append(System(name, bootstrap, tmp))
        if (not only or "R" in only) and (ROOT / ".venv-bench" / "bin" / "uvicorn").exists():
            systems.append(ReferenceSystem(tmp, nginx_port, redis_port))

        now = int(time.time())
        token = hs256({"sub": "bench-user", "name": "bench", "role": "user", "iat": now, "exp": now + 86400})
        path = "/api/v1/bench/item?q=1"
        tokens = {"K-rs256": VECTORS["tokens"]["RS256"], "K-es256": VECTORS["tokens"]["ES256"],
                  "K-eddsa": VECTORS["tokens"]["EdDSA"]}
        scripts = {}
        if any(s.name.startswith("K-rs256-distinct") for s in systems):
            signer.write_tokens(10_000, tmp / "tokens.txt")
            (tmp / "distinct.lua").write_text(f"""
local tokens = {{}}
for line in io.lines("{tmp}/tokens.txt") do tokens[#tokens + 1] = line end
local i = math.random(#tokens)
request = function()
  i = i % #tokens + 1
  return wrk.format("GET", "{path}", {{["Authorization"] = "Bearer " .. tokens[i]}})
end
""")
            scripts = {"K-rs256-distinct": tmp / "distinct.lua", "K-rs256-distinct-wasm": tmp / "distinct.lua"}

        def run(s, seconds):
            return wrk(s.port, path, tokens.get(s.name, token), seconds, args.connections, scripts.get(s.name))
        for s in systems:  # warm-up, and a check that every system answers 200
            r = run(s, 1)
            if r["total"] == 0 or (r["errors"] and own(s.name)):
                sys.exit(f"bench: {s.name} answered errors during warm-up; see {tmp}/{s.name}.log")
            if r["errors"]:
                print(f"bench: {s.name} answered {r['errors']} errors during warm-up (not the gateway's own system: "
                      f"reported in its row)", flush=True)
        for rnd in range(args.rounds):
            for s in systems:
                before = cpu_ticks(s.pid)
                side_before = {"redis": cpu_ticks(redis_pid), "webdis": cpu_ticks(webdis_pid)}
                r = run(s, args.seconds)
                ticks = cpu_ticks(s.pid) - before
                side = {k: (cpu_ticks(p) - side_before[k]) for k, p in (("redis", redis_pid), ("webdis", webdis_pid))}
                per = lambda t: t / CLK_TCK * 1e6 / max(r["total"], 1)  # noqa: E731
                r["cpu_us"] = per(ticks)
                used = SIDECARS.get(s.name.replace("-alt", ""), ())
                r["side_us"] = per(sum(side[k] for k in used)) if used else None
                s.runs.append(r)
                print(f"round {rnd + 1} {s.name:10} {r['rps']:9.0f} rps  {r['cpu_us']:6.1f} us/req  "
                      f"p50 {r['p50']:7.0f} us  p99 {r['p99']:7.0f} us  errors {r['errors']}", flush=True)
        rows = []
        for s in systems:
            med = {k: statistics.median(r[k] for r in s.runs) for k in ("rps", "cpu_us", "p50", "p99")}
            sides = [r["side_us"] for r in s.runs if r["side_us"] is not None]
            med["side_us"] = statistics.median(sides) if sides else None
            med["errors"] = sum(r["errors"] for r in s.runs)
            med["rss"] = peak_rss_mb(s.pid)
            rows.append((s.name, med))
        table = report(rows, args, host_calls())
        print()
        print(table)
        if not args.only and not args.no_memory:
            # Alone on the machine: the request systems stop first.
            for s in systems:
                s.proc.stop()
            empty = tmp / "empty_filter.wasm"
            results = memory.measure(tmp, nginx_port, webdis_port, token, path, empty)
            mem = memory.report(results)
            print()
            print(mem)
            table = table.replace(MEMORY_SLOT, "Memory per worker count (bench/memory.py: each Envoy alone, "
                                  "sampled after configure and after 100 000 requests):\n\n" + mem)
        table = table.replace(MEMORY_SLOT + "\n\n", "")
        # Only the gateway's own systems fail the run; a baseline's or the reference's errors (a
        # busy machine's socket errors in R, say) are in their rows.
        errors = sum(m["errors"] for name, m in rows if own(name))
        if not args.no_readme and not args.only:
            write_readme(table)
        if errors:
            sys.exit(f"bench: {errors} non-2xx responses or socket errors from the gateway's own systems")
    finally:
        for s in systems:
            s.proc.stop()
        for p in procs:
            p.stop()


def render_to_json(gw, tmp, name, wasm=WASM, native=None):
    """Renders a gateway file with gateway-render (JSON output) and loads it."""
    g = tmp / f"{name}.gateway.yaml"
    g.write_text(json.dumps(gw))
    out = tmp / f"{name}.envoy.yaml"
    env = dict(os.environ, JWT_SECRET=SECRET)
    extra = ["--native", str(native)] if native else []
    subprocess.run([str(RENDER), "--config", str(g), "--wasm", str(wasm), "--out", str(out), "--json", *extra],
                   env=env, check=True, capture_output=True, text=True)
    return json.loads(out.read_text())


# Which sidecars each system's requests reach.
SIDECARS = {"C": ("webdis", "redis"), "C-nocache": ("webdis", "redis"), "N": ("webdis", "redis"), "R": ("redis",)}


def disable_filter(bootstrap):
    """System E: the gateway filter stays loaded (VM, configuration, ticks) but Envoy skips it on
    every route."""
    off = {"envoy.filters.http.wasm": {"@type": "type.googleapis.com/envoy.config.route.v3.FilterConfig",
                                       "disabled": True}}
    for listener in bootstrap["static_resources"]["listeners"]:
        for chain in listener["filter_chains"]:
            for f in chain["filters"]:
                rc = f.get("typed_config", {}).get("route_config")
                for vh in (rc or {}).get("virtual_hosts", []):
                    for route in vh["routes"]:
                        route.setdefault("typed_per_filter_config", {}).update(off)
    return bootstrap


def host_calls():
    """The pinned host-call table of the filter's native test."""
    out = subprocess.run(["cargo", "test", "-q", "--lib", "host_calls_per_request_path_are_pinned", "--",
                          "--nocapture"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, GATEWAY_PRINT_HOST_CALLS="1"))
    rows = [line.split("\t") for line in out.stdout.splitlines() if line.startswith("host-calls\t")]
    if out.returncode != 0 or not rows:
        return ["(host-call table unavailable: the pinned test failed)"]
    lines = ["| request path | host calls | calls |", "|---|---|---|"]
    lines += [f"| {name} | {n} | {calls} |" for _, name, n, calls in rows]
    return lines


def verdict(ok):
    return "met" if ok else "MISSED"


def own(name):
    """The gateway's own systems (the module or the native library in the path): their errors fail the run."""
    return name.split("-")[0] in ("C", "N", "K", "E")


# Where the memory table goes in the report (after the targets, before the host calls).
MEMORY_SLOT = "<!-- memory -->"


def report(rows, args, calls):
    base = dict(rows)
    a, b = base["A"], base["B"]
    wasm = WASM.stat().st_size
    lines = [
        f"Envoy 1.40 `--concurrency 1`, nginx upstream, wrk `-t1 -c{args.connections}` keep-alive, "
        f"{args.rounds} interleaved rounds of {args.seconds} s, medians; every request carries a valid token "
        f"(HS256 for A to C, the identity provider's for K-*). "
        f"`.wasm` {wasm:,} bytes.",
        "",
        "| system | CPU µs/req | ×A | ×B | + sidecars µs/req | req/s | ×A | p50 µs | p99 µs | peak RSS MB | errors |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in rows:
        side = f"{m['cpu_us'] + m['side_us']:.1f}" if m.get("side_us") is not None else "–"
        lines.append(
            f"| {name} | {m['cpu_us']:.1f} | {m['cpu_us'] / a['cpu_us']:.2f} | {m['cpu_us'] / b['cpu_us']:.2f} | {side} | "
            f"{m['rps']:.0f} | {m['rps'] / a['rps']:.2f} | {m['p50']:.0f} | {m['p99']:.0f} | {m['rss']:.1f} | {m['errors']} |")
    c = base.get("C")
    r = base.get("R")
    if c is not None and r is not None:
        lines += ["", f"C serves {c['rps'] / r['rps']:.1f}× the requests per second of R, the reference Python gateway "
                      f"(target ≥ 40×: {verdict(c['rps'] >= 40 * r['rps'])}); R's CPU is its uvicorn process, "
                      f"its Redis beside it."]
    if c is None:
        return "\n".join(lines)
    targets = [f"CPU ≤ 1.40×A: {c['cpu_us'] / a['cpu_us']:.2f} {verdict(c['cpu_us'] <= 1.4 * a['cpu_us'])}",
               f"req/s ≥ 0.70×A: {c['rps'] / a['rps']:.2f} {verdict(c['rps'] >= 0.7 * a['rps'])}"]
    cj = base.get("C-jwt")
    if cj is not None:
        targets.append(f"JWT only (C-jwt) ≤ 1.20×A: {cj['cpu_us'] / a['cpu_us']:.2f} "
                       f"{verdict(cj['cpu_us'] <= 1.2 * a['cpu_us'])}")
    e = base.get("E")
    rss = f"RSS ≤ A + 30 MB: +{c['rss'] - a['rss']:.1f} MB {verdict(c['rss'] <= a['rss'] + 30)}"
    if e is not None:
        rss += (f" (floor: the module loaded, no request through it, E: +{e['rss'] - a['rss']:.1f} MB; "
                f"C over that floor +{c['rss'] - e['rss']:.1f} MB)")
    targets.append(rss)
    if c.get("side_us") is not None:
        share = c["side_us"] / (c["cpu_us"] + c["side_us"])
        targets.append(f"sidecars (webdis + Redis) {c['side_us']:.1f} µs/req = {share * 100:.1f}% of C's total "
                       f"(≤ 10%: {verdict(share <= 0.10)})")
    targets.append(f".wasm ≤ 400 KB: {wasm / 1024:.0f} KiB {verdict(wasm <= 400 * 1024)}")
    lines += ["", "Targets for C (full policy): " + "; ".join(targets) + "."]
    n = base.get("N")
    if n is not None:
        nt = [f"CPU ≤ 0.85×B: {n['cpu_us'] / b['cpu_us']:.2f} {verdict(n['cpu_us'] <= 0.85 * b['cpu_us'])}",
              f"req/s ≥ 0.75×A: {n['rps'] / a['rps']:.2f} {verdict(n['rps'] >= 0.75 * a['rps'])}",
              f"RSS ≤ A + 10 MB: +{n['rss'] - a['rss']:.1f} MB {verdict(n['rss'] <= a['rss'] + 10)}"]
        f = base.get("F")
        if f is not None:
            nt.append(f"the floor, an HTTP dynamic-module filter whose hooks return at once (F): "
                      f"{f['cpu_us'] / a['cpu_us']:.2f}×A, {f['cpu_us'] / b['cpu_us']:.2f}×B; "
                      f"N's own work over that floor {n['cpu_us'] - f['cpu_us']:.1f} µs/req")
        nj = base.get("N-jwt")
        if nj is not None:
            nt.append(f"N-jwt {nj['cpu_us'] / a['cpu_us']:.2f}×A, {nj['cpu_us'] / b['cpu_us']:.2f}×B")
        nt.append(f"C over N: {c['cpu_us'] / n['cpu_us']:.2f}× the CPU (the proxy-wasm boundary and V8)")
        lines += ["", "Targets for N (native module, full policy): " + "; ".join(nt) + "."]
    wt = [f"CPU ≤ 1.50×A: {c['cpu_us'] / a['cpu_us']:.2f} {verdict(c['cpu_us'] <= 1.5 * a['cpu_us'])}"]
    x = base.get("X")
    if x is not None:
        wt.append(f"module-specific memory (C over X, an empty module's) ≤ 15 MB: +{c['rss'] - x['rss']:.1f} MB "
                  f"{verdict(c['rss'] - x['rss'] <= 15)}")
        if e is not None:
            wt.append(f"the module loaded, no request through it (E over X): +{e['rss'] - x['rss']:.1f} MB for "
                      f"{wasm / 1024:.0f} KiB of module (peak RSS; nearly the same at 1, 2 and 4 workers: "
                      f"see the memory table)")
        wt.append(f"an empty filter (X) costs {x['cpu_us'] / a['cpu_us']:.2f}×A and +{x['rss'] - a['rss']:.1f} MB over A")
    lines += ["", "Targets for the .wasm (C): " + "; ".join(wt) + "."]
    lines += ["", MEMORY_SLOT]
    lines += ["", "Host calls per request (the filter's pinned native test, FakeHost):", ""] + calls
    return "\n".join(lines)


def write_readme(table):
    text = README.read_text()
    start, end = "<!-- bench:start -->", "<!-- bench:end -->"
    if start in text and end in text:
        head, rest = text.split(start, 1)
        _, tail = rest.split(end, 1)
        README.write_text(f"{head}{start}\n{table}\n{end}{tail}")
        print(f"\nREADME.md updated")


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    main()
