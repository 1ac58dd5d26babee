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
use crate::host::{Callout, DispatchError, Host, LocalStore, LogLevel, MetricKind, SharedStore};
use crate::jwt::{Introspection, KeyContext, KeySet, TokenCache, TokenError};
use crate::keyspace::PROBE_KEY;
use crate::outcome::Outcome;
use crate::policy::{self, Caller, Endpoint, EndpointKind, Refused, Target};
use crate::ratelimit::lease::Leases;
use crate::ratelimit::{self, cluster, Check, Kind, RouteLimits, SyncTarget, Update};
use crate::reply::Reply;
use crate::revocation::{self as rv, CacheEntry, FailureMode, Lookup, Revocation, Slot, StoreError};
use crate::stat;
use crate::trace::{uuid_v4, TraceContext, HEADER_TRACE_ID, RANDOM_BYTES};

// The duties the request path orchestrates, each an `impl Gateway` block of its own.
mod binding;
mod callouts;
mod endpoints;
mod introspection;
mod keys;
mod lifecycle;
mod limits;
mod logs;
mod metrics;
mod revocation;
mod state;
mod step;

pub use logs::{bound_records, StoredRecord, RECORD_CLASSES};
use metrics::Metrics;
use state::*;
use step::{refuse, Guarded, Outgoing, Step, Store};

pub const HEADER_RESPONSE_TIME: &str = "x-response-time";
use crate::outcome::message;
pub use crate::outcome::message::{
    REVOKED as MSG_REVOKED, STORE_DOWN as MSG_STORE_DOWN, WRITE_FAILED as MSG_WRITE_FAILED,
};

/// How often each VM hands its counts to the host (Envoy itself flushes stats every 5 s).
pub const COUNTER_FLUSH_MS: u64 = 1000;
/// The cap on log-store pushes a VM sends out. Each record is two pushes (its trace list, its
/// user list), and each push that went in is followed by up to two calls (its list's trim and
/// expiry), so at most about twice this many calls are out; every call holds one of the webdis
/// cluster's connections while it is out (each worker has its own pool), and the cluster's
/// circuit breaker (1,024 connections) is shared with the revocation lookups, which the log
/// flush must never crowd out. Measured at 1,700 requests/s with two workers: a flush of 200
/// records at once held all 1,024 connections (33 overflows); with this cap and the flush going
/// on as answers come, 256.
const MAX_LOG_CALLS_IN_FLIGHT: usize = 64;
/// Room (calls) an answer must leave before it sends more records, so they go in batches.
const LOG_PUMP_ROOM: usize = 16;
/// The largest webdis reply read (a log query of 100 clipped records is under 0.5 MB).
pub const MAX_STORE_REPLY_BYTES: usize = 4 << 20;

/// What the host should do with the request after a callback.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Let it go on (upstream, with the header changes made).
    Continue,
    /// Hold it: a callout is out for it, or it waits for one.
    Pause,
    /// Hold it: the gateway answered it (the reply was handed to the host).
    Replied,
}

/// Where the executor left the request: gone on, held for a call, or answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    Paused,
    Replied,
}

/// One VM's gateway: the configuration, the metrics, and the state every request and timer
/// shares (verified tokens, coalesced lookups, outstanding calls, buffered log records).
pub struct Gateway {
    config: Rc<Config>,
    metrics: Metrics,
    tokens: TokenCache,
    rng: fastrand::Rng,
    vm_id: u64,
    requests: HashMap<u32, Request>,
    /// The callouts out: what each is for, and the nonces of webdis calls.
    calls: callouts::Calls,
    /// Each duty's own state in this VM.
    revocation: revocation::RevocationState,
    introspection: introspection::IntrospectionState,
    keys: keys::KeysState,
    limits: limits::LimitsState,
    logs: logs::LogsState,
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
    may_verify: bool,
    host: &mut dyn Host,
    f: impl FnOnce(KeyContext<'_>) -> R,
) -> R {
    let mut check = |h: &str, k: &[u8], s: &[u8], m: &[u8]| host.verify_signature(h, k, s, m);
    f(KeyContext {
        remote: key_sets,
        native: if host_verifies { Some(&mut check) } else { None },
        may_verify,
    })
}

fn unix_seconds(ms: u64) -> i64 {
    i64::try_from(ms / 1000).unwrap_or(i64::MAX)
}

impl Gateway {
    /// Takes the same configuration with other secrets (the native runtime's SDS rotation):
    /// compiled from the same JSON, so its routes, issuers and settings are the ones the VM's
    /// state is sized to. Tokens verified with the old secrets are checked again.
    pub fn rotate_secrets(&mut self, config: Config) {
        self.config = Rc::new(config);
        self.tokens = TokenCache::default();
    }

