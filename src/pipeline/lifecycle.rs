//! The VM's life outside requests: start-up report, the timer, and a request's end.

use super::*;

impl Gateway {
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
        let confirm = cfg
            .revocation
            .as_ref()
            .and_then(|r| r.confirm.as_ref())
            .map(|_| rv::CONFIRM_RETRY_MS);
        [sync, flush, jwks, confirm, Some(COUNTER_FLUSH_MS)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(COUNTER_FLUSH_MS)
    }

    /// Start-up is over: `timers` says whether the host took the tick period. Logs one line
    /// with what the host offers and what is degraded for want of it.
    /// The host's capabilities are known: report what is degraded, or refuse a configuration
    /// that needs what the host lacks (naming the field), rather than skip it silently.
    pub fn started(&mut self, timers: bool, host: &mut dyn Host) -> Result<(), String> {
        self.timers = timers;
        let cfg = Rc::clone(&self.config);
        if !timers {
            if cfg.logs.store.is_some() {
                return Err("logs.store: this host runs no timers, which writing records to the store needs; remove logs.store (request lines are still printed)".into());
            }
            if let Some(r) = cfg
                .routes
                .iter()
                .find(|r| r.limits.as_ref().is_some_and(|l| l.cluster_wide))
            {
                return Err(format!(
                    "rate_limit.cluster_wide of route {}: this host runs no timers, which the sync through Redis needs; remove cluster_wide",
                    r.name
                ));
            }
        }
        let mut degraded: Vec<&str> = Vec::new();
        if self.local.is_some() {
            degraded.push("no shared data: rate limits, the revocation cache and bans are per worker");
        }
        if !timers {
            degraded.push("no timers: counters not reported, key sets fetched only when a token needs them");
        }
        let public_keys = cfg.verifier.as_ref().is_some_and(|v| v.uses_public_keys());
        if public_keys && !self.keys.host_verifies {
            degraded.push("no verify_signature: RSA and ECDSA checked by the module's own code");
        }
        let line = format!(
            "host offers: shared data {}, timers {}, verify_signature {}; {}",
            if self.local.is_none() { "yes" } else { "no" },
            if timers { "yes" } else { "no" },
            if self.keys.host_verifies { "yes" } else { "no" },
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
        Ok(())
    }

    /// The VM's timer (`ctx` is the root context): counters, the log level, the log flush, the
    /// limit sync (leader only), and new lookups for waiters whose lookup lost its owner.
    pub fn on_tick(&mut self, ctx: u32, host: &mut dyn Host) {
        let now = host.now_ms();
        if self.due(now, self.metrics.last_counters_ms, COUNTER_FLUSH_MS) {
            self.metrics.last_counters_ms = now;
            self.flush_counters(host);
        }
        let config = Rc::clone(&self.config);
        if let Some(store) = &config.logs.store {
            if self.due(now, self.logs.last_flush_ms, store.flush_interval_ms) {
                self.logs.last_flush_ms = now;
                self.flush_logs(store, host);
            }
        }
        if let Some(sync) = &config.rate_limits.sync {
            if self.due(now, self.limits.last_sync_ms, sync.interval_ms) {
                self.limits.last_sync_ms = now;
                self.sync_limits(&config, sync, now, host);
            }
        }
        self.adopt_orphans(ctx, host);
        self.adopt_introspections(ctx, host);
        self.retry_confirms(ctx, host);
        self.jwks_tick(ctx, now, host);
    }

    /// Hands the counts gathered since the last flush to the host's counters. The proxy-wasm
    /// build batches them to the timer (each is a host call across the VM boundary); the
    /// native build flushes after every request, where a counter is a plain function call.
    pub fn flush_counters(&mut self, host: &mut dyn Host) {
        if self.metrics.counts.is_empty() {
            return;
        }
        let mut pending: Vec<(u32, i64)> = self.metrics.counts.drain().collect();
        pending.sort_unstable();
        for (id, n) in pending {
            host.increment_metric(id, n);
        }
    }

    /// Whether a job run every `period_ms` is due: ticks come every `tick_period_ms` with some
    /// jitter, so half a tick of slack keeps a job whose period equals the tick from skipping
    /// every other tick.
    pub(super) fn due(&self, now: u64, last: u64, period_ms: u64) -> bool {
        now.saturating_add(self.tick_period_ms() / 2) >= last.saturating_add(period_ms)
    }

    /// The context is deleted (also after `on_log`): its state goes. A lookup it dispatched will
    /// not be answered; its waiters get a new one on the next tick. A request still here was never logged: the host has no `on_log`
    /// (APISIX), so it is logged now.
    pub fn on_done(&mut self, ctx: u32, host: &mut dyn Host) {
        if self.requests.contains_key(&ctx) {
            self.on_log(ctx, host);
        }
        self.forget(ctx, host);
    }

    /// The stream ended: the request leaves every duty, then its metrics, log line and record.
    pub fn on_log(&mut self, ctx: u32, host: &mut dyn Host) {
        let Some(req) = self.requests.remove(&ctx) else {
            return;
        };
        self.forget(ctx, host);
        self.log_request(&req, host);
    }

    /// A request leaves every duty that held it, and the calls made for it go.
    fn forget(&mut self, ctx: u32, host: &mut dyn Host) {
        self.forget_key_waiter(ctx, host);
        self.forget_introspection_waiter(ctx);
        let orphaned = self.forget_revocation_waiter(ctx);
        self.calls.forget(ctx, &orphaned);
    }
}
