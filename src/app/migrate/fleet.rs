//! Several sidecars in front of one source migrate together. The sidecar
//! that starts the migration (the leader) keeps its record on the source,
//! refreshed every [`BEAT`] with a TTL of [`RECORD_TTL_MS`] (so it goes
//! away by itself when the leader dies); every other sidecar (a follower)
//! finds it there, marks and holds its own writes, pushes what they
//! changed to a list the leader drains, and heartbeats under a key of its
//! own. At a cutover the leader asks for a hold, waits until every live
//! follower holds (no write of its in flight, its marks pushed), copies
//! what is left, and writes the endpoint the apps use now: each follower
//! switches when it reads it, then lets its writes go.
//!
//! Every key lives under one hash tag (one slot of a cluster), carries a
//! TTL (so the verification's count of keys without one is untouched),
//! and is never copied.

use std::collections::HashMap;
use std::time::Duration;

use bytes::Bytes;

use super::Item;
use super::side::{bulk, cmd};
use crate::upstream::UpstreamError;
use crate::upstream::pool::ControlConn;
use crate::wire::is_error;
use crate::wire::scan::split_array;

/// What every key of the fleet starts with: never copied, never compared.
pub(super) const PREFIX: &[u8] = b"{redis-sidecar}:";
const RECORD: &[u8] = b"{redis-sidecar}:migration";
const MEMBERS: &[u8] = b"{redis-sidecar}:members";
const MARKS: &[u8] = b"{redis-sidecar}:marks";

/// The record lives this long without the leader's refresh.
pub(super) const RECORD_TTL_MS: u64 = 3000;
/// A follower is live while its heartbeat key is (refreshed every poll).
const MEMBER_TTL_MS: u64 = 3000;
/// The members list and the marks list outlive a pause of their writers.
const LIST_TTL_MS: u64 = 60_000;
/// How often the leader refreshes the record and drains the marks.
pub(super) const BEAT: Duration = Duration::from_millis(500);
/// How often a sidecar without a migration looks for a record.
pub(super) const IDLE_POLL: Duration = Duration::from_millis(500);
/// How often a follower reads the record and pushes its marks.
pub(super) const FOLLOW_POLL: Duration = Duration::from_millis(25);
/// How long the leader waits, at the start, for the sidecars it sees in
/// `CLIENT LIST` to join.
pub(super) const JOIN_WAIT: Duration = Duration::from_secs(5);
/// Marks pushed (or popped) per command.
const MARKS_PER_CALL: usize = 1000;
/// The name of the fleet's connections (`CLIENT LIST`).
pub(super) const CLIENT_NAME: &str = "redis-sidecar-fleet";

/// A key of the fleet (not the app's).
pub(super) fn ours(key: &[u8]) -> bool {
    key.starts_with(PREFIX)
}

/// What a follower pushes: what a write changed, or a script it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Mark {
    Item(Item),
    Script(Bytes),
}

pub(super) fn encode(mark: &Mark) -> Bytes {
    let mut out = Vec::new();
    match mark {
        Mark::Item(Item::Key(db, k)) => {
            out.extend_from_slice(format!("k{db}:").as_bytes());
            out.extend_from_slice(k);
        }
        Mark::Item(Item::FlushDb(db)) => out.extend_from_slice(format!("f{db}").as_bytes()),
        Mark::Item(Item::FlushAll) => out.push(b'a'),
        Mark::Script(body) => {
            out.push(b's');
            out.extend_from_slice(body);
        }
    }
    Bytes::from(out)
}

pub(super) fn decode(b: &Bytes) -> Option<Mark> {
    let db = |s: &[u8]| std::str::from_utf8(s).ok()?.parse::<i64>().ok();
    match b.first()? {
        b'k' => {
            let colon = b.iter().position(|&c| c == b':')?;
            Some(Mark::Item(Item::Key(
                db(&b[1..colon])?,
                b.slice(colon + 1..),
            )))
        }
        b'f' => Some(Mark::Item(Item::FlushDb(db(&b[1..])?))),
        b'a' if b.len() == 1 => Some(Mark::Item(Item::FlushAll)),
        b's' => Some(Mark::Script(b.slice(1..))),
        _ => None,
    }
}

/// Whether the record asks the followers to hold their writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    Run,
    Hold,
    /// The migration ended (the record says how, then expires).
    End,
}

