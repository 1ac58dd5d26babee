//! Admission by rate limits: the per-IP, per-user and per-route buckets in shared data (and
//! the leases a VM takes from a busy bucket), and the cluster-wide sync of route buckets.

use super::*;

/// The rate-limit duty's state in this VM.
#[derive(Default)]
pub(super) struct LimitsState {
    /// Tokens this VM took from busy shared buckets and spends locally.
    pub(super) leases: Leases,
    /// The key of the per-IP and per-user slot hash, shared by every VM of the store.
    pub(super) slot_seed: ratelimit::SlotSeed,
    pub(super) last_sync_ms: u64,
}

impl Gateway {
    /// Notes a bucket the request was charged to: the binding one (fewest tokens left) for the
    /// headers, and its policy where `RateLimit-Policy` lists them.
    fn note_charged(&self, req: &mut Request, check: &Check, v: ratelimit::Verdict) {
        if self.config.rate_limits.headers.ietf() {
            req.charged.policies.push((check.kind, check.limit));
        }
        if req.charged.binding.is_none_or(|(_, b)| v.remaining < b.remaining) {
            req.charged.binding = Some((check.kind, v));
        }
    }

    /// Creates every rate-limit key up front, so request-time updates are CAS on existing keys.
    pub(super) fn create_rate_limit_keys(&self, store: &dyn SharedStore) {
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

    /// Reads the client address when limits, canary stickiness or logs need it.
    pub(super) fn note_client(
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
        if needs {
            Self::read_client_ip(req, config, host);
        }
    }

    fn read_client_ip(req: &mut Request, config: &Config, host: &mut dyn Host) {
        let hops = config.rate_limits.trusted_hops;
        let xff = if hops > 0 {
            headers::get_str(&req.headers, "x-forwarded-for")
        } else {
            None
        };
        let peer = host.source_address();
        req.client_ip = ratelimit::client_ip(peer.as_deref(), xff, hops);
    }

    /// Whether the caller's budget of failed signature checks lets its token be checked: asked
    /// only for a token the verified-token cache does not hold (a hit costs no host call).
    pub(super) fn may_verify(&self, req: &mut Request, host: &mut dyn Host) -> bool {
        let Some(budget) = &self.config.rate_limits.bad_signatures else {
            return true;
        };
        match policy::bearer_token(&req.headers) {
            Ok(token) if !self.tokens.holds(token) => {}
            _ => return true,
        }
        if req.client_ip.is_none() {
            Self::read_client_ip(req, &self.config, host);
        }
        match req.client_ip.as_deref() {
            Some(ip) => budget.allows(
                shared(&self.local, host),
                &self.limits.slot_seed,
                ip,
                req.clock_ms,
            ),
            None => true,
        }
    }

    /// A token whose signature did not verify spends the caller's budget.
    pub(super) fn charge_bad_signature(&mut self, req: &Request, reply: &Reply, host: &mut dyn Host) {
        // A bad signature, or an opaque token its provider called inactive (each cost a call).
        let bad = matches!(
            reply.outcome,
            Outcome::InvalidToken(
                crate::outcome::TokenFault::Signature | crate::outcome::TokenFault::Inactive
            )
        );
        if let (true, Some(budget), Some(ip)) = (
            bad,
            &self.config.rate_limits.bad_signatures,
            req.client_ip.as_deref(),
        ) {
            budget.charge(
                shared(&self.local, host),
                &self.limits.slot_seed,
                ip,
                req.clock_ms,
            );
        }
    }

    /// Takes a token from one bucket; `Err` is the 429 to send.
    pub(super) fn charge(
        &mut self,
        req: &mut Request,
        check: &Check,
        limits: &RouteLimits,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Result<(), Reply> {
        let idx = check.kind.index();
        // A live lease answers without touching shared data; else take a batch (one token for
        // limits too small to lease) and keep the rest.
        let batch = ratelimit::lease::batch(&check.limit);
        let leased = if batch > 1 {
            self.limits
                .leases
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
                    self.limits
                        .leases
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
                self.note_charged(req, check, v);
                Ok(())
            }
            Update::Done(v) => {
                if let Some(id) = self.metrics.rl_limited.get(idx).copied() {
                    self.inc(id);
                }
                self.note_charged(req, check, v);
                req.charged.binding = Some((check.kind, v));
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
                req.log(
                    LogLevel::Warn,
                    &format!(
                        "rate limit bucket {} contended ({conflicts} CAS conflicts): allowed",
                        check.key
                    ),
                    host,
                );
                Ok(())
            }
        }
    }

    pub(super) fn charge_ip(
        &mut self,
        req: &mut Request,
        limits: Option<&RouteLimits>,
        now_ms: u64,
        host: &mut dyn Host,
    ) -> Result<(), Reply> {
        let (Some(limits), Some(ip)) = (limits, req.client_ip.clone()) else {
            return Ok(());
        };
        let check = limits.ip_check(&self.config.rate_limits, &self.limits.slot_seed, &ip);
        self.charge(req, &check, limits, now_ms, host)
    }

    /// Leader VM only: send each cluster-wide route's local consumption to Redis.
    pub(super) fn sync_limits(&mut self, config: &Config, sync: &SyncTarget, now: u64, host: &mut dyn Host) {
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
                .any(|c| matches!(c, Call::Sync { route, .. } if *route == limits.name));
            if busy {
                continue; // the previous sync of this route is still out
            }
            let delta = cluster::take_all(shared(&self.local, host), &limits.pending_key);
            let path = cluster::incrby_path(&limits.name, delta);
            let call = self.send_webdis(
                Callout::get(&sync.cluster, &path, sync.timeout_ms)
                    .with_authorization(config.webdis_auth.as_deref())
                    .with_authority(config.webdis_authority.as_deref()),
                Call::Sync {
                    route: limits.name.clone(),
                    delta,
                },
                host,
            );
            match call {
                Ok(_) => {}
                Err(e) => self.sync_failed(limits, delta, &format!("dispatch failed: {e}"), host),
            }
        }
    }

    /// A sync did not land: count it, and put the consumption back for the next one.
    pub(super) fn sync_failed(&mut self, limits: &RouteLimits, delta: u64, why: &str, host: &mut dyn Host) {
        let id = self.metrics.rl_sync_errors;
        self.inc(id);
        host.log(
            LogLevel::Warn,
            &format!("rate limit sync of {} failed: {why}", limits.name),
        );
        cluster::add(shared(&self.local, host), &limits.pending_key, delta);
    }

    pub(super) fn sync_answered(
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
                let others = cluster::others(self.metrics.last_totals.get(route).copied(), total, delta);
                self.metrics.last_totals.insert(route.to_string(), total);
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
}
