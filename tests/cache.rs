//! The L1 cache against a real redis-server: every cacheable command's
//! hit byte-identical to Redis's own reply (RESP2 and RESP3), coherence
//! (direct writes, writes through the sidecar, FLUSHALL, TTLs), single
//! flight, per-user entries, bypass, the memory bound, and every flush
//! reason.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use redis_sidecar::config::{CacheConfig, CacheRule, Config};
use redis_sidecar::policy::Builder;

use support::*;

fn cache_config(redis: &RedisServer, ttl_ms: u64) -> Config {
    let mut c = config(&redis.url());
    c.cache = CacheConfig {
        enabled: true,
        rule: vec![CacheRule {
            pattern: "c:*".into(),
            name: Some("c".into()),
            ttl: Duration::from_millis(ttl_ms),
            commands: None,
            stale_if_error: None,
        }],
        ..CacheConfig::default()
    };
    c
}

async fn cached(redis: &RedisServer) -> redis_sidecar::Sidecar {
    sidecar_with(cache_config(redis, 60_000), Builder::default()).await
}

fn requests(s: &redis_sidecar::Sidecar, result: &str) -> f64 {
    metric(s, "cache_requests_total", &[("result", result)])
}

async fn direct_raw(redis: &RedisServer, proto: &str) -> Raw {
    let mut c = Raw::connect(format!("127.0.0.1:{}", redis.port).parse().unwrap()).await;
    assert!(
        !c.call(&[b"HELLO", proto.as_bytes()])
            .await
            .starts_with(b"-")
    );
    c
}

async fn cmdstat(redis: &RedisServer, name: &str) -> u64 {
    let mut d = redis.direct().await;
    let info: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut d)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix(&format!("cmdstat_{name}:calls=")))
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

fn words(s: &str) -> Vec<Vec<u8>> {
    s.split(' ').map(|w| w.as_bytes().to_vec()).collect()
}

/// Every cacheable command: the miss and the hit give the bytes Redis
/// gives a client of the same protocol.
#[tokio::test]
async fn hits_are_byte_identical_to_redis() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut d = direct_raw(&redis, "3").await;
    setup(
        &mut d,
        &[
            "SET c:s hello",
            "HSET c:h f1 v1 f2 v2",
            "RPUSH c:l a b c",
            "SADD c:set x y z",
            "ZADD c:z 0.1 m1 1.5 m2 3 m3",
            "ZADD c:z inf m4",
            "ZADD c:lex 0 a 0 b 0 c",
        ],
    )
    .await;
    let reads = [
        "GET c:s",
        "GET c:missing",
        "MGET c:s c:missing",
        "GETRANGE c:s 1 3",
        "STRLEN c:s",
        "EXISTS c:s c:missing",
        "TYPE c:h",
        "HGET c:h f1",
        "HMGET c:h f1 nope",
        "HGETALL c:h",
        "HGETALL c:missing",
        "HEXISTS c:h f2",
        "HLEN c:h",
        "LRANGE c:l 0 -1",
        "LLEN c:l",
        "SMEMBERS c:set",
        "SISMEMBER c:set y",
        "SCARD c:set",
        "ZRANGE c:z 0 -1",
        "ZRANGE c:z 0 -1 WITHSCORES",
        "ZREVRANGE c:z 0 1 WITHSCORES",
        "ZRANGEBYSCORE c:z 0 2 WITHSCORES",
        "ZREVRANGEBYSCORE c:z +inf -inf",
        "ZRANGEBYLEX c:lex - +",
        "ZREVRANGEBYLEX c:lex + -",
        "ZSCORE c:z m1",
        "ZSCORE c:z m4",
        "ZSCORE c:z nope",
        "ZCARD c:z",
    ];
    for proto in ["2", "3"] {
        let mut direct = direct_raw(&redis, proto).await;
        let mut c = Raw::connect(s.addr).await;
        assert!(
            !c.call(&[b"HELLO", proto.as_bytes()])
                .await
                .starts_with(b"-")
        );
        for read in reads {
            let args = words(read);
            let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
            let want = direct.call(&refs).await;
            let hits = requests(&s, "hit");
            let miss = c.call(&refs).await;
            let hit = c.call(&refs).await;
            assert_eq!(miss, want, "RESP{proto} {read}: miss");
            assert_eq!(hit, want, "RESP{proto} {read}: hit");
            // RESP2 goes first: a miss, then a hit. RESP3 reads the same
            // entries (one entry holds both encodings): two hits.
            let expect = if proto == "2" { 1.0 } else { 2.0 };
            assert_eq!(
                requests(&s, "hit"),
                hits + expect,
                "RESP{proto} {read}: hits"
            );
        }
    }
    s.shutdown().await;
}

/// A write straight to Redis reaches readers through the sidecar within a
/// short window (Redis's invalidation push); report the largest seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_writes_invalidate_within_a_window() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut direct = redis.direct().await;
    let mut c = Raw::connect(s.addr).await;
    let mut worst = Duration::ZERO;
    for v in 0..200 {
        let value = format!("v{v}");
        let _: () = redis::cmd("SET")
            .arg("c:hot")
            .arg(&value)
            .query_async(&mut direct)
            .await
            .unwrap();
        let acked = Instant::now();
        let want = format!("${}\r\n{value}\r\n", value.len());
        loop {
            let r = c.call(&[b"GET", b"c:hot"]).await;
            if r[..] == *want.as_bytes() {
                break;
            }
            assert!(acked.elapsed() < Duration::from_secs(1), "still {r:?}");
        }
        worst = worst.max(acked.elapsed());
        // Read it again: a hit now.
        assert_eq!(&c.call(&[b"GET", b"c:hot"]).await[..], want.as_bytes());
    }
    println!("largest window between a direct write's ack and a read seeing it: {worst:?}");
    assert!(worst < Duration::from_millis(50), "{worst:?}");
    assert!(requests(&s, "hit") >= 200.0);
    s.shutdown().await;
}

