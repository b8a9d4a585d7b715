//! One client connection: its state (protocol, db, user, name, pinned
//! connection, transaction and subscription state), and the reader that
//! turns requests into jobs and output-queue entries. Replies are written by
//! whoever completes them ([`crate::output`]); the session's writer only
//! takes the socket over while it is full.
//!
//! Ordering: for every request the reader puts an entry in the client's
//! output queue ([`crate::output`]) *before* the job leaves for an upstream
//! connection, and entries are written strictly in queue order. So a
//! client's replies come back in the order of its requests whichever
//! connections served them. When a client moves between upstream
//! connections (shared to dedicated, or to another db's shared connection),
//! the reader first waits until every earlier reply is complete (a
//! barrier), so its commands also *run* upstream in the order it sent them.

use std::mem::MaybeUninit;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::mpsc;

use super::Shared;
use crate::command::{Class, Local, Pin, classify};
use crate::metrics::CommandMetrics;
use crate::policy::{Ctx, Outgoing, Verdict};
use crate::protocol::{Proto, Request, RequestScanner, Value};
use crate::upstream::pool::{Dedicated, SharedSet};
use crate::upstream::{
    Auth, ClientShared, DEFAULT_DB, Identity, Job, JobKind, Oob, Plan, UpstreamError,
};

/// Read size from a client socket.
const READ_CHUNK: usize = 16 * 1024;

/// Where a request goes.
enum Target {
    Shared,
    Dedicated,
}

/// What the reader does after a request.
#[derive(PartialEq, Eq)]
enum Flow {
    Go,
    Stop,
}

struct Session {
    shared: Arc<Shared>,
    id: u64,
    /// Its output queue and socket, shared with upstream connections.
    client: Arc<ClientShared>,
    /// Count of output entries queued (`client.progress` counts those
    /// complete).
    queued: u64,
    proto: Proto,
    db: i64,
    auth: Option<Auth>,
    name: Option<Bytes>,
    shared_set: Option<Arc<SharedSet>>,
    dedicated: Option<Dedicated>,
    /// The job channel used last, for the ordering barrier.
    last_tx: Option<mpsc::Sender<Job>>,
    /// Output entries queued up to and including the last blocking
    /// command: while fewer are complete, the dedicated connection waits
    /// in Redis on this client's behalf.
    blocked_until: u64,
    in_multi: bool,
    /// A stage answered a command inside MULTI: EXEC must abort.
    multi_dirty: bool,
    /// Commands queued in the current MULTI (including injected ones).
    multi_count: u32,
    /// Positions of injected commands in the current MULTI.
    multi_strip: Vec<u32>,
    watching: bool,
    /// SUBSCRIBE, MONITOR or CLIENT REPLY: the dedicated connection streams
    /// and everything is forwarded as it is.
    streaming: bool,
    /// State the sidecar does not track (CLIENT TRACKING, SELECT inside
    /// MULTI ...): stay on the dedicated connection for good.
    sticky: bool,
    /// The command table and its generation, refreshed when it changes.
    table: (u64, Arc<crate::command::Table>),
}

/// Serve one client until it disconnects, errs, is killed
/// (`client.kill`), or shutdown (`client.stop`).
pub async fn run(stream: TcpStream, shared: Arc<Shared>, id: u64, client: Arc<ClientShared>) {
    stream.set_nodelay(true).ok();
    let (r, w) = stream.into_split();
    client.attach(w);
    let mut session = Session {
        shared: shared.clone(),
        id,
        client: client.clone(),
        queued: 0,
        proto: Proto::Resp2,
        db: DEFAULT_DB,
        auth: None,
        name: None,
        shared_set: None,
        dedicated: None,
        last_tx: None,
        blocked_until: 0,
        in_multi: false,
        multi_dirty: false,
        multi_count: 0,
        multi_strip: Vec::new(),
        watching: false,
        streaming: false,
        sticky: false,
        table: (shared.pool.table_generation(), shared.pool.table()),
    };
    let reader = async {
        session.read_loop(r).await;
        // The writer ends once every queued reply is written; the session,
        // and so its dedicated upstream connection, lives until then:
        // replies still in flight need it.
        session.client.finish();
        session
    };
    tokio::select! {
        _ = async { tokio::join!(reader, client.write_loop()) } => {}
        _ = client.kill.cancelled() => {}
    }
    client.shut();
}

