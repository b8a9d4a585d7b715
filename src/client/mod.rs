//! The client side: the listener with its connection cap, one
//! [`session`] task per client, the registry of live clients the CLIENT
//! family works on ([`clients`]) and `[client_auth]`'s users ([`auth`]).
//!
//! Shutdown paths: the shutdown token stops the accept loop, which then
//! signals every live session (its `stop` signal) to stop reading new
//! requests; each session writes the replies of what it already read and
//! closes. [`serve`] returns when every session
//! has ended; the caller bounds that wait with the drain deadline.

pub mod auth;
pub mod clients;
pub mod session;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::policy::Policies;
use crate::upstream::ClientShared;
use crate::upstream::pool::Pool;
use crate::wire::Limits;
use clients::{ClientEntry, Registry};

/// Per-client limits, from `[limits]`.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub frame: Limits,
    pub max_inflight: usize,
    pub max_output: usize,
    pub idle_timeout: Duration,
    /// See `limits.lane_after_reply` / `lane_after_inflight`.
    pub lane_reply: usize,
    pub lane_inflight: usize,
}

/// What every session shares (built once, cloned as `Arc`).
pub struct Shared {
    pub pool: Arc<Pool>,
    /// The live policy chain (swapped on reload).
    pub policies: Arc<Policies>,
    /// Live clients, for the CLIENT family and shutdown.
    pub clients: Registry,
    pub metrics: Metrics,
    pub limits: SessionLimits,
    /// Metric handles for commands the table does not know.
    pub other_metrics: Arc<crate::metrics::CommandMetrics>,
    /// `[client_auth]`: clients authenticate to the sidecar.
    pub client_auth: Option<Arc<auth::ClientAuth>>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        pool: Arc<Pool>,
        policies: Arc<Policies>,
        metrics: Metrics,
        limits: SessionLimits,
        client_auth: Option<Arc<auth::ClientAuth>>,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            pool,
            policies,
            clients: Registry::default(),
            other_metrics: metrics.command("other"),
            client_auth,
            metrics,
            limits,
            next_id: AtomicU64::new(1),
        })
    }
}

/// Accept clients until `shutdown`, then wait for every session to end.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    max_clients: usize,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(max_clients));
    let tracker = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.cancelled() => break,
        };
        let (mut stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: back off, go on.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            shared.metrics.client_rejected("max_clients");
            tracker.spawn(async move {
                let _ = stream
                    .write_all(b"-ERR max number of clients reached\r\n")
                    .await;
                let _ = stream.shutdown().await;
            });
            continue;
        };
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let client = ClientShared::new(shared.limits.max_output, shared.limits.lane_reply);
        let local = stream.local_addr().unwrap_or(peer);
        let fd = i64::from(std::os::fd::AsRawFd::as_raw_fd(&stream));
        // Live sessions, for the CLIENT family and to tell them to stop on
        // shutdown (a signal each, not one token they all poll).
        let entry = Arc::new(ClientEntry::new(id, peer, local, fd, client));
        shared.clients.insert(entry.clone());
        let shared = shared.clone();
        tracker.spawn(async move {
            let gauge = shared.metrics.client_connections().clone();
            gauge.inc();
            tracing::trace!(client = id, %peer, "client connected");
            session::run(stream, shared.clone(), entry).await;
            shared.clients.remove(id);
            gauge.dec();
            drop(permit);
        });
    }
    drop(listener);
    // Every session stops reading; each answers what it read, then ends
    // (a blocked one at once, without its blocking command's reply).
    let clients = shared.clients.all();
    let blocked = clients.iter().filter(|e| e.is_blocked()).count();
    for entry in &clients {
        entry.client.stop.cancel();
    }
    tracker.close();
    tracing::info!(
        clients = clients.len(),
        blocked,
        "draining: waiting for the replies owed to clients (blocked ones are closed at once)"
    );
    tracker.wait().await;
}
