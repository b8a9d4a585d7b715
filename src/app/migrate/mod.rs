//! Live migration from the active endpoint to another configured one: copy
//! every key (SCAN, DUMP with PTTL, RESTORE), keep the copy exact while the
//! app runs (every write that passes through the sidecar marks its keys,
//! which are copied again after its reply), then cut over: new writes are
//! held, the writes in flight finish, what is left is copied (with the
//! `cutover_rescan` patterns, the scripts and the functions), the copy is
//! verified, the active endpoint switches and the held writes go to the
//! new one. The pause is bounded (`max_pause`): past it the cutover is
//! abandoned, the held writes go on to the source and the migration stays
//! in `syncing`. After the cutover the writes are copied back to the old
//! endpoint until `finish`, so a `rollback` (the same cutover, the other
//! way) loses nothing.
//!
//! A single Redis or a Redis Cluster on either side, from one sidecar; a
//! failover's writes carried back at the failback (`carry_writes`); what
//! it does not do yet is listed in the README.

pub mod cli;
mod fleet;
mod follow;
mod rebuild;
mod run;
mod side;
mod tracker;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::policy::Policies;
use crate::upstream::UpstreamError;
use crate::upstream::endpoint::Endpoint;
use crate::upstream::failover::{SwitchHook, Upstreams};
use crate::upstream::pool::{ControlConn, Pool};
pub use tracker::Item;

/// Writes waiting to be copied again, at most; past it the migration fails
/// (its copy could no longer be kept exact), a failback carry copies every
/// key instead.
const MAX_BACKLOG: usize = 1_000_000;

/// A failback carry that failed is tried again after this.
const CARRY_RETRY: std::time::Duration = std::time::Duration::from_secs(5);

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// A failback carry: the writes on the fallback are recorded until the
    /// failed endpoint is back.
    Recording,
    Copying,
    Syncing,
    CuttingOver,
    /// Cut over; the writes are copied back until `finish`.
    Done,
    RolledBack,
    Aborted,
    Failed,
}

impl Phase {
    pub fn label(self) -> &'static str {
        match self {
            Phase::Recording => "recording",
            Phase::Copying => "copying",
            Phase::Syncing => "syncing",
            Phase::CuttingOver => "cutting_over",
            Phase::Done => "done",
            Phase::RolledBack => "rolled_back",
            Phase::Aborted => "aborted",
            Phase::Failed => "failed",
        }
    }

    const ALL: [Phase; 8] = [
        Phase::Recording,
        Phase::Copying,
        Phase::Syncing,
        Phase::CuttingOver,
        Phase::Done,
        Phase::RolledBack,
        Phase::Aborted,
        Phase::Failed,
    ];

    /// The phase of a label (a leader's record).
    fn from_label(label: &str) -> Option<Phase> {
        Phase::ALL.into_iter().find(|p| p.label() == label)
    }

    /// Before the cutover ended.
    fn before_switch(self) -> bool {
        matches!(
            self,
            Phase::Recording | Phase::Copying | Phase::Syncing | Phase::CuttingOver
        )
    }
}

/// A migration an operator asked for, or the carry of a failback.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Migrate,
    /// From a fallback to the endpoint that failed, before failing back:
    /// only the keys written on the fallback, no verification (the two
    /// sides differ by design), switched without pinning.
    Carry,
    /// Another sidecar leads the migration (its record on the source):
    /// this one marks and holds its own writes, and switches when told.
    Follow,
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
    /// Key patterns copied again (and deleted on the target where gone on
    /// the source) during the cutover: what scripts write without
    /// declaring the keys (BullMQ's).
    #[serde(default = "default_rescan")]
    pub cutover_rescan: Vec<String>,
    /// The first copy's pace, at most (0: no limit).
    #[serde(default = "default_keys_per_second")]
    pub max_keys_per_second: u64,
    #[serde(default = "default_bytes_per_second")]
    pub max_bytes_per_second: u64,
    /// Other sidecars in front of the source (their health checks seen in
    /// its `CLIENT LIST`): `join` (each must join the migration, or it
    /// fails), `ignore` (those that join take part, the others are left).
    #[serde(default = "default_others")]
    pub other_sidecars: OtherSidecars,
    /// When keys are rebuilt from their contents instead of RESTOREd.
    #[serde(default = "default_rebuild")]
    pub rebuild: Rebuild,
    /// A DUMP payload larger than this is not sent as one RESTORE: the key
    /// is rebuilt in pieces.
    #[serde(default = "default_max_restore")]
    pub max_restore_bytes: u64,
}

