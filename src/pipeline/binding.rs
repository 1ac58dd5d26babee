//! Sender-constrained tokens in the request path, between authentication and revocation: a
//! DPoP proof checked against the request and remembered (this gateway's shared data, and with
//! a store every gateway's), a certificate-bound token against the client certificate Envoy saw.

use super::*;
use crate::jwt::dpop::{self, ProofRequest, Remembered};
use crate::jwt::{Binding, ProofError, ProofSeen};
use crate::outcome::TokenFault;

/// Tries at a slot whose value another VM changed between our read and write.
const CAS_TRIES: usize = 4;

impl Gateway {
    /// The caller's token binding holds (or it has none): then the revocation check.
    pub(super) fn check_binding(
        &mut self,
        req: &mut Request,
        next: Next,
        coalesce: bool,
        host: &mut dyn Host,
    ) -> Step {
        let Some(caller) = req.caller.as_ref() else {
            return Step::Revocation { next, coalesce };
        };
        match &caller.identity.binding {
            Binding::None => Step::Revocation { next, coalesce },
            Binding::Certificate(expected) => {
                let presented = host.peer_certificate_sha256().and_then(|hex| decode_hex(&hex));
                if presented.as_deref() == Some(expected.as_slice()) {
                    Step::Revocation { next, coalesce }
                } else {
                    refuse(
                        req,
                        Outcome::InvalidToken(TokenFault::Binding),
                        message::CERTIFICATE_MISMATCH,
                    )
                }
            }
            Binding::Dpop(jkt) => {
                let jkt = jkt.clone();
                self.check_proof(req, &jkt, next, coalesce, host)
            }
        }
    }

    fn check_proof(
        &mut self,
        req: &mut Request,
        jkt: &str,
        next: Next,
        coalesce: bool,
        host: &mut dyn Host,
    ) -> Step {
        let config = Rc::clone(&self.config);
        let Some(caller) = req.caller.as_ref() else {
            return refuse(req, Outcome::Internal, message::INTERNAL);
        };
        let Some(issuer) = config
            .verifier
            .as_ref()
            .and_then(|v| v.issuer(caller.identity.issuer))
        else {
            return refuse(req, Outcome::Internal, message::INTERNAL);
        };
        let now = unix_seconds(req.clock_ms);
        let mut proofs = req.headers.iter().filter(|(k, _)| k.eq_ignore_ascii_case("dpop"));
        let proof = match (proofs.next(), proofs.next()) {
            (None, _) => Err(ProofError::Missing),
            (Some(_), Some(_)) => Err(ProofError::Multiple),
            (Some((_, v)), None) => std::str::from_utf8(v).map_err(|_| ProofError::Malformed),
        };
        let method = headers::get_str(&req.headers, ":method").unwrap_or("");
        let htu = dpop::request_htu(&req.headers);
        let checked = proof.and_then(|proof| {
            let htu = htu.as_deref().ok_or(ProofError::Uri)?;
            let request = ProofRequest {
                method,
                htu,
                token: &caller.token,
                jkt,
            };
            with_keys(&[], self.keys.host_verifies, true, host, |keys| {
                dpop::check_proof(&issuer.dpop, issuer.clock_skew, proof, &request, now, keys.native)
            })
        });
        let seen = match checked {
            Ok(seen) => seen,
            Err(e) => return self.proof_refused(req, e),
        };
        let store_checks = config.revocation.is_some() && !host.one_call_per_request();
        let remembered = match self.remember_proof(&seen, now, host) {
            Ok(()) => true,
            Err(Remembered::Replayed) => return self.proof_refused(req, ProofError::Replayed),
            // The store decides alone (a full slot here is no verdict on the proof); without
            // one, a proof that cannot be remembered is not admitted.
            Err(Remembered::Full) if store_checks => false,
            Err(Remembered::Full) => return self.proof_refused(req, ProofError::ReplayCacheFull),
        };
        if !store_checks {
            return Step::Revocation { next, coalesce };
        }
        Step::Call(Outgoing {
            store: Store::Revocation,
            path: dpop::replay_store_path(&seen, now),
            timeout_ms: None,
            purpose: Call::Replay { context: req.ctx },
            stage: Stage::Replay(ReplayWait {
                next,
                coalesce,
                remembered,
            }),
        })
    }

