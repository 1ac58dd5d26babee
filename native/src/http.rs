//! The HTTP filter's hooks: a stream's object, its request and response, its end, and the
//! answers and wake-ups it gets.

use super::*;

/// The per-stream object Envoy hands back to every hook of the stream.
pub(crate) struct Stream {
    pub(crate) config: *const FilterConfig,
    pub(crate) ctx: u32,
    /// Whether the response passed this filter (a local reply does not).
    pub(crate) responded: std::cell::Cell<bool>,
    /// Whether the ticker wakes this stream's worker (it paused).
    pub(crate) watched: std::cell::Cell<bool>,
}

impl Stream {
    pub(crate) fn key(&self) -> usize {
        self as *const Stream as usize
    }

    pub(crate) fn config(&self) -> &FilterConfig {
        // SAFETY: the configuration outlives its streams (each holds a reference in Envoy).
        unsafe { &*self.config }
    }

    pub(crate) fn ticking(&self) -> &Ticking {
        &self.config().ticking
    }

    /// The request paused: until its stream goes, the ticker wakes its worker.
    pub(crate) fn watch(&self, filter: EnvoyFilter) {
        if self.watched.get() {
            return;
        }
        if let Some(scheduler) = abi::Scheduler::for_stream(filter) {
            if let Ok(mut m) = self.ticking().paused.lock() {
                m.insert(self.key(), Arc::new(scheduler));
                self.watched.set(true);
            }
        }
    }

    pub(crate) fn unwatch(&self) {
        if self.watched.get() {
            if let Ok(mut m) = self.ticking().paused.lock() {
                m.remove(&self.key());
            }
        }
    }
}

/// # Safety
/// `config` is this module's configuration pointer; `filter` a live stream of this worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_new(
    config: *const c_void,
    filter: *mut c_void,
) -> *const c_void {
    guard("filter_new", std::ptr::null(), || {
        if config.is_null() {
            return std::ptr::null();
        }
        // SAFETY: the configuration outlives its streams (each holds a reference in Envoy).
        let cfg = unsafe { &*(config as *const FilterConfig) };
        let ctx = with_worker(cfg, |w| {
            let mut ctx = w.host.next_ctx;
            loop {
                // Skip the root's id and any still in use (after a wrap).
                ctx = ctx.wrapping_add(1).max(ROOT + 1);
                if !w.host.streams.contains_key(&ctx) {
                    break;
                }
            }
            w.host.next_ctx = ctx;
            w.host.streams.insert(ctx, EnvoyFilter(filter));
            ctx
        });
        let Some(ctx) = ctx else {
            return std::ptr::null();
        };
        let stream = Stream {
            config: cfg,
            ctx,
            responded: std::cell::Cell::new(false),
            watched: std::cell::Cell::new(false),
        };
        Box::into_raw(Box::new(stream)) as *const c_void
    })
}

/// The stream behind a module pointer.
///
/// # Safety
/// `module` is a pointer this module returned from `filter_new` and not yet destroyed.
pub(crate) unsafe fn stream<'a>(module: *const c_void) -> Option<&'a Stream> {
    // SAFETY: the caller's guarantee; null is checked.
    (!module.is_null()).then(|| unsafe { &*(module as *const Stream) })
}

