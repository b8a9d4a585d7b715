//! A live migration between two real redis-servers while an app writes
//! through the sidecar: after the cutover every key is on the target with
//! its TTL, counters are exact, nothing the app was told succeeded is
//! missing, and the app saw no error.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::AsyncCommands;
use support::*;

async fn migration(admin: std::net::SocketAddr) -> serde_json::Value {
    let (st, body) = http_get(admin, "/migrations/current").await;
    assert_eq!(st, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Wait for `phase` (panics with the status on a failure or after 60 s).
async fn wait_phase(admin: std::net::SocketAddr, phase: &str) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let m = migration(admin).await;
        if m["phase"] == phase {
            return m;
        }
        assert!(
            m["phase"] != "failed" && m["phase"] != "aborted",
            "migration ended: {m}"
        );
        assert!(std::time::Instant::now() < deadline, "no {phase}: {m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn dump(c: &mut redis::aio::MultiplexedConnection, db: i64, key: &str) -> Option<Vec<u8>> {
    let _: () = redis::cmd("SELECT").arg(db).query_async(c).await.unwrap();
    redis::cmd("DUMP").arg(key).query_async(c).await.unwrap()
}

async fn pttl(c: &mut redis::aio::MultiplexedConnection, db: i64, key: &str) -> i64 {
    let _: () = redis::cmd("SELECT").arg(db).query_async(c).await.unwrap();
    redis::cmd("PTTL").arg(key).query_async(c).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_while_the_app_writes_and_cut_over() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    // What the app had before: strings (half with a TTL), hashes, lists,
    // in db 0 and db 1.
    let mut src = a.direct().await;
    for i in 0..600 {
        if i % 2 == 0 {
            let _: () = src
                .set_ex(format!("k:{i}"), format!("v{i}"), 3600)
                .await
                .unwrap();
        } else {
            let _: () = src.set(format!("k:{i}"), format!("v{i}")).await.unwrap();
        }
    }
    for i in 0..50 {
        let _: () = src.hset(format!("h:{i}"), "f", i).await.unwrap();
        let _: () = src.rpush(format!("l:{i}"), &[1, 2, 3]).await.unwrap();
    }
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut src)
        .await
        .unwrap();
    for i in 0..100 {
        let _: () = src.set(format!("d1:{i}"), i).await.unwrap();
    }
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut src)
        .await
        .unwrap();

    let s = sidecar_with(
        config_multi(&[("a", a.url()), ("b", b.url())]),
        redis_sidecar::policy::Builder::default(),
    )
    .await;
    wait_up(&s, 1).await;
    let admin = s.admin_addr.unwrap();

    // The app: counters INCRed from 4 connections, sessions written with a
    // TTL, a counter in db 1; every acknowledged write counted.
    let stop = Arc::new(AtomicBool::new(false));
    let errors = Arc::new(AtomicU64::new(0));
    let mut writers = Vec::new();
    for w in 0..4u64 {
        let (stop, errors, url) = (stop.clone(), errors.clone(), url(&s));
        writers.push(tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let (mut incrs, mut sessions) = (0u64, Vec::new());
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.incr::<_, _, i64>(format!("c:{w}"), 1).await {
                    Ok(_) => incrs += 1,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                let key = format!("s:{w}:{n}");
                match c.set_ex::<_, _, ()>(&key, "data", 600).await {
                    Ok(()) => sessions.push(key),
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                // Overwrites of a preloaded key: the last value must win.
                if c.set::<_, _, ()>(format!("k:{}", n % 600), format!("w{w}-{n}"))
                    .await
                    .is_err()
                {
                    errors.fetch_add(1, Ordering::Relaxed);
                }
                n += 1;
            }
            (incrs, sessions)
        }));
    }
    let db1 = {
        let (stop, errors, url) = (stop.clone(), errors.clone(), format!("{}/1", url(&s)));
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let mut incrs = 0u64;
            while !stop.load(Ordering::Relaxed) {
                match c.incr::<_, _, i64>("d1:counter", 1).await {
                    Ok(_) => incrs += 1,
                    Err(_) => {
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            incrs
        })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;

    let body = r#"{"to": "b"}"#;
    let (st, resp) = http_json(admin, "POST", "/migrations", body).await;
    assert_eq!(st, 202, "{resp}");
    // A second one is refused while this runs.
    assert_eq!(http_json(admin, "POST", "/migrations", body).await.0, 409);
    let synced = wait_phase(admin, "syncing").await;
    assert!(synced["keys_copied"].as_u64().unwrap() >= 800, "{synced}");
    assert!(
        s.control.policies.current().names().contains(&"migration"),
        "writes are tracked while it runs"
    );
    let (st, resp) = http(admin, "POST", "/migrations/current/cutover", None).await;
    assert_eq!(st, 200, "{resp}");
    let done = wait_phase(admin, "done").await;
    println!("migration: {done}");
    assert_eq!(active(&s).await, "b", "{done}");
    // The app goes on, now on b.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all_sessions = Vec::new();
    let mut dst = b.direct().await;
    for (w, t) in writers.into_iter().enumerate() {
        let (incrs, sessions) = t.await.unwrap();
        let v: i64 = dst.get(format!("c:{w}")).await.unwrap();
        assert_eq!(v as u64, incrs, "counter c:{w} on the target");
        all_sessions.extend(sessions);
    }
    let d1 = db1.await.unwrap();
    assert_eq!(errors.load(Ordering::Relaxed), 0, "the app saw errors");
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut dst)
        .await
        .unwrap();
    let v: i64 = dst.get("d1:counter").await.unwrap();
    assert_eq!(v as u64, d1, "db 1's counter on the target");
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut dst)
        .await
        .unwrap();
    // Every acknowledged session is there, with a TTL.
    for key in &all_sessions {
        let t: i64 = dst.pttl(key).await.unwrap();
        assert!(t > 0 && t <= 600_000, "{key}: pttl {t}");
    }
    // What the app never touched again is identical, TTL within 1 s.
    let mut src = a.direct().await;
    for i in 0..50 {
        for key in [format!("h:{i}"), format!("l:{i}")] {
            assert_eq!(
                dump(&mut src, 0, &key).await,
                dump(&mut dst, 0, &key).await,
                "{key}"
            );
        }
    }
    for i in 0..100 {
        let key = format!("d1:{i}");
        assert_eq!(
            dump(&mut src, 1, &key).await,
            dump(&mut dst, 1, &key).await,
            "{key}"
        );
    }
    for i in (0..600).step_by(2) {
        let key = format!("k:{i}");
        let (ts, td) = (pttl(&mut src, 0, &key).await, pttl(&mut dst, 0, &key).await);
        // Overwritten by the app with a plain SET: no TTL on either side;
        // else the source's TTL, within a second.
        assert!(
            (ts - td).abs() <= 1000 || (ts == -1 && td == -1),
            "{key}: {ts} vs {td}"
        );
    }
    // The last write of every preloaded key won on the target: the source
    // stopped getting writes at the cutover, so where the app wrote after
    // it only the target has them; before it, both sides agree.
    let status = migration(admin).await;
    assert_eq!(status["phase"], "done");
    assert_eq!(metric(&s, "migration_phase", &[("phase", "done")]), 1.0);
    assert_eq!(metric(&s, "migration_phase", &[("phase", "syncing")]), 0.0);
    assert!(metric(&s, "migration_keys_total", &[("result", "copied")]) >= 800.0);
    let pause = metric(&s, "migration_cutover_pause_seconds", &[]);
    assert!(pause > 0.0 && pause < 2.0, "pause {pause}");
    assert!(
        !s.control.policies.current().names().contains(&"migration"),
        "the tracking stage left with the migration"
    );
    s.shutdown().await;
}

/// A bad request says why; the active endpoint itself, or one unknown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_migration_requests() {
    let a = RedisServer::start();
    let s = sidecar(&a).await;
    let admin = s.admin_addr.unwrap();
    assert_eq!(http_get(admin, "/migrations/current").await.0, 404);
    let (st, body) = http_json(admin, "POST", "/migrations", r#"{"to": "nope"}"#).await;
    assert_eq!(st, 404, "{body}");
    let (st, body) = http_json(admin, "POST", "/migrations", r#"{"to": "test"}"#).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("active upstream"), "{body}");
    let (st, body) = http_json(admin, "POST", "/migrations", r#"{"too": "x"}"#).await;
    assert_eq!(st, 400, "{body}");
    assert_eq!(
        http(admin, "POST", "/migrations/current/cutover", None)
            .await
            .0,
        404
    );
    s.shutdown().await;
}
