//! The configuration Envoy shares with every worker: its registry (generations still live),
//! its hooks, and the ticker thread that gives it a timer.

use super::*;

// ---------------------------------------------------------------------------------------------
// The configuration Envoy shares with every worker.

pub(crate) static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Configurations Envoy still holds: a worker drops its gateways of the others (after a
/// configuration change) when it builds a new one.
pub(crate) static LIVE: LazyLock<Mutex<std::collections::HashSet<u64>>> = LazyLock::new(Mutex::default);

/// The module's configuration object: the filter's JSON and the metrics defined for it.
pub(crate) struct FilterConfig {
    /// Tells this configuration's gateways apart from another's (after a reload both live).
    pub(crate) generation: u64,
    pub(crate) json: Vec<u8>,
    /// `secret_sds`: its subscriptions (see [`Secrets`]).
    pub(crate) secrets: Secrets,
    pub(crate) metrics: Arc<MetricTable>,
    pub(crate) ticking: Arc<Ticking>,
}

/// The configuration's timer: Envoy offers HTTP filters no timer, only schedulers that post an
/// event to a thread at once. A thread of the module (the ticker) commits, every tick period,
/// one event to the configuration's scheduler (Envoy's main thread runs the timer's work of a
/// gateway there: log flush, limit sync, key refresh, with configuration-level callouts) and
/// one to the scheduler of every paused request (its worker runs its own gateway's timer work:
/// waking requests that wait for keys, new lookups for waiters whose lookup lost its owner).
pub(crate) struct Ticking {
    pub(crate) stop: AtomicBool,
    /// Schedulers of requests that paused, by stream key, until their stream goes.
    pub(crate) paused: Mutex<HashMap<usize, Arc<abi::Scheduler>>>,
    /// Records the workers gathered for the store; the main thread's gateway writes them.
    pub(crate) records: Mutex<Vec<StoredRecord>>,
    /// The workers' root calls (key fetches, the limit sync, lookups for orphaned waiters),
    /// which the main thread sends as the configuration's.
    pub(crate) relay: Mutex<Vec<RelayedCall>>,
}

/// The ticker's events for the main thread: the period's (the timer's work), and an early one
/// while the workers' records wait.
pub(crate) const TICK_EVENT: u64 = 0;
pub(crate) const RECORDS_EVENT: u64 = 1;

/// # Safety
/// Envoy passes its configuration pointer and buffers valid for this call (main thread).
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_new(
    envoy: *mut c_void,
    _name: EnvoyBuffer,
    config: EnvoyBuffer,
) -> *const c_void {
    guard("config_new", std::ptr::null(), || {
        let json = abi::hook_bytes(config);
        let secrets = match Secrets::subscribe(EnvoyConfig(envoy), &json) {
            Ok(s) => s,
            Err(e) => {
                abi::log(4, &format!("gateway filter: invalid configuration: {e}"));
                return std::ptr::null();
            }
        };
        // Values SDS has delivered already become the last good ones (see `Secrets`).
        let values = secrets.values();
        if !secrets.is_empty() {
            let _ = secrets.resolve(&json, &values);
        }
        let cfg = match secrets.compile(&json, &values, true) {
            Ok(c) => c,
            Err(e) => {
                abi::log(4, &format!("gateway filter: invalid configuration: {e}"));
                return std::ptr::null();
            }
        };
        // A gateway built here defines every metric (allowed only now), then is dropped.
        let mut host = DefiningHost {
            table: MetricTable::new(EnvoyConfig(envoy)),
        };
        // The families the gateway names only at run time, then everything it defines at start.
        for (family, labels) in stat::FAMILIES {
            let example: Vec<(&str, &str)> = labels.iter().map(|l| (*l, "")).collect();
            if !host.table.declare(false, &stat::name(family, &example)) {
                abi::log(4, &format!("gateway filter: cannot declare metric {family}"));
                return std::ptr::null();
            }
        }
        let tick_ms = match Gateway::new(cfg, &mut host) {
            Ok(g) => g.tick_period_ms(),
            Err(e) => {
                abi::log(4, &format!("gateway filter: {e}"));
                return std::ptr::null();
            }
        };
        abi::log(
            2,
            &format!(
                "gateway filter {} (native) configured: {} metric families",
                env!("CARGO_PKG_VERSION"),
                host.table.families.len()
            ),
        );
        let ticking = Arc::new(Ticking {
            stop: AtomicBool::new(false),
            paused: Mutex::new(HashMap::new()),
            records: Mutex::new(Vec::new()),
            relay: Mutex::new(Vec::new()),
        });
        if let Err(e) = start_ticker(EnvoyConfig(envoy), Arc::clone(&ticking), tick_ms) {
            abi::log(4, &format!("gateway filter: cannot start its timer: {e}"));
            return std::ptr::null();
        }
        let generation = GENERATIONS.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut live) = LIVE.lock() {
            live.insert(generation);
        }
        let config = FilterConfig {
            generation,
            json,
            secrets,
            metrics: Arc::new(host.table),
            ticking,
        };
        Box::into_raw(Box::new(config)) as *const c_void
    })
}

