//! Redis Cluster: key slots, the slot map and what is learned of the
//! cluster ([`Topology`]); routing is in [`super::cluster`].
//!
//! - [`key_slot`]: CRC16 (XMODEM) of the key, or of its hash tag (the
//!   bytes between the first `{` and the first `}` after it, when not
//!   empty), modulo 16384, as `CLUSTER KEYSLOT` computes it.
//! - [`SlotMap`]: which master owns each slot and its replicas, from
//!   `CLUSTER SHARDS` (Redis 7) or `CLUSTER SLOTS`. A node announced with
//!   no endpoint (`?`, empty or null) is reached at the host that was
//!   asked; a hostname is kept for TLS verification.
//! - [`Redirect`]: MOVED and ASK (also as `ERR MOVED`, as some managed
//!   services send it).
//! - [`split_by_slot`] and [`merge`]: MGET, MSET, DEL, UNLINK, EXISTS and
//!   TOUCH split by slot (same-slot keys stay one command) and their replies
//!   merged into what the unsplit command returns on one Redis; commands
//!   that cannot be split get [`CROSSSLOT`].
//! - [`ScanCursor`]: one numeric SCAN cursor across the masters (topology
//!   epoch, master, that master's cursor); a stale one is refused.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Instant;

use redis_protocol::resp2::types::OwnedFrame;
use tokio::sync::Notify;

pub const SLOTS: usize = 16384;

/// CRC16-CCITT (XMODEM): polynomial 0x1021, initial value 0.
pub fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in data {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot of a key, hash tags included.
pub fn key_slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            rest.iter()
                .position(|&b| b == b'}')
                .filter(|&close| close > 0)
                .map(|close| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) & (SLOTS as u16 - 1)
}

/// A cluster node as announced.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub id: String,
    /// Where to connect: the announced IP or endpoint, or the host asked.
    pub host: String,
    pub port: u16,
    /// The announced hostname, for TLS verification.
    pub hostname: Option<String>,
}

/// Slot owners and their replicas.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotMap {
    /// Per slot: the index of its master in `masters` (`None`: no owner).
    owners: Vec<Option<u16>>,
    pub masters: Vec<Node>,
    /// Per master: its replicas.
    pub replicas: Vec<Vec<Node>>,
}

fn text(f: &OwnedFrame) -> Option<String> {
    match f {
        OwnedFrame::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        OwnedFrame::SimpleString(s) => Some(String::from_utf8_lossy(s).into_owned()),
        OwnedFrame::Integer(i) => Some(i.to_string()),
        _ => None,
    }
}

fn int(f: &OwnedFrame) -> Option<i64> {
    match f {
        OwnedFrame::Integer(i) => Some(*i),
        other => text(other)?.parse().ok(),
    }
}

/// A RESP2 flat map (`[k1, v1, k2, v2 ...]`): the value of `key`.
fn field<'a>(map: &'a [OwnedFrame], key: &str) -> Option<&'a OwnedFrame> {
    map.chunks_exact(2)
        .find(|kv| text(&kv[0]).is_some_and(|k| k == key))
        .map(|kv| &kv[1])
}

/// The host to connect to: the endpoint announced, or the host asked
/// when it announced none.
fn endpoint(announced: Option<String>, asked: &str) -> String {
    match announced {
        Some(e) if !e.is_empty() && e != "?" => e,
        _ => asked.to_string(),
    }
}

impl SlotMap {
    /// The master owning `slot`.
    pub fn owner(&self, slot: u16) -> Option<&Node> {
        self.owners
            .get(usize::from(slot))
            .copied()
            .flatten()
            .and_then(|i| self.masters.get(usize::from(i)))
    }

    /// The master a client's keyless commands go to: the same one for all
    /// of them (so they run in order), spread over the masters across
    /// clients.
    pub fn keyless_node<T>(&self, client: &Arc<T>) -> Option<&Node> {
        let n = self.masters.len();
        if n == 0 {
            return None;
        }
        self.masters
            .get((Arc::as_ptr(client) as *const u8 as usize >> 6) % n)
    }

