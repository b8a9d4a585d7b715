//! Commands that hold connection state: MULTI/EXEC/WATCH, pub/sub,
//! blocking commands, and the policy-stage mechanism that injects commands
//! whose replies the sidecar consumes.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;
use redis_sidecar::policy::{Builder, Ctx, Exchange, Stage, Verdict};
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multi_exec_and_watch_with_a_conflicting_writer() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut a = Raw::connect(s.addr).await;
    // A plain transaction, pipelined in one write.
    a.send(b"*1\r\n$5\r\nMULTI\r\n*3\r\n$3\r\nSET\r\n$1\r\nt\r\n$1\r\n1\r\n*2\r\n$4\r\nINCR\r\n$1\r\nt\r\n*1\r\n$4\r\nEXEC\r\n")
        .await;
    assert_eq!(&a.read().await[..], b"+OK\r\n");
    assert_eq!(&a.read().await[..], b"+QUEUED\r\n");
    assert_eq!(&a.read().await[..], b"+QUEUED\r\n");
    assert_eq!(&a.read().await[..], b"*2\r\n+OK\r\n:2\r\n");
    // After EXEC the client is back on shared connections and still sees
    // its own writes in order.
    assert_eq!(&a.call(&[b"GET", b"t"]).await[..], b"$1\r\n2\r\n");

    // WATCH, a conflicting write by another client, then EXEC aborts.
    let mut b = client(&s).await;
    assert_eq!(&a.call(&[b"WATCH", b"w"]).await[..], b"+OK\r\n");
    let _: () = b.set("w", "other").await.unwrap();
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"SET", b"w", b"mine"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&a.call(&[b"EXEC"]).await[..], b"*-1\r\n");
    let v: String = b.get("w").await.unwrap();
    assert_eq!(v, "other");
    // WATCH without a conflict succeeds.
    assert_eq!(&a.call(&[b"WATCH", b"w"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"SET", b"w", b"mine"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&a.call(&[b"EXEC"]).await[..], b"*1\r\n+OK\r\n");
    // DISCARD, EXEC without MULTI, queue-time error.
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(&a.call(&[b"SET", b"w", b"x"]).await[..], b"+QUEUED\r\n");
    assert_eq!(&a.call(&[b"DISCARD"]).await[..], b"+OK\r\n");
    assert!(
        a.call(&[b"EXEC"])
            .await
            .starts_with(b"-ERR EXEC without MULTI")
    );
    assert_eq!(&a.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert!(
        a.call(&[b"NOSUCH"])
            .await
            .starts_with(b"-ERR unknown command")
    );
    assert!(a.call(&[b"EXEC"]).await.starts_with(b"-EXECABORT"));
    let v: String = b.get("w").await.unwrap();
    assert_eq!(v, "mine");

    // The redis crate's atomic pipeline.
    let (x, y): (i64, i64) = redis::pipe()
        .atomic()
        .incr("cnt", 1)
        .incr("cnt", 2)
        .query_async(&mut b)
        .await
        .unwrap();
    assert_eq!((x, y), (1, 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_channels_and_patterns_resp2_and_resp3() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    for proto in [2u8, 3] {
        let mut sub = Raw::connect(s.addr).await;
        if proto == 3 {
            assert!(sub.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
        }
        sub.cmd(&[b"SUBSCRIBE", b"news", b"alerts"]).await;
        let first = sub.read().await;
        let second = sub.read().await;
        let t = if proto == 3 { b'>' } else { b'*' };
        assert_eq!(first[0], t, "{first:?}");
        assert!(first.windows(9).any(|w| w == b"subscribe"));
        assert!(second.windows(6).any(|w| w == b"alerts"));
        sub.cmd(&[b"PSUBSCRIBE", b"user:*"]).await;
        assert!(sub.read().await.windows(10).any(|w| w == b"psubscribe"));

        let mut publisher = client(&s).await;
        let n: i64 = publisher
            .publish("news", format!("hello{proto}"))
            .await
            .unwrap();
        assert_eq!(n, 1);
        let m = sub.read().await;
        assert_eq!(m[0], t);
        assert!(
            m.windows(6)
                .any(|w| w == format!("hello{proto}").as_bytes()),
            "{m:?}"
        );
        let _: i64 = publisher.publish("user:7", "pat").await.unwrap();
        let m = sub.read().await;
        assert!(m.windows(8).any(|w| w == b"pmessage"), "{m:?}");
        assert!(m.windows(3).any(|w| w == b"pat"), "{m:?}");
        // PING inside subscribed mode.
        sub.cmd(&[b"PING"]).await;
        let p = sub.read().await;
        assert!(
            p.windows(4).any(|w| w.eq_ignore_ascii_case(b"pong")),
            "{p:?}"
        );
        sub.cmd(&[b"UNSUBSCRIBE"]).await;
        let u = sub.read().await;
        assert!(u.windows(11).any(|w| w == b"unsubscribe"), "{u:?}");
    }

    // The redis crate's pub/sub API (RESP2).
    let c = redis::Client::open(url(&s)).unwrap();
    let mut ps = c.get_async_pubsub().await.unwrap();
    ps.subscribe("crate").await.unwrap();
    let mut publisher = client(&s).await;
    let _: i64 = publisher.publish("crate", "payload").await.unwrap();
    let msg = tokio::time::timeout(Duration::from_secs(5), async {
        use futures_util::StreamExt;
        ps.on_message().next().await
    })
    .await
    .unwrap()
    .unwrap();
    assert_eq!(msg.get_payload::<String>().unwrap(), "payload");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_pops_released_by_another_client() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut blocked = Raw::connect(s.addr).await;
    blocked.cmd(&[b"BLPOP", b"queue", b"0"]).await;
    // Pipelined behind the blocking pop: must wait for it, like Redis.
    blocked.cmd(&[b"GET", b"after"]).await;
    let mut zblocked = Raw::connect(s.addr).await;
    zblocked.cmd(&[b"BZPOPMIN", b"zq", b"0"]).await;
    let mut xblocked = Raw::connect(s.addr).await;
    xblocked
        .cmd(&[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"xs", b"$"])
        .await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 3 }).await);

    // Other clients keep being served meanwhile (shared connections are
    // never blocked).
    let mut other = client(&s).await;
    let _: () = other.set("after", "yes").await.unwrap();
    let _: () = other.lpush("queue", "job1").await.unwrap();
    let _: () = other.zadd("zq", "m", 1).await.unwrap();
    let _: String = redis::cmd("XADD")
        .arg("xs")
        .arg("*")
        .arg("k")
        .arg("v")
        .query_async(&mut other)
        .await
        .unwrap();
    assert_eq!(
        &blocked.read().await[..],
        b"*2\r\n$5\r\nqueue\r\n$4\r\njob1\r\n"
    );
    assert_eq!(&blocked.read().await[..], b"$3\r\nyes\r\n");
    assert!(zblocked.read().await.windows(1).any(|w| w == b"m"));
    assert!(xblocked.read().await.windows(2).any(|w| w == b"xs"));
    // A blocking pop with a timeout answers null.
    let r = blocked.call(&[b"BRPOP", b"empty", b"0.1"]).await;
    assert!(
        r == Bytes::from_static(b"*-1\r\n") || r == Bytes::from_static(b"_\r\n"),
        "{r:?}"
    );
    // BLMOVE moves the element.
    let _: () = other.rpush("src", "e").await.unwrap();
    let r = blocked
        .call(&[b"BLMOVE", b"src", b"dst", b"LEFT", b"RIGHT", b"1"])
        .await;
    assert_eq!(&r[..], b"$1\r\ne\r\n");
}

/// A synthetic stage: after every SET of a `synth:*` key, add
/// `PEXPIRE key 100000 NX` (what the TTL policy will do), and answer
/// `DENIED` itself for `GET denied`.
struct Synthetic;

impl Stage for Synthetic {
    fn name(&self) -> &'static str {
        "synthetic"
    }
    fn on_command(&self, _ctx: &Ctx<'_>, cmd: &mut Exchange) -> Verdict {
        let args = cmd.args().to_vec();
        if args.len() >= 3 && args[0].eq_ignore_ascii_case(b"set") && args[1].starts_with(b"synth:")
        {
            let key = args[1].clone();
            cmd.append(&[
                Bytes::from_static(b"PEXPIRE"),
                key,
                Bytes::from_static(b"100000"),
                Bytes::from_static(b"NX"),
            ]);
        }
        if args.len() == 2 && args[0].eq_ignore_ascii_case(b"get") && &args[1][..] == b"denied" {
            return Verdict::Refuse(Bytes::from_static(b"-ERR denied by synthetic stage\r\n"));
        }
        Verdict::Continue
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_injected_commands_are_consumed_in_order() {
    let redis = RedisServer::start();
    let builder = Builder::default().with_stage(Arc::new(Synthetic));
    let s = sidecar_with(config(&redis.url()), builder).await;
    let mut raw = Raw::connect(s.addr).await;
    // Pipelined: each SET has an injected PEXPIRE; replies stay one per
    // request, in order.
    let mut batch = Vec::new();
    for i in 0..50 {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
            &b"SET"[..],
            format!("synth:{i}").as_bytes(),
            b"v",
        ]));
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
            &b"GET"[..],
            format!("synth:{i}").as_bytes(),
        ]));
    }
    batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
        &b"GET"[..],
        b"denied",
    ]));
    batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[&b"PING"[..]]));
    raw.send(&batch).await;
    for _ in 0..50 {
        assert_eq!(&raw.read().await[..], b"+OK\r\n");
        assert_eq!(&raw.read().await[..], b"$1\r\nv\r\n");
    }
    assert_eq!(&raw.read().await[..], b"-ERR denied by synthetic stage\r\n");
    assert_eq!(&raw.read().await[..], b"+PONG\r\n");
    let mut direct = redis.direct().await;
    let ttl: i64 = direct.pttl("synth:7").await.unwrap();
    assert!(ttl > 90_000 && ttl <= 100_000, "{ttl}");
    // A key outside the pattern gets no TTL.
    assert_eq!(&raw.call(&[b"SET", b"plain", b"v"]).await[..], b"+OK\r\n");
    let ttl: i64 = direct.pttl("plain").await.unwrap();
    assert_eq!(ttl, -1);

    // Inside MULTI: the injected command's QUEUED is consumed and its
    // reply removed from the EXEC array.
    raw.send(
        &[
            redis_sidecar::wire::encode_command(&[&b"MULTI"[..]]),
            redis_sidecar::wire::encode_command(&[&b"SET"[..], b"synth:m", b"1"]),
            redis_sidecar::wire::encode_command(&[&b"INCR"[..], b"synth:m"]),
            redis_sidecar::wire::encode_command(&[&b"EXEC"[..]]),
        ]
        .concat(),
    )
    .await;
    assert_eq!(&raw.read().await[..], b"+OK\r\n");
    assert_eq!(&raw.read().await[..], b"+QUEUED\r\n");
    assert_eq!(&raw.read().await[..], b"+QUEUED\r\n");
    assert_eq!(&raw.read().await[..], b"*2\r\n+OK\r\n:2\r\n");
    let ttl: i64 = direct.pttl("synth:m").await.unwrap();
    assert!(ttl > 90_000, "{ttl}");
    // A stage refusal inside MULTI aborts the transaction, as Redis does.
    assert_eq!(&raw.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    assert_eq!(
        &raw.call(&[b"SET", b"synth:n", b"1"]).await[..],
        b"+QUEUED\r\n"
    );
    assert!(
        raw.call(&[b"GET", b"denied"])
            .await
            .starts_with(b"-ERR denied")
    );
    assert!(raw.call(&[b"EXEC"]).await.starts_with(b"-EXECABORT"));
    let exists: i64 = direct.exists("synth:n").await.unwrap();
    assert_eq!(exists, 0);
    assert_eq!(&raw.call(&[b"PING"]).await[..], b"+PONG\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quit_while_subscribed_replies_then_closes() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    for hello in [None, Some(&b"3"[..])] {
        for _ in 0..20 {
            let mut sub = Raw::connect(s.addr).await;
            if let Some(v) = hello {
                sub.call(&[b"HELLO", v]).await;
            }
            sub.cmd(&[b"SUBSCRIBE", b"q"]).await;
            sub.read().await;
            assert_eq!(&sub.call(&[b"QUIT"]).await[..], b"+OK\r\n");
            assert!(sub.closed().await);
        }
    }
}

