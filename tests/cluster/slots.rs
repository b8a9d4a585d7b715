//! Redis Cluster groundwork against a real 3-master, 3-replica cluster:
//! key slots as the cluster computes them, and the slot map read from
//! `CLUSTER SHARDS` and `CLUSTER SLOTS`.

use redis_protocol::resp2::types::OwnedFrame;
use redis_sidecar::upstream::cluster::{SLOTS, SlotMap, key_slot};

use crate::support::*;

async fn frame(port: u16, args: &[&[u8]]) -> OwnedFrame {
    let mut c = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    let raw = c.call(args).await;
    redis_protocol::resp2::decode::decode(&raw)
        .unwrap()
        .unwrap()
        .0
}

#[tokio::test]
async fn slots_and_slot_map_match_a_real_cluster() {
    let cluster = Cluster::start(3);
    let port = cluster.nodes[0].port;
    let mut c = Raw::connect(format!("127.0.0.1:{port}").parse().unwrap()).await;
    // Key slots: plain keys, hash tags, odd braces, binary.
    let mut keys: Vec<Vec<u8>> = (0..500).map(|i| format!("key:{i}").into_bytes()).collect();
    keys.extend((0..100).map(|i| format!("{{user{i}}}.feed").into_bytes()));
    for k in ["{}", "{}x", "a{}{b}", "a{{b}}c", "{a}{b}", "}{", "{"] {
        keys.push(k.as_bytes().to_vec());
    }
    keys.push(vec![0, 255, b'{', 1, b'}', 7]);
    for k in &keys {
        let r = c.call(&[b"CLUSTER", b"KEYSLOT", k]).await;
        let want: u16 = std::str::from_utf8(&r[1..r.len() - 2])
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(key_slot(k), want, "{k:?}");
    }
    // The slot map, both ways, agrees with where the cluster puts keys.
    let shards =
        SlotMap::from_shards(&frame(port, &[b"CLUSTER", b"SHARDS"]).await, "127.0.0.1").unwrap();
    let slots =
        SlotMap::from_slots(&frame(port, &[b"CLUSTER", b"SLOTS"]).await, "127.0.0.1").unwrap();
    assert!(shards.complete() && slots.complete());
    assert_eq!(shards.masters.len(), 3);
    assert!(
        shards.replicas.iter().all(|r| r.len() == 1),
        "{:?}",
        shards.replicas
    );
    for slot in 0..SLOTS as u16 {
        let (a, b) = (shards.owner(slot).unwrap(), slots.owner(slot).unwrap());
        assert_eq!((a.port, &a.id), (b.port, &b.id), "slot {slot}");
    }
    // A key's owner accepts it; another master answers MOVED to it.
    for k in keys.iter().take(50) {
        let owner = shards.owner(key_slot(k)).unwrap();
        let mut o = Raw::connect(format!("{}:{}", owner.host, owner.port).parse().unwrap()).await;
        assert_eq!(&o.call(&[b"SET", k, b"v"]).await[..], b"+OK\r\n");
        let other = shards.masters.iter().find(|m| m.id != owner.id).unwrap();
        let mut x = Raw::connect(format!("{}:{}", other.host, other.port).parse().unwrap()).await;
        let r = x.call(&[b"GET", k]).await;
        let moved = format!("-MOVED {} 127.0.0.1:{}\r\n", key_slot(k), owner.port);
        assert_eq!(String::from_utf8_lossy(&r), moved);
    }
}

