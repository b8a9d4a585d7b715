// A BullMQ queue with its worker and QueueEvents, used by the
// compatibility scripts: `completed` fills in with each finished job's
// return value; `close()` ends the worker and removes the queue's keys
// (`worker` is there to close it alone, `opts` to start another).
import { Queue, Worker, QueueEvents } from "bullmq";

export async function startQueue(url, prefix, processor, concurrency, workerOpts = {}) {
  const { hostname: host, port } = new URL(url);
  const connection = { host, port: Number(port), maxRetriesPerRequest: null };
  const name = `${prefix}${Date.now()}`;
  // On a Redis Cluster every key of a queue must hash to one slot (its Lua
  // scripts touch several): a hash-tag prefix does that.
  const opts = { connection, ...(process.env.CLUSTER === "1" ? { prefix: "{bull}" } : {}) };
  const queue = new Queue(name, opts);
  const events = new QueueEvents(name, opts);
  await events.waitUntilReady();
  const worker = new Worker(name, processor, { ...opts, concurrency, ...workerOpts });
  const completed = new Map();
  events.on("completed", ({ jobId, returnvalue }) => completed.set(jobId, returnvalue));
  const close = async () => {
    await worker.close();
    await events.close();
    await queue.obliterate({ force: true });
    await queue.close();
  };
  return { name, opts, queue, worker, completed, close };
}
