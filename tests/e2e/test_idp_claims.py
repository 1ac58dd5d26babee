"""Tokens as identity providers write them, end to end on real Envoy: the demo identity provider
mints Keycloak-, Entra ID-, Okta- and Auth0-shaped tokens (role lists with admin anywhere in
them, scopes as a string or a list, namespaced claims, `typ: at+jwt`), one gateway per provider
maps them as the README's examples do, and routes check any-of roles, every-of roles and scopes.
Hostile tokens (duplicate keys, bound tokens, other JWT types, `crit: null`) get 401."""

import json
import time

import pytest

from harness import SECRET, Gateway, Services, bearer

ADMIN = ("admin", "123456")
ALICE = ("alice", "alice123")

# What each provider's gateway file says (README "Tokens from identity providers"), and what the
# provider calls the admin role and the two order scopes.
PROVIDERS = {
    "keycloak": ({"user_name": "preferred_username", "role": "realm_access.roles"},
                 "admin", "orders:read", "orders:write"),
    "entra": ({"user_id": "oid", "role": "roles"}, "Orders.Admin", "orders:read", "orders:write"),
    "okta": ({"role": "groups"}, "Admins", "orders:read", "orders:write"),
    "auth0": ({"role": ["https://example.com/roles"], "scopes": "permissions"}, "admin", "read:orders",
              "write:orders"),
}


@pytest.fixture(scope="module")
def services():
    s = Services(["user-service", "order-service", "admin-service"])
    yield s
    s.stop()


def provider_file(services, shape):
    claims, admin_role, read, write = PROVIDERS[shape]
    auth = services.ports["auth-service"]

    def up(name):
        return f"http://127.0.0.1:{services.ports[name]}"
    return {
        "gateway": {"prefix": "/api/v1", "name": f"idp-{shape}"},
        "jwt": {"algorithms": ["HS256"], "secret_env": "JWT_SECRET", "scopes_header": "X-User-Scopes",
                "issuers": [{"name": shape, "issuer": f"http://127.0.0.1:{auth}", "algorithms": ["RS256", "ES256"],
                             "claims": claims,
                             "remote_jwks": {"uri": f"http://127.0.0.1:{auth}/.well-known/jwks.json",
                                             "refresh_interval": 60, "timeout": 1}}]},
        "routes": [
            {"name": "admin-service", "prefix": "/admin", "upstream": up("admin-service"), "methods": ["GET"],
             "roles": [admin_role, "nobody-else"]},
            {"name": "orders-read", "prefix": "/orders/read", "upstream": up("order-service"), "methods": ["GET"],
             "scopes": [read]},
            {"name": "orders-write", "prefix": "/orders/write", "upstream": up("order-service"), "methods": ["GET"],
             "scopes": [read, write]},
            {"name": "user-service", "prefix": "/users", "upstream": up("user-service"), "methods": ["GET"],
             "roles_all": [admin_role, "auditor"]},
            {"name": "auth-service", "prefix": "/auth", "upstream": up("auth-service"), "methods": ["POST"],
             "auth_required": False},
        ],
    }


@pytest.fixture(scope="module", params=sorted(PROVIDERS))
def provider(request, services):
    g = Gateway(provider_file(services, request.param), concurrency=1)
    yield request.param, g
    g.stop()


def login(gw, who, shape, alg="RS256"):
    r = gw.request("POST", "/api/v1/auth/login",
                   body={"username": who[0], "password": who[1], "alg": alg, "shape": shape})
    assert r.status == 200, r
    return r.json()["access_token"]


def claims_of(tok):
    import base64
    p = tok.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(p + "=" * (-len(p) % 4)))


