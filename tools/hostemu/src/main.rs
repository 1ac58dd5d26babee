//! Emulated proxy-wasm hosts: the *built* module (`build/gateway_filter.wasm`) run through the
//! request path under a chosen host's function table and semantics, in wasmi. For the hosts
//! this machine cannot run (Kong's ngx_wasm_module, APISIX's wasm-nginx-module) and for Envoy
//! as a control. `make test` runs it after the build.
//!
//! Each host offers exactly the functions of its table (`tests/hosts/*.json`, read from its
//! source at the commit the file names): an import the table lacks fails the link, a function
//! the table lists as a trapping stub traps, one it lists as answering Unimplemented does so.
//! On top, the semantics read from the same sources (each stated where it is emulated):
//! - Kong (src/common/proxy_wasm/ngx_proxy_wasm_host.c): `proxy_set_effective_context` does
//!   nothing; an unknown foreign function traps; a call's answer is delivered on the context
//!   that dispatched it.
//! - APISIX (src/http/ngx_http_wasm_api.c, ngx_http_wasm_call.c, ngx_http_wasm_module.c): no
//!   shared data, ticks, time or foreign functions (Unimplemented); `set_effective_context` and
//!   `continue_stream` do nothing; one call per request; after a call's answer the request goes
//!   on by itself unless a local reply was sent; a `Pause` without a call of the request's own
//!   is mishandled (counted as a violation here); `on_log` is never called.
//! - Envoy (proxy-wasm-cpp-host): everything, `set_effective_context` switches.
//!
//! The cases (`cases.rs`): a table of single requests (a public route, a role list and a
//! missing scope, a revoked token, a store failure, a bad token, the route limit, the canary),
//! then the ones of several steps (a forged identity header, a valid token, one token twice, a
//! logout). The rule checked above all: no request goes upstream without its own token's lookup
//! answered clean (on a host where only the dispatching context can be resumed). `host.rs` is
//! the emulated host, `vm.rs` one worker running the module.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use gateway_filter::canary::{ROUTE_HEADER, ROUTE_VALUE};
use hmac::{Hmac, Mac};
use wasmi::{Caller, Engine, Extern, Func, Instance, Linker, Module, Store, Val};

mod cases;
mod host;
mod vm;
use cases::*;
use host::*;
use vm::*;

type R<T> = Result<T, String>;

const SECRET: &str = "hostemu-secret-hostemu-secret-hostemu";
const ROOT: i32 = 1;

fn main() -> ExitCode {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..");
    let wasm_path = std::env::args()
        .nth(1)
        .map_or_else(|| root.join("build/gateway_filter.wasm"), PathBuf::from);
    let Ok(wasm) = std::fs::read(&wasm_path) else {
        eprintln!("hostemu: cannot read {} (make build first)", wasm_path.display());
        return ExitCode::from(2);
    };
    let tables = root.join("tests/hosts");
    let mut failures = Vec::new();
    for profile in profiles() {
        let table = match load_table(&tables, profile.table) {
            Ok(t) => t,
            Err(e) => {
                failures.push(e);
                continue;
            }
        };
        match run(&profile, &table, &wasm) {
            Ok(f) if f.is_empty() => println!(
                "hostemu: {} (table at {}): every case passed",
                profile.name,
                table.commit.get(..10).unwrap_or(&table.commit)
            ),
            Ok(f) => failures.extend(f),
            Err(e) => failures.push(format!("{}: {e}", profile.name)),
        }
    }
    if failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        for f in &failures {
            eprintln!("hostemu: FAIL {f}");
        }
        ExitCode::FAILURE
    }
}