/// A client that wrote through the sidecar reads what it wrote, at once,
/// while other clients keep the entry hot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut readers = Vec::new();
    for _ in 0..4 {
        let (addr, stop) = (s.addr, stop.clone());
        readers.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut last = -1i64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = c.call(&[b"GET", b"c:ryw"]).await;
                if let Some(v) = std::str::from_utf8(&r)
                    .ok()
                    .and_then(|t| t.split("\r\n").nth(1))
                    .and_then(|t| t.parse::<i64>().ok())
                {
                    // Monotonic per reader.
                    assert!(v >= last, "went back from {last} to {v}");
                    last = v;
                }
            }
        }));
    }
    let mut w = Raw::connect(s.addr).await;
    for v in 0..2000i64 {
        let value = v.to_string();
        assert_eq!(
            &w.call(&[b"SET", b"c:ryw", value.as_bytes()]).await[..],
            b"+OK\r\n"
        );
        let r = w.call(&[b"GET", b"c:ryw"]).await;
        assert_eq!(
            r[..],
            *format!("${}\r\n{value}\r\n", value.len()).as_bytes()
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for r in readers {
        r.await.unwrap();
    }
    assert!(requests(&s, "hit") > 0.0);
    s.shutdown().await;
}

/// 1,000 concurrent GETs of a missing key make one upstream read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_misses_make_one_read() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut clients = Vec::new();
    for _ in 0..100 {
        clients.push(Raw::connect(s.addr).await);
    }
    // The cache is ready (its tracking connection up) once a read hits:
    // before that, a fill cannot land and its read goes to Redis.
    let mut warm = Raw::connect(s.addr).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while requests(&s, "hit") < 1.0 {
        assert!(std::time::Instant::now() < deadline, "the cache never hit");
        warm.call(&[b"GET", b"c:warm"]).await;
    }
    let mut d = redis.direct().await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut d)
        .await
        .unwrap();
    // Redis holds the first fill's GET for a second: every other miss
    // arrives while it is in flight (on a busy machine too) and must join
    // it.
    let _: () = redis::cmd("CLIENT")
        .arg(&["PAUSE", "1000", "ALL"])
        .query_async(&mut d)
        .await
        .unwrap();
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(100));
    let tasks: Vec<_> = clients
        .into_iter()
        .map(|mut c| {
            let barrier = barrier.clone();
            tokio::spawn(async move {
                let one = redis_sidecar::wire::encode_command(&[&b"GET"[..], b"c:none"]);
                let batch: Vec<u8> = one.iter().copied().cycle().take(one.len() * 10).collect();
                barrier.wait().await;
                c.send(&batch).await;
                for _ in 0..10 {
                    assert_eq!(&c.read().await[..], b"$-1\r\n");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let gets = cmdstat(&redis, "get").await;
    println!(
        "1000 concurrent GETs: {gets} upstream GET; joins {}",
        metric(&s, "cache_singleflight_joins_total", &[])
    );
    assert_eq!(gets, 1);
    s.shutdown().await;
}

/// No entry outlives its key's TTL.
#[tokio::test]
async fn entries_do_not_outlive_the_key() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut c = Raw::connect(s.addr).await;
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SET")
        .arg("c:ttl")
        .arg("v")
        .arg("PX")
        .arg(300)
        .query_async(&mut d)
        .await
        .unwrap();
    assert_eq!(&c.call(&[b"GET", b"c:ttl"]).await[..], b"$1\r\nv\r\n");
    assert_eq!(&c.call(&[b"GET", b"c:ttl"]).await[..], b"$1\r\nv\r\n");
    assert_eq!(requests(&s, "hit"), 1.0);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(&c.call(&[b"GET", b"c:ttl"]).await[..], b"$-1\r\n");
    s.shutdown().await;
}

/// FLUSHALL straight to Redis (a null invalidation) drops everything;
/// so do POST /cache/flush, a switch, a reload with other rules and the
/// loss of the tracking connection.
#[tokio::test]
async fn every_flush_reason() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecar-cache-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("cache.toml");
    let head = |pattern: &str| {
        format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"tok\"\n[cache]\nenabled = true\n[[cache.rule]]\npattern = \"{pattern}\"\nttl = \"60s\"\n"
        )
    };
    write_config(&file, &head("c:*"), &[("main", &redis)]);
    let s = sidecar_from_file(&file).await;
    let mut c = Raw::connect(s.addr).await;
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SET")
        .arg("c:f")
        .arg("1")
        .query_async(&mut d)
        .await
        .unwrap();
    let warm = async |c: &mut Raw| {
        c.call(&[b"GET", b"c:f"]).await;
        c.call(&[b"GET", b"c:f"]).await;
    };
    let flushed = |reason: &str| metric(&s, "cache_invalidations_total", &[("reason", reason)]);
    // FLUSHALL straight to Redis.
    warm(&mut c).await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut d).await.unwrap();
    assert!(eventually(|| async { flushed("tracking") >= 1.0 }).await);
    assert_eq!(&c.call(&[b"GET", b"c:f"]).await[..], b"$-1\r\n");
    // POST /cache/flush.
    let _: () = redis::cmd("SET")
        .arg("c:f")
        .arg("2")
        .query_async(&mut d)
        .await
        .unwrap();
    // A direct write is seen once its invalidation arrives (milliseconds;
    // more on a loaded machine).
    let addr = s.addr;
    assert!(
        eventually(|| async move {
            &Raw::connect(addr).await.call(&[b"GET", b"c:f"]).await[..] == b"$1\r\n2\r\n"
        })
        .await
    );
    warm(&mut c).await;
    let (status, _) = http(s.admin_addr.unwrap(), "POST", "/cache/flush", None).await;
    assert_eq!(status, 401, "the flush needs the admin token");
    assert_eq!(&c.call(&[b"GET", b"c:f"]).await[..], b"$1\r\n2\r\n");
    assert_eq!(flushed("flush"), 0.0);
    let (status, body) = http(s.admin_addr.unwrap(), "POST", "/cache/flush", Some("tok")).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("1 entries"), "{body}");
    assert_eq!(flushed("flush"), 1.0);
    // A reload with other rules.
    warm(&mut c).await;
    write_config(&file, &head("c:f*"), &[("main", &redis)]);
    s.control.reload().unwrap();
    assert_eq!(flushed("reload"), 1.0);
    // The tracking connection is lost.
    warm(&mut c).await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut d)
        .await
        .unwrap();
    let id = list
        .lines()
        .find(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .unwrap()
        .to_string();
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(&id)
        .query_async(&mut d)
        .await
        .unwrap();
    assert!(eventually(|| async { flushed("flush") >= 2.0 }).await);
    // The invalidation mode needs a restart.
    let text = std::fs::read_to_string(&file)
        .unwrap()
        .replace("enabled = true", "enabled = true\ninvalidation = \"ttl\"");
    std::fs::write(&file, text).unwrap();
    let err = s.control.reload().unwrap_err().to_string();
    assert!(err.contains("cache.invalidation"), "{err}");
    s.shutdown().await;
}

