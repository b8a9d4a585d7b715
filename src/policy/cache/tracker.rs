//! The cache's upstream connection: fills and invalidations on one RESP3
//! connection with `CLIENT TRACKING on OPTIN`.
//!
//! A fill is sent as `[SELECT db] CLIENT CACHING yes, MULTI, PTTL k...,
//! <read>, EXEC` in one write, so the key is tracked from the read on and
//! its remaining TTL comes from the same instant as the value. Redis sends
//! an invalidation push after the reply of the command that caused it, on
//! this same connection, so an invalidation is always applied after the
//! fill it spoils has landed (and drops it), never before. A null
//! invalidation (FLUSHALL, FLUSHDB) flushes everything, as does the loss
//! of the connection (what it would have said is lost with it) and a switch
//! of the active endpoint.
//!
//! On a cluster there is one such connection per master, made on first
//! use: a fill goes to its keys' master, whose tracking connection then
//! carries that key's invalidations.
//!
//! With `invalidation = "ttl"` the connection does not track: fills are
//! the same without `CLIENT CACHING`, and entries live at most their
//! rule's ttl (writes through the sidecar still invalidate).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::store::{Reason, Store};
use crate::metrics::Metrics;
use crate::upstream::cluster::{Node, SlotMap};
use crate::upstream::pool::Pool;
use crate::upstream::{Identity, URL_DB, UpstreamError};
use crate::wire::resp::elements;
use crate::wire::{Proto, ReplyScanner, encode_command};

const QUEUE: usize = 1024;
/// After a failed connect, fills fail at once for this long.
const DOWN_HOLD: Duration = Duration::from_secs(1);

/// A fill's result: the keys' PTTLs and the read's RESP3 reply.
#[derive(Debug)]
pub struct Fill {
    pub pttls: Vec<i64>,
    pub reply: Bytes,
}

#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error("too many fills waiting")]
    Busy,
    #[error("the cache's upstream task has stopped")]
    Stopped,
    #[error("upstream: {0}")]
    Upstream(#[source] UpstreamError),
    #[error("the upstream refuses CLIENT TRACKING: {0}")]
    TrackingRefused(String),
    #[error("the fill's transaction did not run: {0}")]
    Aborted(String),
}

impl FillError {
    /// The upstream could not be reached (what `stale_if_error` covers).
    pub fn unreachable(&self) -> bool {
        match self {
            FillError::Upstream(e) => e.upstream_down(),
            FillError::Stopped => true,
            _ => false,
        }
    }
}

struct Request {
    /// The client's db (`URL_DB`: the URL's).
    db: i64,
    keys: Vec<Bytes>,
    read: Vec<Bytes>,
    reply: oneshot::Sender<Result<Fill, FillError>>,
}

pub struct Tracker {
    tx: mpsc::Sender<Request>,
    /// The upstream refused `CLIENT TRACKING` (said once in the log).
    pub refused: Arc<AtomicBool>,
    /// The connection was lost or could not be made, and none has been
    /// made since.
    pub unreachable: Arc<AtomicBool>,
    /// Which rules' entries an outage keeps aside (`stale_if_error`).
    pub keep_stale: Arc<std::sync::RwLock<Vec<bool>>>,
}

impl Tracker {
    pub fn start(
        pool: Arc<Pool>,
        store: Arc<Store>,
        tracking: bool,
        metrics: Metrics,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Tracker {
        let (tx, rx) = mpsc::channel(QUEUE);
        let refused = Arc::new(AtomicBool::new(false));
        let unreachable = Arc::new(AtomicBool::new(false));
        let keep_stale = Arc::new(std::sync::RwLock::new(Vec::new()));
        let task = Task {
            pool,
            store,
            tracking,
            metrics,
            refused: refused.clone(),
            unreachable: unreachable.clone(),
            keep_stale: keep_stale.clone(),
            down_until: AtomicU64::new(0),
        };
        tasks.spawn(Arc::new(task).run(rx, shutdown, tasks.clone()));
        Tracker {
            tx,
            refused,
            unreachable,
            keep_stale,
        }
    }

    pub async fn fill(
        &self,
        db: i64,
        keys: Vec<Bytes>,
        read: Vec<Bytes>,
    ) -> Result<Fill, FillError> {
        self.send(db, keys, read)?
            .await
            .map_err(|_| FillError::Stopped)?
    }

    /// Hand a fill to the tracking connection; its result comes on the
    /// receiver (several started before any is awaited run together).
    pub fn send(
        &self,
        db: i64,
        keys: Vec<Bytes>,
        read: Vec<Bytes>,
    ) -> Result<oneshot::Receiver<Result<Fill, FillError>>, FillError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Request {
                db,
                keys,
                read,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => FillError::Busy,
                mpsc::error::TrySendError::Closed(_) => FillError::Stopped,
            })?;
        Ok(rx)
    }
}

