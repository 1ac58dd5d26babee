//! Request logs: one structured JSON record per request (what the reference logs in its REQUEST
//! and RESPONSE lines, plus route, canary and the gateway's decision), its log level, and the
//! webdis paths that keep records in Redis and read them back. This duty owns its settings
//! (`logs:` in the gateway file) and their compiled form. No host calls here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{check_path_prefix, check_range, check_roles, seconds_to_ms, ConfigError};
use crate::webdis::{command_path, json_reply, StoreError};

/// `logs:`: the per-request JSON line and the optional store behind the query endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Emit one JSON line per request through Envoy's log.
    #[serde(default = "crate::error::default_true")]
    pub enabled: bool,
    /// The lowest level of request lines built and sent: `info` (every request), `warn` (4xx
    /// and 5xx), `error` (5xx). The proxy drops lines below its own level for the module too;
    /// this one saves building them (the module cannot read the proxy's level on every host).
    #[serde(default)]
    pub level: Level,
    /// Keep records in Redis (through webdis) for the query endpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<LogStoreSettings>,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            level: Level::Info,
            store: None,
        }
    }
}

/// `logs.store`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogStoreSettings {
    /// Seconds records are kept.
    #[serde(default = "default_retention")]
    pub retention: u64,
    /// Most recent records kept per user.
    #[serde(default = "default_user_records")]
    pub user_records: u32,
    /// Relative to the gateway prefix.
    #[serde(default = "default_query_path")]
    pub query_path: String,
    #[serde(default = "default_query_roles")]
    pub query_roles: Vec<String>,
    /// Records waiting to be written, per VM; beyond it new records are dropped (counted).
    #[serde(default = "default_buffer")]
    pub buffer: u32,
    /// Seconds between writes of buffered records.
    #[serde(default = "default_flush_interval")]
    pub flush_interval: f64,
    /// Timeout of one store call, seconds.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// The webdis cluster of the log store when it is not the revocation store's: records in a
    /// Redis of their own can never fill the one revocation writes to. (The renderer fills it
    /// from `logs.store.webdis`.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// The environment variable holding that webdis's `user:password` (default: the
    /// revocation webdis's credentials, `webdis_auth_env`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_env: Option<String>,
    /// The `:authority` sent to the log store's own webdis (default: derived from `cluster`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

fn default_retention() -> u64 {
    86_400
}
fn default_user_records() -> u32 {
    100
}
fn default_query_path() -> String {
    "/admin/logs".to_string()
}
fn default_query_roles() -> Vec<String> {
    vec!["admin".to_string()]
}
fn default_buffer() -> u32 {
    1000
}
fn default_flush_interval() -> f64 {
    1.0
}
fn default_timeout() -> f64 {
    0.5
}

/// Validated log settings.
#[derive(Debug, Clone)]
pub struct Logs {
    pub enabled: bool,
    pub level: Level,
    pub store: Option<LogStore>,
}

/// Validated log store settings.
#[derive(Debug, Clone)]
pub struct LogStore {
    pub cluster: String,
    /// The `Authorization` value sent to that webdis.
    pub authorization: Option<String>,
    /// The `:authority` sent to it.
    pub authority: String,
    pub retention_seconds: u64,
    pub user_records: u32,
    /// Full path of the query endpoint (gateway prefix included).
    pub query_path: String,
    pub query_roles: Vec<String>,
    pub buffer: u32,
    pub flush_interval_ms: u64,
    pub timeout_ms: u64,
}

