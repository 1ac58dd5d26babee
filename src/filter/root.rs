//! The root context: configuration at `on_configure`, and on the timer the log-store flush (every
//! VM) and the cluster-wide rate-limit sync (the elected VM).

use super::http::Request;
use super::*;

#[derive(Default)]
pub(super) struct Root {
    config: Option<Rc<Config>>,
    metrics: Option<Rc<Metrics>>,
    /// This VM's identity in the sync leader election.
    vm_id: u64,
    /// Per cluster-wide route: the Redis counter's value at our last sync.
    last_totals: HashMap<String, u64>,
    /// Outstanding INCRBY calls: token id -> (route, delta sent).
    syncing: HashMap<u32, (String, u64)>,
    /// Outstanding log-store writes.
    log_calls: HashSet<u32>,
    last_flush_ms: u64,
    last_sync_ms: u64,
    last_counters_ms: u64,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, body_size: usize, _: usize) {
        if self.log_calls.remove(&token_id) {
            let (status, body) = call_response(body_size);
            if let Some(m) = &self.metrics {
                Metrics::inc(if access_log::write_ok(status, &body) {
                    m.log_stored
                } else {
                    m.log_errors
                });
            }
            return;
        }
        let Some((route, delta)) = self.syncing.remove(&token_id) else {
            return;
        };
        let (Some(config), Some(metrics)) = (self.config.clone(), self.metrics.clone()) else {
            return;
        };
        let Some(limits) = config
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref())
            .find(|l| l.name == route)
        else {
            return;
        };
        let (status, body) = call_response(body_size);
        match cluster::parse_incrby(status, &body) {
            Ok(total) => {
                let others = cluster::others(self.last_totals.get(&route).copied(), total, delta);
                self.last_totals.insert(route, total);
                cluster::drain(
                    &HostStore,
                    &limits.route_key,
                    limits.route_fingerprint,
                    &limits.route,
                    now_ms(),
                    others,
                );
            }
            Err(e) => {
                Metrics::inc(metrics.rl_sync_errors);
                warn!("rate limit sync of {route} failed: {e}");
                cluster::add(&HostStore, &limits.pending_key, delta);
            }
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        info!("gateway filter {} starting", env!("CARGO_PKG_VERSION"));
        let mut id = [0u8; 8];
        id.copy_from_slice(random_bytes().get(..8).unwrap_or(&[1u8; 8]));
        self.vm_id = u64::from_le_bytes(id).max(1);
        true
    }

    /// Every VM flushes its buffered log records; the leader VM also syncs cluster-wide limits.
    fn on_tick(&mut self) {
        let Some(config) = self.config.clone() else { return };
        let now = now_ms();
        if now.saturating_sub(self.last_counters_ms) >= COUNTER_FLUSH_MS {
            self.last_counters_ms = now;
            flush_counters();
            // Envoy's log level can change at runtime (admin /logging): re-read it here, not per request.
            super::http::ENVOY_LOG_LEVEL.with(|l| l.set(hostcalls::get_log_level().ok()));
        }
        if let Some(store) = &config.logs.store {
            if now.saturating_sub(self.last_flush_ms) >= store.flush_interval_ms {
                self.last_flush_ms = now;
                self.flush_logs(store);
            }
        }
        if let Some(sync) = &config.rate_limits.sync {
            if now.saturating_sub(self.last_sync_ms) >= sync.interval_ms {
                self.last_sync_ms = now;
                self.sync_limits(&config, sync);
            }
        }
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(status) => {
                error!("gateway filter: cannot read plugin configuration: {status:?}");
                return false;
            }
        };
        let cfg = match Config::from_json(&bytes) {
            Ok(cfg) => cfg,
            Err(e) => {
                error!("gateway filter: invalid configuration: {e}");
                return false;
            }
        };
        let metrics = match Metrics::define(&cfg) {
            Ok(m) => m,
            Err(e) => {
                error!("gateway filter: {e}");
                return false;
            }
        };
        info!(
            "gateway filter configured: {} routes, jwt {}, revocation {}, log store {}",
            cfg.routes.len(),
            if cfg.verifier.is_some() { "on" } else { "off" },
            if cfg.revocation.is_some() { "on" } else { "off" },
            if cfg.logs.store.is_some() { "on" } else { "off" },
        );
        create_rate_limit_keys(&cfg);
        // One tick drives both timers: the log flush (every VM) and the limit sync (the leader).
        let cluster_wide = cfg
            .routes
            .iter()
            .filter_map(|r| r.limits.as_ref())
            .any(|l| l.cluster_wide);
        let sync_ms = cfg
            .rate_limits
            .sync
            .as_ref()
            .filter(|_| cluster_wide)
            .map(|s| s.interval_ms);
        let flush_ms = cfg.logs.store.as_ref().map(|s| s.flush_interval_ms);
        // One timer in every VM: counters, the log flush, the limit sync (leader only).
        let tick = [sync_ms, flush_ms, Some(COUNTER_FLUSH_MS)]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(COUNTER_FLUSH_MS);
        let _ = hostcalls::set_tick_period(Duration::from_millis(tick));
        self.config = Some(Rc::new(cfg));
        self.metrics = Some(Rc::new(metrics));
        true
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request::new(
            self.config.clone()?,
            self.metrics.clone()?,
        )))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

