//! TTL policies against a real redis-server: every write family, RESP2 and
//! RESP3, pipelined and inside MULTI/EXEC/WATCH. The client's replies are
//! compared byte for byte with the same script sent to Redis directly (a
//! second server without the sidecar); `PTTL` of each key afterwards must
//! match its rule.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::AsyncCommands;
use redis_sidecar::config::{Config, RuleMode, TtlRule};

use support::*;

const DEFAULT: i64 = 100_000;
const MAX: i64 = 200_000;

fn rule(pattern: &str, default: Option<i64>, max: Option<i64>, mode: RuleMode) -> TtlRule {
    TtlRule {
        pattern: pattern.into(),
        name: None,
        default: default.map(|ms| Duration::from_millis(ms as u64)),
        max: max.map(|ms| Duration::from_millis(ms as u64)),
        mode,
        sweep_rate: None,
        sweep_every: Duration::from_secs(600),
    }
}

fn rules() -> Vec<TtlRule> {
    vec![
        rule("sess:*", Some(DEFAULT), Some(MAX), RuleMode::Enforce),
        rule("max:*", None, Some(50_000), RuleMode::Enforce),
        rule("def:*", Some(30_000), None, RuleMode::Enforce),
        rule("bull:*", None, None, RuleMode::Enforce),
        rule("obs:*", Some(40_000), Some(40_000), RuleMode::Observe),
        rule("[xy]ey:\\*", Some(60_000), None, RuleMode::Enforce),
    ]
}

fn with_rules(url: &str) -> Config {
    let mut c = config(url);
    c.ttl = rules();
    c
}

/// Send the whole script in one write (pipelined), then read one reply per
/// command.
async fn run(addr: std::net::SocketAddr, script: &[Vec<Vec<u8>>]) -> Vec<Vec<u8>> {
    let mut c = Raw::connect(addr).await;
    let mut batch = Vec::new();
    for cmd in script {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(cmd));
    }
    c.send(&batch).await;
    let mut out = Vec::new();
    for _ in script {
        out.push(normalize_hello_id(&c.read().await));
    }
    out
}

fn cmd(s: &str) -> Vec<Vec<u8>> {
    s.split(' ').map(|a| a.as_bytes().to_vec()).collect()
}

/// `(key, expected PTTL)`: `-1` none; else within 5 s below the value.
fn expectations() -> Vec<(&'static str, i64)> {
    vec![
        ("sess:set", DEFAULT),
        ("sess:set-ex-long", MAX),
        ("sess:set-px-short", 50_000),
        ("sess:keepttl", DEFAULT),
        ("sess:exat", MAX),
        ("sess:setex", MAX),
        ("sess:psetex", 50_000),
        ("sess:getex", MAX),
        ("sess:hset", DEFAULT),
        ("sess:sorted", DEFAULT),
        ("sess:sorted-max", DEFAULT),
        ("sess:bad-ex", DEFAULT),
        ("sess:bad-getex", DEFAULT),
        ("sess:incr", DEFAULT),
        ("sess:lpush", DEFAULT),
        ("sess:sadd", DEFAULT),
        ("sess:zadd", DEFAULT),
        ("sess:xadd", DEFAULT),
        ("sess:append", DEFAULT),
        ("sess:pfadd", DEFAULT),
        ("sess:m1", DEFAULT),
        ("sess:m2", DEFAULT),
        ("sess:renamed", DEFAULT),
        ("sess:copy", DEFAULT),
        ("sess:union", DEFAULT),
        ("sess:lmove", DEFAULT),
        ("sess:expire-long", MAX),
        ("sess:pexpire-short", 150_000),
        ("sess:persist", DEFAULT),
        ("sess:lua", DEFAULT),
        ("sess:restore", DEFAULT),
        ("max:set", 50_000),
        ("max:hset", 50_000),
        ("def:set-ex", 1_000_000),
        ("def:hset", 30_000),
        ("bull:set", -1),
        ("bull:hset", -1),
        ("obs:set", -1),
        ("obs:hset", -1),
        ("plain:set", -1),
        ("xey:*", 60_000),
        ("xey:a", -1),
        ("sess:tx1", DEFAULT),
        ("sess:tx2", DEFAULT),
    ]
}

