//! Differential conformance: generated and mutated request streams, each
//! sent to a redis-server directly and through the sidecar (in front of a
//! second, identical redis-server); the bytes that come back and whether
//! the connection was closed must be identical. Meanwhile well-behaved
//! clients pipeline unique ECHOs through the same sidecar: each must get
//! its own reply and none an error (a malformed request that reached a
//! shared connection would make Redis close it under them).
//!
//! `CONFORMANCE_CASES` sets the number of streams (default 100,000);
//! `CONFORMANCE_SEED` the generator's seed.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// xorshift64*: a small, seeded generator (reproducible cases).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }
}

/// Commands whose replies do not depend on other connections or on time:
/// the two servers answer them the same.
fn valid_command(r: &mut Rng) -> Vec<Vec<u8>> {
    let word = |r: &mut Rng| -> Vec<u8> {
        let alphabet = b"abcXYZ019 :-\"'\\\r\n\t\x00\xff";
        (0..r.below(6)).map(|_| *r.pick(alphabet)).collect()
    };
    match r.below(12) {
        0 => vec![b"PING".to_vec()],
        1 => vec![b"PING".to_vec(), word(r)],
        2 | 3 => vec![b"ECHO".to_vec(), word(r)],
        4 => vec![b"GET".to_vec(), b"nokey".to_vec()],
        5 => vec![b"EXISTS".to_vec(), b"nokey".to_vec(), word(r)],
        6 => vec![
            b"SELECT".to_vec(),
            r.pick(&["0", "1", "15", "16", "-1", "01", "x"])
                .as_bytes()
                .to_vec(),
        ],
        7 => vec![b"CLIENT".to_vec(), b"GETNAME".to_vec()],
        8 => vec![b"CLIENT".to_vec(), b"SETNAME".to_vec(), word(r)],
        9 => vec![b"NOSUCHCMD".to_vec(), word(r)],
        10 => vec![b"ECHO".to_vec()],
        _ => vec![b"STRLEN".to_vec(), b"nokey".to_vec()],
    }
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    redis_sidecar::wire::encode_command(args).to_vec()
}

/// Inline form (`PING "a b"\r\n`), sometimes with quoting.
fn inline(r: &mut Rng, args: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, a) in args.iter().enumerate() {
        if i > 0 {
            out.push(b' ');
        }
        match r.below(3) {
            0 => {
                out.push(b'"');
                out.extend(a.iter().filter(|&&c| c != b'\n' && c != b'\r'));
                out.push(b'"');
            }
            1 => {
                out.push(b'\'');
                out.extend(a.iter().filter(|&&c| c != b'\n' && c != b'\r'));
                out.push(b'\'');
            }
            _ => out.extend(a.iter().filter(|c| !c.is_ascii_whitespace())),
        }
    }
    out.extend_from_slice(if r.below(2) == 0 { b"\r\n" } else { b"\n" });
    out
}

/// One mutation of `stream`.
fn mutate(r: &mut Rng, stream: &mut Vec<u8>) {
    if stream.is_empty() {
        return;
    }
    let at = r.below(stream.len());
    match r.below(10) {
        // Digits: leading zero, sign, other digit.
        0 => {
            let digits: Vec<usize> = (0..stream.len())
                .filter(|&i| stream[i].is_ascii_digit())
                .collect();
            if !digits.is_empty() {
                let i = *r.pick(&digits);
                match r.below(4) {
                    0 => stream.insert(i, b'0'),
                    1 => stream.insert(i, b'+'),
                    2 => stream.insert(i, b'-'),
                    _ => stream[i] = b'0' + r.below(10) as u8,
                }
            }
        }
        // CR/LF placement.
        1 => {
            stream.remove(at);
        }
        2 => stream.insert(at, *r.pick(b"\r\n")),
        // Type bytes.
        3 => stream[at] = *r.pick(b"*$+:-%> x"),
        // Truncation.
        4 => stream.truncate(at),
        // Huge counts.
        5 => {
            let huge: &[&[u8]] = &[
                b"*3000000000\r\n",
                b"*1\r\n$9999999999\r\n",
                b"*2147483648\r\n",
                b"*1\r\n$536870913\r\n",
            ];
            let h = r.pick(huge);
            stream.splice(at..at, h.iter().copied());
        }
        // Empty and negative multibulks, empty lines.
        6 => {
            let bits: &[&[u8]] = &[
                b"*0\r\n", b"*-1\r\n", b"*-0\r\n", b"\r\n", b"\n", b"*-7\r\n",
            ];
            let b = r.pick(bits);
            stream.splice(at..at, b.iter().copied());
        }
        // A random byte.
        7 => stream[at] = r.next() as u8,
        // Length off by one.
        8 => {
            if let Some(d) = (at..stream.len()).find(|&i| stream[i] == b'$')
                && let Some(i) = (d + 1..stream.len()).find(|&i| stream[i].is_ascii_digit())
            {
                stream[i] = if stream[i] == b'9' {
                    b'0'
                } else {
                    stream[i] + 1
                };
            }
        }
        // Unbalanced quote in what may be an inline line.
        _ => stream.insert(at, *r.pick(b"\"'")),
    }
}

fn case(r: &mut Rng) -> Vec<u8> {
    let mut stream = Vec::new();
    for _ in 0..1 + r.below(3) {
        let cmd = valid_command(r);
        if r.below(4) == 0 {
            stream.extend(inline(r, &cmd));
        } else {
            stream.extend(encode(&cmd));
        }
    }
    for _ in 0..r.below(3) {
        mutate(r, &mut stream);
    }
    stream
}