/// Reads inside MULTI, under WATCH, or by a client that authenticated to
/// Redis itself are not cached.
#[tokio::test]
async fn bypass() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut c = Raw::connect(s.addr).await;
    c.call(&[b"MULTI"]).await;
    assert_eq!(&c.call(&[b"GET", b"c:b"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&c.call(&[b"EXEC"]).await[..], b"*1\r\n$-1\r\n");
    c.call(&[b"WATCH", b"c:b"]).await;
    assert_eq!(&c.call(&[b"GET", b"c:b"]).await[..], b"$-1\r\n");
    assert_eq!(requests(&s, "bypass"), 2.0);
    assert_eq!(requests(&s, "miss") + requests(&s, "hit"), 0.0);
    // A client that authenticates to Redis itself (AUTH forwarded): its
    // reads run as that user there, never from the cache.
    let mut d = redis.direct().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "reader", "on", ">pw", "~*", "+@all"])
        .query_async(&mut d)
        .await
        .unwrap();
    let mut u = Raw::connect(s.addr).await;
    assert_eq!(&u.call(&[b"AUTH", b"reader", b"pw"]).await[..], b"+OK\r\n");
    for _ in 0..2 {
        assert_eq!(&u.call(&[b"GET", b"c:b"]).await[..], b"$-1\r\n");
    }
    assert_eq!(requests(&s, "bypass"), 4.0);
    assert_eq!(requests(&s, "miss") + requests(&s, "hit"), 0.0);
    s.shutdown().await;
}

/// Filled far past max_memory, the cache stays within it.
#[tokio::test]
async fn memory_stays_within_max_memory() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let mut cfg = cache_config(&redis, 60_000);
    cfg.cache.max_memory = redis_sidecar::config::ByteSize(1 << 20);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut d = redis.direct().await;
    let value = "x".repeat(1000);
    let mut pipe = redis::pipe();
    for i in 0..5000 {
        pipe.cmd("SET").arg(format!("c:m{i}")).arg(&value).ignore();
    }
    let _: () = pipe.query_async(&mut d).await.unwrap();
    let mut c = Raw::connect(s.addr).await;
    for i in 0..5000 {
        let k = format!("c:m{i}");
        assert_eq!(c.call(&[b"GET", k.as_bytes()]).await.len(), 1009);
    }
    assert!(eventually(|| async { metric(&s, "cache_evictions_total", &[]) > 0.0 }).await);
    let bytes = metric(&s, "cache_bytes", &[]);
    let entries = metric(&s, "cache_entries", &[]);
    println!("5000 x 1 KB through a 1 MiB cache: {entries} entries, {bytes} bytes");
    assert!(
        bytes <= (1 << 20) as f64 && entries > 100.0,
        "{bytes} {entries}"
    );
    s.shutdown().await;
}

/// Run a write on both endpoints, straight (not through the sidecar).
async fn set_on_both(both: &mut [redis::aio::MultiplexedConnection; 2], cmd: &redis::Cmd) {
    for d in both {
        let _: () = cmd.query_async(d).await.unwrap();
    }
}

/// Version numbers in a reply (`$n\r\n<v>\r\n`), `None` for nil.
fn version(reply: &[u8]) -> Option<u64> {
    std::str::from_utf8(reply)
        .ok()?
        .split("\r\n")
        .nth(1)?
        .parse()
        .ok()
}