    /// Remembers a proof in this gateway's shared data (a compare-and-swap on its slot).
    fn remember_proof(&mut self, seen: &ProofSeen, now: i64, host: &mut dyn Host) -> Result<(), Remembered> {
        let key = dpop::replay_slot_key(self.limits.slot_seed.hash(&[&seen.replay_key]));
        let store = shared(&self.local, host);
        for _ in 0..CAS_TRIES {
            let (stored, cas) = match store.get(&key) {
                Some((value, cas)) => (Some(value), Some(cas)),
                None => (None, None),
            };
            let value = dpop::remember(stored.as_deref(), seen, now)?;
            // The slots are made at start-up (see `create_replay_slots`), so every write here is
            // a compare-and-swap: two VMs cannot both take one slot's last state.
            match store.set(&key, &value, cas.or(Some(0))) {
                Ok(()) => return Ok(()),
                Err(crate::host::SetError::CasMismatch) => continue,
                Err(crate::host::SetError::Failed) => return Err(Remembered::Full),
            }
        }
        Err(Remembered::Full)
    }

    /// Makes the replay slots when an issuer takes DPoP (empty: Envoy's compare-and-swap needs
    /// an existing key, cas 0 being no check at all).
    pub(super) fn create_replay_slots(&self, store: &dyn SharedStore) {
        if self.config.verifier.as_ref().is_some_and(|v| v.uses_dpop()) {
            for i in 0..u64::from(dpop::REPLAY_SLOTS) {
                let key = dpop::replay_slot_key(i);
                if store.get(&key).is_none() {
                    // One byte, no entry: an empty value may read back as no value.
                    let _ = store.set(&key, &[0], None);
                }
            }
        }
    }

    /// The store's answer to a proof's `SET NX`.
    pub(super) fn replay_answered(
        &mut self,
        req: &mut Request,
        wait: ReplayWait,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) -> Step {
        match rv::parse_set_nx(status, body) {
            Ok(true) => Step::Revocation {
                next: wait.next,
                coalesce: wait.coalesce,
            },
            Ok(false) => self.proof_refused(req, ProofError::Replayed),
            Err(e) => self.replay_store_failed(req, wait, &e, host),
        }
    }

    /// The store could not say whether another gateway saw the proof: denied by default; with
    /// `failure_mode: allow` or `stale`, admitted only if this gateway remembered the proof (a
    /// proof remembered nowhere is never admitted).
    pub(super) fn replay_store_failed(
        &mut self,
        req: &mut Request,
        wait: ReplayWait,
        e: &dyn std::fmt::Display,
        host: &mut dyn Host,
    ) -> Step {
        let id = self.metrics.store_errors;
        self.inc(id);
        req.log(LogLevel::Warn, &format!("DPoP replay check failed: {e}"), host);
        match self.failure_mode() {
            FailureMode::Allow | FailureMode::Stale if wait.remembered => Step::Revocation {
                next: wait.next,
                coalesce: wait.coalesce,
            },
            _ => refuse(req, Outcome::StoreUnavailable, MSG_STORE_DOWN),
        }
    }

    fn proof_refused(&mut self, req: &Request, e: ProofError) -> Step {
        let fault = match e {
            ProofError::Replayed | ProofError::ReplayCacheFull => TokenFault::DpopReplay,
            _ => TokenFault::DpopProof,
        };
        let algorithms = req
            .caller
            .as_ref()
            .and_then(|c| self.config.verifier.as_ref()?.issuer(c.identity.issuer))
            .map(|i| i.dpop.algorithms.clone())
            .unwrap_or_default();
        let mut reply = Reply::refuse(
            Outcome::InvalidToken(fault),
            &message::invalid_proof(e),
            &req.trace.trace_id,
        );
        reply.headers.push((
            policy::HEADER_WWW_AUTHENTICATE,
            policy::dpop_challenge("invalid_dpop_proof", Some(&e.to_string()), &algorithms),
        ));
        Step::Reply(reply)
    }
}

/// Bytes from hex (either case); `None` for anything else.
fn decode_hex(hex: &str) -> Option<Vec<u8>> {
    let hex = hex.as_bytes();
    if hex.len() % 2 != 0 {
        return None;
    }
    hex.chunks_exact(2)
        .map(|pair| {
            let digit = |b: &u8| char::from(*b).to_digit(16);
            let (hi, lo) = (digit(pair.first()?)?, digit(pair.get(1)?)?);
            u8::try_from(hi * 16 + lo).ok()
        })
        .collect()
}
