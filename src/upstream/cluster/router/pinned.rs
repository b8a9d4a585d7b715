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
    /// MONITOR runs on every master.
    pub(super) monitoring: bool,
    /// Shard channels asked for (what a SUNSUBSCRIBE without channels
    /// ends, on their nodes).
    pub(super) shard: std::collections::HashSet<Bytes>,
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
            let node = match slot {
                Some(s) => self.owner(s),
                None => self.default_node(&job.client),
            };
            return self.stream_to(node, job).await;
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

    /// A job of a client that streams (subscriptions, MONITOR): a
    /// connection that starts streaming is told so by its first job.
    async fn stream_to(&mut self, node: Option<Node>, mut job: Job) {
        if let Some(n) = &node {
            let addr = SlotMap::addr(n);
            if matches!(job.kind, JobKind::Stream) && !self.tx.streaming.contains(&addr) {
                job.kind = JobKind::StartStream;
            }
            if !matches!(job.kind, JobKind::Mark(_)) {
                self.tx.streaming.insert(addr);
            }
        }
        self.send(node, job).await
    }

    /// A job like `job` (a streaming client's) with another payload.
    fn stream_part(job: &Job, payload: Bytes) -> Job {
        Job {
            payload,
            kind: JobKind::Stream,
            client: job.client.clone(),
            enqueued: job.enqueued,
            hop: job.hop,
        }
    }

    /// What stages appended to a streaming client's command (the part of
    /// its payload after the first command), to its default node.
    async fn stream_rest(&mut self, job: &Job, end: usize) {
        if end < job.payload.len() {
            let rest = Self::stream_part(job, job.payload.slice(end..));
            let node = self.default_node(&job.client);
            self.stream_to(node, rest).await;
        }
    }

    /// MONITOR on every master, so the client sees every command as on
    /// one Redis: answered once, when every master monitors (the filter
    /// counts their answers), and each master's lines in its order.
    pub(super) async fn monitor(&mut self, job: Job, end: usize) {
        let masters = self.map.masters.clone();
        let filter = self.filter.clone();
        let (Some(filter), false, false) = (filter, self.tx.monitoring, masters.is_empty()) else {
            // Already monitoring, a second MONITOR is ignored (by the
            // node, as by Redis); no map yet, it fails as any job does.
            let node = self.default_node(&job.client);
            return self.stream_to(node, job).await;
        };
        self.tx.monitoring = true;
        filter.start_monitor(masters.len());
        let monitor = job.payload.slice(..end);
        for m in masters {
            let part = Self::stream_part(&job, monitor.clone());
            self.stream_to(Some(m), part).await;
        }
        self.stream_rest(&job, end).await;
    }

    /// SSUBSCRIBE/SUNSUBSCRIBE: each run of channels of one slot on the
    /// slot's master, in order (the next node's run waits for this one's
    /// confirmations, so they reach the client in the order one Redis
    /// sends them); the filter makes each confirmation's count the
    /// client's across nodes. SUNSUBSCRIBE without channels ends every
    /// shard channel the client asked for, on its node.
    pub(super) async fn shard_channels(
        &mut self,
        job: Job,
        args: &[Bytes],
        end: usize,
        subscribe: bool,
    ) {
        let channels: Vec<Bytes> = match args.get(1..) {
            Some(chs) if !chs.is_empty() => chs.to_vec(),
            _ if subscribe => Vec::new(),
            _ => self.tx.shard.iter().cloned().collect(),
        };
        if channels.is_empty() {
            // SSUBSCRIBE without a channel (Redis's own arity error), or
            // SUNSUBSCRIBE with none (`sunsubscribe nil 0`).
            let node = self.default_node(&job.client);
            return self.stream_to(node, job).await;
        }
        let mut runs: Vec<(u16, Vec<Bytes>)> = Vec::new();
        for ch in channels {
            if subscribe {
                self.tx.shard.insert(ch.clone());
            } else {
                self.tx.shard.remove(&ch);
            }
            let slot = cluster::key_slot(&ch);
            match runs.last_mut() {
                Some((s, chs)) if *s == slot => chs.push(ch),
                _ => runs.push((slot, vec![ch])),
            }
        }
        let nodes: Vec<Option<Node>> = runs.iter().map(|(s, _)| self.owner(*s)).collect();
        for (i, (_, chs)) in runs.into_iter().enumerate() {
            let mut cmd = Vec::with_capacity(chs.len() + 1);
            cmd.push(args[0].clone());
            cmd.extend(chs);
            let part = Self::stream_part(&job, encode_command(&cmd));
            let node = nodes[i].clone();
            self.stream_to(node.clone(), part).await;
            let next = nodes.get(i + 1);
            if let (Some(n), Some(next)) = (node, next)
                && next.as_ref().map(SlotMap::addr) != Some(SlotMap::addr(&n))
            {
                self.confirmed(n, &job).await;
            }
        }
        self.stream_rest(&job, end).await;
    }

    /// Wait (at most the command timeout) until what was sent to `node`
    /// before is answered: a marked PING whose answer nobody gets.
    async fn confirmed(&mut self, node: Node, job: &Job) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let token = self
            .token
            .get_or_insert_with(|| crate::upstream::Mark::new_token(0))
            .clone();
        let mark = crate::upstream::Mark {
            token,
            reply: Bytes::new(),
            done: Some(tx),
        };
        let mut ping = Self::stream_part(job, mark.payload());
        ping.kind = JobKind::Mark(Box::new(mark));
        self.send(Some(node), ping).await;
        let _ = tokio::time::timeout(self.pool.settings().command_timeout, rx).await;
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
