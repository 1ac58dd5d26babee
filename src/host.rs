//! What the orchestrator needs from the proxy, as one trait: request and response headers,
//! local replies, pause and resume, shared data, HTTP callouts, time, randomness, metrics and
//! logs. The proxy-wasm glue (`filter/`) implements it with host calls; [`fake::FakeHost`]
//! implements it in memory so the whole request path runs natively in tests, and counts every
//! call so tests can pin the number of host calls per request path.

use crate::headers::HeaderPair;
use crate::reply::Reply;

/// Log levels, as proxy-wasm orders them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum LogLevel {
    Trace,
    Debug,
    Info,
    Warn,
    Error,
    Critical,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    Counter,
    Histogram,
}

/// One HTTP call to a cluster (webdis).
#[derive(Debug, Clone, Copy)]
pub struct Callout<'a> {
    pub cluster: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub body: Option<&'a [u8]>,
    pub timeout_ms: u64,
    /// An `Authorization` header value (webdis's HTTP basic credentials).
    pub authorization: Option<&'a str>,
    /// The `:authority` sent (default: the cluster name).
    pub authority: Option<&'a str>,
    /// The body's `Content-Type`, if any.
    pub content_type: Option<&'a str>,
}

impl<'a> Callout<'a> {
    /// A GET of `path` on `cluster`, answered within `timeout_ms`.
    pub fn get(cluster: &'a str, path: &'a str, timeout_ms: u64) -> Self {
        Callout {
            cluster,
            method: "GET",
            path,
            body: None,
            timeout_ms,
            authorization: None,
            authority: None,
            content_type: None,
        }
    }

    /// The `Content-Type` of its body.
    pub fn with_content_type(self, content_type: &'a str) -> Self {
        Callout {
            content_type: Some(content_type),
            ..self
        }
    }

    /// Another method, with a body.
    pub fn with_body(self, method: &'a str, body: Option<&'a [u8]>) -> Self {
        Callout { method, body, ..self }
    }

    /// The `Authorization` header sent (webdis's basic credentials), if any.
    pub fn with_authorization(self, authorization: Option<&'a str>) -> Self {
        Callout {
            authorization,
            ..self
        }
    }

    /// The `:authority` sent instead of the cluster name, if any.
    pub fn with_authority(self, authority: Option<&'a str>) -> Self {
        Callout { authority, ..self }
    }

    /// The request headers of the call, one list for every host: method, path, the authority
    /// (under the name the host's API takes: `:authority` for proxy-wasm, `host` for Envoy's
    /// dynamic-module callouts) and webdis's credentials when given.
    pub fn headers(&self, authority_header: &'static str) -> Vec<(&'static str, &'a str)> {
        let mut headers = vec![
            (":method", self.method),
            (":path", self.path),
            (authority_header, self.authority.unwrap_or(self.cluster)),
        ];
        if let Some(value) = self.authorization {
            headers.push(("authorization", value));
        }
        if let Some(value) = self.content_type {
            headers.push(("content-type", value));
        }
        headers
    }
}

/// The proxy, as the orchestrator sees it. Request-scoped calls act on the current (effective)
/// context; [`Host::switch_to`] changes it.
pub trait Host: SharedStore {
    /// Unix time, milliseconds.
    fn now_ms(&mut self) -> u64;
    /// Fills `buf` from the host's random source; `false` when it has none (the bytes are then
    /// only unique-ish, from the clock: good for ids, never for keys).
    fn random_bytes(&mut self, buf: &mut [u8]) -> bool;

