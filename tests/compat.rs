//! Real client libraries through the sidecar: redis-cli always; ioredis,
//! node-redis, BullMQ, express-session + connect-redis (Node) and redis-py
//! (Python) when their packages are installed, which `scripts/test.sh`
//! does before it runs these with `--include-ignored`.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::Path;
use std::process::Command;

use support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_through_the_sidecar() {
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let port = s.addr.port().to_string();
    let cli = |args: &[&str]| {
        let out = Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port])
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "redis-cli {args:?}: {out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(cli(&["PING"]), "PONG\n");
    assert_eq!(cli(&["SET", "cli", "value with spaces"]), "OK\n");
    assert_eq!(cli(&["GET", "cli"]), "value with spaces\n");
    assert_eq!(cli(&["-3", "HELLO", "3"]).lines().nth(2), Some("proto 3"));
    assert!(cli(&["-n", "4", "SET", "in4", "x"]).contains("OK"));
    assert_eq!(cli(&["-n", "4", "GET", "in4"]), "x\n");
    assert_eq!(cli(&["GET", "in4"]), "\n");
    // redis-cli --pipe sends raw RESP and counts replies.
    let mut child = Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port, "--pipe"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = Vec::new();
    for i in 0..1000 {
        input.extend_from_slice(&redis_sidecar::wire::encode_command(&[
            &b"SET"[..],
            format!("pipe:{i}").as_bytes(),
            b"v",
        ]));
    }
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("errors: 0, replies: 1000"), "{text}");
}

/// How long a compatibility script may take: a client library that hangs
/// fails the test instead of hanging CI.
const SCRIPT_TIME_LIMIT: std::time::Duration = std::time::Duration::from_secs(120);

