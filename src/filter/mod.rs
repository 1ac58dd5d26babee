//! The glue: proxy-wasm contexts that hand every callback to the VM's
//! [`crate::pipeline::Gateway`], and [`WasmHost`], the [`Host`] made of proxy-wasm host calls.
//! Nothing here decides.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext, StreamContext};
use proxy_wasm::types::{Action, BufferType, ContextType, MapType, MetricType, Status};

use crate::config::Config;
use crate::connlimit::{ConnectionLimit, Connections, Counted, Silent, REFUSED_METRIC, SILENT_METRIC};
use crate::headers::HeaderPair;
use crate::host::{Callout, DispatchError, Host, LogLevel, MetricKind, SetError, SharedStore};
use crate::outcome::Outcome;
use crate::pipeline::{self, Gateway};
use crate::reply::Reply;

proxy_wasm::main! {{
    proxy_wasm::set_log_level(proxy_wasm::types::LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(proxy_wasm::types::LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|id| -> Box<dyn RootContext> { Box::new(Root {
        id,
        gateway: None,
        connections: None,
    }) });
}}

/// The proxy-wasm host. Request-scoped calls act on the effective context.
struct WasmHost;

/// Whether the host is Envoy, probed at configure time: only Envoy answers the property
/// `xds.node` in the root context (Kong refuses it with InternalFailure, APISIX with
/// BadArgument, read from their sources; neither traps). Foreign functions are called only on
/// Envoy: Kong traps on a name it does not know, APISIX answers Unimplemented.
static ENVOY: AtomicBool = AtomicBool::new(false);

fn is_envoy() -> bool {
    ENVOY.load(Ordering::Relaxed)
}

/// Tries of an unconditional shared-data write on a host where cas 0 means "create".
const UNCONDITIONAL_WRITE_TRIES: usize = 8;

/// Whether the host is APISIX's wasm-nginx-module, probed at configure time: it alone answers
/// the proxy's clock with Unimplemented.
static APISIX: AtomicBool = AtomicBool::new(false);

fn probe_envoy() -> bool {
    let envoy = raw::property_answered(b"xds\0node");
    ENVOY.store(envoy, Ordering::Relaxed);
    APISIX.store(!envoy && raw::clock_unimplemented(), Ordering::Relaxed);
    envoy
}

fn wasm_level(level: LogLevel) -> proxy_wasm::types::LogLevel {
    use proxy_wasm::types::LogLevel as L;
    match level {
        LogLevel::Trace => L::Trace,
        LogLevel::Debug => L::Debug,
        LogLevel::Info => L::Info,
        LogLevel::Warn => L::Warn,
        LogLevel::Error => L::Error,
        LogLevel::Critical => L::Critical,
    }
}

impl SharedStore for WasmHost {
    // Through the raw ABI: APISIX answers shared data with Unimplemented, a status the SDK's
    // `Status` does not even have, and its wrappers panic on statuses they do not expect.
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        raw::get_shared_data(key)
    }

    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let status = match cas {
            Some(cas) => raw::set_shared_data(key, value, cas),
            // Envoy reads cas 0 as "no check". Kong reads it as "only if the key is missing"
            // (`ngx_wa_shm_kv_set_locked` compares the cas with the node's, 0 for none): an
            // unconditional write there is a write at the version just read, retried if
            // another worker wrote in between. Found running the module in a real Kong.
            None if is_envoy() => raw::set_shared_data(key, value, 0),
            None => {
                let mut status = raw::STATUS_CAS_MISMATCH;
                for _ in 0..UNCONDITIONAL_WRITE_TRIES {
                    let current = raw::get_shared_data(key).map_or(0, |(_, cas)| cas);
                    status = raw::set_shared_data(key, value, current);
                    if status != raw::STATUS_CAS_MISMATCH {
                        break;
                    }
                }
                status
            }
        };
        match status {
            raw::STATUS_OK => Ok(()),
            raw::STATUS_CAS_MISMATCH => Err(SetError::CasMismatch),
            _ => Err(SetError::Failed),
        }
    }
}

