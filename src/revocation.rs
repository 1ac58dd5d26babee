//! Token revocation kept in Redis, reached through webdis: the settings (`revocation:` in the
//! gateway file) and their compiled form, the keys (compatible with the reference gateway), the
//! webdis request paths and the parsing of their replies, the decision, and the bounded local
//! cache kept in proxy-wasm shared data. No host calls here.
//!
//! Keys: `token:revoked:<id>` (written at logout/refresh, TTL = the token's remaining life; `id`
//! is [`crate::jwt::Identity::revocation_id`], the hash of what the signature signs, so every
//! encoding of one signed token is revoked at once), `token:blacklist:<token>` (the reference's
//! key: written too, and honoured when other services write it) and `user:revoked_before:<sub>`
//! (unix seconds; a ban revokes every token whose lineage authenticated before it).

use serde::{Deserialize, Serialize};

use crate::error::{at, check_path_prefix, check_range, seconds_to_ms, ConfigError};
pub use crate::webdis::StoreError;
use crate::webdis::{command_path, json_reply};

mod cache;
mod confirm;
pub use cache::*;
pub use confirm::*;

pub const BLACKLIST_PREFIX: &str = "token:blacklist:";
pub const REVOKED_PREFIX: &str = "token:revoked:";
pub const BAN_PREFIX: &str = "user:revoked_before:";
/// Shared-data key prefixes of the local cache (token answers) and the local ban table.
pub const CACHE_KEY_PREFIX: &str = "gw:rv:";
pub const BAN_KEY_PREFIX: &str = "gw:ban:";

/// What to do with a request when the store cannot answer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FailureMode {
    /// 503 `Revocation service unavailable`.
    #[default]
    Deny,
    /// Let the request through (counted).
    Allow,
    /// Bounded staleness: let a token through if this gateway's cache found it clean within
    /// the last `stale_window` seconds (counted, logged); any other token gets the 503. The
    /// gateway's own logouts, refreshes and bans stay in force (they are in its cache and ban
    /// table), and its endpoints never act on a stale answer.
    Stale,
}

/// `revocation:`: logout, refresh and bans kept in Redis, reached through webdis. Paths are
/// relative to the gateway prefix; an empty path disables that endpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationSettings {
    /// Callout timeout, seconds.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Seconds an answer is reused from shared data; 0 asks webdis every time.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl: f64,
    /// Number of shared-data cache slots (the memory bound).
    #[serde(default = "default_cache_slots")]
    pub cache_slots: u32,
    /// `deny` (503), `allow` (let through, counted) or `stale` (let through only a token found
    /// clean within `stale_window`) when webdis/Redis fails.
    #[serde(default)]
    pub failure_mode: FailureMode,
    /// With `failure_mode: stale`: how old (seconds) a clean answer in this gateway's cache may
    /// be and still admit its token while the store is unreachable.
    #[serde(default = "default_stale_window")]
    pub stale_window: f64,
    /// Seconds a ban (`user:revoked_before:<sub>`) lives: at least the longest token lifetime.
    #[serde(default = "default_ban_ttl")]
    pub ban_ttl: u64,
    #[serde(default = "default_logout_path")]
    pub logout_path: String,
    #[serde(default = "default_revoke_user_path")]
    pub revoke_user_path: String,
    #[serde(default = "default_revoke_roles")]
    pub revoke_roles: Vec<String>,
    #[serde(default)]
    pub refresh: RefreshSettings,
    /// Acknowledge a revocation only once a replica holds it (a Redis Cluster behind Envoy's
    /// `redis_proxy`); absent: once the primary acknowledged the write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub confirm: Option<ConfirmSettings>,
}

/// `revocation.refresh`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RefreshSettings {
    #[serde(default = "crate::error::default_true")]
    pub enabled: bool,
    #[serde(default = "default_refresh_path")]
    pub path: String,
    /// Only tokens expiring within this many seconds may be refreshed; none = any valid token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<u64>,
    /// Lifetime of the new token in seconds; none = the old token's lifetime (`exp - iat`, else
    /// [`DEFAULT_TOKEN_TTL_SECONDS`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_ttl: Option<u64>,
}

