//! Configuration errors, and the checks several duties share. An error names the field as the
//! user wrote it in the gateway file (`routes[2].rate_limit.max_calls`), because the filter's
//! JSON configuration has the same shape as the gateway file.

use std::fmt;

/// Methods a route may list.
pub const KNOWN_METHODS: [&str; 7] = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"];

/// A configuration error naming the offending field, e.g. `routes[2].methods[0]: unknown method "GTE"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

impl ConfigError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            message: message.into(),
        }
    }

    /// The same error one level down, e.g. `max_calls` under `routes[2].rate_limit`.
    pub fn under(self, parent: &str) -> Self {
        let field = match (parent.is_empty(), self.field.is_empty()) {
            (true, _) => self.field,
            (false, true) => parent.to_string(),
            (false, false) => format!("{parent}.{}", self.field),
        };
        Self { field, ..self }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.field.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.field, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// `field` joined to `parent` (`parent.field`, or `field` alone at the top).
pub fn at(parent: &str, field: &str) -> String {
    if parent.is_empty() {
        field.to_string()
    } else {
        format!("{parent}.{field}")
    }
}

/// An integer in `min..=max`.
pub fn check_range<T>(field: &str, value: T, min: T, max: T) -> Result<(), ConfigError>
where
    T: PartialOrd + fmt::Display,
{
    if value < min || value > max {
        return Err(ConfigError::new(field, format!("must be {min} to {max}")));
    }
    Ok(())
}

/// A duration written in seconds (fractions allowed), converted to whole milliseconds.
pub fn seconds_to_ms(field: &str, seconds: f64, min: f64, max: f64) -> Result<u64, ConfigError> {
    if !(seconds.is_finite() && seconds >= min && seconds <= max) {
        return Err(ConfigError::new(field, format!("must be {min} to {max} seconds")));
    }
    Ok((seconds * 1000.0).round() as u64)
}

/// A path prefix: starts with `/`, no trailing `/` (except the root), no query or fragment.
pub fn check_path_prefix(field: &str, value: &str, allow_empty: bool) -> Result<(), ConfigError> {
    if value.is_empty() {
        return if allow_empty {
            Ok(())
        } else {
            Err(ConfigError::new(field, "must not be empty"))
        };
    }
    if !value.starts_with('/') {
        return Err(ConfigError::new(field, format!("must start with '/': {value:?}")));
    }
    if value.len() > 1 && value.ends_with('/') {
        return Err(ConfigError::new(
            field,
            format!("must not end with '/': {value:?}"),
        ));
    }
    if value.contains(['?', '#', ' ']) || value.contains("//") || value.chars().any(char::is_control) {
        return Err(ConfigError::new(field, format!("is not a plain path: {value:?}")));
    }
    Ok(())
}

/// A route or cluster name: letters, digits, `-`, `_`, `.`.
pub fn check_name(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 64 {
        return Err(ConfigError::new(field, "must be 1 to 64 characters"));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(ConfigError::new(
            field,
            format!("{value:?} may only contain letters, digits, '-', '_' and '.'"),
        ));
    }
    Ok(())
}

/// A callout target: an Envoy cluster name in any form Envoy takes (Istio's
/// `outbound|7379||webdis.gateway.svc.cluster.local` included), or `host:port` for hosts that
/// dispatch by address (Kong, APISIX). Visible ASCII, 1 to 255 characters.
pub fn check_upstream(field: &str, value: &str) -> Result<(), ConfigError> {
    if value.is_empty() || value.len() > 255 || !value.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ConfigError::new(
            field,
            format!(
                "{value:?} must be an Envoy cluster name or host:port (1 to 255 visible ASCII characters)"
            ),
        ));
    }
    Ok(())
}

/// The `:authority` a callout to `upstream` sends unless one is configured: for Istio's
/// `direction|port|subset|fqdn` cluster names `fqdn:port` (Istio routes by host), otherwise the
/// upstream itself (a plain cluster name, or `host:port`).
pub fn default_authority(upstream: &str) -> String {
    let parts: Vec<&str> = upstream.split('|').collect();
    match parts.as_slice() {
        [_, port, _, fqdn] if !fqdn.is_empty() && !port.is_empty() => format!("{fqdn}:{port}"),
        _ => upstream.to_string(),
    }
}

/// An `:authority` value: `host[:port]` with letters, digits, `.`, `-`, `_`, `:`, `[`, `]`.
pub fn check_authority(field: &str, value: &str) -> Result<(), ConfigError> {
    let ok = !value.is_empty()
        && value.len() <= 255
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':' | '[' | ']'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::new(field, format!("{value:?} is not a host[:port]")))
    }
}

/// Non-empty, header-safe role names.
pub fn check_roles(field: &str, roles: &[String]) -> Result<(), ConfigError> {
    for (i, role) in roles.iter().enumerate() {
        if role.is_empty() || !crate::headers::is_safe_value(role) {
            return Err(ConfigError::new(
                format!("{field}[{i}]"),
                "must be a non-empty header-safe string",
            ));
        }
    }
    Ok(())
}

/// `true`, for `#[serde(default = "crate::error::default_true")]` on settings every duty has.
pub fn default_true() -> bool {
    true
}

/// For `skip_serializing_if` on a flag that is off by default.
pub fn is_false(b: &bool) -> bool {
    !*b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_nest_and_print_their_field() {
        let e = ConfigError::new("max_calls", "must be 1 to 10").under("routes[2].rate_limit");
        assert_eq!(e.to_string(), "routes[2].rate_limit.max_calls: must be 1 to 10");
        assert_eq!(ConfigError::new("", "bad").under("jwt").to_string(), "jwt: bad");
        assert_eq!(ConfigError::new("x", "bad").under("").to_string(), "x: bad");
    }

    #[test]
    fn seconds_convert_once() {
        assert_eq!(seconds_to_ms("t", 0.2, 0.001, 60.0), Ok(200));
        assert!(seconds_to_ms("t", f64::NAN, 0.0, 60.0).is_err());
        assert!(seconds_to_ms("t", 61.0, 0.0, 60.0).is_err());
        assert_eq!(
            check_range("n", 0u32, 1, 5).unwrap_err().message,
            "must be 1 to 5"
        );
    }

    #[test]
    fn paths_and_names() {
        assert!(check_path_prefix("p", "", true).is_ok());
        assert!(check_path_prefix("p", "", false).is_err());
        assert!(check_path_prefix("p", "/a/", false).is_err());
        assert!(check_path_prefix("p", "a", false).is_err());
        assert!(check_path_prefix("p", "/a?b", false).is_err());
        assert!(check_name("n", "a-b_c.d").is_ok());
        assert!(check_name("n", "a b").is_err());
        assert!(check_name("n", "").is_err());
    }
}
