//! The per-request context: decide, then forward, reply, or call webdis and resume; log and count
//! at the end of the stream.

use super::*;

/// What happens once the caller's token is known not to be revoked.
enum Then {
    Forward {
        remove: Vec<String>,
        set: Vec<(&'static str, String)>,
    },
    Endpoint(Endpoint),
}

/// The authenticated caller.
struct Caller {
    identity: Identity,
    token: String,
}

/// An outstanding webdis call.
enum Pending {
    Check {
        token_id: u32,
        then: Then,
        caller: Caller,
        slot: Slot,
        with_user: bool,
    },
    Write {
        token_id: u32,
        on_ok: Reply,
    },
    Query {
        token_id: u32,
        label: &'static str,
        id: String,
        limit: u32,
    },
}

/// Whether the request continues now or stays paused (a reply was sent or a call is out).
enum Flow {
    Continue,
    Paused,
}

pub(super) struct Request {
    config: Rc<Config>,
    metrics: Rc<Metrics>,
    started: Option<SystemTime>,
    trace_id: Option<String>,
    pending: Option<Pending>,
    /// The binding bucket's verdict, for the `X-RateLimit-*` response headers.
    rate_limit: Option<Verdict>,
    /// What the log record needs from the request head (kept, not copied; built in `on_log`).
    head: Option<Head>,
    /// The matched route, for metrics and logs.
    route: Option<String>,
    /// Why the gateway answered itself (the reason of the last local reply); `allowed` otherwise.
    decision: Cell<&'static str>,
    status: Option<u16>,
    /// Time from the request headers to the response headers.
    elapsed: Option<Duration>,
}

impl Context for Request {
    fn on_http_call_response(&mut self, token_id: u32, _: usize, body_size: usize, _: usize) {
        let matches = match &self.pending {
            Some(Pending::Check { token_id: t, .. })
            | Some(Pending::Write { token_id: t, .. })
            | Some(Pending::Query { token_id: t, .. }) => *t == token_id,
            None => false,
        };
        if !matches {
            return;
        }
        let Some(pending) = self.pending.take() else {
            return;
        };
        let (status, body) = call_response(body_size);
        let flow = match pending {
            Pending::Query { label, id, limit, .. } => match access_log::parse_range(status, &body) {
                Ok(records) if records.is_empty() => self.error(404, "No log records found"),
                Ok(mut records) => {
                    access_log::newest_first(&mut records);
                    records.truncate(limit as usize);
                    let body = serde_json::json!({ label: id, "count": records.len(), "records": records });
                    self.reply(self.json(body));
                    Flow::Paused
                }
                Err(e) => {
                    Metrics::inc(self.metrics.log_errors);
                    warn!("log store query failed: {e}");
                    self.error(503, "Log store unavailable")
                }
            },
            Pending::Check {
                then,
                caller,
                slot,
                with_user,
                ..
            } => match rv::parse_lookup(status, &body, with_user) {
                Ok(lookup) => {
                    if let Some(rv) = self.config.revocation.as_ref() {
                        if rv.cache_ttl_ms > 0 {
                            let entry = CacheEntry {
                                fingerprint: slot.fingerprint,
                                stored_at_ms: now_ms(),
                                lookup,
                            };
                            let _ =
                                hostcalls::set_shared_data(&slot.cache_key(), Some(&entry.encode()), None);
                        }
                    }
                    if lookup.revokes(caller.identity.issued_at) {
                        self.revoked()
                    } else {
                        self.proceed(then, caller)
                    }
                }
                Err(e) => self.store_failed(then, caller, e),
            },
            Pending::Write { on_ok, .. } => match rv::parse_setex(status, &body) {
                Ok(()) => {
                    self.reply(on_ok);
                    Flow::Paused
                }
                Err(e) => {
                    Metrics::inc(self.metrics.store_errors);
                    warn!("revocation store write failed: {e}");
                    self.error(503, MSG_STORE_DOWN)
                }
            },
        };
        if let Flow::Continue = flow {
            let _ = hostcalls::resume_http_request();
        }
    }
}

/// What the log record needs from the request head.
struct Head {
    headers: Vec<policy::HeaderPair>,
    client_ip: Option<String>,
    user_id: Option<String>,
    canary: Option<bool>,
}

/// Whether Envoy prints wasm log lines of this level (its level can change at runtime).
fn envoy_logs(level: access_log::Level) -> bool {
    let wanted = match level {
        access_log::Level::Info => LogLevel::Info,
        access_log::Level::Warn => LogLevel::Warn,
        access_log::Level::Error => LogLevel::Error,
    };
    let current = ENVOY_LOG_LEVEL.with(|l| match l.get() {
        Some(level) => level,
        None => {
            let level = hostcalls::get_log_level().unwrap_or(LogLevel::Trace);
            l.set(Some(level));
            level
        }
    });
    current as u32 <= wanted as u32
}

thread_local! {
    /// Envoy's level for wasm logs, read once and then refreshed by the VM's timer.
    pub(super) static ENVOY_LOG_LEVEL: Cell<Option<LogLevel>> = const { Cell::new(None) };
}

/// The request's log record from its head.
fn new_record(head: &Head, start: SystemTime, trace_id: &str, route: Option<&str>) -> Record {
    let value = |name: &str| {
        head.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    };
    let full_path = value(":path").unwrap_or("");
    let (path, query) = full_path.split_once('?').unwrap_or((full_path, ""));
    let upstream = match (route, head.canary) {
        (Some(r), Some(true)) => Some(format!("{r}-canary")),
        (r, _) => r.map(str::to_string),
    };
    Record {
        timestamp_ms: start
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(0))
            .unwrap_or(0),
        trace_id: trace_id.to_string(),
        method: value(":method").unwrap_or("").to_string(),
        path: path.to_string(),
        query_params: access_log::query_params(query),
        client_ip: head.client_ip.clone(),
        user_agent: value("user-agent").map(str::to_string),
        user_id: head.user_id.clone(),
        route: route.map(str::to_string),
        upstream_service: upstream,
        canary: head.canary,
        status: 0,
        duration_ms: 0.0,
        decision: String::new(),
    }
}

