//! API-gateway policy filter for Envoy (proxy-wasm).
//!
//! Layers, each importing only the ones above it:
//! - leaves: [`error`] (configuration errors), [`headers`], [`webdis`] (the Redis-over-HTTP
//!   codec), [`reply`], [`trace`];
//! - duties, each owning its settings, defaults, validation and compiled form: [`jwt`],
//!   [`revocation`], [`ratelimit`], [`canary`], [`access_log`];
//! - [`config`]: the filter's configuration, composed of the duties' settings, plus the routes;
//! - [`policy`]: the pure decision of each phase; [`host`]: the proxy as a trait;
//! - [`pipeline`]: the orchestrator, running the phases in order through the [`host::Host`];
//! - `filter` (wasm32 only): the glue that implements the host with proxy-wasm calls.
//!
//! Everything but the glue is plain Rust and runs natively under `cargo test`. No `unsafe`
//! outside the glue: the crate denies it, and only `filter` (the proxy-wasm host calls) and
//! `bench_exports` (raw exports for the micro-benchmark) are allowed it.

#![deny(unsafe_code)]

pub mod access_log;
pub mod canary;
pub mod config;
pub mod connlimit;
pub mod error;
pub mod headers;
pub mod host;
pub mod jwt;
pub mod keyspace;
pub mod outcome;
pub mod pipeline;
pub mod policy;
pub mod ratelimit;
pub mod reply;
pub mod revocation;
pub mod stat;
pub mod trace;
pub mod webdis;

#[cfg(target_arch = "wasm32")]
#[allow(unsafe_code)]
mod filter;

/// Micro-benchmark entry points (`node bench/wasm_micro.mjs`); `--features bench-exports` only.
#[cfg(all(target_arch = "wasm32", feature = "bench-exports"))]
#[allow(unsafe_code)]
mod bench_exports;
