//! The reads of a callout's answer and WASI's clock, declared from the proxy-wasm ABI (0.2.1) and
//! WASI preview 1 so that every status the host returns is handled. The only `unsafe` of the glue.

use std::ptr::null_mut;

/// `MapType::HttpCallResponseHeaders` and `BufferType::HttpCallResponseBody` of the ABI.
const CALL_RESPONSE_HEADERS: u32 = 6;
const CALL_RESPONSE_BODY: u32 = 4;
pub const STATUS_OK: u32 = 0;

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_get_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
    fn proxy_get_buffer_bytes(
        buffer_type: u32,
        start: usize,
        max_size: usize,
        return_buffer_data: *mut *mut u8,
        return_buffer_size: *mut usize,
    ) -> u32;
    fn proxy_replace_header_map_value(
        map_type: u32,
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
    fn proxy_remove_header_map_value(map_type: u32, key_data: *const u8, key_size: usize) -> u32;
}

/// Replaces (`Some`) or removes (`None`) a header of `map_type`; the host's status. Through the
/// raw ABI: the SDK's wrappers panic on any status but Ok, and APISIX answers BadArgument when
/// OpenResty refuses the change.
pub fn set_header(map_type: u32, name: &str, value: Option<&str>) -> u32 {
    // SAFETY: the pointers and lengths describe live &strs the host only reads.
    unsafe {
        match value {
            Some(v) => {
                proxy_replace_header_map_value(map_type, name.as_ptr(), name.len(), v.as_ptr(), v.len())
            }
            None => proxy_remove_header_map_value(map_type, name.as_ptr(), name.len()),
        }
    }
}

#[link(wasm_import_module = "env")]
extern "C" {
    fn proxy_set_property(
        path_data: *const u8,
        path_size: usize,
        value_data: *const u8,
        value_size: usize,
    ) -> u32;
}

/// Sets a property of the current stream (Envoy: the filter-state object `wasm.<path>`); the
/// host's status. Through the raw ABI: the SDK's wrapper panics on any status but Ok.
pub fn set_property(path: &str, value: &[u8]) -> u32 {
    // SAFETY: the pointers and lengths describe live slices the host only reads.
    unsafe { proxy_set_property(path.as_ptr(), path.len(), value.as_ptr(), value.len()) }
}

/// `MapType::HttpRequestHeaders` and `HttpResponseHeaders` of the ABI.
pub const REQUEST_HEADERS: u32 = 0;
pub const RESPONSE_HEADERS: u32 = 2;

/// Takes ownership of what the host wrote: it allocated `size` bytes through the module's
/// exported allocator (`proxy_on_memory_allocate`, the SDK's `Vec` allocation), as the SDK
/// itself assumes.
fn take(status: u32, data: *mut u8, size: usize) -> Option<Vec<u8>> {
    if status != STATUS_OK {
        return None;
    }
    if data.is_null() {
        return Some(Vec::new());
    }
    // SAFETY: on Ok the host returned a buffer of exactly `size` bytes allocated by this
    // module's allocator, which it hands over to us (the SDK does the same).
    Some(unsafe { Vec::from_raw_parts(data, size, size) })
}

pub fn call_response_header(name: &str) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the key pointer and length describe a live &str; the out-pointers are valid
    // locals the host writes to.
    let status = unsafe {
        proxy_get_header_map_value(
            CALL_RESPONSE_HEADERS,
            name.as_ptr(),
            name.len(),
            &mut data,
            &mut size,
        )
    };
    take(status, data, size)
}

pub const STATUS_CAS_MISMATCH: u32 = 8;

#[link(wasm_import_module = "env")]
extern "C" {
    #[link_name = "proxy_get_shared_data"]
    fn get_shared_data_raw(
        key_data: *const u8,
        key_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
        return_cas: *mut u32,
    ) -> u32;
    #[link_name = "proxy_set_shared_data"]
    fn set_shared_data_raw(
        key_data: *const u8,
        key_size: usize,
        value_data: *const u8,
        value_size: usize,
        cas: u32,
    ) -> u32;
    #[link_name = "proxy_get_current_time_nanoseconds"]
    fn get_current_time_raw(return_time: *mut u64) -> u32;
    #[link_name = "proxy_set_tick_period_milliseconds"]
    fn set_tick_period_raw(period: u32) -> u32;
}