impl Root {
    /// Leader VM only: send each cluster-wide route's local consumption to Redis.
    fn sync_limits(&mut self, config: &Config, sync: &crate::config::SyncSettings) {
        if !cluster::elect(
            &HostStore,
            self.vm_id,
            now_ms(),
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
            if self.syncing.values().any(|(route, _)| *route == limits.name) {
                continue; // the previous sync of this route is still out
            }
            let delta = cluster::take_all(&HostStore, &limits.pending_key);
            let path = cluster::incrby_path(&limits.name, delta);
            let call = webdis_call(&sync.cluster, "GET", &path, None, sync.timeout_ms);
            match call {
                Ok(token_id) => {
                    self.syncing.insert(token_id, (limits.name.clone(), delta));
                }
                Err(status) => {
                    if let Some(m) = &self.metrics {
                        Metrics::inc(m.rl_sync_errors);
                    }
                    warn!("rate limit sync dispatch failed: {status:?}");
                    cluster::add(&HostStore, &limits.pending_key, delta);
                }
            }
        }
    }

    /// Writes up to [`FLUSH_BATCH`] buffered records: each appended to its trace's list and
    /// prepended to its user's list (trimmed to the configured count); keys expire with the
    /// retention.
    fn flush_logs(&mut self, store: &crate::config::LogStoreSettings) {
        if self.log_calls.len() > MAX_LOG_CALLS_IN_FLIGHT {
            return; // webdis is slow: keep the records buffered
        }
        let batch: Vec<StoredRecord> = LOG_BUFFER.with(|b| {
            let mut b = b.borrow_mut();
            let n = b.len().min(FLUSH_BATCH);
            b.drain(..n).collect()
        });
        let mut users: Vec<String> = Vec::new();
        for r in &batch {
            let key = access_log::trace_key(&r.trace_id);
            self.store_call(
                store,
                "PUT",
                &access_log::append_path(&key),
                Some(r.json.as_bytes()),
            );
            self.store_call(
                store,
                "GET",
                &access_log::expire_path(&key, store.retention_seconds),
                None,
            );
            if let Some(user) = &r.user_id {
                let key = access_log::user_key(user);
                self.store_call(
                    store,
                    "PUT",
                    &access_log::prepend_path(&key),
                    Some(r.json.as_bytes()),
                );
                if !users.contains(user) {
                    users.push(user.clone());
                }
            }
        }
        for user in users {
            let key = access_log::user_key(&user);
            self.store_call(
                store,
                "GET",
                &access_log::trim_path(&key, store.user_records),
                None,
            );
            self.store_call(
                store,
                "GET",
                &access_log::expire_path(&key, store.retention_seconds),
                None,
            );
        }
    }

    fn store_call(
        &mut self,
        store: &crate::config::LogStoreSettings,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) {
        let call = webdis_call(&store.cluster, method, path, body, store.timeout_ms);
        match call {
            Ok(token_id) => {
                self.log_calls.insert(token_id);
            }
            Err(status) => {
                if let Some(m) = &self.metrics {
                    Metrics::inc(m.log_errors);
                }
                warn!("log store dispatch failed: {status:?}");
            }
        }
    }
}

/// Records written per VM per flush, and the cap on outstanding log-store calls.
const FLUSH_BATCH: usize = 200;
const MAX_LOG_CALLS_IN_FLIGHT: usize = 1000;
