//! Live migration with a Redis Cluster on either side: a single Redis to
//! a 3-master cluster while the app INCRs counters and writes sessions,
//! then (after finish) the cluster to another single Redis.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use redis::AsyncCommands;

use crate::support::*;

/// GET `key` on the cluster with `redis-cli -c` (follows MOVED).
fn cluster_get(cluster: &Cluster, key: &str) -> String {
    let out = std::process::Command::new("redis-cli")
        .args(["-c", "-p", &cluster.nodes[0].port.to_string(), "GET", key])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

async fn phase(admin: std::net::SocketAddr, want: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, body) = http_get(admin, "/migrations/current").await;
        let m: serde_json::Value = serde_json::from_str(&body).unwrap();
        if m["phase"] == want {
            return m;
        }
        assert!(
            want == "failed" || (m["phase"] != "failed" && m["phase"] != "aborted"),
            "migration ended: {m}"
        );
        assert!(std::time::Instant::now() < deadline, "no {want}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_to_cluster_and_cluster_to_single() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let back = RedisServer::start();
    let s = sidecar_with(
        config_multi(&[
            ("single", single.url()),
            ("cluster", cluster.url()),
            ("back", back.url()),
        ]),
        Default::default(),
    )
    .await;
    wait_up(&s, 1).await;
    let admin = s.admin_addr.unwrap();
    let mut src = single.direct().await;
    for i in 0..500 {
        let _: () = src
            .set_ex(format!("sess:{i}"), format!("data{i}"), 3600)
            .await
            .unwrap();
        let _: () = src.hset(format!("h:{i}"), "f", i).await.unwrap();
    }
    // Keys in db 1 cannot go to a cluster: the migration says so.
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut src)
        .await
        .unwrap();
    let _: () = src.set("in-db-1", 1).await.unwrap();
    let (st, body) = http_json(admin, "POST", "/migrations", r#"{"to": "cluster"}"#).await;
    assert_eq!(st, 202, "{body}");
    let failed = phase(admin, "failed").await;
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("db 1 holds keys"),
        "{failed}"
    );
    let _: () = redis::cmd("FLUSHDB").query_async(&mut src).await.unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut src)
        .await
        .unwrap();
    // The app: counters INCRed through the sidecar all along.
    let stop = Arc::new(AtomicBool::new(false));
    let app = {
        let (stop, url) = (stop.clone(), url(&s));
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let mut n = [0u64; 4];
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                let _: i64 = c.incr(format!("counter:{}", i % 4), 1).await.unwrap();
                n[i % 4] += 1;
                i += 1;
            }
            n
        })
    };
    let (st, body) = http_json(
        admin,
        "POST",
        "/migrations",
        r#"{"to": "cluster", "cutover": true}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let done = phase(admin, "done").await;
    println!("to the cluster: {done}");
    assert_eq!(active(&s).await, "cluster");
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let counts = app.await.unwrap();
    for (i, n) in counts.iter().enumerate() {
        assert_eq!(
            cluster_get(&cluster, &format!("counter:{i}")),
            n.to_string(),
            "counter:{i}"
        );
    }
    for i in (0..500).step_by(17) {
        assert_eq!(
            cluster_get(&cluster, &format!("sess:{i}")),
            format!("data{i}")
        );
    }
    let mut app = client(&s).await;
    let t: i64 = app.ttl("sess:3").await.unwrap();
    assert!(t > 3500, "sess:3 ttl {t}");
    // A single Redis with keys in another db cannot move to a cluster;
    // the cluster moves to another single Redis.
    let (st, body) = http(admin, "POST", "/migrations/current/finish", None).await;
    assert_eq!(st, 200, "{body}");
    assert!(
        eventually(|| async {
            http_get(admin, "/migrations/current")
                .await
                .1
                .contains("\"copy_back\":false")
        })
        .await
    );
    let (st, body) = http_json(
        admin,
        "POST",
        "/migrations",
        r#"{"to": "back", "cutover": true}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let done = phase(admin, "done").await;
    println!("back to a single Redis: {done}");
    assert_eq!(active(&s).await, "back");
    let mut b = back.direct().await;
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut b).await.unwrap();
    assert_eq!(n, 1004, "500 sessions, 500 hashes, 4 counters");
    for (i, c) in counts.iter().enumerate() {
        let v: u64 = b.get(format!("counter:{i}")).await.unwrap();
        assert_eq!(v, *c);
    }
    let t: i64 = b.ttl("sess:3").await.unwrap();
    assert!(t > 3400, "sess:3 ttl {t}");
    s.shutdown().await;
}
