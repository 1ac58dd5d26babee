//! Any request head: lines `name: value` (the first two are `:method` and `:path`). Runs the
//! pure phases: trace ids, route and endpoint matching, bearer parsing and verification, the
//! endpoints' conditions (the log query string among them), the headers to forward, and the
//! client address from `X-Forwarded-For`.
#![no_main]

use gateway_filter::config::Config;
use gateway_filter::jwt::{KeyContext, TokenCache};
use gateway_filter::policy::{self, Caller, Target};
use gateway_filter::ratelimit;
use libfuzzer_sys::fuzz_target;

const NOW: i64 = 1_800_000_000;

thread_local! {
    // Per thread: the configuration holds `Rc`s (the filter is single-threaded per VM).
    static CONFIG: Config = config();
}

fn config() -> Config {
    {
        let v = serde_json::json!({
            "gateway": {"prefix": "/api/v1"},
            "passthrough_paths": ["/health"],
            "webdis_cluster": "webdis",
            "jwt": {"secret": "fuzz-secret-fuzz-secret-fuzz-secret"},
            "revocation": {"refresh": {"window": 600}},
            "logs": {"store": {}},
            "routes": [
                {"name": "users", "prefix": "/users", "methods": ["GET", "POST"]},
                {"name": "open", "prefix": "/open", "auth_required": false},
                {"name": "auth", "prefix": "/auth", "methods": ["POST"], "auth_required": false},
                {"name": "admin", "prefix": "/admin", "methods": ["GET", "POST"], "roles": ["admin"],
                 "canary": {"percent": 50, "header": "X-Canary", "sticky": "cookie:sid"}}
            ]
        });
        Config::from_json(v.to_string().as_bytes()).expect("the fuzz configuration is valid")
    }
}

fuzz_target!(|data: &[u8]| CONFIG.with(|cfg| run(cfg, data)));

fn run(cfg: &Config, data: &[u8]) {
    let mut headers: Vec<(String, Vec<u8>)> = Vec::new();
    for (i, line) in data.split(|b| *b == b'\n').enumerate() {
        match i {
            0 => headers.push((":method".into(), line.to_vec())),
            1 => headers.push((":path".into(), line.to_vec())),
            _ => {
                let (name, value) = match line.iter().position(|b| *b == b':') {
                    Some(at) => (line.get(..at).unwrap_or(&[]), line.get(at + 1..).unwrap_or(&[])),
                    None => (line, &[][..]),
                };
                headers.push((String::from_utf8_lossy(name).to_ascii_lowercase(), value.to_vec()));
            }
        }
    }
    let classified = policy::classify(cfg, &headers, &[7u8; 24]);
    let mut cache = TokenCache::default();
    let identity = match &classified.target {
        Ok(Target::Route(i)) => cfg.routes.get(*i).and_then(|route| {
            policy::authenticate(
                cfg,
                &mut cache,
                KeyContext::remote(&[]),
                route,
                &headers,
                NOW,
                "t",
                false,
            )
            .ok()
            .flatten()
        }),
        Ok(Target::Endpoint { path, .. }) => {
            // Past authentication with a real identity, the endpoint's own conditions.
            let caller = Caller {
                identity: gateway_filter::jwt::Identity {
                    user_id: Some("u".into()),
                    user_name: None,
                    roles: vec!["admin".into()],
                    scopes: Vec::new(),
                    jti: None,
                    expires_at: NOW + 100,
                    issued_at: Some(NOW - 100),
                    auth_time: None,
                    issuer: 0,
                    revocation_id: "r".into(),
                    binding: Default::default(),
                },
                token: "t".into(),
                scheme: policy::Scheme::Bearer,
            };
            let _ = policy::endpoint(cfg, path, &caller, &headers, NOW, "t");
            policy::verified_caller(
                cfg,
                &mut cache,
                KeyContext::remote(&[]),
                &headers,
                NOW,
                "t",
                false,
            )
            .ok()
        }
        _ => None,
    };
    let forward = policy::forward_headers(
        cfg,
        &headers,
        &classified.trace,
        identity.as_ref().map(|c| &c.identity),
    );
    for name in &forward.remove {
        assert!(policy::is_client_forgery(name));
    }
    let xff = gateway_filter::headers::get_str(&headers, "x-forwarded-for");
    let _ = ratelimit::client_ip(Some("127.0.0.1:1"), xff, 2);
}