    fn request_headers(&mut self) -> Option<Vec<HeaderPair>>;
    /// Sets (`Some`) or removes (`None`) a request header; false when the host refused.
    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool;
    fn set_response_header(&mut self, name: &str, value: &str);
    fn response_status(&mut self) -> Option<u16>;
    /// The downstream peer, `ip:port`.
    fn source_address(&mut self) -> Option<String>;
    /// The SHA-256 of the client certificate the downstream TLS connection presented, in hex as
    /// Envoy writes it (`connection.sha256_peer_certificate_digest`); `None` without one (or on
    /// a host that cannot tell: a certificate-bound token is then refused).
    fn peer_certificate_sha256(&mut self) -> Option<String> {
        None
    }
    /// Asks Envoy to match the route again after a header it routes on changed.
    fn clear_route_cache(&mut self);
    fn send_reply(&mut self, reply: &Reply);
    /// Lets a paused request continue.
    fn resume(&mut self);
    /// Makes another request's context the current one; false if it is gone.
    fn switch_to(&mut self, context_id: u32) -> bool;
    /// Whether a request paused in one context can be resumed (or answered) from a callback of
    /// another: Envoy's `set_effective_context`. Kong's and APISIX's are no-ops, so there no
    /// request may wait on another request's call, or on the root's.
    fn resumes_other_contexts(&self) -> bool;
    /// Whether a request header the filter removes is gone for the upstream too. Envoy: yes.
    /// Kong's ngx_wasm_module only marks the entry (`hash = 0`), which nginx's proxy module
    /// still forwards (seen in a real Kong; `ngx_http_proxy_create_request` does not skip it).
    fn removes_request_headers(&self) -> bool;
    /// Whether the host's shared data may take two keys for one when their hashes agree: Kong's
    /// ngx_wasm_module looks keys up by CRC32 alone (`ngx_wa_shm_kv.c`). Envoy compares keys.
    fn shared_keys_by_hash(&self) -> bool {
        false
    }
    /// Whether the host lets a request make only one callout (APISIX's wasm-nginx-module): then
    /// the revocation lookup is that one, and DPoP replay is checked in shared data only.
    fn one_call_per_request(&self) -> bool {
        false
    }

    /// Dispatches a call; its answer arrives later with the returned token id.
    fn dispatch(&mut self, call: Callout<'_>) -> Result<u32, DispatchError>;
    /// `:status` and body of the call response being delivered.
    fn call_response(&mut self, body_size: usize) -> (Option<u16>, Vec<u8>);

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32>;
    fn increment_metric(&mut self, id: u32, by: i64);
    fn record_metric(&mut self, id: u32, value: u64);

    fn log(&mut self, level: LogLevel, message: &str);
    /// Whether the host keeps a log line of `level` (asked before an expensive line is built;
    /// hosts that cannot say keep every line).
    fn log_enabled(&mut self, _level: LogLevel) -> bool {
        true
    }
    /// The host's own signature check (Envoy's `verify_signature`): `(hash, spki_der,
    /// signature, message)` → `Some(valid)`, or `None` where the host has none.
    fn verify_signature(&mut self, hash: &str, spki: &[u8], signature: &[u8], message: &[u8])
        -> Option<bool>;
    /// Publishes the current request's decision where the rest of the proxy reads it (the
    /// `.wasm`: filter state through `set_property`; the native module: dynamic metadata).
    fn publish(&mut self, _decision: &Decision<'_>) {}
    /// Opens a child span of the current request's active span (the native module under
    /// Envoy's tracing; nothing elsewhere: proxy-wasm has no span ABI). A request has at most
    /// one open; opening another closes the first.
    fn span_open(&mut self, _name: &'static str) {}
    /// Closes the current request's open child span, if any, with these tags.
    fn span_close(&mut self, _tags: &[(&str, &str)]) {}
}

/// What the gateway decided about a request, published for the rest of the proxy (Envoy's RBAC,
/// access logs) when `gateway.metadata` is on.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub user_id: Option<&'a str>,
    pub user_name: Option<&'a str>,
    pub roles: &'a [String],
    pub scopes: &'a [String],
    /// The issuer's name (`default` for the top-level secret).
    pub issuer: Option<&'a str>,
    /// `gateway_requests_total`'s outcome label (`allowed`, `unauthorized`, ...).
    pub outcome: &'static str,
    /// The log record's decision (`allowed`, `expired`, `role`, ...).
    pub decision: &'static str,
    pub canary: Option<bool>,
    pub trace_id: &'a str,
}

/// Why a shared-data write did not land.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetError {
    /// The value changed since it was read (its CAS token no longer matches): read again.
    CasMismatch,
    /// The store refused the write (no shared data, full, any other host error).
    Failed,
}

/// Shared data as proxy-wasm defines it: values with a CAS token that changes on every write.
/// A write with `cas: Some(c)` lands only if the key's token is still `c`; `None` or `Some(0)`
/// writes unconditionally, and a missing key is created whatever `cas` says (Envoy's rules).
pub trait SharedStore {
    /// The value and its CAS token, if the key exists.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)>;
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError>;
}

/// Why a callout could not be dispatched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DispatchError {
    /// The host refused the call's arguments (Envoy: an unknown cluster, a bad header).
    BadArgument,
    /// Any other refusal (no callouts on this host, an internal failure).
    Refused,
}

impl std::fmt::Display for DispatchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DispatchError::BadArgument => "the host refused the call (unknown cluster or bad header)",
            DispatchError::Refused => "the host could not dispatch the call",
        })
    }
}