    /// Every slot has an owner.
    pub fn complete(&self) -> bool {
        self.owners.iter().all(Option::is_some)
    }

    /// Where `node` is reached: `host:port`.
    pub fn addr(node: &Node) -> String {
        super::url::host_port(&node.host, node.port)
    }

    /// The index of the master owning `slot` in [`SlotMap::masters`].
    pub fn owner_index(&self, slot: u16) -> Option<usize> {
        self.owners
            .get(usize::from(slot))
            .copied()
            .flatten()
            .map(usize::from)
    }

    /// Slot ranges per master (for `/upstreams`): `(master, ranges)`.
    pub fn ranges(&self) -> Vec<(usize, Vec<(u16, u16)>)> {
        let mut out: Vec<(usize, Vec<(u16, u16)>)> =
            (0..self.masters.len()).map(|i| (i, Vec::new())).collect();
        let mut start = 0usize;
        while start < SLOTS {
            let owner = self.owners[start];
            let mut end = start;
            while end + 1 < SLOTS && self.owners[end + 1] == owner {
                end += 1;
            }
            if let Some(o) = owner
                && let Some((_, r)) = out.get_mut(usize::from(o))
            {
                r.push((start as u16, end as u16));
            }
            start = end + 1;
        }
        out
    }

    /// Masters in a stable order (by address), whichever node was asked:
    /// a SCAN cursor names a master by its index.
    fn normalized(mut self) -> SlotMap {
        let mut order: Vec<usize> = (0..self.masters.len()).collect();
        order.sort_by_key(|&i| (self.masters[i].host.clone(), self.masters[i].port));
        let mut new_index = vec![0u16; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new as u16;
        }
        for o in self.owners.iter_mut().flatten() {
            *o = new_index[usize::from(*o)];
        }
        let masters = order.iter().map(|&i| self.masters[i].clone()).collect();
        let replicas = order
            .iter()
            .map(|&i| std::mem::take(&mut self.replicas[i]))
            .collect();
        self.masters = masters;
        self.replicas = replicas;
        self
    }

    pub(crate) fn empty() -> SlotMap {
        SlotMap {
            owners: vec![None; SLOTS],
            masters: Vec::new(),
            replicas: Vec::new(),
        }
    }

    fn master_index(&mut self, node: Node) -> u16 {
        if let Some(i) = self.masters.iter().position(|m| m.id == node.id) {
            return i as u16;
        }
        self.masters.push(node);
        self.replicas.push(Vec::new());
        (self.masters.len() - 1) as u16
    }

    fn assign(&mut self, start: i64, end: i64, owner: u16) -> Option<()> {
        if start < 0 || end < start || end >= SLOTS as i64 {
            return None;
        }
        for s in start..=end {
            self.owners[s as usize] = Some(owner);
        }
        Some(())
    }

    /// From a `CLUSTER SHARDS` reply (RESP2); `asked` is the host the
    /// reply came from.
    pub fn from_shards(reply: &OwnedFrame, asked: &str) -> Option<SlotMap> {
        SlotMap::from_shards_tls(reply, asked, false)
    }

