//! The admin HTTP listener: `GET /metrics` (Prometheus text), `/healthz`
//! (the process is up) and `/readyz` (the upstream answers PING).
//!
//! A deliberately small HTTP/1.1 server (one request per connection,
//! `Connection: close`): four fixed routes do not justify a web framework's
//! build time on a 2-core machine. Requests are bounded in size, time and
//! concurrency.

use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::upstream::pool::Pool;

/// Largest request head accepted.
const MAX_REQUEST: usize = 8 * 1024;
/// Admin connections served at once; scrapers and probes need few.
const MAX_CONNS: usize = 64;
/// A request must arrive within this.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// Serve admin requests until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    metrics: Metrics,
    shutdown: CancellationToken,
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
        let (pool, metrics) = (pool.clone(), metrics.clone());
        tokio::spawn(async move {
            let _ = handle(stream, &pool, &metrics).await;
            drop(permit);
        });
    }
}

async fn handle(mut stream: TcpStream, pool: &Pool, metrics: &Metrics) -> std::io::Result<()> {
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
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut parts = head.lines().next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let path = path.split('?').next().unwrap_or("");
    match (method, path) {
        ("GET", "/metrics") => {
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4",
                &metrics.render(),
            )
            .await
        }
        ("GET", "/healthz") => respond(&mut stream, 200, "text/plain", b"ok\n").await,
        ("GET", "/readyz") => match pool.probe().await {
            Ok(rtt) => {
                metrics.upstream_up(&pool.name, true);
                let body = format!(
                    "ready: upstream {} answered PING in {:.1} ms\n",
                    pool.name,
                    rtt.as_secs_f64() * 1e3
                );
                respond(&mut stream, 200, "text/plain", body.as_bytes()).await
            }
            Err(e) => {
                metrics.upstream_up(&pool.name, false);
                // UpstreamError texts carry host and port, never passwords.
                let body = format!("not ready: upstream {}: {e}\n", pool.name);
                respond(&mut stream, 503, "text/plain", body.as_bytes()).await
            }
        },
        (_, "/metrics" | "/healthz" | "/readyz") => {
            respond(&mut stream, 405, "text/plain", b"method not allowed\n").await
        }
        _ => respond(&mut stream, 404, "text/plain", b"not found\n").await,
    }
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
        404 => "Not Found",
        405 => "Method Not Allowed",
        _ => "Service Unavailable",
    };
    let head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await?;
    stream.write_all(body).await?;
    stream.shutdown().await
}
