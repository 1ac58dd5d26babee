//! Fetched signing keys (`remote_jwks`) in the orchestrator: keeping the VM's key sets in step
//! with the shared copy, fetching when due or when a token names a `kid` the set lacks, and
//! holding the requests that wait for a fetch. The decisions about who may fetch when are
//! [`crate::jwt::remote::Lease`]'s; this is the host side.

use std::rc::Rc;

use super::{shared, Call, Gateway, Guarded, Request, Stage, Step};
use crate::host::{Callout, Host, LogLevel};
use crate::jwt::remote::{self, Lease, Remote};
use crate::jwt::KeySet;

/// Timer period while any issuer's keys are fetched: how soon a VM sees a set another VM
/// fetched, and notices a waiter's deadline.
pub const JWKS_TICK_MS: u64 = 250;

/// Most requests one VM holds for one issuer's keys; more are answered at once.
const MAX_WAITERS: usize = 1024;

/// Slack added to a fetch's timeout in its lease, so a lease outlives its fetch.
const LEASE_SLACK_MS: u64 = 1000;

/// The key duty's state in this VM.
#[derive(Default)]
pub(super) struct KeysState {
    /// Fetched key sets by issuer index (what the verifier reads).
    pub(super) sets: Vec<Option<Rc<KeySet>>>,
    /// Their fetch state, by issuer index.
    pub(super) jwks: Vec<JwksState>,
    /// Whether the host checks RSA/ECDSA signatures (probed once).
    pub(super) host_verifies: bool,
}

/// One issuer's fetch state in one VM.
#[derive(Debug, Default)]
pub struct JwksState {
    /// When the held set was fetched (by any VM), unix ms.
    fetched_at_ms: Option<u64>,
    /// The shared copy's CAS the held set was parsed from.
    seen_cas: Option<u32>,
    /// This VM's fetch: its context and when to give up on its answer (its lease's end).
    fetching: Option<(u32, u64)>,
    /// A fetch for a `kid` the set lacks is wanted but could not go out from a request (it was
    /// cancelled with its request, or the forced-fetch rate limit held it): the timer sends it
    /// from the root context, which no client can cancel, as soon as the rate limit allows.
    wanted: bool,
    /// Requests waiting for keys.
    pub(super) waiters: Vec<u32>,
}

/// Whether a fetch is out after an attempt to start one.
#[derive(Debug, PartialEq, Eq)]
enum Fetch {
    /// Out (this VM's, or another VM's under the lease).
    Out,
    /// Not allowed now (back-off, or nothing to fetch) or the dispatch failed.
    No,
    /// A forced fetch the rate limit allows from this time on (unix ms).
    Later(u64),
}

impl Gateway {
    fn remote(&self, issuer: usize) -> Option<(String, Remote)> {
        let v = self.config.verifier.as_ref()?;
        let i = v.issuer(issuer)?;
        Some((i.name.clone(), i.remote()?.clone()))
    }

    /// Holds a request until `issuer`'s keys are fetched, or answers it now when no fetch can
    /// help. A request waits up to `max_wait` from its first wait; within that time it may wait
    /// again (when the fetch it joined had started before a rotation, say).
    pub(super) fn await_keys(
        &mut self,
        req: &mut Request,
        guarded: Guarded,
        issuer: usize,
        host: &mut dyn Host,
    ) -> Step {
        let ctx = req.ctx;
        let now_ms = host.now_ms();
        req.clock_ms = now_ms;
        let Some((name, remote)) = self.remote(issuer) else {
            req.keys_deadline_ms = Some(0);
            return Self::retry_authentication(req, guarded);
        };
        let deadline_ms = *req
            .keys_deadline_ms
            .get_or_insert(now_ms.saturating_add(remote.max_wait_ms));
        // Another VM may have fetched a newer set already.
        if self.adopt_shared(issuer, &name, host) {
            return Self::retry_authentication(req, guarded);
        }
        let waiting = self.keys.jwks.get(issuer).map_or(0, |s| s.waiters.len());
        let fetch = if now_ms >= deadline_ms || waiting >= MAX_WAITERS {
            Fetch::No
        } else {
            self.start_fetch(ctx, issuer, &name, &remote, now_ms, true, host)
        };
        let wait = match fetch {
            Fetch::Out => true,
            // A key rotated in right after another unknown-kid fetch: held for the next fetch
            // the rate limit allows, when that comes within this request's wait.
            Fetch::Later(at) if at <= deadline_ms => {
                if let Some(state) = self.keys.jwks.get_mut(issuer) {
                    state.wanted = true;
                }
                true
            }
            Fetch::Later(_) | Fetch::No => false,
        };
        if !wait {
            req.keys_deadline_ms = Some(0);
            return Self::retry_authentication(req, guarded);
        }
        if let Some(state) = self.keys.jwks.get_mut(issuer) {
            state.waiters.push(ctx);
        }
        Step::Wait(Stage::Keys { guarded, deadline_ms })
    }

