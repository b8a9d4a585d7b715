//! The hot-key and big-key report from the traffic (`[hotkeys]`), through
//! a real sidecar and Redis: the hot key first with its commands and
//! share, a big value among the big keys, behind the admin token, and the
//! `redis-sidecar hotkeys` table.
#![allow(clippy::unwrap_used)]

mod support;

use redis::AsyncCommands;
use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_redis-sidecar");

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_report_finds_the_hot_key_and_the_big_one() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.hotkeys.enabled = true;
    // One window for the whole test, however slow the machine.
    cfg.hotkeys.window = std::time::Duration::from_secs(3600);
    cfg.admin_token = "hk-token".into();
    let s = sidecar_with(cfg, redis_sidecar::policy::Builder::default()).await;
    let admin = s.admin_addr.unwrap();
    let mut c = client(&s).await;
    let _: () = c.set("hot", "1").await.unwrap();
    for i in 0..2000 {
        let _: Option<String> = c.get("hot").await.unwrap();
        if i % 10 == 0 {
            let _: Option<String> = c.get(format!("warm:{}", i % 50)).await.unwrap();
        }
    }
    let _: i64 = c.incr("hot:counter", 1).await.unwrap();
    let big = "x".repeat(2 << 20);
    let _: () = c.set("big", &big).await.unwrap();
    for _ in 0..16 {
        let v: String = c.get("big").await.unwrap();
        assert_eq!(v.len(), big.len());
    }
    // Keys are data: the token is needed.
    assert_eq!(http_get(admin, "/hotkeys").await.0, 401);
    let (st, body) = http(admin, "GET", "/hotkeys", Some("hk-token")).await;
    assert_eq!(st, 200, "{body}");
    let r: serde_json::Value = serde_json::from_str(&body).unwrap();
    let keys = r["current"]["keys"].as_array().unwrap();
    assert_eq!(keys[0]["key"], "hot", "{body}");
    assert!(keys[0]["requests"].as_u64().unwrap() >= 2001, "{body}");
    assert!(keys[0]["share"].as_f64().unwrap() > 0.8, "{body}");
    assert_eq!(keys[0]["commands"]["get"], 2000, "{body}");
    assert_eq!(keys[0]["commands"]["set"], 1, "{body}");
    let big_keys = r["big_keys"].as_array().unwrap();
    assert!(
        big_keys
            .iter()
            .any(|b| b["key"] == "big" && b["bytes"].as_u64().unwrap() >= 2 << 20),
        "{body}"
    );
    // No key in a metric label; the aggregates only.
    let (_, metrics) = http_get(admin, "/metrics").await;
    assert!(!metrics.contains("\"hot\""), "a key in the metrics");
    // The command-line table.
    let url = format!("http://{admin}");
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(BIN)
            .args(["hotkeys", "--admin", &url])
            .env("REDIS_SIDECAR_ADMIN_TOKEN", "hk-token")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(table.contains("current window"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(" hot ") && l.contains("get 2000")),
        "{table}"
    );
    assert!(table.lines().any(|l| l.contains(" big ")), "{table}");
    s.shutdown().await;
}

/// Off by default: no stage, and `GET /hotkeys` says so (404).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_by_default() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let (st, body) = http_get(s.admin_addr.unwrap(), "/hotkeys").await;
    assert_eq!(st, 404, "{body}");
    assert!(!s.control.policies.current().names().contains(&"hotkeys"));
    s.shutdown().await;
}