/// The outcome class of a decision, for the per-route request counters.
fn outcome(decision: &str) -> &'static str {
    match decision {
        "allowed" | "ok" => "allowed",
        "revoked" => "revoked",
        "role" | "forbidden" => "forbidden",
        "route_not_found" => "not_found",
        "method_not_allowed" => "method_not_allowed",
        "store_unavailable" => "store_unavailable",
        "bad_request" => "bad_request",
        d if d.starts_with("rate_limited") => "rate_limited",
        d if is_auth_failure(d) => "unauthorized",
        _ => "error",
    }
}

fn is_auth_failure(decision: &str) -> bool {
    decision == policy::REASON_MISSING
        || decision == policy::REASON_FORMAT
        || decision == policy::REASON_ROLE
        || decision == "revoked"
        || crate::jwt::TokenError::CODES.contains(&decision)
}

/// Applies the decided request-header changes; the request continues.
fn forward(remove: &[String], set: &[(&'static str, String)]) -> Flow {
    for name in remove {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, None);
    }
    for (name, value) in set {
        let _ = hostcalls::set_map_value(MapType::HttpRequestHeaders, name, Some(value));
    }
    if set.iter().any(|(name, _)| *name == canary::ROUTE_HEADER) {
        // Envoy 1.40 re-resolves the route after a header edit by itself; newer versions need
        // this (hosts without the function simply answer an error, which is ignored).
        let _ = hostcalls::call_foreign_function("clear_route_cache", None);
    }
    Flow::Continue
}

/// The client address for rate limits and canary stickiness.
fn client_ip(config: &Config, headers: &[policy::HeaderPair]) -> Option<String> {
    let hops = config.rate_limits.trusted_hops;
    let xff = if hops > 0 {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case("x-forwarded-for"))
            .and_then(|(_, v)| std::str::from_utf8(v).ok())
    } else {
        None
    };
    let peer = hostcalls::get_property(vec!["source", "address"]).ok().flatten();
    let peer = peer.as_deref().and_then(|b| std::str::from_utf8(b).ok());
    ratelimit::client_ip(peer, xff, hops)
}

