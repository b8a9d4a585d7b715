//! The metric reference: what is there from startup, what a policy's
//! refusal counts as, latency per endpoint, and series that go with the
//! rules they belong to. Each check failed before its change.
#![allow(clippy::unwrap_used)]

mod support;

use support::*;

/// Samples of an unprefixed metric (`process_*`) in the exposition.
fn raw_metric(s: &redis_sidecar::Sidecar, name: &str) -> Option<f64> {
    let text = String::from_utf8(s.metrics.render()).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(&format!("{name} "))?.parse().ok())
}

fn has_series(s: &redis_sidecar::Sidecar, needle: &str) -> bool {
    String::from_utf8(s.metrics.render())
        .unwrap()
        .lines()
        .any(|l| !l.starts_with('#') && l.contains(needle))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn present_from_startup_at_zero_with_process_and_build_info() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let s = sidecar_with(
        config_multi(&[("a", a.url()), ("b", b.url())]),
        redis_sidecar::policy::Builder::default(),
    )
    .await;
    // Process series, unprefixed as every Prometheus client names them.
    assert!(raw_metric(&s, "process_resident_memory_bytes").unwrap() > 1e6);
    assert!(raw_metric(&s, "process_open_fds").unwrap() >= 3.0);
    assert!(raw_metric(&s, "process_max_fds").unwrap() >= 3.0);
    assert!(raw_metric(&s, "process_cpu_seconds_total").is_some());
    let start = raw_metric(&s, "process_start_time_seconds").unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((now - start).abs() < 3600.0, "start {start}, now {now}");
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(metric(&s, "build_info", &[("version", version)]), 1.0);
    // Counters at 0 before their first event.
    for r in ["ok", "error"] {
        assert!(has_series(
            &s,
            &format!("redis_sidecar_config_reloads_total{{result=\"{r}\"}} 0")
        ));
    }
    for (from, to) in [("a", "b"), ("b", "a")] {
        assert!(has_series(
            &s,
            &format!(
                "redis_sidecar_failovers_total{{from=\"{from}\",reason=\"down\",to=\"{to}\"}} 0"
            )
        ));
    }
    assert!(has_series(
        &s,
        "redis_sidecar_client_connections_rejected_total{reason=\"max_clients\"} 0"
    ));
    s.shutdown().await;
}

/// A policy's refusal is `result="refused"`, Redis's error reply
/// `result="error"`; a request's time is counted on its endpoint.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_is_not_error_and_latency_is_per_endpoint() {
    let redis = RedisServer::start();
    let mut cfg = config(&redis.url());
    cfg.rate_limit = toml::from_str::<redis_sidecar::config::Config>(
        "[[rate_limit]]\nname = \"gets\"\ncommands = [\"GET\"]\nper = \"global\"\nrate = \"1/h\"\nburst = 1\n",
    )
    .unwrap()
    .rate_limit;
    let s = sidecar_with(cfg, redis_sidecar::policy::Builder::default()).await;
    let mut c = Raw::connect(s.addr).await;
    assert_eq!(&c.call(&[b"GET", b"k"]).await[..], b"$-1\r\n");
    assert!(c.call(&[b"GET", b"k"]).await.starts_with(b"-"));
    assert_eq!(&c.call(&[b"SET", b"s", b"x"]).await[..], b"+OK\r\n");
    assert!(c.call(&[b"INCR", b"s"]).await.starts_with(b"-ERR"));
    let count = |cmd: &str, result: &str| {
        metric(
            &s,
            "commands_total",
            &[("command", cmd), ("result", result)],
        )
    };
    assert_eq!(count("get", "ok"), 1.0);
    assert_eq!(count("get", "refused"), 1.0);
    assert_eq!(count("get", "error"), 0.0);
    assert_eq!(count("incr", "error"), 1.0);
    assert_eq!(count("incr", "refused"), 0.0);
    // Requests are timed on their endpoint, one in 8 of each client's.
    for _ in 0..16 {
        c.call(&[b"SET", b"t", b"1"]).await;
    }
    let timed = metric(
        &s,
        "upstream_request_duration_seconds_count",
        &[("upstream", "test")],
    );
    assert!(
        (2.0..=3.0).contains(&timed),
        "{timed} of 19 upstream requests timed"
    );
    s.shutdown().await;
}

/// A rule removed by a reload takes its series along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_rule_leaves_no_series() {
    let redis = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("rs-metrics-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("c.toml");
    let rules = "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[[rate_limit]]\nname = \"gone\"\nrate = \"1000/s\"\n[[rate_limit]]\nname = \"stays\"\nrate = \"1000/s\"\n[[cache.rule]]\npattern = \"c:*\"\nname = \"cached\"\nttl = \"1m\"\n";
    write_config(
        &file,
        &format!("{rules}[cache]\nenabled = true\n"),
        &[("a", &redis)],
    );
    let s = sidecar_from_file(&file).await;
    let mut c = Raw::connect(s.addr).await;
    for _ in 0..3 {
        c.call(&[b"GET", b"c:x"]).await;
    }
    assert!(metric(&s, "ratelimit_decisions_total", &[("rule", "gone")]) >= 3.0);
    assert!(metric(&s, "cache_requests_total", &[("rule", "cached")]) >= 3.0);
    write_config(
        &file,
        "listen = \"127.0.0.1:0\"\nadmin_listen = \"\"\n[[rate_limit]]\nname = \"stays\"\nrate = \"1000/s\"\n[cache]\nenabled = true\n",
        &[("a", &redis)],
    );
    s.control.reload().unwrap();
    assert!(
        !has_series(&s, "rule=\"gone\""),
        "a removed rule's series stayed"
    );
    assert!(
        !has_series(&s, "rule=\"cached\""),
        "a removed cache rule's series stayed"
    );
    assert!(metric(&s, "ratelimit_decisions_total", &[("rule", "stays")]) >= 3.0);
    s.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
}
