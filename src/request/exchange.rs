//! The request record: one [`Exchange`] per client command that goes
//! upstream. The session builds it (policy stages may rewrite the command,
//! append commands and register a [`ReplyAction`]); it travels with the
//! command to the upstream connection, which keeps it in its FIFO and
//! applies it to the replies: how many upstream replies belong to it, which
//! one the client gets (always the command's own, the first), which
//! elements of an EXEC array are removed, answered by the sidecar or handed
//! to a stage, and whether the session wants the reply too (a state change
//! such as `SELECT` inside a transaction). Replies never pass back through
//! the session for this: the connection completes the client's output entry
//! itself.

use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use tokio::sync::oneshot;

use crate::wire::error::{Reply, UpstreamError};
use crate::wire::{Request, encode_command, is_error, scan};

/// A stage's hook on the replies of one exchange, run on the upstream
/// connection that reads them (the L1 fill is one). It must be cheap and
/// must not block: it runs on the reply path of every client of that
/// connection.
pub trait ReplyAction: Send + Sync {
    /// One upstream reply of the exchange, in order: `index` 0 is the
    /// reply to the client's command (the one the client gets), 1.. those
    /// of the appended commands (consumed). Inside MULTI, the same with
    /// the command's elements of the EXEC array; an aborted transaction
    /// calls nothing.
    fn on_reply(&self, index: u32, reply: &Bytes);
}

/// One command of an open transaction, in the order the client sent them.
pub enum TxItem {
    /// Queued upstream (the client got Redis's `+QUEUED`), followed by
    /// `appended` commands of stages whose EXEC elements are removed.
    Queued {
        appended: u32,
        action: Option<Arc<dyn ReplyAction>>,
        /// Ran upstream, but the client sees this element in its place
        /// unless the upstream's is an error (HELLO: the sidecar's own
        /// answer, as outside a transaction).
        replace: Option<Bytes>,
    },
    /// Answered by the sidecar (a stage's answer, `CLIENT ID` ...): the
    /// client got `+QUEUED`, and this element takes its place in the EXEC
    /// array.
    Answered(Bytes),
}

/// A client command on its way upstream, and what becomes of its replies.
pub struct Exchange {
    args: Vec<Bytes>,
    /// The bytes to send for the command: as they arrived, or re-encoded
    /// after a rewrite; always canonical RESP (see [`Request`]).
    raw: Bytes,
    /// Length of `raw`'s array header, as the scanner found it: where
    /// the arguments start.
    head: usize,
    /// What stages and transactions add; boxed, as most commands have
    /// none and the exchange is moved through the connection's FIFO.
    more: Option<Box<More>>,
    /// Stages' marks ([`Exchange::mark`]).
    flags: u8,
}

/// Two reply actions, in order.
struct Both(Arc<dyn ReplyAction>, Arc<dyn ReplyAction>);

impl ReplyAction for Both {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        self.0.on_reply(index, reply);
        self.1.on_reply(index, reply);
    }
}

#[derive(Default)]
struct More {
    appended: Vec<Bytes>,
    action: Option<Arc<dyn ReplyAction>>,
    /// For an EXEC: the transaction's items, to rebuild its array.
    exec: Option<Vec<TxItem>>,
    /// The session wants a copy of the client's reply.
    tee: Option<oneshot::Sender<Reply>>,
    /// One part of a split or fanned-out command.
    part: Option<PartOf>,
}

/// Where the replies of the parts of a command split across cluster nodes
/// go (see [`ReplyPlan::part`]).
pub trait PartSink: Send + Sync {
    /// Part `index` got its reply, or failed.
    fn part(&self, index: usize, reply: Reply);
}

/// A part's place in its sink; a part dropped unanswered reports the
/// connection lost, so the whole never waits forever.
struct PartOf {
    sink: Option<Arc<dyn PartSink>>,
    index: usize,
}

impl PartOf {
    fn complete(&mut self, reply: Reply) {
        if let Some(s) = self.sink.take() {
            s.part(self.index, reply);
        }
    }
}

