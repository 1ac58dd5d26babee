//! One worker's gateway and the host state around it: what Envoy must be told once the gateway
//! has decided (deferred), the callout relay's types, and the two `Host` implementations (a
//! hook's, and the configuration's).

use super::*;

// ---------------------------------------------------------------------------------------------
// One worker's gateway and the host state around it.

/// What Envoy must be told once the gateway has decided and is no longer in use: these are the
/// calls through which Envoy can re-enter the module (a local reply or a resumed request may end
/// the stream and run its hooks at once), so none is made while a hook holds the gateway. Every
/// other call the gateway makes during a hook cannot re-enter: a callout's answer never comes
/// inline (Envoy's `sendHttpCallout` registers the callout only after `send` returns, and its
/// `onFailure` skips a request that failed inside `send`; `dynamic_modules/filter.cc`,
/// `filter_config.cc`), and header, metric and shared-memory calls run no hook.
/// The dynamic-metadata namespace of the gateway's decisions.
pub(crate) const METADATA_NAMESPACE: &str = "gateway";

pub(crate) enum Deferred {
    /// Request headers changed: Envoy picks the route again (the proxy-wasm host does this on
    /// every header change; here it is asked for once per hook).
    ClearRoute(EnvoyFilter),
    Reply(EnvoyFilter, Reply),
    Resume(EnvoyFilter),
}

pub(crate) struct HostState {
    /// The SDS secrets' values this worker last read, and those its configuration was compiled
    /// with (they differ while a new value cannot be used).
    pub(crate) secrets_seen: Vec<Vec<u8>>,
    pub(crate) secrets_running: Vec<Vec<u8>>,
    pub(crate) metrics: Arc<MetricTable>,
    /// This worker's copy of the metric entries it has used (no lock per increment).
    pub(crate) metric_cache: HashMap<u32, Arc<MetricEntry>>,
    /// Live streams of this worker by context id.
    pub(crate) streams: HashMap<u32, EnvoyFilter>,
    /// The stream the gateway acts on now (none for the root, which has no stream), and the
    /// context id that owns what happens now.
    pub(crate) current: Option<EnvoyFilter>,
    pub(crate) current_ctx: u32,
    /// (owning context, Envoy's callout id) → the gateway's token. A stream's calls ride on
    /// it; the root's go out on the main thread.
    pub(crate) calls: HashMap<(u32, u64), u32>,
    /// Answers to this worker's root calls, which the main thread sent (see `dispatch`).
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) ticking: Arc<Ticking>,
    /// On the main thread: Envoy's callout ids of the calls it relays for workers.
    pub(crate) relayed: HashMap<u64, (Arc<Inbox>, u32)>,
    pub(crate) next_ctx: u32,
    pub(crate) next_token: u32,
    pub(crate) answer: (Option<u16>, Vec<u8>),
    pub(crate) deferred: Vec<Deferred>,
    /// Whether Envoy picks a stream's route again after every request header written (the
    /// configuration names no `routing_headers`: its routes may match on any of them).
    pub(crate) reroute_on_write: bool,
    pub(crate) last_tick_ms: u64,
    pub(crate) tick_period_ms: u64,
    /// On Envoy's main thread: the configuration, whose callouts the timer's work uses.
    pub(crate) main: Option<EnvoyConfig>,
    /// Each stream's open child span (its wait for a lookup, a fetch, an introspection).
    pub(crate) spans: HashMap<u32, abi::ChildSpan>,
}

impl HostState {
    pub(crate) fn new(metrics: Arc<MetricTable>, ticking: Arc<Ticking>) -> Self {
        HostState {
            metrics,
            metric_cache: HashMap::new(),
            streams: HashMap::new(),
            current: None,
            current_ctx: ROOT,
            calls: HashMap::new(),
            next_ctx: ROOT,
            next_token: 0,
            answer: (None, Vec::new()),
            deferred: Vec::new(),
            reroute_on_write: true,
            last_tick_ms: 0,
            tick_period_ms: 1000,
            main: None,
            inbox: Arc::new(Mutex::new(Vec::new())),
            ticking,
            relayed: HashMap::new(),
            spans: HashMap::new(),
            secrets_seen: Vec::new(),
            secrets_running: Vec::new(),
        }
    }

    /// The gateway acts on `stream` for context `ctx` now.
    pub(crate) fn at(&mut self, stream: Option<EnvoyFilter>, ctx: u32) {
        self.current = stream;
        self.current_ctx = ctx;
    }

    pub(crate) fn next_token(&mut self) -> u32 {
        self.next_token = self.next_token.wrapping_add(1).max(1);
        self.next_token
    }

    /// Envoy is asked once per hook to pick the stream's route again.
    pub(crate) fn clear_route_later(&mut self, f: EnvoyFilter) {
        let queued = self
            .deferred
            .iter()
            .any(|d| matches!(d, Deferred::ClearRoute(g) if *g == f));
        if !queued {
            self.deferred.push(Deferred::ClearRoute(f));
        }
    }