/// # Safety
/// Envoy's stream and this module's stream pointer, on the stream's worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_request_headers(
    filter: *mut c_void,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    let refuse = |outcome: Outcome, text: &str| {
        send_reply(EnvoyFilter(filter), &Reply::refuse(outcome, text, ""));
        abi::STOP_ALL_ITERATION_AND_WATERMARK
    };
    // `Err`: the gateway panicked (its own fault: 500); `None`: its state was busy (503).
    let result = guard("request_headers", Some(Err(())), || {
        // SAFETY: Envoy passes back the pointer filter_new returned.
        let s = unsafe { stream(module) }?;
        let cfg = s.config();
        let ctx = s.ctx;
        let f = EnvoyFilter(filter);
        with_worker(cfg, |w| {
            let Worker { gateway, host } = w;
            host.at(Some(f), ctx);
            // The timer's work first, when due: the request then sees what it brought (a key
            // set another worker or the main thread fetched).
            tick_if_due(gateway, host);
            host.at(Some(f), ctx);
            let action = gateway.on_request_headers(ctx, &mut NativeHost { state: host });
            gateway.flush_counters(&mut NativeHost { state: host });
            if action == Action::Pause {
                // Waiting for a call: the ticker wakes this worker while it waits (the answers
                // the main thread relayed reach it then). Done here, before Envoy is told
                // anything: a reply can end (and free) the stream at once.
                s.watch(f);
            }
            Ok(action)
        })
    });
    // Nothing of the stream is touched from here on: carrying out a reply may have freed it.
    match result {
        Some(Ok(Action::Continue)) => abi::CONTINUE,
        // Stop everything, the body included, until the gateway resumes the request: a body
        // chunk must not send a paused request upstream (Envoy runs the body hooks after a
        // plain StopIteration, and a Continue there would forward the headers).
        Some(Ok(Action::Pause | Action::Replied)) => abi::STOP_ALL_ITERATION_AND_WATERMARK,
        Some(Err(())) => refuse(Outcome::Internal, message::INTERNAL),
        None => refuse(Outcome::Busy, message::BUSY),
    }
}

/// The worker's timer work, when due (its calls go out on the main thread, see `dispatch`).
pub(crate) fn tick_if_due(gateway: &mut Gateway, host: &mut HostState) {
    let now = now_ms();
    if now.saturating_sub(host.last_tick_ms) < host.tick_period_ms {
        return;
    }
    host.last_tick_ms = now;
    host.at(None, ROOT);
    gateway.on_tick(ROOT, &mut NativeHost { state: host });
    gateway.flush_counters(&mut NativeHost { state: host });
}

/// # Safety
/// Envoy's stream and this module's stream pointer, on the stream's worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_response_headers(
    filter: *mut c_void,
    module: *const c_void,
    _end_of_stream: bool,
) -> u32 {
    guard("response_headers", (), || {
        // SAFETY: Envoy passes back the pointer filter_new returned.
        let Some(s) = (unsafe { stream(module) }) else {
            return;
        };
        let cfg = s.config();
        let ctx = s.ctx;
        s.responded.set(true);
        with_worker(cfg, |w| {
            let Worker { gateway, host } = w;
            host.at(Some(EnvoyFilter(filter)), ctx);
            gateway.on_response_headers(ctx, &mut NativeHost { state: host });
        });
    });
    abi::CONTINUE
}

/// # Safety
/// Envoy's stream and this module's stream pointer, on the stream's worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_stream_complete(
    filter: *mut c_void,
    module: *const c_void,
) {
    guard("stream_complete", (), || {
        // SAFETY: Envoy passes back the pointer filter_new returned.
        let Some(s) = (unsafe { stream(module) }) else {
            return;
        };
        let cfg = s.config();
        let ctx = s.ctx;
        let responded = s.responded.get();
        with_worker(cfg, |w| {
            let Worker { gateway, host } = w;
            host.at(Some(EnvoyFilter(filter)), ctx);
            if !responded {
                // A local reply (the gateway's own or Envoy's): its status, as proxy-wasm
                // reports it in the response headers.
                gateway.on_response_headers(ctx, &mut NativeHost { state: host });
            }
            gateway.on_log(ctx, &mut NativeHost { state: host });
            gateway.flush_counters(&mut NativeHost { state: host });
            // Records go to the main thread's gateway, which writes them on its timer.
            let records = gateway.take_stored_records();
            if !records.is_empty() {
                // Bounded until the main thread takes them (which applies the store's buffer
                // bounds and counts drops).
                let cap = gateway
                    .config()
                    .logs
                    .store
                    .as_ref()
                    .map_or(0, |st| st.buffer as usize)
                    * 4;
                let mut dropped = [0u64; RECORD_CLASSES];
                if let Ok(mut r) = cfg.ticking.records.lock() {
                    r.extend(records);
                    // The lowest class first, as in the gateway's own buffer.
                    dropped = bound_records(&mut r, cap);
                }
                gateway.count_dropped_records(&dropped);
                gateway.flush_counters(&mut NativeHost { state: host });
            }
        });
    });
}

