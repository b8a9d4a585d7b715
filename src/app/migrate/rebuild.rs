//! A key rebuilt on the target from its contents with ordinary commands:
//! for a target that refuses the source's DUMP payload (a newer RDB
//! version, Redis and Valkey), and, in chunks, for keys too large for one
//! RESTORE. Strings, hashes, lists, sets, sorted sets, and streams with
//! their consumer groups, consumers, last-delivered ids and pending
//! entries (owner, delivery count and idle time).

use bytes::Bytes;

use super::side::Side;
use crate::wire::resp::{bulk_text, elements, integer};
use crate::wire::{error_text, is_error};

/// Elements read and written per command.
pub const CHUNK: usize = 1000;
/// Bytes of a string per GETRANGE/APPEND.
const STRING_CHUNK: usize = 1 << 20;

fn b(s: &[u8]) -> Bytes {
    Bytes::copy_from_slice(s)
}

fn bulk(r: &Bytes) -> Option<Bytes> {
    bulk_text(r).map(|t| r.slice_ref(t))
}

fn text(r: &Bytes) -> Option<String> {
    bulk(r)
        .map(|t| String::from_utf8_lossy(&t).into_owned())
        .or_else(|| {
            // A simple string (`+...`) or an integer.
            let s = std::str::from_utf8(r).ok()?;
            Some(s.trim_end().trim_start_matches(['+', ':']).to_string())
        })
}

/// A flat `[field, value, ...]` reply as pairs.
fn pairs(r: &Bytes) -> Result<Vec<(String, Bytes)>, String> {
    let e = elements(r).ok_or("not an array reply")?;
    Ok(e.chunks(2)
        .filter(|p| p.len() == 2)
        .filter_map(|p| Some((text(&p[0])?, p[1].clone())))
        .collect())
}

fn field<'a>(p: &'a [(String, Bytes)], name: &str) -> Option<&'a Bytes> {
    p.iter().find(|(k, _)| k == name).map(|(_, v)| v)
}

/// Run `cmds` on `side`, failing on the first error reply.
async fn run(side: &mut Side, cmds: Vec<Vec<Bytes>>) -> Result<Vec<Bytes>, String> {
    if cmds.is_empty() {
        return Ok(Vec::new());
    }
    let r = side.call(&cmds).await?;
    if let Some((c, e)) = cmds.iter().zip(&r).find(|(_, r)| is_error(r)) {
        return Err(format!(
            "{} while rebuilding a key: {}",
            String::from_utf8_lossy(&c[0]),
            error_text(e)
        ));
    }
    Ok(r)
}

/// `SCAN`-like paging (`HSCAN`, `SSCAN`, `ZSCAN`): every element.
async fn scan_elements(from: &mut Side, cmd: &[u8], key: &Bytes) -> Result<Vec<Bytes>, String> {
    let mut cursor = Bytes::from_static(b"0");
    let mut out = Vec::new();
    loop {
        let r = run(
            from,
            vec![vec![
                b(cmd),
                key.clone(),
                cursor,
                b(b"COUNT"),
                Bytes::from(CHUNK.to_string()),
            ]],
        )
        .await?;
        let e = elements(&r[0]).ok_or("not an array reply")?;
        let next = e.first().and_then(bulk).ok_or("no cursor")?;
        let items = e.get(1).and_then(elements).ok_or("no elements")?;
        out.extend(items.iter().filter_map(bulk));
        if next == b"0"[..] {
            return Ok(out);
        }
        cursor = next;
    }
}

/// Write `items` (already in the order of the command's arguments) as
/// `cmd key item...` commands of at most [`CHUNK`] arguments each (`per`:
/// arguments per element, kept together).
fn chunked(cmd: &[u8], key: &Bytes, items: Vec<Bytes>, per: usize) -> Vec<Vec<Bytes>> {
    items
        .chunks(CHUNK * per)
        .map(|c| {
            let mut w = vec![b(cmd), key.clone()];
            w.extend(c.iter().cloned());
            w
        })
        .collect()
}