impl Request {
    pub(super) fn new(config: Rc<Config>, metrics: Rc<Metrics>) -> Self {
        Request {
            config,
            metrics,
            started: None,
            trace_id: None,
            pending: None,
            rate_limit: None,
            head: None,
            route: None,
            decision: Cell::new("allowed"),
            status: None,
            elapsed: None,
        }
    }

    /// Takes a token from each bucket that applies; the first refusal answers 429.
    fn rate_limit(
        &mut self,
        limits: &crate::config::RouteLimits,
        user: Option<&str>,
        ip: Option<&str>,
    ) -> Result<(), Reply> {
        let now_ms = now_ms();
        for check in ratelimit::plan(limits, &self.config.rate_limits, user, ip) {
            let idx = kind_index(check.kind);
            match ratelimit::consume(&HostStore, &check.key, check.fingerprint, &check.limit, now_ms) {
                Update::Done(v) if v.allowed => {
                    if let Some(id) = self.metrics.rl_allowed.get(idx) {
                        Metrics::inc(*id);
                    }
                    if check.kind == Kind::Route && limits.cluster_wide {
                        cluster::add(&HostStore, &limits.pending_key, 1);
                    }
                    if self.rate_limit.is_none_or(|b| v.remaining < b.remaining) {
                        self.rate_limit = Some(v);
                    }
                }
                Update::Done(v) => {
                    if let Some(id) = self.metrics.rl_limited.get(idx) {
                        Metrics::inc(*id);
                    }
                    self.rate_limit = Some(v);
                    return Err(Reply::too_many(
                        check.kind,
                        &v,
                        check.limit.period_ms / 1000,
                        self.trace_id(),
                    ));
                }
                Update::GaveUp { conflicts } => {
                    Metrics::inc(self.metrics.rl_contended);
                    warn!(
                        "rate limit bucket {} contended ({conflicts} CAS conflicts): allowed",
                        check.key
                    );
                }
            }
        }
        Ok(())
    }

    fn trace_id(&self) -> &str {
        self.trace_id.as_deref().unwrap_or_default()
    }

    fn reply(&self, reply: Reply) {
        self.decision.set(reply.reason);
        let headers: Vec<(&str, &str)> = reply.headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        if let Err(status) =
            hostcalls::send_http_response(u32::from(reply.status), headers, Some(reply.body.as_bytes()))
        {
            error!("send_http_response failed: {status:?}");
        }
    }

    fn error(&self, status: u16, message: &str) -> Flow {
        self.reply(Reply::error(status, message, self.trace_id()));
        Flow::Paused
    }

    fn json(&self, body: serde_json::Value) -> Reply {
        Reply::json(200, body.to_string(), self.trace_id())
    }

    fn revoked(&self) -> Flow {
        Metrics::inc(self.metrics.revoked);
        let mut reply = Reply::error(401, MSG_REVOKED, self.trace_id());
        reply.reason = "revoked";
        self.reply(reply);
        Flow::Paused
    }

    fn dispatch(&self, rv: &Revocation, path: &str) -> Result<u32, StoreError> {
        webdis_call(&rv.cluster, "GET", path, None, rv.timeout_ms)
            .map_err(|s| StoreError::Dispatch(format!("{s:?}")))
    }

