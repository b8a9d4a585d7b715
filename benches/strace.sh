#!/usr/bin/env bash
# Which system calls the sidecar makes under redis-benchmark GET, and how
# many: `strace -f -c` attached to its process for one run (strace slows
# it, so the counts per request, not the times, are what to read).
#   benches/strace.sh BINARY [CLIENTS] [PIPELINE] [REQUESTS]
# e.g. benches/strace.sh target/release/redis-sidecar 50 1 50000
# PROFILE=1: instead, `perf record -e cpu-clock -g` of the same run, and
# the share of the samples in the kernel, the binary and libc, and the
# top symbols.
set -euo pipefail
BIN=$1; C=${2:-50}; P=${3:-1}; N=${4:-50000}
command -v strace >/dev/null || { apt-get update -qq && apt-get install -y -qq strace >/dev/null; }
fp() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rp=$(fp); sp=$(fp); out=$(mktemp)
redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & R=$!
sleep 0.3
"$BIN" --listen "127.0.0.1:$sp" --admin-listen "" --upstream "redis://127.0.0.1:$rp" >/dev/null 2>&1 & S=$!
for _ in $(seq 100); do redis-cli -p "$sp" ping >/dev/null 2>&1 && break; sleep 0.05; done
timeout 60 redis-benchmark -p "$sp" -c "$C" -P "$P" -n 20000 -t get -q >/dev/null 2>&1
if [ -n "${PROFILE:-}" ]; then
  perf record -q -e cpu-clock -F 4999 -g -p "$S" -o "$out.perf" 2>/dev/null & ST=$!
else
  strace -f -c -p "$S" -o "$out" 2>/dev/null & ST=$!
fi
sleep 0.5
timeout 300 redis-benchmark -p "$sp" -c "$C" -P "$P" -n "$N" -t get -q 2>/dev/null | tail -1
kill -INT "$ST"; wait "$ST" 2>/dev/null || true
kill "$S" "$R"; wait 2>/dev/null || true
if [ -n "${PROFILE:-}" ]; then
  perf report -i "$out.perf" --no-children --sort dso -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -5
  perf report -i "$out.perf" --no-children --sort dso,sym -g none 2>/dev/null | grep -v '^#' | grep -v '^$' | head -15
  rm -f "$out" "$out.perf"; exit 0
fi
python3 - "$out" "$N" <<'PY'
import sys
n = int(sys.argv[2])
for line in open(sys.argv[1]):
    p = line.split()
    if len(p) >= 5 and p[0][0].isdigit() and p[-1] != "total":
        print(f"{p[-1]:>14} {int(p[3]) / n:.3f} per request")
PY
rm -f "$out"
