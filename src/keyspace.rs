//! Every shared-data key a configuration can make, and the check Kong's shared memory needs.
//!
//! Kong's ngx_wasm_module finds a shared-data key by its CRC32 alone and never compares the key
//! itself (`ngx_wa_shm_kv.c`): two keys with the same CRC32 would read and write one entry, so
//! a revocation-cache slot could answer for a rate-limit bucket. Envoy compares whole keys. The
//! default configuration's keys have no collision, nor do any counts below 400,000; larger ones
//! can (`revocation.cache_slots: 964063` makes `gw:rv:964062` and `gw:ban:88088` one). Where
//! the host hashes keys (`Host::shared_keys_by_hash`: the `.wasm` on a host that is not Envoy)
//! the gateway refuses such a configuration at configure time, naming the fields to change, and
//! so does `gateway-render --host kong`.
//!
//! The network filter's connection slots (`gw:cx:*`) are not counted: Kong runs HTTP filters
//! only.

use crate::config::Config;
use crate::error::ConfigError;

/// The key the start-up probe writes to find out whether the host has shared data.
pub const PROBE_KEY: &str = "gw:probe";

/// Keys numbered `prefix0` to `prefix<count - 1>`, sized by one configuration field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub field: String,
    pub prefix: String,
    pub count: u64,
}

/// The keys a configuration can write: named ones (with the field that makes each) and
/// numbered families.
pub fn keys(config: &Config) -> (Vec<(String, String)>, Vec<Family>) {
    let mut named: Vec<(String, String)> = vec![
        ("(always)".into(), PROBE_KEY.into()),
        ("(always)".into(), crate::ratelimit::SEED_KEY.into()),
    ];
    let mut families = Vec::new();
    if let Some(rv) = &config.revocation {
        named.push(("revocation".into(), crate::revocation::EPOCH_KEY.into()));
        for prefix in [
            crate::revocation::CACHE_KEY_PREFIX,
            crate::revocation::BAN_KEY_PREFIX,
        ] {
            families.push(Family {
                field: "revocation.cache_slots".into(),
                prefix: prefix.into(),
                count: u64::from(rv.cache_slots),
            });
        }
    }
    let limits = &config.rate_limits;
    let mut any_limits = false;
    for route in &config.routes {
        let Some(l) = &route.limits else { continue };
        any_limits = true;
        let field = format!("routes[name={}].rate_limit", route.name);
        named.push((field.clone(), l.route_key.clone()));
        if l.cluster_wide {
            named.push((field.clone(), l.pending_key.clone()));
            named.push((field, crate::ratelimit::cluster::LEADER_KEY.into()));
        }
    }
    if any_limits {
        for (kind, field, count) in [
            ("i", "gateway.rate_limit.ip_slots", limits.ip_slots),
            ("u", "gateway.rate_limit.user_slots", limits.user_slots),
        ] {
            families.push(Family {
                field: field.into(),
                prefix: crate::ratelimit::slot_key_at(kind, 0)
                    .trim_end_matches('0')
                    .into(),
                count: u64::from(count),
            });
        }
    }
    if let Some(budget) = &limits.bad_signatures {
        families.push(Family {
            field: "gateway.rate_limit.ip_slots".into(),
            prefix: crate::ratelimit::slot_key_at(crate::ratelimit::BUDGET_KIND, 0)
                .trim_end_matches('0')
                .into(),
            count: u64::from(budget.slots),
        });
    }
    if let Some(verifier) = &config.verifier {
        for (_, issuer, _) in verifier.remotes() {
            let field = format!("jwt.issuers[name={}]", issuer.name);
            named.push((field.clone(), crate::jwt::remote::set_key(&issuer.name)));
            named.push((field, crate::jwt::remote::lease_key(&issuer.name)));
        }
        if let Some((_, issuer, intro)) = verifier.introspecting() {
            families.push(Family {
                field: format!("jwt.issuers[name={}].introspection.cache_slots", issuer.name),
                prefix: crate::jwt::introspection::CACHE_KEY_PREFIX.into(),
                count: u64::from(intro.cache_slots),
            });
        }
        if verifier.uses_dpop() {
            families.push(Family {
                field: "jwt dpop (its replay slots)".into(),
                prefix: crate::jwt::dpop::REPLAY_KEY_PREFIX.into(),
                count: u64::from(crate::jwt::dpop::REPLAY_SLOTS),
            });
        }
    }
    // One entry per key (two cluster-wide routes share the leader key, say).
    let mut seen = std::collections::BTreeSet::new();
    named.retain(|(_, key)| seen.insert(key.clone()));
    (named, families)
}

/// Refuses a configuration two of whose keys share a CRC32 (see the module's text).
pub fn check_kong(config: &Config) -> Result<(), ConfigError> {
    let (named, families) = keys(config);
    let total = named.len() as u64 + families.iter().map(|f| f.count).sum::<u64>();
    let mut sums: Vec<u32> = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    each_key(&named, &families, |_, _, crc| {
        sums.push(crc);
        true
    });
    sums.sort_unstable();
    // Every CRC32 that occurs twice, lowest first; the first one that two distinct keys share
    // is reported (the same key twice is not a collision).
    let mut dups: Vec<u32> = sums
        .windows(2)
        .filter_map(|w| (w.first() == w.get(1)).then(|| w.first().copied()).flatten())
        .collect();
    drop(sums);
    dups.dedup();
    for dup in dups {
        let mut found: Vec<(String, String)> = Vec::with_capacity(2);
        each_key(&named, &families, |field, key, crc| {
            if crc == dup && !found.iter().any(|(_, k)| k == key) {
                found.push((field.to_string(), key.to_string()));
            }
            found.len() < 2
        });
        if let (Some((f1, k1)), Some((f2, k2))) = (found.first(), found.get(1)) {
            let fields = if f1 == f2 {
                f1.clone()
            } else {
                format!("{f1} or {f2}")
            };
            return Err(ConfigError::new(
                f2.as_str(),
                format!(
                    "shared-data keys {k1} ({f1}) and {k2} ({f2}) have the same CRC32, which Kong's shared memory \
                     takes for one key; change {fields}"
                ),
            ));
        }
    }
    Ok(())
}