impl State {
    fn label(self) -> &'static str {
        match self {
            State::Run => "run",
            State::Hold => "hold",
            State::End => "end",
        }
    }
}

/// The migration's record, as read from the source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Record {
    pub id: String,
    pub leader: String,
    pub from: String,
    pub to: String,
    pub state: State,
    /// The hold asked for (numbered: a follower acknowledges each).
    pub hold: u64,
    /// The endpoint the apps use now.
    pub on: String,
    pub max_pause_ms: u64,
    pub phase: String,
    pub reason: String,
    pub keys_copied: u64,
    pub keys_total: u64,
}

fn parse_record(r: &Bytes) -> Option<Record> {
    let pairs = split_array(r)?;
    let mut f: HashMap<Vec<u8>, Bytes> = HashMap::new();
    for pair in pairs.chunks(2) {
        if let [k, v] = pair {
            let (k, v) = (bulk(&r.slice(k.0..k.1))?, bulk(&r.slice(v.0..v.1))?);
            f.insert(k.to_vec(), v);
        }
    }
    let text = |k: &str| {
        f.get(k.as_bytes())
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .unwrap_or_default()
    };
    let num = |k: &str| text(k).parse::<u64>().unwrap_or(0);
    let id = text("id");
    if id.is_empty() {
        return None;
    }
    Some(Record {
        state: match text("state").as_str() {
            "hold" => State::Hold,
            "end" => State::End,
            _ => State::Run,
        },
        leader: text("leader"),
        from: text("from"),
        to: text("to"),
        hold: num("hold"),
        on: text("on"),
        max_pause_ms: num("max_pause_ms"),
        phase: text("phase"),
        reason: text("reason"),
        keys_copied: num("keys_copied"),
        keys_total: num("keys_total"),
        id,
    })
}

/// A call whose replies must not be errors.
async fn ok(c: &mut ControlConn, cmds: &[Vec<Bytes>]) -> Result<Vec<Bytes>, FleetError> {
    let replies = c.call(cmds).await.map_err(FleetError::Conn)?;
    if let Some(e) = replies.iter().find(|r| is_error(r)) {
        return Err(FleetError::Refused(crate::wire::error_text(e)));
    }
    Ok(replies)
}

/// Why the fleet's keys could not be read or written.
#[derive(Debug, thiserror::Error)]
pub(super) enum FleetError {
    #[error(transparent)]
    Conn(UpstreamError),
    #[error("the source refused the migration's record: {0}")]
    Refused(String),
}

/// The record on `c`'s server (`None`: there is none, or an unreadable
/// one).
pub(super) async fn read_record(c: &mut ControlConn) -> Result<Option<Record>, FleetError> {
    let r = ok(c, &[cmd(&[b"HGETALL", RECORD])]).await?;
    Ok(parse_record(&r[0]))
}

fn hset(fields: &[(&str, String)]) -> Vec<Bytes> {
    let mut c = cmd(&[b"HSET", RECORD]);
    for (k, v) in fields {
        c.push(Bytes::copy_from_slice(k.as_bytes()));
        c.push(Bytes::from(v.clone()));
    }
    c
}

fn pexpire(key: &[u8], ms: u64) -> Vec<Bytes> {
    cmd(&[b"PEXPIRE", key, ms.to_string().as_bytes()])
}

/// The leader: a new record (what an earlier one left is removed first).
pub(super) async fn create(
    c: &mut ControlConn,
    identity: &[(&str, String)],
    on: &str,
) -> Result<(), FleetError> {
    let mut fields = identity.to_vec();
    fields.extend([
        ("state", State::Run.label().to_string()),
        ("hold", "0".to_string()),
        ("on", on.to_string()),
    ]);
    ok(
        c,
        &[
            cmd(&[b"DEL", RECORD, MEMBERS, MARKS]),
            hset(&fields),
            pexpire(RECORD, RECORD_TTL_MS),
        ],
    )
    .await
    .map(drop)
}

/// The leader, every [`BEAT`]: the record's fields refreshed (all but the
/// state, which [`set_state`] writes), its TTL and the members' renewed.
pub(super) async fn refresh(
    c: &mut ControlConn,
    fields: &[(&str, String)],
) -> Result<(), FleetError> {
    ok(
        c,
        &[
            hset(fields),
            pexpire(RECORD, RECORD_TTL_MS),
            pexpire(MEMBERS, LIST_TTL_MS),
        ],
    )
    .await
    .map(drop)
}

