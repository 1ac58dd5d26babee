//! `gateway-render`: turns the gateway file into an Envoy bootstrap (with the filter's JSON
//! configuration embedded), or prints just the filter configuration.
//!
//! ```text
//! gateway-render [--config config/gateway.yaml] --wasm /path/gateway_filter.wasm [--out envoy.yaml] [--json]
//! gateway-render [--config ...] --filter-config      # the filter's JSON only
//! gateway-render [--config ...] --check              # validate only
//! gateway-render [--config ...] --host kong (--check | --filter-config)
//! ```
//! `--host kong` also refuses a configuration two of whose shared-data keys share a CRC32
//! (Kong's shared memory takes them for one key, see the filter's `keyspace`).
//! Exit status: 0 on success, 1 on an invalid gateway file, 2 on bad usage or I/O errors.

use std::process::ExitCode;

use gateway_render::envoy;
use gateway_render::gateway::{self, GatewayFile};

const USAGE: &str =
    "usage: gateway-render [--config FILE] (--wasm PATH [--native PATH] [--runtime wasm|native] [--out FILE] [--xds DIR] | [--host kong] (--filter-config | --check))";

struct Args {
    config: String,
    wasm: Option<String>,
    /// The native module, for `gateway.runtime: native` (default: beside the `.wasm`).
    native: Option<String>,
    /// Overrides `gateway.runtime` (`make run RUNTIME=native`).
    runtime: Option<gateway::Runtime>,
    out: Option<String>,
    filter_only: bool,
    check: bool,
    json: bool,
    /// `--host kong`: the configuration is for Kong's shared memory.
    kong: bool,
    /// Filesystem xDS: the gateway's listener, routes, clusters and filter configuration as
    /// files in this directory (swapped atomically; a running Envoy applies them).
    xds: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        config: "config/gateway.yaml".to_string(),
        wasm: None,
        native: None,
        runtime: None,
        out: None,
        filter_only: false,
        check: false,
        json: false,
        kong: false,
        xds: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--config" => args.config = it.next().ok_or("--config needs a value")?,
            "--wasm" => args.wasm = Some(it.next().ok_or("--wasm needs a value")?),
            "--runtime" => {
                args.runtime = Some(match it.next().as_deref() {
                    Some("wasm") => gateway::Runtime::Wasm,
                    Some("native") => gateway::Runtime::Native,
                    other => return Err(format!("--runtime takes wasm or native, not {other:?}\n{USAGE}")),
                })
            }
            "--native" => args.native = Some(it.next().ok_or("--native needs a value")?),
            "--out" => args.out = Some(it.next().ok_or("--out needs a value")?),
            "--filter-config" => args.filter_only = true,
            "--check" => args.check = true,
            "--json" => args.json = true,
            "--host" => match it.next().as_deref() {
                Some("kong") => args.kong = true,
                Some("envoy") => args.kong = false,
                other => return Err(format!("--host takes envoy or kong, not {other:?}\n{USAGE}")),
            },
            "--xds" => args.xds = Some(it.next().ok_or("--xds needs a directory")?),
            "-h" | "--help" => return Err(USAGE.to_string()),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if !args.filter_only && !args.check && args.wasm.is_none() {
        return Err(format!("--wasm is required to render the bootstrap\n{USAGE}"));
    }
    Ok(args)
}

/// Parses and validates the gateway file; errors name the file and the field.
fn load(path: &str, text: &str) -> Result<GatewayFile, String> {
    GatewayFile::parse(text).map_err(|e| format!("{path}: {e}"))
}

/// Writes a rendered file readable by its owner only (0600): it describes the whole gateway, and
/// holds the JWT secret if the gateway file gives it inline.
fn write_private(path: &str, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    // An existing file keeps its mode on open: tighten it.
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)
}

