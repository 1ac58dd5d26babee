//! Glue between the proxy-wasm host and the pure decision code: read the request head, call
//! [`crate::policy::decide`], then forward (mutating headers) or reply. Nothing here decides.

use std::rc::Rc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use log::{error, info, warn};
use proxy_wasm::hostcalls;
use proxy_wasm::traits::{Context, HttpContext, RootContext};
use proxy_wasm::types::{Action, ContextType, LogLevel, MapType};

use crate::config::Config;
use crate::policy::{self, Outcome, Reply, HEADER_TRACE_ID};
use crate::trace::RANDOM_BYTES;

const HEADER_RESPONSE_TIME: &str = "x-response-time";

proxy_wasm::main! {{
    proxy_wasm::set_log_level(LogLevel::Info);
    std::panic::set_hook(Box::new(|info| {
        let _ = hostcalls::log(LogLevel::Critical, &format!("panic: {info}"));
    }));
    proxy_wasm::set_root_context(|_| -> Box<dyn RootContext> { Box::new(Root { config: None }) });
}}

struct Root {
    config: Option<Rc<Config>>,
}

impl Context for Root {}

impl RootContext for Root {
    fn on_vm_start(&mut self, _: usize) -> bool {
        info!("gateway filter {} starting", env!("CARGO_PKG_VERSION"));
        true
    }

    fn on_configure(&mut self, _: usize) -> bool {
        let bytes =
            match hostcalls::get_buffer(proxy_wasm::types::BufferType::PluginConfiguration, 0, usize::MAX) {
                Ok(Some(b)) => b,
                Ok(None) => Vec::new(),
                Err(status) => {
                    error!("gateway filter: cannot read plugin configuration: {status:?}");
                    return false;
                }
            };
        match Config::from_json(&bytes) {
            Ok(cfg) => {
                info!(
                    "gateway filter configured: {} routes, jwt {}",
                    cfg.routes.len(),
                    if cfg.verifier.is_some() { "on" } else { "off" }
                );
                self.config = Some(Rc::new(cfg));
                true
            }
            Err(e) => {
                error!("gateway filter: invalid configuration: {e}");
                false
            }
        }
    }

    fn create_http_context(&self, _: u32) -> Option<Box<dyn HttpContext>> {
        let config = self.config.clone()?;
        Some(Box::new(Request {
            config,
            started: None,
            trace_id: None,
        }))
    }

    fn get_type(&self) -> Option<ContextType> {
        Some(ContextType::HttpContext)
    }
}

struct Request {
    config: Rc<Config>,
    started: Option<SystemTime>,
    trace_id: Option<String>,
}

impl Context for Request {}

fn now() -> SystemTime {
    hostcalls::get_current_time().unwrap_or(UNIX_EPOCH)
}

fn unix_seconds(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

fn random_bytes() -> [u8; RANDOM_BYTES] {
    let mut buf = [0u8; RANDOM_BYTES];
    if let Err(e) = getrandom::fill(&mut buf) {
        // Fall back to the clock: trace ids only need to be unique-ish, never secret.
        warn!("getrandom failed: {e}");
        let nanos = now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_nanos();
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (nanos >> ((i % 16) * 8)) as u8 ^ (i as u8);
        }
    }
    buf
}

fn send_reply(reply: &Reply) {
    let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
    if let Err(status) =
        hostcalls::send_http_response(u32::from(reply.status), headers, Some(reply.body.as_bytes()))
    {
        error!("send_http_response failed: {status:?}");
    }
}

impl HttpContext for Request {
    fn on_http_request_headers(&mut self, _: usize, _: bool) -> Action {
        let start = now();
        self.started = Some(start);
        let headers = match hostcalls::get_map_bytes(MapType::HttpRequestHeaders) {
            Ok(h) => h,
            Err(status) => {
                error!("cannot read request headers: {status:?}");
                send_reply(&Reply::error(500, "Internal Gateway Error", ""));
                return Action::Pause;
            }
        };
        let Outcome { trace, action, .. } =
            policy::decide(&self.config, &headers, unix_seconds(start), &random_bytes());
        self.trace_id = Some(trace.trace_id);
        match action {
            policy::Action::Forward { remove, set } => {
                for name in &remove {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
                }
                for (name, value) in &set {
                    let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
                }
                Action::Continue
            }
            policy::Action::Reply(reply) => {
                send_reply(&reply);
                Action::Pause
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if let Some(id) = &self.trace_id {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, HEADER_TRACE_ID, Some(id));
        }
        if let Some(start) = self.started {
            let ms = now()
                .duration_since(start)
                .unwrap_or(Duration::ZERO)
                .as_secs_f64()
                * 1000.0;
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                HEADER_RESPONSE_TIME,
                Some(&format!("{ms:.2}ms")),
            );
        }
        Action::Continue
    }
}