/// The `:status` of a header map, if it is a number.
fn status_of(map: MapType) -> Option<u16> {
    hostcalls::get_map_value_bytes(map, ":status")
        .ok()
        .flatten()
        .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u16>().ok()))
}

impl Host for WasmHost {
    fn now_ms(&mut self) -> u64 {
        // APISIX answers proxy_get_current_time_nanoseconds with Unimplemented: then WASI's
        // realtime clock (every listed host provides clock_time_get).
        raw::proxy_time_ns()
            .or_else(raw::wasi_realtime_ns)
            .map_or(0, |ns| ns / 1_000_000)
    }

    fn random_bytes(&mut self, buf: &mut [u8]) -> bool {
        if getrandom::fill(buf).is_ok() {
            return true;
        }
        // The clock: unique-ish ids only; the caller refuses to make keys from it.
        let nanos = u128::from(raw::proxy_time_ns().or_else(raw::wasi_realtime_ns).unwrap_or(0));
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
        false
    }

    fn request_headers(&mut self) -> Option<Vec<HeaderPair>> {
        // Bytes, not strings: the SDK's `get_map` panics on values that are not UTF-8.
        hostcalls::get_map_bytes(MapType::HttpRequestHeaders).ok()
    }

    fn set_request_header(&mut self, name: &str, value: Option<&str>) -> bool {
        let status = raw::set_header(raw::REQUEST_HEADERS, name, value);
        if status != raw::STATUS_OK {
            warn!("request header {name}: the host refused the change ({status})");
        }
        status == raw::STATUS_OK
    }

    fn set_response_header(&mut self, name: &str, value: &str) {
        let _ = raw::set_header(raw::RESPONSE_HEADERS, name, Some(value));
    }

    fn response_status(&mut self) -> Option<u16> {
        status_of(MapType::HttpResponseHeaders)
    }

