//! One client's stream out of several node connections, as one Redis
//! would send it: MONITOR runs on every master and is answered once, when
//! all of them monitor; shard-channel confirmations count the client's
//! shard channels on every node, not on the one that confirms.
//!
//! Every frame a pinned client's node connections stream passes through
//! its [`StreamFilter`] (one lock per client, so what it sends keeps one
//! order).

use std::collections::HashSet;
use std::sync::{Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use crate::upstream::ClientShared;
use crate::wire::scan::{push_header, split_array};

const OK: &[u8] = b"+OK\r\n";

#[derive(Debug, Default)]
enum Monitor {
    #[default]
    Off,
    /// MONITOR sent to `left` more masters than have answered; the first
    /// error any of them gave.
    Starting { left: usize, error: Option<Bytes> },
    /// Every master monitors; the client had its `+OK`.
    On,
    /// A master refused: the client had the error, and no master's lines
    /// reach it.
    Refused,
}

#[derive(Debug, Default)]
struct FilterState {
    monitor: Monitor,
    /// Shard channels the nodes confirmed, across nodes.
    shard: HashSet<Bytes>,
}

/// See the module doc.
#[derive(Debug, Default)]
pub struct StreamFilter {
    state: Mutex<FilterState>,
}

impl StreamFilter {
    /// MONITOR is being sent to `masters` masters: their answers are
    /// counted, not passed, and the client gets one answer after the last.
    pub fn start_monitor(&self, masters: usize) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        st.monitor = Monitor::Starting {
            left: masters,
            error: None,
        };
    }

    /// A frame for the client, as one Redis would have sent it (or not at
    /// all: a master's own MONITOR answer, or a line of a command that ran
    /// before MONITOR took effect on every master).
    pub fn pass(&self, frame: Bytes, client: &ClientShared) {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        match &mut st.monitor {
            Monitor::Starting { left, error } => {
                let is_error = crate::wire::is_error(&frame);
                if &frame[..] == OK || is_error {
                    if is_error && error.is_none() {
                        *error = Some(frame);
                    }
                    *left = left.saturating_sub(1);
                    if *left == 0 {
                        let (reply, next) = match error.take() {
                            Some(e) => (e, Monitor::Refused),
                            None => (Bytes::from_static(OK), Monitor::On),
                        };
                        st.monitor = next;
                        client.push_frame(reply);
                    }
                    return;
                }
                if is_monitor_line(&frame) {
                    return;
                }
            }
            Monitor::Refused if is_monitor_line(&frame) => return,
            _ => {}
        }
        let frame = recount(&mut st.shard, frame);
        client.push_frame(frame);
    }
}

/// `+<seconds>.<micros> [<db> <addr>] ...`: a line MONITOR streams.
fn is_monitor_line(frame: &[u8]) -> bool {
    let Some(rest) = frame.strip_prefix(b"+") else {
        return false;
    };
    let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
    digits > 0 && rest[digits..].starts_with(b".") && rest.windows(2).any(|w| w == b" [")
}

/// A shard-channel confirmation (`ssubscribe`/`sunsubscribe`, channel,
/// count) with the count of the client's shard channels on every node;
/// any other frame unchanged.
fn recount(shard: &mut HashSet<Bytes>, frame: Bytes) -> Bytes {
    const SUB: &[u8] = b"$10\r\nssubscribe\r\n";
    const UNSUB: &[u8] = b"$12\r\nsunsubscribe\r\n";
    if !frame.starts_with(b"*3\r\n") && !frame.starts_with(b">3\r\n") {
        return frame;
    }
    let Some(els) = split_array(&frame) else {
        return frame;
    };
    let [(s0, e0), (s1, e1), (s2, _)] = els[..] else {
        return frame;
    };
    let name = &frame[s0..e0];
    let subscribe = match name {
        n if n == SUB => true,
        n if n == UNSUB => false,
        _ => return frame,
    };
    if frame.get(s2) != Some(&b':') {
        return frame;
    }
    if let Some(channel) = crate::wire::resp::bulk_text(&frame[s1..e1]) {
        if subscribe {
            shard.insert(Bytes::copy_from_slice(channel));
        } else {
            shard.remove(channel);
        }
    }
    let mut out = BytesMut::with_capacity(frame.len() + 4);
    push_header(&mut out, frame[0], 3);
    out.extend_from_slice(&frame[s0..e1]);
    push_header(&mut out, b':', shard.len());
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_the_clients_across_nodes() {
        let mut set = HashSet::new();
        let sub = |ch: &str, n: u8| {
            Bytes::from(format!(
                "*3\r\n$10\r\nssubscribe\r\n${}\r\n{ch}\r\n:{n}\r\n",
                ch.len()
            ))
        };
        assert_eq!(recount(&mut set, sub("foo", 1)), sub("foo", 1));
        // Another node confirms its first channel: the client has two.
        assert_eq!(recount(&mut set, sub("bar", 1)), sub("bar", 2));
        let un = Bytes::from_static(b">3\r\n$12\r\nsunsubscribe\r\n$3\r\nfoo\r\n:0\r\n");
        assert_eq!(
            &recount(&mut set, un)[..],
            b">3\r\n$12\r\nsunsubscribe\r\n$3\r\nfoo\r\n:1\r\n"
        );
        // A message is no confirmation, whatever its channel.
        let msg = Bytes::from_static(b"*3\r\n$8\r\nsmessage\r\n$3\r\nbar\r\n$1\r\nx\r\n");
        assert_eq!(recount(&mut set, msg.clone()), msg);
    }

    #[test]
    fn monitor_lines_are_told_apart() {
        assert!(is_monitor_line(
            b"+1796155730.639576 [0 127.0.0.1:5000] \"SET\" \"k\" \"1\"\r\n"
        ));
        assert!(!is_monitor_line(b"+OK\r\n"));
        assert!(!is_monitor_line(b"+PONG\r\n"));
    }
}
