//! One client connection: its state (protocol, db, user, name, pinned
//! connection, transaction and subscription state), and the reader that
//! turns requests into jobs and output-queue entries. Replies are written by
//! whoever completes them ([`crate::request::output`]); the session's writer only
//! takes the socket over while it is full.
//!
//! Ordering: for every request the reader puts an entry in the client's
//! output queue ([`crate::request::output`]) *before* the job leaves for an upstream
//! connection, and entries are written strictly in queue order. So a
//! client's replies come back in the order of its requests whichever
//! connections served them. When a client moves between upstream
//! connections (shared to dedicated, or to another db's shared connection),
//! the reader first waits until every earlier reply is complete (a
//! barrier), so its commands also *run* upstream in the order it sent them.
//!
//! Here: the session's fields and the per-command glue (the policy chain,
//! then the path by mode). Each concept in its own file: `mode` (the
//! mode machine), `read` (the read loop and backpressure), `forward`
//! (connection choice, lanes, barriers, the cluster direct path), `tx`
//! (transactions), `streaming`, `state` (the connection-state commands
//! and the identity they change) and `client_cmd` (the CLIENT family).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

mod client_cmd;
mod forward;
mod mode;
mod read;
mod state;
mod streaming;
mod tx;

use client_cmd::{Answer, arity_error};
use mode::*;
use state::{ConnState, WRONGPASS, hello_without_auth, parse_auth, parse_hello};
use tx::{is_unwatch, queued_in_tx};

use super::Shared;
use super::clients::{self, ClientEntry};
use crate::metrics::CommandMetrics;
use crate::policy::{Chain, Ctx, Verdict};
use crate::request::command::{Class, CommandInfo, Local, Pin, classify};
use crate::request::exchange::Exchange;
use crate::upstream::pool::{ClusterSet, Dedicated, SharedSet};
use crate::upstream::{Identity, Job, JobKind, URL_DB, UpstreamError};
use crate::wire::{Request, RequestScanner, Value};

/// Read size from a client socket.
const READ_CHUNK: usize = 16 * 1024;

/// Longest wait, when closing a streaming client, for the replies Redis
/// still owes it to arrive.
const MARK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// A session's view of a cluster upstream.
struct ClusterCache {
    /// The active choice's generation this is for.
    generation: u64,
    /// The identity's node connections (`None`: not a cluster).
    set: Option<Arc<ClusterSet>>,
    /// The last request went straight to a node's connection.
    direct: bool,
}

struct Session {
    shared: Arc<Shared>,
    /// This client in the registry (what CLIENT LIST shows of it); its
    /// `client` is the output queue and socket, shared with upstream
    /// connections.
    entry: Arc<ClientEntry>,
    /// Count of output entries queued (`client.progress` counts those
    /// complete).
    queued: u64,
    /// Protocol, db, user, name: what RESET returns to the default.
    st: ConnState,
    mode: Mode,
    shared_set: Option<Arc<SharedSet>>,
    dedicated: Option<Dedicated>,
    /// The job channel used last, for the ordering barrier.
    last_tx: Option<mpsc::Sender<Job>>,
    /// The identity's node connections when the active endpoint is a
    /// cluster, and the active choice's generation they are for (`None`:
    /// look again). Boxed: the session future of every idle client
    /// carries this field.
    cluster: Option<Box<ClusterCache>>,
    /// The command table and its generation, refreshed when it changes.
    table: (u64, Arc<crate::request::command::Table>),
    /// The policy chain and its generation, refreshed when it changes.
    chain: (u64, Arc<Chain>),
    /// CLIENT KILL named this client: close after its reply.
    kill_self: bool,
    /// When the request being handled was read: the command duration
    /// metric starts here, for replies from upstream and the sidecar's own.
    read_at: Instant,
    /// The client's stateless commands go to its dedicated connection
    /// (its lane), not a shared one: it got large replies, left them
    /// unread, or pipelines deep ([`Session::shared_or_lane`]).
    lane: bool,
}

/// Serve one client until it disconnects, errs, is killed
/// (`client.kill`), or shutdown (`client.stop`).
pub async fn run(stream: TcpStream, shared: Arc<Shared>, entry: Arc<ClientEntry>) {
    stream.set_nodelay(true).ok();
    let (r, w) = stream.into_split();
    let client = entry.client.clone();
    client.attach(w);
    let mut session = Session {
        shared: shared.clone(),
        entry,
        queued: 0,
        st: ConnState::default(),
        mode: Mode::Normal,
        shared_set: None,
        dedicated: None,
        last_tx: None,
        cluster: None,
        table: (shared.pool.table_generation(), shared.pool.table()),
        chain: (shared.policies.generation(), shared.policies.current()),
        kill_self: false,
        read_at: Instant::now(),
        lane: false,
    };
    let reader = async {
        // Here, not before: the session then lives in one place of this
        // future, not two.
        session.publish();
        session.read_loop(r).await;
        // The writer ends once every queued reply is written; the session,
        // and so its dedicated upstream connection, lives until then:
        // replies still in flight need it.
        session.entry.client.finish();
        session
    };
    tokio::select! {
        _ = async { tokio::join!(reader, client.write_loop()) } => {}
        _ = client.kill.cancelled() => {}
    }
    client.shut();
}