impl Request {
    /// Every option at its default.
    fn defaults(to: &str) -> Request {
        Request {
            to: to.to_string(),
            on_conflict: default_conflict(),
            cutover: false,
            max_pause_ms: default_pause(),
            cutover_rescan: default_rescan(),
            max_keys_per_second: default_keys_per_second(),
            max_bytes_per_second: default_bytes_per_second(),
            other_sidecars: default_others(),
            rebuild: default_rebuild(),
            max_restore_bytes: default_max_restore(),
        }
    }
}

/// What a migration does with other sidecars in front of the source:
/// their writes are marked and held by themselves once they join.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OtherSidecars {
    Join,
    Ignore,
}

fn default_others() -> OtherSidecars {
    OtherSidecars::Join
}

/// When a key is rebuilt with ordinary commands (HSET, RPUSH, XADD ...)
/// rather than RESTOREd.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Rebuild {
    /// When the target refuses the payload, or it is too large.
    Auto,
    /// Every key (e.g. between Redis and Valkey of different versions).
    Always,
    /// Never: a refused payload fails the migration.
    Never,
}

fn default_rebuild() -> Rebuild {
    Rebuild::Auto
}

fn default_max_restore() -> u64 {
    64 << 20
}

fn default_conflict() -> OnConflict {
    OnConflict::Fail
}

fn default_pause() -> u64 {
    2000
}

fn default_rescan() -> Vec<String> {
    vec!["bull:*".to_string()]
}

/// Measured (benches/migration.py --paces): on 2 cores the app's p99
/// during a small-key copy is 3.5x its baseline at 50,000 keys/s, 2.3x at
/// 20,000, 2.2x at 5,000.
fn default_keys_per_second() -> u64 {
    20_000
}

fn default_bytes_per_second() -> u64 {
    64 << 20
}

/// Why a migration could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("a migration is running")]
    Running,
    #[error("the last migration copies writes back to {0}: finish or roll it back first")]
    CopyingBack(String),
    #[error("no upstream named {0}")]
    Unknown(String),
    #[error("{0} is the active upstream")]
    Active(String),
    #[error(
        "the endpoints' URLs select different databases ({0} and {1}); each database is copied to the same number"
    )]
    Databases(i64, i64),
    #[error("the target cannot be reached: {0}")]
    Target(#[source] UpstreamError),
    #[error("the source cannot be reached: {0}")]
    Source(#[source] UpstreamError),
}

/// Why `cutover`, `abort`, `rollback` or `finish` cannot be done now.
#[derive(Debug, thiserror::Error)]
pub enum AskError {
    #[error("no migration")]
    None,
    #[error("the migration is {0}: {1}")]
    Phase(&'static str, &'static str),
    #[error("this sidecar follows the migration led by {0}: ask that one")]
    Follower(String),
}

/// What the operator asked of a running migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ask {
    Cutover,
    Rollback,
    Finish,
}

/// The writes to copy again, in the order written, each key once.
#[derive(Default)]
struct Backlog {
    queue: VecDeque<Item>,
    seen: HashSet<Item>,
    /// When each key was last taken to be copied: a key written over and
    /// over (a queue's event stream) is copied at most once per
    /// [`RECOPY_EVERY`] before the cutover, not after every write.
    taken: std::collections::HashMap<Item, Instant>,
}

