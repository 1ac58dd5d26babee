"""End-to-end: real Envoy with the built filter, real demo services, assertions over HTTP."""

import json
import re
import subprocess
import time

import pytest

from harness import ENVOY, ROOT, SECRET, b64url, bearer, forge, render, request, token

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def error_body(r, status, message=None):
    assert r.status == status, r
    assert r.header("content-type") == "application/json", r.headers
    body = r.json()
    assert set(body) == {"error", "message", "trace_id"}, body
    assert body["trace_id"] == r.header("x-trace-id"), (body, r.headers)
    if message is not None:
        assert body["message"] == message, body
    return body


# --- routing and trace -------------------------------------------------------------------------

def test_public_route_reaches_its_service_with_trace_headers(gw):
    r = gw.get("/api/v1/products/1?q=1")
    assert r.status == 200, r
    echo = r.json()
    assert echo["service"] == "product-service"
    assert echo["path"] == "/api/v1/products/1?q=1"
    trace_id = r.header("x-trace-id")
    assert UUID.match(trace_id), trace_id
    seen = echo["headers"]
    assert seen["x-trace-id"] == trace_id
    assert seen["traceparent"].startswith(f"00-{trace_id.replace('-', '')}-")
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", seen["traceparent"])
    assert seen["x-gateway"] == "e2e-gateway"
    assert re.fullmatch(r"\d+\.\d\dms", r.header("x-response-time")), r.header("x-response-time")


def test_each_request_gets_a_new_trace_id(gw):
    ids = {gw.get("/api/v1/products/1").header("x-trace-id") for _ in range(5)}
    assert len(ids) == 5


def test_well_formed_incoming_trace_id_is_kept(gw):
    tid = "0af76519-16cd-43dd-8448-eb211c80319c"
    r = gw.get("/api/v1/products/1", [("X-Trace-ID", tid)])
    assert r.header("x-trace-id") == tid
    assert r.json()["headers"]["x-trace-id"] == tid
    r = gw.get("/api/v1/nope", [("X-Trace-ID", tid)])
    assert error_body(r, 404)["trace_id"] == tid


@pytest.mark.parametrize("bad", ["x", "not-a-trace-id", "0" * 32, "g" * 32, "a" * 300])
def test_malformed_incoming_trace_id_is_replaced(gw, bad):
    r = gw.get("/api/v1/products/1", [("X-Trace-ID", bad)])
    assert UUID.match(r.header("x-trace-id")), r.header("x-trace-id")


def test_incoming_traceparent_is_continued(gw):
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = gw.get("/api/v1/products/1", [("traceparent", tp)])
    assert r.header("x-trace-id") == "4bf92f35-77b3-4da6-a3ce-929d0e0e4736"
    sent = r.json()["headers"]["traceparent"]
    assert sent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and not sent.startswith(tp[:36] + "00f067aa")


def test_unknown_route_is_404_json(gw):
    error_body(gw.get("/api/v1/unknown/thing"), 404, "Route not found")
    error_body(gw.get("/api/v1"), 404, "Route not found")
    error_body(gw.get("/api/v1/productsx"), 404, "Route not found")
    error_body(gw.get("/somewhere/else"), 404, "Route not found")


def test_method_not_listed_is_405_with_allow(gw):
    r = gw.request("DELETE", "/api/v1/products/1")
    error_body(r, 405)
    assert r.header("allow") == "GET"
    r = gw.request("GET", "/api/v1/payments/1", bearer(token()))
    error_body(r, 405)
    assert r.header("allow") == "POST"


def test_health(gw):
    r = gw.get("/health")
    assert r.status == 200
    assert r.json()["status"] == "healthy"


def test_upstream_unreachable_is_503_json(gw):
    body = error_body(gw.get("/api/v1/down/x"), 503)
    assert body["error"] == "Service Unavailable"


def test_upstream_timeout_is_504_json(gw):
    started = time.monotonic()
    body = error_body(gw.get("/api/v1/slow/x?delay_ms=3000"), 504)
    assert body["error"] == "Gateway Timeout"
    assert time.monotonic() - started < 2.5, "the route timeout is 0.5 s"
    assert gw.get("/api/v1/slow/x?delay_ms=10").status == 200


