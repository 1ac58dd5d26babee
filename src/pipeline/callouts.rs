//! Callout answers: which call an answer belongs to, checked (its nonce, its size), and
//! handed to the duty that made it.

use super::*;

/// The callouts out, with one owner: what each is for, and the nonce a webdis reply must echo.
/// A call goes out through [`Gateway::send`] or [`Gateway::send_webdis`], which record both;
/// its answer comes back through [`Gateway::on_call_response`] to the duty that asked; a request
/// that leaves takes its calls with it.
#[derive(Default)]
pub(super) struct Calls {
    purposes: HashMap<u32, Call>,
    nonces: HashMap<u32, u64>,
}

impl Calls {
    /// The call an answer belongs to, and its nonce (a webdis call's).
    pub(super) fn take(&mut self, token_id: u32) -> Option<(Call, Option<u64>)> {
        let call = self.purposes.remove(&token_id)?;
        Some((call, self.nonces.remove(&token_id)))
    }

    /// Keeps the calls `keep` says to (their answers will not come, or are not wanted), with
    /// their nonces.
    pub(super) fn retain(&mut self, keep: impl Fn(&Call) -> bool) {
        self.purposes.retain(|_, call| keep(call));
        let purposes = &self.purposes;
        self.nonces.retain(|id, _| purposes.contains_key(id));
    }

    /// Whether a call out is for `purpose`'s kind (a route's sync still out, say).
    pub(super) fn any(&self, purpose: impl Fn(&Call) -> bool) -> bool {
        self.purposes.values().any(purpose)
    }

    /// A request is gone: its own calls go (Envoy cancels a deleted stream's callouts, so their
    /// answers never come), with the lookups it owned that nobody waits for any more.
    pub(super) fn forget(&mut self, ctx: u32, orphaned: &[u64]) {
        self.retain(|call| match call {
            Call::Write { context }
            | Call::Replay { context }
            | Call::Introspect { context, .. }
            | Call::Confirm { context }
            | Call::Query { context }
            | Call::Lookup { key: None, context } => *context != ctx,
            Call::Lookup { key: Some(k), .. } => !orphaned.contains(k),
            _ => true,
        });
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.purposes.len()
    }

    #[cfg(test)]
    pub(super) fn holds(&self, token_id: u32) -> bool {
        self.purposes.contains_key(&token_id)
    }

    #[cfg(test)]
    pub(super) fn nonces(&self) -> usize {
        self.nonces.len()
    }
}

impl Gateway {
    /// Sends a call that is not webdis's (a key set's fetch) for `purpose`.
    pub(super) fn send(
        &mut self,
        call: Callout<'_>,
        purpose: Call,
        host: &mut dyn Host,
    ) -> Result<u32, DispatchError> {
        let token_id = host.dispatch(call)?;
        self.calls.purposes.insert(token_id, purpose);
        Ok(token_id)
    }

    /// Sends a webdis command for `purpose`, with a fresh nonce its reply must echo.
    pub(super) fn send_webdis(
        &mut self,
        call: Callout<'_>,
        purpose: Call,
        host: &mut dyn Host,
    ) -> Result<u32, DispatchError> {
        let nonce = self.rng.u64(..);
        let path = crate::webdis::nonce_path(call.path, nonce);
        let token_id = self.send(Callout { path: &path, ..call }, purpose, host)?;
        self.calls.nonces.insert(token_id, nonce);
        Ok(token_id)
    }

    /// A callout answered. `ctx` is the context it was delivered to.
    pub fn on_call_response(&mut self, ctx: u32, token_id: u32, body_size: usize, host: &mut dyn Host) {
        let Some((call, nonce)) = self.calls.take(token_id) else {
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
                &format!("context {ctx}: store reply of {body_size} bytes not read (limit {limit}): treated as a failure"),
            );
            status = None;
        }
        if let Some(nonce) = nonce {
            if status == Some(200) {
                match crate::webdis::unwrap_reply(nonce, &body) {
                    Some(inner) => body = inner.to_vec(),
                    None => {
                        // Another call's reply: as good as none.
                        host.log(
                            LogLevel::Warn,
                            &format!("context {ctx}: webdis reply without this call's nonce (a reply for another call): treated as a store failure"),
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
                    Some(key) => match self.revocation.inflight.remove(&key) {
                        Some(inflight) => inflight.waiters,
                        None => return,
                    },
                    None => vec![context],
                };
                self.lookup_answered(ctx, &waiters, status, &body, host);
            }
            Call::Write { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Write(write) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                Some(gw.write_answered(req, write, status, &body, host))
            }),
            Call::Introspect { hash, context } => {
                self.introspection_answered(ctx, &hash, context, status, &body, host)
            }
            Call::Replay { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Replay(wait) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                Some(gw.replay_answered(req, wait, status, &body, host))
            }),
            Call::Confirm { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Confirm(wait) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                Some(gw.confirm_answered(req, wait, status, &body, host))
            }),
            Call::Query { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Query { label, id, limit } = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return None;
                };
                Some(gw.query_answered(req, label, &id, limit, status, &body, host))
            }),
            Call::LogWrite { then } => self.log_write_answered(then, status, &body, host),
            Call::Sync { route, delta } => self.sync_answered(&route, delta, status, &body, host),
        }
    }
}
