//! A pinned client's router: its transaction (MULTI held until the first
//! queued command names a node, then every command of it on that node),
//! WATCH, and the node connections that stream.

use super::*;

/// What a pinned client holds, and where.
#[derive(Default)]
pub(super) struct PinState {
    /// The node (and slot, once a key named it) its WATCH or MULTI lives
    /// on.
    pub(super) bound: Option<(Node, Option<u16>)>,
    /// MULTI answered but not sent yet: it goes to the node of the first
    /// command queued after it.
    pub(super) held_multi: Option<Job>,
    pub(super) in_multi: bool,
    /// A command was refused at queue time: EXEC answers EXECABORT.
    pub(super) dirty: bool,
    /// Node connections that stream (subscribed, MONITOR).
    pub(super) streaming: std::collections::HashSet<String>,
}

impl Router {
    /// A pinned client: its transaction on one node and one slot, its
    /// blocking commands on their keys' nodes, its subscriptions on its
    /// default node (shard channels on their slots' nodes).
    pub(super) async fn route_pinned(&mut self, mut job: Job, name: &[u8], route: Route) {
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
    pub(super) async fn bind(
        &mut self,
        slot: Option<u16>,
        client: &Arc<ClientShared>,
    ) -> Option<Node> {
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
}
