//! `redis-sidecar migrate --to NAME [--cutover]`: starts a migration (or
//! follows the one running to NAME) through the admin API, shows its
//! progress and ends with a summary. Plain HTTP/1.1 over a blocking socket:
//! the admin listener is local.

use std::io::{IsTerminal, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// What went wrong talking to the admin API.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("the admin address {0} is not http://host:port")]
    Address(String),
    #[error("cannot reach the admin API at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: {status} {body}")]
    Refused {
        method: &'static str,
        path: String,
        status: u16,
        body: String,
    },
    #[error("{0}: not a JSON reply")]
    Reply(String),
}

/// How the migration ended, as far as the command is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Cut over (`done`), or in sync without `--cutover`.
    Ok,
    /// Failed, aborted, or rolled back.
    NotDone,
}

struct Admin {
    addr: String,
    token: String,
}

impl Admin {
    fn call(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), CliError> {
        let connect = |e| CliError::Connect {
            addr: self.addr.clone(),
            source: e,
        };
        let mut s = TcpStream::connect(&self.addr).map_err(connect)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(connect)?;
        let auth = if self.token.is_empty() {
            String::new()
        } else {
            format!("Authorization: Bearer {}\r\n", self.token)
        };
        let body = body.unwrap_or("");
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        s.write_all(req.as_bytes()).map_err(connect)?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(connect)?;
        let text = String::from_utf8_lossy(&out);
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| CliError::Reply(path.to_string()))?;
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.trim().to_string())
            .unwrap_or_default();
        Ok((status, body))
    }

    fn json(
        &self,
        method: &'static str,
        path: &str,
        body: Option<&str>,
        ok: &[u16],
    ) -> Result<serde_json::Value, CliError> {
        let (status, text) = self.call(method, path, body)?;
        if !ok.contains(&status) {
            return Err(CliError::Refused {
                method,
                path: path.to_string(),
                status,
                body: text,
            });
        }
        serde_json::from_str(&text).map_err(|_| CliError::Reply(path.to_string()))
    }
}

/// `http://host:port` (or `host:port`) → `host:port`.
fn address(url: &str) -> Result<String, CliError> {
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let rest = rest.trim_end_matches('/');
    if rest.is_empty() || rest.contains('/') || !rest.contains(':') {
        return Err(CliError::Address(url.to_string()));
    }
    Ok(rest.to_string())
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
    let admin = Admin {
        addr: address(admin_url)?,
        token: token.to_string(),
    };
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
    fn addresses() {
        assert_eq!(address("http://127.0.0.1:9121").unwrap(), "127.0.0.1:9121");
        assert_eq!(address("127.0.0.1:9121/").unwrap(), "127.0.0.1:9121");
        assert!(address("http://host/path").is_err());
        assert!(address("http://host").is_err());
    }

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
