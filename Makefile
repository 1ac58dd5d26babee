# The CI contract. `make run` starts the demo stack; `make test` runs every test.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# release (size-optimised, the default) or release-fast (opt-level 3)
WASM_PROFILE ?= release
WASM_RAW := target/wasm32-wasip1/$(WASM_PROFILE)/gateway_filter.wasm
WASM     := build/gateway_filter.wasm
NATIVE   := build/libgateway_filter.so
# The filter build `make run` and `make reload` use: wasm (default) or native.
RUNTIME  ?=
RENDER   := target/release/gateway-render
ENVOY_ADMIN ?= build/envoy-admin.sock
WASM_OPT_LEVEL := $(if $(filter release-fast,$(WASM_PROFILE)),-O3,-Oz)
# No function of more than 500 bytes is inlined into its only caller: wasm-opt's default (no
# bound) made 45 KB and 41 KB functions, and Envoy's V8 compiles every function with TurboFan
# up front (proxy-wasm-cpp-host turns Liftoff off), whose working memory for such a function
# tcmalloc then keeps: -5 to -6 MB RSS at the same CPU per request (README "Memory").
WASM_OPT_FLAGS := $(WASM_OPT_LEVEL) --one-caller-inline-max-function-size=500 --enable-bulk-memory --enable-sign-ext --enable-nontrapping-float-to-int \
                  --enable-mutable-globals --enable-multivalue --enable-reference-types

.PHONY: help deps build wasm native render unit e2e hosts test run lint fmt validate clean compose-config bench fuzz soak oci compose-test reload kong-test apisix-test fleet-test

help:
	@echo "make run    build everything and start the demo stack (Envoy :8000, admin :9901, demo services)"
	@echo "make test   unit tests, then end-to-end tests against real Envoy"
	@echo "make lint   cargo fmt --check and clippy (host and wasm32) with -D warnings"
	@echo "make build  the optimised filter ($(WASM)), the native module ($(NATIVE)) and the renderer"
	@echo "make run RUNTIME=native  the demo with the native module instead of the .wasm"
	@echo "make fleet-test  three gateways on a Redis Cluster: failovers under load and aimed at the replication window (not in make test; CI runs it)"
	@echo "make bench  cost per request against plain Envoy and Envoy's native filters (writes the README table)"
	@echo "make reload apply an edited config/gateway.yaml to the running \`make run\` Envoy (validated first; no restart)"
	@echo "make oci    the module as an OCI image archive Istio can pull (build/gateway-filter.oci.tar)"
	@echo "make soak   memory under a million distinct client addresses and users (about 5 minutes)"
	@echo "make kong-test KONG_NGINX=...  the request-path cases in a real Kong ngx_wasm_module nginx"
	@echo "make apisix-test APISIX_NGINX=... APISIX_LUA_PATH=...  the same in APISIX's wasm-nginx-module"
	@echo "make fuzz   libFuzzer on tokens, the configuration, webdis replies and request heads (FUZZ_SECONDS each)"

deps:
	@scripts/bootstrap.sh

wasm: deps
	cargo build --profile $(WASM_PROFILE) --target wasm32-wasip1 -p gateway-filter
	@mkdir -p build
	wasm-opt $(WASM_OPT_FLAGS) $(WASM_RAW) -o $(WASM)
	@echo "filter: $(WASM) $$(stat -c %s $(WASM)) bytes (unoptimised $$(stat -c %s $(WASM_RAW)))"

# The same policy as an Envoy dynamic module (profile native: opt-level 3, panics unwind to the
# ABI boundary instead of aborting Envoy).
native: deps
	cargo build --profile native -p gateway-native
	@mkdir -p build
	cp target/native/libgateway_native.so $(NATIVE)
	@echo "native: $(NATIVE) $$(stat -c %s $(NATIVE)) bytes"

render: deps
	cargo build --release -p gateway-render

build: wasm native render

unit: deps
	cargo test --workspace

# The suite twice: the .wasm, then the native module (the second pass deselects the modules
# about the .wasm itself, see tests/e2e/conftest.py).
e2e: build
	.venv/bin/pytest -q tests/e2e
	GATEWAY_RUNTIME=native .venv/bin/pytest -q tests/e2e

# The built module under emulated Kong, APISIX and Envoy hosts (tools/hostemu, wasmi).
hosts: build
	cargo run -q --release -p hostemu -- $(WASM)

test: unit e2e hosts

run: build
	RUNTIME=$(RUNTIME) scripts/run.sh

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	cargo clippy -p gateway-filter --target wasm32-wasip1 -- -D warnings
	python3 scripts/licenses.py
	@if command -v cargo-deny >/dev/null; then cargo deny check; \
	 else echo "lint: cargo-deny not installed: advisories not checked (deny.toml lists the accepted ones)"; fi

