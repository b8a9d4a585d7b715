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
