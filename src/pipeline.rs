//! The orchestrator: one [`Gateway`] per VM composes the duties into the request path and
//! drives every request through explicit phases, through the [`Host`] trait only.
//!
//! The order of checks, and why:
//! 1. route and method (404/405 before any work);
//! 2. the per-IP bucket: cheap, and sheds a flood before it reaches the verifier or the store;
//! 3. authentication and roles;
//! 4. revocation (may pause for one webdis lookup, coalesced per token);
//! 5. the per-user and per-route buckets: only a caller whose token is valid and not revoked
//!    spends the user's or the route's budget;
//! 6. canary, then forward (or perform the gateway endpoint's write, replying only once the
//!    store confirmed it).
//!
//! A request refused at any step charges no bucket after that step and moves no canary counter.
//! The gateway's own endpoints pass the per-IP and per-user buckets of the route they sit under.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;

use crate::access_log::{self, LogStore, Record};
use crate::canary::{self, Sticky};
use crate::config::{Config, Route};
use crate::headers::{self, HeaderPair};
use crate::host::{Callout, Host, LocalStore, LogLevel, MetricKind};
use crate::jwt::{KeyContext, KeySet, TokenCache};
use crate::outcome::Outcome;
use crate::policy::{self, Caller, Endpoint, Refused, Target};
use crate::ratelimit::lease::Leases;
use crate::ratelimit::{self, cluster, Check, Kind, RouteLimits, SharedStore, SyncTarget, Update, Verdict};
use crate::reply::Reply;
use crate::revocation::{self as rv, CacheEntry, FailureMode, Lookup, Revocation, Slot, StoreError};
use crate::trace::{uuid_v4, TraceContext, HEADER_TRACE_ID, RANDOM_BYTES};

pub const HEADER_RESPONSE_TIME: &str = "x-response-time";
pub const MSG_REVOKED: &str = "Token has been revoked";
pub const MSG_STORE_DOWN: &str = "Revocation service unavailable";
pub const MSG_WRITE_FAILED: &str =
    "Revocation service unavailable: the change was not recorded, the token may still be valid";

/// How often each VM hands its counts to the host (Envoy itself flushes stats every 5 s).
pub const COUNTER_FLUSH_MS: u64 = 1000;
/// Records written per VM per flush, and the cap on outstanding log-store calls.
const FLUSH_BATCH: usize = 200;
const MAX_LOG_CALLS_IN_FLIGHT: usize = 1000;
/// The largest webdis reply read (a log query of 100 clipped records is under 0.5 MB).
const MAX_STORE_REPLY_BYTES: usize = 4 << 20;

/// What the host should do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Continue,
    Pause,
}

/// Whether a step let the request go on, or left it paused (a reply was sent or a call is out).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Paused,
}

/// Counter and histogram ids.
struct Metrics {
    lookups: u32,
    coalesced: u32,
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
    /// Dropped records by class: anonymous, authenticated.
    log_dropped_class: [u32; 2],
    log_errors: u32,
}

fn kind_index(kind: Kind) -> usize {
    match kind {
        Kind::Ip => 0,
        Kind::User => 1,
        Kind::Route => 2,
    }
}

/// A name inside a metric name: `.` separates Envoy's stat name segments, so it becomes `_`;
/// `-` stays (route names keep their spelling, and become the `route` label in Prometheus
/// through the rendered `stats_tags`).
fn metric_part(s: &str) -> String {
    s.replace('.', "_")
}

impl Metrics {
    fn define(cfg: &Config, host: &mut dyn Host) -> Result<Self, String> {
        let mut def = |kind, name: &str| {
            host.define_metric(kind, name)
                .ok_or_else(|| format!("cannot define metric {name}"))
        };
        let mut canary = HashMap::new();
        for r in cfg.routes.iter().filter(|r| r.canary.is_some()) {
            let base = metric_part(&r.name);
            canary.insert(
                r.name.clone(),
                [
                    def(
                        MetricKind::Counter,
                        &format!("gateway_canary_{base}_stable_total"),
                    )?,
                    def(
                        MetricKind::Counter,
                        &format!("gateway_canary_{base}_canary_total"),
                    )?,
                ],
            );
        }
        let c = MetricKind::Counter;
        Ok(Metrics {
            lookups: def(c, "gateway_revocation_lookups_total")?,
            coalesced: def(c, "gateway_revocation_coalesced_total")?,
            cache_hits: def(c, "gateway_revocation_cache_hits_total")?,
            revoked: def(c, "gateway_revocation_revoked_total")?,
            store_errors: def(c, "gateway_revocation_store_errors_total")?,
            allowed_on_error: def(c, "gateway_revocation_allowed_on_error_total")?,
            rl_allowed: [
                def(c, "gateway_ratelimit_ip_allowed_total")?,
                def(c, "gateway_ratelimit_user_allowed_total")?,
                def(c, "gateway_ratelimit_route_allowed_total")?,
            ],
            rl_limited: [
                def(c, "gateway_ratelimit_ip_limited_total")?,
                def(c, "gateway_ratelimit_user_limited_total")?,
                def(c, "gateway_ratelimit_route_limited_total")?,
            ],
            rl_contended: def(c, "gateway_ratelimit_contended_total")?,
            rl_sync_errors: def(c, "gateway_ratelimit_sync_errors_total")?,
            duration: def(MetricKind::Histogram, "gateway_request_duration_ms")?,
            log_stored: def(c, "gateway_log_records_stored_total")?,
            log_dropped: def(c, "gateway_log_records_dropped_total")?,
            log_dropped_class: [
                def(c, "gateway_log_records_dropped_anonymous_total")?,
                def(c, "gateway_log_records_dropped_authenticated_total")?,
            ],
            log_errors: def(c, "gateway_log_store_errors_total")?,
            canary,
        })
    }
}

/// What to do once the caller's token is known not to be revoked.
#[derive(Debug)]
enum Next {
    Route,
    Endpoint(Endpoint),
}

/// A store write the reply waits for, and what the local instance records once it is confirmed.
#[derive(Debug)]
struct Write {
    on_ok: Reply,
    effect: Effect,
    /// For a revoking write (`SET NX`): the reply when another request revoked the token
    /// first (`None`: the same as `on_ok`).
    on_lost: Option<Reply>,
    /// The deciding write (`SET token:revoked:<id> NX`), sent once the first one (the
    /// reference's `token:blacklist:<token>`) is confirmed.
    then: Option<String>,
}

#[derive(Debug)]
enum Effect {
    /// Cache the token (its revocation id) as revoked.
    Blacklist(String),
    /// Record a ban in the local ban table.
    Ban { user: String, since_s: i64 },
}

/// Where a request stands.
#[derive(Debug)]
enum Stage {
    /// Deciding, or forwarded, or answered: nothing outstanding.
    Idle,
    /// Waiting for a revocation lookup (its own, or one it joined).
    Revocation(Next),
    /// Waiting for the store to confirm an endpoint's write.
    Write(Write),
    /// Waiting for signing keys its token needs (a fetch is out, here or in another VM).
    Keys { target: Target, deadline_ms: u64 },
    /// Waiting for the log store's answer to a query.
    Query {
        label: &'static str,
        id: String,
        limit: u32,
    },
}

/// One request's state.
struct Request {
    /// Its context id.
    ctx: u32,
    started_ms: u64,
    /// The last time read from the host for this request (its start, or its resumption).
    clock_ms: u64,
    trace: TraceContext,
    headers: Vec<HeaderPair>,
    /// The route matched (or the one a gateway endpoint sits under).
    route: Option<usize>,
    caller: Option<Caller>,
    /// The caller's token was found valid and not revoked (the request reached phase 5): only
    /// then does its record count as authenticated in the log store.
    cleared: bool,
    client_ip: Option<String>,
    stage: Stage,
    /// When its wait for signing keys ends (set at its first wait; 0: the answer is final).
    keys_deadline_ms: Option<u64>,
    /// The binding bucket's verdict, for the `X-RateLimit-*` response headers.
    verdict: Option<Verdict>,
    canary: Option<bool>,
    /// How it ended: forwarded, or the outcome of the gateway's own reply.
    outcome: Outcome,
    status: Option<u16>,
    /// Time from the request headers to the response headers.
    elapsed_us: Option<u64>,
}

