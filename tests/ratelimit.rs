//! Rate limits against a real redis-server, through the sidecar over real
//! sockets: accuracy of GCRA (allowed = burst + rate × time within 2 %),
//! delay pacing (n commands in n/r seconds within 5 %, replies in order),
//! isolation between clients, per-key buckets and their memory bound,
//! MULTI/EXEC, pipelines, RESP2/RESP3, matchers, observe mode, reloads,
//! and the shared scope (two sidecars, one limit; upstream down).
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis_sidecar::config::{Config, RateLimitRule};
use redis_sidecar::policy::Builder;

use support::*;

fn rule(text: &str) -> RateLimitRule {
    toml::from_str(text).unwrap()
}

fn with_rules(redis: &RedisServer, rules: &[&str]) -> Config {
    let mut c = config(&redis.url());
    c.rate_limit = rules.iter().map(|r| rule(r)).collect();
    c
}

/// The sidecar in front of `redis` with these `[[rate_limit]]` rules.
async fn limited(redis: &RedisServer, rules: &[&str]) -> redis_sidecar::Sidecar {
    sidecar_with(with_rules(redis, rules), Builder::default()).await
}

/// `ratelimit_decisions_total{rule, result}`.
fn decisions(s: &redis_sidecar::Sidecar, rule: &str, result: &str) -> f64 {
    metric(
        s,
        "ratelimit_decisions_total",
        &[("rule", rule), ("result", result)],
    )
}

fn is_limited(reply: &[u8]) -> bool {
    reply.starts_with(b"-ERR rate limit exceeded")
}

/// Send `cmd` in batches of `pipeline` until `deadline`: (allowed,
/// limited). Any reply that is neither is a failure.
async fn hammer(addr: SocketAddr, deadline: Instant, pipeline: usize, cmd: &[&[u8]]) -> (u64, u64) {
    hammer_until(addr, Arc::default(), deadline, pipeline, cmd).await
}

/// [`hammer`], also ending when `stop` is set.
async fn hammer_until(
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    deadline: Instant,
    pipeline: usize,
    cmd: &[&[u8]],
) -> (u64, u64) {
    let mut c = Raw::connect(addr).await;
    let one = redis_sidecar::wire::encode_command(cmd);
    let batch: Vec<u8> = one
        .iter()
        .copied()
        .cycle()
        .take(one.len() * pipeline)
        .collect();
    let (mut ok, mut limited) = (0, 0);
    while Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        c.send(&batch).await;
        for _ in 0..pipeline {
            let r = c.read().await;
            if is_limited(&r) {
                limited += 1;
            } else {
                assert!(!r.starts_with(b"-"), "{r:?}");
                ok += 1;
            }
        }
    }
    (ok, limited)
}

/// Several clients, pipelined and not, against one global rule: the
/// allowed count is within 2 % of burst + rate × time.
async fn accuracy(rate: u64, burst: u64, secs: f64) {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[&format!(
            "name = \"acc\"\ncommands = [\"get\"]\nrate = \"{rate}/s\"\nburst = {burst}\n"
        )],
    )
    .await;
    let start = Instant::now();
    let deadline = start + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for pipeline in [1, 1, 16, 64] {
        let addr = s.addr;
        tasks.push(tokio::spawn(async move {
            hammer(addr, deadline, pipeline, &[b"GET", b"acc"]).await
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        ok += a;
        limited += b;
    }
    let t = start.elapsed().as_secs_f64();
    let expected = burst as f64 + rate as f64 * t;
    let err = (ok as f64 - expected).abs() / expected;
    println!(
        "rate {rate}/s burst {burst} over {t:.3}s: allowed {ok}, expected {expected:.0} ({:.2} %), limited {limited}",
        err * 100.0
    );
    assert!(limited > 0, "the clients did not exceed the rate");
    assert!(err < 0.02, "allowed {ok}, expected {expected:.0}");
    assert_eq!(decisions(&s, "acc", "allowed"), ok as f64);
    assert_eq!(decisions(&s, "acc", "rejected"), limited as f64);
    s.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accuracy_at_100_per_second() {
    accuracy(100, 20, 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accuracy_at_10000_per_second() {
    accuracy(10_000, 500, 2.0).await;
}

/// A delay rule paces a pipelined client: n commands in n/r seconds, every
/// reply in order, nothing rejected.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delay_paces_a_pipeline_in_order() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "pace"
per = "client"
rate = "200/s"
burst = 1
action = "delay"
max_delay = "5s"
"#],
    )
    .await;
    let n = 400;
    let mut c = Raw::connect(s.addr).await;
    let mut batch = Vec::new();
    for i in 0..n {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
            b"ECHO".as_slice(),
            i.to_string().as_bytes(),
        ]));
    }
    let start = Instant::now();
    c.send(&batch).await;
    for i in 0..n {
        let r = c.read().await;
        assert_eq!(
            &r[..],
            format!("${}\r\n{i}\r\n", i.to_string().len()).as_bytes()
        );
    }
    let took = start.elapsed().as_secs_f64();
    let expected = n as f64 / 200.0;
    println!("{n} commands at 200/s (burst 1) took {took:.3}s, expected {expected:.3}s");
    assert!((took - expected).abs() / expected < 0.05, "took {took:.3}s");
    // Every command was counted once; all but the first waited (one whose
    // slot had come by the time its turn came, on a loaded machine, passes
    // as allowed).
    let allowed = decisions(&s, "pace", "allowed");
    let delayed = decisions(&s, "pace", "delayed");
    assert_eq!(allowed + delayed, n as f64);
    assert!(delayed >= (n - 20) as f64, "{delayed}");
    assert_eq!(
        metric(&s, "ratelimit_delay_seconds_count", &[("rule", "pace")]),
        delayed
    );
    // Another client of the same rule is not held by the first one.
    let mut other = Raw::connect(s.addr).await;
    let t = Instant::now();
    assert_eq!(&other.call(&[b"PING", b"x"]).await[..], b"$1\r\nx\r\n");
    assert!(t.elapsed() < Duration::from_millis(100));
    s.shutdown().await;
}

