//! Every way a request ends, and everything derived from it in one place: the HTTP status of
//! the gateway's own reply, its JSON message ([`message`]), the log record's `decision`, the
//! `outcome` label of `gateway_requests_total`, and whether it counts in
//! `gateway_auth_failures_total`. No other code maps a reason to a status or a label, or
//! writes a reply's text.

/// Which bucket a rate limit refused from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    Ip,
    User,
    Route,
}

impl Scope {
    /// The word that starts the 429 message, as in the reference ("API rate limit exceeded").
    pub fn label(self) -> &'static str {
        match self {
            Scope::Ip => "IP",
            Scope::User => "User",
            Scope::Route => "API",
        }
    }

    /// Every scope, in counter order.
    pub const ALL: [Scope; 3] = [Scope::Ip, Scope::User, Scope::Route];

    /// The `scope` label of `gateway_ratelimit_total`.
    pub fn metric_label(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::User => "user",
            Scope::Route => "route",
        }
    }

    /// The index of its counters (ip, user, route).
    pub fn index(self) -> usize {
        match self {
            Scope::Ip => 0,
            Scope::User => 1,
            Scope::Route => 2,
        }
    }
}

/// Why a token failed verification: the token error's kind, without what it names (a `kid`, a
/// claim), so that every label derived from it is written here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenFault {
    TooLarge,
    Malformed,
    Algorithm,
    Signature,
    MissingExpiration,
    Expired,
    NotYetValid,
    IssuedInFuture,
    Claims,
    Issuer,
    Audience,
    UnsafeClaim,
    CriticalHeader,
    UnknownIssuer,
    MissingIssuer,
    UnknownKey,
    KeyType,
    KeysUnavailable,
    VerificationBudget,
    DuplicateKey,
    TooDeep,
    PayloadTooLarge,
    Type,
    BoundToken,
    TooManyValues,
    /// The introspection endpoint said the token is not active.
    Inactive,
    /// A DPoP proof missing, invalid, or for another request (RFC 9449 `invalid_dpop_proof`).
    DpopProof,
    /// A DPoP proof seen before.
    DpopReplay,
    /// The token's binding does not hold: a bound token as a bearer token, another scheme than
    /// its binding's, or another client certificate.
    Binding,
}

impl TokenFault {
    /// The log record's `decision` and the `reason` label of auth failures.
    pub fn code(self) -> &'static str {
        match self {
            Self::TooLarge => "too_large",
            Self::Malformed => "malformed",
            Self::Algorithm => "algorithm",
            Self::Signature => "signature",
            Self::MissingExpiration => "missing_exp",
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::IssuedInFuture => "issued_in_future",
            Self::Claims => "claims",
            Self::Issuer => "issuer",
            Self::Audience => "audience",
            Self::UnsafeClaim => "unsafe_claim",
            Self::CriticalHeader => "crit",
            Self::UnknownIssuer => "unknown_issuer",
            Self::MissingIssuer => "missing_iss",
            Self::UnknownKey => "unknown_kid",
            Self::KeyType => "key_type",
            Self::KeysUnavailable => "keys_unavailable",
            Self::VerificationBudget => "verification_budget",
            Self::DuplicateKey => "duplicate_key",
            Self::TooDeep => "too_deep",
            Self::PayloadTooLarge => "payload_too_large",
            Self::Type => "typ",
            Self::BoundToken => "bound_token",
            Self::TooManyValues => "too_many_values",
            Self::Inactive => "inactive",
            Self::DpopProof => "dpop_proof",
            Self::DpopReplay => "dpop_replay",
            Self::Binding => "binding",
        }
    }
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Sent upstream.
    Forwarded,
    /// A gateway endpoint did what was asked (logout, refresh, ban, log query).
    Answered,
    /// No `Authorization` header.
    MissingAuthorization,
    /// An `Authorization` header that is not one `Bearer <token>`.
    BadAuthorizationFormat,
    /// An authenticated route without any issuer configured.
    NoVerifier,
    /// The token failed verification, and why.
    InvalidToken(TokenFault),
    /// The token's issuer has no usable key set right now: a key server's outage, not the
    /// caller's fault, so not an authentication failure (503).
    KeysUnavailable,
    /// The token (or its user) is revoked.
    Revoked,
    /// The caller's role may not use the route or endpoint.
    Role,
    /// The token lacks a scope the route needs (403, RFC 6750 `insufficient_scope`).
    InsufficientScope,
    /// No route, no endpoint, or nothing found (the log query).
    NotFound,
    MethodNotAllowed,
    BadRequest,
    RateLimited(Scope),
    /// The revocation or log store did not answer, or a write did not land (503).
    StoreUnavailable,
    /// The gateway's own fault (500).
    Internal,
    /// The VM's state was busy (a re-entrant callback): refused rather than unchecked (503).
    Busy,
}