    /// Authenticates again with the keys the VM holds now; it may wait again only before its
    /// deadline.
    fn retry_authentication(req: &Request, guarded: Guarded) -> Step {
        let may_wait = req.keys_deadline_ms.is_some_and(|d| req.clock_ms < d);
        Step::Authenticate { guarded, may_wait }
    }

    /// Parses the shared copy of `issuer`'s set when it changed; true when the VM's set changed.
    fn adopt_shared(&mut self, issuer: usize, name: &str, host: &mut dyn Host) -> bool {
        let Some((value, cas)) = shared(&self.local, host).get(&remote::set_key(name)) else {
            return false;
        };
        let Some(state) = self.keys.jwks.get_mut(issuer) else {
            return false;
        };
        if state.seen_cas == Some(cas) {
            return false;
        }
        state.seen_cas = Some(cas);
        // Only validated documents are stored; a bad one (another writer) is ignored.
        let Some((at, doc)) = remote::decode_set(&value) else {
            return false;
        };
        let Ok(set) = KeySet::parse(doc) else {
            return false;
        };
        state.fetched_at_ms = Some(at);
        if let Some(slot) = self.keys.sets.get_mut(issuer) {
            *slot = Some(Rc::new(set));
        }
        true
    }

    /// Starts a fetch of `issuer`'s keys from the current context if this VM may (it takes the
    /// issuer's lease). `forced`: for a `kid` the set lacks.
    #[allow(clippy::too_many_arguments)]
    fn start_fetch(
        &mut self,
        ctx: u32,
        issuer: usize,
        name: &str,
        remote: &Remote,
        now_ms: u64,
        forced: bool,
        host: &mut dyn Host,
    ) -> Fetch {
        if self.keys.jwks.get(issuer).is_some_and(|s| s.fetching.is_some()) {
            return Fetch::Out;
        }
        let key = remote::lease_key(name);
        let current = shared(&self.local, host).get(&key);
        let lease = Lease::decode(current.as_ref().map(|(v, _)| v.as_slice()));
        if lease.until_ms > now_ms {
            // Another VM is fetching; its set reaches this VM through shared data.
            return Fetch::Out;
        }
        let fetched_at = self.keys.jwks.get(issuer).and_then(|s| s.fetched_at_ms);
        if !lease.may_fetch(remote, now_ms, fetched_at, forced) {
            // Held for later only while the provider answers (a failing one is not asked
            // more often than its back-off).
            return if forced && lease.failures == 0 && lease.until_ms <= now_ms {
                Fetch::Later(lease.last_forced_ms.saturating_add(remote.refetch_ms))
            } else {
                Fetch::No
            };
        }
        let taken = Lease {
            until_ms: now_ms
                .saturating_add(remote.timeout_ms)
                .saturating_add(LEASE_SLACK_MS),
            last_attempt_ms: now_ms,
            failures: lease.failures,
            last_forced_ms: if forced { now_ms } else { lease.last_forced_ms },
        };
        if host
            .set(&key, &taken.encode(), Some(current.map_or(0, |(_, cas)| cas)))
            .is_err()
        {
            // Another VM took it first.
            return Fetch::Out;
        }
        let call = self.send(
            Callout::get(&remote.cluster, &remote.path, remote.timeout_ms)
                .with_authority(Some(&remote.authority)),
            Call::Jwks { issuer },
            host,
        );
        match call {
            Ok(_) => {
                if let Some(state) = self.keys.jwks.get_mut(issuer) {
                    state.fetching = Some((ctx, taken.until_ms));
                    if forced {
                        state.wanted = false;
                    }
                }
                if forced {
                    self.inc_named(
                        &crate::stat::name("gateway_jwks_unknown_kid_fetches_total", &[("issuer", name)]),
                        host,
                    );
                }
                Fetch::Out
            }
            Err(e) => {
                self.fetch_failed(issuer, name, taken, &format!("dispatch failed: {e}"), host);
                Fetch::No
            }
        }
    }

