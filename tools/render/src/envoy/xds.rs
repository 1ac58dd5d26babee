//! The filesystem-xDS form of a bootstrap: what a running Envoy swaps in without a restart.

use super::*;

/// Files of the filesystem-xDS form (`gateway-render --xds DIR`), in the order they are swapped
/// in: clusters first (new routes may point at them), then routes, the filter's configuration,
/// and the listener (unchanged from one version to the next, so no connection is drained).
pub const XDS_FILES: [&str; 4] = ["cds.json", "rds.json", "ecds.json", "lds.json"];
/// The static bootstrap of the xDS form, and the files (name, resource) it reads.
pub type Xds = (Value, Vec<(&'static str, Value)>);
/// Splits a rendered bootstrap into a static bootstrap that reads the gateway's listener and
/// clusters from files in `dir` (LDS, CDS), the listener's routes from RDS and the filter's
/// configuration from extension config discovery (ECDS), plus those files: a new version of the
/// gateway file then reaches a running Envoy by swapping the files, without a restart. The
/// admin interface, the metrics listener and its cluster stay static.
pub fn xds(bootstrap: &Value, dir: &str) -> Result<Xds, String> {
    let source = |file: &str| {
        json!({"path_config_source": {"path": format!("{dir}/{file}"), "watched_directory": {"path": dir}},
               "resource_api_version": "V3"})
    };
    let mut b = bootstrap.clone();
    let listeners = b["static_resources"]["listeners"]
        .as_array_mut()
        .ok_or("no listeners")?;
    let at = listeners
        .iter()
        .position(|l| l["name"] == LISTENER_NAME)
        .ok_or("no gateway listener")?;
    let mut listener = listeners.remove(at);
    let hcm = listener["filter_chains"][0]["filters"]
        .as_array_mut()
        .and_then(|fs| {
            fs.iter_mut()
                .find(|f| f["name"] == "envoy.filters.network.http_connection_manager")
        })
        .map(|f| &mut f["typed_config"])
        .ok_or("no http connection manager")?;
    let mut routes = hcm["route_config"].take();
    if let Some(m) = hcm.as_object_mut() {
        m.remove("route_config");
    }
    hcm["rds"] = json!({"route_config_name": routes["name"].clone(), "config_source": source("rds.json")});
    let filters = hcm["http_filters"].as_array_mut().ok_or("no http filters")?;
    let gateway = filters
        .iter_mut()
        .find(|f| f["name"] == "envoy.filters.http.wasm" || f["name"] == NATIVE_FILTER_NAME)
        .ok_or("no gateway filter")?;
    let typed = gateway["typed_config"].take();
    let type_url = typed["@type"].clone();
    *gateway = json!({"name": PLUGIN_NAME, "config_discovery": {
        "config_source": source("ecds.json"),
        "type_urls": [type_url]}});
    let clusters = b["static_resources"]["clusters"]
        .as_array_mut()
        .ok_or("no clusters")?;
    let (keep, dynamic): (Vec<Value>, Vec<Value>) =
        clusters.drain(..).partition(|c| c["name"] == ADMIN_CLUSTER);
    *clusters = keep;
    b["dynamic_resources"] = json!({"lds_config": source("lds.json"), "cds_config": source("cds.json")});
    // xDS needs a node identity, even from files.
    b["node"] = json!({"id": PLUGIN_NAME, "cluster": PLUGIN_NAME});
    let typed_resources = |kind: &str, items: Vec<Value>| {
        let resources: Vec<Value> = items
            .into_iter()
            .map(|mut r| {
                r["@type"] = json!(kind);
                r
            })
            .collect();
        json!({ "resources": resources })
    };
    routes["@type"] = json!("type.googleapis.com/envoy.config.route.v3.RouteConfiguration");
    let mut files = vec![
        (
            "cds.json",
            typed_resources("type.googleapis.com/envoy.config.cluster.v3.Cluster", dynamic),
        ),
        ("rds.json", json!({ "resources": [routes] })),
        (
            "ecds.json",
            json!({"resources": [{"@type": "type.googleapis.com/envoy.config.core.v3.TypedExtensionConfig",
                                      "name": PLUGIN_NAME, "typed_config": typed}]}),
        ),
        (
            "lds.json",
            typed_resources(
                "type.googleapis.com/envoy.config.listener.v3.Listener",
                vec![listener],
            ),
        ),
    ];
    // Each file names its version (a digest of its resources): Envoy reports the version it
    // has in force in `/config_dump`, which is how `make reload` knows when to return.
    for (_, file) in &mut files {
        file["version_info"] = json!(content_version(file));
    }
    Ok((b, files))
}
/// The first 16 hex digits of the SHA-256 of a value's JSON: equal content, equal version.
pub fn content_version(value: &Value) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(value.to_string().as_bytes());
    digest.iter().take(8).map(|b| format!("{b:02x}")).collect()
}
