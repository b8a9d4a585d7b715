//! The binary: --check-config, config errors, signals and exit codes.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use support::*;

const BIN: &str = env!("CARGO_BIN_EXE_redis-sidecar");

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn check_config_accepts_the_shipped_files_and_reports_every_error() {
    for f in [
        "config/redis-sidecar.toml",
        "config/redis-sidecar.example.toml",
    ] {
        let out = Command::new(BIN)
            .args(["--config", f, "--check-config"])
            .output()
            .unwrap();
        assert!(out.status.success(), "{f}: {out:?}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("configuration OK"));
    }
    let dir = std::env::temp_dir().join(format!("sidecar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    // The deny list the example recommends, with EVAL allowed: the check
    // says that a script can still run them.
    let example = std::fs::read_to_string("config/redis-sidecar.example.toml").unwrap();
    let denying = dir.join("denying.toml");
    std::fs::write(
        &denying,
        example.replace("deny = []", "deny = [\"KEYS\", \"FLUSHALL\"]"),
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", denying.to_str().unwrap(), "--check-config"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        stdout.contains("warning: access: KEYS, FLUSHALL denied, but a script can still run it"),
        "{stdout}"
    );
    let bad = dir.join("bad.toml");
    std::fs::write(
        &bad,
        "listen = \"nowhere\"\n[limits]\nmax_inline = \"1B\"\n[timeouts]\ncommand = \"0s\"\n[[upstream]]\nname = \"u\"\nurl = \"redis://app:${SIDECAR_TEST_PW}@h:99999\"\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["--config", bad.to_str().unwrap(), "--check-config"])
        .env("SIDECAR_TEST_PW", "hunter2")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    for want in ["listen", "max_inline", "timeouts.command", "invalid port"] {
        assert!(err.contains(want), "missing {want} in {err}");
    }
    assert!(err.contains("(4 errors)"), "{err}");
    assert!(!err.contains("hunter2"), "secret leaked: {err}");
    let _ = std::fs::remove_dir_all(&dir);
}

fn spawn(redis: &RedisServer, port: u16) -> std::process::Child {
    let child = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            "",
            "--upstream",
            &redis.url(),
            "--log-json",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_port(port);
    child
}

/// Until something listens on `port` (panics after 10 s).
fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sidecar did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The binary with `--config file`, its output discarded.
fn run_config(file: &std::path::Path) -> std::process::Child {
    Command::new(BIN)
        .arg("--config")
        .arg(file)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// SIGTERM `child`, wait for it, and return what it wrote to stderr.
async fn stop_and_read_stderr(mut child: std::process::Child) -> String {
    signal(&child, "TERM");
    tokio::task::spawn_blocking(move || {
        let _ = child.wait();
        let mut s = String::new();
        std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut s).unwrap();
        s
    })
    .await
    .unwrap()
}

fn signal(child: &std::process::Child, sig: &str) {
    assert!(
        Command::new("kill")
            .args(["-s", sig, &child.id().to_string()])
            .status()
            .unwrap()
            .success()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_and_exits_zero_second_signal_exits_at_once() {
    let redis = RedisServer::start();
    let port = free_port();
    let mut child = spawn(&redis, port);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut c = Raw::connect(addr).await;
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    // SIGHUP reloads (the same flags here) and must not kill it.
    signal(&child, "HUP");
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    // A request in flight when SIGTERM arrives is answered, then exit 0;
    // a client blocked in BLPOP .. 0 (no reply will come) is closed at
    // once, as Redis closes such clients, and holds nothing up.
    let mut blocked = Raw::connect(addr).await;
    blocked.cmd(&[b"BLPOP", b"never", b"0"]).await;
    assert!(eventually(|| async { blocked_clients(&redis).await == 1 }).await);
    c.cmd(&[
        b"EVAL",
        b"local i = 0 while i < 3000000 do i = i + 1 end return 'done'",
        b"0",
    ])
    .await;
    signal(&child, "TERM");
    assert_eq!(&c.read().await[..], b"$4\r\ndone\r\n");
    assert!(blocked.closed().await);
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // A request that does not finish holds the drain; a second signal
    // ends it (a script keeping Redis busy for seconds).
    let port = free_port();
    let mut child = spawn(&redis, port);
    let mut c = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    c.cmd(&[
        b"EVAL",
        b"local i = 0 while i < 400000000 do i = i + 1 end return 1",
        b"0",
    ])
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    signal(&child, "TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(child.try_wait().unwrap().is_none(), "still draining");
    let start = Instant::now();
    signal(&child, "INT");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(1));
    assert!(start.elapsed() < Duration::from_secs(2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_endpoints_and_refuses_a_broken_config() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let (port, admin_port) = (free_port(), free_port());
    let dir = std::env::temp_dir().join(format!("sidecar-hup-{}-{port}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let write = |ups: &[(&str, &RedisServer)], extra: &str| {
        let head = format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\n{extra}"
        );
        write_config(&file, &head, ups);
    };
    write(&[("a", &a), ("b", &b)], "");
    let mut child = Command::new(BIN)
        .args(["--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(eventually(|| async { std::net::TcpStream::connect(admin).is_ok() }).await);
    let mut c = Raw::connect(addr).await;
    assert_eq!(&c.call(&[b"SET", b"k1", b"a"]).await[..], b"+OK\r\n");
    let active = || async {
        let (_, body) = http_get(admin, "/upstreams").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        v["active"].as_str().unwrap().to_string()
    };
    assert_eq!(active().await, "a");

    // Swap the order and drop a: SIGHUP moves the sidecar to b, and the
    // client's connection stays.
    write(&[("b", &b)], "");
    signal(&child, "HUP");
    assert!(eventually(|| async { active().await == "b" }).await);
    assert_eq!(&c.call(&[b"SET", b"k2", b"b"]).await[..], b"+OK\r\n");
    let mut bconn = b.direct().await;
    let v: Option<String> = redis::cmd("GET")
        .arg("k2")
        .query_async(&mut bconn)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("b"));

    // A broken file is refused; b keeps serving and the error is counted.
    write(&[("b", &b)], "[failover]\nfailback = \"sometimes\"\n");
    signal(&child, "HUP");
    assert!(
        eventually(|| async {
            http_get(admin, "/metrics")
                .await
                .1
                .contains(r#"redis_sidecar_config_reloads_total{result="error"} 1"#)
        })
        .await
    );
    assert_eq!(active().await, "b");
    assert_eq!(&c.call(&[b"SET", b"k3", b"b"]).await[..], b"+OK\r\n");
    assert!(child.try_wait().unwrap().is_none());
    signal(&child, "TERM");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ttl_audit_reports_what_the_rules_would_change_and_changes_nothing() {
    let redis = RedisServer::start();
    let mut d = redis.direct().await;
    for k in ["a:1", "a:2", "a:3"] {
        let _: () = redis::cmd("SET")
            .arg(k)
            .arg("v")
            .query_async(&mut d)
            .await
            .unwrap();
    }
    let _: () = redis::cmd("SET")
        .arg("a:long")
        .arg("v")
        .arg("EX")
        .arg(100_000)
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("a:ok")
        .arg("v")
        .arg("EX")
        .arg(10)
        .query_async(&mut d)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("b:x")
        .arg("v")
        .query_async(&mut d)
        .await
        .unwrap();
    let dir = std::env::temp_dir().join(format!("sidecar-audit-{}", redis.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    write_config(
        &file,
        "[[ttl]]\npattern = \"a:*\"\nname = \"a\"\ndefault = \"1m\"\nmax = \"1h\"\n[[ttl]]\npattern = \"*\"\nname = \"rest\"\n",
        &[("r", &redis)],
    );
    let out = Command::new(BIN)
        .args(["--config", file.to_str().unwrap(), "ttl-audit"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    // a: 5 keys, 3 without TTL, 1 above the max, 4 would change; the
    // catch-all exempt rule sees only b:x (a:* matched first).
    assert!(text.contains("| 0 | a | 5 | 3 | 1 | 4 |"), "{text}");
    assert!(text.contains("| 0 | rest | 1 | 1 | 0 | 0 |"), "{text}");
    let ttl: i64 = redis::cmd("PTTL")
        .arg("a:1")
        .query_async(&mut d)
        .await
        .unwrap();
    assert_eq!(ttl, -1, "read-only");
}

/// A deployment reachable beyond this host: warnings at startup, the
/// admin token from the environment, plain-text logs when stderr is not a
/// terminal, and no secret in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exposure_warnings_admin_token_from_env_and_plain_logs() {
    let redis = RedisServer::start_with(&["--requirepass", "s3cr3tpw"]);
    let (port, admin_port) = (free_port(), free_port());
    let child = Command::new(BIN)
        .args([
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--admin-listen",
            &format!("0.0.0.0:{admin_port}"),
            "--upstream",
            &redis.url(),
        ])
        .env_remove("REDIS_SIDECAR_ADMIN_TOKEN")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    assert!(eventually(|| async { std::net::TcpStream::connect(addr).is_ok() }).await);
    let mut c = Raw::connect(addr).await;
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    let out = stop_and_read_stderr(child).await;
    for want in [
        "admin listener is reachable beyond this host and has no admin_token",
        "client listener is reachable beyond this host",
        "visible to other users in the process list",
    ] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
    assert!(
        !out.contains('\x1b'),
        "colour codes in a non-terminal log: {out}"
    );
    assert!(!out.contains("s3cr3tpw"), "secret in the log: {out}");

    // The admin token from the environment.
    let (port, admin_port) = (free_port(), free_port());
    let mut child = Command::new(BIN)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--admin-listen",
            &format!("127.0.0.1:{admin_port}"),
            "--upstream",
            &redis.url(),
        ])
        .env("REDIS_SIDECAR_ADMIN_TOKEN", "env-tok")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(eventually(|| async { std::net::TcpStream::connect(admin).is_ok() }).await);
    assert_eq!(http(admin, "POST", "/reload", None).await.0, 401);
    assert_eq!(http(admin, "POST", "/reload", Some("wrong")).await.0, 401);
    assert_eq!(http(admin, "POST", "/reload", Some("env-tok")).await.0, 200);
    signal(&child, "TERM");
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
}

/// Config errors never quote a value: every field of the example
/// configuration (which lists them all) is set in turn to a sentinel of
/// the wrong type and to a sentinel string, and no error names it.
#[test]
fn config_errors_never_quote_a_value() {
    use redis_sidecar::config::Config;
    let text = std::fs::read_to_string("config/redis-sidecar.example.toml").unwrap();
    let mut example: toml::Table = text.parse().unwrap();
    // The sections the example shows commented out, filled in.
    let more: toml::Table = r#"
admin_token = "token"
[[upstream]]
name = "cloud"
url = "rediss://default:pw@127.0.0.1:12345"
tls_server_name = "redis.internal"
[[access.users]]
name = "ops"
allow = ["@all"]
deny = ["KEYS"]
[[ttl]]
pattern = "sess:*"
name = "sessions"
default = "24h"
max = "24h"
sweep_rate = 500
sweep_every = "10m"
mode = "observe"
[[rate_limit]]
name = "feed-writes"
commands = ["@write"]
pattern = "feed:user:*"
per = "key"
rate = "20/s"
burst = 10
action = "delay"
max_delay = "500ms"
[[cache.rule]]
pattern = "feed:*"
name = "feed"
ttl = "5s"
stale_if_error = "30s"
[client_auth]
password = "client-pw"
[[client_auth.users]]
name = "app"
password = "app-pw"
"#
    .parse()
    .unwrap();
    for (k, v) in more {
        match (example.get_mut(&k), v) {
            (Some(toml::Value::Array(a)), toml::Value::Array(b)) => a.extend(b),
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => a.extend(b),
            (_, v) => {
                example.insert(k, v);
            }
        }
    }
    let base = toml::to_string(&example).unwrap();
    assert!(
        Config::from_toml(&base, &|_| None)
            .unwrap()
            .validate()
            .is_ok(),
        "the filled-in example is valid"
    );
    // Every leaf, as a path of keys and array indexes.
    fn leaves(v: &toml::Value, path: Vec<String>, out: &mut Vec<Vec<String>>) {
        match v {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let mut p = path.clone();
                    p.push(k.clone());
                    leaves(v, p, out);
                }
            }
            toml::Value::Array(a) if a.iter().any(|x| x.is_table()) => {
                for (i, v) in a.iter().enumerate() {
                    let mut p = path.clone();
                    p.push(i.to_string());
                    leaves(v, p, out);
                }
            }
            _ => out.push(path),
        }
    }
    fn set(v: &mut toml::Value, path: &[String], to: toml::Value) {
        let Some((first, rest)) = path.split_first() else {
            *v = to;
            return;
        };
        let next = match v {
            toml::Value::Table(t) => t.get_mut(first).unwrap(),
            toml::Value::Array(a) => &mut a[first.parse::<usize>().unwrap()],
            _ => unreachable!(),
        };
        set(next, rest, to);
    }
    let mut paths = Vec::new();
    leaves(&toml::Value::Table(example.clone()), Vec::new(), &mut paths);
    assert!(paths.len() > 60, "{} fields", paths.len());
    let env = |_: &str| None;
    let mut refused = 0;
    for path in &paths {
        for sentinel in [
            toml::Value::Integer(987_654_321),
            toml::Value::String("TopSecretValue42".into()),
            toml::Value::Array(vec![toml::Value::String("TopSecretValue42".into())]),
        ] {
            let mut v = toml::Value::Table(example.clone());
            set(&mut v, path, sentinel);
            let text = toml::to_string(&v).unwrap();
            let err = match Config::from_toml(&text, &env) {
                Err(e) => e.to_string(),
                Ok(c) => match c.validate() {
                    Err(e) => e.to_string(),
                    Ok(_) => continue,
                },
            };
            refused += 1;
            assert!(
                !err.contains("987654321") && !err.contains("TopSecretValue42"),
                "{}: {err}",
                path.join(".")
            );
        }
    }
    assert!(refused > paths.len(), "{refused} refusals");
}

/// Every TOML example in the README and in `docs/` is one a user can
/// paste: it parses and validates (with an `[[upstream]]` added where the
/// example has none), and no rate-limit example caps `@slow` (Redis 7's
/// category holds SET, DEL, HGETALL, LRANGE ...: such a cap throttles
/// ordinary traffic).
#[test]
fn the_readme_examples_validate() {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut readme = std::fs::read_to_string(format!("{root}/README.md")).unwrap();
    for doc in std::fs::read_dir(format!("{root}/docs")).unwrap() {
        let path = doc.unwrap().path();
        if path.extension().is_some_and(|e| e == "md") {
            readme.push_str(&std::fs::read_to_string(path).unwrap());
        }
    }
    let mut blocks = 0;
    let mut rest = &readme[..];
    while let Some(i) = rest.find("```toml\n") {
        let body = &rest[i + 8..];
        let end = body.find("```").unwrap();
        let block = &body[..end];
        rest = &body[end + 3..];
        blocks += 1;
        let text = if block.contains("[[upstream]]") {
            block.to_string()
        } else {
            format!("{block}\n[[upstream]]\nname = \"a\"\nurl = \"redis://127.0.0.1:6379\"\n")
        };
        // `${VAR}` examples: every variable set.
        let env = |_: &str| Some("x".to_string());
        let config = redis_sidecar::config::Config::from_toml(&text, &env)
            .unwrap_or_else(|e| panic!("{e}\nin the README example:\n{block}"));
        for r in &config.rate_limit {
            assert!(
                !r.commands.iter().any(|c| c.eq_ignore_ascii_case("@slow")),
                "a README rate limit caps @slow:\n{block}"
            );
        }
        if let Err(e) = config.validate() {
            panic!("{e}\nin the README example:\n{block}");
        }
    }
    assert!(blocks >= 8, "{blocks} TOML examples found");
}

/// What an operator reads: who asked for a reload, an activate or a cache
/// flush (the peer), what a reload changed, every problem of a refused one
/// on a line of its own, the switch with the clients it closes, and a
/// startup line of plain values.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_logs_say_who_and_what() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("rs-oplogs-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    let (port, admin_port) = (free_port(), free_port());
    let head = |rules: &str| {
        format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin_port}\"\nadmin_token = \"tok\"\n[cache]\nenabled = true\n{rules}"
        )
    };
    let rule = |name: &str| format!("[[rate_limit]]\nname = \"{name}\"\nrate = \"1000/s\"\n");
    write_config(&file, &head(&rule("r1")), &[("a", &a), ("b", &b)]);
    let child = Command::new(BIN)
        .args(["--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let admin: std::net::SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
    assert!(eventually(|| async { std::net::TcpStream::connect(admin).is_ok() }).await);
    write_config(&file, &head(&rule("r2")), &[("a", &a), ("b", &b)]);
    assert_eq!(http(admin, "POST", "/reload", Some("tok")).await.0, 200);
    write_config(
        &file,
        &head("[failover]\ncheck_interval = \"soon\"\n[limits]\nmax_bulk = \"lots\"\n"),
        &[("a", &a), ("b", &b)],
    );
    assert_eq!(http(admin, "POST", "/reload", Some("tok")).await.0, 400);
    assert!(
        eventually(|| async { upstreams_at(admin).await["upstreams"][1]["health"] == "up" }).await
    );
    assert_eq!(
        http(admin, "POST", "/upstreams/b/activate", Some("tok"))
            .await
            .0,
        200
    );
    assert_eq!(
        http(admin, "POST", "/cache/flush", Some("tok")).await.0,
        200
    );
    let out = stop_and_read_stderr(child).await;
    let _ = std::fs::remove_dir_all(&dir);
    let line = |needle: &str| {
        out.lines()
            .find(|l| l.contains(needle))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{out}"))
            .to_string()
    };
    let start = line("redis-sidecar listening");
    assert!(
        start.contains(&format!("admin=127.0.0.1:{admin_port}")),
        "{start}"
    );
    assert!(
        start.contains(concat!("version=", env!("CARGO_PKG_VERSION"))),
        "{start}"
    );
    assert!(!start.contains("Some("), "{start}");
    let asked = line("admin: reload");
    assert!(asked.contains("peer=127.0.0.1:"), "{asked}");
    let done = line("configuration reloaded");
    assert!(
        done.contains("rate_limit +r2") && done.contains("rate_limit -r1"),
        "{done}"
    );
    assert!(done.contains("by=admin 127.0.0.1:"), "{done}");
    let problems: Vec<&str> = out.lines().filter(|l| l.contains("problem=")).collect();
    assert_eq!(problems.len(), 2, "one line per problem:\n{out}");
    assert!(
        problems
            .iter()
            .any(|l| l.contains("failover.check_interval"))
    );
    assert!(problems.iter().any(|l| l.contains("limits.max_bulk")));
    let act = line("admin: activate");
    assert!(
        act.contains("upstream=b") && act.contains("peer=127.0.0.1:"),
        "{act}"
    );
    let switch = line("switching the active upstream");
    assert!(switch.contains("dedicated_clients=0"), "{switch}");
    assert!(line("admin: POST /cache/flush").contains("peer=127.0.0.1:"));
    let flushed = line("cache flushed reason=flush");
    assert!(flushed.contains("entries=0"), "{flushed}");
}

/// A configured command the upstream's learned table lacks (an older
/// Redis, a renamed command) is warned once: rules naming it never match.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_the_upstream_lacks_is_warned_once() {
    let redis = RedisServer::start_with(&["--rename-command", "KEYS", ""]);
    let dir = std::env::temp_dir().join(format!("rs-lacks-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    let port = free_port();
    write_config(
        &file,
        &format!(
            "listen = \"127.0.0.1:{port}\"\nadmin_listen = \"\"\n[access]\ndeny = [\"KEYS\", \"FLUSHALL\", \"@dangerous\"]\n"
        ),
        &[("a", &redis)],
    );
    let mut child = Command::new(BIN)
        .args(["--config", file.to_str().unwrap()])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    // Every line until the process ends (a reader thread), seen here as it
    // comes.
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while !seen
        .iter()
        .any(|l: &String| l.contains("not in the upstream's command table"))
        && Instant::now() < deadline
    {
        if let Ok(l) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(l);
        }
    }
    signal(&child, "TERM");
    let _ = child.wait();
    let _ = reader.join();
    seen.extend(rx.try_iter());
    let _ = std::fs::remove_dir_all(&dir);
    let warned: Vec<&String> = seen
        .iter()
        .filter(|l| l.contains("not in the upstream's command table"))
        .collect();
    assert_eq!(warned.len(), 1, "{seen:#?}");
    assert!(warned[0].contains("command=keys"), "{}", warned[0]);
    assert!(seen.iter().any(|l| l.contains("learned the command table")));
}

/// `redis-sidecar migrate --to b --cutover` drives a migration through the
/// admin API to its end and prints the summary; asked for another target
/// while the first still copies back, it says why not and exits 1.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_command_runs_a_migration_to_its_cutover() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let mut src = a.direct().await;
    set_numbered(&mut src, 300).await;
    let mut cfg = config_multi(&[("a", a.url()), ("b", b.url())]);
    cfg.admin_token = "cli-token-5".into();
    let s = sidecar_with(cfg, Default::default()).await;
    wait_up(&s, 1).await;
    let admin = format!("http://{}", s.admin_addr.unwrap());
    let run = |args: Vec<String>, token: &'static str| {
        tokio::task::spawn_blocking(move || {
            Command::new(BIN)
                .args(args)
                .env("REDIS_SIDECAR_ADMIN_TOKEN", token)
                .output()
                .unwrap()
        })
    };
    let args = |to: &str, cutover: bool| {
        let mut v: Vec<String> = ["migrate", "--to", to, "--admin", &admin]
            .iter()
            .map(|s| s.to_string())
            .collect();
        if cutover {
            v.push("--cutover".into());
        }
        v
    };
    // Without the token: refused, with the admin API's reason.
    let out = run(args("b", true), "wrong").await.unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("401"),
        "{out:?}"
    );
    let out = run(args("b", true), "cli-token-5").await.unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    println!("{stdout}");
    assert!(stdout.contains("migration to b started"), "{stdout}");
    assert!(stdout.contains("migration a -> b: done"), "{stdout}");
    assert!(stdout.contains("keys copied 300"), "{stdout}");
    assert!(stdout.contains("100% keys 300/300"), "{stdout}");
    assert_eq!(active(&s).await, "b");
    let mut dst = b.direct().await;
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut dst).await.unwrap();
    assert_eq!(n, 300);
    // Back to a while b's writes are still copied to a: not yet.
    let out = run(args("a", false), "cli-token-5").await.unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("finish or roll it back"), "{stderr}");
    s.shutdown().await;
}

/// `kill -9` of the sidecar mid-copy: the migration lived in that process,
/// so it is aborted (the restarted sidecar follows the dead one's record
/// until it expires, then has it aborted) and serves the app from the
/// source with nothing lost; a new migration (`on_conflict` replace: the
/// target holds part of the copy) goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_migration_leaves_the_app_on_the_source() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let mut src = a.direct().await;
    set_numbered(&mut src, 3000).await;
    let dir = std::env::temp_dir().join(format!("sidecar-kill9-{}", a.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let (port, admin) = (free_port(), free_port());
    write_config(
        &file,
        &format!("listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{admin}\"\n"),
        &[("a", &a), ("b", &b)],
    );
    let start = || {
        let child = run_config(&file);
        wait_port(admin);
        child
    };
    let admin_addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    let mut child = start();
    // Both endpoints up before the migration is asked for.
    assert!(
        eventually(|| async { upstreams_at(admin_addr).await["upstreams"][1]["health"] == "up" })
            .await
    );
    let (st, body) = http_json(
        admin_addr,
        "POST",
        "/migrations",
        r#"{"to": "b", "max_keys_per_second": 1000}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let mut dst = b.direct().await;
    assert!(
        eventually(|| async {
            let n: i64 = redis::cmd("DBSIZE")
                .query_async(&mut b.direct().await)
                .await
                .unwrap();
            n > 100
        })
        .await
    );
    signal(&child, "KILL");
    let _ = child.wait();
    let copied: i64 = redis::cmd("DBSIZE").query_async(&mut dst).await.unwrap();
    assert!(copied < 3000, "the copy was cut short ({copied})");
    let mut child = start();
    // The killed sidecar's record stays on the source until its TTL (3 s):
    // the restarted one may follow it until then (it looks for one every
    // 500 ms, so a first look that finds nothing proves nothing), and that
    // ends aborted. Wait until the record is gone from the source, then
    // until the restarted sidecar is not following it.
    assert!(
        eventually(|| async { !a.has_migration_record().await }).await,
        "the killed leader's record outlived its TTL"
    );
    assert!(
        eventually(|| async {
            let (st, body) = http_get(admin_addr, "/migrations/current").await;
            match st {
                404 => true,
                200 => {
                    assert!(body.contains("\"follower\""), "{body}");
                    body.contains("\"aborted\"") && body.contains("stopped")
                }
                _ => panic!("{st} {body}"),
            }
        })
        .await,
        "{}",
        http_get(admin_addr, "/migrations/current").await.1
    );
    let url = format!("redis://127.0.0.1:{port}");
    let mut app = redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    for i in (0..3000).step_by(3) {
        let v: String = redis::cmd("GET")
            .arg(format!("k:{i}"))
            .query_async(&mut app)
            .await
            .unwrap();
        assert_eq!(v, i.to_string());
    }
    assert!(
        eventually(|| async { upstreams_at(admin_addr).await["upstreams"][1]["health"] == "up" })
            .await
    );
    let (st, body) = http_json(
        admin_addr,
        "POST",
        "/migrations",
        r#"{"to": "b", "on_conflict": "replace", "cutover": true}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    assert!(
        eventually(|| async {
            http_get(admin_addr, "/migrations/current")
                .await
                .1
                .contains("\"phase\":\"done\"")
        })
        .await
    );
    let n: i64 = redis::cmd("DBSIZE").query_async(&mut dst).await.unwrap();
    assert_eq!(n, 3000);
    signal(&child, "TERM");
    let _ = child.wait();
    let _ = std::fs::remove_dir_all(&dir);
}

/// A follower that stops heartbeating (SIGSTOP: its connections stay open
/// on the source) blocks the cutover, the reason naming it; once it runs
/// again (SIGCONT) the cutover goes through and it switches too. Another
/// follower, killed, has left: it is forgotten, not waited for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_that_stops_heartbeating_blocks_the_cutover() {
    let (a, b, leader) = sidecar_ab().await;
    let admin = leader.admin_addr.unwrap();
    let dir = std::env::temp_dir().join(format!("sidecar-stop-{}", a.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let (port, f_admin) = (free_port(), free_port());
    write_config(
        &file,
        &format!("listen = \"127.0.0.1:{port}\"\nadmin_listen = \"127.0.0.1:{f_admin}\"\n"),
        &[("a", &a), ("b", &b)],
    );
    let mut child = run_config(&file);
    // A second follower, killed during the migration: it left (no
    // heartbeat, no connection), and is forgotten.
    let file2 = dir.join("sidecar2.toml");
    let g_admin = free_port();
    write_config(
        &file2,
        &format!(
            "listen = \"127.0.0.1:{}\"\nadmin_listen = \"127.0.0.1:{g_admin}\"\n",
            free_port()
        ),
        &[("a", &a), ("b", &b)],
    );
    let mut killed = run_config(&file2);
    let g_admin: std::net::SocketAddr = format!("127.0.0.1:{g_admin}").parse().unwrap();
    let f_admin: std::net::SocketAddr = format!("127.0.0.1:{f_admin}").parse().unwrap();
    assert!(
        eventually(|| async {
            std::net::TcpStream::connect(f_admin).is_ok()
                && upstreams_at(f_admin).await["upstreams"][1]["health"] == "up"
        })
        .await
    );
    let mut src = a.direct().await;
    set_numbered(&mut src, 500).await;
    let (st, body) = http_json(
        admin,
        "POST",
        "/migrations",
        r#"{"to": "b", "max_pause_ms": 500}"#,
    )
    .await;
    assert_eq!(st, 202, "{body}");
    let status = |at| async move {
        let (_, body) = http_get(at, "/migrations/current").await;
        serde_json::from_str::<serde_json::Value>(&body).unwrap()
    };
    assert!(
        eventually(|| async {
            status(admin).await["phase"] == "syncing"
                && status(f_admin).await["kind"] == "follower"
                && std::net::TcpStream::connect(g_admin).is_ok()
                && status(g_admin).await["kind"] == "follower"
        })
        .await,
        "{} {}",
        status(admin).await,
        status(f_admin).await
    );
    assert_eq!(
        status(admin).await["followers"].as_array().map(Vec::len),
        Some(2)
    );
    signal(&killed, "KILL");
    let _ = killed.wait();
    signal(&child, "STOP");
    let pid = format!(":{}:", child.id());
    // Each try ends within max_pause; the heartbeat expires in 3 s.
    let deadline = Instant::now() + Duration::from_secs(20);
    let reason = loop {
        let (st, _) = http(admin, "POST", "/migrations/current/cutover", None).await;
        assert_eq!(st, 200);
        let r = loop {
            let m = status(admin).await;
            let r = m["reason"].as_str().unwrap_or_default().to_string();
            if r.contains("cutover abandoned") {
                break r;
            }
            assert_ne!(m["phase"], "done", "{m}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if r.contains("stopped heartbeating") || Instant::now() > deadline {
            break r;
        }
    };
    assert!(reason.contains("stopped heartbeating"), "{reason}");
    assert!(reason.contains(&pid), "{reason} names {pid}");
    assert_eq!(upstreams_at(admin).await["active"], "a");
    signal(&child, "CONT");
    // Its heartbeat is back (its key on the source) before the cutover.
    assert!(
        eventually(|| async {
            let keys: Vec<String> = redis::cmd("KEYS")
                .arg("{redis-sidecar}:member:*")
                .query_async(&mut a.direct().await)
                .await
                .unwrap();
            keys.iter().any(|k| k.contains(&pid))
        })
        .await
    );
    let (st, _) = http(admin, "POST", "/migrations/current/cutover", None).await;
    assert_eq!(st, 200);
    assert!(
        eventually(|| async { status(admin).await["phase"] == "done" }).await,
        "{}",
        status(admin).await
    );
    assert!(
        eventually(|| async { upstreams_at(f_admin).await["active"] == "b" }).await,
        "{}",
        upstreams_at(f_admin).await
    );
    assert!(
        eventually(|| async {
            status(admin).await["followers"].as_array().map(Vec::len) == Some(1)
        })
        .await,
        "{}",
        status(admin).await
    );
    // A write through the follower lands on b.
    let mut app = redis::Client::open(format!("redis://127.0.0.1:{port}"))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg("after")
        .arg("1")
        .query_async(&mut app)
        .await
        .unwrap();
    let v: Option<String> = redis::cmd("GET")
        .arg("after")
        .query_async(&mut b.direct().await)
        .await
        .unwrap();
    assert_eq!(v.as_deref(), Some("1"));
    signal(&child, "KILL");
    let _ = child.wait();
    leader.shutdown().await;
}

/// The configuration reference (`docs/configuration.md`), the example
/// file and the schema (the parser's defaults) agree: the example holds
/// every default the schema has, every field of the example is in the
/// reference's table, and every field of the table is in the example with
/// the default the table gives.
#[test]
fn the_configuration_reference_the_example_and_the_schema_agree() {
    use redis_sidecar::config::Config;
    let root = env!("CARGO_MANIFEST_DIR");
    let example =
        std::fs::read_to_string(format!("{root}/config/redis-sidecar.example.toml")).unwrap();
    let reference = std::fs::read_to_string(format!("{root}/docs/configuration.md")).unwrap();
    let none = |_: &str| None;
    // The schema's defaults are the example's values (its endpoint aside:
    // the schema has none until REDIS_URL or the default one is added).
    let mut from_example = Config::from_toml(&example, &none).unwrap();
    let mut defaults = Config::from_toml("", &none).unwrap();
    from_example.upstream.clear();
    defaults.upstream.clear();
    assert_eq!(format!("{from_example:?}"), format!("{defaults:?}"));
    // The example's fields: dotted paths of its scalar values and arrays
    // of scalars (arrays of tables are the lists of rules and endpoints).
    let table: toml::Table = example.parse().unwrap();
    let mut fields = std::collections::BTreeMap::new();
    fn walk(prefix: &str, t: &toml::Table, out: &mut std::collections::BTreeMap<String, String>) {
        for (k, v) in t {
            let path = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(t) => walk(&path, t, out),
                toml::Value::Array(a) if a.iter().any(|v| v.is_table()) => {}
                toml::Value::String(s) => {
                    out.insert(path, s.clone());
                }
                other => {
                    out.insert(path, other.to_string());
                }
            }
        }
    }
    walk("", &table, &mut fields);
    // The reference's table (its first): `| `path` | default | meaning |`.
    let mut documented = std::collections::BTreeMap::new();
    let start = reference.find("| field | default |").unwrap();
    for line in reference[start..]
        .lines()
        .take_while(|l| l.starts_with('|'))
    {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        if cells.len() < 4 || !cells[1].starts_with('`') {
            continue;
        }
        let path = cells[1].trim_matches('`');
        if !path
            .chars()
            .all(|c| c.is_ascii_lowercase() || c == '_' || c == '.')
        {
            continue;
        }
        let d = cells[2];
        let default = match d.strip_prefix('`') {
            Some(rest) => rest.split('`').next().unwrap_or_default().to_string(),
            None => d.split(' ').next().unwrap_or_default().to_string(),
        };
        let default = if default == "\"\"" {
            String::new()
        } else {
            default
        };
        documented.insert(path.to_string(), default);
    }
    assert!(documented.len() >= 30, "{documented:?}");
    let undocumented: Vec<&String> = fields
        .keys()
        .filter(|f| !documented.contains_key(*f))
        .collect();
    assert!(
        undocumented.is_empty(),
        "example fields missing from the reference's table: {undocumented:?}"
    );
    for (path, default) in &documented {
        let Some(value) = fields.get(path) else {
            panic!("{path} is in the reference but not in the example");
        };
        assert_eq!(
            value, default,
            "{path}: the example says {value}, the reference {default}"
        );
    }
}
