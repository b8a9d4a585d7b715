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
    finish(admin).await;
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

/// Two servers and the sidecar in front of the first (`a`), with `b` up.
async fn two() -> (
    RedisServer,
    RedisServer,
    redis_sidecar::Sidecar,
    std::net::SocketAddr,
) {
    two_with(|_| {}).await
}

async fn two_with(
    f: impl FnOnce(&mut redis_sidecar::config::Config),
) -> (
    RedisServer,
    RedisServer,
    redis_sidecar::Sidecar,
    std::net::SocketAddr,
) {
    two_of(RedisServer::start(), f).await
}

/// A source and the given target.
async fn two_servers(
    b: RedisServer,
) -> (
    RedisServer,
    RedisServer,
    redis_sidecar::Sidecar,
    std::net::SocketAddr,
) {
    two_of(b, |_| {}).await
}

async fn two_of(
    b: RedisServer,
    f: impl FnOnce(&mut redis_sidecar::config::Config),
) -> (
    RedisServer,
    RedisServer,
    redis_sidecar::Sidecar,
    std::net::SocketAddr,
) {
    let a = RedisServer::start();
    let mut config = config_multi(&[("a", a.url()), ("b", b.url())]);
    f(&mut config);
    let s = sidecar_with(config, redis_sidecar::policy::Builder::default()).await;
    wait_up(&s, 1).await;
    let admin = s.admin_addr.unwrap();
    (a, b, s, admin)
}

async fn post(admin: std::net::SocketAddr, path: &str) -> (u16, String) {
    http(admin, "POST", path, None).await
}

async fn start(admin: std::net::SocketAddr, body: &str) {
    let (st, resp) = http_json(admin, "POST", "/migrations", body).await;
    assert_eq!(st, 202, "{resp}");
}

async fn cut_over(admin: std::net::SocketAddr) -> serde_json::Value {
    wait_phase(admin, "syncing").await;
    let (st, resp) = post(admin, "/migrations/current/cutover").await;
    assert_eq!(st, 200, "{resp}");
    wait_phase(admin, "done").await
}

/// Finish the current migration and wait until it stopped copying back.
async fn finish(admin: std::net::SocketAddr) {
    let (st, resp) = post(admin, "/migrations/current/finish").await;
    assert_eq!(st, 200, "{resp}");
    assert!(
        eventually(|| async { migration(admin).await["copy_back"] == false }).await,
        "{}",
        migration(admin).await
    );
}

async fn get_in(c: &mut redis::aio::MultiplexedConnection, db: i64, key: &str) -> Option<String> {
    let _: () = redis::cmd("SELECT").arg(db).query_async(c).await.unwrap();
    c.get(key).await.unwrap()
}

