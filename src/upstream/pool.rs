//! The pool: shared multiplexed connections per [`Identity`], dedicated
//! connections for pinned clients, the command table learned from the
//! upstream, and, in front of a cluster, the identity's node connections
//! ([`ClusterSet`]) and router tasks it starts (the router reaches back
//! only through [`NodePool`], which the pool implements); control
//! connections for the sidecar's own commands ([`ControlConn`]).
//!
//! Each shared connection is a manager task owning a bounded job channel.
//! The manager connects to the active endpoint (with backoff), serves until
//! the connection fails or the active endpoint changes, and reconnects;
//! jobs that arrive while no connection exists wait at most the queue
//! timeout and then fail as never sent. On a switch the connection retires:
//! it writes no new job, lets the replies of those written arrive, closes,
//! and the jobs still queued go to the new endpoint.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;

use super::cluster::merge::{Merge, merge};
pub use super::cluster::nodes::ClusterSet;
use super::cluster::nodes::NodePool;
use super::cluster::route::{Named, Slots, named, slots_of};
use super::cluster::router::{Router, RouterEnd};
use super::conn::{self, Bounce, BounceTx, Bounced, ConnSettings, Connected, End};
use super::failover::{Active, Upstreams};
use super::slots::{Node, SlotMap};
use super::{Identity, Job, Oob, URL_DB, UpstreamError};
use crate::metrics::Metrics;
use crate::request::command::Table;
use crate::wire::Proto;

/// Jobs queued per shared connection. Past this, clients wait for room
/// (their sockets stop being read) instead of growing memory: 4096 commands
/// cover several full write batches while one is in flight.
const SHARED_QUEUE: usize = 4096;
/// Jobs queued on one dedicated connection (one client's pipeline).
const DEDICATED_QUEUE: usize = 1024;

/// Connections to the active upstream endpoint.
pub struct Pool {
    pub ups: Arc<Upstreams>,
    settings: ConnSettings,
    per_identity: usize,
    max_identities: usize,
    shared: Mutex<HashMap<Identity, Arc<SharedSet>>>,
    table: RwLock<Arc<Table>>,
    /// Bumped when the table changes, so sessions can cache it.
    table_generation: AtomicU64,
    server_version: Mutex<String>,
    metrics: Metrics,
    /// Every connection task (shared managers, dedicated connections).
    tasks: TaskTracker,
    /// The sidecar's own address, for `CLUSTER SLOTS` and friends.
    advertised: Mutex<SocketAddr>,
    /// Per identity, the shared connections to the nodes of the active
    /// cluster endpoint.
    clusters: Mutex<HashMap<Identity, Arc<ClusterSet>>>,
}

impl NodePool for Pool {
    fn advertised(&self) -> SocketAddr {
        Pool::advertised(self)
    }
    fn settings(&self) -> &ConnSettings {
        Pool::settings(self)
    }
    fn metrics(&self) -> &Metrics {
        Pool::metrics(self)
    }
    fn table(&self) -> Arc<Table> {
        Pool::table(self)
    }
    fn table_generation(&self) -> u64 {
        Pool::table_generation(self)
    }
    fn cluster_set(self: Arc<Self>, ident: &Identity) -> Option<Arc<ClusterSet>> {
        Pool::cluster_set(&self, ident)
    }
    fn node_connection(
        self: Arc<Self>,
        ident: &Identity,
        active: &Active,
        node: Node,
        bounce: BounceTx,
        pinned: Option<(Oob, Arc<AtomicBool>)>,
        name: Option<Bytes>,
    ) -> mpsc::Sender<Job> {
        Pool::node_connection(&self, ident, active, node, bounce, pinned, name)
    }
}

/// The shared connections of one identity; a client always uses the same
/// one, so its commands run in the order it sent them.
pub struct SharedSet {
    conns: Vec<mpsc::Sender<Job>>,
}

impl SharedSet {
    pub fn pick(&self, client_id: u64) -> &mpsc::Sender<Job> {
        &self.conns[(client_id as usize) % self.conns.len()]
    }
}

/// A client's own upstream connection.
pub struct Dedicated {
    pub tx: mpsc::Sender<Job>,
    /// Set while the client holds state on this connection (MULTI, WATCH,
    /// subscriptions): losing the connection then disconnects the client.
    pub holds_state: Arc<AtomicBool>,
    alive: Arc<AtomicBool>,
    /// The upstream's id for this connection (`CLIENT ID`), if known.
    pub upstream_id: Option<i64>,
}

impl Dedicated {
    pub fn is_alive(&self) -> bool {
        self.alive.load(Ordering::Acquire) && !self.tx.is_closed()
    }
}

