//! No request smuggling through a rewrite. Redis (and the scanner) accept a
//! line ended by `\r` and any byte (`*3\rX`) and any two bytes after a bulk;
//! a stage that extends a command (the TTL rule's `SET k v` + `PX ms`) or
//! appends commands must not let a value that holds `\n` and RESP become a
//! command of its own. Every rewrite path (TTL rewrite in place, appended
//! PEXPIREs, inside MULTI, a policy that denies what the value smuggles) is
//! fed requests in every header form Redis accepts, and Redis must see
//! exactly the commands meant: the same replies as Redis sent the same
//! bytes directly, the value stored byte for byte, no other key, and the
//! shared connection still serving a neighbour.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use proptest::prelude::*;
use proptest::test_runner::{Config as PropConfig, TestRunner};
use redis::AsyncCommands;
use redis_sidecar::config::Config;
use redis_sidecar::policy::Builder;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use support::*;

/// A value that, spliced at the wrong line end, is a denied script that
/// writes `smuggled`, then a FLUSHALL.
const SMUGGLE: &[u8] = b"A\n$4\r\nEVAL\r\n$27\r\nredis.call('SET','smuggled','1')\r\n$1\r\n0\r\n*1\r\n$8\r\nFLUSHALL\r\n";

fn policies(url: &str) -> Config {
    let mut c = config(url);
    c.ttl = vec![
        ttl_rule("sess:*", Some(Duration::from_secs(100)), None),
        ttl_rule("max:*", None, Some(Duration::from_secs(50))),
    ];
    c.access.deny = vec!["@scripting".into(), "FLUSHALL".into()];
    c
}

/// One way to end a line or a bulk that Redis accepts: `\r\n`, or `\r`
/// and any byte (line) / any two bytes (after a bulk).
#[derive(Debug, Clone)]
enum End {
    Crlf,
    Odd(u8, u8),
}

impl End {
    fn line(&self) -> Vec<u8> {
        match self {
            End::Crlf => b"\r\n".to_vec(),
            End::Odd(_, b) => vec![b'\r', *b],
        }
    }
    fn trailer(&self) -> Vec<u8> {
        match self {
            End::Crlf => b"\r\n".to_vec(),
            End::Odd(a, b) => vec![*a, *b],
        }
    }
}

fn end() -> impl Strategy<Value = End> {
    prop_oneof![
        Just(End::Crlf),
        // Bytes that matter most: LF, CR, '$', '*', and any other.
        (
            prop::sample::select(vec![b'X', b'\n', b'\r', b'$', b'*', 0u8]),
            prop::sample::select(vec![b'X', b'\n', b'\r', b'$', b'*', b'1', 0u8])
        )
            .prop_map(|(a, b)| End::Odd(a, b)),
    ]
}

/// Encode `args` with the given header and bulk endings (cycled).
fn encode(args: &[Vec<u8>], ends: &[End]) -> Vec<u8> {
    let mut e = ends.iter().cycle();
    let mut out = format!("*{}", args.len()).into_bytes();
    out.extend(e.next().unwrap().line());
    for a in args {
        out.extend(format!("${}", a.len()).into_bytes());
        out.extend(e.next().unwrap().line());
        out.extend_from_slice(a);
        out.extend(e.next().unwrap().trailer());
    }
    out
}

fn value() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        Just(SMUGGLE.to_vec()),
        prop::collection::vec(
            prop::sample::select(vec![
                &b"\n"[..],
                b"\r\n",
                b"\r",
                b"*1\r\n",
                b"$4\r\nPING\r\n",
                b"*2\r\n$3\r\nDEL\r\n$4\r\nkeep\r\n",
                b"A",
                b" ",
            ]),
            0..8
        )
        .prop_map(|parts| parts.concat()),
    ]
}

/// The commands of a case: writes that each rewrite path changes.
fn commands() -> impl Strategy<Value = Vec<Vec<Vec<u8>>>> {
    let one = (
        prop::sample::select(vec![0usize, 1, 2, 3, 4]),
        value(),
        any::<bool>(),
    )
        .prop_map(|(kind, v, ex)| {
            let key = |k: &str| k.as_bytes().to_vec();
            match kind {
                // TTL default: `PX` added in place.
                0 => vec![key("SET"), key("sess:a"), v],
                // TTL max: an `EX` clamped in place.
                1 if ex => vec![key("SET"), key("max:a"), v, key("EX"), key("500")],
                1 => vec![key("SET"), key("max:a"), v],
                // Appended PEXPIRE .. NX.
                2 => vec![key("HSET"), key("sess:h"), v, key("x")],
                3 => vec![key("APPEND"), key("sess:s"), v],
                _ => vec![key("SET"), key("plain"), v],
            }
        });
    prop::collection::vec(one, 1..4)
}

