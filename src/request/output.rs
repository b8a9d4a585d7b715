//! A client's output: the ordered queue of its replies and the socket they
//! are written to, shared by its session and the upstream connections that
//! serve it ([`ClientShared`]).
//!
//! For every request it reads, the session puts an entry at the back of the
//! queue *before* the request leaves for an upstream connection. Whoever
//! completes an entry (the session for a reply it makes itself, an upstream
//! connection for a reply it read) moves the ready entries at the front into
//! the output buffer, in queue order, and writes the buffer to the socket
//! at the end of its batch: an upstream connection once per read, for every
//! client that read served. So a client's replies come back in the order of
//! its requests whichever connections served them, and a reply reaches the
//! client without a hop through the session's task (one wake-up of the
//! session per request instead of two, and no channel or oneshot per
//! request).
//!
//! When the socket is full, the session's writer takes it over until it is
//! writable again; meanwhile replies accumulate in the buffer, up to the
//! client's output limit, past which the client is disconnected (as Redis
//! does with a client that does not read).

use std::collections::VecDeque;
use std::io::ErrorKind;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::Notify;

use crate::metrics::CommandMetrics;
use crate::request::signal::Signal;
use crate::wire::error::Reply;

/// An empty output buffer up to this size is kept between replies (no
/// allocation per reply); a larger one is freed, so idle clients hold
/// little.
const KEEP_BUF: usize = 1024;

/// How many queue entries are complete; the session waits on it at an
/// ordering barrier and when too many requests are in flight. The
/// completing side only notifies when the session is actually waiting.
#[derive(Debug, Default)]
pub struct Progress {
    done: AtomicU64,
    waiting: AtomicBool,
    notify: Notify,
}

impl Progress {
    fn advance(&self, done: u64) {
        self.done.store(done, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) {
            self.notify.notify_waiters();
        }
    }

    /// Entries complete so far.
    pub fn done(&self) -> u64 {
        self.done.load(Ordering::SeqCst)
    }

    /// [`Progress::wait_for`] on the heap, for the request path's rare
    /// waits: awaiting it adds a pointer to the caller's future, not the
    /// wait's state (made here, not in the caller, so no copy of it lives
    /// there either).
    pub fn wait_boxed(&self, want: u64) -> std::pin::Pin<Box<impl Future<Output = ()> + '_>> {
        Box::pin(self.wait_for(want))
    }

    /// Wait until `want` entries are complete.
    pub async fn wait_for(&self, want: u64) {
        /// Clears the flag however the wait ends (done, or dropped by a
        /// `select!`), so nobody is notified for nothing.
        struct Waiting<'a>(&'a AtomicBool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.store(false, Ordering::SeqCst);
            }
        }
        let _guard = Waiting(&self.waiting);
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.waiting.store(true, Ordering::SeqCst);
            if self.done() >= want {
                return;
            }
            notified.await;
        }
    }
}

/// One entry of the queue.
enum Entry {
    /// A reply still to come from an upstream connection (`streamed`:
    /// its first part is already in the buffer).
    Wait {
        start: Instant,
        metrics: Arc<CommandMetrics>,
        streamed: bool,
    },
    /// Bytes ready to go. `counted`: a request's entry (out-of-band frames
    /// are not).
    Ready { bytes: Bytes, counted: bool },
    /// Write what is before, then close the client (QUIT, protocol error,
    /// a dedicated connection lost with the client's state).
    Close,
}

/// Where the socket is.
enum Sock {
    /// Before the session attached it.
    Detached,
    /// Replies are written as they complete.
    Open(OwnedWriteHalf),
    /// Full: the session's writer waits until it is writable. `Some` until
    /// the writer takes it.
    Blocked(Option<OwnedWriteHalf>),
    /// Closed, or failed: output is dropped.
    Gone,
}

