use super::*;
use crate::host::{LocalStore, SetError, SharedStore};
use std::cell::RefCell;

const L: Limit = Limit {
    max_calls: 10,
    period_ms: 1000,
};

#[test]
fn bucket_arithmetic() {
    let (mut b, v) = take(None, 7, &L, 1_000);
    assert!(v.allowed);
    assert_eq!((v.limit, v.remaining), (10, 9));
    for i in 0..9 {
        let (nb, v) = take(Some(b), 7, &L, 1_000);
        assert!(v.allowed, "{i}");
        b = nb;
    }
    let (b2, v) = take(Some(b), 7, &L, 1_000);
    assert!(!v.allowed);
    assert_eq!(v.remaining, 0);
    assert_eq!(v.retry_after_s, 1, "one token takes 100 ms: rounded up to 1 s");
    assert_eq!(v.reset_s, 1);
    // 100 ms later exactly one token is back.
    let (b3, v) = take(Some(b2), 7, &L, 1_100);
    assert!(v.allowed);
    let (_, v) = take(Some(b3), 7, &L, 1_100);
    assert!(!v.allowed);
    // After a full period the bucket is full again, never fuller.
    let (_, v) = take(Some(b3), 7, &L, 60_000);
    assert_eq!(v.remaining, 9);
}

#[test]
fn slow_limits_round_retry_after_up() {
    let l = Limit {
        max_calls: 1,
        period_ms: 60_000,
    };
    let (b, v) = take(None, 1, &l, 0);
    assert!(v.allowed);
    let (_, v) = take(Some(b), 1, &l, 15_000);
    assert!(!v.allowed);
    assert_eq!(v.retry_after_s, 45);
}

#[test]
fn clock_going_backwards_refills_nothing() {
    let (b, _) = take(None, 1, &L, 5_000);
    let (b2, v) = take(Some(b), 1, &L, 4_000);
    assert_eq!(v.remaining, 8);
    assert_eq!(b2.last_ms, 5_000);
}

#[test]
fn other_fingerprint_takes_the_slot_over() {
    let (mut b, _) = take(None, 1, &L, 0);
    for _ in 0..10 {
        b = take(Some(b), 1, &L, 0).0;
    }
    let (b2, v) = take(Some(b), 2, &L, 0);
    assert!(v.allowed);
    assert_eq!((b2.fingerprint, v.remaining), (2, 9));
}

#[test]
fn encoding_round_trips() {
    let b = Bucket {
        fingerprint: u64::MAX,
        tokens_milli: 1234,
        last_ms: 99,
    };
    assert_eq!(Bucket::decode(&b.encode()), Some(b));
    assert_eq!(Bucket::decode(b"short"), None);
    assert_eq!(Bucket::decode(&[0u8; BUCKET_LEN]).map(|b| b.fingerprint), Some(0));
}

/// The one store implementation (`LocalStore`, proxy-wasm's CAS rules), with an optional number
/// of injected conflicts.
#[derive(Default)]
struct FakeStore {
    store: LocalStore,
    conflicts_to_inject: RefCell<u32>,
}

impl SharedStore for FakeStore {
    fn get(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        self.store.get(key)
    }
    fn set(&self, key: &str, value: &[u8], cas: Option<u32>) -> Result<(), SetError> {
        let mut inject = self.conflicts_to_inject.borrow_mut();
        if *inject > 0 {
            *inject -= 1;
            return Err(SetError::CasMismatch);
        }
        self.store.set(key, value, cas)
    }
}