    /// [`SlotMap::from_shards`], taking each node's `tls-port` when `tls`
    /// (a node may announce both ports).
    pub fn from_shards_tls(reply: &OwnedFrame, asked: &str, tls: bool) -> Option<SlotMap> {
        let OwnedFrame::Array(shards) = reply else {
            return None;
        };
        let mut map = SlotMap::empty();
        for shard in shards {
            let OwnedFrame::Array(shard) = shard else {
                return None;
            };
            let Some(OwnedFrame::Array(ranges)) = field(shard, "slots") else {
                return None;
            };
            let Some(OwnedFrame::Array(nodes)) = field(shard, "nodes") else {
                return None;
            };
            let mut master = None;
            let mut replicas = Vec::new();
            for n in nodes {
                let OwnedFrame::Array(n) = n else {
                    return None;
                };
                let get = |k: &str| field(n, k).and_then(text);
                let (first, second) = if tls {
                    ("tls-port", "port")
                } else {
                    ("port", "tls-port")
                };
                let port = field(n, first)
                    .and_then(int)
                    .filter(|p| *p > 0)
                    .or_else(|| field(n, second).and_then(int))
                    .and_then(|p| u16::try_from(p).ok())?;
                let node = Node {
                    id: get("id")?,
                    host: endpoint(get("endpoint").or_else(|| get("ip")), asked),
                    port,
                    hostname: get("hostname").filter(|h| !h.is_empty()),
                };
                match get("role").as_deref() {
                    Some("master") => master = Some(node),
                    _ => replicas.push(node),
                }
            }
            let Some(master) = master else {
                // A shard without a master (failing over): its slots stay
                // unowned until the next refresh.
                continue;
            };
            let i = map.master_index(master);
            map.replicas[usize::from(i)].extend(replicas);
            for r in ranges.chunks_exact(2) {
                map.assign(int(&r[0])?, int(&r[1])?, i)?;
            }
        }
        Some(map)
    }

