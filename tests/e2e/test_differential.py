"""One answer on both runtimes: a generated corpus (paths, methods, token kinds, spoofed headers,
endpoint calls, ids needing decoding) sent to a gateway running the .wasm and to one running the
native module, each with its own Redis and webdis, comparing status, body, response headers and
what the upstream sees. It starts both runtimes itself, so it runs in the wasm pass only."""
import json
import time
import uuid

import pytest

from conftest import gateway_file
from harness import Gateway, Redis, Webdis, b64url, forge, free_port, token

# What differs between two runs of anything: trace ids, times, lengths of bodies that hold them.
VOLATILE_RESPONSE = {"date", "x-envoy-upstream-service-time", "content-length",
                     "x-request-id"}
PRESENCE_ONLY = {"x-trace-id", "x-response-time", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after"}
VOLATILE_UPSTREAM = {"host", "x-trace-id", "traceparent", "x-request-id", "content-length",
                     "x-envoy-expected-rq-timeout-ms"}


@pytest.fixture(scope="module")
def pair(services):
    stores, gateways = [], {}
    try:
        for runtime in ("wasm", "native"):
            r = Redis()
            w = Webdis(r.port)
            stores += [w, r]
            f = gateway_file(services.ports, free_port(), webdis_port=w.port)
            f["gateway"]["runtime"] = runtime
            for route in f["routes"]:
                route["rate_limit"] = {"max_calls": 100000, "period": 60}
            gateways[runtime] = Gateway(f)
        yield gateways
    finally:
        for g in gateways.values():
            g.stop()
        for s in stores:
            s.stop()


def corpus():
    now = int(time.time())

    def tok(**claims):
        c = {"sub": "user-001", "name": "ann", "role": "user", "iat": now, "exp": now + 600}
        c.update(claims)
        return forge({"alg": "HS256", "typ": "JWT"}, {k: v for k, v in c.items() if v is not None})

    tokens = {
        "none": None,
        "garbage": "Bearer garbage",
        "basic": "Basic dXNlcjpwYXNz",
        "bearer-empty": "Bearer ",
        "user": "Bearer " + tok(),
        "admin": "Bearer " + token(sub="admin-7", role="admin"),
        "empty-role": "Bearer " + tok(sub="user-002", role=""),
        "empty-name": "Bearer " + tok(sub="user-003", name=""),
        "no-role": "Bearer " + tok(sub="user-004", role=None),
        "role-list": "Bearer " + tok(sub="user-005", role=["offline_access", "admin"]),
        "expired": "Bearer " + tok(sub="user-006", exp=now - 3600),
        "future": "Bearer " + tok(sub="user-007", iat=now + 3600),
        "no-exp": "Bearer " + tok(sub="user-008", exp=None),
        "bad-sig": "Bearer " + forge({"alg": "HS256", "typ": "JWT"}, {"sub": "x", "exp": now + 600},
                                     secret="not-the-secret-not-the-secret-not-the-secret"),
        "alg-none": "Bearer " + b64url(b'{"alg":"none"}') + "." + tok().split(".")[1] + ".",
        "unsafe-sub": "Bearer " + tok(sub="a\r\nb"),
    }
    paths = ["/api/v1/users/1", "/api/v1/users", "/api/v1/usersx", "/api/v1/products/1?q=a%20b",
             "/api/v1/orders/7", "/api/v1/admin/x", "/api/v1/payments", "/api/v1/nope", "/health",
             "/api/v1/Users/1", "/api/v1/users/..%2f..%2fadmin", "/api/v1//users/1",
             "/api/v1/admin/logs?user_id=user-001", "/api/v1/admin/logs?trace_id=zz%7Cq",
             "/api/v1/admin/users/bob%3Bx/revoke", "/api/v1/admin/users/a%2Fb/revoke"]
    methods = ["GET", "POST", "DELETE", "PUT"]
    spoofs = [[], [("X-User-Id", "root")], [("x_user_role", "admin")], [("X-Route-To", "canary")],
              [("X-Forwarded-For", "1.2.3.4")], [("X-Real-IP", "9.9.9.9"), ("Forwarded", "for=1.1.1.1")]]
    cases = []
    for p in paths:
        for m in methods:
            for kind, auth in tokens.items():
                cases.append((m, p, kind, auth, []))
    for p in paths[:6]:
        for kind in ("none", "user", "admin"):
            for spoof in spoofs[1:]:
                cases.append(("GET", p, kind, tokens[kind], spoof))
    # Endpoint calls that change state last, in the same order on both: refresh, bans, logout.
    for kind in ("user", "admin", "empty-role", "garbage"):
        cases.append(("POST", "/api/v1/auth/refresh", kind, tokens[kind], []))
    for kind in ("admin", "user"):
        cases.append(("POST", "/api/v1/admin/users/user-009%2Bx/revoke", kind, tokens[kind], []))
    for kind in ("empty-name", "user", "user", "garbage"):
        cases.append(("POST", "/api/v1/auth/logout", kind, tokens[kind], []))
    for kind in ("user", "empty-name"):
        cases.append(("GET", "/api/v1/users/1", kind, tokens[kind], []))
    return cases


def normalise(r):
    """Status, body (trace ids and minted tokens replaced) and headers as one comparable value."""
    headers = {}
    for k, v in r.headers:
        if k in VOLATILE_RESPONSE:
            continue
        headers[k] = "<present>" if k in PRESENCE_ONLY else v
    try:
        body = json.loads(r.body)
    except ValueError:
        body = r.body.decode("latin-1")
    if isinstance(body, dict):
        for key in ("trace_id", "access_token", "refresh_token"):
            if key in body:
                body[key] = f"<{key}>"
        if isinstance(body.get("records"), list):
            # A log query: what it finds depends on when each gateway's timer flushed; compared
            # by shape.
            body["records"] = sorted({k for r in body["records"] for k in r})
            body["count"] = "<count>"
        if isinstance(body.get("headers"), dict):  # the echo service: what the upstream saw
            body["headers"] = {k: v for k, v in body["headers"].items() if k.lower() not in VOLATILE_UPSTREAM}
    return r.status, body, headers


def test_both_runtimes_give_one_answer(pair):
    cases = corpus()
    differences = []
    for method, path, kind, auth, spoof in cases:
        headers = list(spoof) + ([("Authorization", auth)] if auth else [])
        trace = str(uuid.uuid4())
        headers.append(("X-Trace-ID", trace))
        answers = {rt: normalise(g.request(method, path, headers)) for rt, g in pair.items()}
        if answers["wasm"] != answers["native"]:
            differences.append((method, path, kind, spoof, answers))
    assert len(cases) > 1000
    kinds = sorted({f"{m} {p} {k}" for m, p, k, _, _ in differences})
    assert not differences, f"{len(differences)} of {len(cases)} differ ({kinds[:40]}); first: {differences[:3]}"
