#!/usr/bin/env python3
"""Cluster benchmark: the sidecar in front of a 3-master Redis Cluster vs a
single Redis direct vs the sidecar in front of that single Redis.

redis-benchmark runs against the three targets interleaved (round-robin,
several rounds): GET/SET with 50 clients at pipeline 1 and 16, and MGET of
10 keys that hash to 10 different slots (a split and a merge through the
sidecar in front of the cluster). Reported: medians of per-round ratios to
direct Redis (throughput, p50) and the sidecars' CPU time per operation.

With --baseline OTHER_BINARY, that build runs in the same rounds in front of
the same servers, and this build is compared with it (an A/B of a change).

Usage: benches/cluster.sh [--rounds N] [--requests N] [--baseline BIN]   (installs what it needs)
"""

import argparse
import csv
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import ROOT, cpu_seconds, free_port, start_redis, start_sidecar, stop, wait_port  # noqa: E402

MGET_KEYS = [f"mget:{i}" for i in range(10)]


def start_cluster(tmp, procs):
    """Three masters, no replicas (the benchmark measures routing, not
    replication): their ports."""
    ports = []
    while len(ports) < 3:
        p = free_port()
        if p > 55000:
            continue
        d = os.path.join(tmp, f"node-{p}")
        os.makedirs(d)
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--dir", d,
             "--maxclients", "20000"], stdout=subprocess.DEVNULL))
        wait_port(p)
        ports.append(p)
    subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in ports], "--cluster-yes"],
                   check=True, capture_output=True)
    deadline = time.time() + 30
    for p in ports:
        while b"cluster_state:ok" not in subprocess.run(
                ["redis-cli", "-p", str(p), "CLUSTER", "INFO"], capture_output=True).stdout:
            if time.time() > deadline:
                raise RuntimeError("the cluster did not become ok")
            time.sleep(0.1)
    return ports