    /// From a `CLUSTER SLOTS` reply (RESP2): `[start, end, master,
    /// replica...]` with each node `[host, port, id, ...]`.
    pub fn from_slots(reply: &OwnedFrame, asked: &str) -> Option<SlotMap> {
        let OwnedFrame::Array(ranges) = reply else {
            return None;
        };
        let node = |f: &OwnedFrame| -> Option<Node> {
            let OwnedFrame::Array(n) = f else {
                return None;
            };
            let host = match n.first() {
                Some(OwnedFrame::Null) | None => None,
                Some(h) => text(h),
            };
            let hostname = n.get(3).and_then(|meta| match meta {
                OwnedFrame::Array(m) => field(m, "hostname").and_then(text),
                _ => None,
            });
            Some(Node {
                id: n.get(2).and_then(text).unwrap_or_default(),
                host: endpoint(host, asked),
                port: n.get(1).and_then(int).and_then(|p| u16::try_from(p).ok())?,
                hostname,
            })
        };
        let mut map = SlotMap::empty();
        for r in ranges {
            let OwnedFrame::Array(r) = r else {
                return None;
            };
            let (start, end) = (int(r.first()?)?, int(r.get(1)?)?);
            let master = node(r.get(2)?)?;
            let i = map.master_index(master);
            for rep in r.iter().skip(3) {
                let rep = node(rep)?;
                if !map.replicas[usize::from(i)].contains(&rep) {
                    map.replicas[usize::from(i)].push(rep);
                }
            }
            map.assign(start, end, i)?;
        }
        Some(map)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_as_redis_computes_them() {
        // Values from the Redis Cluster specification and CLUSTER KEYSLOT.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"{user1000}.following"), key_slot(b"user1000"));
        assert_eq!(key_slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") & 16383);
        assert_ne!(key_slot(b"foo{}{bar}"), key_slot(b"bar"));
        assert_eq!(key_slot(b"foo{{bar}}zap"), key_slot(b"{bar"));
        assert_eq!(key_slot(b"foo{bar}{zap}"), key_slot(b"bar"));
    }

    #[test]
    fn slot_map_from_cluster_slots() {
        let b = |s: &str| OwnedFrame::BulkString(s.as_bytes().to_vec());
        let reply = OwnedFrame::Array(vec![
            OwnedFrame::Array(vec![
                OwnedFrame::Integer(0),
                OwnedFrame::Integer(8191),
                OwnedFrame::Array(vec![b("10.0.0.1"), OwnedFrame::Integer(7000), b("a")]),
                OwnedFrame::Array(vec![b(""), OwnedFrame::Integer(7003), b("c")]),
            ]),
            OwnedFrame::Array(vec![
                OwnedFrame::Integer(8192),
                OwnedFrame::Integer(16383),
                OwnedFrame::Array(vec![OwnedFrame::Null, OwnedFrame::Integer(7001), b("b")]),
            ]),
        ]);
        let map = SlotMap::from_slots(&reply, "seed.example").unwrap_or_else(SlotMap::empty);
        assert!(map.complete());
        assert_eq!(map.owner(0).map(|n| n.host.as_str()), Some("10.0.0.1"));
        assert_eq!(
            map.owner(16383).map(|n| n.host.as_str()),
            Some("seed.example")
        );
        assert_eq!(map.replicas[0][0].host, "seed.example");
        assert_eq!(map.masters.len(), 2);
    }
}

/// A cluster redirection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Redirect {
    /// The slot moved for good: refresh the map, resend to the owner.
    Moved { slot: u16, host: String, port: u16 },
    /// Being migrated: send `ASKING` then the command to the target once,
    /// without changing the map.
    Ask { slot: u16, host: String, port: u16 },
}

impl Redirect {
    /// From an error reply: `-MOVED 3999 127.0.0.1:6381`, `-ASK ...`, and
    /// `-ERR MOVED ...` as some managed services send it. A host may be
    /// empty (`:6381`): the host that was asked.
    pub fn parse(reply: &[u8], asked: &str) -> Option<Redirect> {
        let text = std::str::from_utf8(reply.strip_prefix(b"-")?)
            .ok()?
            .trim_end();
        let text = text.strip_prefix("ERR ").unwrap_or(text);
        let mut parts = text.split(' ');
        let kind = parts.next()?;
        let slot: u16 = parts.next()?.parse().ok()?;
        let (host, port) = parts.next()?.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        if usize::from(slot) >= SLOTS || parts.next().is_some() {
            return None;
        }
        let host = if host.is_empty() { asked } else { host }.to_string();
        match kind {
            "MOVED" => Some(Redirect::Moved { slot, host, port }),
            "ASK" => Some(Redirect::Ask { slot, host, port }),
            _ => None,
        }
    }
}

/// How a multi-key command is split across slots and its replies merged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Split {
    /// MGET: one array, elements back in the keys' order.
    Gather,
    /// DEL, UNLINK, EXISTS, TOUCH: the integers summed.
    Sum,
    /// MSET: `+OK` when every part says so, else the first error.
    AllOk,
}

/// How `name` (lower case) splits, and the stride of its key list (MSET:
/// key, value).
pub fn split_kind(name: &str) -> Option<(Split, usize)> {
    match name {
        "mget" => Some((Split::Gather, 1)),
        "del" | "unlink" | "exists" | "touch" => Some((Split::Sum, 1)),
        "mset" => Some((Split::AllOk, 2)),
        _ => None,
    }
}

/// One part of a split command: its slot, the arguments (name first) and
/// the positions of its keys in the original key list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Part {
    pub slot: u16,
    pub args: Vec<bytes::Bytes>,
    pub positions: Vec<usize>,
}

/// Split a command whose keys start at argument 1 with `stride` by slot
/// (keys of one slot stay one command, in their order); parts in the order
/// of their first key.
pub fn split_by_slot(args: &[bytes::Bytes], stride: usize) -> Vec<Part> {
    let mut parts: Vec<Part> = Vec::new();
    for (pos, chunk) in args.get(1..).unwrap_or(&[]).chunks(stride).enumerate() {
        let slot = key_slot(&chunk[0]);
        let part = match parts.iter_mut().find(|p| p.slot == slot) {
            Some(p) => p,
            None => {
                parts.push(Part {
                    slot,
                    args: vec![args[0].clone()],
                    positions: Vec::new(),
                });
                parts.last_mut().expect("just pushed")
            }
        };
        part.args.extend(chunk.iter().cloned());
        part.positions.push(pos);
    }
    parts
}

