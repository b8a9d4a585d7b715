#!/usr/bin/env python3
"""End-to-end benchmark: direct Redis vs redis-sidecar vs twemproxy.

Runs redis-benchmark against the three targets interleaved (round-robin,
several rounds, one run = one target x one scenario) and prints, per
scenario, the median throughput and p50/p99 latency of each target as a
ratio to direct Redis, plus the proxy's CPU time per operation (from
/proc/<pid>/stat), Redis's CPU time per operation behind each target, and
the RSS of each proxy holding 10,000 idle clients.

Usage: benches/e2e.sh [--rounds N] [--requests N] [--threads N] [--config FILE]
                      [--baseline BIN [--baseline-threads N] [--baseline-config FILE]
                       | --control]
                      (installs what it needs)

It prints the processor, the kernel and the date first.

With --baseline, a second sidecar binary runs as a fourth target in the
same rounds (A/B of a change: both against one Redis, interleaved), and
the sidecar is reported against it as medians of per-round ratios. With
--control, that fourth target is a second process of the sidecar's own
binary (A/A): its ratios are what the machine's noise alone makes of a
median, the resolution of every other ratio of the run.

Next to sidecar / twemproxy it prints direct Redis / twemproxy in the same
rounds: the throughput no proxy can pass and the p99 no proxy can go
below, so a goal ratio above that bound is out of reach for any proxy on
that machine.
"""

import argparse
import csv
import io
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TICK = os.sysconf("SC_CLK_TCK")

SCENARIOS = [
    # name, clients, pipeline, value size
    ("c50 P1", 50, 1, 3),
    ("c50 P16", 50, 16, 3),
    ("c50 P1 d1024", 50, 1, 1024),
    ("c1000 P1", 1000, 1, 3),
]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port, timeout=10):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {port}")


def start_redis(tmp, procs):
    """A redis-server on a free port, added to `procs`; its port."""
    port = free_port()
    procs.append(subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--maxclients", "20000", "--dir", tmp],
                                  stdout=subprocess.DEVNULL))
    wait_port(port)
    return port


