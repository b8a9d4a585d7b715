//! A client whose dedicated connection streams (CLIENT REPLY, RESP3
//! SUBSCRIBE, MONITOR) gets the sidecar's own replies (a denied command, a
//! local `CLIENT ID`, a rate-limit refusal) in the order of its requests,
//! not ahead of replies Redis still owes; `CLIENT REPLY OFF/SKIP` silence
//! them as Redis silences its own; TTL rules apply there too; and with
//! `[client_auth]` a `HELLO .. AUTH` never carries the client's
//! credentials upstream. Each test failed before its fix.
#![allow(clippy::unwrap_used)]

mod support;

use std::time::Duration;

use bytes::Bytes;
use redis::AsyncCommands;
use redis_sidecar::config::{ClientAuthConfig, ClientUser, Config};
use redis_sidecar::policy::Builder;
use tokio::io::AsyncReadExt;

use support::*;

/// A script that keeps Redis busy for a while, then answers.
const SLOW: &[u8] = b"local i = 0 while i < 3000000 do i = i + 1 end return 'slow-done'";

fn policies(redis: &RedisServer) -> Config {
    let mut c = config(&redis.url());
    c.access.deny = vec!["KEYS".into()];
    c.ttl = vec![ttl_rule("sess:*", Some(Duration::from_secs(100)), None)];
    c
}

/// Nothing more arrives within 300 ms.
async fn nothing_more(c: &mut Raw) -> bool {
    let mut tmp = [0u8; 64];
    tokio::time::timeout(Duration::from_millis(300), c.stream.read(&mut tmp))
        .await
        .is_err()
}

async fn send_all(c: &mut Raw, cmds: &[&[&[u8]]]) {
    let mut batch = Vec::new();
    for cmd in cmds {
        batch.extend_from_slice(&redis_sidecar::wire::encode_command(cmd));
    }
    c.send(&batch).await;
}

