//! What verification yields: the caller's [`Identity`], the [`TokenError`]s, and the revocation
//! id of a token (what its signature signs).

use super::*;
use crate::outcome::TokenFault;

/// Longest token accepted; anything larger is refused before any parsing (room for a
/// [`claims::DEFAULT_MAX_PAYLOAD_BYTES`] payload: Entra ID tokens with many groups pass 8 KiB).
pub const MAX_TOKEN_LEN: usize = 24 * 1024;

/// Role assumed when a token carries none (as the reference gateway does).
pub const DEFAULT_ROLE: &str = "user";

/// Why a token was refused. The `Display` text follows `Invalid token: ` in the 401 body, so it
/// never echoes token content.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenError {
    TooLarge,
    Malformed,
    AlgorithmNotAllowed,
    BadSignature,
    MissingExpiration,
    Expired,
    NotYetValid,
    IssuedInFuture,
    InvalidClaims,
    WrongIssuer,
    WrongAudience,
    UnsafeClaim(&'static str),
    CriticalHeader,
    /// `iss` names no configured issuer.
    UnknownIssuer,
    /// No `iss`, and no default issuer.
    MissingIssuer,
    /// The issuer's key set holds no key with the token's `kid` (issuer index).
    UnknownKey(usize),
    /// The issuer's key set holds no key of the kind the token's algorithm needs.
    NoFittingKey,
    /// The issuer's keys are not available (never fetched, or older than `max_stale`).
    KeysUnavailable(usize),
    /// The caller's budget of failed signature checks is spent: nothing was checked.
    VerificationBudget,
    /// A key appears twice in one object of the header or payload.
    DuplicateKey,
    /// Objects and arrays nested deeper than [`claims::MAX_JSON_DEPTH`].
    TooDeep,
    /// The payload is larger than `jwt.max_payload_bytes`.
    PayloadTooLarge,
    /// `typ` names another kind of JWT (a DPoP proof, a logout token...).
    WrongType,
    /// A sender-constrained token (`cnf`) of a kind this gateway does not accept.
    BoundToken(&'static str),
    /// More roles or scopes than [`claims::MAX_ROLES`], or one longer than
    /// [`claims::MAX_ROLE_LEN`] bytes.
    TooManyValues(&'static str),
}

impl TokenError {
    /// Its kind, whose labels [`crate::outcome`] writes.
    pub fn fault(&self) -> TokenFault {
        match self {
            Self::TooLarge => TokenFault::TooLarge,
            Self::Malformed => TokenFault::Malformed,
            Self::AlgorithmNotAllowed => TokenFault::Algorithm,
            Self::BadSignature => TokenFault::Signature,
            Self::MissingExpiration => TokenFault::MissingExpiration,
            Self::Expired => TokenFault::Expired,
            Self::NotYetValid => TokenFault::NotYetValid,
            Self::IssuedInFuture => TokenFault::IssuedInFuture,
            Self::InvalidClaims => TokenFault::Claims,
            Self::WrongIssuer => TokenFault::Issuer,
            Self::WrongAudience => TokenFault::Audience,
            Self::UnsafeClaim(_) => TokenFault::UnsafeClaim,
            Self::CriticalHeader => TokenFault::CriticalHeader,
            Self::UnknownIssuer => TokenFault::UnknownIssuer,
            Self::MissingIssuer => TokenFault::MissingIssuer,
            Self::UnknownKey(_) => TokenFault::UnknownKey,
            Self::NoFittingKey => TokenFault::KeyType,
            Self::KeysUnavailable(_) => TokenFault::KeysUnavailable,
            Self::VerificationBudget => TokenFault::VerificationBudget,
            Self::DuplicateKey => TokenFault::DuplicateKey,
            Self::TooDeep => TokenFault::TooDeep,
            Self::PayloadTooLarge => TokenFault::PayloadTooLarge,
            Self::WrongType => TokenFault::Type,
            Self::BoundToken(_) => TokenFault::BoundToken,
            Self::TooManyValues(_) => TokenFault::TooManyValues,
        }
    }
}

impl fmt::Display for TokenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooLarge => write!(f, "token is larger than {MAX_TOKEN_LEN} bytes"),
            Self::Malformed => f.write_str("malformed token"),
            Self::AlgorithmNotAllowed => f.write_str("signing algorithm not allowed"),
            Self::BadSignature => f.write_str("signature verification failed"),
            Self::MissingExpiration => f.write_str("missing exp claim"),
            Self::Expired => f.write_str("token has expired"),
            Self::NotYetValid => f.write_str("token is not yet valid (nbf)"),
            Self::IssuedInFuture => f.write_str("token issued in the future (iat)"),
            Self::InvalidClaims => f.write_str("invalid claims"),
            Self::WrongIssuer => f.write_str("invalid issuer"),
            Self::WrongAudience => f.write_str("invalid audience"),
            Self::UnsafeClaim(name) => write!(f, "claim {name} is not a valid header value"),
            Self::CriticalHeader => f.write_str("unsupported critical header (crit)"),
            Self::UnknownIssuer => f.write_str("unknown issuer (iss)"),
            Self::MissingIssuer => f.write_str("missing iss claim"),
            Self::UnknownKey(_) => f.write_str("unknown signing key (kid)"),
            Self::NoFittingKey => f.write_str("no key of the kind the signing algorithm needs"),
            Self::KeysUnavailable(_) => f.write_str("the issuer's signing keys are not available yet"),
            Self::VerificationBudget => f.write_str("too many failed signature checks from this client"),
            Self::DuplicateKey => f.write_str("a key appears twice in the token's header or payload"),
            Self::TooDeep => write!(f, "claims nested deeper than {}", claims::MAX_JSON_DEPTH),
            Self::PayloadTooLarge => f.write_str("payload is larger than the configured maximum"),
            Self::WrongType => f.write_str("not an access token (typ)"),
            Self::BoundToken(kind) => write!(f, "token is {kind}: not accepted"),
            Self::TooManyValues(name) => write!(
                f,
                "more than {} {name} values, or one longer than {} bytes",
                claims::MAX_ROLES,
                claims::MAX_ROLE_LEN
            ),
        }
    }
}