/// Past `max_delay` a delay rule rejects: two clients share a global
/// bucket, so their bookings add up.
#[tokio::test]
async fn delay_past_max_delay_rejects() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "slow"
rate = "10/s"
burst = 1
action = "delay"
max_delay = "150ms"
"#],
    )
    .await;
    let start = Instant::now();
    let deadline = start + Duration::from_millis(1500);
    let clients: Vec<_> = (0..4)
        .map(|_| tokio::spawn(hammer(s.addr, deadline, 4, &[b"GET", b"x"])))
        .collect();
    let (mut ok, mut limited) = (0, 0);
    for c in clients {
        let (a, b) = c.await.unwrap();
        ok += a;
        limited += b;
    }
    let t = start.elapsed().as_secs_f64();
    println!("four clients, {t:.3}s: allowed {ok}, rejected {limited}");
    assert!(limited > 0, "nothing was rejected");
    // The burst, then 10/s; bookings never reach past max_delay.
    assert!(ok as f64 <= 1.0 + 10.0 * t + 1.0, "{ok} in {t:.3}s");
    assert!(ok as f64 >= 10.0 * 1.5 - 1.0, "{ok} in {t:.3}s");
    s.shutdown().await;
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 * p) as usize).min(v.len() - 1)]
}

/// A quiet client's latency (sequential GETs, under its own limit).
async fn quiet_latencies(addr: SocketAddr, n: usize) -> (Vec<Duration>, u64) {
    let mut c = Raw::connect(addr).await;
    let mut lat = Vec::with_capacity(n);
    let mut limited = 0;
    for _ in 0..n {
        let t = Instant::now();
        let r = c.call(&[b"GET", b"quiet"]).await;
        lat.push(t.elapsed());
        if is_limited(&r) {
            limited += 1;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    (lat, limited)
}

/// `calls` of one command in Redis's `INFO commandstats`.
async fn calls(redis: &RedisServer, cmd: &str) -> u64 {
    let mut c = redis.direct().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut c)
        .await
        .unwrap();
    let key = format!("cmdstat_{cmd}:calls=");
    info.lines()
        .find_map(|l| l.strip_prefix(&key))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |n| n.parse().unwrap())
}

/// A client hammering past its per-client limit neither takes the quiet
/// client's budget nor costs the upstream anything beyond its own: every
/// command it was refused was answered by the sidecar and never reached
/// Redis, so nothing the quiet client sends queues behind it there. Load
/// does not move these counts (a bound on the quiet client's latency,
/// which a busy machine does move, is a benchmark's business).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_noisy_client_does_not_hurt_a_quiet_one() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "per-client"
per = "client"
rate = "2000/s"
burst = 200
"#],
    )
    .await;
    let n = 1000;
    let before = calls(&redis, "get").await;
    let (base, base_limited) = quiet_latencies(s.addr, n).await;
    let start = Instant::now();
    let deadline = start + Duration::from_secs(30);
    let stop = Arc::new(AtomicBool::new(false));
    let mut noisy = Vec::new();
    for _ in 0..2 {
        noisy.push(tokio::spawn(hammer_until(
            s.addr,
            stop.clone(),
            deadline,
            64,
            &[b"GET", b"noisy"],
        )));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (loaded, loaded_limited) = quiet_latencies(s.addr, n).await;
    stop.store(true, Ordering::Relaxed);
    let t = start.elapsed().as_secs_f64();
    let mut noisy_ok = Vec::new();
    let mut noisy_limited = 0;
    for h in noisy {
        let (ok, limited) = h.await.unwrap();
        noisy_ok.push(ok);
        noisy_limited += limited;
    }
    let (p99_base, p99_loaded) = (percentile(base, 0.99), percentile(loaded, 0.99));
    println!(
        "quiet p99 alone {p99_base:?}, with two noisy clients {p99_loaded:?}; noisy allowed {noisy_ok:?} over {t:.2}s, limited {noisy_limited}"
    );
    assert_eq!(
        base_limited + loaded_limited,
        0,
        "the quiet client was limited"
    );
    assert!(noisy_limited > 0);
    // Each noisy client got its own budget, not more.
    for &ok in &noisy_ok {
        assert!(ok as f64 <= 200.0 + 2000.0 * t * 1.02, "{ok}");
    }
    // Exactly the quiet client's GETs and those the noisy ones were
    // allowed reached Redis.
    let reached = calls(&redis, "get").await - before;
    assert_eq!(reached, 2 * n as u64 + noisy_ok.iter().sum::<u64>());
    s.shutdown().await;
}