/// A client that disconnects while its blocking command waits must leave
/// nothing blocked upstream: an orphan would pop the next element pushed
/// (and the app would lose that job), whatever the blocking command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_while_blocked_leaves_nothing_blocked_upstream() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let blocking: [&[&[u8]]; 7] = [
        &[b"BRPOP", b"q", b"0"],
        &[b"BLPOP", b"q", b"other", b"0"],
        &[b"BLMOVE", b"q", b"dst", b"LEFT", b"RIGHT", b"0"],
        &[b"BLMPOP", b"0", b"1", b"q", b"LEFT"],
        &[b"BZPOPMIN", b"z", b"0"],
        &[b"XREAD", b"BLOCK", b"0", b"STREAMS", b"x", b"$"],
        &[b"WAIT", b"1", b"0"],
    ];
    for cmd in blocking {
        let mut a = Raw::connect(s.addr).await;
        // Something on a shared connection first, as an app would.
        assert_eq!(&a.call(&[b"PING"]).await[..], b"+PONG\r\n");
        a.cmd(cmd).await;
        assert!(
            eventually(|| async { blocked_clients(&redis).await == 1 }).await,
            "{cmd:?} never blocked upstream"
        );
        drop(a);
        assert!(
            eventually(|| async { blocked_clients(&redis).await == 0 }).await,
            "{cmd:?}: the upstream connection is still blocked after its client left"
        );
    }
    // The scenario of the bug report: nothing pops the job pushed after
    // the blocked client left.
    let mut b = client(&s).await;
    let _: () = b.lpush("q", "job-1").await.unwrap();
    let n: i64 = b.llen("q").await.unwrap();
    assert_eq!(n, 1);
}

