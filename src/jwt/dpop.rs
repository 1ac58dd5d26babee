//! DPoP (RFC 9449): the proof a DPoP-bound access token is presented with. This module owns the
//! per-issuer `dpop:` settings, their defaults and validation, and the proof check itself (pure:
//! the request's method and URI, the proof header, the token and the clock come in; the replay
//! key and how long it must be remembered come out). Remembering the proof (shared data, and
//! the store fleet-wide) is the orchestrator's.

use super::*;
use sha2::Digest as _;

/// Default window a proof's `iat` may lie in, seconds (plus the issuer's clock skew).
pub const DEFAULT_PROOF_WINDOW: u64 = 60;
/// Largest window accepted: a proof is meant to be fresh.
pub const MAX_PROOF_WINDOW: u64 = 600;
/// Longest `DPoP` header accepted (an RSA-4096 proof is about 1.5 KB).
pub const MAX_PROOF_LEN: usize = 8 * 1024;
/// Most clock skew a proof's `iat` gets, whatever the issuer's `clock_skew` (a proof is meant
/// to be fresh, and how long one is remembered grows with it).
pub const MAX_PROOF_SKEW: i64 = 60;
/// Longest `jti` accepted.
const MAX_JTI_LEN: usize = 256;

/// Whether an issuer's tokens may, must or must not be DPoP-bound.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DpopMode {
    /// DPoP-bound tokens are refused (a `cnf.jkt` the gateway does not check would make a
    /// stolen token a bearer token again).
    #[default]
    Off,
    /// Bearer tokens pass, and DPoP-bound tokens with a valid proof.
    Allowed,
    /// Only DPoP-bound tokens with a valid proof pass.
    Required,
}

/// `dpop:` on an issuer: a mode (`off`, `allowed`, `required`), or an object with the mode, the
/// proof window and the proof algorithms.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpopSettings {
    #[serde(default)]
    pub mode: DpopMode,
    /// Seconds a proof's `iat` may lie in the past (the clock skew is added both ways).
    #[serde(default = "default_window")]
    pub proof_window: u64,
    /// The algorithms a proof may be signed with (asymmetric only: the client's own key).
    #[serde(default = "default_proof_algorithms")]
    pub algorithms: Vec<String>,
}

fn default_window() -> u64 {
    DEFAULT_PROOF_WINDOW
}

fn default_proof_algorithms() -> Vec<String> {
    ["ES256", "ES384", "RS256", "PS256", "EdDSA"]
        .iter()
        .map(|s| (*s).to_string())
        .collect()
}

impl Default for DpopSettings {
    fn default() -> Self {
        Self {
            mode: DpopMode::Off,
            proof_window: DEFAULT_PROOF_WINDOW,
            algorithms: default_proof_algorithms(),
        }
    }
}

/// Reads `dpop:` in either spelling (through `Value`, whose reader the module has anyway: an
/// untagged enum would compile in serde's buffering of any content).
pub(super) fn deserialize_dpop<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<DpopSettings>, D::Error> {
    use serde::de::Error as _;
    let bad = |e: &dyn fmt::Display| {
        D::Error::custom(format!(
            "expected off, allowed, required, or {{mode, proof_window, algorithms}}: {e}"
        ))
    };
    match Option::<Value>::deserialize(d)? {
        None => Ok(None),
        Some(Value::String(mode)) => {
            let mode: DpopMode = serde_json::from_value(Value::String(mode)).map_err(|e| bad(&e))?;
            Ok(Some(DpopSettings {
                mode,
                ..DpopSettings::default()
            }))
        }
        Some(other) => serde_json::from_value(other).map(Some).map_err(|e| bad(&e)),
    }
}

/// An issuer's compiled DPoP settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dpop {
    pub mode: DpopMode,
    pub window: i64,
    pub algorithms: Vec<Algorithm>,
}

impl Default for Dpop {
    fn default() -> Self {
        Self {
            mode: DpopMode::Off,
            window: 0,
            algorithms: Vec::new(),
        }
    }
}

