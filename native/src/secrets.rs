//! `secret_sds`: the filter's secrets from Envoy's generic secrets instead of the environment.
//! Subscribed when Envoy creates the configuration; each worker compiles its configuration with
//! the values it reads, and again, in place, when one changes (Envoy offers no rotation event:
//! the worker compares the values before each event it runs, a thread-local read per secret).

use super::*;

use gateway_filter::config::secret_sds_of;
use gateway_filter::error::ConfigError;

/// Stands in, while the configuration is validated at creation, for a secret SDS has not
/// delivered yet; never used to verify anything (each worker compiles with the real values).
/// It has the `user:password` shape webdis credentials need.
const PENDING: &str = "sds-secret-pending:not-yet-delivered";

/// The last value of each secret (by name and source) that a configuration compiled with, for
/// the whole process: a worker, or a configuration created after a reload, that sees a value
/// that cannot be used (emptied, not UTF-8) compiles with this one instead.
static LAST_GOOD: LazyLock<Mutex<HashMap<String, Vec<u8>>>> = LazyLock::new(Mutex::default);

/// One subscription: the variable it gives, Envoy's id, and its key in [`LAST_GOOD`].
struct Subscription {
    var: String,
    id: usize,
    key: String,
}

/// The configuration's subscriptions.
pub(crate) struct Secrets {
    envoy: EnvoyConfig,
    subscribed: Vec<Subscription>,
}

impl Secrets {
    /// Subscribes to every `secret_sds` entry of `json` (during config_new, main thread).
    pub(crate) fn subscribe(envoy: EnvoyConfig, json: &[u8]) -> Result<Secrets, String> {
        let mut subscribed = Vec::new();
        for (var, secret) in secret_sds_of(json).map_err(|e| e.to_string())? {
            let source = secret.config_source_json();
            let id = abi::subscribe_secret(envoy, &secret.name, &source).ok_or_else(|| {
                if source.is_empty() {
                    format!(
                        "secret_sds.{var}: Envoy has no static secret {:?} (static_resources.secrets)",
                        secret.name
                    )
                } else {
                    format!(
                        "secret_sds.{var}: Envoy refused the subscription to {:?} ({source})",
                        secret.name
                    )
                }
            })?;
            let key = format!("{}\n{source}", secret.name);
            subscribed.push(Subscription { var, id, key });
        }
        Ok(Secrets { envoy, subscribed })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subscribed.is_empty()
    }

    /// The values on this thread now (empty: not delivered yet).
    pub(crate) fn values(&self) -> Vec<Vec<u8>> {
        self.subscribed
            .iter()
            .map(|s| abi::secret(self.envoy, s.id).unwrap_or_default())
            .collect()
    }

    /// Compiles `json` with the `observed` values; they become the last good ones. If they do
    /// not compile, each value that differs from its secret's last good one is replaced by it
    /// and the configuration compiled with those. Returns the configuration and the values it
    /// was compiled with.
    pub(crate) fn resolve(
        &self,
        json: &[u8],
        observed: &[Vec<u8>],
    ) -> Result<(Config, Vec<Vec<u8>>), ConfigError> {
        let error = match self.compile(json, observed, false) {
            Ok(cfg) => {
                if let Ok(mut good) = LAST_GOOD.lock() {
                    for (s, v) in self.subscribed.iter().zip(observed) {
                        good.insert(s.key.clone(), v.clone());
                    }
                }
                return Ok((cfg, observed.to_vec()));
            }
            Err(e) => e,
        };
        let fallback: Vec<Vec<u8>> = match LAST_GOOD.lock() {
            Ok(good) => self
                .subscribed
                .iter()
                .zip(observed)
                .map(|(s, v)| good.get(&s.key).cloned().unwrap_or_else(|| v.clone()))
                .collect(),
            Err(_) => return Err(error),
        };
        if fallback.as_slice() == observed {
            return Err(error);
        }
        abi::log(
            4,
            &format!("gateway filter: an SDS secret value is refused, the last good one kept: {error}"),
        );
        self.compile(json, &fallback, false).map(|cfg| (cfg, fallback))
    }

    /// Compiles `json` with these values for the subscribed variables (the environment for the
    /// others). `pending`: a secret not delivered yet stands in as a placeholder (validation at
    /// creation only).
    pub(crate) fn compile(
        &self,
        json: &[u8],
        values: &[Vec<u8>],
        pending: bool,
    ) -> Result<Config, ConfigError> {
        let env = |var: &str| -> Option<String> {
            match self.subscribed.iter().position(|s| s.var == var) {
                Some(i) => match values.get(i).map(|v| std::str::from_utf8(v)) {
                    Some(Ok("")) | None if pending => Some(PENDING.to_string()),
                    Some(Ok("")) | None => None,
                    Some(Ok(text)) => Some(text.to_string()),
                    Some(Err(_)) => None,
                },
                None => std::env::var(var).ok(),
            }
        };
        Config::from_json_with_env(json, &env)
    }
}

/// Before a worker's gateway runs: when a secret's value on this thread changed since the
/// worker last looked, resolves the configuration again (the new values, or the last good ones
/// where a new value cannot be used) and, if that changes what the worker runs, hands it over
/// in place (in-flight requests keep their state; tokens verified with the old secret are
/// checked again).
pub(crate) fn refresh(worker: &mut Worker, config: &FilterConfig) {
    if config.secrets.is_empty() {
        return;
    }
    let observed = config.secrets.values();
    if observed == worker.host.secrets_seen {
        return;
    }
    match config.secrets.resolve(&config.json, &observed) {
        Ok((cfg, used)) => {
            if used != worker.host.secrets_running {
                worker.gateway.rotate_secrets(cfg);
                worker.host.secrets_running = used;
                abi::log(
                    2,
                    "gateway filter: secrets from SDS changed: configuration compiled again",
                );
            }
        }
        Err(e) => abi::log(4, &format!("gateway filter: an SDS secret value is refused: {e}")),
    }
    worker.host.secrets_seen = observed;
}
