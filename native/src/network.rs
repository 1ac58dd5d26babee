//! The per-client connection cap as a network filter of the same `.so`, so the native runtime
//! needs no wasm VM at all. The duty (`gateway_filter::connlimit`) is the one the `.wasm`'s
//! network filter runs; its slots live in the same process-wide shared memory as the HTTP
//! filter's state, under the same keys and CAS rules.

use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{LazyLock, Mutex, Once};

use gateway_filter::connlimit::{
    ConnectionLimit, Connections, Counted, Silent, REFUSED_METRIC, SILENT_METRIC,
};

use crate::abi::{self, EnvoyBuffer, EnvoyConnection, EnvoyNetworkConfig, Scheduler};
use crate::{guard, now_ms, SHARED};

/// The network filter's configuration: the duty, and Envoy's counters of refused connections
/// and of connections closed for sending nothing in time.
struct NetworkConfig {
    duty: Connections,
    envoy: EnvoyNetworkConfig,
    refused: Option<usize>,
    silent_closed: Option<usize>,
}

/// The process's connections that have sent nothing yet, each with the scheduler that reaches
/// its worker: a thread of the module (the first-byte watch) commits an event to those whose
/// time is up, and the worker closes the connection if it is still silent.
#[derive(Default)]
struct Waiting {
    silent: Silent,
    schedulers: HashMap<u64, Scheduler>,
}

static WAITING: LazyLock<Mutex<Waiting>> = LazyLock::new(Mutex::default);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);
static WATCH: Once = Once::new();
/// How often the watch looks for silent connections whose time is up.
const WATCH_MS: u64 = 250;

fn start_watch() {
    WATCH.call_once(|| {
        let spawned = std::thread::Builder::new()
            .name("gateway-first-byte".into())
            .spawn(|| loop {
                std::thread::sleep(std::time::Duration::from_millis(WATCH_MS));
                let due: Vec<Scheduler> = match WAITING.lock() {
                    Ok(mut w) => {
                        let ids = w.silent.due(mono_ms());
                        ids.iter().filter_map(|id| w.schedulers.remove(id)).collect()
                    }
                    Err(_) => Vec::new(),
                };
                for s in due {
                    s.commit(0);
                }
            });
        if let Err(e) = spawned {
            abi::log(4, &format!("gateway filter: no first-byte watch: {e}"));
        }
    });
}

fn forget(id: u64) {
    let scheduler = match WAITING.lock() {
        Ok(mut w) => {
            w.silent.forget(id);
            w.schedulers.remove(&id)
        }
        Err(_) => None,
    };
    // Deleted outside the lock.
    drop(scheduler);
}

/// Milliseconds on a monotonic clock (deadlines must not move with the wall clock).
fn mono_ms() -> u64 {
    static START: LazyLock<std::time::Instant> = LazyLock::new(std::time::Instant::now);
    u64::try_from(START.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// One downstream connection: the slot it is counted in, released once when it closes.
struct Connection {
    config: *const NetworkConfig,
    counted: Option<Counted>,
    /// Its key in [`WAITING`] while it has sent nothing.
    id: u64,
    silent: bool,
}

impl Connection {
    fn config(&self) -> Option<&NetworkConfig> {
        // SAFETY: the configuration outlives the connections made from it (Envoy destroys it
        // after their `filter_destroy`); null is checked.
        (!self.config.is_null()).then(|| unsafe { &*self.config })
    }

    fn release(&mut self) {
        self.spoke();
        if let Some(key) = self.counted.take() {
            if let Some(config) = self.config() {
                config.duty.close(&*SHARED, &key);
            }
        }
    }

    /// It sent data (or closed): no longer watched.
    fn spoke(&mut self) {
        if std::mem::take(&mut self.silent) {
            forget(self.id);
        }
    }
}

/// The connection behind a module pointer.
///
/// # Safety
/// `module` is a pointer `filter_new` returned and not yet destroyed, used on its worker only.
unsafe fn connection<'a>(module: *const c_void) -> Option<&'a mut Connection> {
    // SAFETY: the caller's guarantee; null is checked; Envoy calls a connection's hooks one at
    // a time on its worker, so no other reference exists meanwhile.
    (!module.is_null()).then(|| unsafe { &mut *(module as *mut Connection) })
}

/// # Safety
/// Envoy passes its configuration pointer and buffers valid for this call (main thread).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_config_new(
    envoy: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard("network_config_new", std::ptr::null(), || {
        let json = abi::hook_bytes(config);
        let limit = match ConnectionLimit::from_json(&json) {
            Some(Ok(limit)) => limit,
            Some(Err(e)) => {
                abi::log(4, &format!("gateway filter: invalid configuration: {e}"));
                return std::ptr::null();
            }
            None => {
                abi::log(
                    4,
                    "gateway filter: invalid configuration: the network filter takes {\"connections\": ...}",
                );
                return std::ptr::null();
            }
        };
        let envoy = EnvoyNetworkConfig(envoy);
        let mut fresh = [0u8; 16];
        let _ = getrandom::fill(&mut fresh);
        abi::log(
            2,
            &format!(
                "gateway filter configured: at most {} connections per client",
                limit.max_per_client
            ),
        );
        if limit.first_byte_ms.is_some() {
            start_watch();
        }
        let config = NetworkConfig {
            duty: Connections::new(limit, &*SHARED, fresh),
            envoy,
            refused: abi::define_network_counter(envoy, REFUSED_METRIC),
            silent_closed: abi::define_network_counter(envoy, SILENT_METRIC),
        };
        Box::into_raw(Box::new(config)).cast_const().cast()
    })
}

/// # Safety
/// `config` is a pointer `config_new` returned; Envoy destroys it once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_config_destroy(config: *const c_void) {
    guard("network_config_destroy", (), || {
        if !config.is_null() {
            // SAFETY: created by Box::into_raw in config_new; destroyed once, after its
            // connections.
            drop(unsafe { Box::from_raw(config as *mut NetworkConfig) });
        }
    })
}

