//! Verification keys: the algorithms the filter supports, the key each one needs, and JSON Web
//! Key Set parsing. A key is only ever used with the algorithm family it belongs to (an HMAC
//! secret never verifies an RSA token, an RSA key never an HMAC one), and a JWK's own `alg`,
//! `use` and `key_ops` must agree with the token: no token can pick the kind of key it is
//! verified with. Keys come from configuration or a fetched JWKS, never from the token
//! (`jku`, `x5u` and `jwk` headers are not read).

use std::borrow::Cow;

use jwt_compact::alg::{
    Ed25519, Es256, Hs256, Hs256Key, Hs384, Hs384Key, Hs512, Hs512Key, Rsa, RsaPublicKey, VerifyingKey as _,
};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm as JwtAlgorithm, AlgorithmSignature};
use serde::Deserialize;

/// The signing algorithms the filter verifies.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

/// What kind of key an algorithm needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    Hmac,
    Rsa,
    P256,
    P384,
    Ed25519,
}

impl Algorithm {
    pub const ALL: [Algorithm; 12] = [
        Self::Hs256,
        Self::Hs384,
        Self::Hs512,
        Self::Rs256,
        Self::Rs384,
        Self::Rs512,
        Self::Ps256,
        Self::Ps384,
        Self::Ps512,
        Self::Es256,
        Self::Es384,
        Self::EdDsa,
    ];

    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.name() == name)
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Hs256 => "HS256",
            Self::Hs384 => "HS384",
            Self::Hs512 => "HS512",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::Ps384 => "PS384",
            Self::Ps512 => "PS512",
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::EdDsa => "EdDSA",
        }
    }

    pub fn family(self) -> Family {
        match self {
            Self::Hs256 | Self::Hs384 | Self::Hs512 => Family::Hmac,
            Self::Rs256 | Self::Rs384 | Self::Rs512 | Self::Ps256 | Self::Ps384 | Self::Ps512 => Family::Rsa,
            Self::Es256 => Family::P256,
            Self::Es384 => Family::P384,
            Self::EdDsa => Family::Ed25519,
        }
    }

    /// The hash name Envoy's `verify_signature` needs for this algorithm, when the host can
    /// check it (PKCS#1 v1.5 and ECDSA; not PSS, whose padding it does not take, nor EdDSA).
    pub fn host_hash(self) -> Option<&'static str> {
        match self {
            Self::Rs256 | Self::Es256 => Some("sha256"),
            Self::Rs384 | Self::Es384 => Some("sha384"),
            Self::Rs512 => Some("sha512"),
            _ => None,
        }
    }

    /// Every supported name, for error messages.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }
}

/// The key material of one key.
#[derive(Clone)]
pub enum Material {
    Hs256(Hs256Key),
    Hs384(Hs384Key),
    Hs512(Hs512Key),
    Rsa(RsaPublicKey),
    P256(<Es256 as JwtAlgorithm>::VerifyingKey),
    P384(p384::ecdsa::VerifyingKey),
    Ed25519(<Ed25519 as JwtAlgorithm>::VerifyingKey),
}

impl Material {
    /// The HMAC key for `alg` made from `secret`; `None` for a non-HMAC algorithm.
    pub fn hmac(alg: Algorithm, secret: &[u8]) -> Option<Self> {
        match alg {
            Algorithm::Hs256 => Some(Self::Hs256(Hs256Key::new(secret))),
            Algorithm::Hs384 => Some(Self::Hs384(Hs384Key::new(secret))),
            Algorithm::Hs512 => Some(Self::Hs512(Hs512Key::new(secret))),
            _ => None,
        }
    }

    pub fn family(&self) -> Family {
        match self {
            Self::Hs256(_) | Self::Hs384(_) | Self::Hs512(_) => Family::Hmac,
            Self::Rsa(_) => Family::Rsa,
            Self::P256(_) => Family::P256,
            Self::P384(_) => Family::P384,
            Self::Ed25519(_) => Family::Ed25519,
        }
    }

