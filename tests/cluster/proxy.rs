//! The sidecar in front of a real 3-master, 3-replica Redis Cluster: the
//! app sees one plain Redis. Replies are compared byte for byte with a
//! single Redis given the same commands (RESP2 and RESP3).

use std::time::Duration;

use crate::support::*;
use redis_sidecar::policy::Builder;

fn args(line: &str) -> Vec<Vec<u8>> {
    line.split(' ').map(|a| a.as_bytes().to_vec()).collect()
}

/// Where a test's single Redis listens.
fn addr_of(r: &RedisServer) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", r.port).parse().unwrap()
}

/// Replies as text, for comparisons that print well.
fn show(v: &[bytes::Bytes]) -> Vec<String> {
    v.iter()
        .map(|b| String::from_utf8_lossy(b).into_owned())
        .collect()
}

async fn call(c: &mut Raw, line: &str) -> bytes::Bytes {
    let a = args(line);
    let refs: Vec<&[u8]> = a.iter().map(|x| &x[..]).collect();
    c.call(&refs).await
}

/// Every command family, and multi-key commands split across slots,
/// answer exactly what a single Redis answers.
#[tokio::test]
async fn commands_answer_what_a_single_redis_answers() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let script = [
        "PING",
        "ECHO hello",
        "SELECT 0",
        "SET a 1",
        "SET b 2 PX 100000",
        "GET a",
        "INCR counter",
        "INCRBY counter 41",
        "GET nope",
        "MSET k1 v1 k2 v2 k3 v3 {k1}x vx k4 v4",
        "MGET k1 k2 nope k3 {k1}x k4 k1",
        "EXISTS k1 k2 nope k1 {k1}x",
        "TOUCH k1 k4 nope",
        "DEL k1 nope k4",
        "MGET k1 k2 k3 k4",
        "UNLINK k2 k3 {k1}x",
        "HSET h f1 v1 f2 v2",
        "HGETALL h",
        "HINCRBY h n 5",
        "LPUSH l a b c",
        "LRANGE l 0 -1",
        "RPOP l",
        "SADD s x y",
        "SISMEMBER s x",
        "ZADD z 1 one 2.5 two",
        "ZRANGE z 0 -1 WITHSCORES",
        "ZSCORE z two",
        "XADD st 1-1 f v",
        "XRANGE st - +",
        "XLEN st",
        "EVAL return(redis.call('GET',KEYS[1])) 1 a",
        "EVAL return(ARGV[1]) 0 hi",
        "SCRIPT LOAD return(1)",
        "EVALSHA e0e1f9fabfc9d4800c877a703b823ac0578ff8db 0",
        "SCRIPT EXISTS e0e1f9fabfc9d4800c877a703b823ac0578ff8db 0000000000000000000000000000000000000000",
        "TYPE h",
        "EXPIRE a 100",
        "PERSIST a",
        "TTL a",
        "GETDEL a",
        "SET {t}1 x",
        "RENAME {t}1 {t}2",
        "GET {t}2",
        "DBSIZE",
        "FLUSHALL",
        "DBSIZE",
        "MGET a b",
        "RANDOMKEY",
        "KEYS *",
    ];
    for proto in ["2", "3"] {
        let mut direct = Raw::connect(format!("127.0.0.1:{}", single.port).parse().unwrap()).await;
        let mut via = Raw::connect(s.addr).await;
        call(&mut direct, "FLUSHALL").await;
        call(&mut via, "FLUSHALL").await;
        let hello = format!("HELLO {proto}");
        call(&mut direct, &hello).await;
        call(&mut via, &hello).await;
        for line in script {
            let want = call(&mut direct, line).await;
            let got = call(&mut via, line).await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(&want),
                "RESP{proto}: {line}"
            );
        }
        // What a cluster cannot do without changing its meaning is refused
        // with Redis's own error, before anything runs.
        call(&mut via, "SET x 1").await;
        for line in [
            "RENAME x y",
            "MSETNX x 1 y 2",
            "SMOVE x y m",
            "SUNIONSTORE d x y",
            "LMOVE x y LEFT RIGHT",
            "EVAL return(1) 2 x y",
            "PFCOUNT x y",
        ] {
            let got = call(&mut via, line).await;
            assert_eq!(
                &got[..],
                b"-CROSSSLOT Keys in request don't hash to the same slot\r\n",
                "{line}"
            );
        }
        assert_eq!(&call(&mut via, "GET x").await[..], b"$1\r\n1\r\n");
        let e = call(&mut via, "SELECT 1").await;
        assert_eq!(&e[..], b"-ERR SELECT is not allowed in cluster mode\r\n");
    }
    // The writes really went to the owners: every key is where the
    // cluster says.
    let mut via = Raw::connect(s.addr).await;
    for i in 0..200 {
        call(&mut via, &format!("SET spread:{i} {i}")).await;
    }
    let mut total = 0;
    for n in &cluster.nodes {
        let mut c = Raw::connect(format!("127.0.0.1:{}", n.port).parse().unwrap()).await;
        let role = call(&mut c, "ROLE").await;
        if !role.starts_with(b"*3\r\n$6\r\nmaster") {
            continue;
        }
        let d = call(&mut c, "DBSIZE").await;
        let n: i64 = std::str::from_utf8(&d[1..d.len() - 2])
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 20, "{n} keys on one master");
        total += n;
    }
    assert_eq!(total, 201);
    assert_eq!(&call(&mut via, "DBSIZE").await[..], b":201\r\n");
}

