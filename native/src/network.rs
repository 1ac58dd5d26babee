//! The per-client connection cap as a network filter of the same `.so`, so the native runtime
//! needs no wasm VM at all. The duty (`gateway_filter::connlimit`) is the one the `.wasm`'s
//! network filter runs; its slots live in the same process-wide shared memory as the HTTP
//! filter's state, under the same keys and CAS rules.

use std::ffi::c_void;

use gateway_filter::connlimit::{ConnectionLimit, Connections, REFUSED_METRIC};

use crate::abi::{self, EnvoyBuffer, EnvoyConnection, EnvoyNetworkConfig};
use crate::{guard, now_ms, SHARED};

/// The network filter's configuration: the duty, and Envoy's counter of refused connections.
struct NetworkConfig {
    duty: Connections,
    envoy: EnvoyNetworkConfig,
    refused: Option<usize>,
}

/// One downstream connection: the slot it is counted in, released once when it closes.
struct Connection {
    config: *const NetworkConfig,
    counted: Option<String>,
}

impl Connection {
    fn config(&self) -> Option<&NetworkConfig> {
        // SAFETY: the configuration outlives the connections made from it (Envoy destroys it
        // after their `filter_destroy`); null is checked.
        (!self.config.is_null()).then(|| unsafe { &*self.config })
    }

    fn release(&mut self) {
        if let Some(key) = self.counted.take() {
            if let Some(config) = self.config() {
                config.duty.close(&*SHARED, &key);
            }
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
        let config = NetworkConfig {
            duty: Connections::new(limit, &*SHARED, fresh),
            envoy,
            refused: abi::define_network_counter(envoy, REFUSED_METRIC),
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
        match config.duty.open(&*SHARED, peer.as_deref(), now_ms()) {
            Ok(counted) => {
                conn.counted = counted;
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

noop_hooks! {
    envoy_dynamic_module_on_network_filter_read(*mut c_void, *const c_void, usize, bool) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_network_filter_write(*mut c_void, *const c_void, usize, bool) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_network_filter_http_callout_done(*mut c_void, *const c_void, u64, u32, *mut abi::EnvoyHeader, usize, *mut EnvoyBuffer, usize);
    envoy_dynamic_module_on_network_filter_scheduled(*mut c_void, *const c_void, u64);
    envoy_dynamic_module_on_network_filter_config_scheduled(*const c_void, u64);
    envoy_dynamic_module_on_network_filter_above_write_buffer_high_watermark(*mut c_void, *const c_void);
    envoy_dynamic_module_on_network_filter_below_write_buffer_low_watermark(*mut c_void, *const c_void);
}