def start_sidecar(binary, upstream_port, procs, config=None, threads=None):
    """A sidecar on free ports in front of 127.0.0.1:`upstream_port` (with
    `config` and `threads` when given), added to `procs`: (pid, port,
    admin port)."""
    port, admin = free_port(), free_port()
    extra = ["--config", config] if config else []
    if threads:
        extra += ["--threads", str(threads)]
    p = subprocess.Popen([binary, *extra, "--listen", f"127.0.0.1:{port}", "--admin-listen",
                          f"127.0.0.1:{admin}", "--upstream", f"redis://127.0.0.1:{upstream_port}"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         env={**os.environ, "RUST_LOG": "warn"})
    procs.append(p)
    wait_port(port)
    return p.pid, port, admin


def start_twemproxy(tmp, upstream_port, procs):
    """twemproxy (nutcracker) on a free port in front of 127.0.0.1:
    `upstream_port`, one server connection, added to `procs`: (pid, port)."""
    port, stats = free_port(), free_port()
    conf = os.path.join(tmp, "nutcracker.yml")
    with open(conf, "w") as f:
        f.write(f"bench:\n  listen: 127.0.0.1:{port}\n  hash: fnv1a_64\n  distribution: ketama\n"
                f"  redis: true\n  server_connections: 1\n  servers:\n   - 127.0.0.1:{upstream_port}:1\n")
    p = subprocess.Popen(["nutcracker", "-c", conf, "-s", str(stats), "-o", os.path.join(tmp, "nc.log")],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    procs.append(p)
    wait_port(port)
    return p.pid, port


def cpu_seconds(pid):
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench(port, clients, pipeline, size, requests):
    out = subprocess.run(
        ["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "set,get", "-n", str(requests),
         "-c", str(clients), "-P", str(pipeline), "-d", str(size), "-r", "100000", "--csv"],
        check=True, capture_output=True, text=True, timeout=600,
    ).stdout
    rows = {}
    for row in csv.DictReader(io.StringIO(out)):
        rows[row["test"]] = (float(row["rps"]), float(row["p50_latency_ms"]), float(row["p99_latency_ms"]))
    return rows


def idle_rss(pid, port, n=10_000):
    socks = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            socks.append(s)
        # One round trip on the last one: every earlier accept is done.
        socks[-1].sendall(b"PING\r\n")
        socks[-1].recv(64)
        time.sleep(1.0)
        return rss_mib(pid)
    finally:
        for s in socks:
            s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--sidecar", default=os.path.join(ROOT, "target/release/redis-sidecar"))
    ap.add_argument("--baseline", help="another redis-sidecar binary (e.g. built from an earlier "
                    "commit), run in the same interleaved rounds: prints this sidecar against it")
    ap.add_argument("--scenarios", help="only these scenarios, by name, comma-separated "
                    "(e.g. \"c50 P16,c1000 P1\")")
    ap.add_argument("--threads", type=int, help="the sidecar's worker threads (default: its config's, 1)")
    ap.add_argument("--baseline-threads", type=int,
                    help="the baseline's worker threads (with --baseline; the same binary with "
                    "another --threads measures how it scales)")
    ap.add_argument("--config", help="the sidecar's configuration file (default: none, its defaults)")
    ap.add_argument("--baseline-config",
                    help="the baseline's configuration file (the same binary with another file "
                    "measures a setting, e.g. benches/two-shared-connections.toml)")
    ap.add_argument("--control", action="store_true",
                    help="run a second process of the sidecar's own binary as the baseline (an A/A "
                    "run): its ratios show how far noise alone moves a median of per-round ratios")
    args = ap.parse_args()
    if args.control:
        if args.baseline:
            sys.exit("--control and --baseline both name the fourth target: give one")
        args.baseline = args.sidecar
        args.baseline_threads = args.threads
        args.baseline_config = args.config
    if args.scenarios:
        wanted = [w.strip() for w in args.scenarios.split(",")]
        SCENARIOS[:] = [sc for sc in SCENARIOS if sc[0] in wanted]
        if not SCENARIOS:
            sys.exit(f"no scenario named {args.scenarios}")
    print(machine())
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    want = 65536 if hard == resource.RLIM_INFINITY else min(65536, hard)
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))

    tmp = tempfile.mkdtemp(prefix="redis-sidecar-bench-")
    procs = []
    try:
        rport = start_redis(tmp, procs)
        rpid = procs[-1].pid
        spid, sport, _ = start_sidecar(args.sidecar, rport, procs, config=args.config, threads=args.threads)
        baseline = (start_sidecar(args.baseline, rport, procs, config=args.baseline_config,
                                  threads=args.baseline_threads)
                    if args.baseline else None)
        tpid, tport = start_twemproxy(tmp, rport, procs)
        targets = [("direct", rport, None), ("sidecar", sport, spid), ("twemproxy", tport, tpid)]
        if baseline:
            targets.append(("baseline", baseline[1], baseline[0]))

        # (scenario, target, test) -> list of (rps, p50, p99, cpu_us_per_op,
        # redis_cpu_us_per_op): Redis's own CPU too, since what a proxy
        # saves itself by writing small batches Redis may spend reading them.
        results = {}
        for rnd in range(args.rounds):
            for name, c, p, d in SCENARIOS:
                # The order rotates from round to round, so no target always
                # runs first (or right after another) in a scenario.
                k = rnd % len(targets)
                for tname, port, pid in targets[k:] + targets[:k]:
                    cpu0, rcpu0 = cpu_seconds(pid), cpu_seconds(rpid)
                    rows = bench(port, c, p, d, args.requests)
                    cpu, rcpu = cpu_seconds(pid) - cpu0, cpu_seconds(rpid) - rcpu0
                    ops = args.requests * len(rows)
                    for test, (rps, p50, p99) in rows.items():
                        results.setdefault((name, tname, test), []).append(
                            (rps, p50, p99, cpu / ops * 1e6, rcpu / ops * 1e6))
                    print(f"round {rnd + 1} {name:>13} {tname:>9}: "
                          + ", ".join(f"{t} {v[0]:.0f} rps" for t, v in rows.items()), file=sys.stderr, flush=True)

        rss = {"sidecar": idle_rss(spid, sport), "twemproxy": idle_rss(tpid, tport)}

        print(f"\nredis-benchmark -n {args.requests}, {args.rounds} interleaved rounds, medians; "
              "ratios are to direct Redis in the same rounds\n")
        print("| scenario | test | direct rps | sidecar rps (x direct) | twemproxy rps (x direct) "
              "| p50 ms direct; sidecar (x); twemproxy (x) | p99 ms direct; sidecar (x); twemproxy (x) "
              "| CPU µs/op sidecar / twemproxy | Redis CPU µs/op direct; sidecar; twemproxy |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, *_ in SCENARIOS:
            for test in ("SET", "GET"):
                med = {}
                for tname, *_ in targets[:3]:
                    vals = results.get((name, tname, test), [])
                    med[tname] = tuple(statistics.median(v[i] for v in vals) for i in range(5))
                d, s, t = med["direct"], med["sidecar"], med["twemproxy"]

                def lat(i):
                    return (f"{d[i]:.3f}; {s[i]:.3f} ({s[i] / d[i]:.2f}); "
                            f"{t[i]:.3f} ({t[i] / d[i]:.2f})")

                print(f"| {name} | {test} | {d[0]:.0f} | {s[0]:.0f} ({s[0] / d[0]:.2f}) | {t[0]:.0f} ({t[0] / d[0]:.2f}) "
                      f"| {lat(1)} | {lat(2)} | {s[3]:.2f} / {t[3]:.2f} | {d[4]:.2f}; {s[4]:.2f}; {t[4]:.2f} |")
        ratio_table(results, "twemproxy",
                    "sidecar / twemproxy, median of the per-round ratios (target: rps >= 1, CPU <= 1); "
                    "'no proxy': direct Redis / twemproxy, the bound no proxy can pass", bound=True)
        if baseline and args.control:
            ratio_table(results, "baseline",
                        "sidecar / control (a second process of the same binary: what noise alone "
                        "makes of a ratio), median of the per-round ratios")
        elif baseline:
            ratio_table(results, "baseline",
                        "sidecar / baseline, median of the per-round ratios (rps > 1: faster; CPU < 1: cheaper)")
            ratio_table(results, "twemproxy",
                        "baseline / twemproxy, median of the per-round ratios (the 'before' of the "
                        "first table, in the same rounds)", who="baseline")
        print(f"\nRSS with 10,000 idle client connections: sidecar {rss['sidecar']:.1f} MiB, "
              f"twemproxy {rss['twemproxy']:.1f} MiB")
    finally:
        stop(procs)


def machine():
    """The processor, its count, the kernel and the date: a figure is only
    true of the machine it was measured on."""
    model = "unknown processor"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"machine: {model}, {os.cpu_count()} CPUs, kernel {os.uname().release}, "
            f"{time.strftime('%Y-%m-%d')}")