/// SCAN through the sidecar visits every key exactly once while keys are
/// added, and KEYS sees them all.
#[tokio::test]
async fn scan_visits_every_key_once() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut c = client(&s).await;
    for chunk in (0..3000).collect::<Vec<_>>().chunks(500) {
        let mut p = redis::pipe();
        for i in chunk {
            p.set(format!("s:{i}"), 1).ignore();
        }
        let () = p.query_async(&mut c).await.unwrap();
    }
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let mut cursor: u64 = 0;
    let mut added = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("s:*")
            .arg("COUNT")
            .arg(200)
            .query_async(&mut c)
            .await
            .unwrap();
        for k in keys {
            *seen.entry(k).or_default() += 1;
        }
        let () = redis::cmd("SET")
            .arg(format!("s:new:{added}"))
            .arg(1)
            .query_async(&mut c)
            .await
            .unwrap();
        added += 1;
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    for i in 0..3000 {
        assert_eq!(seen.get(&format!("s:{i}")), Some(&1), "s:{i}");
    }
    assert!(seen.values().all(|&n| n == 1));
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("s:*")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(keys.len(), 3000 + added);
    // A cursor the sidecar never gave is refused clearly.
    let e = redis::cmd("SCAN")
        .arg("12345678901234567890")
        .query_async::<redis::Value>(&mut c)
        .await
        .unwrap_err();
    assert!(
        e.to_string().contains("cursor") || e.to_string().contains("SCAN"),
        "{e}"
    );
}

/// MULTI/EXEC and WATCH in one slot, cross-slot refusal inside a
/// transaction, blocking pops released by another client, pub/sub and
/// sharded pub/sub across nodes.
#[tokio::test]
async fn stateful_clients() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut c = Raw::connect(s.addr).await;
    // A transaction in one slot.
    assert_eq!(&call(&mut c, "MULTI").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut c, "SET {u1}a 1").await[..], b"+QUEUED\r\n");
    assert_eq!(&call(&mut c, "INCR {u1}b").await[..], b"+QUEUED\r\n");
    assert_eq!(&call(&mut c, "EXEC").await[..], b"*2\r\n+OK\r\n:1\r\n");
    // Another slot inside it: CROSSSLOT at queue time, EXECABORT.
    assert_eq!(&call(&mut c, "MULTI").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut c, "SET {u1}a 2").await[..], b"+QUEUED\r\n");
    assert_eq!(
        &call(&mut c, "SET {u2}a 2").await[..],
        b"-CROSSSLOT Keys in request don't hash to the same slot\r\n"
    );
    assert_eq!(
        &call(&mut c, "EXEC").await[..],
        b"-EXECABORT Transaction discarded because of previous errors.\r\n"
    );
    assert_eq!(&call(&mut c, "GET {u1}a").await[..], b"$1\r\n1\r\n");
    // WATCH: a write by another client aborts the transaction.
    let mut other = Raw::connect(s.addr).await;
    assert_eq!(&call(&mut c, "WATCH {u1}a").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut other, "SET {u1}a 9").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut c, "MULTI").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut c, "SET {u1}a 3").await[..], b"+QUEUED\r\n");
    assert_eq!(&call(&mut c, "EXEC").await[..], b"*-1\r\n");
    assert_eq!(&call(&mut c, "GET {u1}a").await[..], b"$1\r\n9\r\n");
    // Blocking pops on several nodes, released by another client.
    for key in ["q:1", "q:2", "q:3", "q:4"] {
        let mut b = Raw::connect(s.addr).await;
        b.cmd(&[b"BLPOP", key.as_bytes(), b"5"]).await;
        assert!(eventually(|| async { cluster_blocked(&cluster).await == 1 }).await);
        assert_eq!(
            &call(&mut other, &format!("RPUSH {key} job")).await[..],
            b":1\r\n"
        );
        let r = b.read().await;
        assert_eq!(
            String::from_utf8_lossy(&r),
            format!("*2\r\n$3\r\n{key}\r\n$3\r\njob\r\n")
        );
    }
    // Pub/sub: a message published through any node reaches the
    // subscriber.
    let mut sub = Raw::connect(s.addr).await;
    let r = call(&mut sub, "SUBSCRIBE news").await;
    assert!(r.starts_with(b"*3\r\n$9\r\nsubscribe"), "{r:?}");
    for n in &cluster.nodes {
        let mut p = Raw::connect(format!("127.0.0.1:{}", n.port).parse().unwrap()).await;
        call(&mut p, &format!("PUBLISH news from-{}", n.port)).await;
        let m = sub.read().await;
        let want = format!("from-{}", n.port);
        assert!(String::from_utf8_lossy(&m).contains(&want), "{m:?} {want}");
    }
    // Sharded pub/sub: routed by the channel's slot.
    let mut ssub = Raw::connect(s.addr).await;
    let r = call(&mut ssub, "SSUBSCRIBE orders").await;
    assert!(r.starts_with(b"*3\r\n$10\r\nssubscribe"), "{r:?}");
    assert_eq!(&call(&mut other, "SPUBLISH orders o1").await[..], b":1\r\n");
    let m = ssub.read().await;
    assert!(String::from_utf8_lossy(&m).contains("o1"), "{m:?}");
}

