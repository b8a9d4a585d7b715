//! Failover between upstream endpoints, with real redis-server processes:
//! kill -9 of the active endpoint under write load, failback (automatic and
//! manual), live switching with `activate` and reloads under load.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use redis_sidecar::config::{Config, Failback};
use redis_sidecar::policy::Builder;
use support::*;

/// What one writer saw for one command.
struct Outcome {
    at: Instant,
    key: String,
    ok: bool,
}

/// Write `fo:{id}:{i}` = `v{i}` through the sidecar until `stop`, each write
/// followed by an ECHO whose reply must be its own argument (a misrouted
/// reply fails the test at once). `acked` counts the writers that have had
/// a write acknowledged.
async fn writer(
    s: std::net::SocketAddr,
    id: usize,
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicUsize>,
) -> Vec<Outcome> {
    let mut conn = redis::Client::open(format!("redis://{s}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let mut out = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let key = format!("fo:{id}:{i}");
        let r: redis::RedisResult<String> = conn.set(&key, format!("v{i}")).await;
        if let Ok(v) = &r {
            assert_eq!(v, "OK", "SET {key} got {v:?}");
            if !out.iter().any(|o: &Outcome| o.ok) {
                acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        out.push(Outcome {
            at: Instant::now(),
            key,
            ok: r.is_ok(),
        });
        let tag = format!("echo-{id}-{i}");
        let e: redis::RedisResult<String> =
            redis::cmd("ECHO").arg(&tag).query_async(&mut conn).await;
        if let Ok(v) = e {
            assert_eq!(v, tag, "a reply reached the wrong request");
        }
        i += 1;
        if r.is_err() {
            // Do not spin while the sidecar reports no upstream.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    out
}

async fn dbsize(c: &mut redis::aio::MultiplexedConnection) -> usize {
    redis::cmd("DBSIZE").query_async(c).await.unwrap()
}

fn fast_failover(cfg: &mut Config) {
    cfg.failover.check_interval = Duration::from_millis(100);
    cfg.failover.check_timeout = Duration::from_millis(200);
    cfg.failover.failures_before_down = std::num::NonZeroUsize::new(2).unwrap();
}

/// Kill -9 the active endpoint while 6 clients write; returns the time from
/// the kill to the first write acknowledged by the next endpoint.
async fn kill_active_under_writes(tune: fn(&mut Config)) -> Duration {
    // AOF with fsync always: writes A acknowledged survive the kill, so
    // they can be checked after a restart.
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut a = RedisServer::start_with(&aof);
    let b = RedisServer::start();
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    tune(&mut cfg);
    let s = sidecar_with(cfg, Builder::default()).await;
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let writers: Vec<_> = (0..6)
        .map(|id| tokio::spawn(writer(s.addr, id, stop.clone(), acked.clone())))
        .collect();
    // Every writer has had a write acknowledged by A (with fsync always on
    // a busy machine that can take a while), then a little more load.
    assert!(
        eventually(|| async { acked.load(Ordering::Relaxed) == 6 }).await,
        "the writers never got a write through to the first endpoint"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    let killed_at = Instant::now();
    a.kill();
    // Let the writers run on B for a while after the switch.
    let mut bconn = b.direct().await;
    assert!(
        eventually(|| {
            let mut c = bconn.clone();
            async move {
                let n: usize = dbsize(&mut c).await;
                n > 0
            }
        })
        .await,
        "no write reached the second endpoint"
    );
    tokio::time::sleep(Duration::from_millis(1000)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for w in writers {
        all.push(w.await.unwrap());
    }
    // Restart A from its AOF to see what it acknowledged.
    let a2 = RedisServer::start_on(a.port, &aof).unwrap();
    let mut aconn = a2.direct().await;
    // Redis answers -LOADING while it replays its AOF.
    assert!(
        eventually(|| {
            let mut c = aconn.clone();
            async move { c.exists::<_, bool>("x").await.is_ok() }
        })
        .await,
        "the restarted endpoint never finished loading"
    );
    let mut first_on_b: Option<Instant> = None;
    for outcomes in &all {
        assert!(outcomes.iter().any(|o| o.ok && o.at < killed_at));
        let mut seen_ok_on_b = false;
        for o in outcomes {
            if !o.ok {
                // An error after this writer's first success on B means a
                // client saw a failure once the next endpoint served.
                assert!(
                    !seen_ok_on_b,
                    "{} failed after writes were already served by the next endpoint",
                    o.key
                );
                continue;
            }
            let on_a: bool = aconn.exists(&o.key).await.unwrap();
            let on_b: bool = bconn.exists(&o.key).await.unwrap();
            assert!(
                on_a ^ on_b,
                "acknowledged write {} is on a: {on_a}, on b: {on_b}",
                o.key
            );
            if on_b {
                assert!(o.at > killed_at, "{} on b before the kill", o.key);
                seen_ok_on_b = true;
                first_on_b = Some(first_on_b.map_or(o.at, |f| f.min(o.at)));
            } else {
                assert!(!seen_ok_on_b, "{} acknowledged by a after b served", o.key);
            }
        }
        assert!(seen_ok_on_b, "a writer never reached the next endpoint");
    }
    assert_eq!(active(&s).await, "b");
    let metrics = http_get(s.admin_addr.unwrap(), "/metrics").await.1;
    assert!(
        metrics.contains(r#"redis_sidecar_failovers_total{from="a",reason="down",to="b"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"redis_sidecar_upstream_active{upstream="b"} 1"#));
    s.shutdown().await;
    first_on_b.unwrap() - killed_at
}

#[tokio::test]
async fn kill_active_with_default_settings_fails_over_within_3s() {
    let took = kill_active_under_writes(|_| {}).await;
    println!(
        "default settings: kill -9 -> first write acknowledged by the next endpoint: {took:?}"
    );
    assert!(took <= Duration::from_secs(3), "took {took:?}");
}

#[tokio::test]
async fn kill_active_with_fast_checks_fails_over_within_1s() {
    let took = kill_active_under_writes(fast_failover).await;
    println!(
        "check_interval 100ms, check_timeout 200ms, failures_before_down 2: kill -9 -> first write acknowledged by the next endpoint: {took:?}"
    );
    assert!(took < Duration::from_secs(1), "took {took:?}");
}

async fn set_through(s: &redis_sidecar::Sidecar, key: &str) {
    let mut c = client(s).await;
    let _: () = c.set(key, "x").await.unwrap();
}

#[tokio::test]
async fn automatic_failback_after_the_configured_time() {
    let mut a = RedisServer::start();
    let b = RedisServer::start();
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    fast_failover(&mut cfg);
    cfg.failover.failback_after = Duration::from_secs(1);
    let s = sidecar_with(cfg, Builder::default()).await;
    set_through(&s, "k1").await;
    let port = a.port;
    a.kill();
    assert!(eventually(|| async { active(&s).await == "b" }).await);
    set_through(&s, "k2").await;
    let mut bconn = b.direct().await;
    assert!(bconn.exists::<_, bool>("k2").await.unwrap());
    let a2 = RedisServer::start_on(port, &[]).unwrap();
    let back = Instant::now();
    assert!(eventually(|| async { active(&s).await == "a" }).await);
    // Up after 2 good checks, then 1 s of failback_after.
    assert!(back.elapsed() >= Duration::from_secs(1));
    set_through(&s, "k3").await;
    let mut aconn = a2.direct().await;
    assert!(aconn.exists::<_, bool>("k3").await.unwrap());
    let u = upstreams(&s).await;
    assert_eq!(u["last_switch"]["reason"], "failback");
    assert_eq!(u["last_switch"]["from"], "b");
    // An operator's choice holds against automatic failback.
    let (st, body) = http(s.admin_addr.unwrap(), "POST", "/upstreams/b/activate", None).await;
    assert_eq!(st, 200, "{body}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(active(&s).await, "b", "failback undid a manual activate");
    s.shutdown().await;
}

#[tokio::test]
async fn manual_failback_waits_for_activate() {
    let mut a = RedisServer::start();
    let b = RedisServer::start();
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    fast_failover(&mut cfg);
    cfg.failover.failback = Failback::Manual;
    cfg.failover.failback_after = Duration::from_millis(200);
    cfg.admin_token = "t0ken".into();
    let s = sidecar_with(cfg, Builder::default()).await;
    let admin = s.admin_addr.unwrap();
    let port = a.port;
    a.kill();
    assert!(eventually(|| async { active(&s).await == "b" }).await);
    let a2 = RedisServer::start_on(port, &[]).unwrap();
    assert!(eventually(|| async { upstreams(&s).await["upstreams"][0]["health"] == "up" }).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(active(&s).await, "b", "manual failback moved by itself");
    // Changing state needs the token.
    let (st, body) = http(admin, "POST", "/upstreams/a/activate", None).await;
    assert_eq!(st, 401, "{body}");
    let (st, _) = http(admin, "POST", "/upstreams/a/activate", Some("wrong")).await;
    assert_eq!(st, 401);
    let (st, body) = http(admin, "POST", "/upstreams/nope/activate", Some("t0ken")).await;
    assert_eq!(st, 404, "{body}");
    let (st, body) = http(admin, "POST", "/upstreams/a/activate", Some("t0ken")).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(active(&s).await, "a");
    set_through(&s, "after-activate").await;
    let mut aconn = a2.direct().await;
    assert!(aconn.exists::<_, bool>("after-activate").await.unwrap());
    assert_eq!(upstreams(&s).await["last_switch"]["reason"], "manual");
    s.shutdown().await;
}

/// Writers that must never see an error or lose their connection.
async fn steady_writer(s: std::net::SocketAddr, id: usize, stop: Arc<AtomicBool>) -> usize {
    let outcomes = writer(s, id, stop, Arc::default()).await;
    let failed: Vec<&str> = outcomes
        .iter()
        .filter(|o| !o.ok)
        .map(|o| o.key.as_str())
        .collect();
    assert!(failed.is_empty(), "writer {id}: errors for {failed:?}");
    outcomes.len()
}

#[tokio::test]
async fn activate_and_reload_under_load_drop_nothing() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecar-reload-{}-{}", a.port, b.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let write_config = |order: &[(&str, &RedisServer)], extra: &str| {
        let head = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\nadmin_token = \"${{RELOAD_TEST_TOKEN}}\"\n{extra}"
        );
        write_config(&file, &head, order);
    };
    write_config(&[("a", &a), ("b", &b)], "");
    let env = |n: &str| (n == "RELOAD_TEST_TOKEN").then(|| "tok".to_string());
    let load = {
        let file = file.clone();
        move || -> anyhow::Result<Config> {
            let text = std::fs::read_to_string(&file)?;
            Ok(Config::from_toml(&text, &env)?)
        }
    };
    let v = load().unwrap().validate().unwrap();
    let s = redis_sidecar::Sidecar::start_with(v, Builder::default(), Some(Arc::new(load)))
        .await
        .unwrap();
    let admin = s.admin_addr.unwrap();
    // A pinned client: a subscriber holds state on the old endpoint.
    let mut sub = Raw::connect(s.addr).await;
    sub.call(&[b"SUBSCRIBE", b"news"]).await;
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = (0..4)
        .map(|id| tokio::spawn(steady_writer(s.addr, id, stop.clone())))
        .collect();
    let mut aconn = a.direct().await;
    assert!(
        eventually(|| {
            let mut c = aconn.clone();
            async move { dbsize(&mut c).await > 0 }
        })
        .await,
        "no write reached a"
    );

    // Switch by hand: in-flight requests finish on a, the rest go to b.
    let (st, body) = http(admin, "POST", "/upstreams/b/activate", Some("tok")).await;
    assert_eq!(st, 200, "{body}");
    // The subscriber was pinned to a: it is disconnected, as documented.
    assert!(
        sub.closed().await,
        "pinned subscriber kept its old connection"
    );
    let bconn = b.direct().await;
    assert!(
        eventually(|| {
            let mut c = bconn.clone();
            async move { dbsize(&mut c).await > 0 }
        })
        .await,
        "no write reached b after activate"
    );

    // Reload with b removed: the sidecar moves to a (reason "reload").
    write_config(&[("a", &a)], "");
    let (st, body) = http(admin, "POST", "/reload", Some("tok")).await;
    assert_eq!(st, 200, "{body}");
    assert_eq!(active(&s).await, "a");
    let before: usize = dbsize(&mut aconn).await;
    assert!(
        eventually(|| {
            let mut c = aconn.clone();
            async move { dbsize(&mut c).await > before }
        })
        .await,
        "writes did not move to a after the reload"
    );

    // A broken config is refused as a whole; a keeps serving.
    write_config(
        &[("a", &a), ("b", &b)],
        "[failover]\ncheck_interval = \"soon\"\n",
    );
    let (st, body) = http(admin, "POST", "/reload", Some("tok")).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("check_interval"), "{body}");
    write_config(&[("a", &a), ("b", &b)], "threads = 2\n");
    let (st, body) = http(admin, "POST", "/reload", Some("tok")).await;
    assert_eq!(st, 400, "{body}");
    assert!(body.contains("without a restart: threads"), "{body}");
    let u = upstreams(&s).await;
    assert_eq!(u["upstreams"].as_array().unwrap().len(), 1);
    assert_eq!(u["active"], "a");

    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let mut total = 0;
    for w in writers {
        total += w.await.unwrap();
    }
    assert!(total > 100, "only {total} writes");
    let metrics = http_get(admin, "/metrics").await.1;
    assert!(
        metrics.contains(r#"redis_sidecar_config_reloads_total{result="ok"} 1"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"redis_sidecar_config_reloads_total{result="error"} 2"#));
    assert!(
        metrics.contains(r#"redis_sidecar_failovers_total{from="a",reason="manual",to="b"} 1"#)
    );
    assert!(
        metrics.contains(r#"redis_sidecar_failovers_total{from="b",reason="reload",to="a"} 1"#)
    );
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn hostname_endpoint_and_url_db_and_redaction() {
    let r = RedisServer::start_with(&["--requirepass", "sekrit-pw"]);
    let b = RedisServer::start();
    let url = format!("redis://:sekrit-pw@localhost:{}/3", r.port);
    let s = sidecar_with(
        config_multi(&[("main", url), ("spare", b.url())]),
        Builder::default(),
    )
    .await;
    let mut c = client(&s).await;
    let _: () = c.set("in-db-3", "1").await.unwrap();
    let mut d = r.direct().await;
    let _: () = redis::cmd("SELECT")
        .arg(3)
        .query_async(&mut d)
        .await
        .unwrap();
    assert!(d.exists::<_, bool>("in-db-3").await.unwrap());
    // An explicit SELECT 0 means db 0, not the URL's db.
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(&raw.call(&[b"SELECT", b"0"]).await[..], b"+OK\r\n");
    assert_eq!(&raw.call(&[b"SET", b"in-db-0", b"1"]).await[..], b"+OK\r\n");
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut d)
        .await
        .unwrap();
    assert!(d.exists::<_, bool>("in-db-0").await.unwrap());
    // The password is nowhere in the admin output.
    assert!(eventually(|| async { upstreams(&s).await["upstreams"][1]["health"] == "up" }).await);
    let (_, body) = http_get(s.admin_addr.unwrap(), "/upstreams").await;
    assert!(body.contains("redis://:***@localhost:"), "{body}");
    let (_, metrics) = http_get(s.admin_addr.unwrap(), "/metrics").await;
    for text in [&body, &metrics] {
        assert!(!text.contains("sekrit"), "{text}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn dead_first_endpoint_at_start_and_a_replica_are_skipped() {
    // "a" is dead from the start; "r" is a replica (ROLE says so); "m" is
    // the primary. A request sent at once waits for the failover (defaults:
    // about 1 s) instead of failing, and lands on m.
    let mut dead = RedisServer::start();
    let dead_url = dead.url();
    dead.kill();
    let m = RedisServer::start();
    let mport = m.port.to_string();
    let r = RedisServer::start_with(&["--replicaof", "127.0.0.1", &mport]);
    let cfg = config_multi(&[("a", dead_url), ("r", r.url()), ("m", m.url())]);
    let s = sidecar_with(cfg, Builder::default()).await;
    let started = Instant::now();
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(&raw.call(&[b"SET", b"first", b"1"]).await[..], b"+OK\r\n");
    let waited = started.elapsed();
    assert!(waited < Duration::from_secs(2), "waited {waited:?}");
    let mut mconn = m.direct().await;
    assert!(mconn.exists::<_, bool>("first").await.unwrap());
    let u = upstreams(&s).await;
    assert_eq!(u["active"], "m");
    assert_eq!(u["upstreams"][1]["health"], "down");
    let why = u["upstreams"][1]["last_error"].as_str().unwrap();
    assert!(why.contains("slave"), "{why}");
    // Activating a down endpoint is refused.
    let admin = s.admin_addr.unwrap();
    let (st, body) = http(admin, "POST", "/upstreams/r/activate", None).await;
    assert_eq!(st, 409, "{body}");
    assert_eq!(active(&s).await, "m");
    s.shutdown().await;
}

#[tokio::test]
async fn no_reachable_endpoint_fails_requests_clearly_after_the_queue_timeout() {
    let mut a = RedisServer::start();
    let url = a.url();
    a.kill();
    let mut cfg = config_multi(&[("a", url)]);
    cfg.timeouts.queue = Duration::from_millis(300);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut raw = Raw::connect(s.addr).await;
    let started = Instant::now();
    let reply = raw.call(&[b"SET", b"k", b"v"]).await;
    let text = String::from_utf8_lossy(&reply);
    assert!(text.starts_with("-ERR upstream unavailable: "), "{text}");
    assert!(text.contains("connect to 127.0.0.1:"), "{text}");
    assert!(started.elapsed() >= Duration::from_millis(300));
    // The client keeps its connection.
    let reply = raw.call(&[b"PING"]).await;
    assert!(reply.starts_with(b"-ERR upstream unavailable"), "{reply:?}");
    let (status, _) = http_get(s.admin_addr.unwrap(), "/readyz").await;
    assert_eq!(status, 503);
    s.shutdown().await;
}

/// `carry_writes`: what the app writes while the fallback is active is
/// recorded, and before the automatic failback it is copied to the
/// recovered endpoint (new keys, changed keys, deleted keys, a key a
/// script wrote without declaring it), held and cut over like a live
/// migration; what nobody wrote during the outage keeps the primary's
/// value. Without the setting those writes stay on the fallback.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failback_carries_the_writes_made_on_the_fallback() {
    let aof = ["--appendonly", "yes", "--appendfsync", "always"];
    let mut a = RedisServer::start_with(&aof);
    let b = RedisServer::start();
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    fast_failover(&mut cfg);
    cfg.failover.failback_after = Duration::from_secs(1);
    cfg.failover.carry_writes = true;
    let s = sidecar_with(cfg, Builder::default()).await;
    let admin = s.admin_addr.unwrap();
    let mut c = client(&s).await;
    for (k, v) in [("before", "a"), ("shared", "old"), ("gone", "x")] {
        let _: () = c.set(k, v).await.unwrap();
    }
    let port = a.port;
    a.kill();
    assert!(eventually(|| async { active(&s).await == "b" }).await);
    let (st, body) = http_get(admin, "/migrations/current").await;
    assert_eq!(st, 200, "{body}");
    let m: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["phase"], "recording", "{m}");
    assert_eq!(m["kind"], "failback_carry", "{m}");
    // The outage: the app goes on, on b.
    let mut c = client(&s).await;
    let _: () = c.set("during", "b").await.unwrap();
    let _: () = c.set("shared", "new").await.unwrap();
    let _: () = c.del("gone").await.unwrap();
    for _ in 0..10 {
        let _: i64 = c.incr("counter", 1).await.unwrap();
    }
    let _: () = redis::cmd("EVAL")
        .arg("redis.call('SET', ARGV[1], 'job') return 1")
        .arg(0)
        .arg("bull:q:1")
        .query_async::<i64>(&mut c)
        .await
        .map(drop)
        .unwrap();
    let a2 = RedisServer::start_on(port, &aof).unwrap();
    let mut direct_a = a2.direct().await;
    let v: Option<String> = direct_a.get("before").await.unwrap();
    assert_eq!(v.as_deref(), Some("a"), "a came back with its data");
    assert!(
        eventually(|| async {
            active(&s).await == "a"
                && http_get(admin, "/migrations/current")
                    .await
                    .1
                    .contains("\"phase\":\"done\"")
        })
        .await,
        "{}",
        http_get(admin, "/migrations/current").await.1
    );
    println!("carry: {}", http_get(admin, "/migrations/current").await.1);
    for (k, want) in [
        ("during", Some("b")),
        ("shared", Some("new")),
        ("gone", None),
        ("counter", Some("10")),
        ("bull:q:1", Some("job")),
        ("before", Some("a")),
    ] {
        let v: Option<String> = direct_a.get(k).await.unwrap();
        assert_eq!(v.as_deref(), want, "{k} on a after the failback");
    }
    let u = upstreams(&s).await;
    assert_eq!(u["last_switch"]["reason"], "failback", "{u}");
    // After it, writes go to a, and the recording stopped.
    let _: () = c.set("after", 1).await.unwrap();
    let v: Option<String> = direct_a.get("after").await.unwrap();
    assert_eq!(v.as_deref(), Some("1"));
    assert!(!s.control.policies.current().names().contains(&"migration"));
    s.shutdown().await;
}

/// `a` (killed) and `b` behind a sidecar with `carry_writes`, failed over
/// to `b`, which took a write of `during`; `a`'s port to start it again.
async fn outage_with_carry() -> (
    RedisServer,
    redis_sidecar::Sidecar,
    std::net::SocketAddr,
    u16,
) {
    let mut a = RedisServer::start();
    let b = RedisServer::start();
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    fast_failover(&mut cfg);
    cfg.failover.failback_after = Duration::from_millis(200);
    cfg.failover.carry_writes = true;
    let s = sidecar_with(cfg, Builder::default()).await;
    let admin = s.admin_addr.unwrap();
    let port = a.port;
    a.kill();
    assert!(eventually(|| async { active(&s).await == "b" }).await);
    set_through(&s, "during").await;
    (b, s, admin, port)
}

/// A recording carry can be aborted: the failback then happens as without
/// `carry_writes`, leaving the fallback's writes there; a carry cannot be
/// cut over by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_aborted_carry_fails_back_without_the_writes() {
    let (_b, s, admin, port) = outage_with_carry().await;
    let (st, body) = http(admin, "POST", "/migrations/current/cutover", None).await;
    assert_eq!(st, 409, "{body}");
    let (st, body) = http(admin, "POST", "/migrations/current/abort", None).await;
    assert_eq!(st, 200, "{body}");
    let (_, body) = http_get(admin, "/migrations/current").await;
    assert!(body.contains("\"phase\":\"aborted\""), "{body}");
    let a2 = RedisServer::start_on(port, &[]).unwrap();
    assert!(eventually(|| async { active(&s).await == "a" }).await);
    let mut direct_a = a2.direct().await;
    assert!(!direct_a.exists::<_, bool>("during").await.unwrap());
    s.shutdown().await;
}

/// A carry that cannot finish (here the recovered endpoint has neither
/// RESTORE nor DEL, so a key can be neither restored nor rebuilt) goes
/// back to `recording` with the reason and the failback waits: the app
/// stays on the fallback, whose writes would otherwise be stranded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_carry_holds_the_failback() {
    let (_b, s, admin, port) = outage_with_carry().await;
    let _a2 = RedisServer::start_on(
        port,
        &[
            "--rename-command",
            "RESTORE",
            "",
            "--rename-command",
            "DEL",
            "",
        ],
    )
    .unwrap();
    assert!(
        eventually(|| async {
            http_get(admin, "/migrations/current")
                .await
                .1
                .contains("the carry failed")
        })
        .await,
        "{}",
        http_get(admin, "/migrations/current").await.1
    );
    let (_, body) = http_get(admin, "/migrations/current").await;
    assert!(body.contains("\"phase\":\"recording\""), "{body}");
    assert!(body.contains("unknown command"), "{body}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(active(&s).await, "b", "failed back without the writes");
    s.shutdown().await;
}

/// A user that may not run CLIENT (an ACL without it) can still be the
/// URL's user: the health check's CLIENT SETNAME is refused, and the
/// connection is used unnamed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_client_setname_still_connects() {
    let r = RedisServer::start_with(&[
        "--user",
        "limited",
        "on",
        ">lim-pw-3",
        "~*",
        "&*",
        "+@all",
        "-client",
    ]);
    let url = format!("redis://limited:lim-pw-3@127.0.0.1:{}", r.port);
    let s = sidecar_with(config(&url), Builder::default()).await;
    wait_up(&s, 0).await;
    set_through(&s, "limited-key").await;
    let mut c = client(&s).await;
    let v: String = c.get("limited-key").await.unwrap();
    assert_eq!(v, "x");
    s.shutdown().await;
}
