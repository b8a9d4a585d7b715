//! `rediss://` upstreams against a redis-server with `--tls-port` and
//! certificates generated here with the `openssl` command: the right CA
//! and name work (ACL user and requirepass), a wrong CA or name fails with
//! a clear error that carries no password.
#![allow(clippy::unwrap_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use redis::AsyncCommands;
use redis_sidecar::config::UpstreamConfig;
use redis_sidecar::policy::Builder;
use support::*;

fn tls_upstream(url: String, ca: Option<PathBuf>, name: Option<&str>) -> UpstreamConfig {
    UpstreamConfig {
        name: "tls".into(),
        url,
        tls_ca_file: ca.map(|c| c.to_str().unwrap().to_string()),
        tls_server_name: name.map(str::to_string),
        ..UpstreamConfig::default()
    }
}

#[tokio::test]
async fn tls_upstream_with_acl_user_and_with_requirepass() {
    let r = start_tls_redis();
    let ca = r.dir.join("ca.pem");
    // An ACL user whose name and password need percent-encoding.
    let acl = format!(
        "rediss://app%40svc:{}@localhost:{}",
        ACL_PASSWORD.replace(':', "%3A"),
        r.tls_port
    );
    // requirepass (user "default"), by IP, verified against the name.
    let default = format!("rediss://:{PASSWORD}@127.0.0.1:{}/2", r.tls_port);
    for (up, whoami, db) in [
        (tls_upstream(acl, Some(ca.clone()), None), "app@svc", 0),
        (
            tls_upstream(default, Some(ca.clone()), Some("localhost")),
            "default",
            2,
        ),
    ] {
        let mut cfg = config("redis://unused");
        cfg.upstream = vec![up];
        let s = sidecar_with(cfg, Builder::default()).await;
        let mut c = client(&s).await;
        let key = format!("tls-key-{whoami}");
        let _: () = c.set(&key, "over tls").await.unwrap();
        let v: String = c.get(&key).await.unwrap();
        assert_eq!(v, "over tls");
        let who: String = redis::cmd("ACL")
            .arg("WHOAMI")
            .query_async(&mut c)
            .await
            .unwrap();
        assert_eq!(who, whoami);
        // The write landed on that server, in the URL's db.
        let mut d = r.server.direct().await;
        let _: () = redis::cmd("SELECT")
            .arg(db)
            .query_async(&mut d)
            .await
            .unwrap();
        assert!(d.exists::<_, bool>(&key).await.unwrap());
        let u = upstreams(&s).await;
        assert!(
            u["upstreams"][0]["url"]
                .as_str()
                .unwrap()
                .starts_with("rediss://")
        );
        assert!(!u.to_string().contains(PASSWORD) && !u.to_string().contains("p:ss"));
        s.shutdown().await;
    }
}

#[tokio::test]
async fn wrong_ca_or_name_is_refused_with_a_clear_error() {
    let r = start_tls_redis();
    let url = format!("rediss://:{PASSWORD}@localhost:{}", r.tls_port);
    for (up, expect) in [
        (
            tls_upstream(url.clone(), Some(r.dir.join("other-ca.pem")), None),
            "invalid peer certificate",
        ),
        (
            tls_upstream(
                url.clone(),
                Some(r.dir.join("ca.pem")),
                Some("wrong.example"),
            ),
            "not valid for name",
        ),
        // A plain client against the TLS port fails too.
        (
            UpstreamConfig {
                name: "tls".into(),
                url: format!("redis://:{PASSWORD}@localhost:{}", r.tls_port),
                ..UpstreamConfig::default()
            },
            "upstream unavailable",
        ),
    ] {
        let mut cfg = config("redis://unused");
        cfg.upstream = vec![up];
        cfg.timeouts.queue = Duration::from_millis(300);
        let s = sidecar_with(cfg, Builder::default()).await;
        let mut raw = Raw::connect(s.addr).await;
        let reply = raw.call(&[b"SET", b"k", b"v"]).await;
        let text = String::from_utf8_lossy(&reply).to_string();
        assert!(text.starts_with("-ERR upstream unavailable"), "{text}");
        assert!(text.contains(expect), "{text}");
        assert!(!text.contains(PASSWORD), "{text}");
        let (status, body) = http_get(s.admin_addr.unwrap(), "/readyz").await;
        assert_eq!(status, 503, "{body}");
        assert!(!body.contains(PASSWORD));
        s.shutdown().await;
    }
    // Nothing was written through a refused connection.
    let mut d = r.server.direct().await;
    assert!(!d.exists::<_, bool>("k").await.unwrap());
}

