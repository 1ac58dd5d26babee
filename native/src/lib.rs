//! The gateway policy as an Envoy dynamic module: the same [`Gateway`] the `.wasm` runs, behind
//! a [`Host`] implemented with Envoy's dynamic-module ABI (`abi`). Only the glue differs.
//!
//! - **One gateway per worker and configuration**, in a thread-local, as the proxy-wasm build
//!   has one per VM (one VM per worker). Envoy's configuration object is shared by the workers;
//!   each builds its gateway from the same JSON on its first stream.
//! - **Shared data** is process-wide memory with the proxy-wasm rules (`cas` 0 writes
//!   unconditionally, another `cas` must match): [`SharedMemory`].
//! - **Callouts** are per-stream HTTP callouts with the request paused and resumed. The timer's
//!   work (log flush, limit sync, key sets) runs on Envoy's main thread and on workers when due
//!   ([`Ticking`]); its callouts are the configuration's, sent from the main thread, never a
//!   request's stream that a client could reset.
//! - **Re-entrancy**: Envoy may call a hook from inside a callback (continuing a request can
//!   answer it at once). Replies and resumes are therefore queued while the gateway is in use
//!   and carried out after; a hook that still finds the gateway busy defers its event.
//! - **Panics** never cross the ABI: every hook runs under `catch_unwind` (the module is built
//!   with `panic = "unwind"`, profile `native`), and a request whose hook panicked is refused
//!   with a 500 (the gateway's fault), not the 503 of a busy gateway.

#![deny(clippy::undocumented_unsafe_blocks)]

/// Hooks Envoy requires a module to export but the gateway has nothing to do in: each takes
/// Envoy's arguments unread and returns at once (`-> u32 = value` for those that answer).
macro_rules! noop_hooks {
    ($($name:ident($($arg:ty),*) $(-> $ret:ty = $value:expr)?;)*) => {$(
        /// # Safety
        /// Nothing Envoy passes is read.
        #[no_mangle]
        pub unsafe extern "C" fn $name($(_: $arg),*) $(-> $ret)? {
            $($value)?
        }
    )*};
}

mod abi;
mod network;

use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::ffi::{c_char, c_void};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use abi::{EnvoyBuffer, EnvoyConfig, EnvoyFilter, EnvoyHeader};
use gateway_filter::config::Config;
use gateway_filter::host::{Callout, DispatchError, Host, LogLevel, MetricKind, SetError, SharedStore};
use gateway_filter::outcome::{message, Outcome};
use gateway_filter::pipeline::{bound_records, Action, Gateway, StoredRecord, RECORD_CLASSES};
use gateway_filter::reply::Reply;
use gateway_filter::stat;

/// The gateway's own context id for its timer work (requests are numbered from 2).
const ROOT: u32 = 1;

// ---------------------------------------------------------------------------------------------
// Shared data: process-wide, with proxy-wasm's rules.

/// Envoy's shared data for proxy-wasm, in the process: a value and a version per key; a write
/// with `cas` 0 is unconditional, another must name the current version (a missing key has
/// none, and is created). Bounded by the gateway's own key discipline, as in Envoy.
#[derive(Default)]
pub struct SharedMemory {
    map: Mutex<HashMap<String, (Vec<u8>, u32)>>,
}

impl SharedMemory {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        let map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: u32) -> Result<(), SetError> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let next = match map.get(key) {
            Some((_, current)) if cas != 0 && *current != cas => return Err(SetError::CasMismatch),
            Some((_, current)) => current.wrapping_add(1).max(1),
            None => 1,
        };
        map.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

impl SharedStore for SharedMemory {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        SharedMemory::get(self, key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        SharedMemory::set(self, key, value, cas.unwrap_or(0))
    }
}

pub(crate) static SHARED: LazyLock<SharedMemory> = LazyLock::new(SharedMemory::default);

// ---------------------------------------------------------------------------------------------
// The configuration Envoy shares with every worker.

static GENERATIONS: AtomicU64 = AtomicU64::new(1);

/// Configurations Envoy still holds: a worker drops its gateways of the others (after a
/// configuration change) when it builds a new one.
static LIVE: LazyLock<Mutex<std::collections::HashSet<u64>>> = LazyLock::new(Mutex::default);

