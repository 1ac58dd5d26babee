"""Istio's stats configuration, as istiod's bootstrap gives every proxy: transcribed from
istio/istio at commit 002dd6f5b6db556530ea06cf46d94bcee8ab7777, `tools/packaging/common/
envoy_bootstrap.json` (the `stats_config` block of the template) and `pkg/bootstrap/config.go`
(`getStatsOptions`: the required inclusion prefixes, suffixes and regexes, and the extra stat
tags from `proxyConfig.extraStatTags` or the pod annotation `sidecar.istio.io/extraStatTags`).
No Kubernetes here: this is the part of istiod's bootstrap that decides whether the filter's
metrics keep their labels."""

ISTIO_COMMIT = "002dd6f5b6db556530ea06cf46d94bcee8ab7777"

# The template's stats_tags before `{{- range .extraStatTags }}`.
_BEFORE_EXTRA = [
    {"tag_name": "cluster_name", "regex": r"^cluster\.((.+?(\..+?\.svc\.cluster\.local)?)\.)"},
    {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
    {"regex": r"_rq(_(\d{3}))$", "tag_name": "response_code"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
    {"tag_name": "http_conn_manager_listener_prefix",
     "regex": r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "http_conn_manager_prefix",
     "regex": r"^http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "listener_address",
     "regex": r"^listener\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
    {"tag_name": "mongo_prefix", "regex": r"^mongo\.(.+?)\.(collection|cmd|cx_|op_|delays_|decoding_)(.*?)$"},
]
# ... and after it.
_AFTER_EXTRA = [
    {"regex": r"(cache\.(.+?)\.)", "tag_name": "cache"},
    {"regex": r"(component\.(.+?)\.)", "tag_name": "component"},
    {"regex": r"(tag\.(.+?);\.)", "tag_name": "tag"},
    {"regex": r"(wasm_filter\.(.+?)\.)", "tag_name": "wasm_filter"},
    {"tag_name": "authz_enforce_result", "regex": r"rbac(\.(allowed|denied))"},
    {"tag_name": "authz_dry_run_action", "regex": r"(\.istio_dry_run_(allow|deny)_)"},
    {"tag_name": "authz_dry_run_result", "regex": r"(\.shadow_(allowed|denied))"},
]
# config.go: requiredEnvoyStatsMatcherInclusionPrefixes, rbacEnvoyStatsMatcherInclusionSuffix,
# requiredEnvoyStatsMatcherInclusionRegexes.
_PREFIXES = ["cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"]
_SUFFIXES = ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"]
_REGEXES = [r"vhost\.*\.route\.*"]


def stats_config(extra_stat_tags):
    """The bootstrap's `stats_config` for a proxy with these extra stat tags (deduplicated in
    order, as `removeDuplicates` does)."""
    tags = list(dict.fromkeys(t for t in extra_stat_tags if t))
    extra = [{"regex": rf"({t}=\.=(.*?);\.;)", "tag_name": t} for t in tags]
    patterns = [{"prefix": "reporter="}]
    patterns += [{"prefix": p} for p in _PREFIXES]
    patterns += [{"suffix": s} for s in _SUFFIXES]
    patterns += [{"safe_regex": {"regex": r}} for r in _REGEXES]
    patterns += [{"prefix": "component"}, {"prefix": "istio"}]
    return {
        "use_all_default_tags": False,
        "stats_tags": _BEFORE_EXTRA + extra + _AFTER_EXTRA,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    }