/// The ticker thread (see [`Ticking`]); it stops when the configuration goes, and deletes the
/// configuration's scheduler itself (Envoy allows that from any thread).
pub(crate) fn start_ticker(envoy: EnvoyConfig, ticking: Arc<Ticking>, tick_ms: u64) -> Result<(), String> {
    let scheduler = abi::Scheduler::for_config(envoy).ok_or("no scheduler")?;
    let period = std::time::Duration::from_millis(tick_ms.clamp(50, 60_000));
    std::thread::Builder::new()
        .name("gateway-ticker".into())
        .spawn(move || {
            // The main thread is woken every period, and sooner (every 100 ms) while the
            // workers' records wait for it: a busy gateway's records do not sit out a period.
            let step = std::time::Duration::from_millis(100);
            let mut next = std::time::Instant::now() + period;
            while !ticking.stop.load(Ordering::Relaxed) {
                let now = std::time::Instant::now();
                std::thread::sleep(next.saturating_duration_since(now).min(step));
                if ticking.stop.load(Ordering::Relaxed) {
                    break;
                }
                let due = std::time::Instant::now() >= next;
                let waiting = ticking.records.lock().map(|r| !r.is_empty()).unwrap_or(false);
                if !due {
                    if waiting {
                        scheduler.commit(RECORDS_EVENT); // only the main thread, for the records
                    }
                    continue;
                }
                scheduler.commit(TICK_EVENT);
                // The next period from this one, or from now when the thread fell behind.
                next = (next + period).max(std::time::Instant::now());
                let paused: Vec<Arc<abi::Scheduler>> = ticking
                    .paused
                    .lock()
                    .map(|m| m.values().cloned().collect())
                    .unwrap_or_default();
                for s in paused {
                    s.commit(0);
                }
            }
        })
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// # Safety
/// `config` is a pointer this module returned from `config_new`, destroyed once.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_destroy(config: *const c_void) {
    guard("config_destroy", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: created by Box::into_raw in config_new; Envoy destroys it once, after its
        // last stream.
        let config = unsafe { Box::from_raw(config as *mut FilterConfig) };
        config.ticking.stop.store(true, Ordering::Relaxed);
        let generation = config.generation;
        if let Ok(mut live) = LIVE.lock() {
            live.remove(&generation);
        }
        // This thread's gateway for it goes now (its last counts handed over first); other
        // workers' go with their threads.
        WORKERS.with(|cell| {
            if let Ok(mut w) = cell.try_borrow_mut() {
                if let Some(Worker { gateway, host }) = w.get_mut(&generation) {
                    gateway.flush_counters(&mut NativeHost { state: host });
                }
                w.remove(&generation);
            }
        });
        // What every worker counted since the last tick: Envoy destroys the configuration's
        // stats scope only after this hook (filter_config.cc, the destructor's first call).
        config.metrics.hand_over();
    })
}