def test_cors_preflight_is_answered_by_envoy(gw):
    r = gw.request("OPTIONS", "/api/v1/users/1", [("Origin", "https://app.example.com"),
                                                  ("Access-Control-Request-Method", "POST"),
                                                  ("Access-Control-Request-Headers", "authorization")])
    assert r.status == 200, r
    assert r.header("access-control-allow-origin") == "https://app.example.com"
    assert "POST" in r.header("access-control-allow-methods")
    r = gw.get("/api/v1/products/1", [("Origin", "https://app.example.com")])
    assert r.header("access-control-allow-origin") == "https://app.example.com"
    assert "X-Trace-ID" in r.header("access-control-expose-headers")
    # Only the configured origins: another site's origin is not reflected.
    r = gw.request("OPTIONS", "/api/v1/users/1", [("Origin", "https://evil.example"),
                                                  ("Access-Control-Request-Method", "POST")])
    assert r.header("access-control-allow-origin") is None, r.headers
    r = gw.get("/api/v1/products/1", [("Origin", "https://evil.example")])
    assert r.header("access-control-allow-origin") is None
    assert r.header("access-control-allow-credentials") is None


# --- authentication ----------------------------------------------------------------------------

def login(gw, username, password):
    return gw.request("POST", "/api/v1/auth/login", body={"username": username, "password": password})


def test_login_then_identity_headers_reach_the_upstream(gw):
    r = login(gw, "admin", "123456")
    assert r.status == 200, r
    body = r.json()
    assert body["token_type"] == "bearer"
    r = gw.get("/api/v1/users/123", bearer(body["access_token"]))
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert seen["x-user-id"] == "user-001"
    assert seen["x-user-name"] == "admin"
    assert seen["x-user-role"] == "admin"
    assert r.json()["service"] == "user-service"


def test_login_with_wrong_credentials_is_401_json(gw):
    r = login(gw, "admin", "wrong")
    assert r.status == 401
    assert r.json()["message"] == "Invalid credentials"


def test_role_user_is_forbidden_on_admin_route(gw):
    tok = login(gw, "alice", "alice123").json()["access_token"]
    body = error_body(gw.get("/api/v1/admin/anything", bearer(tok)), 403)
    assert body["error"] == "Forbidden"
    admin = login(gw, "admin", "123456").json()["access_token"]
    assert gw.get("/api/v1/admin/anything", bearer(admin)).status == 200
    # The same user token opens routes without a role restriction.
    assert gw.get("/api/v1/comments/1", bearer(tok)).status == 200


def test_missing_and_malformed_authorization(gw):
    error_body(gw.get("/api/v1/users/1"), 401, "Authorization header missing")
    fmt = "Invalid authorization format. Expected: Bearer <token>"
    for value in ["Basic YWRtaW46MTIzNDU2", "Bearer", "Token abc", f"Bearer {token()} extra", "bearer"]:
        error_body(gw.get("/api/v1/users/1", [("Authorization", value)]), 401, fmt)


def test_spoofed_identity_headers_are_stripped_everywhere(gw):
    spoof = [("X-User-ID", "root"), ("X-User-Role", "admin"), ("X-User-Name", "eve"), ("X-User-Extra", "1")]
    seen = gw.get("/api/v1/products/1", spoof).json()["headers"]
    assert not any(k.startswith("x-user-") for k in seen), seen
    seen = gw.get("/api/v1/users/1", spoof + bearer(token(sub="u-7", name="bob", role="user"))).json()["headers"]
    assert (seen["x-user-id"], seen["x-user-name"], seen["x-user-role"]) == ("u-7", "bob", "user")
    assert "x-user-extra" not in seen


def test_role_defaults_to_user_and_missing_claims_send_no_header(gw):
    now = int(time.time())
    tok = forge({"alg": "HS256"}, {"sub": "u-9", "exp": now + 60})
    seen = gw.get("/api/v1/users/1", bearer(tok)).json()["headers"]
    assert seen["x-user-role"] == "user" and seen["x-user-id"] == "u-9" and "x-user-name" not in seen
    assert gw.get("/api/v1/admin/x", bearer(tok)).status == 403