impl DpopSettings {
    /// Validates the settings; field names in errors are relative to `dpop`.
    pub fn compile(&self) -> Result<Dpop, ConfigError> {
        if !(1..=MAX_PROOF_WINDOW).contains(&self.proof_window) {
            return Err(ConfigError::new(
                "proof_window",
                format!("must be 1 to {MAX_PROOF_WINDOW} seconds"),
            ));
        }
        let algorithms = parse_algorithms(&self.algorithms)?;
        if let Some(a) = algorithms.iter().find(|a| a.family() == keys::Family::Hmac) {
            return Err(ConfigError::new(
                "algorithms",
                format!(
                    "{} is symmetric: a proof is signed by the client's own public key (RFC 9449 4.2)",
                    a.name()
                ),
            ));
        }
        Ok(Dpop {
            mode: self.mode,
            window: i64::try_from(self.proof_window).unwrap_or(60),
            algorithms,
        })
    }
}

/// Why a proof was refused: the `error_description` of the `invalid_dpop_proof` challenge
/// (never echoing the proof).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProofError {
    Missing,
    Multiple,
    TooLarge,
    Malformed,
    WrongType,
    Algorithm,
    Key,
    Signature,
    Method,
    Uri,
    Time,
    Jti,
    AccessTokenHash,
    Thumbprint,
    Replayed,
    /// This gateway cannot remember more proofs now (and no store can): retry with a new one.
    ReplayCacheFull,
}

impl fmt::Display for ProofError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Missing => "DPoP proof missing",
            Self::Multiple => "more than one DPoP proof",
            Self::TooLarge => "DPoP proof too large",
            Self::Malformed => "malformed DPoP proof",
            Self::WrongType => "DPoP proof typ must be dpop+jwt",
            Self::Algorithm => "DPoP proof algorithm not allowed",
            Self::Key => "DPoP proof jwk is not a usable public key",
            Self::Signature => "DPoP proof signature verification failed",
            Self::Method => "DPoP proof htm does not match the request method",
            Self::Uri => "DPoP proof htu does not match the request URI",
            Self::Time => "DPoP proof iat outside the accepted window",
            Self::Jti => "DPoP proof jti missing or invalid",
            Self::AccessTokenHash => "DPoP proof ath does not match the access token",
            Self::Thumbprint => "DPoP proof key does not match the token's cnf.jkt",
            Self::Replayed => "DPoP proof already used",
            Self::ReplayCacheFull => {
                "too many recent DPoP proofs to remember this one: retry with a new proof"
            }
        })
    }
}

/// A proof that passed: what replay protection remembers, and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProofSeen {
    /// base64url(SHA-256(jkt "." jti)), cut to 128 bits: one proof of one key.
    pub replay_key: String,
    /// Unix seconds after which the proof is refused anyway (its `iat` left the window).
    pub until: i64,
}

/// The request a proof must be for.
pub struct ProofRequest<'a> {
    pub method: &'a str,
    /// The request's URI, normalised ([`normalize_uri`]).
    pub htu: &'a str,
    /// The access token presented with it.
    pub token: &'a str,
    /// The token's `cnf.jkt`.
    pub jkt: &'a str,
}