impl Session {
    fn holds_state(&self) -> bool {
        !matches!(self.mode, Mode::Normal)
    }

    fn identity(&self) -> Identity {
        Identity {
            proto: self.st.proto,
            db: self.st.db,
            auth: self.st.auth.clone(),
        }
    }

    /// Queue a reply the sidecar made itself.
    async fn now(&mut self, reply: Bytes, metrics: Option<&CommandMetrics>) {
        self.entry.touch_time(Instant::now());
        if let Some(m) = metrics {
            m.duration.observe(self.read_at.elapsed().as_secs_f64());
        }
        let reply = if matches!(self.mode, Mode::Streaming(_)) {
            // Boxed: only streaming clients pay for its future.
            match Box::pin(self.stream_reply(reply, false)).await {
                Ok(()) => return,
                Err(reply) => reply,
            }
        } else {
            reply
        };
        self.wait_for_room().await;
        self.entry.client.reply(reply, metrics);
    }

    /// Close the client once everything queued is written (on a stream:
    /// once what the upstream owes for earlier commands has arrived).
    async fn close(&mut self) {
        if matches!(self.mode, Mode::Streaming(_)) {
            let _ = Box::pin(self.stream_reply(Bytes::new(), true)).await;
        }
        self.wait_for_room().await;
        self.entry.client.close();
    }

    async fn reply(&mut self, v: Value, metrics: &Arc<CommandMetrics>) {
        let reply = v.encode(self.st.proto);
        self.now(reply, Some(metrics)).await;
    }

    /// The command's metric handles: resolved once per table entry, and
    /// `other` for names the table does not know (so clients cannot invent
    /// labels).
    fn command_metrics(
        &self,
        info: Option<&crate::request::command::CommandInfo>,
    ) -> Arc<CommandMetrics> {
        match info {
            Some(i) => i
                .metrics
                .get_or_init(|| {
                    let label = i.name.split('|').next().unwrap_or("other");
                    self.shared.metrics.command(label)
                })
                .clone(),
            None => self.shared.other_metrics.clone(),
        }
    }

    /// Ctx for the policy stages.
    fn ctx<'a>(&'a self, info: Option<&'a CommandInfo>) -> Ctx<'a> {
        Ctx {
            client_id: self.entry.id,
            peer: self.entry.peer,
            user: self.sidecar_user().or_else(|| {
                self.st
                    .auth
                    .as_ref()
                    .map(|a| a.user.as_deref().unwrap_or(b"default"))
            }),
            name: self.st.name.as_deref(),
            db: self.st.db,
            proto: self.st.proto,
            mode: self.mode.kind(),
            info,
            since: self.read_at,
            now: self.read_at,
            upstream_auth: self.st.auth.is_some() && self.sidecar_user().is_none(),
        }
    }

