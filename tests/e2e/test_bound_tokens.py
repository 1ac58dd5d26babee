"""Sender-constrained tokens through real Envoy, on both runtimes: DPoP (RFC 9449) with the proof
checked against the request and remembered fleet-wide through webdis, and certificate-bound
tokens (RFC 8705) on a TLS listener asking for client certificates, with certificates made here."""

import datetime
import hashlib
import http.client
import json
import ssl
import time
import uuid

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID

from harness import Gateway, Response, b64url, forge, request, token

ORDERS = "/api/v1/orders/7"


class ClientKey:
    """A client's DPoP key (P-256) and the proofs it signs."""

    def __init__(self):
        self.priv = ec.generate_private_key(ec.SECP256R1())
        n = self.priv.public_key().public_numbers()
        self.jwk = {"kty": "EC", "crv": "P-256",
                    "x": b64url(n.x.to_bytes(32, "big")), "y": b64url(n.y.to_bytes(32, "big"))}
        canonical = json.dumps({k: self.jwk[k] for k in ("crv", "kty", "x", "y")}, separators=(",", ":"))
        self.jkt = b64url(hashlib.sha256(canonical.encode()).digest())

    def sign(self, header, claims):
        h = b64url(json.dumps(header, separators=(",", ":")).encode())
        p = b64url(json.dumps(claims, separators=(",", ":")).encode())
        r, s = decode_dss_signature(self.priv.sign(f"{h}.{p}".encode(), ec.ECDSA(hashes.SHA256())))
        return f"{h}.{p}.{b64url(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"

    def proof(self, access_token, method, url, jti=None, iat=None, header=None, **claims):
        c = {"jti": jti or uuid.uuid4().hex, "htm": method, "htu": url, "iat": iat or int(time.time()),
             "ath": b64url(hashlib.sha256(access_token.encode()).digest())}
        c.update(claims)
        return self.sign(header or {"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk}, c)


def dpop_file(webdis_port, up):
    return {
        "gateway": {"prefix": "/api/v1"},
        "jwt": {"secret_env": "JWT_SECRET", "dpop": "allowed"},
        "webdis": f"http://127.0.0.1:{webdis_port}",
        "revocation": {},
        "routes": [{"name": "orders", "prefix": "/orders", "upstream": up,
                    "methods": ["GET", "POST"], "auth_required": True}],
    }


@pytest.fixture(scope="module")
def fleet(services, webdis):
    """Two gateways sharing one store."""
    up = f"http://127.0.0.1:{services.ports['order-service']}"
    a = Gateway(dpop_file(webdis.port, up))
    try:
        b = Gateway(dpop_file(webdis.port, up))
    except Exception:
        a.stop()
        raise
    yield a, b
    a.stop()
    b.stop()


def dpop_get(g, access_token, proof, path=ORDERS, scheme="DPoP", method="GET"):
    headers = [("Authorization", f"{scheme} {access_token}")]
    if proof is not None:
        headers.append(("DPoP", proof))
    return request(g.port, method, path, headers, body={} if method == "POST" else None)


def with_host(port, headers):
    """GET /orders with exactly these headers (the Host header among them)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest("GET", ORDERS, skip_host=True, skip_accept_encoding=True)
        for k, v in headers:
            conn.putheader(k, v)
        conn.endheaders()
        r = conn.getresponse()
        return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


def url(g, path=ORDERS):
    return f"http://127.0.0.1:{g.port}{path}"


def test_a_dpop_bound_token_passes_with_a_fresh_proof_and_a_replay_is_refused_on_every_gateway(fleet):
    a, b = fleet
    key = ClientKey()
    tok = token(sub="user-dpop", cnf={"jkt": key.jkt})
    proof = key.proof(tok, "GET", url(a))
    r = dpop_get(a, tok, proof)
    assert r.status == 200, r
    assert r.json()["headers"]["x-user-id"] == "user-dpop", r.json()
    # The same proof again, here: remembered in this gateway's shared data.
    r = dpop_get(a, tok, proof)
    assert r.status == 401 and r.json()["message"] == "Invalid DPoP proof: DPoP proof already used", r
    assert r.header("www-authenticate").startswith('DPoP error="invalid_dpop_proof"'), r.headers
    # A fresh proof for every request passes on both.
    assert dpop_get(a, tok, key.proof(tok, "GET", url(a))).status == 200
    assert dpop_get(b, tok, key.proof(tok, "GET", url(b))).status == 200


def test_a_replayed_proof_is_refused_by_a_second_gateway_through_the_store(fleet, redis):
    """The same proof (same jti, same key) presented first at A, then at B: B has it in no
    shared data of its own, so only the store's SET NX refuses it."""
    a, b = fleet
    key = ClientKey()
    tok = token(sub="user-dpop-2", cnf={"jkt": key.jkt})
    # Both gateways listen on 127.0.0.1: a proof for "http://127.0.0.1:<A>/..." names A only.
    # Use a path-and-host-agnostic request: the client sends Host: gw.example.com to both.
    proof = key.proof(tok, "GET", "http://gw.example.com" + ORDERS)
    headers = [("Authorization", f"DPoP {tok}"), ("DPoP", proof), ("Host", "gw.example.com")]
    assert with_host(a.port, headers).status == 200
    r = with_host(b.port, headers)
    assert r.status == 401 and r.json()["message"].endswith("already used"), r
    keys = redis.cli("KEYS", "dpop:*")
    assert keys, "the proof is in the store"


@pytest.mark.parametrize("attack", [
    "replay", "other method", "other uri", "other key", "symmetric alg", "other thumbprint",
    "bearer scheme", "no proof", "two proofs", "huge proof", "nested proof", "private key",
    "stale iat", "other token",
])
def test_attacks_on_dpop_are_refused(fleet, attack):
    a, _ = fleet
    key, other = ClientKey(), ClientKey()
    tok = token(sub="user-attacker", cnf={"jkt": key.jkt})
    good = key.proof(tok, "GET", url(a))
    status_reason = (401, None)
    if attack == "replay":
        assert dpop_get(a, tok, good).status == 200
        r = dpop_get(a, tok, good)
    elif attack == "other method":
        r = dpop_get(a, tok, key.proof(tok, "GET", url(a)), method="POST")
    elif attack == "other uri":
        r = dpop_get(a, tok, key.proof(tok, "GET", url(a, "/api/v1/orders/8")))
    elif attack == "other key":
        # Signed by another key than the one its header carries.
        forged = other.sign({"typ": "dpop+jwt", "alg": "ES256", "jwk": key.jwk},
                            {"jti": "x", "htm": "GET", "htu": url(a), "iat": int(time.time()),
                             "ath": b64url(hashlib.sha256(tok.encode()).digest())})
        r = dpop_get(a, tok, forged)
    elif attack == "symmetric alg":
        claims = {"jti": "x", "htm": "GET", "htu": url(a), "iat": int(time.time()),
                  "ath": b64url(hashlib.sha256(tok.encode()).digest())}
        r = dpop_get(a, tok, forge({"typ": "dpop+jwt", "alg": "HS256", "jwk": key.jwk}, claims))
    elif attack == "other thumbprint":
        # A valid proof of another key for a token bound to this one.
        r = dpop_get(a, tok, other.proof(tok, "GET", url(a)))
    elif attack == "bearer scheme":
        r = dpop_get(a, tok, good, scheme="Bearer")
    elif attack == "no proof":
        r = dpop_get(a, tok, None)
    elif attack == "two proofs":
        r = request(a.port, "GET", ORDERS, [("Authorization", f"DPoP {tok}"), ("DPoP", good),
                                            ("DPoP", key.proof(tok, "GET", url(a)))])
    elif attack == "huge proof":
        r = dpop_get(a, tok, key.proof(tok, "GET", url(a), pad="x" * 9000))
    elif attack == "nested proof":
        r = dpop_get(a, tok, key.proof(tok, "GET", url(a), deep=json.loads("[" * 40 + "]" * 40)))
    elif attack == "private key":
        n = key.priv.private_numbers()
        jwk = dict(key.jwk, d=b64url(n.private_value.to_bytes(32, "big")))
        r = dpop_get(a, tok, key.proof(tok, "GET", url(a), header={"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}))
    elif attack == "stale iat":
        r = dpop_get(a, tok, key.proof(tok, "GET", url(a), iat=int(time.time()) - 200))
    elif attack == "other token":
        r = dpop_get(a, tok, key.proof(token(sub="someone-else"), "GET", url(a)))
    assert r.status == status_reason[0], (attack, r)
    assert r.json()["error"] == "Unauthorized", r
    if attack != "huge proof":  # Envoy may refuse an oversized header itself
        challenge = r.header("www-authenticate") or ""
        assert challenge.startswith("DPoP "), (attack, r.headers)


def test_bearer_tokens_still_pass_where_dpop_is_allowed(fleet):
    a, _ = fleet
    r = request(a.port, "GET", ORDERS, [("Authorization", f"Bearer {token(sub='plain')}")])
    assert r.status == 200, r
    # The DPoP scheme with an unbound token is no DPoP.
    key = ClientKey()
    plain = token(sub="plain")
    r = dpop_get(a, plain, key.proof(plain, "GET", url(a)))
    assert r.status == 401, r


# ------------------------------------------------------------------ certificate-bound tokens

def _name(cn):
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(subject, issuer_name, key, issuer_key, ca=False, san=None):
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(_name(issuer_name))
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if san:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(__import__("ipaddress").ip_address(san))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test-ca", "test-ca", ca_key, ca_key, ca=True)
    files = {}

    def write(name, cert, key):
        (d / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (d / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        files[name] = (str(d / f"{name}.pem"), str(d / f"{name}.key"), cert)

    write("ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    write("server", _cert("gateway", "test-ca", server_key, ca_key, san="127.0.0.1"), server_key)
    for client in ("alice", "mallory"):
        k = ec.generate_private_key(ec.SECP256R1())
        write(client, _cert(client, "test-ca", k, ca_key), k)
    return files


@pytest.fixture(scope="module")
def tls_gateway(services, pki):
    up = f"http://127.0.0.1:{services.ports['order-service']}"
    g = Gateway({
        "gateway": {"prefix": "/api/v1",
                    "tls": {"certificate": pki["server"][0], "private_key": pki["server"][1],
                            "client_ca": pki["ca"][0]}},
        "jwt": {"secret_env": "JWT_SECRET"},
        "routes": [{"name": "orders", "prefix": "/orders", "upstream": up, "auth_required": True}],
    })
    yield g
    g.stop()


def tls_get(g, pki, client, headers):
    ctx = ssl.create_default_context(cafile=pki["ca"][0])
    if client:
        ctx.load_cert_chain(pki[client][0], pki[client][1])
    conn = http.client.HTTPSConnection("127.0.0.1", g.port, context=ctx, timeout=10)
    try:
        conn.request("GET", ORDERS, headers=dict(headers))
        r = conn.getresponse()
        return Response(r.status, [(k.lower(), v) for k, v in r.getheaders()], r.read())
    finally:
        conn.close()


def x5t(cert):
    return b64url(hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).digest())


def test_a_certificate_bound_token_passes_only_with_its_certificate(tls_gateway, pki):
    g = tls_gateway
    bound = token(sub="user-mtls", cnf={"x5t#S256": x5t(pki["alice"][2])})
    auth = {"Authorization": f"Bearer {bound}"}
    r = tls_get(g, pki, "alice", auth)
    assert r.status == 200, r
    assert r.json()["headers"]["x-user-id"] == "user-mtls"
    r = tls_get(g, pki, "mallory", auth)
    assert r.status == 401 and "certificate-bound" in r.json()["message"], r
    r = tls_get(g, pki, None, auth)
    assert r.status == 401, r
    # A bearer token needs no certificate (the listener asks, it does not require).
    assert tls_get(g, pki, None, {"Authorization": f"Bearer {token(sub='plain')}"}).status == 200