    /// Checks `signature` over `message` with `alg`. False for any mismatch between the
    /// algorithm and the key (an HMAC key for `HS384` never checks an `HS256` token).
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        match (alg, self) {
            (Algorithm::Hs256, Self::Hs256(k)) => check(&Hs256, k, message, signature),
            (Algorithm::Hs384, Self::Hs384(k)) => check(&Hs384, k, message, signature),
            (Algorithm::Hs512, Self::Hs512(k)) => check(&Hs512, k, message, signature),
            (Algorithm::Rs256, Self::Rsa(k)) => check(&Rsa::rs256(), k, message, signature),
            (Algorithm::Rs384, Self::Rsa(k)) => check(&Rsa::rs384(), k, message, signature),
            (Algorithm::Rs512, Self::Rsa(k)) => check(&Rsa::rs512(), k, message, signature),
            (Algorithm::Ps256, Self::Rsa(k)) => check(&Rsa::ps256(), k, message, signature),
            (Algorithm::Ps384, Self::Rsa(k)) => check(&Rsa::ps384(), k, message, signature),
            (Algorithm::Ps512, Self::Rsa(k)) => check(&Rsa::ps512(), k, message, signature),
            (Algorithm::Es256, Self::P256(k)) => check(&Es256, k, message, signature),
            (Algorithm::Es384, Self::P384(k)) => {
                use p384::ecdsa::signature::Verifier as _;
                p384::ecdsa::Signature::from_slice(signature).is_ok_and(|s| k.verify(message, &s).is_ok())
            }
            (Algorithm::EdDsa, Self::Ed25519(k)) => check(&Ed25519, k, message, signature),
            _ => false,
        }
    }
}

fn check<A: JwtAlgorithm>(alg: &A, key: &A::VerifyingKey, message: &[u8], signature: &[u8]) -> bool {
    if let Some(len) = <A::Signature as AlgorithmSignature>::LENGTH {
        if signature.len() != len.get() {
            return false;
        }
    }
    A::Signature::try_from_slice(signature).is_ok_and(|s| alg.verify_signature(&s, key, message))
}

/// One verification key with what its JWK said about it.
#[derive(Clone)]
pub struct Key {
    pub kid: Option<String>,
    /// The JWK's `alg`, when it declared one: then only that algorithm may use the key.
    pub alg: Option<Algorithm>,
    pub material: Material,
    /// The key as DER SubjectPublicKeyInfo, for the host's own check (RSA and ECDSA keys).
    pub spki: Option<Vec<u8>>,
    /// What the key is: a digest of its kid, declared algorithm, family and material. A cached
    /// token remembers the fingerprint of the key that verified it, and is only good while its
    /// issuer's current set holds a key with that fingerprint (new material under an old kid, or
    /// a kid-less key dropped, ends it).
    pub fingerprint: KeyFingerprint,
}

/// The fingerprint of a [`Key`] (MD5: the material comes from the issuer, who could sign any
/// token anyway; the digest only has to tell its keys apart).
pub type KeyFingerprint = [u8; 16];

impl Key {
    /// A key, with its fingerprint computed from `raw` (the material's bytes as published).
    pub fn new(
        kid: Option<String>,
        alg: Option<Algorithm>,
        material: Material,
        spki: Option<Vec<u8>>,
        raw: &[u8],
    ) -> Self {
        let mut ctx = md5::Context::new();
        let family = material.family() as u8;
        for part in [
            kid.as_deref().unwrap_or("").as_bytes(),
            &[u8::from(kid.is_some()), family],
            alg.map_or("", Algorithm::name).as_bytes(),
            raw,
        ] {
            ctx.consume((part.len() as u64).to_le_bytes());
            ctx.consume(part);
        }
        Key {
            kid,
            alg,
            material,
            spki,
            fingerprint: ctx.finalize().0,
        }
    }

    /// Whether a token signed with `alg` may be checked with this key.
    pub fn fits(&self, alg: Algorithm) -> bool {
        self.material.family() == alg.family() && self.alg.is_none_or(|a| a == alg)
    }
}

/// Largest JWKS document parsed, and most keys kept from one.
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
pub const MAX_KEYS: usize = 64;
/// RSA moduli below this many bits are refused (RFC 7518 3.3: 2048 or larger).
pub const MIN_RSA_BITS: usize = 2048;

/// Keys of one set a token without `kid` is checked against, at most.
pub const MAX_KEYS_WITHOUT_KID: usize = 4;
/// Keys of one set kept under one kid for one family of algorithms, at most: a set that puts
/// more there (64 keys under kid `x`) would make every bad signature naming that kid cost as
/// many checks. The rest are dropped at parse time, counted in [`KeySet::crowded`].
pub const MAX_KEYS_PER_KID: usize = 2;

/// The usable keys of one JWKS.
#[derive(Clone, Default)]
pub struct KeySet {
    pub keys: Vec<Key>,
    /// Keys present in the document but not usable for verification (encryption keys,
    /// unsupported types or curves, private keys, malformed material).
    pub skipped: usize,
    /// Usable keys dropped because the set repeats a key or crowds one kid (see
    /// [`MAX_KEYS_PER_KID`]).
    pub crowded: usize,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kids: Vec<&str> = self
            .keys
            .iter()
            .map(|k| k.kid.as_deref().unwrap_or("-"))
            .collect();
        f.debug_struct("KeySet")
            .field("kids", &kids)
            .field("skipped", &self.skipped)
            .field("crowded", &self.crowded)
            .finish()
    }
}