/// Run a compatibility script (killed past [`SCRIPT_TIME_LIMIT`]); its
/// output goes straight to the test log so a failing or slow check is
/// visible as it happens.
fn run_script(program: &str, args: &[&str], dir: &Path, envs: &[(&str, &str)]) {
    let mut child = Command::new(program)
        .args(args)
        .current_dir(dir)
        .envs(envs.iter().copied())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > SCRIPT_TIME_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {SCRIPT_TIME_LIMIT:?}");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(status.success(), "{program} {args:?} failed: {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs npm packages: run by scripts/test.sh after it installs them"]
async fn node_clients_ioredis_bullmq_connect_redis() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/node");
    assert!(
        dir.join("node_modules/ioredis").exists(),
        "run `npm ci` in compat/node (scripts/test.sh does)"
    );
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let url = url(&s);
    tokio::task::spawn_blocking(move || {
        run_script("node", &["compat.mjs"], &dir, &[("SIDECAR_URL", &url)])
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs redis-py: run by scripts/test.sh after it installs it"]
async fn python_redis_py_resp3_and_resp2() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/python");
    let python = dir.join(".venv/bin/python");
    assert!(
        python.exists(),
        "create compat/python/.venv with redis-py (scripts/test.sh does)"
    );
    let redis = RedisServer::start();
    let s = sidecar(&redis).await;
    let url = url(&s);
    let py = python.to_string_lossy().to_string();
    tokio::task::spawn_blocking(move || {
        run_script(&py, &["compat.py"], &dir, &[("SIDECAR_URL", &url)])
    })
    .await
    .unwrap();
}

/// The typical app's patterns under TTL rules (compat/node/ttl.mjs): the
/// rules of that script's header, with BullMQ's keys exempt, then under a
/// catch-all default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs npm packages: run by scripts/test.sh after it installs them"]
async fn node_apps_under_ttl_rules() {
    use std::time::Duration;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/node");
    assert!(
        dir.join("node_modules/bullmq").exists(),
        "run `npm ci` in compat/node (scripts/test.sh does)"
    );
    let h = Duration::from_secs(3600);
    let rule = ttl_rule;
    for mode in ["exempt", "catchall"] {
        let redis = RedisServer::start();
        let mut cfg = config(&redis.url());
        cfg.ttl = vec![
            rule("sess:*", Some(h), Some(h)),
            rule("cache:*", None, Some(Duration::from_secs(600))),
            rule("post:*", None, Some(24 * h)),
            rule("user:*", Some(7 * 24 * h), None),
        ];
        cfg.ttl.push(if mode == "exempt" {
            rule("bull:*", None, None)
        } else {
            rule("*", Some(h), None)
        });
        let s = sidecar_with(cfg, Default::default()).await;
        assert!(eventually(|| async { s.pool.table_generation() > 0 }).await);
        let (dir, url) = (dir.clone(), url(&s));
        tokio::task::spawn_blocking(move || {
            run_script(
                "node",
                &["ttl.mjs"],
                &dir,
                &[("SIDECAR_URL", &url), ("MODE", mode)],
            )
        })
        .await
        .unwrap();
    }
}

/// Replication through the sidecar: `redis-cli --rdb` (REPLCONF, SYNC, an
/// RDB payload that is not RESP) gets a valid dump on its own dedicated
/// connection, while other clients' requests on the shared connections
/// are not disturbed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cli_rdb_through_the_sidecar() {
    // No 5 s wait before a diskless transfer starts.
    let redis = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"]);
    let s = sidecar(&redis).await;
    let mut c = client(&s).await;
    for i in 0..100 {
        let _: () = redis::AsyncCommands::set(&mut c, format!("rdb:{i}"), i)
            .await
            .unwrap();
    }
    let dir = std::env::temp_dir().join(format!("sidecar-rdb-{}", redis.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("dump.rdb");
    let port = s.addr.port().to_string();
    let f = file.clone();
    let dump = tokio::task::spawn_blocking(move || {
        Command::new("redis-cli")
            .args(["-h", "127.0.0.1", "-p", &port, "--rdb"])
            .arg(&f)
            .output()
            .unwrap()
    });
    // Meanwhile the shared connections serve as usual.
    for i in 0..200 {
        let v: i64 = redis::AsyncCommands::incr(&mut c, "rdb:counter", 1)
            .await
            .unwrap();
        assert_eq!(v, i + 1);
    }
    let out = dump.await.unwrap();
    assert!(out.status.success(), "redis-cli --rdb: {out:?}");
    let bytes = std::fs::read(&file).unwrap();
    assert!(bytes.starts_with(b"REDIS"), "not an RDB file");
    assert!(
        bytes.windows(6).any(|w| w == b"rdb:99"),
        "the keys are in it"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The Node and Python apps, unchanged, through a sidecar with every
/// policy on: the L1 cache over every key, rate limits (an observing one
/// that would limit them, a generous enforced one) and TTL rules with
/// BullMQ's keys exempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs npm packages and redis-py: run by scripts/test.sh after it installs them"]
async fn node_and_python_apps_with_every_policy_on() {
    use redis_sidecar::config::{CacheConfig, CacheRule};
    use std::time::Duration;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (node, python) = (root.join("compat/node"), root.join("compat/python"));
    assert!(node.join("node_modules/bullmq").exists() && python.join(".venv/bin/python").exists());
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.cache = CacheConfig {
        enabled: true,
        rule: vec![CacheRule {
            pattern: "*".into(),
            name: Some("all".into()),
            ttl: Duration::from_secs(60),
            commands: None,
            stale_if_error: None,
        }],
        ..CacheConfig::default()
    };
    cfg.rate_limit = vec![
        toml::from_str(
            "name = \"would-limit\"\nper = \"client\"\nrate = \"20/s\"\nburst = 20\nmode = \"observe\"\n",
        )
        .unwrap(),
        toml::from_str("name = \"generous\"\nper = \"client\"\nrate = \"1000000/s\"\n").unwrap(),
    ];
    cfg.ttl = vec![
        ttl_rule("bull:*", None, None),
        ttl_rule("*", Some(Duration::from_secs(3600)), None),
    ];
    let s = sidecar_with(cfg, Default::default()).await;
    node_and_python_apps(url(&s), false).await;
    let count = |result: &str| metric(&s, "cache_requests_total", &[("result", result)]);
    let observed = metric(&s, "ratelimit_decisions_total", &[("result", "observed")]);
    println!(
        "apps with every policy on: cache hits {}, misses {}, bypassed {} (pipelined reads behind their writes, MULTI, WATCH); observed rate-limit decisions {observed}",
        count("hit"),
        count("miss"),
        count("bypass")
    );
    assert!(observed > 0.0);
    // Nothing is left pending: every key the apps left, read twice now, is
    // a miss then a hit (or an error reply for other types), never a
    // bypass.
    let mut d = redis.direct().await;
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*")
        .query_async(&mut d)
        .await
        .unwrap();
    let (bypass, hits) = (count("bypass"), count("hit"));
    let mut c = Raw::connect(s.addr).await;
    for k in &keys {
        c.call(&[b"GET", k.as_bytes()]).await;
        c.call(&[b"GET", k.as_bytes()]).await;
    }
    assert_eq!(count("bypass"), bypass, "a write's pending mark leaked");
    assert!(count("hit") > hits, "{} keys, no hit", keys.len());
    assert_eq!(
        metric(&s, "ratelimit_decisions_total", &[("result", "rejected")]),
        0.0
    );
}

/// The Node and Python apps through the sidecar in front of a 3-master,
/// 3-replica Redis Cluster: unchanged, except that BullMQ gets a `{bull}`
/// hash-tag prefix (its scripts touch several keys of a queue, which a
/// cluster runs only in one slot) and SELECT is refused as a cluster does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs npm packages and redis-py: run by scripts/test.sh after it installs them"]
async fn node_and_python_apps_on_a_cluster() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (node, python) = (root.join("compat/node"), root.join("compat/python"));
    assert!(node.join("node_modules/bullmq").exists() && python.join(".venv/bin/python").exists());
    let cluster = Cluster::start(3);
    let s = sidecar_with(
        config(&format!(
            "redis-cluster://127.0.0.1:{}",
            cluster.nodes[0].port
        )),
        Default::default(),
    )
    .await;
    wait_up(&s, 0).await;
    node_and_python_apps(url(&s), true).await;
}

/// compat/node/compat.mjs, then compat/python/compat.py, against `url`
/// (`cluster`: the sidecar fronts a Redis Cluster).
async fn node_and_python_apps(url: String, cluster: bool) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let (node, python) = (root.join("compat/node"), root.join("compat/python"));
    let u = url.clone();
    let flag = if cluster { "1" } else { "0" };
    tokio::task::spawn_blocking(move || {
        run_script(
            "node",
            &["compat.mjs"],
            &node,
            &[("SIDECAR_URL", &u), ("CLUSTER", flag)],
        )
    })
    .await
    .unwrap();
    let py = python
        .join(".venv/bin/python")
        .to_string_lossy()
        .to_string();
    tokio::task::spawn_blocking(move || {
        run_script(&py, &["compat.py"], &python, &[("SIDECAR_URL", &url)])
    })
    .await
    .unwrap();
}

/// The guide's app (compat/node/migrate.mjs: sessions, BullMQ with 8
/// workers and 2,000 jobs, counters, a cache) through a live migration
/// from a Redis with a password to one behind TLS with an ACL user; the
/// script checks what the app sees, this what the target holds.
/// `RESCAN=none` runs it without `cutover_rescan`: BullMQ's scripts write
/// keys they do not declare, and the cutover's verification refuses to
/// switch (the script then fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs npm packages: run by scripts/test.sh after it installs them"]
async fn node_app_through_a_live_migration_to_tls_and_acl() {
    use redis::AsyncCommands;
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("compat/node");
    assert!(
        dir.join("node_modules/bullmq").exists(),
        "run `npm ci` in compat/node (scripts/test.sh does)"
    );
    let source = RedisServer::start_with(&["--requirepass", "source-pw-77"]);
    let target = start_tls_redis();
    let mut cfg = config_multi(&[
        ("source", source.url()),
        (
            "target",
            format!(
                "rediss://app%40svc:{}@localhost:{}",
                ACL_PASSWORD.replace(':', "%3A"),
                target.tls_port
            ),
        ),
    ]);
    cfg.upstream[1].tls_ca_file = Some(target.dir.join("ca.pem").to_str().unwrap().to_string());
    let s = sidecar_with(cfg, Default::default()).await;
    wait_up(&s, 1).await;
    let (dir2, url, admin) = (
        dir.clone(),
        url(&s),
        format!("http://{}", s.admin_addr.unwrap()),
    );
    tokio::task::spawn_blocking(move || {
        run_script(
            "node",
            &["migrate.mjs"],
            &dir2,
            &[
                ("SIDECAR_URL", &url),
                ("ADMIN_URL", &admin),
                ("RESCAN", &std::env::var("RESCAN").unwrap_or_default()),
            ],
        )
    })
    .await
    .unwrap();
    // The sessions and counters are on the target itself, with their TTL.
    let mut t = target.server.direct().await;
    for i in 0..200 {
        let ttl: i64 = t.ttl(format!("sess:{i}")).await.unwrap();
        assert!(ttl > 86_000, "sess:{i}: ttl {ttl}");
    }
    for c in 0..4 {
        let target_v: i64 = t.get(format!("counter:{c}")).await.unwrap();
        assert!(target_v > 0, "counter:{c}");
    }
    let m = s.control.migrations.current().unwrap().status();
    assert_eq!(m["phase"], "done", "{m}");
    assert_eq!(m["errors"], 0, "{m}");
    s.shutdown().await;
}