impl Drop for PartOf {
    fn drop(&mut self) {
        self.complete(Err(UpstreamError::ConnectionLost));
    }
}

impl std::fmt::Debug for Exchange {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exchange")
            .field("appended", &self.appended())
            .finish_non_exhaustive()
    }
}

impl Exchange {
    pub fn new(req: Request) -> Exchange {
        Exchange {
            args: req.args,
            raw: req.raw,
            head: req.head,
            more: None,
            flags: 0,
        }
    }

    /// A command the sidecar makes itself (DISCARD, a state change).
    pub fn command<A: AsRef<[u8]>>(args: &[A]) -> Exchange {
        Exchange::new(Request::from_args(
            args.iter()
                .map(|a| Bytes::copy_from_slice(a.as_ref()))
                .collect(),
        ))
    }

    fn more(&mut self) -> &mut More {
        self.more.get_or_insert_with(Box::default)
    }

    pub fn args(&self) -> &[Bytes] {
        &self.args
    }

    /// Replace the command (it is re-encoded; untouched commands are
    /// forwarded as the bytes that arrived).
    pub fn rewrite(&mut self, args: Vec<Bytes>) {
        let Request { raw, args, head } = Request::from_args(args);
        (self.raw, self.args, self.head) = (raw, args, head);
    }

    /// Add arguments at the end of the command: `encoded` is their RESP
    /// encoding (built once by the stage), so the command is not encoded
    /// again, only its array header replaced. The header's end is the
    /// scanner's (never a search for a line end, which a value can hold:
    /// that is how a value becomes a command).
    pub fn extend(&mut self, encoded: &Bytes, args: &[Bytes]) {
        let mut out = BytesMut::with_capacity(self.raw.len() + encoded.len() + 4);
        self.args.extend_from_slice(args);
        scan::push_header(&mut out, b'*', self.args.len());
        let head = out.len();
        out.extend_from_slice(&self.raw[self.head..]);
        out.extend_from_slice(encoded);
        self.raw = out.freeze();
        self.head = head;
    }

    /// Send this already-encoded command right after the command (see
    /// [`Exchange::append`]).
    pub fn append_encoded(&mut self, cmd: Bytes) {
        self.more().appended.push(cmd);
    }

    /// Send `args` right after the command, on the same connection; its
    /// reply is consumed by the sidecar (inside MULTI: its `QUEUED` and
    /// its EXEC element).
    pub fn append<A: AsRef<[u8]>>(&mut self, args: &[A]) {
        self.more().appended.push(encode_command(args));
    }

    pub fn appended(&self) -> usize {
        self.more.as_ref().map_or(0, |m| m.appended.len())
    }

    /// Run `action` on the replies (see [`ReplyAction`]); after any a
    /// stage before registered.
    pub fn on_reply(&mut self, action: Arc<dyn ReplyAction>) {
        let m = self.more();
        m.action = Some(match m.action.take() {
            Some(first) => Arc::new(Both(first, action)),
            None => action,
        });
    }

    /// Whether `flag` was set on this exchange; sets it. Stages use it to
    /// know they are asked again (after a [`crate::policy::Verdict::Wait`]).
    pub fn mark(&mut self, flag: u8) -> bool {
        let was = self.flags & flag != 0;
        self.flags |= flag;
        was
    }

    /// This command's place in a transaction (its QUEUED reply goes to the
    /// client, its appended commands' QUEUED replies are consumed).
    pub fn tx_item(&mut self) -> TxItem {
        TxItem::Queued {
            appended: self.appended() as u32,
            action: self.more.as_mut().and_then(|m| m.action.take()),
            replace: None,
        }
    }

    /// Rebuild the EXEC array from `items`.
    pub fn set_exec(&mut self, items: Vec<TxItem>) {
        self.more().exec = Some(items);
    }

    /// Send a copy of the client's reply (or its error) to the session.
    pub fn tee(&mut self) -> oneshot::Receiver<Reply> {
        let (tx, rx) = oneshot::channel();
        self.more().tee = Some(tx);
        rx
    }