impl Default for RefreshSettings {
    fn default() -> Self {
        Self {
            enabled: true,
            path: default_refresh_path(),
            window: None,
            token_ttl: None,
        }
    }
}

fn default_timeout() -> f64 {
    0.2
}
fn default_cache_ttl() -> f64 {
    1.0
}
fn default_stale_window() -> f64 {
    30.0
}
fn default_cache_slots() -> u32 {
    4096
}
fn default_ban_ttl() -> u64 {
    86_400
}
fn default_logout_path() -> String {
    "/auth/logout".to_string()
}
fn default_revoke_user_path() -> String {
    "/admin/users/{id}/revoke".to_string()
}
fn default_revoke_roles() -> Vec<String> {
    vec!["admin".to_string()]
}
fn default_refresh_path() -> String {
    "/auth/refresh".to_string()
}

/// Token lifetime used by refresh when neither the settings nor the old token say (the
/// reference's 30 minutes).
pub const DEFAULT_TOKEN_TTL_SECONDS: u64 = 1800;

/// Validated revocation settings with full paths.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Envoy cluster of the webdis sidecar.
    pub cluster: String,
    pub timeout_ms: u64,
    pub cache_ttl_ms: u64,
    pub cache_slots: u32,
    pub failure_mode: FailureMode,
    /// How old a clean cached answer may be under `FailureMode::Stale`.
    pub stale_window_ms: u64,
    pub ban_ttl_seconds: u64,
    pub logout_path: Option<String>,
    pub refresh: Option<Refresh>,
    /// The revoke-user path split around `{id}`.
    pub revoke_user: Option<(String, String)>,
    pub revoke_roles: Vec<String>,
    pub confirm: Option<Confirm>,
}

#[derive(Debug, Clone)]
pub struct Refresh {
    pub path: String,
    pub window_seconds: Option<u64>,
    pub token_ttl_seconds: Option<u64>,
}

/// A gateway-answered revocation endpoint a path may name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointPath {
    Logout,
    Refresh,
    RevokeUser(String),
}

impl Revocation {
    /// The logout or refresh endpoint a path names. Letter case is ignored (`/Auth/Logout`
    /// logs out: a request that looks like a logout must never reach an upstream that answers
    /// success without revoking).
    pub fn endpoint(&self, path: &str) -> Option<EndpointPath> {
        if self
            .logout_path
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case(path))
        {
            return Some(EndpointPath::Logout);
        }
        if self
            .refresh
            .as_ref()
            .is_some_and(|r| r.path.eq_ignore_ascii_case(path))
        {
            return Some(EndpointPath::Refresh);
        }
        None
    }

    /// The user a path names as the revoke-user endpoint. `path` is the request's path (no
    /// query) as Envoy forwarded it, `form` how a path is compared (see `policy`): the
    /// segments around `{id}` are compared in that form, ignoring case; the id segment is taken
    /// as sent and percent-decoded, so `a;b` bans `a;b` (never `a`) and `auth0%7Cx`,
    /// `%E7%94%A8` or (where Envoy keeps escaped slashes) `org%2F7` name those subjects. A
    /// segment that does not decode comes back empty, which the endpoint refuses (400).
    pub fn revoke_user_at(
        &self,
        path: &str,
        form: impl for<'a> Fn(&'a str) -> std::borrow::Cow<'a, str>,
    ) -> Option<EndpointPath> {
        let (head, tail) = self.revoke_user.as_ref()?;
        // `head` ends with the `/` in front of the id.
        let start = path
            .match_indices('/')
            .nth(head.matches('/').count().checked_sub(1)?)?
            .0
            + 1;
        let rest = path.get(start..)?;
        let (id, after) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        let before = form(path.get(..start - 1)?);
        let after = form(after);
        let after = after.trim_end_matches('/');
        (before.eq_ignore_ascii_case(head.trim_end_matches('/')) && after.eq_ignore_ascii_case(tail))
            .then(|| EndpointPath::RevokeUser(crate::headers::percent_decode(id).unwrap_or_default()))
    }
}

