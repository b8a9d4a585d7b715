#!/usr/bin/env python3
"""Live migration's copy rate, and what the copy costs the app.

Per scenario and round, fresh servers: Redis A (the source, filled by
one EVAL), Redis B (the target) and the release sidecar in front of
A with both configured. The app's load is `redis-benchmark -c 10 -P 1 -t
get` through the sidecar: once before the migration (baseline), then
again while the migration copies. Reported per scenario: the copy's keys/s
and MiB/s (from POST /migrations to phase `syncing`, as the status
reports), the app's p50 and p99 during the copy against its baseline, and
medians over the rounds.

Scenarios: 1,000,000 small keys (10-byte values) at the default pace and
unpaced (max_keys_per_second 0, max_bytes_per_second 0); 1,000 values of
1 MiB at the default pace.

Usage: python3 benches/migration.py [--rounds 3] [--small 1000000] [--big 1000] [--paces 20000,10000] [--bin PATH]
(builds nothing: run `cargo build --release` first)
"""

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import free_port, start_redis, stop, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "redis-sidecar")


def cli(port, *args):
    return subprocess.run(["redis-cli", "-p", str(port), *args], check=True, capture_output=True,
                          text=True, timeout=600).stdout.strip()


def app_load(port, requests):
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "10", "-P", "1",
                          "-t", "get", "-r", "100000", "-n", str(requests), "--csv"],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    for row in csv.DictReader(io.StringIO(out)):
        return float(row["p50_latency_ms"]), float(row["p99_latency_ms"])
    raise RuntimeError(out)


def http(admin, method, path, body=None):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}{path}", method=method,
                                 data=body.encode() if body else None)
    try:
        return json.loads(urllib.request.urlopen(req).read())
    except urllib.error.HTTPError as e:
        raise RuntimeError(f"{method} {path}: {e.code} {e.read().decode()}")


def one(binary, tmp, populate, request, app_requests):
    procs = []
    try:
        a, b = start_redis(tmp, procs), start_redis(tmp, procs)
        count, prefix, size = populate
        filled = cli(a, "EVAL", "local v = string.rep('x', tonumber(ARGV[3])) "
                     "for i = 1, tonumber(ARGV[1]) do redis.call('SET', ARGV[2] .. ':' .. i, v) end "
                     "return redis.call('DBSIZE')", "0", count, prefix, size)
        if filled != count:
            raise RuntimeError(f"filling the source: {filled}")
        port, admin = free_port(), free_port()
        conf = os.path.join(tmp, f"migration-{port}.toml")
        with open(conf, "w") as f:
            f.write(f'listen = "127.0.0.1:{port}"\nadmin_listen = "127.0.0.1:{admin}"\n'
                    f'[[upstream]]\nname = "a"\nurl = "redis://127.0.0.1:{a}"\n'
                    f'[[upstream]]\nname = "b"\nurl = "redis://127.0.0.1:{b}"\n')
        procs.append(subprocess.Popen([binary, "--config", conf], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"}))
        wait_port(port)
        wait_port(admin)
        time.sleep(0.5)  # both endpoints checked up
        base = app_load(port, app_requests)
        during = []
        copying = threading.Event()

        def load():
            while not copying.is_set():
                during.append(app_load(port, app_requests // 4))

        t = threading.Thread(target=load)
        http(admin, "POST", "/migrations", json.dumps(request))
        t.start()
        while True:
            m = http(admin, "GET", "/migrations/current")
            if m["phase"] != "copying":
                break
            time.sleep(0.05)
        copying.set()
        t.join()
        if m["phase"] != "syncing":
            raise RuntimeError(f"migration: {m}")
        secs = m["elapsed_seconds"]
        if not m["keys_copied"]:
            raise RuntimeError(f"nothing copied: {m}")
        p50 = statistics.median(d[0] for d in during) if during else float("nan")
        p99 = statistics.median(d[1] for d in during) if during else float("nan")
        http(admin, "POST", "/migrations/current/abort")
        return {
            "keys_per_s": m["keys_copied"] / secs,
            "mib_per_s": m["bytes_copied"] / secs / (1 << 20),
            "seconds": secs,
            "keys": m["keys_copied"],
            "backoffs": m["backoffs"],
            "p50": (base[0], p50),
            "p99": (base[1], p99),
        }
    finally:
        stop(procs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--small", type=int, default=1_000_000)
    ap.add_argument("--big", type=int, default=1000)
    ap.add_argument("--app-requests", type=int, default=40_000)
    ap.add_argument("--paces", type=lambda v: [int(x) for x in v.split(",") if x], default=[],
                    help="also run the small keys at these max_keys_per_second (e.g. 20000,10000)")
    ap.add_argument("--bin", default=BIN, help="the sidecar binary (default: target/release)")
    args = ap.parse_args()
    binary = args.bin
    if not os.path.exists(binary):
        sys.exit(f"{binary} is missing: cargo build --release")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print(f"# {time.strftime('%Y-%m-%d')} {cpu}, {os.cpu_count()} CPUs, kernel {os.uname().release}")
    scenarios = [
        (f"{args.small:,} keys of 10 B, default pace", ["{0}".format(args.small), "key", "10"], {"to": "b"}),
        *[(f"{args.small:,} keys of 10 B, {p:,} keys/s", ["{0}".format(args.small), "key", "10"],
           {"to": "b", "max_keys_per_second": p}) for p in args.paces],
        (f"{args.small:,} keys of 10 B, unpaced", ["{0}".format(args.small), "key", "10"],
         {"to": "b", "max_keys_per_second": 0, "max_bytes_per_second": 0}),
        (f"{args.big:,} values of 1 MiB, default pace", ["{0}".format(args.big), "big", "1048576"], {"to": "b"}),
    ]
    print("| scenario | keys/s | MiB/s | copy s | app p50 ms base / during | app p99 ms base / during | p99 ratio | backoffs |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for name, populate, request in scenarios:
            runs = [one(binary, tmp, populate, request, args.app_requests) for _ in range(args.rounds)]
            med = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
            print(f"| {name} | {med(lambda r: r['keys_per_s']):,.0f} | {med(lambda r: r['mib_per_s']):.1f} "
                  f"| {med(lambda r: r['seconds']):.1f} "
                  f"| {med(lambda r: r['p50'][0]):.3f} / {med(lambda r: r['p50'][1]):.3f} "
                  f"| {med(lambda r: r['p99'][0]):.3f} / {med(lambda r: r['p99'][1]):.3f} "
                  f"| {med(lambda r: r['p99'][1] / r['p99'][0]):.2f} "
                  f"| {med(lambda r: r['backoffs']):.0f} |", flush=True)


if __name__ == "__main__":
    main()