/// `per = "key"` on `feed:user:*`: each user id has its own bucket; other
/// keys and reads are not counted; MSET counts each key.
#[tokio::test]
async fn per_key_buckets() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "feed-writes"
commands = ["@write"]
pattern = "feed:user:*"
per = "key"
rate = "10/min"
burst = 3
"#],
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    let mut push = async |key: &str| {
        let r = c.call(&[b"LPUSH", key.as_bytes(), b"x"]).await;
        !is_limited(&r)
    };
    let mut results = Vec::new();
    for key in ["feed:user:1"; 5].into_iter().chain(["feed:user:2"; 3]) {
        results.push(push(key).await);
    }
    assert_eq!(
        results,
        [true, true, true, false, false, true, true, true],
        "user 1 has 3, user 2 its own 3"
    );
    for _ in 0..5 {
        assert!(push("other:1").await);
    }
    let r = c.call(&[b"LRANGE", b"feed:user:1", b"0", b"-1"]).await;
    assert!(r.starts_with(b"*3\r\n"), "{r:?}");
    let r = c
        .call(&[b"MSET", b"feed:user:3", b"a", b"feed:user:4", b"b"])
        .await;
    assert_eq!(&r[..], b"+OK\r\n");
    assert_eq!(
        &c.call(&[b"SET", b"feed:user:3", b"c"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &c.call(&[b"SET", b"feed:user:3", b"d"]).await[..],
        b"+OK\r\n"
    );
    let r = c.call(&[b"SET", b"feed:user:3", b"e"]).await;
    assert!(is_limited(&r), "{r:?}");
    assert!(
        r.starts_with(b"-ERR rate limit exceeded (rule feed-writes, retry in "),
        "{r:?}"
    );
    // A rejected command was not sent: the value is still "d".
    let mut direct = redis.direct().await;
    let v: String = redis::cmd("GET")
        .arg("feed:user:3")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(v, "d");
    // MSET whose second key is out of budget is rejected as a whole, and
    // the first key's charge is given back.
    let r = c
        .call(&[b"MSET", b"feed:user:4", b"a", b"feed:user:3", b"b"])
        .await;
    assert!(is_limited(&r), "{r:?}");
    assert_eq!(
        &c.call(&[b"SET", b"feed:user:4", b"z"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &c.call(&[b"SET", b"feed:user:4", b"z"]).await[..],
        b"+OK\r\n"
    );
    assert!(is_limited(&c.call(&[b"SET", b"feed:user:4", b"z"]).await));
    s.shutdown().await;
}

/// A million distinct keys passing once each: the rule's buckets stay
/// under its cap, the overflow is counted, and memory stays flat.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_key_memory_stays_flat() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "keys"
commands = ["exists"]
per = "key"
rate = "1/s"
burst = 1
max_tracked_keys = 20000
"#],
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    let total = 1_000_000u64;
    let batch = 1000;
    let mut rss_at_200k = 0;
    let mut limited = 0u64;
    let mut next = 0u64;
    let mut peak_tracked = 0.0f64;
    while next < total {
        let mut buf = Vec::new();
        for i in next..next + batch {
            buf.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                b"EXISTS".as_slice(),
                format!("feed:user:{i}").as_bytes(),
            ]));
        }
        c.send(&buf).await;
        for _ in 0..batch {
            if is_limited(&c.read().await) {
                limited += 1;
            }
        }
        next += batch;
        if next == 200_000 {
            rss_at_200k = rss_kib();
        }
        if next.is_multiple_of(100_000) {
            peak_tracked =
                peak_tracked.max(metric(&s, "ratelimit_tracked_keys", &[("rule", "keys")]));
        }
    }
    let rss_end = rss_kib();
    let overflow = metric(&s, "ratelimit_overflow_total", &[("rule", "keys")]);
    println!(
        "1M distinct keys: RSS at 200k {rss_at_200k} KiB, at 1M {rss_end} KiB; peak tracked {peak_tracked}; overflow {overflow}; limited {limited}"
    );
    assert!(peak_tracked <= 20_000.0 + 16.0, "{peak_tracked}");
    assert!(
        rss_end < rss_at_200k + 16 * 1024,
        "RSS grew from {rss_at_200k} to {rss_end} KiB"
    );
    // Over the cap, the keys without a bucket share the overflow bucket.
    assert!(overflow > 0.0 && limited > 0);
    // Idle buckets go away within a few ticks.
    assert!(
        eventually(|| async { metric(&s, "ratelimit_tracked_keys", &[("rule", "keys")]) == 0.0 })
            .await
    );
    s.shutdown().await;
}

