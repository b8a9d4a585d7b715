//! The status page (`GET /` on the admin listener) in a real headless
//! browser (Debian's chromium): it loads with no console message, shows
//! the active upstream and, after a switch, the new one with the switch.
#![allow(clippy::unwrap_used)]

mod support;

use std::process::Command;

use support::*;

/// What chromium makes of `url` once its scripts ran: the DOM, and the
/// console messages it logged.
async fn browse(url: String, screenshot: Option<std::path::PathBuf>) -> (String, Vec<String>) {
    tokio::task::spawn_blocking(move || {
        let mut cmd = Command::new("chromium");
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--enable-logging=stderr",
            "--v=0",
            "--virtual-time-budget=3000",
            "--window-size=1100,1000",
        ]);
        match &screenshot {
            Some(p) => cmd.arg(format!("--screenshot={}", p.display())),
            None => cmd.arg("--dump-dom"),
        };
        let out = cmd
            .arg(&url)
            .output()
            .expect("chromium (Debian's package; scripts/install-deps.sh installs it)");
        assert!(out.status.success(), "{out:?}");
        let console = String::from_utf8_lossy(&out.stderr)
            .lines()
            .filter(|l| l.contains(":CONSOLE"))
            .map(str::to_string)
            .collect();
        (String::from_utf8_lossy(&out.stdout).into_owned(), console)
    })
    .await
    .unwrap()
}

/// The response's status line and headers, lower-cased names.
async fn raw_head(admin: std::net::SocketAddr, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut c = tokio::net::TcpStream::connect(admin).await.unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut out = Vec::new();
    c.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split("\r\n\r\n")
        .next()
        .unwrap_or_default()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_page_shows_the_active_upstream_and_a_switch() {
    let (_a, _b, s) = sidecar_ab().await;
    let admin = s.admin_addr.unwrap();
    let mut c = client(&s).await;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("v")
        .query_async(&mut c)
        .await
        .unwrap();
    let url = format!("http://{admin}/");
    let (st, page) = http_get(admin, "/").await;
    assert_eq!(st, 200);
    // Self-contained: nothing is loaded from elsewhere.
    assert!(!page.contains("http://") && !page.contains("https://") && !page.contains("src="));
    // Never framed (its buttons switch upstreams); scripts only its own.
    let head = raw_head(admin, "/").await;
    assert!(head.contains("x-frame-options: DENY"), "{head}");
    assert!(head.contains("frame-ancestors 'none'"), "{head}");
    // Its migration source answers 200 whether or not there is one (no
    // 404 in the browser's console).
    let (st, body) = http_get(admin, "/migrations").await;
    assert_eq!((st, body.trim()), (200, r#"{"current":null}"#));
    let (dom, console) = browse(url.clone(), None).await;
    assert!(console.is_empty(), "console: {console:?}");
    assert!(dom.contains(r#"id="active">a<"#), "{dom}");
    assert!(dom.contains("no switch yet"), "{dom}");
    assert_eq!(
        http(admin, "POST", "/upstreams/b/activate", None).await.0,
        200
    );
    let (dom, console) = browse(url.clone(), None).await;
    assert!(console.is_empty(), "console: {console:?}");
    assert!(dom.contains(r#"id="active">b<"#), "{dom}");
    assert!(dom.contains("last switch a → b (manual)"), "{dom}");
    let shot = std::env::temp_dir().join(format!("sidecar-status-{}.png", admin.port()));
    browse(url, Some(shot.clone())).await;
    assert!(std::fs::metadata(&shot).unwrap().len() > 10_000);
    s.shutdown().await;
}