/// A key set's candidates for a token.
pub enum Lookup<'a> {
    /// Keys that may check it (one, unless the token names no `kid`).
    Found(Vec<&'a Key>),
    /// The token names a `kid` the set does not hold.
    UnknownKid,
    /// Keys exist, but none of the right kind for the token's algorithm.
    NoFittingKey,
}

impl KeySet {
    pub fn from_keys(keys: Vec<Key>) -> Self {
        let mut set = Self::default();
        for key in keys {
            set.push(key);
        }
        set
    }

    /// Adds a key, unless the set already holds the same key, or [`MAX_KEYS_PER_KID`] keys of
    /// its family under its kid (kid-less keys are bounded at lookup, by
    /// [`MAX_KEYS_WITHOUT_KID`]).
    fn push(&mut self, key: Key) {
        let same_kid =
            |k: &&Key| k.kid.is_some() && k.kid == key.kid && k.material.family() == key.material.family();
        let duplicate = self.keys.iter().any(|k| k.fingerprint == key.fingerprint);
        if duplicate || self.keys.iter().filter(same_kid).count() >= MAX_KEYS_PER_KID {
            self.crowded += 1;
        } else {
            self.keys.push(key);
        }
    }

    /// Whether the set holds the key with this fingerprint.
    pub fn contains(&self, fingerprint: &KeyFingerprint) -> bool {
        self.keys.iter().any(|k| &k.fingerprint == fingerprint)
    }

    /// The keys that may check a token signed with `alg` and naming `kid` (without a `kid`,
    /// the first [`MAX_KEYS_WITHOUT_KID`] that fit).
    pub fn lookup(&self, alg: Algorithm, kid: Option<&str>) -> Lookup<'_> {
        match kid {
            Some(kid) => {
                let named: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.as_deref() == Some(kid))
                    .collect();
                if named.is_empty() {
                    return Lookup::UnknownKid;
                }
                let fitting: Vec<&Key> = named.into_iter().filter(|k| k.fits(alg)).collect();
                if fitting.is_empty() {
                    Lookup::NoFittingKey
                } else {
                    Lookup::Found(fitting)
                }
            }
            None => {
                // Without a `kid`, at most MAX_KEYS_WITHOUT_KID keys are tried (in the set's
                // order): a token cannot make the gateway check its signature against every key
                // of a large set (finding 12).
                let fitting: Vec<&Key> = self
                    .keys
                    .iter()
                    .filter(|k| k.fits(alg))
                    .take(MAX_KEYS_WITHOUT_KID)
                    .collect();
                if fitting.is_empty() {
                    Lookup::NoFittingKey
                } else {
                    Lookup::Found(fitting)
                }
            }
        }
    }

    /// Parses a JWKS document (`{"keys": [...]}`). Keys that cannot verify signatures are
    /// skipped and counted; a document with no usable key is an error.
    pub fn parse(doc: &[u8]) -> Result<Self, String> {
        if doc.len() > MAX_JWKS_BYTES {
            return Err(format!("larger than {MAX_JWKS_BYTES} bytes"));
        }
        let raw: RawSet = serde_json::from_slice(doc).map_err(|e| format!("not a JWKS document: {e}"))?;
        if raw.keys.len() > MAX_KEYS {
            return Err(format!("more than {MAX_KEYS} keys"));
        }
        let mut set = KeySet::default();
        for value in raw.keys {
            match serde_json::from_value::<RawJwk>(value)
                .ok()
                .and_then(|jwk| jwk.key())
            {
                Some(key) => set.push(key),
                None => set.skipped += 1,
            }
        }
        if set.keys.is_empty() {
            return Err("no usable signing key".to_string());
        }
        Ok(set)
    }
}

#[derive(Deserialize)]
struct RawSet {
    keys: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct RawJwk {
    kty: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    usage: Option<String>,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    /// Private material: a key that carries it is never used.
    #[serde(default)]
    d: Option<serde::de::IgnoredAny>,
}

fn b64(s: &Option<String>) -> Option<Vec<u8>> {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.as_deref()?)
        .ok()
}

fn rsa_bits(modulus: &[u8]) -> usize {
    let mut bytes = modulus.iter().skip_while(|b| **b == 0);
    match bytes.next() {
        None => 0,
        Some(first) => (bytes.count() + 1) * 8 - first.leading_zeros() as usize,
    }
}

