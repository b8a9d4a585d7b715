#!/usr/bin/env python3
"""A latency-injecting TCP hop: makes a local Redis look remote.

Each chunk read from one side is written to the other `--delay-ms` after
it arrived (not after the previous chunk was written), so pipelined bytes
overlap as on a real network instead of queueing behind each other.
`--direction up` delays only client-to-server bytes (the whole round-trip
delay on one leg: timers here have millisecond granularity, so one 1 ms
delay is closer to a 1 ms RTT than two 0.5 ms ones); `both` delays each
direction.

Usage: python3 benches/hop.py --listen PORT --target PORT --delay-ms 1 [--direction up|both]
"""

import argparse
import asyncio
import collections


async def pump(reader, writer, delay):
    loop = asyncio.get_running_loop()
    queue = collections.deque()
    ready = asyncio.Event()
    done = False

    async def read():
        nonlocal done
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                queue.append((loop.time() + delay, data))
                ready.set()
        finally:
            done = True
            ready.set()

    async def write():
        while True:
            if not queue:
                if done:
                    break
                ready.clear()
                await ready.wait()
                continue
            at, data = queue.popleft()
            wait = at - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
        writer.close()

    await asyncio.gather(read(), write(), return_exceptions=True)


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--listen", type=int, required=True)
    ap.add_argument("--target", type=int, required=True)
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--direction", choices=["up", "both"], default="up")
    args = ap.parse_args()
    delay = args.delay_ms / 1000.0
    back = delay if args.direction == "both" else 0.0

    async def handle(creader, cwriter):
        try:
            sreader, swriter = await asyncio.open_connection("127.0.0.1", args.target)
        except OSError:
            cwriter.close()
            return
        await asyncio.gather(pump(creader, swriter, delay), pump(sreader, cwriter, back),
                             return_exceptions=True)

    server = await asyncio.start_server(handle, "127.0.0.1", args.listen)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