/// The heart of it: for CACHE_STALENESS_SECONDS (default 30) writers
/// write increasing versions of hot keys, some through the sidecar and
/// some straight to Redis, readers read through the sidecar, and in
/// between the test switches endpoints and runs FLUSHALL. Checked:
/// (1) a client that wrote v through the sidecar never reads older
/// afterwards; (2) each reader's reads of a key never go back; (3) after
/// a direct write is acknowledged, reads through the sidecar return it
/// within a bounded window (the largest is reported); (4) no entry
/// outlives its key's TTL. (1) and (2) are checked between disruptions:
/// a FLUSHALL empties keys and the other endpoint does not have the
/// sidecar writers' values, which is not the cache's doing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn staleness_under_writes_failover_and_flushall() {
    let _shared = serial().read().await;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let secs: u64 = std::env::var("CACHE_STALENESS_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let a = RedisServer::start();
    let b = RedisServer::start();
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    cfg.failover.failback = redis_sidecar::config::Failback::Manual;
    cfg.cache = cache_config(&a, 60_000).cache;
    let s = sidecar_with(cfg, Builder::default()).await;
    let addr = s.addr;
    let stop = Arc::new(AtomicBool::new(false));
    // Bumped before and after each disruption: a check whose two ends saw
    // different values spans one.
    let epoch = Arc::new(AtomicU64::new(0));
    let violations = Arc::new(AtomicU64::new(0));
    let checked = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    // (1) Writers through the sidecar, each reading back what it wrote.
    for w in 0..2u64 {
        let (stop, epoch, violations, checked) = (
            stop.clone(),
            epoch.clone(),
            violations.clone(),
            checked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                let key = format!("c:s{}", w * 5 + v % 5);
                let e0 = epoch.load(Ordering::SeqCst);
                let r = c
                    .call(&[b"SET", key.as_bytes(), v.to_string().as_bytes()])
                    .await;
                if &r[..] != b"+OK\r\n" {
                    continue;
                }
                let got = version(&c.call(&[b"GET", key.as_bytes()]).await);
                if epoch.load(Ordering::SeqCst) == e0 && e0 % 2 == 0 {
                    checked.fetch_add(1, Ordering::Relaxed);
                    if got.is_none_or(|g| g < v) {
                        violations.fetch_add(1, Ordering::Relaxed);
                        eprintln!("read-your-writes: wrote {v} to {key}, read {got:?}");
                    }
                }
            }
        }));
    }
    // (3) A writer straight to both endpoints, timing how long until the
    // sidecar returns its write.
    let worst = Arc::new(AtomicU64::new(0));
    {
        let (stop, epoch, worst) = (stop.clone(), epoch.clone(), worst.clone());
        let mut both = [a.direct().await, b.direct().await];
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut v = 0u64;
            while !stop.load(Ordering::Relaxed) {
                v += 1;
                let key = format!("c:d{}", v % 5);
                set_on_both(&mut both, redis::cmd("SET").arg(&key).arg(v)).await;
                let e0 = epoch.load(Ordering::SeqCst);
                let acked = Instant::now();
                loop {
                    let got = version(&c.call(&[b"GET", key.as_bytes()]).await);
                    if got.is_some_and(|g| g >= v) {
                        break;
                    }
                    if epoch.load(Ordering::SeqCst) != e0 || stop.load(Ordering::Relaxed) {
                        break;
                    }
                    assert!(
                        acked.elapsed() < Duration::from_secs(2),
                        "{key} stuck at {got:?} < {v}"
                    );
                }
                if epoch.load(Ordering::SeqCst) == e0 && e0 % 2 == 0 {
                    worst.fetch_max(acked.elapsed().as_micros() as u64, Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }));
    }
    // (2) Readers: per key, versions never go back within an epoch.
    for _ in 0..3 {
        let (stop, epoch, violations, checked) = (
            stop.clone(),
            epoch.clone(),
            violations.clone(),
            checked.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut last: std::collections::HashMap<String, (u64, u64)> = Default::default();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = if i.is_multiple_of(2) {
                    format!("c:s{}", i % 10)
                } else {
                    format!("c:d{}", i % 5)
                };
                let e0 = epoch.load(Ordering::SeqCst);
                let got = version(&c.call(&[b"GET", key.as_bytes()]).await);
                let e1 = epoch.load(Ordering::SeqCst);
                let (Some(g), true) = (got, e0 == e1 && e0 % 2 == 0) else {
                    continue;
                };
                if let Some((prev, pe)) = last.get(&key)
                    && *pe == e0
                {
                    checked.fetch_add(1, Ordering::Relaxed);
                    if g < *prev {
                        violations.fetch_add(1, Ordering::Relaxed);
                        eprintln!("monotonic reads: {key} went from {prev} to {g}");
                    }
                }
                last.insert(key, (g, e0));
            }
        }));
    }
    // (4) Keys with short TTLs: an entry read just before expiry is gone
    // after it.
    let ttl_checks = Arc::new(AtomicU64::new(0));
    {
        let (stop, violations, ttl_checks) = (stop.clone(), violations.clone(), ttl_checks.clone());
        let mut both = [a.direct().await, b.direct().await];
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = format!("c:t{}", i % 3);
                set_on_both(
                    &mut both,
                    redis::cmd("SET").arg(&key).arg(i).arg("PX").arg(150),
                )
                .await;
                let set = Instant::now();
                // Fill and hit while it lives.
                c.call(&[b"GET", key.as_bytes()]).await;
                c.call(&[b"GET", key.as_bytes()]).await;
                tokio::time::sleep(
                    Duration::from_millis(150).saturating_sub(set.elapsed())
                        + Duration::from_millis(20),
                )
                .await;
                let got = c.call(&[b"GET", key.as_bytes()]).await;
                ttl_checks.fetch_add(1, Ordering::Relaxed);
                if &got[..] != b"$-1\r\n" {
                    violations.fetch_add(1, Ordering::Relaxed);
                    eprintln!("{key} outlived its TTL: {got:?}");
                }
            }
        }));
    }
    // Disruptions: a FLUSHALL through the sidecar, one straight to Redis,
    // a switch to b.
    let admin = s.admin_addr.unwrap();
    let third = Duration::from_secs(secs) / 4;
    let mut da = a.direct().await;
    let mut side = Raw::connect(addr).await;
    tokio::time::sleep(third).await;
    epoch.fetch_add(1, Ordering::SeqCst);
    assert_eq!(&side.call(&[b"FLUSHALL"]).await[..], b"+OK\r\n");
    tokio::time::sleep(Duration::from_millis(50)).await;
    epoch.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(third).await;
    epoch.fetch_add(1, Ordering::SeqCst);
    let _: () = redis::cmd("FLUSHALL").query_async(&mut da).await.unwrap();
    tokio::time::sleep(Duration::from_millis(50)).await;
    epoch.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(third).await;
    epoch.fetch_add(1, Ordering::SeqCst);
    let (st, body) = http(admin, "POST", "/upstreams/b/activate", None).await;
    assert_eq!(st, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(50)).await;
    epoch.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(third).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let hits = requests(&s, "hit");
    let misses = requests(&s, "miss");
    let worst = Duration::from_micros(worst.load(Ordering::Relaxed));
    println!(
        "{secs}s: {} checks, {} violations, {} TTL checks; hits {hits}, misses {misses}; largest direct-write window {worst:?}; invalidations: tracking {}, write {}, switch {}",
        checked.load(Ordering::Relaxed),
        violations.load(Ordering::Relaxed),
        ttl_checks.load(Ordering::Relaxed),
        metric(&s, "cache_invalidations_total", &[("reason", "tracking")]),
        metric(&s, "cache_invalidations_total", &[("reason", "write")]),
        metric(&s, "cache_invalidations_total", &[("reason", "switch")]),
    );
    assert_eq!(violations.load(Ordering::Relaxed), 0);
    assert!(checked.load(Ordering::Relaxed) > 1000);
    assert!(ttl_checks.load(Ordering::Relaxed) > 10);
    assert!(
        hits > misses,
        "the cache was not used: hits {hits}, misses {misses}"
    );
    assert!(metric(&s, "cache_invalidations_total", &[("reason", "switch")]) >= 1.0);
    assert!(worst < Duration::from_millis(100), "{worst:?}");
    s.shutdown().await;
}

