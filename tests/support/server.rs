//! A real `redis-server` on a free port (and a Redis Cluster of them).

use std::net::TcpListener as StdListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

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

    /// Whether a migration's leader record (`{redis-sidecar}:migration`)
    /// is on this Redis: it is there while a leader refreshes it, and goes
    /// away by its TTL when the leader dies.
    pub async fn has_migration_record(&self) -> bool {
        let n: i64 = redis::cmd("EXISTS")
            .arg("{redis-sidecar}:migration")
            .query_async(&mut self.direct().await)
            .await
            .unwrap();
        n == 1
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

/// `SET k:<i> <i>` for `i` in `0..n`, pipelined.
pub async fn set_numbered(c: &mut redis::aio::MultiplexedConnection, n: usize) {
    let mut p = redis::pipe();
    for i in 0..n {
        p.set(format!("k:{i}"), i).ignore();
    }
    let () = p.query_async(c).await.unwrap();
}

pub fn which(bin: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| std::path::Path::new(d).join(bin))
        .find(|p| p.is_file())
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

/// Blocked clients over every node of `cluster`.
pub async fn cluster_blocked(cluster: &Cluster) -> i64 {
    let mut n = 0;
    for node in &cluster.nodes {
        n += blocked_clients(node).await;
    }
    n
}

impl RedisServer {
    /// The process id (for SIGSTOP/SIGCONT).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// A Redis Cluster of `masters` masters with one replica each, on free
/// ports (each port's cluster bus, port + 10000, free too), created with
/// `redis-cli --cluster create` and waited on until every node says
/// `cluster_state:ok` and every replica has synced with its master. Nodes stop when it is dropped.
pub struct Cluster {
    pub nodes: Vec<RedisServer>,
    /// Dropped after the nodes: a fault test's cluster runs alone.
    _share: Share,
}

/// Clusters of one test binary run side by side, except the one of a test
/// that kills or reshards nodes and times the recovery: it runs alone (a
/// dozen clusters starting beside it stretched a 4 s recovery past 30 s on
/// this 2-core machine).
static CLUSTERS: std::sync::RwLock<()> = std::sync::RwLock::new(());

enum Share {
    Beside(#[allow(dead_code)] std::sync::RwLockReadGuard<'static, ()>),
    Alone(#[allow(dead_code)] std::sync::RwLockWriteGuard<'static, ()>),
}

impl Cluster {
    /// `redis-cluster://` with its first two nodes as seeds.
    pub fn url(&self) -> String {
        let seeds: Vec<String> = self
            .nodes
            .iter()
            .take(2)
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis-cluster://{}", seeds.join(","))
    }

    pub fn start(masters: usize) -> Cluster {
        let share = Share::Beside(
            CLUSTERS
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Cluster::start_with(masters, share)
    }

    /// [`Cluster::start`], with no other cluster of this test binary
    /// running meanwhile (waits for those running to end).
    pub fn start_alone(masters: usize) -> Cluster {
        let share = Share::Alone(
            CLUSTERS
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        Cluster::start_with(masters, share)
    }

    fn start_with(masters: usize, share: Share) -> Cluster {
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
        Cluster {
            nodes,
            _share: share,
        }
    }
}
