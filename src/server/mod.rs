//! The client side: the listener with its connection cap, and one
//! [`session`] task per client.
//!
//! Shutdown paths: the shutdown token stops the accept loop, which then
//! signals every live session (its `stop` signal) to stop reading new
//! requests; each session writes the replies of what it already read and
//! closes. [`serve`] returns when every session
//! has ended; the caller bounds that wait with the drain deadline.

pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::metrics::Metrics;
use crate::policy::Chain;
use crate::protocol::Limits;
use crate::upstream::ClientShared;
use crate::upstream::pool::Pool;

/// Per-client limits, from `[limits]`.
#[derive(Clone, Debug)]
pub struct SessionLimits {
    pub frame: Limits,
    pub max_inflight: usize,
    pub max_output: usize,
    pub idle_timeout: Duration,
}

/// What every session shares (built once, cloned as `Arc`).
pub struct Shared {
    pub pool: Arc<Pool>,
    pub chain: Chain,
    pub metrics: Metrics,
    pub limits: SessionLimits,
    /// Metric handles for commands the table does not know.
    pub other_metrics: Arc<crate::metrics::CommandMetrics>,
    next_id: AtomicU64,
}

impl Shared {
    pub fn new(
        pool: Arc<Pool>,
        chain: Chain,
        metrics: Metrics,
        limits: SessionLimits,
    ) -> Arc<Shared> {
        Arc::new(Shared {
            pool,
            chain,
            other_metrics: metrics.command("other"),
            metrics,
            limits,
            next_id: AtomicU64::new(1),
        })
    }
}

type Live = Arc<Mutex<HashMap<u64, Arc<ClientShared>>>>;

fn lock(live: &Live) -> std::sync::MutexGuard<'_, HashMap<u64, Arc<ClientShared>>> {
    live.lock().unwrap_or_else(PoisonError::into_inner)
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
    // Live sessions, to tell them to stop on shutdown (a signal each, not
    // one token they all poll on every wake-up).
    let live: Live = Arc::new(Mutex::new(HashMap::new()));
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
        let client = ClientShared::new(shared.limits.max_output);
        lock(&live).insert(id, client.clone());
        let shared = shared.clone();
        let live = live.clone();
        tracker.spawn(async move {
            let gauge = shared.metrics.client_connections().clone();
            gauge.inc();
            tracing::trace!(client = id, %peer, "client connected");
            session::run(stream, shared, id, client).await;
            lock(&live).remove(&id);
            gauge.dec();
            drop(permit);
        });
    }
    drop(listener);
    // Every session stops reading; each answers what it read, then ends.
    for client in lock(&live).values() {
        client.stop.cancel();
    }
    tracker.close();
    tracker.wait().await;
}