def test_the_admin_role_anywhere_in_the_list_passes_and_the_upstream_sees_every_role(provider):
    shape, gw = provider
    _, admin_role, read, write = PROVIDERS[shape]
    tok = login(gw, ADMIN, shape)
    r = gw.get("/api/v1/admin/x", bearer(tok))
    assert r.status == 200, r
    seen = r.json()["headers"]
    roles = seen["x-user-role"].split(",")
    assert admin_role in roles and len(roles) >= 2, roles
    if shape == "keycloak":
        # The admin role is the third of three, as Keycloak writes them.
        assert roles == ["offline_access", "default-roles-demo", "admin"]
        assert seen["x-user-name"] == "admin"
    if shape == "entra":
        assert seen["x-user-id"] == claims_of(tok)["oid"]
    if shape == "auth0":
        assert seen["x-user-id"].startswith("auth0|")
    assert set(seen["x-user-scopes"].split(" ")) >= {read, write}


def test_a_token_without_the_role_gets_403_naming_its_roles(provider):
    shape, gw = provider
    tok = login(gw, ALICE, shape)
    r = gw.get("/api/v1/admin/x", bearer(tok))
    assert r.status == 403, r
    body = r.json()
    assert body["error"] == "Forbidden"
    assert body["message"].startswith("Role '") and "not allowed to access route 'admin-service'" in body["message"]


def test_roles_all_needs_every_role(provider):
    shape, gw = provider
    r = gw.get("/api/v1/users/1", bearer(login(gw, ADMIN, shape)))
    assert r.status == 403, r
    assert r.json()["message"] == "Role 'auditor' is required to access route 'user-service'"


def test_a_missing_scope_is_403_insufficient_scope_with_the_challenge(provider):
    shape, gw = provider
    _, _, read, write = PROVIDERS[shape]
    alice = login(gw, ALICE, shape, alg="ES256")
    assert gw.get("/api/v1/orders/read/1", bearer(alice)).status == 200
    r = gw.get("/api/v1/orders/write/1", bearer(alice))
    assert r.status == 403, r
    assert r.json()["message"] == f"Scope '{write}' is required to access route 'orders-write'"
    assert r.header("www-authenticate") == f'Bearer error="insufficient_scope", scope="{read} {write}"'
    assert gw.get("/api/v1/orders/write/1", bearer(login(gw, ADMIN, shape, alg="ES256"))).status == 200


@pytest.fixture(scope="module")
def secret_gw(services):
    g = Gateway(provider_file(services, "keycloak"), concurrency=1)
    yield g
    g.stop()


def test_hostile_tokens_are_refused(secret_gw):
    gw = secret_gw
    now = int(time.time())
    base = f'"sub":"u-1","iat":{now},"exp":{now + 600}'
    cases = {
        "duplicate_key": (json.dumps({"alg": "HS256"}), "{" + base + ',"role":"user","role":"admin"}'),
        "bound_token": (json.dumps({"alg": "HS256"}),
                        "{" + base + ',"cnf":{"jkt":"0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}'),
        "typ": (json.dumps({"alg": "HS256", "typ": "dpop+jwt"}), "{" + base + "}"),
        "crit": (json.dumps({"alg": "HS256", "crit": None}), "{" + base + "}"),
        "too_deep": (json.dumps({"alg": "HS256"}), "{" + base + ',"x":' + "[" * 40 + "]" * 40 + "}"),
    }
    good = forge_raw(json.dumps({"alg": "HS256", "typ": "at+jwt"}), "{" + base + "}")
    assert gw.get("/api/v1/admin/x", bearer(good)).status == 403, "valid, but not an admin"
    for reason, (header, payload) in cases.items():
        r = gw.get("/api/v1/orders/read/1", bearer(forge_raw(header, payload)))
        assert r.status == 401, (reason, r)
        assert r.json()["message"].startswith("Invalid token: "), (reason, r)
    logout = forge_raw(json.dumps({"alg": "HS256", "typ": "logout+jwt"}),
                       "{" + base + ',"events":{"http://schemas.openid.net/event/backchannel-logout":{}}}')
    assert gw.get("/api/v1/orders/read/1", bearer(logout)).status == 401


def forge_raw(header: str, payload: str) -> str:
    """A token from exact JSON text (duplicate keys survive), signed with the e2e secret."""
    import base64
    import hashlib
    import hmac

    def b64(b):
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()
    signing_input = f"{b64(header.encode())}.{b64(payload.encode())}"
    sig = hmac.new(SECRET.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"
