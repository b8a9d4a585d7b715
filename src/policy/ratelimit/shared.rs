//! `scope = "shared"`: GCRA state kept in the upstream Redis, so every
//! sidecar in front of it enforces one limit together.
//!
//! The upstream's extra work is kept small three ways:
//! - **Tokens in batches.** A sidecar takes `shared_batch` tokens per
//!   round trip (one script call charges them all, all or none) and spends
//!   them locally; a batch left unspent expires after [`LEASE_LIFE`]. Tokens
//!   are charged before they are spent, so sidecars together never exceed
//!   the limit; what a batch costs is that up to one batch per sidecar and
//!   bucket may go unused when traffic stops.
//! - **A local pre-check.** When the script says no batch is free before
//!   some time, the sidecar refuses (or delays) locally until then without
//!   asking again.
//! - **Refills ahead of need.** When a batch is half spent, the next one
//!   is asked for on a task of its own, so that under steady load no
//!   client waits for the round trip.
//! - **One round trip for many buckets.** Every refill waiting at the
//!   moment goes out in one pipeline on one connection ([`SharedClient`]).
//!
//! The script uses Redis's clock (`TIME`), so sidecars' clocks do not
//! matter; its keys (`shared_prefix` + rule + `:` + bucket) expire when the
//! bucket would be full again.
//!
//! When the upstream is unreachable (or too slow, [`REFILL_TIMEOUT`]), a
//! rule decides by its `on_error` for [`FALLBACK_HOLD`] before trying
//! again: `local` (a local GCRA with the rule's rate, so N sidecars allow
//! up to N times the limit), `allow` or `reject`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use prometheus::IntCounter;
use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::buckets::{Bucket, Gcra, now_ns};
use crate::policy::Wait;
use crate::upstream::pool::{ControlConn, Pool};
use crate::upstream::{Identity, URL_DB, UpstreamError};
use crate::wire::Proto;

/// Unspent tokens of a batch are dropped this long after it arrived.
pub const LEASE_LIFE: Duration = Duration::from_secs(1);
/// How long a refill may take before the rule falls back.
pub const REFILL_TIMEOUT: Duration = Duration::from_millis(500);
/// After a failed refill, the fallback decides for this long.
pub const FALLBACK_HOLD: Duration = Duration::from_secs(1);
/// Refills waiting at most (more are answered by the fallback).
const QUEUE: usize = 1024;
/// Refills per pipeline at most.
const BATCH: usize = 256;

/// GCRA over microseconds of Redis's clock: take `ARGV[3]` tokens at once
/// or none. Replies `{tokens, 0}`, or `{0, microseconds until that many
/// are free}`: under contention tokens are handed out in whole batches,
/// so a saturated limit costs one call per batch, not one per command.
pub const SCRIPT: &str = r"local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tau = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local after = tat + want * interval
if after - now > tau then
  return {0, math.ceil(after - now - tau)}
end
redis.call('SET', KEYS[1], string.format('%d', math.ceil(after)), 'PX', math.floor((after - now) / 1000) + 1)
return {want, 0}
";

/// One bucket's local view of a shared limit.
#[derive(Default)]
pub struct SharedBucket {
    state: Mutex<SharedState>,
    /// Held while a refill runs: concurrent misses wait for it instead of
    /// asking the upstream too (single flight).
    refill: tokio::sync::Mutex<()>,
    /// A refill ahead of need is running.
    prefetching: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct SharedState {
    /// Tokens taken from the upstream and not spent yet.
    lease: u64,
    lease_expires: u64,
    /// The upstream said no token is free before this.
    denied_until: u64,
    /// The upstream failed: the fallback decides until this.
    fallback_until: u64,
    /// The `on_error = "local"` fallback's GCRA.
    local_tat: u64,
}

/// What taking tokens from a shared bucket found.
#[derive(Debug, PartialEq, Eq)]
pub enum Take {
    /// Taken; this many are left.
    Taken { left: u64 },
    /// None free for this many ns (said by the upstream).
    Retry(u64),
    /// The lease is empty: ask the upstream.
    Refill,
    /// The upstream is unreachable: the rule's `on_error` decides.
    Fallback,
}

impl SharedBucket {
    fn lock(&self) -> std::sync::MutexGuard<'_, SharedState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Take `n` tokens. Tokens on hand are spent first, also while the
    /// upstream is failing.
    pub fn take(&self, now: u64, n: u64, upstream_down: bool) -> Take {
        let mut s = self.lock();
        if s.lease_expires <= now {
            s.lease = 0;
        }
        if s.lease >= n {
            s.lease -= n;
            return Take::Taken { left: s.lease };
        }
        if now < s.fallback_until || upstream_down {
            return Take::Fallback;
        }
        if now < s.denied_until {
            return Take::Retry(s.denied_until - now);
        }
        Take::Refill
    }

    /// Claim the one background refill of this bucket (false: one runs).
    pub fn start_prefetch(&self) -> bool {
        !self.prefetching.swap(true, Ordering::AcqRel)
    }