#[tokio::test]
async fn bad_tls_settings_are_config_errors() {
    let mut cfg = config("redis://unused");
    cfg.upstream = vec![tls_upstream(
        "rediss://h:1".into(),
        Some(PathBuf::from("/nonexistent/ca.pem")),
        None,
    )];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
    let mut cfg = config("redis://unused");
    cfg.upstream = vec![tls_upstream("redis://h:1".into(), None, Some("x"))];
    let e = cfg.validate().unwrap_err().to_string();
    assert!(
        e.contains("need a rediss:// or rediss-cluster:// URL"),
        "{e}"
    );
}

/// `rediss-cluster://` against a 3-master cluster on TLS ports whose
/// certificate names only `localhost`: nodes announce their IP as the
/// endpoint and `localhost` as their hostname, so the sidecar connects by
/// address and verifies the hostname (by IP alone verification fails).
/// The password never shows in `/upstreams`.
#[tokio::test]
async fn tls_cluster_verifies_announced_hostnames() {
    let dir = std::env::temp_dir().join(format!("sidecar-tls-cluster-{}", std::process::id()));
    make_certs(&dir, "DNS:localhost");
    let mut nodes = Vec::new();
    let mut tls_ports = Vec::new();
    while nodes.len() < 3 {
        let free = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (port, tls_port) = (free(), free());
        if port > 55_000 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
            continue;
        }
        let conf = format!("nodes-{port}.conf");
        let mut args = tls_args(&dir, tls_port);
        args.extend(
            [
                "--tls-cluster",
                "yes",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-announce-hostname",
                "localhost",
                "--cluster-preferred-endpoint-type",
                "ip",
                "--requirepass",
                PASSWORD,
                "--masterauth",
                PASSWORD,
            ]
            .map(String::from),
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Some(n) = RedisServer::start_on(port, &args) {
            nodes.push(n);
            tls_ports.push(tls_port);
        }
    }
    let mut create = vec![
        "-a".to_string(),
        PASSWORD.into(),
        "--cluster".into(),
        "create".into(),
    ];
    create.extend(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)));
    create.push("--cluster-yes".into());
    let out = Command::new("redis-cli").args(&create).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    let s = sidecar_with(
        {
            let mut c = config("redis://unused");
            c.upstream = vec![tls_upstream(
                format!("rediss-cluster://:{PASSWORD}@localhost:{}", tls_ports[0]),
                Some(dir.join("ca.pem")),
                None,
            )];
            c
        },
        Builder::default(),
    )
    .await;
    wait_up(&s, 0).await;
    let mut c = client(&s).await;
    for i in 0..100 {
        let _: () = c.set(format!("tls:{i}"), i).await.unwrap();
    }
    let vals: Vec<i64> = redis::cmd("MGET")
        .arg((0..100).map(|i| format!("tls:{i}")).collect::<Vec<_>>())
        .query_async(&mut c)
        .await
        .unwrap();
    assert_eq!(vals, (0..100).collect::<Vec<i64>>());
    let u = upstreams(&s).await;
    let masters = u["upstreams"][0]["cluster"]["masters"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(masters.len(), 3);
    // Every master was reached over its TLS port.
    for m in &masters {
        let addr = m["address"].as_str().unwrap();
        assert!(
            tls_ports.iter().any(|p| addr.ends_with(&format!(":{p}"))),
            "{addr} is not a TLS port"
        );
        assert!(m["node"]["connections"].as_i64().unwrap() >= 1, "{m}");
    }
    assert!(!u.to_string().contains(PASSWORD));
    s.shutdown().await;
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
}
