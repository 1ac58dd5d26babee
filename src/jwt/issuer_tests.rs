//! Issuers, algorithms, key selection and the header tricks that must never pick a key.

use serde_json::{json, Value};

use super::testkeys::{jwk, jwks, other_rsa_jwk, sign, sign_raw, sign_with};
use super::tests::{forge, SECRET};
use super::*;

const NOW: i64 = 1_800_000_000;
const IDP: &str = "https://idp.example.com";

fn claims(extra: Value) -> Value {
    let mut c =
        json!({"sub": "user-7", "name": "ann", "role": "admin", "iss": IDP, "exp": NOW + 600, "iat": NOW});
    if let (Value::Object(c), Value::Object(e)) = (&mut c, extra) {
        c.extend(e);
    }
    c
}

fn no_env(_: &str) -> Option<String> {
    None
}

/// The reference's secret (default issuer, no `iss`) plus an identity provider with a local
/// JWKS holding one key per algorithm family.
fn verifier(algorithms: &[&str]) -> Verifier {
    let keys = vec![
        jwk(Algorithm::Rs256, "rsa-1", false),
        jwk(Algorithm::Es256, "ec-1", true),
        jwk(Algorithm::Es384, "ec384-1", true),
        jwk(Algorithm::EdDsa, "ed-1", true),
    ];
    settings(algorithms, json!(jwks(&keys))).compile(&no_env).unwrap()
}

fn settings(algorithms: &[&str], local_jwks: Value) -> JwtSettings {
    serde_json::from_value(json!({
        "secret": String::from_utf8(SECRET.to_vec()).unwrap(),
        "issuers": [{
            "name": "idp",
            "issuer": IDP,
            "algorithms": algorithms,
            "local_jwks": local_jwks,
        }]
    }))
    .unwrap()
}

const ALL_PUBLIC: [&str; 9] = [
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA",
];

#[test]
fn every_algorithm_verifies_with_its_key() {
    let v = verifier(&ALL_PUBLIC);
    for (alg, kid) in [
        (Algorithm::Rs256, "rsa-1"),
        (Algorithm::Rs384, "rsa-1"),
        (Algorithm::Rs512, "rsa-1"),
        (Algorithm::Ps256, "rsa-1"),
        (Algorithm::Ps384, "rsa-1"),
        (Algorithm::Ps512, "rsa-1"),
        (Algorithm::Es256, "ec-1"),
        (Algorithm::Es384, "ec384-1"),
        (Algorithm::EdDsa, "ed-1"),
    ] {
        let t = sign(alg, Some(kid), claims(json!({})));
        let id = v.verify(&t, NOW).unwrap_or_else(|e| panic!("{alg:?}: {e}"));
        assert_eq!(
            (id.user_id.as_deref(), id.role_header().as_str(), id.issuer),
            (Some("user-7"), "admin", 1),
            "{alg:?}"
        );
        // One flipped signature byte is refused.
        let mut bad = t.clone();
        let last = bad.pop().unwrap();
        bad.push(if last == 'A' { 'B' } else { 'A' });
        assert!(v.verify(&bad, NOW).is_err(), "{alg:?} tampered");
        // Without a kid, the keys of the right kind are tried.
        let t = sign(alg, None, claims(json!({})));
        assert!(v.verify(&t, NOW).is_ok(), "{alg:?} without kid");
    }
}

