//! Connection-state commands in every session mode, against Redis as the
//! oracle: the same script is sent to a redis-server directly and through
//! the sidecar (in front of a second, identical redis-server); the replies
//! must be identical byte for byte, and so must both servers' keyspaces
//! afterwards (which db each write went to). Also the bugs of the session
//! rework: each test here failed before it.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use redis::AsyncCommands;
use support::*;

/// Run `script` on a fresh connection to `addr`; one reply per command
/// (each command here has exactly one).
async fn run(addr: std::net::SocketAddr, script: &[Vec<&[u8]>]) -> Vec<Vec<u8>> {
    let mut c = Raw::connect(addr).await;
    let mut out = Vec::new();
    for cmd in script {
        out.push(normalize_hello_id(&c.call(cmd).await));
    }
    out
}

/// Every key of dbs 0..4, with its db.
async fn keyspace(r: &RedisServer) -> Vec<(i64, String)> {
    let mut c = r.direct().await;
    let mut out = Vec::new();
    for db in 0..4 {
        let _: () = redis::cmd("SELECT")
            .arg(db)
            .query_async(&mut c)
            .await
            .unwrap();
        let mut keys: Vec<String> = c.keys("*").await.unwrap();
        keys.sort();
        out.extend(keys.into_iter().map(|k| (db, k)));
    }
    let _: () = redis::cmd("SELECT")
        .arg(0)
        .query_async(&mut c)
        .await
        .unwrap();
    out
}

async fn reset(r: &RedisServer) {
    let mut c = r.direct().await;
    let _: () = redis::cmd("FLUSHALL").query_async(&mut c).await.unwrap();
}

/// Where the scripts go through the sidecar: a single Redis (whose
/// keyspace is compared, db by db) or a cluster (database 0 only: keys
/// compared through the sidecar).
enum Behind<'a> {
    Single(&'a RedisServer),
    Cluster,
}

async fn add_acl_user(r: &RedisServer) {
    let mut c = r.direct().await;
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "u", "on", ">p", "~*", "&*", "+@all", "-set"])
        .query_async(&mut c)
        .await
        .unwrap();
}