/// Inside MULTI a rejected command makes EXEC answer EXECABORT, as Redis
/// does for a command refused at queue time; RESP2 and RESP3.
#[tokio::test]
async fn multi_with_a_rejected_command_aborts() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "sets"
commands = ["set"]
rate = "1/min"
burst = 2
"#],
    )
    .await;
    let abort = &b"-EXECABORT Transaction discarded because of previous errors.\r\n"[..];
    // RESP2: two SETs fit the burst, the third is refused.
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(&c.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&c.call(&[b"SET", b"tx:a", b"1"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&c.call(&[b"INCR", b"tx:n"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&c.call(&[b"SET", b"tx:b", b"1"]).await[..], b"+QUEUED\r\n");
    let r = c.call(&[b"SET", b"tx:c", b"1"]).await;
    assert!(
        r.starts_with(b"-ERR rate limit exceeded (rule sets, retry in "),
        "{r:?}"
    );
    assert_eq!(&c.call(&[b"EXEC"]).await[..], abort);
    // RESP3: the bucket is empty, the first SET is refused.
    let mut c = Raw::connect(s.addr).await;
    assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    assert_eq!(&c.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&c.call(&[b"INCR", b"tx:n"]).await[..], b"+QUEUED\r\n");
    assert!(is_limited(&c.call(&[b"SET", b"tx:d", b"1"]).await));
    assert_eq!(&c.call(&[b"EXEC"]).await[..], abort);
    // Nothing of the aborted transactions ran.
    let mut direct = redis.direct().await;
    let n: i64 = redis::cmd("EXISTS")
        .arg(&["tx:a", "tx:b", "tx:c", "tx:d", "tx:n"])
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(n, 0);
    s.shutdown().await;
}

/// A refused EXEC or DISCARD ends the transaction, as Redis never leaves
/// MULTI open after either: the client's next commands run (they are not
/// answered QUEUED and lost), and nothing queued ran.
#[tokio::test]
async fn a_refused_exec_or_discard_ends_the_transaction() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "tx-end"
commands = ["exec", "discard"]
rate = "1/min"
burst = 1
"#],
    )
    .await;
    let mut direct = redis.direct().await;
    for end in [&b"EXEC"[..], b"DISCARD"] {
        let mut c = Raw::connect(s.addr).await;
        // The bucket's one token goes to a transaction that runs.
        if end == b"EXEC" {
            assert_eq!(&c.call(&[b"MULTI"]).await[..], b"+OK\r\n");
            assert_eq!(&c.call(&[b"INCR", b"ran"]).await[..], b"+QUEUED\r\n");
            assert_eq!(&c.call(&[b"EXEC"]).await[..], b"*1\r\n:1\r\n");
        }
        assert_eq!(&c.call(&[b"MULTI"]).await[..], b"+OK\r\n");
        assert_eq!(
            &c.call(&[b"SET", b"queued", b"1"]).await[..],
            b"+QUEUED\r\n"
        );
        assert!(is_limited(&c.call(&[end]).await));
        // Out of the transaction: a command runs at once.
        assert_eq!(&c.call(&[b"SET", b"after", b"1"]).await[..], b"+OK\r\n");
        assert_eq!(&c.call(&[b"GET", b"after"]).await[..], b"$1\r\n1\r\n");
        let queued: bool = redis::AsyncCommands::exists(&mut direct, "queued")
            .await
            .unwrap();
        assert!(!queued, "a command of the refused transaction ran");
        let _: () = redis::AsyncCommands::del(&mut direct, "after")
            .await
            .unwrap();
    }
    s.shutdown().await;
}

/// A delay rule inside MULTI delays the queueing; EXEC runs everything.
#[tokio::test]
async fn multi_with_a_delayed_command_waits_then_runs() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "d"
commands = ["incr"]
rate = "10/s"
burst = 1
action = "delay"
"#],
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    let mut batch = Vec::new();
    for cmd in [
        &[&b"MULTI"[..]][..],
        &[b"INCR", b"m"],
        &[b"INCR", b"m"],
        &[b"INCR", b"m"],
        &[b"EXEC"],
    ] {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(cmd));
    }
    let t = Instant::now();
    c.send(&batch).await;
    let mut got = Vec::new();
    for _ in 0..5 {
        got.push(c.read().await);
    }
    let took = t.elapsed();
    assert_eq!(&got[4][..], b"*3\r\n:1\r\n:2\r\n:3\r\n", "{got:?}");
    assert!(took >= Duration::from_millis(190), "{took:?}");
    s.shutdown().await;
}