/// Cluster-aware clients probing the sidecar see one node owning every
/// slot (so they stay in single-node mode); INFO says it is a single node
/// and where its fields came from.
#[tokio::test]
async fn cluster_probes_see_one_node() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut c = Raw::connect(s.addr).await;
    let port = s.addr.port();
    let slots = call(&mut c, "CLUSTER SLOTS").await;
    let text = String::from_utf8_lossy(&slots);
    assert!(
        text.starts_with("*1\r\n*3\r\n:0\r\n:16383\r\n*4\r\n$9\r\n127.0.0.1\r\n")
            && text.contains(&format!(":{port}\r\n")),
        "{text}"
    );
    let nodes = call(&mut c, "CLUSTER NODES").await;
    let text = String::from_utf8_lossy(&nodes);
    assert!(
        text.contains(&format!(
            "127.0.0.1:{port}@{port} myself,master - 0 0 1 connected 0-16383"
        )),
        "{text}"
    );
    let shards = call(&mut c, "CLUSTER SHARDS").await;
    assert!(String::from_utf8_lossy(&shards).contains("16383"));
    let info = call(&mut c, "CLUSTER INFO").await;
    let text = String::from_utf8_lossy(&info);
    assert!(
        text.contains("cluster_state:ok") && text.contains("cluster_known_nodes:1"),
        "{text}"
    );
    let id = call(&mut c, "CLUSTER MYID").await;
    assert!(id.starts_with(b"$40\r\n"), "{id:?}");
    // What the sidecar knows of the cluster, in its metrics.
    assert_eq!(metric(&s, "cluster_nodes", &[("role", "master")]), 3.0);
    assert_eq!(metric(&s, "cluster_nodes", &[("role", "replica")]), 3.0);
    assert!(
        metric(
            &s,
            "cluster_slot_map_refreshes_total",
            &[("result", "read")]
        ) >= 1.0
    );
    assert!(
        metric(
            &s,
            "cluster_slot_map_refreshes_total",
            &[("result", "changed")]
        ) >= 1.0
    );
    let read_at = metric(&s, "cluster_slot_map_read_timestamp_seconds", &[]);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - read_at).abs() < 10.0, "read at {read_at}, now {now}");
    let info = call(&mut c, "INFO").await;
    let text = String::from_utf8_lossy(&info);
    assert!(text.contains("cluster_enabled:0\r\n"), "{text}");
    assert!(text.contains("maxmemory_policy:"), "{text}");
    assert!(text.contains("sidecar_info_from_node:127.0.0.1:"), "{text}");
    // redis-py and the redis crate in cluster mode would follow these; a
    // plain client simply works.
    let mut r = client(&s).await;
    let v: String = redis::cmd("INFO")
        .arg("server")
        .query_async(&mut r)
        .await
        .unwrap();
    assert!(v.contains("redis_version:"));
    // INFO went to a node: a connection to it is counted.
    assert!(metric(&s, "cluster_node_connections", &[]) >= 1.0);
}

/// The policies work on a cluster: a TTL rule's appended PEXPIRE reaches
/// the key's node, the sweeper walks every master, the L1 cache tracks
/// per node (a write straight to a node invalidates), and a shared rate
/// limit keeps its buckets on their keys' nodes.
#[tokio::test]
async fn policies_work_on_a_cluster() {
    let cluster = Cluster::start(3);
    let seed = format!("redis-cluster://127.0.0.1:{}", cluster.nodes[0].port);
    let mut c = config(&seed);
    let mut rule = ttl_rule("sess:*", Some(Duration::from_secs(600)), None);
    rule.sweep_rate = std::num::NonZeroU32::new(100_000);
    rule.sweep_every = Duration::from_millis(200);
    c.ttl = vec![rule];
    c.cache =
        toml::from_str("enabled = true\n[[rule]]\npattern = \"c:*\"\nttl = \"60s\"\n").unwrap();
    c.rate_limit = vec![
        toml::from_str(
            "name = \"rl\"\npattern = \"rl:*\"\nper = \"key\"\nscope = \"shared\"\nrate = \"1/min\"\nburst = 5\n",
        )
        .unwrap(),
    ];
    let s = sidecar_with(c, Builder::default()).await;
    wait_up(&s, 0).await;
    let mut via = Raw::connect(s.addr).await;
    // Where each key lives: ask the cluster.
    let owner = |key: &str| {
        let key = key.to_string();
        let ports: Vec<u16> = cluster.nodes.iter().map(|n| n.port).collect();
        async move {
            for p in ports {
                let mut n = Raw::connect(format!("127.0.0.1:{p}").parse().unwrap()).await;
                let r = n.call(&[b"READONLY"]).await;
                let _ = r;
                let t = call(&mut n, &format!("PTTL {key}")).await;
                if !t.starts_with(b"-MOVED")
                    && n.call(&[b"ROLE"]).await.starts_with(b"*3\r\n$6\r\nmaster")
                {
                    return n;
                }
            }
            panic!("no master owns {key}");
        }
    };
    // TTL rule: the PEXPIRE appended to each SET ran on the key's node.
    for i in 0..30 {
        assert_eq!(
            &call(&mut via, &format!("SET sess:{i} v")).await[..],
            b"+OK\r\n"
        );
        let mut n = owner(&format!("sess:{i}")).await;
        let t = call(&mut n, &format!("PTTL sess:{i}")).await;
        let ms: i64 = std::str::from_utf8(&t[1..t.len() - 2])
            .unwrap()
            .parse()
            .unwrap();
        assert!(ms > 590_000, "sess:{i}: {ms}");
    }
    // The sweeper finds keys written around the sidecar on every master.
    for i in 0..30 {
        let mut n = owner(&format!("sess:old:{i}")).await;
        call(&mut n, &format!("SET sess:old:{i} v")).await;
    }
    assert!(
        eventually(|| async {
            let mut all = true;
            for i in 0..30 {
                let t = call(
                    &mut Raw::connect(s.addr).await,
                    &format!("PTTL sess:old:{i}"),
                )
                .await;
                all &= &t[..] != b":-1\r\n";
            }
            all
        })
        .await,
        "the sweeper did not reach every master"
    );
    // The cache: hits, and a write straight to the key's node invalidates
    // through that node's tracking connection.
    for i in 0..12 {
        let key = format!("c:{i}");
        call(&mut via, &format!("SET {key} one")).await;
        assert_eq!(
            &call(&mut via, &format!("GET {key}")).await[..],
            b"$3\r\none\r\n"
        );
        assert_eq!(
            &call(&mut via, &format!("GET {key}")).await[..],
            b"$3\r\none\r\n"
        );
        let mut n = owner(&key).await;
        call(&mut n, &format!("SET {key} two")).await;
        assert!(
            eventually(|| async {
                &call(&mut Raw::connect(s.addr).await, &format!("GET {key}")).await[..]
                    == b"$3\r\ntwo\r\n"
            })
            .await,
            "{key} stayed stale"
        );
    }
    assert!(metric(&s, "cache_requests_total", &[("result", "hit")]) >= 12.0);
    // MGET per key across slots (so masters): a partial hit fills the
    // missing keys one MGET per slot, then every element is a hit.
    let all = "MGET c:0 c:1 c:2 c:3 c:4 c:5 c:6 c:7 c:8 c:9 c:10 c:11";
    let want = call(&mut via, "MGET c:0 c:1 c:2 c:3 c:4 c:5").await;
    assert_eq!(want.iter().filter(|&&b| b == b'$').count(), 6, "{want:?}");
    let first = call(&mut via, all).await;
    let hits = metric(&s, "cache_requests_total", &[("result", "hit")]);
    assert_eq!(call(&mut via, all).await, first);
    assert_eq!(
        metric(&s, "cache_requests_total", &[("result", "hit")]),
        hits + 1.0
    );
    assert_eq!(
        String::from_utf8_lossy(&first)
            .matches("$3\r\ntwo\r\n")
            .count(),
        12,
        "{first:?}"
    );
    // A shared rate limit: buckets of keys on different nodes, each with
    // its burst of 5.
    for key in ["rl:a", "rl:b", "rl:c"] {
        let mut allowed = 0;
        for _ in 0..10 {
            let r = call(&mut via, &format!("GET {key}")).await;
            if !r.starts_with(b"-ERR rate limit exceeded") {
                allowed += 1;
            }
        }
        assert_eq!(allowed, 5, "{key}");
    }
    assert_eq!(
        metric(&s, "ratelimit_shared_calls_total", &[("result", "error")]),
        0.0
    );
}

