//! Where a request goes: the shared connection, the client's lane or
//! dedicated connection, a cluster node straight; and the ordering
//! barriers that keep a client's commands in its order when it moves.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::mpsc;

use crate::metrics::CommandMetrics;
use crate::request::command::CommandInfo;
use crate::request::exchange::Exchange;
use crate::upstream::{Hop, Job, JobKind, Oob, UpstreamError};

use super::*;

/// `tx.send(job)` on the heap (see [`crate::request::output::Progress::wait_boxed`]).
fn send_boxed(
    tx: &mpsc::Sender<Job>,
    job: Job,
) -> std::pin::Pin<Box<impl Future<Output = Result<(), mpsc::error::SendError<Job>>> + '_>> {
    Box::pin(tx.send(job))
}

impl Session {
    /// Where a stateless command of a normal-mode client goes: a shared
    /// connection, or the client's lane (its dedicated connection) once
    /// what it has shown would delay the others on a shared one. On a
    /// shared connection replies come back in one FIFO: a client's large
    /// replies, or a deep pipeline of them, are ahead of every neighbour's
    /// (12 clients pipelining 1,000 GETs of 100 KB made a neighbour's GET
    /// take seconds). So a client moves to its lane for good once it got
    /// a reply larger than `lane_after_reply` or left 16 times that
    /// unread, or has `lane_after_inflight` requests in flight; and until
    /// its first reply shows what its replies are like, it has one
    /// request in flight on a shared connection (one round trip, once).
    /// `None`: wait for the client's first reply first
    /// ([`Session::after_first_reply`]).
    pub(super) fn shared_or_lane(&mut self) -> Option<Target> {
        if self.lane {
            return Some(Target::Dedicated);
        }
        let client = &self.entry.client;
        let done = client.progress.done();
        let inflight = self.queued - done;
        if client.heavy() {
            return Some(self.move_to_lane("large_replies"));
        }
        if inflight >= self.shared.limits.lane_inflight as u64 {
            return Some(self.move_to_lane("deep_pipeline"));
        }
        if done == 0 && inflight > 0 {
            return None;
        }
        Some(Target::Shared)
    }

    /// The first reply is the probe: wait for it, then decide.
    pub(super) async fn after_first_reply(&mut self) -> Target {
        self.entry.client.flush();
        self.entry.client.progress.wait_for(1).await;
        if self.entry.client.heavy() {
            return self.move_to_lane("large_replies");
        }
        Target::Shared
    }

    pub(super) fn move_to_lane(&mut self, reason: &'static str) -> Target {
        self.lane = true;
        self.shared.metrics.client_lane(reason);
        tracing::debug!(
            client = self.entry.id,
            reason,
            "client moved to an upstream connection of its own"
        );
        Target::Dedicated
    }

    pub(super) fn update_holds_state(&self) {
        if let Some(d) = &self.dedicated {
            d.holds_state.store(self.holds_state(), Ordering::Release);
        }
    }

    /// Forget the dedicated connection. It lives on while `last_tx` holds
    /// it (replies of commands already sent there, a blocking command
    /// pipelined before this one, still come back) and closes when the
    /// client's next command moves elsewhere; `now` closes it at once
    /// (the client left, or a RESET must stop a stream of messages).
    pub(super) fn drop_dedicated(&mut self, now: bool) {
        if now {
            self.last_tx = None;
        }
        if let Some(d) = self.dedicated.take() {
            // Given up on purpose (RESET, a new identity): its end must
            // not close the client as a lost connection holding state.
            d.holds_state.store(false, Ordering::Release);
        }
        self.entry.upstream_id.store(-1, Ordering::Release);
    }

    pub(super) async fn ensure_dedicated(&mut self) -> Result<(), UpstreamError> {
        if let Some(d) = &self.dedicated {
            if d.is_alive() {
                return Ok(());
            }
            if self.holds_state() {
                // MULTI/WATCH/subscriptions died with the connection.
                self.entry.client.kill.cancel();
                return Err(UpstreamError::ConnectionLost);
            }
            self.drop_dedicated(false);
        }
        let oob = Oob::new(self.entry.client.clone());
        let pool = self.shared.pool.clone();
        let d = Box::pin(pool.dedicated(&self.identity(), self.st.name.as_ref(), oob)).await?;
        self.entry
            .upstream_id
            .store(d.upstream_id.unwrap_or(-1), Ordering::Release);
        self.dedicated = Some(d);
        Ok(())
    }