async fn raw_roundtrip(addr: std::net::SocketAddr, bytes: &[u8], replies: usize) -> Vec<Bytes> {
    let mut c = Raw::connect(addr).await;
    c.send(bytes).await;
    let mut out = Vec::new();
    for _ in 0..replies {
        out.push(c.read().await);
    }
    // Nothing more: a smuggled command would have answered too.
    c.send(b"*1\r\n$4\r\nPING\r\n").await;
    out.push(c.read().await);
    out
}

/// What the keyspace holds, as `(key, value)` sorted (a hash as its sorted
/// fields and values: DUMP of a hash table depends on the server's seed).
async fn keyspace(c: &mut redis::aio::MultiplexedConnection) -> Vec<(Vec<u8>, Vec<Vec<u8>>)> {
    let mut keys: Vec<Vec<u8>> = redis::cmd("KEYS").arg("*").query_async(c).await.unwrap();
    keys.sort();
    let mut out = Vec::new();
    for k in keys {
        let t: String = redis::cmd("TYPE").arg(&k).query_async(c).await.unwrap();
        let v: Vec<Vec<u8>> = match t.as_str() {
            "string" => vec![c.get(&k).await.unwrap()],
            "hash" => {
                let mut kv: Vec<(Vec<u8>, Vec<u8>)> = c.hgetall(&k).await.unwrap();
                kv.sort();
                kv.into_iter().flat_map(|(a, b)| [a, b]).collect()
            }
            other => vec![other.as_bytes().to_vec()],
        };
        out.push((k, v));
    }
    out
}

