//! The sidecar in front of a real Redis Cluster while it changes under
//! load: slots resharded between masters, and a master killed (its replica
//! promoted). Nothing acknowledged is lost, no reply reaches the wrong
//! request, and redirections are counted.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::support::*;
use redis_sidecar::Sidecar;

#[derive(Default)]
struct Tally {
    commands: AtomicU64,
    misrouted: AtomicU64,
    errors: AtomicU64,
}

/// One client pipelining unique ECHOs and SETs (16 per round) until
/// `stop`; returns the keys whose SET was acknowledged.
async fn client_loop(
    addr: std::net::SocketAddr,
    id: usize,
    stop: Arc<AtomicBool>,
    tally: Arc<Tally>,
    errors_seen: Arc<std::sync::Mutex<Vec<String>>>,
) -> Vec<String> {
    let mut c = Raw::connect(addr).await;
    let mut acked = Vec::new();
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let mut batch = Vec::new();
        let mut out = Vec::new();
        for _ in 0..8 {
            n += 1;
            let echo = format!("e:{id}:{n}");
            let key = format!("k:{id}:{n}");
            out.extend_from_slice(&encode(&[b"ECHO", echo.as_bytes()]));
            out.extend_from_slice(&encode(&[b"SET", key.as_bytes(), echo.as_bytes()]));
            batch.push((echo, key));
        }
        c.send(&out).await;
        for (echo, key) in batch {
            let e = c.read().await;
            let s = c.read().await;
            tally.commands.fetch_add(2, Ordering::Relaxed);
            let want = format!("${}\r\n{echo}\r\n", echo.len());
            for r in [&e, &s] {
                if r.starts_with(b"-") {
                    tally.errors.fetch_add(1, Ordering::Relaxed);
                    let mut seen = errors_seen.lock().unwrap();
                    if seen.len() < 10 {
                        seen.push(String::from_utf8_lossy(r).into_owned());
                    }
                }
            }
            if !e.starts_with(b"-") && e[..] != *want.as_bytes() {
                tally.misrouted.fetch_add(1, Ordering::Relaxed);
            }
            if !s.starts_with(b"-") && &s[..] != b"+OK\r\n" {
                tally.misrouted.fetch_add(1, Ordering::Relaxed);
            }
            if &s[..] == b"+OK\r\n" {
                acked.push(key);
            }
        }
    }
    acked
}

fn encode(args: &[&[u8]]) -> Vec<u8> {
    redis_sidecar::wire::encode_command(args).to_vec()
}

