//! Request logs: the record of each request, printed and buffered for the log store, and the
//! timer's flush to it.

use super::*;

/// What a stored record is worth to the audit trail, lowest first: when the buffer is full, a
/// record pushes out the oldest record of the lowest class below its own, so no flood of a
/// lower class (anonymous noise, one user's ordinary traffic) can evict a higher one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum RecordClass {
    /// Forwarded requests of callers without a token (public routes).
    Anonymous = 0,
    /// Authenticated callers' requests on routes that require no role.
    Ordinary = 1,
    /// One caller's repeated refusals (429s) in a window, counted in one record.
    Summary = 2,
    /// Requests on routes that require a role, and calls of the gateway's own endpoints
    /// (logout, refresh, bans and their lifting, log queries).
    Privileged = 3,
}

/// How many classes there are (the drop counters' order).
pub const RECORD_CLASSES: usize = 4;

/// A caller's repeated refusals are summarised per window of this length.
pub const SUMMARY_WINDOW_MS: u64 = 10_000;
/// Callers summarised at once per VM; refusals of further callers in the window are buffered as
/// they are (their class bounds them).
pub const MAX_SUMMARIES: usize = 256;

/// A record waiting for the store.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    pub(super) trace_id: String,
    pub(super) user_id: Option<String>,
    pub(super) json: String,
    pub(super) class: RecordClass,
    /// For a refusal that is summarised: its caller and decision. The gateway that writes the
    /// record (this one, or the native main thread's) stores the first of a window and counts
    /// the others.
    pub(super) repeat: Option<(String, &'static str)>,
}

/// One caller's refusals of one kind in the current window: the first was stored as it came,
/// the others are counted here and written as one record when the window ends.
#[derive(Debug)]
pub(super) struct Summary {
    first: StoredRecord,
    repeated: u64,
}