    pub(crate) fn entry(&mut self, id: u32) -> Option<Arc<MetricEntry>> {
        if let Some(e) = self.metric_cache.get(&id) {
            return Some(e.clone());
        }
        let e = self.metrics.entry(id)?;
        self.metric_cache.insert(id, e.clone());
        Some(e)
    }
}

pub(crate) struct Worker {
    pub(crate) gateway: Gateway,
    pub(crate) host: HostState,
}

pub(crate) type Inbox = Mutex<Vec<(u32, (Option<u16>, Vec<u8>))>>;

/// A worker's root call, for the main thread to send.
pub(crate) struct RelayedCall {
    pub(crate) inbox: Arc<Inbox>,
    pub(crate) token: u32,
    pub(crate) call: OwnedCall,
}

pub(crate) struct OwnedCall {
    pub(crate) cluster: String,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
    pub(crate) timeout_ms: u64,
}

impl OwnedCall {
    pub(crate) fn send(&self, owner: abi::CalloutOwner) -> Result<u64, abi::CalloutRefused> {
        let headers: Vec<(&str, &str)> = self
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        abi::http_callout(owner, &self.cluster, &headers, &self.body, self.timeout_ms)
    }
}

/// Hands this worker's gateway the answers the main thread relayed.
pub(crate) fn take_inbox(gateway: &mut Gateway, host: &mut HostState) {
    let answers = host
        .inbox
        .lock()
        .map(|mut q| std::mem::take(&mut *q))
        .unwrap_or_default();
    for (token, answer) in answers {
        let size = answer.1.len();
        host.answer = answer;
        host.at(None, ROOT);
        gateway.on_call_response(ROOT, token, size, &mut NativeHost { state: host });
    }
}

thread_local! {
    pub(crate) static WORKERS: RefCell<HashMap<u64, Worker>> = RefCell::new(HashMap::new());
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// The ABI's log level for one of the gateway's.
fn abi_level(level: LogLevel) -> u32 {
    match level {
        LogLevel::Trace => 0,
        LogLevel::Debug => 1,
        LogLevel::Info => 2,
        LogLevel::Warn => 3,
        LogLevel::Error => 4,
        LogLevel::Critical => 5,
    }
}

/// The host as the gateway sees it during one hook.
pub(crate) struct NativeHost<'a> {
    pub(crate) state: &'a mut HostState,
}

impl SharedStore for NativeHost<'_> {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        SHARED.get(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        SHARED.set(key, value, cas.unwrap_or(0))
    }
}

