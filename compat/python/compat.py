"""redis-py (RESP3 and RESP2) against redis-sidecar.

Usage: SIDECAR_URL=redis://127.0.0.1:6380 python compat.py
"""

import os
import sys
import threading
import time
import traceback

import redis

URL = os.environ.get("SIDECAR_URL")
if not URL:
    print("SIDECAR_URL is not set")
    sys.exit(2)

failures = []


def check(name):
    def run(fn):
        start = time.time()
        try:
            fn()
            print(f"ok   {name} ({(time.time() - start) * 1000:.0f} ms)")
        except Exception:  # noqa: BLE001 - report every failure, go on
            failures.append(name)
            print(f"FAIL {name}:\n{traceback.format_exc()}")
        return fn

    return run


for proto in (3, 2):
    r = redis.Redis.from_url(URL, protocol=proto, decode_responses=True)

    @check(f"redis-py protocol={proto}: HELLO, strings, hashes, lists, sets, zsets")
    def _basics(r=r, proto=proto):
        assert r.ping() is True
        p = f"py{proto}:"
        r.delete(f"{p}c")
        assert r.set(f"{p}s", "v") is True
        assert r.get(f"{p}s") == "v"
        assert r.get(f"{p}missing") is None
        assert r.incrby(f"{p}c", 7) == 7
        r.hset(f"{p}h", mapping={"a": "1", "b": "2"})
        assert r.hgetall(f"{p}h") == {"a": "1", "b": "2"}
        r.delete(f"{p}l")
        r.rpush(f"{p}l", "x", "y")
        assert r.lrange(f"{p}l", 0, -1) == ["x", "y"]
        r.sadd(f"{p}set", "a", "b")
        assert r.smembers(f"{p}set") == {"a", "b"}
        r.zadd(f"{p}z", {"one": 1.5, "two": 2})
        zr = [tuple(x) for x in r.zrange(f"{p}z", 0, -1, withscores=True)]
        assert zr == [("one", 1.5), ("two", 2.0)], zr
        info = r.execute_command("HELLO", proto)
        if isinstance(info, list):  # RESP2: a flat key/value list
            info = dict(zip(info[::2], info[1::2]))
        assert int(info["proto"]) == proto, info
        try:
            r.execute_command("NOSUCHCMD")
            raise AssertionError("unknown command accepted")
        except redis.ResponseError as e:
            assert "unknown command" in str(e)

    @check(f"redis-py protocol={proto}: pipelines, transactions, WATCH")
    def _pipes(r=r, proto=proto):
        p = f"py{proto}:p:"
        pipe = r.pipeline(transaction=False)
        for i in range(300):
            pipe.set(f"{p}{i}", f"v{i}")
            pipe.get(f"{p}{i}")
        res = pipe.execute()
        assert len(res) == 600
        assert all(res[2 * i + 1] == f"v{i}" for i in range(300))
        tx = r.pipeline(transaction=True)
        tx.set(f"{p}t", 1).incr(f"{p}t").get(f"{p}t")
        assert tx.execute() == [True, 2, "2"]
        with r.pipeline() as w:
            w.watch(f"{p}w")
            redis.Redis.from_url(URL, protocol=proto).set(f"{p}w", "other")
            w.multi()
            w.set(f"{p}w", "mine")
            try:
                w.execute()
                raise AssertionError("WATCH conflict not detected")
            except redis.WatchError:
                pass
        assert r.get(f"{p}w") == "other"

    @check(f"redis-py protocol={proto}: Lua, SCAN, blocking pop, pub/sub")
    def _more(r=r, proto=proto):
        p = f"py{proto}:"
        add = r.register_script("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        r.delete(f"{p}lua")
        assert add(keys=[f"{p}lua"], args=[3]) == 3
        for i in range(120):
            r.set(f"{p}scan:{i}", i)
        assert len(set(r.scan_iter(match=f"{p}scan:*", count=25))) == 120
        r.delete(f"{p}q")
        threading.Timer(0.1, lambda: redis.Redis.from_url(URL).lpush(f"{p}q", "job")).start()
        assert list(r.blpop([f"{p}q"], timeout=5)) == [f"{p}q", "job"]
        ps = r.pubsub()
        ps.subscribe(f"{p}ch")
        deadline = time.time() + 5
        msg = None
        while time.time() < deadline:
            msg = ps.get_message(timeout=0.1)
            if msg and msg["type"] == "subscribe":
                break
        r.publish(f"{p}ch", "hello")
        while time.time() < deadline:
            msg = ps.get_message(timeout=0.1)
            if msg and msg["type"] == "message":
                break
        assert msg and msg["data"] == "hello", msg
        ps.close()
        r.client_setname(f"py{proto}")
        assert r.client_getname() == f"py{proto}"
        assert isinstance(r.client_id(), int)

    @check(f"redis-py protocol={proto}: MONITOR, a reset WATCH, sharded pub/sub, NUMSUB")
    def _facade(r=r, proto=proto):
        p = f"py{proto}:"
        r.set(f"{p}w", 1)
        # redis-py's own wait_for_command: the UNWATCH of a reset pipeline
        # shows in MONITOR before the GET of a marker key.
        with r.monitor() as m:
            with r.pipeline() as pipe:
                pipe.watch(f"{p}w")
                pipe.get(f"{p}w")
                pipe.reset()
            marker = f"__mark-{r.client_id()}__"
            r.get(marker)
            seen = None
            while seen is None:
                command = m.next_command()["command"]
                if "UNWATCH" in command:
                    seen = command
                elif marker in command:
                    seen = "the marker first"
            assert seen == "UNWATCH", seen
        ps = r.pubsub()
        ps.ssubscribe(f"{p}s1", f"{p}s2", f"{p}s3")
        counts = []
        deadline = time.time() + 5
        while len(counts) < 3 and time.time() < deadline:
            msg = ps.get_sharded_message(timeout=0.1)
            if msg and msg["type"] == "ssubscribe":
                counts.append(msg["data"])
        assert counts == [1, 2, 3], counts
        assert r.spublish(f"{p}s2", "x") == 1
        ps.close()
        # socket.io's adapter counts servers with PUBSUB NUMSUB.
        subs = [r.pubsub() for _ in range(3)]
        for sub in subs:
            sub.subscribe(f"{p}room")
            while (msg := sub.get_message(timeout=1)) and msg["type"] != "subscribe":
                pass
        assert r.pubsub_numsub(f"{p}room") == [(f"{p}room", 3)]
        for sub in subs:
            sub.close()

if failures:
    print(f"{len(failures)} check(s) failed: {', '.join(failures)}")
    sys.exit(1)
print("all python compatibility checks passed")
