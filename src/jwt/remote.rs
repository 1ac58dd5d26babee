//! Key sets fetched from an identity provider (`remote_jwks:`): the settings, and the small
//! records the VMs of one Envoy share about them in shared data. One VM fetches at a time (it
//! holds the issuer's lease); the document it fetched is stored once, and every VM parses it
//! once when it changes. On a `kid` the set does not hold, a VM fetches at once, at most every
//! `min_refetch_interval`; a failed fetch keeps the last good set until it is `max_stale` old,
//! and retries back off from `min_refetch_interval` up to `refresh_interval`.

use serde::{Deserialize, Serialize};

use crate::error::{check_upstream, seconds_to_ms, ConfigError};

/// `remote_jwks:`: where an issuer publishes its keys, and how often to look.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RemoteJwksSettings {
    /// `http://host[:port]/path` (or `https://`): the path and the authority sent.
    pub uri: String,
    /// The Envoy cluster the fetch goes through (the renderer defines one from `uri` when this
    /// is not set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster: Option<String>,
    /// Seconds before a fetch is given up.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    /// Seconds between fetches of a good set.
    #[serde(default = "default_refresh")]
    pub refresh_interval: f64,
    /// Seconds a set stays usable after its last successful fetch when later fetches fail.
    #[serde(default = "default_max_stale")]
    pub max_stale: f64,
    /// Least seconds between two fetches caused by an unknown `kid` (and the first retry delay
    /// after a failure).
    #[serde(default = "default_refetch")]
    pub min_refetch_interval: f64,
    /// Longest a request waits for a fetch its token needs.
    #[serde(default = "default_wait")]
    pub max_wait: f64,
}

fn default_timeout() -> f64 {
    2.0
}
fn default_refresh() -> f64 {
    300.0
}
fn default_max_stale() -> f64 {
    86_400.0
}
fn default_refetch() -> f64 {
    1.0
}
fn default_wait() -> f64 {
    1.0
}

/// The compiled `remote_jwks`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Remote {
    pub cluster: String,
    pub authority: String,
    pub path: String,
    pub timeout_ms: u64,
    pub refresh_ms: u64,
    pub max_stale_ms: u64,
    pub refetch_ms: u64,
    pub max_wait_ms: u64,
}

/// Splits `http://host[:port]/path` into authority and path.
pub fn split_uri(uri: &str) -> Option<(&str, &str)> {
    let rest = uri
        .strip_prefix("http://")
        .or_else(|| uri.strip_prefix("https://"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, "/"),
    };
    let ok = !authority.is_empty()
        && !authority.contains('@')
        && authority
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']'))
        && path.chars().all(|c| c.is_ascii_graphic())
        && !path.contains('#');
    ok.then_some((authority, path))
}

impl RemoteJwksSettings {
    /// Field names in errors are relative to `remote_jwks`.
    pub fn compile(&self) -> Result<Remote, ConfigError> {
        let (authority, path) = split_uri(&self.uri).ok_or_else(|| {
            ConfigError::new(
                "uri",
                format!("{:?} is not an http(s)://host[:port]/path URL", self.uri),
            )
        })?;
        let cluster = self
            .cluster
            .clone()
            .ok_or_else(|| ConfigError::new("cluster", "name the Envoy cluster that reaches uri"))?;
        check_upstream("cluster", &cluster)?;
        let refresh_ms = seconds_to_ms("refresh_interval", self.refresh_interval, 1.0, 86_400.0)?;
        let refetch_ms = seconds_to_ms("min_refetch_interval", self.min_refetch_interval, 0.1, 3_600.0)?;
        let max_stale_ms = seconds_to_ms("max_stale", self.max_stale, 0.0, 30.0 * 86_400.0)?;
        if max_stale_ms < refresh_ms {
            return Err(ConfigError::new(
                "max_stale",
                "must be at least refresh_interval (a good set would expire between fetches)",
            ));
        }
        Ok(Remote {
            cluster,
            authority: authority.to_string(),
            path: path.to_string(),
            timeout_ms: seconds_to_ms("timeout", self.timeout, 0.1, 60.0)?,
            refresh_ms,
            max_stale_ms,
            refetch_ms,
            max_wait_ms: seconds_to_ms("max_wait", self.max_wait, 0.0, 10.0)?,
        })
    }
}

