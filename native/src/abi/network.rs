//! The network filter's part of the ABI (the per-client connection cap):
//! `envoy_dynamic_module_type_network_*` and its callbacks, with safe wrappers.

use super::*;

/// `envoy_dynamic_module_type_network_filter_envoy_ptr`: one downstream connection in Envoy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EnvoyConnection(pub *mut c_void);
/// `envoy_dynamic_module_type_network_filter_config_envoy_ptr`: the network filter's
/// configuration in Envoy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EnvoyNetworkConfig(pub *mut c_void);

// SAFETY: only handed back to Envoy's configuration-level counter callback, implemented on
// thread-safe stats; the glue never dereferences it.
unsafe impl Send for EnvoyNetworkConfig {}
// SAFETY: as above.
unsafe impl Sync for EnvoyNetworkConfig {}

/// `envoy_dynamic_module_type_on_network_filter_data_status_StopIteration`.
pub const NETWORK_STOP: u32 = 1;
/// `envoy_dynamic_module_type_network_connection_event`: RemoteClose 0, LocalClose 1.
pub const EVENT_REMOTE_CLOSE: u32 = 0;
pub const EVENT_LOCAL_CLOSE: u32 = 1;
/// `envoy_dynamic_module_type_network_connection_close_type_NoFlush`.
const CLOSE_NO_FLUSH: u32 = 1;

extern "C" {
    pub(super) fn envoy_dynamic_module_callback_network_filter_get_remote_address(
        filter: *mut c_void,
        address_out: *mut EnvoyBuffer,
        port_out: *mut u32,
    ) -> bool;
    pub(super) fn envoy_dynamic_module_callback_network_filter_close(filter: *mut c_void, close_type: u32);
    pub(super) fn envoy_dynamic_module_callback_network_filter_scheduler_new(
        filter: *mut c_void,
    ) -> *mut c_void;
    pub(super) fn envoy_dynamic_module_callback_network_filter_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    pub(super) fn envoy_dynamic_module_callback_network_filter_scheduler_delete(scheduler: *mut c_void);
    pub(super) fn envoy_dynamic_module_callback_network_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        counter_id: *mut usize,
    ) -> u32;
    pub(super) fn envoy_dynamic_module_callback_network_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        value: u64,
    ) -> u32;
}

/// The connection's peer as the HTTP side writes it: `ip:port`, `[ipv6]:port`.
pub fn remote_address(connection: EnvoyConnection) -> Option<String> {
    let mut address = EnvoyBuffer::EMPTY;
    let mut port: u32 = 0;
    // SAFETY: a live connection pointer inside one of its hooks; both outputs are valid locals.
    let found = unsafe {
        envoy_dynamic_module_callback_network_filter_get_remote_address(connection.0, &mut address, &mut port)
    };
    if !found {
        return None;
    }
    // SAFETY: on true Envoy wrote a buffer valid during this hook.
    let ip = String::from_utf8_lossy(&unsafe { copy(address) }).into_owned();
    Some(if ip.contains(':') {
        format!("[{ip}]:{port}")
    } else {
        format!("{ip}:{port}")
    })
}

/// Closes the connection at once (nothing was read from it).
pub fn close_connection(connection: EnvoyConnection) {
    // SAFETY: a live connection pointer inside one of its hooks.
    unsafe { envoy_dynamic_module_callback_network_filter_close(connection.0, CLOSE_NO_FLUSH) }
}

/// Defines a plain counter on the network filter's configuration (while it is being created).
pub fn define_network_counter(config: EnvoyNetworkConfig, name: &str) -> Option<usize> {
    let mut id = 0usize;
    // SAFETY: the configuration pointer Envoy passed to config_new, during that hook; the name
    // describes a live &str; `id` is a valid local.
    let result = unsafe {
        envoy_dynamic_module_callback_network_filter_config_define_counter(
            config.0,
            ModuleBuffer::of(name.as_bytes()),
            &mut id,
        )
    };
    (result == METRICS_SUCCESS).then_some(id)
}

/// Adds to a counter of the network filter's configuration.
pub fn increment_network_counter(config: EnvoyNetworkConfig, id: usize, by: u64) {
    // SAFETY: a live configuration pointer (the connection using it holds the configuration);
    // Envoy's stats are thread-safe.
    unsafe {
        envoy_dynamic_module_callback_network_filter_config_increment_counter(config.0, id, by);
    }
}

/// The bytes of a buffer Envoy passed to the current hook (a configuration), copied.
pub fn hook_bytes(buffer: EnvoyBuffer) -> Vec<u8> {
    if buffer.ptr.is_null() {
        return Vec::new();
    }
    // SAFETY: Envoy passes `length` bytes valid during the hook that received the buffer.
    unsafe { copy(buffer) }
}
