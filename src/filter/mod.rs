//! Glue between the proxy-wasm host and the pure decision code: read the request head, call
//! [`crate::policy::decide`], then forward (mutating headers), reply, or consult the revocation
//! store through webdis. Nothing here decides; every pause ends in a resume or a reply.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet, VecDeque};
use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, BufferType, ContextType, LogLevel, MapType, MetricType};

use crate::access_log::{self, Record};
use crate::canary::{self, Sticky};
use crate::config::{Config, Revocation};
use crate::jwt::Identity;
use crate::policy::{self, Endpoint, Outcome, Reply, HEADER_TRACE_ID};
use crate::ratelimit::{self, cluster, Kind, SharedStore, Update, Verdict};
use crate::revocation::{self as rv, CacheEntry, FailureMode, Lookup, Slot, StoreError};
use crate::trace::{uuid_v4, RANDOM_BYTES};

const HEADER_RESPONSE_TIME: &str = "x-response-time";
const MSG_REVOKED: &str = "Token has been revoked";
const MSG_STORE_DOWN: &str = "Revocation service unavailable";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root::default()) });
}}

thread_local! {
    /// Records waiting to be written to the log store (this VM's).
    static LOG_BUFFER: RefCell<VecDeque<StoredRecord>> = const { RefCell::new(VecDeque::new()) };
    /// Counters defined on first use (per route and outcome, per auth failure reason).
    static LAZY_COUNTERS: RefCell<HashMap<String, u32>> = RefCell::new(HashMap::new());
}

struct StoredRecord {
    trace_id: String,
    user_id: Option<String>,
    json: String,
}

fn inc_named(name: &str) {
    let id = LAZY_COUNTERS.with(|c| {
        let mut c = c.borrow_mut();
        if let Some(id) = c.get(name) {
            return Some(*id);
        }
        let id = hostcalls::define_metric(MetricType::Counter, name).ok()?;
        c.insert(name.to_string(), id);
        Some(id)
    });
    if let Some(id) = id {
        Metrics::inc(id);
    }
}

/// Metric-name-safe form of a route name.
fn metric_part(s: &str) -> String {
    s.replace(['-', '.'], "_")
}

/// Counter ids (Envoy stats `wasmcustom.<name>`).
struct Metrics {
    lookups: u32,
    cache_hits: u32,
    revoked: u32,
    store_errors: u32,
    allowed_on_error: u32,
    /// Allowed / limited per kind: IP, user, route.
    rl_allowed: [u32; 3],
    rl_limited: [u32; 3],
    rl_contended: u32,
    rl_sync_errors: u32,
    /// Per canary route: [stable, canary] request counters.
    canary: HashMap<String, [u32; 2]>,
    duration: u32,
    log_stored: u32,
    log_dropped: u32,
    log_errors: u32,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Ip => 0,
        Kind::User => 1,
        Kind::Route => 2,
    }
}

/// Shared data as the rate limiter's store.
struct HostStore;

impl SharedStore for HostStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        match hostcalls::get_shared_data(key) {
            Ok((Some(bytes), cas)) => Some((bytes, cas.unwrap_or(0))),
            _ => None,
        }
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), bool> {
        match hostcalls::set_shared_data(key, Some(value), cas) {
            Ok(()) => Ok(()),
            Err(proxy_wasm::types::Status::CasMismatch) => Err(true),
            Err(_) => Err(false),
        }
    }
}

/// Creates every rate-limit key up front, so request-time updates are CAS on existing keys.
fn create_rate_limit_keys(cfg: &Config) {
    let mut any = false;
    for limits in cfg.routes.iter().filter_map(|r| r.limits.as_ref()) {
        ratelimit::ensure_key(&HostStore, &limits.route_key);
        if limits.cluster_wide {
            ratelimit::ensure_key(&HostStore, &limits.pending_key);
            ratelimit::ensure_key(&HostStore, cluster::LEADER_KEY);
        }
        any = true;
    }
    if any {
        let s = &cfg.rate_limits;
        for (kind, slots) in [("i", s.ip_slots), ("u", s.user_slots)] {
            for i in 0..u64::from(slots) {
                ratelimit::ensure_key(&HostStore, &ratelimit::slot_key_at(kind, i));
            }
        }
    }
}

