//! Opaque tokens in the request path (RFC 7662): the cached answer, or one call to the issuer's
//! introspection endpoint per token (joined by every request for the same token while it is
//! out, where the host can resume one request from another's callback), then the same claims,
//! roles, scopes and binding checks as a JWT's. Revocation still follows.

use super::*;
use crate::jwt::introspection::{self as intro, Answer, AnswerError, CacheEntry};
use serde_json::Value;

/// The introspection duty's state in this VM.
#[derive(Default)]
pub(super) struct IntrospectionState {
    /// Calls out, by token hash, with the requests waiting for each.
    pub(super) inflight: HashMap<String, Asking>,
}

/// One introspection call out, and who waits for it.
pub(super) struct Asking {
    /// The context that sent it; `None` once that context is gone (Envoy cancels its call: the
    /// next tick sends it again from the root context for the waiters).
    pub(super) owner: Option<u32>,
    pub(super) token: String,
    pub(super) waiters: Vec<u32>,
}

impl Gateway {
    /// Phase 3 for an opaque token: the cache, a call already out for it, or a new call.
    pub(super) fn introspect(&mut self, req: &mut Request, guarded: Guarded, host: &mut dyn Host) -> Step {
        let config = Rc::clone(&self.config);
        let Some((_, _, settings)) = config.verifier.as_ref().and_then(|v| v.introspecting()) else {
            return refuse(req, Outcome::Internal, message::INTERNAL);
        };
        let Ok(token) = policy::bearer_token(&req.headers).map(str::to_string) else {
            return refuse(req, Outcome::Internal, message::INTERNAL);
        };
        let hash = intro::token_hash(&token);
        if let Some(entry) = self.cached_answer(settings, &hash, req.clock_ms, host) {
            self.inc_named("gateway_introspection_cache_hits_total", host);
            return self.introspected(req, guarded, entry.active.as_deref(), &token, true, host);
        }
        // The budget of failed checks per client address covers introspection too: random
        // tokens must not make the gateway flood the provider.
        if !self.may_verify(req, host) {
            let mut reply = Reply::refuse(
                Outcome::RateLimited(crate::outcome::Scope::Ip),
                message::VERIFICATION_BUDGET,
                &req.trace.trace_id,
            );
            reply.headers.push(("retry-after", "1".to_string()));
            return Step::Reply(reply);
        }
        let shared_waits = host.resumes_other_contexts();
        if shared_waits {
            if let Some(asking) = self.introspection.inflight.get_mut(&hash) {
                asking.waiters.push(req.ctx);
                return Step::Wait(Stage::Introspect { guarded });
            }
        }
        match self.send_introspection(settings, &token, &hash, req.ctx, host) {
            Ok(()) => {
                if shared_waits {
                    self.introspection.inflight.insert(
                        hash,
                        Asking {
                            owner: Some(req.ctx),
                            token,
                            waiters: vec![req.ctx],
                        },
                    );
                }
                Step::Wait(Stage::Introspect { guarded })
            }
            Err(e) => {
                self.introspection_failed(req, &AnswerError(format!("introspection not sent: {e}")), host)
            }
        }
    }

