use super::*;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use sha2::Sha256;

pub const SECRET: &[u8] = b"unit-test-secret-unit-test-secret";
const NOW: i64 = 1_800_000_000;

/// Builds a token by hand, independently of jwt-compact, so hostile shapes are possible.
pub fn forge(header: &str, payload: &str, secret: &[u8]) -> String {
    let signing_input = format!("{}.{}", B64.encode(header), B64.encode(payload));
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).unwrap();
    mac.update(signing_input.as_bytes());
    format!("{signing_input}.{}", B64.encode(mac.finalize().into_bytes()))
}

fn hs256(payload: serde_json::Value) -> String {
    forge(r#"{"alg":"HS256","typ":"JWT"}"#, &payload.to_string(), SECRET)
}

fn verifier() -> Verifier {
    Verifier::new(&[Algorithm::Hs256], SECRET, None, None, 60)
}

#[test]
fn valid_token_yields_identity() {
    let t = hs256(
        serde_json::json!({"sub": "user-001", "name": "admin", "role": "admin", "exp": NOW + 1800, "iat": NOW, "jti": "j1"}),
    );
    let id = verifier().verify(&t, NOW).unwrap();
    assert_eq!(id.user_id.as_deref(), Some("user-001"));
    assert_eq!(id.user_name.as_deref(), Some("admin"));
    assert_eq!(id.roles, ["admin"]);
    assert_eq!(id.jti.as_deref(), Some("j1"));
    assert_eq!(id.expires_at, NOW + 1800);
    assert_eq!(id.issued_at, Some(NOW));
}

#[test]
fn role_defaults_to_user() {
    let t = hs256(serde_json::json!({"sub": "u", "exp": NOW + 10}));
    assert_eq!(verifier().verify(&t, NOW).unwrap().roles, ["user"]);
}

#[test]
fn hostile_tokens_are_refused_with_a_reason() {
    let v = verifier();
    let exp = NOW + 100;
    let good = hs256(serde_json::json!({"sub": "u", "exp": exp}));
    let truncated = &good[..good.len() - 3];
    let cases: Vec<(&str, String, TokenError)> = vec![
        ("garbage", "garbage".into(), TokenError::Malformed),
        ("empty", "".into(), TokenError::Malformed),
        ("bad base64", "a$b.c$d.e$f".into(), TokenError::Malformed),
        (
            "payload not an object",
            forge(r#"{"alg":"HS256"}"#, "[1,2]", SECRET),
            TokenError::InvalidClaims,
        ),
        (
            "payload not json",
            forge(r#"{"alg":"HS256"}"#, "not json", SECRET),
            TokenError::Malformed,
        ),
        (
            "header not json",
            forge("nope", r#"{"exp":1}"#, SECRET),
            TokenError::Malformed,
        ),
        (
            "unknown critical extension",
            forge(
                r#"{"alg":"HS256","crit":["exp-ext"],"exp-ext":1}"#,
                &format!(r#"{{"exp":{exp}}}"#),
                SECRET,
            ),
            TokenError::CriticalHeader,
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                B64.encode(r#"{"alg":"none"}"#),
                B64.encode(format!(r#"{{"exp":{exp}}}"#))
            ),
            TokenError::AlgorithmNotAllowed,
        ),
        (
            "RS256 header, HMAC signature",
            forge(r#"{"alg":"RS256"}"#, &format!(r#"{{"exp":{exp}}}"#), SECRET),
            TokenError::AlgorithmNotAllowed,
        ),
        (
            "HS512 not configured",
            forge(r#"{"alg":"HS512"}"#, &format!(r#"{{"exp":{exp}}}"#), SECRET),
            TokenError::AlgorithmNotAllowed,
        ),
        (
            "wrong secret",
            forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"exp":{exp}}}"#), b"other"),
            TokenError::BadSignature,
        ),
        (
            "truncated signature",
            truncated.to_string(),
            TokenError::BadSignature,
        ),
        (
            "expired beyond skew",
            hs256(serde_json::json!({"exp": NOW - 61})),
            TokenError::Expired,
        ),
        (
            "nbf beyond skew",
            hs256(serde_json::json!({"exp": exp, "nbf": NOW + 61})),
            TokenError::NotYetValid,
        ),
        (
            "iat in the future",
            hs256(serde_json::json!({"exp": exp, "iat": NOW + 3600})),
            TokenError::IssuedInFuture,
        ),
        (
            "no exp",
            hs256(serde_json::json!({"sub": "u"})),
            TokenError::MissingExpiration,
        ),
        (
            "exp as string",
            hs256(serde_json::json!({"exp": "tomorrow"})),
            TokenError::InvalidClaims,
        ),
        (
            "sub as number",
            hs256(serde_json::json!({"exp": exp, "sub": 42})),
            TokenError::InvalidClaims,
        ),
        (
            "empty sub",
            hs256(serde_json::json!({"exp": exp, "sub": ""})),
            TokenError::InvalidClaims,
        ),
        (
            "huge exp",
            hs256(serde_json::json!({"exp": 1e300})),
            TokenError::InvalidClaims,
        ),
        (
            "CRLF in name",
            hs256(serde_json::json!({"exp": exp, "name": "a\r\nX-User-Role: admin"})),
            TokenError::UnsafeClaim("name"),
        ),
        (
            "NUL in sub",
            hs256(serde_json::json!({"exp": exp, "sub": "a\u{0}"})),
            TokenError::UnsafeClaim("sub"),
        ),
        ("32 KB token", "a".repeat(32 * 1024), TokenError::TooLarge),
        (
            "a payload over 16 KiB",
            hs256(serde_json::json!({"exp": exp, "pad": "x".repeat(16 * 1024)})),
            TokenError::PayloadTooLarge,
        ),
        (
            "duplicate role: the last one would win in serde_json, the first in others",
            forge(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"exp":{exp},"role":"user","role":"admin"}}"#),
                SECRET,
            ),
            TokenError::DuplicateKey,
        ),
        (
            "the same key spelled with an escape",
            forge(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"exp":{exp},"sub":"a","s\u0075b":"b"}}"#),
                SECRET,
            ),
            TokenError::DuplicateKey,
        ),
        (
            "duplicate exp",
            forge(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"exp":{exp},"exp":{}}}"#, exp + 9999),
                SECRET,
            ),
            TokenError::DuplicateKey,
        ),
        (
            "duplicate key deep inside",
            forge(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"exp":{exp},"realm_access":{{"roles":[],"roles":["admin"]}}}}"#),
                SECRET,
            ),
            TokenError::DuplicateKey,
        ),
        (
            "duplicate header key",
            forge(
                r#"{"alg":"HS256","alg":"none"}"#,
                &format!(r#"{{"exp":{exp}}}"#),
                SECRET,
            ),
            TokenError::DuplicateKey,
        ),
        (
            "nested 40 deep",
            forge(
                r#"{"alg":"HS256"}"#,
                &format!(r#"{{"exp":{exp},"x":{}1{}}}"#, "[".repeat(40), "]".repeat(40)),
                SECRET,
            ),
            TokenError::TooDeep,
        ),
        (
            "crit: null",
            forge(
                r#"{"alg":"HS256","crit":null}"#,
                &format!(r#"{{"exp":{exp}}}"#),
                SECRET,
            ),
            TokenError::CriticalHeader,
        ),
        (
            "crit: []",
            forge(
                r#"{"alg":"HS256","crit":[]}"#,
                &format!(r#"{{"exp":{exp}}}"#),
                SECRET,
            ),
            TokenError::CriticalHeader,
        ),
        (
            "a DPoP proof",
            forge(
                r#"{"alg":"HS256","typ":"dpop+jwt"}"#,
                &format!(r#"{{"exp":{exp}}}"#),
                SECRET,
            ),
            TokenError::WrongType,
        ),
        (
            "a back-channel logout token",
            forge(
                r#"{"alg":"HS256","typ":"logout+jwt"}"#,
                &format!(r#"{{"exp":{exp}}}"#),
                SECRET,
            ),
            TokenError::WrongType,
        ),
        (
            "a token bound to a key by cnf.jwk (not checked here)",
            hs256(serde_json::json!({"exp": exp, "cnf": {"jwk": {"kty": "EC"}}})),
            TokenError::BoundToken("bound to a key (cnf) in a way this gateway cannot check"),
        ),
        (
            "a DPoP-bound token of an issuer whose dpop is off",
            hs256(
                serde_json::json!({"exp": exp, "cnf": {"jkt": "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}}),
            ),
            TokenError::BoundToken("DPoP-bound (cnf jkt, RFC 9449) and its issuer's dpop is off"),
        ),
        (
            "65 roles",
            hs256(
                serde_json::json!({"exp": exp, "role": (0..65).map(|i| format!("r{i}")).collect::<Vec<_>>()}),
            ),
            TokenError::TooManyValues("role"),
        ),
    ];
    for (what, token, expected) in cases {
        assert_eq!(v.verify(&token, NOW), Err(expected), "{what}");
    }
}

#[test]
fn cached_tokens_still_expire_and_stay_bounded() {
    let v = Verifier::new(&[Algorithm::Hs256], SECRET, None, None, 0);
    let mut c = TokenCache::default();
    let t = hs256(serde_json::json!({"sub": "u", "exp": NOW + 10, "nbf": NOW - 5}));
    assert!(c.verify(&v, &t, NOW).is_ok());
    assert_eq!(c.len(), 1);
    assert!(c.verify(&v, &t, NOW).is_ok(), "served from the cache");
    assert_eq!(
        c.verify(&v, &t, NOW + 11),
        Err(TokenError::Expired),
        "time checks run on hits"
    );
    assert!(c.verify(&v, &t, NOW).is_ok());
    assert_eq!(c.verify(&v, &t, NOW - 6), Err(TokenError::NotYetValid));
    // A tampered copy never matches a cached entry.
    let mut tampered = t.clone();
    tampered.push('A');
    assert!(c.verify(&v, &tampered, NOW).is_err());
    for i in 0..(TOKEN_CACHE_ENTRIES + 50) {
        let t = hs256(serde_json::json!({"sub": format!("u{i}"), "exp": NOW + 10}));
        assert!(c.verify(&v, &t, NOW).is_ok());
    }
    assert!(c.len() <= TOKEN_CACHE_ENTRIES);
}

#[test]
fn skew_is_honoured_on_both_sides() {
    let v = verifier();
    assert!(v
        .verify(&hs256(serde_json::json!({"exp": NOW - 59})), NOW)
        .is_ok());
    assert!(v
        .verify(&hs256(serde_json::json!({"exp": NOW + 10, "nbf": NOW + 59})), NOW)
        .is_ok());
    assert!(v
        .verify(&hs256(serde_json::json!({"exp": NOW + 10, "iat": NOW + 59})), NOW)
        .is_ok());
    let strict = Verifier::new(&[Algorithm::Hs256], SECRET, None, None, 0);
    assert_eq!(
        strict.verify(&hs256(serde_json::json!({"exp": NOW - 1})), NOW),
        Err(TokenError::Expired)
    );
}

#[test]
fn issuer_and_audience() {
    let v = Verifier::new(
        &[Algorithm::Hs256],
        SECRET,
        Some("gw".into()),
        Some("api".into()),
        60,
    );
    let ok = hs256(serde_json::json!({"exp": NOW + 10, "iss": "gw", "aud": ["x", "api"]}));
    assert!(v.verify(&ok, NOW).is_ok());
    let ok_single = hs256(serde_json::json!({"exp": NOW + 10, "iss": "gw", "aud": "api"}));
    assert!(v.verify(&ok_single, NOW).is_ok());
    let bad_iss = hs256(serde_json::json!({"exp": NOW + 10, "iss": "other", "aud": "api"}));
    assert_eq!(v.verify(&bad_iss, NOW), Err(TokenError::WrongIssuer));
    let no_aud = hs256(serde_json::json!({"exp": NOW + 10, "iss": "gw"}));
    assert_eq!(v.verify(&no_aud, NOW), Err(TokenError::WrongAudience));
}

#[test]
fn issued_tokens_verify_and_keep_the_identity() {
    let v = Verifier::new(
        &[Algorithm::Hs256],
        SECRET,
        Some("gw".into()),
        Some("api".into()),
        0,
    );
    let old = Identity {
        user_id: Some("user-001".into()),
        user_name: Some("admin".into()),
        roles: vec!["admin".into()],
        scopes: Vec::new(),
        jti: Some("old".into()),
        expires_at: NOW + 5,
        issued_at: Some(NOW - 100),
        auth_time: None,
        issuer: 0,
        revocation_id: String::new(),
        binding: Binding::None,
    };
    let t = v.issue(&old, NOW, 1800, "new-jti").unwrap();
    let id = v.verify(&t, NOW).unwrap();
    assert_eq!(id.user_id, old.user_id);
    assert_eq!(id.user_name, old.user_name);
    assert_eq!(id.roles, ["admin"]);
    assert_eq!(id.jti.as_deref(), Some("new-jti"));
    assert_eq!((id.issued_at, id.expires_at), (Some(NOW), NOW + 1800));
    // The lineage keeps the first authentication time through any number of refreshes.
    assert_eq!(id.auth_time, Some(NOW - 100));
    assert_eq!(id.authenticated_at(), Some(NOW - 100));
    let again = v
        .verify(&v.issue(&id, NOW + 10, 1800, "third").unwrap(), NOW + 10)
        .unwrap();
    assert_eq!(again.authenticated_at(), Some(NOW - 100));
    let signing_input = t.rsplit_once('.').unwrap().0;
    assert_eq!(id.revocation_id, revocation_id(signing_input.as_bytes()));
    assert_eq!(id.revocation_id.len(), 43);
}

#[test]
fn hs384_and_hs512_when_configured() {
    let v = Verifier::new(&[Algorithm::Hs384, Algorithm::Hs512], SECRET, None, None, 60);
    let key = jwt_compact::alg::Hs512Key::new(SECRET);
    let mut claims = Claims::new(serde_json::json!({"sub": "u"}));
    claims.expiration = chrono::DateTime::from_timestamp(NOW + 10, 0);
    let t512 = Hs512.token(&jwt_compact::Header::empty(), &claims, &key).unwrap();
    assert_eq!(v.verify(&t512, NOW).unwrap().user_id.as_deref(), Some("u"));
    assert_eq!(
        v.verify(&hs256(serde_json::json!({"exp": NOW + 10})), NOW),
        Err(TokenError::AlgorithmNotAllowed)
    );
}

/// A verifier whose secret's issuer maps claims as `claims` says (the gateway file's form).
fn mapped(claims: serde_json::Value) -> Verifier {
    let s: JwtSettings = serde_json::from_value(serde_json::json!({
        "secret": String::from_utf8(SECRET.to_vec()).unwrap(), "claims": claims}))
    .unwrap();
    s.compile(&|_| None).unwrap()
}

#[test]
fn keycloak_realm_and_client_roles_are_sets() {
    let exp = NOW + 60;
    let token = hs256(serde_json::json!({
        "exp": exp, "sub": "f3b1c2d4", "preferred_username": "alice", "typ": "Bearer",
        "scope": "openid profile orders:read",
        "realm_access": {"roles": ["offline_access", "default-roles-demo", "admin"]},
        "resource_access": {"my-client": {"roles": ["orders-viewer"]}, "account": {"roles": ["manage-account"]}}}));
    let realm = mapped(serde_json::json!({"user_name": "preferred_username", "role": "realm_access.roles"}));
    let id = realm.verify(&token, NOW).unwrap();
    assert_eq!(id.roles, ["offline_access", "default-roles-demo", "admin"]);
    assert!(id.has_any_role(&["admin".into()]));
    assert_eq!(id.role_header(), "offline_access,default-roles-demo,admin");
    assert_eq!(id.scopes, ["openid", "profile", "orders:read"]);
    assert_eq!(id.user_name.as_deref(), Some("alice"));
    let client = mapped(serde_json::json!({"role": ["resource_access", "my-client", "roles"]}));
    assert_eq!(client.verify(&token, NOW).unwrap().roles, ["orders-viewer"]);
}

#[test]
fn entra_roles_and_scp_string() {
    let token = hs256(serde_json::json!({
        "exp": NOW + 60, "oid": "00000000-0000-0000-0000-000000000001", "name": "Ann",
        "roles": ["Orders.Admin", "Orders.Read"], "scp": "User.Read Orders.Write", "ver": "2.0"}));
    let v = mapped(serde_json::json!({"user_id": "oid", "role": "roles"}));
    let id = v.verify(&token, NOW).unwrap();
    assert_eq!(
        id.user_id.as_deref(),
        Some("00000000-0000-0000-0000-000000000001")
    );
    assert_eq!(id.roles, ["Orders.Admin", "Orders.Read"]);
    assert_eq!(id.scopes, ["User.Read", "Orders.Write"]);
}

#[test]
fn okta_groups_and_scp_list() {
    let token = hs256(serde_json::json!({
        "exp": NOW + 60, "sub": "00u1abcd", "uid": "00u1abcd", "cid": "0oa1client",
        "groups": ["Everyone", "Admins"], "scp": ["openid", "orders:read"]}));
    let v = mapped(serde_json::json!({"role": "groups"}));
    let id = v.verify(&token, NOW).unwrap();
    assert_eq!(id.roles, ["Everyone", "Admins"]);
    assert_eq!(id.scopes, ["openid", "orders:read"]);
}

#[test]
fn auth0_namespaced_roles_and_permissions() {
    let token = hs256(serde_json::json!({
        "exp": NOW + 60, "sub": "auth0|65f0c1", "https://example.com/roles": ["admin", "editor"],
        "https://example.com/email": "a@example.com", "scope": "openid read:orders",
        "permissions": ["read:orders", "write:orders"]}));
    // Split on its dots, the namespaced claim is never found: the default role.
    let dotted = mapped(serde_json::json!({"role": "https://example.com/roles"}));
    assert_eq!(dotted.verify(&token, NOW).unwrap().roles, ["user"]);
    let v = mapped(serde_json::json!({"role": ["https://example.com/roles"], "scopes": "permissions"}));
    let id = v.verify(&token, NOW).unwrap();
    assert_eq!(id.roles, ["admin", "editor"]);
    assert_eq!(id.scopes, ["read:orders", "write:orders"]);
    assert_eq!(id.user_id.as_deref(), Some("auth0|65f0c1"));
}

#[test]
fn space_separated_roles_are_opt_in() {
    let token = hs256(serde_json::json!({"exp": NOW + 60, "role": "viewer admin"}));
    assert_eq!(
        mapped(serde_json::json!({})).verify(&token, NOW).unwrap().roles,
        ["viewer admin"]
    );
    let v = mapped(serde_json::json!({"role_format": "space_separated"}));
    assert_eq!(v.verify(&token, NOW).unwrap().roles, ["viewer", "admin"]);
}

#[test]
fn claim_settings_are_checked_naming_the_field() {
    for (claims, field) in [
        (serde_json::json!({"role": ""}), "claims.role"),
        (serde_json::json!({"role": []}), "claims.role"),
        (serde_json::json!({"user_id": ["a", ""]}), "claims.user_id"),
        (serde_json::json!({"scopes": "a..b"}), "claims.scopes"),
    ] {
        let s: JwtSettings =
            serde_json::from_value(serde_json::json!({"secret": "x", "claims": claims})).unwrap();
        let e = s.compile(&|_| None).err().unwrap();
        assert_eq!(e.field, field, "{e:?}");
    }
    let bad = serde_json::from_value::<JwtSettings>(
        serde_json::json!({"secret": "x", "claims": {"role_format": "csv"}}),
    );
    assert!(bad.is_err());
    for (extra, field) in [
        (serde_json::json!({"types": []}), "types"),
        (serde_json::json!({"max_payload_bytes": 100}), "max_payload_bytes"),
        (serde_json::json!({"scopes_header": "X-Scopes"}), "scopes_header"),
        (
            serde_json::json!({"scopes_header": "X-User-Role"}),
            "scopes_header",
        ),
        (serde_json::json!({"scopes_header": "x-user-id"}), "scopes_header"),
        (
            serde_json::json!({"scopes_header": "X-User-Sc opes"}),
            "scopes_header",
        ),
    ] {
        let mut v = serde_json::json!({"secret": "x"});
        for (k, val) in extra.as_object().unwrap() {
            v[k] = val.clone();
        }
        let s: JwtSettings = serde_json::from_value(v).unwrap();
        assert_eq!(s.compile(&|_| None).err().unwrap().field, field);
    }
}

#[test]
fn explicit_types_are_per_issuer() {
    let s: JwtSettings = serde_json::from_value(serde_json::json!({
        "secret": String::from_utf8(SECRET.to_vec()).unwrap(), "types": ["at+jwt"]}))
    .unwrap();
    let v = s.compile(&|_| None).unwrap();
    let exp = NOW + 60;
    let at = forge(
        r#"{"alg":"HS256","typ":"at+jwt"}"#,
        &format!(r#"{{"exp":{exp}}}"#),
        SECRET,
    );
    assert!(v.verify(&at, NOW).is_ok());
    let plain = forge(r#"{"alg":"HS256"}"#, &format!(r#"{{"exp":{exp}}}"#), SECRET);
    assert_eq!(v.verify(&plain, NOW), Err(TokenError::WrongType));
    let jwt = forge(
        r#"{"alg":"HS256","typ":"JWT"}"#,
        &format!(r#"{{"exp":{exp}}}"#),
        SECRET,
    );
    assert_eq!(v.verify(&jwt, NOW), Err(TokenError::WrongType));
}

#[test]
fn refreshed_tokens_keep_the_claims_where_the_issuer_reads_them() {
    let s: JwtSettings = serde_json::from_value(serde_json::json!({
        "secret": String::from_utf8(SECRET.to_vec()).unwrap(), "types": ["at+jwt"],
        "claims": {"user_id": "oid", "role": ["https://example.com/roles"], "scopes": "scp"}}))
    .unwrap();
    let v = s.compile(&|_| None).unwrap();
    let exp = NOW + 60;
    let original = forge(
        r#"{"alg":"HS256","typ":"at+jwt"}"#,
        &format!(
            r#"{{"exp":{exp},"iat":{NOW},"oid":"o-1","https://example.com/roles":["a","b"],"scp":"x y"}}"#
        ),
        SECRET,
    );
    let id = v.verify(&original, NOW).unwrap();
    let minted = v.issue(&id, NOW, 600, "j2").unwrap();
    let again = v.verify(&minted, NOW).unwrap();
    assert_eq!(
        again.user_id.as_deref(),
        Some("o-1"),
        "a ban still reaches the refreshed token"
    );
    assert_eq!(again.roles, ["a", "b"]);
    assert_eq!(again.scopes, ["x", "y"]);
    // Nested paths are made on the way.
    let mut m = Map::new();
    claims::set(
        &mut m,
        &ClaimPath::named("realm_access.roles"),
        serde_json::json!(["r"]),
    );
    assert_eq!(
        serde_json::Value::Object(m),
        serde_json::json!({"realm_access": {"roles": ["r"]}})
    );
}
