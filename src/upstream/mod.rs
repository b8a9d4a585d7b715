//! Upstream side: endpoints with their transport (TCP, [`tls`], Sentinel)
//! and health ([`endpoint`], whose [`endpoint::EndpointSpec`] is one
//! checked `[[upstream]]`), the choice of the active endpoint
//! ([`failover`]), one connection with its handshake and its reply
//! matching ([`conn`]), the pool of shared, multiplexed connections keyed
//! by client identity and the dedicated ones ([`pool`]), and for a Redis
//! Cluster the slot map ([`slots`]) and the routing over it
//! ([`cluster`]). URLs are parsed by [`crate::config::url`] (re-exported
//! as [`url`]).
//!
//! Every request crosses to an upstream connection as a [`Job`]: the
//! bytes of its [`crate::request::exchange::Exchange`] (one or more
//! commands), its [`ReplyPlan`] (what becomes of their replies) and the
//! entry of the client's output queue ([`crate::request::output`]) that
//! its reply completes. The connection keeps jobs in a FIFO in the order
//! their bytes were written and matches replies to them in that order;
//! this is what makes "a reply always reaches the request that caused it"
//! hold by construction.

pub mod cluster;
pub mod conn;
pub mod endpoint;
pub mod failover;
pub mod pool;
pub mod slots;
pub mod tls;
pub use crate::config::url;

use std::fmt;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::request::exchange::ReplyPlan;
use crate::wire::Proto;

/// Credentials a client gave with AUTH or HELLO ... AUTH.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Auth {
    pub user: Option<Bytes>,
    pub password: Bytes,
}

impl fmt::Debug for Auth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Auth({:?}, ***)",
            self.user
                .as_ref()
                .map(|u| String::from_utf8_lossy(u).into_owned())
        )
    }
}

/// `Identity::db` of a client that never selected a database: whatever the
/// endpoint URL's `/db` is (0 when it has none), followed across a switch
/// of endpoints. RESET returns to it.
pub const URL_DB: i64 = -1;

/// The connection state a shared upstream connection is set up with. Shared
/// connections are keyed by it, so no client sees another's state.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    pub proto: Proto,
    /// The client's database, or [`URL_DB`].
    pub db: i64,
    /// `None`: the credentials of the upstream URL.
    pub auth: Option<Auth>,
}

pub use crate::wire::error::{Reply, UpstreamError};

pub use crate::request::output::ClientShared;
pub use crate::request::signal::Signal;

/// The path for frames that are not replies to a job: RESP3 pushes, and
/// everything once a dedicated connection streams (SUBSCRIBE, MONITOR).
/// They go to the client after everything queued before them.
/// A cluster's pinned client's frames pass its router's filter (several
/// node connections, one stream as from one Redis).
#[derive(Clone, Debug)]
pub struct Oob(
    pub Arc<ClientShared>,
    pub Option<Arc<cluster::stream::StreamFilter>>,
);

impl Oob {
    pub fn new(client: Arc<ClientShared>) -> Oob {
        Oob(client, None)
    }

    /// Queue a frame for the client; written at the end of the batch.
    pub fn send(&self, frame: Bytes) {
        match &self.1 {
            Some(f) => f.pass(frame, &self.0),
            None => self.0.push_frame(frame),
        }
    }

    /// The dedicated connection holding the client's state is gone: close
    /// the client once what arrived before is written (as Redis would).
    pub fn close(&self) {
        self.0.close();
    }
}

/// What a job asks of the connection.
#[derive(Debug)]
pub enum JobKind {
    /// A client command (and what stages appended) whose replies follow
    /// its exchange; the client's reply completes `entry` of its output
    /// queue (its sequence number; `None`: nobody waits).
    Request {
        plan: ReplyPlan,
        entry: Option<u64>,
        /// Blocking commands have no command timeout.
        blocking: bool,
    },
    /// From here on the connection is a stream: every frame goes to the
    /// client as it arrives (SUBSCRIBE, MONITOR, CLIENT REPLY).
    StartStream,
    /// From here on the connection's bytes go to the client as they come,
    /// unparsed (SYNC/PSYNC: an RDB payload is not RESP).
    StartRaw,
    /// Bytes for a connection that already streams.
    Stream,
    /// A reply the sidecar made itself for a streaming client, held until
    /// the upstream answers everything sent before it: the job's payload
    /// is `PING <token>`, and its answer is replaced by `reply` (so the
    /// sidecar's replies never overtake forwarded ones).
    Mark(Box<Mark>),
}

/// See [`JobKind::Mark`].
#[derive(Debug)]
pub struct Mark {
    /// The PING argument: per session, unguessable by other clients.
    pub token: Bytes,
    /// What the client gets in the PING's place (empty: nothing).
    pub reply: Bytes,
    /// Told once the reply is queued for the client (or the connection
    /// is gone): a session that closes the client waits for it.
    pub done: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Mark {
    /// A token for marks of one client: keyed from the OS's randomness
    /// (RandomState), so another client cannot guess it.
    pub fn new_token(seed: u64) -> Bytes {
        use std::hash::BuildHasher;
        let s = std::collections::hash_map::RandomState::new();
        Bytes::from(format!(
            "redis-sidecar-mark-{:016x}{:016x}",
            s.hash_one(seed),
            s.hash_one(Instant::now())
        ))
    }

    /// The PING to send upstream.
    pub fn payload(&self) -> Bytes {
        crate::wire::encode_command(&[&b"PING"[..], &self.token])
    }

    /// Whether `frame` is this PING's answer: a bulk of the token, or,
    /// while subscribed in RESP2, `["pong", token]`.
    pub fn answers(&self, frame: &[u8]) -> bool {
        let mut bulk = bytes::BytesMut::new();
        crate::wire::scan::push_header(&mut bulk, b'$', self.token.len());
        bulk.extend_from_slice(&self.token);
        bulk.extend_from_slice(b"\r\n");
        if frame == &bulk[..] {
            return true;
        }
        frame
            .strip_prefix(&b"*2\r\n$4\r\npong\r\n"[..])
            .is_some_and(|rest| rest == &bulk[..])
    }
}

/// One unit of work for an upstream connection.
#[derive(Debug)]
pub struct Job {
    pub payload: Bytes,
    pub kind: JobKind,
    pub client: Arc<ClientShared>,
    pub enqueued: Instant,
    /// Cluster routing state (ignored by a single Redis).
    pub hop: Hop,
}

/// A job's way through a cluster ([`cluster::router`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Hop {
    /// Redirections and retries so far.
    pub redirects: u8,
    /// Send `ASKING` before each command (an ASK redirection).
    pub asking: bool,
    /// Never sent again (inside a transaction: a redirection there ends
    /// the client's transaction instead).
    pub pinned: bool,
    /// Sent again once after NOSCRIPT, its script loaded first.
    pub reloaded: bool,
}

impl Job {
    /// The job will never be sent: its entry gets `err`.
    pub fn fail(self, err: UpstreamError) {
        if let JobKind::Request {
            mut plan, entry, ..
        } = self.kind
        {
            plan.fail(&err);
            if let Some(seq) = entry {
                self.client.fail(seq, err);
            }
        }
    }
}
