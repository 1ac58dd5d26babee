//! Connections per client: a cap on how many connections one peer address holds open, so
//! that one client's idle or slow sockets cannot take every connection Envoy accepts
//! (`gateway.limits.max_connections`). Envoy has no per-client connection cap of its own, and
//! its connection-count monitor cannot drive the overload manager's shrinking timeouts, so the
//! same module runs a second time as a network filter in front of the HTTP connection manager.
//!
//! Counts live in shared data, in a fixed number of slots (a keyed hash of the address, see
//! [`SlotSeed`]), so every worker sees every connection and memory is bounded; addresses of one
//! slot share its count (stricter, never looser). A slot also records when it last admitted a
//! connection: Envoy closes every connection within `max_age` of opening it
//! (`max_connection_duration`), so a slot that admitted nothing for longer has no open
//! connection left and its count restarts from zero (what a VM that died with connections open
//! could not release).
//!
//! This duty owns its settings (the network filter's JSON), their validation and the admit /
//! release steps; each glue (the `.wasm`'s `filter`, the native module's network filter) reads
//! the peer address and closes refused connections.

use serde::{Deserialize, Serialize};

use crate::error::{check_range, ConfigError};
use crate::host::{SetError, SharedStore};
use crate::ratelimit::SlotSeed;

/// The network filter's configuration: `{"connections": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConnectionSettings {
    /// Connections one address may hold open at once.
    pub max_per_client: u32,
    /// Slots of the count table (memory bound).
    #[serde(default = "default_slots")]
    pub slots: u32,
    /// Seconds after which Envoy closes any connection (its `max_connection_duration`, plus
    /// the time a draining connection may take).
    pub max_age: u64,
    /// Seconds a new connection may stay silent: one that has sent no byte by then is closed
    /// (counted in [`SILENT_METRIC`]). Absent: no such bound (Envoy's idle timeout applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_byte_timeout: Option<f64>,
    /// The connections this listener takes in all (Envoy's limit for it). With `reserve`,
    /// once `budget - reserve` are open only clients holding none get in: clients that already
    /// hold connections cannot take the last `reserve` ones, whatever their number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<u32>,
    #[serde(default)]
    pub reserve: u32,
}

fn default_slots() -> u32 {
    8192
}

/// The JSON the network filter gets.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    connections: ConnectionSettings,
}

/// Validated settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConnectionLimit {
    pub max_per_client: u32,
    pub slots: u32,
    pub max_age_ms: u64,
    pub first_byte_ms: Option<u64>,
    /// Connections open in all above which only clients holding none are admitted.
    pub shared_above: Option<u32>,
}

impl ConnectionLimit {
    /// The network filter's configuration, if `json` is one (`{"connections": ...}`); errors
    /// name the field.
    pub fn from_json(json: &[u8]) -> Option<Result<ConnectionLimit, ConfigError>> {
        let value: serde_json::Value = serde_json::from_slice(json).ok()?;
        value.get("connections")?;
        let doc: Document = match serde_json::from_value(value) {
            Ok(d) => d,
            Err(e) => return Some(Err(ConfigError::new("connections", e.to_string()))),
        };
        Some(doc.connections.compile().map_err(|e| e.under("connections")))
    }
}

impl ConnectionSettings {
    pub fn compile(&self) -> Result<ConnectionLimit, ConfigError> {
        check_range("max_per_client", self.max_per_client, 1, 1_000_000)?;
        check_range("slots", self.slots, 1, 1_000_000)?;
        check_range("max_age", self.max_age, 1, 30 * 86_400)?;
        let first_byte_ms = match self.first_byte_timeout {
            Some(s) => Some(crate::error::seconds_to_ms("first_byte_timeout", s, 0.1, 3600.0)?),
            None => None,
        };
        let shared_above = match self.budget {
            Some(budget) => {
                check_range("budget", budget, 1, 10_000_000)?;
                check_range("reserve", self.reserve, 0, budget.saturating_sub(1))?;
                Some(budget - self.reserve)
            }
            None if self.reserve > 0 => {
                return Err(ConfigError::new(
                    "reserve",
                    "needs budget (the listener's connection limit)",
                ))
            }
            None => None,
        };
        Ok(ConnectionLimit {
            max_per_client: self.max_per_client,
            slots: self.slots,
            max_age_ms: self.max_age * 1000,
            first_byte_ms,
            shared_above,
        })
    }
}