    fn cached_answer(
        &self,
        settings: &Introspection,
        hash: &str,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Option<CacheEntry> {
        if settings.cache_ttl_ms == 0 {
            return None;
        }
        let key = intro::cache_key(self.limits.slot_seed.hash(&[hash]), settings.cache_slots);
        let (stored, _) = shared(&self.local, host).get(&key)?;
        CacheEntry::fresh(&stored, hash, now_ms, settings.cache_ttl_ms)
    }

    fn send_introspection(
        &mut self,
        settings: &Introspection,
        token: &str,
        hash: &str,
        context: u32,
        host: &mut dyn Host,
    ) -> Result<(), DispatchError> {
        let body = intro::request_body(token);
        let call = Callout::get(&settings.cluster, &settings.path, settings.timeout_ms)
            .with_body("POST", Some(body.as_bytes()))
            .with_content_type("application/x-www-form-urlencoded")
            .with_authorization(Some(&settings.authorization))
            .with_authority(Some(&settings.authority));
        self.inc_named("gateway_introspection_calls_total", host);
        self.send(
            call,
            Call::Introspect {
                hash: hash.to_string(),
                context,
            },
            host,
        )
        .map(|_| ())
    }

    /// The provider answered (or failed) for the token of `hash`: cache the answer, then let
    /// every request that waits for it go on.
    pub(super) fn introspection_answered(
        &mut self,
        current: u32,
        hash: &str,
        context: u32,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) {
        let config = Rc::clone(&self.config);
        let waiters = match self.introspection.inflight.remove(hash) {
            Some(asking) => asking.waiters,
            None => vec![context],
        };
        let answer = intro::parse_answer(status, body);
        // An active answer's members as JSON, written once: what is cached, and what every
        // waiter reads.
        let active = match &answer {
            Ok(Answer::Active(members)) => Some(Value::Object(members.clone()).to_string()),
            _ => None,
        };
        let now_ms = host.now_ms();
        if let (Ok(_), Some((_, _, settings))) =
            (&answer, config.verifier.as_ref().and_then(|v| v.introspecting()))
        {
            let max = config.verifier.as_ref().map_or(0, |v| v.max_payload_bytes);
            let key = intro::cache_key(self.limits.slot_seed.hash(&[hash]), settings.cache_slots);
            // A negative answer never pushes out another token's live positive one (random
            // tokens must not evict the callers' cached answers).
            let keeps_other = active.is_none()
                && shared(&self.local, host).get(&key).is_some_and(|(stored, _)| {
                    let text = String::from_utf8_lossy(&stored);
                    let other = text.split('\n').next().unwrap_or("");
                    other != hash
                        && CacheEntry::fresh(&stored, other, now_ms, settings.cache_ttl_ms)
                            .is_some_and(|e| e.active.is_some())
                });
            if settings.cache_ttl_ms > 0 && active.as_ref().map_or(0, String::len) <= max && !keeps_other {
                let entry = CacheEntry {
                    hash: hash.to_string(),
                    stored_at_ms: now_ms,
                    active: active.clone(),
                };
                let _ = shared(&self.local, host).set(&key, &entry.encode(), None);
            }
        }
        for w in waiters {
            self.with_request(current, w, host, |gw, req, host| {
                let Stage::Introspect { guarded } = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                req.clock_ms = now_ms;
                // The answer is for this request's token only if its token has this hash.
                let token = policy::bearer_token(&req.headers)
                    .map(str::to_string)
                    .unwrap_or_default();
                if intro::token_hash(&token) != hash {
                    return Some(refuse(req, Outcome::Internal, message::INTERNAL));
                }
                Some(match &answer {
                    Ok(_) => gw.introspected(req, guarded, active.as_deref(), &token, false, host),
                    Err(e) => gw.introspection_failed(req, e, host),
                })
            });
        }
    }

    /// A request's introspection answer (`active`: the members of an active one): its
    /// identity checked as a token's claims, its scheme and route access, then admission.
    fn introspected(
        &mut self,
        req: &mut Request,
        guarded: Guarded,
        active: Option<&str>,
        token: &str,
        from_cache: bool,
        host: &mut dyn Host,
    ) -> Step {
        let config = Rc::clone(&self.config);
        let trace_id = req.trace.trace_id.clone();
        let Some((verifier, issuer)) = config
            .verifier
            .as_ref()
            .and_then(|v| v.introspecting().map(|(i, _, _)| (v, i)))
        else {
            return refuse(req, Outcome::NoVerifier, message::NO_VERIFIER);
        };
        let invalid = |e: &TokenError| {
            Reply::refuse(
                Outcome::InvalidToken(e.fault()),
                &message::invalid_token(e),
                &trace_id,
            )
        };
        let Some(members) =
            active.and_then(|json| serde_json::from_str::<serde_json::Map<String, Value>>(json).ok())
        else {
            let reply = Reply::refuse(
                Outcome::InvalidToken(crate::outcome::TokenFault::Inactive),
                message::TOKEN_INACTIVE,
                &trace_id,
            );
            if !from_cache {
                self.charge_bad_signature(req, &reply, host);
            }
            return Step::Reply(reply);
        };
        // The answer is the token's claims: bounded as a JWT's payload is.
        if active.is_some_and(|json| json.len() > verifier.max_payload_bytes) {
            return Step::Reply(invalid(&TokenError::PayloadTooLarge));
        }
        let now = unix_seconds(req.clock_ms);
        let identity = match verifier.identity_from_answer(issuer, &members, token, now) {
            Ok(id) => id,
            Err(e) => return Step::Reply(invalid(&e)),
        };
        let Ok((scheme, _)) = policy::presented_token(&req.headers) else {
            return refuse(req, Outcome::Internal, message::INTERNAL);
        };
        if let Err(reply) = policy::check_scheme(&config, &identity, scheme, &trace_id) {
            return Step::Reply(reply);
        }
        if let Guarded::Route(i) = &guarded {
            if let Some(route) = config.routes.get(*i) {
                if let Err(reply) = policy::check_access(route, &identity, &trace_id) {
                    return Step::Reply(reply);
                }
            }
        }
        let caller = Caller {
            identity,
            token: token.to_string(),
            scheme,
        };
        // One call per request (APISIX): when the introspection was this request's call, no
        // revocation lookup can follow it, and none may be skipped. The answer is cached; the
        // request is refused with `Retry-After: 0`, and its retry (answered from the cache)
        // makes the lookup. Fail closed: never forwarded unchecked.
        if host.one_call_per_request() && !from_cache && config.revocation.is_some() {
            let mut reply = Reply::refuse(Outcome::KeysUnavailable, message::INTROSPECTED_RETRY, &trace_id);
            reply.headers.push(("retry-after", "0".to_string()));
            return Step::Reply(reply);
        }
        self.admit(req, guarded, Some(caller), host.resumes_other_contexts())
    }

    /// The provider did not answer usably: the gateway cannot tell whether the token is good.
    pub(super) fn introspection_failed(
        &mut self,
        req: &mut Request,
        e: &AnswerError,
        host: &mut dyn Host,
    ) -> Step {
        self.inc_named("gateway_introspection_errors_total", host);
        req.log(LogLevel::Warn, &e.to_string(), host);
        // Like a key server's outage: the issuer cannot be asked, not the caller's fault (503).
        refuse(req, Outcome::KeysUnavailable, message::INTROSPECTION_DOWN)
    }

    /// A request is gone: it waits for no introspection any more. Calls it sent that others
    /// still wait for lose their owner (the next tick sends them again).
    pub(super) fn forget_introspection_waiter(&mut self, ctx: u32) {
        for asking in self.introspection.inflight.values_mut() {
            asking.waiters.retain(|w| *w != ctx);
            if asking.owner == Some(ctx) {
                asking.owner = None;
            }
        }
        self.introspection
            .inflight
            .retain(|_, a| !(a.owner.is_none() && a.waiters.is_empty()));
    }

    /// Sends again, from the root context, the calls whose owner left.
    pub(super) fn adopt_introspections(&mut self, ctx: u32, host: &mut dyn Host) {
        let config = Rc::clone(&self.config);
        let Some((_, _, settings)) = config.verifier.as_ref().and_then(|v| v.introspecting()) else {
            return;
        };
        let orphans: Vec<(String, String)> = self
            .introspection
            .inflight
            .iter()
            .filter(|(_, a)| a.owner.is_none())
            .map(|(h, a)| (h.clone(), a.token.clone()))
            .collect();
        for (hash, token) in orphans {
            match self.send_introspection(settings, &token, &hash, ctx, host) {
                Ok(()) => {
                    if let Some(a) = self.introspection.inflight.get_mut(&hash) {
                        a.owner = Some(ctx);
                    }
                }
                Err(e) => {
                    let waiters = self
                        .introspection
                        .inflight
                        .remove(&hash)
                        .map(|a| a.waiters)
                        .unwrap_or_default();
                    let e = AnswerError(format!("introspection not sent: {e}"));
                    for w in waiters {
                        self.with_request(ctx, w, host, |gw, req, host| {
                            if !matches!(req.stage, Stage::Introspect { .. }) {
                                return None;
                            }
                            req.stage = Stage::Idle;
                            Some(gw.introspection_failed(req, &e, host))
                        });
                    }
                }
            }
        }
    }
}