impl RevocationSettings {
    /// Validates the settings; `prefix` is the gateway prefix, `cluster` the webdis cluster.
    /// Field names in errors are relative to `revocation`.
    pub fn compile(&self, prefix: &str, cluster: &str) -> Result<Revocation, ConfigError> {
        crate::error::check_upstream("webdis_cluster", cluster)?;
        let timeout_ms = seconds_to_ms("timeout", self.timeout, 0.001, 60.0)?;
        let cache_ttl_ms = seconds_to_ms("cache_ttl", self.cache_ttl, 0.0, 3600.0)?;
        check_range("cache_slots", self.cache_slots, 1, 1_000_000)?;
        // Capped: a longer window would make revocation meaningless for a whole outage.
        let stale_window_ms = seconds_to_ms("stale_window", self.stale_window, 0.001, 600.0)?;
        if self.failure_mode == FailureMode::Stale && cache_ttl_ms == 0 {
            return Err(ConfigError::new(
                "failure_mode",
                "stale needs the cache (cache_ttl > 0): it admits tokens the cache found clean",
            ));
        }
        check_range("ban_ttl", self.ban_ttl, 1, 365 * 86_400)?;
        let full = |field: &str, p: &str| -> Result<Option<String>, ConfigError> {
            if p.is_empty() {
                return Ok(None);
            }
            check_path_prefix(field, p, false)?;
            Ok(Some(format!("{prefix}{p}")))
        };
        let logout_path = full("logout_path", &self.logout_path)?;
        let refresh = if self.refresh.enabled {
            let path = full("refresh.path", &self.refresh.path)?
                .ok_or_else(|| ConfigError::new("refresh.path", "must not be empty when enabled"))?;
            if self.refresh.token_ttl == Some(0) {
                return Err(ConfigError::new("refresh.token_ttl", "must be positive"));
            }
            Some(Refresh {
                path,
                window_seconds: self.refresh.window,
                token_ttl_seconds: self.refresh.token_ttl,
            })
        } else {
            None
        };
        let revoke_user = if self.revoke_user_path.is_empty() {
            None
        } else {
            let field = "revoke_user_path";
            let (head, tail) = self
                .revoke_user_path
                .split_once("/{id}")
                .ok_or_else(|| ConfigError::new(field, "must contain a /{id} segment"))?;
            if tail.contains("{id}") || !(tail.is_empty() || tail.starts_with('/')) {
                return Err(ConfigError::new(field, "must contain exactly one /{id} segment"));
            }
            check_path_prefix(field, &format!("{head}{tail}"), false)?;
            Some((format!("{prefix}{head}/"), tail.to_string()))
        };
        if revoke_user.is_some() && self.revoke_roles.is_empty() {
            return Err(ConfigError::new("revoke_roles", "must name at least one role"));
        }
        crate::error::check_roles("revoke_roles", &self.revoke_roles)?;
        let paths = [logout_path.as_deref(), refresh.as_ref().map(|r| r.path.as_str())];
        if paths[0].is_some() && paths[0] == paths[1] {
            return Err(ConfigError::new(
                at("refresh", "path"),
                "must differ from logout_path",
            ));
        }
        let confirm = match &self.confirm {
            None => None,
            Some(c) => {
                crate::error::check_upstream("confirm.cluster", &c.cluster)?;
                if c.cluster == cluster {
                    return Err(ConfigError::new(
                        "confirm.cluster",
                        "must be the replica-reading webdis, not the one writes go to",
                    ));
                }
                let authority = match &c.authority {
                    Some(a) => {
                        crate::error::check_authority("confirm.authority", a)?;
                        a.clone()
                    }
                    None => crate::error::default_authority(&c.cluster),
                };
                Some(Confirm {
                    cluster: c.cluster.clone(),
                    authority,
                    timeout_ms: seconds_to_ms("confirm.timeout", c.timeout, 0.01, 60.0)?,
                })
            }
        };
        Ok(Revocation {
            confirm,
            cluster: cluster.to_string(),
            timeout_ms,
            cache_ttl_ms,
            cache_slots: self.cache_slots,
            failure_mode: self.failure_mode,
            stale_window_ms,
            ban_ttl_seconds: self.ban_ttl,
            logout_path,
            refresh,
            revoke_user,
            revoke_roles: self.revoke_roles.clone(),
        })
    }
}