/// A script loaded through the sidecar is loaded again on a node that lost
/// it (a failover, a resharding to a node that never had it): the EVALSHA
/// that got NOSCRIPT runs once more there, and the client never sees it.
/// A script the sidecar never saw loaded still gets Redis's NOSCRIPT.
#[tokio::test]
async fn evalsha_survives_a_node_without_the_script() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut via = Raw::connect(s.addr).await;
    let sha = call(&mut via, "SCRIPT LOAD return(redis.call('INCR',KEYS[1]))").await;
    assert!(sha.starts_with(b"$40\r\n"), "{sha:?}");
    let sha = String::from_utf8_lossy(&sha[5..45]).into_owned();
    // Every node forgets its scripts behind the sidecar's back.
    for n in &cluster.nodes {
        let mut d = Raw::connect(format!("127.0.0.1:{}", n.port).parse().unwrap()).await;
        call(&mut d, "SCRIPT FLUSH").await;
    }
    for i in 0..20 {
        let r = call(&mut via, &format!("EVALSHA {sha} 1 n:{i}")).await;
        assert_eq!(&r[..], b":1\r\n", "n:{i}");
    }
    assert!(metric(&s, "cluster_redirects_total", &[("kind", "noscript")]) >= 1.0);
    let r = call(
        &mut via,
        "EVALSHA 0000000000000000000000000000000000000000 1 x",
    )
    .await;
    assert!(r.starts_with(b"-NOSCRIPT"), "{r:?}");
}

/// A client that leaves while blocked on a cluster node leaves nothing
/// blocked there: the next push is not stolen.
#[tokio::test]
async fn a_blocked_client_that_leaves_leaves_nothing_on_the_node() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    for key in ["gone:1", "gone:2", "gone:3"] {
        let mut b = Raw::connect(s.addr).await;
        b.cmd(&[b"BLPOP", key.as_bytes(), b"0"]).await;
        assert!(eventually(|| async { cluster_blocked(&cluster).await == 1 }).await);
        drop(b);
        // Nothing left blocked on the node once the client is gone.
        assert!(eventually(|| async { cluster_blocked(&cluster).await == 0 }).await);
        let mut c = Raw::connect(s.addr).await;
        assert_eq!(
            &call(&mut c, &format!("RPUSH {key} job")).await[..],
            b":1\r\n"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(
            &call(&mut c, &format!("LLEN {key}")).await[..],
            b":1\r\n",
            "{key}"
        );
    }
    for n in &cluster.nodes {
        assert_eq!(blocked_clients(n).await, 0, "node {}", n.port);
    }
}

/// A slot that moves under a client's transaction ends that client's
/// state as a failover does: the command gets an error that says so and
/// the client is closed (it reconnects and retries the transaction).
#[tokio::test]
async fn a_slot_moving_under_a_transaction_closes_the_client() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(&call(&mut c, "MULTI").await[..], b"+OK\r\n");
    assert_eq!(&call(&mut c, "SET {mv}a 1").await[..], b"+QUEUED\r\n");
    // Move the (empty) slot to another master behind the sidecar's back.
    let slot = redis_sidecar::upstream::cluster::key_slot(b"{mv}a");
    let mut masters = Vec::new();
    for n in &cluster.nodes {
        let mut d = Raw::connect(format!("127.0.0.1:{}", n.port).parse().unwrap()).await;
        if call(&mut d, "ROLE")
            .await
            .starts_with(b"*3\r\n$6\r\nmaster")
        {
            let id = call(&mut d, "CLUSTER MYID").await;
            let id = String::from_utf8_lossy(&id[5..45]).into_owned();
            let owns = !call(&mut d, "GET {mv}a").await.starts_with(b"-MOVED");
            masters.push((d, id, owns));
        }
    }
    let to = masters.iter().position(|m| !m.2).unwrap();
    let to_id = masters[to].1.clone();
    let mut order: Vec<usize> = vec![to];
    order.extend((0..masters.len()).filter(|&i| i != to));
    for i in order {
        let r = call(
            &mut masters[i].0,
            &format!("CLUSTER SETSLOT {slot} NODE {to_id}"),
        )
        .await;
        assert_eq!(&r[..], b"+OK\r\n");
    }
    let r = call(&mut c, "SET {mv}b 2").await;
    assert!(
        String::from_utf8_lossy(&r).contains("moved this key's slot"),
        "{r:?}"
    );
    assert!(
        c.closed().await,
        "the client stays open after losing its transaction"
    );
    // A new connection works against the new owner.
    let mut again = Raw::connect(s.addr).await;
    assert_eq!(&call(&mut again, "SET {mv}a 1").await[..], b"+OK\r\n");
}