impl Pool {
    pub fn new(
        ups: Arc<Upstreams>,
        settings: ConnSettings,
        per_identity: usize,
        max_identities: usize,
        metrics: Metrics,
        tasks: TaskTracker,
    ) -> Arc<Pool> {
        Arc::new(Pool {
            ups,
            settings,
            per_identity,
            max_identities,
            shared: Mutex::new(HashMap::new()),
            table: RwLock::new(Arc::new(Table::builtin())),
            table_generation: AtomicU64::new(0),
            server_version: Mutex::new(String::new()),
            metrics,
            tasks,
            advertised: Mutex::new(SocketAddr::from(([127, 0, 0, 1], 6380))),
            clusters: Mutex::new(HashMap::new()),
        })
    }

    /// The shared node connections of `ident` on the active endpoint, if
    /// it is a cluster (a new set after a switch).
    pub fn cluster_set(self: &Arc<Self>, ident: &Identity) -> Option<Arc<ClusterSet>> {
        let active = self.ups.active();
        active.endpoint.cluster.as_ref()?;
        let mut sets = self.clusters.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = sets.get(ident)
            && s.active.generation == active.generation
        {
            return Some(s.clone());
        }
        let set = Arc::new(ClusterSet::new(active, ident.clone()));
        sets.insert(ident.clone(), set.clone());
        Some(set)
    }

