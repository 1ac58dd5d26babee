//! Any string as a bearer token: verified by every configured algorithm, through the cache, at
//! a fixed time. Must never panic; a token the verifier accepts must carry header-safe claims.
//! The same string as a DPoP proof, as an introspection answer and as a request URI: never a
//! panic, and a proof is never accepted (the fuzzer cannot sign with the key it names).
#![no_main]

use gateway_filter::headers::is_safe_value;
use gateway_filter::jwt::{Algorithm, TokenCache, Verifier};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let Ok(token) = std::str::from_utf8(data) else {
        return;
    };
    let v = Verifier::new(
        &[Algorithm::Hs256, Algorithm::Hs384, Algorithm::Hs512],
        b"fuzz-secret-fuzz-secret-fuzz-secret",
        Some("iss".into()),
        None,
        60,
    );
    let dpop = gateway_filter::jwt::DpopSettings::default().compile();
    if let Ok(dpop) = &dpop {
        let request = gateway_filter::jwt::dpop::ProofRequest {
            method: "GET",
            htu: "https://gw/a",
            token: "t",
            jkt: "k",
        };
        let checked = gateway_filter::jwt::dpop::check_proof(dpop, 60, token, &request, NOW, None);
        assert!(checked.is_err(), "no proof passes without a matching thumbprint");
    }
    let _ = gateway_filter::jwt::dpop::normalize_uri(token);
    let _ = gateway_filter::jwt::introspection::parse_answer(Some(200), data);
    let mut cache = TokenCache::default();
    let first = cache.verify(&v, token, NOW);
    let again = cache.verify(&v, token, NOW);
    assert_eq!(first, again, "the cache answers as the verifier did");
    if let Ok(id) = first {
        for claim in [
            id.user_id.as_deref(),
            id.user_name.as_deref(),
            Some(id.role_header().as_str()),
        ]
        .into_iter()
        .flatten()
        {
            assert!(is_safe_value(claim));
        }
        for role in &id.roles {
            assert!(!role.contains(','), "a role cannot forge another in X-User-Role");
        }
    }
    let _ = v.verify(token, i64::MAX);
    let _ = v.verify(token, i64::MIN);
});
