//! Steps and their executor. A duty decides; it never acts on the request itself and never
//! calls another duty: it returns a [`Step`], and [`Gateway::run`] carries the step out through
//! the [`Host`] (the reply, the header writes, the callout, the wait) or hands the request to the
//! next check in the orchestrator's order. Duties still read through the host (the clock, shared
//! data, the peer address) and write log lines; every action on a request goes through here.
//! Modelled on Kuadrant wasm-shim's task/executor (`TaskOutcome`).

use super::*;

/// What a duty decided for one request.
#[derive(Debug)]
pub(super) enum Step {
    /// Phase 3: authenticate the caller for `guarded` (`may_wait`: the request may wait for
    /// keys its token's issuer lacks).
    Authenticate { guarded: Guarded, may_wait: bool },
    /// Phase 3 lacks `issuer`'s keys: wait for a fetch, or authenticate again without waiting.
    AwaitKeys { guarded: Guarded, issuer: usize },
    /// Phase 3 for an opaque token: the issuer's introspection (cached, or one call).
    Introspect { guarded: Guarded },
    /// Phase 3b: a bound token's binding (a DPoP proof, a client certificate), then phase 4.
    Bind { next: Next, coalesce: bool },
    /// Phase 4: the revocation check (`coalesce`: join a lookup of the same token already out).
    Revocation { next: Next, coalesce: bool },
    /// Phases 5 and 6: the caller's token is valid and not revoked (or there is none).
    Cleared(Next),
    /// A gateway endpoint's own work, its charges passed.
    Perform(Endpoint),
    /// A callout for the request, which waits for its answer.
    Call(Outgoing),
    /// The request waits in this stage (a lookup or key fetch it joined, a read-back the timer
    /// sends again).
    Wait(Stage),
    /// The request goes upstream with these header changes.
    Forward(policy::Forward),
    /// The gateway answers.
    Reply(Reply),
}

/// Which check a request authenticates for.
#[derive(Debug, Clone)]
pub(super) enum Guarded {
    /// A route (its index).
    Route(usize),
    /// A gateway endpoint.
    Endpoint(EndpointKind),
}

/// The stores a request's callouts go to; the executor knows how each is reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Store {
    /// The revocation store's webdis.
    Revocation,
    /// A replica's webdis (`revocation.confirm`).
    Replica,
    /// The log store's webdis.
    Logs,
}

/// A request's callout: where to, what for, and the stage the request waits in meanwhile.
#[derive(Debug)]
pub(super) struct Outgoing {
    pub(super) store: Store,
    pub(super) path: String,
    /// Shorter than the store's own timeout (a read-back's, bounded by its deadline).
    pub(super) timeout_ms: Option<u64>,
    pub(super) purpose: Call,
    pub(super) stage: Stage,
}

impl Step {
    /// A revocation-store write for the request, which waits for the store to confirm it.
    pub(super) fn store_write(req: &Request, write: Write, path: String) -> Step {
        Step::Call(Outgoing {
            store: Store::Revocation,
            path,
            timeout_ms: None,
            purpose: Call::Write { context: req.ctx },
            stage: Stage::Write(write),
        })
    }
}

impl Gateway {
    /// Carries out `step` and the steps it leads to, until the request goes upstream, is
    /// answered, or waits.
    pub(super) fn run(&mut self, req: &mut Request, mut step: Step, host: &mut dyn Host) -> Flow {
        loop {
            step = match step {
                Step::Authenticate { guarded, may_wait } => self.authenticate(req, guarded, may_wait, host),
                Step::AwaitKeys { guarded, issuer } => self.await_keys(req, guarded, issuer, host),
                Step::Introspect { guarded } => self.introspect(req, guarded, host),
                Step::Bind { next, coalesce } => self.check_binding(req, next, coalesce, host),
                Step::Revocation { next, coalesce } => self.check_revocation(req, next, coalesce, host),
                Step::Cleared(next) => self.proceed(req, next, host),
                Step::Perform(endpoint) => self.perform(req, endpoint, host),
                Step::Call(out) => match self.send_for(req, out, host) {
                    None => {
                        open_wait_span(&req.stage, host);
                        return Flow::Paused;
                    }
                    Some(step) => step,
                },
                Step::Wait(stage) => {
                    open_wait_span(&stage, host);
                    req.stage = stage;
                    return Flow::Paused;
                }
                Step::Forward(forward) => return self.send_on(req, &forward, host),
                Step::Reply(reply) => return self.reply(req, reply, host),
            };
        }
    }