fn script(proto: u8) -> Vec<Vec<Vec<u8>>> {
    let exat = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 1000;
    let mut s = Vec::new();
    if proto == 3 {
        s.push(cmd("HELLO 3"));
    }
    for c in [
        "SET sess:set v".to_string(),
        "SET sess:set-ex-long v EX 1000".into(),
        "SET sess:set-px-short v PX 50000".into(),
        "SET sess:keepttl v KEEPTTL".into(),
        format!("SET sess:exat v EXAT {exat}"),
        "SETEX sess:setex 1000 v".into(),
        "PSETEX sess:psetex 50000 v".into(),
        "SET sess:getex v".into(),
        "GETEX sess:getex EX 1000".into(),
        "HSET sess:hset f v".into(),
        "INCR sess:incr".into(),
        "LPUSH sess:lpush a".into(),
        "SADD sess:sadd a".into(),
        "ZADD sess:zadd 1 a".into(),
        "XADD sess:xadd 1-1 f v".into(),
        "APPEND sess:append x".into(),
        "PFADD sess:pfadd a".into(),
        "MSET sess:m1 1 sess:m2 2".into(),
        "SET plain:src v".into(),
        "RENAME plain:src sess:renamed".into(),
        "SET plain:copy v".into(),
        "COPY plain:copy sess:copy".into(),
        "SUNIONSTORE sess:union sess:sadd".into(),
        "RPUSH plain:list a".into(),
        "LMOVE plain:list sess:lmove LEFT RIGHT".into(),
        "SET sess:expire-long v".into(),
        "EXPIRE sess:expire-long 5000".into(),
        "SET sess:pexpire-short v".into(),
        "PEXPIRE sess:pexpire-short 150000".into(),
        "SET sess:persist v EX 50".into(),
        "PERSIST sess:persist".into(),
        "SET plain:dump v".into(),
        "RPUSH plain:sortsrc 3 1 2".into(),
        "SORT plain:sortsrc STORE sess:sorted".into(),
        "SET sess:sorted-max v EX 50".into(),
        "SORT plain:sortsrc LIMIT 0 2 DESC STORE sess:sorted-max".into(),
        // Expiries Redis refuses stay refused under a max rule (no clamp
        // to +OK): past LLONG_MAX/1000 s, overflowing with the time added,
        // zero and negative.
        "SET sess:bad-ex v".into(),
        "SET sess:bad-ex w EX 9223372036854775".into(),
        "SET sess:bad-ex w EX 9223372036854776".into(),
        "SET sess:bad-ex w PX 9223372036854775807".into(),
        "SET sess:bad-ex w EX 0".into(),
        "SET sess:bad-ex w PX -5".into(),
        "SETEX sess:bad-ex 9223372036854775 w".into(),
        "PSETEX sess:bad-ex 9223372036854775807 w".into(),
        "SET sess:bad-getex v".into(),
        "GETEX sess:bad-getex EX 9223372036854775".into(),
        "GETEX sess:bad-getex PX 9223372036854775807".into(),
        "GET sess:bad-ex".into(),
        "SET max:set v".into(),
        "HSET max:hset f v".into(),
        "SET def:set-ex v EX 1000".into(),
        "HSET def:hset f v".into(),
        "SET bull:set v".into(),
        "HSET bull:hset f v".into(),
        "SET obs:set v".into(),
        "HSET obs:hset f v".into(),
        "SET plain:set v".into(),
        "SET xey:* v".into(),
        "SET xey:a v".into(),
        "MULTI".into(),
        "SET sess:tx1 v".into(),
        "HSET sess:tx2 f v".into(),
        "GET sess:tx1".into(),
        "EXEC".into(),
    ] {
        s.push(cmd(&c));
    }
    // A script with a space in it.
    s.push(vec![
        b"EVAL".to_vec(),
        b"return redis.call('SET', KEYS[1], 'v')".to_vec(),
        b"1".to_vec(),
        b"sess:lua".to_vec(),
    ]);
    s
}

async fn pttl(r: &RedisServer, key: &str) -> i64 {
    let mut d = r.direct().await;
    d.pttl(key).await.unwrap()
}