/// The module's configuration object: the filter's JSON and the metrics defined for it.
struct FilterConfig {
    /// Tells this configuration's gateways apart from another's (after a reload both live).
    generation: u64,
    json: Vec<u8>,
    metrics: Arc<MetricTable>,
    ticking: Arc<Ticking>,
}

/// The configuration's timer: Envoy offers HTTP filters no timer, only schedulers that post an
/// event to a thread at once. A thread of the module (the ticker) commits, every tick period,
/// one event to the configuration's scheduler (Envoy's main thread runs the timer's work of a
/// gateway there: log flush, limit sync, key refresh, with configuration-level callouts) and
/// one to the scheduler of every paused request (its worker runs its own gateway's timer work:
/// waking requests that wait for keys, new lookups for waiters whose lookup lost its owner).
struct Ticking {
    stop: AtomicBool,
    /// Schedulers of requests that paused, by stream key, until their stream goes.
    paused: Mutex<HashMap<usize, Arc<abi::Scheduler>>>,
    /// Records the workers gathered for the store; the main thread's gateway writes them.
    records: Mutex<Vec<StoredRecord>>,
    /// The workers' root calls (key fetches, the limit sync, lookups for orphaned waiters),
    /// which the main thread sends as the configuration's.
    relay: Mutex<Vec<RelayedCall>>,
}

/// The gateway's metrics on Envoy's: families are declared while the configuration is created
/// (the ABI allows it only then), each labelled family once with its label names; a name the
/// gateway uses later (`route=.=users;.;outcome=.=allowed;.;gateway_requests_total`) becomes
/// that family with those label values, so Prometheus shows the same series as for the .wasm.
struct MetricTable {
    envoy: EnvoyConfig,
    /// Family (or plain name) → (histogram, Envoy's id, label count).
    families: HashMap<String, (bool, usize, usize)>,
    /// The gateway's ids (1-based indexes) and their names.
    entries: Mutex<(HashMap<String, u32>, Vec<MetricEntry>)>,
}

#[derive(Clone)]
struct MetricEntry {
    histogram: bool,
    envoy_id: usize,
    values: Vec<String>,
}

impl MetricTable {
    /// Declares `name`'s family (configuration time only).
    fn declare(&mut self, histogram: bool, name: &str) -> bool {
        let (family, tags) = stat::parse(name);
        if self.families.contains_key(family) {
            return true;
        }
        let labels: Vec<&str> = tags.iter().map(|(t, _)| *t).collect();
        match abi::define_metric(self.envoy, histogram, family, &labels) {
            Some(id) => {
                self.families
                    .insert(family.to_string(), (histogram, id, labels.len()));
                true
            }
            None => false,
        }
    }

    /// The gateway's id for `name`, if its family was declared.
    fn id_of(&self, name: &str) -> Option<u32> {
        let mut guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        let (names, entries) = &mut *guard;
        if let Some(id) = names.get(name) {
            return Some(*id);
        }
        let (family, tags) = stat::parse(name);
        let (histogram, envoy_id, labels) = *self.families.get(family)?;
        if tags.len() != labels {
            return None;
        }
        entries.push(MetricEntry {
            histogram,
            envoy_id,
            values: tags.iter().map(|(_, v)| v.to_string()).collect(),
        });
        let id = u32::try_from(entries.len()).ok()?;
        names.insert(name.to_string(), id);
        Some(id)
    }

    fn entry(&self, id: u32) -> Option<MetricEntry> {
        let guard = self.entries.lock().unwrap_or_else(|p| p.into_inner());
        guard.1.get((id as usize).checked_sub(1)?).cloned()
    }
}

/// The per-stream object Envoy hands back to every hook of the stream.
struct Stream {
    config: *const FilterConfig,
    ctx: u32,
    /// Whether the response passed this filter (a local reply does not).
    responded: std::cell::Cell<bool>,
    /// Whether the ticker wakes this stream's worker (it paused).
    watched: std::cell::Cell<bool>,
}

impl Stream {
    fn key(&self) -> usize {
        self as *const Stream as usize
    }

    fn config(&self) -> &FilterConfig {
        // SAFETY: the configuration outlives its streams (each holds a reference in Envoy).
        unsafe { &*self.config }
    }

    fn ticking(&self) -> &Ticking {
        &self.config().ticking
    }

