//! A session's mode (normal, pinned, watching, transaction, streaming)
//! and its transitions, the transaction and subscription state it holds.

use std::collections::HashSet;

use bytes::Bytes;

use crate::policy::Mode as PolicyMode;
use crate::request::command::Local;
use crate::request::exchange::TxItem;
use crate::upstream::Auth;
use crate::wire::Proto;
use crate::wire::scan::parse_int;

use super::{parse_auth, parse_hello};

/// Where a request goes.
pub(super) enum Target {
    Shared,
    Dedicated,
}

/// What the reader does after a request.
#[derive(PartialEq, Eq)]
pub(super) enum Flow {
    /// Read the next request.
    Next,
    /// Close the client.
    Stop,
}

/// What the client holds. Transitions happen only in [`Mode::after`].
#[derive(Default)]
pub(super) enum Mode {
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
pub(super) struct Tx {
    /// Back to [`Mode::Pinned`] after EXEC/DISCARD.
    pub(super) pinned: bool,
    /// The commands queued, as the client sees them.
    pub(super) items: Vec<TxItem>,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    pub(super) refused: bool,
    /// MULTI was answered while Redis was busy (it takes MULTI then) but
    /// not sent: the connection could not be set up. Sent before the
    /// first command queued once it can be.
    pub(super) multi_unsent: bool,
    /// Some item needs the EXEC array rebuilt.
    pub(super) rebuild: bool,
    /// Connection-state commands queued, by item index: applied to the
    /// session when their EXEC element says they ran.
    pub(super) changes: Vec<(usize, Change)>,
}

/// Subscriptions of a streaming client (for `CLIENT LIST`), and what the
/// sidecar needs to answer it in order.
#[derive(Default)]
pub(super) struct Subs {
    pub(super) channels: HashSet<Bytes>,
    pub(super) patterns: HashSet<Bytes>,
    pub(super) shard: HashSet<Bytes>,
    pub(super) monitor: bool,
    /// SYNC/PSYNC: the client is a replica.
    pub(super) replica: bool,
    /// What `CLIENT REPLY` set: the sidecar's own replies follow it too.
    pub(super) replies: Replies,
    /// The argument of the PINGs that hold the sidecar's own replies in
    /// order ([`crate::upstream::Mark`]); made on first use.
    pub(super) token: Option<Bytes>,
}

/// `CLIENT REPLY ON|OFF|SKIP` as Redis applies it.
#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub(super) enum Replies {
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
    pub(super) fn can_append(&self, proto: Proto) -> bool {
        !self.monitor && !self.replica && self.runs_commands(proto)
    }

    /// See [`Session::runs_commands`].
    pub(super) fn runs_commands(&self, proto: Proto) -> bool {
        let subscribed =
            !(self.channels.is_empty() && self.patterns.is_empty() && self.shard.is_empty());
        !self.replica && (proto == Proto::Resp3 || !subscribed)
    }

    pub(super) fn token(&mut self, client: u64) -> Bytes {
        self.token
            .get_or_insert_with(|| crate::upstream::Mark::new_token(client))
            .clone()
    }

    /// Follow `CLIENT REPLY` in a command forwarded on the stream.
    pub(super) fn note_replies(&mut self, args: &[Bytes]) {
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

/// A connection-state change (SELECT, AUTH, HELLO, CLIENT SETNAME): parsed
/// once by [`Change::parse`], applied to the session by one function
/// (`Session::apply`) whatever the mode: at once, when its EXEC element
/// says it ran, or as it is forwarded on a stream.
pub(super) enum Change {
    Select(i64),
    Auth(Auth),
    Hello(Hello),
    SetName(Option<Bytes>),
}

impl Change {
    /// The change `local` with `args` makes, if well formed (a malformed
    /// one goes to Redis, whose error the client gets).
    pub(super) fn parse(local: Local, args: &[Bytes]) -> Option<Change> {
        match (local, args) {
            (Local::Select, [_, db]) => parse_int(db).map(Change::Select),
            (Local::Auth, _) => parse_auth(args).ok().map(Change::Auth),
            (Local::Hello, _) => parse_hello(args).ok().map(Change::Hello),
            (Local::ClientSetName, [_, _, n]) => {
                Some(Change::SetName((!n.is_empty()).then(|| n.clone())))
            }
            _ => None,
        }
    }
}

/// A parsed `HELLO [protover [AUTH user pass] [SETNAME name]]`.
pub(super) struct Hello {
    pub(super) proto: Option<Proto>,
    pub(super) auth: Option<Auth>,
    pub(super) name: Option<Bytes>,
}

/// What moves the client between modes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(super) enum Event {
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
    pub(super) fn after(self, ev: Event) -> Mode {
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

    pub(super) fn pinned(&self) -> bool {
        match self {
            Mode::Normal => false,
            Mode::Pinned | Mode::Streaming(_) => true,
            Mode::Watching { pinned } => *pinned,
            Mode::Transaction(tx) => tx.pinned,
        }
    }

    pub(super) fn kind(&self) -> PolicyMode {
        match self {
            Mode::Normal => PolicyMode::Normal,
            Mode::Pinned => PolicyMode::Pinned,
            Mode::Watching { .. } => PolicyMode::Watching,
            Mode::Transaction(_) => PolicyMode::Transaction,
            Mode::Streaming(_) => PolicyMode::Streaming,
        }
    }
}
