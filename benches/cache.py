#!/usr/bin/env python3
"""The L1 cache against a remote-looking Redis, interleaved in one run.

Targets, each measured with `redis-benchmark -c 10 -P 1 -t get` once per
round (the order rotates every round):
- at the hop's RTT (benches/hop.py in front of Redis, default 1 ms):
  direct to Redis through the hop, the sidecar without cache through the
  hop, the sidecar with cache through the hop at 100 % hits (one hot key)
  and at ~90 % hits (-r requests/10 keys, cache flushed before each run);
- at 0 ms (no hop): direct Redis, the sidecar without cache, the sidecar
  with cache at 100 % hits;
- a feed-page load at the hop's RTT: `MGET` of 10 posts drawn at random
  out of 1,000 (`redis-benchmark -r 1000 MGET post:__rand_int__ x10`),
  direct, through the sidecar without cache, and with a `post:*` rule
  (MGET cached per key; the cache flushed before each run, so the run
  includes filling it: pages share posts, not argument lists).
Prints medians of throughput, p50 and p99, ratios to direct at the same
RTT, the sidecar's CPU per request, the hit ratio measured from the
sidecar's metrics, and the hop's measured round trip.

Usage: python3 benches/cache.py [--rounds 5] [--requests 20000] [--delay-ms 1]
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
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import cpu_seconds, free_port, start_redis, start_sidecar, stop, wait_port  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "redis-sidecar")


FEED_PAGE = ["MGET"] + ["post:__rand_int__"] * 10


def run_bench(port, requests, keys, command=None):
    cmd = ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-c", "10", "-P", "1",
           "-n", str(requests), "--csv"]
    if keys:
        cmd += ["-r", str(keys)]
    cmd += command or ["-t", "get"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600).stdout
    for row in csv.DictReader(io.StringIO(out)):
        return float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"])
    raise RuntimeError(out)


def metric(admin, name, labels):
    text = urllib.request.urlopen(f"http://127.0.0.1:{admin}/metrics").read().decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"redis_sidecar_{name}") and all(f'{k}="{v}"' in line for k, v in labels):
            total += float(line.rsplit(" ", 1)[1])
    return total


def flush(admin):
    req = urllib.request.Request(f"http://127.0.0.1:{admin}/cache/flush", method="POST")
    json.loads(urllib.request.urlopen(req).read())


def rtt_ms(port, n=200):
    """Median PING round trip through `port` (ms)."""
    import socket
    s = socket.create_connection(("127.0.0.1", port))
    times = []
    for _ in range(n):
        t = time.perf_counter()
        s.sendall(b"PING\r\n")
        s.recv(64)
        times.append((time.perf_counter() - t) * 1000)
    s.close()
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=20_000)
    ap.add_argument("--delay-ms", type=float, default=1.0)
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="redis-sidecar-cache-")
    procs = []
    try:
        rport, hport = start_redis(tmp, procs), free_port()
        procs.append(subprocess.Popen([sys.executable, os.path.join(ROOT, "benches", "hop.py"), "--listen",
                                       str(hport), "--target", str(rport), "--delay-ms", str(args.delay_ms)]))
        wait_port(hport)
        conf = os.path.join(tmp, "cache.toml")
        with open(conf, "w") as f:
            f.write('[cache]\nenabled = true\nmax_memory = "64MiB"\n[[cache.rule]]\npattern = "key:*"\n'
                    'ttl = "60s"\n[[cache.rule]]\npattern = "post:*"\nttl = "60s"\n')
        sidecars = {}
        for name, upstream, cached in (("nocache-hop", hport, False), ("cache-hop", hport, True),
                                       ("nocache-0", rport, False), ("cache-0", rport, True)):
            sidecars[name] = start_sidecar(BIN, upstream, procs, conf if cached else None)
        subprocess.run(["redis-cli", "-p", str(rport), "SET", "key:__rand_int__", "x"], check=True,
                       capture_output=True)
        # 1,000 posts of 200 bytes, named as redis-benchmark's -r 1000 names them.
        posts = "".join(f"SET post:{i:012d} {'p' * 200}\n" for i in range(1000))
        subprocess.run(["redis-cli", "-p", str(rport)], input=posts, text=True, check=True,
                       capture_output=True)
        hop_rtt = rtt_ms(hport)
        # name, port, sidecar (pid, admin) or None, keys (-r), flush first[, command]
        targets = [
            ("1ms direct", hport, None, 0, False),
            ("1ms sidecar", sidecars["nocache-hop"][1], sidecars["nocache-hop"], 0, False),
            ("1ms cache 100%", sidecars["cache-hop"][1], sidecars["cache-hop"], 0, False),
            ("1ms cache ~90%", sidecars["cache-hop"][1], sidecars["cache-hop"], args.requests // 10, True),
            ("0ms direct", rport, None, 0, False),
            ("0ms sidecar", sidecars["nocache-0"][1], sidecars["nocache-0"], 0, False),
            ("0ms cache 100%", sidecars["cache-0"][1], sidecars["cache-0"], 0, False),
            ("1ms direct feed MGET", hport, None, 1000, False, FEED_PAGE),
            ("1ms sidecar feed MGET", sidecars["nocache-hop"][1], sidecars["nocache-hop"], 1000, False,
             FEED_PAGE),
            ("1ms cache feed MGET", sidecars["cache-hop"][1], sidecars["cache-hop"], 1000, True, FEED_PAGE),
        ]
        res = {t[0]: [] for t in targets}
        for rnd in range(args.rounds):
            order = targets[rnd % len(targets):] + targets[:rnd % len(targets)]
            for name, port, side, keys, fresh, *command in order:
                if fresh:
                    flush(side[2])
                hits0 = metric(side[2], "cache_requests_total", [("result", "hit")]) if side else 0
                miss0 = metric(side[2], "cache_requests_total", [("result", "miss")]) if side else 0
                cpu0 = cpu_seconds(side[0]) if side else 0
                rps, p50, p99 = run_bench(port, args.requests, keys, command[0] if command else None)
                cpu = (cpu_seconds(side[0]) - cpu0) / args.requests * 1e6 if side else 0
                hits = metric(side[2], "cache_requests_total", [("result", "hit")]) - hits0 if side else 0
                miss = metric(side[2], "cache_requests_total", [("result", "miss")]) - miss0 if side else 0
                ratio = hits / (hits + miss) if hits + miss else 0
                res[name].append((rps, p50, p99, cpu, ratio))
                print(f"round {rnd + 1} {name}: {rps:.0f} rps p50 {p50:.3f} p99 {p99:.3f} ms, "
                      f"CPU {cpu:.2f} us/req, hits {ratio:.3f}", flush=True)
        med = {n: [statistics.median(x[i] for x in v) for i in range(5)] for n, v in res.items()}
        print(f"\n{args.rounds} interleaved rounds, redis-benchmark -c 10 -P 1 -t get -n {args.requests} "
              f"(feed rows: MGET of 10 of 1,000 posts, -r 1000); "
              f"medians; hop round trip measured {hop_rtt:.2f} ms (PING through the hop)\n")
        print("| target | rps (x direct) | p50 ms (x direct) | p99 ms | sidecar CPU us/req | hit ratio |")
        print("|---|---|---|---|---|---|")
        for name, *_ in targets:
            base = med["1ms direct feed MGET" if name.endswith("feed MGET") else
                       "1ms direct" if name.startswith("1ms") else "0ms direct"]
            rps, p50, p99, cpu, ratio = med[name]
            print(f"| {name} | {rps:.0f} ({rps / base[0]:.2f}) | {p50:.3f} ({p50 / base[1]:.2f}) | {p99:.3f} | "
                  f"{cpu:.2f} | {ratio:.3f} |")
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
