//! Where a command goes on a cluster, decided once from its name and
//! keys ([`Route`], the one classification of the cluster path), and the
//! `CLUSTER` subcommands the sidecar answers itself (it is the only node
//! the app sees).

use std::net::SocketAddr;

use bytes::Bytes;

use super::merge::Merge;
use super::{SLOTS, Split};
use crate::request::command::Table;
use crate::wire::{Proto, Value};

/// How the first command of a job is routed.
pub enum Route {
    /// To the master owning this slot.
    Slot(u16),
    /// No key: the client's default node.
    Any,
    /// Keys of several slots, split and merged.
    Split(Split, usize),
    /// Keys of several slots in a command that cannot be split: Redis's
    /// own CROSSSLOT error.
    CrossSlot,
    /// To every master, replies merged.
    Fan(Merge),
    /// SCAN across the masters.
    Scan,
    /// INFO from one master, with cluster-wide fields.
    Info,
    /// Answered by the sidecar.
    Answer(Bytes),
}

/// The slot whose master is the pub/sub node: subscribers and PUBLISH
/// through the sidecar all go there (the slot of `{redis-sidecar}:pubsub`).
pub(crate) fn pubsub_slot() -> u16 {
    super::key_slot(b"{redis-sidecar}:pubsub")
}

/// Commands routed by their name, whatever their keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Named {
    /// CLUSTER SLOTS/SHARDS/NODES/INFO/MYID.
    Masquerade,
    Info,
    Dbsize,
    Flush,
    Keys,
    RandomKey,
    Scan,
    ScriptLoad,
    ScriptFlush,
    ScriptExists,
    /// FUNCTION LOAD: every master gets the library (the first's reply).
    FunctionLoad,
    /// FUNCTION DELETE/FLUSH/RESTORE: every master.
    FunctionChange,
    /// READONLY/READWRITE: refused, as a Redis without cluster support
    /// refuses them (the app sees one plain Redis).
    ClusterOnly,
    /// SPUBLISH/SSUBSCRIBE/SUNSUBSCRIBE: by the channel's slot.
    ShardChannel,
    /// PUBLISH and PUBSUB (but its SHARD* subcommands): on the pub/sub
    /// node, where every subscriber through the sidecar is.
    PubSub,
    /// SLOWLOG GET: every master's, merged newest first.
    SlowlogGet,
    /// SLOWLOG LEN: summed.
    SlowlogLen,
    /// SLOWLOG RESET: every master.
    SlowlogReset,
}

/// Which [`Named`] command `args` is (no allocation: it runs for every
/// request the session sends to a cluster).
pub(crate) fn named(args: &[Bytes]) -> Option<Named> {
    let name = args.first()?;
    let sub = |options: &[&[u8]]| {
        args.get(1)
            .is_some_and(|s| options.iter().any(|o| s.eq_ignore_ascii_case(o)))
    };
    let is = |n: &[u8]| name.eq_ignore_ascii_case(n);
    Some(if is(b"cluster") {
        if !sub(&[b"slots", b"shards", b"nodes", b"info", b"myid"]) {
            return None;
        }
        Named::Masquerade
    } else if is(b"info") {
        Named::Info
    } else if is(b"dbsize") {
        Named::Dbsize
    } else if is(b"flushall") || is(b"flushdb") {
        Named::Flush
    } else if is(b"keys") {
        Named::Keys
    } else if is(b"randomkey") {
        Named::RandomKey
    } else if is(b"scan") {
        Named::Scan
    } else if is(b"script") {
        if sub(&[b"load"]) {
            Named::ScriptLoad
        } else if sub(&[b"flush"]) {
            Named::ScriptFlush
        } else if sub(&[b"exists"]) {
            Named::ScriptExists
        } else {
            return None;
        }
    } else if is(b"function") {
        if sub(&[b"load"]) {
            Named::FunctionLoad
        } else if sub(&[b"delete", b"flush", b"restore"]) {
            Named::FunctionChange
        } else {
            return None;
        }
    } else if is(b"publish") {
        Named::PubSub
    } else if is(b"pubsub") {
        if sub(&[b"shardchannels", b"shardnumsub"]) {
            return None;
        }
        Named::PubSub
    } else if is(b"slowlog") {
        if sub(&[b"get"]) {
            Named::SlowlogGet
        } else if sub(&[b"len"]) {
            Named::SlowlogLen
        } else if sub(&[b"reset"]) {
            Named::SlowlogReset
        } else {
            return None;
        }
    } else if is(b"readonly") || is(b"readwrite") {
        Named::ClusterOnly
    } else if is(b"spublish") || is(b"ssubscribe") || is(b"sunsubscribe") {
        Named::ShardChannel
    } else {
        return None;
    })
}

/// SLOWLOG GET's count: 10 without one, every entry for -1 (`None`: not
/// a count Redis takes).
fn slowlog_count(args: &[Bytes]) -> Option<usize> {
    let Some(n) = args.get(2) else {
        return Some(10);
    };
    match crate::wire::scan::parse_int(n)? {
        -1 => Some(usize::MAX),
        n => usize::try_from(n).ok(),
    }
    .filter(|_| args.len() <= 3)
}

/// The slots of a command's keys.
pub(crate) enum Slots {
    None,
    One(u16),
    Many,
}

pub(crate) fn slots_of(args: &[Bytes], info: &crate::request::command::CommandInfo) -> Slots {
    let mut slot = None;
    for k in info.keys(args) {
        let Some(key) = args.get(k.index) else {
            continue;
        };
        let s = super::key_slot(key);
        match slot {
            None => slot = Some(s),
            Some(first) if first != s => return Slots::Many,
            _ => {}
        }
    }
    slot.map_or(Slots::None, Slots::One)
}