#[test]
fn an_issuer_accepts_only_its_algorithms() {
    let v = verifier(&["ES256"]);
    let rs = sign(Algorithm::Rs256, Some("rsa-1"), claims(json!({})));
    assert_eq!(v.verify(&rs, NOW), Err(TokenError::AlgorithmNotAllowed));
    let none = forge(r#"{"alg":"none"}"#, &claims(json!({})).to_string(), b"");
    assert_eq!(v.verify(&none, NOW), Err(TokenError::AlgorithmNotAllowed));
}

#[test]
fn algorithm_confusion_is_impossible() {
    let v = verifier(&ALL_PUBLIC);
    // The classic: HS256 "signed" with the issuer's public key as the HMAC secret.
    let public = jwk(Algorithm::Rs256, "rsa-1", false).to_string();
    let n = jwk(Algorithm::Rs256, "rsa-1", false)["n"]
        .as_str()
        .unwrap()
        .to_string();
    for secret in [public.as_bytes(), n.as_bytes()] {
        let t = forge(
            r#"{"alg":"HS256","kid":"rsa-1"}"#,
            &claims(json!({})).to_string(),
            secret,
        );
        assert_eq!(v.verify(&t, NOW), Err(TokenError::AlgorithmNotAllowed));
    }
    // An ES256 token naming the RSA key's kid: the key is of the wrong kind.
    let t = sign(Algorithm::Es256, Some("rsa-1"), claims(json!({})));
    assert_eq!(v.verify(&t, NOW), Err(TokenError::NoFittingKey));
    // A key that declares its algorithm is used with no other (RS256 key, PS256 token).
    let strict = settings(&ALL_PUBLIC, json!(jwks(&[jwk(Algorithm::Rs256, "rsa-1", true)])))
        .compile(&no_env)
        .unwrap();
    let t = sign(Algorithm::Ps256, Some("rsa-1"), claims(json!({})));
    assert_eq!(strict.verify(&t, NOW), Err(TokenError::NoFittingKey));
    // A JWKS cannot smuggle in an HMAC issuer.
    let err = settings(&["HS256"], json!(jwks(&[jwk(Algorithm::Rs256, "k", false)])))
        .compile(&no_env)
        .unwrap_err();
    assert_eq!(err.field, "issuers[0].algorithms");
}

#[test]
fn header_tricks_never_pick_a_key() {
    let v = verifier(&["RS256"]);
    // The attacker signs with their own key and points at it every way JOSE allows.
    let attacker = other_rsa_jwk("evil");
    for header in [
        json!({"alg": "RS256", "kid": "evil", "jwk": attacker}),
        json!({"alg": "RS256", "kid": "evil", "jku": "https://evil.example/jwks.json"}),
        json!({"alg": "RS256", "kid": "evil", "x5u": "https://evil.example/cert.pem"}),
    ] {
        let t = {
            let mut c = claims(json!({}));
            c["exp"] = (NOW + 600).into();
            let signed = sign_with(Algorithm::Rs256, Some("evil"), c, true);
            // Re-header the attacker's token: its signature no longer covers it either way.
            let parts: Vec<&str> = signed.split('.').collect();
            use base64::Engine as _;
            let h = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(header.to_string());
            format!("{h}.{}.{}", parts[1], parts[2])
        };
        assert_eq!(v.verify(&t, NOW), Err(TokenError::UnknownKey(1)), "{header}");
    }
    // The same tricks with the issuer's kid: the embedded key is ignored, the signature fails.
    let t = sign_with(Algorithm::Rs256, Some("rsa-1"), claims(json!({})), true);
    assert_eq!(v.verify(&t, NOW), Err(TokenError::BadSignature));
    // `crit` is refused whatever signs it.
    let t = sign_raw(
        Algorithm::Rs256,
        &json!({"alg": "RS256", "kid": "rsa-1", "crit": ["b64"], "b64": false}),
        &claims(json!({})),
    );
    assert_eq!(v.verify(&t, NOW), Err(TokenError::CriticalHeader));
    let t = sign_raw(
        Algorithm::Rs256,
        &json!({"alg": "RS256", "kid": "rsa-1"}),
        &claims(json!({})),
    );
    assert!(v.verify(&t, NOW).is_ok(), "the control token verifies");
}

#[test]
fn iss_picks_the_issuer() {
    let v = verifier(&["RS256", "ES256"]);
    // The reference's token: no iss, HS256 with the secret -> the default issuer.
    let hs = forge(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &json!({"sub": "user-001", "exp": NOW + 60}).to_string(),
        SECRET,
    );
    assert_eq!(v.verify(&hs, NOW).unwrap().issuer, 0);
    // An HS256 token claiming the identity provider's iss: that issuer takes no HMAC.
    let hs_idp = forge(r#"{"alg":"HS256"}"#, &claims(json!({})).to_string(), SECRET);
    assert_eq!(v.verify(&hs_idp, NOW), Err(TokenError::AlgorithmNotAllowed));
    // An unknown iss is refused whoever signed it.
    let stranger = sign(
        Algorithm::Rs256,
        Some("rsa-1"),
        claims(json!({"iss": "https://else"})),
    );
    assert_eq!(v.verify(&stranger, NOW), Err(TokenError::UnknownIssuer));
    // An RS256 token without iss goes to the default issuer, which takes only HS256.
    let mut c = claims(json!({}));
    c.as_object_mut().unwrap().remove("iss");
    let no_iss = sign(Algorithm::Rs256, Some("rsa-1"), c);
    assert_eq!(v.verify(&no_iss, NOW), Err(TokenError::AlgorithmNotAllowed));
    // Without a default issuer, a token without iss has nowhere to go.
    let only_idp: JwtSettings = serde_json::from_value(json!({"issuers": [{
        "name": "idp", "issuer": IDP, "algorithms": ["RS256"],
        "local_jwks": jwks(&[jwk(Algorithm::Rs256, "rsa-1", true)])}]}))
    .unwrap();
    let only_idp = only_idp.compile(&no_env).unwrap();
    assert_eq!(only_idp.verify(&no_iss, NOW), Err(TokenError::MissingIssuer));
    assert_eq!(only_idp.verify(&hs, NOW), Err(TokenError::MissingIssuer));
}

#[test]
fn the_single_secret_form_is_unchanged() {
    // No issuers: iss is not checked unless configured, as before.
    let v: JwtSettings = serde_json::from_value(json!({"secret": "s3cr3t"})).unwrap();
    let v = v.compile(&no_env).unwrap();
    let t = forge(
        r#"{"alg":"HS256"}"#,
        &json!({"sub": "u", "iss": "anything", "exp": NOW + 5}).to_string(),
        b"s3cr3t",
    );
    assert!(v.verify(&t, NOW).is_ok());
}

#[test]
fn audiences_skew_and_claim_mapping_are_per_issuer() {
    let s: JwtSettings = serde_json::from_value(json!({"issuers": [{
        "name": "kc", "issuer": IDP, "algorithms": ["ES256"], "audiences": ["api", "web"],
        "clock_skew": 0,
        "claims": {"user_id": "preferred_username", "user_name": "given_name", "role": "realm_access.roles"},
        "local_jwks": jwks(&[jwk(Algorithm::Es256, "ec-1", true)])}]}))
    .unwrap();
    let v = s.compile(&no_env).unwrap();
    let t = sign(
        Algorithm::Es256,
        Some("ec-1"),
        claims(
            json!({"aud": ["other", "web"], "preferred_username": "ann.k", "given_name": "Ann",
                      "realm_access": {"roles": ["ops", "user"]}}),
        ),
    );
    let id = v.verify(&t, NOW).unwrap();
    assert_eq!(
        (
            id.user_id.as_deref(),
            id.user_name.as_deref(),
            id.roles.as_slice()
        ),
        (
            Some("ann.k"),
            Some("Ann"),
            ["ops".to_string(), "user".to_string()].as_slice()
        )
    );
    let wrong_aud = sign(Algorithm::Es256, Some("ec-1"), claims(json!({"aud": "mobile"})));
    assert_eq!(v.verify(&wrong_aud, NOW), Err(TokenError::WrongAudience));
    let late = sign(
        Algorithm::Es256,
        Some("ec-1"),
        claims(json!({"aud": "api", "exp": NOW - 1})),
    );
    assert_eq!(
        v.verify(&late, NOW),
        Err(TokenError::Expired),
        "this issuer allows no skew"
    );
    let bad_role = sign(
        Algorithm::Es256,
        Some("ec-1"),
        claims(json!({"aud": "api", "realm_access": {"roles": [1]}})),
    );
    assert_eq!(v.verify(&bad_role, NOW), Err(TokenError::InvalidClaims));
    let unsafe_id = sign(
        Algorithm::Es256,
        Some("ec-1"),
        claims(json!({"aud": "api", "preferred_username": "a\r\nb"})),
    );
    assert_eq!(v.verify(&unsafe_id, NOW), Err(TokenError::UnsafeClaim("sub")));
}

#[test]
fn jwks_documents_keep_only_verification_keys() {
    let mut enc = jwk(Algorithm::Rs256, "enc", false);
    enc["use"] = "enc".into();
    let mut private = jwk(Algorithm::Es256, "priv", false);
    private["d"] = "AAAA".into();
    let mut ops = jwk(Algorithm::EdDsa, "sign-only", false);
    ops["key_ops"] = json!(["sign"]);
    let oct = json!({"kty": "oct", "k": "c2VjcmV0", "kid": "oct"});
    let small_rsa = json!({"kty": "RSA", "kid": "small", "n": "AQAB", "e": "AQAB"});
    let p521 = json!({"kty": "EC", "crv": "P-521", "kid": "p521", "x": "AA", "y": "AA"});
    let oaep = {
        let mut k = jwk(Algorithm::Rs256, "oaep", false);
        k["alg"] = "RSA-OAEP".into();
        k
    };
    let mislabelled = {
        let mut k = jwk(Algorithm::Rs256, "mis", false);
        k["alg"] = "ES256".into();
        k
    };
    let good = jwk(Algorithm::Es256, "good", true);
    let doc = jwks(&[
        enc,
        private,
        ops,
        oct,
        small_rsa,
        p521,
        oaep,
        mislabelled,
        good,
        json!("junk"),
    ]);
    let set = KeySet::parse(doc.as_bytes()).unwrap();
    assert_eq!(set.keys.len(), 1);
    assert_eq!(set.keys[0].kid.as_deref(), Some("good"));
    assert_eq!(set.skipped, 9);
    for bad in [
        &b"not json"[..],
        b"{}",
        b"{\"keys\":[]}",
        b"{\"keys\":{}}",
        b"[]",
        b"{\"keys\":[{\"kty\":\"oct\",\"k\":\"AA\"}]}",
    ] {
        assert!(KeySet::parse(bad).is_err(), "{}", String::from_utf8_lossy(bad));
    }
    let many: Vec<Value> = (0..=keys::MAX_KEYS)
        .map(|i| jwk(Algorithm::Es256, &format!("k{i}"), true))
        .collect();
    assert!(KeySet::parse(jwks(&many).as_bytes()).is_err());
    assert!(KeySet::parse(&vec![b' '; keys::MAX_JWKS_BYTES + 1]).is_err());
}

#[test]
fn configuration_errors_name_the_field() {
    let field = |v: Value| -> String {
        let s: JwtSettings = serde_json::from_value(v).unwrap();
        s.compile(&|k| (k == "SET").then(|| "x".to_string()))
            .unwrap_err()
            .field
    };
    let doc = jwks(&[jwk(Algorithm::Es256, "ec-1", true)]);
    let idp = |extra: Value| {
        let mut i = json!({"name": "idp", "issuer": IDP, "algorithms": ["ES256"], "local_jwks": doc});
        if let (Value::Object(i), Value::Object(e)) = (&mut i, extra) {
            i.extend(e);
        }
        i
    };
    assert_eq!(field(json!({})), "secret_env");
    assert_eq!(
        field(json!({"issuers": [idp(json!({"name": "a b"}))]})),
        "issuers[0].name"
    );
    assert_eq!(
        field(json!({"issuers": [idp(json!({"issuer": null}))]})),
        "issuers[0].issuer"
    );
    assert_eq!(
        field(json!({"issuers": [idp(json!({"algorithms": ["ES512"]}))]})),
        "issuers[0].algorithms[0]"
    );
    assert_eq!(
        field(json!({"issuers": [idp(json!({"secret_env": "SET"}))]})),
        "issuers[0]"
    );
    assert_eq!(
        field(json!({"issuers": [idp(json!({"local_jwks": "{}"}))]})),
        "issuers[0].local_jwks"
    );
    assert_eq!(
        field(
            json!({"issuers": [idp(json!({"local_jwks": null, "remote_jwks": {"uri": "http://idp/jwks"}}))]})
        ),
        "issuers[0].remote_jwks.cluster"
    );
    assert_eq!(
        field(json!({"issuers": [idp(json!({})), idp(json!({"issuer": "x"}))]})),
        "issuers[1].name"
    );
    assert_eq!(
        field(json!({"issuers": [idp(json!({})), idp(json!({"name": "b"}))]})),
        "issuers[1].issuer"
    );
    assert_eq!(
        field(json!({"secret_env": "SET", "issuers": [idp(json!({"default": true}))]})),
        "issuers[0].default"
    );
    assert_eq!(field(json!({"audience": "x", "issuers": [idp(json!({}))]})), "");
    assert_eq!(
        field(json!({"issuers": [idp(json!({"claims": {"role": "a..b"}}))]})),
        "issuers[0].claims.role"
    );
}

#[test]
fn cached_tokens_of_a_fetched_key_go_when_the_key_goes() {
    let s: JwtSettings = serde_json::from_value(json!({"issuers": [{
        "name": "idp", "issuer": IDP, "algorithms": ["ES256"],
        "remote_jwks": {"uri": "http://127.0.0.1:8005/jwks", "cluster": "idp"}}]}))
    .unwrap();
    let v = s.compile(&no_env).unwrap();
    let t = sign(Algorithm::Es256, Some("ec-1"), claims(json!({})));
    let mut cache = TokenCache::default();
    assert_eq!(
        cache.verify_with(&v, KeyContext::remote(&[None]), &t, NOW),
        Err(TokenError::KeysUnavailable(0))
    );
    let with_key = KeySet::parse(jwks(&[jwk(Algorithm::Es256, "ec-1", true)]).as_bytes()).unwrap();
    let sets = [Some(std::rc::Rc::new(with_key))];
    assert!(cache.verify_with(&v, KeyContext::remote(&sets), &t, NOW).is_ok());
    assert_eq!(cache.len(), 1);
    // The key is retired: the cached token is not served from the cache any more.
    let rotated = KeySet::parse(jwks(&[jwk(Algorithm::EdDsa, "ed-2", true)]).as_bytes()).unwrap();
    let sets = [Some(std::rc::Rc::new(rotated))];
    assert_eq!(
        cache.verify_with(&v, KeyContext::remote(&sets), &t, NOW),
        Err(TokenError::UnknownKey(0))
    );
    assert!(cache.is_empty());
    // Keys dropped (stale): unavailable, not accepted from the cache.
    let again = [Some(std::rc::Rc::new(
        KeySet::parse(jwks(&[jwk(Algorithm::Es256, "ec-1", true)]).as_bytes()).unwrap(),
    ))];
    assert!(cache.verify_with(&v, KeyContext::remote(&again), &t, NOW).is_ok());
    assert_eq!(
        cache.verify_with(&v, KeyContext::remote(&[None]), &t, NOW),
        Err(TokenError::KeysUnavailable(0))
    );
}

#[test]
fn the_hosts_check_is_authoritative_where_it_applies() {
    let v = verifier(&ALL_PUBLIC);
    // A host that refuses everything: RS256 and ES256 tokens are refused, proving it was asked
    // (with the SPKI, the hash and, for ECDSA, a DER signature); PS256 and EdDSA never reach it.
    let mut asked = Vec::new();
    let mut no = |hash: &str, spki: &[u8], sig: &[u8], _: &[u8]| {
        asked.push((hash.to_string(), spki.first().copied(), sig.first().copied()));
        Some(false)
    };
    for (alg, kid, refused) in [
        (Algorithm::Rs256, "rsa-1", true),
        (Algorithm::Rs512, "rsa-1", true),
        (Algorithm::Es256, "ec-1", true),
        (Algorithm::Es384, "ec384-1", true),
        (Algorithm::Ps256, "rsa-1", false),
        (Algorithm::EdDsa, "ed-1", false),
    ] {
        let t = sign(alg, Some(kid), claims(json!({})));
        let got = v.verify_uncached(
            &t,
            KeyContext {
                remote: &[],
                native: Some(&mut no),
                may_verify: true,
            },
            NOW,
        );
        assert_eq!(got.is_err(), refused, "{alg:?}");
    }
    assert_eq!(
        asked.iter().map(|(h, _, _)| h.as_str()).collect::<Vec<_>>(),
        ["sha256", "sha512", "sha256", "sha384"]
    );
    assert!(
        asked.iter().all(|(_, spki, _)| *spki == Some(0x30)),
        "DER SubjectPublicKeyInfo"
    );
    assert_eq!(asked[2].2, Some(0x30), "ECDSA signatures go to the host as DER");
    // A host without the function (None): the compiled-in code decides.
    let t = sign(Algorithm::Es256, Some("ec-1"), claims(json!({})));
    assert!(v
        .verify_uncached(
            &t,
            KeyContext {
                remote: &[],
                native: Some(&mut |_, _, _, _| None),
                may_verify: true,
            },
            NOW
        )
        .is_ok());
    // Turned off by configuration: never asked.
    let mut off = verifier(&ALL_PUBLIC);
    off.host_verification = false;
    assert!(off
        .verify_uncached(
            &t,
            KeyContext {
                remote: &[],
                native: Some(&mut |_, _, _, _| Some(false)),
                may_verify: true,
            },
            NOW
        )
        .is_ok());
}

#[test]
fn the_probe_needs_a_real_check() {
    assert!(!native::probe::works(&mut |_, _, _, _| None), "no function");
    assert!(
        !native::probe::works(&mut |_, _, _, _| Some(true)),
        "a host that says yes to everything"
    );
    // A host that really checks: the compiled-in RSA code stands in for BoringSSL.
    use base64::Engine as _;
    let n = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(native::probe::MODULUS)
        .unwrap();
    let jwk = serde_json::json!({"kty": "RSA", "n": native::probe::MODULUS, "e": "AQAB"});
    let set = KeySet::parse(serde_json::json!({"keys": [jwk]}).to_string().as_bytes()).unwrap();
    let key = set.keys[0].material.clone();
    let expected = native::spki_rsa(&n, &[1, 0, 1]);
    assert!(native::probe::works(&mut |hash, spki, sig, msg| {
        assert_eq!((hash, spki), ("sha256", expected.as_slice()));
        Some(key.verify(Algorithm::Rs256, msg, sig))
    }));
}

/// The ECDSA twin of an ES256 token: `(r, n - s)` is a second valid signature over the same
/// signing input.
pub(crate) fn es256_twin(token: &str) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine;
    const N: [u8; 32] = [
        0xff, 0xff, 0xff, 0xff, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xbc,
        0xe6, 0xfa, 0xad, 0xa7, 0x17, 0x9e, 0x84, 0xf3, 0xb9, 0xca, 0xc2, 0xfc, 0x63, 0x25, 0x51,
    ];
    let (input, sig) = token.rsplit_once('.').unwrap();
    let mut sig = B64.decode(sig).unwrap();
    let s = sig.split_off(32);
    let mut twin = [0u8; 32];
    let mut borrow = 0i16;
    for i in (0..32).rev() {
        let d = i16::from(N[i]) - i16::from(s[i]) - borrow;
        borrow = i16::from(d < 0);
        twin[i] = (d + if d < 0 { 256 } else { 0 }) as u8;
    }
    sig.extend_from_slice(&twin);
    format!("{input}.{}", B64.encode(sig))
}

#[test]
fn every_encoding_of_one_signed_token_has_one_revocation_id() {
    let v = verifier(&["ES256"]);
    let t = sign(Algorithm::Es256, Some("ec-1"), claims(json!({"jti": "j-1"})));
    let twin = es256_twin(&t);
    assert_ne!(t, twin, "a different token string");
    let (a, b) = (v.verify(&t, NOW).unwrap(), v.verify(&twin, NOW).unwrap());
    assert_eq!(a.revocation_id, b.revocation_id, "revoked together");
    assert_eq!(
        a.revocation_id,
        revocation_id(t.rsplit_once('.').unwrap().0.as_bytes())
    );
    // Another token of the same user has another one.
    let other = sign(Algorithm::Es256, Some("ec-1"), claims(json!({"jti": "j-2"})));
    assert_ne!(v.verify(&other, NOW).unwrap().revocation_id, a.revocation_id);
}

#[test]
fn auth_time_must_be_a_number() {
    let v = verifier(&["ES256"]);
    let t = sign(
        Algorithm::Es256,
        Some("ec-1"),
        claims(json!({"auth_time": NOW - 50})),
    );
    let id = v.verify(&t, NOW).unwrap();
    assert_eq!(
        (id.auth_time, id.authenticated_at()),
        (Some(NOW - 50), Some(NOW - 50))
    );
    let bad = sign(
        Algorithm::Es256,
        Some("ec-1"),
        claims(json!({"auth_time": "yesterday"})),
    );
    assert_eq!(v.verify(&bad, NOW), Err(TokenError::InvalidClaims));
}

/// Finding 12: an EdDSA token without `kid` against a set of 64 keys made the gateway try them
/// all. At most MAX_KEYS_WITHOUT_KID are tried.
#[test]
fn a_token_without_kid_is_checked_against_a_bounded_number_of_keys() {
    let mut keys: Vec<Value> = (0..64)
        .map(|i| jwk(Algorithm::EdDsa, &format!("ed-{i}"), true))
        .collect();
    let set = KeySet::parse(jwks(&keys).as_bytes()).unwrap();
    match set.lookup(Algorithm::EdDsa, None) {
        keys::Lookup::Found(k) => assert_eq!(k.len(), keys::MAX_KEYS_WITHOUT_KID),
        _ => panic!("keys expected"),
    }
    keys.truncate(2);
    let set = KeySet::parse(jwks(&keys).as_bytes()).unwrap();
    assert!(matches!(set.lookup(Algorithm::EdDsa, None), keys::Lookup::Found(k) if k.len() == 2));
}

fn remote_verifier(algorithms: &[&str]) -> Verifier {
    let s: JwtSettings = serde_json::from_value(json!({"issuers": [{
        "name": "idp", "issuer": IDP, "algorithms": algorithms,
        "remote_jwks": {"uri": "http://127.0.0.1:8005/jwks", "cluster": "idp"}}]}))
    .unwrap();
    s.compile(&no_env).unwrap()
}

fn fetched(keys: &[Value]) -> [Option<std::rc::Rc<KeySet>>; 1] {
    [Some(std::rc::Rc::new(
        KeySet::parse(jwks(keys).as_bytes()).unwrap(),
    ))]
}

/// Fourth attack: an identity provider served new material under the same kids and dropped a
/// kid-less key; tokens already in the cache kept passing. A cached token is only as good as
/// the key (material, algorithm, kid) that verified it.
#[test]
fn cached_tokens_die_with_their_key_material_not_their_kid() {
    let v = remote_verifier(&["RS256", "ES256", "EdDSA"]);
    let mut cache = TokenCache::default();
    // New RSA material under the same kid.
    let t = sign(Algorithm::Rs256, Some("r1"), claims(json!({})));
    let before = fetched(&[jwk(Algorithm::Rs256, "r1", true)]);
    assert!(cache
        .verify_with(&v, KeyContext::remote(&before), &t, NOW)
        .is_ok());
    let replaced = fetched(&[other_rsa_jwk("r1")]);
    assert_eq!(
        cache.verify_with(&v, KeyContext::remote(&replaced), &t, NOW),
        Err(TokenError::BadSignature)
    );
    // The kid now names a key of another family.
    assert!(cache
        .verify_with(&v, KeyContext::remote(&before), &t, NOW)
        .is_ok());
    let ec = fetched(&[jwk(Algorithm::Es256, "r1", true)]);
    assert_eq!(
        cache.verify_with(&v, KeyContext::remote(&ec), &t, NOW),
        Err(TokenError::NoFittingKey)
    );
    // A kid-less key dropped: its tokens go with it.
    let mut kidless = jwk(Algorithm::EdDsa, "x", true);
    kidless.as_object_mut().unwrap().remove("kid");
    let t = sign(Algorithm::EdDsa, None, claims(json!({})));
    let with = fetched(&[kidless, jwk(Algorithm::Es256, "e1", true)]);
    assert!(cache.verify_with(&v, KeyContext::remote(&with), &t, NOW).is_ok());
    let without = fetched(&[jwk(Algorithm::Es256, "e1", true)]);
    assert_eq!(
        cache.verify_with(&v, KeyContext::remote(&without), &t, NOW),
        Err(TokenError::NoFittingKey)
    );
    // The same key republished (a refresh): the cached token stays.
    let t = sign(Algorithm::Es256, Some("e1"), claims(json!({})));
    assert!(cache
        .verify_with(&v, KeyContext::remote(&without), &t, NOW)
        .is_ok());
    let again = fetched(&[jwk(Algorithm::Es256, "e1", true)]);
    assert!(cache.verify_with(&v, KeyContext::remote(&again), &t, NOW).is_ok());
}

/// Fourth attack: 64 Ed25519 keys under kid `x` made every bad signature naming `x` cost 64
/// checks. A set keeps MAX_KEYS_PER_KID keys per kid and family, and no repeated key.
#[test]
fn a_set_cannot_crowd_keys_under_one_kid() {
    let keys: Vec<Value> = (0..64).map(|_| jwk(Algorithm::EdDsa, "x", true)).collect();
    let set = KeySet::parse(jwks(&keys).as_bytes()).unwrap();
    assert_eq!(set.keys.len(), 1, "64 copies of one key are one key");
    assert_eq!(set.crowded, 63);
    let mut keys = vec![jwk(Algorithm::Rs256, "x", true), other_rsa_jwk("x")];
    let mut third = other_rsa_jwk("x");
    third["alg"] = "RS256".into();
    keys.push(third);
    keys.push(jwk(Algorithm::Es256, "x", true));
    let set = KeySet::parse(jwks(&keys).as_bytes()).unwrap();
    assert_eq!(set.keys.len(), 3, "two RSA keys under x, and the EC one");
    assert_eq!(set.crowded, 1);
    match set.lookup(Algorithm::Rs256, Some("x")) {
        keys::Lookup::Found(k) => assert_eq!(k.len(), keys::MAX_KEYS_PER_KID),
        _ => panic!("keys expected"),
    }
}

/// A spent budget of failed checks: a cached token still passes, nothing new is checked.
#[test]
fn a_spent_verification_budget_checks_no_signature() {
    let v = remote_verifier(&["ES256"]);
    let mut cache = TokenCache::default();
    let set = fetched(&[jwk(Algorithm::Es256, "e1", true)]);
    let cached = sign(Algorithm::Es256, Some("e1"), claims(json!({})));
    assert!(cache
        .verify_with(&v, KeyContext::remote(&set), &cached, NOW)
        .is_ok());
    let spent = |sets| KeyContext {
        may_verify: false,
        ..KeyContext::remote(sets)
    };
    assert!(cache.verify_with(&v, spent(&set), &cached, NOW).is_ok());
    let fresh = sign(Algorithm::Es256, Some("e1"), claims(json!({"sub": "other"})));
    assert_eq!(
        cache.verify_with(&v, spent(&set), &fresh, NOW),
        Err(TokenError::VerificationBudget)
    );
}
