//! Bad input, limits, slow and dead upstreams, shutdown, admin endpoints.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::{Duration, Instant};

use redis_sidecar::config::ByteSize;
use redis_sidecar::policy::Builder;
use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_resp_gets_protocol_error_and_close() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.limits.max_bulk = ByteSize(1024);
    cfg.limits.max_inline = ByteSize(1024);
    let s = sidecar_with(cfg, Builder::default()).await;
    let cases: &[(&[u8], &str)] = &[
        (b"*x\r\n", "-ERR Protocol error: invalid multibulk length"),
        (
            b"*1\r\n$abc\r\n",
            "-ERR Protocol error: invalid bulk length",
        ),
        (
            b"*1\r\n:5\r\n",
            "-ERR Protocol error: expected '$', got ':'",
        ),
        (
            b"SET a \"unterminated\r\n",
            "-ERR Protocol error: unbalanced quotes in request",
        ),
        // Oversized bulk: refused from its header, before the body is sent.
        (
            b"*2\r\n$3\r\nGET\r\n$4096\r\n",
            "-ERR Protocol error: invalid bulk length",
        ),
        (
            b"*3000000000\r\n",
            "-ERR Protocol error: invalid multibulk length",
        ),
    ];
    for (input, want) in cases {
        let mut raw = Raw::connect(s.addr).await;
        // A good command first: it is answered before the error.
        raw.send(b"PING\r\n").await;
        raw.send(input).await;
        assert_eq!(&raw.read().await[..], b"+PONG\r\n");
        let r = raw.read().await;
        assert_eq!(
            String::from_utf8_lossy(&r).trim_end(),
            *want,
            "input {input:?}"
        );
        assert!(raw.closed().await, "connection must close after {input:?}");
    }
    // An inline line longer than the limit, without a newline.
    let mut raw = Raw::connect(s.addr).await;
    raw.send(&vec![b'A'; 2000]).await;
    assert_eq!(
        &raw.read().await[..],
        b"-ERR Protocol error: too big inline request\r\n"
    );
    assert!(raw.closed().await);
    // The sidecar still serves others, and counted the errors.
    let mut ok = Raw::connect(s.addr).await;
    assert_eq!(&ok.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let (_, body) = http_get(s.admin_addr.unwrap(), "/metrics").await;
    assert!(
        body.contains("redis_sidecar_protocol_errors_total{kind=\"invalid_bulk_length\"} 2"),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_clients_and_idle_timeout() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.limits.max_clients = std::num::NonZeroUsize::new(2).unwrap();
    cfg.limits.idle_timeout = Duration::from_millis(300);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut a = Raw::connect(s.addr).await;
    let mut b = Raw::connect(s.addr).await;
    assert_eq!(&a.call(&[b"PING"]).await[..], b"+PONG\r\n");
    // a's idle clock started when its reply was written, just before now.
    let start = Instant::now();
    assert_eq!(&b.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(
        &c.read().await[..],
        b"-ERR max number of clients reached\r\n"
    );
    assert!(c.closed().await);
    // Idle clients are closed; a subscriber is not (Redis does the same).
    assert!(a.closed().await);
    assert!(start.elapsed() >= Duration::from_millis(250));
    assert!(b.closed().await);
    let mut sub = Raw::connect(s.addr).await;
    sub.cmd(&[b"SUBSCRIBE", b"ch"]).await;
    sub.read().await;
    // Nor is a client blocked in BLPOP longer than the idle timeout.
    let mut blocked = Raw::connect(s.addr).await;
    blocked.cmd(&[b"BLPOP", b"idleq", b"0.6"]).await;
    // The read waits out the BLPOP's 0.6 s (past the idle timeout).
    assert_eq!(&blocked.read().await[..], b"*-1\r\n");
    sub.cmd(&[b"PING"]).await;
    assert!(sub.read().await.windows(4).any(|w| w == b"pong"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_that_does_not_read_is_disconnected() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.limits.max_output_buffer = ByteSize(256 * 1024);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut direct = redis.direct().await;
    let _: () = redis::AsyncCommands::set(&mut direct, "blob", vec![7u8; 64 * 1024])
        .await
        .unwrap();
    let mut raw = Raw::connect(s.addr).await;
    // Ask for ~64 MiB of replies and never read them.
    let mut batch = Vec::new();
    for _ in 0..1000 {
        batch.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$4\r\nblob\r\n");
    }
    raw.send(&batch).await;
    let gone = eventually(|| async {
        let mut c = Raw::connect(s.addr).await;
        c.call(&[b"CLIENT", b"ID"]).await;
        let (_, body) = http_get(s.admin_addr.unwrap(), "/metrics").await;
        // Only the probe client itself remains connected.
        body.contains("redis_sidecar_client_connections 1\n")
            || body.contains("redis_sidecar_client_connections 0\n")
    })
    .await;
    assert!(gone, "a client that does not read must be disconnected");
    // Drain what it got: the stream ends (closed), it does not hang.
    assert!(raw.closed().await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_timeout_fails_in_flight_and_recovers() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.timeouts.command = Duration::from_millis(300);
    cfg.pool.shared_connections = std::num::NonZeroUsize::new(1).unwrap();
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut slow = Raw::connect(s.addr).await;
    let mut other = Raw::connect(s.addr).await;
    // DEBUG SLEEP holds the shared connection past the timeout; the GET
    // pipelined behind it on the same connection must fail too, never get
    // a reply meant for another request.
    slow.cmd(&[b"DEBUG", b"SLEEP", b"1"]).await;
    // Redis is in the sleep (it answers nobody) before the ECHO is sent.
    let port = redis.port;
    assert!(
        eventually(|| async move {
            let ping = async {
                let mut c = Raw::connect(([127, 0, 0, 1], port).into()).await;
                c.call(&[b"PING"]).await
            };
            tokio::time::timeout(Duration::from_millis(100), ping)
                .await
                .is_err()
        })
        .await
    );
    other.cmd(&[b"ECHO", b"mine"]).await;
    let r1 = slow.read().await;
    let r2 = other.read().await;
    assert_eq!(&r1[..], b"-ERR upstream timeout\r\n");
    assert!(
        &r2[..] == b"-ERR upstream timeout\r\n" || &r2[..] == b"$4\r\nmine\r\n",
        "{r2:?}"
    );
    // The connection was replaced: the next commands work.
    assert_eq!(
        &other.call(&[b"ECHO", b"again"]).await[..],
        b"$5\r\nagain\r\n"
    );
    assert_eq!(&slow.call(&[b"PING"]).await[..], b"+PONG\r\n");
    // Blocking commands are exempt from the command timeout.
    let r = slow.call(&[b"BLPOP", b"nothing", b"0.6"]).await;
    assert_eq!(&r[..], b"*-1\r\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_upstream_gives_errors_then_recovers() {
    let mut redis = RedisServer::start();
    let port = redis.port;
    let mut cfg = config(&redis.url());
    cfg.timeouts.queue = Duration::from_millis(300);
    cfg.timeouts.connect = Duration::from_millis(200);
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut raw = Raw::connect(s.addr).await;
    assert_eq!(&raw.call(&[b"SET", b"k", b"v"]).await[..], b"+OK\r\n");
    let mut blocked = Raw::connect(s.addr).await;
    blocked.cmd(&[b"BLPOP", b"q", b"0"]).await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    redis.kill();
    // The blocked client's request was sent: its fate is unknown -> error,
    // and it held state on a dedicated connection.
    let r = blocked.read().await;
    assert_eq!(&r[..], b"-ERR upstream connection lost\r\n");
    // Once the shared connection has seen the close too (a request written
    // before that would get "connection lost", rightly: its fate is
    // unknown), new requests wait the queue timeout, then fail as never
    // sent.
    let admin = s.admin_addr.unwrap();
    assert!(
        eventually(|| async {
            http_get(admin, "/metrics")
                .await
                .1
                .contains(r#"redis_sidecar_upstream_connections{kind="shared",upstream="test"} 0"#)
        })
        .await
    );
    let start = Instant::now();
    let r = raw.call(&[b"GET", b"k"]).await;
    assert!(r.starts_with(b"-ERR upstream unavailable"), "{r:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(250),
        "{:?}",
        start.elapsed()
    );
    let (status, body) = http_get(s.admin_addr.unwrap(), "/readyz").await;
    assert_eq!(status, 503, "{body}");
    // Bring Redis back on the same port: the sidecar reconnects by itself.
    let _back = RedisServer::start_on(port, &[]).expect("redis-server restarts on its port");
    let ok = eventually(|| async {
        let mut c = Raw::connect(s.addr).await;
        &c.call(&[b"PING"]).await[..] == b"+PONG\r\n"
    })
    .await;
    assert!(ok);
    let (status, _) = http_get(s.admin_addr.unwrap(), "/readyz").await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_drains_in_flight_requests() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let addr = s.addr;
    let mut slow = Raw::connect(addr).await;
    slow.cmd(&[b"DEBUG", b"SLEEP", b"0.5"]).await;
    slow.cmd(&[b"SET", b"drained", b"yes"]).await;
    let mut blocked = Raw::connect(addr).await;
    blocked.cmd(&[b"BLPOP", b"q", b"0.7"]).await;
    // Clients holding dedicated connections.
    let mut sub = Raw::connect(addr).await;
    sub.cmd(&[b"SUBSCRIBE", b"ch"]).await;
    sub.read().await;
    let mut tx = Raw::connect(addr).await;
    assert_eq!(&tx.call(&[b"MULTI"]).await[..], b"+OK\r\n");
    // The blocking pop is in Redis.
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    let start = Instant::now();
    let stopper = tokio::spawn(s.shutdown());
    // In-flight requests finish and are answered, then the clients close.
    assert_eq!(&slow.read().await[..], b"+OK\r\n");
    assert_eq!(&slow.read().await[..], b"+OK\r\n");
    assert!(slow.closed().await);
    // A blocked command has no reply to wait for: its client is closed at
    // once with nothing written, as Redis closes blocked clients.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read_to_end(&mut blocked.stream, &mut rest),
    )
    .await;
    assert!(closed.is_ok(), "the blocked client was not closed");
    assert!(rest.is_empty(), "the blocked client got {rest:?}");
    assert!(stopper.await.unwrap(), "drained within the grace period");
    assert!(start.elapsed() < Duration::from_secs(5));
    // No longer accepting.
    assert!(tokio::net::TcpStream::connect(addr).await.is_err());
    let mut direct = redis.direct().await;
    let v: String = redis::AsyncCommands::get(&mut direct, "drained")
        .await
        .unwrap();
    assert_eq!(v, "yes");
    // Every task ended: no upstream connection of the sidecar is left
    // (shared, dedicated, health checks), only this direct one.
    let mut left = String::new();
    for _ in 0..250 {
        left = redis::cmd("CLIENT")
            .arg("LIST")
            .query_async(&mut direct)
            .await
            .unwrap();
        if left.lines().count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(left.lines().count(), 1, "upstream connections left: {left}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_metrics() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let admin = s.admin_addr.unwrap();
    let mut raw = Raw::connect(s.addr).await;
    raw.call(&[b"SET", b"m", b"1"]).await;
    raw.call(&[b"GET", b"m"]).await;
    raw.call(&[b"GET"]).await;
    raw.call(&[b"FOOBAR"]).await;
    // Replies the sidecar makes itself are timed too (the table is
    // learned, so `select` has its own label).
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    raw.call(&[b"SELECT", b"0"]).await;
    raw.call(&[b"SELECT", b"-1"]).await;
    assert_eq!(http_get(admin, "/healthz").await.0, 200);
    assert_eq!(http_get(admin, "/readyz").await.0, 200);
    assert_eq!(http_get(admin, "/nope").await.0, 404);
    let (status, body) = http_get(admin, "/metrics").await;
    assert_eq!(status, 200);
    for want in [
        "redis_sidecar_commands_total{command=\"get\",result=\"ok\"} 1",
        "redis_sidecar_commands_total{command=\"get\",result=\"error\"} 1",
        "redis_sidecar_commands_total{command=\"other\",result=\"error\"} 1",
        "redis_sidecar_command_duration_seconds_count{command=\"set\"} 1",
        "redis_sidecar_command_duration_seconds_count{command=\"select\"} 2",
        "redis_sidecar_commands_total{command=\"select\",result=\"error\"} 1",
        "redis_sidecar_client_connections 1",
        "redis_sidecar_upstream_connections{kind=\"shared\",upstream=\"test\"}",
        "redis_sidecar_upstream_up{upstream=\"test\"} 1",
    ] {
        assert!(body.contains(want), "missing {want} in\n{body}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_pipeline_written_before_reading_does_not_deadlock() {
    // A client (like redis-py's pipeline) writes every command before it
    // reads a reply. Replies far larger than the socket buffers must be
    // held by the sidecar (up to the output limit), not deadlock.
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let mut direct = redis.direct().await;
    let value = vec![b'v'; 20 * 1024];
    let _: () = redis::AsyncCommands::set(&mut direct, "big20k", &value)
        .await
        .unwrap();
    let raw = Raw::connect(s.addr).await;
    let (mut rd, mut wr) = raw.stream.into_split();
    let n = 2000;
    let mut batch = Vec::new();
    for _ in 0..n {
        batch.extend_from_slice(b"*2\r\n$3\r\nGET\r\n$6\r\nbig20k\r\n");
    }
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Write everything first (this completes only if the sidecar keeps
    // reading while its replies pile up), then read.
    tokio::time::timeout(Duration::from_secs(20), wr.write_all(&batch))
        .await
        .expect("pipeline written")
        .unwrap();
    let want = n * (value.len() + "$20480\r\n\r\n".len());
    let mut got = 0;
    let mut buf = vec![0u8; 1 << 16];
    tokio::time::timeout(Duration::from_secs(20), async {
        while got < want {
            let k = rd.read(&mut buf).await.unwrap();
            assert!(k > 0, "closed after {got} of {want} bytes");
            got += k;
        }
    })
    .await
    .expect("all replies read");
    assert_eq!(got, want);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_vanishing_mid_pipeline_leave_others_unaffected() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    for i in 0..20 {
        let mut raw = Raw::connect(s.addr).await;
        let mut batch = Vec::new();
        for j in 0..500 {
            batch.extend_from_slice(&redis_sidecar::wire::encode_command(&[
                &b"SET"[..],
                format!("gone:{i}:{j}").as_bytes(),
                b"v",
            ]));
            if j % 50 == 0 {
                batch.extend_from_slice(b"*3\r\n$5\r\nBLPOP\r\n$4\r\nnone\r\n$3\r\n0.1\r\n");
            }
        }
        raw.send(&batch).await;
        drop(raw); // gone, replies owed
    }
    let mut ok = Raw::connect(s.addr).await;
    for k in 0..100 {
        let v = format!("{k}");
        let r = ok.call(&[b"ECHO", v.as_bytes()]).await;
        assert_eq!(&r[..], format!("${}\r\n{v}\r\n", v.len()).as_bytes());
    }
    let admin = s.admin_addr.unwrap();
    assert!(
        eventually(|| async {
            http_get(admin, "/metrics")
                .await
                .1
                .contains("redis_sidecar_client_connections 1\n")
        })
        .await,
        "vanished clients were cleaned up"
    );
}

/// A request past `limits.max_request` closes its client without a reply,
/// as Redis does past `client-query-buffer-limit`, from the declared
/// lengths (the bytes are never buffered); other clients go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_max_request_closes_only_its_client() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.limits.max_request = redis_sidecar::config::ByteSize(4096);
    let s = sidecar_with(cfg, Default::default()).await;
    let mut other = Raw::connect(s.addr).await;
    assert_eq!(&other.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let mut big = Raw::connect(s.addr).await;
    // 3,000 bytes sent, 3,000 more declared in the last header (past the
    // 4 KiB limit) and never sent.
    big.send(b"*4\r\n$4\r\nMSET\r\n$1\r\na\r\n$3000\r\n").await;
    big.send(&vec![b'x'; 3000]).await;
    big.send(b"\r\n$3000\r\n").await;
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 64];
        loop {
            match tokio::io::AsyncReadExt::read(&mut big.stream, &mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => rest.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "not closed");
    assert!(rest.is_empty(), "no reply expected, got {rest:?}");
    assert_eq!(&other.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let text = String::from_utf8(s.metrics.render()).unwrap();
    assert!(text.contains("redis_sidecar_protocol_errors_total{kind=\"request_too_big\"} 1"));
}

/// If the upstream nonetheless refuses a request's bytes (Redis allows an
/// unauthenticated client at most 10 arguments), the client that sent it
/// gets Redis's error and is closed, as on Redis.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_the_upstream_refuses_closes_the_client_that_sent_it() {
    let redis = RedisServer::start_with(&["--requirepass", "pw"]);
    let s = sidecar_with(
        config(&format!("redis://127.0.0.1:{}", redis.port)),
        Default::default(),
    )
    .await;
    let mut c = Raw::connect(s.addr).await;
    let args: Vec<&[u8]> = vec![
        b"MSET", b"a", b"1", b"b", b"1", b"c", b"1", b"d", b"1", b"e", b"1",
    ];
    assert_eq!(
        &c.call(&args).await[..],
        b"-ERR Protocol error: unauthenticated multibulk length\r\n"
    );
    assert!(c.closed().await, "the client that sent it is closed");
    // Others go on (on a new upstream connection): Redis's own answer to
    // an unauthenticated client, not a lost connection.
    let addr = s.addr;
    assert!(
        eventually(|| async {
            let mut other = Raw::connect(addr).await;
            other.call(&[b"PING"]).await.starts_with(b"-NOAUTH")
        })
        .await
    );
}

/// The admin listener (hyper): keep-alive, a half-closed client still gets
/// its answer, and slow or half-open connections cannot lock out
/// `/healthz` for longer than the header timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_keep_alive_half_closed_and_slow_connections() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let admin = s.admin_addr.unwrap();
    // Two requests on one connection.
    let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    // Half-closed after the request: the answer still comes.
    let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
    c.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    c.shutdown().await.unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).await.unwrap();
    assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
    // 64 connections that never finish their headers take every slot...
    let mut slow = Vec::new();
    for _ in 0..64 {
        let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
        c.write_all(b"GET /healthz HTTP/1.1\r\nHo").await.unwrap();
        slow.push(c);
    }
    // ...until the header timeout closes them (meanwhile a connection
    // over the cap is closed at once).
    let started = std::time::Instant::now();
    let healthy = || async move {
        let Ok(mut c) = tokio::net::TcpStream::connect(admin).await else {
            return false;
        };
        let req = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        if c.write_all(req).await.is_err() {
            return false;
        }
        let mut out = String::new();
        c.read_to_string(&mut out).await.is_ok() && out.starts_with("HTTP/1.1 200 OK")
    };
    assert!(eventually(healthy).await, "healthz locked out");
    assert!(started.elapsed() < Duration::from_secs(9));
}
