"""The core cases every host-shaped Envoy runs (Istio's ingress gateway and waypoint, Envoy
Gateway), and the gateway file they run against: identity, revocation through webdis by the
host's cluster name, limits, the canary by the header Envoy routes on, and keys from an identity
provider by the host's cluster name."""
import uuid

from conftest import gateway_file
from harness import bearer, free_port, token, wait_for


def shaped_gateway_file(services, webdis, canary_services):
    """The shared gateway file: a canary on order-service, a tight per-user limit on
    comment-service, and the demo identity provider's key set."""
    f = gateway_file(services.ports, free_port(), webdis.port)
    auth = services.ports["auth-service"]
    for r in f["routes"]:
        if r["name"] == "order-service":
            r["canary"] = {"upstream": f"http://127.0.0.1:{canary_services.ports['order-service-v2']}",
                           "users": ["user-001"], "header": "X-Canary"}
        if r["name"] == "comment-service":
            r["rate_limit"] = {"max_calls": 1000, "per_user": {"max_calls": 2, "period": 60}}
    f["jwt"]["issuers"] = [{
        "name": "demo-idp", "issuer": f"http://127.0.0.1:{auth}", "algorithms": ["RS256", "ES256", "EdDSA"],
        "remote_jwks": {"uri": f"http://127.0.0.1:{auth}/.well-known/jwks.json", "refresh_interval": 5}}]
    return f


def auth_and_identity(g):
    assert g.get("/api/v1/users/1").status == 401
    r = g.get("/api/v1/users/1", bearer(token(sub="user-042", name="kim", role="user")))
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert (seen["x-user-id"], seen["x-user-name"], seen["x-user-role"]) == ("user-042", "kim", "user")
    assert g.get("/api/v1/admin/x", bearer(token(role="user"))).status == 403


def revocation(g, redis):
    tok = token(sub="user-077", jti=uuid.uuid4().hex)
    assert g.get("/api/v1/users/1", bearer(tok)).status == 200
    assert g.request("POST", "/api/v1/auth/logout", bearer(tok)).status == 200
    assert redis.cli("EXISTS", f"token:blacklist:{tok}") == "1"
    assert g.get("/api/v1/users/1", bearer(tok)).status == 401


def rate_limits(g):
    tok = token(sub=f"u-{uuid.uuid4().hex[:6]}")
    codes = [g.get("/api/v1/comments/1", bearer(tok)).status for _ in range(3)]
    assert codes == [200, 200, 429], codes


def canary(g):
    r = g.get("/api/v1/orders/1", bearer(token(sub="user-001")))
    assert r.status == 200 and r.json()["version"] == "v2", r
    r = g.get("/api/v1/orders/1", bearer(token(sub="user-900")))
    assert r.status == 200 and r.json()["version"] == "v1", r


def identity_provider_keys(g):
    r = g.request("POST", "/api/v1/auth/login", body={"username": "admin", "password": "123456", "alg": "ES256"})
    tok = r.json()["access_token"]
    wait_for(lambda: g.get("/api/v1/users/1", bearer(tok)).status == 200, timeout=10, what="keys fetched")