/// A pipeline keeps its order with rejections in the middle; exempt
/// connection commands pass unless a rule names them.
#[tokio::test]
async fn pipelines_keep_order_and_connection_commands_are_exempt() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[
            r#"name = "all"
rate = "1/min"
burst = 3
"#,
            r#"name = "pings"
commands = ["ping"]
per = "client"
rate = "1/min"
burst = 2
"#,
        ],
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    let mut batch = Vec::new();
    for i in 0..6 {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
            b"ECHO".as_slice(),
            format!("e{i}").as_bytes(),
        ]));
    }
    c.send(&batch).await;
    let mut got = Vec::new();
    for _ in 0..6 {
        got.push(c.read().await);
    }
    for (i, r) in got.iter().enumerate() {
        if i < 3 {
            assert_eq!(&r[..], format!("$2\r\ne{i}\r\n").as_bytes());
        } else {
            assert!(is_limited(r), "{i}: {r:?}");
        }
    }
    // PING is named by "pings" only: 2 pass, then it is limited; "all"
    // (which does not name it) does not count it.
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let r = c.call(&[b"PING"]).await;
    assert!(
        r.starts_with(b"-ERR rate limit exceeded (rule pings,"),
        "{r:?}"
    );
    // HELLO, AUTH-free: never limited.
    for _ in 0..5 {
        assert!(c.call(&[b"HELLO", b"2"]).await.starts_with(b"*"));
    }
    // RESP3 clients get the same error.
    let r = c.call(&[b"HELLO", b"3"]).await;
    assert!(r.starts_with(b"%"));
    let r = c.call(&[b"ECHO", b"x"]).await;
    assert!(is_limited(&r), "{r:?}");
    s.shutdown().await;
}

/// Matchers: client addresses, client names; a rule matching another
/// address range does not apply.
#[tokio::test]
async fn matchers_select_clients() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[
            r#"name = "elsewhere"
clients = ["10.0.0.0/8"]
rate = "1/min"
burst = 1
"#,
            r#"name = "workers"
client_names = ["worker-*"]
per = "client_name"
rate = "1/min"
burst = 2
"#,
            r#"name = "local"
clients = ["127.0.0.1/32"]
commands = ["@read"]
rate = "1/min"
burst = 4
"#,
        ],
    )
    .await;
    let mut web = Raw::connect(s.addr).await;
    assert_eq!(
        &web.call(&[b"CLIENT", b"SETNAME", b"web-1"]).await[..],
        b"+OK\r\n"
    );
    for _ in 0..5 {
        assert_eq!(&web.call(&[b"SET", b"m", b"1"]).await[..], b"+OK\r\n");
    }
    let mut w1 = Raw::connect(s.addr).await;
    let mut w2 = Raw::connect(s.addr).await;
    assert_eq!(
        &w1.call(&[b"CLIENT", b"SETNAME", b"worker-1"]).await[..],
        b"+OK\r\n"
    );
    // Before SETNAME the name did not match: worker-1 has 2 now.
    assert_eq!(&w1.call(&[b"SET", b"m", b"1"]).await[..], b"+OK\r\n");
    assert_eq!(&w1.call(&[b"SET", b"m", b"1"]).await[..], b"+OK\r\n");
    assert!(is_limited(&w1.call(&[b"SET", b"m", b"1"]).await));
    // Another connection with the same name shares the bucket.
    assert_eq!(
        &w2.call(&[b"CLIENT", b"SETNAME", b"worker-1"]).await[..],
        b"+OK\r\n"
    );
    let r = w2.call(&[b"SET", b"m", b"1"]).await;
    assert!(
        r.starts_with(b"-ERR rate limit exceeded (rule workers,"),
        "{r:?}"
    );
    // Reads from 127.0.0.1 (any client) share "local"'s 4.
    let mut reads = Vec::new();
    let mut other = Raw::connect(s.addr).await;
    for i in 0..5 {
        let c = if i % 2 == 0 { &mut web } else { &mut other };
        reads.push(!is_limited(&c.call(&[b"GET", b"m"]).await));
    }
    assert_eq!(reads, [true, true, true, true, false]);
    s.shutdown().await;
}