/// A stable 64-bit fingerprint of an identity made of parts (the same in every VM running this
/// module, and never 0, which marks an empty slot): what a bucket, a cached answer or a slot is
/// tagged with in shared data.
pub fn fingerprint(parts: &[&str]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for p in parts {
        p.hash(&mut h);
    }
    h.finish().max(1)
}

/// The little-endian `u64` at `at` in a shared-data value, if the value is long enough.
pub fn read_u64(bytes: &[u8], at: usize) -> Option<u64> {
    let chunk: [u8; 8] = bytes.get(at..at.checked_add(8)?)?.try_into().ok()?;
    Some(u64::from_le_bytes(chunk))
}

/// Shared data of this VM alone, for hosts that have none (APISIX's wasm-nginx-module answers
/// every shared-data call with an error): buckets, the revocation cache and the ban table then
/// work per VM (per worker) instead of per proxy. Same CAS rules as proxy-wasm's shared data.
#[derive(Debug, Default)]
pub struct LocalStore {
    map: std::cell::RefCell<std::collections::HashMap<String, (Vec<u8>, u32)>>,
}

/// Keys beyond which a [`LocalStore`] refuses new ones (existing keys still update): the filter's
/// own keys are bounded by its slots, so this only stops a runaway.
const LOCAL_STORE_MAX_KEYS: usize = 200_000;

impl LocalStore {
    /// Whether nothing was ever stored.
    pub fn is_empty(&self) -> bool {
        self.map.borrow().is_empty()
    }
}

impl SharedStore for LocalStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.map.borrow().get(key).cloned()
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut m = self.map.borrow_mut();
        let next = match (m.get(key), cas) {
            (Some((_, current)), Some(c)) if c != 0 && *current != c => return Err(SetError::CasMismatch),
            (Some((_, current)), _) => current.wrapping_add(1).max(1),
            (None, _) if m.len() >= LOCAL_STORE_MAX_KEYS => return Err(SetError::Failed),
            (None, _) => 1,
        };
        m.insert(key.to_string(), (value.to_vec(), next));
        Ok(())
    }
}

#[cfg(test)]
pub mod fake {
    //! An in-memory host: shared data, headers per context, callouts that tests answer, metrics
    //! by name, and a count of every call.

    use std::cell::{Cell, RefCell};
    use std::collections::HashMap;

    use super::*;