    pub fn give_back(&self, n: u64) {
        self.lock().lease += n;
    }

    /// The `on_error = "local"` decision.
    pub fn local(&self, gcra: &Gcra, now: u64, n: u64, max_wait: u64) -> Result<u64, u64> {
        gcra.charge(&mut self.lock().local_tat, now, n, max_wait)
    }

    pub fn local_refund(&self, gcra: &Gcra, n: u64) {
        gcra.refund(&mut self.lock().local_tat, n);
    }
}

impl Bucket for Arc<SharedBucket> {
    fn idle(&self, now: u64) -> bool {
        if Arc::strong_count(self) > 1 {
            // A refill holds it.
            return false;
        }
        let s = self.lock();
        (s.lease == 0 || s.lease_expires <= now)
            && s.denied_until <= now
            && s.fallback_until <= now
            && s.local_tat <= now
    }
}

/// A refill's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Grant {
    pub tokens: u64,
    /// When `tokens` is 0: ns until one is free.
    pub retry_ns: u64,
}

/// Why a refill got no answer.
#[derive(Debug, thiserror::Error)]
pub enum SharedError {
    #[error("too many refills waiting")]
    Busy,
    #[error("the rate limiter's upstream task has stopped")]
    Stopped,
    #[error("upstream: {0}")]
    Upstream(#[source] UpstreamError),
    #[error("unexpected reply to the rate-limit script")]
    BadReply,
}

struct Request {
    key: Bytes,
    gcra: Gcra,
    want: u64,
    reply: oneshot::Sender<Result<Grant, SharedError>>,
}

/// The connection shared-scope rules refill through: a task that sends
/// every waiting refill in one pipeline.
pub struct SharedClient {
    tx: mpsc::Sender<Request>,
    /// Connecting failed: refills are not tried before this (ns).
    down_until: Arc<AtomicU64>,
}

impl SharedClient {
    pub fn start(
        pool: Arc<Pool>,
        tasks: &TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<SharedClient> {
        let (tx, rx) = mpsc::channel(QUEUE);
        let down_until = Arc::new(AtomicU64::new(0));
        tasks.spawn(run(pool, rx, down_until.clone(), shutdown));
        Arc::new(SharedClient { tx, down_until })
    }

    /// A connection attempt failed less than [`FALLBACK_HOLD`] ago.
    pub fn is_down(&self, now: u64) -> bool {
        now < self.down_until.load(Ordering::Relaxed)
    }

    pub async fn request(&self, key: Bytes, gcra: Gcra, want: u64) -> Result<Grant, SharedError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .try_send(Request {
                key,
                gcra,
                want,
                reply,
            })
            .map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => SharedError::Busy,
                mpsc::error::TrySendError::Closed(_) => SharedError::Stopped,
            })?;
        rx.await.map_err(|_| SharedError::Stopped)?
    }
}

/// Counters of one rule's refills.
#[derive(Clone)]
pub struct RefillMetrics {
    pub ok: IntCounter,
    pub error: IntCounter,
}

/// Refill `bucket` from the upstream (or find that another waiter did).
/// `ahead`: a refill before the lease runs out (the lease's low-water
/// mark), run on a task of its own so that no client waits for it.
pub fn refill(
    bucket: Arc<SharedBucket>,
    client: Arc<SharedClient>,
    key: Bytes,
    gcra: Gcra,
    want: u64,
    ahead: bool,
    metrics: RefillMetrics,
) -> Wait {
    Box::pin(async move {
        let single = bucket.refill.lock().await;
        let now = now_ns();
        let needed = {
            let s = bucket.lock();
            let left = if s.lease_expires > now { s.lease } else { 0 };
            let low = if ahead { want.div_ceil(2) } else { 1 };
            left < low && s.denied_until <= now && s.fallback_until <= now
        };
        if needed {
            let result =
                tokio::time::timeout(REFILL_TIMEOUT, client.request(key, gcra, want)).await;
            let now = now_ns();
            let mut s = bucket.lock();
            match result {
                Ok(Ok(grant)) => {
                    metrics.ok.inc();
                    if grant.tokens > 0 {
                        if s.lease_expires <= now {
                            s.lease = 0;
                        }
                        s.lease += grant.tokens;
                        s.lease_expires = now + LEASE_LIFE.as_nanos() as u64;
                    } else {
                        s.denied_until = now + grant.retry_ns.max(1);
                    }
                }
                Ok(Err(e)) => {
                    metrics.error.inc();
                    tracing::debug!(error = %e, "shared rate-limit refill failed; falling back");
                    s.fallback_until = now + FALLBACK_HOLD.as_nanos() as u64;
                }
                Err(_) => {
                    metrics.error.inc();
                    tracing::debug!("shared rate-limit refill timed out; falling back");
                    s.fallback_until = now + FALLBACK_HOLD.as_nanos() as u64;
                }
            }
        }
        drop(single);
        if ahead {
            bucket.prefetching.store(false, Ordering::Release);
        }
    })
}

