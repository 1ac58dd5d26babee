"""Istio's stats configuration, as istiod's bootstrap gives every proxy: transcribed from
istio/istio at tag 1.28.10 (commit ff49c1889ebad8d444b8f82425a2fd326c039e54; the stats parts
are identical at 1.28.0, b8d1df54465060428c2a2a38286e360beb85fb31),
`tools/packaging/common/envoy_bootstrap.json` (the `stats_config` block of the template, lines
82-194) and `pkg/bootstrap/config.go` (`getStatsOptions`: the required inclusion prefixes,
suffixes and regexes, and the extra stat tags from `proxyConfig.extraStatTags` or the pod
annotation `sidecar.istio.io/extraStatTags`). No Kubernetes here: this is the part of istiod's
bootstrap that decides whether the filter's metrics keep their labels.

Since the 2023 transcription (002dd6f5): istiod suffixes every cluster's `alt_stat_name` and
every HTTP connection manager's `stat_prefix` with `;` (istio/istio#51861, #52031, #52234;
the old regexes behind ENABLE_DELIMITED_STATS_TAG_REGEX were removed in #55207), so
`cluster_name` and `http_conn_manager_prefix` match up to that `;`; a `thread_name` tag was
added (#52743); the required regex is `vhost\\..*\\.route\\..*` (#51640). The extra-stat-tag
regex, the `wasm` inclusion prefix and `use_all_default_tags: false` are unchanged."""

ISTIO_TAG = "1.28.10"
ISTIO_COMMIT = "ff49c1889ebad8d444b8f82425a2fd326c039e54"

# The template's stats_tags before `{{- range .extraStatTags }}`.
_BEFORE_EXTRA = [
    {"tag_name": "cluster_name", "regex": r"^cluster(\.(.+);)"},
    {"tag_name": "http_conn_manager_prefix",
     "regex": r"^http\.(((?:[_.[:digit:]\w]*|[_\[\]aAbBcCdDeEfF[:digit:]\w\:]*));\.)"},
    {"tag_name": "thread_name", "regex": r"^server(\.(.+))\.watchdog"},
    {"tag_name": "tcp_prefix", "regex": r"^tcp\.((.*?)\.)\w+?$"},
    {"regex": r"_rq(_(\d{3}))$", "tag_name": "response_code"},
    {"tag_name": "response_code_class", "regex": r"_rq(_(\dxx))$"},
    {"tag_name": "http_conn_manager_listener_prefix",
     "regex": r"^listener(?=\.).*?\.http\.(((?:[_.[:digit:]]*|[_\[\]aAbBcCdDeEfF[:digit:]]*))\.)"},
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
# config.go: requiredEnvoyStatsMatcherInclusionPrefixes, rbacEnvoyStatsMatcherInclusionSuffix
# (plus "downstream_cx_active" only when the proxy sets EXIT_ON_ZERO_ACTIVE_CONNECTIONS:
# requiredEnvoyStatsMatcherInclusionSuffixes), requiredEnvoyStatsMatcherInclusionRegexes.
# User prefixes/suffixes/regexes (annotation, else proxyConfig.proxyStatsMatcher) come first
# and these are appended; none are set here.
_PREFIXES = ["cluster_manager", "listener_manager", "server", "cluster.xds-grpc", "wasm"]
_SUFFIXES = ["rbac.allowed", "rbac.denied", "shadow_allowed", "shadow_denied"]
_REGEXES = [r"vhost\..*\.route\..*"]
# The template adds {"prefix": "workload_discovery"} right after "reporter=" when metadata
# discovery is on: always for a waypoint (node ID `waypoint~...`, config.go
# `toTemplateParams`), otherwise only with ISTIO_META_METADATA_DISCOVERY=true (and delta xDS,
# ISTIO_DELTA_XDS, on by default in 1.28). A sidecar or ingress gateway, as here, does not.
_METADATA_DISCOVERY_PREFIX = "workload_discovery"


def stats_config(extra_stat_tags, waypoint=False):
    """The bootstrap's `stats_config` for a proxy with these extra stat tags (deduplicated in
    order, as `removeDuplicates` does; each rendered unescaped into `({tag}=\\.=(.*?);\\.;)`).
    `waypoint`: metadata discovery is on, as for every waypoint."""
    tags = list(dict.fromkeys(t for t in extra_stat_tags if t))
    extra = [{"regex": rf"({t}=\.=(.*?);\.;)", "tag_name": t} for t in tags]
    patterns = [{"prefix": "reporter="}]
    if waypoint:
        patterns.append({"prefix": _METADATA_DISCOVERY_PREFIX})
    patterns += [{"prefix": p} for p in _PREFIXES]
    patterns += [{"suffix": s} for s in _SUFFIXES]
    patterns += [{"safe_regex": {"regex": r}} for r in _REGEXES]
    patterns += [{"prefix": "component"}, {"prefix": "istio"}]
    return {
        "use_all_default_tags": False,
        "stats_tags": _BEFORE_EXTRA + extra + _AFTER_EXTRA,
        "stats_matcher": {"inclusion_list": {"patterns": patterns}},
    }
