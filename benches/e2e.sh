#!/usr/bin/env bash
# End-to-end benchmark: direct Redis vs redis-sidecar vs twemproxy, one
# interleaved run of redis-benchmark. Installs redis-server, redis-tools and
# nutcracker (Debian) when missing, builds the release binary.
#   benches/e2e.sh [--rounds 3] [--requests 100000] [--baseline OTHER_BINARY | --control]
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BENCH_DEPS=1 SKIP_COMPAT_DEPS=1 scripts/install-deps.sh
cargo build --release --quiet
exec python3 benches/e2e.py "$@"