/// After the cutover the app's writes go back to the old endpoint, so a
/// rollback loses none of them; `finish` ends that, and a new migration
/// waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_takes_the_writes_made_after_the_cutover_back() {
    let (a, b, s, admin) = two().await;
    let mut src = a.direct().await;
    set_numbered(&mut src, 1000).await;
    // At 2,000 keys a second, 1,000 keys take half a second at least.
    start(admin, r#"{"to": "b", "max_keys_per_second": 2000}"#).await;
    let synced = wait_phase(admin, "syncing").await;
    assert!(
        synced["elapsed_seconds"].as_f64().unwrap() >= 0.4,
        "{synced}"
    );
    let done = cut_over(admin).await;
    assert_eq!(done["copy_back"], true, "{done}");
    assert_eq!(active(&s).await, "b");
    // While it copies back, another migration waits.
    let (st, body) = http_json(admin, "POST", "/migrations", r#"{"to": "a"}"#).await;
    assert_eq!(st, 409, "{body}");
    assert!(body.contains("finish or roll it back"), "{body}");
    assert_eq!(post(admin, "/migrations/current/abort").await.0, 409);

    // The app on b: new keys, changed keys, deleted keys, a flushed db.
    let mut app = client(&s).await;
    for i in 0..50 {
        let _: () = app.set(format!("new:{i}"), "after").await.unwrap();
        let _: () = app.incr(format!("k:{i}"), 1000).await.unwrap();
        let _: () = app.del(format!("k:{}", 500 + i)).await.unwrap();
    }
    let mut app2 = redis::Client::open(format!("{}/2", url(&s)))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = app2.set("d2", "x").await.unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(3)
        .query_async(&mut src)
        .await
        .unwrap();
    let _: () = src.set("d3", "stale").await.unwrap();
    let mut app3 = redis::Client::open(format!("{}/3", url(&s)))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = app3.set("d3", "y").await.unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut app3).await.unwrap();
    // A transaction, and the other db of COPY ... DB and MOVE.
    let _: () = redis::pipe()
        .atomic()
        .set("tx:k", "v")
        .incr("tx:n", 5)
        .query_async(&mut app)
        .await
        .unwrap();
    let _: () = app.set("mv", "moved").await.unwrap();
    let _: i64 = redis::cmd("COPY")
        .arg("mv")
        .arg("copied")
        .arg("DB")
        .arg(4)
        .query_async(&mut app)
        .await
        .unwrap();
    let _: i64 = redis::cmd("MOVE")
        .arg("mv")
        .arg(5)
        .query_async(&mut app)
        .await
        .unwrap();
    let (st, resp) = post(admin, "/migrations/current/rollback").await;
    assert_eq!(st, 200, "{resp}");
    let back = wait_phase(admin, "rolled_back").await;
    println!("rolled back: {back}");
    assert_eq!(active(&s).await, "a");
    assert!(back["keys_copied_back"].as_u64().unwrap() >= 150, "{back}");
    let mut src = a.direct().await;
    for i in 0..50 {
        assert_eq!(
            get_in(&mut src, 0, &format!("new:{i}")).await.as_deref(),
            Some("after")
        );
        let want = (i + 1000).to_string();
        assert_eq!(get_in(&mut src, 0, &format!("k:{i}")).await, Some(want));
        assert_eq!(get_in(&mut src, 0, &format!("k:{}", 500 + i)).await, None);
    }
    assert_eq!(get_in(&mut src, 2, "d2").await.as_deref(), Some("x"));
    assert_eq!(get_in(&mut src, 0, "tx:k").await.as_deref(), Some("v"));
    assert_eq!(get_in(&mut src, 0, "tx:n").await.as_deref(), Some("5"));
    assert_eq!(get_in(&mut src, 0, "mv").await, None);
    assert_eq!(
        get_in(&mut src, 4, "copied").await.as_deref(),
        Some("moved")
    );
    assert_eq!(get_in(&mut src, 5, "mv").await.as_deref(), Some("moved"));
    // The flush reached the old endpoint too: its stale key is gone.
    assert_eq!(get_in(&mut src, 3, "d3").await, None);
    // The app goes on, on a.
    let _: () = app.set("after-rollback", 1).await.unwrap();
    assert_eq!(
        get_in(&mut src, 0, "after-rollback").await.as_deref(),
        Some("1")
    );
    assert_eq!(
        metric(&s, "migration_phase", &[("phase", "rolled_back")]),
        1.0
    );
    assert!(metric(&s, "migration_keys_total", &[("result", "copied_back")]) >= 150.0);
    // Rolled back: finish and rollback have nothing to do; a new one may
    // start.
    assert_eq!(post(admin, "/migrations/current/finish").await.0, 409);
    start(admin, r#"{"to": "b", "on_conflict": "replace"}"#).await;
    cut_over(admin).await;
    finish(admin).await;
    assert_eq!(post(admin, "/migrations/current/rollback").await.0, 409);
    // Finished: a's copy no longer follows.
    let _: () = app.set("after-finish", 1).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(get_in(&mut src, 0, "after-finish").await, None);
    let mut dst = b.direct().await;
    assert_eq!(
        get_in(&mut dst, 0, "after-finish").await.as_deref(),
        Some("1")
    );
    assert!(
        !s.control.policies.current().names().contains(&"migration"),
        "the tracking stage left at finish"
    );
    s.shutdown().await;
}

/// Scripts a client sent (EVAL, SCRIPT LOAD) and the functions are on the
/// target before the app gets there: EVALSHA and FCALL work at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scripts_and_functions_are_on_the_target_at_the_cutover() {
    let (a, _b, s, admin) = two().await;
    let mut app = client(&s).await;
    let lib = "#!lua name=mylib\nredis.register_function('twice', function(keys, args) return tonumber(args[1]) * 2 end)";
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg(lib)
        .query_async(&mut app)
        .await
        .unwrap();
    let _: () = app.set("x", 1).await.unwrap();
    start(admin, r#"{"to": "b"}"#).await;
    wait_phase(admin, "syncing").await;
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return redis.call('GET', KEYS[1])")
        .query_async(&mut app)
        .await
        .unwrap();
    let _: i64 = redis::cmd("EVAL")
        .arg("return 7")
        .arg(0)
        .query_async(&mut app)
        .await
        .unwrap();
    let done = cut_over(admin).await;
    assert_eq!(done["scripts_loaded"], 2, "{done}");
    assert_eq!(active(&s).await, "b");
    let v: String = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(1)
        .arg("x")
        .query_async(&mut app)
        .await
        .unwrap();
    assert_eq!(v, "1");
    let exists: Vec<i64> = redis::cmd("SCRIPT")
        .arg("EXISTS")
        .arg("59b6ab2fbe0ee4b25733de0f62e6cda4899ef8e9")
        .query_async(&mut app)
        .await
        .unwrap();
    assert_eq!(exists, vec![1], "EVAL's body (return 7) is loaded on b");
    let twice: i64 = redis::cmd("FCALL")
        .arg("twice")
        .arg(0)
        .arg(21)
        .query_async(&mut app)
        .await
        .unwrap();
    assert_eq!(twice, 42);
    drop(a);
    s.shutdown().await;
}

/// What a script writes without declaring the key is copied again at the
/// cutover by the `cutover_rescan` patterns (created and deleted keys
/// alike); without them the cutover's verification sees the difference
/// and abandons the cutover, saying why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn undeclared_script_writes_are_caught_by_the_rescan() {
    for rescan in [false, true] {
        let (a, b, s, admin) = two().await;
        let mut app = client(&s).await;
        for i in 0..20 {
            let _: () = app.set(format!("q:job:{i}"), "waiting").await.unwrap();
        }
        let body = if rescan {
            r#"{"to": "b", "cutover_rescan": ["q:*"]}"#
        } else {
            r#"{"to": "b", "cutover_rescan": []}"#
        };
        start(admin, body).await;
        wait_phase(admin, "syncing").await;
        // The script names only KEYS[1], a counter; it creates q:job:20..29
        // and deletes q:job:0..9 from the prefix it is given.
        let script = "local n = redis.call('INCR', KEYS[1]) \
            for i = 0, 9 do \
              redis.call('SET', ARGV[1] .. (20 + i), 'new') \
              redis.call('DEL', ARGV[1] .. i) \
            end return n";
        let _: i64 = redis::cmd("EVAL")
            .arg(script)
            .arg(1)
            .arg("q:count")
            .arg("q:job:")
            .query_async(&mut app)
            .await
            .unwrap();
        let (st, resp) = post(admin, "/migrations/current/cutover").await;
        assert_eq!(st, 200, "{resp}");
        if !rescan {
            assert!(
                eventually(|| async {
                    migration(admin).await["reason"]
                        .as_str()
                        .is_some_and(|r| r.starts_with("cutover abandoned"))
                })
                .await,
                "{}",
                migration(admin).await
            );
            let m = migration(admin).await;
            assert_eq!(m["phase"], "syncing", "{m}");
            // The counts or the sample differ: either way, db 0's.
            assert!(m["reason"].as_str().unwrap().contains("db 0: "), "{m}");
            assert_eq!(active(&s).await, "a", "the app stays on the source");
            s.shutdown().await;
            continue;
        }
        wait_phase(admin, "done").await;
        let mut dst = b.direct().await;
        for i in 0..30 {
            let want = match i {
                0..10 => None,
                10..20 => Some("waiting"),
                _ => Some("new"),
            };
            assert_eq!(
                get_in(&mut dst, 0, &format!("q:job:{i}")).await.as_deref(),
                want,
                "{i}"
            );
        }
        assert_eq!(get_in(&mut dst, 0, "q:count").await.as_deref(), Some("1"));
        drop(a);
        s.shutdown().await;
    }
}