/// A cluster endpoint in the failover list like any other: an app on a
/// single Redis is switched live to the cluster (and back), its
/// connection kept; its writes land where the active endpoint is.
#[tokio::test]
async fn live_switch_between_a_single_redis_and_a_cluster() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = sidecar_with(
        config_multi(&[
            ("single", single.url()),
            (
                "cluster",
                format!("redis-cluster://127.0.0.1:{}", cluster.nodes[0].port),
            ),
        ]),
        Builder::default(),
    )
    .await;
    wait_up(&s, 1).await;
    let mut c = client(&s).await;
    let () = redis::cmd("SET")
        .arg("where")
        .arg("single")
        .query_async(&mut c)
        .await
        .unwrap();
    let (st, body) = http(
        s.admin_addr.unwrap(),
        "POST",
        "/upstreams/cluster/activate",
        None,
    )
    .await;
    assert_eq!(st, 200, "{body}");
    // The same connection now writes to the cluster (keys on every master).
    for i in 0..50 {
        let () = redis::cmd("SET")
            .arg(format!("moved:{i}"))
            .arg(i)
            .query_async(&mut c)
            .await
            .unwrap();
    }
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut c).await.unwrap();
    assert_eq!(n, 50);
    let mut d = single.direct().await;
    let on_single: i64 = redis::cmd("DBSIZE").query_async(&mut d).await.unwrap();
    assert_eq!(
        on_single, 1,
        "writes after the switch went to the single Redis"
    );
    let (st, _) = http(
        s.admin_addr.unwrap(),
        "POST",
        "/upstreams/single/activate",
        None,
    )
    .await;
    assert_eq!(st, 200);
    let v: String = redis::cmd("GET")
        .arg("where")
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(v, "single");
}

/// A slot in the middle of a migration, set up by hand (`CLUSTER SETSLOT
/// ... MIGRATING/IMPORTING` + `MIGRATE`): a key already moved is read
/// through ASK (ASKING + the command on the target), a multi-key read of a
/// half-moved slot gets TRYAGAIN and is retried until the move completes;
/// the client sees only the values.
#[tokio::test]
async fn ask_and_tryagain_during_a_migration() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut via = Raw::connect(s.addr).await;
    call(&mut via, "MSET {mig}a 1 {mig}b 2").await;
    let slot = redis_sidecar::upstream::cluster::key_slot(b"{mig}a");
    // The owner and another master.
    let mut src = None;
    let mut dst = None;
    for n in &cluster.nodes {
        let mut d = Raw::connect(format!("127.0.0.1:{}", n.port).parse().unwrap()).await;
        if !call(&mut d, "ROLE")
            .await
            .starts_with(b"*3\r\n$6\r\nmaster")
        {
            continue;
        }
        let id = call(&mut d, "CLUSTER MYID").await;
        let id = String::from_utf8_lossy(&id[5..45]).into_owned();
        if call(&mut d, "GET {mig}a").await.starts_with(b"-MOVED") {
            dst.get_or_insert((d, id, n.port));
        } else {
            src = Some((d, id, n.port));
        }
    }
    let (mut src, src_id, _) = src.unwrap();
    let (mut dst, dst_id, dst_port) = dst.unwrap();
    assert_eq!(
        &call(
            &mut dst,
            &format!("CLUSTER SETSLOT {slot} IMPORTING {src_id}")
        )
        .await[..],
        b"+OK\r\n"
    );
    assert_eq!(
        &call(
            &mut src,
            &format!("CLUSTER SETSLOT {slot} MIGRATING {dst_id}")
        )
        .await[..],
        b"+OK\r\n"
    );
    let r = call(
        &mut src,
        &format!("MIGRATE 127.0.0.1 {dst_port} {{mig}}a 0 5000"),
    )
    .await;
    assert_eq!(&r[..], b"+OK\r\n");
    // Moved already: ASK to the target.
    assert_eq!(&call(&mut via, "GET {mig}a").await[..], b"$1\r\n1\r\n");
    assert!(metric(&s, "cluster_redirects_total", &[("kind", "ask")]) >= 1.0);
    // Half moved and left so: after 5 retries (about 1.5 s) the client gets
    // the node's own TRYAGAIN.
    let r = call(&mut via, "MGET {mig}a {mig}b").await;
    assert!(r.starts_with(b"-TRYAGAIN"), "{r:?}");
    assert_eq!(
        metric(&s, "cluster_redirects_total", &[("kind", "exhausted")]),
        1.0
    );
    // Half moved: TRYAGAIN until the rest moves and the slot changes owner.
    let sidecar = s.addr;
    let read = tokio::spawn(async move {
        let mut c = Raw::connect(sidecar).await;
        call(&mut c, "MGET {mig}a {mig}b").await
    });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let r = call(
        &mut src,
        &format!("MIGRATE 127.0.0.1 {dst_port} {{mig}}b 0 5000"),
    )
    .await;
    assert_eq!(&r[..], b"+OK\r\n");
    for d in [&mut dst, &mut src] {
        call(d, &format!("CLUSTER SETSLOT {slot} NODE {dst_id}")).await;
    }
    let got = read.await.unwrap();
    assert_eq!(&got[..], b"*2\r\n$1\r\n1\r\n$1\r\n2\r\n");
    assert!(metric(&s, "cluster_redirects_total", &[("kind", "retry")]) >= 1.0);
}