/// Rebuild `key` of the selected db from `from` on `to` (both in that
/// db): whatever `to` holds under that name is replaced. `pttl`: the
/// source's, applied at the end. Answers the bytes written, or `None`
/// when the key is gone from the source.
pub async fn rebuild(
    from: &mut Side,
    to: &mut Side,
    key: &Bytes,
    pttl: i64,
) -> Result<Option<u64>, String> {
    let t = run(from, vec![vec![b(b"TYPE"), key.clone()]]).await?;
    let kind = text(&t[0]).unwrap_or_default();
    let mut writes: Vec<Vec<Bytes>> = vec![vec![b(b"DEL"), key.clone()]];
    match kind.as_str() {
        "none" => {
            run(to, writes).await?;
            return Ok(None);
        }
        "string" => {
            let n = run(from, vec![vec![b(b"STRLEN"), key.clone()]]).await?;
            let len = integer(&n[0]).unwrap_or(0).max(0) as usize;
            let mut at = 0;
            // An empty string is a key too.
            writes.push(vec![b(b"SET"), key.clone(), Bytes::new()]);
            while at < len {
                let end = (at + STRING_CHUNK).min(len) - 1;
                let r = run(
                    from,
                    vec![vec![
                        b(b"GETRANGE"),
                        key.clone(),
                        Bytes::from(at.to_string()),
                        Bytes::from(end.to_string()),
                    ]],
                )
                .await?;
                writes.push(vec![
                    b(b"APPEND"),
                    key.clone(),
                    bulk(&r[0]).unwrap_or_default(),
                ]);
                at = end + 1;
            }
        }
        "hash" => {
            let items = scan_elements(from, b"HSCAN", key).await?;
            writes.extend(chunked(b"HSET", key, items, 2));
        }
        "set" => {
            let items = scan_elements(from, b"SSCAN", key).await?;
            writes.extend(chunked(b"SADD", key, items, 1));
        }
        "zset" => {
            // ZSCAN answers member, score: ZADD wants score, member.
            let items = scan_elements(from, b"ZSCAN", key).await?;
            let swapped: Vec<Bytes> = items
                .chunks(2)
                .filter(|p| p.len() == 2)
                .flat_map(|p| [p[1].clone(), p[0].clone()])
                .collect();
            writes.extend(chunked(b"ZADD", key, swapped, 2));
        }
        "list" => {
            let mut at = 0usize;
            loop {
                let r = run(
                    from,
                    vec![vec![
                        b(b"LRANGE"),
                        key.clone(),
                        Bytes::from(at.to_string()),
                        Bytes::from((at + CHUNK - 1).to_string()),
                    ]],
                )
                .await?;
                let items: Vec<Bytes> = elements(&r[0])
                    .ok_or("LRANGE: not an array")?
                    .iter()
                    .filter_map(bulk)
                    .collect();
                let n = items.len();
                writes.extend(chunked(b"RPUSH", key, items, 1));
                if n < CHUNK {
                    break;
                }
                at += CHUNK;
            }
        }
        "stream" => stream(from, key, &mut writes).await?,
        other => return Err(format!("a key of type {other} cannot be rebuilt")),
    }
    if pttl > 0 {
        writes.push(vec![
            b(b"PEXPIRE"),
            key.clone(),
            Bytes::from(pttl.to_string()),
        ]);
    }
    let bytes = writes
        .iter()
        .flat_map(|w| w.iter().skip(2))
        .map(|a| a.len() as u64)
        .sum();
    // In pieces: a big key is never one huge command.
    let mut batch = Vec::new();
    let mut size = 0;
    for w in writes {
        size += w.iter().map(Bytes::len).sum::<usize>();
        batch.push(w);
        if size >= STRING_CHUNK || batch.len() >= 64 {
            run(to, std::mem::take(&mut batch)).await?;
            size = 0;
        }
    }
    run(to, batch).await?;
    Ok(Some(bytes))
}

