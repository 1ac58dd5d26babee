//! Envoy's generic secrets (SDS) for the HTTP filter configuration: subscribed while the
//! configuration is created, read on any Envoy thread afterwards (Envoy keeps each worker's
//! copy current as SDS delivers a new version; there is no event for it, so the glue reads
//! again and compares). Added to Envoy by envoyproxy/envoy#46516, in 1.40.

use super::*;

extern "C" {
    fn envoy_dynamic_module_callback_http_filter_config_generic_secret_subscribe(
        config: *mut c_void,
        name: ModuleBuffer,
        sds_config_source: ModuleBuffer,
    ) -> usize;
    fn envoy_dynamic_module_callback_http_filter_config_get_generic_secret(
        config: *mut c_void,
        id: usize,
        result: *mut EnvoyBuffer,
    ) -> bool;
}

/// Subscribes to the generic secret `name` (a static secret of the bootstrap when `source` is
/// empty, else an SDS subscription from that JSON `ConfigSource`); its id, `None` when Envoy
/// refused (no such static secret, a bad source). Only during `config_new`, on the main thread.
pub fn subscribe_secret(config: EnvoyConfig, name: &str, source: &str) -> Option<usize> {
    // SAFETY: the configuration pointer of the current config_new; both buffers live for the
    // call.
    let id = unsafe {
        envoy_dynamic_module_callback_http_filter_config_generic_secret_subscribe(
            config.0,
            ModuleBuffer::of(name.as_bytes()),
            ModuleBuffer::of(source.as_bytes()),
        )
    };
    (id != 0).then_some(id)
}

/// The secret's current value on this thread (empty until SDS first delivers it); `None` for
/// an id Envoy does not know. On an Envoy thread, inside a hook.
pub fn secret(config: EnvoyConfig, id: usize) -> Option<Vec<u8>> {
    let mut out = EnvoyBuffer::EMPTY;
    // SAFETY: the configuration that subscribed `id`, on one of Envoy's threads inside a hook;
    // the buffer is copied before the hook returns.
    let ok = unsafe {
        envoy_dynamic_module_callback_http_filter_config_get_generic_secret(config.0, id, &mut out)
    };
    // SAFETY: on success Envoy filled `out` with a buffer valid for this hook.
    ok.then(|| unsafe { copy(out) })
}