    async fn handle(&mut self, req: Request) -> Flow {
        self.read_at = Instant::now();
        let generation = self.shared.pool.table_generation();
        if generation != self.table.0 {
            self.table = (generation, self.shared.pool.table());
        }
        let generation = self.shared.policies.generation();
        if generation != self.chain.0 {
            self.chain = (generation, self.shared.policies.current());
        }
        let info = self.table.1.lookup(&req.args).cloned();
        let metrics = self.command_metrics(info.as_deref());
        let class = classify(&req.args, info.as_deref());
        if let Some(i) = &info {
            self.entry.touch_cmd(i.id);
        }
        let mut ex = Exchange::new(req);
        if let (Class::Local(_), Some(i)) = (class, info.as_deref())
            && let Some(err) = arity_error(i, ex.args())
        {
            // As Redis, before anything runs or is queued (inside MULTI
            // this aborts the transaction).
            if let Mode::Transaction(tx) = &mut self.mode {
                tx.refused = true;
            }
            self.now(err, Some(&metrics)).await;
            return Flow::Next;
        }
        if self.shared.client_auth.is_some()
            && self.st.client_user.is_none()
            && !matches!(
                class,
                Class::Local(Local::Auth | Local::Hello | Local::Quit | Local::Reset)
            )
        {
            // As Redis with requirepass, after the arity check. A command
            // the table does not know gets NOAUTH too (Redis would say
            // "unknown command"): nothing from an unauthenticated client
            // reaches the upstream, which would run it with the URL's
            // credentials.
            let err = info
                .as_deref()
                .and_then(|i| arity_error(i, ex.args()))
                .unwrap_or_else(|| Bytes::from_static(b"-NOAUTH Authentication required.\r\n"));
            self.refuse(err, &metrics).await;
            return Flow::Next;
        }
        if !self.chain.1.is_empty() {
            // The usual verdict (continue) costs no future of its own.
            let mut next = 0;
            let verdict = self
                .chain
                .1
                .run(&self.ctx(info.as_deref()), &mut ex, &mut next);
            if !matches!(verdict, Verdict::Continue)
                && let Some(flow) = Box::pin(self.run_chain(
                    verdict,
                    next,
                    &mut ex,
                    class,
                    info.as_deref(),
                    &metrics,
                ))
                .await
            {
                return flow;
            }
        }
        let flow = match (&self.mode, class) {
            // Boxed, like every path but the plain forward: their futures
            // would otherwise enlarge the one allocated per request.
            (Mode::Streaming(_), _) => Box::pin(self.route_streaming(ex, class, &metrics)).await,
            (Mode::Transaction(_), _) => Box::pin(self.route_tx(ex, class, &metrics)).await,
            (_, Class::Forward) => {
                let target = match self.mode {
                    Mode::Normal => match self.shared_or_lane() {
                        Some(t) => t,
                        // Boxed: once per client at most.
                        None => Box::pin(self.after_first_reply()).await,
                    },
                    _ => Target::Dedicated,
                };
                if let Target::Shared = target
                    && let Some(tx) = self.cluster_tx(&ex, info.as_deref())
                {
                    // A cluster: straight to the key's node.
                    self.barrier_direct().await;
                    return self.send_on(tx, ex, false, &metrics).await;
                }
                return self.send_job(target, ex, false, &metrics).await;
            }
            _ => Box::pin(self.route(ex, class, &metrics)).await,
        };
        self.publish();
        flow
    }

    /// Act on a stage's `verdict` other than continue (then run the rest
    /// of the chain from `next`); `Some` when a stage answered or refused
    /// (the reply is queued).
    async fn run_chain(
        &mut self,
        mut verdict: Verdict,
        mut next: usize,
        ex: &mut Exchange,
        class: Class,
        info: Option<&CommandInfo>,
        metrics: &Arc<CommandMetrics>,
    ) -> Option<Flow> {
        let chain = self.chain.1.clone();
        loop {
            let (reply, refused) = match verdict {
                Verdict::Continue => return None,
                Verdict::Delay(until) => {
                    // This client's later commands wait behind this one
                    // (the reader is here); what it is owed goes out now.
                    self.entry.client.flush();
                    tokio::time::sleep_until(until).await;
                    let ctx = Ctx {
                        now: Instant::now(),
                        ..self.ctx(info)
                    };
                    verdict = chain.run(&ctx, ex, &mut next);
                    continue;
                }
                Verdict::Wait(wait) => {
                    self.entry.client.flush();
                    wait.await;
                    let ctx = Ctx {
                        now: Instant::now(),
                        ..self.ctx(info)
                    };
                    verdict = chain.run(&ctx, ex, &mut next);
                    continue;
                }
                Verdict::Answer(r) => (r, false),
                Verdict::Refuse(r) => (r, true),
            };
            if matches!(self.mode, Mode::Transaction(_))
                && class == Class::Pin(Pin::EndTransaction)
                && !is_unwatch(ex.args())
            {
                // EXEC or DISCARD refused (or answered) by a stage: the
                // transaction ends all the same, as Redis never leaves
                // MULTI open after either; left open, the client's next
                // commands would be answered QUEUED and never run.
                return Some(self.discard_tx(reply, metrics).await);
            }
            if let Mode::Transaction(tx) = &mut self.mode
                && queued_in_tx(class)
            {
                if refused {
                    // As Redis with a command refused at queue time.
                    tx.refused = true;
                } else {
                    self.answer_into_tx(reply, metrics).await;
                    self.publish();
                    return Some(Flow::Next);
                }
            }
            if refused {
                self.refuse(reply, metrics).await;
            } else {
                self.now(reply, Some(metrics)).await;
            }
            return Some(Flow::Next);
        }
    }

    /// A refusal of the sidecar's own (a policy, `[client_auth]`):
    /// counted as `result="refused"`, not as Redis's error.
    async fn refuse(&mut self, reply: Bytes, metrics: &CommandMetrics) {
        metrics.refused.inc();
        metrics
            .duration
            .observe(self.read_at.elapsed().as_secs_f64());
        self.now(reply, None).await;
    }

