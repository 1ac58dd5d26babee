//! Test keys for every algorithm, tokens signed with them, and their JWKs. Keys are made once
//! per test binary (RSA generation is the slow part).

use std::sync::OnceLock;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use jwt_compact::alg::{Ed25519, Es256, Rsa, RsaPrivateKey};
use jwt_compact::jwk::JsonWebKey;
use jwt_compact::{Algorithm as _, AlgorithmExt as _, Claims, Header};
use serde_json::{json, Value};

use super::Algorithm;

pub struct Keys {
    pub rsa: RsaPrivateKey,
    pub rsa_other: RsaPrivateKey,
    pub p256: <Es256 as jwt_compact::Algorithm>::SigningKey,
    pub p384: p384::ecdsa::SigningKey,
    pub ed: <Ed25519 as jwt_compact::Algorithm>::SigningKey,
}

pub fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let mut rng = rand_core::OsRng;
        let rsa = |rng: &mut rand_core::OsRng| RsaPrivateKey::new(rng, 2048).unwrap();
        Keys {
            rsa: rsa(&mut rng),
            rsa_other: rsa(&mut rng),
            p256: <Es256 as jwt_compact::Algorithm>::SigningKey::from_slice(&[7u8; 32]).unwrap(),
            p384: p384::ecdsa::SigningKey::from_slice(&[9u8; 48]).unwrap(),
            ed: Ed25519::generate(&mut rng).0,
        }
    })
}

/// The public JWK of the test key for `alg` (`other`: a second RSA key), with `kid` and `alg`.
pub fn jwk(alg: Algorithm, kid: &str, declare_alg: bool) -> Value {
    let k = keys();
    let mut v = match alg {
        Algorithm::Rs256
        | Algorithm::Rs384
        | Algorithm::Rs512
        | Algorithm::Ps256
        | Algorithm::Ps384
        | Algorithm::Ps512 => serde_json::to_value(JsonWebKey::from(&k.rsa.to_public_key())).unwrap(),
        Algorithm::Es256 => serde_json::to_value(JsonWebKey::from(k.p256.verifying_key())).unwrap(),
        Algorithm::Es384 => {
            let point = k.p384.verifying_key().to_encoded_point(false);
            json!({"kty": "EC", "crv": "P-384", "x": B64.encode(point.x().unwrap()), "y": B64.encode(point.y().unwrap())})
        }
        Algorithm::EdDsa => serde_json::to_value(JsonWebKey::from(&k.ed.public_key())).unwrap(),
        _ => panic!("no public key for {alg:?}"),
    };
    v["kid"] = kid.into();
    if declare_alg {
        v["alg"] = alg.name().into();
    }
    v
}

pub fn other_rsa_jwk(kid: &str) -> Value {
    let mut v = serde_json::to_value(JsonWebKey::from(&keys().rsa_other.to_public_key())).unwrap();
    v["kid"] = kid.into();
    v
}

/// A token signed with the test key for `alg`.
pub fn sign(alg: Algorithm, kid: Option<&str>, claims: Value) -> String {
    sign_with(alg, kid, claims, false)
}

/// A token signed with the test key for `alg`, or with the second RSA key (`other`).
pub fn sign_with(alg: Algorithm, kid: Option<&str>, claims: Value, other: bool) -> String {
    let k = keys();
    let mut header = Header::empty();
    if let Some(kid) = kid {
        header = header.with_key_id(kid);
    }
    let mut c = Claims::new(claims.clone());
    if let Some(exp) = claims.get("exp").and_then(Value::as_i64) {
        c.expiration = chrono::DateTime::from_timestamp(exp, 0);
        if let Value::Object(m) = &mut c.custom {
            m.remove("exp");
        }
    }
    let rsa = if other { &k.rsa_other } else { &k.rsa };
    match alg {
        Algorithm::Rs256 => Rsa::rs256().token(&header, &c, rsa),
        Algorithm::Rs384 => Rsa::rs384().token(&header, &c, rsa),
        Algorithm::Rs512 => Rsa::rs512().token(&header, &c, rsa),
        Algorithm::Ps256 => Rsa::ps256().token(&header, &c, rsa),
        Algorithm::Ps384 => Rsa::ps384().token(&header, &c, rsa),
        Algorithm::Ps512 => Rsa::ps512().token(&header, &c, rsa),
        Algorithm::Es256 => Es256.token(&header, &c, &k.p256),
        Algorithm::EdDsa => Ed25519.token(&header, &c, &k.ed),
        Algorithm::Es384 => {
            use p384::ecdsa::signature::Signer as _;
            let mut h = json!({"alg": "ES384"});
            if let Some(kid) = kid {
                h["kid"] = kid.into();
            }
            let input = format!("{}.{}", B64.encode(h.to_string()), B64.encode(claims.to_string()));
            let sig: p384::ecdsa::Signature = k.p384.sign(input.as_bytes());
            return format!("{input}.{}", B64.encode(sig.to_bytes()));
        }
        _ => panic!("sign HMAC tokens with jwt::tests::forge"),
    }
    .unwrap()
}

/// A token with any header, signed by `alg`'s test key over exactly these bytes.
pub fn sign_raw(alg: Algorithm, header: &Value, claims: &Value) -> String {
    let k = keys();
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let sig = match alg {
        Algorithm::Rs256 => {
            let s = Rsa::rs256().sign(&k.rsa, input.as_bytes());
            jwt_compact::AlgorithmSignature::as_bytes(&s).to_vec()
        }
        Algorithm::Es256 => {
            let s = Es256.sign(&k.p256, input.as_bytes());
            jwt_compact::AlgorithmSignature::as_bytes(&s).to_vec()
        }
        _ => panic!("sign_raw supports RS256 and ES256"),
    };
    format!("{input}.{}", B64.encode(sig))
}

pub fn jwks(keys: &[Value]) -> String {
    json!({ "keys": keys }).to_string()
}
