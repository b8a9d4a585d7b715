//! Redis Cluster groundwork: key slots and the slot map.
//!
//! Not wired into routing yet (`redis-cluster://` URLs are still refused
//! at startup): this is the part of a cluster upstream that stands on its
//! own and is checked against a real cluster (`tests/cluster.rs`).
//!
//! - [`key_slot`]: CRC16 (XMODEM) of the key, or of its hash tag (the
//!   bytes between the first `{` and the first `}` after it, when not
//!   empty), modulo 16384, as `CLUSTER KEYSLOT` computes it.
//! - [`SlotMap`]: which master owns each slot and its replicas, from
//!   `CLUSTER SHARDS` (Redis 7) or `CLUSTER SLOTS`. A node announced with
//!   no endpoint (`?`, empty or null) is reached at the host that was
//!   asked; a hostname is kept for TLS verification.

use redis_protocol::resp2::types::OwnedFrame;

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

    /// Every slot has an owner.
    pub fn complete(&self) -> bool {
        self.owners.iter().all(Option::is_some)
    }

    fn empty() -> SlotMap {
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
                let port = field(n, "port")
                    .or_else(|| field(n, "tls-port"))
                    .and_then(int)
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