    fn source_address(&mut self) -> Option<String> {
        hostcalls::get_property(vec!["source", "address"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
    }

    fn publish(&mut self, d: &crate::host::Decision<'_>) {
        // Envoy keeps each as the filter-state object `wasm.gateway.<key>` (a CelState whose
        // string form is the value: RBAC's `filter_state` matcher and `%FILTER_STATE(...:PLAIN)%`
        // read it). One path segment: the SDK would join several with a NUL byte. Kong traps
        // on a property it does not know, APISIX has none: Envoy only.
        if !is_envoy() {
            return;
        }
        let canary = d.canary.map_or("", |c| if c { "true" } else { "false" });
        for (key, value) in [
            ("gateway.user_id", d.user_id.unwrap_or("")),
            ("gateway.user_name", d.user_name.unwrap_or("")),
            // Delimited at both ends (`,admin,user,`): RBAC matches `contains: ",admin,"`
            // exactly (a role never holds a comma: the token would have been refused).
            ("gateway.roles", &format!(",{},", d.roles.join(","))),
            ("gateway.scopes", &d.scopes.join(" ")),
            ("gateway.issuer", d.issuer.unwrap_or("")),
            ("gateway.outcome", d.outcome),
            ("gateway.decision", d.decision),
            ("gateway.canary", canary),
            ("gateway.trace_id", d.trace_id),
        ] {
            let _ = raw::set_property(key, value.as_bytes());
        }
    }

    fn peer_certificate_sha256(&mut self) -> Option<String> {
        // Envoy: `connection.sha256_peer_certificate_digest` (hex). Kong and APISIX have no
        // such property: a certificate-bound token is refused there.
        if !is_envoy() {
            return None;
        }
        hostcalls::get_property(vec!["connection", "sha256_peer_certificate_digest"])
            .ok()
            .flatten()
            .and_then(|b| String::from_utf8(b).ok())
            .filter(|s| !s.is_empty())
    }

    fn clear_route_cache(&mut self) {
        if is_envoy() {
            let _ = hostcalls::call_foreign_function("clear_route_cache", None);
        }
    }

    fn verify_signature(
        &mut self,
        hash: &str,
        spki: &[u8],
        signature: &[u8],
        message: &[u8],
    ) -> Option<bool> {
        use crate::jwt::native;
        if !is_envoy() {
            return None;
        }
        let args = native::encode_arguments(hash, spki, signature, message);
        match hostcalls::call_foreign_function(native::FUNCTION, Some(&args)) {
            Ok(Some(reply)) => native::decode_result(&reply),
            Ok(None) => Some(false),
            Err(_) => None,
        }
    }

    fn send_reply(&mut self, reply: &Reply) {
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(status) =
            hostcalls::send_http_response(u32::from(reply.status()), headers, Some(reply.body.as_bytes()))
        {
            error!("send_http_response failed: {status:?}");
        }
    }

    fn resume(&mut self) {
        let _ = hostcalls::resume_http_request();
    }

    fn resumes_other_contexts(&self) -> bool {
        is_envoy()
    }

    fn removes_request_headers(&self) -> bool {
        // APISIX: OpenResty's `ngx_http_lua_ffi_req_set_header` takes every copy of the header
        // out of nginx's list (lua-nginx-module `ngx_http_set_header_helper`,
        // `ngx_http_lua_rm_header_helper`), so nginx's proxy module never sends it. Kong only
        // marks the entry (`hash = 0`), which the proxy module still sends.
        is_envoy() || APISIX.load(Ordering::Relaxed)
    }

    fn one_call_per_request(&self) -> bool {
        APISIX.load(Ordering::Relaxed)
    }

    fn shared_keys_by_hash(&self) -> bool {
        !is_envoy()
    }

    fn switch_to(&mut self, context_id: u32) -> bool {
        hostcalls::set_effective_context(context_id).is_ok()
    }

    fn dispatch(&mut self, call: Callout<'_>) -> Result<u32, DispatchError> {
        let headers = call.headers(":authority");
        hostcalls::dispatch_http_call(
            call.cluster,
            headers,
            call.body,
            vec![],
            Duration::from_millis(call.timeout_ms),
        )
        .map_err(|s| match s {
            Status::BadArgument => DispatchError::BadArgument,
            _ => DispatchError::Refused,
        })
    }

    fn call_response(&mut self, body_size: usize) -> (Option<u16>, Vec<u8>) {
        // Through the raw ABI: the SDK's wrappers panic on a status they do not expect (Envoy
        // answers BadArgument for a call whose response overflowed its buffer), and a panic
        // kills the VM. Here any unexpected status is simply "no answer".
        let status = raw::call_response_header(":status")
            .and_then(|b| std::str::from_utf8(&b).ok().and_then(|s| s.parse::<u16>().ok()));
        let body = if body_size == 0 {
            Vec::new()
        } else {
            raw::call_response_body(body_size).unwrap_or_default()
        };
        (status, body)
    }

    fn define_metric(&mut self, kind: MetricKind, name: &str) -> Option<u32> {
        let kind = match kind {
            MetricKind::Counter => MetricType::Counter,
            MetricKind::Histogram => MetricType::Histogram,
        };
        hostcalls::define_metric(kind, name).ok()
    }

    fn increment_metric(&mut self, id: u32, by: i64) {
        let _ = hostcalls::increment_metric(id, by);
    }

    fn record_metric(&mut self, id: u32, value: u64) {
        let _ = hostcalls::record_metric(id, value);
    }

    fn log(&mut self, level: LogLevel, message: &str) {
        let _ = hostcalls::log(wasm_level(level), message);
    }
}

type Shared = Rc<RefCell<Gateway>>;

/// Runs `f` on the gateway unless it is already borrowed (a host call re-entered the module:
/// Envoy defers replies and resumes, so this does not happen; if it did, skipping is safer than
/// a panic that kills the VM).
fn with<R>(gw: &Shared, default: R, f: impl FnOnce(&mut Gateway, &mut WasmHost) -> R) -> R {
    match gw.try_borrow_mut() {
        Ok(mut g) => f(&mut g, &mut WasmHost),
        Err(_) => {
            error!("gateway state busy (re-entrant callback): skipped");
            default
        }
    }
}

/// The root context: configuration, and the VM's timer.
struct Root {
    id: u32,
    gateway: Option<Shared>,
    /// Set when this plugin is the network filter that caps connections per client.
    connections: Option<Rc<ConnectionFilter>>,
}

impl Context for Root {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, body_size: usize, _: usize) {
        if let Some(gw) = &self.gateway {
            let id = self.id;
            with(gw, (), |g, h| g.on_call_response(id, token_id, body_size, h));
        }
    }
}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        info!("gateway filter {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let envoy = probe_envoy();
        info!(
            "gateway filter: host {}",
            if envoy {
                "is Envoy (xds.node answered): foreign functions used"
            } else {
                "is not Envoy: no foreign function called"
            }
        );
        let bytes = match hostcalls::get_buffer(BufferType::PluginConfiguration, 0, usize::MAX) {
            Ok(Some(b)) => b,
            Ok(None) => Vec::new(),
            Err(status) => {
                error!("gateway filter: cannot read plugin configuration: {status:?}");
                return false;
            }
        };
        // The same module as a network filter: the per-client connection cap.
        match ConnectionLimit::from_json(&bytes) {
            Some(Ok(limit)) => {
                info!(
                    "gateway filter configured: at most {} connections per client",
                    limit.max_per_client
                );
                let mut fresh = [0u8; 16];
                let _ = WasmHost.random_bytes(&mut fresh);
                let refused = WasmHost.define_metric(MetricKind::Counter, REFUSED_METRIC);
                let silent_closed = WasmHost.define_metric(MetricKind::Counter, SILENT_METRIC);
                if let Some(ms) = limit.first_byte_ms {
                    // This VM's connections that sent nothing are closed on its timer.
                    if !raw::set_tick_period_ms((ms / 4).clamp(100, 1000)) {
                        error!("gateway filter: no timer: first_byte_timeout cannot be enforced");
                    }
                }
                self.connections = Some(Rc::new(ConnectionFilter {
                    duty: Connections::new(limit, &WasmHost, fresh),
                    refused,
                    silent_closed,
                    silent: RefCell::new(Silent::default()),
                }));
                return true;
            }
            Some(Err(e)) => {
                error!("gateway filter: invalid configuration: {e}");
                return false;
            }
            None => {}
        }
        let cfg = match Config::from_json(&bytes) {
            Ok(cfg) => cfg,
            Err(e) => {
                error!("gateway filter: invalid configuration: {e}");
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
        let gateway = match Gateway::new(cfg, &mut WasmHost) {
            Ok(g) => g,
            Err(e) => {
                error!("gateway filter: {e}");
                return false;
            }
        };
        // One timer in every VM: counters, the log flush, the limit sync (leader only), key
        // sets, and lookups whose owner left. A host without timers degrades (logged once).
        let mut gateway = gateway;
        let timers = raw::set_tick_period_ms(gateway.tick_period_ms());
        if let Err(e) = gateway.started(timers, &mut WasmHost) {
            error!("gateway filter: {e}");
            return false;
        }
        self.gateway = Some(Rc::new(RefCell::new(gateway)));
        true
    }

    fn on_tick(&mut self) {
        if let Some(gw) = &self.gateway {
            let id = self.id;
            with(gw, (), |g, h| g.on_tick(id, h));
        }
        if let Some(c) = &self.connections {
            let due = c.silent.borrow_mut().due(WasmHost.now_ms());
            for id in due {
                // The connection's own context: Envoy closes the connection that context
                // filters (proxy_set_effective_context, then proxy_close_downstream).
                let closed = u32::try_from(id)
                    .ok()
                    .is_some_and(|ctx| hostcalls::set_effective_context(ctx).is_ok())
                    && hostcalls::close_downstream().is_ok();
                if let (true, Some(metric)) = (closed, c.silent_closed) {
                    WasmHost.increment_metric(metric, 1);
                }
            }
            let _ = hostcalls::set_effective_context(self.id);
        }
    }

    fn create_http_context(&self, context_id: u32) -> Option<Box<dyn HttpContext>> {
        Some(Box::new(Request {
            id: context_id,
            gateway: self.gateway.clone()?,
        }))
    }

    fn create_stream_context(&self, context_id: u32) -> Option<Box<dyn StreamContext>> {
        Some(Box::new(Connection {
            id: context_id,
            connections: self.connections.clone()?,
            counted: None,
            silent: false,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(if self.connections.is_some() {
            ContextType::StreamContext
        } else {
            ContextType::HttpContext
        })
    }
}

/// The per-client cap as this VM's network filter runs it.
struct ConnectionFilter {
    duty: Connections,
    /// The counter of refused connections.
    refused: Option<u32>,
    /// The counter of connections closed for sending nothing in time.
    silent_closed: Option<u32>,
    /// This VM's connections that have sent nothing yet.
    silent: RefCell<Silent>,
}

/// A downstream connection, for the per-client cap.
struct Connection {
    id: u32,
    connections: Rc<ConnectionFilter>,
    /// Where it is counted, released when it closes.
    counted: Option<Counted>,
    /// Whether it is in the table of connections that sent nothing yet.
    silent: bool,
}

impl Connection {
    fn spoke(&mut self) {
        if std::mem::take(&mut self.silent) {
            self.connections.silent.borrow_mut().forget(u64::from(self.id));
        }
    }
}

impl Context for Connection {}

impl StreamContext for Connection {
    fn on_new_connection(&mut self) -> Action {
        let peer = WasmHost.source_address();
        let now = WasmHost.now_ms();
        match self.connections.duty.open(&WasmHost, peer.as_deref(), now) {
            Ok(counted) => {
                self.counted = counted;
                if let Some(ms) = self.connections.duty.first_byte_ms() {
                    self.connections
                        .silent
                        .borrow_mut()
                        .opened(u64::from(self.id), now.saturating_add(ms));
                    self.silent = true;
                }
                Action::Continue
            }
            Err(_) => {
                if let Some(id) = self.connections.refused {
                    WasmHost.increment_metric(id, 1);
                }
                let _ = hostcalls::close_downstream();
                Action::Pause
            }
        }
    }

    fn on_downstream_data(&mut self, _: usize, _: bool) -> Action {
        self.spoke();
        Action::Continue
    }

    fn on_log(&mut self) {
        self.spoke();
        if let Some(key) = self.counted.take() {
            self.connections.duty.close(&WasmHost, &key);
        }
    }
}

/// The per-request context: every callback goes to the gateway with this context's id.
struct Request {
    id: u32,
    gateway: Shared,
}

impl Context for Request {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, body_size: usize, _: usize) {
        let id = self.id;
        with(&self.gateway, (), |g, h| {
            g.on_call_response(id, token_id, body_size, h)
        });
    }
}

/// The context is deleted (after `on_log`, or without it): drop whatever state it left.
impl Drop for Request {
    fn drop(&mut self) {
        if let Ok(mut g) = self.gateway.try_borrow_mut() {
            g.on_done(self.id, &mut WasmHost);
        }
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let id = self.id;
        let Ok(mut g) = self.gateway.try_borrow_mut() else {
            // Fail closed, never forward unchecked.
            error!("gateway state busy (re-entrant callback): refused");
            WasmHost.send_reply(&Reply::refuse(Outcome::Busy, crate::outcome::message::BUSY, ""));
            return Action::Pause;
        };
        match g.on_request_headers(id, &mut WasmHost) {
            pipeline::Action::Continue => Action::Continue,
            pipeline::Action::Pause | pipeline::Action::Replied => Action::Pause,
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        let id = self.id;
        with(&self.gateway, (), |g, h| g.on_response_headers(id, h));
        Action::Continue
    }

    fn on_log(&mut self) {
        let id = self.id;
        with(&self.gateway, (), |g, h| g.on_log(id, h));
    }
}

mod raw;
