#!/usr/bin/env bash
# System calls, context switches and CPU per request of the sidecar under
# redis-benchmark GET, counted by perf stat on its process.
#   benches/syscalls.sh BINARY [CONFIG|none] [CLIENTS] [PIPELINE] [REQUESTS]
# BINARY `twemproxy`: nutcracker with one server connection (as
# benches/e2e.py runs it), counted the same way.
# e.g. alternate `none` and benches/one-shared-connection.toml several
# times: one run per line, "sys/req cs/req us/req rps".
set -euo pipefail
BIN=$1; CFG=${2:-none}; C=${3:-50}; P=${4:-1}; N=${5:-200000}
fp() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
rp=$(fp); sp=$(fp); out=$(mktemp)
redis-server --port "$rp" --bind 127.0.0.1 --save '' --appendonly no >/dev/null & R=$!
sleep 0.3
if [ "$BIN" = twemproxy ]; then
  nc=$(mktemp -d)
  printf 'bench:\n  listen: 127.0.0.1:%s\n  hash: fnv1a_64\n  distribution: ketama\n  redis: true\n  server_connections: 1\n  servers:\n   - 127.0.0.1:%s:1\n' "$sp" "$rp" >"$nc/nutcracker.yml"
  nutcracker -c "$nc/nutcracker.yml" -s "$(fp)" -o "$nc/nc.log" >/dev/null 2>&1 & S=$!
else
  extra=(); [ "$CFG" != none ] && extra=(--config "$CFG")
  "$BIN" "${extra[@]}" --listen "127.0.0.1:$sp" --admin-listen "" --upstream "redis://127.0.0.1:$rp" >/dev/null 2>&1 & S=$!
fi
for _ in $(seq 100); do redis-cli -p "$sp" ping >/dev/null 2>&1 && break; sleep 0.05; done
redis-benchmark -p "$sp" -c "$C" -P "$P" -n 20000 -t get -q >/dev/null 2>&1
perf stat -x, -e raw_syscalls:sys_enter,context-switches,task-clock -p "$S" 2>"$out" & PF=$!
sleep 0.2
rps=$(redis-benchmark -p "$sp" -c "$C" -P "$P" -n "$N" -t get -q 2>/dev/null | grep -o '[0-9.]* requests per second' | cut -d' ' -f1)
kill -INT "$PF"; wait "$PF" 2>/dev/null || true
python3 - "$out" "$N" "$rps" <<'PY'
import sys
f, n, rps = sys.argv[1], int(sys.argv[2]), sys.argv[3]
v = {}
for line in open(f):
    p = line.strip().split(",")
    if len(p) > 2 and p[0].replace(".", "").isdigit():
        v[p[2]] = float(p[0])
print(f"sys/req {v.get('raw_syscalls:sys_enter', 0) / n:.3f} cs/req {v.get('context-switches', 0) / n:.3f} "
      f"us/req {v.get('task-clock', 0) * 1000 / n:.2f} rps {rps}")
PY
kill "$S" "$R"; wait 2>/dev/null || true
rm -f "$out"; [ -n "${nc:-}" ] && rm -rf "$nc"; true