/// # Safety
/// This module's stream pointer, destroyed once; Envoy cancels the stream's callouts after.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_destroy(module: *const c_void) {
    guard("filter_destroy", (), || {
        if module.is_null() {
            return;
        }
        // SAFETY: created by Box::into_raw in filter_new; destroyed once.
        let s = unsafe { Box::from_raw(module as *mut Stream) };
        s.unwatch();
        let cfg = s.config();
        let ctx = s.ctx;
        // The gateway is never in use here: Envoy destroys a stream only after the hook that
        // ended it returned (a reply or a resume is carried out after the gateway returns).
        let _ = with_worker(cfg, |w| forget_stream(w, ctx));
    });
}

/// # Safety
/// Envoy's stream, this module's stream pointer, and the answer's buffers valid during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_http_callout_done(
    _filter: *mut c_void,
    module: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    guard("callout_done", (), || {
        // SAFETY: Envoy passes back the pointer filter_new returned.
        let Some(s) = (unsafe { stream(module) }) else {
            return;
        };
        let answer = if result == abi::CALLOUT_RESULT_SUCCESS {
            // SAFETY: the buffers Envoy passed to this hook.
            unsafe { abi::callout_answer(headers, headers_size, chunks, chunks_size) }
        } else {
            (None, Vec::new())
        };
        deliver_answer(s.config().generation, s.ctx, callout_id, answer);
    });
}

/// The ticker's event for a paused request: its worker's timer work, when due.
///
/// # Safety
/// Envoy's stream and this module's stream pointer, on the stream's worker.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_scheduled(
    _: *mut c_void,
    module: *const c_void,
    _: u64,
) {
    guard("scheduled", (), || {
        // SAFETY: Envoy passes back the pointer filter_new returned.
        let Some(s) = (unsafe { stream(module) }) else {
            return;
        };
        with_worker(s.config(), |w| {
            let Worker { gateway, host } = w;
            tick_if_due(gateway, host);
        });
    });
}

// The remaining hooks: nothing for the gateway to do. Envoy requires every one of them.

noop_hooks! {
    envoy_dynamic_module_on_http_filter_request_body(*mut c_void, *const c_void, bool) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_http_filter_request_trailers(*mut c_void, *const c_void) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_http_filter_response_body(*mut c_void, *const c_void, bool) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_http_filter_response_trailers(*mut c_void, *const c_void) -> u32 = abi::CONTINUE;
    envoy_dynamic_module_on_http_filter_http_stream_headers(*mut c_void, *const c_void, u64, *const EnvoyHeader, usize, bool);
    envoy_dynamic_module_on_http_filter_http_stream_data(*mut c_void, *const c_void, u64, *const EnvoyBuffer, usize, bool);
    envoy_dynamic_module_on_http_filter_http_stream_trailers(*mut c_void, *const c_void, u64, *const EnvoyHeader, usize);
    envoy_dynamic_module_on_http_filter_http_stream_complete(*mut c_void, *const c_void, u64);
    envoy_dynamic_module_on_http_filter_http_stream_reset(*mut c_void, *const c_void, u64, u32);
    envoy_dynamic_module_on_http_filter_downstream_above_write_buffer_high_watermark(*mut c_void, *const c_void);
    envoy_dynamic_module_on_http_filter_downstream_below_write_buffer_low_watermark(*mut c_void, *const c_void);
    envoy_dynamic_module_on_http_filter_per_route_config_destroy(*const c_void);
}
