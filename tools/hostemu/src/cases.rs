//! The cases every host runs: configuration, a table of single requests, and the ones that take
//! several steps (a valid token, a forged header, one token twice, a logout), then the
//! invariants.

use super::*;

pub(crate) const CLEAN: &str = r#"{"MGET":[null,null,null]}"#;
pub(crate) const BLACKLISTED: &str = r#"{"MGET":["1",null,null]}"#;
pub(crate) fn token(sub: &str, jti: &str) -> String {
    let now = 1_800_000_000i64;
    signed(
        serde_json::json!({"sub": sub, "name": "n", "role": "user", "iat": now - 10, "exp": now + 600, "jti": jti}),
    )
}
/// A Keycloak-shaped token: its roles in `realm_access.roles`, admin (when given) the third.
pub(crate) fn keycloak_token(sub: &str, roles: &[&str], scope: &str) -> String {
    let now = 1_800_000_000i64;
    signed(
        serde_json::json!({"sub": sub, "preferred_username": sub, "iat": now - 10, "exp": now + 600,
                              "scope": scope, "realm_access": {"roles": roles}}),
    )
}
pub(crate) fn signed(claims: serde_json::Value) -> String {
    let header = B64.encode(r#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = B64.encode(claims.to_string());
    let input = format!("{header}.{payload}");
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()) else {
        return String::new();
    };
    mac.update(input.as_bytes());
    format!("{input}.{}", B64.encode(mac.finalize().into_bytes()))
}
pub(crate) fn config() -> String {
    serde_json::json!({
        "gateway": {"prefix": "/api/v1", "name": "hostemu"},
        "webdis_cluster": "127.0.0.1:7379",
        "jwt": {"secret": SECRET, "claims": {"role": "realm_access.roles"}, "dpop": "allowed",
                "issuers": [{"name": "idp", "issuer": "https://idp.example.com",
                             "introspection": {"endpoint": "https://idp.example.com/introspect",
                                               "cluster": "idp", "client_id": "gateway",
                                               "client_secret_env": "INTROSPECTION_SECRET"}}]},
        "revocation": {"cache_ttl": 0},
        "logs": {"enabled": false},
        "routes": [
            {"name": "users", "prefix": "/users", "methods": ["GET"]},
            {"name": "products", "prefix": "/products", "auth_required": false,
             "rate_limit": {"max_calls": 2, "period": 60}},
            {"name": "orders", "prefix": "/orders", "methods": ["GET"],
             "canary": {"users": ["user-001"], "header": "X-Canary"}},
            {"name": "auth", "prefix": "/auth", "methods": ["POST"], "auth_required": false},
            {"name": "admin", "prefix": "/admin", "methods": ["GET"], "roles": ["admin"],
             "scopes": ["orders:read"]}
        ]
    })
    .to_string()
}
/// Checks one condition of a case.
pub(crate) fn check(failures: &mut Vec<String>, host: &str, case: &str, ok: bool, detail: String) {
    if !ok {
        failures.push(format!("{host}: {case}: {detail}"));
    }
}
/// Configuration-time cases (a log store on a host without timers; a second worker finds the
/// first one's shared data); returns the first worker's VM.
pub(crate) fn start(f: &mut Vec<String>, profile: &Profile, table: &Table, wasm: &[u8]) -> R<Vm> {
    let h = profile.name;

    // A log store needs timers: configured on a host without them (APISIX), it is refused at
    // configure time, naming the field, not silently skipped.
    let with_store = config().replace(
        r#""logs":{"enabled":false}"#,
        r#""logs":{"enabled":false,"store":{}}"#,
    );
    if !with_store.contains(r#""store":{}"#) {
        return Err("the log-store configuration could not be built".into());
    }
    let refused = Vm::new(wasm, profile, table, &with_store).err();
    let has_timers = !table.unimplemented.contains("proxy_set_tick_period_milliseconds");
    let ok = match &refused {
        None => has_timers,
        Some(e) => !has_timers && e.contains("logs.store: this host runs no timers"),
    };
    check(
        f,
        h,
        "a log store",
        ok,
        format!("timers {has_timers}, refused: {refused:?}"),
    );

    // Kong looks shared-data keys up by CRC32 alone: a configuration whose keys share one
    // (gw:rv:964062 and gw:ban:88088) is refused there, naming the field; Envoy compares keys.
    if profile.name.starts_with("Kong") {
        let colliding = config().replace(r#""cache_ttl":0"#, r#""cache_ttl":0,"cache_slots":964063"#);
        let refused = Vm::new(wasm, profile, table, &colliding)
            .err()
            .unwrap_or_default();
        check(
            f,
            h,
            "keys with one CRC32",
            colliding.contains("964063")
                && refused.contains("revocation.cache_slots")
                && refused.contains("same CRC32"),
            format!("refused: {refused:?}"),
        );
    }

    let vm = Vm::new(wasm, profile, table, &config())?;

    // A second worker starts on the zone the first one wrote (each worker is a VM; the
    // shared data is the host's). It must find the host's shared data as the first did.
    let has_shared = !table.unimplemented.contains("proxy_set_shared_data");
    let second = Vm::with_shared(wasm, profile, table, &config(), vm.store.data().shared.clone())?;
    let offers = |vm: &Vm| {
        vm.store
            .data()
            .logs
            .iter()
            .find(|l| l.contains("host offers:"))
            .cloned()
            .unwrap_or_default()
    };
    for (which, v) in [("first", &vm), ("second", &second)] {
        let line = offers(v);
        check(
            f,
            h,
            "each worker finds the shared data",
            line.contains(if has_shared {
                "shared data yes"
            } else {
                "shared data no"
            }),
            format!("{which} worker: {line:?}"),
        );
    }
    Ok(vm)
}
/// One request through the module and what must come of it.
pub(crate) struct Case {
    pub(crate) name: &'static str,
    pub(crate) ctx: i32,
    pub(crate) path: &'static str,
    pub(crate) token: Option<String>,
    /// The store's answer to every call the request makes.
    pub(crate) answer: Option<(i32, &'static str)>,
    pub(crate) expect: fn(&Vm, i32) -> bool,
}
/// The cases of one request each, in order (the route limit counts the public calls before it).
pub(crate) fn single_requests() -> Vec<Case> {
    let forwarded: fn(&Vm, i32) -> bool = |vm, c| vm.req(c).continued && vm.status(c).is_none();
    vec![
        Case {
            name: "public route",
            ctx: 2,
            path: "/api/v1/products/1",
            token: None,
            answer: None,
            expect: forwarded,
        },
        // Admin as the third of Keycloak's roles passes the admin route, every role forwarded.
        Case {
            name: "a role list: admin third passes, every role forwarded",
            ctx: 30,
            path: "/api/v1/admin/x",
            token: Some(keycloak_token(
                "kc-1",
                &["offline_access", "default-roles-demo", "admin"],
                "openid orders:read",
            )),
            answer: Some((200, CLEAN)),
            expect: |vm, c| {
                vm.req(c).continued
                    && vm.header(c, "x-user-role").as_deref()
                        == Some("offline_access,default-roles-demo,admin")
            },
        },
        // Without the route's scope: 403 (RFC 6750's insufficient_scope).
        Case {
            name: "a missing scope: 403 insufficient_scope",
            ctx: 31,
            path: "/api/v1/admin/x",
            token: Some(keycloak_token("kc-2", &["offline_access", "admin"], "openid")),
            answer: None,
            expect: |vm, c| vm.status(c) == Some(403) && !vm.req(c).continued,
        },
        Case {
            name: "revoked token",
            ctx: 4,
            path: "/api/v1/users/1",
            token: Some(token("user-003", "b")),
            answer: Some((200, BLACKLISTED)),
            expect: |vm, c| vm.status(c) == Some(401) && !vm.req(c).continued,
        },
        // The store failing: 503 (failure_mode deny).
        Case {
            name: "store failure",
            ctx: 5,
            path: "/api/v1/users/1",
            token: Some(token("user-004", "c")),
            answer: Some((500, "oops")),
            expect: |vm, c| vm.status(c) == Some(503) && !vm.req(c).continued,
        },
        Case {
            name: "bad token: 401 at once",
            ctx: 6,
            path: "/api/v1/users/1",
            token: Some("abc.def.ghi".to_string()),
            answer: None,
            expect: |vm, c| vm.status(c) == Some(401) && vm.calls_of(c).is_empty(),
        },
        // The route limit: 2 a minute, spent by the public calls above (the route's own and the
        // forged header's): refused, and refused again.
        Case {
            name: "route limit",
            ctx: 7,
            path: "/api/v1/products/1",
            token: None,
            answer: None,
            expect: |vm, c| vm.status(c) == Some(429) && !vm.req(c).continued,
        },
        Case {
            name: "route limit: still refused",
            ctx: 8,
            path: "/api/v1/products/1",
            token: None,
            answer: None,
            expect: |vm, c| vm.status(c) == Some(429),
        },
        // The canary: user-001 always, the header Envoy (or the host's routing) routes on.
        Case {
            name: "canary",
            ctx: 9,
            path: "/api/v1/orders/1",
            token: Some(token("user-001", "d")),
            answer: Some((200, CLEAN)),
            expect: |vm, c| vm.req(c).continued && vm.header(c, ROUTE_HEADER).as_deref() == Some(ROUTE_VALUE),
        },
    ]
}
pub(crate) fn run(profile: &Profile, table: &Table, wasm: &[u8]) -> R<Vec<String>> {
    let mut f = Vec::new();
    let h = profile.name;
    let mut vm = start(&mut f, profile, table, wasm)?;
    for case in single_requests() {
        vm.request(case.ctx, case.path, case.token.as_deref())?;
        if let Some((status, body)) = case.answer {
            for c in vm.calls_of(case.ctx) {
                vm.answer(c, status, body)?;
            }
        }
        let ok = (case.expect)(&vm, case.ctx);
        check(&mut f, h, case.name, ok, format!("{:?}", vm.req(case.ctx)));
        vm.finish(case.ctx)?;
        if case.ctx == 2 {
            forged_header(&mut f, h, profile, &mut vm)?;
            valid_token(&mut f, h, profile, &mut vm)?;
        }
    }
    one_token_twice(&mut f, h, profile, &mut vm)?;
    dpop(&mut f, h, profile, &mut vm)?;
    opaque(&mut f, h, profile, &mut vm)?;
    logout(&mut f, h, profile, &mut vm)?;
    invariants(&mut f, h, profile, &vm);
    Ok(f)
}
/// A forged identity header on a public route.
pub(crate) fn forged_header(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &mut Vm) -> R<()> {
    let _ = profile;
    // A client's copy of the identity header on a public route: stripped where the host
    // removes headers, refused where the upstream would still get it; never forwarded.
    // Two copies: a host that strips must take out both.
    vm.request_with(
        20,
        "GET",
        "/api/v1/products/1",
        None,
        &[("X-User-Id", "admin"), ("x-user-id", "admin")],
    )?;
    let r = vm.req(20);
    let upstream_sees = r.continued
        && r.headers
            .iter()
            .chain(&r.still_forwarded)
            .any(|(k, v)| k.eq_ignore_ascii_case("x-user-id") && v == "admin");
    let refused = vm.status(20) == Some(400);
    check(
        f,
        h,
        "a forged identity header",
        !upstream_sees && refused == profile.forwards_removed_headers && (refused || r.continued),
        format!("{r:?}"),
    );
    vm.finish(20)?;
    Ok(())
}
/// A valid token: its own lookup, answered clean, then forwarded with the identity.
pub(crate) fn valid_token(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &mut Vm) -> R<()> {
    let _ = profile;
    // A valid token: its own lookup, answered clean, then forwarded with the identity.
    let t = token("user-002", "a");
    vm.request(3, "/api/v1/users/1", Some(&t))?;
    let calls = vm.calls_of(3);
    check(
        f,
        h,
        "valid token: one lookup of its own",
        calls.len() == 1,
        format!("{calls:?}"),
    );
    check(
        f,
        h,
        "valid token: not forwarded before its answer",
        !vm.req(3).continued,
        String::new(),
    );
    for c in calls {
        vm.answer(c, 200, CLEAN)?;
    }
    check(
        f,
        h,
        "valid token: forwarded",
        vm.req(3).continued && vm.status(3).is_none(),
        format!("{:?}", vm.req(3)),
    );
    check(
        f,
        h,
        "valid token: identity",
        vm.header(3, "x-user-id").as_deref() == Some("user-002"),
        format!("{:?}", vm.header(3, "x-user-id")),
    );
    vm.finish(3)?;
    Ok(())
}
/// Two requests with one token at once.
pub(crate) fn one_token_twice(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &mut Vm) -> R<()> {
    let _ = profile;
    // Two requests with one token at once.
    let t = token("user-005", "e");
    vm.request(10, "/api/v1/users/1", Some(&t))?;
    vm.request(11, "/api/v1/users/1", Some(&t))?;
    let (first, second) = (vm.calls_of(10), vm.calls_of(11));
    if profile.switches_context {
        check(
            f,
            h,
            "one token twice (Envoy): one lookup, shared",
            first.len() + second.len() == 1,
            format!("{first:?} {second:?}"),
        );
    } else {
        check(
            f,
            h,
            "one token twice: a lookup each",
            first.len() == 1 && second.len() == 1,
            format!("{first:?} {second:?}"),
        );
    }
    for c in second.iter().chain(first.iter()) {
        vm.answer(*c, 200, CLEAN)?;
    }
    check(
        f,
        h,
        "one token twice: both forwarded",
        vm.req(10).continued && vm.req(11).continued,
        format!("{:?} {:?}", vm.req(10), vm.req(11)),
    );
    vm.finish(10)?;
    vm.finish(11)?;
    Ok(())
}
/// A DPoP-bound token with its proof: the proof's `SET NX` in the store, then the lookup (on
/// APISIX, one call per request: the lookup only, the proof remembered in the VM's own memory);
/// the same proof again refused without a call.
pub(crate) fn dpop(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &mut Vm) -> R<()> {
    use p256::ecdsa::signature::Signer as _;
    let now = 1_800_000_000i64;
    let Ok(key) = p256::ecdsa::SigningKey::from_slice(&[5u8; 32]) else {
        return Err("no P-256 key".into());
    };
    let point = key.verifying_key().to_encoded_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err("no P-256 point".into());
    };
    let (x, y) = (B64.encode(x), B64.encode(y));
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let jkt = B64.encode(<sha2::Sha256 as sha2::Digest>::digest(canonical.as_bytes()));
    let t = signed(
        serde_json::json!({"sub": "user-dpop", "role": "user", "iat": now - 10,
                                      "exp": now + 600, "cnf": {"jkt": jkt}}),
    );
    let header = serde_json::json!({"typ": "dpop+jwt", "alg": "ES256",
                                     "jwk": {"kty": "EC", "crv": "P-256", "x": x, "y": y}});
    let claims = serde_json::json!({"jti": "hostemu-1", "htm": "GET", "htu": "http://gw/api/v1/users/1",
                                     "iat": now - 5,
                                     "ath": B64.encode(<sha2::Sha256 as sha2::Digest>::digest(t.as_bytes()))});
    let input = format!(
        "{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string())
    );
    let signature: p256::ecdsa::Signature = key.sign(input.as_bytes());
    let proof = format!("{input}.{}", B64.encode(signature.to_bytes()));
    let auth = format!("DPoP {t}");
    let headers = [("authorization", auth.as_str()), ("dpop", proof.as_str())];
    vm.request_with(30, "GET", "/api/v1/users/1", None, &headers)?;
    let store_checks = profile.calls_per_request > 1;
    if store_checks {
        let calls = vm.calls_of(30);
        let first_is_set = calls.len() == 1
            && vm
                .store
                .data()
                .calls
                .iter()
                .any(|c| c.ctx == 30 && c.path.starts_with("/SET/dpop%3A"));
        check(
            f,
            h,
            "DPoP: the proof's SET NX first",
            first_is_set,
            format!("{calls:?}"),
        );
        for c in calls {
            vm.answer(c, 200, r#"{"SET":[true,"OK"]}"#)?;
        }
    }
    let calls = vm.calls_of(30);
    check(
        f,
        h,
        "DPoP: then its lookup",
        calls.len() == 1,
        format!("{calls:?}"),
    );
    for c in calls {
        vm.answer(c, 200, CLEAN)?;
    }
    check(
        f,
        h,
        "DPoP: forwarded with the identity",
        vm.req(30).continued && vm.header(30, "x-user-id").as_deref() == Some("user-dpop"),
        format!("{:?}", vm.req(30)),
    );
    vm.finish(30)?;
    vm.request_with(31, "GET", "/api/v1/users/1", None, &headers)?;
    check(
        f,
        h,
        "DPoP: the same proof again refused, no call",
        vm.status(31) == Some(401) && vm.calls_of(31).is_empty(),
        format!("{:?}", vm.req(31)),
    );
    vm.finish(31)?;
    Ok(())
}
/// An opaque token: its introspection, then its lookup. On APISIX (one call per request) the
/// first request cannot make both: it is refused with `Retry-After: 0` after the introspection,
/// and the retry, answered from the introspection cache, makes the lookup.
pub(crate) fn opaque(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &mut Vm) -> R<()> {
    let active = serde_json::json!({"active": true, "sub": "user-opaque", "iss": "https://idp.example.com",
                                    "exp": 1_800_000_600i64, "realm_access": {"roles": ["user"]}})
    .to_string();
    vm.request(40, "/api/v1/users/1", Some("opaque-token-1"))?;
    let calls = vm.calls_of(40);
    let introspects = vm
        .store
        .data()
        .calls
        .iter()
        .any(|c| c.ctx == 40 && c.path == "/introspect");
    check(
        f,
        h,
        "opaque: introspected first",
        calls.len() == 1 && introspects,
        format!("{calls:?}"),
    );
    for c in calls {
        vm.answer(c, 200, &active)?;
    }
    let one_call = profile.calls_per_request == 1;
    if one_call {
        check(
            f,
            h,
            "opaque (one call per request): refused for a retry, not forwarded unchecked",
            vm.status(40) == Some(503) && !vm.req(40).continued,
            format!("{:?}", vm.req(40)),
        );
        vm.finish(40)?;
        vm.request(41, "/api/v1/users/1", Some("opaque-token-1"))?;
    }
    let ctx = if one_call { 41 } else { 40 };
    let calls = vm.calls_of(ctx);
    let lookup = vm
        .store
        .data()
        .calls
        .iter()
        .any(|c| c.ctx == ctx && c.path.starts_with("/MGET/"));
    check(
        f,
        h,
        "opaque: then its lookup",
        calls.len() == 1 && lookup,
        format!("{calls:?}"),
    );
    for c in calls {
        vm.answer(c, 200, CLEAN)?;
    }
    check(
        f,
        h,
        "opaque: forwarded with the identity",
        vm.req(ctx).continued && vm.header(ctx, "x-user-id").as_deref() == Some("user-opaque"),
        format!("{:?}", vm.req(ctx)),
    );
    vm.finish(ctx)?;
    Ok(())
}
/// A logout and the logged-out token.
pub(crate) fn logout(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &mut Vm) -> R<()> {
    let _ = profile;
    // A logout: its own lookup, then its write (SETEX, then SET NX), replied only once the
    // store confirmed it; never forwarded to the upstream of the route it sits under.
    let t = token("user-006", "f");
    vm.request_method(12, "POST", "/api/v1/auth/logout", Some(&t))?;
    for (step, answer) in [CLEAN, r#"{"SETEX":[true,"OK"]}"#, r#"{"SET":[true,"OK"]}"#]
        .iter()
        .enumerate()
    {
        let calls = vm.calls_of(12);
        check(
            f,
            h,
            "logout: one call at a time, its own",
            calls.len() == 1,
            format!("step {step}: {calls:?}"),
        );
        for c in calls {
            vm.answer(c, 200, answer)?;
        }
    }
    check(
        f,
        h,
        "logout",
        vm.status(12) == Some(200) && !vm.req(12).continued,
        format!("{:?}", vm.req(12)),
    );
    vm.finish(12)?;
    vm.request(13, "/api/v1/users/1", Some(&t))?;
    for c in vm.calls_of(13) {
        vm.answer(c, 200, BLACKLISTED)?;
    }
    check(
        f,
        h,
        "logged-out token refused",
        vm.status(13) == Some(401),
        format!("{:?}", vm.req(13)),
    );
    vm.finish(13)?;
    Ok(())
}
/// Above all: nothing went upstream without its own token's clean answer (where only the
/// dispatching context can be resumed), and the host saw nothing it would mishandle.
pub(crate) fn invariants(f: &mut Vec<String>, h: &str, profile: &Profile, vm: &Vm) {
    let st = vm.store.data();
    for (ctx, r) in &st.reqs {
        let authenticated = r.headers.iter().any(|(k, _)| k == "authorization");
        if authenticated && r.continued && !profile.switches_context && !r.answers.iter().any(|c| *c) {
            f.push(format!(
                "{h}: context {ctx} went upstream without its own clean lookup"
            ));
        }
    }
    f.extend(st.violations.iter().map(|v| format!("{h}: {v}")));
}
