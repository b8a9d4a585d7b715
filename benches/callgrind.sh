#!/usr/bin/env bash
# Instructions the sidecar executes for a fixed workload, counted by
# valgrind's callgrind: repeatable whatever else the machine is doing, so
# two binaries can be compared without noise (user space only; the kernel's
# share, most of the CPU time, is not counted).
#   benches/callgrind.sh BINARY [BINARY...]
# CALLGRIND_CONFIG=FILE runs each with that configuration file (a policy's
# cost: the same binary with and without it). CALLGRIND_UPSTREAM=URL uses
# that upstream (e.g. a running cluster's redis-cluster://...) instead of
# a redis-server started here.
# Workload: redis-benchmark -c 10, 20,000 GET+SET at -P 1, 40,000 at -P 16.
set -euo pipefail
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
for bin in "$@"; do
  rp=$(free_port); sp=$(free_port); out=$(mktemp)
  rpid=""
  if [ -z "${CALLGRIND_UPSTREAM:-}" ]; then
    redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no >/dev/null &
    rpid=$!
    sleep 0.3
  fi
  valgrind --tool=callgrind --callgrind-out-file="$out" "$bin" ${CALLGRIND_CONFIG:+--config "$CALLGRIND_CONFIG"} --listen "127.0.0.1:$sp" \
    --admin-listen "" --upstream "${CALLGRIND_UPSTREAM:-redis://127.0.0.1:$rp}" >/dev/null 2>&1 &
  vpid=$!
  # Ready once a write goes through (a cluster's slot map read).
  for _ in $(seq 150); do [ "$(redis-cli -p "$sp" set ready 1 2>/dev/null)" = OK ] && break; sleep 0.2; done
  redis-benchmark -p "$sp" -c 10 -P 1 -n 20000 -t get,set -q >/dev/null
  redis-benchmark -p "$sp" -c 10 -P 16 -n 40000 -t get,set -q >/dev/null
  kill -TERM "$vpid"; wait "$vpid" || true
  if [ -n "$rpid" ]; then kill "$rpid"; wait "$rpid" 2>/dev/null || true; fi
  echo "$bin: $(grep -E '^summary' "$out" | awk '{print $2}') instructions"
  rm -f "$out"
done
