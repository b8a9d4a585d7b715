// The guide's app through the sidecar while it migrates to another Redis
// and cuts over (run by tests/compat.rs): 200 sessions read and extended,
// a BullMQ producer with 8 workers running 2,000 jobs (delays, retries, a
// repeat scheduler), counters INCRed from 4 connections, a cache
// getOrSet. Afterwards, through the sidecar (now on the target): every
// session with its data and TTL, every job completed exactly once, the
// counters exact, the scheduler still ticking, and no error seen by the
// app. Env: SIDECAR_URL, ADMIN_URL.
import Redis from "ioredis";
import { Queue, Worker, QueueEvents } from "bullmq";
import { check, finish, sleep } from "./harness.mjs";

const url = process.env.SIDECAR_URL;
const admin = process.env.ADMIN_URL;
const { hostname: host, port } = new URL(url);
const connection = { host, port: Number(port), maxRetriesPerRequest: null };
const errors = [];
const noted = (what) => (e) => errors.push(`${what}: ${e && e.message ? e.message : e}`);

async function status() {
  const r = await fetch(`${admin}/migrations/current`);
  return r.json();
}

const SESSIONS = 200;
const JOBS = 2000;
const DAY = 86400;

// Sessions as connect-redis keeps them: JSON with a TTL, read and touched.
const app = new Redis(url);
app.on("error", noted("app client"));
for (let i = 0; i < SESSIONS; i++) {
  await app.set(`sess:${i}`, JSON.stringify({ user: i, cart: [i, i + 1] }), "EX", DAY);
}

// BullMQ: 8 workers, jobs with delays and retries, a scheduler.
const name = `mig${Date.now()}`;
const queue = new Queue(name, { connection });
queue.on("error", noted("queue"));
const events = new QueueEvents(name, { connection });
events.on("error", noted("events"));
await events.waitUntilReady();
const completed = new Map();
let ticks = 0;
let ticksAfterCutover = 0;
let cutOver = false;
const workers = [];
for (let w = 0; w < 8; w++) {
  const worker = new Worker(
    name,
    async (job) => {
      if (job.name === "tick") {
        ticks++;
        if (cutOver) ticksAfterCutover++;
        return 0;
      }
      // Every tenth job fails its first attempt: BullMQ retries it.
      if (job.data.n % 10 === 0 && job.attemptsMade === 0) {
        throw new Error("first attempt fails on purpose");
      }
      completed.set(job.id, (completed.get(job.id) || 0) + 1);
      return job.data.n;
    },
    { connection, concurrency: 4 },
  );
  worker.on("error", noted(`worker ${w}`));
  workers.push(worker);
}
await queue.upsertJobScheduler("ticker", { every: 100 }, { name: "tick" });

// Counters from 4 connections, each acknowledged INCR counted.
let stop = false;
const acked = [0, 0, 0, 0];
const counters = [0, 1, 2, 3].map(async (c) => {
  const r = new Redis(url);
  r.on("error", noted(`counter ${c}`));
  while (!stop) {
    await r.incr(`counter:${c}`);
    acked[c]++;
  }
  await r.quit();
});

// Sessions read and extended, the cache read through (getOrSet).
let cacheFills = 0;
const reader = (async () => {
  let n = 0;
  while (!stop) {
    const i = n % SESSIONS;
    const s = await app.get(`sess:${i}`);
    if (!s || JSON.parse(s).user !== i) throw new Error(`session ${i} lost: ${s}`);
    await app.expire(`sess:${i}`, DAY);
    const key = `cache:feed:${n % 50}`;
    if ((await app.get(key)) === null) {
      await app.set(key, `feed ${n % 50}`, "EX", 600);
      cacheFills++;
    }
    n++;
  }
})();

// The producer: 2,000 jobs over about two seconds, some delayed.
const producer = (async () => {
  for (let n = 0; n < JOBS; n += 20) {
    const batch = [];
    for (let k = n; k < n + 20; k++) {
      batch.push({
        name: "work",
        data: { n: k },
        opts: { jobId: `job-${k}`, attempts: 3, backoff: { type: "fixed", delay: 50 }, ...(k % 7 === 0 ? { delay: 300 } : {}) },
      });
    }
    await queue.addBulk(batch);
    await sleep(20);
  }
})();

await sleep(300);
await check("the migration starts and cuts over while the app runs", async () => {
  const r = await fetch(`${admin}/migrations`, {
    method: "POST",
    body: JSON.stringify({ to: "target", cutover: true, ...(process.env.RESCAN === "none" ? { cutover_rescan: [] } : {}) }),
  });
  if (r.status !== 202) throw new Error(`POST /migrations: ${r.status} ${await r.text()}`);
  const deadline = Date.now() + 60000;
  for (;;) {
    const m = await status();
    if (m.phase === "done") {
      console.log(`migration: ${JSON.stringify(m)}`);
      cutOver = true;
      return;
    }
    if (m.phase === "failed" || m.phase === "aborted" || Date.now() > deadline) {
      throw new Error(`migration: ${JSON.stringify(m)}`);
    }
    await sleep(20);
  }
});

await producer;
await check("every job completes exactly once", async () => {
  const deadline = Date.now() + 60000;
  while (completed.size < JOBS && Date.now() < deadline) await sleep(50);
  const twice = [...completed].filter(([, n]) => n !== 1);
  if (completed.size !== JOBS || twice.length) {
    const counts = await queue.getJobCounts();
    throw new Error(`${completed.size} of ${JOBS} completed; more than once: ${twice.slice(0, 5)}; ${JSON.stringify(counts)}`);
  }
  const failed = await queue.getFailedCount();
  if (failed !== 0) throw new Error(`${failed} failed jobs`);
});

await check("the scheduler keeps ticking on the target", async () => {
  const deadline = Date.now() + 10000;
  while (ticksAfterCutover < 3 && Date.now() < deadline) await sleep(50);
  if (ticksAfterCutover < 3) throw new Error(`${ticksAfterCutover} ticks after the cutover (${ticks} in all)`);
});

stop = true;
await Promise.all(counters);
await reader;

await check("counters are exact", async () => {
  for (let c = 0; c < 4; c++) {
    const v = Number(await app.get(`counter:${c}`));
    if (v !== acked[c]) throw new Error(`counter:${c} = ${v}, ${acked[c]} INCRs acknowledged`);
  }
});

await check("every session is there with its data and TTL", async () => {
  for (let i = 0; i < SESSIONS; i++) {
    const s = await app.get(`sess:${i}`);
    if (!s || JSON.parse(s).cart[1] !== i + 1) throw new Error(`session ${i}: ${s}`);
    const ttl = await app.ttl(`sess:${i}`);
    if (ttl < DAY - 60 || ttl > DAY) throw new Error(`session ${i}: ttl ${ttl}`);
  }
  if (cacheFills < 50) throw new Error(`${cacheFills} cache fills`);
});

await check("the sidecar runs on the target", async () => {
  const r = await fetch(`${admin}/upstreams`);
  const u = await r.json();
  if (u.active !== "target") throw new Error(JSON.stringify(u));
});

for (const w of workers) await w.close();
await events.close();
await queue.removeJobScheduler("ticker");
await queue.obliterate({ force: true });
await queue.close();
await app.quit();

await check("the app saw no error", async () => {
  if (errors.length) throw new Error(errors.slice(0, 10).join("; "));
});
finish("migration checks");