/// The leader asks for a hold (`Hold`), lets the writes go (`Run`), or
/// says where the apps are now (`on`).
pub(super) async fn set_state(
    c: &mut ControlConn,
    state: State,
    hold: u64,
    on: Option<&str>,
) -> Result<(), FleetError> {
    let mut fields = vec![
        ("state", state.label().to_string()),
        ("hold", hold.to_string()),
    ];
    if let Some(on) = on {
        fields.push(("on", on.to_string()));
    }
    ok(c, &[hset(&fields)]).await.map(drop)
}

/// The leader, at the end: the record says how it ended, and expires.
pub(super) async fn end(c: &mut ControlConn, fields: &[(&str, String)]) -> Result<(), FleetError> {
    let mut fields = fields.to_vec();
    fields.push(("state", State::End.label().to_string()));
    ok(
        c,
        &[
            hset(&fields),
            pexpire(RECORD, RECORD_TTL_MS),
            cmd(&[b"DEL", MEMBERS, MARKS]),
        ],
    )
    .await
    .map(drop)
}

/// The leader: every mark the followers pushed, in order.
pub(super) async fn drain(c: &mut ControlConn) -> Result<Vec<Mark>, FleetError> {
    let mut out = Vec::new();
    loop {
        let n = MARKS_PER_CALL.to_string();
        let r = ok(c, &[cmd(&[b"LPOP", MARKS, n.as_bytes()])]).await?;
        let Some(items) = split_array(&r[0]) else {
            // A null: the list is empty.
            return Ok(out);
        };
        let count = items.len();
        out.extend(
            items
                .iter()
                .filter_map(|&(s, e)| bulk(&r[0].slice(s..e)))
                .filter_map(|b| decode(&b)),
        );
        if count < MARKS_PER_CALL {
            return Ok(out);
        }
    }
}

/// What a follower says of itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Says {
    Following,
    /// Holds its writes for the hold numbered so, its marks pushed.
    Held(u64),
    /// Cannot take part (why).
    Cannot(String),
}

/// A follower's heartbeat: what it says, and the epoch of its following
/// (another one means it stopped following for a while).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Beat {
    pub epoch: String,
    pub says: Says,
}

fn beat_text(b: &Beat) -> String {
    match &b.says {
        Says::Following => format!("following {}", b.epoch),
        Says::Held(n) => format!("held {} {n}", b.epoch),
        Says::Cannot(why) => format!("cannot {} {why}", b.epoch),
    }
}

fn parse_beat(s: &str) -> Option<Beat> {
    let mut parts = s.splitn(3, ' ');
    let (what, epoch) = (parts.next()?, parts.next()?.to_string());
    let rest = parts.next().unwrap_or_default();
    let says = match what {
        "following" => Says::Following,
        "held" => Says::Held(rest.parse().ok()?),
        "cannot" => Says::Cannot(rest.to_string()),
        _ => return None,
    };
    Some(Beat { epoch, says })
}

fn member_key(id: &str) -> Bytes {
    let mut k = b"{redis-sidecar}:member:".to_vec();
    k.extend_from_slice(id.as_bytes());
    Bytes::from(k)
}

/// The leader: every follower that joined, and its heartbeat (`None`: it
/// stopped heartbeating).
pub(super) async fn members(
    c: &mut ControlConn,
) -> Result<Vec<(String, Option<Beat>)>, FleetError> {
    let r = ok(c, &[cmd(&[b"HKEYS", MEMBERS])]).await?;
    let ids: Vec<String> = split_array(&r[0])
        .unwrap_or_default()
        .iter()
        .filter_map(|&(s, e)| bulk(&r[0].slice(s..e)))
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .collect();
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut mget = vec![Bytes::from_static(b"MGET")];
    mget.extend(ids.iter().map(|id| member_key(id)));
    let r = ok(c, &[mget]).await?;
    let beats = split_array(&r[0]).unwrap_or_default();
    Ok(ids
        .into_iter()
        .enumerate()
        .map(|(i, id)| {
            let beat = beats
                .get(i)
                .and_then(|&(s, e)| bulk(&r[0].slice(s..e)))
                .and_then(|b| parse_beat(&String::from_utf8_lossy(&b)));
            (id, beat)
        })
        .collect())
}

