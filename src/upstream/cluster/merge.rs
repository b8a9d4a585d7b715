//! How the replies of a command's parts (on several nodes) become the
//! client's one reply: [`Merge`] says how, [`Gather`] collects the parts
//! in flight, [`merge`] joins them (the one join of the cluster path).

use std::sync::{Arc, Mutex, PoisonError};

use bytes::{Bytes, BytesMut};

use super::{ScanCursor, Split, Topology};
use crate::request::exchange::{PartSink, ReplyPlan};
use crate::upstream::cluster;
use crate::upstream::{ClientShared, Reply};
use crate::wire::resp::bulk_text;
use crate::wire::scan::split_array;
use crate::wire::{Proto, Value};

/// How the replies of a command's parts become the client's reply.
#[derive(Clone, Debug)]
pub enum Merge {
    Split(super::Split, Vec<super::Part>),
    /// Integers summed (DBSIZE).
    Sum,
    /// `+OK` from all (FLUSHALL, SCRIPT FLUSH).
    AllOk,
    /// Arrays concatenated, up to a size (KEYS).
    Concat(usize),
    /// The first reply that is not null (RANDOMKEY).
    FirstNonNull,
    /// All the same; the first.
    First,
    /// FUNCTION LOAD: the library's name, the same from every master.
    Library,
    /// SCRIPT LOAD: the first reply, and the script remembered under it.
    ScriptLoad(Bytes, Arc<Topology>),
    /// 0/1 arrays, element-wise AND (SCRIPT EXISTS).
    AndArrays,
    /// A fresh SCAN (cursor 0) sent to every master at once: the keys of
    /// every master up to the first one not done, and the cursor from
    /// there (`0` when every master is done: a small keyspace is read in
    /// one call, as from one Redis).
    ScanAll {
        epoch: u8,
        masters: usize,
    },
    /// One master's SCAN reply, its cursor rewritten.
    Scan {
        epoch: u8,
        node: u8,
        masters: usize,
    },
    /// SLOWLOG GET from every master: the newest entries of all, at most
    /// this many, each id made unique across masters (`id * masters +
    /// the master's place in the map`).
    Slowlog(usize),
    /// One master's INFO, with the lowest `redis_version` of the masters.
    Info {
        version: String,
        node: String,
    },
}

/// The parts of one client command in flight on several nodes; the last
/// to answer completes the client's entry.
pub struct Gather {
    client: Arc<ClientShared>,
    seq: Option<u64>,
    merge: Merge,
    state: Mutex<GatherState>,
}

impl Gather {
    /// `n` parts of the client's entry `seq`, joined by `merge`.
    pub fn new(
        client: Arc<ClientShared>,
        seq: Option<u64>,
        merge: Merge,
        n: usize,
        plan: ReplyPlan,
    ) -> Gather {
        Gather {
            client,
            seq,
            merge,
            state: Mutex::new(GatherState {
                replies: vec![None; n],
                left: n,
                plan: Some(plan),
            }),
        }
    }
}

struct GatherState {
    replies: Vec<Option<Reply>>,
    left: usize,
    plan: Option<ReplyPlan>,
}

impl PartSink for Gather {
    fn part(&self, index: usize, reply: Reply) {
        let (replies, plan) = {
            let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(r) = st.replies.get_mut(index) else {
                return;
            };
            if r.is_some() {
                return;
            }
            *r = Some(reply);
            st.left -= 1;
            if st.left > 0 {
                return;
            }
            (std::mem::take(&mut st.replies), st.plan.take())
        };
        let Some(mut plan) = plan else {
            return;
        };
        let mut ok = Vec::with_capacity(replies.len());
        for r in replies.into_iter().flatten() {
            match r {
                Ok(b) => ok.push(b),
                Err(e) => {
                    plan.fail(&e);
                    if let Some(seq) = self.seq {
                        self.client.fail(seq, e);
                    }
                    return;
                }
            }
        }
        let merged = merge(&self.merge, &ok).unwrap_or_else(|| {
            Bytes::from_static(b"-ERR the cluster nodes' replies could not be merged\r\n")
        });
        plan.observe(0, &merged);
        let merged = plan.finish(merged);
        if let Some(seq) = self.seq {
            self.client.deliver(seq, Ok(merged));
            self.client.flush();
        }
    }
}

