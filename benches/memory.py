#!/usr/bin/env python3
"""Memory of the sidecar under large requests and replies: RSS before, at
peak (VmHWM, reset before each case) and after, of the release binary in
front of a fresh redis-server, for the cases of the hostile-input review:

  huge-get    one GET of a 200 MB value by a client that reads it
  dbs-60m     one 60 MB GET in each of 6 databases (6 shared connections)
  watch-60m   8 clients under WATCH, one 60 MB GET each (8 dedicated ones)
  exists-5m   EXISTS with 5,000,000 empty arguments (30 MB on the wire),
              next to the same request sent to Redis directly (Redis's
              own peak RSS growth, for comparison)

Usage: benches/memory.py [--bin target/release/redis-sidecar]
(build first: cargo build --release). Prints one line per case.
"""

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from e2e import free_port, wait_port  # noqa: E402


def status_kib(pid, field):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak(pid):
    # Writing 5 to clear_refs resets VmHWM to the current RSS.
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def encode(*args):
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        if isinstance(a, str):
            a = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(out)


class Conn:
    def __init__(self, port):
        self.s = socket.create_connection(("127.0.0.1", port))
        self.buf = bytearray()

    def send(self, data):
        self.s.sendall(data)

    def _fill(self):
        chunk = self.s.recv(1 << 20)
        if not chunk:
            raise RuntimeError("connection closed")
        self.buf += chunk

    def _line(self):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            self._fill()

    def reply(self):
        """One reply; bulks are returned as their length only."""
        line = self._line()
        t = line[:1]
        if t == b"$":
            n = int(line[1:])
            if n < 0:
                return None
            while len(self.buf) < n + 2:
                self._fill()
            del self.buf[: n + 2]
            return n
        if t == b"*":
            return [self.reply() for _ in range(int(line[1:]))]
        if t == b"-":
            raise RuntimeError(line.decode())
        return line

    def call(self, *args):
        self.send(encode(*args))
        return self.reply()


def measure(pid, run):
    rss0 = status_kib(pid, "VmRSS:")
    reset_peak(pid)
    run()
    peak = status_kib(pid, "VmHWM:")
    time.sleep(0.5)
    rss1 = status_kib(pid, "VmRSS:")
    return rss0, peak, rss1


def mib(k):
    return f"{k / 1024:.0f} MiB"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/redis-sidecar"))
    args = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="sidecar-mem-")
    rport, sport = free_port(), free_port()
    procs = []
    try:
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(rport), "--save", "", "--appendonly", "no",
             "--dir", tmp], stdout=subprocess.DEVNULL))
        wait_port(rport)
        procs.append(subprocess.Popen(
            [args.bin, "--listen", f"127.0.0.1:{sport}", "--admin-listen", "",
             "--upstream", f"redis://127.0.0.1:{rport}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_port(sport)
        redis_pid, pid = procs[0].pid, procs[1].pid
        d = Conn(rport)
        d.call("SET", "huge", b"h" * (200 << 20))
        for db in range(6):
            d.call("SELECT", str(db))
            d.call("SET", "big", b"v" * (60 << 20))
        d.call("SELECT", "0")

        def huge_get():
            c = Conn(sport)
            assert c.call("GET", "huge") == 200 << 20
            c.s.close()

        def dbs():
            held = []
            for db in range(6):
                c = Conn(sport)
                c.call("SELECT", str(db))
                assert c.call("GET", "big") == 60 << 20
                held.append(c)
            return held

        held = []

        def dbs_case():
            held.extend(dbs())

        def watch_case():
            for _ in range(8):
                c = Conn(sport)
                c.call("WATCH", "big")
                assert c.call("GET", "big") == 60 << 20
                held.append(c)

        exists = b"*5000001\r\n$6\r\nEXISTS\r\n" + b"$0\r\n\r\n" * 5_000_000

        def exists_case(port):
            def run():
                c = Conn(port)
                c.send(exists)
                assert c.reply() == b":0"
                c.s.close()
            return run

        for name, run in [("huge-get", huge_get), ("dbs-60m", dbs_case),
                          ("watch-60m", watch_case), ("exists-5m", exists_case(sport))]:
            failed = None

            def guarded():
                nonlocal failed
                try:
                    run()
                except (RuntimeError, OSError, AssertionError) as e:
                    failed = e or "assertion"
            before, peak, after = measure(pid, guarded)
            print(f"{name:10} sidecar RSS before {mib(before)}, peak {mib(peak)}, after {mib(after)}"
                  + (" (clients still connected)" if name in ("dbs-60m", "watch-60m") else "")
                  + (f" FAILED: {failed}" if failed else ""))
        for c in held:
            c.s.close()
        # The same request to an empty redis-server of its own.
        eport = free_port()
        procs.append(subprocess.Popen(
            ["redis-server", "--port", str(eport), "--save", "", "--appendonly", "no",
             "--dir", tmp], stdout=subprocess.DEVNULL))
        wait_port(eport)
        before, peak, after = measure(procs[-1].pid, exists_case(eport))
        print(f"{'exists-5m':10} redis-server RSS before {mib(before)}, peak {mib(peak)}, after {mib(after)}"
              " (the same request sent to an empty Redis directly)")
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait()


if __name__ == "__main__":
    sys.exit(main())