/// With a `requirepass` upstream and no password in the URL (clients
/// AUTH themselves), COMMAND is refused until a client authenticates: a
/// blocking command the built-in table lacks must still get its own
/// connection, and the table is learned with the client's credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocking_commands_never_hold_a_shared_connection_before_the_table_is_learned() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let url = format!("redis://127.0.0.1:{}", redis.port);
    let mut cfg = config(&url);
    // One shared connection: both clients would be on it.
    cfg.pool.shared_connections = std::num::NonZeroUsize::MIN;
    cfg.timeouts.command = Duration::from_secs(1);
    let s = sidecar_with(cfg, Default::default()).await;
    assert_eq!(s.pool.table_generation(), 0);
    let mut a = Raw::connect(s.addr).await;
    let mut b = Raw::connect(s.addr).await;
    for c in [&mut a, &mut b] {
        assert_eq!(&c.call(&[b"AUTH", b"pw"]).await[..], b"+OK\r\n");
    }
    a.cmd(&[b"BLMPOP", b"0", b"1", b"mq", b"LEFT"]).await;
    a.cmd(&[b"PING"]).await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    // Same identity, so the same shared connection as the blocked client;
    // past the command timeout it would have been closed under them.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    for _ in 0..20 {
        assert_eq!(&b.call(&[b"PING"]).await[..], b"+PONG\r\n");
    }
    assert_eq!(&b.call(&[b"LPUSH", b"mq", b"x"]).await[..], b":1\r\n");
    assert_eq!(&a.read().await[..], b"*2\r\n$2\r\nmq\r\n*1\r\n$1\r\nx\r\n");
    assert_eq!(&a.read().await[..], b"+PONG\r\n");
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
}

