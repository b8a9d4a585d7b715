//! The CLIENT family the sidecar answers for its own clients (ID, LIST,
//! INFO, KILL, UNBLOCK, ...) and CLIENT TRACKING's REDIRECT id.

use std::sync::Arc;

use bytes::Bytes;

use super::clients::{self, ClientEntry};
use crate::request::command::{CommandInfo, Local};
use crate::request::exchange::Exchange;
use crate::wire::Value;
use crate::wire::scan::parse_int;

use super::*;

/// What a CLIENT command the sidecar owns comes to.
pub(super) enum Answer {
    /// The sidecar's reply.
    Now(Value),
    /// Send this upstream instead (an id mapped to an upstream id).
    Upstream(Vec<Bytes>),
}

/// Redis's arity check (`arity` N: exactly N arguments; -N: at least N),
/// with its wording, for the commands the sidecar answers itself.
pub(super) fn arity_error(info: &CommandInfo, args: &[Bytes]) -> Option<Bytes> {
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

impl Session {
    /// CLIENT ID / GETNAME / LIST / INFO / SETINFO / KILL / UNBLOCK: about
    /// the sidecar's clients.
    pub(super) async fn client_command(&mut self, local: Local, args: &[Bytes]) -> Answer {
        let syntax = || Answer::Now(Value::error("ERR syntax error"));
        match local {
            Local::ClientId => Answer::Now(Value::Int(self.entry.id as i64)),
            Local::ClientGetName => {
                Answer::Now(self.st.name.clone().map(Value::Bulk).unwrap_or(Value::Null))
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

    /// `CLIENT TRACKING ... REDIRECT <id>`: the id is one of the sidecar's
    /// clients; Redis must get that client's dedicated connection's id.
    pub(super) async fn map_redirect(&mut self, ex: &mut Exchange) -> Result<(), Bytes> {
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
        if u64::try_from(id).is_ok_and(|id| id == self.entry.id) {
            // Redirect to itself (Redis allows it): to its own dedicated
            // connection, which the command is about to pin anyway.
            self.ensure_dedicated().await.map_err(|e| e.to_reply())?;
        }
        let args = ex.args();
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
}