/// Every connection-state command (RESET among them) in every mode, in
/// both protocols, through the sidecar and to `direct`: the same replies,
/// and the same keys where each write went. Returns the cases run.
async fn state_matrix(
    direct: &RedisServer,
    s: &redis_sidecar::Sidecar,
    behind: Behind<'_>,
) -> usize {
    type Script = Vec<Vec<&'static [u8]>>;
    let states: Vec<(&str, Script)> = match behind {
        Behind::Single(_) => vec![
            ("select", vec![vec![b"SELECT", b"2"]]),
            ("auth", vec![vec![b"AUTH", b"u", b"p"]]),
            ("hello3", vec![vec![b"HELLO", b"3"]]),
            (
                "hello2-auth",
                vec![vec![b"HELLO", b"2", b"AUTH", b"u", b"p"]],
            ),
            ("setname", vec![vec![b"CLIENT", b"SETNAME", b"x"]]),
            ("reset", vec![vec![b"ECHO", b"x"], vec![b"RESET"]]),
            (
                "hello3-auth-reset",
                vec![
                    vec![b"HELLO", b"3", b"AUTH", b"u", b"p"],
                    vec![b"ECHO", b"x"],
                    vec![b"RESET"],
                ],
            ),
        ],
        // RESET in every mode: whatever the identity was, the default
        // after it, also when a command ran under the old identity first
        // (its connections are cached then). A cluster has database 0
        // only.
        Behind::Cluster => vec![
            ("reset", vec![vec![b"ECHO", b"x"], vec![b"RESET"]]),
            (
                "auth-reset",
                vec![
                    vec![b"AUTH", b"u", b"p"],
                    vec![b"ECHO", b"x"],
                    vec![b"RESET"],
                ],
            ),
            (
                "hello3-reset",
                vec![vec![b"HELLO", b"3"], vec![b"ECHO", b"x"], vec![b"RESET"]],
            ),
            (
                "hello3-auth-reset",
                vec![
                    vec![b"HELLO", b"3", b"AUTH", b"u", b"p"],
                    vec![b"ECHO", b"x"],
                    vec![b"RESET"],
                ],
            ),
            (
                "setname-reset",
                vec![
                    vec![b"CLIENT", b"SETNAME", b"x"],
                    vec![b"ECHO", b"x"],
                    vec![b"RESET"],
                ],
            ),
        ],
    };
    // Keys of a transaction share a hash tag (one slot, as a cluster needs).
    let modes: [(&str, Script, Script); 6] = [
        ("normal", vec![], vec![]),
        (
            "watching",
            vec![vec![b"WATCH", b"{t}w"]],
            vec![
                vec![b"MULTI"],
                vec![b"HSET", b"{t}in-tx", b"f", b"1"],
                vec![b"EXEC"],
            ],
        ),
        ("multi", vec![vec![b"MULTI"]], vec![vec![b"EXEC"]]),
        (
            "watch-multi",
            vec![vec![b"WATCH", b"{t}w"], vec![b"MULTI"]],
            vec![vec![b"HSET", b"{t}in-tx", b"f", b"1"], vec![b"EXEC"]],
        ),
        (
            "tracking",
            vec![vec![b"CLIENT", b"TRACKING", b"on"]],
            vec![],
        ),
        (
            "subscribed",
            vec![vec![b"SUBSCRIBE", b"ch"]],
            vec![vec![b"PING"]],
        ),
    ];
    // `u` may not SET: a probe that tells the identity apart.
    let probes: Script = vec![
        vec![b"SET", b"probe", b"v"],
        vec![b"HSET", b"h", b"f", b"v"],
        vec![b"HGETALL", b"h"],
        vec![b"ACL", b"WHOAMI"],
        vec![b"CLIENT", b"GETNAME"],
        vec![b"ECHO", b"end"],
    ];
    let mut cases = 0;
    for proto in [2, 3] {
        for (mode, before, after) in &modes {
            for (state, cmds) in &states {
                let mut script: Script = Vec::new();
                if proto == 3 {
                    script.push(vec![b"HELLO", b"3"]);
                }
                script.extend(before.iter().cloned());
                script.extend(cmds.iter().cloned());
                script.extend(after.iter().cloned());
                script.extend(probes.iter().cloned());
                reset(direct).await;
                match behind {
                    Behind::Single(b) => reset(b).await,
                    Behind::Cluster => {
                        let mut c = Raw::connect(s.addr).await;
                        assert_eq!(&c.call(&[b"FLUSHALL"]).await[..], b"+OK\r\n");
                    }
                }
                let want = run(addr_of(direct), &script).await;
                let got = run(s.addr, &script).await;
                for (i, (w, g)) in want.iter().zip(&got).enumerate() {
                    assert_eq!(
                        String::from_utf8_lossy(g),
                        String::from_utf8_lossy(w),
                        "RESP{proto}, mode {mode}, {state}: reply {i} to {:?}",
                        String::from_utf8_lossy(&script[i].concat())
                    );
                }
                match behind {
                    Behind::Single(b) => assert_eq!(
                        keyspace(b).await,
                        keyspace(direct).await,
                        "RESP{proto}, mode {mode}, {state}: keyspace"
                    ),
                    Behind::Cluster => {
                        let mut c = Raw::connect(s.addr).await;
                        let mut keys = c.call(&[b"KEYS", b"*"]).await.to_vec();
                        let mut want = Raw::connect(addr_of(direct))
                            .await
                            .call(&[b"KEYS", b"*"])
                            .await
                            .to_vec();
                        // The order of KEYS is the server's: compare sorted lines.
                        let sorted = |b: &mut Vec<u8>| {
                            let mut l: Vec<String> = String::from_utf8_lossy(b)
                                .split("\r\n")
                                .map(str::to_string)
                                .collect();
                            l.sort();
                            l
                        };
                        assert_eq!(
                            sorted(&mut keys),
                            sorted(&mut want),
                            "RESP{proto}, mode {mode}, {state}: keys"
                        );
                    }
                }
                cases += 1;
            }
        }
    }
    cases
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_commands_in_every_mode_match_redis() {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    for r in [&direct, &behind] {
        add_acl_user(r).await;
    }
    let s = sidecar(&behind).await;
    assert_eq!(state_matrix(&direct, &s, Behind::Single(&behind)).await, 84);
}

/// RESET in every mode in front of a Redis Cluster, against one plain
/// Redis: after HELLO 3 it answered in RESP3 and after AUTH it kept the
/// user (the session's cached node connections of the old identity were
/// not dropped).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_commands_in_every_mode_match_redis_on_a_cluster() {
    let cluster = Cluster::start(3);
    for n in &cluster.nodes {
        add_acl_user(n).await;
    }
    let direct = RedisServer::start();
    add_acl_user(&direct).await;
    let s = cluster_sidecar(&cluster).await;
    assert_eq!(state_matrix(&direct, &s, Behind::Cluster).await, 60);
}