/// Entries are per user: a value one user's read filled is not served to
/// another (sidecar users, `[client_auth]`; a client that authenticated to
/// Redis itself is not cached at all, see `bypass`).
#[tokio::test]
async fn entries_are_per_user() {
    let _shared = serial().read().await;
    use redis_sidecar::config::{ClientAuthConfig, ClientUser};
    let redis = RedisServer::start();
    let mut cfg = cache_config(&redis, 60_000);
    cfg.client_auth = ClientAuthConfig {
        password: None,
        password_file: None,
        users: ["alice", "bob"]
            .iter()
            .map(|u| ClientUser {
                name: u.to_string(),
                password: Some(format!("{u}-pw")),
                password_file: None,
            })
            .collect(),
    };
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SET")
        .arg("c:u")
        .arg("v")
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut d)
        .await
        .unwrap();
    for user in ["alice", "bob"] {
        let mut c = Raw::connect(s.addr).await;
        let pw = format!("{user}-pw");
        assert_eq!(
            &c.call(&[b"AUTH", user.as_bytes(), pw.as_bytes()]).await[..],
            b"+OK\r\n"
        );
        for _ in 0..3 {
            assert_eq!(&c.call(&[b"GET", b"c:u"]).await[..], b"$1\r\nv\r\n");
        }
    }
    // One fill per user, the other reads hits.
    assert_eq!(cmdstat(&redis, "get").await, 2);
    assert_eq!(requests(&s, "miss"), 2.0);
    assert_eq!(requests(&s, "hit"), 4.0);
    s.shutdown().await;
}

/// `stale_if_error`: with the upstream gone, a read is answered from an
/// entry the outage flushed (counted as stale) within the window; a read
/// never cached gets the error; a rule without it gets the error.
#[tokio::test]
async fn stale_if_error_stands_in_for_an_unreachable_upstream() {
    let _shared = serial().read().await;
    let mut redis = RedisServer::start();
    let mut cfg = cache_config(&redis, 60_000);
    cfg.cache.rule[0].stale_if_error = Some(Duration::from_secs(30));
    cfg.cache.rule.push(CacheRule {
        pattern: "n:*".into(),
        name: Some("n".into()),
        ttl: Duration::from_secs(60),
        commands: None,
        stale_if_error: None,
    });
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut d = redis.direct().await;
    let _: () = redis::cmd("MSET")
        .arg(&["c:old", "1", "n:old", "2"])
        .query_async(&mut d)
        .await
        .unwrap();
    let mut c = Raw::connect(s.addr).await;
    for k in [&b"c:old"[..], b"n:old"] {
        c.call(&[b"GET", k]).await;
        c.call(&[b"GET", k]).await;
    }
    assert_eq!(requests(&s, "hit"), 2.0);
    redis.kill();
    assert!(
        eventually(|| async {
            metric(&s, "cache_invalidations_total", &[("reason", "flush")]) >= 2.0
        })
        .await
    );
    assert_eq!(&c.call(&[b"GET", b"c:old"]).await[..], b"$1\r\n1\r\n");
    assert_eq!(
        metric(&s, "cache_requests_total", &[("result", "stale")]),
        1.0
    );
    assert!(c.call(&[b"GET", b"n:old"]).await.starts_with(b"-"));
    assert!(c.call(&[b"GET", b"c:never"]).await.starts_with(b"-"));
    s.shutdown().await;
}

/// `invalidation = "ttl"`: no tracking; entries live at most the rule's
/// ttl; writes through the sidecar still invalidate.
#[tokio::test]
async fn ttl_invalidation_mode() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let mut cfg = cache_config(&redis, 300);
    cfg.cache.invalidation = redis_sidecar::config::CacheInvalidation::Ttl;
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut d = redis.direct().await;
    let mut c = Raw::connect(s.addr).await;
    let _: () = redis::cmd("SET")
        .arg("c:m")
        .arg("1")
        .query_async(&mut d)
        .await
        .unwrap();
    assert_eq!(&c.call(&[b"GET", b"c:m"]).await[..], b"$1\r\n1\r\n");
    // A direct write is not seen until the entry's ttl ends.
    let _: () = redis::cmd("SET")
        .arg("c:m")
        .arg("2")
        .query_async(&mut d)
        .await
        .unwrap();
    assert_eq!(&c.call(&[b"GET", b"c:m"]).await[..], b"$1\r\n1\r\n");
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(&c.call(&[b"GET", b"c:m"]).await[..], b"$1\r\n2\r\n");
    // A write through the sidecar is seen at once.
    assert_eq!(&c.call(&[b"SET", b"c:m", b"3"]).await[..], b"+OK\r\n");
    assert_eq!(&c.call(&[b"GET", b"c:m"]).await[..], b"$1\r\n3\r\n");
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut d)
        .await
        .unwrap();
    assert!(
        !list.lines().any(|l| l
            .split(' ')
            .any(|f| f.starts_with("flags=") && f.contains('t'))),
        "{list}"
    );
    s.shutdown().await;
}

/// An upstream that refuses CLIENT TRACKING (an ACL here): the cache is
/// bypassed (said in the log), reads still work.
#[tokio::test]
async fn tracking_refused_bypasses_the_cache() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let mut d = redis.direct().await;
    let _: () = redis::cmd("ACL")
        .arg(&[
            "SETUSER",
            "notrack",
            "on",
            ">pw",
            "~*",
            "+@all",
            "-client|tracking",
        ])
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("c:r")
        .arg("v")
        .query_async(&mut d)
        .await
        .unwrap();
    let mut cfg = cache_config(&redis, 60_000);
    cfg.upstream[0].url = format!("redis://notrack:pw@127.0.0.1:{}", redis.port);
    let s = sidecar_with(cfg, Builder::default()).await;
    // Found at startup: every read is a bypass, the first one too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut c = Raw::connect(s.addr).await;
    for _ in 0..3 {
        assert_eq!(&c.call(&[b"GET", b"c:r"]).await[..], b"$1\r\nv\r\n");
    }
    assert_eq!(requests(&s, "hit"), 0.0);
    assert_eq!(requests(&s, "miss"), 0.0);
    assert_eq!(requests(&s, "bypass"), 3.0);
    s.shutdown().await;
}