pub fn blacklist_key(token: &str) -> String {
    format!("{BLACKLIST_PREFIX}{token}")
}

pub fn revoked_key(revocation_id: &str) -> String {
    format!("{REVOKED_PREFIX}{revocation_id}")
}

pub fn ban_key(user_id: &str) -> String {
    format!("{BAN_PREFIX}{user_id}")
}

/// The one lookup per request: `MGET token:blacklist:<token> token:revoked:<id>
/// [user:revoked_before:<sub>]`.
pub fn lookup_path(token: &str, revocation_id: &str, user_id: Option<&str>) -> String {
    let k1 = blacklist_key(token);
    let k2 = revoked_key(revocation_id);
    match user_id {
        Some(sub) => command_path("MGET", &[&k1, &k2, &ban_key(sub)]),
        None => command_path("MGET", &[&k1, &k2]),
    }
}

/// `SETEX key ttl value`.
pub fn setex_path(key: &str, ttl_seconds: i64, value: &str) -> String {
    command_path("SETEX", &[key, &ttl_seconds.max(1).to_string(), value])
}

/// `SET token:revoked:<id> 1 EX ttl NX`: revokes the signed token (every encoding of it) only
/// if nobody did yet, so of concurrent refreshes (or logouts) of one token, or of its twins,
/// exactly one wins.
pub fn revoke_path(revocation_id: &str, ttl_seconds: i64) -> String {
    command_path(
        "SET",
        &[
            &revoked_key(revocation_id),
            "1",
            "EX",
            &ttl_seconds.max(1).to_string(),
            "NX",
        ],
    )
}

/// `SETEX token:blacklist:<token> ttl 1`: the reference's key, for services that read it.
pub fn blacklist_path(token: &str, ttl_seconds: i64) -> String {
    setex_path(&blacklist_key(token), ttl_seconds, "1")
}

/// Parses the reply to [`revoke_path`]: `{"SET": [true, "OK"]}` (this call revoked the token)
/// or `{"SET": null}` (it already was).
pub fn parse_set_nx(status: Option<u16>, body: &[u8]) -> Result<bool, StoreError> {
    let v = json_reply(status, body)?;
    match v.get("SET") {
        Some(serde_json::Value::Null) => Ok(false),
        Some(serde_json::Value::Array(a)) => match a.as_slice() {
            [serde_json::Value::Bool(true), serde_json::Value::String(ok)] if ok == "OK" => Ok(true),
            _ => Err(StoreError::BadReply("SET did not answer OK")),
        },
        _ => Err(StoreError::BadReply("no SET reply")),
    }
}

/// What Redis knows about one token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub blacklisted: bool,
    /// `user:revoked_before:<sub>`, when set.
    pub revoked_before: Option<i64>,
}

impl Lookup {
    pub const CLEAN: Lookup = Lookup {
        blacklisted: false,
        revoked_before: None,
    };

    /// Revoked if blacklisted, or banned in or after the second the token's lineage
    /// authenticated (`authenticated_at`: the earliest of `auth_time` and `iat`, whole seconds,
    /// so a token issued earlier in the ban's second counts as older). A token without either
    /// counts as issued before any ban.
    pub fn revokes(&self, authenticated_at: Option<i64>) -> bool {
        self.blacklisted
            || match (self.revoked_before, authenticated_at) {
                (Some(before), Some(at)) => at <= before,
                (Some(_), None) => true,
                (None, _) => false,
            }
    }
}