    /// The request paused: until its stream goes, the ticker wakes its worker.
    fn watch(&self, filter: EnvoyFilter) {
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

    fn unwatch(&self) {
        if self.watched.get() {
            if let Ok(mut m) = self.ticking().paused.lock() {
                m.remove(&self.key());
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// One worker's gateway and the host state around it.

/// What Envoy must be told once the gateway is no longer in use (Envoy may re-enter a hook).
enum Deferred {
    /// Request headers changed: Envoy picks the route again (the proxy-wasm host does this on
    /// every header change; here it is asked for once per hook).
    ClearRoute(EnvoyFilter),
    Reply(EnvoyFilter, Reply),
    Resume(EnvoyFilter),
}

/// An event that arrived while the gateway was in use, replayed right after.
enum Pending {
    /// A stream ended while the gateway was in use.
    Gone { generation: u64, ctx: u32 },
    Answer {
        generation: u64,
        ctx: u32,
        callout: u64,
        answer: (Option<u16>, Vec<u8>),
    },
}

struct HostState {
    metrics: Arc<MetricTable>,
    /// This worker's copy of the metric entries it has used (no lock per increment).
    metric_cache: HashMap<u32, MetricEntry>,
    /// Live streams of this worker by context id.
    streams: HashMap<u32, EnvoyFilter>,
    /// The stream the gateway acts on now (none for the root, which has no stream), and the
    /// context id that owns what happens now.
    current: Option<EnvoyFilter>,
    current_ctx: u32,
    /// (owning context, Envoy's callout id) → the gateway's token. A stream's calls ride on
    /// it; the root's go out on the main thread.
    calls: HashMap<(u32, u64), u32>,
    /// Answers to this worker's root calls, which the main thread sent (see `dispatch`).
    inbox: Arc<Inbox>,
    ticking: Arc<Ticking>,
    /// On the main thread: Envoy's callout ids of the calls it relays for workers.
    relayed: HashMap<u64, (Arc<Inbox>, u32)>,
    next_ctx: u32,
    next_token: u32,
    answer: (Option<u16>, Vec<u8>),
    deferred: Vec<Deferred>,
    last_tick_ms: u64,
    tick_period_ms: u64,
    /// On Envoy's main thread: the configuration, whose callouts the timer's work uses.
    main: Option<EnvoyConfig>,
}

impl HostState {
    /// The gateway acts on `stream` for context `ctx` now.
    fn at(&mut self, stream: Option<EnvoyFilter>, ctx: u32) {
        self.current = stream;
        self.current_ctx = ctx;
    }

    fn next_token(&mut self) -> u32 {
        self.next_token = self.next_token.wrapping_add(1).max(1);
        self.next_token
    }

    /// Envoy is asked once per hook to pick the stream's route again.
    fn clear_route_later(&mut self, f: EnvoyFilter) {
        let queued = self
            .deferred
            .iter()
            .any(|d| matches!(d, Deferred::ClearRoute(g) if *g == f));
        if !queued {
            self.deferred.push(Deferred::ClearRoute(f));
        }
    }

    fn entry(&mut self, id: u32) -> Option<MetricEntry> {
        if let Some(e) = self.metric_cache.get(&id) {
            return Some(e.clone());
        }
        let e = self.metrics.entry(id)?;
        self.metric_cache.insert(id, e.clone());
        Some(e)
    }
}

struct Worker {
    gateway: Gateway,
    host: HostState,
}

type Inbox = Mutex<Vec<(u32, (Option<u16>, Vec<u8>))>>;

/// A worker's root call, for the main thread to send.
struct RelayedCall {
    inbox: Arc<Inbox>,
    token: u32,
    call: OwnedCall,
}

struct OwnedCall {
    cluster: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
    timeout_ms: u64,
}

impl OwnedCall {
    fn send(&self, owner: abi::CalloutOwner) -> Result<u64, abi::CalloutRefused> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        abi::http_callout(owner, &self.cluster, &headers, &self.body, self.timeout_ms)
    }
}

/// Hands this worker's gateway the answers the main thread relayed.
fn take_inbox(gateway: &mut Gateway, host: &mut HostState) {
    let answers = host
        .inbox
        .lock()
        .map(|mut q| std::mem::take(&mut *q))
        .unwrap_or_default();
    for (token, answer) in answers {
        let size = answer.1.len();
        host.answer = answer;
        host.at(None, ROOT);
        gateway.on_call_response(ROOT, token, size, &mut NativeHost { state: host });
    }
}

thread_local! {
    static WORKERS: RefCell<HashMap<u64, Worker>> = RefCell::new(HashMap::new());
    static PENDING: RefCell<VecDeque<Pending>> = const { RefCell::new(VecDeque::new()) };
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The host as the gateway sees it during one hook.
struct NativeHost<'a> {
    state: &'a mut HostState,
}

impl SharedStore for NativeHost<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        SHARED.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        SHARED.set(key, value, cas.unwrap_or(0))
    }
}

impl Host for NativeHost<'_> {
    fn now_ms(&mut self) -> u64 {
        now_ms()
    }

    fn random_bytes(&mut self, buf: &mut [u8]) -> bool {
        if getrandom::fill(buf).is_ok() {
            return true;
        }
        // The clock: unique-ish ids only; the gateway refuses to make keys from it.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
        false
    }

    fn request_headers(&mut self) -> Option<Vec<(String, Vec<u8>)>> {
        abi::headers(self.state.current?, abi::REQUEST_HEADER)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) {
        if let Some(f) = self.state.current {
            abi::set_header(f, abi::REQUEST_HEADER, name, value);
            self.state.clear_route_later(f);
        }
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        if let Some(f) = self.state.current {
            abi::set_header(f, abi::RESPONSE_HEADER, name, Some(value));
        }
    }

    fn response_status(&mut self) -> Option<u16> {
        let f = self.state.current?;
        // A local reply's headers do not pass this filter; Envoy still records its code.
        abi::header(f, abi::RESPONSE_HEADER, ":status")
            .and_then(|raw| std::str::from_utf8(&raw).ok()?.parse().ok())
            .or_else(|| abi::response_code(f))
    }

    fn source_address(&mut self) -> Option<String> {
        abi::source_address(self.state.current?)
    }

    fn clear_route_cache(&mut self) {
        if let Some(f) = self.state.current {
            self.state.clear_route_later(f);
        }
    }

    fn send_reply(&mut self, reply: &Reply) {
        if let Some(f) = self.state.current {
            self.state.deferred.push(Deferred::Reply(f, reply.clone()));
        }
    }

    fn resume(&mut self) {
        if let Some(f) = self.state.current {
            self.state.deferred.push(Deferred::Resume(f));
        }
    }

    fn switch_to(&mut self, context_id: u32) -> bool {
        if context_id == ROOT {
            // The root has no stream: its calls go through the main thread.
            self.state.at(None, ROOT);
            return true;
        }
        match self.state.streams.get(&context_id) {
            Some(f) => {
                self.state.at(Some(*f), context_id);
                true
            }
            None => false,
        }
    }

    fn resumes_other_contexts(&self) -> bool {
        true
    }

    fn removes_request_headers(&self) -> bool {
        true
    }

    fn dispatch(&mut self, call: Callout<'_>) -> Result<u32, DispatchError> {
        let mut headers = vec![
            (":method", call.method),
            (":path", call.path),
            ("host", call.authority.unwrap_or(call.cluster)),
        ];
        if let Some(value) = call.authorization {
            headers.push(("authorization", value));
        }
        let body = call.body.unwrap_or_default();
        if self.state.current_ctx == ROOT && self.state.main.is_none() {
            // The root's call on a worker: no request's stream may carry it (a client could
            // cancel it by resetting its stream). The main thread sends it as the
            // configuration's, and its answer comes back through this worker's inbox.
            let token = self.state.next_token();
            let relayed = RelayedCall {
                inbox: Arc::clone(&self.state.inbox),
                token,
                call: OwnedCall {
                    cluster: call.cluster.to_string(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    body: body.to_vec(),
                    timeout_ms: call.timeout_ms,
                },
            };
            return match self.state.ticking.relay.lock() {
                Ok(mut q) => {
                    q.push(relayed);
                    Ok(token)
                }
                Err(_) => Err(DispatchError::Refused),
            };
        }
        let owner = match (self.state.main, self.state.current) {
            (Some(config), _) => abi::CalloutOwner::Config(config),
            (None, Some(carrier)) => abi::CalloutOwner::Stream(carrier),
            (None, None) => return Err(DispatchError::Refused),
        };
        let sent = abi::http_callout(owner, call.cluster, &headers, body, call.timeout_ms);
        let id = sent.map_err(|e| match e {
            abi::CalloutRefused::ClusterNotFound => DispatchError::BadArgument,
            abi::CalloutRefused::Other => DispatchError::Refused,
        })?;
        let token = self.state.next_token();
        self.state.calls.insert((self.state.current_ctx, id), token);
        Ok(token)
    }

    fn call_response(&mut self, _body_size: usize) -> (Option<u16>, Vec<u8>) {
        std::mem::take(&mut self.state.answer)
    }

    fn define_metric(&mut self, _kind: MetricKind, name: &str) -> Option<u32> {
        // Families were declared when the configuration was created; looked up here.
        self.state.metrics.id_of(name)
    }

    fn increment_metric(&mut self, id: u32, by: i64) {
        let (Ok(by), Some(e)) = (u64::try_from(by), self.state.entry(id)) else {
            return;
        };
        if !e.histogram {
            abi::increment_counter(self.state.metrics.envoy, e.envoy_id, &e.values, by);
        }
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        if let Some(e) = self.state.entry(id) {
            if e.histogram {
                abi::record_histogram(self.state.metrics.envoy, e.envoy_id, &e.values, value);
            }
        }
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        let level = match level {
            LogLevel::Trace => 0,
            LogLevel::Debug => 1,
            LogLevel::Info => 2,
            LogLevel::Warn => 3,
            LogLevel::Error => 4,
            LogLevel::Critical => 5,
        };
        abi::log(level, message);
    }

    fn verify_signature(&mut self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        // No foreign functions here: RSA/ECDSA by the module's own code, natively compiled.
        None
    }
}

/// A host for configuration time: declares the metrics the gateway defines.
struct DefiningHost {
    table: MetricTable,
}

impl SharedStore for DefiningHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        SHARED.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        SHARED.set(key, value, cas.unwrap_or(0))
    }
}

