#!/usr/bin/env python3
"""`make soak`: memory under a flood of distinct clients. One Envoy (2 workers) with the full
policy (JWT, revocation through webdis and Redis with its cache, per-IP, per-user and per-route
buckets, canary) takes REQUESTS requests (default one million), each from a new client address
(`X-Forwarded-For`, one trusted hop) and with a new user's token, all on loopback. Envoy's RSS is
sampled after every chunk. Then webdis is frozen (SIGSTOP) while 256 connections keep sending
new users' requests: every one must be answered (503 at the revocation timeout), and the number
of requests held and Envoy's memory must stay bounded. The figures go in the README. Not part of
`make test` (about 15 minutes); nothing is asserted about time.

    .venv/bin/python bench/soak.py [--requests 1000000] [--chunk 30]
"""

import argparse
import base64
import os
import signal
import hashlib
import hmac
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests" / "e2e"))

from harness import SECRET, Gateway, Redis, Services, Webdis, free_port  # noqa: E402


def b64url(b):
    return base64.urlsafe_b64encode(b).rstrip(b"=").decode()


def write_tokens(n, path):
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    key = SECRET.encode()
    with open(path, "w") as out:
        for i in range(n):
            body = b64url(json.dumps({"sub": f"soak-{i}", "role": "user", "iat": now,
                                      "exp": now + 7200}, separators=(",", ":")).encode())
            sig = hmac.new(key, f"{head}.{body}".encode(), hashlib.sha256).digest()
            out.write(f"{head}.{body}.{b64url(sig)}\n")


def rss_kb(pid):
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+)", text).group(1)), int(re.search(r"VmHWM:\s+(\d+)", text).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=1_000_000)
    ap.add_argument("--chunk", type=int, default=30, help="seconds per wrk run between samples")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gw-soak-"))
    services = Services(["user-service"])
    redis = Redis()
    webdis = Webdis(redis.port)
    big = {"max_calls": 1_000_000_000, "period": 1}
    f = {
        "gateway": {"prefix": "/api/v1", "rate_limit": {"trusted_hops": 1}},
        "jwt": {"secret_env": "JWT_SECRET"},
        "webdis": f"http://127.0.0.1:{webdis.port}",
        "revocation": {},
        "logs": {"enabled": False},
        "routes": [{"name": "user-service", "prefix": "/users",
                    "upstream": f"http://127.0.0.1:{services.ports['user-service']}",
                    "methods": ["GET"], "rate_limit": dict(big, per_user=big, per_ip=big),
                    "canary": {"upstream": f"http://127.0.0.1:{services.ports['user-service']}",
                               "percent": 10, "header": "X-Canary"}}],
    }
    gw = Gateway(f, concurrency=2)
    try:
        print(f"writing {args.requests:,} tokens ...", flush=True)
        write_tokens(args.requests, tmp / "tokens.txt")
        script = tmp / "soak.lua"
        script.write_text(f"""
local tokens = {{}}
for line in io.lines("{tmp}/tokens.txt") do tokens[#tokens + 1] = line end
local offset = 0
function init(args) offset = tonumber(args[1]) or 0 end
local i = 0
request = function()
  local n = offset + i
  i = i + 1
  local addr = string.format("10.%d.%d.%d", math.floor(n / 65536) % 256, math.floor(n / 256) % 256, n % 256)
  return wrk.format("GET", "/api/v1/users/1", {{["Authorization"] = "Bearer " .. tokens[n % #tokens + 1],
                                                ["X-Forwarded-For"] = addr}})
end
""")
        pid = gw.proc.pid
        base_rss, _ = rss_kb(pid)
        print(f"start: Envoy RSS {base_rss / 1024:.1f} MB", flush=True)
        done, samples = 0, []
        while done < args.requests:
            out = subprocess.run(["wrk", "-t1", "-c8", f"-d{args.chunk}s", "-s", str(script),
                                  f"http://127.0.0.1:{gw.port}/api/v1/users/1", "--", str(done)],
                                 capture_output=True, text=True, check=True).stdout
            total = int(re.search(r"(\d+) requests in", out).group(1))
            non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
            done += total
            rss, hwm = rss_kb(pid)
            samples.append((done, rss))
            print(f"{done:>9,} requests  RSS {rss / 1024:7.1f} MB  peak {hwm / 1024:7.1f} MB  "
                  f"non-2xx {non2xx.group(1) if non2xx else 0}", flush=True)
        # webdis frozen: every request's lookup times out; none may hang, memory stays bounded.
        os.kill(webdis.proc.pid, signal.SIGSTOP)
        try:
            out = subprocess.run(["wrk", "-t1", "-c256", "-d20s", "--timeout", "5s", "-s", str(script),
                                  f"http://127.0.0.1:{gw.port}/api/v1/users/1", "--", str(done)],
                                 capture_output=True, text=True, check=True).stdout
        finally:
            os.kill(webdis.proc.pid, signal.SIGCONT)
        frozen_total = int(re.search(r"(\d+) requests in", out).group(1))
        frozen_non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
        timeouts = re.search(r"timeout (\d+)", out)
        frozen_rss, frozen_hwm = rss_kb(pid)
        print(f"webdis frozen, 256 connections for 20 s: {frozen_total:,} answered "
              f"({frozen_non2xx.group(1) if frozen_non2xx else 0} non-2xx, client timeouts "
              f"{timeouts.group(1) if timeouts else 0}); Envoy RSS {frozen_rss / 1024:.1f} MB, "
              f"peak {frozen_hwm / 1024:.1f} MB", flush=True)
        if samples:
            first_after_warmup = samples[min(1, len(samples) - 1)][1]
            print(f"\n{done:,} requests from {done:,} addresses and users: Envoy RSS {base_rss / 1024:.1f} MB "
                  f"at start, {first_after_warmup / 1024:.1f} MB after the first chunk, "
                  f"{samples[-1][1] / 1024:.1f} MB at the end of the flood, {frozen_rss / 1024:.1f} MB after "
                  f"the frozen-webdis phase (peak {rss_kb(pid)[1] / 1024:.1f} MB); Redis used_memory "
                  f"{redis.cli('INFO', 'memory').split('used_memory_human:')[1].split()[0]}")
    finally:
        gw.stop()
        webdis.stop()
        redis.stop()
        services.stop()


if __name__ == "__main__":
    main()