/// Where a job's commands go, decided from its first command.
/// `me`: where clients reach the sidecar (what CLUSTER SLOTS names);
/// `max_reply_bulk`: the most a merged KEYS reply may hold.
pub fn route_of(
    args: &[Bytes],
    table: &Table,
    me: SocketAddr,
    max_reply_bulk: usize,
    proto: Proto,
) -> Route {
    if let Some(n) = named(args) {
        return match n {
            Named::Masquerade => match args.get(1).and_then(|s| masquerade(s, me, proto)) {
                Some(v) => Route::Answer(v.encode(proto)),
                None => Route::Any,
            },
            Named::Info => Route::Info,
            Named::Dbsize | Named::SlowlogLen => Route::Fan(Merge::Sum),
            Named::SlowlogReset => Route::Fan(Merge::AllOk),
            // A count Redis would refuse: one master's own error.
            Named::SlowlogGet => match slowlog_count(args) {
                Some(count) => Route::Fan(Merge::Slowlog(count)),
                None => Route::Any,
            },
            Named::Flush | Named::ScriptFlush => Route::Fan(Merge::AllOk),
            Named::Keys => Route::Fan(Merge::Concat(max_reply_bulk)),
            Named::RandomKey => Route::Fan(Merge::FirstNonNull),
            Named::Scan => Route::Scan,
            // The body is remembered by the router (Merge::ScriptLoad).
            Named::ScriptLoad => Route::Fan(Merge::First),
            Named::ScriptExists => Route::Fan(Merge::AndArrays),
            Named::FunctionLoad => Route::Fan(Merge::Library),
            Named::FunctionChange => Route::Fan(Merge::AllOk),
            Named::ClusterOnly => Route::Answer(Bytes::from_static(
                b"-ERR This instance has cluster support disabled\r\n",
            )),
            Named::PubSub => Route::Slot(pubsub_slot()),
            Named::ShardChannel => match args.get(1) {
                Some(ch) => Route::Slot(super::key_slot(ch)),
                None => Route::Any,
            },
        };
    }
    let Some(info) = table.lookup(args) else {
        return Route::Any;
    };
    match slots_of(args, info) {
        Slots::None => Route::Any,
        Slots::One(s) => Route::Slot(s),
        Slots::Many => {
            let name = args
                .first()
                .map(|n| String::from_utf8_lossy(n).to_ascii_lowercase())
                .unwrap_or_default();
            match super::split_kind(&name) {
                Some((kind, stride)) => Route::Split(kind, stride),
                None => Route::CrossSlot,
            }
        }
    }
}

/// Where a session may send a request straight to a node's shared
/// connection (not a command the router splits, fans out or answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direct {
    /// Every key in this one slot.
    Slot(u16),
    /// No key: the client's own node (see [`super::SlotMap::keyless_node`]).
    Keyless,
}

pub fn direct(args: &[Bytes], info: &crate::request::command::CommandInfo) -> Option<Direct> {
    if named(args).is_some() {
        return None;
    }
    match slots_of(args, info) {
        Slots::None => Some(Direct::Keyless),
        Slots::One(s) => Some(Direct::Slot(s)),
        Slots::Many => None,
    }
}

/// The sidecar's own node id in the masquerade (40 hex digits).
const SELF_ID: &str = "5369646563617273696465636172736964656361";

/// `CLUSTER SLOTS/SHARDS/NODES/INFO/MYID`: the sidecar is one node owning
/// every slot, so a cluster-aware client stays in single-node mode.
fn masquerade(sub: &[u8], me: SocketAddr, proto: Proto) -> Option<Value> {
    let ip = me.ip().to_string();
    let port = i64::from(me.port());
    let sub = sub.to_ascii_lowercase();
    Some(match &sub[..] {
        b"slots" => Value::Array(vec![Value::Array(vec![
            Value::Int(0),
            Value::Int(SLOTS as i64 - 1),
            Value::Array(vec![
                Value::bulk(ip.clone()),
                Value::Int(port),
                Value::bulk(SELF_ID),
                Value::Array(vec![]),
            ]),
        ])]),
        b"shards" => Value::Array(vec![Value::Map(vec![
            (
                Value::bulk("slots"),
                Value::Array(vec![Value::Int(0), Value::Int(SLOTS as i64 - 1)]),
            ),
            (
                Value::bulk("nodes"),
                Value::Array(vec![Value::Map(vec![
                    (Value::bulk("id"), Value::bulk(SELF_ID)),
                    (Value::bulk("port"), Value::Int(port)),
                    (Value::bulk("ip"), Value::bulk(ip.clone())),
                    (Value::bulk("endpoint"), Value::bulk(ip.clone())),
                    (Value::bulk("role"), Value::bulk("master")),
                    (Value::bulk("replication-offset"), Value::Int(0)),
                    (Value::bulk("health"), Value::bulk("online")),
                ])]),
            ),
        ])]),
        b"nodes" => Value::Text(format!(
            "{SELF_ID} {ip}:{port}@{port} myself,master - 0 0 1 connected 0-{}\n",
            SLOTS - 1
        )),
        b"myid" => Value::bulk(SELF_ID),
        b"info" => Value::Text(
            "cluster_state:ok\r\ncluster_slots_assigned:16384\r\ncluster_slots_ok:16384\r\ncluster_slots_pfail:0\r\ncluster_slots_fail:0\r\ncluster_known_nodes:1\r\ncluster_size:1\r\ncluster_current_epoch:1\r\ncluster_my_epoch:1\r\n".to_string(),
        ),
        _ => return None,
    })
    .map(|v| match (v, proto) {
        // CLUSTER NODES/INFO are bulk strings in RESP2 too.
        (Value::Text(t), Proto::Resp2) => Value::Bulk(Bytes::from(t)),
        (v, _) => v,
    })
}