/// Redis's invalidation keyspace is shared by all dbs: a change of a key
/// drops its entries in every db.
#[tokio::test]
async fn an_invalidation_drops_the_key_in_every_db() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut c0 = Raw::connect(s.addr).await;
    let mut c1 = Raw::connect(s.addr).await;
    assert_eq!(&c1.call(&[b"SELECT", b"1"]).await[..], b"+OK\r\n");
    for c in [&mut c0, &mut c1] {
        c.call(&[b"GET", b"c:db"]).await;
        c.call(&[b"GET", b"c:db"]).await;
    }
    assert_eq!(requests(&s, "miss"), 2.0);
    assert_eq!(requests(&s, "hit"), 2.0);
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SET")
        .arg("c:db")
        .arg("0")
        .query_async(&mut d)
        .await
        .unwrap();
    assert!(
        eventually(|| async {
            metric(&s, "cache_invalidations_total", &[("reason", "tracking")]) >= 2.0
        })
        .await
    );
    assert_eq!(&c0.call(&[b"GET", b"c:db"]).await[..], b"$1\r\n0\r\n");
    assert_eq!(&c1.call(&[b"GET", b"c:db"]).await[..], b"$-1\r\n");
    assert_eq!(requests(&s, "miss"), 4.0);
    s.shutdown().await;
}

#[test]
fn bad_cache_rules_are_config_errors() {
    let mut c = config("redis://127.0.0.1:1");
    c.cache = toml::from_str(
        "enabled = true\nmax_memory = \"100KiB\"\n[hot_keys]\nenabled = true\nthreshold = 0\nmax_keys = 0\nttl = \"0s\"\n[[cache.rule]]\npattern = \"\"\nttl = \"0s\"\ncommands = [\"GET\", \"SPOP\", \"GETT\"]\n"
            .replace("[[cache.rule]]", "[[rule]]")
            .as_str(),
    )
    .unwrap();
    let err = c.validate().unwrap_err().to_string();
    for want in [
        "cache: max_memory must be at least 1MiB",
        "cache.rule[0]: pattern must not be empty",
        "cache.rule[0]: ttl must be at least 1ms",
        "cache.rule[0]: commands[1]: not a read the cache can hold",
        // A misspelt read: the nearest name, never the value given.
        "cache.rule[0]: commands[2]: unknown command (did you mean GET?)",
        "cache: hot_keys: ttl must be at least 1ms",
        "cache: hot_keys: threshold must be at least 1",
        "cache: hot_keys: max_keys must be at least 1",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
}

/// Filled five times past max_memory, the process's RSS grows by less
/// than twice the bound (the documented overhead: the allocator's slack,
/// the replies passing through). The keys are made by
/// Redis itself (DEBUG POPULATE), so the test's own buffers do not count.
#[tokio::test]
async fn rss_stays_within_max_memory() {
    // Measures the process's memory: alone.
    let _alone = serial().write().await;
    let redis = RedisServer::start_with(&["--enable-debug-command", "yes"]);
    let mut cfg = cache_config(&redis, 60_000);
    cfg.cache.max_memory = redis_sidecar::config::ByteSize(8 << 20);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut d = redis.direct().await;
    let n = 40_000;
    let _: () = redis::cmd("DEBUG")
        .arg(&["POPULATE", &n.to_string(), "c:r", "1000"])
        .query_async(&mut d)
        .await
        .unwrap();
    let mut c = Raw::connect(s.addr).await;
    let before = rss_kib();
    for i in 0..n {
        let k = format!("c:r:{i}");
        c.cmd(&[b"GET", k.as_bytes()]).await;
        if i % 100 == 99 {
            for _ in 0..100 {
                c.read().await;
            }
        }
    }
    // The cache is full (the gauge is updated once a second).
    assert!(
        eventually(|| async { metric(&s, "cache_bytes", &[]) > (6 << 20) as f64 }).await,
        "{}",
        metric(&s, "cache_bytes", &[])
    );
    let after = rss_kib();
    let grew = after.saturating_sub(before);
    println!("40 MB of values through an 8 MiB cache: RSS grew {grew} KiB ({before} -> {after})");
    assert!(grew < 2 * 8 * 1024, "RSS grew {grew} KiB");
    s.shutdown().await;
}

/// A pipelined read right behind the client's own write of the key reads
/// that write: the fill would run on another connection and could
/// overtake the write in Redis, so the read is not cached while the write
/// is unanswered (found by ioredis's pipeline through a caching sidecar).
#[tokio::test]
async fn a_pipelined_read_behind_its_write_sees_it() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut c = Raw::connect(s.addr).await;
    for round in 0..5 {
        let mut batch = Vec::new();
        for i in 0..200 {
            let (k, v) = (format!("c:p{i}"), format!("v{round}-{i}"));
            batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                b"SET".as_slice(),
                k.as_bytes(),
                v.as_bytes(),
            ]));
            batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                b"GET".as_slice(),
                k.as_bytes(),
            ]));
        }
        c.send(&batch).await;
        for i in 0..200 {
            assert_eq!(&c.read().await[..], b"+OK\r\n");
            let v = format!("v{round}-{i}");
            assert_eq!(
                c.read().await[..],
                *format!("${}\r\n{v}\r\n", v.len()).as_bytes(),
                "round {round}, key {i}"
            );
        }
    }
    assert!(requests(&s, "bypass") > 0.0);
    s.shutdown().await;
}

