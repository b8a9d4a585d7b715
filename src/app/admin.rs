//! The admin HTTP listener:
//! - `GET /metrics` (Prometheus text), `GET /healthz` (the process is up),
//!   `GET /readyz` (the active upstream answers PING);
//! - `GET /upstreams` (JSON: every endpoint's name, redacted URL, health,
//!   latency, active flag, and the last switch with its reason);
//! - `POST /upstreams/{name}/activate` (switch now), `POST /reload`
//!   (re-read the configuration) and `POST /cache/flush` (drop every cache
//!   entry), which need `Authorization: Bearer <admin_token>` when a token
//!   is configured.
//!
//! Served by hyper 1 (HTTP/1 only, keep-alive): a header-read timeout, a
//! cap on a connection's whole life (so an idle or slow keep-alive
//! connection frees its slot), and a cap on connections at once, so slow
//! or half-open connections cannot lock out `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::control::Control;
use crate::metrics::Metrics;
use crate::upstream::failover::ActivateError;
use crate::upstream::pool::Pool;

/// Admin connections served at once; scrapers and probes need few.
const MAX_CONNS: usize = 64;
/// A request's headers must arrive within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest life of one connection, keep-alive included: idle and slow
/// connections give their slot back.
const CONN_LIFETIME: Duration = Duration::from_secs(30);

/// Everything a request handler needs.
struct Admin {
    pool: Arc<Pool>,
    control: Arc<Control>,
    metrics: Metrics,
}

/// Serve admin requests until `shutdown`.
pub async fn serve(
    listener: TcpListener,
    pool: Arc<Pool>,
    control: Arc<Control>,
    metrics: Metrics,
    shutdown: CancellationToken,
    tasks: TaskTracker,
) {
    let admin = Arc::new(Admin {
        pool,
        control,
        metrics,
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNS));
    loop {
        let (stream, peer) = tokio::select! {
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
            // Over the cap: closed at once rather than queued.
            continue;
        };
        let (admin, shutdown) = (admin.clone(), shutdown.clone());
        tasks.spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let admin = admin.clone();
                async move { Ok::<_, Infallible>(admin.route(req, peer).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(true)
                // A client that half-closes after its request still gets
                // the response.
                .half_close(true)
                .serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let lifetime = tokio::time::sleep(CONN_LIFETIME);
            tokio::pin!(lifetime);
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = &mut lifetime => {}
                _ = shutdown.cancelled() => {
                    // Finish the request in progress, then close.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(HEADER_TIMEOUT, conn).await;
                }
            }
            drop(permit);
        });
    }
}

fn respond(
    status: StatusCode,
    ctype: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
    r
}

fn respond_json(status: StatusCode, ok: bool, msg: &str) -> Response<Full<Bytes>> {
    let key = if ok { "result" } else { "error" };
    let body = serde_json::json!({ key: msg }).to_string() + "\n";
    respond(status, "application/json", body)
}

impl Admin {
    /// `POST /migrations`, `GET /migrations/current`, `POST
    /// /migrations/current/{cutover,abort,rollback,finish}`.
    async fn migrations(
        &self,
        req: Request<Incoming>,
        path: &str,
        peer: SocketAddr,
        allowed: bool,
    ) -> Response<Full<Bytes>> {
        use http_body_util::BodyExt;
        let m = &self.control.migrations;
        if !allowed {
            return respond_json(
                StatusCode::UNAUTHORIZED,
                false,
                "missing or wrong admin token",
            );
        }
        let status_of = |mig: &crate::app::migrate::Migration| {
            respond(
                StatusCode::OK,
                "application/json",
                mig.status().to_string() + "\n",
            )
        };
        match (req.method().clone(), path) {
            // The status page's: 200 whether or not there is one.
            (Method::GET, "/migrations") => respond(
                StatusCode::OK,
                "application/json",
                serde_json::json!({ "current": m.current().map(|mig| mig.status()) }).to_string()
                    + "\n",
            ),
            (Method::GET, "/migrations/current") => match m.current() {
                Some(mig) => status_of(&mig),
                None => respond_json(StatusCode::NOT_FOUND, false, "no migration"),
            },
            (Method::POST, "/migrations") => {
                // A small JSON body: at most 4 KiB is read.
                let body = match http_body_util::Limited::new(req.into_body(), 4096)
                    .collect()
                    .await
                {
                    Ok(b) => b.to_bytes(),
                    Err(_) => {
                        return respond_json(
                            StatusCode::BAD_REQUEST,
                            false,
                            "body too large or cut",
                        );
                    }
                };
                let r: crate::app::migrate::Request = match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        return respond_json(
                            StatusCode::BAD_REQUEST,
                            false,
                            &format!("bad request: {e}"),
                        );
                    }
                };
                tracing::info!(%peer, to = %r.to, "admin: start a migration");
                use crate::app::migrate::StartError as E;
                match m.start(r).await {
                    Ok(mig) => {
                        let mut resp = status_of(&mig);
                        *resp.status_mut() = StatusCode::ACCEPTED;
                        resp
                    }
                    Err(e @ (E::Running | E::CopyingBack(_))) => {
                        respond_json(StatusCode::CONFLICT, false, &e.to_string())
                    }
                    Err(e @ E::Unknown(_)) => {
                        respond_json(StatusCode::NOT_FOUND, false, &e.to_string())
                    }
                    Err(e) => respond_json(StatusCode::BAD_REQUEST, false, &e.to_string()),
                }
            }
            (
                Method::POST,
                action @ ("/migrations/current/cutover"
                | "/migrations/current/abort"
                | "/migrations/current/rollback"
                | "/migrations/current/finish"),
            ) => {
                let action = action.trim_start_matches("/migrations/current/");
                tracing::info!(%peer, action, "admin: migration");
                let done = match action {
                    "cutover" => m.cutover(),
                    "abort" => m.abort(),
                    "rollback" => m.rollback(),
                    _ => m.finish(),
                };
                use crate::app::migrate::AskError;
                match done {
                    Ok(mig) => status_of(&mig),
                    Err(e @ AskError::None) => {
                        respond_json(StatusCode::NOT_FOUND, false, &e.to_string())
                    }
                    Err(e) => respond_json(StatusCode::CONFLICT, false, &e.to_string()),
                }
            }
            _ => respond_json(StatusCode::NOT_FOUND, false, "unknown migration request"),
        }
    }
}

