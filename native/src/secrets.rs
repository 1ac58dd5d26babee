//! `secret_sds`: the filter's secrets from Envoy's generic secrets instead of the environment.
//! Subscribed when Envoy creates the configuration; each worker compiles its configuration with
//! the values it reads, and again, in place, when one changes (Envoy offers no rotation event:
//! the worker compares the values before each event it runs, a thread-local read per secret).

use super::*;

use gateway_filter::config::secret_sds_of;
use gateway_filter::error::ConfigError;

/// Stands in, while the configuration is validated at creation, for a secret SDS has not
/// delivered yet; never used to verify anything (each worker compiles with the real values).
const PENDING: &str = "sds-secret-not-yet-delivered-placeholder";

/// The configuration's subscriptions: the variable each gives, and Envoy's id for it.
pub(crate) struct Secrets {
    envoy: EnvoyConfig,
    subscribed: Vec<(String, usize)>,
    /// The last values a configuration compiled with, shared by the workers: a worker that
    /// starts after a value that cannot be used arrived compiles with these.
    last_good: Mutex<Option<Vec<Vec<u8>>>>,
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
            subscribed.push((var, id));
        }
        Ok(Secrets {
            envoy,
            subscribed,
            last_good: Mutex::new(None),
        })
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.subscribed.is_empty()
    }

    /// The values on this thread now (empty: not delivered yet).
    pub(crate) fn values(&self) -> Vec<Vec<u8>> {
        self.subscribed
            .iter()
            .map(|(_, id)| abi::secret(self.envoy, *id).unwrap_or_default())
            .collect()
    }

    /// Compiles `json` with `values`; on success they are the last good ones. A value that
    /// cannot be used falls back to the last good values, if any.
    pub(crate) fn compile_or_last_good(
        &self,
        json: &[u8],
        values: &[Vec<u8>],
    ) -> Result<Config, ConfigError> {
        match self.compile(json, values, false) {
            Ok(cfg) => {
                if let Ok(mut good) = self.last_good.lock() {
                    *good = Some(values.to_vec());
                }
                Ok(cfg)
            }
            Err(e) => {
                let good = self.last_good.lock().ok().and_then(|g| g.clone());
                match good {
                    Some(good) if good.as_slice() != values => {
                        abi::log(
                            4,
                            &format!(
                                "gateway filter: an SDS secret value is refused, the last one kept: {e}"
                            ),
                        );
                        self.compile(json, &good, false)
                    }
                    _ => Err(e),
                }
            }
        }
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
            match self.subscribed.iter().position(|(v, _)| v == var) {
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

/// Before a worker's gateway runs: if a secret changed since it compiled its configuration,
/// compiles it again with the new values and hands it over (in-flight requests keep their
/// state; tokens verified with the old secret are checked again). A value that does not
/// compile (e.g. not UTF-8) keeps the old configuration and is logged once per value.
pub(crate) fn refresh(worker: &mut Worker, config: &FilterConfig) {
    if config.secrets.is_empty() {
        return;
    }
    let values = config.secrets.values();
    if values == worker.host.secret_values {
        return;
    }
    let changed = match config.secrets.compile(&config.json, &values, false) {
        Ok(cfg) => {
            worker.gateway.rotate_secrets(cfg);
            if let Ok(mut good) = config.secrets.last_good.lock() {
                *good = Some(values.clone());
            }
            true
        }
        Err(e) => {
            abi::log(
                4,
                &format!("gateway filter: an SDS secret value is refused, the last one kept: {e}"),
            );
            false
        }
    };
    if changed {
        abi::log(
            2,
            "gateway filter: secrets from SDS changed: configuration compiled again",
        );
    }
    worker.host.secret_values = values;
}
