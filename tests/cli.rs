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
        assert!(String::from_utf8_lossy(&out.stdout).contains("configuration OK"));
    }
    let dir = std::env::temp_dir().join(format!("sidecar-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
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
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "sidecar did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
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
    // SIGHUP must not kill it (reload is not built; it is logged).
    signal(&child, "HUP");
    assert_eq!(&c.call(&[b"PING"]).await[..], b"+PONG\r\n");
    // A request in flight when SIGTERM arrives is answered, then exit 0.
    c.cmd(&[b"BLPOP", b"q", b"0.5"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    signal(&child, "TERM");
    assert_eq!(&c.read().await[..], b"*-1\r\n");
    let status = tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap();
    assert_eq!(status.code(), Some(0));

    // A request that never finishes holds the drain; a second signal ends it.
    let port = free_port();
    let mut child = spawn(&redis, port);
    let mut c = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    c.cmd(&[b"BLPOP", b"never", b"0"]).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
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