fn b64url(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Checks one proof (RFC 9449 4.3) for `request` at `now`, with `skew` seconds of tolerance.
pub fn check_proof(
    dpop: &Dpop,
    skew: i64,
    proof: &str,
    request: &ProofRequest<'_>,
    now: i64,
    host: Option<&mut native::HostCheck<'_>>,
) -> Result<ProofSeen, ProofError> {
    if proof.len() > MAX_PROOF_LEN {
        return Err(ProofError::TooLarge);
    }
    let skew = skew.clamp(0, MAX_PROOF_SKEW);
    let (header_json, payload_json) = decoded_parts(proof).map_err(|_| ProofError::Malformed)?;
    claims::check_strict(&header_json).map_err(|_| ProofError::Malformed)?;
    claims::check_strict(&payload_json).map_err(|_| ProofError::Malformed)?;
    let header: Map<String, Value> =
        serde_json::from_slice(&header_json).map_err(|_| ProofError::Malformed)?;
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload_json).map_err(|_| ProofError::Malformed)?;
    if header.contains_key("crit") {
        return Err(ProofError::Malformed);
    }
    match header.get("typ").and_then(Value::as_str) {
        Some(t) if t.eq_ignore_ascii_case("dpop+jwt") => {}
        _ => return Err(ProofError::WrongType),
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .and_then(Algorithm::from_name)
        .filter(|a| dpop.algorithms.contains(a))
        .ok_or(ProofError::Algorithm)?;
    let jwk = header
        .get("jwk")
        .and_then(Value::as_object)
        .ok_or(ProofError::Key)?;
    let (key, thumbprint) = keys::public_jwk(jwk).ok_or(ProofError::Key)?;
    if !key.fits(alg) {
        return Err(ProofError::Key);
    }
    let (message, signature) = proof.rsplit_once('.').ok_or(ProofError::Malformed)?;
    let signature = {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(signature)
            .map_err(|_| ProofError::Malformed)?
    };
    if !check_signature(&key, alg, message.as_bytes(), &signature, host) {
        return Err(ProofError::Signature);
    }
    let text = |name: &str| claims.get(name).and_then(Value::as_str);
    let jti = text("jti")
        .filter(|j| !j.is_empty() && j.len() <= MAX_JTI_LEN)
        .ok_or(ProofError::Jti)?;
    if text("htm") != Some(request.method) {
        return Err(ProofError::Method);
    }
    match text("htu").and_then(normalize_uri) {
        Some(htu) if htu == request.htu => {}
        _ => return Err(ProofError::Uri),
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_i64)
        .ok_or(ProofError::Time)?;
    if iat > now.saturating_add(skew) || iat < now.saturating_sub(dpop.window).saturating_sub(skew) {
        return Err(ProofError::Time);
    }
    let ath = b64url(&sha2::Sha256::digest(request.token.as_bytes()));
    if text("ath") != Some(ath.as_str()) {
        return Err(ProofError::AccessTokenHash);
    }
    if thumbprint != request.jkt {
        return Err(ProofError::Thumbprint);
    }
    let mut h = sha2::Sha256::new();
    h.update(request.jkt.as_bytes());
    h.update(b".");
    h.update(jti.as_bytes());
    let digest = h.finalize();
    Ok(ProofSeen {
        replay_key: b64url(digest.get(..16).unwrap_or_default()),
        until: iat.saturating_add(dpop.window).saturating_add(skew),
    })
}

/// The JWK SHA-256 thumbprint (RFC 7638) of a public key's required members, base64url.
pub fn thumbprint(members: &[(&str, &str)]) -> String {
    let mut canonical = String::from("{");
    for (i, (name, value)) in members.iter().enumerate() {
        if i > 0 {
            canonical.push(',');
        }
        canonical.push_str(&Value::String((*name).to_string()).to_string());
        canonical.push(':');
        canonical.push_str(&Value::String((*value).to_string()).to_string());
    }
    canonical.push('}');
    b64url(&sha2::Sha256::digest(canonical.as_bytes()))
}

/// An `http(s)` URI without query and fragment, normalised as RFC 9449 4.3 asks (RFC 3986 6.2.2
/// and 6.2.3): scheme and host in lower case, the scheme's default port dropped, percent-escapes
/// in upper case and unreserved ones decoded, dot segments removed, an empty path as `/`. `None`
/// for anything that is not an absolute `http` or `https` URI.
pub fn normalize_uri(uri: &str) -> Option<String> {
    let (scheme, rest) = uri.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default_port = match scheme.as_str() {
        "http" => "80",
        "https" => "443",
        _ => return None,
    };
    let rest = rest.split(['?', '#']).next().unwrap_or("");
    let (authority, path) = match rest.find('/') {
        Some(i) => (rest.get(..i)?, rest.get(i..)?),
        None => (rest, ""),
    };
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let mut authority = authority.to_ascii_lowercase();
    if let Some(host) = authority.strip_suffix(':') {
        authority = host.to_string();
    } else if let Some((host, port)) = authority.rsplit_once(':') {
        // Not an IPv6 literal's last group.
        if !port.contains(']') && port == default_port {
            authority = host.to_string();
        }
    }
    let path = remove_dot_segments(&normalize_escapes(path)?);
    let path = if path.is_empty() { "/".to_string() } else { path };
    Some(format!("{scheme}://{authority}{path}"))
}

/// Percent-escapes in upper case, those of unreserved characters decoded; `None` for a broken
/// escape.
fn normalize_escapes(path: &str) -> Option<String> {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hi = char::from(*bytes.get(i + 1)?).to_digit(16)?;
            let lo = char::from(*bytes.get(i + 2)?).to_digit(16)?;
            let v = u8::try_from(hi * 16 + lo).ok()?;
            if v.is_ascii_alphanumeric() || matches!(v, b'-' | b'.' | b'_' | b'~') {
                out.push(char::from(v));
            } else {
                out.push('%');
                out.push(char::from(*HEX.get(usize::from(v >> 4))?));
                out.push(char::from(*HEX.get(usize::from(v & 0x0f))?));
            }
            i += 3;
        } else {
            out.push(char::from(b));
            i += 1;
        }
    }
    // Non-ASCII bytes were pushed one by one: only ASCII paths are accepted.
    path.is_ascii().then_some(out)
}

