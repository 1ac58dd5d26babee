//! Any bytes as the body of every webdis reply the filter reads, with any status.
#![no_main]

use gateway_filter::{access_log, ratelimit, revocation};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (status, body) = match data.split_first() {
        Some((s, rest)) => (if *s == 0 { None } else { Some(u16::from(*s) + 100) }, rest),
        None => (None, data),
    };
    for status in [status, Some(200)] {
        let _ = revocation::parse_lookup(status, body, true);
        let _ = revocation::parse_lookup(status, body, false);
        let _ = revocation::parse_setex(status, body);
        let _ = revocation::parse_set_nx(status, body);
        let _ = ratelimit::cluster::parse_incrby(status, body);
        let _ = access_log::parse_range(status, body);
        let _ = access_log::write_ok(status, body);
    }
    // Shared-data entries are bytes too (another VM, another version).
    let _ = revocation::CacheEntry::decode(body);
    let _ = ratelimit::Bucket::decode(body);
});