impl Host for NativeHost<'_> {
    fn now_ms(&mut self) -> u64 {
        now_ms()
    }

    fn random_bytes(&mut self, buf: &mut [u8]) -> bool {
        if getrandom::fill(buf).is_ok() {
            return true;
        }
        // The clock: unique-ish ids only; the gateway refuses to make keys from it.
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
        false
    }

    fn request_headers(&mut self) -> Option<Vec<(String, Vec<u8>)>> {
        abi::headers(self.state.current?, abi::REQUEST_HEADER)
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
        let Some(f) = self.state.current else {
            return false;
        };
        let done = abi::set_header(f, abi::REQUEST_HEADER, name, value);
        // With `routing_headers` the gateway asks for a new pick itself (`clear_route_cache`)
        // when it wrote a header a route matches on; else after any header written.
        if self.state.reroute_on_write {
            self.state.clear_route_later(f);
        }
        done
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        if let Some(f) = self.state.current {
            abi::set_header(f, abi::RESPONSE_HEADER, name, Some(value));
        }
    }

    fn response_status(&mut self) -> Option<u16> {
        let f = self.state.current?;
        // A local reply's headers do not pass this filter; Envoy still records its code.
        abi::header(f, abi::RESPONSE_HEADER, ":status")
            .and_then(|raw| std::str::from_utf8(&raw).ok()?.parse().ok())
            .or_else(|| abi::response_code(f))
    }

    fn source_address(&mut self) -> Option<String> {
        abi::source_address(self.state.current?)
    }

    fn peer_certificate_sha256(&mut self) -> Option<String> {
        abi::peer_certificate_sha256(self.state.current?)
    }

    fn publish(&mut self, d: &Decision<'_>) {
        let Some(f) = self.state.current else {
            return;
        };
        // Dynamic metadata under `gateway`: strings, and the roles and scopes as lists (RBAC's
        // `list_match`). Published once per request (a list key appends).
        let canary = d.canary.map_or("", |c| if c { "true" } else { "false" });
        for (key, value) in [
            ("user_id", d.user_id.unwrap_or("")),
            ("user_name", d.user_name.unwrap_or("")),
            ("issuer", d.issuer.unwrap_or("")),
            ("outcome", d.outcome),
            ("decision", d.decision),
            ("canary", canary),
            ("trace_id", d.trace_id),
        ] {
            abi::set_metadata(f, METADATA_NAMESPACE, key, value);
        }
        for (key, values) in [("roles", d.roles), ("scopes", d.scopes)] {
            for v in values {
                abi::add_metadata_list(f, METADATA_NAMESPACE, key, v);
            }
        }
    }

    fn span_open(&mut self, name: &'static str) {
        let (Some(f), ctx) = (self.state.current, self.state.current_ctx) else {
            return;
        };
        if let Some(open) = self.state.spans.remove(&ctx) {
            abi::finish_child(open, &[]);
        }
        if let Some(span) = abi::spawn_child(f, name) {
            self.state.spans.insert(ctx, span);
        }
    }

    fn span_close(&mut self, tags: &[(&str, &str)]) {
        if let Some(open) = self.state.spans.remove(&self.state.current_ctx) {
            abi::finish_child(open, tags);
        }
    }

    fn clear_route_cache(&mut self) {
        if let Some(f) = self.state.current {
            self.state.clear_route_later(f);
        }
    }

    fn send_reply(&mut self, reply: &Reply) {
        if let Some(f) = self.state.current {
            self.state.deferred.push(Deferred::Reply(f, reply.clone()));
        }
    }

    fn resume(&mut self) {
        if let Some(f) = self.state.current {
            self.state.deferred.push(Deferred::Resume(f));
        }
    }

    fn switch_to(&mut self, context_id: u32) -> bool {
        if context_id == ROOT {
            // The root has no stream: its calls go through the main thread.
            self.state.at(None, ROOT);
            return true;
        }
        match self.state.streams.get(&context_id) {
            Some(f) => {
                self.state.at(Some(*f), context_id);
                true
            }
            None => false,
        }
    }

    fn resumes_other_contexts(&self) -> bool {
        true
    }

    fn removes_request_headers(&self) -> bool {
        true
    }

    fn dispatch(&mut self, call: Callout<'_>) -> Result<u32, DispatchError> {
        let headers = call.headers("host");
        let body = call.body.unwrap_or_default();
        if self.state.current_ctx == ROOT && self.state.main.is_none() {
            // The root's call on a worker: no request's stream may carry it (a client could
            // cancel it by resetting its stream). The main thread sends it as the
            // configuration's, and its answer comes back through this worker's inbox.
            let token = self.state.next_token();
            let relayed = RelayedCall {
                inbox: Arc::clone(&self.state.inbox),
                token,
                call: OwnedCall {
                    cluster: call.cluster.to_string(),
                    headers: headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    body: body.to_vec(),
                    timeout_ms: call.timeout_ms,
                },
            };
            return match self.state.ticking.relay.lock() {
                Ok(mut q) => {
                    q.push(relayed);
                    Ok(token)
                }
                Err(_) => Err(DispatchError::Refused),
            };
        }
        let owner = match (self.state.main, self.state.current) {
            (Some(config), _) => abi::CalloutOwner::Config(config),
            (None, Some(carrier)) => abi::CalloutOwner::Stream(carrier),
            (None, None) => return Err(DispatchError::Refused),
        };
        let sent = abi::http_callout(owner, call.cluster, &headers, body, call.timeout_ms);
        let id = sent.map_err(|e| match e {
            abi::CalloutRefused::ClusterNotFound => DispatchError::BadArgument,
            abi::CalloutRefused::Other => DispatchError::Refused,
        })?;
        let token = self.state.next_token();
        self.state.calls.insert((self.state.current_ctx, id), token);
        Ok(token)
    }

    fn call_response(&mut self, _body_size: usize) -> (Option<u16>, Vec<u8>) {
        std::mem::take(&mut self.state.answer)
    }

    fn define_metric(&mut self, _kind: MetricKind, name: &str) -> Option<u32> {
        // Families were declared when the configuration was created; looked up here.
        self.state.metrics.id_of(name)
    }

    fn increment_metric(&mut self, id: u32, by: i64) {
        let (Ok(by), Some(e)) = (u64::try_from(by), self.state.entry(id)) else {
            return;
        };
        if !e.histogram {
            // Handed to Envoy by the main thread's tick (see `MetricTable::hand_over`).
            e.pending.fetch_add(by, Ordering::Relaxed);
        }
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        if let Some(e) = self.state.entry(id) {
            if e.histogram {
                abi::record_histogram(self.state.metrics.envoy, e.envoy_id, &e.values, value);
            }
        }
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        abi::log(abi_level(level), message);
    }

    fn log_enabled(&mut self, level: LogLevel) -> bool {
        abi::log_enabled(abi_level(level))
    }

    fn verify_signature(&mut self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        // No foreign functions here: RSA/ECDSA by the module's own code, natively compiled.
        None
    }
}