/// A client that half-closes while its blocking command waits (ioredis's
/// `disconnect()`, BullMQ's `worker.close()`) gets what it was owed before
/// it and nothing for the blocking command, then the close, as from Redis
/// (which writes nothing): not `-ERR upstream connection lost`.
#[tokio::test]
async fn a_half_close_while_blocked_gets_what_redis_gives() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let direct = std::net::SocketAddr::from(([127, 0, 0, 1], redis.port));
    for addr in [direct, s.addr] {
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut batch = redis_sidecar::wire::encode_command(&["PING"]).to_vec();
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
            "BZPOPMIN", "zq", "5",
        ]));
        tokio::io::AsyncWriteExt::write_all(&mut c, &batch)
            .await
            .unwrap();
        assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
        tokio::io::AsyncWriteExt::shutdown(&mut c).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(
            Duration::from_secs(3),
            tokio::io::AsyncReadExt::read_to_end(&mut c, &mut got),
        )
        .await;
        assert!(read.is_ok(), "{addr}: not closed within 3 s");
        assert_eq!(
            String::from_utf8_lossy(&got),
            "+PONG\r\n",
            "{addr}: what the half-closed client got"
        );
        assert!(eventually(|| async { blocked_clients(&redis).await == 0 }).await);
    }
    s.shutdown().await;
}

/// Shutdown does not wait out the grace period for a client blocked in
/// `BZPOPMIN .. 0` (no reply will come) nor for a subscribed one (its
/// stream never ends): each is closed at once, after what it was owed, and
/// the sidecar drains within the grace period.
#[tokio::test]
async fn shutdown_closes_a_blocked_client_at_once() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.timeouts.shutdown_grace = Duration::from_secs(10);
    let s = sidecar_with(cfg, Default::default()).await;
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    c.cmd(&[b"BZPOPMIN", b"zq", b"0"]).await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    let mut sub = Raw::connect(s.addr).await;
    sub.cmd(&[b"SUBSCRIBE", b"news"]).await;
    assert!(sub.read().await.windows(9).any(|w| w == b"subscribe"));
    let t = std::time::Instant::now();
    assert!(s.shutdown().await, "shutdown did not drain");
    let took = t.elapsed();
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    assert!(c.closed().await);
    assert!(sub.closed().await, "the subscriber was left open");
    assert!(eventually(|| async { blocked_clients(&redis).await == 0 }).await);
}
