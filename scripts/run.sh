#!/usr/bin/env bash
# Run the sidecar on 127.0.0.1:6380 in front of a local Redis.
# Installs redis-server if it is missing and starts one on 127.0.0.1:6379
# when nothing answers there (or uses $REDIS_URL when set).
# Extra arguments go to redis-sidecar (e.g. --config config/redis-sidecar.toml).
set -euo pipefail
cd "$(dirname "$0")/.."
SKIP_COMPAT_DEPS=1 scripts/install-deps.sh
if [ -z "${REDIS_URL:-}" ]; then
  if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    echo "starting redis-server on 127.0.0.1:6379"
    redis-server --port 6379 --bind 127.0.0.1 --daemonize yes --save '' --appendonly no \
      --logfile "${TMPDIR:-/tmp}/redis-sidecar-demo-redis.log"
    for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
  fi
  export REDIS_URL=redis://127.0.0.1:6379
fi
if [ ! -x target/release/redis-sidecar ]; then
  echo "building redis-sidecar (release, optimised: the first build takes a few minutes; later ones are quick)"
fi
cargo build --release
echo "redis-sidecar: clients connect to redis://127.0.0.1:6380, metrics on http://127.0.0.1:9121/metrics"
exec ./target/release/redis-sidecar "$@"
