//! The gateway's own endpoints once the caller is cleared: logout, refresh, ban and the log
//! query.

use super::*;

impl Gateway {
    /// A gateway endpoint: query the log store, or write to the revocation store and reply
    /// once the write is confirmed.
    pub(super) fn perform(&mut self, req: &mut Request, endpoint: Endpoint, host: &mut dyn Host) -> Step {
        let query = match &endpoint {
            Endpoint::LogsByTrace(id) => Some(("trace_id", id.clone(), access_log::trace_key(id), u32::MAX)),
            Endpoint::LogsByUser { user_id, limit } => {
                Some(("user_id", user_id.clone(), access_log::user_key(user_id), *limit))
            }
            _ => None,
        };
        match query {
            Some((label, id, key, limit)) => self.query_logs(req, label, id, &key, limit),
            None => self.revoke(req, endpoint, host),
        }
    }

    /// The log query: the whole (bounded) list of a trace or a user, sorted and limited when it
    /// is answered.
    fn query_logs(&mut self, req: &Request, label: &'static str, id: String, key: &str, limit: u32) -> Step {
        let Some(store) = self.config.logs.store.as_ref() else {
            return refuse(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND);
        };
        // Fetch the whole (bounded) list: workers flush independently, so list order is flush
        // order; the reply is sorted by request time before the limit applies.
        Step::Call(Outgoing {
            store: Store::Logs,
            path: access_log::range_path(key, store.user_records.max(100)),
            timeout_ms: None,
            purpose: Call::Query { context: req.ctx },
            stage: Stage::Query { label, id, limit },
        })
    }

    /// The log store could not answer a query (`line` says why): 503.
    pub(super) fn query_failed(&mut self, req: &Request, line: &str, host: &mut dyn Host) -> Step {
        let id = self.metrics.log_errors;
        self.inc(id);
        req.log(LogLevel::Warn, line, host);
        refuse(req, Outcome::StoreUnavailable, message::LOG_STORE_DOWN)
    }

    /// Logout, refresh or ban: the writes, replied once the store confirmed them.
    fn revoke(&mut self, req: &mut Request, endpoint: Endpoint, host: &mut dyn Host) -> Step {
        let config = Rc::clone(&self.config);
        let trace_id = req.trace.trace_id.clone();
        let (Some(rv), Some(caller)) = (config.revocation.as_ref(), req.caller.clone()) else {
            return refuse(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND);
        };
        let now_ms = req.clock_ms;
        let now_s = unix_seconds(now_ms);
        // Blacklisted for as long as any check would accept the token: until `exp` plus the
        // clock skew the verifier allows.
        let skew = config
            .verifier
            .as_ref()
            .map_or(0, |v| v.clock_skew(caller.identity.issuer));
        let keep = caller
            .identity
            .expires_at
            .saturating_add(skew)
            .saturating_sub(now_s)
            .saturating_add(1);
        let (path, write) = match endpoint {
            Endpoint::LogsByTrace(_) | Endpoint::LogsByUser { .. } => {
                return refuse(req, Outcome::NotFound, policy::MSG_ROUTE_NOT_FOUND);
            }
            Endpoint::Logout => (
                rv::blacklist_path(&caller.token, keep),
                Write {
                    on_ok: Reply::ok(&serde_json::json!({"message": message::LOGGED_OUT}), &trace_id),
                    effect: Effect::Blacklist(caller.identity.revocation_id.clone()),
                    on_lost: None,
                    then: Some(rv::revoke_path(&caller.identity.revocation_id, keep)),
                    held: rv::Held {
                        keys: vec![
                            rv::blacklist_key(&caller.token),
                            rv::revoked_key(&caller.identity.revocation_id),
                        ],
                        at_least: None,
                    },
                },
            ),
            Endpoint::Refresh { ttl_seconds } => {
                // An opaque token is the provider's: refreshing it into a gateway JWT would let
                // it outlive the provider's revocation of the session.
                let own = !crate::jwt::introspection::is_opaque(&caller.token)
                    && config
                        .verifier
                        .as_ref()
                        .is_some_and(|v| v.can_issue(caller.identity.issuer));
                if !own {
                    let name = config
                        .verifier
                        .as_ref()
                        .and_then(|v| v.issuer(caller.identity.issuer))
                        .map_or("?", |i| i.name.as_str());
                    return refuse(req, Outcome::BadRequest, &message::refreshed_elsewhere(name));
                }
                let jti = uuid_v4(self.rng.u128(..).to_le_bytes());
                let issued = config
                    .verifier
                    .as_ref()
                    .ok_or_else(|| "no verifier".to_string())
                    .and_then(|v| v.issue(&caller.identity, now_s, ttl_seconds, &jti));
                let new_token = match issued {
                    Ok(t) => t,
                    Err(e) => {
                        req.log(LogLevel::Error, &format!("cannot issue a token: {e}"), host);
                        return refuse(req, Outcome::Internal, message::INTERNAL);
                    }
                };
                (
                    rv::blacklist_path(&caller.token, keep),
                    Write {
                        on_ok: Reply::ok(
                            // RFC 9449 5: a DPoP-bound token's type is DPoP.
                            &serde_json::json!({"access_token": new_token, "token_type":
                                if matches!(caller.identity.binding, crate::jwt::Binding::Dpop(_)) { "DPoP" } else { "bearer" }}),
                            &trace_id,
                        ),
                        effect: Effect::Blacklist(caller.identity.revocation_id.clone()),
                        // A concurrent refresh of the same token (or of a twin) won: this one
                        // mints nothing.
                        on_lost: Some(Reply::refuse(Outcome::Revoked, MSG_REVOKED, &trace_id)),
                        then: Some(rv::revoke_path(&caller.identity.revocation_id, keep)),
                        held: rv::Held {
                            keys: vec![
                                rv::blacklist_key(&caller.token),
                                rv::revoked_key(&caller.identity.revocation_id),
                            ],
                            at_least: None,
                        },
                    },
                )
            }
            Endpoint::RevokeUser(user) => {
                let ttl = i64::try_from(rv.ban_ttl_seconds).unwrap_or(i64::MAX);
                (
                    rv::setex_path(&rv::ban_key(&user), ttl, &now_s.to_string()),
                    Write {
                        on_ok: Reply::ok(
                            &serde_json::json!({
                                "message": message::user_revoked(&user),
                                "user_id": user,
                                "revoked_before": now_s,
                            }),
                            &trace_id,
                        ),
                        held: rv::Held {
                            keys: vec![rv::ban_key(&user)],
                            at_least: Some(now_s),
                        },
                        effect: Effect::Ban { user, since_s: now_s },
                        on_lost: None,
                        then: None,
                    },
                )
            }
        };
        Step::store_write(req, write, path)
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn query_answered(
        &mut self,
        req: &mut Request,
        label: &str,
        id: &str,
        limit: u32,
        status: Option<u16>,
        body: &[u8],
        host: &mut dyn Host,
    ) -> Step {
        match access_log::parse_range(status, body) {
            Ok(records) if records.is_empty() => refuse(req, Outcome::NotFound, message::NO_RECORDS),
            Ok(mut records) => {
                access_log::newest_first(&mut records);
                records.truncate(limit as usize);
                let body = serde_json::json!({ label: id, "count": records.len(), "records": records });
                Step::Reply(Reply::ok(&body, &req.trace.trace_id))
            }
            Err(e) => self.query_failed(req, &format!("log store query failed: {e}"), host),
        }
    }
}
