"""Module hygiene: the built `.wasm` imports only the proxy-wasm ABI 0.2.1 and the WASI calls the
README lists, and exports what hosts call. A new dependency that adds a host requirement (a
file system call, a new ABI) fails here instead of failing on somebody's proxy."""
from harness import WASM, require_build
from wasm_module import names, sections

# proxy-wasm ABI 0.2.1 (`env`): every function the SDK links, whether the filter calls it or not.
PROXY_WASM = {
    "proxy_log", "proxy_get_log_level", "proxy_get_current_time_nanoseconds", "proxy_set_tick_period_milliseconds",
    "proxy_get_property", "proxy_set_property", "proxy_get_buffer_bytes", "proxy_set_buffer_bytes",
    "proxy_get_header_map_pairs", "proxy_set_header_map_pairs", "proxy_get_header_map_value",
    "proxy_add_header_map_value", "proxy_replace_header_map_value", "proxy_remove_header_map_value",
    "proxy_continue_stream", "proxy_close_stream", "proxy_send_local_response", "proxy_get_status",
    "proxy_get_shared_data", "proxy_set_shared_data", "proxy_register_shared_queue", "proxy_resolve_shared_queue",
    "proxy_dequeue_shared_queue", "proxy_enqueue_shared_queue", "proxy_http_call", "proxy_grpc_call",
    "proxy_grpc_stream", "proxy_grpc_send", "proxy_grpc_cancel", "proxy_grpc_close", "proxy_set_effective_context",
    "proxy_define_metric", "proxy_increment_metric", "proxy_record_metric", "proxy_call_foreign_function",
    "proxy_done",
}
# WASI: seeds and ids, the environment (secrets from host_env_keys), and Rust's std (stderr, exit).
# clock_time_get: the clock where the proxy has none (APISIX answers its time call Unimplemented);
# every host table in tests/hosts provides it (test_host_tables.py).
WASI = {"random_get", "environ_get", "environ_sizes_get", "fd_write", "proc_exit", "clock_time_get"}


def test_the_module_imports_only_the_abi_and_the_wasi_calls_it_needs():
    require_build()
    parts = dict((sid, body) for sid, body in sections(WASM.read_bytes()) if sid in (2, 7))
    imports = names(parts[2], with_module=True)
    unexpected = [(m, n) for m, n, _ in imports
                  if not (m == "env" and n in PROXY_WASM) and not (m == "wasi_snapshot_preview1" and n in WASI)]
    assert not unexpected, f"imports outside the proxy-wasm ABI and the listed WASI calls: {unexpected}"
    assert all(kind == 0 for _, _, kind in imports), "functions only (no imported memory, table or global)"
    exports = {n for _, n, _ in names(parts[7], with_module=False)}
    for needed in ("proxy_abi_version_0_2_1", "proxy_on_context_create", "proxy_on_request_headers",
                   "proxy_on_http_call_response", "proxy_on_tick", "proxy_on_configure", "proxy_on_memory_allocate",
                   "memory", "_initialize"):
        assert needed in exports, f"{needed} is not exported"
    assert not any(n.startswith("gw_bench") for n in exports), "benchmark exports never ship"
