#!/usr/bin/env python3
"""TCP segments per request through direct Redis, the sidecar and
twemproxy (Linux's TcpOutSegs from `nstat`, counted over one
redis-benchmark run each, interleaved over several rounds).

On loopback every request and every reply is one segment at P1, so direct
Redis costs 2.00; what a proxy adds is its upstream traffic: one segment
per batch written to Redis and one per read of replies (pure ACKs too,
when no reply carries them). The inverse of what a proxy adds, times 2, is
the average batch it sends upstream. The counters are the machine's, so
run it on a machine with no other TCP traffic.

Usage: python3 benches/segments.py [--rounds 3] [--requests 100000]
           [--clients 50] [--pipeline 1] [--size 3] [--sidecar BIN]
           [--config FILE]
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import ROOT, start_redis, start_sidecar, start_twemproxy, stop  # noqa: E402


def out_segs():
    out = subprocess.run(["nstat", "-a", "-z", "TcpOutSegs"], capture_output=True, text=True,
                         check=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "TcpOutSegs":
            return int(parts[1])
    raise SystemExit("nstat printed no TcpOutSegs")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--pipeline", type=int, default=1)
    ap.add_argument("--size", type=int, default=3)
    ap.add_argument("--sidecar", default=os.path.join(ROOT, "target/release/redis-sidecar"))
    ap.add_argument("--config", help="the sidecar's configuration file")
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="redis-sidecar-segments-")
    procs = []
    try:
        rport = start_redis(tmp, procs)
        _, sport, _ = start_sidecar(args.sidecar, rport, procs, config=args.config)
        _, tport = start_twemproxy(tmp, rport, procs)
        targets = [("direct", rport), ("sidecar", sport), ("twemproxy", tport)]
        per = {}
        for rnd in range(args.rounds):
            k = rnd % len(targets)
            for name, port in targets[k:] + targets[:k]:
                for test in ("set", "get"):
                    before = out_segs()
                    subprocess.run(["redis-benchmark", "-p", str(port), "-c", str(args.clients),
                                    "-P", str(args.pipeline), "-d", str(args.size), "-n",
                                    str(args.requests), "-t", test, "-r", "100000", "-q"],
                                   check=True, capture_output=True, timeout=600)
                    per.setdefault((name, test), []).append((out_segs() - before) / args.requests)
        print(f"TCP segments per request, c{args.clients} P{args.pipeline} d{args.size}, "
              f"{args.rounds} rounds: median (range)\n")
        print("| target | SET | GET |")
        print("|---|---|---|")
        for name, _ in targets:
            cells = []
            for test in ("set", "get"):
                v = per[(name, test)]
                cells.append(f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f})")
            print(f"| {name} | {cells[0]} | {cells[1]} |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