    fn fetch_failed(&mut self, issuer: usize, name: &str, lease: Lease, why: &str, host: &mut dyn Host) {
        let released = Lease {
            until_ms: 0,
            failures: lease.failures.saturating_add(1),
            ..lease
        };
        let _ = shared(&self.local, host).set(&remote::lease_key(name), &released.encode(), None);
        self.inc_named(
            &crate::stat::name("gateway_jwks_fetch_errors_total", &[("issuer", name)]),
            host,
        );
        let kept = self.keys.sets.get(issuer).is_some_and(Option::is_some);
        let what = if kept {
            "keeping the last good key set"
        } else {
            "no key set yet"
        };
        host.log(
            LogLevel::Warn,
            &format!("jwks fetch for issuer {name} failed ({why}); {what}"),
        );
    }

    /// A fetch answered: store and adopt a good set, or count the failure; then let the
    /// waiters try again.
    pub(super) fn jwks_answered(
        &mut self,
        ctx: u32,
        issuer: usize,
        status: Option<u16>,
        body: &[u8],
        oversized: bool,
        host: &mut dyn Host,
    ) {
        let Some((name, _)) = self.remote(issuer) else {
            return;
        };
        if let Some(state) = self.keys.jwks.get_mut(issuer) {
            state.fetching = None;
        }
        let now_ms = host.now_ms();
        let key = remote::lease_key(&name);
        let lease = Lease::decode(
            shared(&self.local, host)
                .get(&key)
                .as_ref()
                .map(|(v, _)| v.as_slice()),
        );
        let parsed = match status {
            _ if oversized => Err(format!("larger than {} bytes", crate::jwt::keys::MAX_JWKS_BYTES)),
            Some(200) => KeySet::parse(body),
            Some(s) => Err(format!("HTTP {s}")),
            None => Err("no answer (timeout or connection failure)".to_string()),
        };
        match parsed {
            Ok(set) => {
                let _ = shared(&self.local, host).set(
                    &remote::set_key(&name),
                    &remote::encode_set(now_ms, body),
                    None,
                );
                let done = Lease {
                    until_ms: 0,
                    failures: 0,
                    ..lease
                };
                let _ = shared(&self.local, host).set(&key, &done.encode(), None);
                // Logged when the published keys change (a rotation, or new material under an
                // old kid), not on every refresh.
                let keys = |s: &KeySet| s.keys.iter().map(|k| k.fingerprint).collect::<Vec<_>>();
                let changed = self
                    .keys
                    .sets
                    .get(issuer)
                    .and_then(Option::as_ref)
                    .is_none_or(|old| keys(old) != keys(&set));
                let level = if set.crowded > 0 {
                    LogLevel::Warn
                } else if changed {
                    LogLevel::Info
                } else {
                    LogLevel::Debug
                };
                host.log(
                    level,
                    &format!(
                        "jwks for issuer {name}: {} keys ({} skipped, {} dropped as repeated or \
                         beyond {} per kid)",
                        set.keys.len(),
                        set.skipped,
                        set.crowded,
                        crate::jwt::keys::MAX_KEYS_PER_KID
                    ),
                );
                if changed && set.crowded > 0 {
                    let stat = crate::stat::name("gateway_jwks_keys_dropped_total", &[("issuer", &name)]);
                    for _ in 0..set.crowded {
                        self.inc_named(&stat, host);
                    }
                }
                let seen = shared(&self.local, host)
                    .get(&remote::set_key(&name))
                    .map(|(_, cas)| cas);
                if let Some(state) = self.keys.jwks.get_mut(issuer) {
                    state.fetched_at_ms = Some(now_ms);
                    state.seen_cas = seen;
                }
                if let Some(slot) = self.keys.sets.get_mut(issuer) {
                    *slot = Some(Rc::new(set));
                }
                self.inc_named(
                    &crate::stat::name("gateway_jwks_fetches_total", &[("issuer", &name)]),
                    host,
                );
            }
            Err(why) => self.fetch_failed(issuer, &name, lease, &why, host),
        }
        self.wake_key_waiters(ctx, issuer, now_ms, true, host);
    }

    /// Resumes `issuer`'s waiters: all of them, or those whose wait is over.
    fn wake_key_waiters(&mut self, current: u32, issuer: usize, now_ms: u64, all: bool, host: &mut dyn Host) {
        let waiters = match self.keys.jwks.get_mut(issuer) {
            Some(state) if !state.waiters.is_empty() => std::mem::take(&mut state.waiters),
            _ => return,
        };
        let mut still = Vec::new();
        for w in waiters {
            let due = all
                || self.requests.get(&w).is_none_or(
                    |r| matches!(r.stage, Stage::Keys { deadline_ms, .. } if deadline_ms <= now_ms),
                );
            if !due {
                still.push(w);
                continue;
            }
            self.with_request(current, w, host, |_, req, _| {
                let Stage::Keys { guarded, .. } = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                req.clock_ms = now_ms;
                Some(Self::retry_authentication(req, guarded))
            });
        }
        if let Some(state) = self.keys.jwks.get_mut(issuer) {
            state.waiters.extend(still);
        }
    }

