//! Token buckets in proxy-wasm shared data, exact across workers: bucket arithmetic with an
//! injected clock, a fixed-size encoding, and a bounded compare-and-swap loop over a
//! [`SharedStore`] (the host implements it with shared data; tests with a map).
//!
//! Memory is bounded by construction: route buckets have one key each; per-user and per-IP
//! buckets live in a fixed number of slot keys created at configure time (so every update is a
//! CAS on an existing key: shared data creates missing keys unconditionally). The slot of a
//! client is a keyed hash ([`SlotSeed`]), so clients cannot choose it. A per-user slot holds
//! one user's bucket, tagged with a fingerprint; a user hashing to a slot held by another takes
//! it over with a full bucket (eviction: the previous user starts afresh when it returns). A
//! per-IP slot is one bucket shared by the addresses that hash to it.
//!
//! This duty owns its settings (`gateway.rate_limit` and `routes[].rate_limit` in the gateway
//! file), their defaults and validation, and their compiled form ([`RateLimits`], [`RouteLimits`]).

use std::hash::{Hash, Hasher};

use serde::{Deserialize, Serialize};

use crate::error::{check_range, seconds_to_ms, ConfigError};
use crate::reply::Reply;

mod bucket;
mod budget;
mod client;
pub mod cluster;
pub mod lease;
mod settings;
mod slots;
mod store;

pub use bucket::*;
pub use budget::*;
pub use client::*;
pub use settings::*;
pub use slots::*;
pub use store::*;

#[cfg(test)]
mod tests;