/// A shared-data value and its CAS, if the host has the key (any other answer: none).
pub fn get_shared_data(key: &str) -> Option<(Vec<u8>, u32)> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    let mut cas: u32 = 0;
    // SAFETY: the key pointer and length describe a live &str; the out-pointers are valid
    // locals the host writes to.
    let status = unsafe { get_shared_data_raw(key.as_ptr(), key.len(), &mut data, &mut size, &mut cas) };
    take(status, data, size).map(|value| (value, cas))
}

/// Sets a shared-data value; the host's status as it came.
pub fn set_shared_data(key: &str, value: &[u8], cas: u32) -> u32 {
    // SAFETY: both pointers and lengths describe live slices the host only reads.
    unsafe { set_shared_data_raw(key.as_ptr(), key.len(), value.as_ptr(), value.len(), cas) }
}

/// Whether the host answers the proxy's clock with Unimplemented (12): APISIX's
/// wasm-nginx-module does (`ngx_http_wasm_api.c`, proxy_get_current_time_nanoseconds), Kong and
/// Envoy answer it. Neither traps.
pub fn clock_unimplemented() -> bool {
    let mut time: u64 = 0;
    // SAFETY: the out-pointer is a valid local the host writes 8 bytes to.
    unsafe { get_current_time_raw(&mut time) == STATUS_UNIMPLEMENTED }
}

const STATUS_UNIMPLEMENTED: u32 = 12;

/// The proxy's clock in ns, `None` where it has none.
pub fn proxy_time_ns() -> Option<u64> {
    let mut time: u64 = 0;
    // SAFETY: the out-pointer is a valid local the host writes 8 bytes to.
    let status = unsafe { get_current_time_raw(&mut time) };
    (status == STATUS_OK).then_some(time)
}

/// Asks for timer ticks every `ms`; whether the host took it.
pub fn set_tick_period_ms(ms: u64) -> bool {
    // SAFETY: a plain value argument.
    unsafe { set_tick_period_raw(u32::try_from(ms).unwrap_or(u32::MAX)) == STATUS_OK }
}

#[link(wasm_import_module = "wasi_snapshot_preview1")]
extern "C" {
    fn clock_time_get(id: u32, precision: u64, time: *mut u64) -> u16;
}

/// WASI's realtime clock in ns (`None` if the host refuses), without std's panic on error.
pub fn wasi_realtime_ns() -> Option<u64> {
    const REALTIME: u32 = 0;
    let mut time: u64 = 0;
    // SAFETY: the out-pointer is a valid local the host writes 8 bytes to.
    let errno = unsafe { clock_time_get(REALTIME, 1_000_000, &mut time) };
    (errno == 0).then_some(time)
}

#[link(wasm_import_module = "env")]
extern "C" {
    #[link_name = "proxy_get_property"]
    fn get_property_raw(
        path_data: *const u8,
        path_size: usize,
        return_value_data: *mut *mut u8,
        return_value_size: *mut usize,
    ) -> u32;
}

/// Whether the host answers the property at `path` (NUL-separated segments) with Ok. Any
/// other status, including ones the SDK's `Status` does not know, is "no": the SDK's own
/// wrapper panics on some of them (BadArgument on APISIX, InternalFailure through
/// `Context::get_property` on Kong).
pub fn property_answered(path: &[u8]) -> bool {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the path pointer and length describe a live slice; the out-pointers are valid
    // locals the host writes to.
    let status = unsafe { get_property_raw(path.as_ptr(), path.len(), &mut data, &mut size) };
    // Any buffer the host handed over is freed by `take`.
    take(status, data, size).is_some()
}

pub fn call_response_body(max: usize) -> Option<Vec<u8>> {
    let mut data: *mut u8 = null_mut();
    let mut size: usize = 0;
    // SAFETY: the out-pointers are valid locals the host writes to.
    let status = unsafe { proxy_get_buffer_bytes(CALL_RESPONSE_BODY, 0, max, &mut data, &mut size) };
    take(status, data, size)
}
