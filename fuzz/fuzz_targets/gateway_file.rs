//! Any text as the gateway file (YAML): parsed, split, validated and, when accepted, rendered
//! into an Envoy bootstrap and the filter's configuration, which the filter must accept. Nothing
//! may panic; an error names a field.
#![no_main]

use gateway_render::envoy::{bootstrap, RenderOptions};
use gateway_render::gateway::GatewayFile;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match GatewayFile::parse(text) {
        Err(e) => assert!(!e.to_string().is_empty()),
        Ok(file) => {
            let rendered = bootstrap(&file, &RenderOptions { wasm_path: "/x.wasm", native_path: None });
            assert!(rendered.is_ok(), "an accepted file renders: {rendered:?}");
            let json = serde_json::to_string(&file.filter).unwrap_or_default();
            let env = |_: &str| Some("fuzz-secret-fuzz-secret".to_string());
            assert!(
                gateway_filter::config::Config::from_json_with_env(json.as_bytes(), &env).is_ok(),
                "the filter accepts what the renderer accepted"
            );
        }
    }
});