    /// Builds the VM's gateway: defines the metrics and pre-creates every rate-limit key.
    pub fn new(config: Config, host: &mut dyn Host) -> Result<Self, String> {
        let metrics = Metrics::define(&config, host)?;
        let mut seed = [0u8; 16];
        let _ = host.random_bytes(&mut seed);
        let (a, b) = seed.split_at(8);
        let word = |s: &[u8]| {
            let mut w = [0u8; 8];
            w.copy_from_slice(s.get(..8).unwrap_or(&[1u8; 8]));
            u64::from_le_bytes(w)
        };
        let mut gw = Gateway {
            config: Rc::new(config),
            metrics,
            tokens: TokenCache::default(),
            rng: fastrand::Rng::with_seed(word(a)),
            vm_id: word(b).max(1),
            requests: HashMap::new(),
            calls: callouts::Calls::default(),
            revocation: revocation::RevocationState::default(),
            introspection: introspection::IntrospectionState::default(),
            keys: keys::KeysState::default(),
            limits: limits::LimitsState::default(),
            logs: logs::LogsState::default(),
            local: None,
            timers: true,
        };
        let probe = host.set(PROBE_KEY, b"1", None).is_ok() && host.get(PROBE_KEY).is_some();
        if !probe {
            gw.local = Some(LocalStore::default());
        } else if host.shared_keys_by_hash() {
            crate::keyspace::check_kong(&gw.config)
                .map_err(|e| format!("invalid configuration for this host: {e}"))?;
        }
        let issuers = gw.config.verifier.as_ref().map_or(0, |v| v.issuers().len());
        gw.keys.sets = vec![None; issuers];
        gw.keys.jwks = (0..issuers).map(|_| keys::JwksState::default()).collect();
        if let Some(v) = gw
            .config
            .verifier
            .as_ref()
            .filter(|v| v.uses_public_keys() || v.uses_dpop())
        {
            gw.keys.host_verifies = v.host_verification
                && crate::jwt::native::probe::works(&mut |h, k, s, m| host.verify_signature(h, k, s, m));
            let how = if gw.keys.host_verifies {
                "the host's verify_signature (RSA, ECDSA) and compiled-in code (PSS, EdDSA)"
            } else {
                "compiled-in code"
            };
            host.log(
                LogLevel::Info,
                &format!("public-key signatures are checked by {how}"),
            );
        }
        // The key of the per-IP and per-user slot hash: from the host's random source only. A
        // key from the clock could be guessed, and with it which addresses share a bucket.
        let mut fresh = [0u8; 16];
        if !host.random_bytes(&mut fresh) {
            return Err("no random source (random_get failed): the rate-limit slot key would be predictable; refusing to start".into());
        }
        gw.limits.slot_seed = ratelimit::SlotSeed::load_or_create(shared(&gw.local, host), fresh);
        gw.create_rate_limit_keys(shared(&gw.local, host));
        gw.create_replay_slots(shared(&gw.local, host));
        Ok(gw)
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    // ---------------------------------------------------------------- request phases

    /// The request head arrived: run the phases until the request is forwarded, answered, or
    /// waits for a callout.
    pub fn on_request_headers(&mut self, ctx: u32, host: &mut dyn Host) -> Action {
        let now_ms = host.now_ms();
        if !self.keys.jwks.is_empty() {
            self.drop_stale_key_sets(now_ms, host);
        }
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
            privileged: false,
            client_ip: None,
            stage: Stage::Idle,
            keys_deadline_ms: None,
            charged: Default::default(),
            canary: None,
            outcome: Outcome::Forwarded,
            status: None,
            elapsed_us: None,
        };
        let step = match classified.target {
            Err(reply) => Step::Reply(reply),
            Ok(target) => self.start(&mut req, &config, target, now_ms, host),
        };
        let flow = self.run(&mut req, step, host);
        self.requests.insert(ctx, req);
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Paused => Action::Pause,
            Flow::Replied => Action::Replied,
        }
    }