/// The bugs reported against the session: each of these failed before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn select_and_hello_while_watching_reach_the_dedicated_connection() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut a = Raw::connect(s.addr).await;
    assert_eq!(&a.call(&[b"WATCH", b"k"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"SELECT", b"2"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"SET", b"k", b"v"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&a.call(&[b"EXEC"]).await[..], b"*1\r\n+OK\r\n");
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SELECT")
        .arg(2)
        .query_async(&mut d)
        .await
        .unwrap();
    let v: Option<String> = d.get("k").await.unwrap();
    assert_eq!(v.as_deref(), Some("v"), "k must be written to db 2");

    let mut b = Raw::connect(s.addr).await;
    assert_eq!(&b.call(&[b"WATCH", b"k"]).await[..], b"+OK\r\n");
    assert!(b.call(&[b"HELLO", b"3"]).await.starts_with(b"%7"));
    assert_eq!(&b.call(&[b"HGETALL", b"nokey"]).await[..], b"%0\r\n");

    // SELECT -1 as Redis answers it.
    assert_eq!(
        &b.call(&[b"SELECT", b"-1"]).await[..],
        b"-ERR DB index is out of range\r\n"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reset_inside_multi_keeps_the_url_credentials_and_db() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/3", redis.port);
    let s = sidecar_with(config(&url), Default::default()).await;
    let mut a = Raw::connect(s.addr).await;
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"SET", b"gone", b"1"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&a.call(&[b"RESET"]).await[..], b"+RESET\r\n");
    assert!(
        a.call(&[b"EXEC"])
            .await
            .starts_with(b"-ERR EXEC without MULTI")
    );
    assert_eq!(
        &a.call(&[b"SET", b"after-reset", b"1"]).await[..],
        b"+OK\r\n"
    );
    // AUTH while watching changes the user of the dedicated connection.
    assert_eq!(&a.call(&[b"WATCH", b"w"]).await[..], b"+OK\r\n");
    assert_eq!(
        &a.call(&[b"ACL", b"SETUSER", b"u", b"on", b">p", b"~*", b"+@all"])
            .await[..],
        b"+OK\r\n"
    );
    assert_eq!(&a.call(&[b"AUTH", b"u", b"p"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"ACL", b"WHOAMI"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&a.call(&[b"EXEC"]).await[..], b"*1\r\n$1\r\nu\r\n");
    let mut d = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let v: Option<String> = d.get("after-reset").await.unwrap();
    assert_eq!(v.as_deref(), Some("1"), "written to the URL's db 3");
    let gone: i64 = d.exists("gone").await.unwrap();
    assert_eq!(gone, 0);
}

/// `CLIENT LIST` field `key` of the line whose id is `id`.
fn field(list: &str, id: i64, key: &str) -> Option<String> {
    let line = list.lines().find(|l| l.starts_with(&format!("id={id} ")))?;
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
        .map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_family_describes_the_sidecars_clients() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    // `cmd=` names commands as the learned table does.
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    let mut a = client(&s).await;
    let id: i64 = redis::cmd("CLIENT")
        .arg("ID")
        .query_async(&mut a)
        .await
        .unwrap();
    let _: () = redis::cmd("CLIENT")
        .arg(&["SETNAME", "x"])
        .query_async(&mut a)
        .await
        .unwrap();
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut a)
        .await
        .unwrap();
    let list: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(field(&list, id, "name").as_deref(), Some("x"), "{list}");
    assert_eq!(field(&list, id, "db").as_deref(), Some("1"), "{list}");
    assert_eq!(
        field(&list, id, "laddr").as_deref(),
        Some(s.addr.to_string().as_str())
    );
    let info: String = redis::cmd("CLIENT")
        .arg("INFO")
        .query_async(&mut a)
        .await
        .unwrap();
    assert!(info.starts_with(&format!("id={id} ")), "{info}");
    assert_eq!(field(&info, id, "cmd").as_deref(), Some("client|info"));
    let only: String = redis::cmd("CLIENT")
        .arg(&["LIST", "ID"])
        .arg(id)
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(only.lines().count(), 1);

    // KILL by id, by address (old and new form), SKIPME, USER, MAXAGE.
    let mut victims = Vec::new();
    for _ in 0..4 {
        let mut v = Raw::connect(s.addr).await;
        let vid = v.call(&[b"CLIENT", b"ID"]).await;
        let vid: i64 = std::str::from_utf8(&vid[1..vid.len() - 2])
            .unwrap()
            .parse()
            .unwrap();
        victims.push((v, vid));
    }
    let n: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "ID"])
        .arg(victims[0].1)
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(victims[0].0.closed().await);
    let addr = victims[1].0.stream.local_addr().unwrap().to_string();
    let ok: String = redis::cmd("CLIENT")
        .arg(&["KILL", &addr])
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(ok, "OK");
    assert!(victims[1].0.closed().await);
    let addr = victims[2].0.stream.local_addr().unwrap().to_string();
    let n: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "ADDR", &addr, "SKIPME", "yes"])
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(victims[2].0.closed().await);
    let r: redis::RedisResult<String> = redis::cmd("CLIENT")
        .arg(&["KILL", "127.0.0.1:1"])
        .query_async(&mut a)
        .await;
    assert!(r.unwrap_err().to_string().contains("No such client"));
    // USER (unauthenticated clients are `default`, as on Redis) and
    // MAXAGE, skipping ourselves: the last victim.
    let n: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "default", "MAXAGE", "0"])
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(victims[3].0.closed().await);
    let n: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "USER", "nobody"])
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(n, 0);
    let mut last = Raw::connect(s.addr).await;
    assert_eq!(&last.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let n: i64 = redis::cmd("CLIENT")
        .arg(&["KILL", "LADDR", &s.addr.to_string()])
        .query_async(&mut a)
        .await
        .unwrap();
    assert_eq!(n, 1);
    assert!(last.closed().await);
    // We are still here.
    let pong: String = redis::cmd("PING").query_async(&mut a).await.unwrap();
    assert_eq!(pong, "PONG");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_unblock_and_tracking_redirect_name_sidecar_clients() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut blocked = Raw::connect(s.addr).await;
    let id = blocked.call(&[b"CLIENT", b"ID"]).await;
    let id = &id[1..id.len() - 2];
    blocked.cmd(&[b"BLPOP", b"never", b"0"]).await;
    let mut a = Raw::connect(s.addr).await;
    // Not blocked yet, or blocked: poll until Redis has it blocked.
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    assert_eq!(&a.call(&[b"CLIENT", b"UNBLOCK", id]).await[..], b":1\r\n");
    assert_eq!(&blocked.read().await[..], b"*-1\r\n");
    // Not blocked any more.
    assert_eq!(&a.call(&[b"CLIENT", b"UNBLOCK", id]).await[..], b":0\r\n");
    blocked.cmd(&[b"BLPOP", b"never", b"0"]).await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    assert_eq!(
        &a.call(&[b"CLIENT", b"UNBLOCK", id, b"ERROR"]).await[..],
        b":1\r\n"
    );
    assert!(blocked.read().await.starts_with(b"-UNBLOCKED"));

    // TRACKING REDIRECT to another sidecar client that listens on
    // __redis__:invalidate (RESP2).
    let mut listener = Raw::connect(s.addr).await;
    let lid = listener.call(&[b"CLIENT", b"ID"]).await;
    let lid = lid[1..lid.len() - 2].to_vec();
    listener.cmd(&[b"SUBSCRIBE", b"__redis__:invalidate"]).await;
    assert!(listener.read().await.windows(9).any(|w| w == b"subscribe"));
    let mut t = Raw::connect(s.addr).await;
    assert_eq!(
        &t.call(&[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", &lid])
            .await[..],
        b"+OK\r\n"
    );
    assert_eq!(&t.call(&[b"GET", b"tracked"]).await[..], b"$-1\r\n");
    let mut w = client(&s).await;
    let _: () = w.set("tracked", "new").await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), listener.read())
        .await
        .unwrap();
    assert!(msg.windows(7).any(|x| x == b"tracked"), "{msg:?}");
    // A client without an upstream connection of its own, or none at all:
    // Redis's answer.
    let mut plain = Raw::connect(s.addr).await;
    let pid = plain.call(&[b"CLIENT", b"ID"]).await;
    for target in [&pid[1..pid.len() - 2], &b"999999"[..]] {
        assert_eq!(
            &t.call(&[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", target])
                .await[..],
            b"-ERR The client ID you want redirect to does not exist\r\n"
        );
    }
}

/// A state command pipelined behind a blocking command waits for it, as on
/// Redis: the blocking command's connection is not closed under it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_commands_pipelined_behind_a_blocking_command_wait_for_it() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut a = Raw::connect(s.addr).await;
    let mut batch = Vec::new();
    for c in [
        &[&b"BLPOP"[..], b"q", b"0"][..],
        &[b"CLIENT", b"SETNAME", b"after"],
        &[b"SELECT", b"1"],
        &[b"SET", b"in-db1", b"1"],
    ] {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(c));
    }
    a.send(&batch).await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    let mut b = client(&s).await;
    let _: () = b.rpush("q", "job").await.unwrap();
    assert_eq!(&a.read().await[..], b"*2\r\n$1\r\nq\r\n$3\r\njob\r\n");
    assert_eq!(&a.read().await[..], b"+OK\r\n");
    assert_eq!(&a.read().await[..], b"+OK\r\n");
    assert_eq!(&a.read().await[..], b"+OK\r\n");
    let mut d = redis.direct().await;
    let _: () = redis::cmd("SELECT")
        .arg(1)
        .query_async(&mut d)
        .await
        .unwrap();
    let n: i64 = d.exists("in-db1").await.unwrap();
    assert_eq!(n, 1);
}