impl Host for DefiningHost {
    fn now_ms(&mut self) -> u64 {
        now_ms()
    }
    fn random_bytes(&mut self, buf: &mut [u8]) -> bool {
        getrandom::fill(buf).is_ok()
    }
    fn request_headers(&mut self) -> Option<Vec<(String, Vec<u8>)>> {
        None
    }
    fn set_request_header(&mut self, _: &str, _: Option<&str>) {}
    fn set_response_header(&mut self, _: &str, _: &str) {}
    fn response_status(&mut self) -> Option<u16> {
        None
    }
    fn source_address(&mut self) -> Option<String> {
        None
    }
    fn clear_route_cache(&mut self) {}
    fn send_reply(&mut self, _: &Reply) {}
    fn resume(&mut self) {}
    fn switch_to(&mut self, _: u32) -> bool {
        false
    }
    fn resumes_other_contexts(&self) -> bool {
        true
    }
    fn removes_request_headers(&self) -> bool {
        true
    }
    fn dispatch(&mut self, _: Callout<'_>) -> Result<u32, DispatchError> {
        Err(DispatchError::Refused)
    }
    fn call_response(&mut self, _: usize) -> (Option<u16>, Vec<u8>) {
        (None, Vec::new())
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if !self.table.declare(matches!(kind, MetricKind::Histogram), name) {
            return None;
        }
        self.table.id_of(name)
    }
    fn increment_metric(&mut self, _: u32, _: i64) {}
    fn record_metric(&mut self, _: u32, _: u64) {}
    fn log(&mut self, _: LogLevel, _: &str) {
        // Each worker's gateway says the same when it starts.
    }
    fn verify_signature(&mut self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        None
    }
}

