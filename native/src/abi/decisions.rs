//! What the gateway decided, for the rest of Envoy: dynamic metadata on the stream (RBAC's
//! `sourced_metadata`, `%DYNAMIC_METADATA(gateway:...)%`), and child spans of the stream's
//! active span under Envoy's tracing. Declared from `abi.h` (the callbacks Envoy 1.40 exports;
//! `abi_impl.cc`: metadata goes to `dynamicMetadata().filter_metadata[ns]`, a list key appends;
//! a child span is the module's until `child_span_finish`, which finishes and frees it).

use super::*;

extern "C" {
    fn envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
        filter: *mut c_void,
        ns: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_add_dynamic_metadata_list_string(
        filter: *mut c_void,
        ns: ModuleBuffer,
        key: ModuleBuffer,
        value: ModuleBuffer,
    ) -> bool;
    fn envoy_dynamic_module_callback_http_get_active_span(filter: *mut c_void) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_span_spawn_child(
        filter: *mut c_void,
        span: *mut c_void,
        operation_name: ModuleBuffer,
    ) -> *mut c_void;
    fn envoy_dynamic_module_callback_http_span_set_tag(
        span: *mut c_void,
        key: ModuleBuffer,
        value: ModuleBuffer,
    );
    fn envoy_dynamic_module_callback_http_child_span_finish(span: *mut c_void);
}

/// Sets `ns.key` of the stream's dynamic metadata to a string.
pub fn set_metadata(filter: EnvoyFilter, ns: &str, key: &str, value: &str) {
    // SAFETY: a live stream pointer in one of its hooks; the buffers live for the call.
    unsafe {
        envoy_dynamic_module_callback_http_set_dynamic_metadata_string(
            filter.0,
            ModuleBuffer::of(ns.as_bytes()),
            ModuleBuffer::of(key.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        )
    }
}

/// Appends a string to the list `ns.key` of the stream's dynamic metadata.
pub fn add_metadata_list(filter: EnvoyFilter, ns: &str, key: &str, value: &str) -> bool {
    // SAFETY: as set_metadata.
    unsafe {
        envoy_dynamic_module_callback_http_add_dynamic_metadata_list_string(
            filter.0,
            ModuleBuffer::of(ns.as_bytes()),
            ModuleBuffer::of(key.as_bytes()),
            ModuleBuffer::of(value.as_bytes()),
        )
    }
}

/// A child span the module owns (finish it exactly once, on the stream's worker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChildSpan(*mut c_void);

/// A child of the stream's active span, named `name`; `None` without tracing (Envoy's null
/// span) or when Envoy made none.
pub fn spawn_child(filter: EnvoyFilter, name: &str) -> Option<ChildSpan> {
    // SAFETY: a live stream pointer in one of its hooks; the active span is Envoy's, only
    // passed back.
    let active = unsafe { envoy_dynamic_module_callback_http_get_active_span(filter.0) };
    if active.is_null() {
        return None;
    }
    // SAFETY: as above; the name lives for the call.
    let child = unsafe {
        envoy_dynamic_module_callback_http_span_spawn_child(
            filter.0,
            active,
            ModuleBuffer::of(name.as_bytes()),
        )
    };
    (!child.is_null()).then_some(ChildSpan(child))
}

/// Tags a child span and finishes it (Envoy frees it).
pub fn finish_child(span: ChildSpan, tags: &[(&str, &str)]) {
    for (k, v) in tags {
        // SAFETY: a child span this module owns and has not finished.
        unsafe {
            envoy_dynamic_module_callback_http_span_set_tag(
                span.0,
                ModuleBuffer::of(k.as_bytes()),
                ModuleBuffer::of(v.as_bytes()),
            )
        }
    }
    // SAFETY: finished once: the caller gives up the pointer.
    unsafe { envoy_dynamic_module_callback_http_child_span_finish(span.0) }
}
