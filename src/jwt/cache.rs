//! The per-VM cache of verified tokens, and the key context verification reads (fetched
//! sets, the host's signature check).

use super::*;

/// The key sets of issuers whose keys are fetched, by issuer index (`None`: none yet). Runtime
/// state of a VM, shared with the verifier on each call.
pub type RemoteSets = [Option<Rc<KeySet>>];

/// What verification needs besides the token and the configuration: the VM's fetched key sets,
/// and the host's signature check when it has one.
pub struct KeyContext<'a> {
    pub remote: &'a RemoteSets,
    pub native: Option<native::NativeVerify<'a>>,
    /// Whether a signature may be checked for this caller (false: its budget of failed checks
    /// is spent, and only a token the cache holds passes).
    pub may_verify: bool,
}

impl<'a> KeyContext<'a> {
    pub fn remote(remote: &'a RemoteSets) -> Self {
        Self {
            remote,
            native: None,
            may_verify: true,
        }
    }
}

/// Tokens whose signature and claims were verified, with what the time checks need; a hit skips
/// the signature check and the JSON parsing (the time checks run again on every use, and a
/// fetched key must still be published). One per VM, bounded. Entries are keyed by a 128-bit
/// keyed hash of the token (two SipHash-1-3 with this VM's random keys), not the token: an
/// identity-provider token is often over 1 KB, and nobody without the keys can aim a forged
/// token at a cached one's key.
#[derive(Debug, Default)]
pub struct TokenCache {
    pub(super) entries: HashMap<u128, Verified>,
    pub(super) keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
}

impl TokenCache {
    pub(super) fn key(&self, token: &str) -> u128 {
        use std::hash::BuildHasher as _;
        (u128::from(self.keys.0.hash_one(token)) << 64) | u128::from(self.keys.1.hash_one(token))
    }

    /// Whether `token` is in the cache (it would pass or fail without a signature check).
    pub fn holds(&self, token: &str) -> bool {
        token.len() <= MAX_TOKEN_LEN && self.entries.contains_key(&self.key(token))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Verifies `token` at `now` through the cache.
    pub fn verify(&mut self, verifier: &Verifier, token: &str, now: i64) -> Result<Identity, TokenError> {
        self.verify_with(verifier, KeyContext::remote(&[]), token, now)
    }

    /// Verifies `token` at `now` through the cache, with the VM's fetched key sets.
    pub fn verify_with(
        &mut self,
        verifier: &Verifier,
        keys: KeyContext<'_>,
        token: &str,
        now: i64,
    ) -> Result<Identity, TokenError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(TokenError::TooLarge);
        }
        let key = self.key(token);
        if let Some(v) = self.entries.get(&key) {
            let checked = verifier.recheck(v, keys.remote, now);
            return match checked {
                Ok(()) => Ok(v.identity.clone()),
                Err(e) => {
                    self.entries.remove(&key);
                    if matches!(e, TokenError::UnknownKey(_) | TokenError::KeysUnavailable(_)) {
                        // The key left the set: verify afresh (which reports the same, or
                        // finds the key under a new set).
                        return self.verify_with(verifier, keys, token, now);
                    }
                    Err(e)
                }
            };
        }
        if !keys.may_verify {
            return Err(TokenError::VerificationBudget);
        }
        let verified = verifier.verify_uncached(token, keys, now)?;
        let identity = verified.identity.clone();
        if self.entries.len() >= TOKEN_CACHE_ENTRIES {
            // Bounded: drop an arbitrary entry (HashMap order), never grow.
            if let Some(k) = self.entries.keys().next().copied() {
                self.entries.remove(&k);
            }
        }
        self.entries.insert(key, verified);
        Ok(identity)
    }
}

#[derive(Debug, Clone)]
pub struct Verified {
    pub(super) identity: Identity,
    pub(super) not_before: Option<i64>,
    /// The key that checked it.
    pub(super) key: KeyFingerprint,
}

/// Verified tokens remembered per VM.
pub const TOKEN_CACHE_ENTRIES: usize = 1024;
