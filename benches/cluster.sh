#!/usr/bin/env bash
# Cluster benchmark: the sidecar in front of a 3-master Redis Cluster vs a
# single Redis direct vs the sidecar in front of it, one interleaved run of
# redis-benchmark. Installs what it needs, builds the release binary.
#   benches/cluster.sh [--rounds 3] [--requests 100000] [--baseline OTHER_BINARY]
set -euo pipefail
cd "$(dirname "$0")/.."
WITH_BENCH_DEPS=1 SKIP_COMPAT_DEPS=1 scripts/install-deps.sh
cargo build --release --quiet
exec python3 benches/cluster.py "$@"