    /// The job channel for a target, creating connections as needed.
    pub(super) async fn channel(
        &mut self,
        target: Target,
    ) -> Result<mpsc::Sender<Job>, UpstreamError> {
        match target {
            Target::Dedicated => {
                self.ensure_dedicated().await?;
                self.update_holds_state();
                self.dedicated
                    .as_ref()
                    .map(|d| d.tx.clone())
                    .ok_or(UpstreamError::ConnectionLost)
            }
            Target::Shared => {
                let set = match &self.shared_set {
                    Some(s) => s.clone(),
                    None => {
                        let s = self.shared.pool.shared(&self.identity())?;
                        self.shared_set = Some(s.clone());
                        s
                    }
                };
                Ok(set.pick(self.entry.id).clone())
            }
        }
    }

    /// Wait until every reply queued so far was written, when the client
    /// moves to another upstream connection, so its commands run in order.
    /// After requests sent straight to cluster nodes, the identity's router
    /// needs no wait: what it sends to a node queues behind them.
    pub(super) async fn barrier(&mut self, tx: &mpsc::Sender<Job>) {
        let same = if self.direct() {
            self.shared_set
                .as_ref()
                .is_some_and(|s| s.pick(self.entry.id).same_channel(tx))
        } else {
            self.last_tx.as_ref().is_some_and(|l| l.same_channel(tx))
        };
        if !same {
            self.wait_written().await;
        }
        if let Some(c) = self.cluster.as_mut() {
            c.direct = false;
        }
        if !self.last_tx.as_ref().is_some_and(|l| l.same_channel(tx)) {
            self.last_tx = Some(tx.clone());
        }
    }

    pub(super) async fn wait_written(&mut self) {
        let want = self.queued;
        self.entry.client.flush();
        // Boxed: rare, and inline it would enlarge the per-request future.
        self.entry.client.progress.wait_boxed(want).await;
    }

    /// Before a request goes straight to a cluster node: what went through
    /// another channel (the router, a dedicated connection) is answered
    /// first, so it ran first.
    pub(super) async fn barrier_direct(&mut self) {
        if !self.direct() {
            if self.last_tx.is_some() {
                self.wait_written().await;
            }
            self.last_tx = None;
            if let Some(c) = self.cluster.as_mut() {
                c.direct = true;
            }
        }
    }