/// Parses webdis's `{"MGET": [null, "1", null]}` reply to [`lookup_path`].
pub fn parse_lookup(status: Option<u16>, body: &[u8], with_user: bool) -> Result<Lookup, StoreError> {
    let v = json_reply(status, body)?;
    let items = v
        .get("MGET")
        .and_then(|m| m.as_array())
        .ok_or(StoreError::BadReply("no MGET array"))?;
    let expected = if with_user { 3 } else { 2 };
    if items.len() != expected {
        return Err(StoreError::BadReply("wrong number of values"));
    }
    let mut blacklisted = false;
    for item in items.iter().take(2) {
        match item {
            serde_json::Value::Null => {}
            serde_json::Value::String(_) => blacklisted = true,
            _ => return Err(StoreError::BadReply("blacklist value is not a string")),
        }
    }
    let revoked_before = match items.get(2) {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::String(s)) => Some(
            s.trim()
                .parse::<i64>()
                .map_err(|_| StoreError::BadReply("revoked_before is not an integer"))?,
        ),
        Some(_) => return Err(StoreError::BadReply("revoked_before is not a string")),
    };
    Ok(Lookup {
        blacklisted,
        revoked_before,
    })
}

/// Parses webdis's `{"SETEX": [true, "OK"]}`.
pub fn parse_setex(status: Option<u16>, body: &[u8]) -> Result<(), StoreError> {
    let v = json_reply(status, body)?;
    match v.get("SETEX").and_then(|r| r.as_array()).map(Vec::as_slice) {
        Some([serde_json::Value::Bool(true), serde_json::Value::String(ok)]) if ok == "OK" => Ok(()),
        _ => Err(StoreError::BadReply("SETEX did not answer OK")),
    }
}