/// RFC 3986 5.2.4.
fn remove_dot_segments(path: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let last = segments.len().saturating_sub(1);
    for (i, segment) in segments.iter().enumerate().skip(1) {
        match *segment {
            "." | ".." => {
                if *segment == ".." {
                    out.pop();
                }
                if i == last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    let mut result = String::with_capacity(path.len());
    for s in out {
        result.push('/');
        result.push_str(s);
    }
    result
}

/// The URI the client used, as the proof's `htu` must name it: the scheme Envoy recorded
/// (`x-forwarded-proto`, which Envoy sets from the connection at the edge and keeps from a
/// trusted hop; else `:scheme`), the `:authority`, and the `:path` as the client sent it (the
/// filter runs before any route rewrite, so `gateway.prefix` is in it).
pub fn request_htu(request: &[crate::headers::HeaderPair]) -> Option<String> {
    use crate::headers::get_str;
    let scheme = get_str(request, "x-forwarded-proto")
        .filter(|s| !s.is_empty() && !s.contains(','))
        .or_else(|| get_str(request, ":scheme"))
        .unwrap_or("http");
    let authority = get_str(request, ":authority")?;
    // Only host, IP-literal and port characters: a `?`, `#`, `/` or `@` here would move the
    // path the URI is compared by (nginx-based hosts let them through; Envoy's codec does not).
    let authority_ok = !authority.is_empty()
        && authority
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b':' | b'[' | b']'));
    let path = get_str(request, ":path")?;
    if !path.starts_with('/') || !authority_ok {
        return None;
    }
    let path = path.split(['?', '#']).next().unwrap_or("");
    normalize_uri(&format!("{scheme}://{authority}{path}"))
}

/// Shared-data slots the proofs seen are remembered in (`gw:dpop:0` to `gw:dpop:4095`), made
/// at start-up when an issuer takes DPoP.
pub const REPLAY_SLOTS: u32 = 4096;
/// Prefix of the replay slots' shared-data keys.
pub const REPLAY_KEY_PREFIX: &str = "gw:dpop:";
/// Proofs one slot holds: 4,096 x 8 = 32,768 proofs within one window (about 270 a second with
/// the default window and skew), at most about 1 MB of shared data.
const SLOT_ENTRIES: usize = 8;
/// One entry: the 22-character replay key and its end (unix seconds, big-endian).
const ENTRY_LEN: usize = 22 + 8;

/// What remembering a proof found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Remembered {
    /// Seen before, and still within its window.
    Replayed,
    /// The slot holds as many live proofs as it can: this one cannot be remembered here.
    Full,
}

/// The shared-data key of replay slot `index` (taken modulo [`REPLAY_SLOTS`]). The orchestrator
/// picks the slot by a keyed hash (the rate-limit slot seed), so a client cannot grind `jti`s
/// into one slot to fill another caller's.
pub fn replay_slot_key(index: u64) -> String {
    format!("{REPLAY_KEY_PREFIX}{}", index % u64::from(REPLAY_SLOTS))
}