/// Run `script` on a fresh connection to `addr`, reading the given number
/// of frames after each command.
async fn run_frames(addr: std::net::SocketAddr, script: &[(Vec<&[u8]>, usize)]) -> Vec<String> {
    let mut c = Raw::connect(addr).await;
    let mut out = Vec::new();
    for (cmd, n) in script {
        c.cmd(cmd).await;
        for _ in 0..*n {
            out.push(String::from_utf8_lossy(&normalize_hello_id(&c.read().await)).into_owned());
        }
    }
    out
}

fn addr_of(r: &RedisServer) -> std::net::SocketAddr {
    std::net::SocketAddr::from(([127, 0, 0, 1], r.port))
}

/// UNSUBSCRIBE (and PUNSUBSCRIBE, SUNSUBSCRIBE) of channels the client is
/// not subscribed to: one reply per channel, as Redis sends them (a client
/// waiting for three replies hung on the one it got), in both protocols.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsubscribe_without_subscriptions_answers_per_channel() {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let s = sidecar(&behind).await;
    for proto in [2, 3] {
        let mut script: Vec<(Vec<&[u8]>, usize)> = Vec::new();
        if proto == 3 {
            script.push((vec![b"HELLO", b"3"], 1));
        }
        script.extend([
            (vec![&b"UNSUBSCRIBE"[..], b"foo", b"bar", b"quux"], 3),
            (vec![&b"PUNSUBSCRIBE"[..], b"a*", b"b*"], 2),
            (vec![&b"SUNSUBSCRIBE"[..], b"x", b"y", b"z"], 3),
            (vec![&b"UNSUBSCRIBE"[..]], 1),
            (vec![&b"PUNSUBSCRIBE"[..]], 1),
            (vec![&b"PING"[..]], 1),
            // Subscribed to one, unsubscribing from it and another.
            (vec![&b"SUBSCRIBE"[..], b"foo"], 1),
            (vec![&b"UNSUBSCRIBE"[..], b"foo", b"bar"], 2),
            (vec![&b"PING"[..]], 1),
        ]);
        let want = run_frames(addr_of(&direct), &script).await;
        let got = run_frames(s.addr, &script).await;
        assert_eq!(got, want, "RESP{proto}");
    }
}