/// `SORT .. STORE dst` is a write of `dst` (its key spec says "unknown"):
/// a cached read of `dst` is dropped before the SORT is forwarded, so the
/// client's pipelined read right behind it sees what SORT stored.
#[tokio::test]
async fn sort_store_invalidates_its_destination() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(
        &c.call(&[b"RPUSH", b"src", b"2", b"1"]).await[..],
        b":2\r\n"
    );
    for round in 0..20u32 {
        let old = round.to_string();
        let _ = c.call(&[b"DEL", b"c:sorted"]).await;
        assert_eq!(
            &c.call(&[b"RPUSH", b"c:sorted", old.as_bytes()]).await[..],
            b":1\r\n"
        );
        let want_old = format!("*1\r\n${}\r\n{old}\r\n", old.len());
        // Filled, then a hit.
        for _ in 0..2 {
            let r = c.call(&[b"LRANGE", b"c:sorted", b"0", b"-1"]).await;
            assert_eq!(r[..], *want_old.as_bytes());
        }
        let mut batch = Vec::new();
        for cmd in [
            &[&b"SORT"[..], b"src", b"STORE", b"c:sorted"][..],
            &[b"LRANGE", b"c:sorted", b"0", b"-1"],
        ] {
            batch.extend_from_slice(&redis_sidecar::wire::encode_command(cmd));
        }
        c.send(&batch).await;
        assert_eq!(&c.read().await[..], b":2\r\n");
        assert_eq!(
            &c.read().await[..],
            b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n",
            "round {round}: a stale entry after SORT .. STORE"
        );
    }
    assert!(requests(&s, "hit") > 0.0);
    s.shutdown().await;
}

/// SWAPDB sent through the sidecar flushes the cache (Redis 7.0 sends no
/// invalidation for it): the next read sees the swapped-in value. One
/// sent to Redis directly is not seen (README): the entry stays until its
/// rule's ttl, or `POST /cache/flush`.
#[tokio::test]
async fn swapdb_through_the_sidecar_flushes() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = cached(&redis).await;
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SET")
        .arg("c:s")
        .arg("zero")
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("c:s")
        .arg("one")
        .query_async(&mut d)
        .await
        .unwrap();
    let mut c = Raw::connect(s.addr).await;
    let zero = &b"$4\r\nzero\r\n"[..];
    let one = &b"$3\r\none\r\n"[..];
    for _ in 0..2 {
        assert_eq!(&c.call(&[b"GET", b"c:s"]).await[..], zero);
    }
    let hits = requests(&s, "hit");
    assert!(hits >= 1.0);
    assert_eq!(&c.call(&[b"SWAPDB", b"0", b"1"]).await[..], b"+OK\r\n");
    assert_eq!(&c.call(&[b"GET", b"c:s"]).await[..], one);
    // Straight to Redis: not seen, the entry stays (as documented).
    assert_eq!(&c.call(&[b"GET", b"c:s"]).await[..], one);
    let _: () = redis::cmd("SWAPDB")
        .arg(0)
        .arg(1)
        .query_async(&mut d)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        &c.call(&[b"GET", b"c:s"]).await[..],
        one,
        "a direct SWAPDB is not seen"
    );
    s.shutdown().await;
}

/// The MGET lines a MONITOR on the upstream saw up to a marker command.
async fn upstream_mgets(monitor: &mut Raw, redis: &RedisServer) -> Vec<String> {
    let marker = format!("mark-{}", rand_suffix());
    let mut d = direct_raw(redis, "2").await;
    d.call(&[b"GET", marker.as_bytes()]).await;
    let mut out = Vec::new();
    loop {
        let line = String::from_utf8_lossy(&monitor.read().await).into_owned();
        if line.contains(&marker) {
            return out;
        }
        if line.contains("\"MGET\"") {
            out.push(
                line.split("] ")
                    .nth(1)
                    .unwrap_or_default()
                    .trim()
                    .to_string(),
            );
        }
    }
}

fn rand_suffix() -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one(Instant::now())
}

/// MGET per key: hits, partial hits and misses byte-identical to Redis
/// (RESP2 and RESP3, a key of another type and a missing key included);
/// a partial hit reads only the missing keys (what the upstream's MONITOR
/// sees); the per-key entries are invalidated by writes through the
/// sidecar and straight to Redis, and a GET of a key an MGET cached is
/// still Redis's own answer.
#[tokio::test]
async fn mget_is_cached_per_key() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let mut d = direct_raw(&redis, "3").await;
    setup(
        &mut d,
        &[
            "SET c:1 one",
            "SET c:2 two",
            "SET c:3 three",
            "HSET c:4 f v",
        ],
    )
    .await;
    for proto in ["2", "3"] {
        let s = cached(&redis).await;
        let mut direct = direct_raw(&redis, proto).await;
        let mut c = Raw::connect(s.addr).await;
        assert!(
            !c.call(&[b"HELLO", proto.as_bytes()])
                .await
                .starts_with(b"-")
        );
        let mut monitor = direct_raw(&redis, "2").await;
        assert_eq!(&monitor.call(&[b"MONITOR"]).await[..], b"+OK\r\n");
        let mut same = async |c: &mut Raw, read: &str| {
            let want = call(&mut direct, read).await;
            let got = call(c, read).await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "RESP{proto} {read}"
            );
        };
        same(&mut c, "MGET c:1 c:2").await;
        let hits = requests(&s, "hit");
        same(&mut c, "MGET c:1 c:2").await;
        assert_eq!(requests(&s, "hit"), hits + 1.0, "RESP{proto}: a hit");
        assert_eq!(
            upstream_mgets(&mut monitor, &redis).await.len(),
            3,
            "ours and the direct ones"
        );
        // A partial hit: only c:3, c:4 (a hash: nil) and c:5 (missing)
        // are read, in one MGET.
        let mut direct_only = direct_raw(&redis, proto).await;
        let want = direct_only
            .call(&[b"MGET", b"c:2", b"c:3", b"c:4", b"c:5", b"c:1"])
            .await;
        let got = c
            .call(&[b"MGET", b"c:2", b"c:3", b"c:4", b"c:5", b"c:1"])
            .await;
        assert_eq!(got, want, "RESP{proto}: a partial hit");
        let seen = upstream_mgets(&mut monitor, &redis).await;
        assert_eq!(
            seen,
            [
                "\"MGET\" \"c:2\" \"c:3\" \"c:4\" \"c:5\" \"c:1\"",
                "\"MGET\" \"c:3\" \"c:4\" \"c:5\""
            ],
            "RESP{proto}: the direct MGET, then the sidecar's fill of the missing keys"
        );
        // Every key cached now (a repeated key too): nothing read.
        let hits = requests(&s, "hit");
        same(&mut c, "MGET c:5 c:4 c:3 c:3 c:1").await;
        assert_eq!(requests(&s, "hit"), hits + 1.0);
        assert_eq!(
            upstream_mgets(&mut monitor, &redis).await.len(),
            1,
            "the direct one only"
        );
        // GET of the hash is still WRONGTYPE (its MGET element is nil).
        same(&mut c, "GET c:4").await;
        // A write through the sidecar, then one straight to Redis.
        assert_eq!(&call(&mut c, "SET c:3 new").await[..], b"+OK\r\n");
        same(&mut c, "MGET c:1 c:3").await;
        assert_eq!(&call(&mut d, "SET c:1 direct").await[..], b"+OK\r\n");
        assert!(
            eventually(|| async {
                let r = Raw::connect(s.addr).await.call(&[b"MGET", b"c:1"]).await;
                String::from_utf8_lossy(&r).contains("direct")
            })
            .await
        );
        same(&mut c, "MGET c:3 c:1 c:2").await;
        call(&mut d, "SET c:1 one").await;
        call(&mut d, "SET c:3 three").await;
        s.shutdown().await;
    }
}