/// Merge the parts' replies (RESP2 or RESP3 raw frames, in `parts`
/// order) into the reply the unsplit command would have had. An error in
/// any part is the reply.
pub fn merge(kind: Split, parts: &[Part], replies: &[bytes::Bytes]) -> Option<bytes::Bytes> {
    use bytes::{BufMut, BytesMut};
    if let Some(e) = replies
        .iter()
        .find(|r| matches!(r.first(), Some(b'-' | b'!')))
    {
        return Some(e.clone());
    }
    match kind {
        Split::Sum => {
            let mut total = 0i64;
            for r in replies {
                let t = std::str::from_utf8(r.strip_prefix(b":")?).ok()?;
                total += t.trim_end().parse::<i64>().ok()?;
            }
            Some(bytes::Bytes::from(format!(":{total}\r\n")))
        }
        Split::AllOk => Some(bytes::Bytes::from_static(b"+OK\r\n")),
        Split::Gather => {
            let n: usize = parts.iter().map(|p| p.positions.len()).sum();
            let mut slots: Vec<Option<bytes::Bytes>> = vec![None; n];
            for (part, reply) in parts.iter().zip(replies) {
                let els = crate::wire::resp::elements(reply)?;
                if els.len() != part.positions.len() {
                    return None;
                }
                for (pos, el) in part.positions.iter().zip(els) {
                    *slots.get_mut(*pos)? = Some(el);
                }
            }
            let mut out = BytesMut::new();
            out.put_slice(format!("*{n}\r\n").as_bytes());
            for el in slots {
                out.put_slice(&el?);
            }
            Some(out.freeze())
        }
    }
}

/// Redis's own error for keys of several slots where a command cannot be
/// split.
pub const CROSSSLOT: &[u8] = b"-CROSSSLOT Keys in request don't hash to the same slot\r\n";

#[cfg(test)]
mod split_tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn redirects_parse() {
        assert_eq!(
            Redirect::parse(b"-MOVED 3999 127.0.0.1:6381\r\n", "seed"),
            Some(Redirect::Moved {
                slot: 3999,
                host: "127.0.0.1".into(),
                port: 6381
            })
        );
        assert_eq!(
            Redirect::parse(b"-ERR MOVED 1 :7000\r\n", "seed"),
            Some(Redirect::Moved {
                slot: 1,
                host: "seed".into(),
                port: 7000
            })
        );
        assert!(matches!(
            Redirect::parse(b"-ASK 5 h:1\r\n", "x"),
            Some(Redirect::Ask { slot: 5, .. })
        ));
        assert_eq!(Redirect::parse(b"-MOVED 99999 h:1\r\n", "x"), None);
        assert_eq!(Redirect::parse(b"-ERR wrong\r\n", "x"), None);
    }

    #[test]
    fn split_and_merge_keep_order() {
        let args: Vec<Bytes> = ["MGET", "a", "{a}x", "b", "{b}y"]
            .iter()
            .map(|s| Bytes::from(s.to_string()))
            .collect();
        let parts = split_by_slot(&args, 1);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].positions, vec![0, 1]);
        let replies = vec![
            Bytes::from_static(b"*2\r\n$1\r\n1\r\n$-1\r\n"),
            Bytes::from_static(b"*2\r\n$1\r\n3\r\n$1\r\n4\r\n"),
        ];
        assert_eq!(
            merge(Split::Gather, &parts, &replies),
            Some(Bytes::from_static(
                b"*4\r\n$1\r\n1\r\n$-1\r\n$1\r\n3\r\n$1\r\n4\r\n"
            ))
        );
        let sums = vec![Bytes::from_static(b":1\r\n"), Bytes::from_static(b":2\r\n")];
        assert_eq!(
            merge(Split::Sum, &parts, &sums),
            Some(Bytes::from_static(b":3\r\n"))
        );
        let mset: Vec<Bytes> = ["MSET", "a", "1", "b", "2"]
            .iter()
            .map(|s| Bytes::from(s.to_string()))
            .collect();
        let parts = split_by_slot(&mset, 2);
        assert_eq!(parts[1].args.len(), 3);
    }
}

