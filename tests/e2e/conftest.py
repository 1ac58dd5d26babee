import pytest

from harness import RUNTIME, Gateway, Redis, Services, Webdis, free_port

# Modules about the .wasm itself or about no runtime at all: they run in the wasm pass of
# `make test` only, and the native pass deselects them (shown in its summary).
NOT_PER_RUNTIME = {
    "test_istio_shape.py",      # Istio loads the .wasm (WasmPlugin)
    "test_istio_manifests.py",  # schemas only
    "test_envoy_gateway_manifests.py",  # schemas only
    "test_module.py",           # the .wasm's imports and exports
    "test_host_tables.py",      # the .wasm against the proxy-wasm hosts' tables
    "test_oci.py",              # the .wasm as an OCI image
    "test_readme.py",           # the README against the sources
    "test_differential.py",     # starts both runtimes itself
}


def pytest_collection_modifyitems(config, items):
    if RUNTIME != "native":
        return
    deselected = [i for i in items if i.path.name in NOT_PER_RUNTIME]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = [i for i in items if i.path.name not in NOT_PER_RUNTIME]

ECHO = ["user-service", "product-service", "order-service", "payment-service",
        "search-service", "comment-service", "admin-service", "slow-service"]


def gateway_file(ports, dead_port, webdis_port=None, headers_with_underscores=None, limits=None, **revocation):
    def up(name):
        return f"http://127.0.0.1:{ports[name]}"
    f = {
        "gateway": {"prefix": "/api/v1", "name": "e2e-gateway",
                    "cors": {"allow_origins": ["https://app.example.com"]}},
        "jwt": {"algorithms": ["HS256"], "secret_env": "JWT_SECRET", "clock_skew": 60},
        "routes": [
            {"name": "user-service", "prefix": "/users", "upstream": up("user-service"),
             "methods": ["GET", "POST", "PUT", "DELETE"], "auth_required": True, "timeout": 5, "retry": 2},
            {"name": "product-service", "prefix": "/products", "upstream": up("product-service"),
             "methods": ["GET"], "auth_required": False, "timeout": 3, "retry": 1},
            {"name": "order-service", "prefix": "/orders", "upstream": up("order-service"),
             "methods": ["GET", "POST", "PUT"], "auth_required": True, "timeout": 10, "retry": 0},
            {"name": "payment-service", "prefix": "/payments", "upstream": up("payment-service"),
             "methods": ["POST"], "auth_required": True, "timeout": 30, "retry": 0},
            {"name": "auth-service", "prefix": "/auth", "upstream": up("auth-service"),
             "methods": ["POST"], "auth_required": False, "timeout": 5, "retry": 1},
            {"name": "search-service", "prefix": "/search", "upstream": up("search-service"),
             "methods": ["GET"], "auth_required": False},
            {"name": "comment-service", "prefix": "/comments", "upstream": up("comment-service"),
             "methods": ["GET", "POST"], "auth_required": True},
            {"name": "admin-service", "prefix": "/admin", "upstream": up("admin-service"),
             "methods": ["GET", "POST"], "auth_required": True, "roles": ["admin"]},
            {"name": "slow-service", "prefix": "/slow", "upstream": up("slow-service"),
             "methods": ["GET"], "auth_required": False, "timeout": 0.5, "retry": 0},
            {"name": "down-service", "prefix": "/down", "upstream": f"http://127.0.0.1:{dead_port}",
             "methods": ["GET"], "auth_required": False, "timeout": 2, "retry": 0},
        ],
    }
    if headers_with_underscores:
        f["gateway"]["headers_with_underscores"] = headers_with_underscores
    if limits:
        f["gateway"]["limits"] = limits
    if webdis_port:
        f["webdis"] = f"http://127.0.0.1:{webdis_port}"
        f["revocation"] = dict(revocation)
        f["logs"] = {"store": {"flush_interval": 0.2}}
    return f


@pytest.fixture(scope="session")
def services():
    s = Services(ECHO)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def canary_services():
    """order-service v2, for the host-shaped suites' canary."""
    s = Services(["order-service-v2"], auth=None, versions={"order-service-v2": "v2"})
    yield s
    s.stop()


@pytest.fixture(scope="session")
def redis():
    r = Redis()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def webdis(redis):
    w = Webdis(redis.port)
    yield w
    w.stop()


@pytest.fixture(scope="session")
def gw(services, webdis):
    """The main gateway: every feature on, revocation in deny mode with the default 1 s cache."""
    g = Gateway(gateway_file(services.ports, free_port(), webdis.port))
    yield g
    g.stop()
