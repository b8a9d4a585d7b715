//! Test support: a real `redis-server` on a free port, the sidecar
//! in-process on port 0, and a raw RESP client for byte-level checks.
#![allow(dead_code, clippy::unwrap_used)]

use std::net::TcpListener as StdListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_sidecar::Sidecar;
use redis_sidecar::config::{Config, UpstreamConfig};
use redis_sidecar::policy::Builder;
use redis_sidecar::wire::ReplyScanner;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// A redis-server child process, killed on drop.
pub struct RedisServer {
    pub port: u16,
    child: Child,
    pub password: Option<String>,
    dir: std::path::PathBuf,
}

fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl RedisServer {
    /// Start on `port` (e.g. again on the port of one that was killed);
    /// `None` if it did not come up.
    pub fn start_on(port: u16, extra: &[&str]) -> Option<RedisServer> {
        let bin = which("redis-server").expect(
            "redis-server is not installed: run ./scripts/test.sh, which installs it (apt-get install redis-server)",
        );
        let dir =
            std::env::temp_dir().join(format!("redis-sidecar-test-{port}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port_arg = port.to_string();
        let mut args = vec![
            "--port",
            &port_arg,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ];
        args.extend(["--enable-debug-command", "yes"]);
        let child = Command::new(&bin)
            .args(&args)
            .arg("--dir")
            .arg(&dir)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let password = extra
            .windows(2)
            .find(|w| w[0] == "--requirepass")
            .map(|w| w[1].to_string());
        let mut server = RedisServer {
            port,
            child,
            password,
            dir,
        };
        server.wait_ready().then_some(server)
    }

    /// A Sentinel on a free port watching the master on `master_port` as
    /// `mymaster` (quorum 2, down after 1 s).
    pub fn start_sentinel(master_port: u16) -> RedisServer {
        let bin = which("redis-server").unwrap();
        for _ in 0..5 {
            let port = free_port();
            let dir = std::env::temp_dir()
                .join(format!("redis-sidecar-test-{port}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let conf = dir.join("sentinel.conf");
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor mymaster 127.0.0.1 {master_port} 2\nsentinel down-after-milliseconds mymaster 1000\nsentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 1\n",
                    dir.display()
                ),
            )
            .unwrap();
            let child = Command::new(&bin)
                .arg(&conf)
                .arg("--sentinel")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let mut server = RedisServer {
                port,
                child,
                password: None,
                dir,
            };
            if server.wait_ready() {
                return server;
            }
        }
        panic!("could not start a sentinel");
    }

    pub fn start() -> RedisServer {
        Self::start_with(&[])
    }

    /// Start with extra `redis-server` arguments (e.g. `--requirepass x`).
    pub fn start_with(extra: &[&str]) -> RedisServer {
        for _ in 0..5 {
            if let Some(server) = Self::start_on(free_port(), extra) {
                return server;
            }
            // Port taken between our probe and redis-server's bind: retry.
        }
        panic!("could not start redis-server");
    }

    fn wait_ready(&mut self) -> bool {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(p) => format!("redis://:{p}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// Direct connection to this Redis (bypassing the sidecar).
    pub async fn direct(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(bin))
        .find(|p| p.is_file())
}

/// A config for the sidecar on port 0 in front of `upstream`.
pub fn config(upstream: &str) -> Config {
    Config {
        listen: "127.0.0.1:0".into(),
        admin_listen: "127.0.0.1:0".into(),
        upstream: vec![UpstreamConfig {
            name: "test".into(),
            url: upstream.into(),
            ..UpstreamConfig::default()
        }],
        ..Config::default()
    }
}

/// A config for the sidecar on port 0 in front of `(name, url)` endpoints
/// in priority order.
pub fn config_multi(upstreams: &[(&str, String)]) -> Config {
    Config {
        upstream: upstreams
            .iter()
            .map(|(name, url)| UpstreamConfig {
                name: name.to_string(),
                url: url.clone(),
                ..UpstreamConfig::default()
            })
            .collect(),
        ..config("redis://unused")
    }
}

/// Write a sidecar TOML file: `head` (top-level settings and tables that
/// come before the endpoints), then one `[[upstream]]` per `(name, server)`
/// in priority order.
pub fn write_config(file: &std::path::Path, head: &str, upstreams: &[(&str, &RedisServer)]) {
    let mut text = head.to_string();
    for (name, r) in upstreams {
        text.push_str(&format!(
            "[[upstream]]\nname = \"{name}\"\nurl = \"{}\"\n",
            r.url()
        ));
    }
    std::fs::write(file, text).unwrap();
}

/// `GET /upstreams`, parsed.
pub async fn upstreams(s: &Sidecar) -> serde_json::Value {
    let (status, body) = http_get(s.admin_addr.unwrap(), "/upstreams").await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// The name of the active endpoint, from `GET /upstreams`.
pub async fn active(s: &Sidecar) -> String {
    upstreams(s).await["active"].as_str().unwrap().to_string()
}

/// Start the sidecar in front of `redis` with default settings.
pub async fn sidecar(redis: &RedisServer) -> Sidecar {
    sidecar_with(config(&redis.url()), Builder::default()).await
}

pub async fn sidecar_with(config: Config, builder: Builder) -> Sidecar {
    let v = config.validate().unwrap();
    Sidecar::start(v, builder).await.unwrap()
}

pub fn url(s: &Sidecar) -> String {
    format!("redis://{}", s.addr)
}

/// A multiplexed `redis` crate connection through the sidecar.
pub async fn client(s: &Sidecar) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url(s))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// The same over RESP3.
pub async fn client3(s: &Sidecar) -> redis::aio::MultiplexedConnection {
    redis::Client::open(format!("{}/?protocol=resp3", url(s)))
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

/// A raw RESP client for byte-exact checks.
pub struct Raw {
    pub stream: TcpStream,
    buf: BytesMut,
    scanner: ReplyScanner,
}

impl Raw {
    pub async fn connect(addr: std::net::SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
            scanner: ReplyScanner::new(1 << 30),
        }
    }

    pub async fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).await.unwrap();
    }

    /// Send a command as a RESP array.
    pub async fn cmd(&mut self, args: &[&[u8]]) {
        let raw = redis_sidecar::wire::encode_command(args);
        self.send(&raw).await;
    }

    /// Next whole reply (panics after 10 s).
    pub async fn read(&mut self) -> Bytes {
        tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(f) = self.scanner.next(&mut self.buf).unwrap() {
                    return f;
                }
                let n = self.stream.read_buf(&mut self.buf).await.unwrap();
                assert!(n > 0, "connection closed while waiting for a reply");
            }
        })
        .await
        .expect("no reply within 10 s")
    }

    /// Send one command and read its reply.
    pub async fn call(&mut self, args: &[&[u8]]) -> Bytes {
        self.cmd(args).await;
        self.read().await
    }

    /// True when the peer closed the connection (after any pending bytes).
    pub async fn closed(&mut self) -> bool {
        let mut tmp = [0u8; 1024];
        matches!(
            tokio::time::timeout(Duration::from_secs(5), async {
                loop {
                    match self.stream.read(&mut tmp).await {
                        Ok(0) | Err(_) => return true,
                        Ok(_) => continue,
                    }
                }
            })
            .await,
            Ok(true)
        )
    }
}