/// A SCAN cursor across the masters of a cluster, as one decimal number
/// (clients such as redis-py parse cursors as integers): the topology
/// epoch it was issued under (8 bits), the index of the master being
/// walked (8 bits) and that master's own cursor (48 bits; Redis's cursors
/// index hash-table buckets and stay far below that). `0` starts and ends
/// the walk, as on one Redis.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ScanCursor {
    pub epoch: u8,
    pub node: u8,
    pub inner: u64,
}

/// Why a client's cursor cannot continue a walk.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CursorError {
    #[error("invalid cursor")]
    Invalid,
    #[error("the cluster's topology changed since this SCAN started; start again from 0")]
    Stale,
    #[error("a node's cursor is too large to encode")]
    TooLarge,
}

const INNER_BITS: u32 = 48;

impl ScanCursor {
    pub fn encode(&self) -> Result<String, CursorError> {
        if self.inner >> INNER_BITS != 0 {
            return Err(CursorError::TooLarge);
        }
        let v = (u64::from(self.epoch) << 56) | (u64::from(self.node) << INNER_BITS) | self.inner;
        Ok(v.to_string())
    }

    /// `None` for `0` (a new walk, from the first master).
    pub fn decode(
        text: &[u8],
        epoch: u8,
        masters: usize,
    ) -> Result<Option<ScanCursor>, CursorError> {
        let v: u64 = std::str::from_utf8(text)
            .ok()
            .and_then(|t| t.parse().ok())
            .ok_or(CursorError::Invalid)?;
        if v == 0 {
            return Ok(None);
        }
        let c = ScanCursor {
            epoch: (v >> 56) as u8,
            node: ((v >> INNER_BITS) & 0xFF) as u8,
            inner: v & ((1 << INNER_BITS) - 1),
        };
        if c.epoch != epoch {
            return Err(CursorError::Stale);
        }
        if usize::from(c.node) >= masters {
            return Err(CursorError::Invalid);
        }
        Ok(Some(c))
    }

    /// The cursor to hand back after master `node` answered `next`: the
    /// same master again, the next master from 0, or `0` when the last
    /// master is done.
    pub fn after(epoch: u8, node: u8, next: u64, masters: usize) -> Option<ScanCursor> {
        if next != 0 {
            return Some(ScanCursor {
                epoch,
                node,
                inner: next,
            });
        }
        let following = usize::from(node) + 1;
        (following < masters).then_some(ScanCursor {
            epoch,
            node: following as u8,
            inner: 0,
        })
    }
}

/// A client's SCAN as one step of the walk over the masters: the index of
/// the master to ask, and the command with that master's own cursor.
/// `args[1]` is the client's cursor.
pub fn scan_step(
    args: &[bytes::Bytes],
    epoch: u8,
    masters: usize,
) -> Result<(u8, Vec<bytes::Bytes>), CursorError> {
    let cursor = args.get(1).ok_or(CursorError::Invalid)?;
    let (node, inner) =
        ScanCursor::decode(cursor, epoch, masters)?.map_or((0, 0), |c| (c.node, c.inner));
    let mut step = args.to_vec();
    step[1] = bytes::Bytes::from(inner.to_string());
    Ok((node, step))
}