fn is_bulk(r: &Bytes, text: &str) -> bool {
    r[..] == *format!("${}\r\n{text}\r\n", text.len()).as_bytes()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_replies_keep_their_place_on_a_stream() {
    let redis = RedisServer::start();
    let s = sidecar_with(policies(&redis), Builder::default()).await;
    // RESP2 after CLIENT REPLY ON, and RESP3 while subscribed.
    for resp3 in [false, true] {
        let mut c = Raw::connect(s.addr).await;
        if resp3 {
            assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
            assert!(c.call(&[b"SUBSCRIBE", b"ch"]).await.starts_with(b">3"));
        } else {
            assert_eq!(&c.call(&[b"CLIENT", b"REPLY", b"ON"]).await[..], b"+OK\r\n");
        }
        send_all(
            &mut c,
            &[
                &[b"EVAL", SLOW, b"0"],
                &[b"KEYS", b"*"],
                &[b"ECHO", b"after"],
                &[b"CLIENT", b"ID"],
                &[b"ECHO", b"last"],
            ],
        )
        .await;
        let slow = c.read().await;
        assert!(is_bulk(&slow, "slow-done"), "resp3={resp3}: {slow:?}");
        let denied = c.read().await;
        assert!(denied.starts_with(b"-NOPERM"), "resp3={resp3}: {denied:?}");
        assert!(is_bulk(&c.read().await, "after"));
        let id = c.read().await;
        assert!(id.starts_with(b":"), "resp3={resp3}: {id:?}");
        assert!(is_bulk(&c.read().await, "last"));
        assert!(nothing_more(&mut c).await, "no marker PING reply leaks");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn client_reply_off_and_skip_silence_the_sidecars_replies_too() {
    let redis = RedisServer::start();
    let s = sidecar_with(policies(&redis), Builder::default()).await;
    let mut c = Raw::connect(s.addr).await;
    // SKIP: the denied command's reply is skipped, and the skip is used
    // up (the ECHO after it is answered).
    send_all(
        &mut c,
        &[
            &[b"CLIENT", b"REPLY", b"SKIP"],
            &[b"KEYS", b"*"],
            &[b"ECHO", b"one"],
        ],
    )
    .await;
    assert!(is_bulk(&c.read().await, "one"));
    // OFF: nothing, not even errors, until ON.
    send_all(
        &mut c,
        &[
            &[b"CLIENT", b"REPLY", b"OFF"],
            &[b"KEYS", b"*"],
            &[b"CLIENT", b"ID"],
            &[b"ECHO", b"silent"],
            &[b"CLIENT", b"REPLY", b"ON"],
            &[b"ECHO", b"two"],
        ],
    )
    .await;
    assert_eq!(&c.read().await[..], b"+OK\r\n");
    assert!(is_bulk(&c.read().await, "two"));
    // A SKIP used up by a forwarded command leaves the next denial seen.
    send_all(
        &mut c,
        &[
            &[b"CLIENT", b"REPLY", b"SKIP"],
            &[b"ECHO", b"skipped"],
            &[b"KEYS", b"*"],
        ],
    )
    .await;
    assert!(c.read().await.starts_with(b"-NOPERM"));
    assert!(nothing_more(&mut c).await);
    s.shutdown().await;
}

#[tokio::test]
async fn ttl_rules_apply_on_a_stream() {
    let redis = RedisServer::start();
    let s = sidecar_with(policies(&redis), Builder::default()).await;
    let mut d = redis.direct().await;
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    // RESP3 while subscribed.
    let mut c = Raw::connect(s.addr).await;
    assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    assert!(c.call(&[b"SUBSCRIBE", b"ch"]).await.starts_with(b">3"));
    assert_eq!(
        &c.call(&[b"HSET", b"sess:h3", b"f", b"v"]).await[..],
        b":1\r\n"
    );
    assert_eq!(&c.call(&[b"INCR", b"sess:n3"]).await[..], b":1\r\n");
    assert!(
        nothing_more(&mut c).await,
        "the appended PEXPIRE's reply leaks"
    );
    // RESP2 after CLIENT REPLY ON.
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(&c.call(&[b"CLIENT", b"REPLY", b"ON"]).await[..], b"+OK\r\n");
    assert_eq!(
        &c.call(&[b"HSET", b"sess:h2", b"f", b"v"]).await[..],
        b":1\r\n"
    );
    assert!(nothing_more(&mut c).await);
    for key in ["sess:h3", "sess:n3", "sess:h2"] {
        let pttl: i64 = d.pttl(key).await.unwrap();
        assert!(pttl > 90_000, "{key}: PTTL {pttl}");
    }
    s.shutdown().await;
}

#[tokio::test]
async fn hello_auth_while_subscribed_stays_with_the_sidecar() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.client_auth = ClientAuthConfig {
        users: vec![ClientUser {
            name: "ops".into(),
            password: Some("ops-secret".into()),
            password_file: None,
        }],
        ..ClientAuthConfig::default()
    };
    let s = sidecar_with(cfg, Builder::default()).await;
    let mut d = redis.direct().await;
    let _: () = redis::cmd("ACL")
        .arg("LOG")
        .arg("RESET")
        .query_async(&mut d)
        .await
        .unwrap();
    let mut c = Raw::connect(s.addr).await;
    assert!(
        c.call(&[b"HELLO", b"3", b"AUTH", b"ops", b"ops-secret"])
            .await
            .starts_with(b"%")
    );
    assert!(c.call(&[b"SUBSCRIBE", b"ch"]).await.starts_with(b">3"));
    let again = c
        .call(&[b"HELLO", b"3", b"AUTH", b"ops", b"ops-secret"])
        .await;
    assert!(again.starts_with(b"%"), "{again:?}");
    let wrong = c.call(&[b"HELLO", b"3", b"AUTH", b"ops", b"wrong"]).await;
    assert!(wrong.starts_with(b"-WRONGPASS"), "{wrong:?}");
    let log: Vec<redis::Value> = redis::cmd("ACL")
        .arg("LOG")
        .query_async(&mut d)
        .await
        .unwrap();
    assert!(
        log.is_empty(),
        "the client's credentials reached Redis: {log:?}"
    );
    s.shutdown().await;
}

/// QUIT on a stream: its +OK comes after the replies Redis still owed,
/// then the connection closes (it waited for them).
#[tokio::test]
async fn quit_on_a_stream_answers_after_what_was_owed() {
    let redis = RedisServer::start();
    let s = sidecar_with(policies(&redis), Builder::default()).await;
    let mut c = Raw::connect(s.addr).await;
    assert!(c.call(&[b"HELLO", b"3"]).await.starts_with(b"%"));
    assert!(c.call(&[b"SUBSCRIBE", b"ch"]).await.starts_with(b">3"));
    send_all(&mut c, &[&[b"EVAL", SLOW, b"0"], &[b"QUIT"]]).await;
    assert!(is_bulk(&c.read().await, "slow-done"));
    assert_eq!(&c.read().await[..], b"+OK\r\n");
    assert!(c.closed().await);
    s.shutdown().await;
}