    /// Local ban table, then the cache, then one MGET through webdis.
    fn check(&mut self, rv: &Revocation, then: Then, caller: Caller) -> Flow {
        let now_ms = now_ms();
        if let Some(sub) = &caller.identity.user_id {
            let ban_slot = Slot::of("u", sub, rv.cache_slots);
            if let Some(before) = rv::local_ban(shared(&ban_slot.ban_key()).as_deref(), &ban_slot, now_ms) {
                let ban = Lookup {
                    blacklisted: false,
                    revoked_before: Some(before),
                };
                if ban.revokes(caller.identity.issued_at) {
                    return self.revoked();
                }
            }
        }
        let slot = Slot::of("t", &caller.token, rv.cache_slots);
        if rv.cache_ttl_ms > 0 {
            if let Some(lookup) = CacheEntry::fresh(
                shared(&slot.cache_key()).as_deref(),
                &slot,
                now_ms,
                rv.cache_ttl_ms,
            ) {
                Metrics::inc(self.metrics.cache_hits);
                return if lookup.revokes(caller.identity.issued_at) {
                    self.revoked()
                } else {
                    self.proceed(then, caller)
                };
            }
        }
        Metrics::inc(self.metrics.lookups);
        let with_user = caller.identity.user_id.is_some();
        let path = rv::lookup_path(&caller.token, caller.identity.user_id.as_deref());
        match self.dispatch(rv, &path) {
            Ok(token_id) => {
                self.pending = Some(Pending::Check {
                    token_id,
                    then,
                    caller,
                    slot,
                    with_user,
                });
                Flow::Paused
            }
            Err(e) => self.store_failed(then, caller, e),
        }
    }

    fn store_failed(&mut self, then: Then, caller: Caller, e: StoreError) -> Flow {
        Metrics::inc(self.metrics.store_errors);
        warn!("revocation lookup failed: {e}");
        let mode = self
            .config
            .revocation
            .as_ref()
            .map(|r| r.failure_mode)
            .unwrap_or_default();
        match mode {
            FailureMode::Deny => self.error(503, MSG_STORE_DOWN),
            FailureMode::Allow => {
                Metrics::inc(self.metrics.allowed_on_error);
                self.proceed(then, caller)
            }
        }
    }

    /// The token is not revoked: forward, or perform the endpoint's write.
    fn proceed(&mut self, then: Then, caller: Caller) -> Flow {
        match then {
            Then::Forward { remove, set } => forward(&remove, &set),
            Then::Endpoint(endpoint) => self.write(endpoint, caller),
        }
    }

