//! The files under `deploy/`: the alert rules pass `promtool check rules`
//! and every series they and the Grafana dashboard name exists in a
//! running sidecar's `/metrics` (once each feature they watch has been
//! used); the VPS configuration of the systemd unit validates; every link
//! of the README and `docs/` resolves.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::*;

const ROOT: &str = env!("CARGO_MANIFEST_DIR");
const BIN: &str = env!("CARGO_BIN_EXE_redis-sidecar");

#[test]
fn promtool_accepts_the_alert_rules() {
    let out = Command::new("promtool")
        .args(["check", "rules", &format!("{ROOT}/deploy/alerts.yml")])
        .output()
        .expect("promtool (Debian's prometheus package; scripts/install-deps.sh installs it)");
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("SUCCESS"),
        "{out:?}"
    );
}

/// Every `redis_sidecar_*` name in `text`.
fn series_named(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("redis_sidecar_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        out.push(name);
    }
    out.sort();
    out.dedup();
    out
}

/// A sidecar with a cache rule, a rate limit and two endpoints, used so
/// that every series exists (a switch, a refused reload, a migration
/// started and aborted); then each name the alert rules use is in its
/// `/metrics`, and each series of its `/metrics` is in the metrics
/// reference.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_series_the_alert_rules_name_exists() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    let dir = std::env::temp_dir().join(format!("sidecar-deploy-{}", a.port));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("sidecar.toml");
    let head = "listen = \"127.0.0.1:0\"\nadmin_listen = \"127.0.0.1:0\"\n\
        [cache]\nenabled = true\n[[cache.rule]]\npattern = \"c:*\"\nttl = \"5s\"\n\
        [[rate_limit]]\nname = \"tight\"\npattern = \"r:*\"\nper = \"key\"\nrate = \"1/h\"\n\
        [[ttl]]\npattern = \"t:*\"\ndefault = \"1h\"\n";
    write_config(&file, head, &[("a", &a), ("b", &b)]);
    let s = sidecar_from_file(&file).await;
    wait_up(&s, 1).await;
    let admin = s.admin_addr.unwrap();
    let mut c = client(&s).await;
    for _ in 0..3 {
        let _: Option<String> = redis::cmd("GET")
            .arg("c:1")
            .query_async(&mut c)
            .await
            .unwrap();
        let _: redis::RedisResult<Option<String>> =
            redis::cmd("GET").arg("r:1").query_async(&mut c).await;
    }
    let fallback = || metric(&s, "upstream_fallback_active", &[]);
    assert_eq!(fallback(), 0.0);
    assert_eq!(
        http(admin, "POST", "/upstreams/b/activate", None).await.0,
        200
    );
    assert_eq!(fallback(), 1.0, "b is not the first endpoint");
    assert_eq!(
        http(admin, "POST", "/upstreams/a/activate", None).await.0,
        200
    );
    assert_eq!(fallback(), 0.0);
    std::fs::write(&file, "this is not toml").unwrap();
    assert_ne!(http(admin, "POST", "/reload", None).await.0, 200);
    let (st, body) = http_json(admin, "POST", "/migrations", r#"{"to": "b"}"#).await;
    assert_eq!(st, 202, "{body}");
    assert_eq!(
        http(admin, "POST", "/migrations/current/abort", None)
            .await
            .0,
        200
    );
    let (_, metrics) = http_get(admin, "/metrics").await;
    let rules = std::fs::read_to_string(format!("{ROOT}/deploy/alerts.yml")).unwrap();
    let names = series_named(&rules);
    assert!(names.len() >= 9, "{names:?}");
    for name in names {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} "))),
            "the alert rules name {name}, which /metrics does not have"
        );
    }
    // The dashboard's expressions too (a histogram by its family's name).
    let families: Vec<&str> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .collect();
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{ROOT}/deploy/grafana-dashboard.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = String::new();
    fn collect(v: &serde_json::Value, out: &mut String) {
        match v {
            serde_json::Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr" | "query", serde_json::Value::String(s)) => {
                            out.push_str(s);
                            out.push('\n');
                        }
                        _ => collect(v, out),
                    }
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|v| collect(v, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    let named = series_named(&exprs);
    assert!(named.len() >= 15, "{named:?}");
    for name in named {
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            families.contains(&family),
            "the dashboard names {name}, which /metrics does not have"
        );
    }
    // And every series /metrics has is in the metrics reference.
    let reference = std::fs::read_to_string(format!("{ROOT}/docs/metrics.md")).unwrap();
    for name in metrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
    {
        assert!(
            reference.contains(&format!("`{name}`")),
            "{name} is missing from docs/metrics.md"
        );
    }
    s.shutdown().await;
}

/// The configuration the systemd unit runs with (its `ExecStartPre`
/// check, with the environment file's REDIS_URL) validates.
#[test]
fn the_systemd_units_configuration_validates() {
    let unit = std::fs::read_to_string(format!("{ROOT}/deploy/redis-sidecar.service")).unwrap();
    assert!(unit.contains("--check-config"), "{unit}");
    assert!(
        unit.contains("ExecReload=/bin/kill -HUP $MAINPID"),
        "{unit}"
    );
    let out = Command::new(BIN)
        .args([
            "--config",
            &format!("{ROOT}/deploy/redis-sidecar.toml"),
            "--check-config",
        ])
        .env(
            "REDIS_URL",
            "rediss://default:secret@redis.example.com:6380",
        )
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("secret")
            && !String::from_utf8_lossy(&out.stderr).contains("secret"),
        "{out:?}"
    );
}

/// GitHub's anchor of a heading: lower case, punctuation dropped (but `-`
/// and `_`), spaces to `-`.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '-' || *c == '_' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Every relative link of the README and `docs/` reaches a file of the
/// repository, and a heading of it where the link names one.
#[test]
fn every_link_of_the_readme_and_the_docs_resolves() {
    let root = std::path::Path::new(ROOT);
    let mut pages = vec![root.join("README.md")];
    for e in std::fs::read_dir(root.join("docs")).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "md") {
            pages.push(p);
        }
    }
    let mut links = 0;
    for page in &pages {
        let text = std::fs::read_to_string(page).unwrap();
        let mut rest = &text[..];
        while let Some(i) = rest.find("](") {
            let tail = &rest[i + 2..];
            let Some(end) = tail.find(')') else { break };
            let target = &tail[..end];
            rest = &tail[end..];
            if target.starts_with("http") || target.contains(' ') {
                continue;
            }
            links += 1;
            let (file, frag) = target.split_once('#').unwrap_or((target, ""));
            let path = if file.is_empty() {
                page.clone()
            } else {
                page.parent().unwrap().join(file)
            };
            assert!(path.exists(), "{}: {target}: no such file", page.display());
            if !frag.is_empty() {
                let body = std::fs::read_to_string(&path).unwrap();
                assert!(
                    body.lines()
                        .filter_map(|l| l.strip_prefix('#'))
                        .any(|h| anchor(h.trim_start_matches('#')) == frag),
                    "{}: {target}: no such heading",
                    page.display()
                );
            }
        }
    }
    assert!(links > 20, "{links} links");
}