def start_cluster_sidecar(binary, ports, procs):
    port, admin = free_port(), free_port()
    seeds = ",".join(f"127.0.0.1:{p}" for p in ports)
    p = subprocess.Popen([binary, "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{admin}",
                          "--upstream", f"redis-cluster://{seeds}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "RUST_LOG": "warn"})
    procs.append(p)
    wait_port(port)
    # Ready once a command goes through (the slot map is read).
    deadline = time.time() + 30
    while subprocess.run(["redis-cli", "-p", str(port), "SET", "ready", "1"], capture_output=True).stdout != b"OK\n":
        if time.time() > deadline:
            raise RuntimeError("the sidecar in front of the cluster did not get ready")
        time.sleep(0.1)
    return p.pid, port


def run_bench(port, args_):
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "--csv", *args_],
                         check=True, capture_output=True, text=True, timeout=600).stdout
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        rows[row["test"].split(" ")[0]] = (float(row["rps"]), float(row["p50_latency_ms"]))
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--sidecar", default=os.path.join(ROOT, "target/release/redis-sidecar"))
    ap.add_argument("--baseline", help="another redis-sidecar binary (e.g. built from an earlier commit): "
                    "run in front of the same single Redis and cluster in the same rounds, and compared")
    args = ap.parse_args()
    n = str(args.requests)
    scenarios = [
        ("GET/SET c50 P1", ["-t", "set,get", "-n", n, "-c", "50", "-P", "1", "-r", "100000"]),
        ("GET/SET c50 P16", ["-t", "set,get", "-n", n, "-c", "50", "-P", "16", "-r", "100000"]),
        ("MGET 10 slots c50 P1", ["-n", str(args.requests // 2), "-c", "50", "MGET", *MGET_KEYS]),
    ]
    tmp = tempfile.mkdtemp(prefix="redis-sidecar-cluster-bench-")
    procs = []
    try:
        rport = start_redis(tmp, procs)
        spid, sport, _ = start_sidecar(args.sidecar, rport, procs)
        cports = start_cluster(tmp, procs)
        cpid, cport = start_cluster_sidecar(args.sidecar, cports, procs)
        slots = {subprocess.run(["redis-cli", "-p", str(cports[0]), "CLUSTER", "KEYSLOT", k],
                                capture_output=True, text=True).stdout.strip() for k in MGET_KEYS}
        assert len(slots) == 10, f"MGET keys share slots: {slots}"
        # The same 10 keys behind each target (through the sidecar, an
        # MSET across slots is split too).
        for port in (rport, cport):
            subprocess.run(["redis-cli", "-p", str(port), "MSET", *[x for k in MGET_KEYS for x in (k, "v" * 16)]],
                           check=True, capture_output=True)
        targets = [("direct", rport, None), ("sidecar", sport, spid), ("sidecar-cluster", cport, cpid)]
        if args.baseline:
            bpid, bport, _ = start_sidecar(args.baseline, rport, procs)
            bcpid, bcport = start_cluster_sidecar(args.baseline, cports, procs)
            targets += [("baseline", bport, bpid), ("baseline-cluster", bcport, bcpid)]
        results = {}  # (scenario, target, test) -> [(rps, p50, cpu µs/op)]
        for rnd in range(args.rounds):
            for name, bargs in scenarios:
                k = rnd % len(targets)
                for tname, port, pid in targets[k:] + targets[:k]:
                    cpu0 = cpu_seconds(pid)
                    rows = run_bench(port, bargs)
                    cpu = cpu_seconds(pid) - cpu0
                    reqs = args.requests // 2 if name.startswith("MGET") else args.requests
                    for test, (rps, p50) in rows.items():
                        results.setdefault((name, tname, test), []).append((rps, p50, cpu / (reqs * len(rows)) * 1e6))
                    print(f"round {rnd + 1} {name:>22} {tname:>15}: "
                          + ", ".join(f"{t} {v[0]:.0f} rps" for t, v in rows.items()), file=sys.stderr, flush=True)
        print(f"\nredis-benchmark, {args.rounds} interleaved rounds; medians of per-round ratios to direct "
              "Redis (a single redis-server); CPU is the sidecar's per operation\n")
        print("| scenario | test | direct rps | sidecar→single rps (x) | sidecar→cluster rps (x) "
              "| p50 ms direct; →single (x); →cluster (x) | CPU µs/op →single / →cluster |")
        print("|---|---|---|---|---|---|---|")
        for name, _ in scenarios:
            tests = sorted({t for (s, _, t) in results if s == name})
            for test in tests:
                d = results[(name, "direct", test)]
                s = results[(name, "sidecar", test)]
                c = results[(name, "sidecar-cluster", test)]

                def med(vals, i):
                    return statistics.median(v[i] for v in vals)

                def ratio(vals, i):
                    return statistics.median(a[i] / b[i] for a, b in zip(vals, d))
                print(f"| {name} | {test} | {med(d, 0):.0f} | {med(s, 0):.0f} ({ratio(s, 0):.2f}) "
                      f"| {med(c, 0):.0f} ({ratio(c, 0):.2f}) "
                      f"| {med(d, 1):.3f}; {med(s, 1):.3f} ({ratio(s, 1):.2f}); {med(c, 1):.3f} ({ratio(c, 1):.2f}) "
                      f"| {med(s, 2):.2f} / {med(c, 2):.2f} |")
        if args.baseline:
            print("\nThis build against the baseline (same rounds): medians of per-round ratios, "
                  "throughput and the sidecar's CPU per operation (below 1.00: less CPU)\n")
            print("| scenario | test | rps →single | rps →cluster | CPU/op →single | CPU/op →cluster |")
            print("|---|---|---|---|---|---|")
            for name, _ in scenarios:
                for test in sorted({t for (s_, _, t) in results if s_ == name}):
                    def vs(new, old, i):
                        a, b = results[(name, new, test)], results[(name, old, test)]
                        return statistics.median(x[i] / y[i] for x, y in zip(a, b) if y[i] > 0)
                    print(f"| {name} | {test} | {vs('sidecar', 'baseline', 0):.3f} "
                          f"| {vs('sidecar-cluster', 'baseline-cluster', 0):.3f} "
                          f"| {vs('sidecar', 'baseline', 2):.3f} | {vs('sidecar-cluster', 'baseline-cluster', 2):.3f} |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
