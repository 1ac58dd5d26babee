//! Running this worker's gateway: built on first use, entered once at a time, and what it
//! decided carried out after it returns (see [`Deferred`]: nothing it calls during a hook
//! re-enters the module, so no event has to wait for the gateway).

use super::*;

// ---------------------------------------------------------------------------------------------
// Running the gateway of this worker.

/// This worker's gateway for `config`, built on first use (then the gateways of configurations
/// Envoy no longer holds go).
pub(crate) fn worker_for<'a>(
    workers: &'a mut HashMap<u64, Worker>,
    config: &FilterConfig,
) -> Result<&'a mut Worker, String> {
    if !workers.contains_key(&config.generation) {
        let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
        workers.retain(|generation, _| live.contains(generation));
        // A configuration that cannot be built (an SDS secret not usable yet) is tried again
        // at most every BUILD_RETRY_MS, not compiled on every request meanwhile.
        let now = now_ms();
        let recent = BUILD_FAILED.with(|f| {
            let mut f = f.borrow_mut();
            f.retain(|generation, _| live.contains(generation));
            f.get(&config.generation).cloned()
        });
        if let Some((_, why)) = recent.filter(|(at, _)| now.saturating_sub(*at) < BUILD_RETRY_MS) {
            return Err(why);
        }
        let worker = build_worker(config).inspect_err(|why| {
            BUILD_FAILED.with(|f| f.borrow_mut().insert(config.generation, (now, why.clone())));
        })?;
        workers.insert(config.generation, worker);
    }
    workers
        .get_mut(&config.generation)
        .ok_or_else(|| "worker state missing".to_string())
}

/// How soon a configuration that could not be built on this worker is tried again.
const BUILD_RETRY_MS: u64 = 1000;

thread_local! {
    /// When, and why, this worker last failed to build a configuration's gateway.
    static BUILD_FAILED: RefCell<HashMap<u64, (u64, String)>> = RefCell::new(HashMap::new());
}

pub(crate) fn build_worker(config: &FilterConfig) -> Result<Worker, String> {
    let observed = config.secrets.values();
    let (cfg, used) = config
        .secrets
        .resolve(&config.json, &observed)
        .map_err(|e| format!("invalid configuration: {e}"))?;
    let mut host = HostState::new(Arc::clone(&config.metrics), Arc::clone(&config.ticking));
    host.secrets_seen = observed;
    host.secrets_running = used;
    host.reroute_on_write = cfg.routing_headers.is_none();
    let mut gateway = Gateway::new(cfg, &mut NativeHost { state: &mut host })?;
    // Records go to the main thread's gateway, which summarises refusals on its timer.
    gateway.hand_over_records();
    host.tick_period_ms = gateway.tick_period_ms();
    // Timers: see [`Ticking`].
    gateway.started(true, &mut NativeHost { state: &mut host })?;
    host.last_tick_ms = now_ms();
    Ok(Worker { gateway, host })
}

/// Runs `f` on this worker's gateway, then carries out what it decided. `None` when the gateway
/// cannot be built, or is in use: a hook re-entered from inside another, which the deferral
/// rules out (the event is then logged and dropped, never run on a gateway in use).
pub(crate) fn with_worker<R>(config: &FilterConfig, f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
    let (result, deferred) = WORKERS.with(|cell| {
        let Ok(mut workers) = cell.try_borrow_mut() else {
            abi::log(
                4,
                "gateway filter: a hook re-entered the module while its gateway was in use: event dropped",
            );
            return (None, Vec::new());
        };
        let worker = match worker_for(&mut workers, config) {
            Ok(w) => w,
            Err(e) => {
                abi::log(4, &format!("gateway filter: {e}"));
                return (None, Vec::new());
            }
        };
        // Left over only if an earlier hook panicked: those streams may be gone now.
        worker.host.deferred.clear();
        secrets::refresh(worker, config);
        let Worker { gateway, host } = &mut *worker;
        take_inbox(gateway, host);
        let result = f(worker);
        (Some(result), std::mem::take(&mut worker.host.deferred))
    });
    carry_out(deferred);
    result
}

/// Tells Envoy what the gateway decided, now that it is no longer in use.
pub(crate) fn carry_out(deferred: Vec<Deferred>) {
    for d in deferred {
        match d {
            Deferred::ClearRoute(filter) => abi::clear_route_cache(filter),
            Deferred::Reply(filter, reply) => send_reply(filter, &reply),
            Deferred::Resume(filter) => abi::continue_decoding(filter),
        }
    }
}

pub(crate) fn send_reply(filter: EnvoyFilter, reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    abi::send_response(
        filter,
        reply.status(),
        &headers,
        reply.body.as_bytes(),
        reply.outcome.decision(),
    );
}

/// A stream is gone: the gateway forgets it and its calls (Envoy cancelled them).
pub(crate) fn forget_stream(w: &mut Worker, ctx: u32) {
    let Worker { gateway, host } = w;
    host.streams.remove(&ctx);
    // A wait the stream never saw the end of: its span ends with it.
    if let Some(open) = host.spans.remove(&ctx) {
        abi::finish_child(open, &[("gateway.ended", "stream gone")]);
    }
    host.at(None, ctx);
    // Envoy cancelled the stream's calls (only requests' own: the root's never ride on one).
    host.calls.retain(|(owner, _), _| *owner != ctx);
    gateway.on_done(ctx, &mut NativeHost { state: host });
}

/// Hands a callout's answer to the gateway (as proxy-wasm's `on_http_call_response`).
pub(crate) fn deliver_answer(generation: u64, ctx: u32, callout: u64, answer: (Option<u16>, Vec<u8>)) {
    let deferred = WORKERS.with(|cell| {
        let Ok(mut workers) = cell.try_borrow_mut() else {
            abi::log(4, "gateway filter: a callout answer re-entered the module while its gateway was in use: dropped");
            return Vec::new();
        };
        let Some(worker) = workers.get_mut(&generation) else {
            return Vec::new();
        };
        let Some(token) = worker.host.calls.remove(&(ctx, callout)) else {
            return Vec::new();
        };
        let Worker { gateway, host } = worker;
        let size = answer.1.len();
        host.answer = answer;
        let stream = host.streams.get(&ctx).copied();
        host.at(stream, ctx);
        gateway.on_call_response(ctx, token, size, &mut NativeHost { state: host });
        gateway.flush_counters(&mut NativeHost { state: host });
        std::mem::take(&mut host.deferred)
    });
    carry_out(deferred);
}
