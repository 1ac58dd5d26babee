//! Revocation in the request path: the one lookup per token (cached, coalesced), its answer,
//! lookups whose owner left, and the writes of logout, refresh and ban.

use super::*;

/// The revocation duty's state in this VM.
#[derive(Default)]
pub(super) struct RevocationState {
    /// Tokens this VM found not revoked, while no revocation was recorded since.
    pub(super) clean: rv::CleanMemo,
    /// Lookups out, by token fingerprint, with the requests waiting for each.
    pub(super) inflight: HashMap<u64, Inflight>,
    /// Requests whose revocation no replica held yet: read back again on the next tick.
    pub(super) confirming: Vec<u32>,
}

impl Gateway {
    /// Phase 4: the local ban table, then the cache, then one MGET through webdis (joined by
    /// every request for the same token that arrives while it is out, when `coalesce`).
    pub(super) fn check_revocation(
        &mut self,
        req: &mut Request,
        next: Next,
        coalesce: bool,
        host: &mut dyn Host,
    ) -> Step {
        let config = Rc::clone(&self.config);
        let ctx = req.ctx;
        let (Some(rv), Some(caller)) = (config.revocation.as_ref(), req.caller.as_ref()) else {
            return Step::Cleared(next);
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
            if self.revocation.clean.holds(slot.fingerprint, epoch, now_ms) {
                let id = self.metrics.cache_hits;
                self.inc(id);
                return Step::Cleared(next);
            }
            Some(epoch)
        } else {
            None
        };
        if self.banned_here(rv, &caller.identity, now_ms, host) {
            return self.revoked_at(req, &next, host);
        }
        if let Some(epoch) = epoch {
            let stored = shared(&self.local, host).get(&slot.cache_key()).map(|(b, _)| b);
            if let Some(entry) = CacheEntry::fresh(stored.as_deref(), &slot, now_ms, rv.cache_ttl_ms) {
                let id = self.metrics.cache_hits;
                self.inc(id);
                return if entry.lookup.revokes(issued_at) {
                    self.revoked(req)
                } else {
                    let until = entry.stored_at_ms.saturating_add(rv.cache_ttl_ms);
                    self.revocation.clean.remember(slot.fingerprint, epoch, until);
                    Step::Cleared(next)
                };
            }
        }
        if coalesce {
            if let Some(inflight) = self.revocation.inflight.get_mut(&slot.fingerprint) {
                inflight.waiters.push(ctx);
                let id = self.metrics.coalesced;
                self.inc(id);
                return Step::Wait(Stage::Revocation(next));
            }
        }
        let user = caller.identity.user_id.clone();
        let token = caller.token.clone();
        let revocation_id = caller.identity.revocation_id.clone();
        let key = coalesce.then_some(slot.fingerprint);
        let path = self.lookup_path(&token, &revocation_id, user.as_deref());
        if coalesce {
            // Others join it from now on; the executor drops it if the call cannot go out.
            self.revocation.inflight.insert(
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
        Step::Call(Outgoing {
            store: Store::Revocation,
            path,
            timeout_ms: None,
            purpose: Call::Lookup { key, context: ctx },
            stage: Stage::Revocation(next),
        })
    }

    /// Whether this instance's ban table revokes the caller's token (a ban recorded here, or
    /// seen in a lookup, still in force).
    fn banned_here(
        &self,
        rv: &Revocation,
        id: &crate::jwt::Identity,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> bool {
        let Some(sub) = &id.user_id else {
            return false;
        };
        let ban_slot = Slot::of("u", sub, rv.cache_slots);
        let stored = shared(&self.local, host).get(&ban_slot.ban_key()).map(|(b, _)| b);
        rv::local_ban(stored.as_deref(), &ban_slot, now_ms).is_some_and(|before| {
            Lookup {
                blacklisted: false,
                revoked_before: Some(before),
            }
            .revokes(id.authenticated_at())
        })
    }

    /// A lookup's path, counted as one lookup.
    fn lookup_path(&mut self, token: &str, revocation_id: &str, user: Option<&str>) -> String {
        let id = self.metrics.lookups;
        self.inc(id);
        rv::lookup_path(token, revocation_id, user)
    }

    /// Sends a lookup from the root context (for waiters whose lookup's owner left).
    fn dispatch_lookup(
        &mut self,
        rv: &Revocation,
        token: &str,
        revocation_id: &str,
        user: Option<&str>,
        purpose: Call,
        host: &mut dyn Host,
    ) -> Result<u32, StoreError> {
        let path = self.lookup_path(token, revocation_id, user);
        let config = Rc::clone(&self.config);
        self.send_webdis(
            Callout::get(&rv.cluster, &path, rv.timeout_ms)
                .with_authorization(config.webdis_auth.as_deref())
                .with_authority(config.webdis_authority.as_deref()),
            purpose,
            host,
        )
        .map_err(|e| StoreError::Dispatch(e.to_string()))
    }

    fn revoked(&mut self, req: &Request) -> Step {
        let id = self.metrics.revoked;
        self.inc(id);
        refuse(req, Outcome::Revoked, MSG_REVOKED)
    }

    /// The revocation store's `failure_mode` (deny without a store).
    pub(super) fn failure_mode(&self) -> FailureMode {
        self.config
            .revocation
            .as_ref()
            .map(|r| r.failure_mode)
            .unwrap_or_default()
    }

    pub(super) fn store_failed(
        &mut self,
        req: &mut Request,
        next: Next,
        e: &StoreError,
        host: &mut dyn Host,
    ) -> Step {
        let id = self.metrics.store_errors;
        self.inc(id);
        req.log(LogLevel::Warn, &format!("revocation lookup failed: {e}"), host);
        match self.failure_mode() {
            FailureMode::Deny => refuse(req, Outcome::StoreUnavailable, MSG_STORE_DOWN),
            FailureMode::Allow => {
                let id = self.metrics.allowed_on_error;
                self.inc(id);
                Step::Cleared(next)
            }
            FailureMode::Stale => {
                let age = match next {
                    Next::Route => self.clean_within_window(req, host),
                    // Logout, refresh and bans never act on a stale answer.
                    _ => None,
                };
                match age {
                    Some(age_ms) => {
                        let id = self.metrics.allowed_stale;
                        self.inc(id);
                        req.log(
                            LogLevel::Warn,
                            &format!("revocation store down: token found clean {age_ms} ms ago admitted"),
                            host,
                        );
                        Step::Cleared(next)
                    }
                    None => refuse(req, Outcome::StoreUnavailable, MSG_STORE_DOWN),
                }
            }
        }
    }

    /// How long ago (ms) this gateway's cache found the caller's token clean, if within the
    /// stale window and this gateway recorded no revocation of any token or user since (a
    /// logout, refresh or ban here voids every older clean answer, whatever slot it sits in),
    /// the local ban table does not refuse it now, and the entry is not from the future (a
    /// clock stepped back).
    fn clean_within_window(&mut self, req: &Request, host: &mut dyn Host) -> Option<u64> {
        let config = Rc::clone(&self.config);
        let rv = config.revocation.as_ref()?;
        let caller = req.caller.as_ref()?;
        let now_ms = host.now_ms();
        if self.banned_here(rv, &caller.identity, now_ms, host) {
            return None;
        }
        let store = shared(&self.local, host);
        let slot = Slot::of("t", &caller.identity.revocation_id, rv.cache_slots);
        let stored = store.get(&slot.cache_key()).map(|(b, _)| b);
        let entry = CacheEntry::fresh(stored.as_deref(), &slot, now_ms, rv.stale_window_ms)?;
        let last_revocation = rv::last_local_revocation(store);
        let plausible = entry.stored_at_ms <= now_ms.saturating_add(1_000);
        (plausible
            && entry.stored_at_ms > last_revocation
            && !entry.lookup.revokes(caller.identity.authenticated_at()))
        .then(|| now_ms.saturating_sub(entry.stored_at_ms))
    }

    pub(super) fn lookup_answered(
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
            let revokes = lookup.blacklisted || lookup.revoked_before.is_some();
            // A clean answer to a lookup that may have been sent before this gateway's last
            // revocation could hide it (its store read came first): not cached.
            let predates = !revokes
                && rv::last_local_revocation(shared(&self.local, host))
                    >= now_ms.saturating_sub(rv.timeout_ms);
            if rv.cache_ttl_ms > 0 && !predates {
                let slot = Slot::of("t", &id, rv.cache_slots);
                let entry = CacheEntry {
                    fingerprint: slot.fingerprint,
                    stored_at_ms: now_ms,
                    lookup: *lookup,
                };
                let _ = shared(&self.local, host).set(&slot.cache_key(), &entry.encode(), None);
                if lookup.blacklisted || lookup.revoked_before.is_some() {
                    rv::bump_epoch(shared(&self.local, host), now_ms);
                }
            }
        }
        for &w in waiters {
            self.with_request(current, w, host, |gw, req, host| {
                let Stage::Revocation(next) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                req.clock_ms = now_ms;
                let issued_at = req.caller.as_ref().and_then(|c| c.identity.authenticated_at());
                Some(match &result {
                    Ok(lookup) if lookup.revokes(issued_at) => gw.revoked_at(req, &next, host),
                    Ok(_) => Step::Cleared(next),
                    Err(e) => gw.store_failed(req, next, e, host),
                })
            });
        }
    }

    /// A revocation write that was not confirmed: 503, and nothing recorded here either.
    pub(super) fn write_failed(
        &mut self,
        req: &mut Request,
        e: &dyn std::fmt::Display,
        host: &mut dyn Host,
    ) -> Step {
        let id = self.metrics.store_errors;
        self.inc(id);
        req.log(
            LogLevel::Warn,
            &format!("revocation store write failed: {e}"),
            host,
        );
        refuse(req, Outcome::StoreUnavailable, MSG_WRITE_FAILED)
    }

    pub(super) fn write_answered(
        &mut self,
        req: &mut Request,
        mut write: Write,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) -> Step {
        if let Some(then) = write.then.take() {
            // The reference's key is written; now the deciding write.
            return match rv::parse_setex(status, body) {
                Ok(()) => Step::store_write(req, write, then),
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
            rv::bump_epoch(shared(&self.local, host), now_ms);
        }
        match (won, write.on_lost) {
            // Not an acknowledgement of a revocation (a concurrent refresh won): nothing to
            // read back.
            (false, Some(lost)) => Step::Reply(lost),
            _ => match config.revocation.as_ref().and_then(|r| r.confirm.as_ref()) {
                Some(confirm) => {
                    let wait = ReadbackWait {
                        reply: write.on_ok,
                        check: rv::Readback::Held(write.held),
                        deadline_ms: host.now_ms().saturating_add(confirm.timeout_ms),
                        tries: 0,
                    };
                    self.send_confirm(req, wait, host)
                }
                None => Step::Reply(write.on_ok),
            },
        }
    }

    /// Reads back from a replica (`revocation.confirm`) what the primary said; the reply waits.
    /// A read-back that cannot be sent is answered 503 at once (a refused dispatch would be
    /// refused again).
    fn send_confirm(&mut self, req: &Request, mut wait: ReadbackWait, host: &mut dyn Host) -> Step {
        let Some(rv) = self.config.revocation.as_ref().filter(|r| r.confirm.is_some()) else {
            return Step::Reply(wait.reply);
        };
        let path = wait.check.path();
        let timeout_ms = wait
            .deadline_ms
            .saturating_sub(host.now_ms())
            .clamp(1, rv.timeout_ms);
        wait.tries = wait.tries.saturating_add(1);
        Step::Call(Outgoing {
            store: Store::Replica,
            path,
            timeout_ms: Some(timeout_ms),
            purpose: Call::Confirm { context: req.ctx },
            stage: Stage::Confirm(wait),
        })
    }

    /// A replica's answer to a read-back: the reply goes out once it shows what the primary
    /// said; else another read-back (at once the first time, then every tick) until the
    /// deadline, then 503.
    pub(super) fn confirm_answered(
        &mut self,
        req: &mut Request,
        wait: ReadbackWait,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) -> Step {
        match wait.check.confirmed(status, body) {
            Ok(true) => {
                if wait.tries > 1 {
                    self.inc_named("gateway_revocation_confirm_retries_total", host);
                }
                return Step::Reply(wait.reply);
            }
            Ok(false) => {}
            Err(e) => req.log(
                LogLevel::Debug,
                &format!("revocation read-back failed: {e}"),
                host,
            ),
        }
        if host.now_ms() >= wait.deadline_ms {
            return self.not_replicated(req, wait.tries, host);
        }
        // Where the timer cannot resume this request (Kong, APISIX, no timers), a few
        // read-backs right after each other, then the 503.
        let parked = self.timers && host.resumes_other_contexts();
        if wait.tries <= 1 || (!parked && wait.tries < rv::MAX_IMMEDIATE_READBACKS) {
            return self.send_confirm(req, wait, host);
        }
        if !parked {
            return self.not_replicated(req, wait.tries, host);
        }
        if !self.revocation.confirming.contains(&req.ctx) {
            self.revocation.confirming.push(req.ctx);
        }
        Step::Wait(Stage::Confirm(wait))
    }

    /// No replica showed it in time: 503, not acknowledged (what the primary took still counts
    /// wherever it survives, and this gateway already applies it).
    pub(super) fn not_replicated(&mut self, req: &Request, tries: u32, host: &mut dyn Host) -> Step {
        self.inc_named("gateway_revocation_unconfirmed_total", host);
        let id = self.metrics.store_errors;
        self.inc(id);
        req.log(
            LogLevel::Warn,
            &format!("revocation on the primary, but no replica showed it after {tries} read-backs: not acknowledged"),
            host,
        );
        refuse(req, Outcome::StoreUnavailable, message::NOT_REPLICATED)
    }

    /// The timer: read back again every revocation no replica held at its last read-back.
    pub(super) fn retry_confirms(&mut self, ctx: u32, host: &mut dyn Host) {
        for w in std::mem::take(&mut self.revocation.confirming) {
            self.with_request(ctx, w, host, |gw, req, host| {
                let Stage::Confirm(wait) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                if host.now_ms() >= wait.deadline_ms {
                    return Some(gw.not_replicated(req, wait.tries, host));
                }
                Some(gw.send_confirm(req, wait, host))
            });
        }
    }

    /// The caller's own token is revoked. At a gateway endpoint with `revocation.confirm` (a
    /// logout or refresh retried after its 503), a replica must say so too before the caller
    /// is told: a 401 there reads as "logged out".
    fn revoked_at(&mut self, req: &Request, next: &Next, host: &mut dyn Host) -> Step {
        let config = Rc::clone(&self.config);
        let confirm = config.revocation.as_ref().and_then(|r| r.confirm.as_ref());
        let (Some(confirm), Next::Endpoint(_), Some(caller)) = (confirm, next, req.caller.as_ref()) else {
            return self.revoked(req);
        };
        let id = &caller.identity;
        let check = rv::Readback::Revoked {
            path: rv::lookup_path(&caller.token, &id.revocation_id, id.user_id.as_deref()),
            with_user: id.user_id.is_some(),
            authenticated_at: id.authenticated_at(),
        };
        let counter = self.metrics.revoked;
        self.inc(counter);
        let reply = Reply::refuse(Outcome::Revoked, MSG_REVOKED, &req.trace.trace_id);
        let wait = ReadbackWait {
            reply,
            check,
            deadline_ms: host.now_ms().saturating_add(confirm.timeout_ms),
            tries: 0,
        };
        self.send_confirm(req, wait, host)
    }

    /// A request is gone: it waits for no lookup or read-back any more. Returns the lookups it
    /// owned that others still wait for (their answer will not come: the next tick sends them
    /// again from the root context).
    pub(super) fn forget_revocation_waiter(&mut self, ctx: u32) -> Vec<u64> {
        let state = &mut self.revocation;
        state.confirming.retain(|c| *c != ctx);
        let mut orphaned = Vec::new();
        for (key, inflight) in state.inflight.iter_mut() {
            inflight.waiters.retain(|w| *w != ctx);
            if inflight.owner == Some(ctx) {
                inflight.owner = None;
                orphaned.push(*key);
            }
        }
        state
            .inflight
            .retain(|_, i| !(i.owner.is_none() && i.waiters.is_empty()));
        orphaned
    }

    /// Dispatches a new lookup, from the root context, for waiters whose lookup's owner left.
    pub(super) fn adopt_orphans(&mut self, ctx: u32, host: &mut dyn Host) {
        let config = Rc::clone(&self.config);
        let Some(rv) = config.revocation.as_ref() else {
            return;
        };
        let orphans: Vec<u64> = self
            .revocation
            .inflight
            .iter()
            .filter(|(_, i)| i.owner.is_none())
            .map(|(k, _)| *k)
            .collect();
        for key in orphans {
            let Some((token, id, user)) = self
                .revocation
                .inflight
                .get(&key)
                .map(|i| (i.token.clone(), i.revocation_id.clone(), i.user.clone()))
            else {
                continue;
            };
            let purpose = Call::Lookup {
                key: Some(key),
                context: ctx,
            };
            match self.dispatch_lookup(rv, &token, &id, user.as_deref(), purpose, host) {
                Ok(_) => {
                    if let Some(i) = self.revocation.inflight.get_mut(&key) {
                        i.owner = Some(ctx);
                    }
                }
                Err(e) => {
                    let waiters = self
                        .revocation
                        .inflight
                        .remove(&key)
                        .map(|i| i.waiters)
                        .unwrap_or_default();
                    for w in waiters {
                        self.with_request(ctx, w, host, |gw, req, host| {
                            let Stage::Revocation(next) = std::mem::replace(&mut req.stage, Stage::Idle)
                            else {
                                return None;
                            };
                            Some(gw.store_failed(req, next, &e, host))
                        });
                    }
                }
            }
        }
    }
}
