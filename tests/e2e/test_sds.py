"""Secrets from Envoy's SDS (`secret_sds`): on the native runtime the JWT secret comes from a
filesystem SDS file and is rotated by replacing the file, with no restart: within a second
tokens of the old secret are refused and tokens of the new one accepted, while requests keep
flowing (none fails). Envoy's generic secrets reach a dynamic module through its ABI
(`http_filter_config_generic_secret_subscribe`, Envoy 1.40); proxy-wasm has no secret ABI, so
the `.wasm` refuses `secret_sds` at configure time, naming the field."""
import json
import os
import threading
import time

import pytest

from conftest import gateway_file
from harness import RUNTIME, SECRET, Gateway, Webdis, bearer, forge, free_port

OLD = "sds-secret-one-sds-secret-one-sds-secret-one"
NEW = "sds-secret-two-sds-secret-two-sds-secret-two"


def signed(secret, sub="user-042"):
    now = int(time.time())
    return forge({"alg": "HS256", "typ": "JWT"},
                 {"sub": sub, "name": "kim", "role": "user", "iat": now, "exp": now + 600}, secret)


def write_secret(path, name, value):
    """A DiscoveryResponse with the one generic secret, swapped in atomically (Envoy watches the
    directory for moves)."""
    doc = {"resources": [{"@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret",
                          "name": name, "generic_secret": {"secret": {"inline_string": value}}}]}
    tmp = path.parent / f".{path.name}.{time.monotonic_ns()}"
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@pytest.fixture
def sds_file(tmp_path):
    d = tmp_path / "sds"
    d.mkdir()
    path = d / "jwt.json"
    write_secret(path, "jwt-secret", OLD)
    return path


def _file(services, sds_file):
    f = gateway_file(services.ports, free_port())
    f["secret_sds"] = {"JWT_SECRET": {"name": "jwt-secret", "path": str(sds_file)}}
    return f


@pytest.mark.skipif(RUNTIME != "native", reason="the .wasm side is test_the_wasm_refuses_sds_secrets")
def test_the_jwt_secret_rotates_through_sds_without_a_restart(services, sds_file):
    g = Gateway(_file(services, sds_file))
    try:
        pid = g.proc.pid
        # The SDS secret, not the environment's JWT_SECRET (which the harness also sets).
        assert g.get("/api/v1/users/1", bearer(signed(OLD))).status == 200
        assert g.get("/api/v1/users/1", bearer(signed(SECRET))).status == 401
        failures, stop = [], threading.Event()

        def traffic():
            while not stop.is_set():
                r = g.get("/api/v1/products/1")
                if r.status != 200:
                    failures.append(r.status)

        t = threading.Thread(target=traffic)
        t.start()
        try:
            old_token = signed(OLD)
            assert g.get("/api/v1/users/1", bearer(old_token)).status == 200  # now cached as verified
            write_secret(sds_file, "jwt-secret", NEW)
            start = time.monotonic()
            while time.monotonic() - start < 1.0:
                if (g.get("/api/v1/users/1", bearer(signed(NEW))).status == 200
                        and g.get("/api/v1/users/1", bearer(old_token)).status == 401):
                    break
                time.sleep(0.02)
            else:
                pytest.fail("the new secret was not in force within a second")
            # Every worker (fresh connections land on either): the old secret is gone.
            for _ in range(8):
                assert g.get("/api/v1/users/1", bearer(old_token)).status == 401
                assert g.get("/api/v1/users/1", bearer(signed(NEW))).status == 200
        finally:
            stop.set()
            t.join()
        assert not failures, failures
        assert g.proc.pid == pid and g.proc.poll() is None, "no restart"
        assert "configuration compiled again" in g.log_path.read_text()
    finally:
        g.stop()


@pytest.mark.skipif(RUNTIME != "native", reason="the .wasm refuses secret_sds")
def test_a_secret_value_that_cannot_be_used_keeps_the_last_one(services, sds_file):
    g = Gateway(_file(services, sds_file))
    try:
        assert g.get("/api/v1/users/1", bearer(signed(OLD))).status == 200
        write_secret(sds_file, "jwt-secret", "")  # emptied: no secret to verify with
        time.sleep(0.5)
        for _ in range(4):
            assert g.get("/api/v1/users/1", bearer(signed(OLD))).status == 200
        assert "the last good one kept" in g.log_path.read_text()
    finally:
        g.stop()


@pytest.mark.skipif(RUNTIME != "native", reason="the .wasm refuses secret_sds")
def test_webdis_credentials_from_sds(services, redis, tmp_path):
    """WEBDIS_AUTH (user:password) by filesystem SDS: the configuration is created before SDS
    delivers it, and a logout then reaches webdis with the delivered credentials."""
    creds = "gateway:sds-webdis-password"
    w = Webdis(redis.port, credentials=creds)
    d = tmp_path / "sds"
    d.mkdir()
    write_secret(d / "webdis.json", "webdis-auth", creds)
    f = gateway_file(services.ports, free_port(), w.port)
    f["webdis_auth_env"] = "WEBDIS_AUTH"
    f["secret_sds"] = {"WEBDIS_AUTH": {"name": "webdis-auth", "path": str(d / "webdis.json")}}
    g = Gateway(f, env={"WEBDIS_AUTH": "wrong:credentials"})
    try:
        tok = signed(SECRET, sub="user-088")
        assert g.get("/api/v1/users/1", bearer(tok)).status == 200
        assert g.request("POST", "/api/v1/auth/logout", bearer(tok)).status == 200
        assert g.get("/api/v1/users/1", bearer(tok)).status == 401
    finally:
        g.stop()
        w.stop()


@pytest.mark.skipif(RUNTIME != "native", reason="the .wasm refuses secret_sds")
def test_a_static_secret_of_the_bootstrap(services):
    f = gateway_file(services.ports, free_port())
    f["secret_sds"] = {"JWT_SECRET": {"name": "jwt-static"}}

    def with_secret(boot):
        boot["static_resources"]["secrets"] = [{"name": "jwt-static",
                                                "generic_secret": {"secret": {"inline_string": OLD}}}]
        return boot

    g = Gateway(f, shape=with_secret)
    try:
        assert g.get("/api/v1/users/1", bearer(signed(OLD))).status == 200
        assert g.get("/api/v1/users/1", bearer(signed(SECRET))).status == 401
    finally:
        g.stop()


@pytest.mark.skipif(RUNTIME != "native", reason="the .wasm refuses secret_sds")
def test_an_unknown_static_secret_is_refused_naming_the_field(services):
    f = gateway_file(services.ports, free_port())
    f["secret_sds"] = {"JWT_SECRET": {"name": "no-such-secret"}}
    with pytest.raises(RuntimeError) as e:
        Gateway(f)
    assert "secret_sds.JWT_SECRET" in str(e.value) and "no static secret" in str(e.value)


@pytest.mark.skipif(RUNTIME == "native", reason="the native module reads SDS secrets")
def test_the_wasm_refuses_sds_secrets(services, sds_file):
    with pytest.raises(RuntimeError) as e:
        Gateway(_file(services, sds_file))
    assert "secret_sds.JWT_SECRET" in str(e.value) and "no secret ABI" in str(e.value)
