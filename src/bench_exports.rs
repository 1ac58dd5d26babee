//! Micro-benchmark entry points for measuring the pure decision code inside a real V8 (`node
//! bench/wasm_micro.mjs`), without Envoy. Only in builds with `--features bench-exports`.

use crate::config::Config;
use crate::jwt::TokenCache;

/// Runs the classification and authentication phases `n` times on a fixed request with a
/// cached token; returns a checksum.
#[no_mangle]
pub extern "C" fn gw_bench_decide(n: u32) -> u32 {
    let Ok(cfg) = Config::from_json(
        br#"{"gateway":{"prefix":"/api/v1"},"jwt":{"secret":"bench-secret-bench-secret-bench-secret"},"routes":[{"name":"bench","prefix":"/bench","methods":["GET"],"auth_required":true}]}"#,
    ) else {
        return 0;
    };
    let token = "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAiYmVuY2gtdXNlciIsICJuYW1lIjogImJlbmNoIiwgInJvbGUiOiAidXNlciIsICJpYXQiOiAxNzk5OTkwMDAwLCAiZXhwIjogMTgwMDA4NjQwMH0.rVbekyaGG9jn3-KI4vTUxoFO3RCMggDgZwA3ujQJEno";
    let headers: Vec<(String, Vec<u8>)> = vec![
        (":method".into(), b"GET".to_vec()),
        (":path".into(), b"/api/v1/bench/item?q=1".to_vec()),
        (":authority".into(), b"127.0.0.1:1".to_vec()),
        ("authorization".into(), format!("Bearer {token}").into_bytes()),
        ("user-agent".into(), b"wrk".to_vec()),
    ];
    let mut cache = TokenCache::default();
    let mut sum = 0u32;
    for _ in 0..n {
        let c = crate::policy::classify(&cfg, &headers, &[7u8; 24]);
        if let (Ok(crate::policy::Target::Route(i)), Some(route)) = (&c.target, cfg.routes.first()) {
            let ok = crate::policy::authenticate(
                &cfg,
                &mut cache,
                crate::jwt::KeyContext::remote(&[]),
                route,
                &headers,
                1_800_000_000,
                "",
                false,
            )
            .is_ok();
            sum = sum.wrapping_add(u32::from(ok) + *i as u32);
        }
        sum = sum.wrapping_add(c.trace.trace_id.len() as u32);
    }
    sum
}

/// Verifies one token of `bench/verify_vectors.json` `n` times without the token cache
/// (every call parses, checks the signature and the claims); returns how many verified.
/// `alg`: 0 HS256, 1 RS256, 2 PS256, 3 ES256, 4 ES384, 5 EdDSA.
#[no_mangle]
pub extern "C" fn gw_bench_verify(alg: u32, n: u32) -> u32 {
    let Ok(vectors) = serde_json::from_str::<serde_json::Value>(include_str!("../bench/verify_vectors.json"))
    else {
        return 0;
    };
    let settings = serde_json::json!({
        "secret": "bench-secret-bench-secret-bench-secret",
        "issuers": [{"name": "bench", "issuer": "https://bench.example",
                     "algorithms": ["RS256", "PS256", "ES256", "ES384", "EdDSA"],
                     "local_jwks": vectors.get("jwks")}],
    });
    let Ok(settings) = serde_json::from_value::<crate::jwt::JwtSettings>(settings) else {
        return 0;
    };
    let Ok(verifier) = settings.compile(&|_| None) else {
        return 0;
    };
    let hs = "eyJhbGciOiAiSFMyNTYiLCAidHlwIjogIkpXVCJ9.eyJzdWIiOiAiYmVuY2gtdXNlciIsICJuYW1lIjogImJlbmNoIiwgInJvbGUiOiAidXNlciIsICJpYXQiOiAxNzk5OTkwMDAwLCAiZXhwIjogMTgwMDA4NjQwMH0.rVbekyaGG9jn3-KI4vTUxoFO3RCMggDgZwA3ujQJEno";
    let name = ["HS256", "RS256", "PS256", "ES256", "ES384", "EdDSA"]
        .get(alg as usize)
        .copied()
        .unwrap_or("HS256");
    let token = match name {
        "HS256" => hs.to_string(),
        other => vectors
            .pointer(&format!("/tokens/{other}"))
            .and_then(|t| t.as_str())
            .unwrap_or("")
            .to_string(),
    };
    (0..n)
        .filter(|_| verifier.verify(&token, 1_800_000_000).is_ok())
        .count() as u32
}