// ---------------------------------------------------------------------------------------------
// Running the gateway of this worker.

/// This worker's gateway for `config`, built on first use (then the gateways of configurations
/// Envoy no longer holds go).
fn worker_for<'a>(
    workers: &'a mut HashMap<u64, Worker>,
    config: &FilterConfig,
) -> Result<&'a mut Worker, String> {
    if !workers.contains_key(&config.generation) {
        let live = LIVE.lock().map(|l| l.clone()).unwrap_or_default();
        workers.retain(|generation, _| live.contains(generation));
        let worker = build_worker(config)?;
        workers.insert(config.generation, worker);
    }
    workers
        .get_mut(&config.generation)
        .ok_or_else(|| "worker state missing".to_string())
}

fn build_worker(config: &FilterConfig) -> Result<Worker, String> {
    let cfg = Config::from_json(&config.json).map_err(|e| format!("invalid configuration: {e}"))?;
    let mut host = HostState {
        metrics: Arc::clone(&config.metrics),
        metric_cache: HashMap::new(),
        streams: HashMap::new(),
        current: None,
        current_ctx: ROOT,
        calls: HashMap::new(),
        next_ctx: ROOT,
        next_token: 0,
        answer: (None, Vec::new()),
        deferred: Vec::new(),
        last_tick_ms: 0,
        tick_period_ms: 1000,
        main: None,
        inbox: Arc::new(Mutex::new(Vec::new())),
        ticking: Arc::clone(&config.ticking),
        relayed: HashMap::new(),
    };
    let mut gateway = Gateway::new(cfg, &mut NativeHost { state: &mut host })?;
    // Records go to the main thread's gateway, which summarises refusals on its timer.
    gateway.hand_over_records();
    host.tick_period_ms = gateway.tick_period_ms();
    // Timers: see [`Ticking`].
    gateway.started(true, &mut NativeHost { state: &mut host })?;
    host.last_tick_ms = now_ms();
    Ok(Worker { gateway, host })
}