impl Session {
    async fn read_loop(&mut self, mut r: OwnedReadHalf) {
        let client = self.client.clone();
        let mut scanner = RequestScanner::new(self.shared.limits.frame);
        // Allocated when bytes arrive, and dropped when drained: 10,000
        // idle clients must not hold 10,000 read buffers.
        let mut buf = BytesMut::new();
        let idle = self.shared.limits.idle_timeout;
        loop {
            loop {
                match scanner.next(&mut buf) {
                    Ok(Some(req)) => {
                        // Boxed: the per-request future is large, and inline it would
                        // be part of every idle session's allocation.
                        if Box::pin(self.handle(req)).await == Flow::Stop {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => return Box::pin(self.protocol_error(e)).await,
                }
            }
            // Replies the session made itself for this read, in one write.
            self.client.flush();
            if buf.is_empty() && buf.capacity() > 0 {
                buf = BytesMut::new();
            }
            // A client waiting for a reply (a blocking pop, say) is not
            // idle, nor is one holding state: Redis does not close those.
            let waiting = self.client.progress.done() < self.queued;
            // Boxed, and only when it applies: a timer inline would enlarge
            // every session.
            let mut idle_sleep = (!idle.is_zero() && !self.holds_state() && !waiting)
                .then(|| Box::pin(tokio::time::sleep(idle)));
            let idle_applies = idle_sleep.is_some();
            // While replies are owed, wake when they are complete, to start
            // the idle clock then.
            let mut progress = (waiting && !idle.is_zero() && !self.holds_state()).then(|| {
                let (c, want) = (self.client.clone(), self.queued);
                Box::pin(async move { c.progress.wait_for(want).await })
            });
            let watch_progress = progress.is_some();
            tokio::select! {
                _ = async { if let Some(p) = progress.as_mut() { p.await } }, if watch_progress => {}
                ready = r.readable() => {
                    if ready.is_err() {
                        return self.client_left();
                    }
                    // Polled once, through AsyncRead (not try_read: tokio
                    // then knows a short read drained the socket and skips
                    // the EAGAIN read that would otherwise follow every
                    // request). `None`: nothing to read after all (a new
                    // socket is reported readable before any byte arrives);
                    // the loop waits for readiness again, holding no buffer.
                    let got = if buf.is_empty() {
                        // Most reads are whole requests: read on the stack
                        // and keep only the bytes that came (no 16 KiB
                        // allocation and free per request).
                        std::future::poll_fn(|cx| {
                            let mut stack = [const { MaybeUninit::<u8>::uninit() }; READ_CHUNK];
                            let mut rb = ReadBuf::uninit(&mut stack);
                            Poll::Ready(match std::pin::Pin::new(&mut r).poll_read(cx, &mut rb) {
                                Poll::Ready(Ok(())) => {
                                    buf.extend_from_slice(rb.filled());
                                    Some(Ok(rb.filled().len()))
                                }
                                Poll::Ready(Err(e)) => Some(Err(e)),
                                Poll::Pending => None,
                            })
                        })
                        .await
                    } else {
                        // The rest of a large request: read into its buffer.
                        if buf.capacity() - buf.len() < READ_CHUNK / 2 {
                            buf.reserve(READ_CHUNK);
                        }
                        let mut read = std::pin::pin!(r.read_buf(&mut buf));
                        std::future::poll_fn(|cx| Poll::Ready(match read.as_mut().poll(cx) {
                            Poll::Ready(x) => Some(x),
                            Poll::Pending => None,
                        }))
                        .await
                    };
                    if let Some(Ok(0) | Err(_)) = got {
                        return self.client_left();
                    }
                },
                _ = client.stop.cancelled() => return,
                _ = async { if let Some(s) = idle_sleep.as_mut() { s.await } }, if idle_applies => {
                    tracing::debug!(client = self.id, "idle timeout");
                    self.shared.metrics.client_rejected("idle_timeout");
                    return;
                }
            }
        }
    }

    /// The client closed its socket. Replies it is owed are still written
    /// (a half-closed client reads them), but a blocking command it waits
    /// on must stop waiting in Redis at once, as Redis frees a blocked
    /// client that disconnects: otherwise the orphaned connection would pop
    /// the next element pushed and that element would be lost. Dropping
    /// every sender of the dedicated connection closes it once the jobs
    /// already queued are written, and Redis unblocks a closed client.
    fn client_left(&mut self) {
        if self.client.progress.done() < self.blocked_until {
            tracing::debug!(
                client = self.id,
                "client left while blocked: closing its upstream connection"
            );
            self.dedicated = None;
            self.last_tx = None;
        }
    }

    /// As Redis: reply with the error, then close.
    async fn protocol_error(&mut self, e: crate::protocol::ProtocolError) {
        self.shared.metrics.protocol_error(e.kind());
        tracing::debug!(client = self.id, error = %e, "protocol error from client");
        self.now(e.to_reply(), None).await;
        self.close().await;
    }

    fn holds_state(&self) -> bool {
        self.in_multi || self.watching || self.streaming || self.sticky
    }

    fn identity(&self) -> Identity {
        Identity {
            proto: self.proto,
            db: self.db,
            auth: self.auth.clone(),
        }
    }

    /// Wait while the client has too many requests in flight (a client
    /// that pipelines without end is held back, not buffered without end).
    async fn room(&mut self) {
        let max = self.shared.limits.max_inflight.max(1) as u64;
        if self.queued >= self.client.progress.done() + max {
            self.client.flush();
            let want = self.queued + 1 - max;
            self.client.progress.wait_for(want).await;
        }
        self.queued += 1;
    }

    /// Queue a reply the sidecar made itself.
    async fn now(&mut self, reply: Bytes, metrics: Option<&CommandMetrics>) {
        self.room().await;
        self.client.reply(reply, metrics);
    }

    /// Close the client once everything queued is written.
    async fn close(&mut self) {
        self.room().await;
        self.client.close();
    }

    async fn reply(&mut self, v: Value, metrics: &Arc<CommandMetrics>) {
        let reply = v.encode(self.proto);
        self.now(reply, Some(metrics)).await;
    }

    /// The command's metric handles: resolved once per table entry, and
    /// `other` for names the table does not know (so clients cannot invent
    /// labels).
    fn command_metrics(&self, info: Option<&crate::command::CommandInfo>) -> Arc<CommandMetrics> {
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

    async fn handle(&mut self, req: Request) -> Flow {
        let generation = self.shared.pool.table_generation();
        if generation != self.table.0 {
            self.table = (generation, self.shared.pool.table());
        }
        let info = self.table.1.lookup(&req.args).cloned();
        let metrics = self.command_metrics(info.as_deref());
        let class = classify(&req.args, info.as_deref());
        if self.streaming && class != Class::Local(Local::Quit) {
            // The dedicated connection streams: forward as it is, in order.
            return self.send_stream(req.raw, JobKind::Stream, &metrics).await;
        }
        let Request { raw, args } = req;
        // Where the command goes; arms that answer or send it themselves
        // return early.
        let (target, blocking) = match class {
            Class::Local(local) => {
                if self.in_multi
                    || (self.sticky
                        && !matches!(local, Local::Quit | Local::ClientId | Local::Reset))
                {
                    // Queued inside MULTI, or on a connection whose state we
                    // no longer mirror: Redis must see it, and we stop
                    // tracking that connection's state.
                    if !matches!(local, Local::ClientId | Local::ClientGetName) {
                        self.sticky = true;
                    }
                    (Target::Dedicated, false)
                } else {
                    // Boxed: connection-state commands are rare, and their
                    // futures (handshakes) would enlarge every idle session.
                    return Box::pin(self.local(local, &args, &metrics)).await;
                }
            }
            Class::Pin(Pin::Multi) => {
                if !self.in_multi {
                    self.in_multi = true;
                    self.multi_dirty = false;
                    self.multi_count = 0;
                    self.multi_strip.clear();
                    // MULTI itself is not a queued command: no stages, not
                    // counted.
                    return self
                        .send_job(Target::Dedicated, raw, Plan::single(), false, &metrics)
                        .await;
                }
                (Target::Dedicated, false)
            }
            Class::Pin(Pin::Watch) => {
                if !self.in_multi {
                    self.watching = true;
                }
                (Target::Dedicated, false)
            }
            Class::Pin(Pin::EndTransaction) => {
                let name = args
                    .first()
                    .map(|a| a.to_ascii_lowercase())
                    .unwrap_or_default();
                if !(self.in_multi || self.watching) {
                    // EXEC/DISCARD without MULTI: Redis's own error, from
                    // any connection.
                    (Target::Shared, false)
                } else if name == b"unwatch" && self.in_multi {
                    (Target::Dedicated, false)
                } else {
                    let exec = name == b"exec";
                    let strip = if exec {
                        std::mem::take(&mut self.multi_strip)
                    } else {
                        Vec::new()
                    };
                    let abort = exec && self.multi_dirty;
                    self.in_multi = false;
                    self.watching = false;
                    self.multi_dirty = false;
                    if abort {
                        return Box::pin(self.abort_exec(&metrics)).await;
                    }
                    let plan = Plan {
                        strip_exec: strip,
                        ..Plan::single()
                    };
                    let flow = self
                        .send_job(Target::Dedicated, raw, plan, false, &metrics)
                        .await;
                    self.update_holds_state();
                    return flow;
                }
            }
            // Inside MULTI a blocking command is just queued.
            Class::Pin(Pin::Blocking) => (Target::Dedicated, !self.in_multi),
            Class::Pin(Pin::Stream) => {
                if self.in_multi {
                    (Target::Dedicated, false)
                } else {
                    if let Err(e) = self.ensure_dedicated().await {
                        return self.upstream_error(e, &metrics).await;
                    }
                    self.streaming = true;
                    self.update_holds_state();
                    return self.send_stream(raw, JobKind::StartStream, &metrics).await;
                }
            }
            Class::Pin(Pin::Sticky) => {
                self.sticky = true;
                (Target::Dedicated, false)
            }
            Class::Forward if self.in_multi || self.watching || self.sticky => {
                (Target::Dedicated, false)
            }
            Class::Forward => (Target::Shared, false),
        };
        self.forward(raw, args, target, blocking, &metrics, info.as_deref())
            .await
    }

    /// Policy stages, then send; counts the command in an open MULTI.
    async fn forward(
        &mut self,
        raw: Bytes,
        args: Vec<Bytes>,
        target: Target,
        blocking: bool,
        metrics: &Arc<CommandMetrics>,
        info: Option<&crate::command::CommandInfo>,
    ) -> Flow {
        let mut cmd = Outgoing::new(raw, args);
        if !self.shared.chain.is_empty() {
            let ctx = Ctx {
                client_id: self.id,
                proto: self.proto,
                db: self.db,
                in_multi: self.in_multi,
                info,
            };
            if let Verdict::Reply(r) = self.shared.chain.run(&ctx, &mut cmd) {
                if self.in_multi {
                    // Redis aborts a transaction with a refused command.
                    self.multi_dirty = true;
                }
                self.now(r, Some(metrics)).await;
                return Flow::Go;
            }
        }
        let extra = cmd.extra_count() as u32;
        if self.in_multi {
            for i in 0..extra {
                self.multi_strip.push(self.multi_count + 1 + i);
            }
            self.multi_count += 1 + extra;
        }
        let plan = Plan {
            replies: 1 + extra,
            forward: 0,
            strip_exec: Vec::new(),
        };
        self.send_job(target, cmd.payload(), plan, blocking, metrics)
            .await
    }

    /// EXEC after a refused command: discard upstream, answer EXECABORT.
    async fn abort_exec(&mut self, metrics: &Arc<CommandMetrics>) -> Flow {
        if let Some(d) = &self.dedicated {
            let job = Job {
                payload: crate::protocol::encode_command(&[&b"DISCARD"[..]]),
                kind: JobKind::Request {
                    plan: Plan::single(),
                    slot: None,
                    blocking: false,
                },
                client: self.client.clone(),
                enqueued: Instant::now(),
            };
            let _ = d.tx.send(job).await;
        }
        self.update_holds_state();
        self.reply(
            Value::error("EXECABORT Transaction discarded because of previous errors."),
            metrics,
        )
        .await;
        Flow::Go
    }

    fn update_holds_state(&self) {
        if let Some(d) = &self.dedicated {
            d.holds_state.store(self.holds_state(), Ordering::Release);
        }
    }

    async fn ensure_dedicated(&mut self) -> Result<(), UpstreamError> {
        if let Some(d) = &self.dedicated {
            if d.is_alive() {
                return Ok(());
            }
            if self.holds_state() {
                // MULTI/WATCH/subscriptions died with the connection.
                self.client.kill.cancel();
                return Err(UpstreamError::ConnectionLost);
            }
            self.dedicated = None;
        }
        let oob = Oob(self.client.clone());
        let pool = self.shared.pool.clone();
        let d = Box::pin(pool.dedicated(&self.identity(), self.name.as_ref(), oob)).await?;
        self.dedicated = Some(d);
        Ok(())
    }

    /// The job channel for a target, creating connections as needed.
    async fn channel(&mut self, target: Target) -> Result<mpsc::Sender<Job>, UpstreamError> {
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
                Ok(set.pick(self.id).clone())
            }
        }
    }

    /// Wait until every reply queued so far was written, when the client
    /// moves to another upstream connection, so its commands run in order.
    async fn barrier(&mut self, tx: &mpsc::Sender<Job>) {
        let same = self.last_tx.as_ref().is_some_and(|l| l.same_channel(tx));
        if !same {
            let want = self.queued;
            self.client.flush();
            self.client.progress.wait_for(want).await;
            self.last_tx = Some(tx.clone());
        }
    }

    async fn send_job(
        &mut self,
        target: Target,
        payload: Bytes,
        plan: Plan,
        blocking: bool,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        let tx = match self.channel(target).await {
            Ok(tx) => tx,
            Err(e) => return self.upstream_error(e, metrics).await,
        };
        self.barrier(&tx).await;
        self.room().await;
        if blocking {
            self.blocked_until = self.queued;
        }
        let now = Instant::now();
        let seq = self.client.expect(now, metrics.clone());
        let job = Job {
            payload,
            kind: JobKind::Request {
                plan,
                slot: Some(seq),
                blocking,
            },
            client: self.client.clone(),
            enqueued: now,
        };
        if let Err(mpsc::error::SendError(job)) = tx.send(job).await {
            // The connection is gone and the job was never sent.
            job.fail(UpstreamError::Unavailable(
                "upstream connection closed".into(),
            ));
        }
        Flow::Go
    }

    /// Send on a streaming dedicated connection; replies arrive as pushes.
    async fn send_stream(
        &mut self,
        payload: Bytes,
        kind: JobKind,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        let tx = match self.channel(Target::Dedicated).await {
            Ok(tx) => tx,
            Err(e) => return self.upstream_error(e, metrics).await,
        };
        self.barrier(&tx).await;
        metrics.ok.inc();
        let job = Job {
            payload,
            kind,
            client: self.client.clone(),
            enqueued: Instant::now(),
        };
        if tx.send(job).await.is_err() {
            self.client.kill.cancel();
            return Flow::Stop;
        }
        Flow::Go
    }

    async fn upstream_error(&mut self, e: UpstreamError, metrics: &Arc<CommandMetrics>) -> Flow {
        self.now(e.to_reply(), Some(metrics)).await;
        if self.client.kill.is_cancelled() {
            Flow::Stop
        } else {
            Flow::Go
        }
    }

    /// Drop an idle dedicated connection after the identity changed.
    fn identity_changed(&mut self) {
        self.shared_set = None;
        if !self.holds_state() {
            self.dedicated = None;
        }
    }

    async fn local(&mut self, local: Local, args: &[Bytes], metrics: &Arc<CommandMetrics>) -> Flow {
        let arity_err = |name: &str| {
            Value::error(format!(
                "ERR wrong number of arguments for '{name}' command"
            ))
        };
        match local {
            Local::Quit => {
                self.reply(Value::Simple("OK"), metrics).await;
                self.close().await;
                Flow::Stop
            }
            Local::Reset => {
                // Closing the dedicated connection resets MULTI, WATCH and
                // subscriptions upstream; the rest is ours.
                self.dedicated = None;
                self.shared_set = None;
                self.proto = Proto::Resp2;
                self.db = DEFAULT_DB;
                self.auth = None;
                self.name = None;
                self.in_multi = false;
                self.watching = false;
                self.sticky = false;
                self.multi_strip.clear();
                self.reply(Value::Simple("RESET"), metrics).await;
                Flow::Go
            }
            Local::ClientId => {
                self.reply(Value::Int(self.id as i64), metrics).await;
                Flow::Go
            }
            Local::ClientGetName => {
                let v = self.name.clone().map(Value::Bulk).unwrap_or(Value::Null);
                self.reply(v, metrics).await;
                Flow::Go
            }
            Local::ClientSetName => {
                let v = match args.get(2) {
                    Some(n) if args.len() == 3 => {
                        if n.iter().any(|&c| c <= b' ' || c > b'~') {
                            Value::error(
                                "ERR Client names cannot contain spaces, newlines or special characters.",
                            )
                        } else {
                            self.name = (!n.is_empty()).then(|| n.clone());
                            Value::Simple("OK")
                        }
                    }
                    _ => Value::error("ERR syntax error"),
                };
                self.reply(v, metrics).await;
                Flow::Go
            }
            Local::ClientSetInfo => {
                // Library name/version describe this client, not the shared
                // upstream connections; accepted and kept local.
                let v = if args.len() == 4 {
                    Value::Simple("OK")
                } else {
                    Value::error("ERR syntax error")
                };
                self.reply(v, metrics).await;
                Flow::Go
            }
            Local::Select => {
                let Some(db) = args.get(1).filter(|_| args.len() == 2) else {
                    self.reply(arity_err("select"), metrics).await;
                    return Flow::Go;
                };
                let Some(db) = crate::protocol::scan::parse_int(db) else {
                    self.reply(
                        Value::error("ERR value is not an integer or out of range"),
                        metrics,
                    )
                    .await;
                    return Flow::Go;
                };
                let ident = Identity {
                    db,
                    ..self.identity()
                };
                match self.shared.pool.verify(&ident).await {
                    Ok(_) => {
                        self.db = db;
                        self.identity_changed();
                        self.reply(Value::Simple("OK"), metrics).await;
                    }
                    Err(e) => {
                        self.upstream_error(e, metrics).await;
                    }
                }
                Flow::Go
            }
            Local::Auth => {
                let auth = match args.len() {
                    2 => Auth {
                        user: None,
                        password: args[1].clone(),
                    },
                    3 => Auth {
                        user: Some(args[1].clone()),
                        password: args[2].clone(),
                    },
                    _ => {
                        self.reply(arity_err("auth"), metrics).await;
                        return Flow::Go;
                    }
                };
                let ident = Identity {
                    auth: Some(auth.clone()),
                    ..self.identity()
                };
                match self.shared.pool.verify(&ident).await {
                    Ok(_) => {
                        self.auth = Some(auth);
                        self.identity_changed();
                        self.reply(Value::Simple("OK"), metrics).await;
                    }
                    Err(e) => {
                        self.upstream_error(e, metrics).await;
                    }
                }
                Flow::Go
            }
            Local::Hello => self.hello(args, metrics).await,
        }
    }

    /// HELLO [protover [AUTH user pass] [SETNAME name]]
    async fn hello(&mut self, args: &[Bytes], metrics: &Arc<CommandMetrics>) -> Flow {
        let mut proto = self.proto;
        let mut auth = None;
        let mut name = None;
        if let Some(v) = args.get(1) {
            proto = match crate::protocol::scan::parse_int(v) {
                Some(2) => Proto::Resp2,
                Some(3) => Proto::Resp3,
                Some(_) => {
                    self.reply(
                        Value::error("NOPROTO unsupported protocol version"),
                        metrics,
                    )
                    .await;
                    return Flow::Go;
                }
                None => {
                    self.reply(
                        Value::error("ERR Protocol version is not an integer or out of range"),
                        metrics,
                    )
                    .await;
                    return Flow::Go;
                }
            };
            let mut i = 2;
            while i < args.len() {
                let opt = args[i].to_ascii_lowercase();
                if opt == b"auth" && i + 2 < args.len() {
                    auth = Some(Auth {
                        user: Some(args[i + 1].clone()),
                        password: args[i + 2].clone(),
                    });
                    i += 3;
                } else if opt == b"setname" && i + 1 < args.len() {
                    name = Some(args[i + 1].clone());
                    i += 2;
                } else {
                    let msg = format!(
                        "ERR Syntax error in HELLO option '{}'",
                        String::from_utf8_lossy(&args[i])
                    );
                    self.reply(Value::error(msg), metrics).await;
                    return Flow::Go;
                }
            }
        }
        let ident = Identity {
            proto,
            db: self.db,
            auth: auth.clone().or_else(|| self.auth.clone()),
        };
        if let Err(e) = self.shared.pool.verify(&ident).await {
            return self.upstream_error(e, metrics).await;
        }
        let changed = ident != self.identity();
        self.proto = proto;
        if auth.is_some() {
            self.auth = auth;
        }
        if let Some(n) = name {
            self.name = (!n.is_empty()).then_some(n);
        }
        if changed {
            self.identity_changed();
        }
        let version = self.shared.pool.server_version();
        let v = Value::Map(vec![
            (Value::bulk("server"), Value::bulk("redis")),
            (Value::bulk("version"), Value::bulk(version)),
            (Value::bulk("proto"), Value::Int(proto.number())),
            (Value::bulk("id"), Value::Int(self.id as i64)),
            (Value::bulk("mode"), Value::bulk("standalone")),
            (Value::bulk("role"), Value::bulk("master")),
            (Value::bulk("modules"), Value::Array(Vec::new())),
        ]);
        self.reply(v, metrics).await;
        Flow::Go
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every idle client holds one of these futures: keep it small.
    #[tokio::test]
    async fn session_future_is_small() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let settings = crate::upstream::conn::ConnSettings {
            connect_timeout: std::time::Duration::from_secs(1),
            command_timeout: std::time::Duration::from_secs(1),
            queue_timeout: std::time::Duration::from_secs(1),
            max_reply_bulk: 1 << 20,
        };
        let spec = crate::config::EndpointSpec {
            name: "t".into(),
            target: crate::upstream::url::Target::parse("redis://127.0.0.1:1").unwrap(),
            tls: None,
            sentinel_auth: None,
        };
        let metrics = crate::metrics::Metrics::new();
        let ups = crate::upstream::failover::Upstreams::start(
            vec![spec],
            Default::default(),
            settings.clone(),
            metrics.clone(),
            tokio_util::sync::CancellationToken::new(),
        )
        .unwrap();
        let pool = crate::upstream::pool::Pool::new(ups, settings, 1, 1, metrics.clone());
        let limits = super::super::SessionLimits {
            frame: crate::protocol::Limits::default(),
            max_inflight: 16,
            max_output: 1 << 20,
            idle_timeout: std::time::Duration::ZERO,
        };
        let shared = super::super::Shared::new(pool, Default::default(), metrics, limits);
        let fut = run(stream, shared, 1, ClientShared::new(1 << 20));
        let size = std::mem::size_of_val(&fut);
        println!("session future: {size} bytes");
        // 3024 bytes when written, 2712 with the writer in the session,
        // 1960 now; 10,000 idle clients x this is most of the idle RSS
        // (README, Performance).
        assert!(size <= 2048, "session future is {size} bytes");
    }
}