/// The credentials of `Authorization: Bearer <token>`; the scheme is
/// case-insensitive (RFC 7235), and spaces after it are allowed.
fn bearer_token(header: &str) -> Option<&str> {
    let (scheme, rest) = header.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| rest.trim_start_matches(' '))
}

impl Admin {
    /// `peer`: who asked, for the log line of every request that changes
    /// state.
    async fn route(&self, req: Request<Incoming>, peer: SocketAddr) -> Response<Full<Bytes>> {
        let (method, path) = (req.method().clone(), req.uri().path().to_string());
        let authorized = || {
            let token = self.control.admin_token();
            token.is_empty()
                || req
                    .headers()
                    .get(AUTHORIZATION)
                    .and_then(|v| v.to_str().ok())
                    .and_then(bearer_token)
                    .is_some_and(|given| {
                        crate::client::auth::ct_eq(given.as_bytes(), token.as_bytes())
                    })
        };
        let activate = path
            .strip_prefix("/upstreams/")
            .and_then(|p| p.strip_suffix("/activate"));
        if path == "/migrations" || path.starts_with("/migrations/") {
            let allowed = method == Method::GET || authorized();
            return self.migrations(req, &path, peer, allowed).await;
        }
        match (&method, path.as_str(), activate) {
            (&Method::GET, "/metrics", _) => respond(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.metrics.render(),
            ),
            (&Method::GET, "/" | "/status", _) => {
                let mut r = respond(
                    StatusCode::OK,
                    "text/html; charset=utf-8",
                    include_str!("status.html"),
                );
                // Self-contained (no external asset), never framed.
                let h = r.headers_mut();
                h.insert(
                    hyper::header::CONTENT_SECURITY_POLICY,
                    hyper::header::HeaderValue::from_static(
                        "default-src 'self'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; frame-ancestors 'none'",
                    ),
                );
                h.insert(
                    hyper::header::X_FRAME_OPTIONS,
                    hyper::header::HeaderValue::from_static("DENY"),
                );
                r
            }
            (&Method::GET, "/hotkeys", _) => {
                if !authorized() {
                    return respond_json(
                        StatusCode::UNAUTHORIZED,
                        false,
                        "missing or wrong admin token (keys are data)",
                    );
                }
                match self.control.policies.hotkeys() {
                    Some(h) => respond(
                        StatusCode::OK,
                        "application/json",
                        crate::policy::hotkeys::report_json(&h).to_string() + "\n",
                    ),
                    None => respond_json(
                        StatusCode::NOT_FOUND,
                        false,
                        "the hot-key report is off ([hotkeys] enabled = false)",
                    ),
                }
            }
            (&Method::GET, "/healthz", _) => respond(StatusCode::OK, "text/plain", "ok\n"),
            (&Method::GET, "/readyz", _) => {
                let name = self.pool.ups.active().endpoint.name().to_string();
                match self.pool.probe().await {
                    Ok(rtt) => respond(
                        StatusCode::OK,
                        "text/plain",
                        format!(
                            "ready: upstream {name} answered PING in {:.1} ms\n",
                            rtt.as_secs_f64() * 1e3
                        ),
                    ),
                    // UpstreamError texts carry host and port, never passwords.
                    Err(e) => respond(
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        format!("not ready: upstream {name}: {e}\n"),
                    ),
                }
            }
            (&Method::GET, "/upstreams", _) => respond(
                StatusCode::OK,
                "application/json",
                upstreams_json(&self.pool),
            ),
            (&Method::POST, "/cache/flush", _) => {
                if !authorized() {
                    return respond_json(
                        StatusCode::UNAUTHORIZED,
                        false,
                        "missing or wrong admin token",
                    );
                }
                tracing::info!(%peer, "admin: POST /cache/flush");
                match self.control.policies.flush_cache() {
                    Some(n) => respond_json(
                        StatusCode::OK,
                        true,
                        &format!("cache flushed ({n} entries)"),
                    ),
                    None => respond_json(StatusCode::NOT_FOUND, false, "the cache is not enabled"),
                }
            }
            (&Method::POST, "/reload", _) | (&Method::POST, _, Some(_)) => {
                if !authorized() {
                    return respond_json(
                        StatusCode::UNAUTHORIZED,
                        false,
                        "missing or wrong admin token",
                    );
                }
                match activate {
                    Some(name) => tracing::info!(%peer, upstream = %name, "admin: activate"),
                    None => tracing::info!(%peer, "admin: reload"),
                }
                let by = format!("admin {peer}");
                let (status, ok, msg) = match activate {
                    Some(name) => match self.pool.ups.activate(name) {
                        Ok(msg) => (StatusCode::OK, true, msg),
                        Err(e @ ActivateError::NotFound(_)) => {
                            (StatusCode::NOT_FOUND, false, e.to_string())
                        }
                        Err(e @ ActivateError::Down(..)) => {
                            (StatusCode::CONFLICT, false, e.to_string())
                        }
                    },
                    // Reading the file blocks: off the runtime thread.
                    None => match tokio::task::spawn_blocking({
                        let c = self.control.clone();
                        move || c.reload_by(&by)
                    })
                    .await
                    {
                        Ok(Ok(msg)) => (StatusCode::OK, true, msg),
                        Ok(Err(e)) => (StatusCode::BAD_REQUEST, false, e.to_string()),
                        Err(_) => (
                            StatusCode::INTERNAL_SERVER_ERROR,
                            false,
                            "reload failed".to_string(),
                        ),
                    },
                };
                if !ok {
                    tracing::warn!(%peer, status = status.as_u16(), reason = %msg.lines().next().unwrap_or_default(), "admin request refused");
                }
                respond_json(status, ok, &msg)
            }
            (
                _,
                "/metrics" | "/healthz" | "/readyz" | "/upstreams" | "/reload" | "/cache/flush"
                | "/hotkeys",
                _,
            )
            | (_, _, Some(_)) => respond(
                StatusCode::METHOD_NOT_ALLOWED,
                "text/plain",
                "method not allowed\n",
            ),
            _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
        }
    }
}