def _hostile_tokens():
    now = int(time.time())
    good = token()
    h = {"alg": "HS256", "typ": "JWT"}
    return [
        ("garbage", "garbage"),
        ("three dots of nothing", ".."),
        ("bad base64", "a$b.c$d.e$f"),
        ("payload not an object", forge(h, "[1,2,3]")),
        ("payload not json", forge(h, "not json")),
        ("header not json", forge("nope", {"exp": now + 60})),
        ("alg none", f"{b64url(json.dumps({'alg': 'none'}).encode())}.{b64url(json.dumps({'exp': now + 60}).encode())}."),
        ("RS256 header over an HMAC signature", forge({"alg": "RS256"}, {"sub": "x", "exp": now + 60})),
        ("HS512 not configured", forge({"alg": "HS512"}, {"exp": now + 60})),
        ("wrong secret", forge(h, {"sub": "x", "exp": now + 60}, secret="not-the-secret")),
        ("expired", token(ttl=-3600)),
        ("not yet valid", forge(h, {"sub": "x", "exp": now + 7200, "nbf": now + 3600})),
        ("issued in the future", forge(h, {"sub": "x", "exp": now + 7200, "iat": now + 3600})),
        ("no exp", forge(h, {"sub": "x"})),
        ("exp as a string", forge(h, {"sub": "x", "exp": str(now + 60)})),
        ("sub as an object", forge(h, {"sub": {"id": 1}, "exp": now + 60})),
        ("16 KB token", forge(h, {"sub": "x", "exp": now + 60, "pad": "p" * 16 * 1024})),
        ("truncated signature", good[:-5]),
        ("signature removed", good.rsplit(".", 1)[0] + "."),
        ("claims with CR/LF", forge(h, {"sub": "x", "name": "a\r\nX-User-Role: admin", "exp": now + 60})),
        ("claims with NUL", forge(h, {"sub": "x\u0000y", "exp": now + 60})),
        ("huge exp", forge(h, "{\"exp\": 1e400}")),
        ("deeply nested claims", forge(h, '{"exp": 1, "x": ' + "[" * 5000 + "]" * 5000 + "}")),
    ]


@pytest.mark.parametrize("name,tok", _hostile_tokens(), ids=[n for n, _ in _hostile_tokens()])
def test_hostile_tokens_get_401_json(gw, name, tok):
    body = error_body(gw.get("/api/v1/users/1", bearer(tok)), 401)
    assert body["error"] == "Unauthorized"
    assert body["message"].startswith("Invalid token: "), body


def test_hostile_headers_never_break_the_filter(gw):
    good = token()
    cases = [
        [("Authorization", f"Bearer {good}"), ("Authorization", f"Bearer {good}")],  # two headers
        [("Authorization", b"Bearer \xff\xfe\xfd")],  # not UTF-8
        [("Authorization", b"Bearer " + good.encode() + b"\x80")],
        [("Authorization", "Bearer " + "A" * 40_000)],
        [("X-Trace-ID", b"\xff" * 36)],
        [("traceparent", b"00-\xff")],
        [("X-User-ID", b"\xfe")],
    ]
    for headers in cases:
        r = gw.get("/api/v1/users/1", headers)
        assert r.status in (401, 431), (headers[:1], r)
        assert r.status < 500
    # Envoy and every worker VM still serve, and no VM crashed.
    for _ in range(8):
        assert gw.get("/api/v1/users/1", bearer(good)).status == 200
    log = gw.log_path.read_text()
    assert "panicked" not in log and "Uncaught" not in log and "vm_reload" not in log
    assert gw.alive()


def test_expired_within_clock_skew_is_accepted(gw):
    assert gw.get("/api/v1/users/1", bearer(token(ttl=-30))).status == 200


# --- configuration -----------------------------------------------------------------------------

def test_shipped_gateway_file_renders_and_envoy_validates_it(tmp_path):
    out = tmp_path / "envoy.yaml"
    r = render(ROOT / "config" / "gateway.yaml", out, {"PATH": "/usr/bin:/bin"})  # no secret needed
    assert r.returncode == 0, r.stderr
    v = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(out), "--disable-hot-restart", "-l", "info"],
                       capture_output=True, text=True,
                       env={"JWT_SECRET": SECRET, "WEBDIS_AUTH": "gateway:pw", "PATH": "/usr/bin:/bin"})
    assert v.returncode == 0, v.stdout[-2000:] + v.stderr[-2000:]
    assert "gateway filter configured: 8 routes, jwt on" in v.stdout + v.stderr