/// The summaries of the current window.
#[derive(Debug, Default)]
pub(super) struct Summaries {
    started_ms: u64,
    pub(super) by_caller: HashMap<(String, &'static str, RecordClass), Summary>,
}

/// Drops records from `queue` until it holds at most `cap`: refusals that would only have been
/// counted in a summary first (the newest first), then the lowest class first, the oldest first
/// within a class. Returns the drops by class (the refusals as summaries).
pub fn bound_records(queue: &mut Vec<StoredRecord>, cap: usize) -> [u64; RECORD_CLASSES] {
    let mut dropped = [0u64; RECORD_CLASSES];
    let mut excess = queue.len().saturating_sub(cap);
    let mut i = queue.len();
    while excess > 0 && i > 0 {
        i -= 1;
        if queue.get(i).is_some_and(|r| r.repeat.is_some()) {
            queue.remove(i);
            excess -= 1;
            if let Some(d) = dropped.get_mut(RecordClass::Summary as usize) {
                *d += 1;
            }
        }
    }
    for class in [
        RecordClass::Anonymous,
        RecordClass::Ordinary,
        RecordClass::Summary,
        RecordClass::Privileged,
    ] {
        if excess == 0 {
            break;
        }
        queue.retain(|r| {
            let drop = excess > 0 && r.class == class;
            if drop {
                excess -= 1;
                if let Some(d) = dropped.get_mut(class as usize) {
                    *d += 1;
                }
            }
            !drop
        });
    }
    dropped
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

/// The log duty's state in this VM.
pub(super) struct LogsState {
    /// Records waiting for the log store.
    pub(super) buffer: VecDeque<StoredRecord>,
    /// How many of the buffered records are anonymous (no user).
    pub(super) anonymous: usize,
    /// Callers' repeated refusals in the current window.
    pub(super) summaries: Summaries,
    /// Whether this gateway summarises refusals itself (else the one it hands records to).
    pub(super) summarize_here: bool,
    /// Log-store calls out.
    pub(super) calls: usize,
    pub(super) last_flush_ms: u64,
}

impl Default for LogsState {
    fn default() -> Self {
        LogsState {
            buffer: VecDeque::new(),
            anonymous: 0,
            summaries: Summaries::default(),
            summarize_here: true,
            calls: 0,
            last_flush_ms: 0,
        }
    }
}

impl Gateway {
    /// A request that ended: its metrics, its log line and its record.
    pub(super) fn log_request(&mut self, req: &Request, host: &mut dyn Host) {
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
        self.count_request(req.route, outcome, host);
        // Records are written by the timer: without timers there is no log store.
        let store = config.logs.store.as_ref().filter(|_| self.timers);
        let status = req.status.unwrap_or(0);
        let level = match access_log::level(status) {
            access_log::Level::Error => LogLevel::Error,
            access_log::Level::Warn => LogLevel::Warn,
            access_log::Level::Info => LogLevel::Info,
        };
        // Build the line only if it is printed (`logs.enabled`, `logs.level`) or stored.
        let print =
            config.logs.enabled && access_log::level(status) >= config.logs.level && host.log_enabled(level);
        if !print && store.is_none() {
            return;
        }
        let mut record = new_record(req, route);
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
            let capacity = store.buffer as usize;
            let user_id = record.user_id.clone().filter(|_| req.cleared);
            let class = if req.privileged {
                RecordClass::Privileged
            } else if user_id.is_some() {
                RecordClass::Ordinary
            } else {
                RecordClass::Anonymous
            };
            // A caller's 429s: the first of a window is stored, the rest counted in one record.
            let repeat = matches!(outcome, Outcome::RateLimited(_)).then(|| {
                let caller = user_id
                    .clone()
                    .or_else(|| record.client_ip.clone())
                    .unwrap_or_default();
                (caller, decision)
            });
            let stored = StoredRecord {
                trace_id: record.trace_id,
                user_id,
                json,
                class,
                repeat,
            };
            let now_ms = req.clock_ms.max(req.started_ms);
            if self.logs.summarize_here {
                self.emit_summaries(now_ms, capacity);
                self.admit_record(stored, capacity, now_ms);
            } else {
                self.buffer_record(stored, capacity);
            }
        }
    }

    /// Queues a record, or counts it in its caller's summary when it repeats a refusal
    /// already stored in this window.
    pub(super) fn admit_record(&mut self, record: StoredRecord, capacity: usize, now_ms: u64) {
        if let Some((caller, decision)) = &record.repeat {
            // Per class: a privileged refusal is never folded into an ordinary one's summary.
            let key = (caller.clone(), *decision, record.class);
            if let Some(s) = self.logs.summaries.by_caller.get_mut(&key) {
                s.repeated += 1;
                let id = self.metrics.log_summarized;
                self.inc(id);
                return;
            }
            // Beyond MAX_SUMMARIES callers the record is buffered as it is (its class bounds it).
            if self.logs.summaries.by_caller.len() < MAX_SUMMARIES {
                if self.logs.summaries.by_caller.is_empty() {
                    self.logs.summaries.started_ms = now_ms;
                }
                let summary = Summary {
                    first: record.clone(),
                    repeated: 0,
                };
                self.logs.summaries.by_caller.insert(key, summary);
            }
        }
        self.buffer_record(record, capacity);
    }

    /// This gateway hands its records to another that writes them (the native module's workers
    /// to the main thread's gateway): refusals are summarised there, where a timer ends each
    /// window.
    pub fn hand_over_records(&mut self) {
        self.logs.summarize_here = false;
    }

    /// Writes the window's summaries (each caller's refusals beyond the first, counted) into the
    /// buffer once the window is over.
    pub(super) fn emit_summaries(&mut self, now_ms: u64, capacity: usize) {
        if self.logs.summaries.by_caller.is_empty()
            || now_ms < self.logs.summaries.started_ms.saturating_add(SUMMARY_WINDOW_MS)
        {
            return;
        }
        let done = std::mem::take(&mut self.logs.summaries.by_caller);
        for (_, s) in done.into_iter().filter(|(_, s)| s.repeated > 0) {
            let Some(json) = access_log::with_repeated(&s.first.json, s.repeated) else {
                continue;
            };
            let stored = StoredRecord {
                json,
                trace_id: s.first.trace_id,
                user_id: s.first.user_id,
                class: s.first.class.max(RecordClass::Summary),
                repeat: None,
            };
            self.buffer_record(stored, capacity);
        }
    }

    /// Hands over the records waiting for the store, to a gateway that writes them for this
    /// one (the native build writes from Envoy's main thread, which has a timer).
    pub fn take_stored_records(&mut self) -> Vec<StoredRecord> {
        self.logs.anonymous = 0;
        self.logs.buffer.drain(..).collect()
    }

    /// Counts records dropped on their way to the gateway that writes them (by class, in
    /// [`RecordClass`] order).
    pub fn count_dropped_records(&mut self, dropped: &[u64; RECORD_CLASSES]) {
        for (class, n) in dropped.iter().enumerate() {
            for _ in 0..*n {
                self.count_dropped_index(class);
            }
        }
    }

    fn count_dropped(&mut self, class: RecordClass) {
        self.count_dropped_index(class as usize);
    }

    fn count_dropped_index(&mut self, class: usize) {
        let total = self.metrics.log_dropped;
        self.inc(total);
        if let Some(id) = self.metrics.log_dropped_class.get(class).copied() {
            self.inc(id);
        }
    }

    /// Takes records another gateway gathered, under this one's buffer bounds, and sends what
    /// the room for calls allows at once (the flush goes on as their answers come). Returns, in
    /// order, the records it has no room for yet (the caller keeps them for later): a refusal
    /// its summary counts needs no room, and a privileged or summary record takes the place of
    /// a lower one as in [`Gateway::buffer_record`].
    pub fn add_stored_records(
        &mut self,
        records: Vec<StoredRecord>,
        host: &mut dyn Host,
    ) -> Vec<StoredRecord> {
        let config = Rc::clone(&self.config);
        let Some(store) = config.logs.store.as_ref() else {
            return Vec::new();
        };
        let capacity = store.buffer as usize;
        let now_ms = host.now_ms();
        let mut left = Vec::new();
        for r in records {
            let counted = r.repeat.as_ref().is_some_and(|(caller, decision)| {
                self.logs
                    .summaries
                    .by_caller
                    .contains_key(&(caller.clone(), *decision, r.class))
            });
            let room = self.logs.buffer.len() < capacity;
            if counted || room || r.class >= RecordClass::Summary {
                self.admit_record(r, capacity, now_ms);
            } else {
                left.push(r);
            }
        }
        self.pump_logs(store, host);
        left
    }

    /// Sends more buffered records when the calls out leave room for a batch (the flush goes on
    /// as answers come, not only on the timer).
    pub(super) fn pump_logs(&mut self, store: &LogStore, host: &mut dyn Host) {
        if !self.logs.buffer.is_empty() && self.logs.calls + LOG_PUMP_ROOM <= MAX_LOG_CALLS_IN_FLIGHT {
            self.flush_logs(store, host);
        }
    }

    /// Queues a record for the store. Anonymous records may fill half the buffer; any other
    /// record may use all of it: when it is full, a record pushes out the oldest record of the
    /// lowest class below its own ([`RecordClass`]), or is dropped itself. So privileged records
    /// are lost only to other privileged records (more of them between two flushes than the
    /// buffer holds). Drops are counted by class.
    pub(super) fn buffer_record(&mut self, record: StoredRecord, capacity: usize) {
        if record.class == RecordClass::Anonymous {
            if self.logs.anonymous >= capacity / 2 || self.logs.buffer.len() >= capacity {
                self.count_dropped(RecordClass::Anonymous);
            } else {
                self.logs.anonymous += 1;
                self.logs.buffer.push_back(record);
            }
            return;
        }
        if self.logs.buffer.len() < capacity {
            self.logs.buffer.push_back(record);
            return;
        }
        let lowest = self
            .logs
            .buffer
            .iter()
            .enumerate()
            .filter(|(_, r)| r.class < record.class)
            .min_by_key(|(i, r)| (r.class, *i))
            .map(|(i, r)| (i, r.class));
        match lowest {
            Some((i, class)) => {
                self.logs.buffer.remove(i);
                if class == RecordClass::Anonymous {
                    self.logs.anonymous = self.logs.anonymous.saturating_sub(1);
                }
                self.count_dropped(class);
                self.logs.buffer.push_back(record);
            }
            None => self.count_dropped(record.class),
        }
    }

    /// Writes as many buffered records as [`MAX_LOG_CALLS_IN_FLIGHT`] leaves room for: each appended to its trace's list and
    /// prepended to its user's list (trimmed to the configured count); keys expire with the
    /// retention.
    pub(super) fn flush_logs(&mut self, store: &LogStore, host: &mut dyn Host) {
        let now_ms = host.now_ms();
        self.emit_summaries(now_ms, store.buffer as usize);
        // Two calls per record now, its trims later: no more than the in-flight cap allows
        // (webdis is slow: the rest stay buffered).
        let room = MAX_LOG_CALLS_IN_FLIGHT.saturating_sub(self.logs.calls) / 2;
        let n = self.logs.buffer.len().min(room);
        if n == 0 {
            return;
        }
        let batch: Vec<StoredRecord> = self.logs.buffer.drain(..n).collect();
        let anonymous = batch.iter().filter(|r| r.class == RecordClass::Anonymous).count();
        self.logs.anonymous = self.logs.anonymous.saturating_sub(anonymous);
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

    /// A log-store write answered: counted; after a push that went in, its list's trim and
    /// expiry (`then`), and more records if there is room.
    pub(super) fn log_write_answered(
        &mut self,
        then: Vec<String>,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) {
        self.logs.calls = self.logs.calls.saturating_sub(1);
        let ok = access_log::write_ok(status, body);
        let id = if ok {
            self.metrics.log_stored
        } else {
            self.metrics.log_errors
        };
        self.inc(id);
        let config = Rc::clone(&self.config);
        if let Some(store) = config.logs.store.as_ref() {
            // The trims follow a push that went in (after a failed one they would only add
            // calls to a store that is failing).
            for path in then.into_iter().filter(|_| ok) {
                self.store_call(store, "GET", &path, None, Vec::new(), host);
            }
            self.pump_logs(store, host);
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
        let call = self.send_webdis(
            Callout::get(&store.cluster, path, store.timeout_ms)
                .with_body(method, body)
                .with_authorization(store.authorization.as_deref())
                .with_authority(Some(&store.authority)),
            Call::LogWrite { then },
            host,
        );
        match call {
            Ok(_) => {
                self.logs.calls += 1;
            }
            Err(e) => {
                let id = self.metrics.log_errors;
                self.inc(id);
                host.log(LogLevel::Warn, &format!("log store dispatch failed: {e}"));
            }
        }
    }
}