/// A client's pipeline keeps its order across the two ways requests take
/// on a cluster: a write split by the router (MSET over two slots) is seen
/// by the single-key read that follows it, sent straight to the node.
#[tokio::test]
async fn a_pipeline_keeps_its_order_between_router_and_nodes() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let mut c = Raw::connect(s.addr).await;
    let mut out = Vec::new();
    for i in 0..500 {
        let v = format!("v{i}");
        out.extend_from_slice(
            &redis_sidecar::wire::encode_command(&[
                b"MSET" as &[u8],
                b"order:a",
                v.as_bytes(),
                b"order:b",
                v.as_bytes(),
            ])[..],
        );
        out.extend_from_slice(
            &redis_sidecar::wire::encode_command(&[b"GET" as &[u8], b"order:a"])[..],
        );
        out.extend_from_slice(
            &redis_sidecar::wire::encode_command(&[b"GET" as &[u8], b"order:b"])[..],
        );
    }
    c.send(&out).await;
    for i in 0..500 {
        assert_eq!(&c.read().await[..], b"+OK\r\n");
        let want = format!("${}\r\nv{i}\r\n", format!("v{i}").len());
        for key in ["a", "b"] {
            let got = c.read().await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                want,
                "round {i}, order:{key}"
            );
        }
    }
}

/// Functions reach every master (a library loaded through the sidecar is
/// called on keys of every slot, then deleted everywhere), an EVALSHA
/// after SCRIPT FLUSH meets NOSCRIPT, and READONLY/READWRITE are refused:
/// each reply byte for byte what a single Redis gives.
#[tokio::test]
async fn functions_script_flush_and_readonly_as_on_one_redis() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let lib = b"#!lua name=lib\nredis.register_function('incr2', function(keys) return redis.call('INCRBY', keys[1], 2) end)";
    let steps: Vec<Vec<&[u8]>> = vec![
        vec![b"FUNCTION", b"LOAD", lib],
        // Keys of different slots: different masters.
        vec![b"FCALL", b"incr2", b"1", b"a"],
        vec![b"FCALL", b"incr2", b"1", b"b"],
        vec![b"FCALL", b"incr2", b"1", b"c"],
        vec![b"FCALL", b"incr2", b"1", b"d"],
        vec![b"FUNCTION", b"LOAD", lib],
        vec![b"FUNCTION", b"LOAD", b"REPLACE", lib],
        vec![b"FUNCTION", b"DELETE", b"lib"],
        vec![b"FCALL", b"incr2", b"1", b"a"],
        vec![b"FCALL", b"incr2", b"1", b"b"],
        vec![b"FCALL", b"incr2", b"1", b"c"],
        vec![b"SCRIPT", b"LOAD", b"return 7"],
        vec![
            b"EVALSHA",
            b"8a5d5a1d2c5e6c7c8f3e7b1f1e0e3a2a9c3e2f5d",
            b"0",
        ],
        vec![b"SCRIPT", b"FLUSH"],
        vec![b"READONLY"],
        vec![b"READWRITE"],
    ];
    let mut direct = Raw::connect(format!("127.0.0.1:{}", single.port).parse().unwrap()).await;
    let mut via = Raw::connect(s.addr).await;
    // The sha of `return 7`, from Redis itself.
    let sha = direct.call(&[b"SCRIPT", b"LOAD", b"return 7"]).await;
    let sha = std::str::from_utf8(&sha)
        .unwrap()
        .lines()
        .nth(1)
        .unwrap()
        .to_string();
    direct.call(&[b"SCRIPT", b"FLUSH"]).await;
    let evalsha: Vec<&[u8]> = vec![b"EVALSHA", sha.as_bytes(), b"0"];
    for step in steps.iter().chain([&evalsha, &evalsha]) {
        let want = direct.call(step).await;
        let got = via.call(step).await;
        assert_eq!(
            String::from_utf8_lossy(&got),
            String::from_utf8_lossy(&want),
            "{:?}",
            step.iter()
                .map(|a| String::from_utf8_lossy(a))
                .collect::<Vec<_>>()
        );
    }
    s.shutdown().await;
}

/// `[cursor, sorted keys]` of a SCAN reply.
fn scan_page(r: &[u8]) -> (String, Vec<String>) {
    let text = String::from_utf8_lossy(r);
    let lines: Vec<&str> = text.split("\r\n").collect();
    let cursor = lines[2].to_string();
    let mut keys: Vec<String> = lines[4..]
        .iter()
        .filter(|l| !l.starts_with('$') && !l.is_empty())
        .map(|l| l.to_string())
        .collect();
    keys.sort();
    (cursor, keys)
}

/// On a small keyspace one SCAN call reads every key, as from one Redis
/// (cursor `0`), with TYPE and MATCH kept.
#[tokio::test]
async fn a_small_keyspace_is_scanned_in_one_call() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let mut direct = Raw::connect(format!("127.0.0.1:{}", single.port).parse().unwrap()).await;
    let mut via = Raw::connect(s.addr).await;
    for c in [&mut direct, &mut via] {
        for line in [
            "SET a 1",
            "SET b 2",
            "SET c 3",
            "SET d 4",
            "SET k1 x",
            "SADD myset m",
            "HSET myhash f v",
        ] {
            call(c, line).await;
        }
    }
    for line in [
        "SCAN 0",
        "SCAN 0 TYPE set",
        "SCAN 0 TYPE string COUNT 100",
        "SCAN 0 MATCH k* COUNT 100",
        "SCAN 0 TYPE hash",
    ] {
        let want = scan_page(&call(&mut direct, line).await);
        let got = scan_page(&call(&mut via, line).await);
        assert_eq!(got, want, "{line}");
        assert_eq!(got.0, "0", "{line}");
    }
    s.shutdown().await;
}

