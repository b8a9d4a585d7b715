//! The admin HTTP listener:
//! - `GET /metrics` (Prometheus text), `GET /healthz` (the process is up),
//!   `GET /readyz` (the active upstream answers PING);
//! - `GET /upstreams` (JSON: every endpoint's name, redacted URL, health,
//!   latency, active flag, and the last switch with its reason);
//! - `POST /upstreams/{name}/activate` (switch now) and `POST /reload`
//!   (re-read the configuration), which need `Authorization: Bearer
//!   <admin_token>` when a token is configured.
//!
//! A deliberately small HTTP/1.1 server (one request per connection,
//! `Connection: close`): a few fixed routes do not justify a web framework's
//! build time on a 2-core machine. Requests are bounded in size, time and
//! concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::control::Control;
use crate::metrics::Metrics;
use crate::upstream::failover::ActivateError;
use crate::upstream::pool::Pool;

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Admin connections served at once; scrapers and probes need few.
const MAX_CONNS: usize = 64;
/// A request must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest time a response may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve admin requests until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    control: Arc<Control>,
    metrics: Metrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(_) => {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.cancelled() => return,
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let (pool, control, metrics) = (pool.clone(), control.clone(), metrics.clone());
        tasks.spawn(async move {
            let _ = handle(stream, &pool, &control, &metrics).await;
            drop(permit);
        });
    }
}

async fn handle(
    mut stream: TcpStream,
    pool: &Pool,
    control: &Arc<Control>,
    metrics: &Metrics,
) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(1024);
    let head = tokio::time::timeout(READ_TIMEOUT, async {
        loop {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                return Some(end);
            }
            if buf.len() > MAX_REQUEST {
                return None;
            }
            let mut chunk = [0u8; 1024];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return None,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let Ok(Some(end)) = head else {
        return respond(&mut stream, 400, "text/plain", b"bad request\n").await;
    };
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.lines();
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    let header = |name: &str| {
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    };
    // Read (and ignore) a small body, so closing does not reset the
    // connection before the client reads the response.
    let body_len = header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(0);
    let have = buf.len() - (end + 4);
    if body_len > have && body_len <= MAX_REQUEST {
        let mut rest = vec![0u8; body_len - have];
        let _ = tokio::time::timeout(READ_TIMEOUT, stream.read_exact(&mut rest)).await;
    }
    let authorized = || {
        let token = control.admin_token();
        token.is_empty()
            || header("authorization")
                .and_then(|v| v.strip_prefix("Bearer ").map(str::to_string))
                .is_some_and(|given| crate::server::auth::ct_eq(given.as_bytes(), token.as_bytes()))
    };
    let activate = path
        .strip_prefix("/upstreams/")
        .and_then(|p| p.strip_suffix("/activate"));
    match (method, path, activate) {
        ("GET", "/metrics", _) => {
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4",
                &metrics.render(),
            )
            .await
        }
        ("GET", "/healthz", _) => respond(&mut stream, 200, "text/plain", b"ok\n").await,
        ("GET", "/readyz", _) => {
            let name = pool.ups.active().endpoint.name().to_string();
            match pool.probe().await {
                Ok(rtt) => {
                    let body = format!(
                        "ready: upstream {name} answered PING in {:.1} ms\n",
                        rtt.as_secs_f64() * 1e3
                    );
                    respond(&mut stream, 200, "text/plain", body.as_bytes()).await
                }
                Err(e) => {
                    // UpstreamError texts carry host and port, never passwords.
                    let body = format!("not ready: upstream {name}: {e}\n");
                    respond(&mut stream, 503, "text/plain", body.as_bytes()).await
                }
            }
        }
        ("GET", "/upstreams", _) => {
            let body = upstreams_json(pool);
            respond(&mut stream, 200, "application/json", body.as_bytes()).await
        }
        ("POST", "/reload", _) | ("POST", _, Some(_)) => {
            if !authorized() {
                return respond_json(&mut stream, 401, false, "missing or wrong admin token").await;
            }
            let (status, ok, msg) = match activate {
                Some(name) => match pool.ups.activate(name) {
                    Ok(msg) => (200, true, msg),
                    Err(e @ ActivateError::NotFound(_)) => (404, false, e.to_string()),
                    Err(e @ ActivateError::Down(..)) => (409, false, e.to_string()),
                },
                // Reading the file blocks: off the runtime thread.
                None => match tokio::task::spawn_blocking({
                    let c = control.clone();
                    move || c.reload()
                })
                .await
                {
                    Ok(Ok(msg)) => (200, true, msg),
                    Ok(Err(e)) => (400, false, e.to_string()),
                    Err(_) => (500, false, "reload failed".to_string()),
                },
            };
            respond_json(&mut stream, status, ok, &msg).await
        }
        (_, "/metrics" | "/healthz" | "/readyz" | "/upstreams" | "/reload", _)
        | (_, _, Some(_)) => respond(&mut stream, 405, "text/plain", b"method not allowed\n").await,
        _ => respond(&mut stream, 404, "text/plain", b"not found\n").await,
    }
}

async fn respond_json(
    stream: &mut TcpStream,
    status: u16,
    ok: bool,
    msg: &str,
) -> std::io::Result<()> {
    let key = if ok { "result" } else { "error" };
    let body = serde_json::json!({ key: msg }).to_string() + "\n";
    respond(stream, status, "application/json", body.as_bytes()).await
}

/// `GET /upstreams`: URLs are redacted (their `Display`), errors carry
/// host and port only.
fn upstreams_json(pool: &Pool) -> String {
    let active = pool.ups.active();
    let endpoints: Vec<serde_json::Value> = pool
        .ups
        .endpoints()
        .iter()
        .enumerate()
        .map(|(priority, e)| {
            let h = e.health();
            serde_json::json!({
                "name": e.name(),
                "priority": priority,
                "url": e.spec.target.to_string(),
                "active": Arc::ptr_eq(e, &active.endpoint),
                "health": h.state.as_str(),
                "latency_ms": h.latency.map(|d| d.as_secs_f64() * 1e3),
                "address": h.address,
                "last_error": h.last_error,
                "up_for_s": h.up_since.map(|t| t.elapsed().as_secs_f64()),
            })
        })
        .collect();
    let last_switch = pool.ups.last_switch().map(|s| {
        serde_json::json!({
            "at_unix_s": s.at.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
            "from": s.from,
            "to": s.to,
            "reason": s.reason,
        })
    });
    let version = pool.server_version();
    serde_json::json!({
        "active": active.endpoint.name(),
        "generation": active.generation,
        "last_switch": last_switch,
        // What the active endpoint's HELLO said; TTL rules append
        // `PEXPIRE .. NX/LT`, which need Redis 7.
        "server_version": version,
        "ttl_append_supported": crate::upstream::pool::supports_expire_options(&version),
        "upstreams": endpoints,
    })
    .to_string()
        + "\n"
}

async fn respond(
    stream: &mut TcpStream,
    status: u16,
    ctype: &str,
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        409 => "Conflict",
        500 => "Internal Server Error",
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    // A reader that stops reading must not hold the connection (and one
    // of the admin slots) for ever.
    let write = async {
        stream.write_all(head.as_bytes()).await?;
        stream.write_all(body).await?;
        stream.shutdown().await
    };
    tokio::time::timeout(WRITE_TIMEOUT, write)
        .await
        .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}