/// # Safety
/// `config` is a live pointer `config_new` returned; called on the connection's worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_new(
    config: *const c_void,
    _connection: *mut c_void,
) -> *const c_void {
    guard("network_filter_new", std::ptr::null(), || {
        let connection = Connection {
            config: config.cast(),
            counted: None,
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            silent: false,
        };
        Box::into_raw(Box::new(connection)).cast_const().cast()
    })
}

/// # Safety
/// Live pointers of this connection, on its worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_new_connection(
    envoy: *mut c_void,
    module: *const c_void,
) -> u32 {
    guard("network_new_connection", abi::CONTINUE, || {
        // SAFETY: this connection's live module pointer, on its worker.
        let Some(conn) = (unsafe { connection(module) }) else {
            return abi::CONTINUE;
        };
        let Some(config) = conn.config() else {
            return abi::CONTINUE;
        };
        let envoy = EnvoyConnection(envoy);
        let peer = abi::remote_address(envoy);
        let now = now_ms();
        match config.duty.open(&*SHARED, peer.as_deref(), now) {
            Ok(counted) => {
                let first_byte_ms = config.duty.first_byte_ms();
                conn.counted = counted;
                if let (Some(ms), Some(scheduler)) = (first_byte_ms, Scheduler::for_connection(envoy)) {
                    if let Ok(mut w) = WAITING.lock() {
                        w.silent.opened(conn.id, mono_ms().saturating_add(ms));
                        w.schedulers.insert(conn.id, scheduler);
                        conn.silent = true;
                    }
                }
                abi::CONTINUE
            }
            Err(_) => {
                if let Some(id) = config.refused {
                    abi::increment_network_counter(config.envoy, id, 1);
                }
                abi::close_connection(envoy);
                abi::NETWORK_STOP
            }
        }
    })
}

/// # Safety
/// Live pointers of this connection, on its worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_event(
    _connection: *mut c_void,
    module: *const c_void,
    event: u32,
) {
    guard("network_event", (), || {
        if event == abi::EVENT_REMOTE_CLOSE || event == abi::EVENT_LOCAL_CLOSE {
            // SAFETY: this connection's live module pointer, on its worker.
            if let Some(conn) = unsafe { connection(module) } {
                conn.release();
            }
        }
    })
}

/// # Safety
/// `module` is a pointer `filter_new` returned; Envoy destroys it once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_destroy(module: *const c_void) {
    guard("network_filter_destroy", (), || {
        if !module.is_null() {
            // SAFETY: created by Box::into_raw in filter_new; destroyed once.
            let mut conn = unsafe { Box::from_raw(module as *mut Connection) };
            conn.release();
        }
    })
}

// The hooks this filter has no use for; Envoy needs every one of them to load the filter.

/// # Safety
/// Live pointers of this connection, on its worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_read(
    _connection: *mut c_void,
    module: *const c_void,
    _length: usize,
    _end_stream: bool,
) -> u32 {
    guard("network_read", abi::CONTINUE, || {
        // SAFETY: this connection's live module pointer, on its worker.
        if let Some(conn) = unsafe { connection(module) } {
            conn.spoke();
        }
        abi::CONTINUE
    })
}

/// The first-byte watch found this connection's time up: closed if it is still silent.
///
/// # Safety
/// Live pointers of this connection, on its worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_network_filter_scheduled(
    envoy: *mut c_void,
    module: *const c_void,
    _event: u64,
) {
    guard("network_scheduled", (), || {
        // SAFETY: this connection's live module pointer, on its worker.
        let Some(conn) = (unsafe { connection(module) }) else {
            return;
        };
        if !std::mem::take(&mut conn.silent) {
            return;
        }
        if let Some(config) = conn.config() {
            if let Some(id) = config.silent_closed {
                abi::increment_network_counter(config.envoy, id, 1);
            }
        }
        abi::close_connection(EnvoyConnection(envoy));
    })
}

noop_hooks! {
    envoy_dynamic_module_on_network_filter_write(*mut c_void, *const c_void, usize, bool) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_network_filter_http_callout_done(*mut c_void, *const c_void, u64, u32, *mut abi::EnvoyHeader, usize, *mut EnvoyBuffer, usize);
    envoy_dynamic_module_on_network_filter_config_scheduled(*const c_void, u64);
    envoy_dynamic_module_on_network_filter_above_write_buffer_high_watermark(*mut c_void, *const c_void);
    envoy_dynamic_module_on_network_filter_below_write_buffer_low_watermark(*mut c_void, *const c_void);
}