fn is_null(r: &[u8]) -> bool {
    r == b"$-1\r\n" || r == b"*-1\r\n" || r == b"_\r\n"
}

/// The client's reply from the parts' replies (none an error reply
/// unless said).
pub fn merge(m: &Merge, replies: &[Bytes]) -> Option<Bytes> {
    let first_error = || replies.iter().find(|r| crate::wire::is_error(r)).cloned();
    match m {
        Merge::Split(kind, parts) => cluster::merge(*kind, parts, replies),
        Merge::Sum => cluster::merge(Split::Sum, &[], replies),
        Merge::AllOk => first_error().or(Some(Bytes::from_static(b"+OK\r\n"))),
        Merge::First | Merge::Library => first_error().or_else(|| replies.first().cloned()),
        Merge::ScriptLoad(body, topo) => {
            let r = first_error().or_else(|| replies.first().cloned())?;
            if let Some(sha) = bulk_text(&r) {
                topo.remember_script(sha, body.clone());
            }
            Some(r)
        }
        Merge::FirstNonNull => first_error()
            .or_else(|| replies.iter().find(|r| !is_null(r)).cloned())
            .or_else(|| replies.first().cloned()),
        Merge::Concat(cap) => {
            if let Some(e) = first_error() {
                return Some(e);
            }
            let mut n = 0;
            let mut body = BytesMut::new();
            for r in replies {
                let ranges = split_array(r)?;
                n += ranges.len();
                for (s, e) in ranges {
                    body.extend_from_slice(&r[s..e]);
                }
                if body.len() > *cap {
                    return Some(Bytes::from(format!(
                        "-ERR the reply is larger than {cap} bytes across the cluster; use SCAN\r\n"
                    )));
                }
            }
            let mut out = BytesMut::with_capacity(body.len() + 16);
            crate::wire::scan::push_header(&mut out, b'*', n);
            out.extend_from_slice(&body);
            Some(out.freeze())
        }
        Merge::AndArrays => {
            if let Some(e) = first_error() {
                return Some(e);
            }
            let mut acc: Option<Vec<bool>> = None;
            for r in replies {
                let els: Vec<bool> = split_array(r)?
                    .into_iter()
                    .map(|(s, e)| &r[s..e] == b":1\r\n")
                    .collect();
                acc = Some(match acc {
                    None => els,
                    Some(a) => a.iter().zip(&els).map(|(x, y)| *x && *y).collect(),
                });
            }
            let acc = acc.unwrap_or_default();
            let mut out = BytesMut::new();
            crate::wire::scan::push_header(&mut out, b'*', acc.len());
            for b in acc {
                out.extend_from_slice(if b { b":1\r\n" } else { b":0\r\n" });
            }
            Some(out.freeze())
        }
        Merge::Scan {
            epoch,
            node,
            masters,
        } => {
            let r = replies.first()?;
            if crate::wire::is_error(r) {
                return Some(r.clone());
            }
            let ranges = split_array(r)?;
            let (cs, ce) = *ranges.first()?;
            let (ks, ke) = *ranges.get(1)?;
            let cursor = bulk_text(&r[cs..ce])?;
            let next: u64 = std::str::from_utf8(cursor).ok()?.parse().ok()?;
            let text = match ScanCursor::after(*epoch, *node, next, *masters) {
                Some(c) => c.encode().ok()?,
                None => "0".to_string(),
            };
            let mut out = BytesMut::with_capacity(r.len() + 24);
            out.extend_from_slice(b"*2\r\n");
            out.extend_from_slice(format!("${}\r\n{text}\r\n", text.len()).as_bytes());
            out.extend_from_slice(&r[ks..ke]);
            Some(out.freeze())
        }
        Merge::ScanAll { epoch, masters } => {
            if let Some(e) = first_error() {
                return Some(e);
            }
            let mut keys = BytesMut::new();
            let mut n = 0;
            let mut cursor = "0".to_string();
            for (i, r) in replies.iter().enumerate() {
                let ranges = split_array(r)?;
                let (cs, ce) = *ranges.first()?;
                let (ks, ke) = *ranges.get(1)?;
                let next: u64 = std::str::from_utf8(bulk_text(&r[cs..ce])?)
                    .ok()?
                    .parse()
                    .ok()?;
                let inner = r.slice(ks..ke);
                for (s, e) in split_array(&inner)? {
                    keys.extend_from_slice(&inner[s..e]);
                    n += 1;
                }
                if next != 0 {
                    cursor = ScanCursor::after(*epoch, u8::try_from(i).ok()?, next, *masters)?
                        .encode()
                        .ok()?;
                    break;
                }
            }
            let mut out = BytesMut::with_capacity(keys.len() + 32);
            out.extend_from_slice(b"*2\r\n");
            out.extend_from_slice(format!("${}\r\n{cursor}\r\n", cursor.len()).as_bytes());
            crate::wire::scan::push_header(&mut out, b'*', n);
            out.extend_from_slice(&keys);
            Some(out.freeze())
        }
        Merge::Slowlog(count) => {
            if let Some(e) = first_error() {
                return Some(e);
            }
            slowlog(replies, *count)
        }
        Merge::Info { version, node } => {
            let r = replies.first()?;
            if crate::wire::is_error(r) {
                return Some(r.clone());
            }
            Some(rewrite_info(r, version, node))
        }
    }
}