/// Key of slot `index`.
pub fn slot_key(index: u64) -> String {
    format!("gw:cx:{index}")
}

/// Key of the count of every connection the cap counted (for the reserve).
pub const TOTAL_KEY: &str = "gw:cx:total";

/// A slot as stored: open connections (u32) and when it last admitted one (ms, u64).
const SLOT_LEN: usize = 12;

fn decode(bytes: &[u8]) -> (u32, u64) {
    let count = bytes
        .get(..4)
        .and_then(|b| <[u8; 4]>::try_from(b).ok())
        .map_or(0, u32::from_le_bytes);
    let at = bytes
        .get(4..SLOT_LEN)
        .and_then(|b| <[u8; 8]>::try_from(b).ok())
        .map_or(0, u64::from_le_bytes);
    (count, at)
}

fn encode(count: u32, at: u64) -> [u8; SLOT_LEN] {
    let mut out = [0u8; SLOT_LEN];
    out[..4].copy_from_slice(&count.to_le_bytes());
    out[4..].copy_from_slice(&at.to_le_bytes());
    out
}

/// What [`ConnectionLimit::admit`] decided.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Counted: release it when the connection closes.
    Admitted(Counted),
    /// The address holds `max_per_client` connections already.
    Refused,
    /// The store would not take the update (contention, failure): let it through uncounted.
    Uncounted,
}

const CAS_ATTEMPTS: usize = 16;
/// Attempts at a release or at the total: a count given up on would drift for good, and these
/// only fail under contention (every attempt is one CAS on shared data).
const COUNT_ATTEMPTS: usize = 256;

impl ConnectionLimit {
    fn key(&self, seed: &SlotSeed, address: &str) -> String {
        slot_key(seed.hash(&["c", address]) % u64::from(self.slots.max(1)))
    }

    /// Counts a new connection from `address` (the peer's IP, no port).
    pub fn admit(&self, store: &dyn SharedStore, seed: &SlotSeed, address: &str, now_ms: u64) -> Admission {
        let key = self.key(seed, address);
        // Past `shared_above`, the rest is reserved for clients holding no connection.
        let crowded = self
            .shared_above
            .is_some_and(|above| self.open_count(store, TOTAL_KEY, now_ms) >= above);
        for _ in 0..CAS_ATTEMPTS {
            let (count, at, cas) = self.read(store, &key, now_ms);
            if count >= self.max_per_client || (crowded && count > 0) {
                return Admission::Refused;
            }
            match store.set(&key, &encode(count + 1, now_ms.max(at)), cas) {
                Ok(()) => {
                    let total = self.shared_above.is_some() && self.add_total(store, now_ms);
                    return Admission::Admitted(Counted { slot: key, total });
                }
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Failed) => return Admission::Uncounted,
            }
        }
        Admission::Uncounted
    }

    /// The count under `key` as of `now_ms` (0 once it admitted nothing for `max_age`), when it
    /// last admitted one, and the version to write against.
    fn read(&self, store: &dyn SharedStore, key: &str, now_ms: u64) -> (u32, u64, Option<u32>) {
        let (bytes, cas) = store.get(key).map_or((Vec::new(), None), |(v, c)| (v, Some(c)));
        let (count, at) = decode(&bytes);
        let fresh = now_ms.saturating_sub(at) <= self.max_age_ms;
        (if fresh { count } else { 0 }, at, cas)
    }

    /// The connections counted under `key`, as of `now_ms`.
    fn open_count(&self, store: &dyn SharedStore, key: &str, now_ms: u64) -> u32 {
        self.read(store, key, now_ms).0
    }

    /// Adds one to the total; whether it was added (only then is it released).
    fn add_total(&self, store: &dyn SharedStore, now_ms: u64) -> bool {
        for _ in 0..COUNT_ATTEMPTS {
            let (count, at, cas) = self.read(store, TOTAL_KEY, now_ms);
            match store.set(TOTAL_KEY, &encode(count.saturating_add(1), now_ms.max(at)), cas) {
                Ok(()) => return true,
                Err(SetError::CasMismatch) => continue,
                Err(SetError::Failed) => return false,
            }
        }
        false
    }

    /// Releases a connection counted under `key`.
    pub fn release(store: &dyn SharedStore, key: &str) {
        for _ in 0..COUNT_ATTEMPTS {
            let Some((bytes, cas)) = store.get(key) else {
                return;
            };
            let (count, at) = decode(&bytes);
            match store.set(key, &encode(count.saturating_sub(1), at), Some(cas)) {
                Err(SetError::CasMismatch) => continue,
                _ => return,
            }
        }
    }
}