/// A host for configuration time: declares the metrics the gateway defines.
pub(crate) struct DefiningHost {
    pub(crate) table: MetricTable,
}

impl SharedStore for DefiningHost {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        SHARED.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        SHARED.set(key, value, cas.unwrap_or(0))
    }
}

impl Host for DefiningHost {
    fn now_ms(&mut self) -> u64 {
        now_ms()
    }
    fn random_bytes(&mut self, buf: &mut [u8]) -> bool {
        getrandom::fill(buf).is_ok()
    }
    fn request_headers(&mut self) -> Option<Vec<(String, Vec<u8>)>> {
        None
    }
    fn set_request_header(&mut self, _: &str, _: Option<&str>) -> bool {
        false
    }
    fn set_response_header(&mut self, _: &str, _: &str) {}
    fn response_status(&mut self) -> Option<u16> {
        None
    }
    fn source_address(&mut self) -> Option<String> {
        None
    }
    fn clear_route_cache(&mut self) {}
    fn send_reply(&mut self, _: &Reply) {}
    fn resume(&mut self) {}
    fn switch_to(&mut self, _: u32) -> bool {
        false
    }
    fn resumes_other_contexts(&self) -> bool {
        true
    }
    fn removes_request_headers(&self) -> bool {
        true
    }
    fn dispatch(&mut self, _: Callout<'_>) -> Result<u32, DispatchError> {
        Err(DispatchError::Refused)
    }
    fn call_response(&mut self, _: usize) -> (Option<u16>, Vec<u8>) {
        (None, Vec::new())
    }
    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        if !self.table.declare(matches!(kind, MetricKind::Histogram), name) {
            return None;
        }
        self.table.id_of(name)
    }
    fn increment_metric(&mut self, _: u32, _: i64) {}
    fn record_metric(&mut self, _: u32, _: u64) {}
    fn log(&mut self, _: LogLevel, _: &str) {
        // Each worker's gateway says the same when it starts.
    }
    fn verify_signature(&mut self, _: &str, _: &[u8], _: &[u8], _: &[u8]) -> Option<bool> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A worker's host state, leaked: dropping it would drop schedulers, which asks Envoy (this
    /// test binary has no Envoy to link against).
    fn state() -> &'static mut HostState {
        let ticking = Arc::new(Ticking {
            stop: AtomicBool::new(false),
            paused: Mutex::new(HashMap::new()),
            records: Mutex::new(Vec::new()),
            relay: Mutex::new(Vec::new()),
        });
        let metrics = Arc::new(MetricTable::new(EnvoyConfig(std::ptr::null_mut())));
        Box::leak(Box::new(HostState::new(metrics, ticking)))
    }

    #[test]
    fn envoy_is_asked_once_per_hook_to_pick_a_streams_route_again() {
        let h = state();
        let (a, b) = (EnvoyFilter(8 as *mut c_void), EnvoyFilter(16 as *mut c_void));
        h.clear_route_later(a);
        h.clear_route_later(a);
        h.clear_route_later(b);
        let cleared: Vec<EnvoyFilter> = h
            .deferred
            .iter()
            .filter_map(|d| match d {
                Deferred::ClearRoute(f) => Some(*f),
                _ => None,
            })
            .collect();
        assert_eq!(cleared, vec![a, b]);
    }

    /// What can re-enter the module (a reply, a resume) is only queued during a hook, in the
    /// order decided, and only for the stream the gateway acts on.
    #[test]
    fn replies_and_resumes_wait_until_the_gateway_returns() {
        let h = state();
        let f = EnvoyFilter(24 as *mut c_void);
        h.at(None, ROOT);
        let reply = Reply::refuse(gateway_filter::outcome::Outcome::Revoked, "gone", "t");
        NativeHost { state: h }.send_reply(&reply);
        NativeHost { state: h }.resume();
        assert!(
            h.deferred.is_empty(),
            "the root has no stream to answer or resume"
        );
        h.at(Some(f), 7);
        NativeHost { state: h }.send_reply(&reply);
        NativeHost { state: h }.resume();
        let queued: Vec<(&str, EnvoyFilter)> = h
            .deferred
            .iter()
            .map(|d| match d {
                Deferred::Reply(g, r) => {
                    assert_eq!(r.status(), 401);
                    ("reply", *g)
                }
                Deferred::Resume(g) => ("resume", *g),
                Deferred::ClearRoute(g) => ("route", *g),
            })
            .collect();
        assert_eq!(queued, vec![("reply", f), ("resume", f)]);
    }

    #[test]
    fn tokens_are_never_zero_and_wrap() {
        let h = state();
        h.next_token = u32::MAX;
        assert_eq!(h.next_token(), 1);
        assert_eq!(h.next_token(), 2);
    }
}