    /// Ready to send: the bytes to write upstream (the command, then the
    /// appended ones) and what travels with them to the connection.
    pub fn send(self) -> (Bytes, ReplyPlan) {
        let Exchange { raw, more, .. } = self;
        let Some(mut more) = more else {
            return (raw, ReplyPlan::single());
        };
        let appended = std::mem::take(&mut more.appended);
        let plan = ReplyPlan {
            count: 1 + appended.len() as u32,
            more: Some(more),
        };
        if appended.is_empty() {
            return (raw, plan);
        }
        let mut out =
            BytesMut::with_capacity(raw.len() + appended.iter().map(Bytes::len).sum::<usize>());
        out.extend_from_slice(&raw);
        for e in &appended {
            out.extend_from_slice(e);
        }
        (out.freeze(), plan)
    }

    /// Only the command's bytes, for a connection that streams where the
    /// appended commands cannot run (no reply of theirs could be told
    /// from a message).
    pub fn into_command(self) -> Bytes {
        self.raw
    }

    /// The command, then each appended command behind `CLIENT REPLY
    /// SKIP`, for a connection that streams: the appended commands run
    /// and no reply of theirs comes back (under `CLIENT REPLY OFF` the
    /// SKIP changes nothing). Reply actions are not run there.
    pub fn into_streamed(self) -> Bytes {
        const SKIP: &[u8] = b"*3\r\n$6\r\nCLIENT\r\n$5\r\nREPLY\r\n$4\r\nSKIP\r\n";
        let appended = match self.more {
            Some(m) if !m.appended.is_empty() => m.appended,
            _ => return self.raw,
        };
        let mut out = BytesMut::with_capacity(
            self.raw.len() + appended.iter().map(|a| a.len() + SKIP.len()).sum::<usize>(),
        );
        out.extend_from_slice(&self.raw);
        for a in &appended {
            out.extend_from_slice(SKIP);
            out.extend_from_slice(a);
        }
        out.freeze()
    }

    /// The exchange will not be sent: whoever waits for its reply learns.
    pub fn fail(self, err: &UpstreamError) {
        let (_, mut plan) = self.send();
        plan.fail(err);
    }
}

/// The part of an [`Exchange`] that travels with the sent bytes to the
/// upstream connection and decides what becomes of their replies. Two
/// words for a plain command (no allocation).
pub struct ReplyPlan {
    /// Upstream replies that belong to the exchange; the first is the
    /// client's.
    count: u32,
    more: Option<Box<More>>,
}

impl std::fmt::Debug for ReplyPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplyPlan")
            .field("count", &self.count)
            .finish_non_exhaustive()
    }
}

impl ReplyPlan {
    /// One command, one reply, nothing else.
    pub fn single() -> ReplyPlan {
        ReplyPlan {
            count: 1,
            more: None,
        }
    }

    /// The plan of part `index` of a split command: its reply goes to
    /// `sink`, not to a client entry.
    pub fn part(sink: Arc<dyn PartSink>, index: usize) -> ReplyPlan {
        ReplyPlan {
            count: 1,
            more: Some(Box::new(More {
                part: Some(PartOf {
                    sink: Some(sink),
                    index,
                }),
                ..More::default()
            })),
        }
    }

    /// Upstream replies that belong to the exchange.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// One reply, straight to the client: nothing to consume, rebuild,
    /// observe or copy (it can go to the client in parts).
    pub fn is_plain(&self) -> bool {
        self.count == 1 && self.more.is_none()
    }

    /// Upstream reply `index` arrived (see [`ReplyAction`]). Inside an
    /// EXEC the items' actions run in [`ReplyPlan::finish`] instead.
    pub fn observe(&self, index: u32, reply: &Bytes) {
        if let Some(a) = self.more.as_ref().and_then(|m| m.action.as_ref()) {
            a.on_reply(index, reply);
        }
    }

