#!/usr/bin/env python3
"""Demo upstream services for the gateway.

Every echo service answers any method and path with
{"service", "version", "method", "path", "headers", "body_bytes"} (headers = the request headers
it received, body_bytes = the size of the body it received).
A `delay_ms=N` query parameter makes it wait N ms first (for timeout demos and tests).

The auth service also serves POST /api/v1/auth/login like the reference gateway: admin/123456
gets an HS256 token (sub user-001, name admin, role admin, 30-minute expiry, no `iss`);
alice/alice123 gets one with role `user`. Other credentials: 401 JSON. The secret comes from
JWT_SECRET.

It is also a small identity provider. The same login body with "alg": "RS256", "ES256" or
"EdDSA" returns a token signed by the provider's current key for that algorithm (header `kid`,
claims `iss` = the issuer URL, default http://127.0.0.1:<port>). On the service port only (the
gateway never routes these):
    GET  /.well-known/jwks.json      the published public keys
    POST /admin/rotate               a new current key per algorithm; the old ones stay published
    POST /admin/rotate?retire=1      the same, then publish only the newest key per algorithm
Keys are generated at start-up and live in memory only.

Opaque tokens (RFC 7662): a login body with "opaque": true returns a random token that only the
provider can read, through its introspection endpoint (client authentication: HTTP basic with
client id `gateway` and the secret in INTROSPECTION_SECRET, default `demo-introspection-secret`):
    POST /oauth2/introspect          token=<token>: {"active": true, sub, scope, exp, iss, ...}
                                     or {"active": false}
    GET  /admin/introspections       {"count": n}: introspection calls answered so far
    POST /admin/deactivate?token=T   the token answers active: false from now on

A login body may also name a provider's token shape, "shape": "keycloak", "entra", "okta" or
"auth0": the token then carries that provider's claims for the user (its role list, scopes,
namespaced claims), with the user's role among other roles, as those providers write them:
    keycloak  realm_access.roles [offline_access, default-roles-demo, <role>], scope (string),
              preferred_username, resource_access.gateway.roles
    entra     oid, roles [Orders.Read, (Orders.Admin)], scp (space-separated string), typ at+jwt
    okta      groups [Everyone, (Admins)], scp (list), uid, cid
    auth0     https://example.com/roles [editor, (admin)], permissions (list), scope, typ at+jwt

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

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

USERS = {
    "admin": ("123456", {"sub": "user-001", "name": "admin", "role": "admin"}),
    "alice": ("alice123", {"sub": "user-002", "name": "alice", "role": "user"}),
}
TOKEN_MINUTES = 30


def shaped_claims(shape: str, user: dict):
    """The claims (and the header's typ) of a token as one identity provider writes it."""
    admin = user["role"] == "admin"
    name, sub = user["name"], user["sub"]
    if shape == "keycloak":
        return "JWT", {
            "sub": f"f3b1c2d4-0000-4000-8000-{sub[-3:]:0>12}", "preferred_username": name, "typ": "Bearer",
            "azp": "gateway", "scope": "openid profile orders:read" + (" orders:write" if admin else ""),
            "realm_access": {"roles": ["offline_access", "default-roles-demo", user["role"]]},
            "resource_access": {"gateway": {"roles": ["orders-viewer"] + (["orders-admin"] if admin else [])}}}
    if shape == "entra":
        return "at+jwt", {
            "sub": f"pairwise-{sub}", "oid": f"00000000-0000-0000-0000-{sub[-3:]:0>12}", "name": name,
            "roles": ["Orders.Read"] + (["Orders.Admin"] if admin else []),
            "scp": "User.Read orders:read" + (" orders:write" if admin else ""), "ver": "2.0"}
    if shape == "okta":
        return "JWT", {
            "sub": f"00u{sub}", "uid": f"00u{sub}", "cid": "0oagateway", "name": name,
            "groups": ["Everyone"] + (["Admins"] if admin else []),
            "scp": ["openid", "orders:read"] + (["orders:write"] if admin else [])}
    if shape == "auth0":
        return "at+jwt", {
            "sub": f"auth0|{sub}", "name": name, "https://example.com/roles": ["editor"] + (["admin"] if admin else []),
            "scope": "openid profile", "permissions": ["read:orders"] + (["write:orders"] if admin else [])}
    return None


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256_token(claims: dict, secret: str, typ: str = "JWT") -> str:
    header = b64url(json.dumps({"alg": "HS256", "typ": typ}, separators=(",", ":")).encode())
    payload = b64url(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode()
    signature = hmac.new(secret.encode(), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def int_b64(n: int, size: int = 0) -> str:
    return b64url(n.to_bytes(size or (n.bit_length() + 7) // 8, "big"))


class IdentityProvider:
    """Signing keys per algorithm (newest last), rotated on request."""

    ALGORITHMS = ("RS256", "ES256", "EdDSA")

    def __init__(self, issuer: str):
        self.issuer = issuer
        self.lock = threading.Lock()
        self.keys = {alg: [] for alg in self.ALGORITHMS}
        self.generation = 0
        self.opaque = {}
        self.introspections = 0
        self.rotate()

    @staticmethod
    def _new_key(alg: str):
        if alg == "RS256":
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
        if alg == "ES256":
            return ec.generate_private_key(ec.SECP256R1())
        return ed25519.Ed25519PrivateKey.generate()

    def rotate(self, retire: bool = False):
        with self.lock:
            self.generation += 1
            for alg, keys in self.keys.items():
                kid = f"{alg.lower()}-{self.generation}-{uuid.uuid4().hex[:8]}"
                keys.append((kid, self._new_key(alg)))
                if retire:
                    del keys[:-1]

    def sign(self, alg: str, claims: dict, typ: str = "JWT") -> str:
        with self.lock:
            kid, key = self.keys[alg][-1]
        header = b64url(json.dumps({"alg": alg, "typ": typ, "kid": kid}, separators=(",", ":")).encode())
        payload = b64url(json.dumps(dict(claims, iss=self.issuer), separators=(",", ":")).encode())
        signing_input = f"{header}.{payload}".encode()
        if alg == "RS256":
            signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        elif alg == "ES256":
            r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
            signature = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        else:
            signature = key.sign(signing_input)
        return f"{header}.{payload}.{b64url(signature)}"

    def issue_opaque(self, claims: dict) -> str:
        token = base64.urlsafe_b64encode(os.urandom(24)).rstrip(b"=").decode()
        with self.lock:
            self.opaque[token] = dict(claims, iss=self.issuer, client_id="demo-app", token_type="Bearer")
        return token

    def introspect(self, token: str) -> dict:
        with self.lock:
            self.introspections += 1
            claims = self.opaque.get(token)
        if claims is None or claims.get("exp", 0) < time.time():
            return {"active": False}
        return dict(claims, active=True)

    def deactivate(self, token: str):
        with self.lock:
            self.opaque.pop(token, None)

    def jwks(self) -> dict:
        out = []
        with self.lock:
            published = [(alg, kid, key) for alg, keys in self.keys.items() for kid, key in keys]
        for alg, kid, key in published:
            public = key.public_key()
            if alg == "RS256":
                n = public.public_numbers()
                jwk = {"kty": "RSA", "n": int_b64(n.n), "e": int_b64(n.e)}
            elif alg == "ES256":
                n = public.public_numbers()
                jwk = {"kty": "EC", "crv": "P-256", "x": int_b64(n.x, 32), "y": int_b64(n.y, 32)}
            else:
                raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
                jwk = {"kty": "OKP", "crv": "Ed25519", "x": b64url(raw)}
            out.append(dict(jwk, kid=kid, alg=alg, use="sig"))
        return {"keys": out}


def make_handler(service: str, version: str, is_auth: bool, secret: str, idp=None):
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
            if is_auth and self.command == "POST" and url.path.rstrip("/").split("/")[-2:] == ["auth", "login"]:
                return self._login(body)
            if idp is not None and self.command == "GET" and url.path == "/.well-known/jwks.json":
                return self._send(200, idp.jwks())
            if idp is not None and self.command == "POST" and url.path == "/admin/rotate":
                retire = query.get("retire", ["0"])[0] not in ("", "0", "false")
                idp.rotate(retire=retire)
                return self._send(200, {"rotated": True, "retired": retire,
                                        "kids": [k["kid"] for k in idp.jwks()["keys"]]})
            if idp is not None and self.command == "POST" and url.path == "/oauth2/introspect":
                return self._introspect(body)
            if idp is not None and self.command == "GET" and url.path == "/admin/introspections":
                return self._send(200, {"count": idp.introspections})
            if idp is not None and self.command == "POST" and url.path == "/admin/deactivate":
                idp.deactivate(query.get("token", [""])[0])
                return self._send(200, {"deactivated": True})
            if is_auth:
                # The auth service serves its login (and the IdP's paths) and nothing else: a
                # near-miss of a gateway endpoint (`/auth/logout.`, `/auth/logout%2e`) that Envoy
                # forwards here is a 404, not an echo that looks like success.
                return self._send(404, {"error": "Not Found", "message": f"No such endpoint: {url.path}"})
            headers = {}
            for k, v in self.headers.items():
                k = k.lower()
                headers[k] = f"{headers[k]}, {v}" if k in headers else v
            self._send(200, {"service": service, "version": version, "method": self.command,
                             "path": self.path, "headers": headers, "body_bytes": len(body)})

        def _introspect(self, body: bytes):
            secret = os.environ.get("INTROSPECTION_SECRET") or "demo-introspection-secret"
            expected = "Basic " + base64.b64encode(f"gateway:{secret}".encode()).decode()
            if not hmac.compare_digest(self.headers.get("authorization", ""), expected):
                return self._send(401, {"error": "invalid_client"})
            if self.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
                return self._send(400, {"error": "invalid_request"})
            form = urllib.parse.parse_qs(body.decode("ascii", "replace"))
            return self._send(200, idp.introspect(form.get("token", [""])[0]))

        def _login(self, body: bytes):
            try:
                data = json.loads(body or b"{}")
                username, password = data.get("username"), data.get("password")
                alg = data.get("alg", "HS256")
                shape = data.get("shape")
                opaque = data.get("opaque") is True
            except (ValueError, AttributeError):
                return self._send(400, {"error": "Bad Request", "message": "Body must be a JSON object"})
            if alg != "HS256" and (idp is None or alg not in idp.ALGORITHMS):
                supported = ", ".join(("HS256",) + (idp.ALGORITHMS if idp else ()))
                return self._send(400, {"error": "Bad Request", "message": f"alg must be one of {supported}"})
            user = USERS.get(username)
            if user is None or not hmac.compare_digest(str(password), user[0]):
                return self._send(401, {"error": "Unauthorized", "message": "Invalid credentials"})
            typ, base = "JWT", user[1]
            if shape is not None:
                shaped = shaped_claims(shape, user[1])
                if shaped is None:
                    return self._send(400, {"error": "Bad Request",
                                            "message": "shape must be one of keycloak, entra, okta, auth0"})
                typ, base = shaped
            now = int(time.time())
            claims = dict(base, iat=now, exp=now + TOKEN_MINUTES * 60, jti=str(uuid.uuid4()))
            if opaque and idp is not None:
                return self._send(200, {"access_token": idp.issue_opaque(dict(claims, scope="orders:read")),
                                        "token_type": "bearer"})
            token = hs256_token(claims, secret, typ) if alg == "HS256" else idp.sign(alg, claims, typ)
            return self._send(200, {"access_token": token, "token_type": "bearer"})

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
    ap.add_argument("--issuer", help="the identity provider's iss (default http://<bind>:<auth port>)")
    args = ap.parse_args()

    secret = os.environ.get("JWT_SECRET", "")
    if args.auth and not secret:
        print("services.py: JWT_SECRET must be set for the auth service", file=sys.stderr)
        return 2
    specs = [(s, False) for s in args.echo] + ([(args.auth, True)] if args.auth else [])
    servers = []
    idp = IdentityProvider(args.issuer or f"http://{args.bind}:{args.auth[1]}") if args.auth else None
    for (name, port, version), is_auth in specs:
        handler = make_handler(name, version, is_auth, secret, idp if is_auth else None)
        server = ThreadingHTTPServer((args.bind, port), handler)
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