fn node_id(port: u16) -> String {
    let out = Command::new("redis-cli")
        .args(["-p", &port.to_string(), "CLUSTER", "MYID"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn masters(cluster: &Cluster) -> Vec<u16> {
    cluster
        .nodes
        .iter()
        .filter(|n| {
            let out = Command::new("redis-cli")
                .args(["-p", &n.port.to_string(), "ROLE"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).starts_with("master")
        })
        .map(|n| n.port)
        .collect()
}

/// Every acknowledged SET is in the cluster with its value, read through
/// the sidecar in pipelines.
async fn check_acked(s: &Sidecar, acked: &[String]) -> usize {
    let mut c = client(s).await;
    let mut missing = 0;
    for chunk in acked.chunks(500) {
        let mut p = redis::pipe();
        for k in chunk {
            p.get(k);
        }
        let vals: Vec<Option<String>> = p.query_async(&mut c).await.unwrap();
        for (k, v) in chunk.iter().zip(vals) {
            let want = k.replacen("k:", "e:", 1);
            if v.as_deref() != Some(want.as_str()) {
                missing += 1;
            }
        }
    }
    missing
}

/// Move 2000 slots from one master to another and back with `redis-cli
/// --cluster reshard` while 50 clients pipeline: 0 misrouted replies, 0
/// acknowledged writes missing, redirections counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resharding_under_load_loses_and_misroutes_nothing() {
    let _alone = serial().write().await;
    let cluster = Cluster::start_alone(3);
    let s = cluster_sidecar(&cluster).await;
    let m = masters(&cluster);
    let (a, b) = (m[0], m[1]);
    let (ida, idb) = (node_id(a), node_id(b));
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let errors = Arc::new(std::sync::Mutex::new(Vec::new()));
    let mut clients = Vec::new();
    for id in 0..50 {
        clients.push(tokio::spawn(client_loop(
            s.addr,
            id,
            stop.clone(),
            tally.clone(),
            errors.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    for (from, to) in [(&ida, &idb), (&idb, &ida)] {
        let (from, to) = (from.clone(), to.clone());
        // The nodes agree on the last move before the next starts.
        let settled = tokio::task::spawn_blocking(move || {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let out = Command::new("redis-cli")
                    .args(["--cluster", "check", &format!("127.0.0.1:{a}")])
                    .output()
                    .unwrap();
                let text = String::from_utf8_lossy(&out.stdout);
                if out.status.success() && !text.contains("[ERR]") && !text.contains("[WARNING]") {
                    return true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            false
        })
        .await
        .unwrap();
        assert!(settled, "the cluster did not settle");
        let out = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .args([
                    "--cluster",
                    "reshard",
                    &format!("127.0.0.1:{a}"),
                    "--cluster-from",
                    &from,
                    "--cluster-to",
                    &to,
                    "--cluster-slots",
                    "2000",
                    "--cluster-yes",
                    "--cluster-pipeline",
                    "20",
                ])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for c in clients {
        acked.extend(c.await.unwrap());
    }
    let missing = check_acked(&s, &acked).await;
    let moved = metric(&s, "cluster_redirects_total", &[("kind", "moved")]);
    let ask = metric(&s, "cluster_redirects_total", &[("kind", "ask")]);
    let retry = metric(&s, "cluster_redirects_total", &[("kind", "retry")]);
    println!(
        "resharding 2x2000 slots took {took:?}: {} commands, {} writes acknowledged, {} missing, {} misrouted, {} errors {:?}; redirects moved={moved} ask={ask} retry={retry}",
        tally.commands.load(Ordering::Relaxed),
        acked.len(),
        missing,
        tally.misrouted.load(Ordering::Relaxed),
        tally.errors.load(Ordering::Relaxed),
        errors.lock().unwrap(),
    );
    assert_eq!(tally.misrouted.load(Ordering::Relaxed), 0);
    assert_eq!(missing, 0);
    assert!(acked.len() > 1000, "{}", acked.len());
    assert!(moved > 0.0, "no MOVED was followed");
    assert_eq!(
        tally.errors.load(Ordering::Relaxed),
        0,
        "{:?}",
        errors.lock().unwrap()
    );
}

/// kill -9 a master: once its replica is promoted, the sidecar serves its
/// slots again without a restart. The gap is reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_master_is_replaced_by_its_replica() {
    let _alone = serial().write().await;
    let mut cluster = Cluster::start_alone(3);
    let s = cluster_sidecar(&cluster).await;
    let m = masters(&cluster);
    let victim = m[0];
    // Keys on every master, one of them the victim's.
    let mut c = client(&s).await;
    let keys: Vec<String> = (0..300).map(|i| format!("f:{i}")).collect();
    for k in &keys {
        let () = redis::cmd("SET")
            .arg(k)
            .arg("1")
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let victim_key = keys
        .iter()
        .find(|k| {
            let out = Command::new("redis-cli")
                .args(["-p", &victim.to_string(), "GET", k])
                .output()
                .unwrap();
            !String::from_utf8_lossy(&out.stdout).contains("MOVED")
        })
        .unwrap()
        .clone();
    // Replication is asynchronous: the replica has every write before the
    // kill once it acknowledged the master's offset.
    let replicated = || {
        let out = Command::new("redis-cli")
            .args(["-p", &victim.to_string(), "INFO", "replication"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let master = text
            .lines()
            .find_map(|l| l.strip_prefix("master_repl_offset:"))
            .map(|v| v.trim().to_string());
        let replica = text
            .lines()
            .find(|l| l.starts_with("slave0:"))
            .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("offset=")))
            .map(|v| v.trim().to_string());
        master.is_some() && master == replica
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while !replicated() {
        assert!(
            Instant::now() < deadline,
            "the victim's replica did not catch up"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let i = cluster.nodes.iter().position(|n| n.port == victim).unwrap();
    let killed = Instant::now();
    cluster.nodes[i].kill();
    // Writes to the victim's slots fail (nothing acknowledged is lost)
    // until the replica takes over.
    let mut first_ok = None;
    let mut failures = 0;
    // /upstreams shows why the dead master cannot be reached, while the
    // map still names it.
    let mut seen_error = None;
    let victim_addr = format!("127.0.0.1:{victim}");
    while killed.elapsed() < Duration::from_secs(30) {
        let r: redis::RedisResult<()> = redis::cmd("SET")
            .arg(&victim_key)
            .arg("2")
            .query_async(&mut c)
            .await;
        match r {
            Ok(()) => {
                first_ok = Some(killed.elapsed());
                break;
            }
            Err(e) => {
                failures += 1;
                if seen_error.is_none() {
                    let u = upstreams(&s).await;
                    seen_error = u["upstreams"][0]["cluster"]["masters"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .find(|m| m["address"] == victim_addr.as_str())
                        .and_then(|m| m["node"]["last_error"].as_str().map(str::to_string));
                }
                if failures % 40 == 1 {
                    println!("{:?} {e}", killed.elapsed());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let Some(gap) = first_ok else {
        panic!(
            "the victim's slots were never served again: {}",
            upstreams(&s).await
        );
    };
    println!(
        "kill -9 of a master: its slots served again after {gap:?} ({failures} failed writes meanwhile)"
    );
    let e = seen_error.expect("no connect error shown for the dead master");
    assert!(e.contains(&victim_addr), "{e}");
    let v: String = redis::cmd("GET")
        .arg(&victim_key)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "2");
    // Every other key survived (they were written before the kill and the
    // replica had them).
    for k in &keys {
        let v: Option<String> = redis::cmd("GET").arg(k).query_async(&mut c).await.unwrap();
        assert!(v.is_some(), "{k}");
    }
}