impl Metrics {
    fn define(cfg: &Config) -> Result<Self, String> {
        let counter = |name: &str| {
            hostcalls::define_metric(MetricType::Counter, name)
                .map_err(|s| format!("define_metric {name}: {s:?}"))
        };
        Ok(Metrics {
            lookups: counter("gateway_revocation_lookups_total")?,
            cache_hits: counter("gateway_revocation_cache_hits_total")?,
            revoked: counter("gateway_revocation_revoked_total")?,
            store_errors: counter("gateway_revocation_store_errors_total")?,
            allowed_on_error: counter("gateway_revocation_allowed_on_error_total")?,
            rl_allowed: [
                counter("gateway_ratelimit_ip_allowed_total")?,
                counter("gateway_ratelimit_user_allowed_total")?,
                counter("gateway_ratelimit_route_allowed_total")?,
            ],
            rl_limited: [
                counter("gateway_ratelimit_ip_limited_total")?,
                counter("gateway_ratelimit_user_limited_total")?,
                counter("gateway_ratelimit_route_limited_total")?,
            ],
            rl_contended: counter("gateway_ratelimit_contended_total")?,
            rl_sync_errors: counter("gateway_ratelimit_sync_errors_total")?,
            duration: hostcalls::define_metric(MetricType::Histogram, "gateway_request_duration_ms")
                .map_err(|s| format!("define_metric gateway_request_duration_ms: {s:?}"))?,
            log_stored: counter("gateway_log_records_stored_total")?,
            log_dropped: counter("gateway_log_records_dropped_total")?,
            log_errors: counter("gateway_log_store_errors_total")?,
            canary: {
                let mut m = HashMap::new();
                for r in cfg.routes.iter().filter(|r| r.canary.is_some()) {
                    let base = metric_part(&r.name);
                    m.insert(
                        r.name.clone(),
                        [
                            counter(&format!("gateway_canary_{base}_stable_total"))?,
                            counter(&format!("gateway_canary_{base}_canary_total"))?,
                        ],
                    );
                }
                m
            },
        })
    }

    fn inc(id: u32) {
        let _ = hostcalls::increment_metric(id, 1);
    }
}