/// Runs `f` on this worker's gateway, then carries out what it deferred and replays events that
/// arrived meanwhile. `None` when the gateway is in use (a re-entrant hook) or cannot be built.
fn with_worker<R>(config: &FilterConfig, f: impl FnOnce(&mut Worker) -> R) -> Option<R> {
    let (result, deferred) = WORKERS.with(|cell| {
        let Ok(mut workers) = cell.try_borrow_mut() else {
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
        let Worker { gateway, host } = &mut *worker;
        take_inbox(gateway, host);
        let result = f(worker);
        (Some(result), std::mem::take(&mut worker.host.deferred))
    });
    carry_out(deferred);
    replay_pending();
    result
}

/// Tells Envoy what the gateway decided, now that it is no longer in use.
fn carry_out(deferred: Vec<Deferred>) {
    for d in deferred {
        match d {
            Deferred::ClearRoute(filter) => abi::clear_route_cache(filter),
            Deferred::Reply(filter, reply) => send_reply(filter, &reply),
            Deferred::Resume(filter) => abi::continue_decoding(filter),
        }
    }
}

fn send_reply(filter: EnvoyFilter, reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    abi::send_response(
        filter,
        reply.status,
        &headers,
        reply.body.as_bytes(),
        reply.outcome.decision(),
    );
}

fn replay_pending() {
    loop {
        let Some(event) = PENDING.with(|p| p.try_borrow_mut().ok().and_then(|mut q| q.pop_front())) else {
            return;
        };
        match event {
            Pending::Gone { generation, ctx } => {
                WORKERS.with(|cell| {
                    if let Ok(mut workers) = cell.try_borrow_mut() {
                        if let Some(w) = workers.get_mut(&generation) {
                            forget_stream(w, ctx);
                        }
                    }
                });
            }
            Pending::Answer {
                generation,
                ctx,
                callout,
                answer,
            } => {
                deliver_answer(generation, ctx, callout, answer);
            }
        }
    }
}

/// A stream is gone: the gateway forgets it and its calls (Envoy cancelled them).
fn forget_stream(w: &mut Worker, ctx: u32) {
    let Worker { gateway, host } = w;
    host.streams.remove(&ctx);
    host.at(None, ctx);
    // Envoy cancelled the stream's calls (only requests' own: the root's never ride on one).
    host.calls.retain(|(owner, _), _| *owner != ctx);
    gateway.on_done(ctx, &mut NativeHost { state: host });
}

/// Hands a callout's answer to the gateway (as proxy-wasm's `on_http_call_response`). If the
/// gateway is in use (Envoy answered inside another hook), the answer waits its turn.
fn deliver_answer(generation: u64, ctx: u32, callout: u64, answer: (Option<u16>, Vec<u8>)) {
    let deferred = WORKERS.with(|cell| {
        let Ok(mut workers) = cell.try_borrow_mut() else {
            return Err(answer);
        };
        let Some(worker) = workers.get_mut(&generation) else {
            return Ok(Vec::new());
        };
        let Some(token) = worker.host.calls.remove(&(ctx, callout)) else {
            return Ok(Vec::new());
        };
        let Worker { gateway, host } = worker;
        let size = answer.1.len();
        host.answer = answer;
        let stream = host.streams.get(&ctx).copied();
        host.at(stream, ctx);
        gateway.on_call_response(ctx, token, size, &mut NativeHost { state: host });
        gateway.flush_counters(&mut NativeHost { state: host });
        Ok(std::mem::take(&mut host.deferred))
    });
    match deferred {
        Ok(deferred) => carry_out(deferred),
        Err(answer) => PENDING.with(|p| {
            if let Ok(mut q) = p.try_borrow_mut() {
                q.push_back(Pending::Answer {
                    generation,
                    ctx,
                    callout,
                    answer,
                });
            }
        }),
    }
}

// ---------------------------------------------------------------------------------------------
// The hooks Envoy calls. Each runs under catch_unwind: a panic is logged and the request refused.

pub(crate) fn guard<R>(hook: &str, fallback: R, f: impl FnOnce() -> R) -> R {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => {
            abi::log(4, &format!("gateway filter: panic in {hook}: refused"));
            fallback
        }
    }
}