/// The slot's new value with `seen` added (entries past their end dropped), or why not.
pub fn remember(stored: Option<&[u8]>, seen: &ProofSeen, now: i64) -> Result<Vec<u8>, Remembered> {
    let mut out = Vec::with_capacity((SLOT_ENTRIES + 1) * ENTRY_LEN);
    let mut live = 0;
    for entry in stored.unwrap_or_default().chunks_exact(ENTRY_LEN) {
        let (key, until) = entry.split_at(22);
        let until = until.try_into().map(i64::from_be_bytes).unwrap_or(i64::MIN);
        if until < now {
            continue;
        }
        if key == seen.replay_key.as_bytes() {
            return Err(Remembered::Replayed);
        }
        live += 1;
        out.extend_from_slice(entry);
    }
    if live >= SLOT_ENTRIES || seen.replay_key.len() != 22 {
        return Err(Remembered::Full);
    }
    out.extend_from_slice(seen.replay_key.as_bytes());
    out.extend_from_slice(&seen.until.to_be_bytes());
    Ok(out)
}

/// `SET dpop:<replay key> 1 EX <ttl> NX`: the proof, fleet-wide, only if no gateway saw it.
pub fn replay_store_path(seen: &ProofSeen, now: i64) -> String {
    // Padded by the largest skew: a gateway whose clock runs behind still finds it.
    let ttl = seen
        .until
        .saturating_sub(now)
        .saturating_add(MAX_PROOF_SKEW)
        .saturating_add(1)
        .max(1);
    crate::webdis::command_path(
        "SET",
        &[
            &format!("dpop:{}", seen.replay_key),
            "1",
            "EX",
            &ttl.to_string(),
            "NX",
        ],
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_normalise_as_rfc_3986_says() {
        for (a, b) in [
            (
                "HTTPS://Server.Example.com:443/a/./b/../c?x=1#f",
                "https://server.example.com/a/c",
            ),
            ("http://h:80", "http://h/"),
            ("http://h:8080/%7euser/%2fx%2F", "http://h:8080/~user/%2Fx%2F"),
            ("http://h:/a", "http://h/a"),
            ("http://[::1]:443/a", "http://[::1]:443/a"),
            ("https://h/a/b/..", "https://h/a/"),
        ] {
            assert_eq!(normalize_uri(a).as_deref(), Some(b), "{a}");
        }
        for bad in [
            "ftp://h/",
            "h/a",
            "http:///a",
            "http://u@h/",
            "http://h/%zz",
            "http://h/é",
        ] {
            assert_eq!(normalize_uri(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_slot_remembers_each_proof_once_within_its_window() {
        let seen = |k: char, until| ProofSeen {
            replay_key: k.to_string().repeat(22),
            until,
        };
        let a = remember(None, &seen('a', 100), 50).unwrap_or_default();
        assert_eq!(remember(Some(&a), &seen('a', 100), 60), Err(Remembered::Replayed));
        // Past its end it is forgotten (and refused anyway by its iat).
        assert!(remember(Some(&a), &seen('a', 200), 101).is_ok());
        let mut slot = a;
        for k in "bcdefgh".chars() {
            slot = remember(Some(&slot), &seen(k, 100), 60).unwrap_or_default();
        }
        assert_eq!(remember(Some(&slot), &seen('z', 100), 60), Err(Remembered::Full));
        assert!(remember(Some(&slot), &seen('z', 200), 101).is_ok());
        // Garbage in the slot is no entry.
        assert!(remember(Some(b"junk"), &seen('a', 100), 60).is_ok());
        assert_eq!(
            replay_store_path(&seen('a', 100), 60),
            format!("/SET/dpop%3A{}/1/EX/101/NX.json", "a".repeat(22))
        );
    }

    use crate::jwt::testkeys;
    use serde_json::json;

    const NOW: i64 = 1_700_000_000;
    const TOKEN: &str = "the.access.token";
    const HTU: &str = "https://gw.example.com/api/v1/users";

    fn public_es256() -> Value {
        let mut jwk = testkeys::jwk(Algorithm::Es256, "x", false);
        if let Some(o) = jwk.as_object_mut() {
            o.remove("kid");
        }
        jwk
    }

    fn jkt_of(jwk: &Value) -> String {
        let o = jwk.as_object().cloned().unwrap_or_default();
        keys::public_jwk(&o).map(|(_, t)| t).unwrap_or_default()
    }

    fn ath(token: &str) -> String {
        b64url(&sha2::Sha256::digest(token.as_bytes()))
    }

    fn proof_with(header: Value, claims: Value) -> String {
        testkeys::sign_raw(Algorithm::Es256, &header, &claims)
    }

    fn good_claims() -> Value {
        json!({"jti": "j-1", "htm": "GET", "htu": HTU, "iat": NOW, "ath": ath(TOKEN)})
    }

    fn good_header() -> Value {
        json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": public_es256()})
    }

    fn check(proof: &str, jkt: &str) -> Result<ProofSeen, ProofError> {
        let dpop = DpopSettings::default().compile().unwrap_or_default();
        let request = ProofRequest {
            method: "GET",
            htu: HTU,
            token: TOKEN,
            jkt,
        };
        check_proof(&dpop, 60, proof, &request, NOW, None)
    }

    #[test]
    fn a_proof_for_this_request_and_key_passes_and_every_attack_is_refused() {
        let jkt = jkt_of(&public_es256());
        let seen = check(&proof_with(good_header(), good_claims()), &jkt);
        assert_eq!(seen.as_ref().map(|s| s.until), Ok(NOW + 120));
        // Another encoding of the same htu still names this request.
        let mut c = good_claims();
        c["htu"] = "HTTPS://GW.example.com:443/api/v1/./users?q=1".into();
        assert!(check(&proof_with(good_header(), c), &jkt).is_ok());

        let with = |k: &str, v: Value| {
            let mut c = good_claims();
            c[k] = v;
            proof_with(good_header(), c)
        };
        let header_with = |k: &str, v: Value| {
            let mut h = good_header();
            h[k] = v;
            proof_with(h, good_claims())
        };
        let mut private = public_es256();
        private["d"] = "AAAA".into();
        let mut no_jti = good_claims();
        if let Some(o) = no_jti.as_object_mut() {
            o.remove("jti");
        }
        let (head, rest) = proof_with(good_header(), good_claims())
            .split_once('.')
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .unwrap_or_default();
        let hs_header = b64url(
            json!({"typ": "dpop+jwt", "alg": "HS256", "jwk": public_es256()})
                .to_string()
                .as_bytes(),
        );
        let deep = format!("{}1{}", "[".repeat(40), "]".repeat(40));
        let deep_payload = b64url(format!(r#"{{"jti":"j","x":{deep}}}"#).as_bytes());
        for (what, proof, jkt, expected) in [
            (
                "a proof for another method",
                with("htm", "POST".into()),
                jkt.clone(),
                ProofError::Method,
            ),
            (
                "a proof for another URI",
                with("htu", "https://gw.example.com/api/v1/orders".into()),
                jkt.clone(),
                ProofError::Uri,
            ),
            (
                "a proof for another host",
                with("htu", "https://evil.example.com/api/v1/users".into()),
                jkt.clone(),
                ProofError::Uri,
            ),
            (
                "a proof from the past",
                with("iat", (NOW - 121).into()),
                jkt.clone(),
                ProofError::Time,
            ),
            (
                "a proof from the future",
                with("iat", (NOW + 61).into()),
                jkt.clone(),
                ProofError::Time,
            ),
            (
                "a proof for another token",
                with("ath", ath("another.token").into()),
                jkt.clone(),
                ProofError::AccessTokenHash,
            ),
            (
                "a proof without ath",
                with("ath", Value::Null),
                jkt.clone(),
                ProofError::AccessTokenHash,
            ),
            (
                "a proof without jti",
                proof_with(good_header(), no_jti),
                jkt.clone(),
                ProofError::Jti,
            ),
            (
                "a token bound to another key",
                proof_with(good_header(), good_claims()),
                "another-thumbprint".into(),
                ProofError::Thumbprint,
            ),
            (
                "a proof of another type",
                header_with("typ", "JWT".into()),
                jkt.clone(),
                ProofError::WrongType,
            ),
            (
                "a proof with a private key",
                header_with("jwk", private),
                jkt.clone(),
                ProofError::Key,
            ),
            (
                "a proof with a symmetric key",
                header_with("jwk", json!({"kty": "oct", "k": "c2VjcmV0"})),
                jkt.clone(),
                ProofError::Key,
            ),
            (
                "a proof whose alg the key does not fit",
                header_with("alg", "RS256".into()),
                jkt.clone(),
                ProofError::Key,
            ),
            (
                "a proof with a symmetric alg",
                format!("{hs_header}.{rest}"),
                jkt.clone(),
                ProofError::Algorithm,
            ),
            (
                "a proof signed by another key than its jwk",
                {
                    let mut other = testkeys::other_rsa_jwk("o");
                    if let Some(o) = other.as_object_mut() {
                        o.remove("kid");
                    }
                    testkeys::sign_raw(
                        Algorithm::Rs256,
                        &json!({"typ": "dpop+jwt", "alg": "RS256", "jwk": other}),
                        &good_claims(),
                    )
                },
                jkt.clone(),
                ProofError::Signature,
            ),
            (
                "a huge proof",
                "a".repeat(MAX_PROOF_LEN + 1),
                jkt.clone(),
                ProofError::TooLarge,
            ),
            (
                "a deeply nested proof",
                format!("{head}.{deep_payload}.c2ln"),
                jkt.clone(),
                ProofError::Malformed,
            ),
            (
                "a proof that is no JWT",
                "not-a-jwt".into(),
                jkt.clone(),
                ProofError::Malformed,
            ),
        ] {
            assert_eq!(check(&proof, &jkt).err(), Some(expected), "{what}");
        }
    }

    #[test]
    fn a_proof_signed_by_another_key_than_its_jwk_is_refused() {
        // The header names an RSA key; the signature is the EC key's over another header.
        let rsa = testkeys::jwk(Algorithm::Rs256, "r", false);
        let forged_header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": {"kty": "EC", "crv": "P-256", "x": rsa["n"].as_str().map(|n| n.get(..43).unwrap_or(n)).unwrap_or(""), "y": public_es256()["y"]}});
        let honest = proof_with(good_header(), good_claims());
        let mut parts = honest.splitn(3, '.');
        let (_, payload, signature) = (
            parts.next(),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let forged = format!(
            "{}.{payload}.{signature}",
            b64url(forged_header.to_string().as_bytes())
        );
        let jkt = jkt_of(&forged_header);
        assert!(matches!(
            check(&forged, &jkt),
            Err(ProofError::Key | ProofError::Signature)
        ));
    }

    #[test]
    fn the_request_uri_is_built_from_its_parts() {
        let h = |pairs: &[(&str, &str)]| -> Vec<crate::headers::HeaderPair> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_string(), v.as_bytes().to_vec()))
                .collect()
        };
        let uri = |authority: &str, path: &str, proto: Option<&str>| {
            let mut v = vec![(":authority", authority), (":path", path), (":scheme", "http")];
            if let Some(p) = proto {
                v.push(("x-forwarded-proto", p));
            }
            request_htu(&h(&v))
        };
        assert_eq!(
            uri("gw.example.com", "/a/b?x=1", Some("https")).as_deref(),
            Some("https://gw.example.com/a/b")
        );
        assert_eq!(uri("gw:8080", "/a", None).as_deref(), Some("http://gw:8080/a"));
        // An authority that would move the path: refused, never "normalised".
        for bad in [
            "gw.example.com?",
            "gw.example.com#",
            "gw/x",
            "user@gw",
            "gw%2F",
            "gw x",
            "",
        ] {
            assert_eq!(uri(bad, "/admin/delete", None), None, "{bad:?}");
        }
        assert_eq!(uri("gw", "*", None), None);
        // Several forwarded protos (an appending proxy): not trusted, :scheme used.
        assert_eq!(
            uri("gw", "/a", Some("https, http")).as_deref(),
            Some("http://gw/a")
        );
    }

    #[test]
    fn thumbprint_matches_rfc_7638_example() {
        // RFC 7638 3.1.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        assert_eq!(
            thumbprint(&[("e", "AQAB"), ("kty", "RSA"), ("n", n)]),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn settings_refuse_symmetric_algorithms_and_bad_windows() {
        let s = DpopSettings {
            algorithms: vec!["HS256".into()],
            ..DpopSettings::default()
        };
        assert_eq!(
            s.compile()
                .map_err(|e| e.to_string())
                .err()
                .map(|e| e.contains("algorithms")),
            Some(true)
        );
        let s = DpopSettings {
            proof_window: 0,
            ..DpopSettings::default()
        };
        assert!(s.compile().is_err());
        assert!(DpopSettings::default().compile().is_ok());
    }
}
