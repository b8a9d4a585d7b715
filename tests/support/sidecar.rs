//! The sidecar in-process on port 0: configurations, clients, metrics.

use std::time::Duration;

use redis_sidecar::Sidecar;
use redis_sidecar::config::{Config, UpstreamConfig};
use redis_sidecar::policy::Builder;

use super::*;

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
    upstreams_at(s.admin_addr.unwrap()).await
}

/// `GET /upstreams` of the admin listener at `admin`, parsed.
pub async fn upstreams_at(admin: std::net::SocketAddr) -> serde_json::Value {
    let (status, body) = http_get(admin, "/upstreams").await;
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
    let s = sidecar_with(config(&cluster.url()), Builder::default()).await;
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

/// Two servers and a sidecar in front of them (`a` first, `b` up).
pub async fn sidecar_ab() -> (RedisServer, RedisServer, Sidecar) {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let s = sidecar_with(
        config_multi(&[("a", a.url()), ("b", b.url())]),
        Builder::default(),
    )
    .await;
    wait_up(&s, 1).await;
    (a, b, s)
}