@pytest.mark.parametrize("yaml_text,expected", [
    ("gateway: {port: 8000}\nroutes:\n  - name: a\n    prefix: /a\n    upstream: http://127.0.0.1:1\n    methods: GET\n",
     "routes[0].methods: invalid type: string \"GET\", expected a sequence at line 6"),
    ("gateway: {port: 8000}\nroutez: []\n", "unknown field `routez`"),
    ("gateway: {port: 8000, prefix: api}\n", "gateway.prefix: must start with '/'"),
    ("gateway: {}\nroutes:\n  - {name: a, prefix: /a, upstream: 'http://127.0.0.1:1', methods: [FETCH], auth_required: false}\n",
     "routes[0].methods[0]: unknown method \"FETCH\""),
    ("gateway: {}\nroutes:\n  - {name: a, prefix: /a, upstream: 'https://x:1', auth_required: false}\n",
     "routes[0].upstream: \"https://x:1\" must start with http://"),
    ("gateway: {}\nroutes:\n  - {name: a, prefix: /a, upstream: 'http://127.0.0.1:1', timeout: -1, auth_required: false}\n",
     "routes[0].timeout: must be a number of seconds"),
    ("gateway: {}\nroutes:\n  - {name: a, prefix: /a, upstream: 'http://127.0.0.1:1'}\n",
     "routes[0].auth_required: a route requires auth but no jwt section is configured"),
])
def test_bad_gateway_file_fails_naming_the_field(tmp_path, yaml_text, expected):
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text(yaml_text)
    r = render(cfg, tmp_path / "out.yaml", {"PATH": "/usr/bin:/bin"})
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert expected in r.stderr, r.stderr
    assert not (tmp_path / "out.yaml").exists()


def test_filter_refuses_a_bad_json_configuration(gw, tmp_path):
    text = gw.envoy_yaml.read_text()
    # The filter's JSON is embedded as a quoted YAML string.
    good = '\\"methods\\":[\\"GET\\",\\"POST\\",\\"PUT\\",\\"DELETE\\"]'
    assert good in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(good, '\\"methods\\":[\\"GTE\\"]', 1))
    v = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(bad), "--disable-hot-restart", "-l", "info"],
                       capture_output=True, text=True)
    out = v.stdout + v.stderr
    assert v.returncode != 0
    assert 'gateway filter: invalid configuration: routes[0].methods[0]: unknown method "GTE"' in out, out[-3000:]


def test_the_secret_stays_out_of_envoys_configuration(gw, tmp_path):
    """The filter reads JWT_SECRET from Envoy's environment (host_env_keys): neither the rendered
    bootstrap nor /config_dump contains it, and rendering does not need it."""
    assert SECRET not in gw.envoy_yaml.read_text()
    dump = request(gw.admin_port, "GET", "/config_dump").body.decode()
    assert "JWT_SECRET" in dump and SECRET not in dump
    assert gw.get("/api/v1/users/1", bearer(token())).status == 200, "and tokens signed with it verify"
    # Without the variable, the filter refuses to start and says why.
    cfg = tmp_path / "gateway.yaml"
    cfg.write_text("gateway: {}\njwt: {secret_env: E2E_UNSET_SECRET}\nroutes: []\n")
    out = tmp_path / "envoy.yaml"
    r = render(cfg, out, {"PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    v = subprocess.run([str(ENVOY), "--mode", "validate", "-c", str(out), "--disable-hot-restart", "-l", "info"],
                       capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})
    assert v.returncode != 0
    assert "jwt.secret_env: environment variable E2E_UNSET_SECRET is not set" in v.stdout + v.stderr


@pytest.mark.parametrize("path,status", [
    ("/api/v1/products/1", 200),   # upstream answer
    ("/api/v1/down/1", 503),       # Envoy's own local reply: upstream unreachable
    ("/health", 200),              # Envoy's direct response
    ("/api/v1/users/1", 401),      # the filter's own reply
])
def test_every_response_carries_exactly_one_trace_id(gw, path, status):
    """Upstream answers, Envoy's own local replies and direct responses, and the filter's own
    replies all carry one X-Trace-ID, the request's."""
    tid = "1af76519-16cd-43dd-8448-eb211c80319c"
    r = gw.get(path, [("X-Trace-ID", tid)])
    assert r.status == status, r
    assert [v for k, v in r.headers if k == "x-trace-id"] == [tid], r.headers
    fresh = gw.get(path)
    values = [v for k, v in fresh.headers if k == "x-trace-id"]
    assert len(values) == 1 and UUID.match(values[0]), fresh.headers


@pytest.mark.parametrize("path", ["/api/v1/users/1", "/api/v1/nope", "/api/v1/products/1"])
def test_a_replaced_trace_id_is_the_only_one_in_the_response(gw, path):
    """A malformed incoming id is replaced: the client's value never comes back beside the chosen
    one, on the filter's own replies either."""
    r = gw.get(path, [("X-Trace-ID", "not-a-trace-id")])
    values = [v for k, v in r.headers if k == "x-trace-id"]
    assert len(values) == 1 and UUID.match(values[0]), r.headers
    if r.status >= 400:
        assert r.json()["trace_id"] == values[0]
