#!/usr/bin/env python3
"""Instruction counts (benches/callgrind.sh) of sidecar binaries in front of
a 3-master Redis Cluster started here (the single-Redis workload of
callgrind.sh, routed by slot).

Usage: python3 benches/callgrind-cluster.py BINARY [BINARY...]
"""

import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cluster import start_cluster  # noqa: E402
from e2e import stop  # noqa: E402


def main():
    procs = []
    tmp = tempfile.mkdtemp(prefix="redis-sidecar-cg-cluster-")
    try:
        ports = start_cluster(tmp, procs)
        url = "redis-cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)
        env = {**os.environ, "CALLGRIND_UPSTREAM": url}
        subprocess.run([os.path.join(HERE, "callgrind.sh"), *sys.argv[1:]], env=env, check=True)
    finally:
        stop(procs)


if __name__ == "__main__":
    main()