/// Calls `f(field, key, crc32)` for every key until it returns false.
fn each_key(named: &[(String, String)], families: &[Family], mut f: impl FnMut(&str, &str, u32) -> bool) {
    for (field, key) in named {
        if !f(field, key, crc32(key.as_bytes())) {
            return;
        }
    }
    let mut key = String::new();
    for fam in families {
        let base = update(!0, fam.prefix.as_bytes());
        for i in 0..fam.count {
            key.clear();
            key.push_str(&fam.prefix);
            push_decimal(&mut key, i);
            let digits = key.as_bytes().get(fam.prefix.len()..).unwrap_or_default();
            if !f(&fam.field, &key, !update(base, digits)) {
                return;
            }
        }
    }
}

fn push_decimal(out: &mut String, mut n: u64) {
    let mut buf = [0u8; 20];
    let mut at = buf.len();
    loop {
        at -= 1;
        if let Some(d) = buf.get_mut(at) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || at == 0 {
            break;
        }
    }
    out.extend(buf.get(at..).unwrap_or_default().iter().map(|&b| char::from(b)));
}

/// CRC-32 (IEEE 802.3, reflected, as nginx's `ngx_crc32_long`). One 1 KB table built at compile
/// time; the `crc32fast` crate's faster slicing tables would add 16 KB to the module for a check
/// run once per configuration.
pub fn crc32(bytes: &[u8]) -> u32 {
    !update(!0, bytes)
}

fn update(mut crc: u32, bytes: &[u8]) -> u32 {
    for &b in bytes {
        let i = usize::from((crc as u8) ^ b);
        crc = TABLE.get(i).copied().unwrap_or(0) ^ (crc >> 8);
    }
    crc
}

// A const block cannot use `get_mut`; `i` is bounded by the loop.
#[allow(clippy::indexing_slicing)]
const TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(v: serde_json::Value) -> Config {
        Config::compile(serde_json::from_value(v).unwrap(), &|_| Some("x".repeat(32))).unwrap()
    }

    fn limited(ip_slots: u32, cache_slots: u32) -> serde_json::Value {
        json!({
            "gateway": {"rate_limit": {"ip_slots": ip_slots}},
            "webdis_cluster": "webdis",
            "jwt": {"secret_env": "S"},
            "revocation": {"cache_slots": cache_slots},
            "routes": [{"name": "orders", "prefix": "/orders",
                        "rate_limit": {"enabled": true, "max_calls": 10, "period": 1}}]
        })
    }

    #[test]
    fn a_key_two_routes_share_does_not_hide_a_collision() {
        let mut v = limited(16_384, 964_063);
        v["routes"] = json!([
            {"name": "a", "prefix": "/a", "rate_limit": {"enabled": true, "max_calls": 10, "period": 1, "cluster_wide": true}},
            {"name": "b", "prefix": "/b", "rate_limit": {"enabled": true, "max_calls": 10, "period": 1, "cluster_wide": true}}
        ]);
        let c = config(v);
        let (named, _) = keys(&c);
        assert_eq!(named.iter().filter(|(_, k)| k.ends_with(":leader")).count(), 1);
        let err = check_kong(&c).unwrap_err().to_string();
        assert!(
            err.contains("gw:rv:964062") && err.contains("gw:ban:88088"),
            "{err}"
        );
    }

    #[test]
    fn crc32_is_nginx_crc32() {
        // The standard check value, and nginx's own test vector.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
        assert_eq!(crc32(b"The quick brown fox jumps over the lazy dog"), 0x414F_A339);
    }

    #[test]
    fn streamed_digits_agree_with_whole_keys() {
        let fam = Family {
            field: "f".into(),
            prefix: "gw:rl:i:".into(),
            count: 1200,
        };
        let mut seen = 0;
        each_key(&[], &[fam], |_, key, crc| {
            assert_eq!(crc, crc32(key.as_bytes()), "{key}");
            seen += 1;
            true
        });
        assert_eq!(seen, 1200);
    }

    #[test]
    fn the_default_configuration_has_no_collision() {
        let c = config(limited(16_384, 16_384));
        let (named, families) = keys(&c);
        assert!(named.iter().any(|(_, k)| k == "gw:rl:r:orders"));
        // Per-IP, per-user (default 8,192), bad-signature budget, revocation cache and bans.
        assert_eq!(families.iter().map(|f| f.count).sum::<u64>(), 4 * 16_384 + 8_192);
        assert_eq!(check_kong(&c), Ok(()));
    }

    #[test]
    fn a_collision_is_refused_naming_both_fields() {
        // Found offline: gw:rl:i:<n> and gw:rv:<m> collide within these counts; the check must
        // find some pair and name the fields.
        let c = config(limited(1_000_000, 1_000_000));
        let err = check_kong(&c).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("same CRC32"), "{text}");
        assert!(text.contains("_slots"), "{text}");
        // The reported pair really collides.
        let keys: Vec<&str> = text.split_whitespace().filter(|w| w.starts_with("gw:")).collect();
        assert_eq!(keys.len(), 2, "{text}");
        assert_ne!(keys[0], keys[1]);
        assert_eq!(crc32(keys[0].as_bytes()), crc32(keys[1].as_bytes()), "{text}");
    }
}