/// SLOWLOG GET's entries ([id, unix time, micros, args, addr, name]) of
/// every master, newest first, ids unique across masters.
fn slowlog(replies: &[Bytes], count: usize) -> Option<Bytes> {
    let masters = replies.len() as i64;
    let mut entries: Vec<(i64, i64, Bytes)> = Vec::new();
    for (i, r) in replies.iter().enumerate() {
        for (s, e) in split_array(r)? {
            let entry = r.slice(s..e);
            let fields = split_array(&entry)?;
            let (&(is, ie), &(ts, te)) = (fields.first()?, fields.get(1)?);
            let id = crate::wire::resp::integer(&entry[is..ie])?;
            let time = crate::wire::resp::integer(&entry[ts..te])?;
            let id = id.checked_mul(masters)?.checked_add(i as i64)?;
            let mut out = BytesMut::with_capacity(entry.len() + 8);
            crate::wire::scan::push_header(&mut out, b'*', fields.len());
            out.extend_from_slice(format!(":{id}\r\n").as_bytes());
            out.extend_from_slice(&entry[ie..]);
            entries.push((time, id, out.freeze()));
        }
    }
    entries.sort_by_key(|e| std::cmp::Reverse((e.0, e.1)));
    entries.truncate(count);
    let mut out = BytesMut::new();
    crate::wire::scan::push_header(&mut out, b'*', entries.len());
    for (_, _, e) in entries {
        out.extend_from_slice(&e);
    }
    Some(out.freeze())
}

/// INFO from one master: `redis_version` the lowest of the masters',
/// `cluster_enabled:0` (the app talks to one node, the sidecar), and a
/// section saying where the rest came from.
fn rewrite_info(reply: &Bytes, version: &str, node: &str) -> Bytes {
    let (verbatim, body) = match bulk_text(reply) {
        Some(b) => (reply.first() == Some(&b'='), b),
        None => return reply.clone(),
    };
    let text = String::from_utf8_lossy(body);
    let mut out = String::with_capacity(text.len() + 128);
    for line in text.split_inclusive('\n') {
        if line.starts_with("redis_version:") && !version.is_empty() {
            out.push_str(&format!("redis_version:{version}\r\n"));
        } else if line.starts_with("cluster_enabled:") {
            out.push_str("cluster_enabled:0\r\n");
        } else {
            out.push_str(line);
        }
    }
    if !out.ends_with('\n') && !out.is_empty() {
        out.push_str("\r\n");
    }
    out.push_str(&format!(
        "\r\n# Sidecar\r\nsidecar_upstream:cluster\r\nsidecar_info_from_node:{node}\r\nsidecar_redis_version_is:lowest_of_masters\r\n"
    ));
    let v = if verbatim {
        Value::Text(out)
    } else {
        Value::Bulk(Bytes::from(out))
    };
    v.encode(if verbatim { Proto::Resp3 } else { Proto::Resp2 })
}

