// The typical app's key patterns through redis-sidecar with TTL rules
// (run by tests/compat.rs with the rules it configures):
//   sess:*       default 1h, max 1h   (shorter than the session cookie's 24h)
//   cache:*      max 10m
//   post:*       max 1d
//   user:*       default 7d
//   bull:*       exempt (MODE=exempt), or everything under `*` default 1h
//                (MODE=catchall)
// Usage: SIDECAR_URL=redis://127.0.0.1:6380 MODE=exempt node ttl.mjs
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { check, finish, sleep } from "./harness.mjs";
import { startQueue } from "./queue-app.mjs";
import { sessionApp } from "./session-app.mjs";
import RedisStore7 from "connect-redis7";

const url = process.env.SIDECAR_URL;
const mode = process.env.MODE;
if (!url || !["exempt", "catchall"].includes(mode)) {
  console.error("SIDECAR_URL and MODE=exempt|catchall are required");
  process.exit(2);
}
const r = new Redis(url);


await check("express-session + connect-redis: sess:* capped below the cookie's 24h", async () => {
  const { n, sid } = await sessionApp(new RedisStore7({ client: r, prefix: "sess:" }), {
    maxAge: 24 * 3600 * 1000,
  });
  assert.equal(n, 3, "the session still works");
  const ttl = await r.ttl(`sess:${sid}`);
  assert.ok(ttl > 3500 && ttl <= 3600, `session ttl ${ttl}, want the 1h max`);
});

await check("cache getOrSet: cache:* clamped to 10m", async () => {
  const getOrSet = async (key, compute) => {
    const hit = await r.get(key);
    if (hit !== null) return JSON.parse(hit);
    const v = await compute();
    await r.set(key, JSON.stringify(v), "EX", 86400);
    return v;
  };
  const v1 = await getOrSet("cache:user:1", async () => ({ name: "ada" }));
  const v2 = await getOrSet("cache:user:1", async () => assert.fail("must be a hit"));
  assert.deepEqual(v1, v2);
  const ttl = await r.ttl("cache:user:1");
  assert.ok(ttl > 590 && ttl <= 600, `cache ttl ${ttl}`);
});

await check("counters: INCR + EXPIRE under post:* max, INCR under user:* default", async () => {
  await r.del("post:1:likes", "user:7:like:1");
  const p = r.pipeline();
  for (let i = 0; i < 10; i++) p.incr("post:1:likes");
  p.expire("post:1:likes", 7 * 86400);
  p.incr("user:7:like:1");
  const res = await p.exec();
  assert.equal(res[9][1], 10);
  assert.equal(res[10][1], 1, "EXPIRE's own reply");
  const postTtl = await r.ttl("post:1:likes");
  assert.ok(postTtl > 86300 && postTtl <= 86400, `post ttl ${postTtl}`);
  const userTtl = await r.ttl("user:7:like:1");
  assert.ok(userTtl > 7 * 86400 - 100 && userTtl <= 7 * 86400, `user ttl ${userTtl}`);
});

await check(`BullMQ: 200 jobs with retries and a delayed job (${mode})`, async () => {
  const attempts = {};
  const { name, queue, completed, close } = await startQueue(
    url,
    "ttl",
    async (job) => {
      attempts[job.id] = (attempts[job.id] || 0) + 1;
      if (job.data.flaky && attempts[job.id] < 2) throw new Error("try again");
      return job.data.n * 2;
    },
    8,
  );
  const addedAt = Date.now();
  const delayed = await queue.add("delayed", { n: -1 }, { delay: 300 });
  await queue.addBulk(
    [...Array(199).keys()].map((n) => ({
      name: "job",
      data: { n, flaky: n % 10 === 0 },
      opts: { attempts: 3, backoff: { type: "fixed", delay: 20 } },
    })),
  );
  for (let i = 0; i < 600 && completed.size < 200; i++) await sleep(25);
  assert.equal(completed.size, 200, `completed ${completed.size} of 200`);
  const d = await queue.getJob(delayed.id);
  assert.ok(d.finishedOn - addedAt >= 300, "the delayed job waited");
  const counts = await queue.getJobCounts("completed", "failed", "waiting", "delayed");
  assert.deepEqual(counts, { completed: 200, failed: 0, waiting: 0, delayed: 0 });
  // What TTLs BullMQ's keys got.
  const keys = [];
  const stream = r.scanStream({ match: `bull:${name}:*`, count: 500 });
  for await (const batch of stream) keys.push(...batch);
  const ttls = await Promise.all(keys.map((k) => r.ttl(k)));
  const none = ttls.filter((t) => t === -1).length;
  const withTtl = ttls.filter((t) => t > 0);
  console.log(
    `     BullMQ keys: ${keys.length}; without TTL ${none}; with TTL ${withTtl.length}` +
      (withTtl.length ? ` (max ${Math.max(...withTtl)} s)` : ""),
  );
  // Exempt: only the TTLs BullMQ sets itself (its 30 s job locks).
  if (mode === "exempt") assert.ok(withTtl.every((t) => t <= 30), "bull:* is exempt");
  else assert.equal(none, 0, "under the catch-all every key has a TTL");
  await close();
});

r.disconnect();
finish(`TTL compatibility checks (${mode})`);