/// Subscribers on several channels and a pattern, through the sidecar in
/// front of the cluster and directly on a single Redis: PUBLISH counts
/// every receiver, PUBSUB NUMSUB, NUMPAT and CHANNELS see every
/// subscription, and every subscriber gets its messages, byte for byte as
/// from one Redis.
#[tokio::test]
async fn pubsub_counts_every_subscriber_as_on_one_redis() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let single_addr: std::net::SocketAddr = format!("127.0.0.1:{}", single.port).parse().unwrap();
    let subscriptions: [&[&[u8]]; 4] = [
        &[b"SUBSCRIBE", b"foo", b"bar", b"baz"],
        &[b"SUBSCRIBE", b"baz"],
        &[b"PSUBSCRIBE", b"b*"],
        &[b"SUBSCRIBE", b"baz", b"qux"],
    ];
    let mut replies = Vec::new();
    for addr in [single_addr, s.addr] {
        let mut subs = Vec::new();
        for sub in subscriptions {
            let mut c = Raw::connect(addr).await;
            c.cmd(sub).await;
            for _ in 1..sub.len() {
                c.read().await;
            }
            subs.push(c);
        }
        let mut p = Raw::connect(addr).await;
        let mut got = Vec::new();
        for line in [
            "PUBLISH baz m1",
            "PUBLISH foo m2",
            "PUBLISH nobody m3",
            "PUBSUB NUMSUB foo bar baz qux nobody",
            "PUBSUB NUMPAT",
        ] {
            got.push(call(&mut p, line).await);
        }
        let mut channels: Vec<String> =
            String::from_utf8_lossy(&call(&mut p, "PUBSUB CHANNELS").await)
                .split("\r\n")
                .filter(|l| !l.starts_with('*') && !l.starts_with('$') && !l.is_empty())
                .map(str::to_string)
                .collect();
        channels.sort();
        // What each subscriber received, in order.
        let mut messages = Vec::new();
        for (i, c) in subs.iter_mut().enumerate() {
            let n = match i {
                0 => 2, // baz, foo
                1 => 1,
                2 => 1, // b* matches baz
                _ => 1,
            };
            for _ in 0..n {
                messages.push(c.read().await);
            }
        }
        replies.push((got, channels, messages));
    }
    let show = |r: &[bytes::Bytes]| {
        r.iter()
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .collect::<Vec<_>>()
    };
    assert_eq!(show(&replies[1].0), show(&replies[0].0));
    assert_eq!(replies[1].1, replies[0].1);
    assert_eq!(show(&replies[1].2), show(&replies[0].2));
    s.shutdown().await;
}

/// The cluster's masters, from each node's ROLE.
async fn masters(cluster: &Cluster) -> Vec<std::net::SocketAddr> {
    let mut out = Vec::new();
    for n in &cluster.nodes {
        let addr: std::net::SocketAddr = format!("127.0.0.1:{}", n.port).parse().unwrap();
        let mut c = Raw::connect(addr).await;
        if c.call(&[b"ROLE"]).await.starts_with(b"*3\r\n$6\r\nmaster") {
            out.push(addr);
        }
    }
    out
}

/// MONITOR through the sidecar sees the commands of every master, as
/// MONITOR on one Redis sees all: `+OK` first (never a line before it,
/// though other clients write meanwhile), then the lines of commands on
/// keys of every master; a monitor that leaves leaves no MONITOR running
/// on any node.
#[tokio::test]
async fn monitor_sees_every_master_and_leaves_nothing_behind() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let single_addr = addr_of(&single);
    for addr in [single_addr, s.addr] {
        // Another client writes on every master all along.
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut w = Raw::connect(addr).await;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    for k in ["a", "b", "c"] {
                        call(&mut w, &format!("SET {k} busy")).await;
                    }
                }
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let mut m = Raw::connect(addr).await;
        assert_eq!(&m.call(&[b"MONITOR"]).await[..], b"+OK\r\n", "{addr}");
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        writer.await.unwrap();
        // Keys of the three masters (slots 15495, 3300, 7365), then a
        // marker: every one of them is seen before the marker.
        let mut c = Raw::connect(addr).await;
        for line in ["SET a seen", "SET b seen", "SET c seen", "GET monitor-end"] {
            call(&mut c, line).await;
        }
        let mut seen = Vec::new();
        loop {
            let line = String::from_utf8_lossy(&m.read().await).into_owned();
            assert!(line.starts_with('+') && line != "+OK\r\n", "{line}");
            if line.contains("\"monitor-end\"") {
                break;
            }
            if line.contains("\"seen\"") {
                seen.push(line.split("] ").nth(1).unwrap_or_default().to_string());
            }
        }
        seen.sort();
        assert_eq!(
            seen,
            [
                "\"SET\" \"a\" \"seen\"\r\n",
                "\"SET\" \"b\" \"seen\"\r\n",
                "\"SET\" \"c\" \"seen\"\r\n"
            ],
            "{addr}"
        );
    }
    // One MONITOR through the sidecar is one on every master; once its
    // client leaves, none is left.
    let masters = masters(&cluster).await;
    assert_eq!(masters.len(), 3);
    let monitors = || async {
        let mut n = 0;
        for a in &masters {
            let mut d = Raw::connect(*a).await;
            let list = d.call(&[b"CLIENT", b"LIST"]).await;
            n += String::from_utf8_lossy(&list).matches("flags=O").count();
        }
        n
    };
    assert!(eventually(|| async { monitors().await == 0 }).await);
    let mut m = Raw::connect(s.addr).await;
    assert_eq!(&m.call(&[b"MONITOR"]).await[..], b"+OK\r\n");
    assert_eq!(monitors().await, 3);
    drop(m);
    assert!(eventually(|| async { monitors().await == 0 }).await);
    s.shutdown().await;
}

