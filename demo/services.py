#!/usr/bin/env python3
"""Demo upstream services for the gateway.

Every echo service answers any method and path with
{"service", "version", "method", "path", "headers", "body_bytes"} (headers = the request headers
it received, body_bytes = the size of the body it received).
A `delay_ms=N` query parameter makes it wait N ms first (for timeout demos and tests).

The auth service also serves POST /api/v1/auth/login like the reference gateway: admin/123456
gets an HS256 token (sub user-001, name admin, role admin, 30-minute expiry); alice/alice123 gets
one with role `user`. Other credentials: 401 JSON. The secret comes from JWT_SECRET.

    services.py --echo user-service=8001 --echo order-service=8002:v1 --auth auth-service=8005
"""

import argparse
import base64
import hashlib
import hmac
import json
import os
import signal
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

USERS = {
    "admin": ("123456", {"sub": "user-001", "name": "admin", "role": "admin"}),
    "alice": ("alice123", {"sub": "user-002", "name": "alice", "role": "user"}),
}
TOKEN_MINUTES = 30


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(claims: dict, secret: str) -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def make_handler(service: str, version: str, is_auth: bool, secret: str):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "demo-service"
        # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms.
        disable_nagle_algorithm = True

        def log_message(self, fmt, *args):  # keep the console for the gateway
            pass

        def _send(self, status: int, body: dict):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            length = int(self.headers.get("content-length") or 0)
            return self.rfile.read(length) if length > 0 else b""

        def _handle(self):
            body = self._body()
            url = urllib.parse.urlsplit(self.path)
            query = urllib.parse.parse_qs(url.query)
            delay = query.get("delay_ms", ["0"])[0]
            if delay.isdigit():
                time.sleep(min(int(delay), 60_000) / 1000)
            if is_auth and self.command == "POST" and url.path.rstrip("/").endswith("/auth/login"):
                return self._login(body)
            headers = {}
            for k, v in self.headers.items():
                k = k.lower()
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
            self._send(200, {"service": service, "version": version, "method": self.command,
                             "path": self.path, "headers": headers, "body_bytes": len(body)})

        def _login(self, body: bytes):
            try:
                data = json.loads(body or b"{}")
                username, password = data.get("username"), data.get("password")
            except (ValueError, AttributeError):
                return self._send(400, {"error": "Bad Request", "message": "Body must be a JSON object"})
            user = USERS.get(username)
            if user is None or not hmac.compare_digest(str(password), user[0]):
                return self._send(401, {"error": "Unauthorized", "message": "Invalid credentials"})
            now = int(time.time())
            claims = dict(user[1], iat=now, exp=now + TOKEN_MINUTES * 60, jti=str(uuid.uuid4()))
            return self._send(200, {"access_token": hs256_token(claims, secret), "token_type": "bearer"})

        do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = _handle

    return Handler


def parse_spec(spec: str):
    name, _, rest = spec.partition("=")
    port, _, version = rest.partition(":")
    if not name or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected name=port[:version], got {spec!r}")
    return name, int(port), version or "v1"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bind", default="127.0.0.1")
    ap.add_argument("--echo", action="append", type=parse_spec, default=[], metavar="NAME=PORT[:VERSION]")
    ap.add_argument("--auth", type=parse_spec, metavar="NAME=PORT", help="the auth service (login + echo)")
    args = ap.parse_args()

    secret = os.environ.get("JWT_SECRET", "")
    if args.auth and not secret:
        print("services.py: JWT_SECRET must be set for the auth service", file=sys.stderr)
        return 2
    specs = [(s, False) for s in args.echo] + ([(args.auth, True)] if args.auth else [])
    servers = []
    for (name, port, version), is_auth in specs:
        server = ThreadingHTTPServer((args.bind, port), make_handler(name, version, is_auth, secret))
        server.daemon_threads = True
        servers.append(server)
        threading.Thread(target=server.serve_forever, daemon=True).start()

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready: " + ", ".join(f"{n}@{p}" for (n, p, _), _ in specs), flush=True)
    stop.wait()
    for server in servers:
        server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