    /// Normal, pinned or watching: anything but a plain forward.
    async fn route(&mut self, ex: Exchange, class: Class, metrics: &Arc<CommandMetrics>) -> Flow {
        match class {
            Class::Local(local) => self.local(local, ex, metrics).await,
            Class::Pin(Pin::Multi) => {
                self.transition(Event::Multi);
                match self.ensure_dedicated().await {
                    Ok(()) => self.send_job(Target::Dedicated, ex, false, metrics).await,
                    // Redis takes MULTI while busy in a script; the
                    // commands queued then are refused, as there.
                    Err(UpstreamError::Busy(_)) => {
                        if let Mode::Transaction(tx) = &mut self.mode {
                            tx.multi_unsent = true;
                        }
                        self.reply(Value::Simple("OK"), metrics).await;
                        Flow::Next
                    }
                    Err(e) => self.upstream_error(e, metrics).await,
                }
            }
            Class::Pin(Pin::Watch) => {
                self.transition(Event::Watch);
                self.send_job(Target::Dedicated, ex, false, metrics).await
            }
            Class::Pin(Pin::EndTransaction) => {
                // EXEC/DISCARD without MULTI: Redis's own error, and WATCH
                // stays; UNWATCH ends it.
                let unwatch = is_unwatch(ex.args());
                let target = if matches!(self.mode, Mode::Normal) {
                    Target::Shared
                } else {
                    Target::Dedicated
                };
                let flow = self.send_job(target, ex, false, metrics).await;
                if unwatch {
                    self.transition(Event::Unwatch);
                }
                flow
            }
            Class::Pin(Pin::Blocking) => self.send_job(Target::Dedicated, ex, true, metrics).await,
            Class::Pin(p @ (Pin::Stream | Pin::Replica)) => {
                if let Err(e) = self.ensure_dedicated().await {
                    return self.upstream_error(e, metrics).await;
                }
                self.transition(Event::Stream);
                self.note_subscriptions(ex.args());
                if let Mode::Streaming(subs) = &mut self.mode {
                    subs.note_replies(ex.args());
                }
                let payload = ex.into_command();
                // A replica's connection carries an RDB, then commands:
                // passed through unparsed.
                let kind = if p == Pin::Replica {
                    JobKind::StartRaw
                } else {
                    JobKind::StartStream
                };
                self.send_stream(payload, kind, metrics).await
            }
            Class::Pin(Pin::Sticky) => {
                let mut ex = ex;
                if let Err(e) = self.map_redirect(&mut ex).await {
                    self.now(e, Some(metrics)).await;
                    return Flow::Next;
                }
                self.transition(Event::Pin);
                self.send_job(Target::Dedicated, ex, false, metrics).await
            }
            Class::Forward => self.send_job(Target::Dedicated, ex, false, metrics).await,
        }
    }

    fn transition(&mut self, ev: Event) {
        self.mode = std::mem::take(&mut self.mode).after(ev);
        self.update_holds_state();
    }

    /// What CLIENT LIST shows of this client.
    fn publish(&self) {
        let mut p = self.entry.published();
        p.name = self.st.name.clone();
        p.db = if self.st.db == URL_DB {
            self.shared.pool.ups.active().endpoint.db()
        } else {
            self.st.db
        };
        p.user = self.sidecar_user().map(Bytes::copy_from_slice).or_else(|| {
            self.st.auth.as_ref().map(|a| {
                a.user
                    .clone()
                    .unwrap_or_else(|| Bytes::from_static(b"default"))
            })
        });
        p.resp = self.st.proto.number();
        (p.flags, p.multi, p.sub, p.psub, p.ssub) = match &self.mode {
            Mode::Transaction(tx) => ("x", tx.items.len() as i64, 0, 0, 0),
            Mode::Streaming(s) if s.monitor => ("O", -1, 0, 0, 0),
            Mode::Streaming(s) if s.replica => ("S", -1, 0, 0, 0),
            Mode::Streaming(s) => ("P", -1, s.channels.len(), s.patterns.len(), s.shard.len()),
            _ => ("N", -1, 0, 0, 0),
        };
        self.entry.publish(p);
    }

    async fn upstream_error(&mut self, e: UpstreamError, metrics: &Arc<CommandMetrics>) -> Flow {
        self.now(e.to_reply(), Some(metrics)).await;
        if self.entry.client.kill.is_cancelled() {
            Flow::Stop
        } else {
            Flow::Next
        }
    }
}

#[cfg(test)]
mod tests;
