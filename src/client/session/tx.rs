//! Transactions: MULTI, the commands queued in it, EXEC and DISCARD,
//! and what the sidecar answers into the transaction itself.

use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::CommandMetrics;
use crate::request::command::{Class, Local, Pin};
use crate::request::exchange::{Exchange, TxItem};
use crate::wire::Value;

use super::*;

/// Commands that are queued inside MULTI (the others run at once).
pub(super) fn is_unwatch(args: &[Bytes]) -> bool {
    args.first()
        .is_some_and(|a| a.eq_ignore_ascii_case(b"unwatch"))
}

pub(super) fn queued_in_tx(class: Class) -> bool {
    !matches!(
        class,
        Class::Local(Local::Quit | Local::Reset)
            | Class::Pin(Pin::Multi | Pin::Watch | Pin::EndTransaction)
    )
}

impl Session {
    /// Inside MULTI: commands are queued on the dedicated connection;
    /// those the sidecar answers are answered into the EXEC array.
    pub(super) async fn route_tx(
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
                        let answer = v.encode(self.st.proto);
                        self.answer_into_tx(answer, metrics).await;
                        if std::mem::take(&mut self.kill_self) {
                            self.close().await;
                            return Flow::Stop;
                        }
                        return Flow::Next;
                    }
                }
            }
            Class::Local(Local::Auth) if self.shared.client_auth.is_some() => {
                let args = ex.args().to_vec();
                let answer = self.sidecar_auth(&args);
                self.answer_into_tx(answer, metrics).await;
                return Flow::Next;
            }
            Class::Local(l @ (Local::Select | Local::Auth | Local::ClientSetName)) => {
                Change::parse(l, ex.args())
            }
            Class::Local(Local::Hello) => match parse_hello(ex.args()) {
                Ok(mut h) => {
                    // With [client_auth] the credentials are checked here
                    // and never queued upstream.
                    if let Some(ca) = self.shared.client_auth.clone()
                        && let Some(a) = h.auth.take()
                    {
                        let Some(u) = ca.check(a.user.as_deref(), &a.password) else {
                            let answer = Bytes::from_static(WRONGPASS);
                            self.answer_into_tx(answer, metrics).await;
                            return Flow::Next;
                        };
                        self.st.client_user = Some(u);
                        let args = hello_without_auth(ex.args());
                        ex.rewrite(args);
                    }
                    Some(Change::Hello(h))
                }
                Err(_) => None,
            },
            // Queued as sent.
            Class::Local(Local::Unsubscribe) => None,
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
                if name == b"discard" && self.multi_unsent() {
                    self.transition(Event::EndTransaction);
                    self.reply(Value::Simple("OK"), metrics).await;
                    return Flow::Next;
                }
                if name == b"discard" {
                    self.transition(Event::EndTransaction);
                    return self.send_job(Target::Dedicated, ex, false, metrics).await;
                }
                None
            }
            Class::Pin(Pin::Sticky) => {
                if let Err(e) = self.map_redirect(&mut ex).await {
                    self.now(e, Some(metrics)).await;
                    return Flow::Next;
                }
                self.transition(Event::Pin);
                None
            }
            Class::Pin(Pin::Stream | Pin::Blocking | Pin::Replica) | Class::Forward => None,
        };
        if let Some(flow) = self.send_held_multi(metrics).await {
            return flow;
        }
        let mut item = ex.tx_item();
        if let (Some(Change::Hello(h)), TxItem::Queued { replace, .. }) = (&change, &mut item) {
            // The sidecar's HELLO answer, as outside the transaction.
            *replace = Some(self.hello_reply(h.proto.unwrap_or(self.st.proto)));
        }
        if let Mode::Transaction(tx) = &mut self.mode {
            if let TxItem::Queued {
                appended, action, ..
            } = &item
                && (*appended > 0 || action.is_some() || matches!(change, Some(Change::Hello(_))))
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
    pub(super) async fn exec(&mut self, mut ex: Exchange, metrics: &Arc<CommandMetrics>) -> Flow {
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
            multi_unsent,
        } = *tx;
        self.mode = if pinned { Mode::Pinned } else { Mode::Normal };
        self.update_holds_state();
        if multi_unsent && let Err(UpstreamError::Busy(msg)) = self.ensure_dedicated().await {
            // Redis refuses EXEC itself while busy, and says why.
            let v = Value::error(format!("EXECABORT Transaction discarded because of: {msg}"));
            self.reply(v, metrics).await;
            return Flow::Next;
        }
        if refused {
            return self.abort_exec(metrics).await;
        }
        if multi_unsent {
            // Nothing was queued: an empty transaction, as Redis runs it.
            self.reply(Value::Array(Vec::new()), metrics).await;
            return Flow::Next;
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

    /// A command the sidecar answers inside MULTI: the client gets
    /// `+QUEUED`, and `answer` takes the command's place in the EXEC array.
    pub(super) async fn answer_into_tx(&mut self, answer: Bytes, metrics: &Arc<CommandMetrics>) {
        if let Mode::Transaction(tx) = &mut self.mode {
            tx.items.push(TxItem::Answered(answer));
            tx.rebuild = true;
        }
        self.now(Bytes::from_static(b"+QUEUED\r\n"), Some(metrics))
            .await;
    }

    fn multi_unsent(&self) -> bool {
        matches!(&self.mode, Mode::Transaction(tx) if tx.multi_unsent)
    }

    /// A command queued after a MULTI answered while Redis was busy: the
    /// MULTI goes first once the connection can be set up (`None`: go on
    /// queueing); while Redis is still busy the command gets Redis's
    /// `-BUSY` and EXEC will answer EXECABORT, as on Redis.
    async fn send_held_multi(&mut self, metrics: &Arc<CommandMetrics>) -> Option<Flow> {
        if !self.multi_unsent() {
            return None;
        }
        let refused = match self.ensure_dedicated().await {
            Ok(()) => None,
            Err(UpstreamError::Busy(msg)) => Some(Bytes::from(format!("-{msg}\r\n"))),
            Err(e) => Some(e.to_reply()),
        };
        if let Mode::Transaction(tx) = &mut self.mode {
            match refused {
                Some(_) => tx.refused = true,
                None => tx.multi_unsent = false,
            }
        }
        match refused {
            Some(reply) => {
                self.now(reply, Some(metrics)).await;
                Some(Flow::Next)
            }
            None => {
                if let Some(d) = &self.dedicated {
                    let job = self.unanswered(Exchange::command(&[&b"MULTI"[..]]));
                    let _ = d.tx.send(job).await;
                }
                None
            }
        }
    }

    /// EXEC after a refused command: discard upstream, answer EXECABORT.
    pub(super) async fn abort_exec(&mut self, metrics: &Arc<CommandMetrics>) -> Flow {
        self.discard_upstream().await;
        self.reply(
            Value::error("EXECABORT Transaction discarded because of previous errors."),
            metrics,
        )
        .await;
        Flow::Next
    }

    /// End the open transaction without running it (an EXEC or DISCARD
    /// a stage refused): DISCARD upstream, the client gets `reply`.
    pub(super) async fn discard_tx(&mut self, reply: Bytes, metrics: &Arc<CommandMetrics>) -> Flow {
        self.transition(Event::EndTransaction);
        self.discard_upstream().await;
        self.now(reply, Some(metrics)).await;
        self.publish();
        Flow::Next
    }

    /// Send DISCARD on the dedicated connection; its reply is consumed.
    pub(super) async fn discard_upstream(&mut self) {
        if let Some(d) = &self.dedicated {
            let job = self.unanswered(Exchange::command(&[&b"DISCARD"[..]]));
            let _ = d.tx.send(job).await;
        }
    }
}