impl LogSettings {
    /// `prefix` is the gateway prefix, `webdis` the revocation webdis's cluster and credentials
    /// (the store's unless it names its own), `env` the process environment.
    /// Field names in errors are relative to `logs`.
    pub fn compile(
        &self,
        prefix: &str,
        webdis: (Option<&str>, Option<&str>, Option<&str>),
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Logs, ConfigError> {
        let store = match &self.store {
            None => None,
            Some(st) => {
                if let Some(own) = &st.cluster {
                    crate::error::check_upstream("store.cluster", own)?;
                }
                if let Some(a) = &st.authority {
                    crate::error::check_authority("store.authority", a)?;
                }
                let cluster = st.cluster.as_deref().or(webdis.0).ok_or_else(|| {
                    ConfigError::new(
                        "store",
                        "the log store needs webdis (the `webdis` address in the gateway file, or logs.store.webdis)",
                    )
                })?;
                let authorization = match &st.auth_env {
                    None => webdis.1.map(str::to_string),
                    Some(var) => Some(crate::webdis::auth_from_env("store.auth_env", var, env)?),
                };
                check_path_prefix("store.query_path", &st.query_path, false)?;
                if st.query_roles.is_empty() {
                    return Err(ConfigError::new(
                        "store.query_roles",
                        "must name at least one role",
                    ));
                }
                check_roles("store.query_roles", &st.query_roles)?;
                check_range("store.retention", st.retention, 1, 365 * 86_400)?;
                check_range("store.user_records", st.user_records, 1, 10_000)?;
                check_range("store.buffer", st.buffer, 1, 100_000)?;
                let authority = match (&st.authority, &st.cluster, webdis.2) {
                    (Some(a), _, _) => a.clone(),
                    (None, Some(own), _) => crate::error::default_authority(own),
                    (None, None, Some(shared)) => shared.to_string(),
                    (None, None, None) => crate::error::default_authority(cluster),
                };
                Some(LogStore {
                    cluster: cluster.to_string(),
                    authorization,
                    authority,
                    retention_seconds: st.retention,
                    user_records: st.user_records,
                    query_path: format!("{prefix}{}", st.query_path),
                    query_roles: st.query_roles.clone(),
                    buffer: st.buffer,
                    flush_interval_ms: seconds_to_ms("store.flush_interval", st.flush_interval, 0.05, 60.0)?,
                    timeout_ms: seconds_to_ms("store.timeout", st.timeout, 0.001, 60.0)?,
                })
            }
        };
        Ok(Logs {
            enabled: self.enabled,
            level: self.level,
            store,
        })
    }
}

/// One request, as logged and stored. Tokens and secrets are never part of it.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Record {
    /// Unix milliseconds when the request arrived.
    pub timestamp_ms: u64,
    pub trace_id: String,
    pub method: String,
    pub path: String,
    pub query_params: BTreeMap<String, String>,
    pub client_ip: Option<String>,
    pub user_agent: Option<String>,
    pub user_id: Option<String>,
    pub route: Option<String>,
    /// The Envoy cluster the request went to (`<route>-canary` for the canary).
    pub upstream_service: Option<String>,
    pub canary: Option<bool>,
    pub status: u16,
    pub duration_ms: f64,
    /// `allowed`, or why the gateway answered itself (`expired`, `role`, `rate_limited_ip`,
    /// `revoked`, `store_unavailable`, `route_not_found`, ...).
    pub decision: String,
}

/// A summary of a caller's repeated refusals: the window's first record (`json`, as
/// [`Record::to_json`] wrote it) with `"repeated": n`, how many more requests of this caller got
/// the same answer in the window (counted, not stored one by one).
pub fn with_repeated(json: &str, n: u64) -> Option<String> {
    let head = json.strip_suffix('}')?;
    Some(format!("{head},\"repeated\":{n}}}"))
}

/// The reference's levels: error for 5xx, warning for 4xx, info otherwise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    #[default]
    Info,
    Warn,
    Error,
}

pub fn level(status: u16) -> Level {
    match status {
        500.. => Level::Error,
        400..=499 => Level::Warn,
        _ => Level::Info,
    }
}

/// Splits `a=1&b=2` (last value wins, as a Python dict would keep; values stay percent-encoded).
pub fn query_params(query: &str) -> BTreeMap<String, String> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .take(MAX_QUERY_PARAMS)
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (clip(k, MAX_FIELD).to_string(), clip(v, MAX_FIELD).to_string())
        })
        .collect()
}

/// Bounds of a record's client-controlled fields, so that one record stays under about 4 KB
/// whatever the request carries (a 50 KB `User-Agent` is stored as its first 256 bytes).
pub const MAX_USER_AGENT: usize = 256;
pub const MAX_PATH: usize = 1024;
pub const MAX_FIELD: usize = 128;
pub const MAX_QUERY_PARAMS: usize = 16;

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
pub fn clip(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or("")
}

impl Record {
    /// The JSON line, rounded to 2 decimals like the reference's `duration_ms`.
    pub fn to_json(&self) -> String {
        let mut r = self.clone();
        r.duration_ms = (r.duration_ms * 100.0).round() / 100.0;
        serde_json::to_string(&r).unwrap_or_default()
    }
}

pub fn trace_key(trace_id: &str) -> String {
    format!("gateway:log:trace:{trace_id}")
}

pub fn user_key(user_id: &str) -> String {
    format!("gateway:log:user:{user_id}")
}

/// `RPUSH <key>` with the record as the PUT body (webdis appends the body as the last argument).
pub fn append_path(key: &str) -> String {
    command_path("RPUSH", &[key])
}

/// Records kept per trace (the newest): a client repeating one trace id cannot grow a list
/// without bound.
pub const TRACE_RECORDS: u32 = 100;

/// `LTRIM <key> -keep -1`: keeps the newest `keep` records of an appended list.
pub fn trim_tail_path(key: &str, keep: u32) -> String {
    command_path("LTRIM", &[key, &format!("-{}", keep.max(1)), "-1"])
}

/// `LPUSH <key>` (newest first), record as the PUT body.
pub fn prepend_path(key: &str) -> String {
    command_path("LPUSH", &[key])
}