/// `CLIENT TRACKING on REDIRECT <its own id>`: Redis accepts it (redis-py's
/// suite does it in both protocols); it failed with "does not exist".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tracking_redirect_to_itself_is_accepted() {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    let s = sidecar(&behind).await;
    for proto in [2, 3] {
        let mut replies = Vec::new();
        for addr in [addr_of(&direct), s.addr] {
            let mut c = Raw::connect(addr).await;
            if proto == 3 {
                c.call(&[b"HELLO", b"3"]).await;
            }
            let id = c.call(&[b"CLIENT", b"ID"]).await;
            let id = id[1..id.len() - 2].to_vec();
            let mut got = vec![
                c.call(&[b"CLIENT", b"TRACKING", b"on", b"REDIRECT", &id])
                    .await,
            ];
            got.push(c.call(&[b"GET", b"k"]).await);
            got.push(c.call(&[b"CLIENT", b"TRACKING", b"off"]).await);
            got.push(c.call(&[b"PING"]).await);
            replies.push(got);
        }
        assert_eq!(replies[1], replies[0], "RESP{proto}");
        assert_eq!(&replies[1][0][..], b"+OK\r\n");
    }
}

/// AUTH as a user without `+select` from a client in db 2: Redis keeps the
/// connection's db without a SELECT; the sidecar set the new identity's
/// connection up with one the user may not run (NOPERM).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_as_a_user_who_may_not_select_keeps_the_db() {
    let direct = RedisServer::start();
    let behind = RedisServer::start();
    for r in [&direct, &behind] {
        let mut c = r.direct().await;
        let _: () = redis::cmd("ACL")
            .arg(&[
                "SETUSER", "nosel", "on", ">p", "~*", "&*", "+@all", "-select",
            ])
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let s = sidecar(&behind).await;
    let script: Vec<Vec<&[u8]>> = vec![
        vec![b"SELECT", b"2"],
        vec![b"AUTH", b"nosel", b"p"],
        vec![b"SET", b"in-db-2", b"v"],
        vec![b"ACL", b"WHOAMI"],
        vec![b"HELLO", b"3", b"AUTH", b"nosel", b"p"],
        vec![b"SET", b"after-hello", b"v"],
        vec![b"SELECT", b"1"],
    ];
    let want = run(addr_of(&direct), &script).await;
    let got = run(s.addr, &script).await;
    for (i, (w, g)) in want.iter().zip(&got).enumerate() {
        assert_eq!(
            String::from_utf8_lossy(g),
            String::from_utf8_lossy(w),
            "reply {i}"
        );
    }
    assert_eq!(keyspace(&behind).await, keyspace(&direct).await);
    assert!(
        keyspace(&behind)
            .await
            .contains(&(2, "in-db-2".to_string()))
    );
}