#[derive(Default)]
struct Root {
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
    /// This VM's identity in the sync leader election.
    vm_id: u64,
    /// Per cluster-wide route: the Redis counter's value at our last sync.
    last_totals: HashMap<String, u64>,
    /// Outstanding INCRBY calls: token id -> (route, delta sent).
    syncing: HashMap<u32, (String, u64)>,
    /// Outstanding log-store writes.
    log_calls: HashSet<u32>,
    last_flush_ms: u64,
    last_sync_ms: u64,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, body_size: usize, _: usize) {
        if self.log_calls.remove(&token_id) {
            let (status, body) = call_response(body_size);
            if let Some(m) = &self.metrics {
                Metrics::inc(if access_log::write_ok(status, &body) {
                    m.log_stored
                } else {
                    m.log_errors
                });
            }
            return;
        }
        let Some((route, delta)) = self.syncing.remove(&token_id) else {
            return;
        };
        let (Some(config), Some(metrics)) = (self.config.clone(), self.metrics.clone()) else {
            return;
        };
        let Some(limits) = config
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref())
            .find(|l| l.name == route)
        else {
            return;
        };
        let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u16>().ok()));
        let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
            Ok(Some(b)) => b,
            _ => Vec::new(),
        };
        match cluster::parse_incrby(status, &body) {
            Ok(total) => {
                let others = cluster::others(self.last_totals.get(&route).copied(), total, delta);
                self.last_totals.insert(route, total);
                cluster::drain(
                    &HostStore,
                    &limits.route_key,
                    limits.route_fingerprint,
                    &limits.route,
                    now_ms(),
                    others,
                );
            }
            Err(e) => {
                Metrics::inc(metrics.rl_sync_errors);
                warn!("rate limit sync of {route} failed: {e}");
                cluster::add(&HostStore, &limits.pending_key, delta);
            }
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        info!("gateway filter {} starting", env!("CARGO_PKG_VERSION"));
        let mut id = [0u8; 8];
        id.copy_from_slice(random_bytes().get(..8).unwrap_or(&[1u8; 8]));
        self.vm_id = u64::from_le_bytes(id).max(1);
        true
    }

    /// Every VM flushes its buffered log records; the leader VM also syncs cluster-wide limits.
    fn on_tick(&mut self) {
        let Some(config) = self.config.clone() else { return };
        let now = now_ms();
        if let Some(store) = &config.logs.store {
            if now.saturating_sub(self.last_flush_ms) >= store.flush_interval_ms {
                self.last_flush_ms = now;
                self.flush_logs(store);
            }
        }
        if let Some(sync) = &config.rate_limits.sync {
            if now.saturating_sub(self.last_sync_ms) >= sync.interval_ms {
                self.last_sync_ms = now;
                self.sync_limits(&config, sync);
            }
        }
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(status) => {
                error!("gateway filter: cannot read plugin configuration: {status:?}");
                return false;
            }
        };
        let cfg = match Config::from_json(&bytes) {
            Ok(cfg) => cfg,
            Err(e) => {
                error!("gateway filter: invalid configuration: {e}");
                return false;
            }
        };
        let metrics = match Metrics::define(&cfg) {
            Ok(m) => m,
            Err(e) => {
                error!("gateway filter: {e}");
                return false;
            }
        };
        info!(
            "gateway filter configured: {} routes, jwt {}, revocation {}, log store {}",
            cfg.routes.len(),
            if cfg.verifier.is_some() { "on" } else { "off" },
            if cfg.revocation.is_some() { "on" } else { "off" },
            if cfg.logs.store.is_some() { "on" } else { "off" },
        );
        create_rate_limit_keys(&cfg);
        // One tick drives both timers: the log flush (every VM) and the limit sync (the leader).
        let cluster_wide = cfg
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref())
            .any(|l| l.cluster_wide);
        let sync_ms = cfg
            .rate_limits
            .sync
            .as_ref()
            .filter(|_| cluster_wide)
            .map(|s| s.interval_ms);
        let flush_ms = cfg.logs.store.as_ref().map(|s| s.flush_interval_ms);
        if let Some(tick) = [sync_ms, flush_ms].into_iter().flatten().min() {
            let _ = hostcalls::set_tick_period(Duration::from_millis(tick));
        }
        self.config = Some(Rc::new(cfg));
        self.metrics = Some(Rc::new(metrics));
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            config: self.config.clone()?,
            metrics: self.metrics.clone()?,
            started: None,
            trace_id: None,
            pending: None,
            rate_limit: None,
            head: None,
            route: None,
            decision: Cell::new("allowed"),
            status: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Leader VM only: send each cluster-wide route's local consumption to Redis.
    fn sync_limits(&mut self, config: &Config, sync: &crate::config::SyncSettings) {
        if !cluster::elect(
            &HostStore,
            self.vm_id,
            now_ms(),
            sync.interval_ms.saturating_mul(3),
        ) {
            return;
        }
        for limits in config
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref())
            .filter(|l| l.cluster_wide)
        {
            if self.syncing.values().any(|(route, _)| *route == limits.name) {
                continue; // the previous sync of this route is still out
            }
            let delta = cluster::take_all(&HostStore, &limits.pending_key);
            let path = cluster::incrby_path(&limits.name, delta);
            let call = hostcalls::dispatch_http_call(
                &sync.cluster,
                vec![
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", &sync.cluster),
                ],
                None,
                vec![],
                Duration::from_millis(sync.timeout_ms),
            );
            match call {
                Ok(token_id) => {
                    self.syncing.insert(token_id, (limits.name.clone(), delta));
                }
                Err(status) => {
                    if let Some(m) = &self.metrics {
                        Metrics::inc(m.rl_sync_errors);
                    }
                    warn!("rate limit sync dispatch failed: {status:?}");
                    cluster::add(&HostStore, &limits.pending_key, delta);
                }
            }
        }
    }

    /// Writes up to [`FLUSH_BATCH`] buffered records: each appended to its trace's list and
    /// prepended to its user's list (trimmed to the configured count); keys expire with the
    /// retention.
    fn flush_logs(&mut self, store: &crate::config::LogStoreSettings) {
        if self.log_calls.len() > MAX_LOG_CALLS_IN_FLIGHT {
            return; // webdis is slow: keep the records buffered
        }
        let batch: Vec<StoredRecord> = LOG_BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            let n = b.len().min(FLUSH_BATCH);
            b.drain(..n).collect()
        });
        let mut users: Vec<String> = Vec::new();
        for r in &batch {
            let key = access_log::trace_key(&r.trace_id);
            self.store_call(
                store,
                "PUT",
                &access_log::append_path(&key),
                Some(r.json.as_bytes()),
            );
            self.store_call(
                store,
                "GET",
                &access_log::expire_path(&key, store.retention_seconds),
                None,
            );
            if let Some(user) = &r.user_id {
                let key = access_log::user_key(user);
                self.store_call(
                    store,
                    "PUT",
                    &access_log::prepend_path(&key),
                    Some(r.json.as_bytes()),
                );
                if !users.contains(user) {
                    users.push(user.clone());
                }
            }
        }
        for user in users {
            let key = access_log::user_key(&user);
            self.store_call(
                store,
                "GET",
                &access_log::trim_path(&key, store.user_records),
                None,
            );
            self.store_call(
                store,
                "GET",
                &access_log::expire_path(&key, store.retention_seconds),
                None,
            );
        }
    }

    fn store_call(
        &mut self,
        store: &crate::config::LogStoreSettings,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) {
        let call = hostcalls::dispatch_http_call(
            &store.cluster,
            vec![
                (":method", method),
                (":path", path),
                (":authority", &store.cluster),
            ],
            body,
            vec![],
            Duration::from_millis(store.timeout_ms),
        );
        match call {
            Ok(token_id) => {
                self.log_calls.insert(token_id);
            }
            Err(status) => {
                if let Some(m) = &self.metrics {
                    Metrics::inc(m.log_errors);
                }
                warn!("log store dispatch failed: {status:?}");
            }
        }
    }
}

/// Records written per VM per flush, and the cap on outstanding log-store calls.
const FLUSH_BATCH: usize = 200;
const MAX_LOG_CALLS_IN_FLIGHT: usize = 1000;

