//! Routing over a Redis Cluster: the app sees one plain Redis.
//!
//! A cluster endpoint's shared "connection" is a [`Router`] task: it takes
//! jobs like any shared connection, reads each job's first command, and
//! hands the job to a connection to the node that owns its keys' slot
//! (one per node, made on first use). What the node does not run comes
//! back as a [`Bounce`]: MOVED (the slot's owner is remembered until the
//! next map read, and the map read is asked for), ASK (sent once to the
//! target with `ASKING`, no map change), TRYAGAIN and CLUSTERDOWN (sent
//! again after a pause); at most [`MAX_REDIRECTS`] times, then the client
//! gets the node's answer. Only replies that say the command did not run
//! cause a resend; a job whose fate is unknown is never sent twice.
//!
//! Multi-key commands whose keys span slots are split by slot and their
//! replies merged ([`Gather`]); whole-keyspace commands go to every master;
//! `CLUSTER SLOTS/SHARDS/NODES` describe the sidecar as the only node.
//! Replies reach the client's output entry in request order whatever node
//! answers, as with one Redis (the output queue orders them).

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::sync::mpsc;

use super::cluster::{self, Node, Redirect, ScanCursor, SlotMap, Split, Topology};
use super::conn::{Bounce, BounceTx, Bounced};
use super::failover::Active;
use super::pool::{ClusterSet, Pool};
use super::{ClientShared, Hop, Identity, Job, JobKind, Oob, Reply, UpstreamError};

use crate::command::Table;
use crate::exchange::{PartSink, ReplyPlan};
use crate::protocol::scan::{command_at, split_array};
use crate::protocol::{Proto, Value, encode_command};

/// Redirections and retries one request may take.
pub const MAX_REDIRECTS: u8 = 5;
/// Jobs sent back by nodes, waiting for the router.
pub const BOUNCE_QUEUE: usize = 1024;
/// Jobs waiting to be sent again after TRYAGAIN/CLUSTERDOWN.
const RETRY_QUEUE: usize = 4096;

/// Why a router returned.
#[derive(Debug, PartialEq, Eq)]
pub enum RouterEnd {
    /// Every sender is gone.
    Closed,
    /// The active endpoint changed.
    Retired,
}

