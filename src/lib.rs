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
