"""Differential route test: for thousands of generated request targets, the route whose policy
the filter applied is the route Envoy forwarded to. The filter matches routes itself (with the
rule Envoy uses); any disagreement would let one route's policy guard another route's service.

Each route has its own upstream (the echo names it) and its own route limit (the filter's
`X-RateLimit-Limit` names the route whose policy ran). Requests the filter refuses never reach
Envoy's router and are fine: they fail closed."""

import itertools
import json
import socket
import subprocess
import time

from harness import Gateway, Services, forge

ROUTES = {  # name: (prefix, route limit that identifies it)
    "users": ("/users", 100001),
    "users-admin": ("/users/admin", 100002),
    "orders": ("/orders", 100003),
    "orders-items": ("/orders/items", 100004),
    "root-ish": ("/u", 100005),
}


def targets():
    segments = ["users", "Users", "USERS", "users-admin", "usersx", "orders", "orders/items", "ordersitems",
                "users/admin", "users/Admin", "u", "u/sers", "users/../orders", "orders/../users/admin",
                "users/./admin", "users//admin", "users/admin/..", "users/%2e%2e/orders", "users/%2E/admin",
                "users;x=1/admin", "users/admin;x", "orders%2fitems", "orders%2Fitems", "users%5cadmin",
                "users/admin%00", "%75sers", "users%2F..%2Forders", "./users", "../api/v1/orders/items",
                "users/admin/", "orders/items/", "orders/items/1"]
    tails = ["", "/1", "?q=1", "#frag", "?a=/orders/items", "/x?y=../../admin", "%23/x"]
    prefixes = ["/api/v1/", "/api/v1//", "/API/v1/", "/api/v1/./", "/api/v2/../v1/", "//api/v1/"]
    for p, s, t in itertools.product(prefixes, segments, tails):
        yield p + s + t


def raw(port, target, version="HTTP/1.1", token=None):
    """Sends one request with the target exactly as written; returns (status, headers, body)."""
    lines = [f"GET {target} {version}", "Host: gw", "Connection: close"]
    if token:
        lines.append(f"Authorization: Bearer {token}")
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
        # Read the body by its length: Envoy closes local replies only after a delay.
        while len(body) < int(headers.get("content-length", "0")):
            chunk = s.recv(65536)
            if not chunk:
                break
            body += chunk
    return int(status_line.split()[1]), headers, body


def test_the_filter_and_envoy_agree_on_the_route():
    services = Services(list(ROUTES), auth=None)
    now = int(time.time())
    token = forge({"alg": "HS256"}, {"sub": "u", "role": "admin", "iat": now, "exp": now + 3600})
    g = Gateway({
        "gateway": {"prefix": "/api/v1"},
        "jwt": {"secret_env": "JWT_SECRET"},
        "routes": [{"name": n, "prefix": p, "upstream": f"http://127.0.0.1:{services.ports[n]}",
                    "methods": ["GET"], "auth_required": n.endswith("admin") or n == "orders-items",
                    "rate_limit": {"max_calls": limit, "period": 1,
                                   "per_ip": {"max_calls": 1_000_000, "period": 1},
                                   "per_user": {"max_calls": 1_000_000, "period": 1}}}
                   for n, (p, limit) in ROUTES.items()],
    }, concurrency=2)
    by_limit = {str(limit): name for name, (_, limit) in ROUTES.items()}
    checked = forwarded = 0
    try:
        for target in targets():
            for version, absolute in (("HTTP/1.1", False), ("HTTP/1.0", False), ("HTTP/1.1", True)):
                t = f"http://gw{target}" if absolute else target
                for tok in (None, token):
                    status, headers, body = raw(g.port, t, version, tok)
                    checked += 1
                    if status != 200:
                        continue  # refused (by the filter or Envoy): fails closed
                    forwarded += 1
                    served_by = json.loads(body)["service"]
                    policy_of = by_limit.get(headers.get("x-ratelimit-limit"))
                    assert policy_of == served_by, (t, version, tok is not None, policy_of, served_by)
                    if served_by.endswith("admin") or served_by == "orders-items":
                        assert tok is not None, (t, "a protected service answered without a token")
        # HTTP/2 (prior knowledge), the path exactly as written, for every target.
        h2 = 0
        for target in targets():
            out = subprocess.run(["curl", "-s", "--http2-prior-knowledge", "--path-as-is", "-o", "-", "-D", "-",
                                  "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{g.port}{target}"],
                                 capture_output=True, text=True)
            head, _, body = out.stdout.partition("\n\n")  # text mode: CRLF read as LF
            if not head.startswith("HTTP/2 200"):
                continue
            h2 += 1
            limit = next((line.split(":", 1)[1].strip() for line in head.split("\n")
                          if line.lower().startswith("x-ratelimit-limit:")), None)
            assert by_limit.get(limit) == json.loads(body)["service"], (target, "HTTP/2")
        forwarded += h2
        checked += len(list(targets()))
        assert h2 > 100, h2
        assert checked > 5000 and forwarded > 500, (checked, forwarded)
        print(f"route agreement: {checked} requests, {forwarded} forwarded, 0 disagreements")
    finally:
        g.stop()
        services.stop()