/// The duty as a network filter runs it, over any host's shared data: the glue reads the peer
/// address and the clock, closes a refused connection and counts it ([`REFUSED_METRIC`]).
pub struct Connections {
    limit: ConnectionLimit,
    seed: SlotSeed,
}

/// A connection refused: close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

/// Where an admitted connection is counted: its slot, and the total when it was added there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counted {
    slot: String,
    total: bool,
}

/// Counter of refused connections.
pub const REFUSED_METRIC: &str = "gateway_connections_refused_total";

impl Connections {
    /// `fresh`: random bytes for the slot seed, used if no other VM or worker stored one yet.
    pub fn new(limit: ConnectionLimit, store: &dyn SharedStore, fresh: [u8; 16]) -> Connections {
        let seed = SlotSeed::load_or_create(store, fresh);
        if limit.shared_above.is_some() && store.get(TOTAL_KEY).is_none() {
            // Created up front: later updates are CAS on an existing key.
            let _ = store.set(TOTAL_KEY, &encode(0, 0), None);
        }
        Connections { limit, seed }
    }

    /// A new connection from `peer` (`ip:port` as the host gives it): what to release when it
    /// closes (`None`: not counted, e.g. a Unix socket peer), or [`Refused`]. An IPv6 peer counts
    /// as its /64 (one subscriber's prefix: a host picks any address in it).
    pub fn open(
        &self,
        store: &dyn SharedStore,
        peer: Option<&str>,
        now_ms: u64,
    ) -> Result<Option<Counted>, Refused> {
        let Some(ip) = peer.and_then(peer_ip) else {
            return Ok(None);
        };
        match self
            .limit
            .admit(store, &self.seed, &crate::ratelimit::client_group(&ip), now_ms)
        {
            Admission::Admitted(counted) => Ok(Some(counted)),
            Admission::Uncounted => Ok(None),
            Admission::Refused => Err(Refused),
        }
    }

    /// The connection counted as `counted` closed.
    pub fn close(&self, store: &dyn SharedStore, counted: &Counted) {
        ConnectionLimit::release(store, &counted.slot);
        if counted.total {
            ConnectionLimit::release(store, TOTAL_KEY);
        }
    }

    /// How long a new connection may stay silent.
    pub fn first_byte_ms(&self) -> Option<u64> {
        self.limit.first_byte_ms
    }
}

/// Counter of connections closed because they sent no byte in time.
pub const SILENT_METRIC: &str = "gateway_connections_silent_closed_total";

/// Connections that have not sent a byte yet, with the time each must have by (one table per
/// VM or process, keyed by the glue's connection id). Its timer closes the ones [`Silent::due`]
/// returns; a connection leaves the table at its first byte or its close.
#[derive(Debug, Default)]
pub struct Silent {
    deadlines: std::collections::HashMap<u64, u64>,
}

