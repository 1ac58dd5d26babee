//! Settings of the duty (`gateway.rate_limit`, `routes[].rate_limit`), their defaults and
//! validation, and their compiled form.

use super::*;

/// `{max_calls, period}`: calls per `period` seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    pub max_calls: u64,
    #[serde(default = "default_period")]
    pub period: u64,
}

fn default_period() -> u64 {
    1
}

impl LimitSettings {
    /// Field names in errors are relative to the limit.
    pub fn compile(&self) -> Result<Limit, ConfigError> {
        check_range("max_calls", self.max_calls, 1, 1_000_000_000)?;
        check_range("period", self.period, 1, 86_400)?;
        Ok(Limit {
            max_calls: self.max_calls,
            period_ms: self.period * 1000,
        })
    }
}

/// `routes[].rate_limit`: the route bucket, and optional per-user / per-IP overrides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteRateLimit {
    #[serde(default = "crate::error::default_true")]
    pub enabled: bool,
    pub max_calls: u64,
    #[serde(default = "default_period")]
    pub period: u64,
    /// Default: the gateway's `per_user`, else a tenth of the route limit (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<LimitSettings>,
    /// Default: the gateway's `per_ip`, one bucket per address shared by all routes. Set here,
    /// it is a bucket per (route, address).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_ip: Option<LimitSettings>,
    /// Share the route bucket with other gateway instances through Redis (needs webdis).
    #[serde(default)]
    pub cluster_wide: bool,
}

/// `gateway.rate_limit`: settings shared by every limited route.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSettings {
    /// Default per-IP limit (the reference: 1000 per second).
    #[serde(default = "default_per_ip")]
    pub per_ip: LimitSettings,
    /// Default per-user limit (else each route's max_calls / 10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per_user: Option<LimitSettings>,
    /// Proxies in front of Envoy whose `X-Forwarded-For` entries are trusted; 0 = the peer.
    #[serde(default)]
    pub trusted_hops: u32,
    /// Slots (the memory bound) for per-user and for per-IP buckets.
    #[serde(default = "default_slots")]
    pub user_slots: u32,
    #[serde(default = "default_slots")]
    pub ip_slots: u32,
    /// Seconds between syncs of cluster-wide routes with Redis.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: f64,
    /// Timeout of one sync call, seconds.
    #[serde(default = "default_sync_timeout")]
    pub sync_timeout: f64,
    /// Failed signature checks allowed per client address (then its tokens are not checked
    /// until the bucket refills; `null` turns the budget off).
    #[serde(default = "default_bad_signatures")]
    pub bad_signatures: Option<LimitSettings>,
    /// Which rate-limit response headers: `legacy` (`X-RateLimit-*`), `ietf`
    /// (`RateLimit-Policy` and `RateLimit`, draft-ietf-httpapi-ratelimit-headers) or `both`.
    #[serde(default)]
    pub headers: HeaderStyle,
}

/// `gateway.rate_limit.headers`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HeaderStyle {
    #[default]
    Legacy,
    Ietf,
    Both,
}

impl HeaderStyle {
    pub fn legacy(self) -> bool {
        self != HeaderStyle::Ietf
    }
    pub fn ietf(self) -> bool {
        self != HeaderStyle::Legacy
    }
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            per_ip: default_per_ip(),
            per_user: None,
            trusted_hops: 0,
            user_slots: default_slots(),
            ip_slots: default_slots(),
            sync_interval: default_sync_interval(),
            sync_timeout: default_sync_timeout(),
            bad_signatures: default_bad_signatures(),
            headers: HeaderStyle::default(),
        }
    }
}

fn default_bad_signatures() -> Option<LimitSettings> {
    Some(LimitSettings {
        max_calls: 100,
        period: 10,
    })
}

fn default_per_ip() -> LimitSettings {
    LimitSettings {
        max_calls: 1000,
        period: 1,
    }
}
fn default_slots() -> u32 {
    8192
}
fn default_sync_interval() -> f64 {
    0.5
}
fn default_sync_timeout() -> f64 {
    0.2
}

/// Validated gateway-wide settings.
#[derive(Debug, Clone)]
pub struct RateLimits {
    pub per_ip: Limit,
    pub per_user: Option<Limit>,
    pub trusted_hops: u32,
    pub user_slots: u32,
    pub ip_slots: u32,
    /// Set when a route is cluster-wide.
    pub sync: Option<SyncTarget>,
    /// The per-client budget of failed signature checks.
    pub bad_signatures: Option<VerifyBudget>,
    pub headers: HeaderStyle,
}

