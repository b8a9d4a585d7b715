//! `redis-sidecar migrate --to NAME [--cutover]`: starts a migration (or
//! follows the one running to NAME) through the admin API, shows its
//! progress and ends with a summary. Plain HTTP/1.1 over a blocking socket:
//! the admin listener is local.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use crate::app::admin_client::Admin;
pub use crate::app::admin_client::CliError;

/// How the migration ended, as far as the command is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Cut over (`done`), or in sync without `--cutover`.
    Ok,
    /// Failed, aborted, or rolled back.
    NotDone,
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// One progress line: a bar of the first copy, keys, bytes, rate, ETA,
/// backlog and phase.
pub fn progress_line(m: &serde_json::Value) -> String {
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    let (copied, total) = (n("keys_copied"), n("keys_total_estimate"));
    let share = if total == 0 {
        // Not counted yet, or nothing to copy.
        if m["phase"] == "copying" { 0.0 } else { 1.0 }
    } else {
        (copied as f64 / total as f64).min(1.0)
    };
    let filled = (share * 20.0).round() as usize;
    let rate = m["keys_per_second"].as_f64().unwrap_or(0.0);
    let left = n("keys_left_estimate");
    let eta = if left == 0 {
        "0s".to_string()
    } else if rate > 0.0 {
        format!("{:.0}s", left as f64 / rate)
    } else {
        "?".to_string()
    };
    format!(
        "[{}{}] {:>3.0}% keys {copied}/{total}  {}  {rate:.0} keys/s  ETA {eta}  backlog {}  {}",
        "#".repeat(filled),
        ".".repeat(20 - filled),
        share * 100.0,
        mib(n("bytes_copied")),
        n("backlog"),
        m["phase"].as_str().unwrap_or("?"),
    )
}

fn summary(m: &serde_json::Value) -> String {
    let n = |k: &str| m[k].as_u64().unwrap_or(0);
    format!(
        "migration {} -> {}: {} ({})\n  keys copied {}, copied again after writes {}, copied back {}\n  {} in {}s, cutover pause {} ms, scripts loaded {}, errors {}",
        m["from"].as_str().unwrap_or("?"),
        m["to"].as_str().unwrap_or("?"),
        m["phase"].as_str().unwrap_or("?"),
        m["reason"].as_str().unwrap_or(""),
        n("keys_copied"),
        n("keys_recopied"),
        n("keys_copied_back"),
        mib(n("bytes_copied")),
        m["elapsed_seconds"].as_f64().unwrap_or(0.0),
        n("cutover_pause_ms"),
        n("scripts_loaded"),
        n("errors"),
    )
}

/// Start a migration to `to` (or follow the one running to it), show its
/// progress on `out`, ask for the cutover once in sync when `cutover`, and
/// end with its summary.
pub fn run(
    admin_url: &str,
    token: &str,
    to: &str,
    cutover: bool,
    out: &mut impl Write,
) -> Result<Outcome, CliError> {
    let admin = Admin::new(admin_url, token)?;
    let body = serde_json::json!({ "to": to }).to_string();
    let (status, text) = admin.call("POST", "/migrations", Some(&body))?;
    match status {
        202 => {
            let _ = writeln!(out, "migration to {to} started");
        }
        409 => {
            // One runs: follow it if it goes where we were asked to go.
            let m = admin.json("GET", "/migrations/current", None, &[200])?;
            if m["to"].as_str() != Some(to) {
                return Err(CliError::Refused {
                    method: "POST",
                    path: "/migrations".into(),
                    status,
                    body: text,
                });
            }
            let _ = writeln!(out, "following the migration to {to} that runs");
        }
        _ => {
            return Err(CliError::Refused {
                method: "POST",
                path: "/migrations".into(),
                status,
                body: text,
            });
        }
    }
    let tty = std::io::stdout().is_terminal();
    let mut asked = false;
    let mut last_line = Instant::now() - Duration::from_secs(10);
    loop {
        let m = admin.json("GET", "/migrations/current", None, &[200])?;
        let phase = m["phase"].as_str().unwrap_or("").to_string();
        // A bar redrawn in place on a terminal, a line every 2 s elsewhere.
        if tty {
            let _ = write!(out, "\r{:<110}", progress_line(&m));
            let _ = out.flush();
        } else if last_line.elapsed() >= Duration::from_secs(2) {
            let _ = writeln!(out, "{}", progress_line(&m));
            last_line = Instant::now();
        }
        let end = match phase.as_str() {
            "done" => Some(Outcome::Ok),
            "failed" | "aborted" | "rolled_back" => Some(Outcome::NotDone),
            "syncing" if !cutover => Some(Outcome::Ok),
            "syncing" if !asked => {
                admin.json("POST", "/migrations/current/cutover", None, &[200])?;
                asked = true;
                None
            }
            _ => None,
        };
        if let Some(outcome) = end {
            if tty {
                let _ = writeln!(out);
            } else {
                let _ = writeln!(out, "{}", progress_line(&m));
            }
            let _ = writeln!(out, "{}", summary(&m));
            if phase == "syncing" {
                let _ = writeln!(
                    out,
                    "in sync and kept so; cut over with `redis-sidecar migrate --to {to} --cutover`"
                );
            }
            if phase == "done" {
                let _ = writeln!(
                    out,
                    "writes are copied back to {} until POST /migrations/current/finish (or .../rollback)",
                    m["from"].as_str().unwrap_or("the old endpoint")
                );
            }
            return Ok(outcome);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_progress_line() {
        let m = serde_json::json!({
            "keys_copied": 500, "keys_total_estimate": 1000, "keys_left_estimate": 500,
            "keys_per_second": 250.0, "bytes_copied": 3 << 20, "backlog": 7, "phase": "copying"
        });
        assert_eq!(
            progress_line(&m),
            "[##########..........]  50% keys 500/1000  3.0 MiB  250 keys/s  ETA 2s  backlog 7  copying"
        );
    }
}