/// Multi-key commands split by slot, each part sent to its owner, and the
/// replies merged are byte-identical to the unsplit command on a single
/// Redis with the same data, in RESP2 and RESP3; a MOVED from a wrong
/// node parses to the owner.
#[tokio::test]
async fn split_commands_merge_to_what_a_single_redis_answers() {
    use bytes::Bytes;
    use redis_sidecar::upstream::cluster::{Redirect, merge, split_by_slot, split_kind};
    let cluster = Cluster::start(3);
    let single = RedisServer::start();
    let seed = cluster.nodes[0].port;
    let map =
        SlotMap::from_shards(&frame(seed, &[b"CLUSTER", b"SHARDS"]).await, "127.0.0.1").unwrap();
    let scripts: Vec<Vec<&str>> = vec![
        vec!["MSET", "a", "1", "b", "2", "{a}c", "3", "d", "4", "e", "5"],
        vec!["MGET", "a", "b", "nope", "{a}c", "d", "e", "a"],
        vec!["EXISTS", "a", "b", "nope", "a", "{a}c"],
        vec!["TOUCH", "a", "d", "nope"],
        vec!["DEL", "a", "nope", "d"],
        vec!["MGET", "a", "b", "d", "e"],
        vec!["UNLINK", "b", "e", "{a}c"],
        vec!["MGET", "a", "b", "{a}c", "d", "e"],
    ];
    for proto in ["2", "3"] {
        let mut conns = std::collections::HashMap::new();
        for m in &map.masters {
            let mut c = Raw::connect(format!("{}:{}", m.host, m.port).parse().unwrap()).await;
            assert!(
                !c.call(&[b"HELLO", proto.as_bytes()])
                    .await
                    .starts_with(b"-")
            );
            c.call(&[b"FLUSHALL"]).await;
            conns.insert(m.port, c);
        }
        let mut s1 = Raw::connect(format!("127.0.0.1:{}", single.port).parse().unwrap()).await;
        assert!(
            !s1.call(&[b"HELLO", proto.as_bytes()])
                .await
                .starts_with(b"-")
        );
        s1.call(&[b"FLUSHALL"]).await;
        for script in &scripts {
            let args: Vec<Bytes> = script.iter().map(|a| Bytes::from(a.to_string())).collect();
            let refs: Vec<&[u8]> = script.iter().map(|a| a.as_bytes()).collect();
            let want = s1.call(&refs).await;
            let (kind, stride) = split_kind(&script[0].to_ascii_lowercase()).unwrap();
            let parts = split_by_slot(&args, stride);
            let mut replies = Vec::new();
            for p in &parts {
                let owner = map.owner(p.slot).unwrap();
                let c = conns.get_mut(&owner.port).unwrap();
                let prefs: Vec<&[u8]> = p.args.iter().map(|a| &a[..]).collect();
                replies.push(c.call(&prefs).await);
            }
            let got = merge(kind, &parts, &replies).unwrap();
            assert_eq!(got, want, "RESP{proto} {script:?}");
        }
    }
    // A wrong node says MOVED to the owner.
    let slot = key_slot(b"a");
    let owner = map.owner(slot).unwrap();
    let other = map.masters.iter().find(|m| m.id != owner.id).unwrap();
    let mut x = Raw::connect(format!("{}:{}", other.host, other.port).parse().unwrap()).await;
    let r = x.call(&[b"GET", b"a"]).await;
    assert_eq!(
        Redirect::parse(&r, "127.0.0.1"),
        Some(Redirect::Moved {
            slot,
            host: "127.0.0.1".into(),
            port: owner.port
        })
    );
}

/// A SCAN walk across the masters with one encoded cursor visits every key
/// present for the whole walk (exactly once here, with keys added during
/// the walk), and a cursor from another topology epoch is refused.
#[tokio::test]
async fn scan_cursor_walks_every_master() {
    use redis_sidecar::upstream::cluster::{CursorError, ScanCursor};
    let cluster = Cluster::start(3);
    let seed = cluster.nodes[0].port;
    let map =
        SlotMap::from_shards(&frame(seed, &[b"CLUSTER", b"SHARDS"]).await, "127.0.0.1").unwrap();
    let mut conns = Vec::new();
    for m in &map.masters {
        conns.push(Raw::connect(format!("{}:{}", m.host, m.port).parse().unwrap()).await);
    }
    let owner_index = |k: &[u8]| {
        let o = map.owner(key_slot(k)).unwrap();
        map.masters.iter().position(|m| m.id == o.id).unwrap()
    };
    for i in 0..3000 {
        let k = format!("s:{i}");
        let c = &mut conns[owner_index(k.as_bytes())];
        assert_eq!(&c.call(&[b"SET", k.as_bytes(), b"1"]).await[..], b"+OK\r\n");
    }
    let epoch = 3u8;
    let mut seen = std::collections::HashMap::<String, usize>::new();
    let mut cursor = b"0".to_vec();
    let mut added = 0;
    let mut steps = 0;
    loop {
        let at = ScanCursor::decode(&cursor, epoch, map.masters.len()).unwrap();
        let (node, inner) = at.map_or((0, 0), |c| (c.node, c.inner));
        let inner_text = inner.to_string();
        let reply = conns[usize::from(node)]
            .call(&[
                b"SCAN",
                inner_text.as_bytes(),
                b"MATCH",
                b"s:*",
                b"COUNT",
                b"100",
            ])
            .await;
        let OwnedFrame::Array(parts) = redis_protocol::resp2::decode::decode(&reply)
            .unwrap()
            .unwrap()
            .0
        else {
            panic!("{reply:?}");
        };
        let (OwnedFrame::BulkString(next), OwnedFrame::Array(keys)) = (&parts[0], &parts[1]) else {
            panic!("{reply:?}");
        };
        for k in keys {
            if let OwnedFrame::BulkString(k) = k {
                *seen
                    .entry(String::from_utf8_lossy(k).into_owned())
                    .or_default() += 1;
            }
        }
        // Keys arrive while the walk goes on.
        let k = format!("s:new:{added}");
        added += 1;
        let c = &mut conns[owner_index(k.as_bytes())];
        c.call(&[b"SET", k.as_bytes(), b"1"]).await;
        let next: u64 = std::str::from_utf8(next).unwrap().parse().unwrap();
        steps += 1;
        match ScanCursor::after(epoch, node, next, map.masters.len()) {
            Some(c) => cursor = c.encode().unwrap().into_bytes(),
            None => break,
        }
        // A cursor of another epoch is refused.
        assert_eq!(
            ScanCursor::decode(&cursor, epoch + 1, map.masters.len()),
            Err(CursorError::Stale)
        );
    }
    for i in 0..3000 {
        assert_eq!(seen.get(&format!("s:{i}")), Some(&1), "s:{i}");
    }
    assert!(steps > 3, "{steps}");
}
