//! The connection-state commands (SELECT, AUTH, HELLO, CLIENT SETNAME,
//! RESET, QUIT) outside a transaction, and the identity they change.

use std::sync::Arc;

use bytes::Bytes;

use crate::metrics::CommandMetrics;
use crate::request::command::Local;
use crate::request::exchange::Exchange;
use crate::upstream::{Auth, URL_DB};
use crate::wire::scan::parse_int;
use crate::wire::{Proto, Value};

use super::*;
use crate::upstream::conn::SelectAs;

pub(super) const WRONGPASS: &[u8] =
    b"-WRONGPASS invalid username-password pair or user is disabled.\r\n";
pub(super) const HELLO_NOAUTH: &[u8] = b"-NOAUTH HELLO must be called with the client already authenticated, otherwise the HELLO AUTH <user> <pass> option can be used to authenticate the client and select the RESP protocol version at the same time\r\n";

/// `HELLO` as the client sent it, without its `AUTH user pass`.
pub(super) fn hello_without_auth(args: &[Bytes]) -> Vec<Bytes> {
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

/// AUTH [user] password.
pub(super) fn parse_auth(args: &[Bytes]) -> Result<Auth, ()> {
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
pub(super) fn parse_hello(args: &[Bytes]) -> Result<Hello, Value> {
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

/// The client's connection state as Redis keeps it per connection.
#[derive(Clone, Debug)]
pub(super) struct ConnState {
    pub(super) proto: Proto,
    /// The selected db, or [`URL_DB`] (the endpoint URL's).
    pub(super) db: i64,
    /// Credentials given to the upstream (`None`: the URL's).
    pub(super) auth: Option<Auth>,
    pub(super) name: Option<Bytes>,
    /// With `[client_auth]`: the user the client authenticated to the
    /// sidecar as, by its index in the `ClientAuth` (`None`: not yet; every
    /// command but AUTH, HELLO, QUIT and RESET gets NOAUTH).
    pub(super) client_user: Option<u32>,
}

impl Default for ConnState {
    fn default() -> ConnState {
        ConnState {
            proto: Proto::Resp2,
            db: URL_DB,
            auth: None,
            name: None,
            client_user: None,
        }
    }
}

impl Session {
    /// RESET, in every mode: the connection state back to the default (a
    /// client of `[client_auth]` signed out, as Redis does with
    /// requirepass), the mode back to normal, and every connection cached
    /// for the old identity dropped: the dedicated one (closing it ends
    /// MULTI, WATCH, subscriptions and tracking upstream; a stream stops
    /// at once, no message may follow +RESET), the shared set and a
    /// cluster's node connections.
    /// The HELLO map the client gets, in `proto`: the sidecar is one
    /// standalone Redis (in front of a cluster too), the id its own.
    pub(super) fn hello_reply(&self, proto: Proto) -> Bytes {
        let version = self.shared.pool.server_version();
        Value::Map(vec![
            (Value::bulk("server"), Value::bulk("redis")),
            (Value::bulk("version"), Value::bulk(version)),
            (Value::bulk("proto"), Value::Int(proto.number())),
            (Value::bulk("id"), Value::Int(self.entry.id as i64)),
            (Value::bulk("mode"), Value::bulk("standalone")),
            (Value::bulk("role"), Value::bulk("master")),
            (Value::bulk("modules"), Value::Array(Vec::new())),
        ])
        .encode(proto)
    }

    pub(super) fn reset(&mut self) {
        let streaming = matches!(self.mode, Mode::Streaming(_));
        self.drop_dedicated(streaming);
        self.st = ConnState::default();
        self.transition(Event::Reset);
        self.identity_changed();
    }

    pub(super) async fn local(
        &mut self,
        local: Local,
        ex: Exchange,
        metrics: &Arc<CommandMetrics>,
    ) -> Flow {
        let args = ex.args();
        let arity_err = |name: &str| {
            Value::error(format!(
                "ERR wrong number of arguments for '{name}' command"
            ))
        };
        match local {
            Local::Unsubscribe => {
                // Not subscribed (a subscribed client streams): Redis's
                // reply for each channel named, or one without a channel,
                // each with a count of 0.
                let kind = args
                    .first()
                    .map(|a| Bytes::from(a.to_ascii_lowercase()))
                    .unwrap_or_default();
                let proto = self.st.proto;
                let one = |ch: Value| {
                    Value::Push(vec![Value::Bulk(kind.clone()), ch, Value::Int(0)]).encode(proto)
                };
                let mut out = BytesMut::new();
                if args.len() < 2 {
                    out.extend_from_slice(&one(Value::Null));
                }
                for ch in args.iter().skip(1) {
                    out.extend_from_slice(&one(Value::Bulk(ch.clone())));
                }
                self.now(out.freeze(), Some(metrics)).await;
                Flow::Next
            }
            Local::Quit => {
                self.reply(Value::Simple("OK"), metrics).await;
                self.close().await;
                Flow::Stop
            }
            Local::Reset => {
                self.reset();
                self.reply(Value::Simple("RESET"), metrics).await;
                Flow::Next
            }
            Local::ClientSetName => {
                let name = match args {
                    [_, _, n] if n.iter().any(|&c| c <= b' ' || c > b'~') => {
                        let v = Value::error(
                            "ERR Client names cannot contain spaces, newlines or special characters.",
                        );
                        self.reply(v, metrics).await;
                        return Flow::Next;
                    }
                    [_, _, n] => n.clone(),
                    _ => {
                        self.reply(arity_err("client|setname"), metrics).await;
                        return Flow::Next;
                    }
                };
                let upstream = vec![
                    Bytes::from_static(b"CLIENT"),
                    Bytes::from_static(b"SETNAME"),
                    name.clone(),
                ];
                if let Err(e) = self.apply_on_dedicated(upstream).await {
                    self.now(e, Some(metrics)).await;
                    return Flow::Next;
                }
                self.st.name = (!name.is_empty()).then_some(name);
                if !self.holds_state() {
                    // A new dedicated connection takes the new name.
                    self.drop_dedicated(false);
                }
                self.reply(Value::Simple("OK"), metrics).await;
                Flow::Next
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
                Flow::Next
            }
            Local::Select => {
                let Some(db) = args.get(1).filter(|_| args.len() == 2) else {
                    self.reply(arity_err("select"), metrics).await;
                    return Flow::Next;
                };
                let Some(db) = parse_int(db) else {
                    self.reply(
                        Value::error("ERR value is not an integer or out of range"),
                        metrics,
                    )
                    .await;
                    return Flow::Next;
                };
                if db < 0 || db > i64::from(i32::MAX) {
                    self.reply(Value::error("ERR DB index is out of range"), metrics)
                        .await;
                    return Flow::Next;
                }
                if db != 0 && self.shared.pool.ups.active().endpoint.cluster.is_some() {
                    // As Redis Cluster: database 0 only.
                    self.reply(
                        Value::error("ERR SELECT is not allowed in cluster mode"),
                        metrics,
                    )
                    .await;
                    return Flow::Next;
                }
                let upstream = vec![Bytes::from_static(b"SELECT"), Bytes::from(db.to_string())];
                self.change_identity(Change::Select(db), upstream, None, metrics)
                    .await
            }
            Local::Auth if self.shared.client_auth.is_some() => {
                let reply = self.sidecar_auth(args);
                self.now(reply, Some(metrics)).await;
                Flow::Next
            }
            Local::Auth => match parse_auth(args) {
                Ok(auth) => {
                    let upstream = args.to_vec();
                    self.change_identity(Change::Auth(auth), upstream, None, metrics)
                        .await
                }
                Err(()) => {
                    self.reply(arity_err("auth"), metrics).await;
                    Flow::Next
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
                                Some(u) => self.st.client_user = Some(u),
                                None => {
                                    self.now(Bytes::from_static(WRONGPASS), Some(metrics)).await;
                                    return Flow::Next;
                                }
                            },
                            None if self.st.client_user.is_none() => {
                                self.now(Bytes::from_static(HELLO_NOAUTH), Some(metrics))
                                    .await;
                                return Flow::Next;
                            }
                            None => {}
                        }
                        upstream = hello_without_auth(args);
                    }
                    let proto = h.proto.unwrap_or(self.st.proto);
                    self.change_identity(Change::Hello(h), upstream, Some(proto), metrics)
                        .await
                }
                Err(v) => {
                    self.reply(v, metrics).await;
                    Flow::Next
                }
            },
        }
    }

    /// SELECT, AUTH, HELLO outside MULTI: checked against the upstream
    /// (on the dedicated connection when the client holds state there,
    /// else with a real handshake for the new identity), then applied.
    /// `hello`: answer with the HELLO map in this protocol.
    pub(super) async fn change_identity(
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
                return Flow::Next;
            }
        };
        if !applied {
            // A SELECT runs as the client's user; AUTH keeps the db.
            let select_as = match change {
                Change::Select(_) => SelectAs::User,
                _ => SelectAs::Either,
            };
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
                && let Err(e) = self.shared.pool.verify(&ident, select_as).await
            {
                return self.upstream_error(e, metrics).await;
            }
        }
        self.apply(change);
        match hello {
            Some(proto) => {
                let v = self.hello_reply(proto);
                self.now(v, Some(metrics)).await;
            }
            None => self.reply(Value::Simple("OK"), metrics).await,
        }
        Flow::Next
    }

    /// A connection-state change that ran on the dedicated connection.
    pub(super) fn apply(&mut self, change: Change) {
        match change {
            Change::Select(db) => self.st.db = db,
            Change::Auth(a) => self.st.auth = Some(a),
            Change::Hello(h) => {
                if let Some(p) = h.proto {
                    self.st.proto = p;
                }
                if h.auth.is_some() {
                    self.st.auth = h.auth;
                }
                if let Some(n) = h.name {
                    self.st.name = (!n.is_empty()).then_some(n);
                }
            }
            Change::SetName(n) => self.st.name = n,
        }
        self.identity_changed();
    }

    /// The identity changed: other shared connections, and an idle
    /// dedicated connection is replaced on next use.
    pub(super) fn identity_changed(&mut self) {
        self.shared_set = None;
        self.cluster = None;
        if !self.holds_state() {
            self.drop_dedicated(false);
        }
    }

    /// The user the client authenticated to the sidecar as.
    pub(super) fn sidecar_user(&self) -> Option<&[u8]> {
        let ca = self.shared.client_auth.as_deref()?;
        self.st.client_user.map(|u| ca.user_name(u))
    }

    /// AUTH checked by the sidecar (`[client_auth]`), with Redis's replies.
    pub(super) fn sidecar_auth(&mut self, args: &[Bytes]) -> Bytes {
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
                self.st.client_user = Some(u);
                self.publish();
                Bytes::from_static(b"+OK\r\n")
            }
            None => Bytes::from_static(WRONGPASS),
        }
    }
}