    fn write(&mut self, endpoint: Endpoint, caller: Caller) -> Flow {
        let config = Rc::clone(&self.config);
        let query = match &endpoint {
            Endpoint::LogsByTrace(id) => Some(("trace_id", id.clone(), access_log::trace_key(id), u32::MAX)),
            Endpoint::LogsByUser { user_id, limit } => {
                Some(("user_id", user_id.clone(), access_log::user_key(user_id), *limit))
            }
            _ => None,
        };
        if let Some((label, id, key, limit)) = query {
            let Some(store) = config.logs.store.as_ref() else {
                return self.error(404, policy::MSG_ROUTE_NOT_FOUND);
            };
            // Fetch the whole (bounded) list: workers flush independently, so list order is
            // flush order; the reply is sorted by request time before the limit applies.
            let path = access_log::range_path(&key, store.user_records.max(100));
            let call = webdis_call(&store.cluster, "GET", &path, None, store.timeout_ms);
            return match call {
                Ok(token_id) => {
                    self.pending = Some(Pending::Query {
                        token_id,
                        label,
                        id,
                        limit,
                    });
                    Flow::Paused
                }
                Err(e) => {
                    Metrics::inc(self.metrics.log_errors);
                    warn!("log store query dispatch failed: {e:?}");
                    self.error(503, "Log store unavailable")
                }
            };
        }
        let Some(rv) = config.revocation.as_ref() else {
            return self.error(404, policy::MSG_ROUTE_NOT_FOUND);
        };
        let now_s = unix_seconds(now());
        let now_ms = now_ms();
        let blacklist_locally = |token: &str| {
            let slot = Slot::of("t", token, rv.cache_slots);
            let entry = CacheEntry {
                fingerprint: slot.fingerprint,
                stored_at_ms: now_ms,
                lookup: Lookup {
                    blacklisted: true,
                    revoked_before: None,
                },
            };
            let _ = hostcalls::set_shared_data(&slot.cache_key(), Some(&entry.encode()), None);
        };
        let remaining = caller.identity.expires_at.saturating_sub(now_s);
        let (path, on_ok) = match endpoint {
            // Answered above.
            Endpoint::LogsByTrace(_) | Endpoint::LogsByUser { .. } => {
                return self.error(404, policy::MSG_ROUTE_NOT_FOUND);
            }
            Endpoint::Logout => {
                blacklist_locally(&caller.token);
                (
                    rv::setex_path(&rv::blacklist_key(&caller.token), remaining, "1"),
                    self.json(serde_json::json!({"message": "Logged out successfully"})),
                )
            }
            Endpoint::Refresh { ttl_seconds } => {
                let mut jti = [0u8; 16];
                jti.copy_from_slice(random_bytes().get(..16).unwrap_or(&[0u8; 16]));
                let issued = config
                    .verifier
                    .as_ref()
                    .ok_or_else(|| "no verifier".to_string())
                    .and_then(|v| v.issue(&caller.identity, now_s, ttl_seconds, &uuid_v4(jti)));
                let new_token = match issued {
                    Ok(t) => t,
                    Err(e) => {
                        error!("cannot issue a token: {e}");
                        return self.error(500, "Internal Gateway Error");
                    }
                };
                blacklist_locally(&caller.token);
                (
                    rv::setex_path(&rv::blacklist_key(&caller.token), remaining, "1"),
                    self.json(serde_json::json!({"access_token": new_token, "token_type": "bearer"})),
                )
            }
            Endpoint::RevokeUser(user) => {
                let ban_slot = Slot::of("u", &user, rv.cache_slots);
                let expires = now_ms.saturating_add(rv.ban_ttl_seconds.saturating_mul(1000));
                let entry = rv::ban_entry(&ban_slot, now_s, expires);
                let _ = hostcalls::set_shared_data(&ban_slot.ban_key(), Some(&entry), None);
                let ttl = i64::try_from(rv.ban_ttl_seconds).unwrap_or(i64::MAX);
                (
                    rv::setex_path(&rv::ban_key(&user), ttl, &now_s.to_string()),
                    self.json(serde_json::json!({
                        "message": format!("All tokens of user {user} issued before now are revoked"),
                        "user_id": user,
                        "revoked_before": now_s,
                    })),
                )
            }
        };
        match self.dispatch(rv, &path) {
            Ok(token_id) => {
                self.pending = Some(Pending::Write { token_id, on_ok });
                Flow::Paused
            }
            Err(e) => {
                Metrics::inc(self.metrics.store_errors);
                warn!("revocation store write failed: {e}");
                self.error(503, MSG_STORE_DOWN)
            }
        }
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
                self.error(500, "Internal Gateway Error");
                return Action::Pause;
            }
        };
        let config = Rc::clone(&self.config);
        let Outcome {
            trace,
            action,
            identity,
            token,
            route,
        } = policy::decide(&config, &headers, unix_seconds(start), &fast_random());
        self.trace_id = Some(trace.trace_id);
        let matched = route
            .as_deref()
            .and_then(|name| config.routes.iter().find(|r| r.name == name));
        let forwarding = matches!(action, policy::Action::Forward { .. });
        let needs_ip = matched.is_some_and(|r| {
            r.limits.is_some() || r.canary.as_ref().is_some_and(|c| c.sticky == Sticky::ClientIp)
        });
        let ip = if (forwarding && needs_ip) || config.logs.enabled || config.logs.store.is_some() {
            client_ip(&config, &headers)
        } else {
            None
        };
        let log_head = config.logs.enabled || config.logs.store.is_some();
        let user = identity.as_ref().and_then(|i| i.user_id.as_deref());
        if let (Some(limits), true) = (matched.and_then(|r| r.limits.as_ref()), forwarding) {
            if let Err(reply) = self.rate_limit(limits, user, ip.as_deref()) {
                self.reply(reply);
                return Action::Pause;
            }
        }
        let mut action = action;
        let mut canary_choice = None;
        if let (Some(route), policy::Action::Forward { set, .. }) = (matched, &mut action) {
            if let Some(settings) = &route.canary {
                let (to_canary, headers_to_set) =
                    canary::route_headers(settings, &headers, user, ip.as_deref());
                set.extend(headers_to_set);
                if let Some([stable, canary]) = self.metrics.canary.get(&route.name) {
                    Metrics::inc(if to_canary { *canary } else { *stable });
                }
                canary_choice = Some(to_canary);
            }
        }
        self.route = route.clone();
        if log_head {
            self.head = Some(Head {
                user_id: identity.as_ref().and_then(|i| i.user_id.clone()),
                client_ip: ip,
                canary: canary_choice,
                headers,
            });
        }
        let then = match action {
            policy::Action::Reply(reply) => {
                self.reply(reply);
                return Action::Pause;
            }
            policy::Action::Forward { remove, set } => Then::Forward { remove, set },
            policy::Action::Endpoint(e) => Then::Endpoint(e),
        };
        let flow = match (then, config.revocation.as_ref(), identity, token) {
            (then, Some(rv), Some(identity), Some(token)) => self.check(rv, then, Caller { identity, token }),
            (Then::Forward { remove, set }, ..) => forward(&remove, &set),
            (then @ Then::Endpoint(_), None, Some(identity), Some(token)) => {
                self.proceed(then, Caller { identity, token })
            }
            (Then::Endpoint(_), ..) => self.error(404, policy::MSG_ROUTE_NOT_FOUND),
        };
        match flow {
            Flow::Continue => Action::Continue,
            Flow::Paused => Action::Pause,
        }
    }

    fn on_log(&mut self) {
        let status = self.status.unwrap_or(0);
        let started = self.started.unwrap_or(UNIX_EPOCH);
        // Time to the response headers (measured there, saving a clock call), else to now.
        let duration_ms = self
            .elapsed
            .unwrap_or_else(|| now().duration_since(started).unwrap_or(Duration::ZERO))
            .as_secs_f64()
            * 1000.0;
        let decision = self.decision.get();
        let _ = hostcalls::record_metric(self.metrics.duration, duration_ms.round() as u64);
        let route = metric_part(self.route.as_deref().unwrap_or("none"));
        inc_named(&format!("gateway_requests_{route}_{}_total", outcome(decision)));
        if is_auth_failure(decision) {
            inc_named(&format!("gateway_auth_failures_{decision}_total"));
        }
        let Some(head) = self.head.take() else { return };
        let level = access_log::level(status);
        let store = self.config.logs.store.as_ref();
        // Build the line only if Envoy will print it or the store wants it.
        let print = self.config.logs.enabled && envoy_logs(level);
        if !print && store.is_none() {
            return;
        }
        let mut record = new_record(&head, started, self.trace_id(), self.route.as_deref());
        record.status = status;
        record.duration_ms = duration_ms;
        record.decision = decision.to_string();
        let json = record.to_json();
        if print {
            match level {
                access_log::Level::Error => error!("{json}"),
                access_log::Level::Warn => warn!("{json}"),
                access_log::Level::Info => info!("{json}"),
            }
        }
        if let Some(store) = store {
            let stored = StoredRecord {
                trace_id: record.trace_id,
                user_id: record.user_id,
                json,
            };
            let pushed = LOG_BUFFER.with(|b| {
                let mut b = b.borrow_mut();
                if b.len() >= store.buffer as usize {
                    return false;
                }
                b.push_back(stored);
                true
            });
            if !pushed {
                Metrics::inc(self.metrics.log_dropped);
            }
        }
    }

    fn on_http_response_headers(&mut self, _: usize, _: bool) -> Action {
        if self.head.is_some() {
            self.status = status_of(MapType::HttpResponseHeaders);
        }
        if let Some(v) = &self.rate_limit {
            for (name, value) in policy::ratelimit_headers(v) {
                let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, name, Some(&value));
            }
        }
        if let Some(id) = &self.trace_id {
            let _ = hostcalls::set_map_value(MapType::HttpResponseHeaders, HEADER_TRACE_ID, Some(id));
        }
        if let Some(start) = self.started {
            let elapsed = now().duration_since(start).unwrap_or(Duration::ZERO);
            self.elapsed = Some(elapsed);
            let _ = hostcalls::set_map_value(
                MapType::HttpResponseHeaders,
                HEADER_RESPONSE_TIME,
                Some(&policy::response_time(elapsed)),
            );
        }
        Action::Continue
    }
}