/// Where and how often cluster-wide routes are synchronised.
#[derive(Debug, Clone)]
pub struct SyncTarget {
    pub cluster: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
}

impl RateLimitSettings {
    /// `cluster` is the webdis cluster, needed only when a route is cluster-wide. Field names
    /// in errors are relative to `gateway.rate_limit`.
    pub fn compile(&self, cluster_wide: bool, cluster: Option<&str>) -> Result<RateLimits, ConfigError> {
        let per_ip = self.per_ip.compile().map_err(|e| e.under("per_ip"))?;
        let per_user = match &self.per_user {
            Some(u) => Some(u.compile().map_err(|e| e.under("per_user"))?),
            None => None,
        };
        check_range("user_slots", self.user_slots, 1, 1_000_000)?;
        check_range("ip_slots", self.ip_slots, 1, 1_000_000)?;
        check_range("trusted_hops", self.trusted_hops, 0, 16)?;
        let interval_ms = seconds_to_ms("sync_interval", self.sync_interval, 0.05, 60.0)?;
        let timeout_ms = seconds_to_ms("sync_timeout", self.sync_timeout, 0.001, 60.0)?;
        let sync = match (cluster_wide, cluster) {
            (false, _) => None,
            (true, None) => {
                return Err(ConfigError::new(
                    "",
                    "cluster-wide rate limits need webdis (the `webdis` address in the gateway file)",
                ))
            }
            (true, Some(cluster)) => Some(SyncTarget {
                cluster: cluster.to_string(),
                interval_ms,
                timeout_ms,
            }),
        };
        let bad_signatures = match &self.bad_signatures {
            Some(l) => Some(VerifyBudget {
                limit: l.compile().map_err(|e| e.under("bad_signatures"))?,
                slots: self.ip_slots,
            }),
            None => None,
        };
        Ok(RateLimits {
            bad_signatures,
            per_ip,
            per_user,
            trusted_hops: self.trusted_hops,
            user_slots: self.user_slots,
            ip_slots: self.ip_slots,
            sync,
            headers: self.headers,
        })
    }
}

/// A validated bucket identity and limit.
#[derive(Debug, Clone)]
pub struct BucketSpec {
    pub limit: Limit,
    /// Stable part of the bucket identity (the route name, or empty for the shared per-IP bucket).
    pub scope: String,
}

/// A route's validated limits.
#[derive(Debug, Clone)]
pub struct RouteLimits {
    /// The route name (the Redis counter of a cluster-wide route is named after it).
    pub name: String,
    pub cluster_wide: bool,
    /// Shared-data counter of consumption not yet synced (cluster-wide routes).
    pub pending_key: String,
    pub route_key: String,
    pub route_fingerprint: u64,
    pub route: Limit,
    pub user: BucketSpec,
    pub ip: BucketSpec,
}

impl RouteRateLimit {
    /// The route's limits, `None` when disabled. Field names in errors are relative to
    /// `routes[i].rate_limit`.
    pub fn compile(&self, route: &str, global: &RateLimits) -> Result<Option<RouteLimits>, ConfigError> {
        let own = LimitSettings {
            max_calls: self.max_calls,
            period: self.period,
        }
        .compile()?;
        let per_user = match &self.per_user {
            Some(u) => Some(u.compile().map_err(|e| e.under("per_user"))?),
            None => None,
        };
        let per_ip = match &self.per_ip {
            Some(ip) => Some(ip.compile().map_err(|e| e.under("per_ip"))?),
            None => None,
        };
        if !self.enabled {
            return Ok(None);
        }
        // The reference: a user gets a tenth of the route's limit (at least 1).
        let user = per_user.or(global.per_user).unwrap_or(Limit {
            max_calls: (self.max_calls / 10).max(1),
            period_ms: own.period_ms,
        });
        let ip = match per_ip {
            Some(limit) => BucketSpec {
                limit,
                scope: route.to_string(),
            },
            None => BucketSpec {
                limit: global.per_ip,
                scope: String::new(),
            },
        };
        Ok(Some(RouteLimits {
            name: route.to_string(),
            cluster_wide: self.cluster_wide,
            pending_key: cluster::pending_key(route),
            route_key: route_key(route),
            route_fingerprint: crate::host::fingerprint(&["r", route]),
            route: own,
            user: BucketSpec {
                limit: user,
                scope: route.to_string(),
            },
            ip,
        }))
    }
}
