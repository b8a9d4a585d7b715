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

mod pinned;

use pinned::PinState;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::merge::{Gather, Merge, version_key};
use super::nodes::{BOUNCE_QUEUE, ClusterSet, NodePool};
use super::route::{Route, route_of};
use super::stream::StreamFilter;
use super::{Node, Redirect, SlotMap, Topology};
use crate::upstream::cluster;
use crate::upstream::conn::{Bounce, BounceTx, Bounced};
use crate::upstream::failover::Active;
use crate::upstream::{ClientShared, Hop, Identity, Job, JobKind, Oob, UpstreamError};

use crate::request::command::Table;
use crate::request::exchange::{PartSink, ReplyPlan};
use crate::wire::encode_command;
use crate::wire::scan::command_at;

/// Redirections and retries one request may take.
pub const MAX_REDIRECTS: u8 = 5;
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

/// A command the router sends for its own purposes (a MULTI it holds, a
/// DISCARD, a script to load, an appended command): nobody waits for its
/// reply; `pinned` ones are never redirected.
fn own_job(payload: Bytes, client: &Arc<ClientShared>, pinned: bool) -> Job {
    Job {
        payload,
        kind: JobKind::Request {
            plan: ReplyPlan::single(),
            entry: None,
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
    if let JobKind::Request {
        mut plan, entry, ..
    } = job.kind
    {
        let reply = plan.finish(reply);
        if let Some(seq) = entry {
            job.client.deliver(seq, Ok(reply));
            job.client.flush();
        }
    }
}

/// Routes the jobs of one shared "connection" (or one pinned client) of a
/// cluster endpoint to connections to its nodes.
pub struct Router {
    pool: Arc<dyn NodePool>,
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
    /// A pinned client's stream, as one Redis sends it (its node
    /// connections' frames pass it).
    filter: Option<Arc<StreamFilter>>,
    /// A pinned client's marks' token (made when first needed).
    token: Option<Bytes>,
}

impl Router {
    pub fn new(
        pool: Arc<dyn NodePool>,
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
            let set = pool.clone().cluster_set(&ident)?;
            let rx = set
                .bounce_rx
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .take();
            let active = set.active.clone();
            (Some(set), rx, active)
        };
        let table = (pool.table_generation(), pool.table());
        let filter = pinned.is_some().then(|| Arc::new(StreamFilter::default()));
        let pinned = pinned.map(|(oob, held)| (Oob(oob.0, filter.clone()), held));
        Some(Router {
            filter,
            token: None,
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

    /// `payload` for every master, in the map's order.
    fn every_master(&self, payload: &Bytes) -> Vec<(Option<Node>, Bytes)> {
        self.map
            .masters
            .iter()
            .map(|m| (Some(m.clone()), payload.clone()))
            .collect()
    }

    fn owner(&self, slot: u16) -> Option<Node> {
        self.topo.owner(&self.map, slot)
    }

    /// The client's node for commands without a key: the same one for all
    /// its keyless commands, spread over the masters across clients.
    /// A pinned client's (subscriptions, MONITOR, transactions) is the
    /// pub/sub node: every subscriber and every PUBLISH through the sidecar
    /// meet there, so PUBLISH counts every receiver and PUBSUB NUMSUB,
    /// NUMPAT and CHANNELS see every subscription, as on one Redis.
    fn default_node(&self, client: &Arc<ClientShared>) -> Option<Node> {
        if self.pinned.is_some() {
            return self.owner(super::route::pubsub_slot());
        }
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
        let route = route_of(
            &args,
            &self.table.1,
            self.pool.advertised(),
            self.pool.settings().max_reply_bulk,
            self.ident.proto,
        );
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
            if !matches!(job.kind, JobKind::Request { .. }) {
                match &name[..] {
                    b"monitor" => return self.monitor(job, end).await,
                    b"ssubscribe" => return self.shard_channels(job, &args, end, true).await,
                    b"sunsubscribe" => return self.shard_channels(job, &args, end, false).await,
                    _ => {}
                }
            }
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
                    return job.fail(UpstreamError::Routing(format!(
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
                if super::route::named(&args) == Some(super::route::Named::ScriptFlush) {
                    // The scripts are gone: an EVALSHA meets NOSCRIPT, as on
                    // one Redis, instead of the sidecar loading them again.
                    self.topo.forget_scripts();
                }
                let merge = match (merge, args.get(2)) {
                    (Merge::First, Some(body)) => {
                        Merge::ScriptLoad(body.clone(), self.topo.clone())
                    }
                    (m, _) => m,
                };
                let parts = self.every_master(&job.payload.slice(..end));
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
        if node == 0 && &args[1][..] == b"0" && masters > 1 {
            // A fresh scan: every master's first step at once, so a small
            // keyspace is read in one call.
            let parts = self.every_master(&payload);
            return self
                .gather(job, parts, Merge::ScanAll { epoch, masters }, true)
                .await;
        }
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
        let JobKind::Request { plan, entry, .. } = job.kind else {
            return;
        };
        let n = parts.len();
        let g = Arc::new(Gather::new(job.client.clone(), entry, merge, n, plan));
        if n == 0 {
            g.part(
                0,
                Err(UpstreamError::Routing("the cluster has no master".into())),
            );
            return;
        }
        for (i, (node, payload)) in parts.into_iter().enumerate() {
            let part = Job {
                payload,
                kind: JobKind::Request {
                    plan: ReplyPlan::part(g.clone(), i),
                    entry: None,
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
            return job.fail(UpstreamError::Routing(
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
                        let tx = self.pool.clone().node_connection(
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
            job.fail(UpstreamError::unreachable(
                "the cluster node's connection closed",
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