fn run(args: &Args) -> Result<(), (u8, String)> {
    let text = std::fs::read_to_string(&args.config)
        .map_err(|e| (2, format!("cannot read {}: {e}", args.config)))?;
    let mut file = load(&args.config, &text).map_err(|e| (1, e))?;
    if let Some(runtime) = args.runtime {
        file.gateway.runtime = runtime;
    }
    let inline_issuers = file
        .filter
        .jwt
        .iter()
        .flat_map(|j| j.issuers.iter())
        .filter(|i| i.secret.is_some())
        .count();
    if inline_issuers > 0 {
        eprintln!("warning: jwt.issuers[].secret is written into Envoy's configuration (and /config_dump); use secret_env");
    }
    if let Some(secret) = file.filter.jwt.as_ref().and_then(|j| j.secret.as_ref()) {
        eprintln!(
            "warning: jwt.secret is written into Envoy's configuration (and /config_dump); use secret_env"
        );
        if secret.len() < 32 {
            eprintln!(
                "warning: the JWT secret is shorter than 32 bytes; use a long random secret in production"
            );
        }
    }
    if args.kong {
        gateway_filter::keyspace::check_kong(&file.config)
            .map_err(|e| (1, format!("{}: {e}", args.config)))?;
    }
    if args.check {
        eprintln!("{}: ok ({} routes)", args.config, file.routes.len());
        return Ok(());
    }
    let output = if args.filter_only {
        serde_json::to_string_pretty(&file.filter).map_err(|e| (2, e.to_string()))?
    } else {
        let wasm_path = args.wasm.as_deref().unwrap_or_default();
        let mut value = envoy::bootstrap(
            &file,
            &envoy::RenderOptions {
                wasm_path,
                native_path: args.native.as_deref(),
            },
        )
        .map_err(|e| (1, e))?;
        if let Some(dir) = &args.xds {
            // Everything is rendered and valid before the first file is swapped in.
            let (bootstrap, files) = envoy::xds(&value, dir).map_err(|e| (1, e))?;
            std::fs::create_dir_all(dir).map_err(|e| (2, format!("cannot create {dir}: {e}")))?;
            for (name, resource) in &files {
                let data = serde_json::to_string_pretty(resource).map_err(|e| (2, e.to_string()))?;
                let tmp = format!("{dir}/.{name}.new");
                write_private(&tmp, data.as_bytes()).map_err(|e| (2, format!("cannot write {tmp}: {e}")))?;
            }
            for (name, _) in &files {
                let (tmp, path) = (format!("{dir}/.{name}.new"), format!("{dir}/{name}"));
                std::fs::rename(&tmp, &path).map_err(|e| (2, format!("cannot move {tmp} to {path}: {e}")))?;
            }
            eprintln!("{}: rendered into {dir} ({} files)", args.config, files.len());
            if args.out.is_none() {
                return Ok(());
            }
            value = bootstrap;
        }
        let header = format!(
            "# Generated by gateway-render from {}. Do not edit: edit the gateway file and render again.\n",
            args.config
        );
        if args.json {
            serde_json::to_string_pretty(&value).map_err(|e| (2, e.to_string()))?
        } else {
            header + &serde_saphyr::to_string(&value).map_err(|e| (2, e.to_string()))?
        }
    };
    match &args.out {
        Some(path) => {
            write_private(path, output.as_bytes()).map_err(|e| (2, format!("cannot write {path}: {e}")))?
        }
        None => println!("{output}"),
    }
    Ok(())
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err((code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml_errors_name_the_field() {
        let text = "gateway:\n  port: 8000\nroutes:\n  - name: a\n    prefix: /a\n    upstream: http://127.0.0.1:1\n    methods: GET\n";
        let err = load("g.yaml", text).unwrap_err();
        assert!(
            err.starts_with("g.yaml: routes[0].methods: invalid type"),
            "{err}"
        );
        assert!(err.ends_with("at line 7"), "{err}");
        let err = load("g.yaml", "gateway: {}\nroutez: []\n").unwrap_err();
        assert!(err.contains("unknown field `routez`"), "{err}");
        let err = load("g.yaml", "gateway: {port: [}\n").unwrap_err();
        assert!(err.contains("line 1"), "syntax errors carry the line: {err}");
    }

    #[test]
    fn shipped_gateway_file_is_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../config/gateway.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let file = load(path, &text).unwrap();
        let names: Vec<&str> = file.filter.routes.iter().map(|r| r.name.as_str()).collect();
        for expected in [
            "user-service",
            "product-service",
            "order-service",
            "payment-service",
            "auth-service",
            "search-service",
            "comment-service",
            "admin-service",
        ] {
            assert!(names.contains(&expected), "{expected} missing");
        }
        let admin = file
            .filter
            .routes
            .iter()
            .find(|r| r.name == "admin-service")
            .unwrap();
        assert_eq!(admin.roles, vec!["admin"]);
        // One address must not be able to spend the login route's whole budget.
        let auth = file
            .config
            .routes
            .iter()
            .find(|r| r.name == "auth-service")
            .unwrap();
        let limits = auth.limits.as_ref().unwrap();
        assert!(limits.ip.limit.max_calls < limits.route.max_calls);
        assert_eq!(limits.ip.scope, "auth-service", "a bucket per (route, address)");
    }

    #[test]
    fn istio_example_plugin_configs_are_valid() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../envoy/istio/wasmplugin.yaml");
        let text = std::fs::read_to_string(path).unwrap();
        let mut names = Vec::new();
        for doc in text.split("\n---\n") {
            let doc: serde_json::Value = serde_saphyr::from_str(doc).unwrap();
            let plugin = doc["spec"]["pluginConfig"].to_string();
            let cfg = gateway_filter::config::Config::from_json_with_env(plugin.as_bytes(), &|_| {
                Some("user:".to_string() + &"s".repeat(32))
            })
            .unwrap();
            names.push(cfg.gateway_name.clone());
            if cfg.gateway_name == "istio-ingress" {
                assert_eq!(cfg.routes.len(), 5);
                assert_eq!(
                    cfg.webdis_authority.as_deref(),
                    Some("webdis.gateway.svc.cluster.local:7379"),
                    "Istio routes the callout by host"
                );
                let store = cfg.logs.store.as_ref().unwrap();
                assert_eq!(store.authority, "webdis-logs.gateway.svc.cluster.local:7379");
            }
        }
        assert_eq!(names, ["istio-ingress", "user-service-sidecar"]);
    }
}
