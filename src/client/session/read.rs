//! The read loop: bytes from the client socket framed into requests, and
//! backpressure (a client whose output queue or pipeline is full is not
//! read until there is room again); how a session ends.

use std::mem::MaybeUninit;
use std::task::Poll;

use tokio::io::{AsyncRead, ReadBuf};
use tokio::net::tcp::OwnedReadHalf;

use super::*;

impl Session {
    pub(super) async fn read_loop(&mut self, mut r: OwnedReadHalf) {
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
    pub(super) fn client_left(&mut self) {
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
    pub(super) async fn protocol_error(&mut self, e: crate::wire::ProtocolError) {
        self.shared.metrics.protocol_error(e.kind());
        tracing::debug!(client = self.entry.id, error = %e, "protocol error from client");
        if let Some(reply) = e.client_reply() {
            self.now(reply, None).await;
        }
        self.close().await;
    }

    /// Wait while the client has too many requests in flight (a client
    /// that pipelines without end is held back, not buffered without end).
    pub(super) async fn wait_for_room(&mut self) {
        let max = self.shared.limits.max_inflight.max(1) as u64;
        if self.queued >= self.entry.client.progress.done() + max {
            self.entry.client.flush();
            let want = self.queued + 1 - max;
            // Boxed: rare, and inline it would enlarge the per-request future.
            self.entry.client.progress.wait_boxed(want).await;
        }
        self.queued += 1;
    }
}
