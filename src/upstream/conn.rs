//! One upstream connection: connect and handshake (HELLO, AUTH, SELECT,
//! CLIENT SETNAME), then [`serve`]: a writer that batches queued jobs into
//! few writes (auto-pipelining) and a reader that matches replies to jobs in
//! FIFO order.
//!
//! Failure rules (design principle 3): when the connection breaks or a reply
//! is late past the command timeout, every job whose bytes may have been
//! written gets [`UpstreamError::ConnectionLost`] or
//! [`UpstreamError::Timeout`]; jobs still queued were never sent and stay
//! queued for the next connection.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use redis_protocol::resp3::types::OwnedFrame as Frame3;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use super::url::UpstreamUrl;
use super::{ClientShared, Identity, Job, JobKind, Oob, Plan, Reply, UpstreamError};
use crate::metrics::Metrics;
use crate::protocol::{ReplyScanner, encode_command, scan};

/// Writes are batched up to this many bytes: enough to amortise a syscall
/// over hundreds of small commands without holding a large buffer per
/// connection.
const WRITE_BATCH: usize = 64 * 1024;
/// Payloads above this are written directly instead of being copied.
const DIRECT_WRITE: usize = 16 * 1024;

/// Settings every upstream connection uses.
#[derive(Clone, Debug)]
pub struct ConnSettings {
    pub connect_timeout: Duration,
    pub command_timeout: Duration,
    pub queue_timeout: Duration,
    /// Largest single reply line or bulk accepted from the upstream.
    pub max_reply_bulk: usize,
}

/// A connection that passed its handshake.
#[derive(Debug)]
pub struct Connected {
    stream: TcpStream,
    rbuf: BytesMut,
    /// `version` from the upstream's HELLO reply.
    pub server_version: String,
}

impl Connected {
    /// The socket and any bytes already read past the handshake.
    pub fn into_parts(self) -> (TcpStream, BytesMut) {
        (self.stream, self.rbuf)
    }
}

/// Connect and run the handshake for `ident`. Errors never contain the
/// password: the address is host and port only.
pub async fn connect(
    url: &UpstreamUrl,
    ident: &Identity,
    client_name: Option<&Bytes>,
    settings: &ConnSettings,
) -> Result<Connected, UpstreamError> {
    let addr = url.addr();
    let fut = async {
        let mut stream = TcpStream::connect(&addr)
            .await
            .map_err(|e| UpstreamError::Unavailable(format!("connect to {addr}: {e}")))?;
        stream.set_nodelay(true).ok();
        // AUTH goes first, exactly as the client gave it (one argument when
        // it gave no user: Redis answers that form differently), then HELLO
        // for the protocol, then SELECT and CLIENT SETNAME.
        let creds: Option<(Option<Bytes>, Bytes)> = match &ident.auth {
            Some(a) => Some((a.user.clone(), a.password.clone())),
            None => url.password.as_ref().map(|p| {
                (
                    url.user.clone().map(Bytes::from),
                    Bytes::copy_from_slice(p.expose().as_bytes()),
                )
            }),
        };
        let has_creds = creds.is_some();
        let mut out = BytesMut::new();
        let mut expected = 1;
        if let Some((user, pass)) = creds {
            let mut auth = vec![Bytes::from_static(b"AUTH")];
            auth.extend(user);
            auth.push(pass);
            out.extend_from_slice(&encode_command(&auth));
            expected += 1;
        }
        out.extend_from_slice(&encode_command(&[
            &b"HELLO"[..],
            ident.proto.number().to_string().as_bytes(),
        ]));
        let hello_at = expected - 1;
        if ident.db != 0 {
            out.extend_from_slice(&encode_command(&[
                &b"SELECT"[..],
                ident.db.to_string().as_bytes(),
            ]));
            expected += 1;
        }
        if let Some(name) = client_name {
            out.extend_from_slice(&encode_command(&[&b"CLIENT"[..], b"SETNAME", name]));
            expected += 1;
        }
        stream
            .write_all(&out)
            .await
            .map_err(|e| UpstreamError::Unavailable(format!("handshake with {addr}: {e}")))?;
        let mut rbuf = BytesMut::with_capacity(4096);
        let mut scanner = ReplyScanner::new(settings.max_reply_bulk);
        let mut replies = Vec::new();
        while replies.len() < expected {
            match scanner.next(&mut rbuf) {
                Ok(Some(f)) => replies.push(f),
                Ok(None) => {
                    let n = stream.read_buf(&mut rbuf).await.map_err(|e| {
                        UpstreamError::Unavailable(format!("handshake with {addr}: {e}"))
                    })?;
                    if n == 0 {
                        return Err(UpstreamError::Unavailable(format!(
                            "{addr} closed the connection during the handshake"
                        )));
                    }
                }
                Err(e) => return Err(UpstreamError::Protocol(e.to_string())),
            }
        }
        let mut server_version = String::new();
        for (i, r) in replies.iter().enumerate() {
            if crate::protocol::is_error(r) {
                let msg = error_text(r);
                // Without credentials, a NOAUTH to HELLO leaves a usable
                // connection on which every command gets Redis's own NOAUTH,
                // until the client authenticates (a new identity).
                if i == hello_at && !has_creds && msg.starts_with("NOAUTH") {
                    continue;
                }
                return Err(UpstreamError::Refused(msg));
            }
            if i == hello_at {
                server_version = hello_field(r, "version").unwrap_or_default();
            }
        }
        Ok(Connected {
            stream,
            rbuf,
            server_version,
        })
    };
    tokio::time::timeout(settings.connect_timeout, fut)
        .await
        .map_err(|_| UpstreamError::Unavailable(format!("connect to {addr}: timed out")))?
}

