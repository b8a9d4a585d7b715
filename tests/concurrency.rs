//! The misrouting hammer: many clients pipeline random commands with unique
//! payloads (RESP2 and RESP3, various dbs), each reply checked byte for byte
//! against a model of that client's own keys, while other clients on the
//! same sidecar block, subscribe and run transactions.
#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::time::Duration;

use proptest::prelude::*;
use redis_sidecar::wire::encode_command;
use support::*;

#[derive(Debug, Clone)]
enum Op {
    Set(usize),
    Get,
    IncrBy(i64),
    Echo(usize),
    Append(usize),
    RPush,
    LLen,
}

#[derive(Debug, Clone)]
struct Plan {
    resp3: bool,
    db: i64,
    batches: Vec<Vec<Op>>,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        (0usize..300).prop_map(Op::Set),
        Just(Op::Get),
        (-1000i64..1000).prop_map(Op::IncrBy),
        (0usize..2000).prop_map(Op::Echo),
        (1usize..50).prop_map(Op::Append),
        Just(Op::RPush),
        Just(Op::LLen),
    ]
}

fn plan() -> impl Strategy<Value = Plan> {
    (
        any::<bool>(),
        0i64..3,
        proptest::collection::vec(proptest::collection::vec(op(), 1..40), 3..10),
    )
        .prop_map(|(resp3, db, batches)| Plan { resp3, db, batches })
}

/// Byte-exact comparison, shown as text when it fails.
#[track_caller]
fn same_bytes(got: &[u8], want: &[u8]) {
    assert_eq!(String::from_utf8_lossy(got), String::from_utf8_lossy(want));
}

fn bulk(v: &[u8]) -> Vec<u8> {
    let mut out = format!("${}\r\n", v.len()).into_bytes();
    out.extend_from_slice(v);
    out.extend_from_slice(b"\r\n");
    out
}

/// Run one client's plan; every reply is compared with the model.
async fn pipeliner(addr: std::net::SocketAddr, id: usize, plan: Plan) {
    let mut c = Raw::connect(addr).await;
    if plan.resp3 {
        assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    }
    assert_eq!(
        &c.call(&[b"SELECT", plan.db.to_string().as_bytes()]).await[..],
        b"+OK\r\n"
    );
    let (skey, ckey, lkey) = (format!("p{id}:s"), format!("p{id}:c"), format!("p{id}:l"));
    for k in [&skey, &ckey, &lkey] {
        c.call(&[b"DEL", k.as_bytes()]).await;
    }
    let mut sval: Option<Vec<u8>> = None;
    let mut counter = 0i64;
    let mut llen = 0i64;
    let mut seq = 0u64;
    for batch in plan.batches {
        let mut wire = Vec::new();
        let mut expect: Vec<Vec<u8>> = Vec::new();
        for op in batch {
            seq += 1;
            let unique = format!("{id}-{seq}-");
            match op {
                Op::Set(n) => {
                    let v = format!("{unique}{}", "x".repeat(n)).into_bytes();
                    wire.extend_from_slice(&encode_command(&[&b"SET"[..], skey.as_bytes(), &v]));
                    expect.push(b"+OK\r\n".to_vec());
                    sval = Some(v);
                }
                Op::Get => {
                    wire.extend_from_slice(&encode_command(&[&b"GET"[..], skey.as_bytes()]));
                    expect.push(match &sval {
                        Some(v) => bulk(v),
                        None if plan.resp3 => b"_\r\n".to_vec(),
                        None => b"$-1\r\n".to_vec(),
                    });
                }
                Op::IncrBy(n) => {
                    wire.extend_from_slice(&encode_command(&[
                        &b"INCRBY"[..],
                        ckey.as_bytes(),
                        n.to_string().as_bytes(),
                    ]));
                    counter += n;
                    expect.push(format!(":{counter}\r\n").into_bytes());
                }
                Op::Echo(n) => {
                    let v = format!("{unique}{}", "e".repeat(n)).into_bytes();
                    wire.extend_from_slice(&encode_command(&[&b"ECHO"[..], &v]));
                    expect.push(bulk(&v));
                }
                Op::Append(n) => {
                    let v = "a".repeat(n).into_bytes();
                    wire.extend_from_slice(&encode_command(&[&b"APPEND"[..], skey.as_bytes(), &v]));
                    let mut cur = sval.take().unwrap_or_default();
                    cur.extend_from_slice(&v);
                    expect.push(format!(":{}\r\n", cur.len()).into_bytes());
                    sval = Some(cur);
                }
                Op::RPush => {
                    wire.extend_from_slice(&encode_command(&[
                        &b"RPUSH"[..],
                        lkey.as_bytes(),
                        unique.as_bytes(),
                    ]));
                    llen += 1;
                    expect.push(format!(":{llen}\r\n").into_bytes());
                }
                Op::LLen => {
                    wire.extend_from_slice(&encode_command(&[&b"LLEN"[..], lkey.as_bytes()]));
                    expect.push(format!(":{llen}\r\n").into_bytes());
                }
            }
        }
        c.send(&wire).await;
        for (i, want) in expect.iter().enumerate() {
            let got = c.read().await;
            assert_eq!(
                String::from_utf8_lossy(&got),
                String::from_utf8_lossy(want),
                "client {id}, reply {i} of its batch"
            );
        }
    }
}