#[cfg(test)]
mod cursor_tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_refuse_stale_ones() {
        let c = ScanCursor {
            epoch: 7,
            node: 2,
            inner: 12345,
        };
        let text = c.encode().unwrap_or_default();
        assert_eq!(ScanCursor::decode(text.as_bytes(), 7, 3), Ok(Some(c)));
        assert_eq!(
            ScanCursor::decode(text.as_bytes(), 8, 3),
            Err(CursorError::Stale)
        );
        assert_eq!(
            ScanCursor::decode(text.as_bytes(), 7, 2),
            Err(CursorError::Invalid)
        );
        assert_eq!(ScanCursor::decode(b"0", 7, 3), Ok(None));
        assert_eq!(ScanCursor::decode(b"x", 7, 3), Err(CursorError::Invalid));
        let huge = ScanCursor {
            epoch: 0,
            node: 0,
            inner: 1 << 48,
        };
        assert_eq!(huge.encode(), Err(CursorError::TooLarge));
        // Node 0 at epoch 0 from its start: a non-zero number all the same
        // once its own cursor moved.
        assert_eq!(ScanCursor::after(0, 0, 0, 3).map(|c| c.node), Some(1));
        assert_eq!(ScanCursor::after(0, 2, 0, 3), None);
        assert_eq!(ScanCursor::after(0, 1, 9, 3).map(|c| c.inner), Some(9));
    }
}

/// What the sidecar knows of one cluster endpoint: the slot map (learned by
/// the endpoint's health checker, on its interval and, debounced, when a
/// router asks after a MOVED or a failed connection) and its epoch.
#[derive(Debug)]
pub struct Topology {
    map: RwLock<Arc<SlotMap>>,
    /// Bumped on every change of the map.
    epoch: AtomicU64,
    refreshed: Mutex<Option<Instant>>,
    /// Ask the checker for a refresh now.
    pub refresh: Notify,
    /// `redis_version` by node address, from the connections' handshakes.
    versions: Mutex<std::collections::HashMap<String, String>>,
    /// Scripts clients loaded through the sidecar (SHA1 → body), to load
    /// them again on a node that answers an EVALSHA with NOSCRIPT.
    scripts: Mutex<std::collections::HashMap<Vec<u8>, bytes::Bytes>>,
    /// By node address: connections open to it, and why the last attempt
    /// to connect failed (cleared by a success).
    nodes: Mutex<std::collections::HashMap<String, NodeHealth>>,
    /// Owners MOVED replies named since the map last changed (newer than
    /// the map); every router and session routes by them.
    moved: RwLock<std::collections::HashMap<u16, Node>>,
    /// `moved` is not empty (checked without a lock on every request).
    any_moved: std::sync::atomic::AtomicBool,
}

/// What the sidecar's connections know of one node.
#[derive(Clone, Debug, Default)]
pub struct NodeHealth {
    pub connections: i64,
    pub last_error: Option<String>,
}

/// Scripts remembered per cluster endpoint (past this, no new one is).
const MAX_SCRIPTS: usize = 4096;
/// Bytes of script bodies remembered per cluster endpoint.
const MAX_SCRIPT_BYTES: usize = 16 << 20;

