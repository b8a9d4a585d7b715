//! The node connections of a cluster endpoint, and what the cluster path
//! asks of the pool that makes them ([`NodePool`]): the pool sits above
//! the router (it makes routers), so the router reaches it only through
//! this trait.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex, PoisonError, RwLock};

use bytes::Bytes;
use tokio::sync::mpsc;

use super::Node;
use super::route::Direct;
use crate::metrics::Metrics;
use crate::request::command::Table;
use crate::upstream::conn::{Bounce, BounceTx, ConnSettings};
use crate::upstream::failover::Active;
use crate::upstream::{ClientShared, Identity, Job, Oob};

/// Jobs sent back by nodes, waiting for the router.
pub const BOUNCE_QUEUE: usize = 1024;

/// What routers and node sets need of the connection pool.
pub trait NodePool: Send + Sync + 'static {
    /// Where clients reach the sidecar (what `CLUSTER SLOTS` names).
    fn advertised(&self) -> SocketAddr;
    fn settings(&self) -> &ConnSettings;
    fn metrics(&self) -> &Metrics;
    /// The current command table, and its generation.
    fn table(&self) -> Arc<Table>;
    fn table_generation(&self) -> u64;
    /// The shared node connections of `ident` on the active endpoint, if
    /// it is a cluster.
    fn cluster_set(self: Arc<Self>, ident: &Identity) -> Option<Arc<ClusterSet>>;
    /// A connection to one node for a router: jobs it did not run go
    /// back on `bounce`. `pinned`: a pinned client's (its stream and
    /// whether it holds state); `None`: shared, reconnecting.
    fn node_connection(
        self: Arc<Self>,
        ident: &Identity,
        active: &Active,
        node: Node,
        bounce: BounceTx,
        pinned: Option<(Oob, Arc<AtomicBool>)>,
        name: Option<Bytes>,
    ) -> mpsc::Sender<Job>;
}

/// Node connections by port, then host.
type NodeConns = HashMap<u16, Vec<(String, mpsc::Sender<Job>)>>;

/// The shared connections of one identity to the nodes of a cluster
/// endpoint: sessions send single-slot requests straight to them; the
/// identity's routers send the rest (split, fanned out, redirected).
pub struct ClusterSet {
    pub active: Active,
    ident: Identity,
    /// One shared connection per node (the cluster already spreads the
    /// load over its nodes, and fuller batches cost fewer syscalls per
    /// command), by port then host.
    nodes: RwLock<NodeConns>,
    /// Where the node connections send what they did not run.
    bounce_tx: BounceTx,
    /// Taken by the first router of the identity, which handles bounces.
    pub bounce_rx: Mutex<Option<mpsc::Receiver<Bounce>>>,
}

impl ClusterSet {
    /// The shared connection to `node` (made on first use). Looked up by
    /// port, then host: no allocation on the request path.
    pub fn sender<P: NodePool + ?Sized>(&self, pool: &Arc<P>, node: &Node) -> mpsc::Sender<Job> {
        let find = |nodes: &NodeConns| {
            nodes
                .get(&node.port)?
                .iter()
                .find(|(h, tx)| *h == node.host && !tx.is_closed())
                .map(|(_, tx)| tx.clone())
        };
        if let Some(tx) = find(&self.nodes.read().unwrap_or_else(PoisonError::into_inner)) {
            return tx;
        }
        let mut nodes = self.nodes.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(tx) = find(&nodes) {
            return tx;
        }
        let tx = pool.clone().node_connection(
            &self.ident,
            &self.active,
            node.clone(),
            self.bounce_tx.clone(),
            None,
            None,
        );
        let at = nodes.entry(node.port).or_default();
        at.retain(|(h, _)| *h != node.host);
        at.push((node.host.clone(), tx.clone()));
        tx
    }

    /// The connection for a request the session sends straight to its
    /// node, if the map names that node.
    pub fn direct<P: NodePool + ?Sized>(
        &self,
        pool: &Arc<P>,
        to: Direct,
        client: &Arc<ClientShared>,
    ) -> Option<mpsc::Sender<Job>> {
        let topo = self.active.endpoint.cluster.as_ref()?;
        let slot = match to {
            Direct::Slot(s) => s,
            Direct::Keyless => {
                let map = topo.map();
                return Some(self.sender(pool, map.keyless_node(client)?));
            }
        };
        if let Some(n) = topo.moved_owner(slot) {
            return Some(self.sender(pool, &n));
        }
        let map = topo.map();
        Some(self.sender(pool, map.owner(slot)?))
    }
}

impl ClusterSet {
    /// A new, empty set for `ident` on `active`.
    pub fn new(active: Active, ident: Identity) -> ClusterSet {
        let (bounce_tx, bounce_rx) = mpsc::channel(BOUNCE_QUEUE);
        ClusterSet {
            active,
            ident,
            nodes: RwLock::new(HashMap::new()),
            bounce_tx,
            bounce_rx: Mutex::new(Some(bounce_rx)),
        }
    }
}
