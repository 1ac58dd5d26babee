"""The core cases against the docker-compose stack (`make compose-test` starts it): Envoy with the
filter on 127.0.0.1:8000, Redis, webdis and the demo services in containers, secrets given at
start-up through the environment."""
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))

from harness import bearer, forge, request, wait_for  # noqa: E402

PORT = 8000


def get(path, headers=()):
    return request(PORT, "GET", path, headers)


def post_auth(path, headers=(), body=None):
    """POST under /auth, which allows 3 requests per second per address: wait out a 429."""
    for _ in range(20):
        r = request(PORT, "POST", path, headers, body)
        if r.status != 429:
            return r
        time.sleep(0.4)
    return r


def login(user="admin", password="123456", alg=None):
    body = {"username": user, "password": password}
    if alg:
        body["alg"] = alg
    r = post_auth("/api/v1/auth/login", body=body)
    assert r.status == 200, r
    return r.json()["access_token"]


def test_health_and_public_routes():
    assert get("/health").status == 200
    r = get("/api/v1/products/1")
    assert r.status == 200 and r.header("x-trace-id")


def test_the_secret_came_from_the_environment_at_start_up():
    tok = login()
    r = get("/api/v1/users/1", bearer(tok))
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert (seen["x-user-id"], seen["x-user-role"]) == ("user-001", "admin")
    assert get("/api/v1/admin/x", bearer(login("alice", "alice123"))).status == 403
    # Envoy verifies with the secret the stack was started with (compose_test.sh exports it):
    # a token signed with it is accepted, one signed with anything else is refused.
    now = int(time.time())
    claims = {"sub": "env-user", "role": "user", "iat": now, "exp": now + 60}
    ours = forge({"alg": "HS256", "typ": "JWT"}, claims, os.environ["JWT_SECRET"])
    assert get("/api/v1/users/1", bearer(ours)).json()["headers"]["x-user-id"] == "env-user"
    other = forge({"alg": "HS256", "typ": "JWT"}, claims, "not-the-secret-not-the-secret-not")
    assert get("/api/v1/users/1", bearer(other)).status == 401


def test_identity_provider_tokens():
    tok = login("alice", "alice123", alg="RS256")
    wait_for(lambda: get("/api/v1/users/1", bearer(tok)).status == 200, timeout=10, what="keys fetched")


def test_revocation_through_webdis_and_redis():
    tok = login()
    assert get("/api/v1/users/1", bearer(tok)).status == 200
    assert post_auth("/api/v1/auth/logout", bearer(tok)).status == 200
    assert get("/api/v1/users/1", bearer(tok)).status == 401


def test_canary_and_logs():
    tok = login()  # user-001: listed for the order-service canary
    tid = str(uuid.uuid4())
    r = get("/api/v1/orders/1", bearer(tok) + [("X-Trace-ID", tid)])
    assert r.status == 200 and r.json()["version"] == "v2", r

    found = {}

    def stored():
        q = get(f"/api/v1/admin/logs?trace_id={tid}", bearer(tok))
        if q.status == 200 and q.json()["count"] >= 1:
            found.update(q.json()["records"][0])
        return bool(found)
    wait_for(stored, timeout=10, what="the log record stored in Redis", interval=0.5)
    assert (found["status"], found["canary"], found["user_id"]) == (200, True, "user-001"), found
