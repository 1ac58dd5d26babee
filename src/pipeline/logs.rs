//! Request logs: the record of each request, printed and buffered for the log store, and the
//! timer's flush to it.

use super::*;

/// A record waiting for the store.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub(super) trace_id: String,
    pub(super) user_id: Option<String>,
    pub(super) json: String,
}

impl StoredRecord {
    /// A record of a caller who was not authenticated (the first to go when space runs out).
    pub fn is_anonymous(&self) -> bool {
        self.user_id.is_none()
    }
}

/// The request's log record.
pub(super) fn new_record(req: &Request, route: Option<&str>) -> Record {
    let value = |name: &str| headers::get_str(&req.headers, name);
    let full_path = value(":path").unwrap_or("");
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let upstream = match (route, req.canary) {
        (Some(r), Some(true)) => Some(format!("{r}-canary")),
        (r, _) => r.map(str::to_string),
    };
    Record {
        timestamp_ms: req.started_ms,
        trace_id: req.trace.trace_id.clone(),
        method: access_log::clip(value(":method").unwrap_or(""), access_log::MAX_FIELD).to_string(),
        path: access_log::clip(path, access_log::MAX_PATH).to_string(),
        query_params: access_log::query_params(query),
        client_ip: req.client_ip.clone(),
        user_agent: value("user-agent")
            .map(|ua| access_log::clip(ua, access_log::MAX_USER_AGENT).to_string()),
        user_id: req.caller.as_ref().and_then(|c| c.identity.user_id.clone()),
        route: route.map(str::to_string),
        upstream_service: upstream,
        canary: req.canary,
        status: 0,
        duration_ms: 0.0,
        decision: String::new(),
    }
}

impl Gateway {
    /// The stream ended: metrics, the log line and record.
    pub fn on_log(&mut self, ctx: u32, host: &mut dyn Host) {
        let Some(req) = self.requests.remove(&ctx) else {
            return;
        };
        self.forget(ctx, host);
        let elapsed_us = match req.elapsed_us {
            Some(us) => us,
            None => host.now_ms().saturating_sub(req.started_ms).saturating_mul(1000),
        };
        let duration_ms = elapsed_us as f64 / 1000.0;
        host.record_metric(self.metrics.duration, (elapsed_us + 500) / 1000);
        let config = Rc::clone(&self.config);
        let route = req
            .route
            .and_then(|i| config.routes.get(i))
            .map(|r| r.name.as_str());
        let outcome = req.outcome;
        let decision = outcome.decision();
        self.inc_named(
            &stat::name(
                "gateway_requests_total",
                &[("route", route.unwrap_or("none")), ("outcome", outcome.label())],
            ),
            host,
        );
        if outcome.is_auth_failure() {
            self.inc_named(
                &stat::name("gateway_auth_failures_total", &[("reason", decision)]),
                host,
            );
        }
        // Records are written by the timer: without timers there is no log store.
        let store = config.logs.store.as_ref().filter(|_| self.timers);
        let status = req.status.unwrap_or(0);
        let level = match access_log::level(status) {
            access_log::Level::Error => LogLevel::Error,
            access_log::Level::Warn => LogLevel::Warn,
            access_log::Level::Info => LogLevel::Info,
        };
        // Build the line only if it is printed (`logs.enabled`, `logs.level`) or stored.
        let print = config.logs.enabled && access_log::level(status) >= config.logs.level;
        if !print && store.is_none() {
            return;
        }
        let mut record = new_record(&req, route);
        record.status = status;
        record.duration_ms = duration_ms;
        record.decision = decision.to_string();
        let json = record.to_json();
        if print {
            host.log(level, &json);
        }
        if let Some(store) = store {
            // What the store keeps: requests that went upstream, and the gateway's answers to
            // callers whose token was valid and not revoked. Refused anonymous requests
            // (unrouted paths, missing, invalid or revoked tokens, per-IP limits) are counted
            // and printed, never stored: they cannot fill the store or crowd out the records
            // of authenticated callers.
            if !req.cleared && outcome != Outcome::Forwarded {
                self.inc_named("gateway_log_records_skipped_total", host);
                return;
            }
            let stored = StoredRecord {
                trace_id: record.trace_id,
                user_id: record.user_id.filter(|_| req.cleared),
                json,
            };
            self.buffer_record(stored, store.buffer as usize);
        }
    }

    /// Hands over the records waiting for the store, to a gateway that writes them for this
    /// one (the native build writes from Envoy's main thread, which has a timer).
    pub fn take_stored_records(&mut self) -> Vec<StoredRecord> {
        self.anonymous_buffered = 0;
        self.log_buffer.drain(..).collect()
    }