/// A key written again is copied again at most this often before the
/// cutover (which copies everything left at once).
const RECOPY_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Backlog {
    /// Up to `n` items, in the order written; `all`: every key however
    /// recently it was copied (the cutover), else keys taken within
    /// [`RECOPY_EVERY`] wait (at the back).
    fn take(&mut self, n: usize, all: bool, now: Instant) -> Vec<Item> {
        let Backlog { queue, seen, taken } = self;
        let mut out = Vec::new();
        let mut later = Vec::new();
        for _ in 0..queue.len() {
            if out.len() >= n {
                break;
            }
            let Some(item) = queue.pop_front() else {
                break;
            };
            let recent = taken
                .get(&item)
                .is_some_and(|t| now.duration_since(*t) < RECOPY_EVERY);
            if recent && !all && matches!(item, Item::Key(..)) {
                later.push(item);
                continue;
            }
            seen.remove(&item);
            if matches!(item, Item::Key(..)) {
                taken.insert(item.clone(), now);
            }
            out.push(item);
        }
        queue.extend(later);
        if taken.len() > 100_000 {
            taken.retain(|_, t| now.duration_since(*t) < RECOPY_EVERY);
        }
        out
    }
}

/// One migration: its state, counters and the writes to copy again.
pub struct Migration {
    pub from: String,
    pub to: String,
    pub kind: Kind,
    /// The record's id on the source (a follower: the leader's).
    id: String,
    /// The sidecars taking part: a follower's leader, a leader's
    /// followers (as last seen).
    leader: Mutex<Option<String>>,
    followers: Mutex<Vec<String>>,
    /// Each follower's epoch when first seen.
    epochs: Mutex<std::collections::HashMap<String, String>>,
    request: Request,
    /// A carry's backlog passed [`MAX_BACKLOG`]: the carry copies every
    /// key of the fallback instead.
    overflowed: AtomicBool,
    /// A carry's copy runs (a failback waits for it).
    carrying: AtomicBool,
    /// A failed carry is tried again from then on.
    retry_at: Mutex<Option<Instant>>,
    phase: Mutex<(Phase, String)>,
    pub keys_copied: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub keys_recopied: AtomicU64,
    pub keys_copied_back: AtomicU64,
    /// Keys rebuilt from their contents (a refused or too large payload).
    pub keys_rebuilt: AtomicU64,
    pub errors: AtomicU64,
    keys_total: AtomicU64,
    scripts_loaded: AtomicU64,
    /// Times the copy slowed down because the source did.
    backoffs: AtomicU64,
    pause_ms: AtomicU64,
    started: Instant,
    backlog: Mutex<Backlog>,
    /// Keys the migration itself wrote to the target after a write: a
    /// conflict with one of them is not the target's own key.
    ours: Mutex<HashSet<(i64, Bytes)>>,
    /// Script bodies seen (and their total size), for the target.
    scripts: Mutex<(HashSet<Bytes>, usize)>,
    /// Writes let through whose reply has not come yet.
    inflight: AtomicI64,
    /// `true` while a cutover holds new writes: `hold` for the check on
    /// every write, `holding` to wait on.
    hold: AtomicBool,
    holding: watch::Sender<bool>,
    ask: Mutex<Option<Ask>>,
    /// Writes are copied back to the old endpoint (after the cutover).
    copy_back: AtomicBool,
    cancel: CancellationToken,
    /// The db a client that never selected one uses (the URLs').
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

    /// Still at work: before the switch, or copying back after it.
    fn running(&self) -> bool {
        self.phase().0.before_switch() || self.copy_back.load(Ordering::Acquire)
    }

    pub fn backlog(&self) -> usize {
        self.backlog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .queue
            .len()
    }

    /// `GET /migrations/current`.
    pub fn status(&self) -> serde_json::Value {
        let (phase, reason) = self.phase();
        let copied = self.keys_copied.load(Ordering::Relaxed);
        let total = self.keys_total.load(Ordering::Relaxed);
        let secs = self.started.elapsed().as_secs_f64().max(0.001);
        let leader = self
            .leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let followers = self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        serde_json::json!({
            "kind": match self.kind { Kind::Migrate => "migration", Kind::Carry => "failback_carry", Kind::Follow => "follower" },
            "leader": leader,
            "followers": followers,
            "from": self.from,
            "to": self.to,
            "phase": phase.label(),
            "reason": reason,
            "keys_copied": copied,
            "bytes_copied": self.bytes_copied.load(Ordering::Relaxed),
            "keys_recopied": self.keys_recopied.load(Ordering::Relaxed),
            "keys_copied_back": self.keys_copied_back.load(Ordering::Relaxed),
            "keys_rebuilt": self.keys_rebuilt.load(Ordering::Relaxed),
            "keys_total_estimate": total,
            // Past the first copy (or a copy again after a pause), none.
            "keys_left_estimate": if phase == Phase::Copying { total.saturating_sub(copied) } else { 0 },
            "keys_per_second": (copied as f64 / secs).round(),
            "elapsed_seconds": (secs * 10.0).round() / 10.0,
            "backlog": self.backlog(),
            "errors": self.errors.load(Ordering::Relaxed),
            "backoffs": self.backoffs.load(Ordering::Relaxed),
            "scripts_loaded": self.scripts_loaded.load(Ordering::Relaxed),
            "cutover_pause_ms": self.pause_ms.load(Ordering::Relaxed),
            "copy_back": self.copy_back.load(Ordering::Acquire),
        })
    }