/// `7.2.4` as numbers, for the lowest version.
pub fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges() {
        let b = |s: &'static str| Bytes::from_static(s.as_bytes());
        assert_eq!(
            merge(&Merge::Sum, &[b(":1\r\n"), b(":2\r\n")]),
            Some(b(":3\r\n"))
        );
        assert_eq!(
            merge(
                &Merge::Concat(100),
                &[b("*1\r\n$1\r\na\r\n"), b("*0\r\n"), b("*1\r\n$1\r\nb\r\n")]
            ),
            Some(b("*2\r\n$1\r\na\r\n$1\r\nb\r\n"))
        );
        assert!(
            merge(
                &Merge::Concat(3),
                &[b("*1\r\n$1\r\na\r\n"), b("*1\r\n$1\r\nb\r\n")]
            )
            .is_some_and(|r| r.starts_with(b"-ERR"))
        );
        assert_eq!(
            merge(
                &Merge::AndArrays,
                &[b("*2\r\n:1\r\n:1\r\n"), b("*2\r\n:1\r\n:0\r\n")]
            ),
            Some(b("*2\r\n:1\r\n:0\r\n"))
        );
        assert_eq!(
            merge(&Merge::FirstNonNull, &[b("$-1\r\n"), b("$1\r\nk\r\n")]),
            Some(b("$1\r\nk\r\n"))
        );
        assert_eq!(
            merge(&Merge::AllOk, &[b("+OK\r\n"), b("-ERR x\r\n")]),
            Some(b("-ERR x\r\n"))
        );
        // A SCAN reply's cursor: master 0 done, master 1 from its start.
        let r = merge(
            &Merge::Scan {
                epoch: 3,
                node: 0,
                masters: 2,
            },
            &[b("*2\r\n$1\r\n0\r\n*1\r\n$1\r\nk\r\n")],
        )
        .unwrap_or_default();
        let want = ScanCursor {
            epoch: 3,
            node: 1,
            inner: 0,
        }
        .encode()
        .unwrap_or_default();
        assert_eq!(
            r,
            Bytes::from(format!(
                "*2\r\n${}\r\n{want}\r\n*1\r\n$1\r\nk\r\n",
                want.len()
            ))
        );
    }

    #[test]
    fn slowlogs_merge_newest_first_with_unique_ids() {
        let entry = |id: u8, t: u16| {
            format!(
                "*6\r\n:{id}\r\n:{t}\r\n:15\r\n*1\r\n$4\r\nKEYS\r\n$11\r\n127.0.0.1:1\r\n$0\r\n\r\n"
            )
        };
        let a = Bytes::from(format!("*2\r\n{}{}", entry(1, 300), entry(0, 100)));
        let b = Bytes::from(format!("*1\r\n{}", entry(0, 200)));
        let got = merge(&Merge::Slowlog(2), &[a, b]).unwrap_or_default();
        let want = format!("*2\r\n{}{}", entry(2, 300), entry(1, 200));
        assert_eq!(got, Bytes::from(want));
    }

    #[test]
    fn info_says_where_it_came_from() {
        let body = "# Server\r\nredis_version:7.2.4\r\ncluster_enabled:1\r\n";
        let r = Bytes::from(format!("${}\r\n{body}\r\n", body.len()));
        let out = rewrite_info(&r, "7.0.0", "10.0.0.1:7000");
        let text = String::from_utf8_lossy(&out);
        assert!(text.contains("redis_version:7.0.0\r\n"), "{text}");
        assert!(text.contains("cluster_enabled:0\r\n"), "{text}");
        assert!(
            text.contains("sidecar_info_from_node:10.0.0.1:7000"),
            "{text}"
        );
    }
}
