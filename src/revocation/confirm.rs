//! `revocation.confirm`: a revocation acknowledged only once a replica shows it.

use serde::{Deserialize, Serialize};

use super::{parse_lookup, StoreError};
use crate::webdis::{command_path, json_reply};

/// `revocation.confirm`: after the primary acknowledged a revocation, read its keys back
/// through a second webdis whose Redis connection is Envoy's `redis_proxy` with
/// `read_policy: REPLICA` (and no redirection), and answer only once a replica holds them.
/// Redis replicates asynchronously and measures a replica's lag by the time since its last
/// acknowledgement, not by what it copied: a primary whose replication stream is cut in one
/// direction keeps acknowledging writes its replica never receives, and a failover then loses
/// them. Read back, a revocation is on two nodes before anyone is told it holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfirmSettings {
    /// Envoy cluster of the replica-reading webdis.
    pub cluster: String,
    /// Seconds a revocation may wait for a replica before it is answered 503 (the write stays
    /// on the primary: it still counts where it survives; the caller is told to retry).
    #[serde(default = "default_confirm_timeout")]
    pub timeout: f64,
    /// `:authority` of its calls (default: from the cluster name, as for webdis).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority: Option<String>,
}

fn default_confirm_timeout() -> f64 {
    1.0
}

/// The compiled `revocation.confirm`.
#[derive(Debug, Clone)]
pub struct Confirm {
    pub cluster: String,
    pub authority: String,
    pub timeout_ms: u64,
}

/// How often a revocation whose keys no replica held yet is read back again (the first retry
/// is immediate: a replica is normally a fraction of a millisecond behind).
pub const CONFIRM_RETRY_MS: u64 = 50;

/// What a read-back from a replica must show before the reply goes out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Readback {
    /// A revocation this request wrote: every key it wrote.
    Held(Held),
    /// The caller's own token, found revoked by the primary at a gateway endpoint (a logout or
    /// refresh retried after a 503): the replica's copy of the same lookup must revoke it too,
    /// before the caller is told its token is dead.
    Revoked {
        path: String,
        with_user: bool,
        authenticated_at: Option<i64>,
    },
}

impl Readback {
    pub fn path(&self) -> String {
        match self {
            Readback::Held(h) => h.path(),
            Readback::Revoked { path, .. } => path.clone(),
        }
    }

    /// Whether the replica's answer shows it; `Ok(false)`: not yet.
    pub fn confirmed(&self, status: Option<u16>, body: &[u8]) -> Result<bool, StoreError> {
        match self {
            Readback::Held(h) => h.parse(status, body),
            Readback::Revoked {
                with_user,
                authenticated_at,
                ..
            } => parse_lookup(status, body, *with_user).map(|l| l.revokes(*authenticated_at)),
        }
    }
}

/// At most this many read-backs, one right after the other, where the timer cannot resume a
/// request (Kong, APISIX, hosts without timers); then the revocation is answered 503.
pub const MAX_IMMEDIATE_READBACKS: u32 = 3;

/// What a replica must hold before a revocation is acknowledged: every key, and for a ban a
/// value no older than the ban's (a later ban may have replaced it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Held {
    pub keys: Vec<String>,
    pub at_least: Option<i64>,
}

impl Held {
    /// `MGET` of the keys, sent to the replica-reading webdis.
    pub fn path(&self) -> String {
        let keys: Vec<&str> = self.keys.iter().map(String::as_str).collect();
        command_path("MGET", &keys)
    }

    /// Whether webdis's `{"MGET": [...]}` reply shows every key held. A missing key is
    /// `Ok(false)` (not yet replicated); a reply of another shape is an error.
    pub fn parse(&self, status: Option<u16>, body: &[u8]) -> Result<bool, StoreError> {
        let v = json_reply(status, body)?;
        let items = v
            .get("MGET")
            .and_then(|m| m.as_array())
            .ok_or(StoreError::BadReply("no MGET array"))?;
        if items.len() != self.keys.len() {
            return Err(StoreError::BadReply("wrong number of values"));
        }
        let mut held = true;
        for item in items {
            match item {
                serde_json::Value::Null => held = false,
                serde_json::Value::String(s) => {
                    if let Some(min) = self.at_least {
                        let v = s
                            .trim()
                            .parse::<i64>()
                            .map_err(|_| StoreError::BadReply("revoked_before is not an integer"))?;
                        held &= v >= min;
                    }
                }
                _ => return Err(StoreError::BadReply("value is not a string")),
            }
        }
        Ok(held)
    }
}
