//! Envoy's dynamic-module C ABI (version v0.2.0, Envoy 1.40), declared by hand from the
//! documented signatures of `source/extensions/dynamic_modules/abi/abi.h`: only the callbacks
//! the glue uses, and safe wrappers around them. Every call into Envoy's ABI is here; the
//! other `unsafe` blocks of the module (the hooks' entry points in `lib.rs` and `network.rs`,
//! which turn the module's own pointers back into its objects) each state their reason in a
//! `SAFETY:` comment, which clippy's `undocumented_unsafe_blocks` enforces.
//!
//! Pointers Envoy hands over (`EnvoyFilter`, `EnvoyConfig`) are opaque; they stay valid until
//! the matching destroy hook, and every callback that takes one is called on the thread that
//! owns it (the stream's worker, or the main thread for configuration), from inside a hook.
//! Buffers Envoy returns are valid until the end of the current hook; the wrappers copy them.

// The unit-test binary keeps no path into Envoy (see `Scheduler`'s drop).
#![cfg_attr(test, allow(dead_code))]
use std::ffi::{c_char, c_void};
use std::ptr::{null, null_mut};

/// The ABI version Envoy 1.40 expects from `envoy_dynamic_module_on_program_init`.
pub const ABI_VERSION: &[u8] = b"v0.2.0\0";

/// `envoy_dynamic_module_type_http_filter_envoy_ptr`: one HTTP stream in Envoy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EnvoyFilter(pub *mut c_void);
/// `envoy_dynamic_module_type_http_filter_config_envoy_ptr`: the filter configuration in Envoy.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct EnvoyConfig(pub *mut c_void);

// SAFETY: the configuration pointer is only handed back to Envoy's configuration-level metric
// callbacks, which Envoy implements on thread-safe stats; the glue never dereferences it.
unsafe impl Send for EnvoyConfig {}
// SAFETY: as above.
unsafe impl Sync for EnvoyConfig {}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl EnvoyBuffer {
    const EMPTY: EnvoyBuffer = EnvoyBuffer {
        ptr: null(),
        length: 0,
    };
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleBuffer {
    pub ptr: *const c_char,
    pub length: usize,
}

impl ModuleBuffer {
    pub fn of(bytes: &[u8]) -> Self {
        ModuleBuffer {
            ptr: bytes.as_ptr().cast(),
            length: bytes.len(),
        }
    }

