//! The [`Verifier`]: parse, pick the issuer by `iss`, the algorithm and key, check the
//! signature, the times and the claims.

use super::*;

/// Verifies tokens of the configured issuers with keys prepared at configure time.
pub struct Verifier {
    pub(super) issuers: Vec<Issuer>,
    pub(super) default: Option<usize>,
    /// Whether any issuer declares an `iss`: then a token's `iss` must name one. In the
    /// single-secret form nobody does, and `iss` is not checked (as the reference gateway).
    pub(super) routes_by_iss: bool,
    /// Whether the host may check RSA/ECDSA signatures (when it can).
    pub host_verification: bool,
    /// Largest decoded payload accepted.
    pub max_payload_bytes: usize,
    /// Where the caller's scopes go upstream (lower case), if anywhere.
    pub scopes_header: Option<String>,
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.issuers.iter().map(|i| i.name.as_str()).collect();
        f.debug_struct("Verifier")
            .field("issuers", &names)
            .field("default", &self.default)
            .finish_non_exhaustive()
    }
}

/// One signature check: by the host when it can check this algorithm, else compiled-in.
pub(super) fn check_signature(
    key: &Key,
    alg: Algorithm,
    message: &[u8],
    signature: &[u8],
    host: Option<&mut native::HostCheck<'_>>,
) -> bool {
    if let (Some(host), Some(spki), Some(hash)) = (host, key.spki.as_deref(), alg.host_hash()) {
        let der;
        let for_host = match alg.family() {
            keys::Family::P256 | keys::Family::P384 => {
                let width = if alg.family() == keys::Family::P256 {
                    32
                } else {
                    48
                };
                match native::ecdsa_der(signature, width) {
                    Some(d) => {
                        der = d;
                        der.as_slice()
                    }
                    None => return false,
                }
            }
            _ => signature,
        };
        if let Some(valid) = host(hash, spki, for_host, message) {
            return valid;
        }
    }
    key.material.verify(alg, message, signature)
}

/// A claim as a header value: a string, or `None` when absent (other types are refused).
pub(super) fn claim_text(
    claims: &Map<String, Value>,
    path: &ClaimPath,
    name: &'static str,
) -> Result<Option<String>, TokenError> {
    let text = match path.get(claims) {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(TokenError::InvalidClaims),
    };
    if !is_safe_header_value(&text) {
        return Err(TokenError::UnsafeClaim(name));
    }
    Ok(Some(text))
}

/// The token's header and payload as JSON text (base64url, padding tolerated).
pub(super) fn decoded_parts(token: &str) -> Result<(Vec<u8>, Vec<u8>), TokenError> {
    use base64::Engine as _;
    const ENGINE: base64::engine::GeneralPurpose = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    let mut parts = token.splitn(3, '.');
    let (Some(h), Some(p)) = (parts.next(), parts.next()) else {
        return Err(TokenError::Malformed);
    };
    let header = ENGINE.decode(h).map_err(|_| TokenError::Malformed)?;
    let payload = ENGINE.decode(p).map_err(|_| TokenError::Malformed)?;
    Ok((header, payload))
}

pub(super) fn string_claim(claims: &Map<String, Value>, name: &str) -> Result<Option<String>, TokenError> {
    match claims.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(TokenError::InvalidClaims),
    }
}

impl Verifier {
    /// One issuer with a shared secret (the reference gateway's form).
    pub fn new(
        algorithms: &[Algorithm],
        secret: &[u8],
        issuer: Option<String>,
        audience: Option<String>,
        clock_skew_seconds: u64,
    ) -> Self {
        // Tests and fuzzing build it with HMAC algorithms only; anything else gives no key.
        let keys = hmac_keys(algorithms, secret).unwrap_or_default();
        Self::from_issuers(vec![Issuer {
            name: DEFAULT_ISSUER_NAME.to_string(),
            iss: issuer,
            default: true,
            audiences: audience.into_iter().collect(),
            algorithms: algorithms.to_vec(),
            clock_skew: i64::try_from(clock_skew_seconds).unwrap_or(i64::MAX),
            claims: ClaimSettings::default(),
            types: Types::default(),
            source: Source::Secret(keys),
            dpop: Dpop::default(),
            introspection: None,
        }])
    }

    pub fn from_issuers(issuers: Vec<Issuer>) -> Self {
        let default = issuers.iter().position(|i| i.default);
        let routes_by_iss = issuers.len() > 1;
        Self {
            issuers,
            default,
            routes_by_iss,
            host_verification: true,
            max_payload_bytes: claims::DEFAULT_MAX_PAYLOAD_BYTES,
            scopes_header: None,
        }
    }

    pub fn issuers(&self) -> &[Issuer] {
        &self.issuers
    }

    pub fn issuer(&self, index: usize) -> Option<&Issuer> {
        self.issuers.get(index)
    }

    /// Whether any issuer verifies with public keys (a JWKS).
    pub fn uses_public_keys(&self) -> bool {
        self.issuers
            .iter()
            .any(|i| matches!(i.source, Source::Local(_) | Source::Remote(_)))
    }

