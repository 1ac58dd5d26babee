//! The gateway file's model and the Envoy bootstrap it renders into; `main.rs` is the command.
//! A library so the fuzz targets can feed it any text.

// Indexing here is into JSON values this crate builds itself, never into input.
#![allow(clippy::indexing_slicing)]

pub mod envoy;
pub mod gateway;
pub mod located;
