"""The built module links on every host the README names: each function it imports is defined by
the host (with the same signature where the host's table records it), read from the host's own
sources into `tests/hosts/*.json` (each file names the upstream commit). A function a host
defines only as a trapping stub may be imported (the SDK's traits reference it) but must be on
the list below, with the reason the module never calls it there."""
import json
from pathlib import Path

import pytest

from harness import WASM, require_build
from wasm_module import imported_functions

HOSTS = Path(__file__).resolve().parents[1] / "hosts"

# Imported, trapping on some host, never called there. The reason is checked by the emulated
# hosts' request-path cases where they exist; here it is written down.
NEVER_CALLED = {
    "proxy_close_stream": "only the connection cap (a network filter) closes streams; it is rendered for Envoy only",
    "proxy_done": "the SDK's Context::done default, which the module never calls",
    "proxy_get_status": "read by the SDK for gRPC answers; the module makes no gRPC call and reads call answers through the raw ABI",
    "proxy_grpc_call": "SDK trait default; no gRPC",
    "proxy_grpc_stream": "SDK trait default; no gRPC",
    "proxy_grpc_send": "SDK trait default; no gRPC",
    "proxy_grpc_cancel": "SDK trait default; no gRPC",
    "proxy_grpc_close": "SDK trait default; no gRPC",
    "proxy_resolve_shared_queue": "SDK trait default; no shared queues",
}

def problems(imports, table):
    """Why `imports` would not link or would trap on the host of `table` ([] if none)."""
    out = []
    signatures = table.get("signatures") or {}
    wasi = table.get("wasi_snapshot_preview1")
    for module, name, sig in imports:
        if module == "env":
            if name not in table["env"]:
                out.append(f"{name} is not defined")
            elif name in signatures and signatures[name].replace(" ", "") != sig.replace(" ", ""):
                out.append(f"{name}: the host declares {signatures[name]}, the module imports {sig}")
            elif name in table.get("traps", []) and name not in NEVER_CALLED:
                out.append(f"{name} traps on this host and is not known to be never called")
        elif module == "wasi_snapshot_preview1":
            if wasi is None or name not in wasi:
                out.append(f"WASI {name} is not provided")
        else:
            out.append(f"import from unknown module {module}.{name}")
    return out


def tables():
    found = sorted(HOSTS.glob("*.json"))
    assert found, "no host tables"
    return [(p.name, json.loads(p.read_text())) for p in found]


@pytest.mark.parametrize("name,table", tables(), ids=lambda v: v if isinstance(v, str) else "")
def test_the_module_links_on_every_named_host(name, table):
    require_build()
    assert len(table["commit"]) == 40 and table["repository"], f"{name}: the table names its upstream commit"
    assert problems(imported_functions(WASM.read_bytes()), table) == [], name


def test_the_check_can_fail():
    tables_by_name = dict(tables())
    apisix = tables_by_name["apisix-wasm-nginx-module.json"]
    kong = tables_by_name["kong-ngx_wasm_module.json"]
    # What the SDK imports when the log level is read: missing on APISIX, another signature on Kong.
    log_level = [("env", "proxy_get_log_level", "(i32) -> (i32)")]
    assert problems(log_level, apisix) == ["proxy_get_log_level is not defined"]
    assert "proxy_get_log_level: the host declares" in problems(log_level, kong)[0]
    assert problems([("wasi_snapshot_preview1", "sock_accept_nope", "() -> ()")], kong)