/// The ticker's event for the configuration, on Envoy's main thread: the timer's work of the
/// main thread's gateway (it writes the records the workers gathered), with
/// configuration-level callouts.
///
/// # Safety
/// Envoy's configuration pointer and this module's, on the main thread.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_scheduled(
    envoy: *mut c_void,
    config: *const c_void,
    event: u64,
) {
    guard("config_scheduled", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: the configuration pointer this module returned; alive until config_destroy,
        // after which Envoy delivers no event.
        let cfg = unsafe { &*(config as *const FilterConfig) };
        with_worker(cfg, |w| {
            let Worker { gateway, host } = w;
            host.main = Some(EnvoyConfig(envoy));
            host.at(None, ROOT);
            // What the buffer takes now; the rest go back to the front of the hand-over queue
            // (bounded where the workers fill it) for the next wake-up.
            let records: Vec<StoredRecord> = cfg
                .ticking
                .records
                .lock()
                .map(|mut r| std::mem::take(&mut *r))
                .unwrap_or_default();
            let left = gateway.add_stored_records(records, &mut NativeHost { state: host });
            if !left.is_empty() {
                if let Ok(mut r) = cfg.ticking.records.lock() {
                    let newer = std::mem::replace(&mut *r, left);
                    r.extend(newer);
                }
            }
            let relay = cfg
                .ticking
                .relay
                .lock()
                .map(|mut q| std::mem::take(&mut *q))
                .unwrap_or_default();
            for r in relay {
                match r.call.send(abi::CalloutOwner::Config(EnvoyConfig(envoy))) {
                    Ok(id) => {
                        host.relayed.insert(id, (r.inbox, r.token));
                    }
                    Err(_) => {
                        if let Ok(mut q) = r.inbox.lock() {
                            q.push((r.token, (None, Vec::new())));
                        }
                    }
                }
            }
            // The timer's work on the period's event only (the early ones are for the records).
            if event == TICK_EVENT {
                gateway.on_tick(ROOT, &mut NativeHost { state: host });
                gateway.flush_counters(&mut NativeHost { state: host });
            }
        });
        // Every worker's counts since the last tick, to Envoy at once (also when this thread's
        // gateway could not run).
        if event == TICK_EVENT {
            cfg.metrics.hand_over();
        }
    });
}

/// The answer of a configuration-level callout, on the main thread.
///
/// # Safety
/// Envoy's pointers, and the answer's buffers valid during the call.
#[no_mangle]
#[allow(clippy::too_many_arguments)]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_config_http_callout_done(
    _envoy: *mut c_void,
    config: *const c_void,
    callout_id: u64,
    result: u32,
    headers: *const EnvoyHeader,
    headers_size: usize,
    chunks: *const EnvoyBuffer,
    chunks_size: usize,
) {
    guard("config_callout_done", (), || {
        if config.is_null() {
            return;
        }
        // SAFETY: the configuration pointer this module returned, alive (see above).
        let cfg = unsafe { &*(config as *const FilterConfig) };
        let answer = if result == abi::CALLOUT_RESULT_SUCCESS {
            // SAFETY: the buffers Envoy passed to this hook.
            unsafe { abi::callout_answer(headers, headers_size, chunks, chunks_size) }
        } else {
            (None, Vec::new())
        };
        // A worker's call goes back to its inbox; the main thread's own to its gateway.
        let relayed = WORKERS.with(|cell| {
            cell.try_borrow_mut().ok().and_then(|mut w| {
                w.get_mut(&cfg.generation)
                    .and_then(|w| w.host.relayed.remove(&callout_id))
            })
        });
        match relayed {
            Some((inbox, token)) => {
                if let Ok(mut q) = inbox.lock() {
                    q.push((token, answer));
                }
            }
            None => deliver_answer(cfg.generation, ROOT, callout_id, answer),
        }
    });
}

/// # Safety
/// Called by Envoy with its own buffers; nothing is kept.
#[no_mangle]
pub unsafe extern "C" fn envoy_dynamic_module_on_http_filter_per_route_config_new(
    _: EnvoyBuffer,
    _: EnvoyBuffer,
) -> *const c_void {
    // No per-route configuration: the routes are in the filter's own configuration.
    std::ptr::null()
}