/// A stream's entries, its ids and counters, its groups with their
/// consumers and pending entries.
async fn stream(from: &mut Side, key: &Bytes, writes: &mut Vec<Vec<Bytes>>) -> Result<(), String> {
    let mut start = b(b"-");
    let mut first_id: Option<Bytes> = None;
    loop {
        let r = run(
            from,
            vec![vec![
                b(b"XRANGE"),
                key.clone(),
                start.clone(),
                b(b"+"),
                b(b"COUNT"),
                Bytes::from(CHUNK.to_string()),
            ]],
        )
        .await?;
        let entries = elements(&r[0]).ok_or("XRANGE: not an array")?;
        let n = entries.len();
        let mut last = None;
        for e in entries {
            let parts = elements(&e).ok_or("XRANGE: bad entry")?;
            let id = parts.first().and_then(bulk).ok_or("XRANGE: no id")?;
            let fields = parts.get(1).and_then(elements).ok_or("XRANGE: no fields")?;
            let mut w = vec![b(b"XADD"), key.clone(), id.clone()];
            w.extend(fields.iter().filter_map(bulk));
            writes.push(w);
            first_id.get_or_insert(id.clone());
            last = Some(id);
        }
        match last {
            Some(id) if n == CHUNK => {
                start = Bytes::from([b"(", &id[..]].concat());
            }
            _ => break,
        }
    }
    let info = run(from, vec![vec![b(b"XINFO"), b(b"STREAM"), key.clone()]]).await?;
    let info = pairs(&info[0])?;
    let get = |name: &str| field(&info, name).and_then(text).unwrap_or_default();
    if first_id.is_none() {
        // No entry left: the stream exists through a placeholder entry,
        // removed again before its ids are set.
        writes.push(vec![b(b"XADD"), key.clone(), b(b"0-1"), b(b"_"), b(b"_")]);
        writes.push(vec![b(b"XDEL"), key.clone(), b(b"0-1")]);
    }
    let mut setid = vec![
        b(b"XSETID"),
        key.clone(),
        Bytes::from(get("last-generated-id")),
    ];
    let added = get("entries-added");
    if !added.is_empty() {
        setid.extend([b(b"ENTRIESADDED"), Bytes::from(added)]);
        setid.extend([b(b"MAXDELETEDID"), Bytes::from(get("max-deleted-entry-id"))]);
    }
    writes.push(setid);
    let groups = run(from, vec![vec![b(b"XINFO"), b(b"GROUPS"), key.clone()]]).await?;
    for g in elements(&groups[0]).ok_or("XINFO GROUPS: not an array")? {
        let g = pairs(&g)?;
        let gtext = |name: &str| field(&g, name).and_then(text).unwrap_or_default();
        let name = field(&g, "name")
            .and_then(bulk)
            .ok_or("a group without a name")?;
        let mut create = vec![
            b(b"XGROUP"),
            b(b"CREATE"),
            key.clone(),
            name.clone(),
            Bytes::from(gtext("last-delivered-id")),
        ];
        let read = gtext("entries-read");
        // `nil` (a group created at an arbitrary id): left to Redis.
        if !read.is_empty() && read.parse::<i64>().is_ok() {
            create.extend([b(b"ENTRIESREAD"), Bytes::from(read)]);
        }
        writes.push(create);
        let consumers = run(
            from,
            vec![vec![
                b(b"XINFO"),
                b(b"CONSUMERS"),
                key.clone(),
                name.clone(),
            ]],
        )
        .await?;
        for c in elements(&consumers[0]).ok_or("XINFO CONSUMERS: not an array")? {
            let c = pairs(&c)?;
            if let Some(cname) = field(&c, "name").and_then(bulk) {
                writes.push(vec![
                    b(b"XGROUP"),
                    b(b"CREATECONSUMER"),
                    key.clone(),
                    name.clone(),
                    cname,
                ]);
            }
        }
        // Pending entries: their owner, idle time and delivery count (an
        // entry deleted from the stream cannot be pending again).
        let mut start = b(b"-");
        loop {
            let r = run(
                from,
                vec![vec![
                    b(b"XPENDING"),
                    key.clone(),
                    name.clone(),
                    start.clone(),
                    b(b"+"),
                    Bytes::from(CHUNK.to_string()),
                ]],
            )
            .await?;
            let pend = elements(&r[0]).ok_or("XPENDING: not an array")?;
            let n = pend.len();
            let mut last = None;
            for p in pend {
                let p = elements(&p).ok_or("XPENDING: bad entry")?;
                let (Some(id), Some(owner)) = (p.first().and_then(bulk), p.get(1).and_then(bulk))
                else {
                    continue;
                };
                let idle = p.get(2).and_then(|v| integer(v)).unwrap_or(0);
                let count = p.get(3).and_then(|v| integer(v)).unwrap_or(1);
                writes.push(vec![
                    b(b"XCLAIM"),
                    key.clone(),
                    name.clone(),
                    owner,
                    b(b"0"),
                    id.clone(),
                    b(b"IDLE"),
                    Bytes::from(idle.to_string()),
                    b(b"RETRYCOUNT"),
                    Bytes::from(count.to_string()),
                    b(b"FORCE"),
                    b(b"JUSTID"),
                ]);
                last = Some(id);
            }
            match last {
                Some(id) if n == CHUNK => start = Bytes::from([b"(", &id[..]].concat()),
                _ => break,
            }
        }
    }
    Ok(())
}