/// A worker blocked in a blocking write (BLMOVE with no timeout) does not
/// hold the cutover: the pause ends, and its client is closed at the
/// switch like any pinned client. FLUSHDB during the migration reaches the
/// target; SWAPDB is refused while one runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocked_workers_flushes_and_swapdb_during_a_migration() {
    let (a, b, s, admin) = two_with(|c| c.timeouts.command = Duration::from_secs(60)).await;
    let mut src = a.direct().await;
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut src)
        .await
        .unwrap();
    for i in 0..10 {
        let _: () = src.set(format!("gone:{i}"), i).await.unwrap();
    }
    start(admin, r#"{"to": "b", "max_pause_ms": 1000}"#).await;
    wait_phase(admin, "syncing").await;
    let mut worker = Raw::connect(s.addr).await;
    worker
        .cmd(&[b"BLMOVE", b"jobs", b"active", b"LEFT", b"RIGHT", b"0"])
        .await;
    assert!(eventually(|| async { blocked_clients(&a).await == 1 }).await);
    let mut app1 = redis::Client::open(format!("{}/1", url(&s)))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("FLUSHDB").query_async(&mut app1).await.unwrap();
    let _: () = app1.set("kept", 1).await.unwrap();
    let err = redis::cmd("SWAPDB")
        .arg(0)
        .arg(1)
        .query_async::<()>(&mut app1)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("live migration"), "{err}");
    let done = cut_over(admin).await;
    assert!(done["cutover_pause_ms"].as_u64().unwrap() < 1000, "{done}");
    // The blocked worker's client is closed at the switch (its command's
    // fate is unknown, as when Redis goes away), not after the command
    // timeout (a minute here); it reconnects, on the target.
    assert!(worker.closed().await);
    let mut worker = Raw::connect(s.addr).await;
    let r = worker.call(&[b"LPUSH", b"jobs", b"j1"]).await;
    assert_eq!(&r[..], b":1\r\n");
    let mut dst = b.direct().await;
    for i in 0..10 {
        assert_eq!(get_in(&mut dst, 1, &format!("gone:{i}")).await, None);
    }
    assert_eq!(get_in(&mut dst, 1, "kept").await.as_deref(), Some("1"));
    s.shutdown().await;
}