struct Task {
    pool: Arc<Pool>,
    store: Arc<Store>,
    tracking: bool,
    metrics: Metrics,
    refused: Arc<AtomicBool>,
    unreachable: Arc<AtomicBool>,
    keep_stale: Arc<std::sync::RwLock<Vec<bool>>>,
    down_until: AtomicU64,
}

/// A fill sent, waiting for its replies.
struct Pending {
    /// Replies before EXEC's (SELECT, CACHING, MULTI, QUEUED...).
    skip: usize,
    nkeys: usize,
    errors: Vec<Bytes>,
    reply: oneshot::Sender<Result<Fill, FillError>>,
}

struct Conn {
    stream: crate::upstream::endpoint::Stream,
    rbuf: BytesMut,
    scanner: ReplyScanner,
    generation: u64,
    /// The db selected (`URL_DB`: the URL's).
    db: i64,
    pending: VecDeque<Pending>,
}

fn now_ms() -> u64 {
    crate::policy::ratelimit::buckets::now_ns() / 1_000_000
}

impl Task {
    /// An outage's flush: entries of `stale_if_error` rules kept aside.
    fn flush(&self, reason: Reason) {
        let keep = self
            .keep_stale
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let n = self
            .store
            .flush_keeping(|rule| keep.get(rule).copied().unwrap_or(false));
        self.metrics
            .cache_invalidations(reason.label())
            .inc_by(n as u64);
    }

