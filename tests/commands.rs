//! Every command family through the sidecar, over RESP2 and RESP3, with the
//! `redis` crate and raw sockets, against a real redis-server.
#![allow(clippy::unwrap_used)]

mod support;

use redis::AsyncCommands;
use support::*;

async fn families(con: &mut redis::aio::MultiplexedConnection, p: &str) {
    // strings
    let _: () = con.set(format!("{p}s"), "v").await.unwrap();
    let v: String = con.get(format!("{p}s")).await.unwrap();
    assert_eq!(v, "v");
    let n: i64 = con.incr(format!("{p}n"), 5).await.unwrap();
    assert_eq!(n, 5);
    let none: Option<String> = con.get(format!("{p}missing")).await.unwrap();
    assert_eq!(none, None);
    // hashes
    let _: () = con
        .hset_multiple(format!("{p}h"), &[("a", "1"), ("b", "2")])
        .await
        .unwrap();
    let h: std::collections::HashMap<String, String> = con.hgetall(format!("{p}h")).await.unwrap();
    assert_eq!(h.get("b").map(String::as_str), Some("2"));
    // lists
    let _: () = con.rpush(format!("{p}l"), &["x", "y", "z"]).await.unwrap();
    let l: Vec<String> = con.lrange(format!("{p}l"), 0, -1).await.unwrap();
    assert_eq!(l, vec!["x", "y", "z"]);
    // sets
    let _: () = con.sadd(format!("{p}set"), &["a", "b", "a"]).await.unwrap();
    let c: i64 = con.scard(format!("{p}set")).await.unwrap();
    assert_eq!(c, 2);
    // sorted sets
    let _: () = con
        .zadd_multiple(format!("{p}z"), &[(1.5, "one"), (3.0, "three")])
        .await
        .unwrap();
    let z: Vec<(String, f64)> = con.zrange_withscores(format!("{p}z"), 0, -1).await.unwrap();
    assert_eq!(
        z,
        vec![("one".to_string(), 1.5), ("three".to_string(), 3.0)]
    );
    // streams
    let id: String = redis::cmd("XADD")
        .arg(format!("{p}st"))
        .arg("*")
        .arg("f")
        .arg("v")
        .query_async(con)
        .await
        .unwrap();
    assert!(id.contains('-'));
    let len: i64 = redis::cmd("XLEN")
        .arg(format!("{p}st"))
        .query_async(con)
        .await
        .unwrap();
    assert_eq!(len, 1);
    // scan
    let keys: Vec<String> = redis::cmd("SCAN")
        .arg(0)
        .arg("MATCH")
        .arg(format!("{p}*"))
        .arg("COUNT")
        .arg(1000)
        .query_async::<(String, Vec<String>)>(con)
        .await
        .unwrap()
        .1;
    assert!(keys.len() >= 7, "{keys:?}");
    // EVAL / EVALSHA
    let r: i64 = redis::cmd("EVAL")
        .arg("return redis.call('INCRBY', KEYS[1], ARGV[1])")
        .arg(1)
        .arg(format!("{p}n"))
        .arg(10)
        .query_async(con)
        .await
        .unwrap();
    assert_eq!(r, 15);
    let sha: String = redis::cmd("SCRIPT")
        .arg("LOAD")
        .arg("return ARGV[1]")
        .query_async(con)
        .await
        .unwrap();
    let r: String = redis::cmd("EVALSHA")
        .arg(&sha)
        .arg(0)
        .arg("hi")
        .query_async(con)
        .await
        .unwrap();
    assert_eq!(r, "hi");
    // pipeline
    let (a, b, c): (String, i64, Option<String>) = redis::pipe()
        .get(format!("{p}s"))
        .incr(format!("{p}n"), 1)
        .get(format!("{p}nope"))
        .query_async(con)
        .await
        .unwrap();
    assert_eq!((a.as_str(), b, c), ("v", 16, None));
    // unknown command and wrong arity: Redis's own errors, connection kept
    let e = redis::cmd("NOSUCHCMD")
        .query_async::<()>(con)
        .await
        .unwrap_err();
    assert!(e.to_string().contains("unknown command"), "{e}");
    let e = redis::cmd("GET").query_async::<()>(con).await.unwrap_err();
    assert!(e.to_string().contains("wrong number of arguments"), "{e}");
    let v: String = con.get(format!("{p}s")).await.unwrap();
    assert_eq!(v, "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_families_resp2_and_resp3() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut c2 = client(&s).await;
    families(&mut c2, "r2:").await;
    let mut c3 = client3(&s).await;
    families(&mut c3, "r3:").await;
    // Written through the sidecar, visible directly in Redis.
    let mut direct = redis.direct().await;
    let v: String = direct.get("r3:s").await.unwrap();
    assert_eq!(v, "v");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_keys_large_values_and_inline_commands() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut c = client(&s).await;
    let key: Vec<u8> = vec![0, 1, b'\r', b'\n', 255, b' '];
    let val: Vec<u8> = (0..=255u8).cycle().take(1000).collect();
    let _: () = c.set(&key, &val).await.unwrap();
    let got: Vec<u8> = c.get(&key).await.unwrap();
    assert_eq!(got, val);
    let big: Vec<u8> = (0..5 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let _: () = c.set("big", &big).await.unwrap();
    let got: Vec<u8> = c.get("big").await.unwrap();
    assert_eq!(got.len(), big.len());
    assert!(got == big);

    let mut raw = Raw::connect(s.addr).await;
    raw.send(b"PING\r\nSET inl 'a b'\r\nGET inl\r\n\r\nECHO \"x\\ty\"\n")
        .await;
    assert_eq!(&raw.read().await[..], b"+PONG\r\n");
    assert_eq!(&raw.read().await[..], b"+OK\r\n");
    assert_eq!(&raw.read().await[..], b"$3\r\na b\r\n");
    assert_eq!(&raw.read().await[..], b"$3\r\nx\ty\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hello_select_auth_client_reset_quit() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut raw = Raw::connect(s.addr).await;
    let r = raw.call(&[b"HELLO", b"3"]).await;
    assert!(r.starts_with(b"%7\r\n"), "{r:?}");
    assert!(r.windows(7).any(|w| w == b"version"));
    // RESP3 from now on: a null is `_`.
    assert_eq!(&raw.call(&[b"GET", b"nokey"]).await[..], b"_\r\n");
    let r = raw.call(&[b"HELLO", b"4"]).await;
    assert!(r.starts_with(b"-NOPROTO"), "{r:?}");
    let r = raw.call(&[b"HELLO", b"2"]).await;
    assert!(r.starts_with(b"*14\r\n"), "{r:?}");
    assert_eq!(&raw.call(&[b"GET", b"nokey"]).await[..], b"$-1\r\n");

    // SELECT: per client, invisible to others.
    assert_eq!(&raw.call(&[b"SELECT", b"5"]).await[..], b"+OK\r\n");
    assert_eq!(&raw.call(&[b"SET", b"dbk", b"five"]).await[..], b"+OK\r\n");
    let mut other = Raw::connect(s.addr).await;
    assert_eq!(&other.call(&[b"GET", b"dbk"]).await[..], b"$-1\r\n");
    assert_eq!(&raw.call(&[b"GET", b"dbk"]).await[..], b"$4\r\nfive\r\n");
    let r = raw.call(&[b"SELECT", b"999"]).await;
    assert!(r.starts_with(b"-ERR DB index is out of range"), "{r:?}");
    let r = raw.call(&[b"SELECT", b"x"]).await;
    assert!(r.starts_with(b"-ERR value is not an integer"), "{r:?}");

    // CLIENT ID / SETNAME / GETNAME
    let id = raw.call(&[b"CLIENT", b"ID"]).await;
    assert!(id.starts_with(b":"), "{id:?}");
    assert_ne!(id, other.call(&[b"CLIENT", b"ID"]).await);
    assert_eq!(&raw.call(&[b"CLIENT", b"GETNAME"]).await[..], b"$-1\r\n");
    assert_eq!(
        &raw.call(&[b"CLIENT", b"SETNAME", b"app1"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &raw.call(&[b"CLIENT", b"GETNAME"]).await[..],
        b"$4\r\napp1\r\n"
    );
    assert!(
        raw.call(&[b"CLIENT", b"SETNAME", b"a b"])
            .await
            .starts_with(b"-ERR Client names")
    );
    assert_eq!(&other.call(&[b"CLIENT", b"GETNAME"]).await[..], b"$-1\r\n");

    // RESET: back to db 0, RESP2, no name.
    assert_eq!(&raw.call(&[b"RESET"]).await[..], b"+RESET\r\n");
    assert_eq!(&raw.call(&[b"GET", b"dbk"]).await[..], b"$-1\r\n");
    assert_eq!(&raw.call(&[b"CLIENT", b"GETNAME"]).await[..], b"$-1\r\n");

    // QUIT: +OK, then closed.
    assert_eq!(&raw.call(&[b"QUIT"]).await[..], b"+OK\r\n");
    assert!(raw.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_against_requirepass_upstream() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    // The sidecar itself holds no password: clients must AUTH.
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let s = sidecar_with(config(&url), Default::default()).await;
    let mut raw = Raw::connect(s.addr).await;
    let r = raw.call(&[b"GET", b"k"]).await;
    assert!(r.starts_with(b"-NOAUTH"), "{r:?}");
    let r = raw.call(&[b"AUTH", b"wrong"]).await;
    assert!(r.starts_with(b"-WRONGPASS"), "{r:?}");
    assert!(
        !String::from_utf8_lossy(&r).contains("wrong"),
        "error must not echo the password"
    );
    assert_eq!(&raw.call(&[b"AUTH", b"s3cret"]).await[..], b"+OK\r\n");
    assert_eq!(&raw.call(&[b"SET", b"k", b"v"]).await[..], b"+OK\r\n");
    // Another client that did not AUTH still gets NOAUTH.
    let mut other = Raw::connect(s.addr).await;
    assert!(other.call(&[b"GET", b"k"]).await.starts_with(b"-NOAUTH"));
    // AUTH with a username (ACL default user) and HELLO AUTH.
    assert_eq!(
        &other.call(&[b"AUTH", b"default", b"s3cret"]).await[..],
        b"+OK\r\n"
    );
    assert_eq!(&other.call(&[b"GET", b"k"]).await[..], b"$1\r\nv\r\n");
    let mut third = Raw::connect(s.addr).await;
    let r = third
        .call(&[
            b"HELLO", b"3", b"AUTH", b"default", b"s3cret", b"SETNAME", b"n3",
        ])
        .await;
    assert!(r.starts_with(b"%7"), "{r:?}");
    assert_eq!(&third.call(&[b"GET", b"k"]).await[..], b"$1\r\nv\r\n");
    assert_eq!(
        &third.call(&[b"CLIENT", b"GETNAME"]).await[..],
        b"$2\r\nn3\r\n"
    );
    // The health checker has no password either: NOAUTH still proves the
    // endpoint answers, so it counts as up.
    assert!(eventually(|| async { upstreams(&s).await["upstreams"][0]["health"] == "up" }).await);

    // With the password in the upstream URL, clients need no AUTH, and the
    // password never shows in /metrics or /readyz.
    let s2 = sidecar(&redis).await;
    let mut c = client(&s2).await;
    let v: String = redis::AsyncCommands::get(&mut c, "k").await.unwrap();
    assert_eq!(v, "v");
    let admin = s2.admin_addr.unwrap();
    for path in ["/metrics", "/readyz"] {
        let (status, body) = http_get(admin, path).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert!(!body.contains("s3cret"), "{path} leaks the password");
    }
}

/// The built-in table (scripts/gen-command-table.py) is the test server's
/// own: every command with the same arity, flags, categories and key specs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_builtin_command_table_matches_redis() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    let learned = s.pool.table().fingerprint();
    let builtin = redis_sidecar::request::command::Table::builtin().fingerprint();
    let missing: Vec<_> = learned.iter().filter(|l| !builtin.contains(l)).collect();
    let extra: Vec<_> = builtin.iter().filter(|b| !learned.contains(b)).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "regenerate with scripts/gen-command-table.py; differs from the server:\n{missing:#?}\nnot on the server:\n{extra:#?}"
    );
}