/// The text of an error reply, without its type byte and CRLF.
pub fn error_text(reply: &[u8]) -> String {
    let body = reply.get(1..).unwrap_or_default();
    let body = match reply.first() {
        // Blob error: `!<len>\r\n<text>\r\n`
        Some(b'!') => body.splitn(2, |&b| b == b'\n').nth(1).unwrap_or_default(),
        _ => body,
    };
    String::from_utf8_lossy(body).trim_end().to_string()
}

/// A string field of a HELLO reply (RESP3 map or RESP2 flat array).
fn hello_field(reply: &[u8], key: &str) -> Option<String> {
    let (frame, _) = redis_protocol::resp3::decode::complete::decode(reply).ok()??;
    let text = |f: &Frame3| match f {
        Frame3::BlobString { data, .. } | Frame3::SimpleString { data, .. } => {
            Some(String::from_utf8_lossy(data).into_owned())
        }
        _ => None,
    };
    match frame {
        Frame3::Map { data, .. } => data
            .iter()
            .find(|(k, _)| text(k).as_deref() == Some(key))
            .and_then(|(_, v)| text(v)),
        Frame3::Array { data, .. } => data
            .chunks(2)
            .find(|kv| text(&kv[0]).as_deref() == Some(key))
            .and_then(|kv| kv.get(1).and_then(text)),
        _ => None,
    }
}

/// A job whose bytes were handed to the socket, waiting for its replies.
struct Pending {
    plan: Plan,
    got: u32,
    keep: Option<Bytes>,
    tx: Option<oneshot::Sender<Reply>>,
    client: Arc<ClientShared>,
    /// Reply deadline; `None` for blocking commands.
    deadline: Option<Instant>,
    /// Marker: from here on the connection streams.
    start_stream: bool,
}

impl Pending {
    fn fail(mut self, err: &UpstreamError) {
        if let Some(tx) = self.tx.take() {
            let _ = tx.send(Err(err.clone()));
        }
    }
}

type Fifo = Arc<Mutex<VecDeque<Pending>>>;

fn lock(f: &Fifo) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
    // A panic elsewhere while holding the lock leaves a consistent queue
    // (every operation is a single push/pop), so poisoning is ignored.
    f.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Why [`serve`] returned.
#[derive(Debug, PartialEq, Eq)]
pub enum End {
    /// Every job sender is gone: nothing more will come.
    Closed,
    /// The connection failed; in-flight jobs got this error.
    Failed(UpstreamError),
}