def ratios(results, name, test, a, b, i):
    """Per round, `a`'s value i (0 rps, 2 p99, 3 CPU per op, 4 Redis's CPU
    per op) over `b`'s in that round."""
    a_vals = results.get((name, a, test), [])
    b_vals = results.get((name, b, test), [])
    return [x[i] / y[i] for x, y in zip(a_vals, b_vals) if y[i] > 0]


def summary(r):
    """The median of per-round ratios and their range."""
    if not r:
        return "-"
    return f"{statistics.median(r):.2f} ({min(r):.2f}-{max(r):.2f})"


def ratio_table(results, other, title, bound=False, who="sidecar"):
    """Per round, `who`'s throughput, CPU per op, p99 and Redis's CPU per
    op over `other`'s in that round; medians of those ratios (and their
    range over the rounds), per scenario and test. `bound`: also direct
    Redis over `other` in the same rounds, what no proxy at all would reach (the
    sidecar's throughput ratio cannot pass it, nor its p99 ratio go below
    it, whatever its own cost)."""
    print(f"\n{title}\n")
    extra = " no proxy: rps | no proxy: p99 |" if bound else ""
    print(f"| scenario | test | rps (range) | CPU per op (range) | p99 (range) | Redis CPU per op (range) |{extra}")
    print("|---|---|---|---|---|---|" + ("---|---|" if bound else ""))
    for name, *_ in SCENARIOS:
        for test in ("SET", "GET"):
            row = [summary(ratios(results, name, test, who, other, i)) for i in (0, 3, 2, 4)]
            if bound:
                row += [summary(ratios(results, name, test, "direct", other, i)) for i in (0, 2)]
            print(f"| {name} | {test} | " + " | ".join(row) + " |")


def stop(procs):
    """Terminate the processes a benchmark started, killing stragglers."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()


if __name__ == "__main__":
    main()