/// Shared-data key of an issuer's last good document: `<fetched_at_ms>\n<document>`.
pub fn set_key(issuer: &str) -> String {
    format!("gw:jwks:{issuer}")
}

/// Shared-data key of an issuer's fetch lease.
pub fn lease_key(issuer: &str) -> String {
    format!("gw:jwks:{issuer}:lease")
}

pub fn encode_set(fetched_at_ms: u64, doc: &[u8]) -> Vec<u8> {
    let mut out = format!("{fetched_at_ms}\n").into_bytes();
    out.extend_from_slice(doc);
    out
}

pub fn decode_set(value: &[u8]) -> Option<(u64, &[u8])> {
    let newline = value.iter().position(|b| *b == b'\n')?;
    let (head, rest) = value.split_at(newline);
    let at = std::str::from_utf8(head).ok()?.parse().ok()?;
    Some((at, rest.get(1..)?))
}

/// Who may fetch an issuer's keys, and when: `until_ms` while a fetch is out (its holder's
/// deadline), the last attempt, the failures since the last success, and the last fetch made
/// for an unknown `kid` (those are rate-limited among themselves: a timed refresh just before a
/// rotation must not stop the fetch that finds the new key).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Lease {
    pub until_ms: u64,
    pub last_attempt_ms: u64,
    pub failures: u32,
    pub last_forced_ms: u64,
}