    /// Whether any issuer takes DPoP-bound tokens.
    pub fn uses_dpop(&self) -> bool {
        self.issuers.iter().any(|i| i.dpop.mode != DpopMode::Off)
    }

    /// Indexes and settings of the issuers whose keys are fetched.
    pub fn remotes(&self) -> impl Iterator<Item = (usize, &Issuer, &Remote)> {
        self.issuers
            .iter()
            .enumerate()
            .filter_map(|(i, iss)| iss.remote().map(|r| (i, iss, r)))
    }

    /// The clock skew of the issuer that signed a token.
    pub fn clock_skew(&self, issuer: usize) -> i64 {
        self.issuers.get(issuer).map_or(0, |i| i.clock_skew)
    }

    /// Verifies `token` at unix time `now` (seconds), without a cache or fetched keys.
    pub fn verify(&self, token: &str, now: i64) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        self.verify_uncached(token, KeyContext::remote(&[]), now)
            .map(|v| v.identity)
    }

    pub(super) fn check_times(
        skew: i64,
        exp: i64,
        nbf: Option<i64>,
        iat: Option<i64>,
        now: i64,
    ) -> Result<(), TokenError> {
        if now > exp.saturating_add(skew) {
            return Err(TokenError::Expired);
        }
        if let Some(nbf) = nbf {
            if now < nbf.saturating_sub(skew) {
                return Err(TokenError::NotYetValid);
            }
        }
        if let Some(iat) = iat {
            if now < iat.saturating_sub(skew) {
                return Err(TokenError::IssuedInFuture);
            }
        }
        Ok(())
    }

    /// The checks a cached token goes through again: times, and that the key that verified it
    /// is still in its issuer's set (the same material under the same kid: a key replaced or
    /// dropped at the last fetch ends every token it verified, kid-less keys included).
    pub(super) fn recheck(&self, v: &Verified, remote: &RemoteSets, now: i64) -> Result<(), TokenError> {
        let id = &v.identity;
        let issuer = self.issuers.get(id.issuer).ok_or(TokenError::UnknownIssuer)?;
        let set = Self::key_set(issuer, id.issuer, remote)?;
        if !set.contains(&v.key) {
            return Err(TokenError::UnknownKey(id.issuer));
        }
        Self::check_times(issuer.clock_skew, id.expires_at, v.not_before, id.issued_at, now)
    }

    /// The keys an issuer's tokens are checked with now.
    fn key_set<'a>(
        issuer: &'a Issuer,
        index: usize,
        remote: &'a RemoteSets,
    ) -> Result<&'a KeySet, TokenError> {
        match &issuer.source {
            Source::Secret(set) => Ok(set),
            Source::Local(set) => Ok(set),
            Source::Remote(_) => remote
                .get(index)
                .and_then(Option::as_deref)
                .ok_or(TokenError::KeysUnavailable(index)),
            Source::None => Err(TokenError::NoFittingKey),
        }
    }

    /// Which issuer a token with this `iss` belongs to.
    pub(super) fn select(&self, iss: Option<&str>) -> Result<usize, TokenError> {
        match iss {
            None => self.default.ok_or(TokenError::MissingIssuer),
            Some(iss) => {
                if let Some(i) = self.issuers.iter().position(|i| i.iss.as_deref() == Some(iss)) {
                    return Ok(i);
                }
                match self.default {
                    // The single-secret form checks `iss` only when it declares one.
                    Some(d) if !self.routes_by_iss => Ok(d),
                    _ => Err(TokenError::UnknownIssuer),
                }
            }
        }
    }

    /// Verifies `token` at `now` without the cache (with the host's check when given).
    pub fn verify_uncached(
        &self,
        token: &str,
        mut keys: KeyContext<'_>,
        now: i64,
    ) -> Result<Verified, TokenError> {
        let remote = keys.remote;
        // Read strictly first: no key twice, no deep nesting, a bounded payload. Whatever else
        // reads this token (jwt-compact below, an upstream that re-parses it) then sees the
        // claims the gateway saw.
        let (header_json, payload_json) = decoded_parts(token)?;
        if payload_json.len() > self.max_payload_bytes {
            return Err(TokenError::PayloadTooLarge);
        }
        claims::check_strict(&header_json)?;
        claims::check_strict(&payload_json)?;
        let header_fields: Map<String, Value> =
            serde_json::from_slice(&header_json).map_err(|_| TokenError::Malformed)?;
        // RFC 7515 4.1.11: a recipient that does not understand a `crit` extension must refuse;
        // this one understands none (and `crit: null` is as present as `crit: []`).
        if header_fields.contains_key("crit") {
            return Err(TokenError::CriticalHeader);
        }
        let untrusted =
            UntrustedToken::<jwt_compact::Empty>::try_from(token).map_err(|_| TokenError::Malformed)?;
        let header = untrusted.header();
        let claims: Claims<Map<String, Value>> = untrusted
            .deserialize_claims_unchecked()
            .map_err(|_| TokenError::InvalidClaims)?;
        let iss = string_claim(&claims.custom, "iss")?;
        let index = self.select(iss.as_deref())?;
        let issuer = self.issuers.get(index).ok_or(TokenError::UnknownIssuer)?;
        // RFC 8725 3.11: a DPoP proof or a logout token is not an access token.
        issuer.types.admit(header_fields.get("typ"))?;
        let alg = Algorithm::from_name(untrusted.algorithm())
            .filter(|a| issuer.algorithms.contains(a))
            .ok_or(TokenError::AlgorithmNotAllowed)?;
        let set = Self::key_set(issuer, index, remote)?;
        let kid = match &issuer.source {
            // HMAC tokens (the reference's) carry no `kid`; a secret is one key per algorithm.
            Source::Secret(_) | Source::None => None,
            Source::Local(_) | Source::Remote(_) => header.key_id.as_deref(),
        };
        let candidates = match set.lookup(alg, kid) {
            Lookup::Found(keys) => keys,
            Lookup::UnknownKid => return Err(TokenError::UnknownKey(index)),
            Lookup::NoFittingKey => return Err(TokenError::NoFittingKey),
        };
        let signature = untrusted.signature_bytes();
        let message = token
            .rsplit_once('.')
            .map(|(m, _)| m.as_bytes())
            .ok_or(TokenError::Malformed)?;
        let host = if self.host_verification {
            keys.native.as_mut()
        } else {
            None
        };
        let key = match host {
            Some(host) => candidates
                .into_iter()
                .find(|k| check_signature(k, alg, message, signature, Some(&mut **host))),
            None => candidates
                .into_iter()
                .find(|k| check_signature(k, alg, message, signature, None)),
        }
        .ok_or(TokenError::BadSignature)?;
        let mut identity = self.check_claims(issuer, index, &claims, iss.as_deref(), now)?;
        identity.revocation_id = revocation_id(message);
        Ok(Verified {
            identity,
            not_before: claims.not_before.map(|t| t.timestamp()),
            key: key.fingerprint,
        })
    }

    pub(super) fn check_claims(
        &self,
        issuer: &Issuer,
        index: usize,
        claims: &Claims<Map<String, Value>>,
        iss: Option<&str>,
        now: i64,
    ) -> Result<Identity, TokenError> {
        let exp = claims
            .expiration
            .map(|t| t.timestamp())
            .ok_or(TokenError::MissingExpiration)?;
        let iat = claims.issued_at.map(|t| t.timestamp());
        Self::check_times(
            issuer.clock_skew,
            exp,
            claims.not_before.map(|t| t.timestamp()),
            iat,
            now,
        )?;
        let c = &claims.custom;
        if let Some(expected) = &issuer.iss {
            if iss != Some(expected.as_str()) {
                return Err(TokenError::WrongIssuer);
            }
        }
        if !issuer.audiences.is_empty() {
            let ok = match c.get("aud") {
                Some(Value::String(a)) => issuer.audiences.contains(a),
                Some(Value::Array(list)) => list.iter().any(|a| {
                    a.as_str()
                        .is_some_and(|a| issuer.audiences.iter().any(|x| x == a))
                }),
                _ => false,
            };
            if !ok {
                return Err(TokenError::WrongAudience);
            }
        }
        let jti = string_claim(c, "jti")?;
        if jti.as_deref().is_some_and(|j| !is_safe_header_value(j)) {
            return Err(TokenError::UnsafeClaim("jti"));
        }
        let auth_time = match c.get("auth_time") {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_i64().ok_or(TokenError::InvalidClaims)?),
            Some(_) => return Err(TokenError::InvalidClaims),
        };
        // A sender-constrained token is not a bearer token: its binding is checked on every
        // presentation (RFC 8705 3, RFC 9449 7); a DPoP-bound one only where its issuer takes
        // DPoP, a binding of another kind never.
        let binding = claims::binding(c)?;
        if matches!(binding, Binding::Dpop(_)) && issuer.dpop.mode == DpopMode::Off {
            return Err(TokenError::BoundToken(
                "DPoP-bound (cnf jkt, RFC 9449) and its issuer's dpop is off",
            ));
        }
        claims::payload_kind(c)?;
        let map = &issuer.claims;
        Ok(Identity {
            // An empty subject names nobody (and could not be banned): refused.
            user_id: match claim_text(c, &map.user_id, "sub")? {
                Some(s) if s.is_empty() => return Err(TokenError::InvalidClaims),
                other => other,
            },
            user_name: claim_text(c, &map.user_name, "name")?,
            roles: claims::roles(map.role.get(c), map.role_format, DEFAULT_ROLE)?,
            scopes: claims::scopes(c, map.scopes.as_ref())?,
            jti,
            expires_at: exp,
            issued_at: iat,
            auth_time,
            issuer: index,
            revocation_id: String::new(),
            binding,
        })
    }
}