/// MULTI while Redis is busy in a long script: Redis takes MULTI, refuses
/// the queued command with -BUSY and answers EXEC with EXECABORT; the
/// sidecar could not set the transaction's connection up and answered EXEC
/// with "EXEC without MULTI".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_while_redis_is_busy_in_a_script_as_redis() {
    let direct = RedisServer::start_with(&["--busy-reply-threshold", "50"]);
    let behind = RedisServer::start_with(&["--busy-reply-threshold", "50"]);
    let s = sidecar(&behind).await;
    // Warm the sidecar's shared connection (a new client's first command).
    let mut warm = Raw::connect(s.addr).await;
    assert_eq!(&warm.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let busy: &[u8] = b"local t = redis.call('TIME') while true do local n = redis.call('TIME') if (n[1] - t[1]) * 1000000 + n[2] - t[2] > 1500000 then break end end return 1";
    let mut results = Vec::new();
    for (r, addr) in [(&direct, addr_of(&direct)), (&behind, s.addr)] {
        // A client in db 1 with a name (what its transaction's connection
        // is set up with), before Redis gets busy.
        let mut c = Raw::connect(addr).await;
        assert_eq!(&c.call(&[b"SELECT", b"1"]).await[..], b"+OK\r\n");
        assert_eq!(
            &c.call(&[b"CLIENT", b"SETNAME", b"n"]).await[..],
            b"+OK\r\n"
        );
        let mut script = Raw::connect(addr_of(r)).await;
        script.cmd(&[b"EVAL", busy, b"0"]).await;
        // Busy once Redis answers -BUSY to a probe.
        let probe_at = addr_of(r);
        assert!(
            eventually(|| async move {
                Raw::connect(probe_at)
                    .await
                    .call(&[b"GET", b"x"])
                    .await
                    .starts_with(b"-BUSY")
            })
            .await
        );
        let mut got = Vec::new();
        for cmd in [&[&b"MULTI"[..]][..], &[b"SET", b"k", b"v"], &[b"EXEC"]] {
            got.push(String::from_utf8_lossy(&c.call(cmd).await).into_owned());
        }
        assert_eq!(&script.read().await[..], b":1\r\n");
        results.push(got);
    }
    assert_eq!(results[1][0], results[0][0], "MULTI");
    assert!(results[1][1].starts_with("-BUSY"), "{:?}", results[1]);
    assert_eq!(results[1][2], results[0][2], "EXEC");
    assert!(results[0][2].starts_with("-EXECABORT"), "{:?}", results[0]);
}