/// What an outstanding callout is for.
#[derive(Debug)]
enum Call {
    /// A revocation lookup: for every request waiting on token `key` (coalesced), or for one
    /// request (`key` = None).
    Lookup {
        key: Option<u64>,
        context: u32,
    },
    Write {
        context: u32,
    },
    Query {
        context: u32,
    },
    /// A log-store write; `then` are the commands to send once it is answered (the trim and
    /// expiry of the list it pushed to: sent after the push, they run after it in Redis, even
    /// though webdis serves calls on several connections in any order).
    LogWrite {
        then: Vec<String>,
    },
    Sync {
        route: String,
        delta: u64,
    },
    /// A JWKS fetch for issuer `issuer`.
    Jwks {
        issuer: usize,
    },
}

/// A revocation lookup in flight, and the requests waiting for it.
struct Inflight {
    /// The context that dispatched it; `None` once that context is gone (the answer will not
    /// come: the next tick dispatches again for the waiters).
    owner: Option<u32>,
    user: Option<String>,
    token: String,
    revocation_id: String,
    waiters: Vec<u32>,
}

struct StoredRecord {
    trace_id: String,
    user_id: Option<String>,
    json: String,
}

/// One VM's gateway: the configuration, the metrics, and the state every request and timer
/// shares (verified tokens, coalesced lookups, outstanding calls, buffered log records).
pub struct Gateway {
    config: Rc<Config>,
    metrics: Metrics,
    counts: HashMap<u32, i64>,
    named: HashMap<String, u32>,
    tokens: TokenCache,
    rng: fastrand::Rng,
    /// Tokens this VM took from busy shared buckets and spends locally.
    leases: Leases,
    /// Tokens this VM found not revoked, while no revocation was recorded since.
    clean: rv::CleanMemo,
    vm_id: u64,
    requests: HashMap<u32, Request>,
    calls: HashMap<u32, Call>,
    /// The nonce each outstanding webdis call's reply must carry (see [`crate::webdis::nonce_path`]).
    nonces: HashMap<u32, u64>,
    inflight: HashMap<u64, Inflight>,
    log_buffer: VecDeque<StoredRecord>,
    /// How many of the buffered records are anonymous (no user).
    anonymous_buffered: usize,
    log_calls: usize,
    last_totals: HashMap<String, u64>,
    log_level: Option<LogLevel>,
    last_counters_ms: u64,
    last_flush_ms: u64,
    last_sync_ms: u64,
    /// Fetched key sets by issuer index (what the verifier reads), and their fetch state.
    key_sets: Vec<Option<Rc<KeySet>>>,
    jwks: Vec<keys::JwksState>,
    /// Whether the host checks RSA/ECDSA signatures (probed once).
    host_verifies: bool,
    /// The key of the per-IP and per-user slot hash, shared by every VM of the store.
    slot_seed: ratelimit::SlotSeed,
    /// This VM's own store, where the host has no shared data (probed once).
    local: Option<LocalStore>,
    /// Whether the host runs timers (false: nothing periodic happens; see [`Gateway::started`]).
    timers: bool,
}

/// Shared data: the host's, or this VM's own where the host has none.
fn shared<'a>(local: &'a Option<LocalStore>, host: &'a dyn Host) -> &'a dyn SharedStore {
    match local {
        Some(store) => store,
        None => host,
    }
}

