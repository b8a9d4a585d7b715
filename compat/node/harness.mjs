// The checks of the Node compatibility scripts: each is run, timed and
// reported; `finish` prints the summary and exits 1 if any failed.
const failures = [];

export const sleep = (ms) => new Promise((res) => setTimeout(res, ms));

export async function check(name, fn) {
  const start = Date.now();
  try {
    await fn();
    console.log(`ok   ${name} (${Date.now() - start} ms)`);
  } catch (e) {
    failures.push(name);
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack : e}`);
  }
}

export function finish(what) {
  if (failures.length) {
    console.log(`${failures.length} check(s) failed: ${failures.join(", ")}`);
    process.exit(1);
  }
  console.log(`all ${what} passed`);
  process.exit(0);
}