impl Lease {
    /// A missing or unreadable lease is a free one.
    pub fn decode(value: Option<&[u8]>) -> Self {
        let text = value.and_then(|v| std::str::from_utf8(v).ok()).unwrap_or("");
        let mut parts = text.split(' ').map(|p| p.parse::<u64>().ok());
        let mut next = || parts.next().flatten();
        match (next(), next(), next(), next()) {
            (Some(until_ms), Some(last_attempt_ms), Some(failures), Some(last_forced_ms)) => Self {
                until_ms,
                last_attempt_ms,
                failures: u32::try_from(failures).unwrap_or(u32::MAX),
                last_forced_ms,
            },
            _ => Self::default(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        format!(
            "{} {} {} {}",
            self.until_ms, self.last_attempt_ms, self.failures, self.last_forced_ms
        )
        .into_bytes()
    }

    /// Delay after the last attempt before a timed fetch: none after a success, then doubling
    /// from `min_refetch_interval` up to `refresh_interval`.
    pub fn backoff_ms(&self, remote: &Remote) -> u64 {
        if self.failures == 0 {
            return 0;
        }
        let shift = self.failures.saturating_sub(1).min(16);
        remote
            .refetch_ms
            .saturating_mul(1 << shift)
            .min(remote.refresh_ms)
    }

    /// Whether a fetch may start now. `fetched_at_ms` is the stored set's fetch time (None: no
    /// set); `forced` is a fetch for a `kid` the set lacks.
    pub fn may_fetch(&self, remote: &Remote, now_ms: u64, fetched_at_ms: Option<u64>, forced: bool) -> bool {
        if self.until_ms > now_ms {
            return false;
        }
        if forced {
            return now_ms.saturating_sub(self.last_forced_ms) >= remote.refetch_ms;
        }
        let since = now_ms.saturating_sub(self.last_attempt_ms);
        let due = fetched_at_ms.is_none_or(|at| now_ms >= at.saturating_add(remote.refresh_ms));
        due && since >= self.backoff_ms(remote)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote() -> Remote {
        RemoteJwksSettings {
            uri: "http://127.0.0.1:8005/.well-known/jwks.json".into(),
            cluster: Some("jwks_idp".into()),
            timeout: 2.0,
            refresh_interval: 5.0,
            max_stale: 60.0,
            min_refetch_interval: 1.0,
            max_wait: 1.0,
        }
        .compile()
        .unwrap()
    }

    #[test]
    fn settings_compile_and_refuse_with_the_field() {
        let r = remote();
        assert_eq!(
            (r.authority.as_str(), r.path.as_str()),
            ("127.0.0.1:8005", "/.well-known/jwks.json")
        );
        assert_eq!((r.refresh_ms, r.refetch_ms, r.max_wait_ms), (5000, 1000, 1000));
        let base = RemoteJwksSettings {
            uri: "https://idp.example.com/keys".into(),
            cluster: Some("idp".into()),
            timeout: 2.0,
            refresh_interval: 300.0,
            max_stale: 86_400.0,
            min_refetch_interval: 1.0,
            max_wait: 1.0,
        };
        assert!(base.compile().is_ok());
        let field = |s: RemoteJwksSettings| s.compile().unwrap_err().field;
        assert_eq!(
            field(RemoteJwksSettings {
                uri: "ftp://x/y".into(),
                ..base.clone()
            }),
            "uri"
        );
        assert_eq!(
            field(RemoteJwksSettings {
                uri: "http://u@x/y".into(),
                ..base.clone()
            }),
            "uri"
        );
        assert_eq!(
            field(RemoteJwksSettings {
                cluster: None,
                ..base.clone()
            }),
            "cluster"
        );
        assert_eq!(
            field(RemoteJwksSettings {
                refresh_interval: 0.0,
                ..base.clone()
            }),
            "refresh_interval"
        );
        assert_eq!(
            field(RemoteJwksSettings {
                max_stale: 10.0,
                ..base.clone()
            }),
            "max_stale"
        );
        assert_eq!(
            field(RemoteJwksSettings {
                max_wait: f64::NAN,
                ..base
            }),
            "max_wait"
        );
    }

    #[test]
    fn shared_records_round_trip_and_tolerate_garbage() {
        let v = encode_set(123, b"{\"keys\":[]}");
        assert_eq!(decode_set(&v), Some((123, &b"{\"keys\":[]}"[..])));
        assert_eq!(decode_set(b"nonsense"), None);
        assert_eq!(decode_set(b"x\n{}"), None);
        let l = Lease {
            until_ms: 5,
            last_attempt_ms: 4,
            failures: 2,
            last_forced_ms: 3,
        };
        assert_eq!(Lease::decode(Some(&l.encode())), l);
        assert_eq!(Lease::decode(Some(b"1 2 3")), Lease::default());
        assert_eq!(Lease::decode(None), Lease::default());
    }

    #[test]
    fn who_may_fetch_when() {
        let r = remote();
        let free = Lease::default();
        assert!(free.may_fetch(&r, 10_000, None, false), "no set yet: fetch");
        assert!(
            !free.may_fetch(&r, 10_000, Some(8_000), false),
            "fresh set: wait for the refresh"
        );
        assert!(free.may_fetch(&r, 13_000, Some(8_000), false));
        let held = Lease {
            until_ms: 12_000,
            last_attempt_ms: 10_000,
            ..Lease::default()
        };
        assert!(!held.may_fetch(&r, 11_000, None, true), "someone is fetching");
        let recent = Lease {
            last_attempt_ms: 10_500,
            last_forced_ms: 10_500,
            ..Lease::default()
        };
        assert!(
            !recent.may_fetch(&r, 11_000, Some(10_500), true),
            "unknown kid: at most every second"
        );
        assert!(recent.may_fetch(&r, 11_500, Some(10_500), true));
        let refreshed = Lease {
            last_attempt_ms: 10_900,
            last_forced_ms: 5_000,
            ..Lease::default()
        };
        assert!(
            refreshed.may_fetch(&r, 11_000, Some(10_900), true),
            "a timed refresh just before does not hold back an unknown kid"
        );
        let failing = Lease {
            last_attempt_ms: 10_000,
            failures: 3,
            ..Lease::default()
        };
        assert_eq!(failing.backoff_ms(&r), 4_000);
        assert!(!failing.may_fetch(&r, 13_000, None, false));
        assert!(failing.may_fetch(&r, 14_000, None, false));
        let many = Lease {
            failures: 40,
            ..failing
        };
        assert_eq!(
            many.backoff_ms(&r),
            r.refresh_ms,
            "backoff stops at the refresh interval"
        );
    }
}