impl RawJwk {
    /// The verification key this JWK describes, or `None` when it is not one.
    fn key(self) -> Option<Key> {
        if self.d.is_some() || self.usage.as_deref().is_some_and(|u| u != "sig") {
            return None;
        }
        if self
            .key_ops
            .as_ref()
            .is_some_and(|ops| !ops.iter().any(|o| o == "verify"))
        {
            return None;
        }
        // A declared algorithm the filter does not support (RSA-OAEP, ES512...) means the key
        // is not for us.
        let alg = match &self.alg {
            Some(name) => Some(Algorithm::from_name(name)?),
            None => None,
        };
        let (material, spki, raw) = match (self.kty.as_str(), self.crv.as_deref()) {
            ("RSA", _) => {
                let modulus = b64(&self.n)?;
                let exponent = b64(&self.e)?;
                if rsa_bits(&modulus) < MIN_RSA_BITS {
                    return None;
                }
                let spki = super::native::spki_rsa(&modulus, &exponent);
                let raw = spki.clone();
                let jwk = JsonWebKey::Rsa {
                    modulus: Cow::Owned(modulus),
                    public_exponent: Cow::Owned(exponent),
                    private_parts: None,
                };
                (Material::Rsa(RsaPublicKey::try_from(&jwk).ok()?), Some(spki), raw)
            }
            ("EC", Some("P-256")) => {
                let point = sec1(&self.x, &self.y, 32)?;
                let key = <Es256 as JwtAlgorithm>::VerifyingKey::from_slice(&point).ok()?;
                (
                    Material::P256(key),
                    Some(super::native::spki_ec(&point, false)),
                    point,
                )
            }
            ("EC", Some("P-384")) => {
                let point = sec1(&self.x, &self.y, 48)?;
                let key = p384::ecdsa::VerifyingKey::from_sec1_bytes(&point).ok()?;
                (
                    Material::P384(key),
                    Some(super::native::spki_ec(&point, true)),
                    point,
                )
            }
            ("OKP", Some("Ed25519")) => {
                let x = b64(&self.x)?;
                let key = <Ed25519 as JwtAlgorithm>::VerifyingKey::from_slice(&x).ok()?;
                (Material::Ed25519(key), None, x)
            }
            // `oct` keys: a symmetric secret never comes from a key set (it would be public).
            _ => return None,
        };
        let key = Key::new(self.kid, alg, material, spki, &raw);
        // A key whose declared algorithm is of another family (`"alg":"HS256"` on an RSA key).
        if let Some(a) = alg {
            if !key.fits(a) {
                return None;
            }
        }
        Some(key)
    }
}

/// The uncompressed SEC1 point `04 || x || y` from JWK coordinates of `size` bytes each.
fn sec1(x: &Option<String>, y: &Option<String>, size: usize) -> Option<Vec<u8>> {
    let (x, y) = (b64(x)?, b64(y)?);
    if x.len() != size || y.len() != size {
        return None;
    }
    let mut out = Vec::with_capacity(1 + 2 * size);
    out.push(4);
    out.extend_from_slice(&x);
    out.extend_from_slice(&y);
    Some(out)
}

/// Members a public JWK must not carry (RFC 9449 4.2: a proof's `jwk` holds no private key).
const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// The verification key a single public JWK describes (a DPoP proof's `jwk`), with its
/// RFC 7638 thumbprint; `None` when it is not a public signing key this filter can use.
pub fn public_jwk(jwk: &serde_json::Map<String, serde_json::Value>) -> Option<(Key, String)> {
    if PRIVATE_MEMBERS.iter().any(|m| jwk.contains_key(*m)) {
        return None;
    }
    let raw: RawJwk = serde_json::from_value(serde_json::Value::Object(jwk.clone())).ok()?;
    let s = |v: &Option<String>| v.clone().unwrap_or_default();
    let (kty, crv, n, e, x, y) = (
        raw.kty.clone(),
        s(&raw.crv),
        s(&raw.n),
        s(&raw.e),
        s(&raw.x),
        s(&raw.y),
    );
    let members: Vec<(&str, &str)> = match kty.as_str() {
        "RSA" => vec![("e", &e), ("kty", "RSA"), ("n", &n)],
        "EC" => vec![("crv", &crv), ("kty", "EC"), ("x", &x), ("y", &y)],
        "OKP" => vec![("crv", &crv), ("kty", "OKP"), ("x", &x)],
        _ => return None,
    };
    let thumbprint = super::dpop::thumbprint(&members);
    Some((raw.key()?, thumbprint))
}