async fn flush(r: &RedisServer) {
    let mut d = r.direct().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut d).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_family_gets_its_rule_and_the_same_replies_as_redis() {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let s = sidecar_with(with_rules(&behind.url()), Default::default()).await;
    // Key specs (write flags) come from the learned table.
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    let direct_addr = std::net::SocketAddr::from(([127, 0, 0, 1], direct.port));
    for proto in [2, 3] {
        flush(&direct).await;
        flush(&behind).await;
        let script = script(proto);
        let want = run(direct_addr, &script).await;
        let got = run(s.addr, &script).await;
        for (i, (w, g)) in want.iter().zip(&got).enumerate() {
            assert_eq!(
                String::from_utf8_lossy(g),
                String::from_utf8_lossy(w),
                "RESP{proto}: reply {i} to {:?}",
                String::from_utf8_lossy(&script[i].concat())
            );
        }
        // RESTORE of a DUMP taken from the sidecar's upstream.
        let mut d = behind.direct().await;
        let dump: Vec<u8> = redis::cmd("DUMP")
            .arg("plain:dump")
            .query_async(&mut d)
            .await
            .unwrap();
        let mut c = client(&s).await;
        let _: () = redis::cmd("RESTORE")
            .arg("sess:restore")
            .arg(0)
            .arg(dump)
            .query_async(&mut c)
            .await
            .unwrap();
        for (key, want) in expectations() {
            let got = pttl(&behind, key).await;
            if want == -1 {
                assert_eq!(got, -1, "RESP{proto}: {key}");
            } else {
                assert!(
                    got <= want && got > want - 5_000,
                    "RESP{proto}: {key}: PTTL {got}, want about {want}"
                );
            }
        }
    }
    let metrics = String::from_utf8(s.metrics.render()).unwrap();
    assert!(
        metrics.contains("redis_sidecar_ttl_enforced_total{action=\"observe\",rule=\"obs:*\"} 4"),
        "{metrics}"
    );
    assert!(
        metrics.contains("redis_sidecar_ttl_enforced_total{action=\"default\",rule=\"sess:*\"}")
    );
    assert!(metrics.contains("redis_sidecar_ttl_enforced_total{action=\"clamp\",rule=\"max:*\"}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_abort_and_execabort_pass_through_unchanged() {
    let redis = RedisServer::start();
    let s = sidecar_with(with_rules(&redis.url()), Default::default()).await;
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    let mut a = Raw::connect(s.addr).await;
    let mut b = client(&s).await;
    // An inline command is rewritten like any other.
    a.send(b"SET sess:inline v\r\n").await;
    assert_eq!(&a.read().await[..], b"+OK\r\n");
    let t = pttl(&redis, "sess:inline").await;
    assert!(t > DEFAULT - 5_000 && t <= DEFAULT, "{t}");
    assert_eq!(&a.call(&[b"WATCH", b"sess:w"]).await[..], b"+OK\r\n");
    let _: () = b.set("sess:w", "other").await.unwrap();
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(
        &a.call(&[b"HSET", b"sess:h", b"f", b"v"]).await[..],
        b"+QUEUED\r\n"
    );
    assert_eq!(&a.call(&[b"EXEC"]).await[..], b"*-1\r\n");
    assert_eq!(pttl(&redis, "sess:h").await, -2, "nothing ran");
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(
        &a.call(&[b"HSET", b"sess:h", b"f", b"v"]).await[..],
        b"+QUEUED\r\n"
    );
    assert!(
        a.call(&[b"HSET", b"sess:h"])
            .await
            .starts_with(b"-ERR wrong number")
    );
    assert!(a.call(&[b"EXEC"]).await.starts_with(b"-EXECABORT"));
    assert_eq!(pttl(&redis, "sess:h").await, -2);
    // /upstreams says whether the upstream takes PEXPIRE .. NX/LT.
    let u = upstreams(&s).await;
    assert_eq!(u["ttl_append_supported"], true, "{u}");
    assert!(u["server_version"].as_str().unwrap().starts_with('7'));
    // The TTL of the key the other client wrote through the sidecar.
    let t = pttl(&redis, "sess:w").await;
    assert!(t > DEFAULT - 5_000 && t <= DEFAULT, "{t}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_live_and_bad_rules_are_refused() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecar-ttl-reload-{}", redis.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let write = |rules: &str| {
        let head = format!("listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n{rules}");
        write_config(&file, &head, &[("r", &redis)]);
    };
    write("[[ttl]]\npattern = \"a:*\"\ndefault = \"100s\"\n");
    let s = sidecar_from_file(&file).await;
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(&c.call(&[b"SET", b"a:1", b"v"]).await[..], b"+OK\r\n");
    assert!(pttl(&redis, "a:1").await > 95_000);
    write(
        "[[ttl]]\npattern = \"a:*\"\nmax = \"10s\"\n[[ttl]]\npattern = \"b:*\"\ndefault = \"20s\"\n",
    );
    s.control.reload().unwrap();
    assert_eq!(
        &c.call(&[b"SET", b"a:2", b"v", b"EX", b"100"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&c.call(&[b"SET", b"b:1", b"v"]).await[..], b"+OK\r\n");
    assert!(pttl(&redis, "a:2").await <= 10_000);
    assert!(pttl(&redis, "b:1").await > 15_000);
    // Invalid: max below default, empty pattern, zero duration.
    write(
        "[[ttl]]\npattern = \"\"\ndefault = \"10s\"\nmax = \"1s\"\n[[ttl]]\npattern = \"z\"\nmax = \"0s\"\n",
    );
    let err = s.control.reload().unwrap_err().to_string();
    assert!(err.contains("ttl[0]: pattern must not be empty"), "{err}");
    assert!(
        err.contains("ttl[0]: max must be at least default"),
        "{err}"
    );
    assert!(err.contains("ttl[1]: max must be at least 1ms"), "{err}");
    // The running rules stay.
    assert_eq!(&c.call(&[b"SET", b"b:2", b"v"]).await[..], b"+OK\r\n");
    assert!(pttl(&redis, "b:2").await > 15_000);
}

fn counter(s: &redis_sidecar::Sidecar, name: &str, rule: &str) -> u64 {
    let text = String::from_utf8(s.metrics.render()).unwrap();
    text.lines()
        .find(|l| l.starts_with(name) && l.contains(&format!("rule=\"{rule}\"")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// Keys the stage cannot see (written before the sidecar, by an undeclared
/// script write) get their TTL from the sweeper, at the configured rate,
/// and it starts again on the new endpoint after a switch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sweeper_repairs_what_the_stage_cannot_see() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    for r in [&a, &b] {
        let mut d = r.direct().await;
        for i in 0..300 {
            let _: () = d.set(format!("sw:old:{i}"), "v").await.unwrap();
        }
        let _: () = d.set("other:1", "v").await.unwrap();
    }
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    let mut r = rule("sw:*", Some(DEFAULT), None, RuleMode::Enforce);
    r.sweep_rate = std::num::NonZeroU32::new(200);
    r.sweep_every = Duration::from_millis(200);
    cfg.ttl = vec![r];
    let started = std::time::Instant::now();
    let s = sidecar_with(cfg, Default::default()).await;
    // Undeclared write from a script: the stage cannot know the key.
    let mut c = client(&s).await;
    let _: () = redis::cmd("EVAL")
        .arg("redis.call('SET', 'sw:lua', 'v')")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(pttl(&a, "sw:lua").await, -1);
    assert!(
        eventually(|| async { counter(&s, "redis_sidecar_ttl_sweep_passes_total", "sw:*") >= 1 })
            .await
    );
    // 300 keys at 200 keys/s: a pass takes at least 1.5 s.
    assert!(
        started.elapsed() >= Duration::from_millis(1400),
        "{:?}",
        started.elapsed()
    );
    assert!(eventually(|| async { pttl(&a, "sw:lua").await > 0 }).await);
    for k in ["sw:old:0", "sw:old:299"] {
        let t = pttl(&a, k).await;
        assert!(t > DEFAULT - 10_000 && t <= DEFAULT, "{k}: {t}");
    }
    assert_eq!(pttl(&a, "other:1").await, -1, "outside the pattern");
    assert!(
        counter(
            &s,
            "redis_sidecar_ttl_enforced_total{action=\"sweep\"",
            "sw:*"
        ) >= 301
    );
    // After a switch to b, b's keys get theirs.
    s.pool.ups.activate("b").unwrap();
    assert!(eventually(|| async { pttl(&b, "sw:old:299").await > 0 }).await);
    assert_eq!(pttl(&b, "other:1").await, -1);
}