    pub(super) fn direct(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.direct)
    }

    /// The node connection for a request the session sends straight to
    /// its node (keys in one slot, or none), when the active endpoint is a
    /// cluster.
    pub(super) fn cluster_tx(
        &mut self,
        ex: &Exchange,
        info: Option<&CommandInfo>,
    ) -> Option<mpsc::Sender<Job>> {
        let generation = self.shared.pool.ups.generation();
        if self
            .cluster
            .as_ref()
            .is_none_or(|c| c.generation != generation)
        {
            let ident = self.identity();
            let set = self.shared.pool.cluster_set(&ident);
            if set.is_some() && self.shared_set.is_none() {
                // The identity's routers handle what nodes send back.
                self.shared_set = self.shared.pool.shared(&ident).ok();
            }
            self.cluster = Some(Box::new(ClusterCache {
                generation,
                set,
                direct: false,
            }));
        }
        let set = self.cluster.as_ref()?.set.as_ref()?;
        let to = crate::upstream::cluster::route::direct(ex.args(), info?)?;
        set.direct(&self.shared.pool, to, &self.entry.client)
    }

    pub(super) async fn send_job(
        &mut self,
        target: Target,
        exchange: Exchange,
        blocking: bool,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        let tx = match self.channel(target).await {
            Ok(tx) => tx,
            Err(e) => {
                exchange.fail(&e);
                return self.upstream_error(e, metrics).await;
            }
        };
        self.barrier(&tx).await;
        self.send_on(tx, exchange, blocking, metrics).await
    }

    /// Queue the client's output entry and send the request on `tx`.
    pub(super) async fn send_on(
        &mut self,
        tx: mpsc::Sender<Job>,
        exchange: Exchange,
        blocking: bool,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        self.wait_for_room().await;
        if blocking {
            // Output entries queued up to and including this one: while
            // fewer are complete, the dedicated connection waits in Redis
            // on this client's behalf.
            self.entry
                .blocked_until
                .store(self.queued, Ordering::Release);
        }
        // The duration counts from the read: waits for room, a barrier or
        // a connection are part of what the client sees.
        let now = self.read_at;
        self.entry.touch_time(now);
        let seq = self.entry.client.expect(now, metrics.clone());
        if blocking {
            self.entry.blocked_seq.store(seq, Ordering::Release);
        }
        let (payload, plan) = exchange.send();
        let job = Job {
            payload,
            kind: JobKind::Request {
                plan,
                entry: Some(seq),
                blocking,
            },
            client: self.entry.client.clone(),
            enqueued: now,
            hop: Hop::default(),
        };
        // Without a future while the channel has room (nearly always): the
        // awaited send's semaphore wait cost 2 % of the instructions.
        let sent = match tx.try_send(job) {
            Ok(()) => Ok(()),
            // Boxed: rare, and inline its future (the job and a semaphore
            // waiter) would take the per-request future past the size
            // glibc's malloc serves from its per-thread cache (1,032 bytes).
            Err(mpsc::error::TrySendError::Full(job)) => {
                send_boxed(&tx, job).await.map_err(|e| e.0)
            }
            Err(mpsc::error::TrySendError::Closed(job)) => Err(job),
        };
        if let Err(job) = sent {
            // The connection is gone and the job was never sent.
            job.fail(UpstreamError::unreachable("upstream connection closed"));
        }
        Flow::Next
    }

    /// A job whose reply no client entry waits for (the sidecar's own
    /// commands: a DISCARD, a state change it answers itself).
    pub(super) fn unanswered(&self, ex: Exchange) -> Job {
        let (payload, plan) = ex.send();
        Job {
            payload,
            kind: JobKind::Request {
                plan,
                entry: None,
                blocking: false,
            },
            client: self.entry.client.clone(),
            enqueued: Instant::now(),
            hop: Hop::default(),
        }
    }

    /// Run a command on the dedicated connection for the session's own
    /// use (its reply does not go to the client): a connection-state
    /// command the sidecar answers, applied where the client holds state.
    pub(super) async fn on_dedicated(&mut self, args: Vec<Bytes>) -> Result<Bytes, UpstreamError> {
        let mut ex = Exchange::command(&args);
        let rx = ex.tee();
        let tx = self.channel(Target::Dedicated).await?;
        self.barrier(&tx).await;
        if tx.send(self.unanswered(ex)).await.is_err() {
            return Err(UpstreamError::ConnectionLost);
        }
        rx.await.unwrap_or(Err(UpstreamError::ConnectionLost))
    }

    /// Whether a connection-state command must also run on the dedicated
    /// connection (the client holds state there that Redis keeps per
    /// connection: WATCH, tracking).
    pub(super) fn state_on_dedicated(&self) -> bool {
        matches!(self.mode, Mode::Pinned | Mode::Watching { .. }) && self.dedicated.is_some()
    }

    /// Apply a state command on the dedicated connection when the client
    /// holds state there. `Ok(true)`: done there; `Ok(false)`: not needed;
    /// `Err`: the error reply the client gets.
    pub(super) async fn apply_on_dedicated(&mut self, args: Vec<Bytes>) -> Result<bool, Bytes> {
        if !self.state_on_dedicated() {
            return Ok(false);
        }
        match self.on_dedicated(args).await {
            Ok(r) if crate::wire::is_error(&r) => Err(r),
            Ok(_) => Ok(true),
            Err(e) => Err(e.to_reply()),
        }
    }
}