    /// Counts records dropped on their way to the gateway that writes them (by class).
    pub fn count_dropped_records(&mut self, anonymous: u64, authenticated: u64) {
        for (class, n) in [(0usize, anonymous), (1, authenticated)] {
            for _ in 0..n {
                let total = self.metrics.log_dropped;
                self.inc(total);
                if let Some(id) = self.metrics.log_dropped_class.get(class).copied() {
                    self.inc(id);
                }
            }
        }
    }

    /// Takes records another gateway gathered, under this one's buffer bounds.
    pub fn add_stored_records(&mut self, records: Vec<StoredRecord>) {
        let Some(capacity) = self.config.logs.store.as_ref().map(|s| s.buffer as usize) else {
            return;
        };
        for r in records {
            self.buffer_record(r, capacity);
        }
    }

    /// Queues a record for the store. Anonymous records may fill half the buffer; a record of an
    /// authenticated caller may use all of it, pushing out the oldest anonymous one, so a flood
    /// of anonymous noise cannot keep the requests of users and admins out of the audit log.
    /// Drops are counted by class.
    pub(super) fn buffer_record(&mut self, record: StoredRecord, capacity: usize) {
        let anonymous_cap = capacity / 2;
        let dropped = if record.user_id.is_none() {
            if self.anonymous_buffered >= anonymous_cap || self.log_buffer.len() >= capacity {
                Some(0)
            } else {
                self.anonymous_buffered += 1;
                self.log_buffer.push_back(record);
                None
            }
        } else if self.log_buffer.len() < capacity {
            self.log_buffer.push_back(record);
            None
        } else if let Some(i) = self.log_buffer.iter().position(|r| r.user_id.is_none()) {
            self.log_buffer.remove(i);
            self.anonymous_buffered = self.anonymous_buffered.saturating_sub(1);
            self.log_buffer.push_back(record);
            Some(0)
        } else {
            Some(1)
        };
        if let Some(class) = dropped {
            let total = self.metrics.log_dropped;
            self.inc(total);
            if let Some(id) = self.metrics.log_dropped_class.get(class).copied() {
                self.inc(id);
            }
        }
    }

    /// Writes up to [`FLUSH_BATCH`] buffered records: each appended to its trace's list and
    /// prepended to its user's list (trimmed to the configured count); keys expire with the
    /// retention.
    pub(super) fn flush_logs(&mut self, store: &LogStore, host: &mut dyn Host) {
        if self.log_calls > MAX_LOG_CALLS_IN_FLIGHT {
            return; // webdis is slow: keep the records buffered
        }
        let n = self.log_buffer.len().min(FLUSH_BATCH);
        let batch: Vec<StoredRecord> = self.log_buffer.drain(..n).collect();
        let anonymous = batch.iter().filter(|r| r.user_id.is_none()).count();
        self.anonymous_buffered = self.anonymous_buffered.saturating_sub(anonymous);
        // Each user's list is trimmed after the last of its records in this batch.
        let last_of_user = |i: usize, user: &str| {
            !batch
                .iter()
                .skip(i + 1)
                .any(|later| later.user_id.as_deref() == Some(user))
        };
        for (i, r) in batch.iter().enumerate() {
            let key = access_log::trace_key(&r.trace_id);
            let json = Some(r.json.as_bytes());
            let then = vec![
                // The first records of a trace stay: a client reusing someone's trace id
                // can add to the list, not push their records out.
                access_log::trim_path(&key, access_log::TRACE_RECORDS),
                access_log::expire_path(&key, store.retention_seconds),
            ];
            self.store_call(store, "PUT", &access_log::append_path(&key), json, then, host);
            if let Some(user) = &r.user_id {
                let key = access_log::user_key(user);
                let then = if last_of_user(i, user) {
                    vec![
                        access_log::trim_path(&key, store.user_records),
                        access_log::expire_path(&key, store.retention_seconds),
                    ]
                } else {
                    Vec::new()
                };
                self.store_call(store, "PUT", &access_log::prepend_path(&key), json, then, host);
            }
        }
    }

    pub(super) fn store_call(
        &mut self,
        store: &LogStore,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        then: Vec<String>,
        host: &mut dyn Host,
    ) {
        let call = self.webdis_call(
            Callout::get(&store.cluster, path, store.timeout_ms)
                .with_body(method, body)
                .with_authorization(store.authorization.as_deref())
                .with_authority(Some(&store.authority)),
            host,
        );
        match call {
            Ok(token_id) => {
                self.calls.insert(token_id, Call::LogWrite { then });
                self.log_calls += 1;
            }
            Err(e) => {
                let id = self.metrics.log_errors;
                self.inc(id);
                host.log(LogLevel::Warn, &format!("log store dispatch failed: {e}"));
            }
        }
    }
}