impl Silent {
    pub fn opened(&mut self, id: u64, deadline_ms: u64) {
        self.deadlines.insert(id, deadline_ms);
    }

    /// The connection sent data, or closed.
    pub fn forget(&mut self, id: u64) {
        self.deadlines.remove(&id);
    }

    /// The connections whose time is up, taken out of the table.
    pub fn due(&mut self, now_ms: u64) -> Vec<u64> {
        let due: Vec<u64> = self
            .deadlines
            .iter()
            .filter(|(_, d)| **d <= now_ms)
            .map(|(id, _)| *id)
            .collect();
        for id in &due {
            self.deadlines.remove(id);
        }
        due
    }

    pub fn len(&self) -> usize {
        self.deadlines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.deadlines.is_empty()
    }
}

/// The IP of a peer address as Envoy gives it (`1.2.3.4:5678`, `[::1]:5678`); `None` for
/// anything else (a Unix socket), which is not limited.
pub fn peer_ip(address: &str) -> Option<String> {
    let ip = crate::ratelimit::strip_port(address);
    ip.parse::<std::net::IpAddr>().is_ok().then_some(ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::LocalStore;

    fn limit(max: u32) -> ConnectionLimit {
        ConnectionSettings {
            max_per_client: max,
            slots: 64,
            max_age: 60,
            first_byte_timeout: None,
            budget: None,
            reserve: 0,
        }
        .compile()
        .unwrap()
    }

    /// Fourth attack: 11 addresses each holding their cap filled the listener. Past
    /// `budget - reserve`, only addresses holding no connection get in.
    #[test]
    fn clients_that_hold_connections_cannot_take_the_reserve() {
        let store = LocalStore::default();
        let seed = SlotSeed::default();
        let settings = ConnectionSettings {
            max_per_client: 10,
            slots: 1 << 16,
            max_age: 60,
            first_byte_timeout: Some(5.0),
            budget: Some(40),
            reserve: 10,
        };
        let cx = Connections {
            limit: settings.compile().unwrap(),
            seed,
        };
        let mut held = Vec::new();
        for client in 0..11 {
            for _ in 0..10 {
                if let Ok(Some(k)) = cx.open(&store, Some(&format!("10.0.1.{client}:1")), 1_000) {
                    held.push(k);
                }
            }
        }
        // 30 taken by the first three clients' caps; then each other client gets its first.
        assert_eq!(held.len(), 30 + 8, "{}", held.len());
        // A newcomer still gets in (reserve), a holder does not.
        assert!(matches!(cx.open(&store, Some("10.0.2.1:1"), 1_000), Ok(Some(_))));
        assert_eq!(cx.open(&store, Some("10.0.1.0:1"), 1_000), Err(Refused));
        // Closing brings the count down.
        for k in held.drain(..) {
            cx.close(&store, &k);
        }
        assert!(matches!(cx.open(&store, Some("10.0.1.0:1"), 1_001), Ok(Some(_))));
        // The reserve needs a budget.
        let bad = ConnectionSettings {
            budget: None,
            ..settings
        };
        assert!(bad.compile().unwrap_err().to_string().contains("reserve"));
    }

    #[test]
    fn silent_connections_are_due_at_their_deadline_and_speaking_ones_never() {
        let mut s = Silent::default();
        s.opened(1, 5_000);
        s.opened(2, 5_000);
        s.opened(3, 6_000);
        s.forget(2);
        assert!(s.due(4_999).is_empty());
        assert_eq!(s.due(5_000), vec![1]);
        assert_eq!(s.due(10_000), vec![3]);
        assert!(s.is_empty());
    }

    #[test]
    fn one_address_holds_at_most_its_share_and_others_are_untouched() {
        let store = LocalStore::default();
        let seed = SlotSeed::default();
        let l = limit(3);
        let held: Vec<Admission> = (0..5)
            .map(|_| l.admit(&store, &seed, "10.0.0.1", 1_000))
            .collect();
        assert!(matches!(
            held[..3],
            [
                Admission::Admitted(..),
                Admission::Admitted(..),
                Admission::Admitted(..)
            ]
        ));
        assert_eq!(held[3..], [Admission::Refused, Admission::Refused]);
        // Another address (another slot under this seed) is admitted.
        let other = (2..100)
            .map(|i| format!("10.0.0.{i}"))
            .find(|a| l.key(&seed, a) != l.key(&seed, "10.0.0.1"))
            .unwrap();
        assert!(matches!(
            l.admit(&store, &seed, &other, 1_000),
            Admission::Admitted(..)
        ));
        // A closed connection makes room again.
        let Admission::Admitted(counted) = &held[0] else {
            panic!()
        };
        ConnectionLimit::release(&store, &counted.slot);
        assert!(matches!(
            l.admit(&store, &seed, "10.0.0.1", 1_001),
            Admission::Admitted(..)
        ));
        assert_eq!(l.admit(&store, &seed, "10.0.0.1", 1_002), Admission::Refused);
    }

    #[test]
    fn a_slot_that_admitted_nothing_for_max_age_starts_from_zero() {
        let store = LocalStore::default();
        let seed = SlotSeed::default();
        let l = limit(1);
        assert!(matches!(
            l.admit(&store, &seed, "10.0.0.1", 1_000),
            Admission::Admitted(..)
        ));
        assert_eq!(l.admit(&store, &seed, "10.0.0.1", 60_000), Admission::Refused);
        // Never released (a VM that died): every counted connection is older than max_age.
        assert!(matches!(
            l.admit(&store, &seed, "10.0.0.1", 61_001),
            Admission::Admitted(..)
        ));
    }

    #[test]
    fn releasing_never_goes_below_zero_and_garbage_counts_as_empty() {
        let store = LocalStore::default();
        store.set("gw:cx:0", b"x", None).unwrap();
        ConnectionLimit::release(&store, "gw:cx:0");
        assert_eq!(decode(&store.get("gw:cx:0").unwrap().0), (0, 0));
    }

    #[test]
    fn settings_are_validated_and_only_a_connections_document_is_one() {
        assert_eq!(ConnectionLimit::from_json(br#"{"routes": []}"#), None);
        assert_eq!(ConnectionLimit::from_json(b"not json"), None);
        let ok = ConnectionLimit::from_json(br#"{"connections": {"max_per_client": 5, "max_age": 10}}"#);
        assert_eq!(
            ok,
            Some(Ok(ConnectionLimit {
                max_per_client: 5,
                slots: 8192,
                max_age_ms: 10_000,
                first_byte_ms: None,
                shared_above: None,
            }))
        );
        let bad = ConnectionLimit::from_json(br#"{"connections": {"max_per_client": 0, "max_age": 10}}"#);
        assert!(bad
            .unwrap()
            .unwrap_err()
            .to_string()
            .contains("connections.max_per_client"));
        let unknown =
            ConnectionLimit::from_json(br#"{"connections": {"max_per_client": 1, "max_age": 1, "x": 1}}"#);
        assert!(unknown.unwrap().is_err());
    }

    #[test]
    fn peer_addresses() {
        assert_eq!(peer_ip("10.1.2.3:5555").as_deref(), Some("10.1.2.3"));
        assert_eq!(peer_ip("[::1]:80").as_deref(), Some("::1"));
        assert_eq!(peer_ip("10.1.2.3").as_deref(), Some("10.1.2.3"));
        assert_eq!(peer_ip("/tmp/sock"), None);
        assert_eq!(peer_ip("[x]:1"), None);
        use crate::ratelimit::client_group;
        assert_eq!(client_group("10.1.2.3"), "10.1.2.3");
        assert_eq!(client_group("2001:db8:1:2:aaaa::1"), "2001:db8:1:2::/64");
        assert_eq!(client_group("2001:db8:1:2:bbbb::9"), "2001:db8:1:2::/64");
        assert_eq!(client_group("::ffff:10.1.2.3"), "10.1.2.3");
    }
}
