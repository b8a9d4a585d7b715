//! Chaos: 100 clients pipeline writes and ECHOs with unique payloads
//! through the sidecar while its upstream is killed and restarted (from an
//! AOF with `appendfsync always`), paused (SIGSTOP/SIGCONT), and, through
//! a fault-injecting TCP hop, stalled, dripped and reset mid-reply. Errors
//! are allowed (`-ERR upstream ...`); a reply meant for another request
//! never is, and every write acknowledged must be in Redis afterwards.
//!
//! `CHAOS_SECONDS` sets how long the faults go on (default 90). A second,
//! shorter run (`CHAOS_POLICY_SECONDS`, default 30) does the same with
//! every policy on (the L1 cache, rate limits, a TTL rule) and a `GET`
//! after each `SET`: a read must return its own write (or an error, or
//! nil when that write's fate is unknown), never an older value.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use redis_sidecar::wire::ReplyScanner;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Default)]
struct Stats {
    sent: AtomicU64,
    ok: AtomicU64,
    errors: AtomicU64,
    misrouted: AtomicU64,
}

/// One client: batches of `SET chaos:{id}:{n} {n}` (+ `GET` of it when
/// `read`) + `ECHO e{id}-{n}`; returns the writes Redis acknowledged.
async fn client(
    addr: SocketAddr,
    id: usize,
    read: bool,
    stop: Arc<AtomicBool>,
    stats: Arc<Stats>,
) -> Vec<u64> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let Ok(mut c) = TcpStream::connect(addr).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let mut buf = BytesMut::new();
        let mut scanner = ReplyScanner::new(1 << 20);
        'conn: while !stop.load(Ordering::Relaxed) {
            let first = n;
            let mut batch = Vec::new();
            for i in first..first + 8 {
                batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                    "SET".to_string(),
                    format!("chaos:{id}:{i}"),
                    i.to_string(),
                ]));
                if read {
                    batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                        "GET".to_string(),
                        format!("chaos:{id}:{i}"),
                    ]));
                }
                batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                    "ECHO".to_string(),
                    format!("e{id}-{i}"),
                ]));
                if read {
                    // A hot key nobody writes: hits, and fills after each
                    // flush.
                    batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                        "GET".to_string(),
                        format!("chaos:hot:{id}"),
                    ]));
                }
            }
            n += 8;
            stats
                .sent
                .fetch_add(if read { 32 } else { 16 }, Ordering::Relaxed);
            if c.write_all(&batch).await.is_err() {
                break;
            }
            // A steady load rather than a flood: the AOF (fsync always)
            // stays tens of MB over the run.
            tokio::time::sleep(Duration::from_millis(50)).await;
            for i in first..first + 8 {
                // The write's fate: acknowledged, or unknown (an error).
                let mut written = false;
                for kind in [Kind::Set, Kind::Get, Kind::Echo, Kind::Hot] {
                    if matches!(kind, Kind::Get | Kind::Hot) && !read {
                        continue;
                    }
                    // A reply may take a command timeout (paused upstream)
                    // or more (queued behind a dripping connection).
                    let reply = tokio::time::timeout(Duration::from_secs(30), async {
                        loop {
                            if let Some(f) = scanner.next(&mut buf).unwrap() {
                                return Some(f);
                            }
                            match c.read_buf(&mut buf).await {
                                Ok(0) | Err(_) => return None,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await;
                    let Ok(Some(reply)) = reply else {
                        // Closed (or stuck): the rest of the batch has an
                        // unknown fate; not acknowledged.
                        break 'conn;
                    };
                    if reply.first() == Some(&b'-') {
                        stats.errors.fetch_add(1, Ordering::Relaxed);
                        continue;
                    }
                    let want = match kind {
                        Kind::Echo => {
                            let p = format!("e{id}-{i}");
                            format!("${}\r\n{p}\r\n", p.len()).into_bytes()
                        }
                        Kind::Set => b"+OK\r\n".to_vec(),
                        Kind::Get => {
                            let v = i.to_string();
                            format!("${}\r\n{v}\r\n", v.len()).into_bytes()
                        }
                        Kind::Hot => {
                            let v = id.to_string();
                            format!("${}\r\n{v}\r\n", v.len()).into_bytes()
                        }
                    };
                    // A write whose fate is unknown may not have happened.
                    let unknown_nil = kind == Kind::Get && !written && &reply[..] == b"$-1\r\n";
                    if reply[..] == want[..] || unknown_nil {
                        stats.ok.fetch_add(1, Ordering::Relaxed);
                        if kind == Kind::Set {
                            written = true;
                            acked.push(i);
                        }
                    } else {
                        stats.misrouted.fetch_add(1, Ordering::Relaxed);
                        eprintln!("client {id}, request {i} ({kind:?}): got {reply:?}");
                    }
                }
            }
        }
    }
    acked
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Set,
    Get,
    Echo,
    Hot,
}

fn signal(pid: u32, sig: &str) {
    std::process::Command::new("kill")
        .args(["-s", sig, &pid.to_string()])
        .status()
        .unwrap();
}

fn vm_hwm_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_nothing_acknowledged_and_misroutes_nothing() {
    let seconds: u64 = std::env::var("CHAOS_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(90);
    let _alone = serial().write().await;
    chaos(seconds, false).await;
}

/// The same with the cache, rate limits and a TTL rule on, and reads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_with_every_policy_on() {
    let seconds: u64 = std::env::var("CHAOS_POLICY_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let _alone = serial().write().await;
    chaos(seconds, true).await;
}

async fn chaos(seconds: u64, policies: bool) {
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut redis = vec![RedisServer::start_with(&aof)];
    let port = redis[0].port;
    let hop = FaultHop::start(port).await;
    let mut cfg = config(&format!("redis://127.0.0.1:{}", hop.port));
    cfg.timeouts.command = Duration::from_secs(2);
    cfg.timeouts.connect = Duration::from_millis(500);
    if policies {
        use redis_sidecar::config::{CacheConfig, CacheRule};
        cfg.cache = CacheConfig {
            enabled: true,
            rule: vec![CacheRule {
                pattern: "chaos:*".into(),
                name: None,
                ttl: Duration::from_secs(60),
                commands: None,
                stale_if_error: None,
            }],
            ..CacheConfig::default()
        };
        cfg.rate_limit = vec![
            toml::from_str("name = \"per-client\"\nper = \"client\"\nrate = \"100000/s\"\n")
                .unwrap(),
        ];
        cfg.ttl = vec![ttl_rule("chaos:*", Some(Duration::from_secs(3600)), None)];
    }
    let s = sidecar_with(cfg, Default::default()).await;
    if policies {
        let mut d = redis[0].direct().await;
        let mut pipe = redis::pipe();
        for id in 0..100 {
            pipe.cmd("SET")
                .arg(format!("chaos:hot:{id}"))
                .arg(id)
                .ignore();
        }
        let _: () = pipe.query_async(&mut d).await.unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let stats = Arc::new(Stats::default());
    let clients: Vec<_> = (0..100)
        .map(|id| tokio::spawn(client(s.addr, id, policies, stop.clone(), stats.clone())))
        .collect();

    let until = Instant::now() + Duration::from_secs(seconds);
    let mut round = 0;
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        match round % 5 {
            0 => {
                // kill -9, then restart from the AOF on the same port.
                let pid = redis.last().unwrap().pid();
                signal(pid, "KILL");
                tokio::time::sleep(Duration::from_millis(800)).await;
                redis.push(RedisServer::start_on(port, &aof).unwrap());
            }
            1 => {
                let pid = redis.last().unwrap().pid();
                signal(pid, "STOP");
                tokio::time::sleep(Duration::from_millis(2500)).await;
                signal(pid, "CONT");
            }
            2 => {
                hop.set(Fault::Stall);
                tokio::time::sleep(Duration::from_millis(2500)).await;
                hop.set(Fault::Pass);
            }
            3 => {
                hop.set(Fault::Drip);
                tokio::time::sleep(Duration::from_millis(1500)).await;
                hop.set(Fault::Pass);
            }
            _ => hop.reset_all(),
        }
        round += 1;
    }
    // Calm: let the clients see things work again, then stop them.
    tokio::time::sleep(Duration::from_secs(3)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for (id, c) in clients.into_iter().enumerate() {
        acked.extend(c.await.unwrap().into_iter().map(|n| (id, n)));
    }

    // Every acknowledged write is in Redis (which may still be loading).
    let r = redis.last().unwrap();
    let mut d = r.direct().await;
    assert!(
        eventually(|| {
            let mut c = d.clone();
            async move {
                redis::AsyncCommands::exists::<_, bool>(&mut c, "x")
                    .await
                    .is_ok()
            }
        })
        .await
    );
    let mut missing = 0;
    for chunk in acked.chunks(500) {
        let keys: Vec<String> = chunk
            .iter()
            .map(|(id, n)| format!("chaos:{id}:{n}"))
            .collect();
        let values: Vec<Option<u64>> = redis::cmd("MGET")
            .arg(&keys)
            .query_async(&mut d)
            .await
            .unwrap();
        for ((_, n), v) in chunk.iter().zip(values) {
            if v != Some(*n) {
                missing += 1;
            }
        }
    }
    let report = format!(
        "chaos{} for {seconds} s ({round} faults): {} commands sent, {} answered as sent, {} errors, {} misrouted; {} writes acknowledged, {missing} missing afterwards; max RSS of the test process (sidecar and clients) {} MiB",
        if policies {
            format!(
                " with every policy on (cache hits {}, misses {}, bypassed {}, flushes {})",
                metric(&s, "cache_requests_total", &[("result", "hit")]),
                metric(&s, "cache_requests_total", &[("result", "miss")]),
                metric(&s, "cache_requests_total", &[("result", "bypass")]),
                metric(&s, "cache_invalidations_total", &[("reason", "flush")])
            )
        } else {
            String::new()
        },
        stats.sent.load(Ordering::Relaxed),
        stats.ok.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
        stats.misrouted.load(Ordering::Relaxed),
        acked.len(),
        vm_hwm_kib() / 1024,
    );
    println!("{report}");
    assert_eq!(stats.misrouted.load(Ordering::Relaxed), 0, "{report}");
    assert_eq!(missing, 0, "{report}");
    assert!(acked.len() > 1000, "too little got through: {report}");
    assert!(
        stats.errors.load(Ordering::Relaxed) > 0,
        "no fault was felt: {report}"
    );
}
