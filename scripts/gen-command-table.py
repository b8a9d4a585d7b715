#!/usr/bin/env python3
"""Write src/builtin-commands.resp: the raw `COMMAND` reply of a real
redis-server, the sidecar's built-in command table (parsed at startup;
the table learned from the upstream replaces it when it can be learned).

Usage: python3 scripts/gen-command-table.py [--port PORT]
Without --port it starts a redis-server of its own on a free port.
tests/commands.rs checks that the checked-in file matches the test
server's COMMAND.
"""

import argparse
import os
import socket
import subprocess
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "src", "builtin-commands.resp")


def read_reply(sock):
    """The raw bytes of one complete RESP2 reply."""
    buf = b""

    def need(n):
        nonlocal buf
        while len(buf) < n:
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise RuntimeError("connection closed")
            buf += chunk

    def line(pos):
        while True:
            i = buf.find(b"\r\n", pos)
            if i >= 0:
                return i
            need(len(buf) + 1)

    def value(pos):
        need(pos + 1)
        t = buf[pos:pos + 1]
        end = line(pos)
        if t in (b"+", b"-", b":"):
            return end + 2
        n = int(buf[pos + 1:end])
        if t == b"$":
            if n < 0:
                return end + 2
            need(end + 2 + n + 2)
            return end + 2 + n + 2
        if t == b"*":
            pos = end + 2
            for _ in range(max(n, 0)):
                pos = value(pos)
            return pos
        raise RuntimeError(f"unexpected type {t!r}")

    end = value(0)
    return buf[:end]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int)
    args = ap.parse_args()
    server = None
    port = args.port
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", tempfile.mkdtemp()], stdout=subprocess.DEVNULL)
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port)).close()
                break
            except OSError:
                time.sleep(0.05)
    try:
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"*1\r\n$7\r\nCOMMAND\r\n")
            reply = read_reply(s)
            s.sendall(b"*1\r\n$4\r\nINFO\r\n")
            info = read_reply(s).decode()
        version = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("redis_version:"))
        with open(OUT, "wb") as f:
            f.write(reply)
        print(f"wrote {OUT}: COMMAND of redis {version}, {len(reply)} bytes")
    finally:
        if server:
            server.terminate()
            server.wait()


if __name__ == "__main__":
    main()