struct Out {
    sock: Sock,
    /// Sequence number of `entries[0]`.
    base: u64,
    entries: VecDeque<Entry>,
    /// Bytes in queue order, not yet written.
    buf: BytesMut,
    /// Bytes in `buf` and in ready entries: the client's output buffer.
    buffered: usize,
    /// Requests' entries moved to `buf` (and `Close`).
    done: u64,
    /// A `Close` entry was reached: once `buf` is written, close.
    closing: bool,
    /// The session stopped reading requests; its writer ends once
    /// everything is written.
    finished: bool,
    /// Entries from this sequence number on are never written: the client
    /// left while a blocking command waited (Redis drops a blocked client
    /// that disconnects without a reply); the output closes there.
    drop_from: Option<u64>,
}

/// What a session shares with the upstream connections serving it: its
/// output queue and socket, its signals, and its progress.
pub struct ClientShared {
    /// Output buffer limit (bytes): past it the client is disconnected.
    limit: usize,
    /// A reply this large, or 16 times this unwritten, marks the client
    /// [`ClientShared::heavy`].
    lane_reply: usize,
    /// Set once the client got a large reply or left much unread: its
    /// stateless commands then go to an upstream connection of its own,
    /// where its replies delay nobody.
    heavy: AtomicBool,
    out: Mutex<Out>,
    /// Wakes the session's writer: the socket is full, or the output is
    /// finished.
    writer: Notify,
    pub progress: Progress,
    /// Disconnect the client (output buffer limit, lost state).
    pub kill: Signal,
    /// Shutdown: stop reading requests, answer those read, close.
    pub stop: Signal,
    /// Wakes a dedicated connection waiting for the client to read
    /// ([`ClientShared::drained`]); notified only while one waits.
    drain: Notify,
    drain_waiting: AtomicBool,
}

impl std::fmt::Debug for ClientShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ClientShared")
    }
}

/// What the session's writer does next.
enum Step {
    /// Nothing until it is woken again.
    Idle,
    /// Wait until this socket is writable, then hand it back.
    Wait(OwnedWriteHalf),
    /// Everything is written (or the socket is gone): the session ends.
    End,
}

