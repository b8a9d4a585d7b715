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

use std::collections::HashSet;
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
use super::clients::{self, ClientEntry};
use crate::metrics::CommandMetrics;
use crate::policy::{Chain, Ctx, Mode as PolicyMode, Verdict};
use crate::request::command::{Class, CommandInfo, Local, Pin, classify};
use crate::request::exchange::{Exchange, TxItem};
use crate::upstream::pool::{ClusterSet, Dedicated, SharedSet};
use crate::upstream::{Auth, DEFAULT_DB, Hop, Identity, Job, JobKind, Mark, Oob, UpstreamError};
use crate::wire::scan::parse_int;
use crate::wire::{Proto, Request, RequestScanner, Value, encode_command};

/// Read size from a client socket.
const READ_CHUNK: usize = 16 * 1024;

/// Longest wait, when closing a streaming client, for the replies Redis
/// still owes it to arrive.
const MARK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

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

/// What the client holds. Transitions happen only in [`Mode::after`].
#[derive(Default)]
enum Mode {
    /// Nothing: commands go to shared connections.
    #[default]
    Normal,
    /// Per-connection state the sidecar does not mirror (CLIENT TRACKING,
    /// NO-EVICT, NO-TOUCH): on the dedicated connection for good.
    Pinned,
    /// WATCH is active on the dedicated connection.
    Watching { pinned: bool },
    /// Inside MULTI on the dedicated connection.
    Transaction(Box<Tx>),
    /// Subscribed, MONITOR or CLIENT REPLY: the dedicated connection
    /// streams to the client until RESET or QUIT.
    Streaming(Box<Subs>),
}

/// An open transaction.
#[derive(Default)]
struct Tx {
    /// Back to [`Mode::Pinned`] after EXEC/DISCARD.
    pinned: bool,
    /// The commands queued, as the client sees them.
    items: Vec<TxItem>,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    refused: bool,
    /// Some item needs the EXEC array rebuilt.
    rebuild: bool,
    /// Connection-state commands queued, by item index: applied to the
    /// session when their EXEC element says they ran.
    changes: Vec<(usize, Change)>,
}

/// Subscriptions of a streaming client (for `CLIENT LIST`), and what the
/// sidecar needs to answer it in order.
#[derive(Default)]
struct Subs {
    channels: HashSet<Bytes>,
    patterns: HashSet<Bytes>,
    shard: HashSet<Bytes>,
    monitor: bool,
    /// SYNC/PSYNC: the client is a replica.
    replica: bool,
    /// What `CLIENT REPLY` set: the sidecar's own replies follow it too.
    replies: Replies,
    /// The argument of the PINGs that hold the sidecar's own replies in
    /// order ([`crate::upstream::Mark`]); made on first use.
    token: Option<Bytes>,
}

/// `CLIENT REPLY ON|OFF|SKIP` as Redis applies it.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Replies {
    #[default]
    On,
    Off,
    /// The next command's reply is not sent.
    SkipNext,
}

impl Subs {
    /// Whether a stage's appended commands can go after the command on
    /// this connection (each behind `CLIENT REPLY SKIP`, so no reply of
    /// theirs reaches the stream): not while subscribed in RESP2, where
    /// Redis refuses writes anyway, nor for MONITOR or a replica.
    fn can_append(&self, proto: Proto) -> bool {
        !self.monitor && !self.replica && self.runs_commands(proto)
    }

    /// See [`Session::runs_commands`].
    fn runs_commands(&self, proto: Proto) -> bool {
        let subscribed =
            !(self.channels.is_empty() && self.patterns.is_empty() && self.shard.is_empty());
        !self.replica && (proto == Proto::Resp3 || !subscribed)
    }

    fn token(&mut self, client: u64) -> Bytes {
        self.token
            .get_or_insert_with(|| {
                use std::hash::BuildHasher;
                // RandomState is keyed from the OS's randomness: another
                // client cannot guess this session's token.
                let s = std::collections::hash_map::RandomState::new();
                Bytes::from(format!(
                    "redis-sidecar-mark-{:016x}{:016x}",
                    s.hash_one(client),
                    s.hash_one(Instant::now())
                ))
            })
            .clone()
    }

    /// Follow `CLIENT REPLY` in a command forwarded on the stream.
    fn note_replies(&mut self, args: &[Bytes]) {
        let mode = match args {
            [c, r, m] if c.eq_ignore_ascii_case(b"client") && r.eq_ignore_ascii_case(b"reply") => {
                if m.eq_ignore_ascii_case(b"on") {
                    Some(Replies::On)
                } else if m.eq_ignore_ascii_case(b"off") {
                    Some(Replies::Off)
                } else if m.eq_ignore_ascii_case(b"skip") {
                    // Redis ignores SKIP while replies are off.
                    Some(if self.replies == Replies::Off {
                        Replies::Off
                    } else {
                        Replies::SkipNext
                    })
                } else {
                    None
                }
            }
            _ => None,
        };
        self.replies = match mode {
            Some(m) => m,
            // This command used up a SKIP.
            None if self.replies == Replies::SkipNext => Replies::On,
            None => self.replies,
        };
    }
}

/// A connection-state change queued in a transaction.
enum Change {
    Select(i64),
    Auth(Auth),
    Hello(Hello),
    SetName(Option<Bytes>),
}

/// A parsed `HELLO [protover [AUTH user pass] [SETNAME name]]`.
struct Hello {
    proto: Option<Proto>,
    auth: Option<Auth>,
    name: Option<Bytes>,
}

/// What moves the client between modes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Event {
    Multi,
    Watch,
    /// EXEC or DISCARD.
    EndTransaction,
    Unwatch,
    Stream,
    Pin,
    Reset,
}

impl Mode {
    /// The one place mode transitions happen (as Redis: WATCH inside
    /// MULTI and nested MULTI are errors that change nothing; EXEC and
    /// DISCARD without MULTI keep WATCH; only RESET and QUIT end
    /// streaming).
    fn after(self, ev: Event) -> Mode {
        let base = |pinned: bool| if pinned { Mode::Pinned } else { Mode::Normal };
        match (self, ev) {
            (_, Event::Reset) => Mode::Normal,
            (m @ Mode::Streaming(_), _) => m,
            (Mode::Transaction(tx), Event::EndTransaction) => base(tx.pinned),
            (Mode::Transaction(mut tx), Event::Pin) => {
                tx.pinned = true;
                Mode::Transaction(tx)
            }
            (m @ Mode::Transaction(_), _) => m,
            (m, Event::Multi) => Mode::Transaction(Box::new(Tx {
                pinned: m.pinned(),
                ..Tx::default()
            })),
            (m, Event::Watch) => Mode::Watching { pinned: m.pinned() },
            (Mode::Watching { pinned }, Event::Unwatch) => base(pinned),
            (_, Event::Stream) => Mode::Streaming(Box::default()),
            (Mode::Watching { .. }, Event::Pin) => Mode::Watching { pinned: true },
            (_, Event::Pin) => Mode::Pinned,
            (m, Event::EndTransaction | Event::Unwatch) => m,
        }
    }