/// Observe mode counts what would be limited and lets everything through.
#[tokio::test]
async fn observe_counts_and_lets_through() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[r#"name = "obs"
rate = "1/min"
burst = 2
mode = "observe"
"#],
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    for _ in 0..5 {
        assert_eq!(&c.call(&[b"SET", b"o", b"1"]).await[..], b"+OK\r\n");
    }
    assert_eq!(decisions(&s, "obs", "allowed"), 2.0);
    assert_eq!(decisions(&s, "obs", "observed"), 3.0);
    s.shutdown().await;
}

/// A reload keeps the buckets of unchanged rules; a changed rule starts
/// fresh.
#[tokio::test]
async fn reload_keeps_unchanged_buckets() {
    let redis = RedisServer::start();
    let dir = tempdir();
    let file = dir.join("sidecar.toml");
    let head = |rate: &str, extra: bool| {
        let mut t = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[[rate_limit]]\nname = \"keep\"\ncommands = [\"set\"]\nrate = \"{rate}\"\nburst = 2\n"
        );
        if extra {
            t.push_str("[[rate_limit]]\nname = \"new\"\ncommands = [\"get\"]\nrate = \"1/min\"\nburst = 100\n");
        }
        t
    };
    write_config(&file, &head("1/min", false), &[("main", &redis)]);
    let s = sidecar_from_file(&file).await;
    let mut c = Raw::connect(s.addr).await;
    let set = async |c: &mut Raw| !is_limited(&c.call(&[b"SET", b"r", b"1"]).await);
    assert!(set(&mut c).await && set(&mut c).await && !set(&mut c).await);
    write_config(&file, &head("1/min", true), &[("main", &redis)]);
    s.control.reload().unwrap();
    assert!(!set(&mut c).await, "the unchanged rule lost its bucket");
    write_config(&file, &head("2/min", true), &[("main", &redis)]);
    s.control.reload().unwrap();
    assert!(set(&mut c).await, "the changed rule kept the old bucket");
    // A bad rule refuses the reload and keeps the running ones.
    std::fs::write(
        &file,
        std::fs::read_to_string(&file)
            .unwrap()
            .replace("2/min", "fast"),
    )
    .unwrap();
    let err = s.control.reload().unwrap_err().to_string();
    assert!(
        err.contains("rate_limit[0]: rate: use <count>/<period>"),
        "{err}"
    );
    assert!(!err.contains("fast"), "the value is never quoted: {err}");
    s.shutdown().await;
}

fn tempdir() -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!(
        "sidecar-rl-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn bad_rules_are_config_errors() {
    let mut c = config("redis://127.0.0.1:1");
    c.rate_limit = vec![
        rule("name = \"a\"\nrate = \"5000\"\n"),
        rule("name = \"a\"\nrate = \"5/s\"\ncommands = [\"@nope\"]\nclients = [\"10.0.0.0/40\"]\n"),
        rule("name = \"\"\nrate = \"0/s\"\npattern = \"\"\n"),
    ];
    let err = c.validate().unwrap_err().to_string();
    for want in [
        "rate_limit[0]: rate: use <count>/<period>",
        "rate_limit[1]: name \"a\" is already used",
        "rate_limit[1]: commands[0]: unknown ACL category",
        "rate_limit[1]: clients[0]: not an IP address",
        "rate_limit[2]: name must not be empty",
        "rate_limit[2]: rate: use <count>/<period>",
        "rate_limit[2]: pattern must not be empty",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    let bad: Result<RateLimitRule, _> =
        toml::from_str("name = \"x\"\nrate = \"1/s\"\nper = \"tenant\"\n");
    assert!(bad.is_err());
}

fn shared_rule(name: &str, rate: &str, burst: u32, on_error: &str) -> String {
    format!(
        "name = \"{name}\"\ncommands = [\"get\", \"client|id\"]\nscope = \"shared\"\nrate = \"{rate}\"\nburst = {burst}\non_error = \"{on_error}\"\n"
    )
}

/// Two sidecars in front of one Redis share one limit: together they allow
/// within 5 % of burst + rate × time; the upstream work per command is
/// reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_scope_two_sidecars_one_limit() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let rate = 1000u64;
    let burst = 100u64;
    let r = shared_rule("tenant", &format!("{rate}/s"), burst as u32, "local");
    let a = limited(&redis, &[&r]).await;
    let b = limited(&redis, &[&r]).await;
    let mut direct = redis.direct().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut direct)
        .await
        .unwrap();
    let start = Instant::now();
    let deadline = start + Duration::from_secs(3);
    let mut tasks = Vec::new();
    for (addr, pipeline) in [(a.addr, 1), (a.addr, 16), (b.addr, 1), (b.addr, 16)] {
        tasks.push(tokio::spawn(hammer(
            addr,
            deadline,
            pipeline,
            &[b"GET", b"shared"],
        )));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (x, y) = t.await.unwrap();
        ok += x;
        limited += y;
    }
    let t = start.elapsed().as_secs_f64();
    let expected = burst as f64 + rate as f64 * t;
    let err = (ok as f64 - expected).abs() / expected;
    let calls = metric(&a, "ratelimit_shared_calls_total", &[("result", "ok")])
        + metric(&b, "ratelimit_shared_calls_total", &[("result", "ok")]);
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut direct)
        .await
        .unwrap();
    let evalsha = info
        .lines()
        .find(|l| l.starts_with("cmdstat_evalsha:"))
        .unwrap_or("")
        .to_string();
    println!(
        "shared {rate}/s burst {burst}, two sidecars, {t:.3}s: allowed {ok} (expected {expected:.0}, {:.2} %), limited {limited}; script calls {calls} = {:.4} per allowed command, {:.4} per command; {evalsha}",
        err * 100.0,
        calls / ok as f64,
        calls / (ok + limited) as f64
    );
    assert!(err < 0.05, "allowed {ok}, expected {expected:.0}");
    assert!(
        calls > 0.0 && calls < (ok + limited) as f64 / 5.0,
        "{calls}"
    );
    assert_eq!(metric(&a, "ratelimit_fallback_total", &[]), 0.0);
    a.shutdown().await;
    b.shutdown().await;
}

