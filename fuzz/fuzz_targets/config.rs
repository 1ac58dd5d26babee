//! Any bytes as the filter's JSON configuration (what `on_configure` reads): an error naming a
//! field, or a configuration; never a panic.
#![no_main]

use gateway_filter::config::Config;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = Config::from_json(data) {
        // Whatever was accepted can be matched against.
        let _ = cfg.route_for("/api/v1/users/1");
        let _ = cfg.under_prefix("/");
    }
});
