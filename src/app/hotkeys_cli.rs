//! `redis-sidecar hotkeys`: the hot keys and big keys the running sidecar
//! saw in its traffic (`GET /hotkeys`), as a table like `redis-cli
//! --hotkeys` prints, with no LFU policy and no SCAN needed.

use std::io::Write;

use super::admin_client::{Admin, CliError};

/// Print the report of the sidecar whose admin API is at `admin_url`.
pub fn run(admin_url: &str, token: &str, out: &mut impl Write) -> Result<(), CliError> {
    let admin = Admin::new(admin_url, token)?;
    let r = admin.json("GET", "/hotkeys", None, &[200])?;
    let window = |w: &serde_json::Value, title: &str, out: &mut dyn Write| {
        let _ = writeln!(
            out,
            "{title}: {} requests, the top keys carry {:.1} %",
            w["requests"],
            w["top_share"].as_f64().unwrap_or(0.0) * 100.0
        );
        let _ = writeln!(
            out,
            "{:>4}  {:>9}  {:>6}  {:>12}  {:<30}  commands",
            "db", "requests", "share", "bytes", "key"
        );
        for k in w["keys"].as_array().into_iter().flatten().take(20) {
            let commands: Vec<String> = k["commands"]
                .as_object()
                .into_iter()
                .flatten()
                .map(|(c, n)| format!("{c} {n}"))
                .collect();
            let _ = writeln!(
                out,
                "{:>4}  {:>9}  {:>5.1}%  {:>12}  {:<30}  {}",
                k["db"],
                k["requests"],
                k["share"].as_f64().unwrap_or(0.0) * 100.0,
                k["bytes"],
                k["key"].as_str().unwrap_or_default(),
                commands.join(", ")
            );
        }
    };
    let secs = r["window_seconds"].as_f64().unwrap_or(0.0);
    if r["last"].is_object() {
        window(&r["last"], &format!("last complete window ({secs} s)"), out);
        let _ = writeln!(out);
    }
    window(&r["current"], "current window", out);
    let big = r["big_keys"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nbig keys (requests or replies of at least {} bytes): {}",
        r["big_key_bytes"],
        big.len()
    );
    for b in big.iter().take(20) {
        let _ = writeln!(
            out,
            "{:>4}  {:>12}  {:<30}  {}",
            b["db"],
            b["bytes"],
            b["key"].as_str().unwrap_or_default(),
            b["command"].as_str().unwrap_or_default()
        );
    }
    Ok(())
}