/// The upstream goes away: the fallback decides, and is counted. The rule
/// is per client, so a new client has a bucket the upstream never
/// answered for; CLIENT ID is answered by the sidecar itself, so it works
/// without an upstream.
#[tokio::test]
async fn shared_scope_falls_back_when_the_upstream_is_down() {
    for (on_error, expect) in [
        ("local", [true, true, true, false]),
        ("allow", [true, true, true, true]),
        ("reject", [false, false, false, false]),
    ] {
        let mut redis = RedisServer::start();
        let r = format!(
            "name = \"fb\"\ncommands = [\"client|id\"]\nper = \"client\"\nscope = \"shared\"\nrate = \"1/min\"\nburst = 3\non_error = \"{on_error}\"\n"
        );
        let s = limited(&redis, &[&r]).await;
        let four = async |c: &mut Raw| {
            let mut got = [false; 4];
            for g in &mut got {
                *g = !is_limited(&c.call(&[b"CLIENT", b"ID"]).await);
            }
            got
        };
        // Up: the upstream's bucket.
        let mut a = Raw::connect(s.addr).await;
        assert_eq!(four(&mut a).await, [true, true, true, false]);
        assert_eq!(metric(&s, "ratelimit_fallback_total", &[]), 0.0);
        let mut direct = redis.direct().await;
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("redis-sidecar:rl:fb:*")
            .query_async(&mut direct)
            .await
            .unwrap();
        assert_eq!(keys.len(), 1, "{keys:?}");
        redis.kill();
        let mut b = Raw::connect(s.addr).await;
        assert_eq!(four(&mut b).await, expect, "on_error = {on_error}");
        assert!(metric(&s, "ratelimit_fallback_total", &[("rule", "fb")]) >= 4.0);
        assert!(metric(&s, "ratelimit_shared_calls_total", &[("result", "error")]) >= 1.0);
        s.shutdown().await;
    }
}

/// Subscribed clients' commands are limited too; a rule listing
/// `@connection` does not limit PING (only naming it does).
#[tokio::test]
async fn subscribed_clients_are_limited_and_connection_commands_need_naming() {
    let redis = RedisServer::start();
    let s = limited(
        &redis,
        &[
            r#"name = "subs"
commands = ["subscribe"]
per = "client"
rate = "1/min"
burst = 2
"#,
            r#"name = "conn"
commands = ["@connection"]
per = "client"
rate = "1/min"
burst = 1
"#,
        ],
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    for _ in 0..3 {
        assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    }
    assert!(
        c.call(&[b"SUBSCRIBE", b"a"])
            .await
            .starts_with(b"*3\r\n$9\r\nsubscribe")
    );
    assert!(
        c.call(&[b"SUBSCRIBE", b"b"])
            .await
            .starts_with(b"*3\r\n$9\r\nsubscribe")
    );
    let r = c.call(&[b"SUBSCRIBE", b"c"]).await;
    assert!(
        r.starts_with(b"-ERR rate limit exceeded (rule subs,"),
        "{r:?}"
    );
    // Still subscribed to a and b, and PING is not limited there either.
    assert_eq!(
        &c.call(&[b"PING"]).await[..],
        b"*2\r\n$4\r\npong\r\n$0\r\n\r\n"
    );
    let mut direct = redis.direct().await;
    let n: i64 = redis::cmd("PUBLISH")
        .arg("b")
        .arg("hi")
        .query_async(&mut direct)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert_eq!(
        &c.read().await[..],
        b"*3\r\n$7\r\nmessage\r\n$1\r\nb\r\n$2\r\nhi\r\n"
    );
    s.shutdown().await;
}

/// Concurrent misses of one shared bucket make one upstream call (the
/// first batch serves them all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_scope_concurrent_misses_make_one_call() {
    let redis = RedisServer::start();
    let r = shared_rule("one", "1000/s", 1000, "reject");
    let s = limited(&redis, &[&r]).await;
    let mut clients = Vec::new();
    for _ in 0..50 {
        clients.push(Raw::connect(s.addr).await);
    }
    let barrier = Arc::new(tokio::sync::Barrier::new(50));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                barrier.wait().await;
                c.call(&[b"GET", b"sf"]).await
            })
        })
        .collect();
    for t in tasks {
        let r = t.await.unwrap();
        assert_eq!(&r[..], b"$-1\r\n");
    }
    assert_eq!(
        metric(
            &s,
            "ratelimit_shared_calls_total",
            &[("rule", "one"), ("result", "ok")]
        ),
        1.0
    );
    s.shutdown().await;
}