/// Run each line on `c`; none may fail.
async fn setup(c: &mut Raw, lines: &[&str]) {
    for line in lines {
        assert!(!call(c, line).await.starts_with(b"-"), "{line}");
    }
}

async fn call(c: &mut Raw, line: &str) -> bytes::Bytes {
    let args = words(line);
    let refs: Vec<&[u8]> = args.iter().map(|a| &a[..]).collect();
    c.call(&refs).await
}

/// `[cache.hot_keys]` on, no rule.
fn hot_config(redis: &RedisServer, threshold: u32) -> Config {
    let mut c = config(&redis.url());
    c.cache = CacheConfig {
        enabled: true,
        hot_keys: redis_sidecar::config::HotKeysCacheConfig {
            enabled: true,
            threshold,
            max_keys: 10,
            ttl: Duration::from_secs(60),
            ..Default::default()
        },
        ..CacheConfig::default()
    };
    c
}

/// `n` pipelined copies of one command; the replies.
async fn pipelined(c: &mut Raw, args: &[&[u8]], n: usize) -> Vec<bytes::Bytes> {
    let one = redis_sidecar::wire::encode_command(args);
    c.send(&one.repeat(n)).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(c.read().await);
    }
    out
}

/// A key no rule names gets cached once it is hot (read at least
/// `threshold` times in a second), through the same coherent fill as a
/// rule's: hits byte-identical to Redis, a write through the sidecar and
/// one straight to Redis seen; an excluded key (`bull:*`) and a cold key
/// never are; a hot key that cools leaves, with its entries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_keys_are_cached_while_hot() {
    let _shared = serial().read().await;
    let redis = RedisServer::start();
    let s = sidecar_with(hot_config(&redis, 20), Builder::default()).await;
    let mut d = direct_raw(&redis, "2").await;
    for line in ["SET feed:1 post", "SET bull:q:1 job", "SET cold:1 c"] {
        call(&mut d, line).await;
    }
    let hits = || {
        metric(
            &s,
            "cache_requests_total",
            &[("rule", "hot_keys"), ("result", "hit")],
        )
    };
    let mut c = Raw::connect(s.addr).await;
    let want = d.call(&[b"GET", b"feed:1"]).await;
    // Bursts of 100 reads: the threshold is crossed within one.
    assert!(
        eventually(|| async {
            let mut c = Raw::connect(s.addr).await;
            let got = pipelined(&mut c, &[b"GET", b"feed:1"], 100).await;
            assert!(got.iter().all(|r| *r == want), "{got:?}");
            hits() > 0.0
        })
        .await,
        "feed:1 never got hot"
    );
    assert!(eventually(|| async { metric(&s, "cache_hot_keys", &[]) == 1.0 }).await);
    // Hits: Redis sees none of these reads.
    let before = cmdstat(&redis, "get").await;
    let got = pipelined(&mut c, &[b"GET", b"feed:1"], 50).await;
    assert!(got.iter().all(|r| *r == want));
    assert_eq!(cmdstat(&redis, "get").await, before);
    // Excluded and cold keys always go to Redis.
    let before = cmdstat(&redis, "get").await;
    pipelined(&mut c, &[b"GET", b"bull:q:1"], 100).await;
    pipelined(&mut c, &[b"GET", b"cold:1"], 5).await;
    assert_eq!(cmdstat(&redis, "get").await, before + 105);
    // Coherent: a write through the sidecar, then one straight to Redis.
    assert_eq!(&call(&mut c, "SET feed:1 new").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut c, "GET feed:1").await[..], b"$3\r\nnew\r\n");
    call(&mut d, "SET feed:1 direct").await;
    assert!(
        eventually(|| async {
            &call(&mut Raw::connect(s.addr).await, "GET feed:1").await[..] == b"$6\r\ndirect\r\n"
        })
        .await
    );
    // Left alone, it cools: gone from the hot set with its entry.
    assert!(eventually(|| async { metric(&s, "cache_hot_keys", &[]) == 0.0 }).await);
    assert!(metric(&s, "cache_invalidations_total", &[("reason", "cooled")]) >= 1.0);
    let before = cmdstat(&redis, "get").await;
    call(&mut c, "GET feed:1").await;
    assert_eq!(
        cmdstat(&redis, "get").await,
        before + 1,
        "read from Redis again"
    );
    s.shutdown().await;
}
