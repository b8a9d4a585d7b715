//! The policy pipeline: a test stage that answers, refuses, delays,
//! appends commands and registers reply actions, on every path a command
//! can take (answered by the sidecar, shared connection, dedicated
//! connection, inside MULTI, while subscribed), with pipelined clients
//! checking reply order; the `[access]` stage; and a live swap of the
//! chain under load.
#![allow(clippy::unwrap_used)]

mod support;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use redis::AsyncCommands;
use redis_sidecar::policy::{Builder, Ctx, Exchange, Mode, ReplyAction, Stage, Verdict};
use support::*;

/// Triggered by a command's last argument:
/// `stage:answer` answers `+ANSWERED`; `stage:refuse` refuses;
/// `stage:delay:<unix ms>` delays until then; `stage:action:*` records
/// the replies; and a `SET stage:append:*` gets `PEXPIRE key 100000`
/// appended. Every command seen is recorded with its client's mode.
#[derive(Default)]
struct Probe {
    seen: Mutex<Vec<(Mode, String)>>,
    replies: Arc<Mutex<Vec<(u32, Bytes)>>>,
}

struct Record(Arc<Mutex<Vec<(u32, Bytes)>>>);

impl ReplyAction for Record {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        self.0.lock().unwrap().push((index, reply.clone()));
    }
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

impl Stage for Probe {
    fn name(&self) -> &'static str {
        "probe"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let args = ex.args().to_vec();
        let name = String::from_utf8_lossy(&args[0]).to_ascii_lowercase();
        self.seen.lock().unwrap().push((ctx.mode, name.clone()));
        let last = args.last().unwrap().clone();
        if &last[..] == b"stage:answer" {
            return Verdict::Answer(Bytes::from_static(b"+ANSWERED\r\n"));
        }
        if &last[..] == b"stage:refuse" {
            return Verdict::Refuse(Bytes::from_static(b"-ERR refused by stage\r\n"));
        }
        if let Some(ms) = last.strip_prefix(b"stage:delay:") {
            let until: u64 = std::str::from_utf8(ms).unwrap().parse().unwrap();
            let now = unix_ms();
            if now < until {
                return Verdict::Delay(
                    tokio::time::Instant::now() + Duration::from_millis(until - now),
                );
            }
        }
        if last.starts_with(b"stage:action") {
            ex.on_reply(Arc::new(Record(self.replies.clone())));
        }
        if name == "set" && args[1].starts_with(b"stage:append") {
            ex.append(&[&b"PEXPIRE"[..], &args[1], b"100000"]);
        }
        Verdict::Continue
    }
}

fn cmd(args: &[&[u8]]) -> Vec<u8> {
    redis_sidecar::wire::encode_command(args).to_vec()
}

fn delay_arg(ms: u64) -> Vec<u8> {
    format!("stage:delay:{}", unix_ms() + ms).into_bytes()
}

/// The same pipeline on the shared and on a dedicated connection
/// (`prelude` pins the client): replies in order, the appended command
/// ran and its reply was consumed, the action saw the reply.
async fn pipeline_on(s: &redis_sidecar::Sidecar, probe: &Probe, prelude: &[&[u8]], tag: &str) {
    let mut c = Raw::connect(s.addr).await;
    if !prelude.is_empty() {
        assert_eq!(&c.call(prelude).await[..], b"+OK\r\n");
    }
    let append_key = format!("stage:append:{tag}");
    let action_key = format!("stage:action:{tag}");
    let delay = delay_arg(300);
    let mut batch = Vec::new();
    batch.extend(cmd(&[b"SET", b"plain", tag.as_bytes()]));
    batch.extend(cmd(&[b"ECHO", b"stage:answer"]));
    batch.extend(cmd(&[b"ECHO", b"stage:refuse"]));
    batch.extend(cmd(&[b"SET", append_key.as_bytes(), b"v"]));
    batch.extend(cmd(&[b"GET", action_key.as_bytes()]));
    batch.extend(cmd(&[b"ECHO", &delay]));
    batch.extend(cmd(&[b"GET", b"plain"]));
    probe.replies.lock().unwrap().clear();
    let started = std::time::Instant::now();
    c.send(&batch).await;
    assert_eq!(&c.read().await[..], b"+OK\r\n");
    assert_eq!(&c.read().await[..], b"+ANSWERED\r\n");
    assert_eq!(&c.read().await[..], b"-ERR refused by stage\r\n");
    assert_eq!(&c.read().await[..], b"+OK\r\n");
    assert_eq!(&c.read().await[..], b"$-1\r\n");
    let echoed = c.read().await;
    assert!(
        echoed.ends_with(&[&delay[..], b"\r\n"].concat()),
        "{echoed:?}"
    );
    // Held until its instant (the stage is asked again then).
    assert!(started.elapsed() >= Duration::from_millis(250), "{tag}");
    let plain = c.read().await;
    assert_eq!(
        &plain[..],
        format!("${}\r\n{tag}\r\n", tag.len()).as_bytes()
    );
    assert_eq!(
        probe.replies.lock().unwrap().clone(),
        vec![(0, Bytes::from_static(b"$-1\r\n"))],
        "{tag}"
    );
    let mut d = s_direct(s).await;
    let ttl: i64 = d.pttl(&append_key).await.unwrap();
    assert!(ttl > 90_000 && ttl <= 100_000, "{tag}: {ttl}");
}

