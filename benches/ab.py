#!/usr/bin/env python3
"""A/B of two redis-sidecar binaries (a change against its baseline).

Both run in front of one redis-server; rounds of redis-benchmark alternate
between them (the order flips every round), and each run measures the
proxy's CPU time with `perf stat -e task-clock -p PID` (falling back to
/proc/PID/stat ticks when perf cannot attach). Prints, per scenario, the
median CPU microseconds per request and throughput of each binary, and the
median of the per-round ratios B/A.

Usage: python3 benches/ab.py --a OLD_BINARY --b NEW_BINARY
           [--rounds 7] [--requests 200000] [--scenarios "50:1,50:16,1000:1"]
           [--tests get,set] [--b-config FILE]

With --b-config, B runs with that configuration file (the command line
still sets its listen address and upstream): the cost of a policy, e.g.
the same binary with and without TTL rules (benches/ttl-rules.toml):

  python3 benches/ab.py --a target/release/redis-sidecar --b target/release/redis-sidecar \
      --b-config benches/ttl-rules.toml --tests set,hset --scenarios 50:1,50:16
"""

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import cpu_seconds as proc_cpu, start_redis, start_sidecar, stop  # noqa: E402


def measure(pid, port, clients, pipeline, requests, test):
    """(CPU seconds of the proxy, requests per second)."""
    perf = subprocess.Popen(["perf", "stat", "-x,", "-e", "task-clock", "-p", str(pid)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.2)
    cpu0 = proc_cpu(pid)
    out = subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(clients), "-P", str(pipeline),
                          "-n", str(requests), "-t", test, "--csv"], capture_output=True, text=True).stdout
    cpu1 = proc_cpu(pid)
    perf.send_signal(signal.SIGINT)
    err = perf.communicate()[1]
    cpu = None
    for line in err.splitlines():
        parts = line.split(",")
        if len(parts) > 2 and "task-clock" in parts[2]:
            try:
                cpu = float(parts[0]) / 1000.0
            except ValueError:
                cpu = None
    if cpu is None:
        cpu = cpu1 - cpu0
    rps = 0.0
    for line in out.splitlines():
        cols = [c.strip('"') for c in line.split(",")]
        if len(cols) > 1 and cols[0] != "test":
            rps = float(cols[1])
    return cpu, rps


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="baseline binary")
    ap.add_argument("--b", required=True, help="changed binary")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--scenarios", default="50:1,50:16,1000:1", help="clients:pipeline,...")
    ap.add_argument("--tests", default="get,set")
    ap.add_argument("--b-config", help="configuration file for B")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="redis-sidecar-ab-")
    procs = []
    try:
        rport = start_redis(tmp, procs)
        sides = {}
        for name, binary in (("A", args.a), ("B", args.b)):
            config = args.b_config if name == "B" else None
            pid, port, _ = start_sidecar(binary, rport, procs, config)
            sides[name] = (pid, port)
        scenarios = [tuple(int(x) for x in s.split(":")) for s in args.scenarios.split(",")]
        tests = args.tests.split(",")
        res = {}
        for rnd in range(args.rounds):
            order = ["A", "B"] if rnd % 2 == 0 else ["B", "A"]
            for c, p in scenarios:
                for t in tests:
                    for side in order:
                        pid, port = sides[side]
                        cpu, rps = measure(pid, port, c, p, args.requests, t)
                        res.setdefault((c, p, t, side), []).append((cpu / args.requests * 1e6, rps))
                    a, b = res[(c, p, t, "A")][-1], res[(c, p, t, "B")][-1]
                    print(f"round {rnd + 1} c{c} P{p} {t}: A {a[0]:.2f} us/req {a[1]:.0f} rps; "
                          f"B {b[0]:.2f} us/req {b[1]:.0f} rps", flush=True)
        print(f"\n{args.rounds} interleaved rounds, redis-benchmark -n {args.requests}; medians\n")
        print("| scenario | test | CPU us/req A | CPU us/req B | B/A CPU | rps A | rps B | B/A rps |")
        print("|---|---|---|---|---|---|---|---|")
        for c, p in scenarios:
            for t in tests:
                a, b = res[(c, p, t, "A")], res[(c, p, t, "B")]
                cpu_ratio = statistics.median(y[0] / x[0] for x, y in zip(a, b))
                rps_ratio = statistics.median(y[1] / x[1] for x, y in zip(a, b))
                print(f"| c{c} P{p} | {t.upper()} | {statistics.median(x[0] for x in a):.2f} | "
                      f"{statistics.median(x[0] for x in b):.2f} | {cpu_ratio:.3f} | "
                      f"{statistics.median(x[1] for x in a):.0f} | {statistics.median(x[1] for x in b):.0f} | "
                      f"{rps_ratio:.3f} |")
        # The upstream's work: what each side sent (B's policies may add
        # commands, e.g. a shared rate limit's EVALSHA).
        stats = subprocess.run(["redis-cli", "-p", str(rport), "INFO", "commandstats"],
                               capture_output=True, text=True).stdout
        total = args.rounds * len(scenarios) * len(tests) * args.requests
        print(f"\nupstream commandstats (A and B sent {total} benchmark requests each):")
        for line in stats.splitlines():
            if line.startswith("cmdstat_"):
                name, fields = line.split(":", 1)
                kv = dict(f.split("=") for f in fields.split(","))
                calls, usec = int(kv["calls"]), float(kv["usec"])
                print(f"  {name[8:]}: {calls} calls, {usec / 1e6:.3f} s, "
                      f"{calls / total:.4f} per B request, {usec / total:.3f} us per B request")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
