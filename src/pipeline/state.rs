//! A request's state as the orchestrator keeps it: where it stands, what it waits for, and the
//! callouts out for it or for the VM.

use super::*;

/// What to do once the caller's token is known not to be revoked.
#[derive(Debug)]
pub(super) enum Next {
    Route,
    Endpoint(Endpoint),
}

/// A store write the reply waits for, and what the local instance records once it is confirmed.
#[derive(Debug)]
pub(super) struct Write {
    pub(super) on_ok: Reply,
    pub(super) effect: Effect,
    /// For a revoking write (`SET NX`): the reply when another request revoked the token
    /// first (`None`: the same as `on_ok`).
    pub(super) on_lost: Option<Reply>,
    /// The deciding write (`SET token:revoked:<id> NX`), sent once the first one (the
    /// reference's `token:blacklist:<token>`) is confirmed.
    pub(super) then: Option<String>,
    /// What a replica must hold before the reply, with `revocation.confirm`.
    pub(super) held: rv::Held,
}

#[derive(Debug)]
pub(super) enum Effect {
    /// Cache the token (its revocation id) as revoked.
    Blacklist(String),
    /// Record a ban in the local ban table.
    Ban { user: String, since_s: i64 },
}

/// Where a request stands.
#[derive(Debug)]
pub(super) enum Stage {
    /// Deciding, or forwarded, or answered: nothing outstanding.
    Idle,
    /// Waiting for the issuer's introspection endpoint to read its opaque token.
    Introspect { guarded: Guarded },
    /// Waiting for the store to say whether another gateway saw its DPoP proof.
    Replay(ReplayWait),
    /// Waiting for a revocation lookup (its own, or one it joined).
    Revocation(Next),
    /// Waiting for the store to confirm an endpoint's write.
    Write(Write),
    /// Waiting for a replica to show what the primary said (`revocation.confirm`) before
    /// `reply` goes out. `tries`: read-backs sent so far.
    Confirm(ReadbackWait),
    /// Waiting for signing keys its token needs (a fetch is out, here or in another VM).
    Keys { guarded: Guarded, deadline_ms: u64 },
    /// Waiting for the log store's answer to a query.
    Query {
        label: &'static str,
        id: String,
        limit: u32,
    },
}

/// A request whose DPoP proof the store is asked about.
#[derive(Debug)]
pub(super) struct ReplayWait {
    pub(super) next: Next,
    pub(super) coalesce: bool,
    /// This gateway's shared data remembers the proof (false: its slot was full).
    pub(super) remembered: bool,
}

/// A reply held until a replica shows what the primary said (`revocation.confirm`).
#[derive(Debug)]
pub(super) struct ReadbackWait {
    pub(super) reply: Reply,
    pub(super) check: rv::Readback,
    pub(super) deadline_ms: u64,
    /// Read-backs sent so far.
    pub(super) tries: u32,
}

/// One request's state.
pub(super) struct Request {
    /// Its context id.
    pub(super) ctx: u32,
    pub(super) started_ms: u64,
    /// The last time read from the host for this request (its start, or its resumption).
    pub(super) clock_ms: u64,
    pub(super) trace: TraceContext,
    pub(super) headers: Vec<HeaderPair>,
    /// The route matched (or the one a gateway endpoint sits under).
    pub(super) route: Option<usize>,
    pub(super) caller: Option<Caller>,
    /// The caller's token was found valid and not revoked (the request reached phase 5): only
    /// then does its record count as authenticated in the log store.
    pub(super) cleared: bool,
    /// A route that requires a role, or a gateway endpoint: its record is privileged.
    pub(super) privileged: bool,
    pub(super) client_ip: Option<String>,
    pub(super) stage: Stage,
    /// When its wait for signing keys ends (set at its first wait; 0: the answer is final).
    pub(super) keys_deadline_ms: Option<u64>,
    /// The buckets charged and the binding one's verdict, for the rate-limit response headers.
    pub(super) charged: ratelimit::Charged,
    pub(super) canary: Option<bool>,
    /// How it ended: forwarded, or the outcome of the gateway's own reply.
    pub(super) outcome: Outcome,
    pub(super) status: Option<u16>,
    /// Time from the request headers to the response headers.
    pub(super) elapsed_us: Option<u64>,
}

impl Request {
    /// A log line about this request, naming its context and trace id.
    pub(super) fn log(&self, level: LogLevel, message: &str, host: &mut dyn Host) {
        host.log(
            level,
            &format!("context {} trace {}: {message}", self.ctx, self.trace.trace_id),
        );
    }
}

/// What an outstanding callout is for.
#[derive(Debug)]
pub(super) enum Call {
    /// A revocation lookup: for every request waiting on token `key` (coalesced), or for one
    /// request (`key` = None).
    Lookup {
        key: Option<u64>,
        context: u32,
    },
    Write {
        context: u32,
    },
    /// An opaque token's introspection (the token's hash: the requests waiting for it).
    Introspect {
        hash: String,
        context: u32,
    },
    /// A DPoP proof's `SET NX` in the store.
    Replay {
        context: u32,
    },
    /// A read-back of a revocation from a replica.
    Confirm {
        context: u32,
    },
    Query {
        context: u32,
    },
    /// A log-store write; `then` are the commands to send once it is answered (the trim and
    /// expiry of the list it pushed to: sent after the push, they run after it in Redis, even
    /// though webdis serves calls on several connections in any order).
    LogWrite {
        then: Vec<String>,
    },
    Sync {
        route: String,
        delta: u64,
    },
    /// A JWKS fetch for issuer `issuer`.
    Jwks {
        issuer: usize,
    },
}

/// A revocation lookup in flight, and the requests waiting for it.
pub(super) struct Inflight {
    /// The context that dispatched it; `None` once that context is gone (the answer will not
    /// come: the next tick dispatches again for the waiters).
    pub(super) owner: Option<u32>,
    pub(super) user: Option<String>,
    pub(super) token: String,
    pub(super) revocation_id: String,
    pub(super) waiters: Vec<u32>,
}