/// Validates the `<id>` of `POST .../admin/users/<id>/revoke`.
/// A user id the ban endpoint and the log query take: any subject a token may carry (a safe
/// header value: no control or invisible format characters, no surrounding space, at most
/// 1,024 bytes), not empty. `auth0|abc`, `org/7`, `a;b` and non-ASCII subjects are ids.
pub fn valid_user_id(id: &str) -> bool {
    !id.is_empty() && crate::headers::is_safe_value(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_encode_every_argument() {
        assert_eq!(
            lookup_path("aa.bb-cc_dd", "Xy-_", Some("user/1 x")),
            "/MGET/token%3Ablacklist%3Aaa%2Ebb-cc_dd/token%3Arevoked%3AXy-_/user%3Arevoked_before%3Auser%2F1%20x.json"
        );
        assert_eq!(
            lookup_path("t", "r", None),
            "/MGET/token%3Ablacklist%3At/token%3Arevoked%3Ar.json"
        );
        assert_eq!(setex_path("k", 0, "1"), "/SETEX/k/1/1.json", "TTL is at least 1");
        assert_eq!(setex_path("k", 90, "v"), "/SETEX/k/90/v.json");
    }

    #[test]
    fn lookup_replies() {
        let ok = |b: &str, u| parse_lookup(Some(200), b.as_bytes(), u);
        assert_eq!(ok(r#"{"MGET":[null,null,null]}"#, true), Ok(Lookup::CLEAN));
        assert!(ok(r#"{"MGET":["1",null,null]}"#, true).unwrap().blacklisted);
        assert!(
            ok(r#"{"MGET":[null,"1",null]}"#, true).unwrap().blacklisted,
            "revoked by its signing input (a twin of a logged-out token)"
        );
        assert_eq!(
            ok(r#"{"MGET":[null,null,"1700000000"]}"#, true)
                .unwrap()
                .revoked_before,
            Some(1_700_000_000)
        );
        assert_eq!(ok(r#"{"MGET":[null,null]}"#, false), Ok(Lookup::CLEAN));
        for bad in [
            "",
            "garbage",
            "[]",
            r#"{"GET":null}"#,
            r#"{"MGET":[null,null]}"#,
            r#"{"MGET":[1,null,null]}"#,
            r#"{"MGET":[null,2,null]}"#,
            r#"{"MGET":[null,null,"soon"]}"#,
            r#"{"MGET":[null,null,5]}"#,
            r#"{"MGET":"x"}"#,
        ] {
            assert!(matches!(ok(bad, true), Err(StoreError::BadReply(_))), "{bad:?}");
        }
        assert_eq!(parse_lookup(None, b"", true), Err(StoreError::NoResponse));
        assert_eq!(parse_lookup(Some(403), b"", true), Err(StoreError::Status(403)));
    }

    #[test]
    fn set_nx_paths_and_replies() {
        assert_eq!(revoke_path("a-b", 0), "/SET/token%3Arevoked%3Aa-b/1/EX/1/NX.json");
        assert_eq!(
            blacklist_path("a.b", 90),
            "/SETEX/token%3Ablacklist%3Aa%2Eb/90/1.json"
        );
        assert_eq!(parse_set_nx(Some(200), br#"{"SET":[true,"OK"]}"#), Ok(true));
        assert_eq!(parse_set_nx(Some(200), br#"{"SET":null}"#), Ok(false));
        assert!(parse_set_nx(Some(200), br#"{"SET":[false,"ERR"]}"#).is_err());
        assert!(parse_set_nx(Some(200), br#"{"SETEX":null}"#).is_err());
        assert!(parse_set_nx(None, b"").is_err());
    }

    #[test]
    fn setex_replies() {
        assert_eq!(parse_setex(Some(200), br#"{"SETEX":[true,"OK"]}"#), Ok(()));
        assert!(parse_setex(Some(200), br#"{"SETEX":[false,"ERR invalid expire time"]}"#).is_err());
        assert!(parse_setex(Some(200), b"OK").is_err());
        assert!(parse_setex(Some(503), b"").is_err());
    }

    #[test]
    fn revocation_decision() {
        let ban = Lookup {
            blacklisted: false,
            revoked_before: Some(100),
        };
        assert!(ban.revokes(Some(99)));
        assert!(ban.revokes(Some(100)), "issued in the ban's second: revoked");
        assert!(!ban.revokes(Some(101)), "issued after the ban's second: valid");
        assert!(ban.revokes(None));
        assert!(!Lookup::CLEAN.revokes(None));
        assert!(Lookup {
            blacklisted: true,
            revoked_before: None
        }
        .revokes(Some(1)));
    }

    #[test]
    fn cache_entries_round_trip_and_expire() {
        let slot = Slot::of("t", "token-a", 16);
        assert!(slot.index < 16);
        let entry = CacheEntry {
            fingerprint: slot.fingerprint,
            stored_at_ms: 1_000,
            lookup: Lookup {
                blacklisted: true,
                revoked_before: Some(-5),
            },
        };
        let bytes = entry.encode();
        assert_eq!(CacheEntry::decode(&bytes), Some(entry));
        assert_eq!(
            CacheEntry::fresh(Some(&bytes), &slot, 1_999, 1_000).map(|e| e.lookup),
            Some(entry.lookup)
        );
        assert_eq!(
            CacheEntry::fresh(Some(&bytes), &slot, 2_000, 1_000).map(|e| e.lookup),
            None,
            "expired"
        );
        assert_eq!(
            CacheEntry::fresh(Some(&bytes), &slot, 1_000, 0).map(|e| e.lookup),
            None,
            "ttl 0 never hits"
        );
        let other = Slot::of("t", "token-b", 16);
        assert_eq!(
            CacheEntry::fresh(Some(&bytes), &other, 1_500, 1_000).map(|e| e.lookup),
            None,
            "other fingerprint"
        );
        assert_eq!(CacheEntry::fresh(Some(b"short"), &slot, 1_500, 1_000), None);
        assert_eq!(CacheEntry::fresh(None, &slot, 1_500, 1_000), None);
    }

    #[test]
    fn local_bans_expire() {
        let slot = Slot::of("u", "user-001", 8);
        let bytes = ban_entry(&slot, 500, 10_000);
        assert_eq!(local_ban(Some(&bytes), &slot, 9_999), Some(500));
        assert_eq!(local_ban(Some(&bytes), &slot, 10_000), None);
        assert_eq!(local_ban(Some(&bytes), &Slot::of("u", "user-002", 8), 1), None);
    }

    #[test]
    fn user_ids() {
        assert!(valid_user_id("user-001"));
        assert!(valid_user_id("a.b@c"));
        assert!(!valid_user_id(""));
        for id in ["auth0|abc", "org/7", "a;b", "a b", "Zoë", "用户"] {
            assert!(valid_user_id(id), "{id}");
        }
        for id in [" a", "a\u{0}", "a\u{202e}b", "a\nb"] {
            assert!(!valid_user_id(id), "{id:?}");
        }
        assert!(!valid_user_id(&"x".repeat(1025)));
    }
}