pub fn trim_path(key: &str, keep: u32) -> String {
    command_path("LTRIM", &[key, "0", &keep.saturating_sub(1).to_string()])
}

pub fn expire_path(key: &str, seconds: u64) -> String {
    command_path("EXPIRE", &[key, &seconds.to_string()])
}

pub fn range_path(key: &str, count: u32) -> String {
    command_path("LRANGE", &[key, "0", &count.saturating_sub(1).to_string()])
}

/// Parses `{"LRANGE": ["<json>", ...]}` into records (unparseable entries are skipped).
pub fn parse_range(status: Option<u16>, body: &[u8]) -> Result<Vec<serde_json::Value>, StoreError> {
    let v = json_reply(status, body)?;
    let items = v
        .get("LRANGE")
        .and_then(serde_json::Value::as_array)
        .ok_or(StoreError::BadReply("no LRANGE array"))?;
    Ok(items
        .iter()
        .filter_map(|i| i.as_str())
        .filter_map(|s| serde_json::from_str(s).ok())
        .collect())
}

/// Sorts records by `timestamp_ms`, newest first (stable for equal times).
pub fn newest_first(records: &mut [serde_json::Value]) {
    records.sort_by_key(|r| {
        std::cmp::Reverse(
            r.get("timestamp_ms")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(0),
        )
    });
}

/// Whether a webdis write answered 200 with its command key (`{"RPUSH": 3}` and the like).
pub fn write_ok(status: Option<u16>, body: &[u8]) -> bool {
    status == Some(200)
        && serde_json::from_slice::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v.as_object().map(|o| o.values().all(|x| !matches!(x, serde_json::Value::Array(a) if a.first() == Some(&serde_json::Value::Bool(false))))))
            .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_reference() {
        assert_eq!(level(200), Level::Info);
        assert_eq!(level(302), Level::Info);
        assert_eq!(level(401), Level::Warn);
        assert_eq!(level(429), Level::Warn);
        assert_eq!(level(503), Level::Error);
    }

    #[test]
    fn record_json_has_every_field() {
        let r = Record {
            timestamp_ms: 1,
            trace_id: "t".into(),
            method: "GET".into(),
            path: "/api/v1/users/1".into(),
            query_params: query_params("a=1&b=&c&a=2"),
            client_ip: Some("127.0.0.1".into()),
            user_agent: Some("curl".into()),
            user_id: Some("u".into()),
            route: Some("users".into()),
            upstream_service: Some("users".into()),
            canary: Some(false),
            status: 200,
            duration_ms: 1.23456,
            decision: "allowed".into(),
        };
        let v: serde_json::Value = serde_json::from_str(&r.to_json()).unwrap();
        assert_eq!(v["query_params"], serde_json::json!({"a": "2", "b": "", "c": ""}));
        assert_eq!(v["duration_ms"], 1.23);
        assert_eq!(v["decision"], "allowed");
        assert_eq!(v["canary"], false);
        assert_eq!(v.as_object().unwrap().len(), 14);
        let summary: serde_json::Value =
            serde_json::from_str(&with_repeated(&r.to_json(), 7).unwrap()).unwrap();
        assert_eq!(summary["repeated"], 7);
        assert_eq!(summary["trace_id"], "t");
    }

    #[test]
    fn store_paths_and_replies() {
        assert_eq!(
            append_path(&trace_key("ab-1")),
            "/RPUSH/gateway%3Alog%3Atrace%3Aab-1.json"
        );
        assert_eq!(trim_path("k", 100), "/LTRIM/k/0/99.json");
        assert_eq!(range_path("k", 5), "/LRANGE/k/0/4.json");
        let body = br#"{"LRANGE":["{\"trace_id\":\"x\"}","garbage"]}"#;
        let records = parse_range(Some(200), body).unwrap();
        assert_eq!(records, vec![serde_json::json!({"trace_id": "x"})]);
        assert!(parse_range(Some(200), b"nope").is_err());
        assert!(parse_range(None, b"").is_err());
        let mut rs = vec![
            serde_json::json!({"timestamp_ms": 1, "n": "a"}),
            serde_json::json!({"timestamp_ms": 3, "n": "b"}),
            serde_json::json!({"n": "c"}),
        ];
        newest_first(&mut rs);
        let order: Vec<&str> = rs.iter().map(|r| r["n"].as_str().unwrap()).collect();
        assert_eq!(order, ["b", "a", "c"]);
        assert!(write_ok(Some(200), br#"{"RPUSH":1}"#));
        assert!(write_ok(Some(200), br#"{"LTRIM":[true,"OK"]}"#));
        assert!(!write_ok(Some(200), br#"{"LTRIM":[false,"ERR"]}"#));
        assert!(!write_ok(Some(403), b""));
    }
}