/// Poll `f` until it returns true (10 s max).
pub async fn eventually<F, Fut>(mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if f().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

/// GET a path from the admin listener; (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http(addr, "GET", path, None).await
}

/// An admin request, with a bearer token if given; (status, body).
pub async fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    s.write_all(
        format!(
            "{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
            .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// `blocked_clients` of the upstream's `INFO clients`, read directly.
pub async fn blocked_clients(redis: &RedisServer) -> i64 {
    let mut d = redis.direct().await;
    let info: String = redis::cmd("INFO")
        .arg("clients")
        .query_async(&mut d)
        .await
        .unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("blocked_clients:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap()
}

/// A reply with the connection id of a HELLO map replaced by `ID`: it
/// differs between a direct connection and one through the sidecar.
pub fn normalize_hello_id(reply: &[u8]) -> Vec<u8> {
    let mut out = reply.to_vec();
    let pat = b"$2\r\nid\r\n:";
    let mut from = 0;
    while let Some(at) = out[from..].windows(pat.len()).position(|w| w == pat) {
        let start = from + at + pat.len();
        let end = start + out[start..].iter().position(|&b| b == b'\r').unwrap();
        out.splice(start..end, b"ID".iter().copied());
        from = start;
    }
    out
}

/// A sidecar started from a TOML file that `control.reload()` re-reads.
pub async fn sidecar_from_file(file: &std::path::Path) -> Sidecar {
    let load = {
        let file = file.to_path_buf();
        move || -> anyhow::Result<Config> {
            let text = std::fs::read_to_string(&file)?;
            Ok(Config::from_toml(&text, &|_| None)?)
        }
    };
    let v = load().unwrap().validate().unwrap();
    Sidecar::start_with(v, Builder::default(), Some(std::sync::Arc::new(load)))
        .await
        .unwrap()
}

impl RedisServer {
    /// The process id (for SIGSTOP/SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// What a [`FaultHop`] does to the bytes it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Passed on at once.
    Pass = 0,
    /// Held (both directions) until the mode changes.
    Stall = 1,
    /// Replies dripped a few bytes per millisecond.
    Drip = 2,
}

/// A TCP hop in front of a port that can stall, drip replies, or reset
/// every connection it carries (RST), for failure tests on loopback.
pub struct FaultHop {
    pub port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    resets: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl FaultHop {
    pub async fn start(target: u16) -> FaultHop {
        use std::sync::atomic::{AtomicU8, AtomicU64};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(AtomicU8::new(Fault::Pass as u8));
        let resets = std::sync::Arc::new(AtomicU64::new(0));
        let (m, r) = (mode.clone(), resets.clone());
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(("127.0.0.1", target)).await else {
                    continue;
                };
                tokio::spawn(hop(client, server, m.clone(), r.clone()));
            }
        });
        FaultHop {
            port,
            mode,
            resets,
            task,
        }
    }

    pub fn set(&self, f: Fault) {
        self.mode
            .store(f as u8, std::sync::atomic::Ordering::SeqCst);
    }

    /// Reset every connection carried now.
    pub fn reset_all(&self) {
        self.resets
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for FaultHop {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn hop(
    client: TcpStream,
    server: TcpStream,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
    resets: std::sync::Arc<std::sync::atomic::AtomicU64>,
) {
    use std::sync::atomic::Ordering;
    let born = resets.load(Ordering::SeqCst);
    // A zero linger makes the close an RST (connection reset mid-reply).
    zero_linger(&client);
    zero_linger(&server);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let pump = |mut r: tokio::net::tcp::OwnedReadHalf,
                mut w: tokio::net::tcp::OwnedWriteHalf,
                drip: bool| {
        let (mode, resets) = (mode.clone(), resets.clone());
        async move {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = tokio::select! {
                    n = r.read(&mut buf) => match n { Ok(0) | Err(_) => return, Ok(n) => n },
                    _ = async { loop {
                        if resets.load(Ordering::SeqCst) != born { return; }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    } } => return,
                };
                while mode.load(Ordering::SeqCst) == Fault::Stall as u8 {
                    if resets.load(Ordering::SeqCst) != born {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                if drip && mode.load(Ordering::SeqCst) == Fault::Drip as u8 {
                    for chunk in buf[..n].chunks(8) {
                        if w.write_all(chunk).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                } else if w.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    tokio::select! {
        _ = pump(cr, sw, false) => {}
        _ = pump(sr, cw, true) => {}
    }
}

#[allow(deprecated)]
fn zero_linger(s: &TcpStream) {
    let _ = s.set_linger(Some(Duration::ZERO));
}

/// The sum of a metric's samples whose labels include all of `labels`,
/// from the sidecar's Prometheus text.
pub fn metric(s: &Sidecar, name: &str, labels: &[(&str, &str)]) -> f64 {
    let text = String::from_utf8(s.metrics.render()).unwrap();
    let prefixed = format!("redis_sidecar_{name}");
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (head, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match head.split_once('{') {
                Some((m, r)) => (m, r),
                None => (head, ""),
            };
            (metric == prefixed
                && labels
                    .iter()
                    .all(|(k, v)| rest.contains(&format!("{k}=\"{v}\""))))
            .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// This process's resident memory (KiB), from `/proc/self/status`.
pub fn rss_kib() -> u64 {
    proc_status_kib("VmRSS:")
}

/// A field of `/proc/self/status` in KiB (`VmRSS:`, `VmHWM:`).
pub fn proc_status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// Tests of one binary that measure time or the process's memory take
/// this: `write()` to run alone, `read()` to run alongside each other but
/// not alongside a `write()` holder.
pub fn serial() -> &'static tokio::sync::RwLock<()> {
    static LOCK: std::sync::OnceLock<tokio::sync::RwLock<()>> = std::sync::OnceLock::new();
    LOCK.get_or_init(|| tokio::sync::RwLock::new(()))
}

/// A Redis Cluster of `masters` masters with one replica each, on free
/// ports (each port's cluster bus, port + 10000, free too), created with
/// `redis-cli --cluster create` and waited on until every node says
/// `cluster_state:ok` and every replica has synced with its master. Nodes stop when it is dropped.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
}

impl Cluster {
    pub fn start(masters: usize) -> Cluster {
        let mut nodes = Vec::new();
        while nodes.len() < masters * 2 {
            let port = free_port();
            if port > 55_000 || StdListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            if let Some(n) = RedisServer::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-node-timeout",
                    "2000",
                    // Replicas sync at once (the default waits 5 s), so a
                    // master can fail over as soon as the cluster is up.
                    "--repl-diskless-sync-delay",
                    "0",
                    "--cluster-config-file",
                    &format!("nodes-{port}.conf"),
                ],
            ) {
                nodes.push(n);
            }
        }
        let mut args: Vec<String> = vec!["--cluster".into(), "create".into()];
        args.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
        args.extend([
            "--cluster-replicas".into(),
            "1".into(),
            "--cluster-yes".into(),
        ]);
        let out = Command::new(which("redis-cli").expect("redis-cli is not installed"))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "CLUSTER", "INFO"])
                    .output()
                    .unwrap();
                let nodes_out = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "CLUSTER", "NODES"])
                    .output()
                    .unwrap();
                // Every replica known as one everywhere.
                let replicas = String::from_utf8_lossy(&nodes_out.stdout)
                    .lines()
                    .filter(|l| l.split(' ').nth(2).is_some_and(|f| f.contains("slave")))
                    .count();
                let repl = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "INFO", "replication"])
                    .output()
                    .unwrap();
                let repl = String::from_utf8_lossy(&repl.stdout);
                // A replica has its data (it could take over).
                let synced = !repl.contains("role:slave") || repl.contains("master_link_status:up");
                if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok")
                    && replicas == masters
                    && synced
                {
                    break;
                }
                assert!(Instant::now() < deadline, "the cluster did not become ok");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Cluster { nodes }
    }
}

/// Wait until `/upstreams` says endpoint `index` is up (a cluster: its
/// slot map read and `cluster_state:ok`); panics with what it says if not.
pub async fn wait_up(s: &Sidecar, index: usize) {
    if !eventually(|| async {
        upstreams(s).await["upstreams"][index]["health"].as_str() == Some("up")
    })
    .await
    {
        panic!("endpoint {index} is not up: {}", upstreams(s).await);
    }
}

/// The sidecar in front of `cluster` (seeds: its first two nodes), up.
pub async fn cluster_sidecar(cluster: &Cluster) -> Sidecar {
    let seeds: Vec<String> = cluster
        .nodes
        .iter()
        .take(2)
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let s = sidecar_with(
        config(&format!("redis-cluster://{}", seeds.join(","))),
        Builder::default(),
    )
    .await;
    wait_up(&s, 0).await;
    s
}

/// An enforcing `[[ttl]]` rule without a sweeper.
pub fn ttl_rule(
    pattern: &str,
    default: Option<Duration>,
    max: Option<Duration>,
) -> redis_sidecar::config::TtlRule {
    redis_sidecar::config::TtlRule {
        pattern: pattern.into(),
        name: None,
        default,
        max,
        mode: redis_sidecar::config::RuleMode::Enforce,
        sweep_rate: None,
        sweep_every: Duration::from_secs(600),
    }
}

pub fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl is not installed: run ./scripts/test.sh, which installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA (`ca.pem`), a server certificate it signed for the names of
/// `san` (`DNS:localhost,IP:127.0.0.1`; `server.pem`, `server.key`), and
/// an unrelated CA (`other-ca.pem`), made with the `openssl` command.
pub fn make_certs(dir: &Path, san: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (key, pem, cn) in [
        ("ca.key", "ca.pem", "sidecar test CA"),
        ("other-ca.key", "other-ca.pem", "another CA"),
    ] {
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                key,
                "-out",
                pem,
                "-days",
                "2",
                "-subj",
                &format!("/CN={cn}"),
            ],
        );
    }
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ],
    );
    std::fs::write(dir.join("san.ext"), format!("subjectAltName={san}\n")).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "san.ext",
        ],
    );
}
