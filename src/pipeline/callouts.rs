//! Callout answers: which call an answer belongs to, checked (its nonce, its size), and
//! handed to the duty that made it.

use super::*;

impl Gateway {
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
                &format!("context {ctx}: store reply of {body_size} bytes not read (limit {limit}): treated as a failure"),
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
            Call::Confirm { context } => self.with_request(ctx, context, host, |gw, req, host| {
                let Stage::Confirm(wait) = std::mem::replace(&mut req.stage, Stage::Idle) else {
                    return Flow::Paused;
                };
                gw.confirm_answered(req, wait, status, &body, host)
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
                    // The trims follow a push that went in (after a failed one they would only
                    // add calls to a store that is failing).
                    for path in then.into_iter().filter(|_| ok) {
                        self.store_call(store, "GET", &path, None, Vec::new(), host);
                    }
                    self.pump_logs(store, host);
                }
            }
            Call::Sync { route, delta } => self.sync_answered(&route, delta, status, &body, host),
        }
    }

    /// Runs `f` on request `context` with it as the host's current context (switching to it
    /// and back when the answer was delivered elsewhere); resumes it when `f` lets it go on.
    pub(super) fn with_request(
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
}