/// Send `stream`, half-close, read until the peer closes (or 3 s).
/// Returns (bytes, closed by the peer before our deadline).
async fn exchange(addr: SocketAddr, stream: &[u8]) -> (Vec<u8>, bool) {
    let mut c = TcpStream::connect(addr).await.unwrap();
    c.write_all(stream).await.unwrap();
    c.shutdown().await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), async {
        let mut buf = [0u8; 4096];
        loop {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .is_ok();
    (out, closed)
}

fn cases(default: u64) -> u64 {
    std::env::var("CONFORMANCE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_request_streams_get_what_redis_gives() {
    conformance(|_| {}, cases(100_000)).await;
}

/// The same with every policy stage on, none of which may change what a
/// client sees here: a TTL rule on every key (SET gets its PX, writes
/// their PEXPIREs), a deny list of commands the cases never send, a rate
/// limit no case reaches, and the cache on every key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutated_request_streams_get_what_redis_gives_with_every_policy_on() {
    let metrics = conformance(
        |c| {
            c.ttl = vec![ttl_rule("*", Some(Duration::from_secs(3600)), None)];
            c.access.deny = vec!["FLUSHALL".into(), "KEYS".into()];
            c.rate_limit = vec![
                toml::from_str("name = \"all\"\nrate = \"1000000/s\"\nburst = 1000000\n").unwrap(),
            ];
            c.cache = redis_sidecar::config::CacheConfig {
                enabled: true,
                rule: vec![redis_sidecar::config::CacheRule {
                    pattern: "*".into(),
                    name: Some("all".into()),
                    ttl: Duration::from_secs(5),
                    commands: None,
                    stale_if_error: None,
                }],
                ..Default::default()
            };
        },
        cases(25_000),
    )
    .await;
    // The stages saw the traffic.
    for seen in [
        "redis_sidecar_ratelimit_decisions_total{result=\"allowed\",rule=\"all\"}",
        "redis_sidecar_cache_requests_total{result=\"miss\",rule=\"all\"}",
    ] {
        assert!(metrics.contains(seen), "{seen} missing:\n{metrics}");
    }
}

/// Run `cases` streams through a sidecar configured by `policies`; its
/// metrics afterwards.
async fn conformance(
    policies: impl FnOnce(&mut redis_sidecar::config::Config),
    cases: u64,
) -> String {
    let seed: u64 = std::env::var("CONFORMANCE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_cafe);
    let direct = RedisServer::start_with(&["--maxclients", "10000"]);
    let behind = RedisServer::start_with(&["--maxclients", "10000"]);
    let mut cfg = config(&behind.url());
    policies(&mut cfg);
    let s = sidecar_with(cfg, Default::default()).await;
    let direct_addr = SocketAddr::from(([127, 0, 0, 1], direct.port));
    let sidecar_addr = s.addr;

    // Well-behaved clients on the same sidecar meanwhile.
    let stop = Arc::new(AtomicBool::new(false));
    let echoed = Arc::new(AtomicU64::new(0));
    let good: Vec<_> = (0..4)
        .map(|id| {
            let (stop, echoed) = (stop.clone(), echoed.clone());
            tokio::spawn(async move {
                let mut c = Raw::connect(sidecar_addr).await;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let mut batch = Vec::new();
                    for i in 0..16 {
                        batch.extend(encode(&[
                            b"ECHO".to_vec(),
                            format!("good-{id}-{n}-{i}").into_bytes(),
                        ]));
                    }
                    c.send(&batch).await;
                    for i in 0..16 {
                        let want = format!("good-{id}-{n}-{i}");
                        let got = c.read().await;
                        assert_eq!(
                            String::from_utf8_lossy(&got),
                            format!("${}\r\n{want}\r\n", want.len()),
                            "a well-behaved client got someone else's reply or an error"
                        );
                        echoed.fetch_add(1, Ordering::Relaxed);
                    }
                    n += 1;
                }
            })
        })
        .collect();

    let next = Arc::new(AtomicU64::new(0));
    let stream_of =
        move |i: u64| case(&mut Rng(seed ^ (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)));
    let workers: Vec<_> = (0..48)
        .map(|_| {
            let next = next.clone();
            tokio::spawn(async move {
                // Cases that differed while others ran: a mutation can turn
                // a read into a write (`GET` into `SET`), and concurrent
                // cases then see the two servers in different states.
                let mut differed = Vec::new();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= cases {
                        return differed;
                    }
                    let stream = stream_of(i);
                    let want = exchange(direct_addr, &stream).await;
                    let got = exchange(sidecar_addr, &stream).await;
                    if want != got {
                        differed.push(i);
                    }
                }
            })
        })
        .collect();
    let mut differed = Vec::new();
    for w in workers {
        differed.extend(w.await.unwrap());
    }
    // Each of those again, alone: a real difference stays.
    for &i in &differed {
        let stream = stream_of(i);
        let (want, want_closed) = exchange(direct_addr, &stream).await;
        let (got, got_closed) = exchange(sidecar_addr, &stream).await;
        assert!(
            want == got && want_closed == got_closed,
            "case {i} (seed {seed}): input {:?}\nredis:   {:?} (closed: {want_closed})\nsidecar: {:?} (closed: {got_closed})",
            String::from_utf8_lossy(&stream),
            String::from_utf8_lossy(&want),
            String::from_utf8_lossy(&got),
        );
    }
    stop.store(true, Ordering::Relaxed);
    for g in good {
        g.await.unwrap();
    }
    println!(
        "{cases} mutated streams identical to Redis ({} identical only when run again alone); {} ECHOs of well-behaved clients all answered in order",
        differed.len(),
        echoed.load(Ordering::Relaxed)
    );
    assert!(echoed.load(Ordering::Relaxed) > 0);
    String::from_utf8(s.metrics.render()).unwrap()
}