async fn blocker(addr: std::net::SocketAddr, id: usize, rounds: usize) {
    let mut c = Raw::connect(addr).await;
    let mut pusher = Raw::connect(addr).await;
    let key = format!("bq{id}");
    for r in 0..rounds {
        c.cmd(&[b"BLPOP", key.as_bytes(), b"5"]).await;
        tokio::time::sleep(Duration::from_millis(2)).await;
        let item = format!("item-{id}-{r}");
        assert_eq!(
            &pusher
                .call(&[b"LPUSH", key.as_bytes(), item.as_bytes()])
                .await[..],
            b":1\r\n"
        );
        // An array of bulk strings is encoded like a command.
        let want = encode_command(&[key.as_bytes(), item.as_bytes()]);
        same_bytes(&c.read().await, &want);
    }
}

async fn subscriber(addr: std::net::SocketAddr, id: usize, messages: usize) {
    let mut sub = Raw::connect(addr).await;
    let ch = format!("ch{id}");
    sub.cmd(&[b"SUBSCRIBE", ch.as_bytes()]).await;
    assert!(sub.read().await.windows(9).any(|w| w == b"subscribe"));
    let mut publisher = Raw::connect(addr).await;
    for m in 0..messages {
        let msg = format!("msg-{id}-{m}");
        assert_eq!(
            &publisher
                .call(&[b"PUBLISH", ch.as_bytes(), msg.as_bytes()])
                .await[..],
            b":1\r\n"
        );
        let want = encode_command(&[&b"message"[..], ch.as_bytes(), msg.as_bytes()]);
        same_bytes(&sub.read().await, &want);
    }
}

async fn transactor(addr: std::net::SocketAddr, id: usize, rounds: usize) {
    let mut c = Raw::connect(addr).await;
    let key = format!("tx{id}");
    c.call(&[b"DEL", key.as_bytes()]).await;
    for r in 1..=rounds {
        let mut wire = Vec::new();
        wire.extend(encode_command(&[&b"MULTI"[..]]));
        wire.extend(encode_command(&[&b"INCR"[..], key.as_bytes()]));
        wire.extend(encode_command(&[&b"GET"[..], key.as_bytes()]));
        wire.extend(encode_command(&[&b"EXEC"[..]]));
        // Interleave a stateless command so the client moves between its
        // dedicated and the shared connections.
        wire.extend(encode_command(&[&b"GET"[..], key.as_bytes()]));
        c.send(&wire).await;
        assert_eq!(&c.read().await[..], b"+OK\r\n");
        assert_eq!(&c.read().await[..], b"+QUEUED\r\n");
        assert_eq!(&c.read().await[..], b"+QUEUED\r\n");
        let n = r.to_string();
        let mut want = format!("*2\r\n:{r}\r\n").into_bytes();
        want.extend(bulk(n.as_bytes()));
        same_bytes(&c.read().await, &want);
        same_bytes(&c.read().await, &bulk(n.as_bytes()));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 4, max_shrink_iters: 20, ..ProptestConfig::default() })]

    #[test]
    fn replies_never_misrouted_under_mixed_load(plans in proptest::collection::vec(plan(), 12..24)) {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let redis = RedisServer::start();
            let mut cfg = config(&redis.url());
            cfg.pool.shared_connections = std::num::NonZeroUsize::new(2).unwrap();
            let s = sidecar_with(cfg, Default::default()).await;
            let addr = s.addr;
            let mut tasks = Vec::new();
            for (id, p) in plans.into_iter().enumerate() {
                tasks.push(tokio::spawn(pipeliner(addr, id, p)));
            }
            for id in 0..3 {
                tasks.push(tokio::spawn(blocker(addr, id, 15)));
                tasks.push(tokio::spawn(subscriber(addr, id, 30)));
                tasks.push(tokio::spawn(transactor(addr, id, 20)));
            }
            let all = async {
                for t in tasks {
                    t.await.unwrap();
                }
            };
            tokio::time::timeout(Duration::from_secs(60), all).await.expect("load finished in time");
            // Every reply went to its own request: nothing was left over.
            let (_, metrics) = http_get(s.admin_addr.unwrap(), "/metrics").await;
            let lost: HashMap<&str, &str> = metrics
                .lines()
                .filter(|l| l.starts_with("redis_sidecar_protocol_errors_total"))
                .filter_map(|l| l.split_once(' '))
                // Every kind is there from startup, at 0.
                .filter(|(_, v)| *v != "0")
                .collect();
            assert!(lost.is_empty(), "protocol errors: {lost:?}");
        });
    }
}

/// Stateless commands of many clients share one upstream connection by
/// default (`pool.shared_connections = 1`, like twemproxy's
/// `server_connections: 1`): one FIFO queue in front of Redis. Twenty
/// clients at once, each reply its own; the gauge counts one shared
/// connection (two before the default changed).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_share_one_upstream_connection_by_default() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let addr = s.addr;
    let mut tasks = Vec::new();
    for i in 0..20 {
        tasks.push(tokio::spawn(async move {
            let mut c = Raw::connect(addr).await;
            let key = format!("one:{i}");
            let value = format!("value {i}");
            for _ in 0..3 {
                same_bytes(
                    &c.call(&[b"SET", key.as_bytes(), value.as_bytes()]).await,
                    b"+OK\r\n",
                );
                same_bytes(
                    &c.call(&[b"GET", key.as_bytes()]).await,
                    &bulk(value.as_bytes()),
                );
            }
            c
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.push(t.await.unwrap());
    }
    assert_eq!(
        metric(
            &s,
            "upstream_connections",
            &[("kind", "shared"), ("upstream", "test")]
        ),
        1.0
    );
    drop(held);
    s.shutdown().await;
}