/// How the first command of a job is routed.
enum Route {
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

/// How the replies of a command's parts become the client's reply.
#[derive(Clone, Debug)]
pub enum Merge {
    Split(Split, Vec<cluster::Part>),
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
    /// SCRIPT LOAD: the first reply, and the script remembered under it.
    ScriptLoad(Bytes, Arc<Topology>),
    /// 0/1 arrays, element-wise AND (SCRIPT EXISTS).
    AndArrays,
    /// One master's SCAN reply, its cursor rewritten.
    Scan {
        epoch: u8,
        node: u8,
        masters: usize,
    },
    /// One master's INFO, with the lowest `redis_version` of the masters.
    Info {
        version: String,
        node: String,
    },
}

/// The parts of one client command in flight on several nodes; the last
/// to answer completes the client's entry.
struct Gather {
    client: Arc<ClientShared>,
    seq: Option<u64>,
    merge: Merge,
    state: Mutex<GatherState>,
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

/// The bytes of a bulk (`$`) or verbatim (`=`, without its `txt:`) string.
fn bulk_text(r: &[u8]) -> Option<&[u8]> {
    let t = *r.first()?;
    if t != b'$' && t != b'=' {
        return None;
    }
    let nl = memchr::memchr(b'\n', r)?;
    let len: usize = std::str::from_utf8(r.get(1..nl.checked_sub(1)?)?)
        .ok()?
        .parse()
        .ok()?;
    let body = r.get(nl + 1..nl + 1 + len)?;
    Some(if t == b'=' { body.get(4..)? } else { body })
}

fn is_null(r: &[u8]) -> bool {
    r == b"$-1\r\n" || r == b"*-1\r\n" || r == b"_\r\n"
}

/// The client's reply from the parts' replies (none an error reply
/// unless said).
pub fn merge(m: &Merge, replies: &[Bytes]) -> Option<Bytes> {
    let first_error = || {
        replies
            .iter()
            .find(|r| crate::protocol::is_error(r))
            .cloned()
    };
    match m {
        Merge::Split(kind, parts) => cluster::merge(*kind, parts, replies),
        Merge::Sum => cluster::merge(Split::Sum, &[], replies),
        Merge::AllOk => first_error().or(Some(Bytes::from_static(b"+OK\r\n"))),
        Merge::First => first_error().or_else(|| replies.first().cloned()),
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
            crate::protocol::scan::push_header(&mut out, b'*', n);
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
            crate::protocol::scan::push_header(&mut out, b'*', acc.len());
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
            if crate::protocol::is_error(r) {
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
        Merge::Info { version, node } => {
            let r = replies.first()?;
            if crate::protocol::is_error(r) {
                return Some(r.clone());
            }
            Some(rewrite_info(r, version, node))
        }
    }
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
fn version_key(v: &str) -> Vec<u64> {
    v.split('.').map(|p| p.parse().unwrap_or(0)).collect()
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
            Value::Int(cluster::SLOTS as i64 - 1),
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
                Value::Array(vec![Value::Int(0), Value::Int(cluster::SLOTS as i64 - 1)]),
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
            cluster::SLOTS - 1
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
    /// SPUBLISH/SSUBSCRIBE/SUNSUBSCRIBE: by the channel's slot.
    ShardChannel,
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
    } else if is(b"spublish") || is(b"ssubscribe") || is(b"sunsubscribe") {
        Named::ShardChannel
    } else {
        return None;
    })
}

/// The slots of a command's keys.
pub(crate) enum Slots {
    None,
    One(u16),
    Many,
}

pub(crate) fn slots_of(args: &[Bytes], info: &crate::command::CommandInfo) -> Slots {
    let mut slot = None;
    for k in info.keys(args) {
        let Some(key) = args.get(k.index) else {
            continue;
        };
        let s = cluster::key_slot(key);
        match slot {
            None => slot = Some(s),
            Some(first) if first != s => return Slots::Many,
            _ => {}
        }
    }
    slot.map_or(Slots::None, Slots::One)
}

/// Where a job's commands go, decided from its first command.
fn route_of(args: &[Bytes], table: &Table, pool: &Pool, proto: Proto) -> Route {
    if let Some(n) = named(args) {
        return match n {
            Named::Masquerade => match args
                .get(1)
                .and_then(|s| masquerade(s, pool.advertised(), proto))
            {
                Some(v) => Route::Answer(v.encode(proto)),
                None => Route::Any,
            },
            Named::Info => Route::Info,
            Named::Dbsize => Route::Fan(Merge::Sum),
            Named::Flush | Named::ScriptFlush => Route::Fan(Merge::AllOk),
            Named::Keys => Route::Fan(Merge::Concat(pool.settings().max_reply_bulk)),
            Named::RandomKey => Route::Fan(Merge::FirstNonNull),
            Named::Scan => Route::Scan,
            // The body is remembered by the router (Merge::ScriptLoad).
            Named::ScriptLoad => Route::Fan(Merge::First),
            Named::ScriptExists => Route::Fan(Merge::AndArrays),
            Named::ShardChannel => match args.get(1) {
                Some(ch) => Route::Slot(cluster::key_slot(ch)),
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
            match cluster::split_kind(&name) {
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
    /// No key: the client's own node (see [`SlotMap::keyless_node`]).
    Keyless,
}

pub fn direct(args: &[Bytes], info: &crate::command::CommandInfo) -> Option<Direct> {
    if named(args).is_some() {
        return None;
    }
    match slots_of(args, info) {
        Slots::None => Some(Direct::Keyless),
        Slots::One(s) => Some(Direct::Slot(s)),
        Slots::Many => None,
    }
}

/// A command the router sends for its own purposes (a MULTI it holds, a
/// DISCARD, a script to load, an appended command): nobody waits for its
/// reply; `pinned` ones are never redirected.
fn own_job(payload: Bytes, client: &Arc<ClientShared>, pinned: bool) -> Job {
    Job {
        payload,
        kind: JobKind::Request {
            plan: ReplyPlan::single(),
            slot: None,
            blocking: false,
        },
        client: client.clone(),
        enqueued: Instant::now(),
        hop: Hop {
            pinned,
            ..Hop::default()
        },
    }
}

/// One client job's completion with a reply the router makes itself.
fn answer(job: Job, reply: Bytes) {
    if let JobKind::Request { mut plan, slot, .. } = job.kind {
        let reply = plan.finish(reply);
        if let Some(seq) = slot {
            job.client.deliver(seq, Ok(reply));
            job.client.flush();
        }
    }
}

/// Routes the jobs of one shared "connection" (or one pinned client) of a
/// cluster endpoint to connections to its nodes.
pub struct Router {
    pool: Arc<Pool>,
    ident: Identity,
    active: Active,
    topo: Arc<Topology>,
    map: Arc<SlotMap>,
    epoch: u64,
    /// A pinned client's connections to nodes, by address.
    nodes: HashMap<String, mpsc::Sender<Job>>,
    /// The identity's shared node connections (shared routers).
    set: Option<Arc<ClusterSet>>,
    bounce_tx: BounceTx,
    /// Bounced jobs this router handles: a pinned router's own, or the
    /// identity's shared ones (one router of the identity takes them).
    bounce_rx: Option<mpsc::Receiver<Bounce>>,
    retries: VecDeque<(Instant, Job)>,
    table: (u64, Arc<Table>),
    /// A pinned client's stream and whether it holds state (dedicated
    /// routers only).
    pinned: Option<(Oob, Arc<AtomicBool>)>,
    /// A pinned client's name, for its node connections.
    name: Option<Bytes>,
    /// A pinned client's transaction and subscriptions.
    tx: PinState,
}

/// What a pinned client holds, and where.
#[derive(Default)]
struct PinState {
    /// The node (and slot, once a key named it) its WATCH or MULTI lives
    /// on.
    bound: Option<(Node, Option<u16>)>,
    /// MULTI answered but not sent yet: it goes to the node of the first
    /// command queued after it.
    held_multi: Option<Job>,
    in_multi: bool,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    dirty: bool,
    /// Node connections that stream (subscribed, MONITOR).
    streaming: std::collections::HashSet<String>,
}

impl Router {
    pub fn new(
        pool: Arc<Pool>,
        ident: Identity,
        active: Active,
        pinned: Option<(Oob, Arc<AtomicBool>)>,
        name: Option<Bytes>,
    ) -> Option<Router> {
        let topo = active.endpoint.cluster.clone()?;
        let (bounce_tx, own_rx) = mpsc::channel(BOUNCE_QUEUE);
        let (set, bounce_rx, active) = if pinned.is_some() {
            (None, Some(own_rx), active)
        } else {
            let set = pool.cluster_set(&ident)?;
            let rx = set
                .bounce_rx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let active = set.active.clone();
            (Some(set), rx, active)
        };
        let table = (pool.table_generation(), pool.table());
        Some(Router {
            set,
            map: topo.map(),
            epoch: topo.epoch(),
            topo,
            pool,
            ident,
            active,
            nodes: HashMap::new(),
            bounce_tx,
            bounce_rx,
            retries: VecDeque::new(),
            table,
            pinned,
            name,
            tx: PinState::default(),
        })
    }

    /// Route jobs until every sender is gone or the active endpoint
    /// changes. `backlog` holds jobs taken before.
    pub async fn run(
        &mut self,
        rx: &mut mpsc::Receiver<Job>,
        backlog: &mut VecDeque<Job>,
    ) -> RouterEnd {
        self.wait_for_map().await;
        while let Some(job) = backlog.pop_front() {
            self.route(job).await;
        }
        let retired = self.active.retired.clone();
        loop {
            let next_retry = self.retries.front().map(|(t, _)| *t);
            tokio::select! {
                biased;
                Some(b) = recv(&mut self.bounce_rx) => self.bounced(b).await,
                j = rx.recv() => match j {
                    Some(j) => self.route(j).await,
                    None => return RouterEnd::Closed,
                },
                _ = retired.cancelled() => return RouterEnd::Retired,
                _ = sleep_until(next_retry), if next_retry.is_some() => {
                    let now = Instant::now();
                    while self.retries.front().is_some_and(|(t, _)| *t <= now) {
                        if let Some((_, job)) = self.retries.pop_front() {
                            self.route(job).await;
                        }
                    }
                }
            }
        }
    }

    /// A new endpoint's map may not be read yet: wait for it a while
    /// (jobs wait in the channel meanwhile).
    async fn wait_for_map(&mut self) {
        let until = Instant::now() + self.pool.settings().queue_timeout;
        while self.topo.map().masters.is_empty() && Instant::now() < until {
            self.topo.refresh.notify_one();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.sync_map();
    }

    /// Pick up a newer slot map.
    fn sync_map(&mut self) {
        let epoch = self.topo.epoch();
        if epoch != self.epoch {
            self.map = self.topo.map();
            self.epoch = epoch;
        }
    }

    fn owner(&self, slot: u16) -> Option<Node> {
        self.topo.owner(&self.map, slot)
    }

    /// The client's node for commands without a key: the same one for all
    /// its keyless commands, spread over the masters across clients.
    fn default_node(&self, client: &Arc<ClientShared>) -> Option<Node> {
        self.map.keyless_node(client).cloned()
    }

    async fn route(&mut self, job: Job) {
        self.sync_map();
        let generation = self.pool.table_generation();
        if generation != self.table.0 {
            self.table = (generation, self.pool.table());
        }
        let parsed = command_at(&job.payload, 0);
        let Some((args, end)) = parsed else {
            let node = self.default_node(&job.client);
            return self.send(node, job).await;
        };
        let route = route_of(&args, &self.table.1, &self.pool, self.ident.proto);
        if self.pinned.is_some() {
            let name = args
                .first()
                .map(|a| a.to_ascii_lowercase())
                .unwrap_or_default();
            let state = self.tx.in_multi
                || matches!(
                    &name[..],
                    b"multi" | b"exec" | b"discard" | b"watch" | b"unwatch"
                )
                || !matches!(job.kind, JobKind::Request { .. });
            if state || matches!(route, Route::Slot(_) | Route::Any) {
                return self.route_pinned(job, &name, route).await;
            }
        }
        self.route_shared(job, args, end, route).await
    }

    /// Route a stateless command (see [`Route`]).
    async fn route_shared(&mut self, job: Job, args: Vec<Bytes>, end: usize, route: Route) {
        match route {
            Route::Slot(slot) => {
                let node = self.owner(slot);
                if node.is_none() {
                    self.topo.refresh.notify_one();
                    return job.fail(UpstreamError::Unavailable(format!(
                        "no cluster node owns slot {slot}"
                    )));
                }
                self.send(node, job).await
            }
            Route::Any => {
                let node = self.default_node(&job.client);
                self.send(node, job).await
            }
            Route::Answer(reply) => answer(job, reply),
            Route::CrossSlot => answer(job, Bytes::from_static(cluster::CROSSSLOT)),
            Route::Split(kind, stride) => {
                let parts = cluster::split_by_slot(&args, stride);
                let payloads: Vec<(Option<Node>, Bytes)> = parts
                    .iter()
                    .map(|p| (self.owner(p.slot), encode_command(&p.args)))
                    .collect();
                // Commands a stage appended go on their own, to their
                // keys' nodes; their replies are consumed.
                let appended = job.payload.slice(end..);
                let client = job.client.clone();
                self.gather(job, payloads, Merge::Split(kind, parts), false)
                    .await;
                self.send_appended(appended, &client).await;
            }
            Route::Fan(merge) => {
                let merge = match (merge, args.get(2)) {
                    (Merge::First, Some(body)) => {
                        Merge::ScriptLoad(body.clone(), self.topo.clone())
                    }
                    (m, _) => m,
                };
                let payload = job.payload.slice(..end);
                let parts = self
                    .map
                    .masters
                    .iter()
                    .map(|m| (Some(m.clone()), payload.clone()))
                    .collect();
                self.gather(job, parts, merge, true).await
            }
            Route::Scan => self.scan(job, args).await,
            Route::Info => {
                let node = self.default_node(&job.client);
                let version = self.lowest_version();
                let name = node.as_ref().map(SlotMap::addr).unwrap_or_default();
                let payload = job.payload.slice(..end);
                self.gather(
                    job,
                    vec![(node, payload)],
                    Merge::Info {
                        version,
                        node: name,
                    },
                    true,
                )
                .await
            }
        }
    }

    /// A pinned client: its transaction on one node and one slot, its
    /// blocking commands on their keys' nodes, its subscriptions on its
    /// default node (shard channels on their slots' nodes).
    async fn route_pinned(&mut self, mut job: Job, name: &[u8], route: Route) {
        let slot = match route {
            Route::Slot(s) => Some(s),
            Route::Answer(r) => return answer(job, r),
            // Keys of several slots: not split for a pinned client (a
            // transaction runs on one node); refused as Redis refuses it.
            Route::CrossSlot | Route::Split(..) => {
                if self.tx.in_multi {
                    self.tx.dirty = true;
                }
                return answer(job, Bytes::from_static(cluster::CROSSSLOT));
            }
            _ => None,
        };
        if !matches!(job.kind, JobKind::Request { .. }) {
            // Subscriptions and MONITOR: a connection that starts
            // streaming is told so by its first job.
            let node = match slot {
                Some(s) => self.owner(s),
                None => self.default_node(&job.client),
            };
            if let Some(n) = &node {
                let addr = SlotMap::addr(n);
                if matches!(job.kind, JobKind::Stream) && !self.tx.streaming.contains(&addr) {
                    job.kind = JobKind::StartStream;
                }
                if !matches!(job.kind, JobKind::Mark(_)) {
                    self.tx.streaming.insert(addr);
                }
            }
            return self.send(node, job).await;
        }
        match name {
            b"multi" if !self.tx.in_multi => {
                self.tx.in_multi = true;
                self.tx.dirty = false;
                job.hop.pinned = true;
                match self.tx.bound.clone() {
                    Some((node, _)) => self.send(Some(node), job).await,
                    None => {
                        // The node is known once a command names a key:
                        // MULTI is answered now (it cannot fail here) and
                        // sent there, first.
                        let client = job.client.clone();
                        answer(job, Bytes::from_static(b"+OK\r\n"));
                        self.tx.held_multi =
                            Some(own_job(encode_command(&["MULTI"]), &client, true));
                    }
                }
                return;
            }
            b"exec" | b"discard" if self.tx.in_multi => {
                let exec = name == b"exec";
                let dirty = std::mem::take(&mut self.tx.dirty);
                self.tx.in_multi = false;
                let node = self.bind(None, &job.client).await;
                let bound = std::mem::take(&mut self.tx.bound);
                if exec && dirty {
                    // As Redis after a command refused at queue time.
                    if let Some(n) = node {
                        let discard = own_job(encode_command(&["DISCARD"]), &job.client, true);
                        self.send(Some(n), discard).await;
                    }
                    return answer(
                        job,
                        Bytes::from_static(
                            b"-EXECABORT Transaction discarded because of previous errors.\r\n",
                        ),
                    );
                }
                job.hop.pinned = true;
                let node = node.or(bound.map(|(n, _)| n));
                return self.send(node, job).await;
            }
            _ => {}
        }
        let watch = name == b"watch";
        if self.tx.in_multi || watch {
            // One node, one slot: a command for another slot is refused
            // as Redis Cluster refuses it, and dirties the transaction.
            if let (Some(s), Some((_, Some(b)))) = (slot, &self.tx.bound)
                && s != *b
            {
                if self.tx.in_multi {
                    self.tx.dirty = true;
                }
                return answer(job, Bytes::from_static(cluster::CROSSSLOT));
            }
            let node = self.bind(slot, &job.client).await;
            job.hop.pinned = true;
            return self.send(node, job).await;
        }
        if name == b"unwatch" {
            let bound = self.tx.bound.take().map(|(n, _)| n);
            let node = bound.or_else(|| self.default_node(&job.client));
            return self.send(node, job).await;
        }
        let node = match slot {
            Some(s) => self.owner(s),
            None => match &self.tx.bound {
                Some((n, _)) => Some(n.clone()),
                None => self.default_node(&job.client),
            },
        };
        self.send(node, job).await
    }

    /// The node a transaction or WATCH lives on: bound by its first key
    /// (the default node when none has a key); a held MULTI goes there
    /// first.
    async fn bind(&mut self, slot: Option<u16>, client: &Arc<ClientShared>) -> Option<Node> {
        let node = match (&self.tx.bound, slot) {
            (Some((n, Some(_))), _) | (Some((n, None)), None) => n.clone(),
            (Some((n, None)), Some(s)) => {
                let n = n.clone();
                self.tx.bound = Some((n.clone(), Some(s)));
                n
            }
            (None, Some(s)) => {
                let n = self.owner(s)?;
                self.tx.bound = Some((n.clone(), Some(s)));
                n
            }
            (None, None) => {
                let n = self.default_node(client)?;
                self.tx.bound = Some((n.clone(), None));
                n
            }
        };
        if let Some(multi) = self.tx.held_multi.take() {
            self.send(Some(node.clone()), multi).await;
        }
        Some(node)
    }

    fn lowest_version(&self) -> String {
        let versions = self.topo.versions();
        self.map
            .masters
            .iter()
            .filter_map(|m| versions.get(&SlotMap::addr(m)).cloned())
            .min_by_key(|v| version_key(v))
            .unwrap_or_default()
    }

    /// SCAN across the masters in order: the client's cursor names the
    /// master and its own cursor.
    async fn scan(&mut self, job: Job, args: Vec<Bytes>) {
        let masters = self.map.masters.len();
        let epoch = self.epoch as u8;
        if args.len() < 2 {
            return answer(
                job,
                Bytes::from_static(b"-ERR wrong number of arguments for 'scan' command\r\n"),
            );
        }
        let (node, args) = match cluster::scan_step(&args, epoch, masters) {
            Ok(step) => step,
            Err(e) => return answer(job, Bytes::from(format!("-ERR {e}\r\n"))),
        };
        let Some(target) = self.map.masters.get(usize::from(node)).cloned() else {
            return answer(
                job,
                Bytes::from_static(b"-ERR the cluster has no master\r\n"),
            );
        };
        let payload = encode_command(&args);
        self.gather(
            job,
            vec![(Some(target), payload)],
            Merge::Scan {
                epoch,
                node,
                masters,
            },
            true,
        )
        .await
    }

    /// Send `parts` (node, command) for one client job; its entry is
    /// completed by the merge of their replies. `pinned` parts go to that
    /// node or fail (never redirected).
    async fn gather(
        &mut self,
        job: Job,
        parts: Vec<(Option<Node>, Bytes)>,
        merge: Merge,
        pinned: bool,
    ) {
        let JobKind::Request { plan, slot, .. } = job.kind else {
            return;
        };
        let n = parts.len();
        let g = Arc::new(Gather {
            client: job.client.clone(),
            seq: slot,
            merge,
            state: Mutex::new(GatherState {
                replies: vec![None; n],
                left: n,
                plan: Some(plan),
            }),
        });
        if n == 0 {
            g.part(
                0,
                Err(UpstreamError::Unavailable(
                    "the cluster has no master".into(),
                )),
            );
            return;
        }
        for (i, (node, payload)) in parts.into_iter().enumerate() {
            let part = Job {
                payload,
                kind: JobKind::Request {
                    plan: ReplyPlan::part(g.clone(), i),
                    slot: None,
                    blocking: false,
                },
                client: job.client.clone(),
                enqueued: job.enqueued,
                hop: Hop {
                    pinned,
                    ..Hop::default()
                },
            };
            self.send(node, part).await;
        }
    }

    /// Appended commands of a split command, each to its keys' node, with
    /// nobody waiting for their replies.
    async fn send_appended(&mut self, mut rest: Bytes, client: &Arc<ClientShared>) {
        while let Some((args, end)) = command_at(&rest, 0) {
            let cmd = rest.split_to(end);
            let node = match args.get(1) {
                Some(k) => self.owner(cluster::key_slot(k)),
                None => self.default_node(client),
            };
            self.send(node, own_job(cmd, client, false)).await;
        }
    }

    /// Hand `job` to `node`'s connection (made on first use).
    async fn send(&mut self, node: Option<Node>, job: Job) {
        let Some(node) = node else {
            self.topo.refresh.notify_one();
            return job.fail(UpstreamError::Unavailable(
                "the cluster's slot map is not known yet".into(),
            ));
        };
        let tx = match &self.set {
            Some(set) => set.sender(&self.pool, &node),
            None => {
                let addr = SlotMap::addr(&node);
                match self.nodes.get(&addr) {
                    Some(tx) if !tx.is_closed() => tx.clone(),
                    _ => {
                        let tx = self.pool.node_connection(
                            &self.ident,
                            &self.active,
                            node,
                            self.bounce_tx.clone(),
                            self.pinned.clone(),
                            self.name.clone(),
                        );
                        self.nodes.insert(addr, tx.clone());
                        tx
                    }
                }
            }
        };
        if let Err(mpsc::error::SendError(job)) = tx.send(job).await {
            job.fail(UpstreamError::Unavailable(
                "the cluster node's connection closed".into(),
            ));
        }
    }

    /// A job a node did not run: follow the redirection, or retry later.
    async fn bounced(&mut self, b: Bounce) {
        let Bounce {
            mut job,
            why,
            reply,
        } = b;
        let name = self.active.endpoint.name().to_string();
        let metrics = self.pool.metrics();
        if job.hop.redirects >= MAX_REDIRECTS {
            metrics.cluster_redirect(&name, "exhausted");
            return answer(job, reply);
        }
        job.hop.redirects += 1;
        match why {
            Bounced::Redirect(Redirect::Moved { slot, host, port }) => {
                metrics.cluster_redirect(&name, "moved");
                let node = self.node_at(host, port);
                self.topo.moved(slot, node.clone());
                self.topo.refresh.notify_one();
                job.hop.asking = false;
                self.send(Some(node), job).await;
            }
            Bounced::Redirect(Redirect::Ask { host, port, .. }) => {
                metrics.cluster_redirect(&name, "ask");
                let node = self.node_at(host, port);
                job.hop.asking = true;
                self.send(Some(node), job).await;
            }
            Bounced::NoScript => {
                // After a failover or a resharding the node may lack a
                // script the client loaded through the sidecar: load it
                // there and run the EVALSHA again, once (it did not run).
                let body = command_at(&job.payload, 0)
                    .and_then(|(args, _)| args.get(1).and_then(|sha| self.topo.script(sha)));
                let Some(body) = body.filter(|_| !job.hop.reloaded) else {
                    return answer(job, reply);
                };
                metrics.cluster_redirect(&name, "noscript");
                job.hop.reloaded = true;
                let load = encode_command(&[&b"SCRIPT"[..], b"LOAD", &body]);
                for m in self.map.masters.clone() {
                    let j = own_job(load.clone(), &job.client, true);
                    self.send(Some(m), j).await;
                }
                self.route(job).await;
            }
            Bounced::Retry => {
                metrics.cluster_redirect(&name, "retry");
                job.hop.asking = false;
                if self.retries.len() >= RETRY_QUEUE {
                    return answer(job, reply);
                }
                let pause = Duration::from_millis(25 << job.hop.redirects.min(5));
                self.topo.refresh.notify_one();
                self.retries.push_back((Instant::now() + pause, job));
            }
        }
    }

    /// The node at `host:port` as the map knows it (its TLS name), or as
    /// a redirection named it.
    fn node_at(&self, host: String, port: u16) -> Node {
        self.map
            .masters
            .iter()
            .chain(self.map.replicas.iter().flatten())
            .find(|n| n.host == host && n.port == port)
            .cloned()
            .unwrap_or(Node {
                id: String::new(),
                host,
                port,
                hostname: None,
            })
    }
}

/// The next bounced job, if this router takes them (never otherwise).
async fn recv(rx: &mut Option<mpsc::Receiver<Bounce>>) -> Option<Bounce> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(t: Option<Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
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
