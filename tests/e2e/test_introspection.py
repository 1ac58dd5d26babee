"""Opaque access tokens read by introspection (RFC 7662) through real Envoy, on both runtimes:
the demo identity provider issues opaque tokens and answers its introspection endpoint; one
call per token per cache period; revocation still applies; a provider that lies about `active`
or answers too late is refused."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from harness import Gateway, free_port, request

SECRET_ENV = {"INTROSPECTION_SECRET": "demo-introspection-secret"}


def gateway_file(idp_port, up, webdis_port=None, cache_ttl=30, timeout=2):
    f = {
        "gateway": {"prefix": "/api/v1"},
        "jwt": {
            "secret_env": "JWT_SECRET",
            "issuers": [{
                "name": "demo-idp", "issuer": f"http://127.0.0.1:{idp_port}",
                "introspection": {"endpoint": f"http://127.0.0.1:{idp_port}/oauth2/introspect",
                                  "client_id": "gateway", "client_secret_env": "INTROSPECTION_SECRET",
                                  "cache_ttl": cache_ttl, "timeout": timeout},
            }],
        },
        "routes": [
            {"name": "orders", "prefix": "/orders", "upstream": up, "methods": ["GET"], "auth_required": True,
             "scopes": ["orders:read"]},
            {"name": "auth", "prefix": "/auth", "upstream": up, "methods": ["POST"], "auth_required": False},
        ],
    }
    if webdis_port:
        f["webdis"] = f"http://127.0.0.1:{webdis_port}"
        f["revocation"] = {"cache_ttl": 0}
    return f


def opaque_login(idp_port, user="alice", password="alice123"):
    r = request(idp_port, "POST", "/api/v1/auth/login", body={"username": user, "password": password, "opaque": True})
    assert r.status == 200, r
    tok = r.json()["access_token"]
    assert tok.count(".") == 0
    return tok


def introspections(idp_port):
    return request(idp_port, "GET", "/admin/introspections").json()["count"]


@pytest.fixture(scope="module")
def gw(services, webdis):
    idp = services.ports["auth-service"]
    g = Gateway(gateway_file(idp, f"http://127.0.0.1:{services.ports['order-service']}", webdis.port),
                env=SECRET_ENV)
    yield g
    g.stop()


def bearer(tok):
    return [("Authorization", f"Bearer {tok}")]


def test_an_opaque_token_passes_through_introspection_once_per_cache_period(gw, services):
    idp = services.ports["auth-service"]
    tok = opaque_login(idp)
    before = introspections(idp)
    for _ in range(3):
        r = request(gw.port, "GET", "/api/v1/orders/1", bearer(tok))
        assert r.status == 200, r
        assert r.json()["headers"]["x-user-id"] == "user-002", r.json()
    assert introspections(idp) == before + 1
    # Concurrent first requests of a new token share one call (Envoy resumes them all).
    tok2 = opaque_login(idp)
    before = introspections(idp)
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        request(gw.port, "GET", "/api/v1/orders/1", bearer(tok2)).status)) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * 6
    assert introspections(idp) - before <= 2  # the two workers may each ask once


def test_revocation_applies_to_opaque_tokens(gw, services):
    idp = services.ports["auth-service"]
    tok = opaque_login(idp)
    assert request(gw.port, "GET", "/api/v1/orders/1", bearer(tok)).status == 200
    r = request(gw.port, "POST", "/api/v1/auth/logout", bearer(tok))
    assert r.status == 200, r
    r = request(gw.port, "GET", "/api/v1/orders/1", bearer(tok))
    assert r.status == 401 and r.json()["message"] == "Token has been revoked", r


def test_inactive_and_unknown_opaque_tokens_are_refused(gw, services):
    idp = services.ports["auth-service"]
    tok = opaque_login(idp)
    request(idp, "POST", f"/admin/deactivate?token={tok}")
    r = request(gw.port, "GET", "/api/v1/orders/1", bearer(tok))
    assert r.status == 401 and "not active" in r.json()["message"], r
    r = request(gw.port, "GET", "/api/v1/orders/1", bearer("never-issued-token"))
    assert r.status == 401, r
    # The negative answer is cached too: asking again costs no call.
    before = introspections(idp)
    assert request(gw.port, "GET", "/api/v1/orders/1", bearer("never-issued-token")).status == 401
    assert introspections(idp) == before


class Liar(BaseHTTPRequestHandler):
    """An introspection endpoint that lies or stalls, by the token it is asked about."""
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length") or 0)).decode()
        token = dict(p.split("=", 1) for p in body.split("&")).get("token", "")
        exp = int(time.time()) + 600
        answers = {
            "string-active": {"active": "true", "sub": "mallory", "exp": exp, "scope": "orders:read"},
            "number-active": {"active": 1, "sub": "mallory", "exp": exp, "scope": "orders:read"},
            "other-issuer": {"active": True, "sub": "mallory", "exp": exp, "iss": "https://evil.example",
                             "scope": "orders:read"},
            "no-scope": {"active": True, "sub": "carol", "exp": exp, "iss": self.server.issuer},
            "good": {"active": True, "sub": "carol", "exp": exp, "iss": self.server.issuer, "scope": "orders:read"},
        }
        if token == "slow":
            time.sleep(1.5)
            answer = answers["good"]
        else:
            answer = answers.get(token, {"active": False})
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(scope="module")
def liar(services):
    port = free_port()
    server = ThreadingHTTPServer(("127.0.0.1", port), Liar)
    server.daemon_threads = True
    server.issuer = f"http://127.0.0.1:{port}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    g = Gateway(gateway_file(port, f"http://127.0.0.1:{services.ports['order-service']}", timeout=0.5),
                env=SECRET_ENV)
    yield g
    g.stop()
    server.shutdown()


@pytest.mark.parametrize("token,status", [
    ("string-active", 401), ("number-active", 401), ("other-issuer", 401), ("no-scope", 403),
    ("good", 200),
])
def test_answers_that_lie_are_refused(liar, token, status):
    r = request(liar.port, "GET", "/api/v1/orders/1", bearer(token))
    assert r.status == status, r


def test_an_answer_after_the_timeout_is_nobodys(liar):
    r = request(liar.port, "GET", "/api/v1/orders/1", bearer("slow"))
    assert r.status == 503 and r.json()["message"] == "Token introspection unavailable", r
    time.sleep(1.2)  # the late answer would arrive now: Envoy dropped the call at its timeout
    r = request(liar.port, "GET", "/api/v1/orders/1", bearer("string-active"))
    assert r.status == 401, r
    # Nothing was cached for "slow" either: it is asked again (and times out again).
    assert request(liar.port, "GET", "/api/v1/orders/1", bearer("slow")).status == 503