#[test]
fn rewrites_keep_every_header_form_one_command() {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let direct = RedisServer::start();
    let upstream = RedisServer::start();
    let sidecar = rt.block_on(sidecar_with(policies(&upstream.url()), Builder::default()));
    let (d, u) = rt.block_on(async { (direct.direct().await, upstream.direct().await) });
    // A neighbour on the same shared connection.
    let neighbour = rt.block_on(client(&sidecar));
    let cases = std::env::var("SMUGGLING_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(96);
    let mut runner = TestRunner::new(PropConfig {
        cases,
        failure_persistence: None,
        ..PropConfig::default()
    });
    let strategy = (
        commands(),
        prop::collection::vec(end(), 1..12),
        any::<bool>(),
    );
    runner
        .run(&strategy, |(cmds, ends, multi)| {
            let (mut d, mut u, mut neighbour) = (d.clone(), u.clone(), neighbour.clone());
            rt.block_on(async {
                let _: () = redis::cmd("FLUSHALL").query_async(&mut d).await.unwrap();
                let _: () = redis::cmd("FLUSHALL").query_async(&mut u).await.unwrap();
                let mut bytes = Vec::new();
                let mut n = cmds.len();
                if multi {
                    bytes.extend_from_slice(b"*1\r\n$5\r\nMULTI\r\n");
                    n += 2;
                }
                for c in &cmds {
                    bytes.extend(encode(c, &ends));
                }
                if multi {
                    bytes.extend_from_slice(b"*1\r\n$4\r\nEXEC\r\n");
                }
                let want = raw_roundtrip(direct_addr(&direct), &bytes, n).await;
                let got = raw_roundtrip(sidecar.addr, &bytes, n).await;
                assert_eq!(
                    got,
                    want,
                    "replies differ for {:?}",
                    String::from_utf8_lossy(&bytes)
                );
                // The same keys with the same values (TTLs differ by design).
                let kd = keyspace(&mut d).await;
                let ku = keyspace(&mut u).await;
                assert_eq!(ku, kd, "the keyspaces differ");
                let smuggled: bool = u.exists("smuggled").await.unwrap();
                assert!(!smuggled, "a value ran as a script");
                // The neighbour's shared connection is still there.
                let pong: String = redis::cmd("PING")
                    .query_async(&mut neighbour)
                    .await
                    .unwrap();
                assert_eq!(pong, "PONG");
            });
            Ok(())
        })
        .unwrap();
    rt.block_on(sidecar.shutdown());
}

fn direct_addr(r: &RedisServer) -> std::net::SocketAddr {
    format!("127.0.0.1:{}", r.port).parse().unwrap()
}

/// The reported case, byte for byte: with `deny = ["@scripting"]` and a
/// TTL rule, a `SET` whose header ends `\rX` stores the value (as Redis
/// does) instead of running the script inside it; the bare header form
/// does not close the shared connection under a neighbour's SET.
#[tokio::test]
async fn reported_smuggling_stores_the_value() {
    let upstream = RedisServer::start();
    let sidecar = sidecar_with(policies(&upstream.url()), Builder::default()).await;
    let mut u = upstream.direct().await;
    let mut neighbour = client(&sidecar).await;
    let mut c = Raw::connect(sidecar.addr).await;
    let mut req = b"*3\rX$3\r\nSET\r\n$6\r\nsess:v\r\n".to_vec();
    req.extend(format!("${}\r\n", SMUGGLE.len()).into_bytes());
    req.extend_from_slice(SMUGGLE);
    req.extend_from_slice(b"\r\n");
    c.send(&req).await;
    assert_eq!(&c.read().await[..], b"+OK\r\n");
    let stored: Vec<u8> = u.get("sess:v").await.unwrap();
    assert_eq!(stored, SMUGGLE);
    let smuggled: bool = u.exists("smuggled").await.unwrap();
    assert!(!smuggled, "the value ran as a script");
    let pttl: i64 = u.pttl("sess:v").await.unwrap();
    assert!(pttl > 90_000, "the rule still applies: {pttl}");
    // Interleave the bare header form with a neighbour's writes.
    for i in 0..50 {
        let bare = b"*3\rX$3\r\nSET\r\n$6\r\nsess:b\r\n$1\r\nv\r\n";
        c.send(bare).await;
        let _: () = neighbour.set(format!("n{i}"), i).await.unwrap();
        assert_eq!(&c.read().await[..], b"+OK\r\n");
    }
    let n: i64 = u.get("n49").await.unwrap();
    assert_eq!(n, 49);
    // Nothing else came back on the client's connection.
    c.send(b"PING\r\n").await;
    assert_eq!(&c.read().await[..], b"+PONG\r\n");
    let mut tmp = [0u8; 16];
    let extra = tokio::time::timeout(Duration::from_millis(200), c.stream.read(&mut tmp)).await;
    assert!(extra.is_err(), "unexpected bytes after the last reply");
    c.stream.shutdown().await.unwrap();
    sidecar.shutdown().await;
}

/// The cluster split: an MSET whose keys are in several slots is split
/// into one MSET per node, re-encoded from the arguments; in every header
/// form, with values that hold RESP, the nodes store exactly the keys and
/// values meant, and nothing else.
#[tokio::test]
async fn cluster_split_keeps_every_header_form_one_command() {
    let cluster = Cluster::start(3);
    let s = cluster_sidecar(&cluster).await;
    let forms = [
        End::Crlf,
        End::Odd(b'X', b'X'),
        End::Odd(b'\n', b'\n'),
        End::Odd(b'$', b'*'),
        End::Odd(b'\r', b'1'),
    ];
    let mut c = Raw::connect(s.addr).await;
    let mut keys = 0;
    for (i, form) in forms.iter().enumerate() {
        let key = |k: &str| format!("{k}:{i}").into_bytes();
        let args = vec![
            b"MSET".to_vec(),
            key("a"),
            SMUGGLE.to_vec(),
            key("b"),
            b"v\n*1\r\n$8\r\nFLUSHALL\r\n".to_vec(),
            key("c"),
            b"plain".to_vec(),
        ];
        c.send(&encode(&args, std::slice::from_ref(form))).await;
        assert_eq!(&c.read().await[..], b"+OK\r\n", "form {i}");
        keys += 3;
        let mget = c.call(&[b"MGET", &key("a"), &key("b"), &key("c")]).await;
        let mut want = b"*3\r\n".to_vec();
        for v in [&args[2], &args[4], &args[6]] {
            want.extend(format!("${}\r\n", v.len()).into_bytes());
            want.extend_from_slice(v);
            want.extend_from_slice(b"\r\n");
        }
        assert_eq!(mget, want, "form {i}");
    }
    // Nothing else reached the nodes: the masters hold exactly the keys.
    let mut total = 0;
    for n in &cluster.nodes {
        let mut d = n.direct().await;
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut d).await.unwrap();
        if matches!(&role[0], redis::Value::BulkString(r) if r == b"master") {
            let size: i64 = redis::cmd("DBSIZE").query_async(&mut d).await.unwrap();
            total += size;
        }
    }
    assert_eq!(total, keys);
    s.shutdown().await;
}
