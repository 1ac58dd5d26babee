//! JWKS documents and public-key tokens. The first byte picks the mode:
//! - even: the rest is a JWKS document, parsed (as a fetch answer is) and, when accepted, used
//!   as an issuer's local key set to verify tokens of every algorithm;
//! - odd: the rest is a token for an issuer with RSA, P-256, P-384 and Ed25519 keys (every
//!   algorithm), with and without a host that checks signatures.
//!
//! Also the shared-data records and the host's reply, which other VMs and the host write.
//! Nothing may panic; an accepted token carries header-safe claims.
#![no_main]

use gateway_filter::headers::is_safe_value;
use gateway_filter::jwt::{native, remote, JwtSettings, KeyContext, KeySet, Verifier};
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;
const VECTORS: &str = include_str!("../../bench/verify_vectors.json");

fn verifier(jwks: serde_json::Value) -> Option<Verifier> {
    let settings = serde_json::json!({"issuers": [{
        "name": "fuzz", "issuer": "https://bench.example", "default": true,
        "algorithms": ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "EdDSA"],
        "local_jwks": jwks}]});
    serde_json::from_value::<JwtSettings>(settings)
        .ok()?
        .compile(&|_| None)
        .ok()
}

fn check(v: &Verifier, token: &str) {
    for host in [false, true] {
        let mut says_no = |_: &str, _: &[u8], _: &[u8], _: &[u8]| Some(false);
        let keys = KeyContext {
            remote: &[],
            native: if host { Some(&mut says_no) } else { None },
            may_verify: true,
        };
        let _ = v.verify_uncached(token, keys, NOW);
    }
    if let Ok(id) = v.verify(token, NOW) {
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
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let _ = native::decode_result(rest);
    let _ = remote::Lease::decode(Some(rest));
    let _ = remote::decode_set(rest);
    let Ok(vectors) = serde_json::from_str::<serde_json::Value>(VECTORS) else {
        return;
    };
    if mode % 2 == 0 {
        let Ok(set) = KeySet::parse(rest) else {
            return;
        };
        assert!(!set.keys.is_empty(), "an accepted set has a usable key");
        let Ok(doc) = serde_json::from_slice::<serde_json::Value>(rest) else {
            return;
        };
        if let (Some(v), Some(tokens)) = (verifier(doc), vectors.get("tokens").and_then(|t| t.as_object())) {
            for token in tokens.values().filter_map(|t| t.as_str()) {
                check(&v, token);
            }
        }
    } else if let (Ok(token), Some(v)) = (
        std::str::from_utf8(rest),
        vectors.get("jwks").cloned().and_then(verifier),
    ) {
        check(&v, token);
    }
});