    fn pinned(&self) -> bool {
        match self {
            Mode::Normal => false,
            Mode::Pinned | Mode::Streaming(_) => true,
            Mode::Watching { pinned } => *pinned,
            Mode::Transaction(tx) => tx.pinned,
        }
    }

    fn kind(&self) -> PolicyMode {
        match self {
            Mode::Normal => PolicyMode::Normal,
            Mode::Pinned => PolicyMode::Pinned,
            Mode::Watching { .. } => PolicyMode::Watching,
            Mode::Transaction(_) => PolicyMode::Transaction,
            Mode::Streaming(_) => PolicyMode::Streaming,
        }
    }
}

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
    proto: Proto,
    db: i64,
    auth: Option<Auth>,
    name: Option<Bytes>,
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
    /// With `[client_auth]`: the user the client authenticated to the
    /// sidecar as, by its index in the `ClientAuth` (`None`: not yet; every
    /// command but AUTH, HELLO, QUIT and RESET gets NOAUTH).
    client_user: Option<u32>,
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
        proto: Proto::Resp2,
        db: DEFAULT_DB,
        auth: None,
        name: None,
        mode: Mode::Normal,
        shared_set: None,
        dedicated: None,
        last_tx: None,
        cluster: None,
        table: (shared.pool.table_generation(), shared.pool.table()),
        chain: (shared.policies.generation(), shared.policies.current()),
        kill_self: false,
        read_at: Instant::now(),
        client_user: None,
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
    async fn read_loop(&mut self, mut r: OwnedReadHalf) {
        let client = self.entry.client.clone();
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
            self.entry.client.flush();
            if buf.is_empty() && buf.capacity() > 0 {
                buf = BytesMut::new();
            }
            // A client waiting for a reply (a blocking pop, say) is not
            // idle, nor is one holding state: Redis does not close those.
            let waiting = self.entry.client.progress.done() < self.queued;
            // Boxed, and only when it applies: a timer inline would enlarge
            // every session.
            let mut idle_sleep = (!idle.is_zero() && !self.holds_state() && !waiting)
                .then(|| Box::pin(tokio::time::sleep(idle)));
            let idle_applies = idle_sleep.is_some();
            // While replies are owed, wake when they are complete, to start
            // the idle clock then.
            let mut progress = (waiting && !idle.is_zero() && !self.holds_state()).then(|| {
                let (c, want) = (self.entry.client.clone(), self.queued);
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
                _ = client.stop.cancelled() => {
                    // Shutdown: a blocking command has no reply to wait
                    // for (it may wait forever); as Redis closes such a
                    // client at once, the sidecar drops it after what was
                    // owed before it.
                    if self.entry.is_blocked() {
                        self.client_left();
                    }
                    return;
                }
                _ = async { if let Some(s) = idle_sleep.as_mut() { s.await } }, if idle_applies => {
                    tracing::debug!(client = self.entry.id, "idle timeout");
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
        if self.entry.is_blocked() {
            tracing::debug!(
                client = self.entry.id,
                "client left while blocked: closing its upstream connection"
            );
            // As Redis: the blocked command gets no reply (not the
            // "connection lost" its closed upstream connection would give:
            // error trackers alert on it at every worker deploy).
            let blocked = self.entry.blocked_seq.load(Ordering::Acquire);
            self.entry.client.drop_from(blocked);
            self.drop_dedicated(true);
        }
    }

    /// As Redis: reply with the error, then close.
    async fn protocol_error(&mut self, e: crate::wire::ProtocolError) {
        self.shared.metrics.protocol_error(e.kind());
        tracing::debug!(client = self.entry.id, error = %e, "protocol error from client");
        if let Some(reply) = e.client_reply() {
            self.now(reply, None).await;
        }
        self.close().await;
    }

    fn holds_state(&self) -> bool {
        !matches!(self.mode, Mode::Normal)
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
        if self.queued >= self.entry.client.progress.done() + max {
            self.entry.client.flush();
            let want = self.queued + 1 - max;
            self.entry.client.progress.wait_for(want).await;
        }
        self.queued += 1;
    }

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
    fn shared_or_lane(&mut self) -> Option<Target> {
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
    async fn after_first_reply(&mut self) -> Target {
        self.entry.client.flush();
        self.entry.client.progress.wait_for(1).await;
        if self.entry.client.heavy() {
            return self.move_to_lane("large_replies");
        }
        Target::Shared
    }

    fn move_to_lane(&mut self, reason: &'static str) -> Target {
        self.lane = true;
        self.shared.metrics.client_lane(reason);
        tracing::debug!(
            client = self.entry.id,
            reason,
            "client moved to an upstream connection of its own"
        );
        Target::Dedicated
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
        self.room().await;
        self.entry.client.reply(reply, metrics);
    }

    /// A reply the sidecar made itself for a client whose dedicated
    /// connection streams: it goes to the client in the place of a marked
    /// PING sent upstream, so after the replies to everything forwarded
    /// before it (queued at once, it would overtake them); and, as Redis,
    /// not at all while the client has replies off or skips this one (a
    /// skip is used up upstream by a PING, whose reply Redis skips).
    /// `wait`: return once it is queued. `Err`: not streaming (or a
    /// replica's unparsed stream), queue it as usual.
    async fn stream_reply(&mut self, reply: Bytes, wait: bool) -> Result<(), Bytes> {
        let id = self.entry.id;
        let (Mode::Streaming(subs), Some(d)) = (&mut self.mode, &self.dedicated) else {
            return Err(reply);
        };
        if subs.replica {
            return Err(reply);
        }
        let (payload, kind, done) = match subs.replies {
            Replies::Off => return Ok(()),
            Replies::SkipNext => {
                subs.replies = Replies::On;
                (encode_command(&["PING"]), JobKind::Stream, None)
            }
            Replies::On => {
                let (tx, rx) = tokio::sync::oneshot::channel();
                let mark = Mark {
                    token: subs.token(id),
                    reply,
                    done: wait.then_some(tx),
                };
                (
                    mark.payload(),
                    JobKind::Mark(Box::new(mark)),
                    wait.then_some(rx),
                )
            }
        };
        let job = self.stream_job(payload, kind);
        // A connection that is gone closes the client: nothing to answer.
        if d.tx.send(job).await.is_ok()
            && let Some(rx) = done
        {
            // Bounded: a close must not wait on an upstream that stopped
            // answering (the connection's own timeout ends it too).
            let _ = tokio::time::timeout(MARK_WAIT, rx).await;
        }
        Ok(())
    }

    /// Close the client once everything queued is written (on a stream:
    /// once what the upstream owes for earlier commands has arrived).
    async fn close(&mut self) {
        if matches!(self.mode, Mode::Streaming(_)) {
            let _ = Box::pin(self.stream_reply(Bytes::new(), true)).await;
        }
        self.room().await;
        self.entry.client.close();
    }

    async fn reply(&mut self, v: Value, metrics: &Arc<CommandMetrics>) {
        let reply = v.encode(self.proto);
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
                self.auth
                    .as_ref()
                    .map(|a| a.user.as_deref().unwrap_or(b"default"))
            }),
            name: self.name.as_deref(),
            db: self.db,
            proto: self.proto,
            mode: self.mode.kind(),
            info,
            since: self.read_at,
            now: self.read_at,
            upstream_auth: self.auth.is_some() && self.sidecar_user().is_none(),
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
            return Flow::Go;
        }
        if self.shared.client_auth.is_some()
            && self.client_user.is_none()
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
            self.now(err, Some(&metrics)).await;
            return Flow::Go;
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
                    tx.items.push(TxItem::Answered(reply));
                    tx.rebuild = true;
                    self.now(Bytes::from_static(b"+QUEUED\r\n"), Some(metrics))
                        .await;
                    self.publish();
                    return Some(Flow::Go);
                }
            }
            self.now(reply, Some(metrics)).await;
            return Some(Flow::Go);
        }
    }

    /// Normal, pinned or watching: anything but a plain forward.
    async fn route(&mut self, ex: Exchange, class: Class, metrics: &Arc<CommandMetrics>) -> Flow {
        match class {
            Class::Local(local) => self.local(local, ex, metrics).await,
            Class::Pin(Pin::Multi) => {
                self.transition(Event::Multi);
                self.send_job(Target::Dedicated, ex, false, metrics).await
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
                if let Err(e) = self.map_redirect(&mut ex) {
                    self.now(e, Some(metrics)).await;
                    return Flow::Go;
                }
                self.transition(Event::Pin);
                self.send_job(Target::Dedicated, ex, false, metrics).await
            }
            Class::Forward => self.send_job(Target::Dedicated, ex, false, metrics).await,
        }
    }

    /// Inside MULTI: commands are queued on the dedicated connection;
    /// those the sidecar answers are answered into the EXEC array.
    async fn route_tx(
        &mut self,
        mut ex: Exchange,
        class: Class,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        let change = match class {
            Class::Local(l @ (Local::Quit | Local::Reset)) => {
                // Run at once, as on Redis (RESET discards the transaction).
                return self.local(l, ex, metrics).await;
            }
            Class::Local(
                l @ (Local::ClientId
                | Local::ClientGetName
                | Local::ClientList
                | Local::ClientInfo
                | Local::ClientSetInfo
                | Local::ClientKill
                | Local::ClientUnblock),
            ) => {
                // Answered by the sidecar at queue time; the answer takes
                // its place in the EXEC array.
                let args = ex.args().to_vec();
                match self.client_command(l, &args).await {
                    // Queued upstream with the id mapped (CLIENT UNBLOCK).
                    Answer::Upstream(args) => {
                        ex.rewrite(args);
                        None
                    }
                    Answer::Now(v) => {
                        if let Mode::Transaction(tx) = &mut self.mode {
                            tx.items.push(TxItem::Answered(v.encode(self.proto)));
                            tx.rebuild = true;
                        }
                        self.now(Bytes::from_static(b"+QUEUED\r\n"), Some(metrics))
                            .await;
                        if std::mem::take(&mut self.kill_self) {
                            self.close().await;
                            return Flow::Stop;
                        }
                        return Flow::Go;
                    }
                }
            }
            Class::Local(Local::Select) => ex
                .args()
                .get(1)
                .and_then(|a| parse_int(a))
                .filter(|_| ex.args().len() == 2)
                .map(Change::Select),
            Class::Local(Local::Auth) if self.shared.client_auth.is_some() => {
                let args = ex.args().to_vec();
                let answer = self.sidecar_auth(&args);
                if let Mode::Transaction(tx) = &mut self.mode {
                    tx.items.push(TxItem::Answered(answer));
                    tx.rebuild = true;
                }
                self.now(Bytes::from_static(b"+QUEUED\r\n"), Some(metrics))
                    .await;
                return Flow::Go;
            }
            Class::Local(Local::Auth) => parse_auth(ex.args()).ok().map(Change::Auth),
            Class::Local(Local::Hello) => match parse_hello(ex.args()) {
                Ok(mut h) => {
                    // With [client_auth] the credentials are checked here
                    // and never queued upstream.
                    if let Some(ca) = self.shared.client_auth.clone()
                        && let Some(a) = h.auth.take()
                    {
                        let Some(u) = ca.check(a.user.as_deref(), &a.password) else {
                            if let Mode::Transaction(tx) = &mut self.mode {
                                tx.items
                                    .push(TxItem::Answered(Bytes::from_static(WRONGPASS)));
                                tx.rebuild = true;
                            }
                            self.now(Bytes::from_static(b"+QUEUED\r\n"), Some(metrics))
                                .await;
                            return Flow::Go;
                        };
                        self.client_user = Some(u);
                        let args = hello_without_auth(ex.args());
                        ex.rewrite(args);
                    }
                    Some(Change::Hello(h))
                }
                Err(_) => None,
            },
            Class::Local(Local::ClientSetName) => match ex.args() {
                [_, _, n] => Some(Change::SetName((!n.is_empty()).then(|| n.clone()))),
                _ => None,
            },
            Class::Pin(Pin::Multi | Pin::Watch) => {
                // Redis's error; nothing is queued.
                return self.send_job(Target::Dedicated, ex, false, metrics).await;
            }
            Class::Pin(Pin::EndTransaction) => {
                let name = ex
                    .args()
                    .first()
                    .map(|a| a.to_ascii_lowercase())
                    .unwrap_or_default();
                if name == b"exec" {
                    return self.exec(ex, metrics).await;
                }
                if name == b"discard" {
                    self.transition(Event::EndTransaction);
                    return self.send_job(Target::Dedicated, ex, false, metrics).await;
                }
                None
            }
            Class::Pin(Pin::Sticky) => {
                if let Err(e) = self.map_redirect(&mut ex) {
                    self.now(e, Some(metrics)).await;
                    return Flow::Go;
                }
                self.transition(Event::Pin);
                None
            }
            Class::Pin(Pin::Stream | Pin::Blocking | Pin::Replica) | Class::Forward => None,
        };
        let item = ex.tx_item();
        if let Mode::Transaction(tx) = &mut self.mode {
            if let TxItem::Queued {
                appended, action, ..
            } = &item
                && (*appended > 0 || action.is_some())
            {
                tx.rebuild = true;
            }
            if let Some(c) = change {
                tx.changes.push((tx.items.len(), c));
            }
            tx.items.push(item);
        }
        self.send_job(Target::Dedicated, ex, false, metrics).await
    }

    /// EXEC: EXECABORT after a refusal; otherwise sent with the
    /// transaction's items (when the array needs rebuilding), and the
    /// connection-state commands that ran are applied to the session.
    async fn exec(&mut self, mut ex: Exchange, metrics: &Arc<CommandMetrics>) -> Flow {
        let mode = std::mem::take(&mut self.mode);
        let Mode::Transaction(tx) = mode else {
            self.mode = mode;
            return self.send_job(Target::Dedicated, ex, false, metrics).await;
        };
        let Tx {
            pinned,
            items,
            refused,
            rebuild,
            changes,
        } = *tx;
        self.mode = if pinned { Mode::Pinned } else { Mode::Normal };
        self.update_holds_state();
        if refused {
            return self.abort_exec(metrics).await;
        }
        if rebuild {
            ex.set_exec(items);
        }
        let tee = (!changes.is_empty()).then(|| ex.tee());
        let flow = self.send_job(Target::Dedicated, ex, false, metrics).await;
        if let Some(rx) = tee
            && let Ok(Ok(reply)) = rx.await
            && let Some(ranges) = crate::wire::scan::split_array(&reply)
        {
            for (i, change) in changes {
                let ran = ranges
                    .get(i)
                    .is_some_and(|&(s, _)| !crate::wire::is_error(&reply[s..]));
                if ran {
                    self.apply(change);
                }
            }
        }
        flow
    }

    /// A connection-state change that ran on the dedicated connection.
    fn apply(&mut self, change: Change) {
        match change {
            Change::Select(db) => self.db = db,
            Change::Auth(a) => self.auth = Some(a),
            Change::Hello(h) => {
                if let Some(p) = h.proto {
                    self.proto = p;
                }
                if h.auth.is_some() {
                    self.auth = h.auth;
                }
                if let Some(n) = h.name {
                    self.name = (!n.is_empty()).then_some(n);
                }
            }
            Change::SetName(n) => self.name = n,
        }
        self.identity_changed();
    }

    /// Subscribed (or MONITOR, CLIENT REPLY): forwarded as it is, replies
    /// and messages stream to the client. Stages may answer, refuse or
    /// delay; commands they append are not sent (no reply could be told
    /// from a message).
    async fn route_streaming(
        &mut self,
        mut ex: Exchange,
        class: Class,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        match class {
            Class::Local(l @ (Local::Quit | Local::Reset)) => {
                return self.local(l, ex, metrics).await;
            }
            // In RESP2 Redis refuses these while subscribed (its own error
            // comes back); in RESP3, or after CLIENT REPLY, they are
            // answered, and describe the sidecar's client, never the
            // upstream connection.
            Class::Local(l) if l.about_clients() && self.runs_commands() => {
                return self.local(l, ex, metrics).await;
            }
            // Mirrored for CLIENT LIST: in RESP3 Redis runs them (in RESP2
            // it refuses them while subscribed).
            Class::Local(Local::Select) if self.runs_commands() => {
                if let Some(db) = ex.args().get(1).and_then(|a| parse_int(a)) {
                    self.db = db;
                }
            }
            Class::Local(Local::ClientSetName) if self.runs_commands() => {
                if let [_, _, n] = ex.args() {
                    self.name = (!n.is_empty()).then(|| n.clone());
                }
            }
            Class::Local(Local::Auth) if self.shared.client_auth.is_some() => {
                let reply = self.sidecar_auth(ex.args());
                self.now(reply, Some(metrics)).await;
                return Flow::Go;
            }
            Class::Local(Local::Auth) if self.runs_commands() => {
                if let Ok(a) = parse_auth(ex.args()) {
                    self.auth = Some(a);
                }
            }
            Class::Local(Local::Hello) => {
                let Ok(mut h) = parse_hello(ex.args()) else {
                    return self.forward_streaming(ex, metrics).await;
                };
                // With [client_auth] the credentials are the sidecar's:
                // checked here, never sent upstream (in either protocol).
                if let Some(ca) = self.shared.client_auth.clone()
                    && let Some(a) = h.auth.take()
                {
                    let Some(u) = ca.check(a.user.as_deref(), &a.password) else {
                        self.now(Bytes::from_static(WRONGPASS), Some(metrics)).await;
                        return Flow::Go;
                    };
                    self.client_user = Some(u);
                    ex.rewrite(hello_without_auth(ex.args()));
                }
                if self.runs_commands() {
                    self.proto = h.proto.unwrap_or(self.proto);
                    if h.auth.is_some() {
                        self.auth = h.auth;
                    }
                }
            }
            Class::Pin(Pin::Sticky) => {
                if let Err(e) = self.map_redirect(&mut ex) {
                    self.now(e, Some(metrics)).await;
                    return Flow::Go;
                }
            }
            _ => {}
        }
        self.forward_streaming(ex, metrics).await
    }

    /// Whether Redis runs any command on this client's stream: in RESP3,
    /// or when not subscribed (CLIENT REPLY, MONITOR); in RESP2 while
    /// subscribed it refuses all but the subscription commands.
    fn runs_commands(&self) -> bool {
        match &self.mode {
            Mode::Streaming(subs) => subs.runs_commands(self.proto),
            _ => true,
        }
    }

    /// Forward a command on the stream, with what stages appended (each
    /// behind `CLIENT REPLY SKIP`, so their replies never reach the
    /// client; where they cannot run, not sent).
    async fn forward_streaming(&mut self, ex: Exchange, metrics: &Arc<CommandMetrics>) -> Flow {
        self.note_subscriptions(ex.args());
        let proto = self.proto;
        let payload = match &mut self.mode {
            Mode::Streaming(subs) => {
                subs.note_replies(ex.args());
                if subs.can_append(proto) {
                    ex.into_streamed()
                } else {
                    ex.into_command()
                }
            }
            _ => ex.into_command(),
        };
        self.send_stream(payload, JobKind::Stream, metrics).await
    }

    /// Keep the subscription counts `CLIENT LIST` shows.
    fn note_subscriptions(&mut self, args: &[Bytes]) {
        let Mode::Streaming(subs) = &mut self.mode else {
            return;
        };
        let Some(name) = args.first().map(|a| a.to_ascii_lowercase()) else {
            return;
        };
        let (set, add) = match &name[..] {
            b"subscribe" => (&mut subs.channels, true),
            b"unsubscribe" => (&mut subs.channels, false),
            b"psubscribe" => (&mut subs.patterns, true),
            b"punsubscribe" => (&mut subs.patterns, false),
            b"ssubscribe" => (&mut subs.shard, true),
            b"sunsubscribe" => (&mut subs.shard, false),
            b"monitor" => {
                subs.monitor = true;
                return;
            }
            b"sync" | b"psync" => {
                subs.replica = true;
                return;
            }
            _ => return,
        };
        if add {
            set.extend(args[1..].iter().cloned());
        } else if args.len() == 1 {
            set.clear();
        } else {
            for a in &args[1..] {
                set.remove(a);
            }
        }
    }

    fn transition(&mut self, ev: Event) {
        self.mode = std::mem::take(&mut self.mode).after(ev);
        self.update_holds_state();
    }

    /// What CLIENT LIST shows of this client.
    fn publish(&self) {
        let mut p = self.entry.published();
        p.name = self.name.clone();
        p.db = if self.db == DEFAULT_DB {
            self.shared.pool.ups.active().endpoint.db()
        } else {
            self.db
        };
        p.user = self.sidecar_user().map(Bytes::copy_from_slice).or_else(|| {
            self.auth.as_ref().map(|a| {
                a.user
                    .clone()
                    .unwrap_or_else(|| Bytes::from_static(b"default"))
            })
        });
        p.resp = self.proto.number();
        (p.flags, p.multi, p.sub, p.psub, p.ssub) = match &self.mode {
            Mode::Transaction(tx) => ("x", tx.items.len() as i64, 0, 0, 0),
            Mode::Streaming(s) if s.monitor => ("O", -1, 0, 0, 0),
            Mode::Streaming(s) if s.replica => ("S", -1, 0, 0, 0),
            Mode::Streaming(s) => ("P", -1, s.channels.len(), s.patterns.len(), s.shard.len()),
            _ => ("N", -1, 0, 0, 0),
        };
        self.entry.publish(p);
    }

    /// EXEC after a refused command: discard upstream, answer EXECABORT.
    async fn abort_exec(&mut self, metrics: &Arc<CommandMetrics>) -> Flow {
        self.discard_upstream().await;
        self.reply(
            Value::error("EXECABORT Transaction discarded because of previous errors."),
            metrics,
        )
        .await;
        Flow::Go
    }

    /// End the open transaction without running it (an EXEC or DISCARD
    /// a stage refused): DISCARD upstream, the client gets `reply`.
    async fn discard_tx(&mut self, reply: Bytes, metrics: &Arc<CommandMetrics>) -> Flow {
        self.transition(Event::EndTransaction);
        self.discard_upstream().await;
        self.now(reply, Some(metrics)).await;
        self.publish();
        Flow::Go
    }

    /// Send DISCARD on the dedicated connection; its reply is consumed.
    async fn discard_upstream(&mut self) {
        if let Some(d) = &self.dedicated {
            let job = self.unanswered(Exchange::command(&[&b"DISCARD"[..]]));
            let _ = d.tx.send(job).await;
        }
    }

    fn update_holds_state(&self) {
        if let Some(d) = &self.dedicated {
            d.holds_state.store(self.holds_state(), Ordering::Release);
        }
    }

    /// Forget the dedicated connection. It lives on while `last_tx` holds
    /// it (replies of commands already sent there, a blocking command
    /// pipelined before this one, still come back) and closes when the
    /// client's next command moves elsewhere; `now` closes it at once
    /// (the client left, or a RESET must stop a stream of messages).
    fn drop_dedicated(&mut self, now: bool) {
        if now {
            self.last_tx = None;
        }
        self.dedicated = None;
        self.entry.upstream_id.store(-1, Ordering::Release);
    }

    async fn ensure_dedicated(&mut self) -> Result<(), UpstreamError> {
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
        let oob = Oob(self.entry.client.clone());
        let pool = self.shared.pool.clone();
        let d = Box::pin(pool.dedicated(&self.identity(), self.name.as_ref(), oob)).await?;
        self.entry
            .upstream_id
            .store(d.upstream_id.unwrap_or(-1), Ordering::Release);
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
                Ok(set.pick(self.entry.id).clone())
            }
        }
    }

    /// Wait until every reply queued so far was written, when the client
    /// moves to another upstream connection, so its commands run in order.
    /// After requests sent straight to cluster nodes, the identity's router
    /// needs no wait: what it sends to a node queues behind them.
    async fn barrier(&mut self, tx: &mpsc::Sender<Job>) {
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

    async fn wait_written(&mut self) {
        let want = self.queued;
        self.entry.client.flush();
        self.entry.client.progress.wait_for(want).await;
    }

    /// Before a request goes straight to a cluster node: what went through
    /// another channel (the router, a dedicated connection) is answered
    /// first, so it ran first.
    async fn barrier_direct(&mut self) {
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

    fn direct(&self) -> bool {
        self.cluster.as_ref().is_some_and(|c| c.direct)
    }

    /// The node connection for a request the session sends straight to
    /// its node (keys in one slot, or none), when the active endpoint is a
    /// cluster.
    fn cluster_tx(
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

    async fn send_job(
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
    async fn send_on(
        &mut self,
        tx: mpsc::Sender<Job>,
        exchange: Exchange,
        blocking: bool,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        self.room().await;
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
                slot: Some(seq),
                blocking,
            },
            client: self.entry.client.clone(),
            enqueued: now,
            hop: Hop::default(),
        };
        if let Err(mpsc::error::SendError(job)) = tx.send(job).await {
            // The connection is gone and the job was never sent.
            job.fail(UpstreamError::unreachable("upstream connection closed"));
        }
        Flow::Go
    }

    /// A job whose reply no client entry waits for (the sidecar's own
    /// commands: a DISCARD, a state change it answers itself).
    fn unanswered(&self, ex: Exchange) -> Job {
        let (payload, plan) = ex.send();
        Job {
            payload,
            kind: JobKind::Request {
                plan,
                slot: None,
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
    async fn on_dedicated(&mut self, args: Vec<Bytes>) -> Result<Bytes, UpstreamError> {
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
    fn state_on_dedicated(&self) -> bool {
        matches!(self.mode, Mode::Pinned | Mode::Watching { .. }) && self.dedicated.is_some()
    }

    /// Apply a state command on the dedicated connection when the client
    /// holds state there. `Ok(true)`: done there; `Ok(false)`: not needed;
    /// `Err`: the error reply the client gets.
    async fn apply_on_dedicated(&mut self, args: Vec<Bytes>) -> Result<bool, Bytes> {
        if !self.state_on_dedicated() {
            return Ok(false);
        }
        match self.on_dedicated(args).await {
            Ok(r) if crate::wire::is_error(&r) => Err(r),
            Ok(_) => Ok(true),
            Err(e) => Err(e.to_reply()),
        }
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
        self.entry.touch_time(Instant::now());
        let job = self.stream_job(payload, kind);
        if tx.send(job).await.is_err() {
            self.entry.client.kill.cancel();
            return Flow::Stop;
        }
        Flow::Go
    }

    /// A job for the client's streaming connection (no reply entry).
    fn stream_job(&self, payload: Bytes, kind: JobKind) -> Job {
        Job {
            payload,
            kind,
            client: self.entry.client.clone(),
            enqueued: Instant::now(),
            hop: Hop::default(),
        }
    }

    async fn upstream_error(&mut self, e: UpstreamError, metrics: &Arc<CommandMetrics>) -> Flow {
        self.now(e.to_reply(), Some(metrics)).await;
        if self.entry.client.kill.is_cancelled() {
            Flow::Stop
        } else {
            Flow::Go
        }
    }

    /// The identity changed: other shared connections, and an idle
    /// dedicated connection is replaced on next use.
    fn identity_changed(&mut self) {
        self.shared_set = None;
        self.cluster = None;
        if !self.holds_state() {
            self.drop_dedicated(false);
        }
    }

    /// `CLIENT TRACKING ... REDIRECT <id>`: the id is one of the sidecar's
    /// clients; Redis must get that client's dedicated connection's id.
    fn map_redirect(&self, ex: &mut Exchange) -> Result<(), Bytes> {
        let args = ex.args();
        if !args
            .get(1)
            .is_some_and(|a| a.eq_ignore_ascii_case(b"tracking"))
        {
            return Ok(());
        }
        let Some(at) = args
            .iter()
            .position(|a| a.eq_ignore_ascii_case(b"redirect"))
            .map(|i| i + 1)
            .filter(|&i| i < args.len())
        else {
            return Ok(());
        };
        let missing =
            || Bytes::from_static(b"-ERR The client ID you want redirect to does not exist\r\n");
        let Some(id) = parse_int(&args[at]) else {
            return Err(Bytes::from_static(
                b"-ERR value is not an integer or out of range\r\n",
            ));
        };
        let target = u64::try_from(id)
            .ok()
            .and_then(|id| self.shared.clients.get(id))
            .and_then(|e| e.upstream_id())
            .ok_or_else(missing)?;
        let mut new = args.to_vec();
        new[at] = Bytes::from(target.to_string());
        ex.rewrite(new);
        Ok(())
    }

    /// The user the client authenticated to the sidecar as.
    fn sidecar_user(&self) -> Option<&[u8]> {
        let ca = self.shared.client_auth.as_deref()?;
        self.client_user.map(|u| ca.user_name(u))
    }

    /// AUTH checked by the sidecar (`[client_auth]`), with Redis's replies.
    fn sidecar_auth(&mut self, args: &[Bytes]) -> Bytes {
        let Some(ca) = self.shared.client_auth.clone() else {
            return Bytes::from_static(b"-ERR syntax error\r\n");
        };
        let Ok(a) = parse_auth(args) else {
            return Bytes::from_static(b"-ERR syntax error\r\n");
        };
        if a.user.is_none() && !ca.has_default() {
            return Bytes::from_static(
                b"-ERR AUTH <password> called without any password configured for the default user. Are you sure your configuration is correct?\r\n",
            );
        }
        match ca.check(a.user.as_deref(), &a.password) {
            Some(u) => {
                self.client_user = Some(u);
                self.publish();
                Bytes::from_static(b"+OK\r\n")
            }
            None => Bytes::from_static(WRONGPASS),
        }
    }

    /// CLIENT ID / GETNAME / LIST / INFO / SETINFO / KILL / UNBLOCK: about
    /// the sidecar's clients.
    async fn client_command(&mut self, local: Local, args: &[Bytes]) -> Answer {
        let syntax = || Answer::Now(Value::error("ERR syntax error"));
        match local {
            Local::ClientId => Answer::Now(Value::Int(self.entry.id as i64)),
            Local::ClientGetName => {
                Answer::Now(self.name.clone().map(Value::Bulk).unwrap_or(Value::Null))
            }
            Local::ClientInfo if args.len() == 2 => Answer::Now(Value::Text(self.entry.line())),
            Local::ClientList => {
                let filters = match clients::parse_filters(&args[2..], false) {
                    Ok(f) => f,
                    Err(e) => return Answer::Now(Value::error(e)),
                };
                let text: String = self
                    .shared
                    .clients
                    .all()
                    .iter()
                    .filter(|e| filters.iter().all(|f| f.matches(e, self.entry.id)))
                    .map(|e| e.line())
                    .collect();
                Answer::Now(Value::Text(text))
            }
            Local::ClientSetInfo => {
                let [_, _, attr, value] = args else {
                    return Answer::Now(Value::error(
                        "ERR wrong number of arguments for 'client|setinfo' command",
                    ));
                };
                if value.iter().any(|&c| c <= b' ' || c > b'~') {
                    return Answer::Now(Value::error(format!(
                        "ERR {} cannot contain spaces, newlines or special characters.",
                        String::from_utf8_lossy(attr).to_ascii_lowercase()
                    )));
                }
                let mut p = self.entry.published();
                let v = (!value.is_empty()).then(|| value.clone());
                match &attr.to_ascii_lowercase()[..] {
                    b"lib-name" => p.lib_name = v,
                    b"lib-ver" => p.lib_ver = v,
                    _ => {
                        return Answer::Now(Value::error(format!(
                            "ERR Unrecognized option '{}'",
                            String::from_utf8_lossy(attr)
                        )));
                    }
                }
                self.entry.publish(p);
                Answer::Now(Value::Simple("OK"))
            }
            Local::ClientKill => {
                let targets: Vec<Arc<ClientEntry>> = if args.len() == 3 {
                    // Old form: CLIENT KILL addr:port.
                    let found: Vec<_> = self
                        .shared
                        .clients
                        .all()
                        .into_iter()
                        .filter(|e| e.peer.to_string().as_bytes() == &args[2][..])
                        .collect();
                    if found.is_empty() {
                        return Answer::Now(Value::error("ERR No such client"));
                    }
                    found
                } else {
                    let filters = match clients::parse_filters(&args[2..], true) {
                        Ok(f) if !f.is_empty() => f,
                        Ok(_) => return syntax(),
                        Err(e) => return Answer::Now(Value::error(e)),
                    };
                    let skipme = !filters.contains(&clients::Filter::SkipMe(false));
                    self.shared
                        .clients
                        .all()
                        .into_iter()
                        .filter(|e| !(skipme && e.id == self.entry.id))
                        .filter(|e| filters.iter().all(|f| f.matches(e, self.entry.id)))
                        .collect()
                };
                for e in &targets {
                    if e.id == self.entry.id {
                        // After this reply is written, as Redis does.
                        self.kill_self = true;
                    } else {
                        e.client.kill.cancel();
                    }
                }
                if args.len() == 3 {
                    Answer::Now(Value::Simple("OK"))
                } else {
                    Answer::Now(Value::Int(targets.len() as i64))
                }
            }
            Local::ClientUnblock => {
                if !(3..=4).contains(&args.len()) {
                    return Answer::Now(Value::error(
                        "ERR wrong number of arguments for 'client|unblock' command",
                    ));
                }
                let Some(id) = parse_int(&args[2]) else {
                    return Answer::Now(Value::error(
                        "ERR value is not an integer or out of range",
                    ));
                };
                if let Some(how) = args.get(3)
                    && !how.eq_ignore_ascii_case(b"timeout")
                    && !how.eq_ignore_ascii_case(b"error")
                {
                    return Answer::Now(Value::error(
                        "ERR CLIENT UNBLOCK reason should be TIMEOUT or ERROR",
                    ));
                }
                let upstream = u64::try_from(id)
                    .ok()
                    .and_then(|id| self.shared.clients.get(id))
                    .filter(|e| e.is_blocked())
                    .and_then(|e| e.upstream_id());
                match upstream {
                    // Redis unblocks that client's dedicated connection and
                    // answers for it.
                    Some(uid) => {
                        let mut new = args.to_vec();
                        new[2] = Bytes::from(uid.to_string());
                        Answer::Upstream(new)
                    }
                    None => Answer::Now(Value::Int(0)),
                }
            }
            _ => syntax(),
        }
    }

    async fn local(&mut self, local: Local, ex: Exchange, metrics: &Arc<CommandMetrics>) -> Flow {
        let args = ex.args();
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
                // Closing the dedicated connection ends MULTI, WATCH,
                // subscriptions and tracking upstream; the rest is ours. A
                // stream stops at once: no message may follow +RESET.
                let streaming = matches!(self.mode, Mode::Streaming(_));
                self.drop_dedicated(streaming);
                self.shared_set = None;
                self.proto = Proto::Resp2;
                self.db = DEFAULT_DB;
                self.auth = None;
                self.name = None;
                // With [client_auth], RESET signs the client out, as Redis
                // does with requirepass.
                self.client_user = None;
                self.transition(Event::Reset);
                self.reply(Value::Simple("RESET"), metrics).await;
                Flow::Go
            }
            Local::ClientSetName => {
                let name = match args {
                    [_, _, n] if n.iter().any(|&c| c <= b' ' || c > b'~') => {
                        let v = Value::error(
                            "ERR Client names cannot contain spaces, newlines or special characters.",
                        );
                        self.reply(v, metrics).await;
                        return Flow::Go;
                    }
                    [_, _, n] => n.clone(),
                    _ => {
                        self.reply(arity_err("client|setname"), metrics).await;
                        return Flow::Go;
                    }
                };
                let upstream = vec![
                    Bytes::from_static(b"CLIENT"),
                    Bytes::from_static(b"SETNAME"),
                    name.clone(),
                ];
                if let Err(e) = self.apply_on_dedicated(upstream).await {
                    self.now(e, Some(metrics)).await;
                    return Flow::Go;
                }
                self.name = (!name.is_empty()).then_some(name);
                if !self.holds_state() {
                    // A new dedicated connection takes the new name.
                    self.drop_dedicated(false);
                }
                self.reply(Value::Simple("OK"), metrics).await;
                Flow::Go
            }
            Local::ClientId
            | Local::ClientGetName
            | Local::ClientList
            | Local::ClientInfo
            | Local::ClientSetInfo
            | Local::ClientKill
            | Local::ClientUnblock => {
                let args = args.to_vec();
                match self.client_command(local, &args).await {
                    Answer::Now(v) => self.reply(v, metrics).await,
                    Answer::Upstream(args) => {
                        // Any connection can unblock another: the shared
                        // one (a streaming connection matches no reply).
                        let mut ex = ex;
                        ex.rewrite(args);
                        return self.send_job(Target::Shared, ex, false, metrics).await;
                    }
                }
                if std::mem::take(&mut self.kill_self) {
                    self.close().await;
                    return Flow::Stop;
                }
                Flow::Go
            }
            Local::Select => {
                let Some(db) = args.get(1).filter(|_| args.len() == 2) else {
                    self.reply(arity_err("select"), metrics).await;
                    return Flow::Go;
                };
                let Some(db) = parse_int(db) else {
                    self.reply(
                        Value::error("ERR value is not an integer or out of range"),
                        metrics,
                    )
                    .await;
                    return Flow::Go;
                };
                if db < 0 || db > i64::from(i32::MAX) {
                    self.reply(Value::error("ERR DB index is out of range"), metrics)
                        .await;
                    return Flow::Go;
                }
                if db != 0 && self.shared.pool.ups.active().endpoint.cluster.is_some() {
                    // As Redis Cluster: database 0 only.
                    self.reply(
                        Value::error("ERR SELECT is not allowed in cluster mode"),
                        metrics,
                    )
                    .await;
                    return Flow::Go;
                }
                let upstream = vec![Bytes::from_static(b"SELECT"), Bytes::from(db.to_string())];
                self.change_identity(Change::Select(db), upstream, None, metrics)
                    .await
            }
            Local::Auth if self.shared.client_auth.is_some() => {
                let reply = self.sidecar_auth(args);
                self.now(reply, Some(metrics)).await;
                Flow::Go
            }
            Local::Auth => match parse_auth(args) {
                Ok(auth) => {
                    let upstream = args.to_vec();
                    self.change_identity(Change::Auth(auth), upstream, None, metrics)
                        .await
                }
                Err(()) => {
                    self.reply(arity_err("auth"), metrics).await;
                    Flow::Go
                }
            },
            Local::Hello => match parse_hello(args) {
                Ok(mut h) => {
                    let mut upstream = args.to_vec();
                    if let Some(ca) = self.shared.client_auth.clone() {
                        // Credentials are the sidecar's to check; only the
                        // protocol and the name go upstream.
                        match h.auth.take() {
                            Some(a) => match ca.check(a.user.as_deref(), &a.password) {
                                Some(u) => self.client_user = Some(u),
                                None => {
                                    self.now(Bytes::from_static(WRONGPASS), Some(metrics)).await;
                                    return Flow::Go;
                                }
                            },
                            None if self.client_user.is_none() => {
                                self.now(Bytes::from_static(HELLO_NOAUTH), Some(metrics))
                                    .await;
                                return Flow::Go;
                            }
                            None => {}
                        }
                        upstream = hello_without_auth(args);
                    }
                    let proto = h.proto.unwrap_or(self.proto);
                    self.change_identity(Change::Hello(h), upstream, Some(proto), metrics)
                        .await
                }
                Err(v) => {
                    self.reply(v, metrics).await;
                    Flow::Go
                }
            },
        }
    }

    /// SELECT, AUTH, HELLO outside MULTI: checked against the upstream
    /// (on the dedicated connection when the client holds state there,
    /// else with a real handshake for the new identity), then applied.
    /// `hello`: answer with the HELLO map in this protocol.
    async fn change_identity(
        &mut self,
        change: Change,
        upstream: Vec<Bytes>,
        hello: Option<Proto>,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        let applied = match self.apply_on_dedicated(upstream).await {
            Ok(applied) => applied,
            Err(e) => {
                self.now(e, Some(metrics)).await;
                return Flow::Go;
            }
        };
        if !applied {
            let mut ident = self.identity();
            match &change {
                Change::Select(db) => ident.db = *db,
                Change::Auth(a) => ident.auth = Some(a.clone()),
                Change::Hello(h) => {
                    ident.proto = h.proto.unwrap_or(ident.proto);
                    if h.auth.is_some() {
                        ident.auth = h.auth.clone();
                    }
                }
                Change::SetName(_) => {}
            }
            if ident != self.identity()
                && let Err(e) = self.shared.pool.verify(&ident).await
            {
                return self.upstream_error(e, metrics).await;
            }
        }
        self.apply(change);
        match hello {
            Some(proto) => {
                let version = self.shared.pool.server_version();
                let v = Value::Map(vec![
                    (Value::bulk("server"), Value::bulk("redis")),
                    (Value::bulk("version"), Value::bulk(version)),
                    (Value::bulk("proto"), Value::Int(proto.number())),
                    (Value::bulk("id"), Value::Int(self.entry.id as i64)),
                    (Value::bulk("mode"), Value::bulk("standalone")),
                    (Value::bulk("role"), Value::bulk("master")),
                    (Value::bulk("modules"), Value::Array(Vec::new())),
                ]);
                self.reply(v, metrics).await;
            }
            None => self.reply(Value::Simple("OK"), metrics).await,
        }
        Flow::Go
    }
}

const WRONGPASS: &[u8] = b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";

/// `HELLO` as the client sent it, without its `AUTH user pass`.
fn hello_without_auth(args: &[Bytes]) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(args.len());
    let mut i = 0;
    while i < args.len() {
        if i >= 2 && args[i].eq_ignore_ascii_case(b"auth") {
            i += 3;
            continue;
        }
        out.push(args[i].clone());
        i += 1;
    }
    out
}

/// What a CLIENT command the sidecar owns comes to.
enum Answer {
    /// The sidecar's reply.
    Now(Value),
    /// Send this upstream instead (an id mapped to an upstream id).
    Upstream(Vec<Bytes>),
}

/// Redis's arity check (`arity` N: exactly N arguments; -N: at least N),
/// with its wording, for the commands the sidecar answers itself.
fn arity_error(info: &CommandInfo, args: &[Bytes]) -> Option<Bytes> {
    let n = args.len() as i64;
    let wrong = (info.arity > 0 && info.arity != n) || n < -info.arity;
    if wrong {
        return Some(Bytes::from(format!(
            "-ERR wrong number of arguments for '{}' command\r\n",
            info.name
        )));
    }
    match info.name.as_str() {
        "auth" if n > 3 => Some(Bytes::from_static(b"-ERR syntax error\r\n")),
        "client|unblock" if n > 4 => Some(Bytes::from_static(
            b"-ERR unknown subcommand or wrong number of arguments for 'UNBLOCK'. Try CLIENT HELP.\r\n",
        )),
        _ => None,
    }
}

/// Commands that are queued inside MULTI (the others run at once).
fn is_unwatch(args: &[Bytes]) -> bool {
    args.first()
        .is_some_and(|a| a.eq_ignore_ascii_case(b"unwatch"))
}

fn queued_in_tx(class: Class) -> bool {
    !matches!(
        class,
        Class::Local(Local::Quit | Local::Reset)
            | Class::Pin(Pin::Multi | Pin::Watch | Pin::EndTransaction)
    )
}

/// AUTH [user] password.
fn parse_auth(args: &[Bytes]) -> Result<Auth, ()> {
    match args {
        [_, p] => Ok(Auth {
            user: None,
            password: p.clone(),
        }),
        [_, u, p] => Ok(Auth {
            user: Some(u.clone()),
            password: p.clone(),
        }),
        _ => Err(()),
    }
}

/// HELLO [protover [AUTH user pass] [SETNAME name]], with Redis's errors.
fn parse_hello(args: &[Bytes]) -> Result<Hello, Value> {
    let mut h = Hello {
        proto: None,
        auth: None,
        name: None,
    };
    let Some(v) = args.get(1) else {
        return Ok(h);
    };
    h.proto = Some(match parse_int(v) {
        Some(2) => Proto::Resp2,
        Some(3) => Proto::Resp3,
        Some(_) => return Err(Value::error("NOPROTO unsupported protocol version")),
        None => {
            return Err(Value::error(
                "ERR Protocol version is not an integer or out of range",
            ));
        }
    });
    let mut i = 2;
    while i < args.len() {
        let opt = args[i].to_ascii_lowercase();
        if opt == b"auth" && i + 2 < args.len() {
            h.auth = Some(Auth {
                user: Some(args[i + 1].clone()),
                password: args[i + 2].clone(),
            });
            i += 3;
        } else if opt == b"setname" && i + 1 < args.len() {
            h.name = Some(args[i + 1].clone());
            i += 2;
        } else {
            return Err(Value::error(format!(
                "ERR Syntax error in HELLO option '{}'",
                String::from_utf8_lossy(&args[i])
            )));
        }
    }
    Ok(h)
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
        let spec = crate::upstream::endpoint::EndpointSpec {
            name: "t".into(),
            target: crate::config::url::Target::parse("redis://127.0.0.1:1").unwrap(),
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
            Default::default(),
        )
        .unwrap();
        let pool = crate::upstream::pool::Pool::new(
            ups,
            settings,
            1,
            1,
            metrics.clone(),
            Default::default(),
        );
        let limits = super::super::SessionLimits {
            frame: crate::wire::Limits::default(),
            max_inflight: 16,
            max_output: 1 << 20,
            idle_timeout: std::time::Duration::ZERO,
            lane_reply: 64 << 10,
            lane_inflight: 32,
        };
        let policies = crate::policy::Policies::new(
            crate::policy::Builder::default(),
            &crate::config::Config::default(),
            metrics.clone(),
        )
        .unwrap();
        let shared = super::super::Shared::new(pool, policies, metrics, limits, None);
        let addr = stream.local_addr().unwrap();
        let entry = Arc::new(ClientEntry::new(
            1,
            addr,
            addr,
            0,
            crate::upstream::ClientShared::new(1 << 20, 64 << 10),
        ));
        let fut = run(stream, shared, entry);
        let size = std::mem::size_of_val(&fut);
        println!(
            "session future: {size} bytes; Session {}, Mode {}, Dedicated {}",
            std::mem::size_of::<Session>(),
            std::mem::size_of::<Mode>(),
            std::mem::size_of::<Dedicated>()
        );
        // 3024 bytes when written, 2712 with the writer in the session,
        // 1960 with the output queue, 2056 with the session modes, the
        // request record and client auth, 2072 with the cluster's direct
        // path, 2120 with the scanner's framing state (a request re-encoded
        // unless its framing was canonical, and where its header ends);
        // 10,000 idle clients x this is most of the idle RSS (README,
        // Performance).
        assert!(size <= 2120, "session future is {size} bytes");
    }
}