    /// A write changed `item`: copy it again. A flush drops what was
    /// queued for its dbs (gone anyway), so a key written after it is
    /// queued after it.
    fn mark(&self, item: Item) {
        let mut b = self.backlog.lock().unwrap_or_else(PoisonError::into_inner);
        let Backlog { queue, seen, .. } = &mut *b;
        if self.overflowed.load(Ordering::Relaxed) {
            // Every key is copied anyway.
            return;
        }
        match &item {
            Item::Key(..) => {
                if self.kind == Kind::Carry && queue.len() >= MAX_BACKLOG {
                    queue.clear();
                    seen.clear();
                    self.overflowed.store(true, Ordering::Relaxed);
                    tracing::warn!(from = %self.from, "failback carry: more than {MAX_BACKLOG} keys written on the fallback; every key of it will be copied");
                    return;
                }
                if seen.insert(item.clone()) {
                    queue.push_back(item);
                }
            }
            Item::FlushDb(db) => {
                queue.retain(|i| !matches!(i, Item::Key(d, _) if d == db));
                seen.retain(|i| !matches!(i, Item::Key(d, _) if d == db));
                queue.push_back(item);
            }
            Item::FlushAll => {
                queue.clear();
                seen.clear();
                queue.push_back(item);
            }
        }
    }

    fn take(&self, n: usize, all: bool) -> Vec<Item> {
        self.backlog
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take(n, all, Instant::now())
    }

    /// A script body a client sent (EVAL, SCRIPT LOAD): loaded on the
    /// target before the cutover.
    fn remember_script(&self, body: &Bytes) {
        let mut s = self.scripts.lock().unwrap_or_else(PoisonError::into_inner);
        let (set, bytes) = &mut *s;
        if set.len() < tracker::MAX_SCRIPTS
            && *bytes + body.len() <= tracker::MAX_SCRIPT_BYTES
            && set.insert(body.clone())
        {
            *bytes += body.len();
        }
    }

    /// Let held writes go.
    fn release(&self) {
        self.hold.store(false, Ordering::SeqCst);
        self.holding.send_replace(false);
    }

    /// Hold new writes (a write sees the hold, or is counted in flight).
    fn hold(&self) {
        self.holding.send_replace(true);
        self.hold.store(true, Ordering::SeqCst);
    }

    fn asked(&self) -> Option<Ask> {
        *self.ask.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The followers as the leader last saw them; each one's first epoch
    /// kept.
    fn see_followers(&self, members: &[(String, Option<fleet::Beat>)]) {
        let mut epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
        for (id, beat) in members {
            if let Some(b) = beat {
                epochs.entry(id.clone()).or_insert_with(|| b.epoch.clone());
            }
        }
        *self
            .followers
            .lock()
            .unwrap_or_else(PoisonError::into_inner) =
            members.iter().map(|(id, _)| id.clone()).collect();
    }

    /// Whether `id` follows with another epoch than when first seen (it
    /// stopped following for a while).
    fn epoch_changed(&self, id: &str, epoch: &str) -> bool {
        let mut epochs = self.epochs.lock().unwrap_or_else(PoisonError::into_inner);
        let first = epochs
            .entry(id.to_string())
            .or_insert_with(|| epoch.to_string());
        first != epoch
    }

    fn leader_name(&self) -> String {
        self.leader
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .unwrap_or_default()
    }

    fn clear_ask(&self) {
        *self.ask.lock().unwrap_or_else(PoisonError::into_inner) = None;
    }
}

/// A record's id: unique enough among the migrations of one source.
fn new_id() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    format!("{:x}-{:x}", nanos, std::process::id())
}