    /// The client's reply, from the command's own upstream reply: an EXEC
    /// array rebuilt from the transaction's items; the session's copy sent.
    pub fn finish(&mut self, reply: Bytes) -> Bytes {
        let Some(m) = self.more.as_mut() else {
            return reply;
        };
        let reply = match &m.exec {
            Some(items) => rebuild_exec(&reply, items),
            None => reply,
        };
        if let Some(t) = m.tee.take() {
            let _ = t.send(Ok(reply.clone()));
        }
        if let Some(mut p) = m.part.take() {
            p.complete(Ok(reply.clone()));
        }
        reply
    }

    /// The exchange failed (never sent, or lost in flight).
    pub fn fail(&mut self, err: &UpstreamError) {
        if let Some(m) = self.more.as_mut() {
            if let Some(t) = m.tee.take() {
                let _ = t.send(Err(err.clone()));
            }
            if let Some(mut p) = m.part.take() {
                p.complete(Err(err.clone()));
            }
        }
    }
}

/// The client's EXEC array from the upstream's: elements of appended
/// commands removed (their actions run), the sidecar's answers put in
/// place. A null or error EXEC reply (aborted transaction) passes
/// unchanged; so does an array that does not match the items (never
/// expected: then the upstream's own reply is the honest answer).
pub fn rebuild_exec(reply: &Bytes, items: &[TxItem]) -> Bytes {
    let Some(ranges) = scan::split_array(reply) else {
        return reply.clone();
    };
    let queued: usize = items
        .iter()
        .map(|i| match i {
            TxItem::Queued { appended, .. } => 1 + *appended as usize,
            TxItem::Answered(_) => 0,
        })
        .sum();
    if queued != ranges.len() {
        return reply.clone();
    }
    let mut out = BytesMut::with_capacity(reply.len() + 16);
    scan::push_header(&mut out, b'*', items.len());
    let mut next = ranges.iter().map(|&(s, e)| reply.slice(s..e));
    for item in items {
        match item {
            TxItem::Queued {
                appended,
                action,
                replace,
            } => {
                for index in 0..=*appended {
                    let Some(el) = next.next() else {
                        return reply.clone();
                    };
                    if let Some(a) = action {
                        a.on_reply(index, &el);
                    }
                    if index == 0 {
                        match replace {
                            Some(r) if !is_error(&el) => out.extend_from_slice(r),
                            _ => out.extend_from_slice(&el),
                        }
                    }
                }
            }
            TxItem::Answered(b) => out.extend_from_slice(b),
        }
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_patches_the_header_and_keeps_the_bytes() {
        let mut ex = Exchange::new(Request::from_args(vec![
            Bytes::from("SET"),
            Bytes::from("k"),
            Bytes::from("v"),
        ]));
        let encoded = Bytes::from_static(b"$2\r\nPX\r\n$3\r\n100\r\n");
        ex.extend(&encoded, &[Bytes::from("PX"), Bytes::from("100")]);
        assert_eq!(ex.args().len(), 5);
        let (payload, plan) = ex.send();
        assert_eq!(payload, encode_command(&["SET", "k", "v", "PX", "100"]));
        assert_eq!(plan.count(), 1);
    }

    #[test]
    fn exec_array_rebuilt_from_the_items() {
        let r = Bytes::from_static(b"*3\r\n+OK\r\n:1\r\n$1\r\nv\r\n");
        let items = vec![
            TxItem::Queued {
                appended: 1,
                action: None,
                replace: None,
            },
            TxItem::Answered(Bytes::from_static(b":42\r\n")),
            TxItem::Queued {
                appended: 0,
                action: None,
                replace: Some(Bytes::from_static(b"$1\r\nw\r\n")),
            },
        ];
        assert_eq!(
            &rebuild_exec(&r, &items)[..],
            b"*3\r\n+OK\r\n:42\r\n$1\r\nw\r\n"
        );
        let null = Bytes::from_static(b"*-1\r\n");
        assert_eq!(rebuild_exec(&null, &items), null);
        // A mismatch passes the upstream's reply unchanged.
        assert_eq!(rebuild_exec(&r, &items[1..]), r);
    }
}
