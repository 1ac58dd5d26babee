//! The gateway policy as an Envoy dynamic module: the same [`Gateway`] the `.wasm` runs, behind
//! a [`Host`] implemented with Envoy's dynamic-module ABI (`abi`). Only the glue differs.
//!
//! - **One gateway per worker and configuration**, in a thread-local, as the proxy-wasm build
//!   has one per VM (one VM per worker). Envoy's configuration object is shared by the workers;
//!   each builds its gateway from the same JSON on its first stream.
//! - **Shared data** is process-wide memory with the proxy-wasm rules (`cas` 0 writes
//!   unconditionally, another `cas` must match): [`SharedMemory`].
//! - **Callouts** are per-stream HTTP callouts with the request paused and resumed. The timer's
//!   work (log flush, limit sync, key sets) runs on Envoy's main thread and on workers when due
//!   ([`Ticking`]); its callouts are the configuration's, sent from the main thread, never a
//!   request's stream that a client could reset.
//! - **Acting after the decision**: the gateway's executor decides a hook's whole outcome
//!   (forward, reply, wait); the glue carries out what can re-enter the module (a reply, a
//!   resume, picking the route again) only after the gateway returns. Nothing else the gateway
//!   calls during a hook re-enters (callout answers never come inline; see `host::Deferred`),
//!   so no event ever waits for a gateway in use and there is no queue of pending events.
//! - **Panics** never cross the ABI: every hook runs under `catch_unwind` (the module is built
//!   with `panic = "unwind"`, profile `native`), and a request whose hook panicked is refused
//!   with a 500 (the gateway's fault), not the 503 of a busy gateway.
//!
//! Files, one duty each: `abi` (every call into Envoy), `shared` (the shared data), `registry`
//! (the configuration's hooks and generations, the ticker), `metrics` (Envoy's metric families),
//! `host` (the host state, the actions carried out after a decision, the two `Host`s), `worker` (a
//! worker's gateway, entered once at a time), `http` (the HTTP hooks), `network` (the
//! connection cap's network filter).

#![deny(clippy::undocumented_unsafe_blocks)]

/// Hooks Envoy requires a module to export but the gateway has nothing to do in: each takes
/// Envoy's arguments unread and returns at once (`-> u32 = value` for those that answer).
macro_rules! noop_hooks {
    ($($name:ident($($arg:ty),*) $(-> $ret:ty = $value:expr)?;)*) => {$(
        /// # Safety
        /// Nothing Envoy passes is read.
        #[no_mangle]
        pub unsafe extern "C" fn $name($(_: $arg),*) $(-> $ret)? {
            $($value)?
        }
    )*};
}

mod abi;
mod host;
mod http;
mod metrics;
mod network;
mod registry;
mod secrets;
mod shared;
mod worker;

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use abi::{EnvoyBuffer, EnvoyConfig, EnvoyFilter, EnvoyHeader};
use gateway_filter::config::Config;
use gateway_filter::host::{
    Callout, Decision, DispatchError, Host, LogLevel, MetricKind, SetError, SharedStore,
};
use gateway_filter::outcome::{message, Outcome};
use gateway_filter::pipeline::{bound_records, Action, Gateway, StoredRecord, RECORD_CLASSES};
use gateway_filter::reply::Reply;
use gateway_filter::stat;

/// The gateway's own context id for its timer work (requests are numbered from 2).
const ROOT: u32 = 1;

use host::*;
use metrics::*;
use registry::*;
use secrets::*;
use shared::*;
use worker::*;

// ---------------------------------------------------------------------------------------------
// The hooks Envoy calls. Each runs under catch_unwind: a panic is logged and the request refused.

pub(crate) fn guard<R>(hook: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            abi::log(4, &format!("gateway filter: panic in {hook}: refused"));
            fallback
        }
    }
}

/// # Safety
/// Envoy calls it once, on the main thread, right after loading the module.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::ABI_VERSION.as_ptr().cast()
}