async fn run(
    pool: Arc<Pool>,
    mut rx: mpsc::Receiver<Request>,
    down_until: Arc<AtomicU64>,
    shutdown: CancellationToken,
) {
    let mut conn: Option<(ControlConn, Bytes)> = None;
    loop {
        let first = tokio::select! {
            r = rx.recv() => match r {
                Some(r) => r,
                None => return,
            },
            _ = shutdown.cancelled() => return,
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if conn
            .as_ref()
            .is_some_and(|(c, _)| c.generation != pool.ups.active().generation)
        {
            // The active endpoint changed: its buckets start fresh there.
            conn = None;
        }
        let result = match &mut conn {
            Some((c, sha)) => call(c, sha, &batch).await,
            None => match connect(&pool).await {
                Ok((mut c, mut sha)) => {
                    let r = call(&mut c, &mut sha, &batch).await;
                    conn = Some((c, sha));
                    r
                }
                Err(e) => {
                    down_until.store(
                        now_ns() + FALLBACK_HOLD.as_nanos() as u64,
                        Ordering::Relaxed,
                    );
                    Err(e)
                }
            },
        };
        match result {
            Ok(replies) => {
                for (req, reply) in batch.into_iter().zip(replies) {
                    let _ = req.reply.send(reply);
                }
            }
            Err(e) => {
                conn = None;
                for req in batch {
                    let _ = req
                        .reply
                        .send(Err(SharedError::Upstream(UpstreamError::clone(&e))));
                }
            }
        }
    }
}

/// A control connection with the script loaded: (connection, its SHA1).
async fn connect(pool: &Arc<Pool>) -> Result<(ControlConn, Bytes), UpstreamError> {
    let ident = Identity {
        proto: Proto::Resp2,
        db: URL_DB,
        auth: None,
    };
    let mut c = pool.control(&ident).await?;
    let sha = load(&mut c).await?;
    Ok((c, sha))
}

async fn load(c: &mut ControlConn) -> Result<Bytes, UpstreamError> {
    let reply = c
        .call(&[vec![
            Bytes::from_static(b"SCRIPT"),
            Bytes::from_static(b"LOAD"),
            Bytes::from_static(SCRIPT.as_bytes()),
        ]])
        .await?
        .pop()
        .ok_or(UpstreamError::ConnectionLost)?;
    match decode(&reply) {
        Some(OwnedFrame::BulkString(sha)) => Ok(Bytes::from(sha)),
        _ => Err(UpstreamError::Refused(crate::wire::error_text(&reply))),
    }
}

fn decode(reply: &[u8]) -> Option<OwnedFrame> {
    redis_protocol::resp2::decode::decode(reply)
        .ok()
        .flatten()
        .map(|(f, _)| f)
}

fn evalsha(sha: &Bytes, r: &Request) -> Vec<Bytes> {
    let us = |ns: u64| Bytes::from(format!("{:.3}", ns as f64 / 1000.0));
    vec![
        Bytes::from_static(b"EVALSHA"),
        sha.clone(),
        Bytes::from_static(b"1"),
        r.key.clone(),
        us(r.gcra.interval),
        us(r.gcra.tau),
        Bytes::from(r.want.to_string()),
    ]
}

/// Send the batch; a NOSCRIPT (the upstream's scripts were flushed) loads
/// the script again and resends those: they did not run.
async fn call(
    c: &mut ControlConn,
    sha: &mut Bytes,
    batch: &[Request],
) -> Result<Vec<Result<Grant, SharedError>>, UpstreamError> {
    let cmds: Vec<Vec<Bytes>> = batch.iter().map(|r| evalsha(sha, r)).collect();
    let mut replies = c.call(&cmds).await?;
    let missing: Vec<usize> = replies
        .iter()
        .enumerate()
        .filter(|(_, r)| r.starts_with(b"-NOSCRIPT"))
        .map(|(i, _)| i)
        .collect();
    if !missing.is_empty() {
        *sha = load(c).await?;
        let again: Vec<Vec<Bytes>> = missing.iter().map(|&i| evalsha(sha, &batch[i])).collect();
        for (i, r) in missing.into_iter().zip(c.call(&again).await?) {
            replies[i] = r;
        }
    }
    Ok(replies.iter().map(|r| parse(r)).collect())
}

fn parse(reply: &[u8]) -> Result<Grant, SharedError> {
    if crate::wire::is_error(reply) {
        return Err(SharedError::Upstream(UpstreamError::Refused(
            crate::wire::error_text(reply),
        )));
    }
    match decode(reply) {
        Some(OwnedFrame::Array(a)) => match (a.first(), a.get(1)) {
            (Some(OwnedFrame::Integer(tokens)), Some(OwnedFrame::Integer(retry_us))) => Ok(Grant {
                tokens: u64::try_from(*tokens).unwrap_or(0),
                retry_ns: u64::try_from(*retry_us).unwrap_or(0).saturating_mul(1000),
            }),
            _ => Err(SharedError::BadReply),
        },
        _ => Err(SharedError::BadReply),
    }
}