/// Runs `f` with what verification needs: the VM's fetched key sets and, when the host checks
/// signatures, that check.
fn with_keys<R>(
    key_sets: &[Option<Rc<KeySet>>],
    host_verifies: bool,
    host: &mut dyn Host,
    f: impl FnOnce(KeyContext<'_>) -> R,
) -> R {
    let mut check = |h: &str, k: &[u8], s: &[u8], m: &[u8]| host.verify_signature(h, k, s, m);
    f(KeyContext {
        remote: key_sets,
        native: if host_verifies { Some(&mut check) } else { None },
    })
}

/// The key the start-up probe writes to find out whether the host has shared data.
const PROBE_KEY: &str = "gw:probe";

fn unix_seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

impl Gateway {
    /// Builds the VM's gateway: defines the metrics and pre-creates every rate-limit key.
    pub fn new(config: Config, host: &mut dyn Host) -> Result<Self, String> {
        let metrics = Metrics::define(&config, host)?;
        let mut seed = [0u8; 16];
        host.random_bytes(&mut seed);
        let (a, b) = seed.split_at(8);
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(s.get(..8).unwrap_or(&[1u8; 8]));
            u64::from_le_bytes(w)
        };
        let mut gw = Gateway {
            config: Rc::new(config),
            metrics,
            counts: HashMap::new(),
            named: HashMap::new(),
            tokens: TokenCache::default(),
            rng: fastrand::Rng::with_seed(word(a)),
            leases: Leases::default(),
            clean: rv::CleanMemo::default(),
            vm_id: word(b).max(1),
            requests: HashMap::new(),
            calls: HashMap::new(),
            nonces: HashMap::new(),
            inflight: HashMap::new(),
            log_buffer: VecDeque::new(),
            anonymous_buffered: 0,
            log_calls: 0,
            last_totals: HashMap::new(),
            log_level: None,
            last_counters_ms: 0,
            last_flush_ms: 0,
            last_sync_ms: 0,
            key_sets: Vec::new(),
            jwks: Vec::new(),
            host_verifies: false,
            slot_seed: ratelimit::SlotSeed::default(),
            local: None,
            timers: true,
        };
        let probe = host.set(PROBE_KEY, b"1", None).is_ok() && host.get(PROBE_KEY).is_some();
        if !probe {
            gw.local = Some(LocalStore::default());
        }
        let issuers = gw.config.verifier.as_ref().map_or(0, |v| v.issuers().len());
        gw.key_sets = vec![None; issuers];
        gw.jwks = (0..issuers).map(|_| keys::JwksState::default()).collect();
        if let Some(v) = gw.config.verifier.as_ref().filter(|v| v.uses_public_keys()) {
            gw.host_verifies = v.host_verification
                && crate::jwt::native::probe::works(&mut |h, k, s, m| host.verify_signature(h, k, s, m));
            let how = if gw.host_verifies {
                "the host's verify_signature (RSA, ECDSA) and compiled-in code (PSS, EdDSA)"
            } else {
                "compiled-in code"
            };
            host.log(
                LogLevel::Info,
                &format!("public-key signatures are checked by {how}"),
            );
        }
        let mut fresh = [0u8; 16];
        host.random_bytes(&mut fresh);
        gw.slot_seed = ratelimit::SlotSeed::load_or_create(shared(&gw.local, host), fresh);
        gw.create_rate_limit_keys(shared(&gw.local, host));
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The timer period this VM needs: counters, the log flush, the limit sync.
    pub fn tick_period_ms(&self) -> u64 {
        let cfg = &self.config;
        let sync = cfg.rate_limits.sync.as_ref().map(|s| s.interval_ms);
        let flush = cfg.logs.store.as_ref().map(|s| s.flush_interval_ms);
        let jwks = cfg
            .verifier
            .as_ref()
            .and_then(|v| v.remotes().next())
            .map(|_| keys::JWKS_TICK_MS);
        [sync, flush, jwks, Some(COUNTER_FLUSH_MS)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(COUNTER_FLUSH_MS)
    }

    /// Creates every rate-limit key up front, so request-time updates are CAS on existing keys.
    fn create_rate_limit_keys(&self, store: &dyn SharedStore) {
        let cfg = &self.config;
        let mut any = false;
        for limits in cfg.routes.iter().filter_map(|r| r.limits.as_ref()) {
            ratelimit::ensure_key(store, &limits.route_key);
            if limits.cluster_wide {
                ratelimit::ensure_key(store, &limits.pending_key);
                ratelimit::ensure_key(store, cluster::LEADER_KEY);
            }
            any = true;
        }
        if any {
            let s = &cfg.rate_limits;
            for (kind, slots) in [("i", s.ip_slots), ("u", s.user_slots)] {
                for i in 0..u64::from(slots) {
                    ratelimit::ensure_key(store, &ratelimit::slot_key_at(kind, i));
                }
            }
        }
    }

    /// Counts locally; [`Gateway::on_tick`] hands the totals to the host. A host call per
    /// counter per request was a large part of the filter's cost.
    fn inc(&mut self, id: u32) {
        *self.counts.entry(id).or_insert(0) += 1;
    }

    fn inc_named(&mut self, name: &str, host: &mut dyn Host) {
        let id = match self.named.get(name) {
            Some(id) => Some(*id),
            None => {
                let id = host.define_metric(MetricKind::Counter, name);
                if let Some(id) = id {
                    self.named.insert(name.to_string(), id);
                }
                id
            }
        };
        if let Some(id) = id {
            self.inc(id);
        }
    }

    // ---------------------------------------------------------------- request phases

    /// The request head arrived: run the phases until the request is forwarded, answered, or
    /// waits for a callout.
    pub fn on_request_headers(&mut self, ctx: u32, host: &mut dyn Host) -> Action {
        let now_ms = host.now_ms();
        let request = host.request_headers();
        let mut random = [0u8; RANDOM_BYTES];
        self.rng.fill(&mut random);
        let config = Rc::clone(&self.config);
        let headers = request.unwrap_or_default();
        let classified = policy::classify(&config, &headers, &random);
        let mut req = Request {
            ctx,
            started_ms: now_ms,
            clock_ms: now_ms,
            trace: classified.trace,
            headers,
            route: None,
            caller: None,
            cleared: false,
            client_ip: None,
            stage: Stage::Idle,
            keys_deadline_ms: None,
            verdict: None,
            canary: None,
            outcome: Outcome::Forwarded,
            status: None,
            elapsed_us: None,
        };
        let flow = match classified.target {
            Err(reply) => self.reply(&mut req, reply, host),
            Ok(target) => self.start(ctx, &mut req, &config, target, now_ms, host),
        };
        self.requests.insert(ctx, req);
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Paused => Action::Pause,
        }
    }

    fn start(
        &mut self,
        ctx: u32,
        req: &mut Request,
        config: &Config,
        target: Target,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Flow {
        let now = unix_seconds(now_ms);
        match target {
            Target::Passthrough => {
                self.note_client(req, config, None, host);
                self.forward(req, host)
            }
            Target::Route(i) => {
                let Some(route) = config.routes.get(i) else {
                    return self.error(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND, host);
                };
                req.route = Some(i);
                self.note_client(req, config, Some(route), host);
                // Phase 2: the per-IP bucket.
                if let Err(reply) = self.charge_ip(req, route.limits.as_ref(), now_ms, host) {
                    return self.reply(req, reply, host);
                }
                // Phases 3 to 6.
                self.authenticate(ctx, req, config, Target::Route(i), now, true, host)
            }
            Target::Endpoint { path, under } => {
                req.route = under;
                let route = under.and_then(|i| config.routes.get(i));
                self.note_client(req, config, route, host);
                if let Err(reply) = self.charge_ip(req, route.and_then(|r| r.limits.as_ref()), now_ms, host) {
                    return self.reply(req, reply, host);
                }
                self.authenticate(
                    ctx,
                    req,
                    config,
                    Target::Endpoint { path, under },
                    now,
                    true,
                    host,
                )
            }
        }
    }

    /// Phase 3 (authentication and roles) for a route or an endpoint, then phase 4
    /// (revocation); phases 5 and 6 follow in `proceed`. `may_wait`: a token whose issuer's keys
    /// the VM lacks may wait for a fetch (once).
    #[allow(clippy::too_many_arguments)]
    fn authenticate(
        &mut self,
        ctx: u32,
        req: &mut Request,
        config: &Config,
        target: Target,
        now: i64,
        may_wait: bool,
        host: &mut dyn Host,
    ) -> Flow {
        let trace_id = req.trace.trace_id.clone();
        match target {
            Target::Route(i) => {
                let Some(route) = config.routes.get(i) else {
                    return self.error(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND, host);
                };
                let decided = with_keys(&self.key_sets, self.host_verifies, host, |keys| {
                    policy::authenticate(
                        config,
                        &mut self.tokens,
                        keys,
                        route,
                        &req.headers,
                        now,
                        &trace_id,
                        may_wait,
                    )
                });
                match decided {
                    Ok(caller) => req.caller = caller,
                    Err(Refused::Reply(reply)) => return self.reply(req, reply, host),
                    Err(Refused::AwaitKeys(issuer)) => {
                        return self.await_keys(ctx, req, target, issuer, host)
                    }
                }
                self.check_revocation(ctx, req, Next::Route, true, host)
            }
            Target::Endpoint { ref path, .. } => {
                let decided = with_keys(&self.key_sets, self.host_verifies, host, |keys| {
                    policy::verified_caller(
                        config,
                        &mut self.tokens,
                        keys,
                        &req.headers,
                        now,
                        &trace_id,
                        may_wait,
                    )
                });
                let caller = match decided {
                    Ok(c) => c,
                    Err(Refused::Reply(reply)) => return self.reply(req, reply, host),
                    Err(Refused::AwaitKeys(issuer)) => {
                        return self.await_keys(ctx, req, target, issuer, host)
                    }
                };
                let endpoint = match policy::endpoint(config, path, &caller, &req.headers, now, &trace_id) {
                    Ok(e) => e,
                    Err(reply) => return self.reply(req, reply, host),
                };
                req.caller = Some(caller);
                // Endpoints do their own lookup: they dispatch a write afterwards, which must
                // come from their own callback.
                self.check_revocation(ctx, req, Next::Endpoint(endpoint), false, host)
            }
            Target::Passthrough => self.forward(req, host),
        }
    }

    /// Reads the client address when limits, canary stickiness or logs need it.
    fn note_client(
        &mut self,
        req: &mut Request,
        config: &Config,
        route: Option<&Route>,
        host: &mut dyn Host,
    ) {
        let needs = route.is_some_and(|r| {
            r.limits.is_some() || r.canary.as_ref().is_some_and(|c| c.sticky == Sticky::ClientIp)
        }) || config.logs.enabled
            || config.logs.store.is_some();
        if !needs {
            return;
        }
        let hops = config.rate_limits.trusted_hops;
        let xff = if hops > 0 {
            headers::get_str(&req.headers, "x-forwarded-for")
        } else {
            None
        };
        let peer = host.source_address();
        req.client_ip = ratelimit::client_ip(peer.as_deref(), xff, hops);
    }

    /// Takes a token from one bucket; `Err` is the 429 to send.
    fn charge(
        &mut self,
        req: &mut Request,
        check: &Check,
        limits: &RouteLimits,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Result<(), Reply> {
        let idx = kind_index(check.kind);
        // A live lease answers without touching shared data; else take a batch (one token for
        // limits too small to lease) and keep the rest.
        let batch = ratelimit::lease::batch(&check.limit);
        let leased = if batch > 1 {
            self.leases
                .spend(&check.key, check.fingerprint, &check.limit, now_ms)
        } else {
            None
        };
        let (update, taken) = match leased {
            Some(v) => (Update::Done(v), 0),
            None => {
                let store = shared(&self.local, host);
                let (update, taken) =
                    ratelimit::consume(store, &check.key, check.fingerprint, &check.limit, now_ms, batch);
                if let (Update::Done(v), true) = (&update, batch > 1) {
                    self.leases
                        .hold(&check.key, check.fingerprint, &check.limit, now_ms, taken, v);
                }
                (update, taken)
            }
        };
        match update {
            Update::Done(v) if v.allowed => {
                if let Some(id) = self.metrics.rl_allowed.get(idx).copied() {
                    self.inc(id);
                }
                // Cluster-wide routes count what left the shared bucket (a whole batch at once).
                if check.kind == Kind::Route && limits.cluster_wide && taken > 0 {
                    cluster::add(shared(&self.local, host), &limits.pending_key, taken);
                }
                if req.verdict.is_none_or(|b| v.remaining < b.remaining) {
                    req.verdict = Some(v);
                }
                Ok(())
            }
            Update::Done(v) => {
                if let Some(id) = self.metrics.rl_limited.get(idx).copied() {
                    self.inc(id);
                }
                req.verdict = Some(v);
                Err(ratelimit::too_many(
                    check.kind,
                    &v,
                    check.limit.period_ms / 1000,
                    &req.trace.trace_id,
                ))
            }
            Update::GaveUp { conflicts } => {
                let id = self.metrics.rl_contended;
                self.inc(id);
                host.log(
                    LogLevel::Warn,
                    &format!(
                        "rate limit bucket {} contended ({conflicts} CAS conflicts): allowed",
                        check.key
                    ),
                );
                Ok(())
            }
        }
    }

    fn charge_ip(
        &mut self,
        req: &mut Request,
        limits: Option<&RouteLimits>,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Result<(), Reply> {
        let (Some(limits), Some(ip)) = (limits, req.client_ip.clone()) else {
            return Ok(());
        };
        let check = limits.ip_check(&self.config.rate_limits, &self.slot_seed, &ip);
        self.charge(req, &check, limits, now_ms, host)
    }

    /// Phase 4: the local ban table, then the cache, then one MGET through webdis (joined by
    /// every request for the same token that arrives while it is out, when `coalesce`).
    fn check_revocation(
        &mut self,
        ctx: u32,
        req: &mut Request,
        next: Next,
        coalesce: bool,
        host: &mut dyn Host,
    ) -> Flow {
        let config = Rc::clone(&self.config);
        let (Some(rv), Some(caller)) = (config.revocation.as_ref(), req.caller.as_ref()) else {
            return self.proceed(req, next, host);
        };
        let now_ms = req.clock_ms;
        let issued_at = caller.identity.authenticated_at();
        // Cached by what the signature signs: every encoding of one signed token shares one
        // answer, so a logout here reaches a twin that was cached as clean a moment ago.
        let slot = Slot::of("t", &caller.identity.revocation_id, rv.cache_slots);
        // The gateway's endpoints (logout, refresh, bans) ask the store itself, never a cached
        // answer: a refresh must not mint from a lineage banned on another gateway a moment ago.
        let cached = rv.cache_ttl_ms > 0 && matches!(next, Next::Route);
        // This VM's memo of a clean answer holds while no revocation was recorded since (the
        // epoch is the CAS of one shared key every local revocation write touches): one read.
        let epoch = if cached {
            let epoch = shared(&self.local, host).get(rv::EPOCH_KEY).map(|(_, cas)| cas);
            if self.clean.holds(slot.fingerprint, epoch, now_ms) {
                let id = self.metrics.cache_hits;
                self.inc(id);
                return self.proceed(req, next, host);
            }
            Some(epoch)
        } else {
            None
        };
        if let Some(sub) = &caller.identity.user_id {
            let ban_slot = Slot::of("u", sub, rv.cache_slots);
            let stored = shared(&self.local, host).get(&ban_slot.ban_key()).map(|(b, _)| b);
            if let Some(before) = rv::local_ban(stored.as_deref(), &ban_slot, now_ms) {
                let ban = Lookup {
                    blacklisted: false,
                    revoked_before: Some(before),
                };
                if ban.revokes(issued_at) {
                    return self.revoked(req, host);
                }
            }
        }
        if let Some(epoch) = epoch {
            let stored = shared(&self.local, host).get(&slot.cache_key()).map(|(b, _)| b);
            if let Some(entry) = CacheEntry::fresh(stored.as_deref(), &slot, now_ms, rv.cache_ttl_ms) {
                let id = self.metrics.cache_hits;
                self.inc(id);
                return if entry.lookup.revokes(issued_at) {
                    self.revoked(req, host)
                } else {
                    let until = entry.stored_at_ms.saturating_add(rv.cache_ttl_ms);
                    self.clean.remember(slot.fingerprint, epoch, until);
                    self.proceed(req, next, host)
                };
            }
        }
        if coalesce {
            if let Some(inflight) = self.inflight.get_mut(&slot.fingerprint) {
                inflight.waiters.push(ctx);
                req.stage = Stage::Revocation(next);
                let id = self.metrics.coalesced;
                self.inc(id);
                return Flow::Paused;
            }
        }
        let user = caller.identity.user_id.clone();
        let token = caller.token.clone();
        let revocation_id = caller.identity.revocation_id.clone();
        match self.dispatch_lookup(rv, &token, &revocation_id, user.as_deref(), host) {
            Ok(token_id) => {
                let key = coalesce.then_some(slot.fingerprint);
                self.calls.insert(token_id, Call::Lookup { key, context: ctx });
                if coalesce {
                    self.inflight.insert(
                        slot.fingerprint,
                        Inflight {
                            owner: Some(ctx),
                            user,
                            token,
                            revocation_id,
                            waiters: vec![ctx],
                        },
                    );
                }
                req.stage = Stage::Revocation(next);
                Flow::Paused
            }
            Err(e) => self.store_failed(req, next, &e, host),
        }
    }

    fn dispatch_lookup(
        &mut self,
        rv: &Revocation,
        token: &str,
        revocation_id: &str,
        user: Option<&str>,
        host: &mut dyn Host,
    ) -> Result<u32, StoreError> {
        let id = self.metrics.lookups;
        self.inc(id);
        let path = rv::lookup_path(token, revocation_id, user);
        self.revocation_call(rv, &path, host)
            .map_err(StoreError::Dispatch)
    }

    /// One call to the revocation store (a lookup or a write).
    fn revocation_call(&mut self, rv: &Revocation, path: &str, host: &mut dyn Host) -> Result<u32, String> {
        let config = Rc::clone(&self.config);
        self.webdis_call(
            Callout {
                cluster: &rv.cluster,
                method: "GET",
                path,
                body: None,
                timeout_ms: rv.timeout_ms,
                authorization: config.webdis_auth.as_deref(),
                authority: config.webdis_authority.as_deref(),
            },
            host,
        )
    }

    /// Dispatches a webdis command with a fresh nonce its reply must echo.
    fn webdis_call(&mut self, call: Callout<'_>, host: &mut dyn Host) -> Result<u32, String> {
        let nonce = self.rng.u64(..);
        let path = crate::webdis::nonce_path(call.path, nonce);
        let token_id = host.dispatch(Callout { path: &path, ..call })?;
        self.nonces.insert(token_id, nonce);
        Ok(token_id)
    }

    fn revoked(&mut self, req: &mut Request, host: &mut dyn Host) -> Flow {
        let id = self.metrics.revoked;
        self.inc(id);
        let reply = Reply::refuse(Outcome::Revoked, MSG_REVOKED, &req.trace.trace_id);
        self.reply(req, reply, host)
    }

    fn store_failed(&mut self, req: &mut Request, next: Next, e: &StoreError, host: &mut dyn Host) -> Flow {
        let id = self.metrics.store_errors;
        self.inc(id);
        host.log(LogLevel::Warn, &format!("revocation lookup failed: {e}"));
        let mode = self
            .config
            .revocation
            .as_ref()
            .map(|r| r.failure_mode)
            .unwrap_or_default();
        match mode {
            FailureMode::Deny => self.error(req, Outcome::StoreUnavailable, MSG_STORE_DOWN, host),
            FailureMode::Allow => {
                let id = self.metrics.allowed_on_error;
                self.inc(id);
                self.proceed(req, next, host)
            }
        }
    }

    /// Phases 5 and 6: the token is valid and not revoked.
    fn proceed(&mut self, req: &mut Request, next: Next, host: &mut dyn Host) -> Flow {
        req.cleared = req.caller.is_some();
        let config = Rc::clone(&self.config);
        let route = req.route.and_then(|i| config.routes.get(i));
        let limits = route.and_then(|r| r.limits.as_ref());
        let now_ms = req.clock_ms;
        let user = req.caller.as_ref().and_then(|c| c.identity.user_id.clone());
        if let (Some(limits), Some(user)) = (limits, user.as_deref()) {
            let check = limits.user_check(&config.rate_limits, &self.slot_seed, user);
            if let Err(reply) = self.charge(req, &check, limits, now_ms, host) {
                return self.reply(req, reply, host);
            }
        }
        match next {
            Next::Endpoint(endpoint) => self.perform(req, endpoint, host),
            Next::Route => {
                if let Some(limits) = limits {
                    if let Err(reply) = self.charge(req, &limits.route_check(), limits, now_ms, host) {
                        return self.reply(req, reply, host);
                    }
                }
                let mut forward = policy::forward_headers(
                    &config,
                    &req.headers,
                    &req.trace,
                    req.caller.as_ref().map(|c| &c.identity),
                );
                if let Some(route) = route {
                    if let Some(settings) = &route.canary {
                        let (to_canary, set) = canary::route_headers(
                            settings,
                            &req.headers,
                            user.as_deref(),
                            req.client_ip.as_deref(),
                        );
                        forward.set.extend(set);
                        if let Some([stable, canary]) = self.metrics.canary.get(&route.name).copied() {
                            self.inc(if to_canary { canary } else { stable });
                        }
                        req.canary = Some(to_canary);
                    }
                }
                apply(&forward, host);
                Flow::Continue
            }
        }
    }

    /// Forwards a request that no route check applies to (the passthrough paths).
    fn forward(&mut self, req: &mut Request, host: &mut dyn Host) -> Flow {
        let forward = policy::forward_headers(&self.config, &req.headers, &req.trace, None);
        apply(&forward, host);
        Flow::Continue
    }

    /// A gateway endpoint: query the log store, or write to the revocation store and reply
    /// once the write is confirmed.
    fn perform(&mut self, req: &mut Request, endpoint: Endpoint, host: &mut dyn Host) -> Flow {
        let config = Rc::clone(&self.config);
        let trace_id = req.trace.trace_id.clone();
        let query = match &endpoint {
            Endpoint::LogsByTrace(id) => Some(("trace_id", id.clone(), access_log::trace_key(id), u32::MAX)),
            Endpoint::LogsByUser { user_id, limit } => {
                Some(("user_id", user_id.clone(), access_log::user_key(user_id), *limit))
            }
            _ => None,
        };
        if let Some((label, id, key, limit)) = query {
            let Some(store) = config.logs.store.as_ref() else {
                return self.error(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND, host);
            };
            // Fetch the whole (bounded) list: workers flush independently, so list order is
            // flush order; the reply is sorted by request time before the limit applies.
            let path = access_log::range_path(&key, store.user_records.max(100));
            let call = self.webdis_call(
                Callout {
                    cluster: &store.cluster,
                    method: "GET",
                    path: &path,
                    body: None,
                    timeout_ms: store.timeout_ms,
                    authorization: store.authorization.as_deref(),
                    authority: Some(&store.authority),
                },
                host,
            );
            return match call {
                Ok(token_id) => {
                    self.calls.insert(token_id, Call::Query { context: req.ctx });
                    req.stage = Stage::Query { label, id, limit };
                    Flow::Paused
                }
                Err(e) => {
                    let id = self.metrics.log_errors;
                    self.inc(id);
                    host.log(LogLevel::Warn, &format!("log store query dispatch failed: {e}"));
                    self.error(req, Outcome::StoreUnavailable, "Log store unavailable", host)
                }
            };
        }
        let (Some(rv), Some(caller)) = (config.revocation.as_ref(), req.caller.clone()) else {
            return self.error(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND, host);
        };
        let now_ms = req.clock_ms;
        let now_s = unix_seconds(now_ms);
        // Blacklisted for as long as any check would accept the token: until `exp` plus the
        // clock skew the verifier allows.
        let skew = config
            .verifier
            .as_ref()
            .map_or(0, |v| v.clock_skew(caller.identity.issuer));
        let keep = caller
            .identity
            .expires_at
            .saturating_add(skew)
            .saturating_sub(now_s)
            .saturating_add(1);
        let (path, write) = match endpoint {
            Endpoint::LogsByTrace(_) | Endpoint::LogsByUser { .. } => {
                return self.error(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND, host);
            }
            Endpoint::Logout => (
                rv::blacklist_path(&caller.token, keep),
                Write {
                    on_ok: Reply::ok(
                        &serde_json::json!({"message": "Logged out successfully"}),
                        &trace_id,
                    ),
                    effect: Effect::Blacklist(caller.identity.revocation_id.clone()),
                    on_lost: None,
                    then: Some(rv::revoke_path(&caller.identity.revocation_id, keep)),
                },
            ),
            Endpoint::Refresh { ttl_seconds } => {
                let own = config
                    .verifier
                    .as_ref()
                    .is_some_and(|v| v.can_issue(caller.identity.issuer));
                if !own {
                    let name = config
                        .verifier
                        .as_ref()
                        .and_then(|v| v.issuer(caller.identity.issuer))
                        .map_or("?", |i| i.name.as_str());
                    let msg = format!("Tokens of issuer '{name}' are refreshed by their identity provider");
                    return self.error(req, Outcome::BadRequest, &msg, host);
                }
                let jti = uuid_v4(self.rng.u128(..).to_le_bytes());
                let issued = config
                    .verifier
                    .as_ref()
                    .ok_or_else(|| "no verifier".to_string())
                    .and_then(|v| v.issue(&caller.identity, now_s, ttl_seconds, &jti));
                let new_token = match issued {
                    Ok(t) => t,
                    Err(e) => {
                        host.log(LogLevel::Error, &format!("cannot issue a token: {e}"));
                        return self.error(req, Outcome::Internal, "Internal Gateway Error", host);
                    }
                };
                (
                    rv::blacklist_path(&caller.token, keep),
                    Write {
                        on_ok: Reply::ok(
                            &serde_json::json!({"access_token": new_token, "token_type": "bearer"}),
                            &trace_id,
                        ),
                        effect: Effect::Blacklist(caller.identity.revocation_id.clone()),
                        // A concurrent refresh of the same token (or of a twin) won: this one
                        // mints nothing.
                        on_lost: Some(Reply::refuse(Outcome::Revoked, MSG_REVOKED, &trace_id)),
                        then: Some(rv::revoke_path(&caller.identity.revocation_id, keep)),
                    },
                )
            }
            Endpoint::RevokeUser(user) => {
                let ttl = i64::try_from(rv.ban_ttl_seconds).unwrap_or(i64::MAX);
                (
                    rv::setex_path(&rv::ban_key(&user), ttl, &now_s.to_string()),
                    Write {
                        on_ok: Reply::ok(
                            &serde_json::json!({
                                "message": format!("All tokens of user {user} issued up to now are revoked"),
                                "user_id": user,
                                "revoked_before": now_s,
                            }),
                            &trace_id,
                        ),
                        effect: Effect::Ban { user, since_s: now_s },
                        on_lost: None,
                        then: None,
                    },
                )
            }
        };
        self.send_write(req, write, &path, host)
    }

    /// Sends one revocation write; the request waits for its confirmation.
    fn send_write(&mut self, req: &mut Request, write: Write, path: &str, host: &mut dyn Host) -> Flow {
        let config = Rc::clone(&self.config);
        let sent = match config.revocation.as_ref() {
            Some(rv) => self.revocation_call(rv, path, host),
            None => Err("no revocation store".to_string()),
        };
        match sent {
            Ok(token_id) => {
                self.calls.insert(token_id, Call::Write { context: req.ctx });
                req.stage = Stage::Write(write);
                Flow::Paused
            }
            Err(e) => self.write_failed(req, &e, host),
        }
    }

    /// A revocation write that was not confirmed: 503, and nothing recorded here either.
    fn write_failed(&mut self, req: &mut Request, e: &dyn std::fmt::Display, host: &mut dyn Host) -> Flow {
        let id = self.metrics.store_errors;
        self.inc(id);
        host.log(LogLevel::Warn, &format!("revocation store write failed: {e}"));
        self.error(req, Outcome::StoreUnavailable, MSG_WRITE_FAILED, host)
    }

    fn reply(&mut self, req: &mut Request, reply: Reply, host: &mut dyn Host) -> Flow {
        req.outcome = reply.outcome;
        req.stage = Stage::Idle;
        host.send_reply(&reply);
        Flow::Paused
    }

    fn error(&mut self, req: &mut Request, outcome: Outcome, message: &str, host: &mut dyn Host) -> Flow {
        let reply = Reply::refuse(outcome, message, &req.trace.trace_id);
        self.reply(req, reply, host)
    }

    // ---------------------------------------------------------------- callouts

    /// A callout answered. `ctx` is the context it was delivered to.
    pub fn on_call_response(&mut self, ctx: u32, token_id: u32, body_size: usize, host: &mut dyn Host) {
        let Some(call) = self.calls.remove(&token_id) else {
            return;
        };
        // An answer larger than the filter parses is not even read (its size comes first).
        let limit = match call {
            Call::Jwks { .. } => crate::jwt::keys::MAX_JWKS_BYTES,
            _ => MAX_STORE_REPLY_BYTES,
        };
        let oversized = body_size > limit;
        let (mut status, mut body) = host.call_response(if oversized { 0 } else { body_size });
        if oversized && !matches!(call, Call::Jwks { .. }) {
            host.log(
                LogLevel::Warn,
                &format!("store reply of {body_size} bytes not read (limit {limit}): treated as a failure"),
            );
            status = None;
        }
        if let Some(nonce) = self.nonces.remove(&token_id) {
            if status == Some(200) {
                match crate::webdis::unwrap_reply(nonce, &body) {
                    Some(inner) => body = inner.to_vec(),
                    None => {
                        // Another call's reply: as good as none.
                        host.log(
                            LogLevel::Warn,
                            "webdis reply without this call's nonce (a reply for another call): treated as a store failure",
                        );
                        self.inc_named("gateway_store_misrouted_replies_total", host);
                        status = None;
                        body.clear();
                    }
                }
            }
        }
        match call {
            Call::Jwks { issuer } => self.jwks_answered(ctx, issuer, status, &body, oversized, host),
            Call::Lookup { key, context } => {
                let waiters = match key {
                    Some(key) => match self.inflight.remove(&key) {
                        Some(inflight) => inflight.waiters,
                        None => return,
                    },
                    None => vec![context],
                };
                self.lookup_answered(ctx, &waiters, status, &body, host);
            }
            Call::Write { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Write(write) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return Flow::Paused;
                };
                gw.write_answered(req, write, status, &body, host)
            }),
            Call::Query { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Query { label, id, limit } = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return Flow::Paused;
                };
                gw.query_answered(req, label, &id, limit, status, &body, host)
            }),
            Call::LogWrite { then } => {
                self.log_calls = self.log_calls.saturating_sub(1);
                let ok = access_log::write_ok(status, &body);
                let id = if ok {
                    self.metrics.log_stored
                } else {
                    self.metrics.log_errors
                };
                self.inc(id);
                let config = Rc::clone(&self.config);
                if let Some(store) = config.logs.store.as_ref() {
                    for path in then {
                        self.store_call(store, "GET", &path, None, Vec::new(), host);
                    }
                }
            }
            Call::Sync { route, delta } => self.sync_answered(&route, delta, status, &body, host),
        }
    }

    /// Runs `f` on request `context` with it as the host's current context (switching to it
    /// and back when the answer was delivered elsewhere); resumes it when `f` lets it go on.
    fn with_request(
        &mut self,
        current: u32,
        context: u32,
        host: &mut dyn Host,
        f: impl FnOnce(&mut Self, &mut Request, &mut dyn Host) -> Flow,
    ) {
        let Some(mut req) = self.requests.remove(&context) else {
            return;
        };
        let switched = context != current;
        if switched && !host.switch_to(context) {
            self.requests.insert(context, req);
            return;
        }
        if f(self, &mut req, host) == Flow::Continue {
            host.resume();
        }
        self.requests.insert(context, req);
        if switched {
            host.switch_to(current);
        }
    }

    fn lookup_answered(
        &mut self,
        current: u32,
        waiters: &[u32],
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) {
        let config = Rc::clone(&self.config);
        let Some(rv) = config.revocation.as_ref() else {
            return;
        };
        let first = waiters.first().and_then(|w| self.requests.get(w));
        let with_user = first
            .and_then(|r| r.caller.as_ref())
            .is_some_and(|c| c.identity.user_id.is_some());
        let revocation_id = first
            .and_then(|r| r.caller.as_ref())
            .map(|c| c.identity.revocation_id.clone());
        let result = rv::parse_lookup(status, body, with_user);
        let now_ms = host.now_ms();
        if let (Ok(lookup), Some(id)) = (&result, revocation_id) {
            if rv.cache_ttl_ms > 0 {
                let slot = Slot::of("t", &id, rv.cache_slots);
                let entry = CacheEntry {
                    fingerprint: slot.fingerprint,
                    stored_at_ms: now_ms,
                    lookup: *lookup,
                };
                let _ = shared(&self.local, host).set(&slot.cache_key(), &entry.encode(), None);
                if lookup.blacklisted || lookup.revoked_before.is_some() {
                    rv::bump_epoch(shared(&self.local, host));
                }
            }
        }
        for &w in waiters {
            self.with_request(current, w, host, |gw, req, host| {
                let Stage::Revocation(next) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return Flow::Paused;
                };
                req.clock_ms = now_ms;
                let issued_at = req.caller.as_ref().and_then(|c| c.identity.authenticated_at());
                match &result {
                    Ok(lookup) if lookup.revokes(issued_at) => gw.revoked(req, host),
                    Ok(_) => gw.proceed(req, next, host),
                    Err(e) => gw.store_failed(req, next, e, host),
                }
            });
        }
    }

    fn write_answered(
        &mut self,
        req: &mut Request,
        mut write: Write,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) -> Flow {
        if let Some(then) = write.then.take() {
            // The reference's key is written; now the deciding write.
            return match rv::parse_setex(status, body) {
                Ok(()) => self.send_write(req, write, &then, host),
                Err(e) => self.write_failed(req, &e, host),
            };
        }
        let outcome = match write.effect {
            Effect::Blacklist(_) => rv::parse_set_nx(status, body),
            Effect::Ban { .. } => rv::parse_setex(status, body).map(|()| true),
        };
        let won = match outcome {
            Ok(won) => won,
            Err(e) => return self.write_failed(req, &e, host),
        };
        // Confirmed: now this instance applies it too (at once, without waiting for its cache).
        let config = Rc::clone(&self.config);
        if let Some(rv) = config.revocation.as_ref() {
            let now_ms = host.now_ms();
            match &write.effect {
                Effect::Blacklist(token) => {
                    let slot = Slot::of("t", token, rv.cache_slots);
                    let entry = CacheEntry {
                        fingerprint: slot.fingerprint,
                        stored_at_ms: now_ms,
                        lookup: Lookup {
                            blacklisted: true,
                            revoked_before: None,
                        },
                    };
                    let _ = shared(&self.local, host).set(&slot.cache_key(), &entry.encode(), None);
                }
                Effect::Ban { user, since_s } => {
                    let slot = Slot::of("u", user, rv.cache_slots);
                    let expires = now_ms.saturating_add(rv.ban_ttl_seconds.saturating_mul(1000));
                    let _ = shared(&self.local, host).set(
                        &slot.ban_key(),
                        &rv::ban_entry(&slot, *since_s, expires),
                        None,
                    );
                }
            }
            // After the entry: every VM's memo of clean answers is void from here on.
            rv::bump_epoch(shared(&self.local, host));
        }
        let reply = match (won, write.on_lost) {
            (false, Some(lost)) => lost,
            _ => write.on_ok,
        };
        self.reply(req, reply, host)
    }

    #[allow(clippy::too_many_arguments)]
    fn query_answered(
        &mut self,
        req: &mut Request,
        label: &str,
        id: &str,
        limit: u32,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) -> Flow {
        match access_log::parse_range(status, body) {
            Ok(records) if records.is_empty() => {
                self.error(req, Outcome::NotFound, "No log records found", host)
            }
            Ok(mut records) => {
                access_log::newest_first(&mut records);
                records.truncate(limit as usize);
                let body = serde_json::json!({ label: id, "count": records.len(), "records": records });
                let reply = Reply::ok(&body, &req.trace.trace_id);
                self.reply(req, reply, host)
            }
            Err(e) => {
                let id = self.metrics.log_errors;
                self.inc(id);
                host.log(LogLevel::Warn, &format!("log store query failed: {e}"));
                self.error(req, Outcome::StoreUnavailable, "Log store unavailable", host)
            }
        }
    }

    // ---------------------------------------------------------------- response and end

    pub fn on_response_headers(&mut self, ctx: u32, host: &mut dyn Host) {
        let logs = self.config.logs.enabled || self.config.logs.store.is_some();
        let Some(req) = self.requests.get_mut(&ctx) else {
            return;
        };
        if logs {
            req.status = host.response_status();
        }
        if let Some(v) = &req.verdict {
            for (name, value) in ratelimit::headers(v) {
                host.set_response_header(name, &value);
            }
        }
        host.set_response_header(HEADER_TRACE_ID, &req.trace.trace_id);
        let now_ms = host.now_ms();
        let elapsed_us = now_ms.saturating_sub(req.started_ms).saturating_mul(1000);
        req.elapsed_us = Some(elapsed_us);
        host.set_response_header(HEADER_RESPONSE_TIME, &policy::response_time(elapsed_us));
    }

    /// The stream ended: metrics, the log line and record.
    pub fn on_log(&mut self, ctx: u32, host: &mut dyn Host) {
        let Some(req) = self.requests.remove(&ctx) else {
            return;
        };
        self.forget(ctx, host);
        let elapsed_us = match req.elapsed_us {
            Some(us) => us,
            None => host.now_ms().saturating_sub(req.started_ms).saturating_mul(1000),
        };
        let duration_ms = elapsed_us as f64 / 1000.0;
        host.record_metric(self.metrics.duration, (elapsed_us + 500) / 1000);
        let config = Rc::clone(&self.config);
        let route = req
            .route
            .and_then(|i| config.routes.get(i))
            .map(|r| r.name.as_str());
        let outcome = req.outcome;
        let decision = outcome.decision();
        self.inc_named(
            &format!(
                "gateway_requests_{}_{}_total",
                metric_part(route.unwrap_or("none")),
                outcome.label()
            ),
            host,
        );
        if outcome.is_auth_failure() {
            self.inc_named(&format!("gateway_auth_failures_{decision}_total"), host);
        }
        // Records are written by the timer: without timers there is no log store.
        let store = config.logs.store.as_ref().filter(|_| self.timers);
        let status = req.status.unwrap_or(0);
        let level = match access_log::level(status) {
            access_log::Level::Error => LogLevel::Error,
            access_log::Level::Warn => LogLevel::Warn,
            access_log::Level::Info => LogLevel::Info,
        };
        // Build the line only if the host prints it or the store wants it.
        let print = config.logs.enabled && self.log_level(host) <= level;
        if !print && store.is_none() {
            return;
        }
        let mut record = new_record(&req, route);
        record.status = status;
        record.duration_ms = duration_ms;
        record.decision = decision.to_string();
        let json = record.to_json();
        if print {
            host.log(level, &json);
        }
        if let Some(store) = store {
            // What the store keeps: requests that went upstream, and the gateway's answers to
            // callers whose token was valid and not revoked. Refused anonymous requests
            // (unrouted paths, missing, invalid or revoked tokens, per-IP limits) are counted
            // and printed, never stored: they cannot fill the store or crowd out the records
            // of authenticated callers.
            if !req.cleared && outcome != Outcome::Forwarded {
                self.inc_named("gateway_log_records_skipped_total", host);
                return;
            }
            let stored = StoredRecord {
                trace_id: record.trace_id,
                user_id: record.user_id.filter(|_| req.cleared),
                json,
            };
            self.buffer_record(stored, store.buffer as usize);
        }
    }

    /// Queues a record for the store. Anonymous records may fill half the buffer; a record of an
    /// authenticated caller may use all of it, pushing out the oldest anonymous one, so a flood
    /// of anonymous noise cannot keep the requests of users and admins out of the audit log.
    /// Drops are counted by class.
    fn buffer_record(&mut self, record: StoredRecord, capacity: usize) {
        let anonymous_cap = capacity / 2;
        let dropped = if record.user_id.is_none() {
            if self.anonymous_buffered >= anonymous_cap || self.log_buffer.len() >= capacity {
                Some(0)
            } else {
                self.anonymous_buffered += 1;
                self.log_buffer.push_back(record);
                None
            }
        } else if self.log_buffer.len() < capacity {
            self.log_buffer.push_back(record);
            None
        } else if let Some(i) = self.log_buffer.iter().position(|r| r.user_id.is_none()) {
            self.log_buffer.remove(i);
            self.anonymous_buffered = self.anonymous_buffered.saturating_sub(1);
            self.log_buffer.push_back(record);
            Some(0)
        } else {
            Some(1)
        };
        if let Some(class) = dropped {
            let total = self.metrics.log_dropped;
            self.inc(total);
            if let Some(id) = self.metrics.log_dropped_class.get(class).copied() {
                self.inc(id);
            }
        }
    }

    /// The context is gone (also after `on_log`): drop its state. A lookup it dispatched will
    /// not be answered; its waiters get a new one on the next tick.
    /// The context is deleted. A request still here was never logged: the host has no `on_log`
    /// (APISIX), so it is logged now.
    pub fn on_done(&mut self, ctx: u32, host: &mut dyn Host) {
        if self.requests.contains_key(&ctx) {
            self.on_log(ctx, host);
        }
        self.forget(ctx, host);
    }

    /// Start-up is over: `timers` says whether the host took the tick period. Logs one line
    /// with what the host offers and what is degraded for want of it.
    pub fn started(&mut self, timers: bool, host: &mut dyn Host) {
        self.timers = timers;
        let cfg = Rc::clone(&self.config);
        let mut degraded: Vec<&str> = Vec::new();
        if self.local.is_some() {
            degraded.push("no shared data: rate limits, the revocation cache and bans are per worker");
        }
        if !timers {
            degraded.push("no timers: counters not reported, no log store, no cluster-wide sync, key sets fetched only when a token needs them");
        }
        let public_keys = cfg.verifier.as_ref().is_some_and(|v| v.uses_public_keys());
        if public_keys && !self.host_verifies {
            degraded.push("no verify_signature: RSA and ECDSA checked by the module's own code");
        }
        let line = format!(
            "host offers: shared data {}, timers {}, verify_signature {}; {}",
            if self.local.is_none() { "yes" } else { "no" },
            if timers { "yes" } else { "no" },
            if self.host_verifies { "yes" } else { "no" },
            if degraded.is_empty() {
                "nothing degraded".to_string()
            } else {
                format!("degraded: {}", degraded.join("; "))
            }
        );
        let level = if degraded.is_empty() {
            LogLevel::Info
        } else {
            LogLevel::Warn
        };
        host.log(level, &line);
    }

    fn forget(&mut self, ctx: u32, host: &mut dyn Host) {
        self.forget_key_waiter(ctx, host);
        let mut orphaned = Vec::new();
        for (key, inflight) in self.inflight.iter_mut() {
            inflight.waiters.retain(|w| *w != ctx);
            if inflight.owner == Some(ctx) {
                inflight.owner = None;
                orphaned.push(*key);
            }
        }
        if !orphaned.is_empty() {
            self.calls
                .retain(|_, call| !matches!(call, Call::Lookup { key: Some(k), .. } if orphaned.contains(k)));
            let calls = &self.calls;
            self.nonces.retain(|id, _| calls.contains_key(id));
        }
        self.inflight
            .retain(|_, i| !(i.owner.is_none() && i.waiters.is_empty()));
    }

    fn log_level(&mut self, host: &mut dyn Host) -> LogLevel {
        match self.log_level {
            Some(l) => l,
            None => {
                let l = host.log_level();
                self.log_level = Some(l);
                l
            }
        }
    }

    // ---------------------------------------------------------------- timers

    /// The VM's timer (`ctx` is the root context): counters, the log level, the log flush, the
    /// limit sync (leader only), and new lookups for waiters whose lookup lost its owner.
    pub fn on_tick(&mut self, ctx: u32, host: &mut dyn Host) {
        let now = host.now_ms();
        if self.due(now, self.last_counters_ms, COUNTER_FLUSH_MS) {
            self.last_counters_ms = now;
            let mut pending: Vec<(u32, i64)> = self.counts.drain().collect();
            pending.sort_unstable();
            for (id, n) in pending {
                host.increment_metric(id, n);
            }
            // The host's log level can change at runtime: re-read it here, not per request.
            self.log_level = Some(host.log_level());
        }
        let config = Rc::clone(&self.config);
        if let Some(store) = &config.logs.store {
            if self.due(now, self.last_flush_ms, store.flush_interval_ms) {
                self.last_flush_ms = now;
                self.flush_logs(store, host);
            }
        }
        if let Some(sync) = &config.rate_limits.sync {
            if self.due(now, self.last_sync_ms, sync.interval_ms) {
                self.last_sync_ms = now;
                self.sync_limits(&config, sync, now, host);
            }
        }
        self.adopt_orphans(ctx, host);
        self.jwks_tick(ctx, now, host);
    }

    /// Whether a job run every `period_ms` is due: ticks come every `tick_period_ms` with some
    /// jitter, so half a tick of slack keeps a job whose period equals the tick from skipping
    /// every other tick.
    fn due(&self, now: u64, last: u64, period_ms: u64) -> bool {
        now.saturating_add(self.tick_period_ms() / 2) >= last.saturating_add(period_ms)
    }

    /// Dispatches a new lookup, from the root context, for waiters whose lookup's owner left.
    fn adopt_orphans(&mut self, ctx: u32, host: &mut dyn Host) {
        let config = Rc::clone(&self.config);
        let Some(rv) = config.revocation.as_ref() else {
            return;
        };
        let orphans: Vec<u64> = self
            .inflight
            .iter()
            .filter(|(_, i)| i.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in orphans {
            let Some((token, id, user)) = self
                .inflight
                .get(&key)
                .map(|i| (i.token.clone(), i.revocation_id.clone(), i.user.clone()))
            else {
                continue;
            };
            match self.dispatch_lookup(rv, &token, &id, user.as_deref(), host) {
                Ok(token_id) => {
                    self.calls.insert(
                        token_id,
                        Call::Lookup {
                            key: Some(key),
                            context: ctx,
                        },
                    );
                    if let Some(i) = self.inflight.get_mut(&key) {
                        i.owner = Some(ctx);
                    }
                }
                Err(e) => {
                    let waiters = self.inflight.remove(&key).map(|i| i.waiters).unwrap_or_default();
                    for w in waiters {
                        self.with_request(ctx, w, host, |gw, req, host| {
                            let Stage::Revocation(next) = std::mem::replace(&mut req.stage, Stage::Idle)
                            else {
                                return Flow::Paused;
                            };
                            gw.store_failed(req, next, &e, host)
                        });
                    }
                }
            }
        }
    }

    /// Leader VM only: send each cluster-wide route's local consumption to Redis.
    fn sync_limits(&mut self, config: &Config, sync: &SyncTarget, now: u64, host: &mut dyn Host) {
        if !cluster::elect(
            shared(&self.local, host),
            self.vm_id,
            now,
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
            let busy = self
                .calls
                .values()
                .any(|c| matches!(c, Call::Sync { route, .. } if *route == limits.name));
            if busy {
                continue; // the previous sync of this route is still out
            }
            let delta = cluster::take_all(shared(&self.local, host), &limits.pending_key);
            let path = cluster::incrby_path(&limits.name, delta);
            let call = self.webdis_call(
                Callout {
                    cluster: &sync.cluster,
                    method: "GET",
                    path: &path,
                    body: None,
                    timeout_ms: sync.timeout_ms,
                    authorization: config.webdis_auth.as_deref(),
                    authority: config.webdis_authority.as_deref(),
                },
                host,
            );
            match call {
                Ok(token_id) => {
                    self.calls.insert(
                        token_id,
                        Call::Sync {
                            route: limits.name.clone(),
                            delta,
                        },
                    );
                }
                Err(e) => self.sync_failed(limits, delta, &format!("dispatch failed: {e}"), host),
            }
        }
    }

    /// A sync did not land: count it, and put the consumption back for the next one.
    fn sync_failed(&mut self, limits: &RouteLimits, delta: u64, why: &str, host: &mut dyn Host) {
        let id = self.metrics.rl_sync_errors;
        self.inc(id);
        host.log(
            LogLevel::Warn,
            &format!("rate limit sync of {} failed: {why}", limits.name),
        );
        cluster::add(shared(&self.local, host), &limits.pending_key, delta);
    }

    fn sync_answered(
        &mut self,
        route: &str,
        delta: u64,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) {
        let config = Rc::clone(&self.config);
        let Some(limits) = config
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref())
            .find(|l| l.name == route)
        else {
            return;
        };
        match cluster::parse_incrby(status, body) {
            Ok(total) => {
                let others = cluster::others(self.last_totals.get(route).copied(), total, delta);
                self.last_totals.insert(route.to_string(), total);
                let now = host.now_ms();
                cluster::drain(
                    shared(&self.local, host),
                    &limits.route_key,
                    limits.route_fingerprint,
                    &limits.route,
                    now,
                    others,
                );
            }
            Err(e) => self.sync_failed(limits, delta, &e.to_string(), host),
        }
    }

    /// Writes up to [`FLUSH_BATCH`] buffered records: each appended to its trace's list and
    /// prepended to its user's list (trimmed to the configured count); keys expire with the
    /// retention.
    fn flush_logs(&mut self, store: &LogStore, host: &mut dyn Host) {
        if self.log_calls > MAX_LOG_CALLS_IN_FLIGHT {
            return; // webdis is slow: keep the records buffered
        }
        let n = self.log_buffer.len().min(FLUSH_BATCH);
        let batch: Vec<StoredRecord> = self.log_buffer.drain(..n).collect();
        let anonymous = batch.iter().filter(|r| r.user_id.is_none()).count();
        self.anonymous_buffered = self.anonymous_buffered.saturating_sub(anonymous);
        // Each user's list is trimmed after the last of its records in this batch.
        let last_of_user = |i: usize, user: &str| {
            !batch
                .iter()
                .skip(i + 1)
                .any(|later| later.user_id.as_deref() == Some(user))
        };
        for (i, r) in batch.iter().enumerate() {
            let key = access_log::trace_key(&r.trace_id);
            let json = Some(r.json.as_bytes());
            let then = vec![
                // The first records of a trace stay: a client reusing someone's trace id
                // can add to the list, not push their records out.
                access_log::trim_path(&key, access_log::TRACE_RECORDS),
                access_log::expire_path(&key, store.retention_seconds),
            ];
            self.store_call(store, "PUT", &access_log::append_path(&key), json, then, host);
            if let Some(user) = &r.user_id {
                let key = access_log::user_key(user);
                let then = if last_of_user(i, user) {
                    vec![
                        access_log::trim_path(&key, store.user_records),
                        access_log::expire_path(&key, store.retention_seconds),
                    ]
                } else {
                    Vec::new()
                };
                self.store_call(store, "PUT", &access_log::prepend_path(&key), json, then, host);
            }
        }
    }

    fn store_call(
        &mut self,
        store: &LogStore,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        then: Vec<String>,
        host: &mut dyn Host,
    ) {
        let call = self.webdis_call(
            Callout {
                cluster: &store.cluster,
                method,
                path,
                body,
                timeout_ms: store.timeout_ms,
                authorization: store.authorization.as_deref(),
                authority: Some(&store.authority),
            },
            host,
        );
        match call {
            Ok(token_id) => {
                self.calls.insert(token_id, Call::LogWrite { then });
                self.log_calls += 1;
            }
            Err(e) => {
                let id = self.metrics.log_errors;
                self.inc(id);
                host.log(LogLevel::Warn, &format!("log store dispatch failed: {e}"));
            }
        }
    }
}