/// Starts migrations and holds the current one.
pub struct Migrator {
    ups: Arc<Upstreams>,
    metrics: crate::metrics::Metrics,
    policies: Arc<Policies>,
    pool: Arc<Pool>,
    tasks: TaskTracker,
    shutdown: CancellationToken,
    current: Mutex<Option<Arc<Migration>>>,
}

impl Migrator {
    pub fn new(
        ups: Arc<Upstreams>,
        metrics: crate::metrics::Metrics,
        policies: Arc<Policies>,
        pool: Arc<Pool>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Migrator {
        Migrator {
            ups,
            metrics,
            policies,
            pool,
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
        if let Some(m) = self.current().filter(|m| m.running()) {
            return Err(if m.phase().0.before_switch() {
                StartError::Running
            } else {
                StartError::CopyingBack(m.from.clone())
            });
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
        if from.db() != to.db() {
            return Err(StartError::Databases(from.db(), to.db()));
        }
        // Both sides must answer before anything starts.
        let target = side::connect(&self.pool, &to)
            .await
            .map_err(StartError::Target)?;
        let mut source = side::connect(&self.pool, &from)
            .await
            .map_err(StartError::Source)?;
        // The other sidecars in front of the source: each joins (or the
        // migration fails, unless asked to ignore them).
        let others = side::other_sidecars(&mut source, &self.ups.instance).await;
        if others.is_none() {
            tracing::warn!(
                from = %from.name(),
                "the source refuses CLIENT LIST: other sidecars in front of it cannot be seen"
            );
        }
        let m = self.begin(
            Kind::Migrate,
            req,
            &from,
            &to,
            (Phase::Copying, "started"),
            None,
        );
        self.spawn(m.clone(), from, to, Some((source, target, others)));
        Ok(m)
    }

    /// A migration's record, made current, with its tracking stage added:
    /// a write from now on is copied again, whenever the copy reaches its
    /// key.
    fn begin(
        &self,
        kind: Kind,
        request: Request,
        from: &Arc<Endpoint>,
        to: &Arc<Endpoint>,
        (phase, why): (Phase, &str),
        id: Option<String>,
    ) -> Arc<Migration> {
        let (holding, _) = watch::channel(false);
        let m = Arc::new(Migration {
            from: from.name().to_string(),
            to: to.name().to_string(),
            kind,
            id: id.unwrap_or_else(new_id),
            leader: Mutex::new(None),
            followers: Mutex::new(Vec::new()),
            epochs: Mutex::new(std::collections::HashMap::new()),
            request,
            overflowed: AtomicBool::new(false),
            carrying: AtomicBool::new(false),
            retry_at: Mutex::new(None),
            phase: Mutex::new((phase, String::new())),
            keys_copied: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            keys_recopied: AtomicU64::new(0),
            keys_copied_back: AtomicU64::new(0),
            keys_rebuilt: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            keys_total: AtomicU64::new(0),
            scripts_loaded: AtomicU64::new(0),
            backoffs: AtomicU64::new(0),
            pause_ms: AtomicU64::new(0),
            started: Instant::now(),
            backlog: Mutex::new(Backlog::default()),
            ours: Mutex::new(HashSet::new()),
            scripts: Mutex::new((HashSet::new(), 0)),
            inflight: AtomicI64::new(0),
            hold: AtomicBool::new(false),
            holding,
            ask: Mutex::new(None),
            copy_back: AtomicBool::new(false),
            cancel: self.shutdown.child_token(),
            url_db: from.db(),
            metrics: self.metrics.clone(),
        });
        m.set_phase(phase, why);
        self.policies
            .add_runtime(Arc::new(tracker::Tracker::new(m.clone())));
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) = Some(m.clone());
        m
    }

    /// Run `m`'s copy on a task of its own (`conns`: the source's and the
    /// target's connections, made already; else made there).
    fn spawn(
        &self,
        m: Arc<Migration>,
        from: Arc<Endpoint>,
        to: Arc<Endpoint>,
        conns: Option<(ControlConn, ControlConn, Option<Vec<side::Other>>)>,
    ) {
        let done = CancellationToken::new();
        let run = run::Run {
            m: m.clone(),
            metrics: self.metrics.clone(),
            from,
            to,
            conns,
            pool: self.pool.clone(),
            ups: self.ups.clone(),
            tasks: self.tasks.clone(),
            done: done.clone(),
        };
        let policies = self.policies.clone();
        self.tasks.spawn(async move {
            // The record on the source says how it ended once this ends.
            let _done = done.drop_guard();
            let result = run.run().await;
            // Anything held is let go, whatever happened.
            m.release();
            m.copy_back.store(false, Ordering::Release);
            m.carrying.store(false, Ordering::Release);
            if let Err(e) = &result
                && m.kind == Kind::Carry
                && !m.cancel.is_cancelled()
                && m.phase().0 != Phase::Failed
            {
                // The fallback still takes the writes: keep recording, and
                // try again shortly.
                *m.retry_at.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(Instant::now() + CARRY_RETRY);
                m.set_phase(
                    Phase::Recording,
                    &format!(
                        "the carry failed, tried again in {} s: {e}",
                        CARRY_RETRY.as_secs()
                    ),
                );
                return;
            }
            policies.remove_runtime("migration");
            if let Err(e) = result {
                let p = m.phase().0;
                if !p.before_switch() {
                    // Cut over already: the app runs on the target; only
                    // the copy back stopped.
                    m.set_phase(p, &format!("copying back stopped: {e}"));
                } else if m.cancel.is_cancelled() {
                    m.set_phase(Phase::Aborted, &e);
                } else {
                    m.set_phase(Phase::Failed, &e);
                }
            }
        });
    }

    fn ask(&self, ask: Ask) -> Result<Arc<Migration>, AskError> {
        let m = self.current().ok_or(AskError::None)?;
        let p = m.phase().0;
        let copying_back = m.copy_back.load(Ordering::Acquire);
        if m.kind == Kind::Follow {
            return Err(AskError::Follower(m.leader_name()));
        }
        if m.kind == Kind::Carry {
            return Err(AskError::Phase(
                p.label(),
                "a failback carry cuts over by itself when the failed endpoint is back",
            ));
        }
        let ok = match ask {
            Ask::Cutover => p.before_switch(),
            Ask::Rollback | Ask::Finish => copying_back,
        };
        if !ok {
            let what = match ask {
                Ask::Cutover => "a cutover needs a migration that has not cut over",
                Ask::Rollback | Ask::Finish => {
                    "rollback and finish need a cut-over migration that still copies writes back"
                }
            };
            return Err(AskError::Phase(p.label(), what));
        }
        *m.ask.lock().unwrap_or_else(PoisonError::into_inner) = Some(ask);
        Ok(m)
    }

    /// `POST /migrations/current/cutover`.
    pub fn cutover(&self) -> Result<Arc<Migration>, AskError> {
        self.ask(Ask::Cutover)
    }

    /// `POST /migrations/current/rollback`: back to the old endpoint, the
    /// writes since the cutover with it.
    pub fn rollback(&self) -> Result<Arc<Migration>, AskError> {
        self.ask(Ask::Rollback)
    }

    /// `POST /migrations/current/finish`: stop copying writes back.
    pub fn finish(&self) -> Result<Arc<Migration>, AskError> {
        self.ask(Ask::Finish)
    }

    /// `POST /migrations/current/abort`: the target keeps what was copied;
    /// the app stays on the source.
    pub fn abort(&self) -> Result<Arc<Migration>, AskError> {
        let m = self.current().ok_or(AskError::None)?;
        let p = m.phase().0;
        if m.kind == Kind::Follow {
            return Err(AskError::Follower(m.leader_name()));
        }
        if !p.before_switch() {
            return Err(AskError::Phase(
                p.label(),
                "cut over already: finish or roll back instead",
            ));
        }
        m.cancel.cancel();
        if m.kind == Kind::Carry && !m.carrying.load(Ordering::Acquire) {
            // Recording, no copy running: stop here.
            self.policies.remove_runtime("migration");
            m.set_phase(
                Phase::Aborted,
                "aborted: the writes on the fallback are not carried",
            );
        }
        Ok(m)
    }
}

impl Migrator {
    /// Whether writes on a fallback are recorded for the failback.
    fn carrying_writes(&self, from: &Endpoint, to: &Endpoint) -> bool {
        self.ups.failover_config().carry_writes
            && from.cluster.is_none()
            && to.cluster.is_none()
            && from.db() == to.db()
    }
}

impl SwitchHook for Migrator {
    fn failing_over(&self, from: &Arc<Endpoint>, to: &Arc<Endpoint>) {
        if let Some(m) = self.current().filter(|m| m.running()) {
            if m.kind == Kind::Carry && m.from == from.name() {
                // The fallback failed too: what it took is out of reach.
                m.cancel.cancel();
                self.policies.remove_runtime("migration");
                m.set_phase(
                    Phase::Failed,
                    &format!(
                        "the fallback {} went down too; its writes stay there",
                        from.name()
                    ),
                );
            } else {
                // A migration meets its source or target failing by itself.
                return;
            }
        }
        if !self.carrying_writes(from, to) {
            return;
        }
        let request = Request {
            on_conflict: OnConflict::Replace,
            cutover: true,
            max_keys_per_second: 0,
            max_bytes_per_second: 0,
            other_sidecars: OtherSidecars::Ignore,
            ..Request::defaults(from.name())
        };
        self.begin(
            Kind::Carry,
            request,
            to,
            from,
            (
                Phase::Recording,
                &format!(
                    "{} is down: the keys written on {} are recorded for the failback",
                    from.name(),
                    to.name()
                ),
            ),
            None,
        );
    }

    fn failback(&self, from: &Arc<Endpoint>, to: &Arc<Endpoint>) -> bool {
        let Some(m) = self
            .current()
            .filter(|m| m.kind == Kind::Carry && m.phase().0.before_switch())
        else {
            return false;
        };
        if m.from != from.name() || m.to != to.name() {
            // Recorded for another pair: fail back as usual.
            return false;
        }
        if m.carrying.swap(true, Ordering::AcqRel) {
            return true;
        }
        let due = m
            .retry_at
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_none_or(|t| Instant::now() >= t);
        if !due {
            m.carrying.store(false, Ordering::Release);
            return true;
        }
        m.set_phase(
            Phase::Copying,
            &format!(
                "{} is back: copying the writes made on {}",
                to.name(),
                from.name()
            ),
        );
        self.spawn(m, from.clone(), to.clone(), None);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metric's labels (the metrics layer cannot see `Phase`) are the
    /// phases' own.
    #[test]
    fn the_phase_metric_knows_every_phase() {
        let labels: Vec<&str> = Phase::ALL.iter().map(|p| p.label()).collect();
        assert_eq!(labels, crate::metrics::MIGRATION_PHASES);
    }

    #[test]
    fn a_key_written_over_and_over_waits_its_turn_until_the_cutover() {
        let mut b = Backlog::default();
        let k = Item::Key(0, Bytes::from_static(b"events"));
        let other = Item::Key(0, Bytes::from_static(b"other"));
        let t0 = Instant::now();
        for item in [&k, &other] {
            b.seen.insert(item.clone());
            b.queue.push_back(item.clone());
        }
        assert_eq!(b.take(10, false, t0), vec![k.clone(), other.clone()]);
        // Written again at once: it waits, still queued once.
        b.seen.insert(k.clone());
        b.queue.push_back(k.clone());
        assert!(b.take(10, false, t0 + RECOPY_EVERY / 2).is_empty());
        assert_eq!(b.queue.len(), 1);
        // Its turn comes after RECOPY_EVERY, or at once for the cutover.
        assert_eq!(b.take(10, true, t0 + RECOPY_EVERY / 2), vec![k.clone()]);
        b.seen.insert(k.clone());
        b.queue.push_back(k.clone());
        assert_eq!(b.take(10, false, t0 + RECOPY_EVERY * 2), vec![k]);
    }
}
