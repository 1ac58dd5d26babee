//! Glue between the proxy-wasm host and the pure decision code: read the request head, call
//! [`crate::policy::decide`], then forward (mutating headers), reply, or consult the revocation
//! store through webdis. Nothing here decides; every pause ends in a resume or a reply.
//!
//! `root` holds the per-VM context (configuration, timers for the log flush and the cluster
//! sync); `http` the per-request context; this file the host helpers both use.

mod http;
mod root;

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
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(root::Root::default()) });
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

    /// Counts locally; [`flush_counters`] hands the totals to the host on the VM's timer. A host
    /// call per counter per request was a large part of the filter's cost (make bench).
    fn inc(id: u32) {
        PENDING_COUNTS.with(|c| *c.borrow_mut().entry(id).or_insert(0) += 1);
    }
}

thread_local! {
    /// Counter increments not yet handed to the host (this VM's).
    static PENDING_COUNTS: RefCell<HashMap<u32, i64>> = RefCell::new(HashMap::new());
}

/// How often each VM hands its counts to Envoy's stats (Envoy itself flushes stats every 5 s).
const COUNTER_FLUSH_MS: u64 = 1000;

fn flush_counters() {
    let pending: Vec<(u32, i64)> = PENDING_COUNTS.with(|c| c.borrow_mut().drain().collect());
    for (id, n) in pending {
        let _ = hostcalls::increment_metric(id, n);
    }
}

/// The one way this filter calls webdis: `method` + `path` to the Envoy cluster `cluster` (also
/// the `:authority`), with an optional body (webdis appends a PUT body as the last argument).
fn webdis_call(
    cluster: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout_ms: u64,
) -> Result<u32, proxy_wasm::types::Status> {
    hostcalls::dispatch_http_call(
        cluster,
        vec![(":method", method), (":path", path), (":authority", cluster)],
        body,
        vec![],
        Duration::from_millis(timeout_ms),
    )
}

/// The `:status` of a header map, if it is a number.
fn status_of(map: MapType) -> Option<u16> {
    hostcalls::get_map_value_bytes(map, ":status")
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u16>().ok()))
}

/// `:status` and body of the current HTTP call response.
fn call_response(body_size: usize) -> (Option<u16>, Vec<u8>) {
    let status = status_of(MapType::HttpCallResponseHeaders);
    let body = match hostcalls::get_buffer(BufferType::HttpCallResponseBody, 0, body_size) {
        Ok(Some(b)) => b,
        _ => Vec::new(),
    };
    (status, body)
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

fn shared(key: &str) -> Option<Vec<u8>> {
    hostcalls::get_shared_data(key).ok().and_then(|(bytes, _)| bytes)
}