    /// What the host did to one request.
    #[derive(Debug, Default, Clone)]
    pub struct FakeRequest {
        pub headers: Vec<HeaderPair>,
        pub response_headers: Vec<(String, String)>,
        pub response_status: Option<u16>,
        pub reply: Option<Reply>,
        pub resumed: u32,
        pub route_cache_cleared: u32,
        /// Paused by the filter, waiting for a resume or a reply (set by the test harness from
        /// the action the filter returned).
        pub paused: bool,
        /// Its context was deleted (the client left, or the stream ended).
        pub ended: bool,
        /// Every decision published for it (each a list of key and value).
        pub published: Vec<Vec<(&'static str, String)>>,
        /// Its child spans, closed (name, tags), and the one open.
        pub spans: Vec<(&'static str, String)>,
        pub open_span: Option<&'static str>,
    }

    impl FakeRequest {
        pub fn header(&self, name: &str) -> Option<&str> {
            crate::headers::get_str(&self.headers, name)
        }
        pub fn response_header(&self, name: &str) -> Option<&str> {
            self.response_headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        }
    }

    #[derive(Debug, Clone)]
    pub struct Dispatched {
        pub token_id: u32,
        /// The context the call was dispatched from (the one the answer is delivered to).
        pub context: u32,
        pub cluster: String,
        pub method: String,
        pub path: String,
        pub body: Option<Vec<u8>>,
        pub authorization: Option<String>,
        pub authority: String,
    }

    #[derive(Default)]
    pub struct FakeHost {
        pub now_ms: u64,
        pub current: u32,
        pub requests: HashMap<u32, FakeRequest>,
        /// Its shared data: the same store hosts without shared data get, one set of CAS rules.
        pub shared: LocalStore,
        pub dispatched: Vec<Dispatched>,
        pub fail_dispatch: bool,
        next_token: u32,
        /// The answer `call_response` returns while a response is delivered.
        pub answer: (Option<u16>, Vec<u8>),
        pub metric_names: Vec<(String, MetricKind)>,
        pub metric_values: HashMap<u32, i64>,
        pub logs: Vec<(LogLevel, String)>,
        pub peer: Option<String>,
        /// The client certificate's SHA-256 (hex), when the connection had one.
        pub peer_certificate: Option<String>,
        /// Every host call, and the ones of shared data (they go through `&self`).
        calls: Cell<u32>,
        call_log: RefCell<Vec<&'static str>>,
        /// Contexts that are gone (`switch_to` fails).
        pub gone: Vec<u32>,
        /// A host without shared data: every get finds nothing, every set fails.
        pub no_shared_data: bool,
        /// The host has no random source (`random_get` fails).
        pub no_random: bool,
        /// A call's answer is being delivered (`call_response` may be read).
        pub delivering: bool,
        /// The root context's id (the timer's and the configuration's).
        pub root: u32,
        /// A host whose `set_effective_context` does nothing (Kong, APISIX): a resume or reply
        /// after switching acts on the context of the callback.
        pub single_context: bool,
        /// Removed request headers still reach the upstream (Kong behind nginx's proxy).
        pub keeps_removed_headers: bool,
        /// Shared-data keys told apart by CRC32 alone (Kong).
        pub keys_by_crc32: bool,
        /// The host refuses to remove request headers (an APISIX error, say).
        pub refuse_header_removal: bool,
        /// The host's signature check (none by default, as on hosts without one).
        pub native: Option<crate::jwt::native::HostCheckFn>,
        pub native_calls: u32,
    }

    impl FakeHost {
        pub fn new(now_ms: u64) -> Self {
            Self {
                now_ms,
                peer: Some("10.0.0.1:5555".to_string()),
                peer_certificate: None,
                next_token: 100,
                root: 1,
                ..Self::default()
            }
        }

        fn tick(&self) {
            self.calls.set(self.calls.get() + 1);
        }

        fn call(&self, name: &'static str) {
            self.tick();
            self.call_log.borrow_mut().push(name);
        }

        /// The names of the host calls since the last [`FakeHost::reset_calls`].
        pub fn call_names(&self) -> Vec<&'static str> {
            self.call_log.borrow().clone()
        }

        pub fn host_calls(&self) -> u32 {
            self.calls.get()
        }

        pub fn reset_calls(&self) {
            self.calls.set(0);
            self.call_log.borrow_mut().clear();
        }

        pub fn req(&self, ctx: u32) -> &FakeRequest {
            static EMPTY: std::sync::OnceLock<FakeRequest> = std::sync::OnceLock::new();
            self.requests
                .get(&ctx)
                .unwrap_or_else(|| EMPTY.get_or_init(FakeRequest::default))
        }

        /// The current request. A host call about a request from a context that has none (the
        /// root's, or one never created) is a bug: Envoy would answer it with an error or act
        /// on another stream.
        fn cur(&mut self) -> &mut FakeRequest {
            let ctx = self.current;
            match self.requests.get_mut(&ctx) {
                Some(r) => r,
                None => panic!("context {ctx}: a request host call where there is no request"),
            }
        }

        /// The requests the filter paused that neither a reply, a resume nor their deletion
        /// ended: each would hang its client.
        pub fn stuck(&self) -> Vec<u32> {
            let mut out: Vec<u32> = self
                .requests
                .iter()
                .filter(|(_, r)| r.paused && r.reply.is_none() && r.resumed == 0 && !r.ended)
                .map(|(ctx, _)| *ctx)
                .collect();
            out.sort_unstable();
            out
        }

        /// A metric's value by name (counters as flushed to the host).
        pub fn metric(&self, name: &str) -> i64 {
            self.metric_names
                .iter()
                .position(|(n, _)| n == name)
                .and_then(|i| self.metric_values.get(&(i as u32 + 1)).copied())
                .unwrap_or(0)
        }
    }

    impl SharedStore for FakeHost {
        fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
            self.call("get");
            if self.no_shared_data {
                return None;
            }
            self.shared.get(key)
        }

        fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
            self.call("set");
            if self.no_shared_data {
                return Err(SetError::Failed);
            }
            self.shared.set(key, value, cas)
        }
    }

    impl Host for FakeHost {
        fn now_ms(&mut self) -> u64 {
            self.call("now_ms");
            self.now_ms
        }
        fn random_bytes(&mut self, buf: &mut [u8]) -> bool {
            self.call("random_bytes");
            for (i, b) in buf.iter_mut().enumerate() {
                *b = (i as u8).wrapping_mul(31).wrapping_add(7);
            }
            !self.no_random
        }
        fn request_headers(&mut self) -> Option<Vec<HeaderPair>> {
            self.call("request_headers");
            Some(self.cur().headers.clone())
        }
        fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
            self.call("set_request_header");
            if value.is_none() && self.refuse_header_removal {
                return false;
            }
            let ctx = self.current;
            let r = self.cur();
            assert!(
                r.reply.is_none(),
                "context {ctx}: a request header written after the local reply"
            );
            assert!(
                !r.ended,
                "context {ctx}: a request header written to a deleted context"
            );
            r.headers.retain(|(k, _)| k != name);
            if let Some(v) = value {
                r.headers.push((name.to_string(), v.as_bytes().to_vec()));
            }
            true
        }
        fn set_response_header(&mut self, name: &str, value: &str) {
            self.call("set_response_header");
            let r = self.cur();
            r.response_headers.retain(|(k, _)| k != name);
            r.response_headers.push((name.to_string(), value.to_string()));
        }
        fn response_status(&mut self) -> Option<u16> {
            self.call("response_status");
            self.cur().response_status
        }
        fn source_address(&mut self) -> Option<String> {
            self.call("source_address");
            self.peer.clone()
        }
        fn peer_certificate_sha256(&mut self) -> Option<String> {
            self.call("peer_certificate_sha256");
            self.peer_certificate.clone()
        }
        fn clear_route_cache(&mut self) {
            self.call("clear_route_cache");
            self.cur().route_cache_cleared += 1;
        }
        fn send_reply(&mut self, reply: &Reply) {
            self.call("send_reply");
            let ctx = self.current;
            let r = self.cur();
            // A request ends once: a second reply, or a reply after a resume, is a bug the
            // proxy would turn into a protocol error or a crash.
            assert!(
                r.reply.is_none(),
                "context {ctx}: a second local reply ({reply:?})"
            );
            assert_eq!(r.resumed, 0, "context {ctx}: a local reply after a resume");
            assert!(!r.ended, "context {ctx}: a reply to a deleted context");
            r.response_status = Some(reply.status());
            r.reply = Some(reply.clone());
        }
        fn resume(&mut self) {
            self.call("resume");
            let ctx = self.current;
            let r = self.cur();
            assert!(r.reply.is_none(), "context {ctx}: a resume after a local reply");
            assert_eq!(r.resumed, 0, "context {ctx}: a second resume");
            assert!(
                r.paused,
                "context {ctx}: a resume of a request that was not paused"
            );
            assert!(!r.ended, "context {ctx}: a resume of a deleted context");
            r.resumed += 1;
        }
        fn switch_to(&mut self, context_id: u32) -> bool {
            self.call("switch_to");
            if self.gone.contains(&context_id) {
                return false;
            }
            assert!(
                context_id == self.root || self.requests.contains_key(&context_id),
                "switch_to context {context_id}, which never existed"
            );
            if self.single_context {
                // Kong's and APISIX's set_effective_context: Ok, and nothing changes.
                return true;
            }
            self.current = context_id;
            true
        }
        fn resumes_other_contexts(&self) -> bool {
            !self.single_context
        }
        fn removes_request_headers(&self) -> bool {
            !self.keeps_removed_headers
        }
        fn shared_keys_by_hash(&self) -> bool {
            self.keys_by_crc32
        }
        fn dispatch(&mut self, call: Callout<'_>) -> Result<u32, DispatchError> {
            self.call("dispatch");
            if self.fail_dispatch {
                return Err(DispatchError::BadArgument);
            }
            self.next_token += 1;
            self.dispatched.push(Dispatched {
                token_id: self.next_token,
                context: self.current,
                cluster: call.cluster.to_string(),
                method: call.method.to_string(),
                path: call.path.to_string(),
                body: call.body.map(<[u8]>::to_vec),
                authorization: call.authorization.map(str::to_string),
                authority: call.authority.unwrap_or(call.cluster).to_string(),
            });
            Ok(self.next_token)
        }
        fn call_response(&mut self, _body_size: usize) -> (Option<u16>, Vec<u8>) {
            self.call("call_response");
            assert!(self.delivering, "call_response outside a call's answer");
            self.answer.clone()
        }
        fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
            self.call("define_metric");
            if let Some(i) = self.metric_names.iter().position(|(n, _)| n == name) {
                return Some(i as u32 + 1);
            }
            self.metric_names.push((name.to_string(), kind));
            Some(self.metric_names.len() as u32)
        }
        fn increment_metric(&mut self, id: u32, by: i64) {
            self.call("increment_metric");
            *self.metric_values.entry(id).or_insert(0) += by;
        }
        fn record_metric(&mut self, id: u32, value: u64) {
            self.call("record_metric");
            self.metric_values
                .insert(id, i64::try_from(value).unwrap_or(i64::MAX));
        }
        fn log(&mut self, level: LogLevel, message: &str) {
            self.call("log");
            self.logs.push((level, message.to_string()));
        }
        fn verify_signature(
            &mut self,
            hash: &str,
            spki: &[u8],
            signature: &[u8],
            message: &[u8],
        ) -> Option<bool> {
            self.call("verify_signature");
            self.native_calls += 1;
            self.native.and_then(|f| f(hash, spki, signature, message))
        }
        fn publish(&mut self, d: &super::Decision<'_>) {
            self.call("publish");
            let published = vec![
                ("user_id", d.user_id.unwrap_or("").to_string()),
                ("roles", d.roles.join(",")),
                ("scopes", d.scopes.join(" ")),
                ("issuer", d.issuer.unwrap_or("").to_string()),
                ("outcome", d.outcome.to_string()),
                ("decision", d.decision.to_string()),
                ("canary", d.canary.map_or(String::new(), |c| c.to_string())),
                ("trace_id", d.trace_id.to_string()),
            ];
            self.cur().published.push(published);
        }
        fn span_open(&mut self, name: &'static str) {
            let r = self.cur();
            if let Some(open) = r.open_span.take() {
                r.spans.push((open, String::new()));
            }
            r.open_span = Some(name);
        }
        fn span_close(&mut self, tags: &[(&str, &str)]) {
            let r = self.cur();
            if let Some(open) = r.open_span.take() {
                let tags: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
                r.spans.push((open, tags.join(",")));
            }
        }
    }
}

