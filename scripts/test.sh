#!/usr/bin/env bash
# The whole test suite: formatting, lints, unit, integration, property and
# compatibility tests (real redis-server, ioredis, BullMQ, connect-redis,
# redis-py). Installs what it needs first. CI (.ci/run) runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --all-targets -- -D warnings
cargo test --no-fail-fast -- --include-ignored
