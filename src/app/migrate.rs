//! Live migration from the active endpoint to another configured one: copy
//! every key (SCAN, DUMP with PTTL, RESTORE), keep the copy exact while the
//! app runs (every write that passes through the sidecar marks its keys,
//! which are copied again after its reply), then cut over: new writes are
//! held, the writes in flight finish, what is left is copied, the key
//! counts are compared, the active endpoint switches and the held writes
//! go to the new one. The pause is bounded (`max_pause`): past it the
//! cutover is abandoned, the held writes go on to the source and the
//! migration stays in `syncing`.
//!
//! This first version moves one Redis to another (not a cluster on either
//! side), from one sidecar; what it does not do yet is listed in the
//! README.

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::policy::{Ctx, Exchange, Policies, ReplyAction, Stage, Verdict};
use crate::upstream::conn::{self, ConnSettings};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::failover::Upstreams;
use crate::upstream::pool::ControlConn;
use crate::upstream::{Identity, URL_DB, UpstreamError};
use crate::wire::resp::{bulk_text, integer};
use crate::wire::{Proto, is_error};

/// Keys copied per SCAN step.
const BATCH: usize = 100;
/// Keys waiting to be copied again, at most; past it the migration fails
/// (its copy could no longer be kept exact).
const MAX_BACKLOG: usize = 1_000_000;

/// A key and its db.
type DbKey = (i64, Bytes);

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Copying,
    Syncing,
    CuttingOver,
    Done,
    Aborted,
    Failed,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Copying => "copying",
            Phase::Syncing => "syncing",
            Phase::CuttingOver => "cutting_over",
            Phase::Done => "done",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }

    fn running(self) -> bool {
        matches!(self, Phase::Copying | Phase::Syncing | Phase::CuttingOver)
    }
}

/// What a target that already holds a key gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    Fail,
    Replace,
    Skip,
}

/// `POST /migrations`'s body.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    pub to: String,
    #[serde(default = "default_conflict")]
    pub on_conflict: OnConflict,
    /// Cut over on its own once the copy is in sync.
    #[serde(default)]
    pub cutover: bool,
    /// The longest writes are held at the cutover, in milliseconds.
    #[serde(default = "default_pause")]
    pub max_pause_ms: u64,
}

fn default_conflict() -> OnConflict {
    OnConflict::Fail
}