/// Run one connection until it fails or the job channel closes. `backlog`
/// holds jobs taken off the channel while no connection existed; they are
/// written first.
pub async fn serve(
    conn: Connected,
    backlog: &mut VecDeque<Job>,
    rx: &mut mpsc::Receiver<Job>,
    settings: &ConnSettings,
    oob: Option<&Oob>,
    metrics: &Metrics,
) -> End {
    let Connected { stream, rbuf, .. } = conn;
    let (r, w) = stream.into_split();
    let fifo: Fifo = Arc::new(Mutex::new(VecDeque::new()));
    let end = tokio::select! {
        e = write_loop(w, backlog, rx, &fifo, settings) => e,
        e = read_loop(r, rbuf, &fifo, settings, oob, metrics) => End::Failed(e),
    };
    let err = match &end {
        End::Failed(e) => e.clone(),
        End::Closed => UpstreamError::ConnectionLost,
    };
    let pending: Vec<Pending> = lock(&fifo).drain(..).collect();
    for p in pending {
        p.fail(&err);
    }
    end
}

async fn write_loop(
    mut w: OwnedWriteHalf,
    backlog: &mut VecDeque<Job>,
    rx: &mut mpsc::Receiver<Job>,
    fifo: &Fifo,
    settings: &ConnSettings,
) -> End {
    let mut wbuf = BytesMut::with_capacity(WRITE_BATCH);
    loop {
        let job = match backlog.pop_front() {
            Some(j) => j,
            None => match rx.recv().await {
                Some(j) => j,
                // Senders are dropped only once nobody waits for a reply
                // (the session ended, or the pool shut down after draining).
                None => return End::Closed,
            },
        };
        // Let the other ready tasks (sessions with requests already read)
        // run once before writing: their jobs join this batch, so many
        // clients' commands cost one write instead of one each.
        if rx.is_empty() && backlog.is_empty() {
            tokio::task::yield_now().await;
        }
        let mut next = Some(job);
        while let Some(job) = next.take() {
            let payload = enqueue(job, fifo, settings);
            if payload.len() >= DIRECT_WRITE {
                if !wbuf.is_empty() {
                    if let Err(e) = w.write_all(&wbuf).await {
                        return End::Failed(write_error(e));
                    }
                    wbuf.clear();
                }
                if let Err(e) = w.write_all(&payload).await {
                    return End::Failed(write_error(e));
                }
            } else {
                wbuf.extend_from_slice(&payload);
            }
            if wbuf.len() < WRITE_BATCH {
                next = backlog.pop_front().or_else(|| rx.try_recv().ok());
            }
        }
        if !wbuf.is_empty() {
            if let Err(e) = w.write_all(&wbuf).await {
                return End::Failed(write_error(e));
            }
            wbuf.clear();
        }
    }
}

fn write_error(e: std::io::Error) -> UpstreamError {
    tracing::debug!(error = %e, "upstream write failed");
    UpstreamError::ConnectionLost
}

/// Record a job in the FIFO (before its bytes are written) and return them.
fn enqueue(job: Job, fifo: &Fifo, settings: &ConnSettings) -> Bytes {
    let pending = match job.kind {
        JobKind::Request { plan, tx, blocking } => Some(Pending {
            plan,
            got: 0,
            keep: None,
            tx: Some(tx),
            client: job.client,
            deadline: (!blocking).then(|| Instant::now() + settings.command_timeout),
            start_stream: false,
        }),
        JobKind::StartStream => Some(Pending {
            plan: Plan::single(),
            got: 0,
            keep: None,
            tx: None,
            client: job.client,
            deadline: None,
            start_stream: true,
        }),
        JobKind::Stream => None,
    };
    if let Some(p) = pending {
        lock(fifo).push_back(p);
    }
    job.payload
}

async fn read_loop(
    mut r: OwnedReadHalf,
    mut rbuf: BytesMut,
    fifo: &Fifo,
    settings: &ConnSettings,
    oob: Option<&Oob>,
    metrics: &Metrics,
) -> UpstreamError {
    let mut scanner = ReplyScanner::new(settings.max_reply_bulk);
    let mut streaming = false;
    // Deadlines are checked on a tick rather than per request: one timer
    // per connection instead of one per command.
    let tick_every =
        (settings.command_timeout / 4).clamp(Duration::from_millis(10), Duration::from_millis(250));
    let mut tick = tokio::time::interval(tick_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        loop {
            match scanner.next(&mut rbuf) {
                Ok(Some(frame)) => {
                    if let Err(e) = dispatch(frame, fifo, &mut streaming, oob, metrics, settings) {
                        return e;
                    }
                }
                Ok(None) => break,
                Err(e) => {
                    metrics.protocol_error(e.kind());
                    return UpstreamError::Protocol(e.to_string());
                }
            }
        }
        tokio::select! {
            n = r.read_buf(&mut rbuf) => match n {
                Ok(0) => return UpstreamError::ConnectionLost,
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "upstream read failed");
                    return UpstreamError::ConnectionLost;
                }
            },
            _ = tick.tick() => {
                let late = lock(fifo).front().and_then(|p| p.deadline).is_some_and(|d| d <= Instant::now());
                if late {
                    tracing::warn!(timeout = ?settings.command_timeout, "upstream reply timed out, closing the connection");
                    return UpstreamError::Timeout;
                }
            }
        }
    }
}