/// `CLIENT KILL TYPE replica` (and `slave`) ends a client that streams
/// replication (SYNC/PSYNC) through the sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_kill_type_replica_ends_a_syncing_client() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    for kind in [&b"replica"[..], b"slave"] {
        let mut replica = Raw::connect(s.addr).await;
        replica.cmd(&[b"PSYNC", b"?", b"-1"]).await;
        // +FULLRESYNC arrives first (after newlines Redis sends while it
        // saves; raw bytes, not RESP framing after).
        let mut got = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), async {
            let mut buf = [0u8; 4096];
            while !got.windows(11).any(|w| w == b"+FULLRESYNC") {
                let n = tokio::io::AsyncReadExt::read(&mut replica.stream, &mut buf)
                    .await
                    .unwrap();
                assert!(n > 0, "closed before +FULLRESYNC");
                got.extend_from_slice(&buf[..n]);
            }
        })
        .await
        .unwrap();
        let mut admin = Raw::connect(s.addr).await;
        let list = admin.call(&[b"CLIENT", b"LIST", b"TYPE", kind]).await;
        assert!(
            String::from_utf8_lossy(&list).contains("flags=S"),
            "{}",
            String::from_utf8_lossy(&list)
        );
        assert_eq!(
            &admin.call(&[b"CLIENT", b"KILL", b"TYPE", kind]).await[..],
            b":1\r\n"
        );
        assert!(replica.closed().await);
        assert_eq!(
            &admin.call(&[b"CLIENT", b"KILL", b"TYPE", kind]).await[..],
            b":0\r\n"
        );
    }
}