/// How many of the fleet's keys there are (left out of the key count the
/// copy's progress is measured against).
pub(super) async fn count(c: &mut ControlConn) -> Result<u64, FleetError> {
    let mut exists = cmd(&[b"EXISTS", RECORD, MEMBERS, MARKS]);
    exists.extend(members(c).await?.iter().map(|(id, _)| member_key(id)));
    let r = ok(c, &[exists]).await?;
    Ok(crate::wire::resp::integer(&r[0]).unwrap_or(0).max(0) as u64)
}

/// The leader: a follower that left (no heartbeat, no connection).
pub(super) async fn forget(c: &mut ControlConn, id: &str) -> Result<(), FleetError> {
    ok(c, &[cmd(&[b"HDEL", MEMBERS, id.as_bytes()])])
        .await
        .map(drop)
}

/// A follower, every poll: its marks pushed, its heartbeat, and the record
/// read after both.
pub(super) async fn follow_step(
    c: &mut ControlConn,
    id: &str,
    beat: &Beat,
    marks: &[Bytes],
) -> Result<Option<Record>, FleetError> {
    let mut cmds = Vec::new();
    for chunk in marks.chunks(MARKS_PER_CALL) {
        let mut push = cmd(&[b"RPUSH", MARKS]);
        push.extend(chunk.iter().cloned());
        cmds.push(push);
        cmds.push(pexpire(MARKS, LIST_TTL_MS));
    }
    cmds.push(cmd(&[
        b"SET",
        &member_key(id),
        beat_text(beat).as_bytes(),
        b"PX",
        MEMBER_TTL_MS.to_string().as_bytes(),
    ]));
    cmds.push(cmd(&[b"HGETALL", RECORD]));
    let r = ok(c, &cmds).await?;
    Ok(r.last().and_then(parse_record))
}

/// A follower joins (before its first heartbeat).
pub(super) async fn join(c: &mut ControlConn, id: &str) -> Result<(), FleetError> {
    ok(
        c,
        &[
            cmd(&[b"HSET", MEMBERS, id.as_bytes(), b"1"]),
            pexpire(MEMBERS, LIST_TTL_MS),
        ],
    )
    .await
    .map(drop)
}

/// A follower leaves (the sidecar shuts down, the record went away).
pub(super) async fn leave(c: &mut ControlConn, id: &str) -> Result<(), FleetError> {
    ok(
        c,
        &[
            cmd(&[b"HDEL", MEMBERS, id.as_bytes()]),
            cmd(&[b"DEL", &member_key(id)]),
        ],
    )
    .await
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_round_trip() {
        for m in [
            Mark::Item(Item::Key(3, Bytes::from_static(b"a:b\r\nc"))),
            Mark::Item(Item::Key(0, Bytes::new())),
            Mark::Item(Item::FlushDb(12)),
            Mark::Item(Item::FlushAll),
            Mark::Script(Bytes::from_static(b"return 1")),
        ] {
            assert_eq!(decode(&encode(&m)), Some(m));
        }
        assert_eq!(decode(&Bytes::from_static(b"kx:y")), None);
        assert_eq!(decode(&Bytes::from_static(b"")), None);
    }

    #[test]
    fn beats_round_trip() {
        for says in [
            Says::Following,
            Says::Held(7),
            Says::Cannot("no upstream named b".into()),
        ] {
            let b = Beat {
                epoch: "e1".into(),
                says,
            };
            assert_eq!(parse_beat(&beat_text(&b)), Some(b));
        }
    }

    #[test]
    fn a_record_from_hgetall() {
        let r = Bytes::from_static(
            b"*8\r\n$2\r\nid\r\n$1\r\nx\r\n$5\r\nstate\r\n$4\r\nhold\r\n$4\r\nhold\r\n$1\r\n2\r\n$2\r\non\r\n$1\r\nb\r\n",
        );
        let rec = parse_record(&r).unwrap();
        assert_eq!(
            (rec.id.as_str(), rec.state, rec.hold, rec.on.as_str()),
            ("x", State::Hold, 2, "b")
        );
        assert_eq!(parse_record(&Bytes::from_static(b"*0\r\n")), None);
    }
}