/// Every value [`Outcome::label`] takes (the renderer turns them into Envoy's tag extraction).
pub const LABELS: [&str; 12] = [
    "allowed",
    "unauthorized",
    "revoked",
    "forbidden",
    "not_found",
    "method_not_allowed",
    "bad_request",
    "rate_limited",
    "store_unavailable",
    "keys_unavailable",
    "no_verifier",
    "error",
];

impl Outcome {
    /// The HTTP status of the gateway's reply (200 for a forwarded request: the upstream's
    /// own status is the log record's).
    pub fn status(self) -> u16 {
        match self {
            Outcome::Forwarded | Outcome::Answered => 200,
            Outcome::MissingAuthorization
            | Outcome::BadAuthorizationFormat
            | Outcome::NoVerifier
            | Outcome::InvalidToken(_)
            | Outcome::Revoked => 401,
            Outcome::Role | Outcome::InsufficientScope => 403,
            Outcome::NotFound => 404,
            Outcome::MethodNotAllowed => 405,
            Outcome::BadRequest => 400,
            Outcome::RateLimited(_) => 429,
            Outcome::Internal => 500,
            Outcome::KeysUnavailable | Outcome::StoreUnavailable | Outcome::Busy => 503,
        }
    }

    /// The log record's `decision`, and the `reason` label of auth failures.
    pub fn decision(self) -> &'static str {
        match self {
            Outcome::Forwarded => "allowed",
            Outcome::Answered => "ok",
            Outcome::MissingAuthorization => "missing_authorization",
            Outcome::BadAuthorizationFormat => "bad_authorization_format",
            Outcome::NoVerifier => "no_verifier",
            Outcome::InvalidToken(fault) => fault.code(),
            Outcome::KeysUnavailable => "keys_unavailable",
            Outcome::Revoked => "revoked",
            Outcome::Role => "role",
            Outcome::InsufficientScope => "insufficient_scope",
            Outcome::NotFound => "route_not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::BadRequest => "bad_request",
            Outcome::RateLimited(Scope::Ip) => "rate_limited_ip",
            Outcome::RateLimited(Scope::User) => "rate_limited_user",
            Outcome::RateLimited(Scope::Route) => "rate_limited_route",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::Internal => "internal_error",
            Outcome::Busy => "busy",
        }
    }

    /// The `outcome` label of `gateway_requests_total`.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Forwarded | Outcome::Answered => "allowed",
            Outcome::MissingAuthorization | Outcome::BadAuthorizationFormat | Outcome::InvalidToken(_) => {
                "unauthorized"
            }
            Outcome::Revoked => "revoked",
            Outcome::Role | Outcome::InsufficientScope => "forbidden",
            Outcome::NotFound => "not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::BadRequest => "bad_request",
            Outcome::RateLimited(_) => "rate_limited",
            Outcome::StoreUnavailable => "store_unavailable",
            Outcome::KeysUnavailable => "keys_unavailable",
            // Not the caller's fault but the configuration's: its own label, so an operator's
            // alert on it is not lost among the gateway's own errors.
            Outcome::NoVerifier => "no_verifier",
            Outcome::Internal | Outcome::Busy => "error",
        }
    }

    /// Whether it counts in `gateway_auth_failures_total` (the caller could not show a valid,
    /// unrevoked token with the role needed).
    pub fn is_auth_failure(self) -> bool {
        matches!(
            self,
            Outcome::MissingAuthorization
                | Outcome::BadAuthorizationFormat
                | Outcome::InvalidToken(_)
                | Outcome::Revoked
                | Outcome::Role
                | Outcome::InsufficientScope
        )
    }
}

/// The JSON `message` of the gateway's own replies: the fixed texts (the reference's where it
/// has one), and builders for the ones that name what was refused.
pub mod message {
    use std::fmt::Display;

