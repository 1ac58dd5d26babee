//! JWT verification: parse, pick the issuer by `iss`, check the algorithm against that issuer's
//! allow-list, pick the key (by `kid`, of the algorithm's kind), verify the signature, then check
//! `exp` (required), `nbf`, `iat` and `aud` against an injected clock and map the claims to the
//! caller's identity. This duty owns its settings (`jwt:` in the gateway file), their defaults
//! and validation, and the compiled [`Verifier`]; keys are built once at configure time (or, for
//! a fetched JWKS, once per fetch: see [`remote`]). Verified tokens are remembered in a per-VM
//! [`TokenCache`], runtime state kept apart from the settings.

#[cfg(test)]
pub(crate) mod issuer_tests;
pub mod keys;
pub mod native;
pub mod remote;
#[cfg(test)]
pub(crate) mod testkeys;

use std::collections::HashMap;
use std::fmt;
use std::rc::Rc;

use jwt_compact::alg::{Hs256, Hs384, Hs512};
use jwt_compact::{AlgorithmExt, Claims, UntrustedToken};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use keys::{Algorithm, Key, KeyFingerprint, KeySet, Lookup, Material};
pub use remote::{Remote, RemoteJwksSettings};

use crate::error::{check_name, ConfigError};
use crate::headers::is_safe_value as is_safe_header_value;

mod cache;
pub mod claims;
pub mod dpop;
pub mod introspection;
mod mint;
mod settings;
mod token;
mod verify;

pub use cache::*;
pub use claims::{Binding, ClaimPath, RoleFormat, Types};
pub use dpop::{Dpop, DpopMode, DpopSettings, ProofError, ProofSeen};
pub use introspection::{Introspection, IntrospectionSettings};
pub use settings::*;
pub use token::*;
pub use verify::*;

#[cfg(test)]
pub(crate) mod tests;