    /// Hand each fill to the connection of its keys' node (one node
    /// unless the upstream is a cluster).
    async fn run(
        self: Arc<Self>,
        mut rx: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) {
        let mut nodes: HashMap<String, mpsc::Sender<Request>> = HashMap::new();
        let spawn = |node: Option<Node>| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tasks.spawn(self.clone().serve_node(node, rx, shutdown.clone()));
            tx
        };
        if self.pool.ups.active().endpoint.cluster.is_none() {
            nodes.insert(String::new(), spawn(None));
        }
        loop {
            let req = tokio::select! {
                _ = shutdown.cancelled() => return,
                r = rx.recv() => match r {
                    Some(r) => r,
                    None => return,
                },
            };
            let node = match &self.pool.ups.active().endpoint.cluster {
                None => None,
                Some(t) => match req
                    .keys
                    .first()
                    .and_then(|k| t.owner(&t.map(), crate::upstream::cluster::key_slot(k)))
                {
                    Some(n) => Some(n),
                    None => {
                        let _ = req
                            .reply
                            .send(Err(FillError::Upstream(UpstreamError::Routing(
                                "no cluster node owns the key".into(),
                            ))));
                        continue;
                    }
                },
            };
            let key = node.as_ref().map(SlotMap::addr).unwrap_or_default();
            let tx = nodes.entry(key).or_insert_with(|| spawn(node));
            if let Err(e) = tx.try_send(req) {
                let (req, err) = match e {
                    mpsc::error::TrySendError::Full(r) => (r, FillError::Busy),
                    mpsc::error::TrySendError::Closed(r) => (r, FillError::Stopped),
                };
                let _ = req.reply.send(Err(err));
            }
        }
    }

    /// One node's tracking connection and its fills.
    async fn serve_node(
        self: Arc<Self>,
        node: Option<Node>,
        mut rx: mpsc::Receiver<Request>,
        shutdown: CancellationToken,
    ) {
        // Connect at once, so that an upstream refusing CLIENT TRACKING is
        // found (and said) at startup; an unreachable one is retried by
        // the first fill.
        let node = node.as_ref();
        let mut conn: Option<Conn> = tokio::select! {
            _ = shutdown.cancelled() => return,
            c = self.connect(node) => c.ok(),
        };
        loop {
            let reading = conn.is_some();
            let room = conn.as_ref().is_none_or(|c| c.pending.len() < QUEUE);
            tokio::select! {
                _ = shutdown.cancelled() => return,
                req = rx.recv(), if room => {
                    let Some(req) = req else { return };
                    self.send(&mut conn, req, node).await;
                }
                r = async {
                    match conn.as_mut() {
                        Some(c) => c.stream.read_buf(&mut c.rbuf).await,
                        None => std::future::pending().await,
                    }
                }, if reading => {
                    match r {
                        Ok(n) if n > 0 => {
                            if let Some(c) = conn.as_mut() && self.process(c).is_err() {
                                self.lost(&mut conn, "unreadable reply");
                            }
                        }
                        _ => self.lost(&mut conn, "connection closed"),
                    }
                }
            }
        }
    }

    /// The connection is gone: what it would have said is lost, so every
    /// entry goes.
    fn lost(&self, conn: &mut Option<Conn>, why: &str) {
        if let Some(c) = conn.take() {
            tracing::warn!(
                reason = why,
                "cache tracking connection lost; cache flushed"
            );
            for p in c.pending {
                let _ = p
                    .reply
                    .send(Err(FillError::Upstream(UpstreamError::ConnectionLost)));
            }
            self.unreachable.store(true, Ordering::Relaxed);
            self.flush(Reason::Flush);
        }
    }

    async fn connect(&self, node: Option<&Node>) -> Result<Conn, FillError> {
        if now_ms() < self.down_until.load(Ordering::Relaxed) {
            return Err(FillError::Upstream(UpstreamError::unreachable(
                "the last connection attempt failed",
            )));
        }
        let ident = Identity {
            proto: Proto::Resp3,
            db: URL_DB,
            auth: None,
        };
        let c = self.pool.control_node(&ident, node).await.map_err(|e| {
            self.down_until
                .store(now_ms() + DOWN_HOLD.as_millis() as u64, Ordering::Relaxed);
            FillError::Upstream(e)
        })?;
        let generation = c.generation;
        let (mut stream, mut rbuf) = c.into_parts();
        if self.tracking {
            let cmd = vec![
                Bytes::from_static(b"CLIENT"),
                Bytes::from_static(b"TRACKING"),
                Bytes::from_static(b"on"),
                Bytes::from_static(b"OPTIN"),
            ];
            let r = crate::upstream::endpoint::roundtrip(&mut stream, &mut rbuf, &[cmd], 1 << 20)
                .await
                .map_err(FillError::Upstream)?;
            if let Some(e) = r.first().filter(|r| crate::wire::is_error(r)) {
                let msg = crate::wire::error_text(e);
                if !self.refused.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        error = %msg,
                        "the upstream refuses CLIENT TRACKING: the cache is bypassed; set [cache] invalidation = \"ttl\" to cache with entries living at most their rule's ttl"
                    );
                }
                self.down_until.store(now_ms() + 30_000, Ordering::Relaxed);
                return Err(FillError::TrackingRefused(msg));
            }
            self.refused.store(false, Ordering::Relaxed);
        }
        self.unreachable.store(false, Ordering::Relaxed);
        Ok(Conn {
            stream,
            rbuf,
            scanner: ReplyScanner::new(512 << 20),
            generation,
            db: URL_DB,
            pending: VecDeque::new(),
        })
    }

    async fn send(&self, conn: &mut Option<Conn>, req: Request, node: Option<&Node>) {
        let active = self.pool.ups.active();
        if conn
            .as_ref()
            .is_some_and(|c| c.generation != active.generation)
        {
            // A switch: entries came from the old endpoint.
            if let Some(c) = conn.take() {
                for p in c.pending {
                    let _ = p
                        .reply
                        .send(Err(FillError::Upstream(UpstreamError::ConnectionLost)));
                }
            }
            self.flush(Reason::Switch);
        }
        if conn.is_none() {
            match self.connect(node).await {
                Ok(c) => *conn = Some(c),
                Err(e) => {
                    let _ = req.reply.send(Err(e));
                    return;
                }
            }
        }
        let Some(c) = conn.as_mut() else {
            return;
        };
        let mut out = BytesMut::new();
        let mut skip = 0;
        if req.db != c.db {
            let db = if req.db == URL_DB {
                active.endpoint.db()
            } else {
                req.db
            };
            out.extend_from_slice(&encode_command(&[
                Bytes::from_static(b"SELECT"),
                Bytes::from(db.to_string()),
            ]));
            c.db = req.db;
            skip += 1;
        }
        if self.tracking {
            out.extend_from_slice(&encode_command(&[&b"CLIENT"[..], b"CACHING", b"yes"]));
            skip += 1;
        }
        out.extend_from_slice(&encode_command(&[&b"MULTI"[..]]));
        for k in &req.keys {
            out.extend_from_slice(&encode_command(&[&b"PTTL"[..], k]));
        }
        out.extend_from_slice(&encode_command(&req.read));
        out.extend_from_slice(&encode_command(&[&b"EXEC"[..]]));
        skip += 1 + req.keys.len() + 1;
        if c.stream.write_all(&out).await.is_err() {
            let _ = req
                .reply
                .send(Err(FillError::Upstream(UpstreamError::ConnectionLost)));
            self.lost(conn, "write failed");
            return;
        }
        c.pending.push_back(Pending {
            skip,
            nkeys: req.keys.len(),
            errors: Vec::new(),
            reply: req.reply,
        });
    }

    /// Handle what was read: pushes (invalidations) and replies, in order.
    fn process(&self, c: &mut Conn) -> Result<(), ()> {
        loop {
            let frame = match c.scanner.next(&mut c.rbuf) {
                Ok(Some(f)) => f,
                Ok(None) => return Ok(()),
                Err(_) => return Err(()),
            };
            if frame.first() == Some(&b'>') {
                self.push(&frame);
                continue;
            }
            let Some(p) = c.pending.front_mut() else {
                // A reply nobody asked for: the stream is out of step.
                return Err(());
            };
            if p.skip > 0 {
                p.skip -= 1;
                if crate::wire::is_error(&frame) {
                    p.errors.push(frame);
                }
                continue;
            }
            let Some(p) = c.pending.pop_front() else {
                return Err(());
            };
            let result = match elements(&frame) {
                Some(el) if el.len() == p.nkeys + 1 => {
                    let pttls = el[..p.nkeys]
                        .iter()
                        .map(|e| {
                            std::str::from_utf8(e.get(1..e.len().saturating_sub(2)).unwrap_or(b""))
                                .ok()
                                .and_then(|s| s.parse().ok())
                                .unwrap_or(-1)
                        })
                        .collect();
                    Ok(Fill {
                        pttls,
                        reply: el[p.nkeys].clone(),
                    })
                }
                _ => Err(FillError::Aborted(
                    p.errors
                        .first()
                        .map(|e| crate::wire::error_text(e))
                        .unwrap_or_else(|| crate::wire::error_text(&frame)),
                )),
            };
            let _ = p.reply.send(result);
        }
    }

    /// `>2 invalidate [keys]` or `>2 invalidate _` (everything).
    fn push(&self, frame: &Bytes) {
        let Some(el) = elements(frame) else {
            return;
        };
        if el.len() != 2 || !el[0].ends_with(b"\r\ninvalidate\r\n") {
            return;
        }
        match elements(&el[1]) {
            Some(keys) => {
                let mut n = 0;
                for k in keys {
                    if let Some(key) = bulk_body(&k) {
                        n += self.store.invalidate(&key);
                    }
                }
                self.metrics
                    .cache_invalidations(Reason::Tracking.label())
                    .inc_by(n as u64);
            }
            None => {
                let n = self.store.flush();
                self.metrics
                    .cache_invalidations(Reason::Tracking.label())
                    .inc_by(n as u64);
            }
        }
    }
}

/// The payload of a bulk string frame.
fn bulk_body(frame: &Bytes) -> Option<Bytes> {
    if frame.first() != Some(&b'$') {
        return None;
    }
    let start = memchr::memmem::find(frame, b"\r\n")? + 2;
    let end = frame.len().checked_sub(2)?;
    (start <= end).then(|| frame.slice(start..end))
}
