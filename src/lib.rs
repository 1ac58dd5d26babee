//! API-gateway policy filter for Envoy (proxy-wasm).
//!
//! Every decision lives in plain Rust modules with no proxy-wasm types ([`config`], [`jwt`],
//! [`trace`], [`policy`], and the gateway-file model in [`gateway`]); they are unit-tested
//! natively. The `filter` module is the thin glue that makes host calls; it is only compiled for
//! `wasm32`.

pub mod access_log;
pub mod canary;
pub mod config;
pub mod gateway;
pub mod jwt;
pub mod policy;
pub mod ratelimit;
pub mod revocation;
pub mod trace;

#[cfg(target_arch = "wasm32")]
mod filter;

/// Micro-benchmark entry points for measuring the pure decision code inside a real V8 (`node
/// bench/wasm_micro.mjs`), without Envoy. Only in builds with `--features bench-exports`.
#[cfg(all(target_arch = "wasm32", feature = "bench-exports"))]
mod bench_exports {
    use crate::config::Config;

    /// Runs `policy::decide` `n` times on a fixed request with a cached token; returns a checksum.
    #[no_mangle]
    pub extern "C" fn gw_bench_decide(n: u32) -> u32 {
        let Ok(cfg) = Config::from_json(
            br#"{"prefix":"/api/v1","jwt":{"secret":"bench-secret-bench-secret-bench-secret"},"routes":[{"name":"bench","prefix":"/bench","methods":["GET"],"auth_required":true}]}"#,
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
        let mut sum = 0u32;
        for _ in 0..n {
            let o = crate::policy::decide(&cfg, &headers, 1_800_000_000, &[7u8; 24]);
            sum = sum.wrapping_add(o.trace.trace_id.len() as u32);
        }
        sum
    }
}