#[cfg(test)]
mod fake_host_tests {
    //! The fake host fails a test on a request that ends twice or never.
    use super::fake::FakeHost;
    use super::Host;
    use crate::outcome::Outcome;
    use crate::reply::Reply;

    fn host_with_paused(ctx: u32) -> FakeHost {
        let mut h = FakeHost::new(0);
        h.current = ctx;
        h.requests.entry(ctx).or_default().paused = true;
        h
    }

    fn reply() -> Reply {
        Reply::refuse(Outcome::NotFound, "x", "")
    }

    #[test]
    #[should_panic(expected = "a second local reply")]
    fn a_second_reply_fails() {
        let mut h = host_with_paused(2);
        h.send_reply(&reply());
        h.send_reply(&reply());
    }

    #[test]
    #[should_panic(expected = "a resume after a local reply")]
    fn a_resume_after_a_reply_fails() {
        let mut h = host_with_paused(2);
        h.send_reply(&reply());
        h.resume();
    }

    #[test]
    #[should_panic(expected = "a local reply after a resume")]
    fn a_reply_after_a_resume_fails() {
        let mut h = host_with_paused(2);
        h.resume();
        h.send_reply(&reply());
    }

    #[test]
    #[should_panic(expected = "not paused")]
    fn a_resume_of_a_request_not_paused_fails() {
        let mut h = FakeHost::new(0);
        h.current = 3;
        h.requests.entry(3).or_default();
        h.resume();
    }

    #[test]
    #[should_panic(expected = "where there is no request")]
    fn a_request_call_in_an_unknown_context_fails() {
        let mut h = FakeHost::new(0);
        h.current = 3;
        h.set_request_header("x", Some("y"));
    }

    #[test]
    #[should_panic(expected = "after the local reply")]
    fn a_header_written_after_the_reply_fails() {
        let mut h = host_with_paused(2);
        h.send_reply(&reply());
        h.set_request_header("x-user-id", Some("u"));
    }

    #[test]
    #[should_panic(expected = "outside a call's answer")]
    fn a_call_response_outside_an_answer_fails() {
        let mut h = FakeHost::new(0);
        let _ = h.call_response(0);
    }

    #[test]
    #[should_panic(expected = "never existed")]
    fn a_switch_to_a_context_that_never_existed_fails() {
        let mut h = FakeHost::new(0);
        h.switch_to(42);
    }

    #[test]
    fn a_paused_request_that_never_ends_is_reported() {
        let mut h = host_with_paused(2);
        h.requests.entry(3).or_default().paused = true;
        h.current = 3;
        h.resume();
        assert_eq!(h.stuck(), vec![2]);
    }
}