    pub const AUTH_MISSING: &str = "Authorization header missing";
    pub const AUTH_FORMAT: &str = "Invalid authorization format. Expected: Bearer <token>";
    pub const TOKEN_INACTIVE: &str = "Invalid token: not active (introspection)";
    pub const INTROSPECTION_DOWN: &str = "Token introspection unavailable";
    pub const INTROSPECTED_RETRY: &str = "Token introspected; retry the request";
    pub const DPOP_AS_BEARER: &str =
        "Invalid token: a DPoP-bound token must be sent as Authorization: DPoP <token>";
    pub const DPOP_UNBOUND: &str = "Invalid token: the DPoP scheme needs a DPoP-bound token (cnf.jkt)";
    pub const DPOP_REQUIRED: &str = "Invalid token: its issuer requires DPoP-bound tokens";
    pub const CERTIFICATE_MISMATCH: &str =
        "Invalid token: certificate-bound (cnf x5t#S256) to another client certificate, or no client certificate";
    pub const NO_VERIFIER: &str = "Invalid token: no verifier configured";
    pub const ROUTE_NOT_FOUND: &str = "Route not found";
    pub const REVOKED: &str = "Token has been revoked";
    pub const STORE_DOWN: &str = "Revocation service unavailable";
    pub const WRITE_FAILED: &str =
        "Revocation service unavailable: the change was not recorded, the token may still be valid";
    /// `revocation.confirm`: the primary took it, no replica held it in time.
    pub const NOT_REPLICATED: &str =
        "Revocation service unavailable: the change is not yet on a replica and may be lost, retry";
    pub const LOG_STORE_DOWN: &str = "Log store unavailable";
    /// The reference's logout answer.
    pub const LOGGED_OUT: &str = "Logged out successfully";
    pub const NO_RECORDS: &str = "No log records found";
    pub const INVALID_USER_ID: &str = "Invalid user id";
    pub const INTERNAL: &str = "Internal Gateway Error";
    pub const BUSY: &str = "Gateway busy";
    pub const LOGS_BOTH: &str = "Give trace_id or user_id, not both";
    pub const LOGS_NONE: &str = "trace_id or user_id is required";
    pub const LOGS_INVALID_ID: &str = "Invalid trace_id or user_id";
    pub const VERIFICATION_BUDGET: &str =
        "Too many tokens with bad signatures from this client; try again later";

    pub fn invalid_token(reason: impl Display) -> String {
        format!("Invalid token: {reason}")
    }

    pub fn invalid_proof(reason: impl Display) -> String {
        format!("Invalid DPoP proof: {reason}")
    }

    pub fn keys_unavailable(issuer: &str) -> String {
        format!("Signing keys of issuer '{issuer}' are not available; try again shortly")
    }

    pub fn role(role: &str, what: &str) -> String {
        format!("Role '{role}' is not allowed to access {what}")
    }

    /// A role the caller lacks, of a list where every one is needed (`roles_all`).
    pub fn role_required(role: &str, what: &str) -> String {
        format!("Role '{role}' is required to access {what}")
    }

    pub fn scope_required(scope: &str, what: &str) -> String {
        format!("Scope '{scope}' is required to access {what}")
    }

    /// A ban's answer.
    pub fn user_revoked(user: &str) -> String {
        format!("All tokens of user {user} issued up to now are revoked")
    }

    pub fn method_not_allowed(method: &str) -> String {
        format!("Method {method} not allowed")
    }

    /// `label` is the scope's word (`IP`, `User`, `API`).
    pub fn rate_limited(label: &str, limit: u64, period_s: u64) -> String {
        format!("{label} rate limit exceeded: {limit} calls per {period_s}s")
    }

    pub fn refresh_window(window_s: u64) -> String {
        format!("Token can only be refreshed in its last {window_s} seconds")
    }

    pub fn refreshed_elsewhere(issuer: &str) -> String {
        format!("Tokens of issuer '{issuer}' are refreshed by their identity provider")
    }

    /// A client-sent copy of a header the gateway writes, on a host that cannot remove it.
    pub fn gateway_header(name: &str) -> String {
        format!("Header {name} is set by the gateway; send the request without it")
    }

    pub fn logs_limit(max: u32) -> String {
        format!("limit must be 1 to {max}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_server_outage_is_not_an_authentication_failure() {
        let o = Outcome::KeysUnavailable;
        assert_eq!(
            (o.status(), o.label(), o.decision()),
            (503, "keys_unavailable", "keys_unavailable")
        );
        assert!(!o.is_auth_failure());
        let bad = Outcome::InvalidToken(TokenFault::Expired);
        assert_eq!(
            (bad.status(), bad.label(), bad.decision()),
            (401, "unauthorized", "expired")
        );
        assert!(bad.is_auth_failure());
    }

    #[test]
    fn every_refusal_has_a_status_of_its_class() {
        let all = [
            Outcome::MissingAuthorization,
            Outcome::BadAuthorizationFormat,
            Outcome::NoVerifier,
            Outcome::InvalidToken(TokenFault::Malformed),
            Outcome::KeysUnavailable,
            Outcome::Revoked,
            Outcome::Role,
            Outcome::InsufficientScope,
            Outcome::NotFound,
            Outcome::MethodNotAllowed,
            Outcome::BadRequest,
            Outcome::RateLimited(Scope::Ip),
            Outcome::StoreUnavailable,
            Outcome::Internal,
            Outcome::Busy,
        ];
        for o in all {
            assert!(o.status() >= 400, "{o:?}");
            assert_ne!(o.label(), "allowed", "{o:?}");
            assert!(
                !o.is_auth_failure() || o.status() == 401 || o.status() == 403,
                "{o:?}"
            );
            assert!(LABELS.contains(&o.label()), "{o:?}");
        }
    }
}