/// A cluster endpoint's slot map: masters with their slot ranges and
/// replicas, the map's epoch and age.
fn cluster_json(t: &crate::upstream::cluster::Topology) -> serde_json::Value {
    use crate::upstream::cluster::SlotMap;
    let map = t.map();
    let health = t.node_health();
    let node = |addr: &str| {
        let h = health.get(addr).cloned().unwrap_or_default();
        serde_json::json!({ "connections": h.connections, "last_error": h.last_error })
    };
    let masters: Vec<serde_json::Value> = map
        .ranges()
        .into_iter()
        .map(|(i, ranges)| {
            let m = &map.masters[i];
            let addr = SlotMap::addr(m);
            serde_json::json!({
                "node": node(&addr),
                "address": addr,
                "id": m.id,
                "slots": ranges.iter().map(|(a, b)| format!("{a}-{b}")).collect::<Vec<_>>(),
                "slot_count": ranges.iter().map(|(a, b)| usize::from(b - a) + 1).sum::<usize>(),
                "replicas": map.replicas[i].iter().map(SlotMap::addr).collect::<Vec<_>>(),
            })
        })
        .collect();
    serde_json::json!({
        "epoch": t.epoch(),
        "complete": map.complete(),
        "map_age_s": t.refreshed().map(|r| r.elapsed().as_secs_f64()),
        "masters": masters,
    })
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
                // Rounded to what they mean: µs for a latency, ms for an age.
                "latency_ms": h.latency.map(|d| (d.as_secs_f64() * 1e6).round() / 1e3),
                "address": h.address,
                "last_error": h.last_error,
                "up_for_s": h.up_since.map(|t| (t.elapsed().as_secs_f64() * 1e3).round() / 1e3),
                "cluster": e.cluster.as_ref().map(|t| cluster_json(t)),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        assert_eq!(bearer_token("Bearer tok"), Some("tok"));
        assert_eq!(bearer_token("bearer tok"), Some("tok"));
        assert_eq!(bearer_token("BEARER  tok"), Some("tok"));
        assert_eq!(bearer_token("Basic tok"), None);
        assert_eq!(bearer_token("Bearertok"), None);
    }
}