impl ClientShared {
    pub fn new(limit: usize, lane_reply: usize) -> Arc<ClientShared> {
        Arc::new(ClientShared {
            limit,
            lane_reply,
            heavy: AtomicBool::new(false),
            out: Mutex::new(Out {
                sock: Sock::Detached,
                base: 0,
                entries: VecDeque::new(),
                buf: BytesMut::new(),
                buffered: 0,
                done: 0,
                closing: false,
                finished: false,
                drop_from: None,
            }),
            writer: Notify::new(),
            progress: Progress::default(),
            kill: Signal::default(),
            stop: Signal::default(),
            drain: Notify::new(),
            drain_waiting: AtomicBool::new(false),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Out> {
        // Every operation leaves the queue consistent before anything that
        // could panic, so poisoning is ignored.
        self.out.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The socket replies are written to.
    pub fn attach(&self, w: OwnedWriteHalf) {
        let mut o = self.lock();
        if matches!(o.sock, Sock::Detached) {
            o.sock = Sock::Open(w);
        }
    }

    /// An entry for a reply an upstream connection will deliver; returns
    /// its sequence number for [`ClientShared::deliver`].
    pub fn expect(&self, start: Instant, metrics: Arc<CommandMetrics>) -> u64 {
        let mut o = self.lock();
        o.entries.push_back(Entry::Wait {
            start,
            metrics,
            streamed: false,
        });
        o.base + o.entries.len() as u64 - 1
    }

    /// A reply the session made itself, counted in `metrics`.
    pub fn reply(&self, bytes: Bytes, metrics: Option<&CommandMetrics>) {
        if let Some(m) = metrics {
            count(m, &bytes);
        }
        let mut o = self.lock();
        self.push_ready(&mut o, bytes, true);
    }

    /// The client left while entry `seq` (a blocking command) waited: it
    /// and what follows are never written; what came before still is,
    /// then the output closes.
    pub fn drop_from(&self, seq: u64) {
        let mut o = self.lock();
        o.drop_from = Some(seq);
        self.advance(&mut o);
        self.flush_locked(&mut o);
    }

    /// Close the client once everything queued before is written (at
    /// once when that is everything).
    pub fn close(&self) {
        let mut o = self.lock();
        o.entries.push_back(Entry::Close);
        self.advance(&mut o);
        self.flush_locked(&mut o);
    }

    /// A frame that is not a reply to a request (a RESP3 push, or anything
    /// a streaming connection sends): it goes after everything queued.
    pub fn push_frame(&self, bytes: Bytes) {
        let mut o = self.lock();
        self.push_ready(&mut o, bytes, false);
    }

    fn push_ready(&self, o: &mut Out, bytes: Bytes, counted: bool) {
        if matches!(o.sock, Sock::Gone) {
            return;
        }
        self.charge(o, bytes.len());
        o.entries.push_back(Entry::Ready { bytes, counted });
        self.advance(o);
    }

    /// Complete entry `seq` with an upstream's reply (or the error that
    /// took its place), counting it in the entry's metrics.
    pub fn deliver(&self, seq: u64, reply: Reply) {
        self.deliver_at(seq, reply, Instant::now());
    }

    /// [`ClientShared::deliver`] of a reply read at `now` (one clock read
    /// for every reply of an upstream read).
    pub fn deliver_at(&self, seq: u64, reply: Reply, now: Instant) {
        let mut o = self.lock();
        if matches!(o.sock, Sock::Gone) {
            return;
        }
        let Some(i) = seq.checked_sub(o.base) else {
            return;
        };
        let Some(entry) = o.entries.get_mut(i as usize) else {
            return;
        };
        let Entry::Wait {
            start,
            metrics,
            streamed,
        } = entry
        else {
            return;
        };
        metrics
            .duration
            .observe(now.duration_since(*start).as_secs_f64());
        let bytes = match reply {
            // The rest of a reply whose first part went out.
            Ok(b) if *streamed => {
                metrics.ok.inc();
                b
            }
            Ok(b) => {
                count(metrics, &b);
                b
            }
            Err(e) => {
                metrics.err.inc();
                e.to_reply()
            }
        };
        let n = bytes.len();
        *entry = Entry::Ready {
            bytes,
            counted: true,
        };
        self.charge(&mut o, n);
        if i == 0 {
            self.advance(&mut o);
        }
    }

    /// Whether entry `seq` may get its reply in parts now: it is the next
    /// to be written (everything before it is in the buffer).
    pub fn can_stream(&self, seq: u64) -> bool {
        let o = self.lock();
        seq == o.base && matches!(o.entries.front(), Some(Entry::Wait { .. }))
    }

    /// The first part of entry `seq`'s reply (see
    /// [`ClientShared::can_stream`]): it goes in the buffer now, the rest
    /// with [`ClientShared::deliver`] (the end of the reply), or more
    /// parts before that.
    pub fn deliver_part(&self, seq: u64, part: Bytes) {
        let mut o = self.lock();
        if matches!(o.sock, Sock::Gone) || seq != o.base {
            return;
        }
        let Some(Entry::Wait { streamed, .. }) = o.entries.front_mut() else {
            return;
        };
        *streamed = true;
        o.buf.extend_from_slice(&part);
        self.charge(&mut o, part.len());
    }

    /// Complete entry `seq` with an error now (its request failed or was
    /// never sent), and write it.
    pub fn fail(&self, seq: u64, err: crate::wire::error::UpstreamError) {
        self.deliver(seq, Err(err));
        self.flush();
    }

    /// Reply bytes buffered for the client and not yet written.
    pub fn unwritten(&self) -> usize {
        self.lock().buffered
    }

    /// Wait until at most `low` reply bytes are unwritten, or the client
    /// is gone. A connection that serves only this client waits here
    /// instead of reading more from Redis: Redis then holds the rest, as
    /// it would for a slow client of its own.
    pub async fn drained(&self, low: usize) {
        loop {
            let notified = self.drain.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            self.drain_waiting.store(true, Ordering::SeqCst);
            {
                let o = self.lock();
                if o.buffered <= low || matches!(o.sock, Sock::Gone) || self.kill.is_cancelled() {
                    self.drain_waiting.store(false, Ordering::SeqCst);
                    return;
                }
            }
            notified.await;
        }
    }

    /// See [`ClientShared::heavy`] (the field).
    pub fn heavy(&self) -> bool {
        self.heavy.load(Ordering::Relaxed)
    }

    fn charge(&self, o: &mut Out, n: usize) {
        o.buffered += n;
        if (n > self.lane_reply || o.buffered > self.lane_reply.saturating_mul(16))
            && !self.heavy.load(Ordering::Relaxed)
        {
            self.heavy.store(true, Ordering::Relaxed);
        }
        if o.buffered > self.limit && !self.kill.is_cancelled() {
            tracing::warn!(
                buffered = o.buffered,
                limit = self.limit,
                "client output buffer limit reached, disconnecting"
            );
            self.kill.cancel();
        }
    }

    /// Move the ready entries at the front into the buffer.
    fn advance(&self, o: &mut Out) {
        let before = o.done;
        while !o.closing {
            if o.drop_from.is_some_and(|d| o.base >= d) {
                o.closing = true;
                break;
            }
            match o.entries.front() {
                None | Some(Entry::Wait { .. }) => break,
                Some(Entry::Ready { .. }) => {
                    if let Some(Entry::Ready { bytes, counted }) = o.entries.pop_front() {
                        o.buf.extend_from_slice(&bytes);
                        o.done += u64::from(counted);
                    }
                }
                Some(Entry::Close) => {
                    o.entries.pop_front();
                    o.done += 1;
                    o.closing = true;
                }
            }
            o.base += 1;
        }
        if o.done != before {
            self.progress.advance(o.done);
        }
    }

    /// Write the buffer to the socket, as far as it takes it.
    pub fn flush(&self) {
        let mut o = self.lock();
        self.flush_locked(&mut o);
    }

    fn flush_locked(&self, o: &mut Out) {
        if self.drain_waiting.load(Ordering::Relaxed) {
            // Whatever happens below, the waiter looks again.
            self.drain.notify_waiters();
        }
        let Sock::Open(w) = &o.sock else {
            return;
        };
        while !o.buf.is_empty() {
            match w.try_write(&o.buf) {
                Ok(n) if n > 0 => {
                    o.buf.advance(n);
                    o.buffered -= n;
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if let Sock::Open(w) = std::mem::replace(&mut o.sock, Sock::Gone) {
                        o.sock = Sock::Blocked(Some(w));
                    }
                    self.writer.notify_one();
                    return;
                }
                _ => {
                    // The client is gone.
                    o.sock = Sock::Gone;
                    self.kill.cancel();
                    return;
                }
            }
        }
        if o.buf.capacity() > KEEP_BUF {
            o.buf = BytesMut::new();
        }
        if o.closing {
            // Dropping the write half sends FIN after what was written.
            o.sock = Sock::Gone;
            self.kill.cancel();
        } else if o.finished && o.entries.is_empty() {
            self.writer.notify_one();
        }
    }

    /// The session read its last request: its writer ends once every
    /// reply is written.
    pub fn finish(&self) {
        let mut o = self.lock();
        o.finished = true;
        self.flush_locked(&mut o);
        self.writer.notify_one();
    }

    /// Close the socket now, dropping what is not written.
    pub fn shut(&self) {
        self.lock().sock = Sock::Gone;
    }

    fn step(&self) -> Step {
        let mut o = self.lock();
        match &mut o.sock {
            Sock::Gone => Step::End,
            Sock::Blocked(w) => match w.take() {
                Some(w) => Step::Wait(w),
                None => Step::Idle,
            },
            Sock::Open(_) | Sock::Detached => {
                if o.finished && o.entries.is_empty() && o.buf.is_empty() {
                    Step::End
                } else {
                    Step::Idle
                }
            }
        }
    }

    /// The writable socket back from the writer: write what accumulated.
    fn give_back(&self, w: OwnedWriteHalf) {
        let mut o = self.lock();
        if let Sock::Blocked(None) = o.sock {
            o.sock = Sock::Open(w);
            self.flush_locked(&mut o);
        }
    }

    /// The session's writer: writes while the socket is full, and returns
    /// once the session finished and everything is written, or the socket
    /// is gone.
    pub async fn write_loop(&self) {
        loop {
            match self.step() {
                Step::Idle => self.writer.notified().await,
                Step::End => return,
                Step::Wait(w) => {
                    if w.writable().await.is_err() {
                        self.shut();
                        self.kill.cancel();
                        return;
                    }
                    self.give_back(w);
                }
            }
        }
    }
}

/// Count a reply as ok or error in its command's metrics.
pub fn count(m: &CommandMetrics, reply: &[u8]) {
    if crate::wire::is_error(reply) {
        m.err.inc()
    } else {
        m.ok.inc()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::{TcpListener, TcpStream};

    async fn pair() -> (Arc<ClientShared>, TcpStream, tokio::net::tcp::OwnedReadHalf) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        let (r, w) = ours.into_split();
        let c = ClientShared::new(1 << 20, 64 << 10);
        c.attach(w);
        (c, peer, r)
    }

    fn m() -> Arc<CommandMetrics> {
        crate::metrics::Metrics::new().command("get")
    }

    #[tokio::test]
    async fn replies_are_written_in_queue_order_whatever_order_they_complete_in() {
        let (c, mut peer, _r) = pair().await;
        let a = c.expect(Instant::now(), m());
        let b = c.expect(Instant::now(), m());
        c.reply(Bytes::from_static(b"+local\r\n"), None);
        let d = c.expect(Instant::now(), m());
        c.deliver(d, Ok(Bytes::from_static(b":3\r\n")));
        c.deliver(b, Ok(Bytes::from_static(b":2\r\n")));
        c.flush();
        assert_eq!(c.progress.done(), 0, "nothing is complete before a");
        c.deliver(a, Err(crate::wire::error::UpstreamError::Timeout));
        c.flush();
        assert_eq!(c.progress.done(), 4);
        let want = b"-ERR upstream timeout\r\n:2\r\n+local\r\n:3\r\n";
        let mut got = vec![0u8; want.len()];
        peer.read_exact(&mut got).await.unwrap();
        assert_eq!(&got[..], &want[..]);
    }

    #[tokio::test]
    async fn close_writes_what_came_before_then_closes() {
        let (c, mut peer, _r) = pair().await;
        let a = c.expect(Instant::now(), m());
        c.close();
        c.reply(Bytes::from_static(b"+after\r\n"), None);
        c.flush();
        assert!(!c.kill.is_cancelled());
        c.deliver(a, Ok(Bytes::from_static(b"+OK\r\n")));
        c.flush();
        assert!(c.kill.is_cancelled());
        let mut got = Vec::new();
        peer.read_to_end(&mut got).await.unwrap();
        assert_eq!(&got[..], b"+OK\r\n", "nothing after Close is written");
    }

    #[tokio::test]
    async fn a_client_that_does_not_read_is_cut_off_at_the_limit() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _peer = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (ours, _) = l.accept().await.unwrap();
        let (_r, w) = ours.into_split();
        let c = ClientShared::new(64 * 1024, 64 << 10);
        c.attach(w);
        let chunk = Bytes::from(vec![b'x'; 16 * 1024]);
        // The socket buffers take a few MiB first; then the output buffer
        // fills up to the limit.
        for _ in 0..4096 {
            c.push_frame(chunk.clone());
            c.flush();
            if c.kill.is_cancelled() {
                break;
            }
        }
        assert!(c.kill.is_cancelled());
        let o = c.lock();
        assert!(matches!(o.sock, Sock::Blocked(_)));
        assert!(o.buffered <= 64 * 1024 + chunk.len());
    }
}