/// Every type rebuilt from its contents (`"rebuild": "always"`, what a
/// target that refuses the source's DUMP payload gets) is what RESTORE
/// would have made: small keys byte-identical by DUMP (same Redis on both
/// sides), big ones equal in content, a stream with its ids, counters,
/// groups, consumers and pending entries (owner, delivery count). With
/// `max_restore_bytes` only the keys over it are rebuilt, in pieces; a
/// target that refuses RESTORE (here it has none) gets every key rebuilt
/// without being asked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_rebuilt_from_their_contents_match_the_source() {
    for mode in ["always", "big", "refused"] {
        let (a, b, s, admin) = if mode == "refused" {
            two_servers(RedisServer::start_with(&[
                "--rename-command",
                "RESTORE",
                "",
            ]))
            .await
        } else {
            two().await
        };
        let mut src = a.direct().await;
        let _: () = src.set_ex("str", "value", 600).await.unwrap();
        let _: () = src.set("empty", "").await.unwrap();
        let _: () = src.set("bin", vec![0u8, 13, 10, 255]).await.unwrap();
        let _: () = src.set("long", "x".repeat(3 << 20)).await.unwrap();
        let _: () = src
            .hset_multiple("h", &[("a", "1"), ("b", "2"), ("c", "3")])
            .await
            .unwrap();
        let _: () = src.rpush("l", &["x", "y", "z", "x"]).await.unwrap();
        let _: () = src.sadd("si", &[3, 1, 2]).await.unwrap();
        let _: () = src.sadd("ss", &["b", "a", "c"]).await.unwrap();
        let _: () = src
            .zadd_multiple("z", &[(1.5, "a"), (-2.0, "b"), (1e300, "c")])
            .await
            .unwrap();
        for i in 0..2500 {
            let _: () = src.hset("bh", format!("f{i}"), i).await.unwrap();
            let _: () = src.rpush("bl", i).await.unwrap();
            let _: () = src.sadd("bs", format!("m{i}")).await.unwrap();
            let _: () = src
                .zadd("bz", format!("m{i}"), i as f64 / 3.0)
                .await
                .unwrap();
        }
        let _: () = src.expire("bh", 3600).await.unwrap();
        // A stream: entries (one deleted), two groups, consumers with
        // pending entries, one acknowledged.
        let mut ids = Vec::new();
        for i in 0..10 {
            let id: String = q(&mut src, &format!("XADD st * n {} k v", i)).await;
            ids.push(id);
        }
        let _: i64 = q(&mut src, &format!("XDEL st {}", ids[9])).await;
        let _: () = q(&mut src, "XGROUP CREATE st g1 0").await;
        let _: () = q(&mut src, "XGROUP CREATE st g2 $").await;
        for (c, n) in [("c1", 3), ("c2", 2)] {
            let _: redis::Value = q(
                &mut src,
                &format!("XREADGROUP GROUP g1 {} COUNT {} STREAMS st >", c, n),
            )
            .await;
        }
        let _: i64 = q(&mut src, &format!("XACK st g1 {}", ids[3])).await;
        // Delivered twice: a claim by c2 of c1's first entry.
        let _: redis::Value = q(&mut src, &format!("XCLAIM st g1 c2 {} {}", 0, ids[0])).await;
        let _: () = q(&mut src, "XGROUP CREATECONSUMER st g2 idle").await;
        // A stream with no entry left, and its group.
        let id: String = q(&mut src, &format!("XADD st0 * a {}", 1)).await;
        let _: () = q(&mut src, "XGROUP CREATE st0 g $").await;
        let _: i64 = q(&mut src, &format!("XDEL st0 {}", id)).await;

        let body = if mode == "always" {
            r#"{"to": "b", "rebuild": "always"}"#
        } else {
            r#"{"to": "b", "max_restore_bytes": 1000}"#
        };
        start(admin, body).await;
        let done = cut_over(admin).await;
        println!("{mode}: {done}");
        let all = [
            "str", "empty", "bin", "long", "h", "l", "si", "ss", "z", "bh", "bl", "bs", "bz", "st",
            "st0",
        ];
        let want = if mode != "big" { all.len() as u64 } else { 5 };
        assert_eq!(done["keys_rebuilt"], want, "{mode}: {done}");
        let mut dst = b.direct().await;
        // Byte-identical where the encoding keeps an order (a set of
        // strings is a hash table here, ordered by each server's seed).
        for k in ["str", "empty", "bin", "long", "h", "l", "si", "z"] {
            assert_eq!(
                dump(&mut src, 0, k).await,
                dump(&mut dst, 0, k).await,
                "{mode}: {k}"
            );
        }
        for k in ["str", "bh"] {
            let (ts, td) = (pttl(&mut src, 0, k).await, pttl(&mut dst, 0, k).await);
            assert!(
                (ts - td).abs() <= 1000 && td > 0,
                "{mode}: {k} {ts} vs {td}"
            );
        }
        let sorted = |mut v: Vec<String>| {
            v.sort();
            v
        };
        for (k, cmd) in [("bh", "HGETALL"), ("bs", "SMEMBERS"), ("ss", "SMEMBERS")] {
            let x: Vec<String> = redis::cmd(cmd).arg(k).query_async(&mut src).await.unwrap();
            let y: Vec<String> = redis::cmd(cmd).arg(k).query_async(&mut dst).await.unwrap();
            if cmd == "HGETALL" {
                let pairs = |v: Vec<String>| sorted(v.chunks(2).map(|p| p.join("=")).collect());
                assert_eq!(pairs(x), pairs(y), "{mode}: {k}");
            } else {
                assert_eq!(sorted(x), sorted(y), "{mode}: {k}");
            }
        }
        let x: Vec<String> = src.lrange("bl", 0, -1).await.unwrap();
        let y: Vec<String> = dst.lrange("bl", 0, -1).await.unwrap();
        assert_eq!(x, y, "{mode}: bl");
        let x: Vec<(String, f64)> = src.zrange_withscores("bz", 0, -1).await.unwrap();
        let y: Vec<(String, f64)> = dst.zrange_withscores("bz", 0, -1).await.unwrap();
        assert_eq!(x, y, "{mode}: bz");
        for st in ["st", "st0"] {
            let cmds: Vec<Vec<String>> = vec![
                vec!["XRANGE".into(), st.into(), "-".into(), "+".into()],
                vec!["XINFO".into(), "STREAM".into(), st.into()],
                vec!["XINFO".into(), "GROUPS".into(), st.into()],
            ];
            for c in cmds {
                let mut x: redis::Value = redis::cmd(&c[0])
                    .arg(&c[1..])
                    .query_async(&mut src)
                    .await
                    .unwrap();
                let mut y: redis::Value = redis::cmd(&c[0])
                    .arg(&c[1..])
                    .query_async(&mut dst)
                    .await
                    .unwrap();
                if c[1] == "STREAM" {
                    // The radix tree's node counts follow the insertion pattern.
                    x = strip(x, &["radix-tree-keys", "radix-tree-nodes"]);
                    y = strip(y, &["radix-tree-keys", "radix-tree-nodes"]);
                }
                assert_eq!(x, y, "{mode}: {c:?}");
            }
        }
        for g in ["g1", "g2"] {
            let x: redis::Value = q(&mut src, &format!("XPENDING st {} - + {}", g, 100)).await;
            let y: redis::Value = q(&mut dst, &format!("XPENDING st {} - + {}", g, 100)).await;
            // id, consumer, idle (differs by the copy's time), deliveries.
            let norm = |v: redis::Value| match v {
                redis::Value::Array(items) => items
                    .into_iter()
                    .map(|e| match e {
                        redis::Value::Array(mut f) => {
                            f.remove(2);
                            redis::Value::Array(f)
                        }
                        other => other,
                    })
                    .collect::<Vec<_>>(),
                other => vec![other],
            };
            assert_eq!(norm(x), norm(y), "{mode}: XPENDING {g}");
            let cx: Vec<redis::Value> = q(&mut src, &format!("XINFO CONSUMERS st {}", g)).await;
            let cy: Vec<redis::Value> = q(&mut dst, &format!("XINFO CONSUMERS st {}", g)).await;
            assert_eq!(cx.len(), cy.len(), "{mode}: consumers of {g}");
        }
        s.shutdown().await;
    }
}