impl Default for Topology {
    fn default() -> Self {
        Topology {
            map: RwLock::new(Arc::new(SlotMap::empty())),
            epoch: AtomicU64::new(1),
            refreshed: Mutex::new(None),
            refresh: Notify::new(),
            versions: Mutex::new(std::collections::HashMap::new()),
            scripts: Mutex::new(std::collections::HashMap::new()),
            nodes: Mutex::new(std::collections::HashMap::new()),
            moved: RwLock::new(std::collections::HashMap::new()),
            any_moved: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Topology {
    pub fn map(&self) -> Arc<SlotMap> {
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::Acquire)
    }

    /// Install a freshly read map; `true` if it differs from the last.
    pub fn set(&self, map: SlotMap) -> bool {
        let map = map.normalized();
        *self
            .refreshed
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        let mut cur = self.map.write().unwrap_or_else(PoisonError::into_inner);
        if **cur == map {
            return false;
        }
        *cur = Arc::new(map);
        self.epoch.fetch_add(1, Ordering::AcqRel);
        drop(cur);
        self.moved
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        self.any_moved.store(false, Ordering::Release);
        true
    }

    /// A MOVED reply: `node` owns `slot` now, until the map changes.
    pub fn moved(&self, slot: u16, node: Node) {
        self.moved
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(slot, node);
        self.any_moved.store(true, Ordering::Release);
    }

    /// The owner of `slot` a MOVED named since the map last changed.
    pub fn moved_owner(&self, slot: u16) -> Option<Node> {
        if !self.any_moved.load(Ordering::Acquire) {
            return None;
        }
        self.moved
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&slot)
            .cloned()
    }

    /// The owner of `slot`: as a MOVED said, else as `map` says.
    pub fn owner(&self, map: &SlotMap, slot: u16) -> Option<Node> {
        self.moved_owner(slot).or_else(|| map.owner(slot).cloned())
    }

    /// A node's `redis_version`, learned when connecting to it.
    pub fn set_version(&self, addr: &str, version: &str) {
        if version.is_empty() {
            return;
        }
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(addr.to_string(), version.to_string());
    }

    /// A connection to `addr` opened (`+1`) or closed (`-1`); the count.
    pub fn node_connections(&self, addr: &str, delta: i64) -> i64 {
        let mut m = self.nodes.lock().unwrap_or_else(PoisonError::into_inner);
        let h = m.entry(addr.to_string()).or_default();
        h.connections += delta;
        if delta > 0 {
            h.last_error = None;
        }
        h.connections
    }

    /// A connection to `addr` could not be made.
    pub fn node_failed(&self, addr: &str, error: String) {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(addr.to_string())
            .or_default()
            .last_error = Some(error);
    }

    pub fn node_health(&self) -> std::collections::HashMap<String, NodeHealth> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A script loaded through the sidecar: `sha` as Redis answered it.
    pub fn remember_script(&self, sha: &[u8], body: bytes::Bytes) {
        let mut m = self.scripts.lock().unwrap_or_else(PoisonError::into_inner);
        let used: usize = m.values().map(bytes::Bytes::len).sum();
        if m.len() < MAX_SCRIPTS && used + body.len() <= MAX_SCRIPT_BYTES {
            m.insert(sha.to_ascii_lowercase(), body);
        }
    }

    /// SCRIPT FLUSH through the sidecar: no script is known any more.
    pub fn forget_scripts(&self) {
        self.scripts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// The body of a script loaded through the sidecar.
    pub fn script(&self, sha: &[u8]) -> Option<bytes::Bytes> {
        self.scripts
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&sha.to_ascii_lowercase())
            .cloned()
    }

    pub fn versions(&self) -> std::collections::HashMap<String, String> {
        self.versions
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// When the map was last read from the cluster.
    pub fn refreshed(&self) -> Option<Instant> {
        *self
            .refreshed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// Read the slot map from a cluster node's replies to `CLUSTER SHARDS`
/// (preferred) or `CLUSTER SLOTS` (RESP2 bytes).
pub fn parse_map(shards: &[u8], slots: Option<&[u8]>, asked: &str, tls: bool) -> Option<SlotMap> {
    let decode = |b: &[u8]| {
        redis_protocol::resp2::decode::decode(&bytes::Bytes::copy_from_slice(b))
            .ok()
            .flatten()
            .map(|(f, _)| f)
    };
    if let Some(m) = decode(shards).and_then(|f| SlotMap::from_shards_tls(&f, asked, tls))
        && !m.masters.is_empty()
    {
        return Some(m);
    }
    slots
        .and_then(decode)
        .and_then(|f| SlotMap::from_slots(&f, asked))
}

/// `cluster_state:ok` in a `CLUSTER INFO` reply.
pub fn state_ok(info: &[u8]) -> bool {
    memchr::memmem::find(info, b"cluster_state:ok").is_some()
}
