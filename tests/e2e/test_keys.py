"""Tokens from identity providers, end to end: real Envoy, the demo identity provider (the auth
service: RS256/ES256/EdDSA logins, a published JWKS, key rotation) and a key server these tests
control (a provider that fails, answers garbage, or goes away)."""
import http.server
import json
import threading
import time
import uuid

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from harness import (SECRET, Gateway, b64url, bearer, forge, free_port, request, token,
                     wait_for)
from conftest import gateway_file

TEST_ISS = "https://keys.test.example"
PARTNER_SECRET = "partner-secret-partner-secret-partner-secret!"


class KeyServer:
    """A JWKS endpoint whose answers the test sets: a key set, garbage, an error, or nothing."""

    def __init__(self, mode="good"):
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = "test-" + uuid.uuid4().hex[:6]
        self.mode = mode
        self.hits = 0
        self.paths = []
        outer = self

        class H(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                outer.hits += 1
                outer.paths.append(self.path)
                if outer.mode == "good":
                    status, body = 200, json.dumps(outer.jwks()).encode()
                elif outer.mode == "garbage":
                    status, body = 200, b"<html>maintenance</html>"
                elif outer.mode == "huge":
                    status, body = 200, b'{"keys":[' + b" " * (300 * 1024) + b"]}"
                else:
                    status, body = 500, b'{"error":"down"}'
                self.send_response(status)
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *a):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def jwks(self):
        n = self.key.public_key().public_numbers()
        as_b64 = lambda i: b64url(i.to_bytes((i.bit_length() + 7) // 8, "big"))  # noqa: E731
        return {"keys": [{"kty": "RSA", "kid": self.kid, "alg": "RS256", "use": "sig",
                          "n": as_b64(n.n), "e": as_b64(n.e)}]}

    def sign(self, header, claims, key=None):
        h = b64url(json.dumps(header, separators=(",", ":")).encode())
        p = b64url(json.dumps(claims, separators=(",", ":")).encode())
        sig = (key or self.key).sign(f"{h}.{p}".encode(), padding.PKCS1v15(), hashes.SHA256())
        return f"{h}.{p}.{b64url(sig)}"

    def token(self, iss=TEST_ISS, kid=None, **header_extra):
        now = int(time.time())
        claims = {"sub": "svc-42", "name": "robot", "role": "user", "iss": iss, "iat": now, "exp": now + 600}
        return self.sign(dict({"alg": "RS256", "kid": kid or self.kid}, **header_extra), claims)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def remote(uri, **kw):
    r = {"uri": uri, "refresh_interval": 1, "min_refetch_interval": 0.5, "max_wait": 1,
         "max_stale": 4, "timeout": 1}
    r.update(kw)
    return r


@pytest.fixture(scope="module")
def keyserver():
    k = KeyServer()
    yield k
    k.stop()


@pytest.fixture(scope="module")
def idp_gw(services, keyserver):
    """The default HS256 issuer, the demo provider, a test provider, and a partner with its own
    secret from the environment."""
    f = gateway_file(services.ports, free_port())
    auth = services.ports["auth-service"]
    f["jwt"]["issuers"] = [
        {"name": "demo-idp", "issuer": f"http://127.0.0.1:{auth}", "algorithms": ["RS256", "ES256", "EdDSA"],
         "remote_jwks": remote(f"http://127.0.0.1:{auth}/.well-known/jwks.json", max_stale=3600)},
        {"name": "test-idp", "issuer": TEST_ISS, "algorithms": ["RS256"],
         "remote_jwks": remote(f"http://127.0.0.1:{keyserver.port}/jwks", max_stale=12)},
        {"name": "partner", "issuer": "partner", "algorithms": ["HS512"], "secret_env": "PARTNER_SECRET"},
    ]
    g = Gateway(f, env={"PARTNER_SECRET": PARTNER_SECRET})
    yield g
    g.stop()


def login(gw, alg=None, user="admin", password="123456"):
    body = {"username": user, "password": password}
    if alg:
        body["alg"] = alg
    r = gw.request("POST", "/api/v1/auth/login", body=body)
    assert r.status == 200, r
    return r.json()["access_token"]


def header_of(tok):
    import base64
    h = tok.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
def test_each_provider_algorithm_is_accepted_with_its_identity(idp_gw, alg):
    tok = login(idp_gw, alg)
    assert header_of(tok)["alg"] == alg and header_of(tok)["kid"]
    r = idp_gw.get("/api/v1/users/1", bearer(tok))
    assert r.status == 200, r
    seen = r.json()["headers"]
    assert (seen["x-user-id"], seen["x-user-name"], seen["x-user-role"]) == ("user-001", "admin", "admin")
    # Roles come from the provider's token too.
    alice = login(idp_gw, alg, "alice", "alice123")
    assert idp_gw.get("/api/v1/admin/x", bearer(alice)).status == 403


def test_the_reference_hs256_login_still_works_beside_them(idp_gw):
    tok = login(idp_gw)
    assert header_of(tok) == {"alg": "HS256", "typ": "JWT"}
    assert idp_gw.get("/api/v1/users/1", bearer(tok)).status == 200


def test_a_rotated_key_is_accepted_on_the_first_request(idp_gw, services):
    auth = services.ports["auth-service"]
    before = idp_gw.settled("issuer=.=demo-idp;.;gateway_jwks_unknown_kid_fetches_total")
    for _ in range(3):
        assert request(auth, "POST", "/admin/rotate").status == 200
        tok = login(idp_gw, "ES256")
        # No waiting for a refresh: the unknown kid is fetched while the request waits.
        r = idp_gw.get("/api/v1/users/1", bearer(tok))
        assert r.status == 200, r
        time.sleep(0.6)  # past min_refetch_interval, so each rotation may fetch at once
    after = idp_gw.settled("issuer=.=demo-idp;.;gateway_jwks_unknown_kid_fetches_total")
    fetched = after["issuer=.=demo-idp;.;gateway_jwks_unknown_kid_fetches_total"] - before["issuer=.=demo-idp;.;gateway_jwks_unknown_kid_fetches_total"]
    # Each rotation was met by a fetch, unless the 1 s refresh got there first.
    assert 0 <= fetched <= 3


def test_retired_keys_are_refused_after_the_refresh_interval(idp_gw, services):
    auth = services.ports["auth-service"]
    old = login(idp_gw, "RS256")
    assert idp_gw.get("/api/v1/users/1", bearer(old)).status == 200
    assert request(auth, "POST", "/admin/rotate?retire=1").status == 200
    retired_at = time.monotonic()
    wait_for(lambda: idp_gw.get("/api/v1/users/1", bearer(old)).status == 401, timeout=5,
             what="the retired key's token to be refused")
    # Every VM (one per worker) takes the new set from shared data on its next tick (250 ms).
    time.sleep(0.6)
    assert time.monotonic() - retired_at < 3.5, "refused within the refresh interval (1 s) plus ticks"
    for _ in range(6):
        r = idp_gw.get("/api/v1/users/1", bearer(old))
        assert r.status == 401 and r.json()["message"] == "Invalid token: unknown signing key (kid)", r
    assert idp_gw.get("/api/v1/users/1", bearer(login(idp_gw, "RS256"))).status == 200


def test_a_failing_provider_keeps_the_last_good_set_then_503_past_max_stale(idp_gw, keyserver):
    keyserver.mode = "good"
    tok = keyserver.token()
    wait_for(lambda: idp_gw.get("/api/v1/users/1", bearer(tok)).status == 200, timeout=5, what="test keys")
    errors = "issuer=.=test-idp;.;gateway_jwks_fetch_errors_total"
    base = idp_gw.settled(errors)[errors]
    for mode in ["garbage", "error", "huge"]:
        keyserver.mode = mode
        hits = keyserver.hits
        wait_for(lambda: keyserver.hits > hits + 1, timeout=5, what=f"fetches while {mode}")
        r = idp_gw.get("/api/v1/users/1", bearer(tok))
        assert r.status == 200, f"{mode}: {r}"
    # Every failed fetch is counted (counters reach Envoy once a second).
    wait_for(lambda: idp_gw.counter(errors) >= base + 3, timeout=5, what="fetch errors counted")
    # max_stale is 12 s: then the set is gone and the issuer's requests get a 503, not a 401.
    wait_for(lambda: idp_gw.get("/api/v1/users/1", bearer(tok)).status == 503, timeout=15,
             what="the stale set to be dropped")
    r = idp_gw.get("/api/v1/users/1", bearer(tok))
    assert r.json()["error"] == "Service Unavailable"
    assert "issuer 'test-idp'" in r.json()["message"]
    # The provider returns: service comes back by itself.
    keyserver.mode = "good"
    wait_for(lambda: idp_gw.get("/api/v1/users/1", bearer(tok)).status == 200, timeout=10,
             what="recovery")
    assert idp_gw.alive()


def test_before_the_first_good_fetch_the_answer_is_a_503_json(services):
    ks = KeyServer(mode="error")
    f = gateway_file(services.ports, free_port())
    f["jwt"]["issuers"] = [{"name": "late", "issuer": TEST_ISS, "algorithms": ["RS256"],
                            "remote_jwks": remote(f"http://127.0.0.1:{ks.port}/jwks")}]
    g = Gateway(f)
    try:
        tok = ks.token()
        r = g.get("/api/v1/users/1", bearer(tok))
        assert r.status == 503, r
        body = r.json()
        assert body["error"] == "Service Unavailable" and "issuer 'late'" in body["message"], body
        assert r.header("content-type") == "application/json"
        # HS256 tokens of the default issuer are not affected.
        assert g.get("/api/v1/users/1", bearer(token())).status == 200
        ks.mode = "good"
        wait_for(lambda: g.get("/api/v1/users/1", bearer(tok)).status == 200, timeout=10, what="first keys")
    finally:
        g.stop()
        ks.stop()


def test_algorithm_confusion_and_header_tricks_are_refused(idp_gw, keyserver):
    keyserver.mode = "good"
    good = keyserver.token()
    wait_for(lambda: idp_gw.get("/api/v1/users/1", bearer(good)).status == 200, timeout=10, what="keys")
    now = int(time.time())
    claims = {"sub": "user-001", "role": "admin", "iss": TEST_ISS, "iat": now, "exp": now + 600}
    public_pem = keyserver.key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()
    public_jwk = json.dumps(keyserver.jwks()["keys"][0])
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    an = attacker.public_key().public_numbers()
    as_b64 = lambda i: b64url(i.to_bytes((i.bit_length() + 7) // 8, "big"))  # noqa: E731
    attacker_jwk = {"kty": "RSA", "kid": "evil", "n": as_b64(an.n), "e": as_b64(an.e)}
    jku = KeyServer()
    jku.key = attacker
    try:
        cases = {
            "HS256 with the public key (PEM) as secret": forge({"alg": "HS256", "kid": keyserver.kid}, claims, public_pem),
            "HS256 with the JWK as secret": forge({"alg": "HS256", "kid": keyserver.kid}, claims, public_jwk),
            "alg none": ".".join([b64url(json.dumps({"alg": "none", "kid": keyserver.kid}).encode()),
                                  b64url(json.dumps(claims).encode()), ""]),
            "embedded jwk": keyserver.sign({"alg": "RS256", "kid": "evil", "jwk": attacker_jwk}, claims, attacker),
            "embedded jwk, the issuer's kid": keyserver.sign(
                {"alg": "RS256", "kid": keyserver.kid, "jwk": attacker_jwk}, claims, attacker),
            "jku": keyserver.sign({"alg": "RS256", "kid": jku.kid, "jku": f"http://127.0.0.1:{jku.port}/jwks"},
                                  claims, attacker),
            "x5u": keyserver.sign({"alg": "RS256", "kid": "evil", "x5u": f"http://127.0.0.1:{jku.port}/cert"},
                                  claims, attacker),
            "crit": keyserver.sign({"alg": "RS256", "kid": keyserver.kid, "crit": ["b64"], "b64": False}, claims),
            "ES256 naming the RSA key": keyserver.sign({"alg": "ES256", "kid": keyserver.kid}, claims),
        }
        for what, tok in cases.items():
            r = idp_gw.get("/api/v1/admin/x", bearer(tok))
            assert r.status == 401, f"{what}: {r}"
            assert r.json()["error"] == "Unauthorized", what
        assert jku.hits == 0, "the filter never fetched a URL from a token"
        # The control: the same claims signed properly are accepted (role admin from the token).
        assert idp_gw.get("/api/v1/admin/x", bearer(keyserver.sign({"alg": "RS256", "kid": keyserver.kid},
                                                                    claims))).status == 200
    finally:
        jku.stop()


def test_iss_routes_between_issuers(idp_gw, keyserver, services):
    keyserver.mode = "good"
    wait_for(lambda: idp_gw.get("/api/v1/users/1", bearer(keyserver.token())).status == 200, timeout=10,
             what="keys")
    demo_iss = f"http://127.0.0.1:{services.ports['auth-service']}"
    # The test provider's key with the demo provider's iss: the demo set has no such kid.
    r = idp_gw.get("/api/v1/users/1", bearer(keyserver.token(iss=demo_iss)))
    assert r.status == 401 and "unknown signing key" in r.json()["message"], r
    r = idp_gw.get("/api/v1/users/1", bearer(keyserver.token(iss="https://stranger.example")))
    assert r.status == 401 and r.json()["message"] == "Invalid token: unknown issuer (iss)", r
    # The partner's HS512 secret (from Envoy's environment) verifies only the partner's tokens.
    now = int(time.time())
    import hashlib
    import hmac as hm
    h = b64url(json.dumps({"alg": "HS512"}).encode())

    def hs512(claims, secret):
        p = b64url(json.dumps(claims).encode())
        return f"{h}.{p}.{b64url(hm.new(secret.encode(), f'{h}.{p}'.encode(), hashlib.sha512).digest())}"
    partner = {"sub": "p-1", "iss": "partner", "iat": now, "exp": now + 60}
    r = idp_gw.get("/api/v1/users/1", bearer(hs512(partner, PARTNER_SECRET)))
    assert r.status == 200 and r.json()["headers"]["x-user-id"] == "p-1", r
    assert idp_gw.get("/api/v1/users/1", bearer(hs512(partner, SECRET))).status == 401
    # The default issuer's secret with the partner's iss: refused (HS256 is not the partner's).
    assert idp_gw.get("/api/v1/users/1", bearer(token(iss="partner"))).status == 401


def test_no_secret_in_the_configuration_or_config_dump(idp_gw):
    dump = request(idp_gw.admin_port, "GET", "/config_dump").body.decode()
    assert "PARTNER_SECRET" in dump and "JWT_SECRET" in dump, "only the variables' names"
    assert PARTNER_SECRET not in dump and SECRET not in dump
    assert PARTNER_SECRET not in idp_gw.envoy_yaml.read_text()


def test_every_algorithm_through_envoy(services):
    """RS384, RS512, PS256, PS384, PS512, ES384 too (the demo provider signs RS256, ES256 and
    EdDSA): in Envoy, RS*/ES* go to its verify_signature, PS* to the module's own code."""
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

    ks = KeyServer()
    p384 = ec.generate_private_key(ec.SECP384R1())
    pn = p384.public_key().public_numbers()
    as_b64 = lambda i, size: b64url(i.to_bytes(size, "big"))  # noqa: E731
    rsa_jwk = dict(ks.jwks()["keys"][0])
    rsa_jwk.pop("alg")  # one RSA key for RS* and PS*
    doc = {"keys": [rsa_jwk, {"kty": "EC", "crv": "P-384", "kid": "p384", "x": as_b64(pn.x, 48),
                              "y": as_b64(pn.y, 48)}]}
    algs = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES384"]
    f = gateway_file(services.ports, free_port())
    f["jwt"]["issuers"] = [{"name": "all", "issuer": TEST_ISS, "algorithms": algs, "local_jwks": doc}]
    g = Gateway(f)
    hashes_for = {"256": hashes.SHA256(), "384": hashes.SHA384(), "512": hashes.SHA512()}
    try:
        now = int(time.time())
        claims = {"sub": "svc-9", "role": "user", "iss": TEST_ISS, "iat": now, "exp": now + 600}
        for alg in algs:
            h = hashes_for[alg[2:]]
            head = {"alg": alg, "kid": "p384" if alg == "ES384" else ks.kid}
            signing_input = (b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(claims).encode())).encode()
            if alg.startswith("RS"):
                sig = ks.key.sign(signing_input, padding.PKCS1v15(), h)
            elif alg.startswith("PS"):
                sig = ks.key.sign(signing_input, padding.PSS(mgf=padding.MGF1(h), salt_length=h.digest_size), h)
            else:
                r, s = decode_dss_signature(p384.sign(signing_input, ec.ECDSA(h)))
                sig = r.to_bytes(48, "big") + s.to_bytes(48, "big")
            tok = f"{signing_input.decode()}.{b64url(sig)}"
            r = g.get("/api/v1/users/1", bearer(tok))
            assert r.status == 200 and r.json()["headers"]["x-user-id"] == "svc-9", f"{alg}: {r}"
            bad = tok[:-4] + ("AAAA" if not tok.endswith("AAAA") else "BBBB")
            assert g.get("/api/v1/users/1", bearer(bad)).status == 401, alg
        log = g.log_path.read_text()
        if g.runtime == "native":
            # No foreign functions in a native module: its own (native) RSA and ECDSA code.
            assert "verify_signature no" in log, log[-2000:]
        else:
            assert "verify_signature yes; nothing degraded" in log, "Envoy's check was found and used"
            # The host was recognised as Envoy by a property only Envoy answers, so foreign
            # functions (which trap on Kong) are called here and nowhere else.
            assert "is Envoy (xds.node answered)" in log, log[-2000:]
    finally:
        g.stop()
        ks.stop()