/// One command on `c` (its words separated by single spaces), its reply
/// converted (panics on an error).
async fn q<T: redis::FromRedisValue>(c: &mut redis::aio::MultiplexedConnection, line: &str) -> T {
    let args: Vec<&str> = line.split(' ').collect();
    redis::cmd(args[0])
        .arg(&args[1..])
        .query_async(c)
        .await
        .unwrap()
}

/// A flat map reply without the named fields.
fn strip(v: redis::Value, names: &[&str]) -> redis::Value {
    match v {
        redis::Value::Array(items) => {
            let mut out = Vec::new();
            for p in items.chunks(2) {
                let skip = matches!(&p[0], redis::Value::BulkString(k) if names.iter().any(|n| n.as_bytes() == &k[..]));
                if !skip {
                    out.extend(p.iter().cloned());
                }
            }
            redis::Value::Array(out)
        }
        other => other,
    }
}

/// The id of the migration's connection on `server` (`CLIENT LIST`).
async fn migration_conn(server: &RedisServer) -> Option<i64> {
    let mut c = server.direct().await;
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut c)
        .await
        .unwrap();
    list.lines()
        .find(|l| l.contains("name=redis-sidecar-migration"))
        .and_then(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .and_then(|id| id.parse().ok())
}

/// The source's connection lost mid-copy: the migration is aborted with
/// the reason, its tracking ends, and the app goes on on the source.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_source_aborts_the_migration() {
    let (a, _b, s, admin) = two().await;
    let mut src = a.direct().await;
    set_numbered(&mut src, 3000).await;
    start(admin, r#"{"to": "b", "max_keys_per_second": 1000}"#).await;
    let id = loop {
        if let Some(id) = migration_conn(&a).await {
            break id;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(id)
        .query_async(&mut src)
        .await
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let m = loop {
        let m = migration(admin).await;
        if m["phase"] == "aborted" {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(
        m["reason"]
            .as_str()
            .unwrap()
            .contains("the source was lost"),
        "{m}"
    );
    assert!(!s.control.policies.current().names().contains(&"migration"));
    assert_eq!(active(&s).await, "a");
    let mut app = client(&s).await;
    let _: () = app.set("after", 1).await.unwrap();
    let v: String = app.get("k:7").await.unwrap();
    assert_eq!(v, "7");
    s.shutdown().await;
}

/// The target restarted mid-copy (without its data): the migration pauses
/// while it is away, copies every key again once it is back, and cuts
/// over with every key and every INCR the app was told succeeded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_restarts_pauses_the_migration_and_it_resumes() {
    let (a, mut b, s, admin) = two().await;
    let mut src = a.direct().await;
    set_numbered(&mut src, 2000).await;
    start(admin, r#"{"to": "b", "max_keys_per_second": 1000}"#).await;
    let stop = Arc::new(AtomicBool::new(false));
    let app = {
        let (stop, url) = (stop.clone(), url(&s));
        tokio::spawn(async move {
            let client = redis::Client::open(url).unwrap();
            let mut c = client.get_multiplexed_async_connection().await.unwrap();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _: i64 = c.incr("counter", 1).await.unwrap();
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let port = b.port;
    b.kill();
    assert!(
        eventually(|| async {
            migration(admin).await["reason"]
                .as_str()
                .is_some_and(|r| r.starts_with("paused"))
        })
        .await,
        "{}",
        migration(admin).await
    );
    assert_eq!(migration(admin).await["phase"], "copying");
    let b2 = RedisServer::start_on(port, &[]).unwrap();
    let synced = wait_phase(admin, "syncing").await;
    println!("resumed: {synced}");
    let (st, resp) = post(admin, "/migrations/current/cutover").await;
    assert_eq!(st, 200, "{resp}");
    wait_phase(admin, "done").await;
    stop.store(true, Ordering::Relaxed);
    let incrs = app.await.unwrap();
    let mut dst = b2.direct().await;
    for i in (0..2000).step_by(7) {
        let v: Option<String> = dst.get(format!("k:{i}")).await.unwrap();
        assert_eq!(v, Some(i.to_string()), "k:{i} on the restarted target");
    }
    let n: i64 = dst.get("counter").await.unwrap();
    assert_eq!(n as u64, incrs, "every acknowledged INCR");
    let size: i64 = redis::cmd("DBSIZE").query_async(&mut dst).await.unwrap();
    assert_eq!(size, 2001);
    s.shutdown().await;
}

/// Writes through one sidecar until `stop`: INCRs of `c:<tag>` and a SET
/// of `k:<tag>:<n>` each round; answers how many of each succeeded and the
/// errors seen.
fn app_writes(
    s: &redis_sidecar::Sidecar,
    tag: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(u64, Vec<String>)> {
    let url = url(s);
    tokio::spawn(async move {
        let mut c = redis::Client::open(url)
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let (mut n, mut errors) = (0u64, Vec::new());
        while !stop.load(Ordering::Relaxed) {
            let r: redis::RedisResult<()> = redis::pipe()
                .cmd("INCR")
                .arg(format!("c:{tag}"))
                .ignore()
                .cmd("SET")
                .arg(format!("k:{tag}:{n}"))
                .arg(n)
                .ignore()
                .query_async(&mut c)
                .await;
            match r {
                Ok(()) => n += 1,
                Err(e) => errors.push(e.to_string()),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        (n, errors)
    })
}

/// Three sidecars in front of one Redis, each carrying writes: the one
/// asked leads, the others (one started during the migration) follow it
/// from its record on the source, mark and hold their own writes, and
/// switch with it, to the target and back at the rollback; every write
/// through any of them is on the source afterwards (copied, copied back),
/// the counters exact, no error seen. A follower refuses to lead (409, naming
/// the leader), and the record and the followers' keys are never copied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_in_front_of_one_source_cut_over_together() {
    let (a, b, s, admin) = two().await;
    let mut src = a.direct().await;
    set_numbered(&mut src, 2000).await;
    let peer = || {
        sidecar_with(
            config_multi(&[("a", a.url()), ("b", b.url())]),
            redis_sidecar::policy::Builder::default(),
        )
    };
    let f = peer().await;
    wait_up(&f, 1).await;
    let f_admin = f.admin_addr.unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let w_s = app_writes(&s, "s", stop.clone());
    let w_f = app_writes(&f, "f", stop.clone());
    start(admin, r#"{"to": "b", "max_keys_per_second": 4000}"#).await;
    wait_phase(admin, "syncing").await;
    let name =
        |x: &redis_sidecar::Sidecar| String::from_utf8_lossy(&x.control.ups.instance).to_string();
    assert!(
        eventually(|| async { migration(f_admin).await["kind"] == "follower" }).await,
        "{}",
        migration(f_admin).await
    );
    let fm = migration(f_admin).await;
    assert_eq!(fm["leader"], name(&s), "{fm}");
    // The leader's phase, as its record says (refreshed twice a second).
    assert!(
        eventually(|| async { migration(f_admin).await["phase"] == "syncing" }).await,
        "{}",
        migration(f_admin).await
    );
    let (st, body) = post(f_admin, "/migrations/current/cutover").await;
    assert_eq!(st, 409, "{body}");
    assert!(body.contains(&name(&s)), "{body}");
    // Started during the migration: it joins before taking clients.
    let late = peer().await;
    wait_up(&late, 1).await;
    let late_admin = late.admin_addr.unwrap();
    assert_eq!(migration(late_admin).await["kind"], "follower");
    let w_late = app_writes(&late, "late", stop.clone());
    assert!(
        eventually(|| async {
            let f = migration(admin).await["followers"].to_string();
            f.contains(&name(&late))
        })
        .await,
        "{}",
        migration(admin).await
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let m = cut_over(admin).await;
    assert!(
        m["reason"].as_str().unwrap().contains("switched to b"),
        "{m}"
    );
    for x in [&f, &late] {
        assert!(
            eventually(|| async { active(x).await == "b" }).await,
            "a follower did not switch"
        );
    }
    // Writes go on through all three, now to b, and are copied back to a.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut on_b = std::collections::HashMap::new();
    for tag in ["s", "f", "late"] {
        let c: u64 = b.direct().await.get(format!("c:{tag}")).await.unwrap();
        on_b.insert(tag, c);
    }
    // The rollback takes every sidecar back to a, with what they wrote.
    let (st, body) = post(admin, "/migrations/current/rollback").await;
    assert_eq!(st, 200, "{body}");
    wait_phase(admin, "rolled_back").await;
    for x in [&f, &late] {
        assert!(
            eventually(|| async { active(x).await == "a" }).await,
            "a follower did not switch back"
        );
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    for (tag, w) in [("s", w_s), ("f", w_f), ("late", w_late)] {
        let (n, errors) = w.await.unwrap();
        assert!(errors.is_empty(), "{tag}: {errors:?}");
        assert!(
            n > on_b[tag],
            "{tag}: {n} writes, {} before the rollback",
            on_b[tag]
        );
        let c: u64 = src.get(format!("c:{tag}")).await.unwrap();
        assert_eq!(c, n, "the counter of {tag}");
        for i in (0..n).step_by(7) {
            let v: Option<u64> = src.get(format!("k:{tag}:{i}")).await.unwrap();
            assert_eq!(v, Some(i), "k:{tag}:{i}");
        }
    }
    let mut dst = b.direct().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("{redis-sidecar}*")
        .query_async(&mut dst)
        .await
        .unwrap();
    assert!(keys.is_empty(), "the fleet's keys copied: {keys:?}");
    for x in [f_admin, late_admin] {
        assert!(
            eventually(|| async { migration(x).await["phase"] == "rolled_back" }).await,
            "{}",
            migration(x).await
        );
    }
    late.shutdown().await;
    f.shutdown().await;
    s.shutdown().await;
}

/// `"rebuild": "never"`: a target that refuses RESTORE fails the migration
/// with Redis's reason instead of getting the key rebuilt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_never_fails_on_a_refused_restore() {
    let (a, _b, s, admin) = two_servers(RedisServer::start_with(&[
        "--rename-command",
        "RESTORE",
        "",
    ]))
    .await;
    let _: () = a.direct().await.set("k", "v").await.unwrap();
    start(admin, r#"{"to": "b", "rebuild": "never"}"#).await;
    let m = wait_phase(admin, "failed").await;
    assert!(
        m["reason"].as_str().unwrap().contains("unknown command"),
        "{m}"
    );
    assert_eq!(m["keys_rebuilt"], 0, "{m}");
    s.shutdown().await;
}

/// Two sidecars in front of one source asked for a migration at once
/// (before the second could see the first's record): the first leads,
/// the second's fails saying so, and the second follows the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_first_of_two_sidecars_asked_leads() {
    let (a, b, s, admin) = two().await;
    let f = sidecar_with(
        config_multi(&[("a", a.url()), ("b", b.url())]),
        redis_sidecar::policy::Builder::default(),
    )
    .await;
    wait_up(&f, 1).await;
    let f_admin = f.admin_addr.unwrap();
    start(admin, r#"{"to": "b", "other_sidecars": "ignore"}"#).await;
    // The first one's record is on the source (its task writes it just
    // after answering 202) before the second is asked.
    assert!(eventually(|| async { a.has_migration_record().await }).await);
    let (st, body) = http_json(f_admin, "POST", "/migrations", r#"{"to": "b"}"#).await;
    if st == 202 {
        assert!(
            eventually(|| async {
                let m = migration(f_admin).await;
                m["kind"] == "follower"
                    || (m["phase"] == "failed"
                        && m["reason"]
                            .as_str()
                            .is_some_and(|r| r.contains("leads a migration")))
            })
            .await,
            "{}",
            migration(f_admin).await
        );
    } else {
        // It followed already.
        assert_eq!(st, 409, "{body}");
    }
    let leader = String::from_utf8_lossy(&s.control.ups.instance).to_string();
    assert!(
        eventually(|| async { migration(f_admin).await["leader"] == leader.as_str() }).await,
        "{}",
        migration(f_admin).await
    );
    assert_eq!(migration(admin).await["kind"], "migration");
    let (st, _) = post(admin, "/migrations/current/abort").await;
    assert_eq!(st, 200);
    f.shutdown().await;
    s.shutdown().await;
}
