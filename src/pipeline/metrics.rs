//! Metrics: the counters and histogram the orchestrator defines once, and the per-VM
//! counting that hands totals to the host on the timer.

use super::*;
use crate::outcome::Scope;

/// The metrics duty: counter and histogram ids, and this VM's counts not yet handed over.
pub(super) struct Metrics {
    pub(super) lookups: u32,
    pub(super) coalesced: u32,
    pub(super) cache_hits: u32,
    pub(super) revoked: u32,
    pub(super) store_errors: u32,
    pub(super) allowed_on_error: u32,
    pub(super) allowed_stale: u32,
    /// Allowed / limited per kind: IP, user, route.
    pub(super) rl_allowed: [u32; 3],
    pub(super) rl_limited: [u32; 3],
    pub(super) rl_contended: u32,
    pub(super) rl_sync_errors: u32,
    /// Per canary route: [stable, canary] request counters.
    pub(super) canary: HashMap<String, [u32; 2]>,
    pub(super) duration: u32,
    pub(super) log_stored: u32,
    pub(super) log_dropped: u32,
    /// Dropped records by class ([`RecordClass`] order).
    pub(super) log_dropped_class: [u32; logs::RECORD_CLASSES],
    /// Refusals counted in a summary instead of stored one by one.
    pub(super) log_summarized: u32,
    pub(super) log_errors: u32,
    /// Counts since the last hand-over to the host, by id.
    pub(super) counts: HashMap<u32, i64>,
    /// Counters defined on first use, by name.
    pub(super) named: HashMap<String, u32>,
    /// `gateway_requests_total`'s and `gateway_auth_failures_total`'s ids by (route, outcome)
    /// and by reason: their labelled names are built once, not per request.
    pub(super) by_outcome: HashMap<(Option<usize>, &'static str), u32>,
    pub(super) by_reason: HashMap<&'static str, u32>,
    /// The totals last handed over for the host's gauges-by-name.
    pub(super) last_totals: HashMap<String, u64>,
    pub(super) last_counters_ms: u64,
}

impl Metrics {
    pub(super) fn define(cfg: &Config, host: &mut dyn Host) -> Result<Self, String> {
        let mut def = |kind, name: &str| {
            host.define_metric(kind, name)
                .ok_or_else(|| format!("cannot define metric {name}"))
        };
        let mut canary = HashMap::new();
        for r in cfg.routes.iter().filter(|r| r.canary.is_some()) {
            let name = |target| stat::name("gateway_canary_total", &[("route", &r.name), ("target", target)]);
            canary.insert(
                r.name.clone(),
                [
                    def(MetricKind::Counter, &name("stable"))?,
                    def(MetricKind::Counter, &name("canary"))?,
                ],
            );
        }
        let c = MetricKind::Counter;
        let rl = |scope, decision| {
            stat::name(
                "gateway_ratelimit_total",
                &[("scope", scope), ("decision", decision)],
            )
        };
        Ok(Metrics {
            lookups: def(c, "gateway_revocation_lookups_total")?,
            coalesced: def(c, "gateway_revocation_coalesced_total")?,
            cache_hits: def(c, "gateway_revocation_cache_hits_total")?,
            revoked: def(c, "gateway_revocation_revoked_total")?,
            store_errors: def(c, "gateway_revocation_store_errors_total")?,
            allowed_on_error: def(c, "gateway_revocation_allowed_on_error_total")?,
            allowed_stale: def(c, "gateway_revocation_allowed_stale_total")?,
            rl_allowed: [
                def(c, &rl(Scope::ALL[0].metric_label(), "allowed"))?,
                def(c, &rl(Scope::ALL[1].metric_label(), "allowed"))?,
                def(c, &rl(Scope::ALL[2].metric_label(), "allowed"))?,
            ],
            rl_limited: [
                def(c, &rl(Scope::ALL[0].metric_label(), "limited"))?,
                def(c, &rl(Scope::ALL[1].metric_label(), "limited"))?,
                def(c, &rl(Scope::ALL[2].metric_label(), "limited"))?,
            ],
            rl_contended: def(c, "gateway_ratelimit_contended_total")?,
            rl_sync_errors: def(c, "gateway_ratelimit_sync_errors_total")?,
            duration: def(MetricKind::Histogram, "gateway_request_duration_ms")?,
            log_stored: def(c, "gateway_log_records_stored_total")?,
            log_dropped: def(c, "gateway_log_records_dropped_total")?,
            log_dropped_class: [
                def(c, "gateway_log_records_dropped_anonymous_total")?,
                def(c, "gateway_log_records_dropped_authenticated_total")?,
                def(c, "gateway_log_records_dropped_summary_total")?,
                def(c, "gateway_log_records_dropped_privileged_total")?,
            ],
            log_summarized: def(c, "gateway_log_records_summarized_total")?,
            log_errors: def(c, "gateway_log_store_errors_total")?,
            counts: HashMap::new(),
            named: HashMap::new(),
            by_outcome: HashMap::new(),
            by_reason: HashMap::new(),
            last_totals: HashMap::new(),
            last_counters_ms: 0,
            canary,
        })
    }
}

impl Gateway {
    /// Counts locally; [`Gateway::on_tick`] hands the totals to the host. A host call per
    /// counter per request was a large part of the filter's cost.
    pub(super) fn inc(&mut self, id: u32) {
        *self.metrics.counts.entry(id).or_insert(0) += 1;
    }

    /// Counts a request that ended: `gateway_requests_total{route, outcome}`, and
    /// `gateway_auth_failures_total{reason}` for an authentication failure.
    pub(super) fn count_request(&mut self, route: Option<usize>, outcome: Outcome, host: &mut dyn Host) {
        let label = outcome.label();
        let config = &self.config;
        let id = counter_id(&mut self.metrics.by_outcome, (route, label), host, || {
            let name = route
                .and_then(|i| config.routes.get(i))
                .map_or("none", |r| r.name.as_str());
            stat::name("gateway_requests_total", &[("route", name), ("outcome", label)])
        });
        if let Some(id) = id {
            self.inc(id);
        }
        if outcome.is_auth_failure() {
            let reason = outcome.decision();
            let id = counter_id(&mut self.metrics.by_reason, reason, host, || {
                stat::name("gateway_auth_failures_total", &[("reason", reason)])
            });
            if let Some(id) = id {
                self.inc(id);
            }
        }
    }

    pub(super) fn inc_named(&mut self, name: &str, host: &mut dyn Host) {
        let id = match self.metrics.named.get(name) {
            Some(id) => Some(*id),
            None => {
                let id = host.define_metric(MetricKind::Counter, name);
                if let Some(id) = id {
                    self.metrics.named.insert(name.to_string(), id);
                }
                id
            }
        };
        if let Some(id) = id {
            self.inc(id);
        }
    }
}

/// The id of the counter cached under `key`, defined (named by `name`) on first use.
fn counter_id<K: std::hash::Hash + Eq>(
    cache: &mut HashMap<K, u32>,
    key: K,
    host: &mut dyn Host,
    name: impl FnOnce() -> String,
) -> Option<u32> {
    if let Some(id) = cache.get(&key) {
        return Some(*id);
    }
    let id = host.define_metric(MetricKind::Counter, &name())?;
    cache.insert(key, id);
    Some(id)
}