    pub fn settings(&self) -> &ConnSettings {
        &self.settings
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The address clients reach the sidecar at (an unspecified listen
    /// address is given as loopback: the sidecar runs beside the app).
    pub fn set_advertised(&self, mut addr: SocketAddr) {
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
        }
        *self
            .advertised
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = addr;
    }

    pub fn advertised(&self) -> SocketAddr {
        *self
            .advertised
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The current command table.
    pub fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Changes whenever [`Pool::table`] would return a new table.
    pub fn table_generation(&self) -> u64 {
        self.table_generation.load(Ordering::Acquire)
    }

    /// The upstream's version, from its HELLO reply ("" until connected).
    pub fn server_version(&self) -> String {
        self.server_version
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Shared connections for `ident`, created (lazily connecting) if new.
    pub fn shared(self: &Arc<Self>, ident: &Identity) -> Result<Arc<SharedSet>, UpstreamError> {
        self.shared_with(ident, None)
    }

    /// Check that `ident` is accepted by the upstream (AUTH, SELECT) with a
    /// real handshake, then make its shared connections, starting with the
    /// one just made. A known identity was already checked.
    /// `select_as`: who the check's SELECT runs as (a client's own
    /// SELECT is checked as its user).
    pub async fn verify(
        self: &Arc<Self>,
        ident: &Identity,
        select_as: conn::SelectAs,
    ) -> Result<Arc<SharedSet>, UpstreamError> {
        if let Some(set) = self.lock_shared().get(ident) {
            return Ok(set.clone());
        }
        let first = self.connect_as(ident, None, select_as).await?;
        self.shared_with(ident, Some(first))
    }

    fn lock_shared(&self) -> std::sync::MutexGuard<'_, HashMap<Identity, Arc<SharedSet>>> {
        self.shared.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn shared_with(
        self: &Arc<Self>,
        ident: &Identity,
        mut first: Option<(Connected, Active)>,
    ) -> Result<Arc<SharedSet>, UpstreamError> {
        let mut map = self.lock_shared();
        if let Some(set) = map.get(ident) {
            return Ok(set.clone());
        }
        if map.len() >= self.max_identities {
            return Err(UpstreamError::Limit(format!(
                "too many distinct client identities (protocol, db, user); limit is {}",
                self.max_identities
            )));
        }
        let mut conns = Vec::with_capacity(self.per_identity);
        for _ in 0..self.per_identity {
            let (tx, rx) = mpsc::channel(SHARED_QUEUE);
            self.tasks
                .spawn(self.clone().manage(ident.clone(), first.take(), rx));
            conns.push(tx);
        }
        let set = Arc::new(SharedSet { conns });
        map.insert(ident.clone(), set.clone());
        Ok(set)
    }

    /// Connect to the active endpoint; the result carries the choice it was
    /// made for, so the connection retires when that changes.
    async fn connect(
        &self,
        ident: &Identity,
        name: Option<&Bytes>,
    ) -> Result<(Connected, Active), UpstreamError> {
        self.connect_as(ident, name, conn::SelectAs::Either).await
    }

    async fn connect_as(
        &self,
        ident: &Identity,
        name: Option<&Bytes>,
        select_as: conn::SelectAs,
    ) -> Result<(Connected, Active), UpstreamError> {
        let active = self.ups.active();
        let c = conn::connect_to(
            &active.endpoint,
            None,
            ident,
            name,
            &self.settings,
            select_as,
        )
        .await
        .inspect_err(|_| self.ups.nudge(&active.endpoint))?;
        if !c.server_version.is_empty() {
            *self
                .server_version
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = c.server_version.clone();
        }
        Ok((c, active))
    }

    /// Serve `conn` until it ends; it retires when the choice it was made
    /// for is replaced.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        conn: Connected,
        made_for: &Active,
        kind: &str,
        backlog: &mut VecDeque<Job>,
        rx: &mut mpsc::Receiver<Job>,
        oob: Option<&Oob>,
        bounce: Option<&BounceTx>,
    ) -> End {
        let gauge = self
            .metrics
            .upstream_connections(made_for.endpoint.name(), kind);
        gauge.inc();
        let end = conn::serve(
            conn,
            backlog,
            rx,
            &self.settings,
            oob,
            &self.metrics,
            &made_for.retired,
            &made_for.writers,
            bounce,
        )
        .await;
        gauge.dec();
        if let End::Failed(e) = &end {
            tracing::warn!(upstream = %made_for.endpoint.name(), kind, error = %e, "upstream connection failed");
            self.ups.nudge(&made_for.endpoint);
        }
        end
    }

    /// A shared connection's life: connect, serve, reconnect with backoff.
    async fn manage(
        self: Arc<Self>,
        ident: Identity,
        mut first: Option<(Connected, Active)>,
        mut rx: mpsc::Receiver<Job>,
    ) {
        let mut backlog: VecDeque<Job> = VecDeque::new();
        let mut backoff = Duration::from_millis(50);
        loop {
            let active = self.ups.active();
            if let Some(mut router) = Router::new(self.clone(), ident.clone(), active, None, None) {
                // A cluster: this "connection" routes to the nodes.
                first = None;
                match router.run(&mut rx, &mut backlog).await {
                    RouterEnd::Closed => return,
                    RouterEnd::Retired => continue,
                }
            }
            let (conn, made_for) = match first.take() {
                Some(c) => c,
                None => match self
                    .reconnect(&ident, &mut rx, &mut backlog, &mut backoff)
                    .await
                {
                    Some(c) => c,
                    None => return,
                },
            };
            backoff = Duration::from_millis(50);
            match self
                .serve(conn, &made_for, "shared", &mut backlog, &mut rx, None, None)
                .await
            {
                End::Closed => return,
                End::Retired => {
                    tracing::debug!(from = %made_for.endpoint.name(), "shared connection retired after a switch");
                }
                End::Failed(_) => {}
            }
        }
    }

    /// Try to connect until it works, meanwhile holding jobs up to the queue
    /// timeout (then failing them as never sent). A switch of the active
    /// endpoint cuts the backoff short. `None`: channel closed.
    async fn reconnect(
        &self,
        ident: &Identity,
        rx: &mut mpsc::Receiver<Job>,
        backlog: &mut VecDeque<Job>,
        backoff: &mut Duration,
    ) -> Option<(Connected, Active)> {
        let mut held = Held {
            rx,
            backlog,
            closed: false,
            reason: UpstreamError::unreachable("connecting"),
            timeout: self.settings.queue_timeout,
        };
        loop {
            let tried = self.ups.active();
            match held.run(self.connect(ident, None)).await? {
                Ok(c) => return Some(c),
                Err(e) => {
                    tracing::debug!(error = %e, "upstream connect failed");
                    held.reason = e;
                }
            }
            let moved = held
                .run(async {
                    tokio::select! {
                        _ = tokio::time::sleep(*backoff) => false,
                        _ = tried.retired.cancelled() => true,
                    }
                })
                .await?;
            *backoff = if moved {
                Duration::from_millis(50)
            } else {
                (*backoff * 2).min(Duration::from_secs(1))
            };
        }
    }

    /// A dedicated connection for a pinned client; it ends when the client
    /// drops it. Streamed frames and pushes go to `oob`.
    pub async fn dedicated(
        self: &Arc<Self>,
        ident: &Identity,
        name: Option<&Bytes>,
        oob: Oob,
    ) -> Result<Dedicated, UpstreamError> {
        let active = self.ups.active();
        if active.endpoint.cluster.is_some() {
            return Ok(self.dedicated_router(ident, name, oob, active));
        }
        let (conn, made_for) = self.connect(ident, name).await?;
        let upstream_id = conn.client_id;
        let (tx, mut rx) = mpsc::channel(DEDICATED_QUEUE);
        let holds_state = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let (hs, al, pool) = (holds_state.clone(), alive.clone(), self.clone());
        self.tasks.spawn(async move {
            let mut backlog = VecDeque::new();
            let end = pool
                .serve(
                    conn,
                    &made_for,
                    "dedicated",
                    &mut backlog,
                    &mut rx,
                    Some(&oob),
                    None,
                )
                .await;
            end_pinned(
                matches!(end, End::Closed),
                &mut backlog,
                &mut rx,
                &al,
                &hs,
                &oob,
            );
        });
        Ok(Dedicated {
            tx,
            holds_state,
            alive,
            upstream_id,
        })
    }

    /// A pinned client of a cluster endpoint: a router of its own, whose
    /// node connections are the client's (its transaction, blocking
    /// commands and subscriptions live there).
    fn dedicated_router(
        self: &Arc<Self>,
        ident: &Identity,
        name: Option<&Bytes>,
        oob: Oob,
        active: Active,
    ) -> Dedicated {
        let (tx, mut rx) = mpsc::channel(DEDICATED_QUEUE);
        let holds_state = Arc::new(AtomicBool::new(false));
        let alive = Arc::new(AtomicBool::new(true));
        let mut router = Router::new(
            self.clone(),
            ident.clone(),
            active,
            Some((oob.clone(), holds_state.clone())),
            name.cloned(),
        );
        let (hs, al) = (holds_state.clone(), alive.clone());
        self.tasks.spawn(async move {
            let end = match router.as_mut() {
                Some(r) => r.run(&mut rx, &mut VecDeque::new()).await,
                None => RouterEnd::Retired,
            };
            drop(router);
            let closed = end == RouterEnd::Closed;
            end_pinned(closed, &mut VecDeque::new(), &mut rx, &al, &hs, &oob);
        });
        Dedicated {
            tx,
            holds_state,
            alive,
            upstream_id: None,
        }
    }

    /// A connection to one node of a cluster for a router: jobs it did not
    /// run go back on `bounce`. Shared (`pinned` is `None`): reconnects
    /// with backoff, and jobs that find no connection go back to the router
    /// to be routed again (they were never sent). A pinned client's: one
    /// connection; its loss while the client holds state closes the client.
    pub fn node_connection(
        self: &Arc<Self>,
        ident: &Identity,
        active: &Active,
        node: Node,
        bounce: BounceTx,
        pinned: Option<(Oob, Arc<AtomicBool>)>,
        name: Option<Bytes>,
    ) -> mpsc::Sender<Job> {
        let cap = if pinned.is_some() {
            DEDICATED_QUEUE
        } else {
            SHARED_QUEUE
        };
        let (tx, rx) = mpsc::channel(cap);
        self.tasks.spawn(self.clone().manage_node(
            ident.clone(),
            active.clone(),
            node,
            rx,
            bounce,
            pinned,
            name,
        ));
        tx
    }

    #[allow(clippy::too_many_arguments)]
    async fn manage_node(
        self: Arc<Self>,
        ident: Identity,
        active: Active,
        node: Node,
        mut rx: mpsc::Receiver<Job>,
        bounce: BounceTx,
        pinned: Option<(Oob, Arc<AtomicBool>)>,
        name: Option<Bytes>,
    ) {
        let mut backlog: VecDeque<Job> = VecDeque::new();
        let mut backoff = Duration::from_millis(50);
        let addr = SlotMap::addr(&node);
        let kind = if pinned.is_some() {
            "dedicated"
        } else {
            "shared"
        };
        let refresh = || {
            if let Some(t) = &active.endpoint.cluster {
                t.refresh.notify_one();
            }
        };
        loop {
            if active.retired.is_cancelled() {
                break;
            }
            let connected = conn::connect_to(
                &active.endpoint,
                Some(&node),
                &ident,
                name.as_ref(),
                &self.settings,
                conn::SelectAs::Either,
            )
            .await;
            match connected {
                Ok(c) => {
                    let gauge = self
                        .metrics
                        .cluster_node_connections(active.endpoint.name(), &addr);
                    if let Some(t) = &active.endpoint.cluster {
                        t.set_version(&addr, &c.server_version);
                        gauge.set(t.node_connections(&addr, 1));
                    }
                    backoff = Duration::from_millis(50);
                    let oob = pinned.as_ref().map(|(o, _)| o);
                    let end = self
                        .serve(c, &active, kind, &mut backlog, &mut rx, oob, Some(&bounce))
                        .await;
                    if let Some(t) = &active.endpoint.cluster {
                        gauge.set(t.node_connections(&addr, -1));
                    }
                    match end {
                        End::Closed => return,
                        End::Retired => break,
                        End::Failed(_) => {
                            refresh();
                            if let Some((o, hs)) = &pinned {
                                if hs.load(Ordering::Acquire) {
                                    o.close();
                                }
                                break;
                            }
                        }
                    }
                }
                Err(e) => {
                    tracing::debug!(node = %addr, error = %e, "cluster node connect failed");
                    if let Some(t) = &active.endpoint.cluster {
                        t.node_failed(&addr, e.to_string());
                    }
                    refresh();
                    if pinned.is_some() {
                        fail_all(&mut backlog, &mut rx, &e);
                        break;
                    }
                    // Never sent: back to the router, which routes them
                    // again after a pause (the map may have moved on).
                    let reply = e.to_reply();
                    let give_back = |job: Job| {
                        if job.hop.pinned {
                            return job.fail(e.clone());
                        }
                        if let Err(err) = bounce.try_send(Bounce {
                            job,
                            why: Bounced::Retry,
                            reply: reply.clone(),
                        }) {
                            err.into_inner().job.fail(e.clone());
                        }
                    };
                    backlog.drain(..).for_each(give_back);
                    let pause = tokio::time::sleep(backoff);
                    tokio::pin!(pause);
                    loop {
                        tokio::select! {
                            _ = &mut pause => break,
                            j = rx.recv() => match j {
                                Some(j) => give_back(j),
                                None => return,
                            },
                        }
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
        // Retired (the endpoint was switched) or a pinned connection lost:
        // what is left was never sent.
        let err = UpstreamError::unreachable("the cluster node connection closed");
        fail_all(&mut backlog, &mut rx, &err);
    }

    /// Learn the command table from the upstream's `COMMAND`. Best effort:
    /// the built-in table stays when this fails.
    pub async fn learn_commands(&self) -> Result<usize, UpstreamError> {
        // The URL's credentials first; when they are not enough (clients
        // authenticate themselves to a `requirepass` upstream), any
        // identity a client has authenticated with since.
        let url = Identity {
            proto: Proto::Resp2,
            db: 0,
            auth: None,
        };
        let clients: Vec<Identity> = self
            .lock_shared()
            .keys()
            .filter(|i| i.auth.is_some())
            .map(|i| Identity {
                auth: i.auth.clone(),
                ..url.clone()
            })
            .collect();
        let mut last = UpstreamError::ConnectionLost;
        for ident in std::iter::once(url).chain(clients) {
            match self.learn_with(&ident).await {
                Ok(n) => return Ok(n),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn learn_with(&self, ident: &Identity) -> Result<usize, UpstreamError> {
        let reply = self.one_command(ident, b"COMMAND").await?;
        if crate::wire::is_error(&reply) {
            return Err(UpstreamError::Refused(conn::error_text(&reply)));
        }
        let frame = redis_protocol::resp2::decode::decode(&reply)
            .ok()
            .flatten()
            .map(|(f, _)| f)
            .ok_or_else(|| UpstreamError::Protocol("COMMAND reply".into()))?;
        let table = Table::from_command_reply(&frame)
            .ok_or_else(|| UpstreamError::Protocol("COMMAND reply had no entries".into()))?;
        let n = table.len();
        *self.table.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(table);
        self.table_generation.fetch_add(1, Ordering::AcqRel);
        Ok(n)
    }

    /// Is the active upstream reachable and answering? (`/readyz`)
    pub async fn probe(&self) -> Result<Duration, UpstreamError> {
        let start = Instant::now();
        let ident = Identity {
            proto: Proto::Resp2,
            db: URL_DB,
            auth: None,
        };
        let reply = self.one_command(&ident, b"PING").await?;
        if crate::wire::is_error(&reply) {
            return Err(UpstreamError::Refused(conn::error_text(&reply)));
        }
        Ok(start.elapsed())
    }

    /// One command on a fresh connection (control path, not the hot path).
    async fn one_command(
        &self,
        ident: &Identity,
        cmd: &'static [u8],
    ) -> Result<Bytes, UpstreamError> {
        let mut conn = self.control_node(ident, None).await?;
        let mut replies = conn.call(&[vec![Bytes::from_static(cmd)]]).await?;
        replies.pop().ok_or(UpstreamError::ConnectionLost)
    }

    /// A plain connection to the active endpoint for the control path (the
    /// TTL sweeper, readiness, learning the table).
    pub async fn control(self: &Arc<Self>, ident: &Identity) -> Result<ControlConn, UpstreamError> {
        let (conn, made_for) = self.connect(ident, None).await?;
        Ok(self.control_conn(conn, made_for, ident))
    }

    /// A control connection to `endpoint`, active or not (a live
    /// migration's source and target), named `name` on the server; in
    /// front of a cluster it routes by the endpoint's own slot map.
    pub async fn control_for(
        self: &Arc<Self>,
        endpoint: &Arc<super::endpoint::Endpoint>,
        ident: &Identity,
        name: Option<&Bytes>,
    ) -> Result<ControlConn, UpstreamError> {
        let conn = conn::connect(endpoint, ident, name, &self.settings).await?;
        let of = Active {
            endpoint: endpoint.clone(),
            generation: 0,
            retired: tokio_util::sync::CancellationToken::new(),
            writers: Arc::default(),
        };
        Ok(self.control_conn(conn, of, ident))
    }

    fn control_conn(
        self: &Arc<Self>,
        conn: Connected,
        of: Active,
        ident: &Identity,
    ) -> ControlConn {
        let mut c = ControlConn::new(
            conn,
            self.settings.max_reply_bulk,
            self.settings.command_timeout,
            of.generation,
        );
        if of.endpoint.cluster.is_some() {
            c.cluster = Some(ClusterControl {
                pool: self.clone(),
                ident: ident.clone(),
                active: of,
                nodes: HashMap::new(),
            });
        }
        c
    }

    /// A plain connection to one node of the active cluster endpoint (the
    /// cache's tracking connection per node); the endpoint itself when
    /// `node` is `None`.
    pub async fn control_node(
        &self,
        ident: &Identity,
        node: Option<&Node>,
    ) -> Result<ControlConn, UpstreamError> {
        let active = self.ups.active();
        let conn = conn::connect_to(
            &active.endpoint,
            node,
            ident,
            None,
            &self.settings,
            conn::SelectAs::Either,
        )
        .await
        .inspect_err(|_| self.ups.nudge(&active.endpoint))?;
        Ok(ControlConn::new(
            conn,
            self.settings.max_reply_bulk,
            self.settings.command_timeout,
            active.generation,
        ))
    }

    /// The databases clients use (those with shared connections, and the
    /// endpoint's own), for the TTL sweeper.
    pub fn dbs_in_use(&self) -> Vec<i64> {
        let url_db = self.ups.active().endpoint.db();
        let mut dbs: Vec<i64> = self
            .lock_shared()
            .keys()
            .map(|i| if i.db == URL_DB { url_db } else { i.db })
            .chain([url_db])
            .collect();
        dbs.sort_unstable();
        dbs.dedup();
        dbs
    }

    /// Shutdown, once no session is left: drop every shared connection's
    /// job channel, so each manager writes what it holds and ends.
    pub fn close(&self) {
        self.lock_shared().clear();
        self.clusters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// How many shared connection sets exist (one per identity).
    pub fn identities(&self) -> usize {
        self.lock_shared().len()
    }
}

/// `EXPIRE .. NX/GT/LT` exist from Redis 7.0 (`None`: version unknown).
pub fn supports_expire_options(version: &str) -> Option<bool> {
    let major: u32 = version.split('.').next()?.parse().ok()?;
    Some(major >= 7)
}

/// A connection for the control path (the TTL sweeper, shared rate
/// limits, readiness, learning the table): batches of commands, replies in
/// order, each batch bounded by the command timeout. On a cluster it is
/// one connection per node, made as needed: each command goes to its
/// key's master (a MOVED is followed once), SCAN walks the masters with
/// the same cursors clients get, SCRIPT LOAD/FLUSH go to every master and
/// SELECT 0 is answered.
pub struct ControlConn {
    first: (super::endpoint::Stream, bytes::BytesMut),
    max_bulk: usize,
    timeout: Duration,
    /// The active choice's generation it was made for: a switch since
    /// means it talks to the old endpoint.
    pub generation: u64,
    cluster: Option<ClusterControl>,
}

/// What a cluster's control connection needs beyond its first connection.
struct ClusterControl {
    pool: Arc<Pool>,
    ident: Identity,
    active: Active,
    nodes: HashMap<String, (super::endpoint::Stream, bytes::BytesMut)>,
}

/// Where one control command goes on a cluster.
enum ControlRoute {
    Node(Node),
    /// The first connection (any node).
    Any,
    Every,
    Scan(u8, u8, usize, Vec<Bytes>),
    Answer(Bytes),
}

impl ControlConn {
    pub fn new(
        conn: Connected,
        max_bulk: usize,
        timeout: Duration,
        generation: u64,
    ) -> ControlConn {
        ControlConn {
            first: conn.into_parts(),
            max_bulk,
            timeout,
            generation,
            cluster: None,
        }
    }

    /// The connection and what was read past the last reply (on a cluster,
    /// the node first reached).
    pub fn into_parts(self) -> (super::endpoint::Stream, bytes::BytesMut) {
        self.first
    }

    pub async fn call(&mut self, cmds: &[Vec<Bytes>]) -> Result<Vec<Bytes>, UpstreamError> {
        let timeout = self.timeout;
        tokio::time::timeout(timeout, self.call_inner(cmds))
            .await
            .map_err(|_| UpstreamError::Timeout)?
    }

    /// `cmd` on every master of a cluster (its replies in the map's
    /// order), or the one reply of a single Redis.
    pub async fn each_master(&mut self, cmd: &[Bytes]) -> Result<Vec<Bytes>, UpstreamError> {
        let max_bulk = self.max_bulk;
        let timeout = self.timeout;
        let Some(cl) = self.cluster.as_mut() else {
            return self.call(&[cmd.to_vec()]).await;
        };
        let masters = cl
            .active
            .endpoint
            .cluster
            .as_ref()
            .map(|t| t.map().masters.clone())
            .unwrap_or_default();
        let mut replies = Vec::with_capacity(masters.len());
        for m in &masters {
            let r = tokio::time::timeout(timeout, cl.at(m, cmd, max_bulk, false))
                .await
                .map_err(|_| UpstreamError::Timeout)??;
            replies.push(r);
        }
        Ok(replies)
    }

    /// Whether this talks to a cluster.
    pub fn is_cluster(&self) -> bool {
        self.cluster.is_some()
    }

    async fn call_inner(&mut self, cmds: &[Vec<Bytes>]) -> Result<Vec<Bytes>, UpstreamError> {
        let max_bulk = self.max_bulk;
        let Some(cl) = self.cluster.as_mut() else {
            let (stream, rbuf) = &mut self.first;
            return super::endpoint::roundtrip(stream, rbuf, cmds, max_bulk).await;
        };
        let mut out = Vec::with_capacity(cmds.len());
        for cmd in cmds {
            let reply = match cl.route(cmd) {
                ControlRoute::Answer(r) => r,
                ControlRoute::Any => {
                    let (stream, rbuf) = &mut self.first;
                    one(stream, rbuf, cmd, max_bulk).await?
                }
                ControlRoute::Node(n) => cl.at(&n, cmd, max_bulk, true).await?,
                ControlRoute::Every => {
                    let masters = cl.active.endpoint.cluster.as_ref().map(|t| t.map());
                    let mut replies = Vec::new();
                    for m in masters.iter().flat_map(|m| m.masters.iter()) {
                        replies.push(cl.at(m, cmd, max_bulk, false).await?);
                    }
                    merge(&Merge::First, &replies)
                        .ok_or(UpstreamError::Protocol("no master answered".into()))?
                }
                ControlRoute::Scan(epoch, node, masters, args) => {
                    let map = cl.active.endpoint.cluster.as_ref().map(|t| t.map());
                    let target = map
                        .and_then(|m| m.masters.get(usize::from(node)).cloned())
                        .ok_or(UpstreamError::Routing("the cluster has no master".into()))?;
                    let r = cl.at(&target, &args, max_bulk, false).await?;
                    let how = Merge::Scan {
                        epoch,
                        node,
                        masters,
                    };
                    merge(&how, &[r])
                        .ok_or(UpstreamError::Protocol("unexpected SCAN reply".into()))?
                }
            };
            out.push(reply);
        }
        Ok(out)
    }
}

/// One command, one reply.
async fn one(
    stream: &mut super::endpoint::Stream,
    rbuf: &mut bytes::BytesMut,
    cmd: &[Bytes],
    max_bulk: usize,
) -> Result<Bytes, UpstreamError> {
    super::endpoint::roundtrip(stream, rbuf, &[cmd.to_vec()], max_bulk)
        .await?
        .pop()
        .ok_or(UpstreamError::ConnectionLost)
}

impl ClusterControl {
    fn route(&self, cmd: &[Bytes]) -> ControlRoute {
        let Some(topo) = self.active.endpoint.cluster.as_ref() else {
            return ControlRoute::Any;
        };
        let map = topo.map();
        if cmd.len() == 2 && cmd[0].eq_ignore_ascii_case(b"select") && &cmd[1][..] == b"0" {
            return ControlRoute::Answer(Bytes::from_static(b"+OK\r\n"));
        }
        match named(cmd) {
            Some(Named::ScriptLoad | Named::ScriptFlush) => return ControlRoute::Every,
            Some(Named::Scan) => {
                let (masters, epoch) = (map.masters.len(), topo.epoch() as u8);
                return match super::slots::scan_step(cmd, epoch, masters) {
                    Ok((node, args)) => ControlRoute::Scan(epoch, node, masters, args),
                    Err(e) => ControlRoute::Answer(Bytes::from(format!("-ERR {e}\r\n"))),
                };
            }
            _ => {}
        }
        let table = self.pool.table();
        let slot = match table.lookup(cmd).map(|i| slots_of(cmd, i)) {
            Some(Slots::One(s)) => s,
            _ => return ControlRoute::Any,
        };
        match map.owner(slot) {
            Some(n) => ControlRoute::Node(n.clone()),
            None => ControlRoute::Any,
        }
    }

    /// `cmd` on `node` (connecting if needed); a MOVED is followed once
    /// when `follow` (the command did not run).
    async fn at(
        &mut self,
        node: &Node,
        cmd: &[Bytes],
        max_bulk: usize,
        follow: bool,
    ) -> Result<Bytes, UpstreamError> {
        let mut node = node.clone();
        for _ in 0..2 {
            let addr = SlotMap::addr(&node);
            if !self.nodes.contains_key(&addr) {
                let c = conn::connect_to(
                    &self.active.endpoint,
                    Some(&node),
                    &self.ident,
                    None,
                    self.pool.settings(),
                    conn::SelectAs::Either,
                )
                .await?;
                self.nodes.insert(addr.clone(), c.into_parts());
            }
            let Some((stream, rbuf)) = self.nodes.get_mut(&addr) else {
                return Err(UpstreamError::ConnectionLost);
            };
            let r = match one(stream, rbuf, cmd, max_bulk).await {
                Ok(r) => r,
                Err(e) => {
                    self.nodes.remove(&addr);
                    return Err(e);
                }
            };
            match super::slots::Redirect::parse(&r, &node.host) {
                Some(super::slots::Redirect::Moved { host, port, .. }) if follow => {
                    if let Some(t) = &self.active.endpoint.cluster {
                        t.refresh.notify_one();
                    }
                    node = Node {
                        id: String::new(),
                        host,
                        port,
                        hostname: None,
                    };
                }
                _ => return Ok(r),
            }
        }
        Err(UpstreamError::Routing("redirected twice".into()))
    }
}

/// Jobs that arrive while a shared connection has no upstream connection.
struct Held<'a> {
    rx: &'a mut mpsc::Receiver<Job>,
    backlog: &'a mut VecDeque<Job>,
    /// Every sender is gone.
    closed: bool,
    /// Why there is no connection (what held jobs fail with).
    reason: UpstreamError,
    timeout: Duration,
}

impl Held<'_> {
    /// Run `fut` (a connect attempt or a backoff) while taking jobs off the
    /// channel, up to its capacity, and failing those older than the queue
    /// timeout. `None`: the channel closed and no job is left to serve.
    async fn run<F: std::future::Future>(&mut self, fut: F) -> Option<F::Output> {
        tokio::pin!(fut);
        loop {
            expire(self.backlog, self.timeout, &self.reason);
            if self.closed && self.backlog.is_empty() {
                return None;
            }
            tokio::select! {
                out = &mut fut => return Some(out),
                job = self.rx.recv(), if !self.closed && self.backlog.len() < SHARED_QUEUE => match job {
                    Some(j) => self.backlog.push_back(j),
                    None => self.closed = true,
                },
                // Expiry is checked at least this often.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }
}

/// A pinned client's connection (or cluster router) ended: what was queued
/// was never sent. Unless the client left (`closed`), MULTI, WATCH or
/// subscriptions it held there are lost (the connection failed, or the
/// endpoint was switched): it must learn it, as with Redis, and reconnect.
fn end_pinned(
    closed: bool,
    backlog: &mut VecDeque<Job>,
    rx: &mut mpsc::Receiver<Job>,
    alive: &AtomicBool,
    holds_state: &AtomicBool,
    oob: &Oob,
) {
    alive.store(false, Ordering::Release);
    let unsent =
        UpstreamError::unreachable("the upstream connection closed before the request was sent");
    fail_all(backlog, rx, &unsent);
    if !closed && holds_state.load(Ordering::Acquire) {
        oob.close();
    }
}

/// Fail every job held or queued (never sent).
fn fail_all(backlog: &mut VecDeque<Job>, rx: &mut mpsc::Receiver<Job>, err: &UpstreamError) {
    rx.close();
    for job in backlog
        .drain(..)
        .chain(std::iter::from_fn(|| rx.try_recv().ok()))
    {
        job.fail(err.clone());
    }
}

/// Fail jobs that waited longer than `timeout` for a connection. They were
/// never sent, so the error says so and the client may retry.
fn expire(backlog: &mut VecDeque<Job>, timeout: Duration, reason: &UpstreamError) {
    while backlog
        .front()
        .is_some_and(|j| j.enqueued.elapsed() >= timeout)
    {
        if let Some(job) = backlog.pop_front() {
            job.fail(match reason {
                // Never sent, whatever the connect attempt met.
                e if e.never_sent() => e.clone(),
                e => UpstreamError::unreachable(e.to_string()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::supports_expire_options;

    #[test]
    fn expire_options_need_redis_7() {
        assert_eq!(supports_expire_options("7.0.15"), Some(true));
        assert_eq!(supports_expire_options("6.2.14"), Some(false));
        assert_eq!(supports_expire_options(""), None);
    }
}