    /// Phases 1 and 2: the route (or endpoint) found, the client noted, the per-IP bucket.
    fn start(
        &mut self,
        req: &mut Request,
        config: &Config,
        target: Target,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Step {
        let (route, guarded) = match target {
            Target::Passthrough => {
                self.note_client(req, config, None, host);
                return Step::Forward(policy::forward_headers(config, &req.headers, &req.trace, None));
            }
            Target::Route(i) => {
                let Some(route) = config.routes.get(i) else {
                    return refuse(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND);
                };
                req.route = Some(i);
                req.privileged =
                    !(route.roles.is_empty() && route.roles_all.is_empty() && route.scopes.is_empty());
                (Some(route), Guarded::Route(i))
            }
            Target::Endpoint { path, under } => {
                req.route = under;
                req.privileged = true;
                (under.and_then(|i| config.routes.get(i)), Guarded::Endpoint(path))
            }
        };
        self.note_client(req, config, route, host);
        // Phase 2: the per-IP bucket.
        if let Err(reply) = self.charge_ip(req, route.and_then(|r| r.limits.as_ref()), now_ms, host) {
            return Step::Reply(reply);
        }
        Step::Authenticate {
            guarded,
            may_wait: true,
        }
    }

    /// Phase 3 (authentication and roles) for a route or an endpoint; phase 4 (revocation)
    /// follows. `may_wait`: a token whose issuer's keys the VM lacks may wait for a fetch.
    fn authenticate(
        &mut self,
        req: &mut Request,
        guarded: Guarded,
        may_wait: bool,
        host: &mut dyn Host,
    ) -> Step {
        let config = Rc::clone(&self.config);
        let now = unix_seconds(req.clock_ms);
        let trace_id = req.trace.trace_id.clone();
        // Where the host cannot resume a request from another context (Kong, APISIX), no
        // request waits on another's call: no waiting for keys a fetch brings, and each
        // request makes its own revocation lookup.
        let shared_waits = host.resumes_other_contexts();
        let may_wait = may_wait && shared_waits;
        let may_verify = self.may_verify(req, host);
        let route = match &guarded {
            Guarded::Route(i) => match config.routes.get(*i) {
                Some(route) => Some(route),
                None => return refuse(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND),
            },
            Guarded::Endpoint(_) => None,
        };
        let checks_token = route.is_none_or(|r| r.auth_required);
        if checks_token {
            host.span_open("gateway.jwt");
        }
        let tokens = &mut self.tokens;
        let decided = with_keys(
            &self.keys.sets,
            self.keys.host_verifies,
            may_verify,
            host,
            |keys| match route {
                Some(route) => policy::authenticate(
                    &config,
                    tokens,
                    keys,
                    route,
                    &req.headers,
                    now,
                    &trace_id,
                    may_wait,
                ),
                None => {
                    policy::verified_caller(&config, tokens, keys, &req.headers, now, &trace_id, may_wait)
                        .map(Some)
                }
            },
        );
        if checks_token {
            let verdict = match &decided {
                Ok(_) => "allowed",
                Err(Refused::Reply(r)) => r.outcome.decision(),
                Err(Refused::AwaitKeys(_)) => "await_keys",
                Err(Refused::Introspect(_)) => "opaque",
            };
            host.span_close(&[("gateway.decision", verdict)]);
        }
        let caller = match decided {
            Ok(caller) => caller,
            Err(Refused::Reply(reply)) => {
                self.charge_bad_signature(req, &reply, host);
                return Step::Reply(reply);
            }
            Err(Refused::AwaitKeys(issuer)) => return Step::AwaitKeys { guarded, issuer },
            Err(Refused::Introspect(_)) => return Step::Introspect { guarded },
        };
        self.admit(req, guarded, caller, shared_waits)
    }

    /// The caller is known (or none is needed): a route goes on to the binding and revocation
    /// checks, a gateway endpoint first reads its request.
    /// `shared_waits`: requests may wait on one another's calls (the host resumes a request
    /// from another's callback).
    fn admit(
        &mut self,
        req: &mut Request,
        guarded: Guarded,
        caller: Option<Caller>,
        shared_waits: bool,
    ) -> Step {
        let config = Rc::clone(&self.config);
        let now = unix_seconds(req.clock_ms);
        let trace_id = req.trace.trace_id.clone();
        match guarded {
            Guarded::Route(_) => {
                req.caller = caller;
                Step::Bind {
                    next: Next::Route,
                    coalesce: shared_waits,
                }
            }
            Guarded::Endpoint(path) => {
                let Some(caller) = caller else {
                    return refuse(req, Outcome::Internal, message::INTERNAL);
                };
                let endpoint = match policy::endpoint(&config, &path, &caller, &req.headers, now, &trace_id) {
                    Ok(e) => e,
                    Err(reply) => return Step::Reply(reply),
                };
                req.caller = Some(caller);
                // Endpoints do their own lookup: they dispatch a write afterwards, which must
                // come from their own callback.
                Step::Bind {
                    next: Next::Endpoint(endpoint),
                    coalesce: false,
                }
            }
        }
    }

    /// Phases 5 and 6: the token is valid and not revoked.
    fn proceed(&mut self, req: &mut Request, next: Next, host: &mut dyn Host) -> Step {
        req.cleared = req.caller.is_some();
        let config = Rc::clone(&self.config);
        let route = req.route.and_then(|i| config.routes.get(i));
        let limits = route.and_then(|r| r.limits.as_ref());
        let now_ms = req.clock_ms;
        let user = req.caller.as_ref().and_then(|c| c.identity.user_id.clone());
        if let (Some(limits), Some(user)) = (limits, user.as_deref()) {
            let check = limits.user_check(&config.rate_limits, &self.limits.slot_seed, user);
            if let Err(reply) = self.charge(req, &check, limits, now_ms, host) {
                return Step::Reply(reply);
            }
        }
        if let Next::Endpoint(endpoint) = next {
            return Step::Perform(endpoint);
        }
        if let Some(limits) = limits {
            if let Err(reply) = self.charge(req, &limits.route_check(), limits, now_ms, host) {
                return Step::Reply(reply);
            }
        }
        let mut forward = policy::forward_headers(
            &config,
            &req.headers,
            &req.trace,
            req.caller.as_ref().map(|c| &c.identity),
        );
        if let Some(settings) = route.and_then(|r| r.canary.as_ref().map(|c| (r, c))) {
            let (route, settings) = settings;
            let (to_canary, set) =
                canary::route_headers(settings, &req.headers, user.as_deref(), req.client_ip.as_deref());
            forward.set.extend(set);
            if let Some([stable, canary]) = self.metrics.canary.get(&route.name).copied() {
                self.inc(if to_canary { canary } else { stable });
            }
            req.canary = Some(to_canary);
        }
        Step::Forward(forward)
    }

    /// Applies the header changes and lets the request go on, unless the host would forward a
    /// client's copy of a gateway-owned header it was asked to remove: then it is refused.
    fn send_on(&mut self, req: &mut Request, forward: &policy::Forward, host: &mut dyn Host) -> Flow {
        if !host.removes_request_headers() {
            if let Some(name) = forward.remove.iter().find(|n| policy::gateway_owned(n)) {
                let reply = Reply::refuse(
                    Outcome::BadRequest,
                    &message::gateway_header(name),
                    &req.trace.trace_id,
                );
                return self.reply(req, reply, host);
            }
        }
        if let Err(name) = apply(forward, self.config.routing_headers.as_deref(), host) {
            host.log(
                LogLevel::Error,
                &format!("the host did not remove the client's {name}: request refused"),
            );
            let reply = Reply::refuse(Outcome::Internal, message::INTERNAL, &req.trace.trace_id);
            return self.reply(req, reply, host);
        }
        self.publish(req, Outcome::Forwarded, host);
        Flow::Continue
    }

    /// The decision, where the rest of Envoy reads it (`gateway.metadata`): before the request
    /// goes on (RBAC runs after this filter) or the gateway's own reply goes out (access logs).
    fn publish(&self, req: &Request, outcome: Outcome, host: &mut dyn Host) {
        if !self.config.publish {
            return;
        }
        let id = req.caller.as_ref().map(|c| &c.identity);
        let issuer = id
            .and_then(|id| self.config.verifier.as_ref()?.issuer(id.issuer))
            .map(|i| i.name.as_str());
        host.publish(&crate::host::Decision {
            user_id: id.and_then(|i| i.user_id.as_deref()),
            user_name: id.and_then(|i| i.user_name.as_deref()),
            roles: id.map_or(&[][..], |i| i.roles.as_slice()),
            scopes: id.map_or(&[][..], |i| i.scopes.as_slice()),
            issuer,
            outcome: outcome.label(),
            decision: outcome.decision(),
            canary: req.canary,
            trace_id: &req.trace.trace_id,
        });
    }

    fn reply(&mut self, req: &mut Request, mut reply: Reply, host: &mut dyn Host) -> Flow {
        req.outcome = reply.outcome;
        req.stage = Stage::Idle;
        // The binding bucket's headers go with the gateway's own replies in the reply itself:
        // Envoy runs a wasm filter's response callback on its local reply, not a dynamic
        // module's, and both runtimes must answer alike.
        for (name, value) in ratelimit::response_headers(self.config.rate_limits.headers, &req.charged) {
            if !reply.headers.iter().any(|(n, _)| *n == name) {
                reply.headers.push((name, value));
            }
        }
        // So does the time taken (the .wasm's response callback writes it again).
        let elapsed_us = host.now_ms().saturating_sub(req.started_ms).saturating_mul(1000);
        reply
            .headers
            .push((HEADER_RESPONSE_TIME, policy::response_time(elapsed_us)));
        self.publish(req, reply.outcome, host);
        host.send_reply(&reply);
        Flow::Replied
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
        for (name, value) in ratelimit::response_headers(self.config.rate_limits.headers, &req.charged) {
            host.set_response_header(name, &value);
        }
        host.set_response_header(HEADER_TRACE_ID, &req.trace.trace_id);
        let now_ms = host.now_ms();
        let elapsed_us = now_ms.saturating_sub(req.started_ms).saturating_mul(1000);
        req.elapsed_us = Some(elapsed_us);
        host.set_response_header(HEADER_RESPONSE_TIME, &policy::response_time(elapsed_us));
    }

    // ---------------------------------------------------------------- timers
}

/// Applies the decided request-header changes, one write per header: a whole-map write
/// (`proxy_set_header_map_pairs`) makes fewer host calls but measured slower in Envoy (it removes
/// and re-adds every header; README "Per-request cost"). `Err` names a gateway-owned header the
/// host would not remove (a client's copy that would reach the upstream).
fn apply(forward: &policy::Forward, routing: Option<&[String]>, host: &mut dyn Host) -> Result<(), String> {
    for name in &forward.remove {
        if !host.set_request_header(name, None) && policy::gateway_owned(name) {
            return Err(name.clone());
        }
    }
    for (name, value) in &forward.set {
        host.set_request_header(name, Some(value));
    }
    if let Some((name, value)) = &forward.scopes {
        host.set_request_header(name, Some(value));
    }
    // The route is picked again when the gateway wrote or removed a header Envoy's routes match
    // on: the canary's internal one (a client's copy may have been routed on already), and the
    // configuration's `routing_headers`. (The proxy-wasm host re-resolves after every header edit
    // by itself in Envoy 1.40; newer versions and the native module rely on this; hosts without
    // the function answer an error, which is ignored.)
    let routed = |name: &str| {
        name.eq_ignore_ascii_case(canary::ROUTE_HEADER)
            || routing.is_some_and(|list| list.iter().any(|h| h.eq_ignore_ascii_case(name)))
    };
    if forward.set.iter().any(|(name, _)| routed(name))
        || forward.remove.iter().any(|name| routed(name))
        || forward.scopes.as_ref().is_some_and(|(name, _)| routed(name))
    {
        host.clear_route_cache();
    }
    Ok(())
}

#[cfg(test)]
mod tests;