/// # Safety
/// Envoy calls it once, on the main thread, right after loading the module.
#[no_mangle]
pub extern "C" fn envoy_dynamic_module_on_program_init() -> *const c_char {
    abi::ABI_VERSION.as_ptr().cast()
}

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
        let cfg = match Config::from_json(&json) {
            Ok(c) => c,
            Err(e) => {
                abi::log(4, &format!("gateway filter: invalid configuration: {e}"));
                return std::ptr::null();
            }
        };
        // A gateway built here defines every metric (allowed only now), then is dropped.
        let mut host = DefiningHost {
            table: MetricTable {
                envoy: EnvoyConfig(envoy),
                families: HashMap::new(),
                entries: Mutex::new((HashMap::new(), Vec::new())),
            },
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
            metrics: Arc::new(host.table),
            ticking,
        };
        Box::into_raw(Box::new(config)) as *const c_void
    })
}

/// The ticker's events for the main thread: the period's (the timer's work), and an early one
/// while the workers' records wait.
const TICK_EVENT: u64 = 0;
const RECORDS_EVENT: u64 = 1;

/// The ticker thread (see [`Ticking`]); it stops when the configuration goes, and deletes the
/// configuration's scheduler itself (Envoy allows that from any thread).
fn start_ticker(envoy: EnvoyConfig, ticking: Arc<Ticking>, tick_ms: u64) -> Result<(), String> {
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
        // This thread's gateway for it goes now; other workers' go with their threads.
        WORKERS.with(|cell| {
            if let Ok(mut w) = cell.try_borrow_mut() {
                w.remove(&generation);
            }
        });
    })
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
unsafe fn stream<'a>(module: *const c_void) -> Option<&'a Stream> {
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
            if matches!(action, Action::Pause) {
                let replied = host
                    .deferred
                    .iter()
                    .any(|d| matches!(d, Deferred::Reply(g, _) if *g == f));
                if !replied {
                    // Waiting for a call: the ticker wakes this worker while it waits (the
                    // answers the main thread relayed reach it then). Done here, before Envoy
                    // is told anything: a reply can end (and free) the stream at once.
                    s.watch(f);
                }
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
        Some(Ok(Action::Pause)) => abi::STOP_ALL_ITERATION_AND_WATERMARK,
        Some(Err(())) => refuse(Outcome::Internal, message::INTERNAL),
        None => refuse(Outcome::Busy, message::BUSY),
    }
}

/// The worker's timer work, when due (its calls go out on the main thread, see `dispatch`).
fn tick_if_due(gateway: &mut Gateway, host: &mut HostState) {
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
        let forgotten = with_worker(cfg, |w| forget_stream(w, ctx));
        if forgotten.is_none() {
            // The gateway was in use (Envoy ended the stream inside a callback): afterwards.
            PENDING.with(|p| {
                if let Ok(mut q) = p.try_borrow_mut() {
                    q.push_back(Pending::Gone {
                        generation: cfg.generation,
                        ctx,
                    });
                }
            });
        }
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
