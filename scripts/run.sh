#!/usr/bin/env bash
# `make run`: the demo stack in the foreground. Ctrl-C or SIGTERM stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_SECRET="demo-secret-change-me-demo-secret-change-me"
if [ -z "${JWT_SECRET:-}" ]; then
  echo "WARNING: JWT_SECRET is not set; using the demo secret. Never do this in production." >&2
  export JWT_SECRET="$DEMO_SECRET"
fi

REDIS_PORT="${REDIS_PORT:-6379}"
WEBDIS_PORT="${WEBDIS_PORT:-7379}"
# The log store's own Redis and webdis (same credentials): records never fill the revocation store.
LOG_REDIS_PORT="${LOG_REDIS_PORT:-6380}"
LOG_WEBDIS_PORT="${LOG_WEBDIS_PORT:-7380}"
# Credentials of this run, unless given: the filter authenticates to webdis, webdis to Redis.
random_secret() { python3 -c 'import secrets; print(secrets.token_hex(16))'; }
export WEBDIS_AUTH="${WEBDIS_AUTH:-gateway:$(random_secret)}"
REDIS_PASSWORD="${REDIS_PASSWORD:-$(random_secret)}"

mkdir -p build
# The gateway file names webdis at 7379; follow WEBDIS_PORT if it was overridden.
sed -e "s#^webdis: http://127.0.0.1:7379#webdis: http://127.0.0.1:${WEBDIS_PORT}#" \
    -e "s#^    webdis: http://127.0.0.1:7380#    webdis: http://127.0.0.1:${LOG_WEBDIS_PORT}#" config/gateway.yaml > build/gateway.yaml
# Listener, routes, clusters and the filter's configuration as filesystem-xDS files in build/xds:
# `make reload` applies an edited config/gateway.yaml to the running Envoy without a restart.
# RUNTIME=native (make run RUNTIME=native): the native module instead of the .wasm; make reload
# keeps it (build/runtime).
runtime_args=()
if [ -n "${RUNTIME:-}" ]; then
  runtime_args=(--runtime "$RUNTIME")
  echo "$RUNTIME" > build/runtime
else
  rm -f build/runtime
fi
target/release/gateway-render --config build/gateway.yaml --wasm "$PWD/build/gateway_filter.wasm" \
  "${runtime_args[@]}" --xds "$PWD/build/xds" --out build/envoy.yaml