/// `:status` and body of the current HTTP call response.
fn call_response(body_size: usize) -> (Option<u16>, Vec<u8>) {
    let status = hostcalls::get_map_value_bytes(MapType::HttpCallResponseHeaders, ":status")
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u16>().ok()));
    let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(Some(b)) => b,
        _ => Vec::new(),
    };
    (status, body)
}

/// What happens once the caller's token is known not to be revoked.
enum Then {
    Forward {
        remove: Vec<String>,
        set: Vec<(&'static str, String)>,
    },
    Endpoint(Endpoint),
}

/// The authenticated caller.
struct Caller {
    identity: Identity,
    token: String,
}

/// An outstanding webdis call.
enum Pending {
    Check {
        token_id: u32,
        then: Then,
        caller: Caller,
        slot: Slot,
        with_user: bool,
    },
    Write {
        token_id: u32,
        on_ok: Reply,
    },
    Query {
        token_id: u32,
        label: &'static str,
        id: String,
    },
}

/// Whether the request continues now or stays paused (a reply was sent or a call is out).
enum Flow {
    Continue,
    Paused,
}

struct Request {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    started: Option<SystemTime>,
    trace_id: Option<String>,
    pending: Option<Pending>,
    /// The binding bucket's verdict, for the `X-RateLimit-*` response headers.
    rate_limit: Option<Verdict>,
    /// What the log record needs from the request head (kept, not copied; built in `on_log`).
    head: Option<Head>,
    /// The matched route, for metrics and logs.
    route: Option<String>,
    /// Why the gateway answered itself (the reason of the last local reply); `allowed` otherwise.
    decision: Cell<&'static str>,
    status: Option<u16>,
}

impl Context for Request {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, body_size: usize, _: usize) {
        let matches = match &self.pending {
            Some(Pending::Check { token_id: t, .. })
            | Some(Pending::Write { token_id: t, .. })
            | Some(Pending::Query { token_id: t, .. }) => *t == token_id,
            None => false,
        };
        if !matches {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        let (status, body) = call_response(body_size);
        let flow = match pending {
            Pending::Query { label, id, .. } => match access_log::parse_range(status, &body) {
                Ok(records) if records.is_empty() => self.error(404, "No log records found"),
                Ok(records) => {
                    let body = serde_json::json!({ label: id, "count": records.len(), "records": records });
                    self.reply(self.json(body));
                    Flow::Paused
                }
                Err(e) => {
                    Metrics::inc(self.metrics.log_errors);
                    warn!("log store query failed: {e}");
                    self.error(503, "Log store unavailable")
                }
            },
            Pending::Check {
                then,
                caller,
                slot,
                with_user,
                ..
            } => match rv::parse_lookup(status, &body, with_user) {
                Ok(lookup) => {
                    if let Some(rv) = self.config.revocation.as_ref() {
                        if rv.cache_ttl_ms > 0 {
                            let entry = CacheEntry {
                                fingerprint: slot.fingerprint,
                                stored_at_ms: now_ms(),
                                lookup,
                            };
                            let _ =
                                hostcalls::set_shared_data(&slot.cache_key(), Some(&entry.encode()), None);
                        }
                    }
                    if lookup.revokes(caller.identity.issued_at) {
                        self.revoked()
                    } else {
                        self.proceed(then, caller)
                    }
                }
                Err(e) => self.store_failed(then, caller, e),
            },
            Pending::Write { on_ok, .. } => match rv::parse_setex(status, &body) {
                Ok(()) => {
                    self.reply(on_ok);
                    Flow::Paused
                }
                Err(e) => {
                    Metrics::inc(self.metrics.store_errors);
                    warn!("revocation store write failed: {e}");
                    self.error(503, MSG_STORE_DOWN)
                }
            },
        };
        if let Flow::Continue = flow {
            let _ = hostcalls::resume_http_request();
        }
    }
}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn now_ms() -> u64 {
    now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

thread_local! {
    /// Trace and span ids need uniqueness, not secrecy: a PRNG seeded once per VM from the host
    /// saves a `random_get` host call per request.
    static FAST_RNG: RefCell<Option<fastrand::Rng>> = const { RefCell::new(None) };
}

fn fast_random() -> [u8; RANDOM_BYTES] {
    FAST_RNG.with(|r| {
        let mut r = r.borrow_mut();
        let rng = r.get_or_insert_with(|| {
            let seed = random_bytes();
            let mut s = [0u8; 8];
            s.copy_from_slice(seed.get(..8).unwrap_or(&[9u8; 8]));
            fastrand::Rng::with_seed(u64::from_le_bytes(s))
        });
        let mut buf = [0u8; RANDOM_BYTES];
        rng.fill(&mut buf);
        buf
    })
}

fn random_bytes() -> [u8; RANDOM_BYTES] {
    let mut buf = [0u8; RANDOM_BYTES];
    if let Err(e) = getrandom::fill(&mut buf) {
        // Fall back to the clock: ids only need to be unique-ish, never secret.
        warn!("getrandom failed: {e}");
        let nanos = now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
    }
    buf
}

/// What the log record needs from the request head.
struct Head {
    headers: Vec<policy::HeaderPair>,
    client_ip: Option<String>,
    user_id: Option<String>,
    canary: Option<bool>,
}

/// Whether Envoy prints wasm log lines of this level (its level can change at runtime).
fn envoy_logs(level: access_log::Level) -> bool {
    let wanted = match level {
        access_log::Level::Info => LogLevel::Info,
        access_log::Level::Warn => LogLevel::Warn,
        access_log::Level::Error => LogLevel::Error,
    };
    hostcalls::get_log_level().map_or(true, |current| current as u32 <= wanted as u32)
}

/// The request's log record from its head.
fn new_record(head: &Head, start: SystemTime, trace_id: &str, route: Option<&str>) -> Record {
    let value = |name: &str| {
        head.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let full_path = value(":path").unwrap_or("");
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let upstream = match (route, head.canary) {
        (Some(r), Some(true)) => Some(format!("{r}-canary")),
        (r, _) => r.map(str::to_string),
    };
    Record {
        timestamp_ms: start
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0),
        trace_id: trace_id.to_string(),
        method: value(":method").unwrap_or("").to_string(),
        path: path.to_string(),
        query_params: access_log::query_params(query),
        client_ip: head.client_ip.clone(),
        user_agent: value("user-agent").map(str::to_string),
        user_id: head.user_id.clone(),
        route: route.map(str::to_string),
        upstream_service: upstream,
        canary: head.canary,
        status: 0,
        duration_ms: 0.0,
        decision: String::new(),
    }
}

/// The outcome class of a decision, for the per-route request counters.
fn outcome(decision: &str) -> &'static str {
    match decision {
        "allowed" | "ok" => "allowed",
        "revoked" => "revoked",
        "role" | "forbidden" => "forbidden",
        "route_not_found" => "not_found",
        "method_not_allowed" => "method_not_allowed",
        "store_unavailable" => "store_unavailable",
        "bad_request" => "bad_request",
        d if d.starts_with("rate_limited") => "rate_limited",
        d if is_auth_failure(d) => "unauthorized",
        _ => "error",
    }
}

fn is_auth_failure(decision: &str) -> bool {
    decision == policy::REASON_MISSING
        || decision == policy::REASON_FORMAT
        || decision == policy::REASON_ROLE
        || decision == "revoked"
        || crate::jwt::TokenError::CODES.contains(&decision)
}

/// Applies the decided request-header changes; the request continues.
fn forward(remove: &[String], set: &[(&'static str, String)]) -> Flow {
    for name in remove {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
    }
    for (name, value) in set {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }
    if set.iter().any(|(name, _)| *name == canary::ROUTE_HEADER) {
        // Envoy 1.40 re-resolves the route after a header edit by itself; newer versions need
        // this (hosts without the function simply answer an error, which is ignored).
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }
    Flow::Continue
}

/// The client address for rate limits and canary stickiness.
fn client_ip(config: &Config, headers: &[policy::HeaderPair]) -> Option<String> {
    let hops = config.rate_limits.trusted_hops;
    let xff = if hops > 0 {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    } else {
        None
    };
    let peer = hostcalls::get_property(vec!["source", "address"]).ok().flatten();
    let peer = peer.as_deref().and_then(|b| std::str::from_utf8(b).ok());
    ratelimit::client_ip(peer, xff, hops)
}

fn shared(key: &str) -> Option<Vec<u8>> {
    hostcalls::get_shared_data(key).ok().and_then(|(bytes, _)| bytes)
}

impl Request {
    /// Takes a token from each bucket that applies; the first refusal answers 429.
    fn rate_limit(
        &mut self,
        limits: &crate::config::RouteLimits,
        user: Option<&str>,
        ip: Option<&str>,
    ) -> Result<(), Reply> {
        let now_ms = now_ms();
        for check in ratelimit::plan(limits, &self.config.rate_limits, user, ip) {
            let idx = kind_index(check.kind);
            match ratelimit::consume(&HostStore, &check.key, check.fingerprint, &check.limit, now_ms) {
                Update::Done(v) if v.allowed => {
                    if let Some(id) = self.metrics.rl_allowed.get(idx) {
                        Metrics::inc(*id);
                    }
                    if check.kind == Kind::Route && limits.cluster_wide {
                        cluster::add(&HostStore, &limits.pending_key, 1);
                    }
                    if self.rate_limit.is_none_or(|b| v.remaining < b.remaining) {
                        self.rate_limit = Some(v);
                    }
                }
                Update::Done(v) => {
                    if let Some(id) = self.metrics.rl_limited.get(idx) {
                        Metrics::inc(*id);
                    }
                    self.rate_limit = Some(v);
                    return Err(Reply::too_many(
                        check.kind,
                        &v,
                        check.limit.period_ms / 1000,
                        self.trace_id(),
                    ));
                }
                Update::GaveUp { conflicts } => {
                    Metrics::inc(self.metrics.rl_contended);
                    warn!(
                        "rate limit bucket {} contended ({conflicts} CAS conflicts): allowed",
                        check.key
                    );
                }
            }
        }
        Ok(())
    }

    fn trace_id(&self) -> &str {
        self.trace_id.as_deref().unwrap_or_default()
    }

    fn reply(&self, reply: Reply) {
        self.decision.set(reply.reason);
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(status) =
            hostcalls::send_http_response(u32::from(reply.status), headers, Some(reply.body.as_bytes()))
        {
            error!("send_http_response failed: {status:?}");
        }
    }

    fn error(&self, status: u16, message: &str) -> Flow {
        self.reply(Reply::error(status, message, self.trace_id()));
        Flow::Paused
    }

    fn json(&self, body: serde_json::Value) -> Reply {
        Reply::json(200, body.to_string(), self.trace_id())
    }

    fn revoked(&self) -> Flow {
        Metrics::inc(self.metrics.revoked);
        let mut reply = Reply::error(401, MSG_REVOKED, self.trace_id());
        reply.reason = "revoked";
        self.reply(reply);
        Flow::Paused
    }

    fn dispatch(&self, rv: &Revocation, path: &str) -> Result<u32, StoreError> {
        hostcalls::dispatch_http_call(
            &rv.cluster,
            vec![(":method", "GET"), (":path", path), (":authority", &rv.cluster)],
            None,
            vec![],
            Duration::from_millis(rv.timeout_ms),
        )
        .map_err(|s| StoreError::Dispatch(format!("{s:?}")))
    }

    /// Local ban table, then the cache, then one MGET through webdis.
    fn check(&mut self, rv: &Revocation, then: Then, caller: Caller) -> Flow {
        let now_ms = now_ms();
        if let Some(sub) = &caller.identity.user_id {
            let ban_slot = Slot::of("u", sub, rv.cache_slots);
            if let Some(before) = rv::local_ban(shared(&ban_slot.ban_key()).as_deref(), &ban_slot, now_ms) {
                let ban = Lookup {
                    blacklisted: false,
                    revoked_before: Some(before),
                };
                if ban.revokes(caller.identity.issued_at) {
                    return self.revoked();
                }
            }
        }
        let slot = Slot::of("t", &caller.token, rv.cache_slots);
        if rv.cache_ttl_ms > 0 {
            if let Some(lookup) = CacheEntry::fresh(
                shared(&slot.cache_key()).as_deref(),
                &slot,
                now_ms,
                rv.cache_ttl_ms,
            ) {
                Metrics::inc(self.metrics.cache_hits);
                return if lookup.revokes(caller.identity.issued_at) {
                    self.revoked()
                } else {
                    self.proceed(then, caller)
                };
            }
        }
        Metrics::inc(self.metrics.lookups);
        let with_user = caller.identity.user_id.is_some();
        let path = rv::lookup_path(&caller.token, caller.identity.user_id.as_deref());
        match self.dispatch(rv, &path) {
            Ok(token_id) => {
                self.pending = Some(Pending::Check {
                    token_id,
                    then,
                    caller,
                    slot,
                    with_user,
                });
                Flow::Paused
            }
            Err(e) => self.store_failed(then, caller, e),
        }
    }

    fn store_failed(&mut self, then: Then, caller: Caller, e: StoreError) -> Flow {
        Metrics::inc(self.metrics.store_errors);
        warn!("revocation lookup failed: {e}");
        let mode = self
            .config
            .revocation
            .as_ref()
            .map(|r| r.failure_mode)
            .unwrap_or_default();
        match mode {
            FailureMode::Deny => self.error(503, MSG_STORE_DOWN),
            FailureMode::Allow => {
                Metrics::inc(self.metrics.allowed_on_error);
                self.proceed(then, caller)
            }
        }
    }

    /// The token is not revoked: forward, or perform the endpoint's write.
    fn proceed(&mut self, then: Then, caller: Caller) -> Flow {
        match then {
            Then::Forward { remove, set } => forward(&remove, &set),
            Then::Endpoint(endpoint) => self.write(endpoint, caller),
        }
    }

    fn write(&mut self, endpoint: Endpoint, caller: Caller) -> Flow {
        let config = Rc::clone(&self.config);
        let query = match &endpoint {
            Endpoint::LogsByTrace(id) => Some(("trace_id", id.clone(), access_log::trace_key(id), u32::MAX)),
            Endpoint::LogsByUser { user_id, limit } => {
                Some(("user_id", user_id.clone(), access_log::user_key(user_id), *limit))
            }
            _ => None,
        };
        if let Some((label, id, key, limit)) = query {
            let Some(store) = config.logs.store.as_ref() else {
                return self.error(404, policy::MSG_ROUTE_NOT_FOUND);
            };
            let count = if limit == u32::MAX {
                store.user_records.max(100)
            } else {
                limit
            };
            let path = access_log::range_path(&key, count);
            let call = hostcalls::dispatch_http_call(
                &store.cluster,
                vec![
                    (":method", "GET"),
                    (":path", &path),
                    (":authority", &store.cluster),
                ],
                None,
                vec![],
                Duration::from_millis(store.timeout_ms),
            );
            return match call {
                Ok(token_id) => {
                    self.pending = Some(Pending::Query { token_id, label, id });
                    Flow::Paused
                }
                Err(e) => {
                    Metrics::inc(self.metrics.log_errors);
                    warn!("log store query dispatch failed: {e:?}");
                    self.error(503, "Log store unavailable")
                }
            };
        }
        let Some(rv) = config.revocation.as_ref() else {
            return self.error(404, policy::MSG_ROUTE_NOT_FOUND);
        };
        let now_s = unix_seconds(now());
        let now_ms = now_ms();
        let blacklist_locally = |token: &str| {
            let slot = Slot::of("t", token, rv.cache_slots);
            let entry = CacheEntry {
                fingerprint: slot.fingerprint,
                stored_at_ms: now_ms,
                lookup: Lookup {
                    blacklisted: true,
                    revoked_before: None,
                },
            };
            let _ = hostcalls::set_shared_data(&slot.cache_key(), Some(&entry.encode()), None);
        };
        let remaining = caller.identity.expires_at.saturating_sub(now_s);
        let (path, on_ok) = match endpoint {
            // Answered above.
            Endpoint::LogsByTrace(_) | Endpoint::LogsByUser { .. } => {
                return self.error(404, policy::MSG_ROUTE_NOT_FOUND);
            }
            Endpoint::Logout => {
                blacklist_locally(&caller.token);
                (
                    rv::setex_path(&rv::blacklist_key(&caller.token), remaining, "1"),
                    self.json(serde_json::json!({"message": "Logged out successfully"})),
                )
            }
            Endpoint::Refresh { ttl_seconds } => {
                let mut jti = [0u8; 16];
                jti.copy_from_slice(random_bytes().get(..16).unwrap_or(&[0u8; 16]));
                let issued = config
                    .verifier
                    .as_ref()
                    .ok_or_else(|| "no verifier".to_string())
                    .and_then(|v| v.issue(&caller.identity, now_s, ttl_seconds, &uuid_v4(jti)));
                let new_token = match issued {
                    Ok(t) => t,
                    Err(e) => {
                        error!("cannot issue a token: {e}");
                        return self.error(500, "Internal Gateway Error");
                    }
                };
                blacklist_locally(&caller.token);
                (
                    rv::setex_path(&rv::blacklist_key(&caller.token), remaining, "1"),
                    self.json(serde_json::json!({"access_token": new_token, "token_type": "bearer"})),
                )
            }
            Endpoint::RevokeUser(user) => {
                let ban_slot = Slot::of("u", &user, rv.cache_slots);
                let expires = now_ms.saturating_add(rv.ban_ttl_seconds.saturating_mul(1000));
                let entry = rv::ban_entry(&ban_slot, now_s, expires);
                let _ = hostcalls::set_shared_data(&ban_slot.ban_key(), Some(&entry), None);
                let ttl = i64::try_from(rv.ban_ttl_seconds).unwrap_or(i64::MAX);
                (
                    rv::setex_path(&rv::ban_key(&user), ttl, &now_s.to_string()),
                    self.json(serde_json::json!({
                        "message": format!("All tokens of user {user} issued before now are revoked"),
                        "user_id": user,
                        "revoked_before": now_s,
                    })),
                )
            }
        };
        match self.dispatch(rv, &path) {
            Ok(token_id) => {
                self.pending = Some(Pending::Write { token_id, on_ok });
                Flow::Paused
            }
            Err(e) => {
                Metrics::inc(self.metrics.store_errors);
                warn!("revocation store write failed: {e}");
                self.error(503, MSG_STORE_DOWN)
            }
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let start = now();
        self.started = Some(start);
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(status) => {
                error!("cannot read request headers: {status:?}");
                self.error(500, "Internal Gateway Error");
                return Action::Pause;
            }
        };
        let config = Rc::clone(&self.config);
        let Outcome {
            trace,
            action,
            identity,
            token,
            route,
        } = policy::decide(&config, &headers, unix_seconds(start), &fast_random());
        self.trace_id = Some(trace.trace_id);
        let matched = route
            .as_deref()
            .and_then(|name| config.routes.iter().find(|r| r.name == name));
        let forwarding = matches!(action, policy::Action::Forward { .. });
        let needs_ip = matched.is_some_and(|r| {
            r.limits.is_some() || r.canary.as_ref().is_some_and(|c| c.sticky == Sticky::ClientIp)
        });
        let ip = if (forwarding && needs_ip) || config.logs.enabled || config.logs.store.is_some() {
            client_ip(&config, &headers)
        } else {
            None
        };
        let log_head = config.logs.enabled || config.logs.store.is_some();
        let user = identity.as_ref().and_then(|i| i.user_id.as_deref());
        if let (Some(limits), true) = (matched.and_then(|r| r.limits.as_ref()), forwarding) {
            if let Err(reply) = self.rate_limit(limits, user, ip.as_deref()) {
                self.reply(reply);
                return Action::Pause;
            }
        }
        let mut action = action;
        let mut canary_choice = None;
        if let (Some(route), policy::Action::Forward { set, .. }) = (matched, &mut action) {
            if let Some(settings) = &route.canary {
                let (to_canary, headers_to_set) =
                    canary::route_headers(settings, &headers, user, ip.as_deref());
                set.extend(headers_to_set);
                if let Some([stable, canary]) = self.metrics.canary.get(&route.name) {
                    Metrics::inc(if to_canary { *canary } else { *stable });
                }
                canary_choice = Some(to_canary);
            }
        }
        self.route = route.clone();
        if log_head {
            self.head = Some(Head {
                user_id: identity.as_ref().and_then(|i| i.user_id.clone()),
                client_ip: ip,
                canary: canary_choice,
                headers,
            });
        }
        let then = match action {
            policy::Action::Reply(reply) => {
                self.reply(reply);
                return Action::Pause;
            }
            policy::Action::Forward { remove, set } => Then::Forward { remove, set },
            policy::Action::Endpoint(e) => Then::Endpoint(e),
        };
        let flow = match (then, config.revocation.as_ref(), identity, token) {
            (then, Some(rv), Some(identity), Some(token)) => self.check(rv, then, Caller { identity, token }),
            (Then::Forward { remove, set }, ..) => forward(&remove, &set),
            (then @ Then::Endpoint(_), None, Some(identity), Some(token)) => {
                self.proceed(then, Caller { identity, token })
            }
            (Then::Endpoint(_), ..) => self.error(404, policy::MSG_ROUTE_NOT_FOUND),
        };
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Paused => Action::Pause,
        }
    }

    fn on_log(&mut self) {
        let status = self.status.unwrap_or(0);
        let started = self.started.unwrap_or(UNIX_EPOCH);
        let duration_ms = now()
            .duration_since(started)
            .unwrap_or(Duration::ZERO)
            .as_secs_f64()
            * 1000.0;
        let decision = self.decision.get();
        let _ = hostcalls::record_metric(self.metrics.duration, duration_ms.round() as u64);
        let route = metric_part(self.route.as_deref().unwrap_or("none"));
        inc_named(&format!("gateway_requests_{route}_{}_total", outcome(decision)));
        if is_auth_failure(decision) {
            inc_named(&format!("gateway_auth_failures_{decision}_total"));
        }
        let Some(head) = self.head.take() else { return };
        let level = access_log::level(status);
        let store = self.config.logs.store.as_ref();
        // Build the line only if Envoy will print it or the store wants it.
        let print = self.config.logs.enabled && envoy_logs(level);
        if !print && store.is_none() {
            return;
        }
        let mut record = new_record(&head, started, self.trace_id(), self.route.as_deref());
        record.status = status;
        record.duration_ms = duration_ms;
        record.decision = decision.to_string();
        let json = record.to_json();
        if print {
            match level {
                access_log::Level::Error => error!("{json}"),
                access_log::Level::Warn => warn!("{json}"),
                access_log::Level::Info => info!("{json}"),
            }
        }
        if let Some(store) = store {
            let stored = StoredRecord {
                trace_id: record.trace_id,
                user_id: record.user_id,
                json,
            };
            let pushed = LOG_BUFFER.with(|b| {
                let mut b = b.borrow_mut();
                if b.len() >= store.buffer as usize {
                    return false;
                }
                b.push_back(stored);
                true
            });
            if !pushed {
                Metrics::inc(self.metrics.log_dropped);
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        self.status = hostcalls::get_map_value_bytes(MapType::HttpResponseHeaders, ":status")
            .ok()
            .flatten()
            .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u16>().ok()));
        if let Some(v) = &self.rate_limit {
            for (name, value) in policy::ratelimit_headers(v) {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(&value));
            }
        }
        if let Some(id) = &self.trace_id {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, HEADER_TRACE_ID, Some(id));
        }
        if let Some(start) = self.started {
            let elapsed = now().duration_since(start).unwrap_or(Duration::ZERO);
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                HEADER_RESPONSE_TIME,
                Some(&policy::response_time(elapsed)),
            );
        }
        Action::Continue
    }
}