fmt:
	cargo fmt --all

validate: build
	$(RENDER) --wasm $(CURDIR)/$(WASM) --out build/envoy.yaml
	JWT_SECRET=$${JWT_SECRET:-validate-only-secret-validate-only} WEBDIS_AUTH=$${WEBDIS_AUTH:-validate:only} \
	  .venv/bin/envoy --mode validate -c build/envoy.yaml --disable-hot-restart -l warn

clean:
	cargo clean
	rm -rf build

compose-config: build
	@mkdir -p build/compose
	cp $(WASM) build/compose/gateway_filter.wasm
	sed -e 's#admin: {socket: build/envoy-admin.sock}#admin: {socket: /tmp/envoy-admin.sock}#' config/gateway.yaml > build/compose/gateway.yaml
	$(RENDER) --config build/compose/gateway.yaml --wasm /etc/gateway/gateway_filter.wasm --out build/compose/envoy.yaml
	python3 -c 'import json; c = json.load(open("config/webdis.json")); c.update(redis_auth="__REDIS_PASSWORD__", logfile="/tmp/webdis.log"); [r.update(http_basic_auth="__WEBDIS_AUTH__") for r in c["acl"] if "enabled" in r]; json.dump(c, open("build/compose/webdis.template.json", "w"), indent=2); c.update(redis_port=6380, http_port=7380, logfile="/tmp/webdis-logs.log"); json.dump(c, open("build/compose/webdis-logs.template.json", "w"), indent=2)'
	chmod a+r build/compose/*

compose-test: compose-config
	scripts/compose_test.sh

# The built module in real Kong and APISIX nginx builds (their modules are in no registry this
# machine reaches; see tests/nginx/test_nginx_hosts.py). Not part of `make test`.
kong-test: build
	@test -x "$(KONG_NGINX)" || { echo "kong-test: set KONG_NGINX to an nginx built with Kong's ngx_wasm_module"; exit 2; }
	KONG_NGINX=$(KONG_NGINX) .venv/bin/pytest -q tests/nginx

apisix-test: build
	@test -x "$(APISIX_NGINX)" || { echo "apisix-test: set APISIX_NGINX to an nginx with lua-nginx-module and APISIX's wasm-nginx-module"; exit 2; }
	@test -n "$(APISIX_LUA_PATH)" || { echo "apisix-test: set APISIX_LUA_PATH (finds resty.proxy-wasm, resty.http, resty.core)"; exit 2; }
	APISIX_NGINX=$(APISIX_NGINX) APISIX_LUA_PATH='$(APISIX_LUA_PATH)' .venv/bin/pytest -q tests/nginx

# Three gateways on a Redis Cluster (3 primaries, 3 replicas) through Envoy's redis_proxy:
# revocations and a cluster-wide limit across them, primaries killed under load
# (FLEET_FAILOVERS, default 10), one gateway killed. A few minutes; not part of `make test`.
# In a network namespace of its own (loopback only): the aimed failovers drop one primary's
# replication stream with iptables there, touching nothing outside the test.
fleet-test: build
	@scripts/bootstrap.sh fleet
	unshare --net sh -c 'ip link set lo up && FLEET_NETNS=1 exec .venv/bin/pytest -q -s tests/fleet'

bench: build
	@scripts/bootstrap.sh bench
	.venv/bin/python bench/bench.py

# Renders config/gateway.yaml into build/xds, the files `make run`'s Envoy watches: validated
# first (an invalid file is refused with the field and line, and nothing changes), then swapped
# in atomically, and returns once Envoy reports every new version in force (its /config_dump; a
# refused update exits 1). WEBDIS_PORT moves webdis as in `make run`; ENVOY_ADMIN is the admin
# interface to ask (the Unix socket of the shipped file, or host:port).
reload: render
	@sed -e "s#^webdis: http://127.0.0.1:7379#webdis: http://127.0.0.1:$${WEBDIS_PORT:-7379}#" \
	  -e "s#^    webdis: http://127.0.0.1:7380#    webdis: http://127.0.0.1:$${LOG_WEBDIS_PORT:-7380}#" config/gateway.yaml > build/gateway.next.yaml
	python3 scripts/await_config.py --xds build/xds --admin $(ENVOY_ADMIN) -- \
	  $(RENDER) --config build/gateway.next.yaml --wasm $(CURDIR)/$(WASM) --xds $(CURDIR)/build/xds \
	  $$(r=$${RUNTIME:-$$(cat build/runtime 2>/dev/null)}; [ -z "$$r" ] || echo --runtime $$r)

oci: wasm
	python3 scripts/oci.py

soak: build
	@scripts/bootstrap.sh bench
	.venv/bin/python bench/soak.py

fuzz:
	scripts/fuzz.sh