/// A refill the upstream does not answer falls back after 500 ms: the
/// client waits that long once, then the fallback decides at once.
#[tokio::test]
async fn shared_scope_slow_upstream_falls_back_after_the_refill_timeout() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let hop = FaultHop::start(redis.port).await;
    let mut c = config(&format!("redis://127.0.0.1:{}", hop.port));
    c.rate_limit = vec![rule(
        "name = \"slow\"\ncommands = [\"client|id\"]\nscope = \"shared\"\nrate = \"1/min\"\nburst = 10\non_error = \"allow\"\n",
    )];
    let s = sidecar_with(c, Builder::default()).await;
    let mut client = Raw::connect(s.addr).await;
    hop.set(Fault::Stall);
    let t = Instant::now();
    assert!(client.call(&[b"CLIENT", b"ID"]).await.starts_with(b":"));
    let first = t.elapsed();
    let t = Instant::now();
    assert!(client.call(&[b"CLIENT", b"ID"]).await.starts_with(b":"));
    let second = t.elapsed();
    println!("first {first:?}, second {second:?}");
    assert!(
        first >= Duration::from_millis(450) && first < Duration::from_secs(3),
        "{first:?}"
    );
    assert!(second < Duration::from_millis(100), "{second:?}");
    assert!(metric(&s, "ratelimit_fallback_total", &[("rule", "slow")]) >= 2.0);
    hop.set(Fault::Pass);
    s.shutdown().await;
}

/// An observing shared rule asks the upstream like an enforcing one and
/// counts what it would refuse.
#[tokio::test]
async fn shared_scope_observe_counts() {
    let redis = RedisServer::start();
    let r = shared_rule("watch", "1/min", 3, "allow").replace(
        "scope = \"shared\"",
        "scope = \"shared\"\nmode = \"observe\"\nshared_batch = 1",
    );
    let s = limited(&redis, &[&r]).await;
    let mut c = Raw::connect(s.addr).await;
    for _ in 0..5 {
        assert_eq!(&c.call(&[b"GET", b"w"]).await[..], b"$-1\r\n");
    }
    assert_eq!(decisions(&s, "watch", "allowed"), 3.0);
    assert_eq!(decisions(&s, "watch", "observed"), 2.0);
    s.shutdown().await;
}

/// A batch is refilled when half spent, before it runs out: with the
/// upstream stalled after that, the next batch is already there and no
/// command waits or falls back.
#[tokio::test]
async fn shared_scope_refills_ahead_of_need() {
    // Measures time (or memory): alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start();
    let hop = FaultHop::start(redis.port).await;
    let mut c = config(&format!("redis://127.0.0.1:{}", hop.port));
    c.rate_limit = vec![rule(
        "name = \"ahead\"\ncommands = [\"client|id\"]\nscope = \"shared\"\nrate = \"1000/s\"\nburst = 100\nshared_batch = 10\non_error = \"reject\"\n",
    )];
    let s = sidecar_with(c, Builder::default()).await;
    let mut client = Raw::connect(s.addr).await;
    // The first batch of 10; the sixth command leaves 4 (< 5) and starts
    // the next refill.
    for _ in 0..6 {
        assert!(client.call(&[b"CLIENT", b"ID"]).await.starts_with(b":"));
    }
    assert!(
        eventually(|| async {
            metric(
                &s,
                "ratelimit_shared_calls_total",
                &[("rule", "ahead"), ("result", "ok")],
            ) == 2.0
        })
        .await
    );
    hop.set(Fault::Stall);
    // 4 left + 10 fetched ahead.
    for i in 0..14 {
        let t = Instant::now();
        let r = client.call(&[b"CLIENT", b"ID"]).await;
        assert!(r.starts_with(b":"), "{i}: {r:?}");
        assert!(
            t.elapsed() < Duration::from_millis(300),
            "{i}: {:?}",
            t.elapsed()
        );
    }
    assert_eq!(metric(&s, "ratelimit_fallback_total", &[]), 0.0);
    hop.set(Fault::Pass);
    s.shutdown().await;
}