    /// A request is gone. A fetch it sent went with it (Envoy cancels a gone stream's
    /// callouts): its lease is released at once, so neither the timed refresh nor another
    /// request waits for it, and the fetch is wanted from the root context (next tick), so a
    /// client that resets its requests cannot keep the set from being fetched.
    pub(super) fn forget_key_waiter(&mut self, ctx: u32, host: &mut dyn Host) {
        let mut cancelled = Vec::new();
        for (issuer, state) in self.keys.jwks.iter_mut().enumerate() {
            state.waiters.retain(|w| *w != ctx);
            if let Some((owner, until)) = state.fetching {
                if owner == ctx {
                    state.fetching = None;
                    state.wanted = true;
                    cancelled.push((issuer, until));
                }
            }
        }
        if cancelled.is_empty() {
            return;
        }
        self.calls
            .retain(|c| !matches!(c, Call::Jwks { issuer } if cancelled.iter().any(|(i, _)| i == issuer)));
        for (issuer, until) in cancelled {
            let Some((name, _)) = self.remote(issuer) else {
                continue;
            };
            let key = remote::lease_key(&name);
            let store = shared(&self.local, host);
            if let Some((value, cas)) = store.get(&key) {
                let lease = Lease::decode(Some(&value));
                // Only our own lease (another VM may hold a newer one).
                if lease.until_ms == until {
                    let released = Lease { until_ms: 0, ..lease };
                    let _ = store.set(&key, &released.encode(), Some(cas));
                }
            }
        }
    }

    /// Drops every key set older than its issuer's `max_stale`: on the timer, and before each
    /// request, so no request is verified with a set past it (whatever the timer's jitter).
    pub(super) fn drop_stale_key_sets(&mut self, now_ms: u64, host: &mut dyn Host) {
        let config = Rc::clone(&self.config);
        let Some(verifier) = config.verifier.as_ref() else {
            return;
        };
        for (issuer, iss, remote) in verifier.remotes() {
            let fetched_at = self.keys.jwks.get(issuer).and_then(|s| s.fetched_at_ms);
            if fetched_at.is_some_and(|at| now_ms > at.saturating_add(remote.max_stale_ms)) {
                if let Some(slot) = self.keys.sets.get_mut(issuer) {
                    if slot.take().is_some() {
                        host.log(
                            LogLevel::Warn,
                            &format!(
                                "jwks for issuer {}: last good set is older than max_stale; dropped",
                                iss.name
                            ),
                        );
                    }
                }
            }
        }
    }

    /// The timer: for each fetched issuer, take a newer shared copy, drop a set past
    /// `max_stale`, fetch when due, and let waiters go whose wait is over (or whose keys came).
    pub(super) fn jwks_tick(&mut self, ctx: u32, now_ms: u64, host: &mut dyn Host) {
        let Some(verifier) = self.config.verifier.as_ref() else {
            return;
        };
        let remotes: Vec<(usize, String, Remote)> = verifier
            .remotes()
            .map(|(i, iss, r)| (i, iss.name.clone(), r.clone()))
            .collect();
        self.drop_stale_key_sets(now_ms, host);
        for (issuer, name, remote) in remotes {
            let changed = self.adopt_shared(issuer, &name, host);
            if changed {
                self.drop_stale_key_sets(now_ms, host);
            }
            if let Some(state) = self.keys.jwks.get_mut(issuer) {
                if state.fetching.is_some_and(|(_, until)| until <= now_ms) {
                    state.fetching = None;
                }
            }
            // A fetch for an unknown kid that a request could not keep (or had to leave for
            // later) goes out from here, the root context.
            let wanted = self.keys.jwks.get(issuer).is_some_and(|s| s.wanted);
            let forced = if wanted {
                self.start_fetch(ctx, issuer, &name, &remote, now_ms, true, host)
            } else {
                Fetch::No
            };
            let fetch = if forced == Fetch::Out {
                Fetch::Out
            } else {
                self.start_fetch(ctx, issuer, &name, &remote, now_ms, false, host)
            };
            // Waiters go on when keys came, when their wait is over, or when no fetch is out
            // any more (it failed somewhere).
            self.wake_key_waiters(ctx, issuer, now_ms, changed || fetch == Fetch::No, host);
        }
    }
}