async fn s_direct(s: &redis_sidecar::Sidecar) -> redis::aio::MultiplexedConnection {
    // Through the sidecar too: the check must not depend on which
    // connection wrote.
    client(s).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stage_acts_on_every_path() {
    let redis = RedisServer::start();
    let probe = Arc::new(Probe::default());
    let builder = Builder::default().with_stage(probe.clone());
    let s = sidecar_with(config(&redis.url()), builder).await;

    // Shared connection, then a dedicated one (WATCH, then tracking).
    pipeline_on(&s, &probe, &[], "shared").await;
    pipeline_on(&s, &probe, &[b"WATCH", b"w"], "watching").await;
    pipeline_on(&s, &probe, &[b"CLIENT", b"TRACKING", b"on"], "pinned").await;

    // Another client is never held by this one's delay.
    let mut a = Raw::connect(s.addr).await;
    let delay = delay_arg(1500);
    a.cmd(&[b"ECHO", &delay]).await;
    let mut b = Raw::connect(s.addr).await;
    let pong = tokio::time::timeout(Duration::from_millis(1000), b.call(&[b"PING"])).await;
    assert_eq!(&pong.unwrap()[..], b"+PONG\r\n");
    assert!(a.read().await.ends_with(&[&delay[..], b"\r\n"].concat()));

    // Inside MULTI: the answer takes its place in the EXEC array, the
    // appended command's QUEUED and element are removed, the action gets
    // the command's element, the delay holds the queueing.
    let mut m = Raw::connect(s.addr).await;
    let delay = delay_arg(200);
    probe.replies.lock().unwrap().clear();
    let mut batch = cmd(&[b"MULTI"]);
    batch.extend(cmd(&[b"SET", b"plain", b"tx"]));
    batch.extend(cmd(&[b"ECHO", b"stage:answer"]));
    batch.extend(cmd(&[b"SET", b"stage:append:tx", b"v"]));
    batch.extend(cmd(&[b"GET", b"stage:action:tx"]));
    batch.extend(cmd(&[b"ECHO", &delay]));
    batch.extend(cmd(&[b"EXEC"]));
    m.send(&batch).await;
    assert_eq!(&m.read().await[..], b"+OK\r\n");
    for _ in 0..5 {
        assert_eq!(&m.read().await[..], b"+QUEUED\r\n");
    }
    let exec = m.read().await;
    let want = [
        &b"*5\r\n+OK\r\n+ANSWERED\r\n+OK\r\n$-1\r\n"[..],
        format!("${}\r\n", delay.len()).as_bytes(),
        &delay,
        b"\r\n",
    ]
    .concat();
    assert_eq!(
        String::from_utf8_lossy(&exec),
        String::from_utf8_lossy(&want)
    );
    assert_eq!(
        probe.replies.lock().unwrap().clone(),
        vec![(0, Bytes::from_static(b"$-1\r\n"))]
    );
    let mut d = client(&s).await;
    let ttl: i64 = d.pttl("stage:append:tx").await.unwrap();
    assert!(ttl > 90_000, "{ttl}");
    // A refusal inside MULTI makes EXEC answer EXECABORT; nothing ran.
    let mut batch = cmd(&[b"MULTI"]);
    batch.extend(cmd(&[b"SET", b"never", b"1"]));
    batch.extend(cmd(&[b"ECHO", b"stage:refuse"]));
    batch.extend(cmd(&[b"EXEC"]));
    batch.extend(cmd(&[b"EXISTS", b"never"]));
    m.send(&batch).await;
    assert_eq!(&m.read().await[..], b"+OK\r\n");
    assert_eq!(&m.read().await[..], b"+QUEUED\r\n");
    assert_eq!(&m.read().await[..], b"-ERR refused by stage\r\n");
    assert!(m.read().await.starts_with(b"-EXECABORT"));
    assert_eq!(&m.read().await[..], b":0\r\n");

    // Commands the sidecar answers itself go through the stages too.
    let mut l = Raw::connect(s.addr).await;
    let delay = delay_arg(200);
    let mut batch = cmd(&[b"CLIENT", b"SETNAME", b"stage:refuse"]);
    batch.extend(cmd(&[b"CLIENT", b"SETNAME", b"stage:answer"]));
    batch.extend(cmd(&[b"CLIENT", b"GETNAME"]));
    batch.extend(cmd(&[b"CLIENT", b"SETNAME", &delay]));
    batch.extend(cmd(&[b"CLIENT", b"GETNAME"]));
    l.send(&batch).await;
    assert_eq!(&l.read().await[..], b"-ERR refused by stage\r\n");
    assert_eq!(&l.read().await[..], b"+ANSWERED\r\n");
    assert_eq!(&l.read().await[..], b"$-1\r\n");
    assert_eq!(&l.read().await[..], b"+OK\r\n");
    let name = l.read().await;
    assert!(name.ends_with(&[&delay[..], b"\r\n"].concat()), "{name:?}");

    // Subscribed: answered, refused and delayed in order with the stream.
    let mut sub = Raw::connect(s.addr).await;
    sub.cmd(&[b"SUBSCRIBE", b"ch"]).await;
    assert!(sub.read().await.windows(9).any(|w| w == b"subscribe"));
    let delay = delay_arg(200);
    let mut batch = cmd(&[b"PING", b"stage:answer"]);
    batch.extend(cmd(&[b"PING", b"stage:refuse"]));
    batch.extend(cmd(&[b"PING", &delay]));
    sub.send(&batch).await;
    assert_eq!(&sub.read().await[..], b"+ANSWERED\r\n");
    assert_eq!(&sub.read().await[..], b"-ERR refused by stage\r\n");
    let pong = sub.read().await;
    assert!(pong.windows(4).any(|w| w == b"pong"), "{pong:?}");

    // The stage saw every path, with the client's mode.
    let seen = probe.seen.lock().unwrap().clone();
    for want in [
        (Mode::Normal, "set"),
        (Mode::Watching, "echo"),
        (Mode::Pinned, "get"),
        (Mode::Normal, "multi"),
        (Mode::Transaction, "echo"),
        (Mode::Transaction, "exec"),
        (Mode::Normal, "client"),
        (Mode::Streaming, "ping"),
    ] {
        assert!(
            seen.iter().any(|(m, n)| *m == want.0 && n == want.1),
            "{want:?} not seen"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_stage_refuses_as_redis_acls_do() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.access.deny = vec!["KEYS".into(), "config|set".into(), "@dangerous".into()];
    let s = sidecar_with(cfg, Builder::default()).await;
    // Categories come from the learned table.
    assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(
        &c.call(&[b"KEYS", b"*"]).await[..],
        b"-NOPERM this user has no permissions to run the 'keys' command\r\n"
    );
    assert_eq!(
        &c.call(&[b"CONFIG", b"SET", b"maxmemory", b"1"]).await[..],
        b"-NOPERM this user has no permissions to run the 'config|set' command\r\n"
    );
    assert!(
        c.call(&[b"FLUSHALL"])
            .await
            .starts_with(b"-NOPERM this user has no permissions to run the 'flushall'")
    );
    assert_eq!(&c.call(&[b"GET", b"nokey"]).await[..], b"$-1\r\n");
    let mut batch = cmd(&[b"MULTI"]);
    batch.extend(cmd(&[b"KEYS", b"*"]));
    batch.extend(cmd(&[b"EXEC"]));
    c.send(&batch).await;
    assert_eq!(&c.read().await[..], b"+OK\r\n");
    assert!(c.read().await.starts_with(b"-NOPERM"));
    assert!(c.read().await.starts_with(b"-EXECABORT"));
    // Bad rules are configuration errors that name the field.
    let mut bad = config(&redis.url());
    bad.access.deny = vec!["@nosuch".into(), "two words".into()];
    let err = bad.validate().unwrap_err().to_string();
    assert!(
        err.contains("access.deny[0]: unknown ACL category"),
        "{err}"
    );
    assert!(err.contains("access.deny[1]: not a command name"), "{err}");
    // A misspelt command name is refused (the deny list would deny
    // nothing), with the nearest name; so in a rate-limit rule.
    let mut bad = config(&redis.url());
    bad.access.deny = vec!["FLUSHAL".into(), "KEYS".into(), "CONFIG|SETT".into()];
    bad.rate_limit =
        vec![toml::from_str("name = \"w\"\nrate = \"5/s\"\ncommands = [\"SETT\"]\n").unwrap()];
    let err = bad.validate().unwrap_err().to_string();
    for want in [
        "access.deny[0]: unknown command (did you mean FLUSHALL?)",
        "access.deny[2]: unknown command (did you mean CONFIG|SET?)",
        "rate_limit[0]: commands[0]: unknown command (did you mean SET?)",
    ] {
        assert!(err.contains(want), "missing {want:?} in {err}");
    }
    assert!(!err.contains("access.deny[1]"), "{err}");
}

/// Clients pipelining unique ECHOs and SET/GETs while the chain is swapped
/// by reloads: no error, no lost or misrouted reply, and each reload's
/// policy takes effect for the next command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloading_the_chain_under_load_loses_nothing() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecar-chain-reload-{}", redis.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let write = |deny: &str| {
        let head = format!(
            "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[access]\ndeny = [\"{deny}\"]\n"
        );
        write_config(&file, &head, &[("r", &redis)]);
    };
    write("KEYS");
    let s = sidecar_from_file(&file).await;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let loaders: Vec<_> = (0..8)
        .map(|id| {
            let (stop, done, addr) = (stop.clone(), done.clone(), s.addr);
            tokio::spawn(async move {
                let mut c = Raw::connect(addr).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = Vec::new();
                    for i in 0..32 {
                        let p = format!("{id}-{n}-{i}");
                        batch.extend(cmd(&[b"ECHO", p.as_bytes()]));
                        batch.extend(cmd(&[b"SET", format!("k{id}").as_bytes(), p.as_bytes()]));
                        batch.extend(cmd(&[b"GET", format!("k{id}").as_bytes()]));
                    }
                    c.send(&batch).await;
                    for i in 0..32 {
                        let p = format!("{id}-{n}-{i}");
                        let bulk = format!("${}\r\n{p}\r\n", p.len());
                        assert_eq!(String::from_utf8_lossy(&c.read().await), bulk);
                        assert_eq!(&c.read().await[..], b"+OK\r\n");
                        assert_eq!(String::from_utf8_lossy(&c.read().await), bulk);
                        done.fetch_add(3, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();
    let mut probe = Raw::connect(s.addr).await;
    for round in 0..20 {
        let deny = if round % 2 == 0 { "DBSIZE" } else { "KEYS" };
        write(deny);
        let msg = s.control.reload().unwrap();
        assert!(msg.contains("policy stages: access"), "{msg}");
        let keys = probe.call(&[b"KEYS", b"nothing*"]).await;
        let dbsize = probe.call(&[b"DBSIZE"]).await;
        if deny == "KEYS" {
            assert!(keys.starts_with(b"-NOPERM"), "{keys:?}");
            assert!(dbsize.starts_with(b":"), "{dbsize:?}");
        } else {
            assert_eq!(&keys[..], b"*0\r\n");
            assert!(dbsize.starts_with(b"-NOPERM"), "{dbsize:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A reload whose policy is invalid is refused; the chain stays.
    let head = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n[access]\ndeny = [\"@nosuch\"]\n";
    write_config(&file, head, &[("r", &redis)]);
    assert!(s.control.reload().is_err());
    assert!(probe.call(&[b"KEYS", b"x"]).await.starts_with(b"-NOPERM"));
    stop.store(true, Ordering::Relaxed);
    for l in loaders {
        l.await.unwrap();
    }
    assert!(done.load(Ordering::Relaxed) > 1000);
}