    /// Sends a request's callout; the request then waits in its stage. A callout that cannot go
    /// out is the stage's duty's to answer: that answer is returned.
    fn send_for(&mut self, req: &mut Request, out: Outgoing, host: &mut dyn Host) -> Option<Step> {
        let config = Rc::clone(&self.config);
        let lookup = match out.purpose {
            Call::Lookup { key, .. } => key,
            _ => None,
        };
        let (cluster, timeout_ms, authorization, authority) = match out.store {
            Store::Revocation => match config.revocation.as_ref() {
                Some(rv) => (
                    rv.cluster.as_str(),
                    rv.timeout_ms,
                    config.webdis_auth.as_deref(),
                    config.webdis_authority.as_deref(),
                ),
                None => return Some(self.call_refused(req, lookup, out.stage, &"no revocation store", host)),
            },
            Store::Replica => match config.revocation.as_ref().and_then(|r| r.confirm.as_ref()) {
                Some(confirm) => (
                    confirm.cluster.as_str(),
                    confirm.timeout_ms,
                    config.webdis_auth.as_deref(),
                    Some(confirm.authority.as_str()),
                ),
                None => {
                    return Some(self.call_refused(req, lookup, out.stage, &"no replica configured", host))
                }
            },
            Store::Logs => match config.logs.store.as_ref() {
                Some(store) => (
                    store.cluster.as_str(),
                    store.timeout_ms,
                    store.authorization.as_deref(),
                    Some(store.authority.as_str()),
                ),
                None => return Some(self.call_refused(req, lookup, out.stage, &"no log store", host)),
            },
        };
        let callout = Callout::get(cluster, &out.path, out.timeout_ms.unwrap_or(timeout_ms))
            .with_authorization(authorization)
            .with_authority(authority);
        match self.send_webdis(callout, out.purpose, host) {
            Ok(_) => {
                req.stage = out.stage;
                None
            }
            Err(e) => Some(self.call_refused(req, lookup, out.stage, &e, host)),
        }
    }

    /// A request's callout could not go out (`lookup`: the coalesced lookup's key): the duty
    /// whose stage it was answers.
    fn call_refused(
        &mut self,
        req: &mut Request,
        lookup: Option<u64>,
        stage: Stage,
        e: &dyn std::fmt::Display,
        host: &mut dyn Host,
    ) -> Step {
        match stage {
            Stage::Revocation(next) => {
                // A coalesced lookup's entry goes: nobody waits on a call that never went out.
                if let Some(key) = lookup {
                    self.revocation.inflight.remove(&key);
                }
                self.store_failed(req, next, &StoreError::Dispatch(e.to_string()), host)
            }
            Stage::Write(_) => self.write_failed(req, e, host),
            Stage::Replay(wait) => self.replay_store_failed(req, wait, &e, host),
            Stage::Confirm(wait) => {
                req.log(
                    LogLevel::Warn,
                    &format!("revocation read-back not sent: {e}"),
                    host,
                );
                self.not_replicated(req, wait.tries.saturating_sub(1), host)
            }
            Stage::Query { .. } => {
                self.query_failed(req, &format!("log store query dispatch failed: {e}"), host)
            }
            Stage::Idle | Stage::Keys { .. } | Stage::Introspect { .. } => {
                req.log(
                    LogLevel::Error,
                    &format!("callout without a waiting stage refused: {e}"),
                    host,
                );
                refuse(req, Outcome::Internal, message::INTERNAL)
            }
        }
    }

    /// Runs `f` on request `context` with it as the host's current context (switching to it
    /// and back when the answer was delivered elsewhere), carries out the step it returns, and
    /// resumes the request when that lets it go on.
    pub(super) fn with_request(
        &mut self,
        current: u32,
        context: u32,
        host: &mut dyn Host,
        f: impl FnOnce(&mut Self, &mut Request, &mut dyn Host) -> Option<Step>,
    ) {
        let Some(mut req) = self.requests.remove(&context) else {
            return;
        };
        let switched = context != current;
        if switched && !host.switch_to(context) {
            self.requests.insert(context, req);
            return;
        }
        // Whatever the request waited for (a lookup, a key fetch, an introspection) is over.
        host.span_close(&[]);
        if let Some(step) = f(self, &mut req, host) {
            if self.run(&mut req, step, host) == Flow::Continue {
                host.resume();
            }
        }
        self.requests.insert(context, req);
        if switched {
            host.switch_to(current);
        }
    }
}

/// A child span for the wait a request enters (the native module under Envoy's tracing).
fn open_wait_span(stage: &Stage, host: &mut dyn Host) {
    let name = match stage {
        Stage::Idle => return,
        Stage::Revocation(_) => "gateway.revocation_lookup",
        Stage::Replay { .. } => "gateway.dpop_replay",
        Stage::Introspect { .. } => "gateway.introspection",
        Stage::Keys { .. } => "gateway.jwks_fetch",
        Stage::Write(_) => "gateway.store_write",
        Stage::Confirm(_) => "gateway.store_confirm",
        Stage::Query { .. } => "gateway.log_query",
    };
    host.span_open(name);
}

/// The gateway's refusal of a request, as a step.
pub(super) fn refuse(req: &Request, outcome: Outcome, message: &str) -> Step {
    Step::Reply(Reply::refuse(outcome, message, &req.trace.trace_id))
}