/// SLOWLOG through the sidecar is every master's, as one Redis's is its
/// own: GET newest first (to the second: an entry's time is in seconds),
/// ids unique, with its count; LEN summed; RESET on every master.
#[tokio::test]
async fn slowlog_is_every_masters() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let single_addr = addr_of(&single);
    let mut nodes = masters(&cluster).await;
    nodes.push(single_addr);
    for a in &nodes {
        let mut d = Raw::connect(*a).await;
        call(&mut d, "CONFIG SET slowlog-log-slower-than 10000").await;
        call(&mut d, "SLOWLOG RESET").await;
    }
    // A script busy for 20 ms on a key of each master.
    let slow = "local s = redis.call('TIME') repeat local n = redis.call('TIME') until (n[1] - s[1]) * 1000000 + (n[2] - s[2]) > 20000 return 1";
    let mut got = Vec::new();
    for addr in [single_addr, s.addr] {
        let mut c = Raw::connect(addr).await;
        for key in ["a", "b", "c"] {
            let r = c
                .call(&[b"EVAL", slow.as_bytes(), b"1", key.as_bytes()])
                .await;
            assert_eq!(&r[..], b":1\r\n");
            // An entry's time is in seconds: the next one's is later.
            tokio::time::sleep(Duration::from_millis(1100)).await;
        }
        let len = call(&mut c, "SLOWLOG LEN").await;
        let all = call(&mut c, "SLOWLOG GET").await;
        let two = call(&mut c, "SLOWLOG GET 2").await;
        let reset = call(&mut c, "SLOWLOG RESET").await;
        let after = call(&mut c, "SLOWLOG LEN").await;
        got.push((len, all, two, reset, after));
    }
    // (ids, keys) of a SLOWLOG GET reply, in its order.
    let entries = |r: &bytes::Bytes| -> (Vec<i64>, Vec<String>) {
        let v = redis::parse_redis_value(r).unwrap();
        let redis::Value::Array(es) = v else {
            panic!("{v:?}")
        };
        es.iter()
            .map(|e| {
                let redis::Value::Array(f) = e else {
                    panic!("{e:?}")
                };
                let (redis::Value::Int(id), redis::Value::Array(args)) = (&f[0], &f[3]) else {
                    panic!("{f:?}")
                };
                let redis::Value::BulkString(key) = &args[3] else {
                    panic!("{args:?}")
                };
                (*id, String::from_utf8_lossy(key).into_owned())
            })
            .unzip()
    };
    let (one, cl) = (&got[0], &got[1]);
    assert_eq!(cl.0, one.0, "LEN");
    assert_eq!(&cl.0[..], b":3\r\n");
    assert_eq!(entries(&cl.1).1, ["c", "b", "a"], "newest first");
    assert_eq!(entries(&cl.1).1, entries(&one.1).1);
    let mut ids = entries(&cl.1).0;
    ids.dedup();
    assert_eq!(ids.len(), 3, "unique ids: {ids:?}");
    assert_eq!(entries(&cl.2).1, ["c", "b"]);
    assert_eq!((&cl.3, &cl.4), (&one.3, &one.4));
    for a in &nodes[..3] {
        let mut d = Raw::connect(*a).await;
        assert_eq!(&call(&mut d, "SLOWLOG LEN").await[..], b":0\r\n", "{a}");
    }
    s.shutdown().await;
}

/// Shard channels of several slots (so several masters) in one
/// SSUBSCRIBE: confirmations in order, each counting the client's shard
/// channels on every node, SUNSUBSCRIBE without channels ends them all,
/// SPUBLISH reaches the subscriber: byte for byte as from one Redis, in
/// RESP2 and RESP3.
#[tokio::test]
async fn shard_channels_count_as_on_one_redis() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let single_addr = addr_of(&single);
    for hello in ["HELLO 2", "HELLO 3"] {
        let mut runs = Vec::new();
        for addr in [single_addr, s.addr] {
            let mut c = Raw::connect(addr).await;
            call(&mut c, hello).await;
            let mut got = Vec::new();
            // (command, confirmations it gets)
            for (line, n) in [
                ("SSUBSCRIBE foo bar", 2),
                ("SSUBSCRIBE baz", 1),
                ("SSUBSCRIBE foo", 1),
                ("SUNSUBSCRIBE foo nothere", 2),
            ] {
                let a = args(line);
                let refs: Vec<&[u8]> = a.iter().map(|x| &x[..]).collect();
                c.cmd(&refs).await;
                for _ in 0..n {
                    got.push(c.read().await);
                }
            }
            let mut p = Raw::connect(addr).await;
            got.push(call(&mut p, "SPUBLISH bar hello").await);
            got.push(call(&mut p, "SPUBLISH foo nobody").await);
            got.push(c.read().await);
            // Unsubscribe from all: one confirmation per channel, in an
            // order Redis does not define; the last says 0.
            c.cmd(&[b"SUNSUBSCRIBE"]).await;
            let mut all = vec![c.read().await, c.read().await];
            assert!(
                String::from_utf8_lossy(&all[1]).ends_with(":0\r\n"),
                "{all:?}"
            );
            all.sort();
            let all: Vec<String> = show(&all)
                .iter()
                .map(|r| r.rsplit_once(':').unwrap().0.to_string())
                .collect();
            got.push(call(&mut c, "SUNSUBSCRIBE").await);
            runs.push((show(&got), all));
        }
        assert_eq!(runs[1], runs[0], "{hello}");
    }
    s.shutdown().await;
}

/// Transactions whose keys share a hash tag answer byte for byte what one
/// Redis answers: an EXEC with an error element, a command refused at
/// queue time (EXECABORT), WATCH then UNWATCH then the next command,
/// DISCARD, an empty transaction.
#[tokio::test]
async fn transactions_in_one_slot_as_on_one_redis() {
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let s = cluster_sidecar(&cluster).await;
    let single_addr = addr_of(&single);
    let lines = [
        "SET {t}c a",
        "MULTI",
        "SET {t}a 1",
        "LPUSH {t}c 3",
        "SET {t}d 4",
        "EXEC",
        "WATCH {t}a",
        "UNWATCH",
        "GET {t}a",
        "WATCH {t}a",
        "MULTI",
        "SET {t}a 2",
        "MGET",
        "EXEC",
        "GET {t}a",
        "MULTI",
        "SET {t}a 5",
        "DISCARD",
        "GET {t}a",
        "MULTI",
        "EXEC",
        "WATCH x",
        "MULTI",
        "PING",
        "EXEC",
    ];
    let mut runs = Vec::new();
    for addr in [single_addr, s.addr] {
        let mut c = Raw::connect(addr).await;
        let mut got = Vec::new();
        for line in lines {
            let r = if line == "MGET" {
                c.call(&[b"MGET"]).await
            } else {
                call(&mut c, line).await
            };
            got.push(format!("{line} -> {}", String::from_utf8_lossy(&r)));
        }
        runs.push(got);
    }
    assert_eq!(runs[1], runs[0]);
    s.shutdown().await;
}
