//! A `redis-sentinel://` upstream: a master, a replica and three sentinels
//! (`redis-server --sentinel`) on loopback. Killing the master makes the
//! sentinels promote the replica; the sidecar follows it.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_sidecar::policy::Builder;
use support::*;

async fn sentinel_conn(port: u16) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// Poll `f` until it returns true or `limit` passes.
async fn within<F, Fut>(limit: Duration, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test]
async fn follows_the_master_sentinel_promotes() {
    let mut master = RedisServer::start();
    let mport = master.port.to_string();
    let replica = RedisServer::start_with(&["--replicaof", "127.0.0.1", &mport]);
    let sentinels: Vec<RedisServer> = (0..3)
        .map(|_| RedisServer::start_sentinel(master.port))
        .collect();
    // Wait until every sentinel sees the replica and a usable quorum.
    for s in &sentinels {
        let port = s.port;
        assert!(
            within(Duration::from_secs(30), || async move {
                let mut c = sentinel_conn(port).await;
                let ok: redis::RedisResult<String> = redis::cmd("SENTINEL")
                    .arg("CKQUORUM")
                    .arg("mymaster")
                    .query_async(&mut c)
                    .await;
                let replicas: redis::RedisResult<Vec<redis::Value>> = redis::cmd("SENTINEL")
                    .arg("REPLICAS")
                    .arg("mymaster")
                    .query_async(&mut c)
                    .await;
                ok.is_ok_and(|s| s.contains("3 usable")) && replicas.is_ok_and(|r| !r.is_empty())
            })
            .await,
            "sentinels did not settle"
        );
    }
    let hosts: Vec<String> = sentinels
        .iter()
        .map(|s| format!("127.0.0.1:{}", s.port))
        .collect();
    let url = format!("redis-sentinel://{}/mymaster", hosts.join(","));
    let mut cfg = config_multi(&[("sentinel", url)]);
    cfg.failover.check_interval = Duration::from_millis(200);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut c = client(&s).await;
    let _: () = c.set("before", "1").await.unwrap();
    let mut m = master.direct().await;
    assert!(m.exists::<_, bool>("before").await.unwrap());
    let u = upstreams(&s).await;
    assert_eq!(
        u["upstreams"][0]["address"],
        format!("127.0.0.1:{}", master.port)
    );

    let killed = Instant::now();
    master.kill();
    let mut n = 0u64;
    let moved = within(Duration::from_secs(60), || {
        n += 1;
        let key = format!("after-{n}");
        let mut c = c.clone();
        let replica = &replica;
        async move {
            let set: redis::RedisResult<()> = c.set(&key, "1").await;
            // A fresh connection each time: the promotion kills clients of
            // reconfigured nodes (CLIENT KILL TYPE normal).
            let mut r = replica.direct().await;
            set.is_ok() && r.exists::<_, bool>(&key).await.unwrap_or(false)
        }
    })
    .await;
    assert!(moved, "the sidecar never wrote to the promoted replica");
    println!(
        "sentinel failover (down-after 1s): kill -9 -> first write on the promoted replica: {:?}",
        killed.elapsed()
    );
    let mut r = replica.direct().await;
    let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut r).await.unwrap();
    assert_eq!(role[0], redis::Value::BulkString(b"master".to_vec()));
    // Every later command goes to the new master.
    for i in 0..20 {
        let _: () = c.set(format!("later-{i}"), i).await.unwrap();
    }
    assert!(r.exists::<_, bool>("later-19").await.unwrap());
    assert!(
        eventually(|| async {
            upstreams(&s).await["upstreams"][0]["address"] == format!("127.0.0.1:{}", replica.port)
        })
        .await
    );
    s.shutdown().await;
}