/// Route one reply frame: to the job at the front of the FIFO, or to the
/// client directly when it is a push or the connection streams.
fn dispatch(
    frame: Bytes,
    fifo: &Fifo,
    streaming: &mut bool,
    oob: Option<&Oob>,
    metrics: &Metrics,
    settings: &ConnSettings,
) -> Result<(), UpstreamError> {
    let mut q = lock(fifo);
    while !*streaming && q.front().is_some_and(|p| p.start_stream) {
        q.pop_front();
        *streaming = true;
    }
    if *streaming || frame.first() == Some(&b'>') {
        drop(q);
        match oob {
            Some(o) => o.send(frame),
            // A push on a shared connection has no owner (shared connections
            // never subscribe or track); it is dropped and counted.
            None => metrics.protocol_error("unexpected_push"),
        }
        return Ok(());
    }
    let Some(front) = q.front_mut() else {
        metrics.protocol_error("unsolicited_reply");
        return Err(UpstreamError::Protocol("reply without a request".into()));
    };
    if front.got == front.plan.forward {
        front.keep = Some(frame);
    } else if crate::protocol::is_error(&frame) {
        tracing::debug!(error = %error_text(&frame), "injected command failed");
    }
    front.got += 1;
    if front.got < front.plan.replies {
        return Ok(());
    }
    let Some(mut done) = q.pop_front() else {
        return Ok(());
    };
    if let Some(next) = q.front_mut()
        && let Some(d) = next.deadline.as_mut()
    {
        // The next reply's clock starts when it reaches the front, so a
        // command queued behind a blocking one is not timed out by it.
        *d = (*d).max(Instant::now() + settings.command_timeout);
    }
    drop(q);
    let reply = done.keep.take().unwrap_or_default();
    let reply = if done.plan.strip_exec.is_empty() {
        reply
    } else {
        strip_exec(&reply, &done.plan.strip_exec)
    };
    done.client.charge(reply.len());
    if let Some(tx) = done.tx.take() {
        // The client may be gone; its reply is then dropped.
        let _ = tx.send(Ok(reply));
    }
    Ok(())
}

/// Remove the replies of injected commands from an EXEC array. A null or
/// error EXEC reply (aborted transaction) passes unchanged.
pub fn strip_exec(reply: &Bytes, drop: &[u32]) -> Bytes {
    let Some(ranges) = scan::split_array(reply) else {
        return reply.clone();
    };
    let kept: Vec<&(usize, usize)> = ranges
        .iter()
        .enumerate()
        .filter(|(i, _)| !drop.contains(&(*i as u32)))
        .map(|(_, r)| r)
        .collect();
    let mut out = BytesMut::with_capacity(reply.len());
    scan::push_header(&mut out, b'*', kept.len());
    for &&(s, e) in &kept {
        out.extend_from_slice(&reply[s..e]);
    }
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strips_injected_exec_elements() {
        let r = Bytes::from_static(b"*3\r\n+OK\r\n:1\r\n$1\r\nv\r\n");
        assert_eq!(&strip_exec(&r, &[1])[..], b"*2\r\n+OK\r\n$1\r\nv\r\n");
        let null = Bytes::from_static(b"*-1\r\n");
        assert_eq!(strip_exec(&null, &[0]), null);
        assert_eq!(error_text(b"-WRONGPASS bad\r\n"), "WRONGPASS bad");
        assert_eq!(error_text(b"!5\r\nERR x\r\n"), "ERR x");
    }
}