/// The verified identity of a caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub user_id: Option<String>,
    pub user_name: Option<String>,
    /// Every role the token holds, in token order without repeats (the default role when it
    /// has no role claim).
    pub roles: Vec<String>,
    /// Its OAuth scopes (`scope`, `scp`, or the issuer's `claims.scopes`).
    pub scopes: Vec<String>,
    pub jti: Option<String>,
    /// `exp`, unix seconds.
    pub expires_at: i64,
    /// `iat`, unix seconds, when present.
    pub issued_at: Option<i64>,
    /// `auth_time` (OIDC: when the user authenticated), unix seconds, when present. Tokens the
    /// gateway mints by refresh carry the original one on, so a ban reaches every token of a
    /// lineage that began before it.
    pub auth_time: Option<i64>,
    /// Index of the issuer that signed the token.
    pub issuer: usize,
    /// What revocation is keyed by: the SHA-256 of the signing input (`header.payload`, what
    /// the signature signs), base64url. Every valid encoding of one signed token (an ECDSA
    /// signature's `(r, n - s)` twin, another base64 spelling of the signature) has the same
    /// one, so a logout cannot be undone by re-encoding the token.
    pub revocation_id: String,
    /// What the token is bound to (`cnf`): checked on every presentation, cached or not.
    pub binding: Binding,
}

impl Identity {
    /// Whether it holds any of `roles`.
    pub fn has_any_role(&self, roles: &[String]) -> bool {
        self.roles.iter().any(|r| roles.contains(r))
    }

    /// The roles as `X-User-Role` carries them (comma-separated; empty roles left out).
    pub fn role_header(&self) -> String {
        let roles: Vec<&str> = self
            .roles
            .iter()
            .map(String::as_str)
            .filter(|r| !r.is_empty())
            .collect();
        roles.join(",")
    }

    /// The time a ban is compared with: the earliest of `auth_time` and `iat` (a token without
    /// either counts as older than any ban).
    pub fn authenticated_at(&self) -> Option<i64> {
        match (self.auth_time, self.issued_at) {
            (Some(a), Some(i)) => Some(a.min(i)),
            (a, i) => a.or(i),
        }
    }
}

/// [`Identity::revocation_id`] of a token's signing input.
pub fn revocation_id(signing_input: &[u8]) -> String {
    use base64::Engine as _;
    use sha2::Digest as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(sha2::Sha256::digest(signing_input))
}