fn ip_limits(ip_slots: u32) -> (RateLimits, RouteLimits) {
    let global = RateLimitSettings {
        per_ip: LimitSettings {
            max_calls: 5,
            period: 60,
        },
        ip_slots,
        ..RateLimitSettings::default()
    }
    .compile(false, None)
    .unwrap();
    let route = serde_json::from_str::<RouteRateLimit>(r#"{"max_calls": 1000}"#).unwrap();
    let limits = route.compile("r", &global).unwrap().unwrap();
    (global, limits)
}

#[test]
fn every_vm_of_a_store_uses_the_first_seed() {
    let store = FakeStore::default();
    let first = SlotSeed::load_or_create(&store, [1; 16]);
    let second = SlotSeed::load_or_create(&store, [2; 16]);
    assert_eq!(first, second);
    assert_eq!(first, SlotSeed::decode(&[1; 16]).unwrap());
    // A value that is not a seed (16 bytes) is replaced.
    let store = FakeStore::default();
    store.set(SEED_KEY, b"junk", None).unwrap();
    assert_eq!(
        SlotSeed::load_or_create(&store, [3; 16]),
        SlotSeed::decode(&[3; 16]).unwrap()
    );
}

#[test]
fn a_client_cannot_know_its_slot_and_addresses_of_one_slot_share_its_bucket() {
    let (global, limits) = ip_limits(64);
    let (a, b) = (SlotSeed(1, 2), SlotSeed(3, 4));
    let ips: Vec<String> = (0..200).map(|i| format!("127.1.0.{i}")).collect();
    let slots = |seed: &SlotSeed| -> Vec<String> {
        ips.iter()
            .map(|ip| limits.ip_check(&global, seed, ip).key)
            .collect()
    };
    // Another seed, other slots: which addresses share a slot depends on the secret.
    let same = slots(&a).iter().zip(slots(&b)).filter(|(x, y)| **x == *y).count();
    assert!(
        same < 20,
        "{same} of 200 addresses kept their slot under another seed"
    );
    // Two addresses of one slot alternating: 5 calls a minute between them, not 5 each.
    let (global, limits) = ip_limits(2);
    let seed = SlotSeed(5, 6);
    let first = limits.ip_check(&global, &seed, "127.1.0.40");
    let twin = ips
        .iter()
        .filter(|ip| *ip != "127.1.0.40")
        .map(|ip| limits.ip_check(&global, &seed, ip))
        .find(|c| c.key == first.key)
        .unwrap();
    let store = FakeStore::default();
    ensure_key(&store, &first.key);
    let mut allowed = 0;
    for i in 0..20 {
        let c = if i % 2 == 0 { &first } else { &twin };
        if let Update::Done(v) = consume(&store, &c.key, c.fingerprint, &c.limit, 1_000, 1).0 {
            allowed += u32::from(v.allowed);
        }
    }
    assert_eq!(allowed, 5);
}

#[test]
fn consume_retries_conflicts_and_is_exact() {
    let store = FakeStore::default();
    ensure_key(&store, "k");
    *store.conflicts_to_inject.borrow_mut() = 3;
    let mut allowed = 0;
    for _ in 0..25 {
        if let Update::Done(v) = consume(&store, "k", 5, &L, 0, 1).0 {
            allowed += u32::from(v.allowed);
        }
    }
    assert_eq!(allowed, 10);
}

#[test]
fn consume_gives_up_after_bounded_conflicts() {
    let store = FakeStore::default();
    ensure_key(&store, "k");
    *store.conflicts_to_inject.borrow_mut() = 1000;
    assert_eq!(
        consume(&store, "k", 5, &L, 0, 1).0,
        Update::GaveUp {
            conflicts: MAX_CAS_ATTEMPTS
        }
    );
}

/// Leases never spend a token the shared bucket did not have, and strand at most
/// `V × (batch − 1)` tokens: two VMs alternating on one bucket of 1 000 calls per second
/// (batch 10), at one instant and then across the lease lifetime.
#[test]
fn leases_stay_within_the_stated_bounds() {
    use super::lease::{batch, Leases, LEASE_MS};
    let limit = Limit {
        max_calls: 1000,
        period_ms: 1000,
    };
    assert_eq!(batch(&limit), 10);
    assert_eq!(
        batch(&Limit {
            max_calls: 199,
            period_ms: 1000
        }),
        1,
        "small limits stay exact"
    );
    let store = FakeStore::default();
    ensure_key(&store, "k");
    let mut vms = [Leases::default(), Leases::default()];
    let charge = |vms: &mut [Leases; 2], vm: usize, now: u64| -> bool {
        if let Some(v) = vms[vm].spend("k", 5, &limit, now) {
            return v.allowed;
        }
        match consume(&store, "k", 5, &limit, now, batch(&limit)) {
            (Update::Done(v), taken) => {
                vms[vm].hold("k", 5, &limit, now, taken, &v);
                v.allowed
            }
            (Update::GaveUp { .. }, _) => panic!("no contention here"),
        }
    };
    // At one instant: never more than the capacity, at most 2 × 9 fewer.
    let admitted = (0..3000).filter(|i| charge(&mut vms, i % 2, 0)).count() as u64;
    assert!((1000 - 2 * 9..=1000).contains(&admitted), "{admitted}");
    // Tokens leased at t = 0 and spent just before their lease ends, on top of a window that
    // opens then: at most 2 × 9 over what an exact bucket admits in that window (refill
    // alone over 999 ms is 999).
    let mut vms = [Leases::default(), Leases::default()];
    let store2 = FakeStore::default();
    ensure_key(&store2, "k");
    let take = |vms: &mut [Leases; 2], vm: usize, now: u64| -> bool {
        if let Some(v) = vms[vm].spend("k", 5, &limit, now) {
            return v.allowed;
        }
        match consume(&store2, "k", 5, &limit, now, batch(&limit)) {
            (Update::Done(v), taken) => {
                vms[vm].hold("k", 5, &limit, now, taken, &v);
                v.allowed
            }
            (Update::GaveUp { .. }, _) => false,
        }
    };
    // At t = 0 the second VM leases a batch and keeps 9 tokens; the first drains the rest.
    assert!(take(&mut vms, 1, 0));
    while take(&mut vms, 0, 0) {}
    // The window [1 ms, 999 ms]: an exact bucket admits the refill, 999 at most.
    let in_window = (0..5000u64)
        .filter(|i| take(&mut vms, (i % 2) as usize, 1 + i * 998 / 4999))
        .count() as u64;
    assert!(in_window <= 999 + 2 * 9, "{in_window}");
    assert!(in_window >= 999 - 2 * 9, "{in_window}");
    // After the lease lifetime nothing leased earlier is spent.
    let mut late = Leases::default();
    let v = Verdict {
        allowed: true,
        limit: 1000,
        remaining: 500,
        retry_after_s: 0,
        reset_s: 1,
    };
    late.hold("k", 5, &limit, 0, 10, &v);
    assert!(late.spend("k", 5, &limit, LEASE_MS - 1).is_some());
    assert!(late.spend("k", 5, &limit, LEASE_MS).is_none());
    // Another fingerprint (a slot taken over) or another limit (reload) ignores the lease.
    late.hold("k", 5, &limit, 0, 10, &v);
    assert!(late.spend("k", 6, &limit, 1).is_none());
}

#[test]
fn ensure_key_never_resets_a_bucket() {
    let store = FakeStore::default();
    ensure_key(&store, "k");
    consume(&store, "k", 5, &L, 0, 1);
    ensure_key(&store, "k");
    let (bytes, _) = store.get("k").unwrap();
    assert_eq!(Bucket::decode(&bytes).unwrap().tokens_milli, 9_000);
}

#[test]
fn cluster_sync_arithmetic() {
    use super::cluster::*;
    let store = FakeStore::default();
    assert!(add(&store, "c", 3));
    assert!(add(&store, "c", 4));
    assert_eq!(take_all(&store, "c"), 7);
    assert_eq!(take_all(&store, "c"), 0);
    assert_eq!(others(None, 50, 7), 0, "first sync only sets the baseline");
    assert_eq!(others(Some(50), 70, 7), 13);
    assert_eq!(others(Some(50), 40, 7), 0, "counter reset in Redis");
    assert_eq!(parse_incrby(Some(200), br#"{"INCRBY":42}"#), Ok(42));
    assert!(parse_incrby(Some(200), b"nope").is_err());
    assert!(parse_incrby(None, b"").is_err());
    assert_eq!(
        incrby_path("orders", 5),
        "/INCRBY/gateway%3Aratelimit%3Aconsumed%3Aorders/5.json"
    );
}

#[test]
fn cluster_drain_removes_tokens_after_refill() {
    use super::cluster::drain;
    let store = FakeStore::default();
    ensure_key(&store, "r");
    consume(&store, "r", 9, &L, 0, 1); // 9 left
    assert!(drain(&store, "r", 9, &L, 0, 5));
    let (bytes, _) = store.get("r").unwrap();
    assert_eq!(Bucket::decode(&bytes).unwrap().tokens_milli, 4_000);
    // More than it holds: empty, and the rest is a debt the refill pays first (at most one
    // period), so instances that each empty their bucket still share one limit.
    assert!(drain(&store, "r", 9, &L, 0, 7));
    let (bytes, _) = store.get("r").unwrap();
    let b = Bucket::decode(&bytes).unwrap();
    assert_eq!(b.tokens_milli, 0, "never below empty");
    assert_eq!(b.last_ms, L.time_for(3_000), "3 tokens owed");
    let (_, v) = take(Some(b), 9, &L, b.last_ms - 1);
    assert!(!v.allowed, "nothing admitted while the debt is paid");
    let (_, v) = take(Some(b), 9, &L, b.last_ms + L.time_for(1_000));
    assert!(v.allowed);
    assert!(drain(&store, "r", 9, &L, 0, 1_000_000));
    let (bytes, _) = store.get("r").unwrap();
    assert_eq!(
        Bucket::decode(&bytes).unwrap().last_ms,
        L.period_ms,
        "a debt of one period at most"
    );
}

#[test]
fn leader_election_keeps_one_leader_until_stale() {
    use super::cluster::elect;
    let store = FakeStore::default();
    assert!(elect(&store, 1, 1_000, 3_000));
    assert!(!elect(&store, 2, 1_500, 3_000), "a fresh leader keeps the key");
    assert!(elect(&store, 1, 2_000, 3_000), "the leader renews");
    assert!(elect(&store, 2, 5_001, 3_000), "a stale leader is replaced");
    assert!(!elect(&store, 1, 5_100, 3_000));
}

#[test]
fn client_ip_from_peer_or_trusted_xff() {
    assert_eq!(
        client_ip(Some("10.0.0.1:5555"), Some("1.2.3.4"), 0).as_deref(),
        Some("10.0.0.1")
    );
    assert_eq!(
        client_ip(Some("10.0.0.1:5555"), Some("1.2.3.4, 192.0.2.2"), 1).as_deref(),
        Some("1.2.3.4")
    );
    assert_eq!(
        client_ip(Some("10.0.0.1:5555"), Some("9.9.9.9,1.2.3.4,192.0.2.2"), 2).as_deref(),
        Some("9.9.9.9")
    );
    assert_eq!(
        client_ip(Some("10.0.0.1:5555"), Some("192.0.2.2"), 1).as_deref(),
        Some("10.0.0.1"),
        "too short"
    );
    assert_eq!(
        client_ip(Some("10.0.0.1:5555"), Some("evil, 192.0.2.2"), 1).as_deref(),
        Some("10.0.0.1")
    );
    assert_eq!(client_ip(Some("[::1]:80"), None, 0).as_deref(), Some("::1"));
    assert_eq!(client_ip(None, None, 0), None);
    assert_eq!(strip_port("::1"), "::1");
}

#[test]
fn response_headers_in_each_style() {
    let user = Limit {
        max_calls: 10,
        period_ms: 60_000,
    };
    let (_, route_v) = take(None, 1, &L, 1_000);
    let (_, user_v) = take(None, 2, &user, 1_000);
    let charged = Charged {
        policies: vec![(Kind::Route, L), (Kind::User, user)],
        binding: Some((Kind::User, user_v)),
    };
    let get = |style: HeaderStyle| -> Vec<(String, String)> {
        response_headers(style, &charged)
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect()
    };
    let legacy = get(HeaderStyle::Legacy);
    assert_eq!(
        legacy,
        vec![
            ("x-ratelimit-limit".into(), "10".into()),
            ("x-ratelimit-remaining".into(), "9".into()),
            ("x-ratelimit-reset".into(), user_v.reset_s.to_string()),
        ]
    );
    let ietf = get(HeaderStyle::Ietf);
    assert_eq!(
        ietf,
        vec![
            (
                "ratelimit-policy".into(),
                r#""route";q=10;w=1, "user";q=10;w=60"#.into()
            ),
            ("ratelimit".into(), format!(r#""user";r=9;t={}"#, user_v.reset_s)),
        ]
    );
    assert_eq!(get(HeaderStyle::Both).len(), 5);
    assert!(route_v.allowed);
    // Nothing charged: no headers.
    assert!(response_headers(HeaderStyle::Both, &Charged::default()).is_empty());
}