/// Applies the decided request-header changes, one write per header: a whole-map write
/// (`proxy_set_header_map_pairs`) makes fewer host calls but measured slower in Envoy (it removes
/// and re-adds every header; README "Per-request cost").
fn apply(forward: &policy::Forward, host: &mut dyn Host) {
    for name in &forward.remove {
        host.set_request_header(name, None);
    }
    for (name, value) in &forward.set {
        host.set_request_header(name, Some(value));
    }
    if forward.set.iter().any(|(name, _)| *name == canary::ROUTE_HEADER) {
        // Envoy 1.40 re-resolves the route after a header edit by itself; newer versions need
        // this (hosts without the function answer an error, which is ignored).
        host.clear_route_cache();
    }
}

/// The request's log record.
fn new_record(req: &Request, route: Option<&str>) -> Record {
    let value = |name: &str| headers::get_str(&req.headers, name);
    let full_path = value(":path").unwrap_or("");
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let upstream = match (route, req.canary) {
        (Some(r), Some(true)) => Some(format!("{r}-canary")),
        (r, _) => r.map(str::to_string),
    };
    Record {
        timestamp_ms: req.started_ms,
        trace_id: req.trace.trace_id.clone(),
        method: access_log::clip(value(":method").unwrap_or(""), access_log::MAX_FIELD).to_string(),
        path: access_log::clip(path, access_log::MAX_PATH).to_string(),
        query_params: access_log::query_params(query),
        client_ip: req.client_ip.clone(),
        user_agent: value("user-agent")
            .map(|ua| access_log::clip(ua, access_log::MAX_USER_AGENT).to_string()),
        user_id: req.caller.as_ref().and_then(|c| c.identity.user_id.clone()),
        route: route.map(str::to_string),
        upstream_service: upstream,
        canary: req.canary,
        status: 0,
        duration_ms: 0.0,
        decision: String::new(),
    }
}

mod keys;
#[cfg(test)]
mod tests;
