//! A streaming client (subscribed, MONITOR, CLIENT REPLY OFF/SKIP):
//! forwarded as sent, its replies and messages stream back; the sidecar's
//! own replies keep their place behind a marked PING.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;

use crate::metrics::CommandMetrics;
use crate::request::command::{Class, Local, Pin};
use crate::request::exchange::Exchange;
use crate::upstream::{Hop, Job, JobKind, Mark};
use crate::wire::encode_command;

use super::*;
use crate::upstream::conn::SelectAs;

impl Session {
    /// A reply the sidecar made itself for a client whose dedicated
    /// connection streams: it goes to the client in the place of a marked
    /// PING sent upstream, so after the replies to everything forwarded
    /// before it (queued at once, it would overtake them); and, as Redis,
    /// not at all while the client has replies off or skips this one (a
    /// skip is used up upstream by a PING, whose reply Redis skips).
    /// `wait`: return once it is queued. `Err`: not streaming (or a
    /// replica's unparsed stream), queue it as usual.
    pub(super) async fn stream_reply(&mut self, reply: Bytes, wait: bool) -> Result<(), Bytes> {
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

    /// Subscribed (or MONITOR, CLIENT REPLY): forwarded as it is, replies
    /// and messages stream to the client. Stages may answer, refuse or
    /// delay; commands they append are not sent (no reply could be told
    /// from a message).
    pub(super) async fn route_streaming(
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
            Class::Local(Local::Auth) if self.shared.client_auth.is_some() => {
                let reply = self.sidecar_auth(ex.args());
                self.now(reply, Some(metrics)).await;
                return Flow::Next;
            }
            Class::Local(l @ (Local::Select | Local::ClientSetName | Local::Auth))
                if self.runs_commands() =>
            {
                if let Some(change) = Change::parse(l, ex.args()) {
                    self.apply(change);
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
                        return Flow::Next;
                    };
                    self.st.client_user = Some(u);
                    ex.rewrite(hello_without_auth(ex.args()));
                }
                if self.runs_commands() {
                    let old = self.st.proto;
                    let can_skip = matches!(&self.mode, Mode::Streaming(subs)
                        if subs.can_append(old) && subs.replies == Replies::On);
                    if can_skip {
                        // The client gets the sidecar's HELLO answer (its
                        // own id, one standalone Redis), as outside a
                        // stream: Redis's reply is skipped. New
                        // credentials are checked first with a handshake
                        // of their own, so a refusal is still the client's.
                        if let Some(a) = &h.auth {
                            let mut ident = self.identity();
                            ident.proto = h.proto.unwrap_or(old);
                            ident.auth = Some(a.clone());
                            if let Err(e) = self.shared.pool.verify(&ident, SelectAs::Either).await
                            {
                                if let Err(reply) = self.stream_reply(e.to_reply(), false).await {
                                    self.now(reply, Some(metrics)).await;
                                }
                                return Flow::Next;
                            }
                        }
                        let mut payload = bytes::BytesMut::from(
                            &encode_command(&["CLIENT", "REPLY", "SKIP"])[..],
                        );
                        payload.extend_from_slice(&ex.into_command());
                        if let Flow::Stop = self
                            .send_stream(payload.freeze(), JobKind::Stream, metrics)
                            .await
                        {
                            return Flow::Stop;
                        }
                        self.apply(Change::Hello(h));
                        let reply = self.hello_reply(self.st.proto);
                        if let Err(reply) = self.stream_reply(reply, false).await {
                            self.now(reply, Some(metrics)).await;
                        }
                        return Flow::Next;
                    }
                    self.apply(Change::Hello(h));
                }
            }
            Class::Pin(Pin::Sticky) => {
                if let Err(e) = self.map_redirect(&mut ex).await {
                    self.now(e, Some(metrics)).await;
                    return Flow::Next;
                }
            }
            _ => {}
        }
        self.forward_streaming(ex, metrics).await
    }

    /// Whether Redis runs any command on this client's stream: in RESP3,
    /// or when not subscribed (CLIENT REPLY, MONITOR); in RESP2 while
    /// subscribed it refuses all but the subscription commands.
    pub(super) fn runs_commands(&self) -> bool {
        match &self.mode {
            Mode::Streaming(subs) => subs.runs_commands(self.st.proto),
            _ => true,
        }
    }

    /// Forward a command on the stream, with what stages appended (each
    /// behind `CLIENT REPLY SKIP`, so their replies never reach the
    /// client; where they cannot run, not sent).
    pub(super) async fn forward_streaming(
        &mut self,
        ex: Exchange,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        self.note_subscriptions(ex.args());
        let proto = self.st.proto;
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
    pub(super) fn note_subscriptions(&mut self, args: &[Bytes]) {
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

    /// Send on a streaming dedicated connection; replies arrive as pushes.
    pub(super) async fn send_stream(
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
        Flow::Next
    }

    /// A job for the client's streaming connection (no reply entry).
    pub(super) fn stream_job(&self, payload: Bytes, kind: JobKind) -> Job {
        Job {
            payload,
            kind,
            client: self.entry.client.clone(),
            enqueued: Instant::now(),
            hop: Hop::default(),
        }
    }
}