REDIS_PASSWORD="$REDIS_PASSWORD" python3 - "$REDIS_PORT" "$WEBDIS_PORT" "$LOG_REDIS_PORT" "$LOG_WEBDIS_PORT" <<'PY'
import json, os, sys
for name, redis_port, http_port in (("webdis", sys.argv[1], sys.argv[2]), ("webdis-logs", sys.argv[3], sys.argv[4])):
    cfg = json.load(open("config/webdis.json"))
    cfg.update(redis_port=int(redis_port), http_port=int(http_port), redis_auth=os.environ["REDIS_PASSWORD"],
               logfile=f"build/{name}.log")
    for rule in cfg["acl"]:
        if "enabled" in rule:
            rule["http_basic_auth"] = os.environ["WEBDIS_AUTH"]
    fd = os.open(f"build/{name}.json", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(cfg, f, indent=2)
PY

pids=()
cleanup() {
  trap - INT TERM EXIT
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  echo "stopped."
}
trap cleanup INT TERM EXIT

redis-server config/redis.conf --port "$REDIS_PORT" --dir "$PWD/build" --requirepass "$REDIS_PASSWORD" &
pids+=($!)
webdis build/webdis.json &
pids+=($!)
mkdir -p build/redis-logs
redis-server config/redis.conf --port "$LOG_REDIS_PORT" --dir "$PWD/build/redis-logs" --requirepass "$REDIS_PASSWORD" &
pids+=($!)
webdis build/webdis-logs.json &
pids+=($!)

.venv/bin/python demo/services.py \
  --echo user-service=8001 --echo order-service=8002 --echo product-service=8003 \
  --echo payment-service=8004 --echo search-service=8006 --echo comment-service=8007 \
  --echo admin-service=8008 --echo order-service=8009:v2 --auth auth-service=8005 &
pids+=($!)

.venv/bin/envoy -c build/envoy.yaml --concurrency 2 --disable-hot-restart -l warn \
  --component-log-level wasm:info &
pids+=($!)

for _ in $(seq 1 100); do
  if curl -fs http://127.0.0.1:9901/ready >/dev/null 2>&1 && curl -fs -o /dev/null http://127.0.0.1:8000/health \
     && curl -fs -o /dev/null -u "$WEBDIS_AUTH" "http://127.0.0.1:${WEBDIS_PORT}/PING" \
     && curl -fs -o /dev/null -u "$WEBDIS_AUTH" "http://127.0.0.1:${LOG_WEBDIS_PORT}/PING"; then
    break
  fi
  for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null || { echo "a process exited during startup" >&2; exit 1; }; done
  sleep 0.1
done

cat <<TXT

Gateway is up.
  Envoy + filter      http://127.0.0.1:8000   (routes under /api/v1, /health)
  Envoy admin         unix socket build/envoy-admin.sock (mode 0600), e.g.
                      curl --unix-socket build/envoy-admin.sock http://admin/stats
  metrics             http://127.0.0.1:9901/stats/prometheus (and /ready; nothing else)
  Redis               127.0.0.1:${REDIS_PORT} (password: the redis_auth of build/webdis.json; not printed)
  webdis              http://127.0.0.1:${WEBDIS_PORT} (HTTP basic: the user:password in WEBDIS_AUTH,
                      also the http_basic_auth of build/webdis.json, mode 0600; not printed)
  log store           webdis http://127.0.0.1:${LOG_WEBDIS_PORT}, Redis 127.0.0.1:${LOG_REDIS_PORT} (same credentials)
  user-service 8001   order-service 8002   product-service 8003   payment-service 8004
  auth-service 8005   search-service 8006  comment-service 8007   admin-service 8008
  order-service v2 (canary) 8009

Try:
  curl -s localhost:8000/api/v1/products/1
  TOKEN=\$(curl -s -X POST localhost:8000/api/v1/auth/login -H 'content-type: application/json' \\
          -d '{"username":"admin","password":"123456"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s localhost:8000/api/v1/users/123 -H "Authorization: Bearer \$TOKEN"
  curl -s localhost:8000/api/v1/orders/1 -H "Authorization: Bearer \$TOKEN"      # user-001: the v2 canary
  curl -s localhost:8000/api/v1/admin/anything -H "Authorization: Bearer \$TOKEN"
  (alice/alice123 logs in with role "user": the admin route answers her 403)
  curl -s -X POST localhost:8000/api/v1/auth/refresh -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST localhost:8000/api/v1/admin/users/user-002/revoke -H "Authorization: Bearer \$TOKEN"
  curl -s -X POST localhost:8000/api/v1/auth/logout -H "Authorization: Bearer \$TOKEN"   # then reuse it: 401

  # An RS256 token from the demo identity provider (also "ES256", "EdDSA"), verified with its
  # published keys (http://127.0.0.1:8005/.well-known/jwks.json, fetched every 5 s):
  RS=\$(curl -s -X POST localhost:8000/api/v1/auth/login -H 'content-type: application/json' \\
       -d '{"username":"alice","password":"alice123","alg":"RS256"}' | python3 -c 'import json,sys; print(json.load(sys.stdin)["access_token"])')
  curl -s localhost:8000/api/v1/users/123 -H "Authorization: Bearer \$RS"
  curl -s -X POST localhost:8005/admin/rotate     # new keys: the next new token's kid is fetched at once

  # Edit config/gateway.yaml (a route, a limit, a canary percentage), then, in another shell:
  make reload                                     # validated, then applied live: no restart, no dropped connection

Ctrl-C stops everything.
TXT
wait -n "${pids[@]}" || true