fn default_pause() -> u64 {
    2000
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a migration is running")]
    Running,
    #[error("no upstream named {0}")]
    Unknown(String),
    #[error("{0} is the active upstream")]
    Active(String),
    #[error("a migration to or from a Redis Cluster is not supported yet")]
    Cluster,
    #[error("the target cannot be reached: {0}")]
    Target(#[source] UpstreamError),
}

/// One migration: its state, counters and the keys to copy again.
pub struct Migration {
    pub from: String,
    pub to: String,
    request: Request,
    phase: Mutex<(Phase, String)>,
    pub keys_copied: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub keys_recopied: AtomicU64,
    pub errors: AtomicU64,
    keys_total: AtomicU64,
    started: Instant,
    /// Keys written through the sidecar since the copy began, by db, in
    /// the order written (each once).
    dirty: Mutex<(VecDeque<DbKey>, HashSet<DbKey>)>,
    /// Keys the migration itself wrote to the target (copied again after
    /// a write): a conflict with one of them is not the target's own key.
    ours: Mutex<HashSet<(i64, Bytes)>>,
    /// Writes let through whose reply has not come yet.
    inflight: AtomicI64,
    /// `true` while the cutover holds new writes: `hold` for the check on
    /// every write, `holding` to wait on.
    hold: AtomicBool,
    holding: watch::Sender<bool>,
    cutover_asked: AtomicBool,
    cancel: CancellationToken,
    /// The db a client that never selected one uses (the source URL's).
    url_db: i64,
    metrics: crate::metrics::Metrics,
}

impl Migration {
    pub fn phase(&self) -> (Phase, String) {
        self.phase
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_phase(&self, p: Phase, why: &str) {
        *self.phase.lock().unwrap_or_else(PoisonError::into_inner) = (p, why.to_string());
        self.metrics.migration_phase(p.label());
        tracing::info!(phase = p.label(), reason = %why, from = %self.from, to = %self.to, "migration");
    }

    pub fn backlog(&self) -> usize {
        self.dirty
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .len()
    }

    /// `GET /migrations/current`.
    pub fn status(&self) -> serde_json::Value {
        let (phase, reason) = self.phase();
        let copied = self.keys_copied.load(Ordering::Relaxed);
        let total = self.keys_total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        serde_json::json!({
            "from": self.from,
            "to": self.to,
            "phase": phase.label(),
            "reason": reason,
            "keys_copied": copied,
            "bytes_copied": self.bytes_copied.load(Ordering::Relaxed),
            "keys_recopied": self.keys_recopied.load(Ordering::Relaxed),
            "keys_left_estimate": total.saturating_sub(copied),
            "keys_per_second": (copied as f64 / secs).round(),
            "backlog": self.backlog(),
            "errors": self.errors.load(Ordering::Relaxed),
        })
    }

    fn mark(&self, db: i64, key: Bytes) {
        let mut d = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let (queue, seen) = &mut *d;
        if seen.insert((db, key.clone())) {
            queue.push_back((db, key));
        }
    }

    fn take(&self, n: usize) -> Vec<(i64, Bytes)> {
        let mut d = self.dirty.lock().unwrap_or_else(PoisonError::into_inner);
        let (queue, seen) = &mut *d;
        let out: Vec<_> = queue.drain(..n.min(queue.len())).collect();
        for k in &out {
            seen.remove(k);
        }
        out
    }
}

/// The policy stage a running migration adds: marks the keys of every
/// write, and holds writes (and EXEC) during the cutover.
struct Tracker {
    m: Arc<Migration>,
    /// The keys of the writes queued in each client's open transaction:
    /// marked when its EXEC replies.
    tx_keys: Mutex<std::collections::HashMap<u64, Vec<(i64, Bytes)>>>,
}

/// After a write's (or an EXEC's) reply: its keys are copied again. The
/// keys are marked before the write stops counting as in flight, so a
/// cutover that sees none in flight has them all.
struct Marked {
    m: Arc<Migration>,
    keys: Vec<(i64, Bytes)>,
}

impl ReplyAction for Marked {
    fn on_reply(&self, index: u32, _reply: &Bytes) {
        if index != 0 {
            return;
        }
        for (db, k) in &self.keys {
            self.m.mark(*db, k.clone());
        }
        self.m.inflight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Tracker {
    /// Let a write through, counted in flight until its reply, unless the
    /// cutover holds writes: then wait. The count goes up *before* the hold
    /// is looked at (and the cutover sets the hold before it looks at the
    /// count, both sequentially consistent), so a write either is seen in
    /// flight by the cutover or sees the hold.
    fn let_through(&self, ex: &mut Exchange, keys: Vec<(i64, Bytes)>) -> Verdict {
        self.m.inflight.fetch_add(1, Ordering::SeqCst);
        if self.m.hold.load(Ordering::SeqCst) {
            self.m.inflight.fetch_sub(1, Ordering::SeqCst);
            let mut rx = self.m.holding.subscribe();
            return Verdict::Wait(Box::pin(async move {
                // Bounded: the cutover releases within max_pause.
                let _ = rx.wait_for(|h| !*h).await;
            }));
        }
        ex.on_reply(Arc::new(Marked {
            m: self.m.clone(),
            keys,
        }));
        Verdict::Continue
    }
}

impl Stage for Tracker {
    fn name(&self) -> &'static str {
        "migration"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let Some(info) = ctx.info else {
            return Verdict::Continue;
        };
        let txs = || self.tx_keys.lock().unwrap_or_else(PoisonError::into_inner);
        match info.name.as_str() {
            "multi" => {
                txs().insert(ctx.client_id, Vec::new());
                return Verdict::Continue;
            }
            "exec" => {
                let keys = txs().get(&ctx.client_id).cloned().unwrap_or_default();
                let v = self.let_through(ex, keys);
                if matches!(v, Verdict::Continue) {
                    txs().remove(&ctx.client_id);
                }
                return v;
            }
            _ => {}
        }
        let writes = info.flags.write || info.name == "eval" || info.name == "evalsha";
        if !writes {
            return Verdict::Continue;
        }
        let db = if ctx.db == URL_DB {
            self.m.url_db
        } else {
            ctx.db
        };
        let keys: Vec<(i64, Bytes)> = info
            .keys(ex.args())
            .iter()
            .filter(|k| k.write)
            .filter_map(|k| ex.args().get(k.index).map(|a| (db, a.clone())))
            .collect();
        if ctx.mode == crate::policy::Mode::Transaction {
            // Queued, not run: its keys wait for the EXEC.
            txs().entry(ctx.client_id).or_default().extend(keys);
            return Verdict::Continue;
        }
        self.let_through(ex, keys)
    }
}

/// Starts migrations and holds the current one.
pub struct Migrator {
    ups: Arc<Upstreams>,
    metrics: crate::metrics::Metrics,
    policies: Arc<Policies>,
    settings: ConnSettings,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    current: Mutex<Option<Arc<Migration>>>,
}

impl Migrator {
    pub fn new(
        ups: Arc<Upstreams>,
        metrics: crate::metrics::Metrics,
        policies: Arc<Policies>,
        settings: ConnSettings,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Migrator {
        Migrator {
            ups,
            metrics,
            policies,
            settings,
            tasks,
            shutdown,
            current: Mutex::new(None),
        }
    }

    pub fn current(&self) -> Option<Arc<Migration>> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `POST /migrations`.
    pub async fn start(&self, req: Request) -> Result<Arc<Migration>, StartError> {
        if self.running().is_some() {
            return Err(StartError::Running);
        }
        let from = self.ups.active().endpoint;
        let to = self
            .ups
            .endpoints()
            .into_iter()
            .find(|e| e.name() == req.to)
            .ok_or_else(|| StartError::Unknown(req.to.clone()))?;
        if Arc::ptr_eq(&from, &to) {
            return Err(StartError::Active(req.to.clone()));
        }
        if from.cluster.is_some() || to.cluster.is_some() {
            return Err(StartError::Cluster);
        }
        // The target must answer before anything starts.
        let target = connect(&to, &self.settings)
            .await
            .map_err(StartError::Target)?;
        let (holding, _) = watch::channel(false);
        let m = Arc::new(Migration {
            from: from.name().to_string(),
            to: to.name().to_string(),
            request: req,
            phase: Mutex::new((Phase::Copying, String::new())),
            keys_copied: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            keys_recopied: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            keys_total: AtomicU64::new(0),
            started: Instant::now(),
            dirty: Mutex::new((VecDeque::new(), HashSet::new())),
            ours: Mutex::new(HashSet::new()),
            inflight: AtomicI64::new(0),
            hold: AtomicBool::new(false),
            holding,
            cutover_asked: AtomicBool::new(false),
            cancel: self.shutdown.child_token(),
            url_db: from.db(),
            metrics: self.metrics.clone(),
        });
        m.set_phase(Phase::Copying, "started");
        // Tracking begins before the first key is read: a write from now
        // on is copied again, whenever the copy reaches its key.
        self.policies.add_runtime(Arc::new(Tracker {
            m: m.clone(),
            tx_keys: Mutex::new(std::collections::HashMap::new()),
        }));
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(m.clone());
        let run = Run {
            m: m.clone(),
            metrics: self.metrics.clone(),
            from,
            to,
            target,
            settings: self.settings.clone(),
            ups: self.ups.clone(),
        };
        let policies = self.policies.clone();
        self.tasks.spawn(async move {
            let m = run.m.clone();
            let result = run.run().await;
            policies.remove_runtime("migration");
            // Anything held is let go, whatever happened.
            m.hold.store(false, Ordering::SeqCst);
            m.holding.send_replace(false);
            match result {
                Ok(()) => {}
                Err(e) if m.cancel.is_cancelled() => m.set_phase(Phase::Aborted, &e),
                Err(e) => m.set_phase(Phase::Failed, &e),
            }
        });
        Ok(m)
    }

    /// The current migration, if it still runs.
    fn running(&self) -> Option<Arc<Migration>> {
        self.current().filter(|m| m.phase().0.running())
    }

    /// `POST /migrations/current/cutover`.
    pub fn cutover(&self) -> Option<Arc<Migration>> {
        let m = self.running()?;
        m.cutover_asked.store(true, Ordering::Release);
        Some(m)
    }

    /// `POST /migrations/current/abort`: the target keeps what was copied;
    /// the app stays on the source.
    pub fn abort(&self) -> Option<Arc<Migration>> {
        let m = self.running()?;
        m.cancel.cancel();
        Some(m)
    }
}

/// A control connection to `e` with its URL's credentials and db.
async fn connect(e: &Endpoint, settings: &ConnSettings) -> Result<ControlConn, UpstreamError> {
    let ident = Identity {
        proto: Proto::Resp2,
        db: URL_DB,
        auth: None,
    };
    let c = conn::connect(e, &ident, None, settings).await?;
    Ok(ControlConn::new(
        c,
        settings.max_reply_bulk,
        settings.command_timeout,
        0,
    ))
}

fn cmd(parts: &[&[u8]]) -> Vec<Bytes> {
    parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
}

/// A bulk reply's payload, as a slice of it (`None`: null, not a bulk).
fn bulk(r: &Bytes) -> Option<Bytes> {
    bulk_text(r).map(|b| r.slice_ref(b))
}

struct Run {
    m: Arc<Migration>,
    metrics: crate::metrics::Metrics,
    from: Arc<Endpoint>,
    to: Arc<Endpoint>,
    target: ControlConn,
    settings: ConnSettings,
    ups: Arc<Upstreams>,
}

impl Run {
    async fn run(mut self) -> Result<(), String> {
        let mut source = connect(&self.from, &self.settings)
            .await
            .map_err(|e| format!("the source cannot be reached: {e}"))?;
        let dbs = databases(&mut source).await?;
        let total: u64 = dbs.iter().map(|(_, n)| n).sum();
        self.m.keys_total.store(total, Ordering::Relaxed);
        // The copy: every db's keys, with what was written meanwhile
        // copied again between batches.
        for &(db, _) in &dbs {
            self.select(&mut source, db).await?;
            let mut cursor = Bytes::from_static(b"0");
            loop {
                self.check()?;
                let r = source
                    .call(&[vec![
                        Bytes::from_static(b"SCAN"),
                        cursor.clone(),
                        Bytes::from_static(b"COUNT"),
                        Bytes::from(BATCH.to_string()),
                    ]])
                    .await
                    .map_err(|e| format!("SCAN on the source: {e}"))?;
                let (next, keys) = scan_reply(&r[0]).ok_or("SCAN: not an array reply")?;
                self.copy(&mut source, db, &keys, self.m.request.on_conflict, false)
                    .await?;
                // What was written meanwhile, a bounded share per batch so
                // the copy itself goes on under a busy app.
                self.sync(&mut source, BATCH * 10).await?;
                self.select(&mut source, db).await?;
                if next == b"0"[..] {
                    break;
                }
                cursor = next;
            }
        }
        self.m.set_phase(Phase::Syncing, "every key copied once");
        loop {
            self.check()?;
            self.sync(&mut source, BATCH * 10).await?;
            if self.m.request.cutover || self.m.cutover_asked.load(Ordering::Acquire) {
                match self.cutover(&mut source).await {
                    Ok(()) => return Ok(()),
                    Err(why) => {
                        self.m.cutover_asked.store(false, Ordering::Release);
                        self.m
                            .set_phase(Phase::Syncing, &format!("cutover abandoned: {why}"));
                        if self.m.request.cutover {
                            // Asked for at the start: try again shortly.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn check(&self) -> Result<(), String> {
        if self.m.cancel.is_cancelled() {
            return Err("aborted".into());
        }
        if self.m.backlog() > MAX_BACKLOG {
            return Err(format!(
                "more than {MAX_BACKLOG} keys wait to be copied again"
            ));
        }
        Ok(())
    }

    async fn select(&mut self, source: &mut ControlConn, db: i64) -> Result<(), String> {
        let select = vec![Bytes::from_static(b"SELECT"), Bytes::from(db.to_string())];
        for (side, c) in [("source", source), ("target", &mut self.target)] {
            let r = c
                .call(std::slice::from_ref(&select))
                .await
                .map_err(|e| format!("SELECT {db} on the {side}: {e}"))?;
            if is_error(&r[0]) {
                return Err(format!(
                    "SELECT {db} on the {side}: {}",
                    crate::wire::error_text(&r[0])
                ));
            }
        }
        Ok(())
    }

    /// Copy `keys` of `db` (both connections in that db): DUMP and PTTL
    /// from the source, RESTORE on the target; a key gone from the source
    /// is deleted from the target (`again`: a copy of a written key, which
    /// replaces whatever the target holds).
    async fn copy(
        &mut self,
        source: &mut ControlConn,
        db: i64,
        keys: &[Bytes],
        on_conflict: OnConflict,
        again: bool,
    ) -> Result<(), String> {
        if keys.is_empty() {
            return Ok(());
        }
        let mut reads = Vec::with_capacity(keys.len() * 2);
        for k in keys {
            reads.push(vec![Bytes::from_static(b"DUMP"), k.clone()]);
            reads.push(vec![Bytes::from_static(b"PTTL"), k.clone()]);
        }
        let got = source
            .call(&reads)
            .await
            .map_err(|e| format!("DUMP on the source (db {db}): {e}"))?;
        let mut writes = Vec::with_capacity(keys.len());
        let mut bytes = 0u64;
        for (i, k) in keys.iter().enumerate() {
            let (dump, ttl) = (&got[2 * i], integer(&got[2 * i + 1]).unwrap_or(-1));
            match bulk(dump) {
                // Gone (deleted or expired) on the source.
                None => writes.push(vec![Bytes::from_static(b"DEL"), k.clone()]),
                Some(payload) => {
                    bytes += payload.len() as u64;
                    let mut w = vec![
                        Bytes::from_static(b"RESTORE"),
                        k.clone(),
                        Bytes::from(ttl.max(0).to_string()),
                        payload,
                    ];
                    if again || on_conflict == OnConflict::Replace {
                        w.push(Bytes::from_static(b"REPLACE"));
                    }
                    writes.push(w);
                }
            }
        }
        let replies = self
            .target
            .call(&writes)
            .await
            .map_err(|e| format!("RESTORE on the target (db {db}): {e}"))?;
        for (k, r) in keys.iter().zip(&replies) {
            if r.starts_with(b"-BUSYKEY") {
                let ours = self
                    .m
                    .ours
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .contains(&(db, k.clone()));
                match on_conflict {
                    // Copied already after a write: that copy is as fresh.
                    _ if ours => continue,
                    OnConflict::Skip => continue,
                    _ => {
                        return Err(format!(
                            "a key of db {db} already exists on the target (on_conflict = fail)"
                        ));
                    }
                }
            }
            if is_error(r) {
                self.m.errors.fetch_add(1, Ordering::Relaxed);
                return Err(format!(
                    "RESTORE on the target (db {db}): {}",
                    crate::wire::error_text(r)
                ));
            }
        }
        if again {
            let mut ours = self.m.ours.lock().unwrap_or_else(PoisonError::into_inner);
            ours.extend(keys.iter().map(|k| (db, k.clone())));
        }
        let counter = if again {
            &self.m.keys_recopied
        } else {
            &self.m.keys_copied
        };
        counter.fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.m.bytes_copied.fetch_add(bytes, Ordering::Relaxed);
        self.metrics
            .migration_copied(keys.len() as u64, bytes, again);
        self.metrics.migration_backlog(self.m.backlog());
        Ok(())
    }

    /// Copy again up to `n` written keys (by db, in the order written).
    async fn sync(&mut self, source: &mut ControlConn, n: usize) -> Result<(), String> {
        let mut left = n;
        while left > 0 {
            let batch = self.m.take(BATCH.min(left));
            if batch.is_empty() {
                return Ok(());
            }
            left = left.saturating_sub(batch.len());
            let mut at = 0;
            while at < batch.len() {
                let db = batch[at].0;
                let end = batch[at..]
                    .iter()
                    .position(|(d, _)| *d != db)
                    .map_or(batch.len(), |p| at + p);
                let keys: Vec<Bytes> = batch[at..end].iter().map(|(_, k)| k.clone()).collect();
                self.select(source, db).await?;
                self.copy(source, db, &keys, OnConflict::Replace, true)
                    .await?;
                at = end;
            }
        }
        Ok(())
    }

    /// Hold writes, let those in flight finish, copy what is left, compare
    /// the key counts, switch, release.
    async fn cutover(&mut self, source: &mut ControlConn) -> Result<(), String> {
        let max_pause = Duration::from_millis(self.m.request.max_pause_ms);
        self.m.set_phase(Phase::CuttingOver, "holding writes");
        let started = Instant::now();
        self.m.holding.send_replace(true);
        self.m.hold.store(true, Ordering::SeqCst);
        let result = async {
            while self.m.inflight.load(Ordering::SeqCst) > 0 {
                if started.elapsed() > max_pause {
                    return Err(format!(
                        "writes still in flight after {} ms",
                        max_pause.as_millis()
                    ));
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            loop {
                self.sync(source, usize::MAX / 2).await?;
                if self.m.backlog() == 0 {
                    break;
                }
            }
            let dbs = databases(source).await?;
            for (db, n) in &dbs {
                self.select(source, *db).await?;
                let r = self
                    .target
                    .call(&[cmd(&[b"DBSIZE"])])
                    .await
                    .map_err(|e| format!("DBSIZE on the target: {e}"))?;
                let theirs = integer(&r[0]).unwrap_or(-1);
                let ours = i64::try_from(*n).unwrap_or(i64::MAX);
                if theirs != ours {
                    return Err(format!(
                        "db {db} has {ours} keys on the source and {theirs} on the target"
                    ));
                }
            }
            if started.elapsed() > max_pause {
                return Err(format!("the pause passed {} ms", max_pause.as_millis()));
            }
            self.ups
                .activate(self.to.name())
                .map_err(|e| format!("switching to {}: {e}", self.to.name()))?;
            // The old endpoint's connections retire: each writes the batch
            // it began and closes. Only once none is left can a released
            // write not reach the old endpoint (bounded by the command
            // timeout, as any retirement).
            let open = || {
                ["shared", "dedicated"]
                    .iter()
                    .map(|k| self.metrics.upstream_connections(self.from.name(), k).get())
                    .sum::<i64>()
            };
            let until = Instant::now() + self.settings.command_timeout;
            while open() > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Ok(())
        }
        .await;
        self.m.hold.store(false, Ordering::SeqCst);
        self.m.holding.send_replace(false);
        self.metrics.migration_pause(started.elapsed());
        result?;
        self.m.set_phase(
            Phase::Done,
            &format!(
                "switched to {} after a pause of {} ms",
                self.to.name(),
                started.elapsed().as_millis()
            ),
        );
        Ok(())
    }
}

/// The dbs that hold keys on `c`, with their key counts (`INFO keyspace`).
async fn databases(c: &mut ControlConn) -> Result<Vec<(i64, u64)>, String> {
    let r = c
        .call(&[cmd(&[b"INFO", b"keyspace"])])
        .await
        .map_err(|e| format!("INFO on the source: {e}"))?;
    let text = bulk(&r[0]).ok_or("INFO: not a bulk reply")?;
    let text = String::from_utf8_lossy(&text);
    Ok(text
        .lines()
        .filter_map(|l| {
            let (db, rest) = l.strip_prefix("db")?.split_once(':')?;
            let keys = rest.strip_prefix("keys=")?.split(',').next()?;
            Some((db.parse().ok()?, keys.parse().ok()?))
        })
        .collect())
}

/// SCAN's `[cursor, [keys...]]`.
fn scan_reply(r: &Bytes) -> Option<(Bytes, Vec<Bytes>)> {
    let outer = crate::wire::scan::split_array(r)?;
    let (cs, ce) = *outer.first()?;
    let cursor = bulk(&r.slice(cs..ce))?;
    let (ks, ke) = *outer.get(1)?;
    let inner = r.slice(ks..ke);
    let keys = crate::wire::scan::split_array(&inner)?
        .iter()
        .filter_map(|&(s, e)| bulk(&inner.slice(s..e)))
        .collect();
    Some((cursor, keys))
}