    const EMPTY: ModuleBuffer = ModuleBuffer {
        ptr: null(),
        length: 0,
    };
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct ModuleHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

impl ModuleHeader {
    pub fn of(key: &[u8], value: &[u8]) -> Self {
        ModuleHeader {
            key_ptr: key.as_ptr().cast(),
            key_length: key.len(),
            value_ptr: value.as_ptr().cast(),
            value_length: value.len(),
        }
    }
}

#[repr(C)]
#[derive(Clone, Copy)]
pub struct EnvoyHeader {
    pub key_ptr: *const c_char,
    pub key_length: usize,
    pub value_ptr: *const c_char,
    pub value_length: usize,
}

/// `envoy_dynamic_module_type_http_header_type`.
pub const REQUEST_HEADER: u32 = 0;
pub const RESPONSE_HEADER: u32 = 2;
/// `envoy_dynamic_module_type_on_http_filter_request_headers_status`.
pub const CONTINUE: u32 = 0;
/// Nothing of the request (headers, body, trailers) goes on until the filter continues it.
pub const STOP_ALL_ITERATION_AND_WATERMARK: u32 = 4;
/// `envoy_dynamic_module_type_http_callout_init_result_Success`.
const CALLOUT_SUCCESS: u32 = 0;
const CALLOUT_CLUSTER_NOT_FOUND: u32 = 2;
/// `envoy_dynamic_module_type_http_callout_result_Success`.
pub const CALLOUT_RESULT_SUCCESS: u32 = 0;
/// `envoy_dynamic_module_type_attribute_id_SourceAddress`.
const ATTRIBUTE_SOURCE_ADDRESS: u32 = 24;
/// `envoy_dynamic_module_type_attribute_id_ConnectionSha256PeerCertificateDigest`.
const ATTRIBUTE_PEER_CERTIFICATE_SHA256: u32 = 38;
/// `envoy_dynamic_module_type_attribute_id_ResponseCode`.
const ATTRIBUTE_RESPONSE_CODE: u32 = 15;
/// `envoy_dynamic_module_type_metrics_result_Success`.
const METRICS_SUCCESS: u32 = 0;

extern "C" {
    fn envoy_dynamic_module_callback_http_get_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        result: *mut EnvoyBuffer,
        index: usize,
        optional_size: *mut usize,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_headers_size(filter: *mut c_void, header_type: u32) -> usize;
    fn envoy_dynamic_module_callback_http_get_headers(
        filter: *mut c_void,
        header_type: u32,
        result_headers: *mut EnvoyHeader,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_set_header(
        filter: *mut c_void,
        header_type: u32,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_send_response(
        filter: *mut c_void,
        status_code: u32,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        details: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_filter_http_callout(
        filter: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_continue_decoding(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_clear_route_cache(filter: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_get_attribute_string(
        filter: *mut c_void,
        attribute_id: u32,
        result: *mut EnvoyBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_get_attribute_int(
        filter: *mut c_void,
        attribute_id: u32,
        result: *mut u64,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_filter_config_define_counter(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_define_histogram(
        config: *mut c_void,
        name: ModuleBuffer,
        label_names: *mut ModuleBuffer,
        label_names_length: usize,
        id_out: *mut usize,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_increment_counter(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_record_histogram_value(
        config: *mut c_void,
        id: usize,
        label_values: *mut ModuleBuffer,
        label_values_length: usize,
        value: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_log_enabled(level: u32) -> bool;
    fn envoy_dynamic_module_callback_log(level: u32, message: ModuleBuffer);
    fn envoy_dynamic_module_callback_http_filter_config_http_callout(
        config: *mut c_void,
        callout_id_out: *mut u64,
        cluster_name: ModuleBuffer,
        headers: *mut ModuleHeader,
        headers_size: usize,
        body: ModuleBuffer,
        timeout_milliseconds: u64,
    ) -> u32;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_new(config: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_commit(
        scheduler: *mut c_void,
        event_id: u64,
    );
    fn envoy_dynamic_module_callback_http_filter_config_scheduler_delete(scheduler: *mut c_void);
    fn envoy_dynamic_module_callback_http_filter_scheduler_new(filter: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_filter_scheduler_commit(scheduler: *mut c_void, event_id: u64);
    fn envoy_dynamic_module_callback_http_filter_scheduler_delete(scheduler: *mut c_void);
}

/// A scheduler Envoy allocated for the module (a stream's, the configuration's, or a
/// connection's): posts an event to the thread that owns its target. Committing is thread-safe
/// and a no-op once the target is gone; the module deletes it, once.
pub struct Scheduler {
    ptr: *mut c_void,
    kind: SchedulerKind,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum SchedulerKind {
    Config,
    Stream,
    Connection,
}

// SAFETY: Envoy documents `*_scheduler_commit` as callable from any thread, and delete only
// drops a weak reference; the module calls delete once (Drop).
unsafe impl Send for Scheduler {}
// SAFETY: as above; commit takes no lock the module holds.
unsafe impl Sync for Scheduler {}

impl Scheduler {
    /// A scheduler for the configuration: events reach `on_http_filter_config_scheduled` on
    /// Envoy's main thread.
    pub fn for_config(config: EnvoyConfig) -> Option<Scheduler> {
        // SAFETY: the configuration pointer passed to config_new, during that hook.
        let ptr = unsafe { envoy_dynamic_module_callback_http_filter_config_scheduler_new(config.0) };
        (!ptr.is_null()).then_some(Scheduler {
            ptr,
            kind: SchedulerKind::Config,
        })
    }

    /// A scheduler for a stream: events reach `on_http_filter_scheduled` on its worker.
    pub fn for_stream(filter: EnvoyFilter) -> Option<Scheduler> {
        // SAFETY: a live stream pointer, on its worker.
        let ptr = unsafe { envoy_dynamic_module_callback_http_filter_scheduler_new(filter.0) };
        (!ptr.is_null()).then_some(Scheduler {
            ptr,
            kind: SchedulerKind::Stream,
        })
    }

    /// A scheduler for a connection: events reach `on_network_filter_scheduled` on its worker
    /// (Envoy holds the filter weakly: an event after the connection is gone is dropped,
    /// `DynamicModuleNetworkFilterScheduler::commit`).
    pub fn for_connection(connection: EnvoyConnection) -> Option<Scheduler> {
        // SAFETY: a live connection pointer inside one of its hooks.
        let ptr = unsafe { envoy_dynamic_module_callback_network_filter_scheduler_new(connection.0) };
        (!ptr.is_null()).then_some(Scheduler {
            ptr,
            kind: SchedulerKind::Connection,
        })
    }

    pub fn commit(&self, event: u64) {
        // SAFETY: a scheduler Envoy allocated and the module has not deleted (Drop).
        unsafe {
            match self.kind {
                SchedulerKind::Config => {
                    envoy_dynamic_module_callback_http_filter_config_scheduler_commit(self.ptr, event)
                }
                SchedulerKind::Stream => {
                    envoy_dynamic_module_callback_http_filter_scheduler_commit(self.ptr, event)
                }
                SchedulerKind::Connection => {
                    envoy_dynamic_module_callback_network_filter_scheduler_commit(self.ptr, event)
                }
            }
        }
    }
}

impl Drop for Scheduler {
    fn drop(&mut self) {
        // A unit-test binary has no Envoy to link against; it never makes a scheduler either,
        // but its unwinding paths still name this drop.
        #[cfg(test)]
        return;
        // SAFETY: deleted once, here.
        #[cfg(not(test))]
        unsafe {
            match self.kind {
                SchedulerKind::Config => {
                    envoy_dynamic_module_callback_http_filter_config_scheduler_delete(self.ptr)
                }
                SchedulerKind::Stream => envoy_dynamic_module_callback_http_filter_scheduler_delete(self.ptr),
                SchedulerKind::Connection => {
                    envoy_dynamic_module_callback_network_filter_scheduler_delete(self.ptr)
                }
            }
        }
    }
}

/// Copies an Envoy-owned buffer (valid only during the hook) into owned bytes.
///
/// # Safety
/// `b` must describe `length` readable bytes, or have a null pointer / zero length.
unsafe fn copy(b: EnvoyBuffer) -> Vec<u8> {
    if b.ptr.is_null() || b.length == 0 {
        return Vec::new();
    }
    // SAFETY: the caller guarantees `length` readable bytes at `ptr` for this hook.
    unsafe { std::slice::from_raw_parts(b.ptr.cast::<u8>(), b.length) }.to_vec()
}

/// The whole header map of a stream (request or response), copied.
pub fn headers(filter: EnvoyFilter, header_type: u32) -> Option<Vec<(String, Vec<u8>)>> {
    // SAFETY: a live stream pointer, on its worker, inside one of its hooks.
    let size = unsafe { envoy_dynamic_module_callback_http_get_headers_size(filter.0, header_type) };
    let empty = EnvoyHeader {
        key_ptr: null(),
        key_length: 0,
        value_ptr: null(),
        value_length: 0,
    };
    let mut out = vec![empty; size];
    // SAFETY: `out` has room for exactly the `size` entries Envoy writes.
    if !unsafe { envoy_dynamic_module_callback_http_get_headers(filter.0, header_type, out.as_mut_ptr()) } {
        return None;
    }
    let pairs = out
        .iter()
        .map(|h| {
            // SAFETY: each entry Envoy filled describes bytes valid during this hook.
            let key = unsafe {
                copy(EnvoyBuffer {
                    ptr: h.key_ptr,
                    length: h.key_length,
                })
            };
            // SAFETY: as above.
            let value = unsafe {
                copy(EnvoyBuffer {
                    ptr: h.value_ptr,
                    length: h.value_length,
                })
            };
            (String::from_utf8_lossy(&key).into_owned(), value)
        })
        .collect();
    Some(pairs)
}

/// The first value of one header.
pub fn header(filter: EnvoyFilter, header_type: u32, name: &str) -> Option<Vec<u8>> {
    let mut result = EnvoyBuffer::EMPTY;
    // SAFETY: live stream pointer; the key describes a live &str; `result` is a valid local.
    let found = unsafe {
        envoy_dynamic_module_callback_http_get_header(
            filter.0,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            &mut result,
            0,
            null_mut(),
        )
    };
    // SAFETY: on true Envoy wrote a buffer valid during this hook.
    found.then(|| unsafe { copy(result) })
}

/// Sets (replaces every value of) a header; `None` removes it. False when Envoy has no such
/// header map now.
pub fn set_header(filter: EnvoyFilter, header_type: u32, name: &str, value: Option<&str>) -> bool {
    let value = value.map_or(ModuleBuffer::EMPTY, |v| ModuleBuffer::of(v.as_bytes()));
    // SAFETY: live stream pointer; both buffers describe live data Envoy copies.
    unsafe {
        envoy_dynamic_module_callback_http_set_header(
            filter.0,
            header_type,
            ModuleBuffer::of(name.as_bytes()),
            value,
        )
    }
}

/// A local reply: status, headers, body.
pub fn send_response(filter: EnvoyFilter, status: u16, headers: &[(&str, &str)], body: &[u8], details: &str) {
    let mut hs: Vec<ModuleHeader> = headers
        .iter()
        .map(|(k, v)| ModuleHeader::of(k.as_bytes(), v.as_bytes()))
        .collect();
    // SAFETY: live stream pointer; the header array and buffers describe live data Envoy copies.
    unsafe {
        envoy_dynamic_module_callback_http_send_response(
            filter.0,
            u32::from(status),
            hs.as_mut_ptr(),
            hs.len(),
            ModuleBuffer::of(body),
            ModuleBuffer::of(details.as_bytes()),
        );
    }
}

/// Why a callout could not start.
pub enum CalloutRefused {
    ClusterNotFound,
    Other,
}

/// Who sends a callout, and where its answer comes: a stream (to
/// `on_http_filter_http_callout_done` on its worker) or the configuration (to
/// `on_http_filter_config_http_callout_done`, on Envoy's main thread, the only thread it may be
/// started from).
#[derive(Clone, Copy)]
pub enum CalloutOwner {
    Stream(EnvoyFilter),
    Config(EnvoyConfig),
}

type StartCallout = unsafe extern "C" fn(
    *mut c_void,
    *mut u64,
    ModuleBuffer,
    *mut ModuleHeader,
    usize,
    ModuleBuffer,
    u64,
) -> u32;

/// Starts an HTTP callout; its answer comes with the id returned here.
pub fn http_callout(
    owner: CalloutOwner,
    cluster: &str,
    headers: &[(&str, &str)],
    body: &[u8],
    timeout_ms: u64,
) -> Result<u64, CalloutRefused> {
    let (start, ptr): (StartCallout, *mut c_void) = match owner {
        CalloutOwner::Stream(f) => (envoy_dynamic_module_callback_http_filter_http_callout, f.0),
        CalloutOwner::Config(c) => (envoy_dynamic_module_callback_http_filter_config_http_callout, c.0),
    };
    let mut hs: Vec<ModuleHeader> = headers
        .iter()
        .map(|(k, v)| ModuleHeader::of(k.as_bytes(), v.as_bytes()))
        .collect();
    let mut id: u64 = 0;
    // SAFETY: a live stream (on its worker) or configuration (on the main thread) pointer;
    // `id` is a valid local; the header array and buffers describe live data Envoy copies.
    let result = unsafe {
        start(
            ptr,
            &mut id,
            ModuleBuffer::of(cluster.as_bytes()),
            hs.as_mut_ptr(),
            hs.len(),
            ModuleBuffer::of(body),
            timeout_ms,
        )
    };
    match result {
        CALLOUT_SUCCESS => Ok(id),
        CALLOUT_CLUSTER_NOT_FOUND => Err(CalloutRefused::ClusterNotFound),
        _ => Err(CalloutRefused::Other),
    }
}

/// The answer of a callout, as the done hook received it: `:status` and the body, copied.
///
/// # Safety
/// The pointers and sizes must be the ones Envoy passed to the done hook now running.
pub unsafe fn callout_answer(
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) -> (Option<u16>, Vec<u8>) {
    let headers: &[EnvoyHeader] = if headers.is_null() {
        &[]
    } else {
        // SAFETY: Envoy passed `headers_size` entries valid during the hook.
        unsafe { std::slice::from_raw_parts(headers, headers_size) }
    };
    let mut status = None;
    for h in headers {
        // SAFETY: each entry describes bytes valid during the hook.
        let key = unsafe {
            copy(EnvoyBuffer {
                ptr: h.key_ptr,
                length: h.key_length,
            })
        };
        if key == b":status" {
            // SAFETY: as above.
            let value = unsafe {
                copy(EnvoyBuffer {
                    ptr: h.value_ptr,
                    length: h.value_length,
                })
            };
            status = std::str::from_utf8(&value).ok().and_then(|s| s.parse().ok());
        }
    }
    let chunks: &[EnvoyBuffer] = if chunks.is_null() {
        &[]
    } else {
        // SAFETY: Envoy passed `chunks_size` slices valid during the hook.
        unsafe { std::slice::from_raw_parts(chunks, chunks_size) }
    };
    let mut body = Vec::new();
    for c in chunks {
        // SAFETY: each slice describes bytes valid during the hook.
        body.extend_from_slice(&unsafe { copy(*c) });
    }
    (status, body)
}

pub fn continue_decoding(filter: EnvoyFilter) {
    // SAFETY: a live stream pointer of this worker (a no-op if it is already going on).
    unsafe { envoy_dynamic_module_callback_http_filter_continue_decoding(filter.0) }
}

pub fn clear_route_cache(filter: EnvoyFilter) {
    // SAFETY: a live stream pointer, in its request path.
    unsafe { envoy_dynamic_module_callback_http_clear_route_cache(filter.0) }
}

/// The downstream peer, `ip:port`.
pub fn source_address(filter: EnvoyFilter) -> Option<String> {
    attribute_string(filter, ATTRIBUTE_SOURCE_ADDRESS)
}

/// The SHA-256 of the downstream client certificate, hex (`None` without TLS or certificate).
pub fn peer_certificate_sha256(filter: EnvoyFilter) -> Option<String> {
    attribute_string(filter, ATTRIBUTE_PEER_CERTIFICATE_SHA256).filter(|s| !s.is_empty())
}

fn attribute_string(filter: EnvoyFilter, attribute: u32) -> Option<String> {
    let mut result = EnvoyBuffer::EMPTY;
    // SAFETY: live stream pointer; `result` is a valid local.
    let found = unsafe {
        envoy_dynamic_module_callback_http_filter_get_attribute_string(filter.0, attribute, &mut result)
    };
    // SAFETY: on true Envoy wrote a buffer valid during this hook.
    found.then(|| String::from_utf8_lossy(&unsafe { copy(result) }).into_owned())
}

fn buffers(strings: &[impl AsRef<str>]) -> Vec<ModuleBuffer> {
    strings
        .iter()
        .map(|s| ModuleBuffer::of(s.as_ref().as_bytes()))
        .collect()
}

/// The response code Envoy recorded for the stream (also for a local reply).
pub fn response_code(filter: EnvoyFilter) -> Option<u16> {
    let mut code: u64 = 0;
    // SAFETY: live stream pointer; `code` is a valid local.
    let found = unsafe {
        envoy_dynamic_module_callback_http_filter_get_attribute_int(
            filter.0,
            ATTRIBUTE_RESPONSE_CODE,
            &mut code,
        )
    };
    if found {
        u16::try_from(code).ok()
    } else {
        None
    }
}

type DefineMetric =
    unsafe extern "C" fn(*mut c_void, ModuleBuffer, *mut ModuleBuffer, usize, *mut usize) -> u32;
type UpdateMetric = unsafe extern "C" fn(*mut c_void, usize, *mut ModuleBuffer, usize, u64) -> u32;

/// A label array for Envoy: null when empty.
fn label_ptr(buffers: &mut [ModuleBuffer]) -> *mut ModuleBuffer {
    if buffers.is_empty() {
        null_mut()
    } else {
        buffers.as_mut_ptr()
    }
}

/// Defines a counter or a histogram on the configuration (only while it is being created),
/// with label names (a labelled family) or none. Labelled and plain metrics have separate ids.
pub fn define_metric(config: EnvoyConfig, histogram: bool, name: &str, labels: &[&str]) -> Option<usize> {
    let define: DefineMetric = if histogram {
        envoy_dynamic_module_callback_http_filter_config_define_histogram
    } else {
        envoy_dynamic_module_callback_http_filter_config_define_counter
    };
    let mut id: usize = 0;
    let mut names = buffers(labels);
    // SAFETY: the configuration pointer passed to config_new, during that hook; `id` is a
    // valid local; the label array describes live strings Envoy copies.
    let result = unsafe {
        define(
            config.0,
            ModuleBuffer::of(name.as_bytes()),
            label_ptr(&mut names),
            names.len(),
            &mut id,
        )
    };
    (result == METRICS_SUCCESS).then_some(id)
}

fn update_metric(update: UpdateMetric, config: EnvoyConfig, id: usize, values: &[String], value: u64) {
    let mut values = buffers(values);
    // SAFETY: a live configuration pointer; the label values describe live strings; Envoy's
    // stats are thread-safe.
    unsafe {
        update(config.0, id, label_ptr(&mut values), values.len(), value);
    }
}

/// Adds to a counter; `values` are its labels' values (none for a plain counter).
pub fn increment_counter(config: EnvoyConfig, id: usize, values: &[String], by: u64) {
    update_metric(
        envoy_dynamic_module_callback_http_filter_config_increment_counter,
        config,
        id,
        values,
        by,
    );
}

/// Records a histogram value; `values` as for [`increment_counter`].
pub fn record_histogram(config: EnvoyConfig, id: usize, values: &[String], value: u64) {
    update_metric(
        envoy_dynamic_module_callback_http_filter_config_record_histogram_value,
        config,
        id,
        values,
        value,
    );
}

/// Whether Envoy keeps a log line of `level` (its log level for dynamic modules).
pub fn log_enabled(level: u32) -> bool {
    // SAFETY: a plain value; thread-safe.
    unsafe { envoy_dynamic_module_callback_log_enabled(level) }
}

/// `envoy_dynamic_module_type_log_level`: Trace 0 … Error 4.
pub fn log(level: u32, message: &str) {
    // SAFETY: a plain value and a buffer Envoy copies; thread-safe.
    unsafe { envoy_dynamic_module_callback_log(level, ModuleBuffer::of(message.as_bytes())) }
}

mod network;
pub use network::*;
mod secrets;
pub use secrets::*;
mod decisions;
pub use decisions::*;
