//! The migration's worker: the first copy, the copies after writes, the
//! cutover (and a rollback, the same the other way), the copy back.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fleet::{self, Mark, State};
use super::side::{Other, Side, bulk, cmd, connect, other_sidecars, scan_reply};
use super::{Ask, Item, Kind, MAX_BACKLOG, Migration, OnConflict, OtherSidecars, Phase, Rebuild};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::failover::{Active, Upstreams};
use crate::upstream::pool::{ControlConn, Pool};
use crate::wire::resp::integer;
use crate::wire::{error_text, is_error};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// `sync`'s `n` for everything (the cutover): keys copied a moment ago
/// too.
const ALL: usize = usize::MAX / 2;
/// Keys copied per SCAN step and per pipelined batch.
const BATCH: usize = 100;
/// Keys compared per db when a cutover verifies the copy.
const SAMPLE: usize = 16;

/// The migration's task, until it has a connection to the source.
pub(super) struct Run {
    pub m: Arc<Migration>,
    pub metrics: crate::metrics::Metrics,
    pub from: Arc<Endpoint>,
    pub to: Arc<Endpoint>,
    /// Connections to the source and the target made already, with the
    /// other sidecars seen on the source (`None`: made here).
    pub conns: Option<(ControlConn, ControlConn, Option<Vec<Other>>)>,
    pub pool: Arc<Pool>,
    pub ups: Arc<Upstreams>,
    pub tasks: TaskTracker,
    /// Cancelled once the migration ended (its record then says how).
    pub done: CancellationToken,
}

impl Run {
    pub async fn run(self) -> Result<(), String> {
        let (source, target, others) = match self.conns {
            Some(c) => c,
            None => (
                connect(&self.pool, &self.from)
                    .await
                    .map_err(|e| format!("the source cannot be reached: {e}"))?,
                connect(&self.pool, &self.to)
                    .await
                    .map_err(|e| format!("the target cannot be reached: {e}"))?,
                None,
            ),
        };
        let (tasks, done) = (self.tasks, self.done);
        let mut c = Copier {
            m: self.m,
            metrics: self.metrics,
            src: Side::new(self.from, source, "source"),
            dst: Side::new(self.to, target, "target"),
            pool: self.pool,
            ups: self.ups,
            target_empty: None,
            scripts_loaded: HashSet::new(),
            lead: None,
        };
        if c.m.kind == Kind::Migrate {
            // A source lost this early aborts the migration too.
            if let Err(e) = c.lead(others.unwrap_or_default(), &tasks, done).await {
                return Err(c.source_lost(e));
            }
        }
        c.run().await
    }
}

fn names(others: &[Other]) -> String {
    others
        .iter()
        .map(Other::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The leader's part in a migration of several sidecars.
struct Lead {
    /// The last hold asked for.
    hold: u64,
}

/// The record's fields the leader refreshes.
fn record_fields(m: &Migration, leader: &str) -> Vec<(&'static str, String)> {
    let (phase, reason) = m.phase();
    vec![
        ("id", m.id.clone()),
        ("leader", leader.to_string()),
        ("from", m.from.clone()),
        ("to", m.to.clone()),
        ("max_pause_ms", m.request.max_pause_ms.to_string()),
        ("phase", phase.label().to_string()),
        ("reason", reason),
        (
            "keys_copied",
            m.keys_copied.load(Ordering::Relaxed).to_string(),
        ),
        (
            "keys_total",
            m.keys_total.load(Ordering::Relaxed).to_string(),
        ),
    ]
}

/// A mark a follower pushed, taken as this sidecar's own.
fn apply(m: &Migration, mark: Mark) {
    match mark {
        Mark::Item(item) => m.mark(item),
        Mark::Script(body) => m.remember_script(&body),
    }
}

/// The leader's heartbeat, on a connection of its own: the record
/// refreshed every [`fleet::BEAT`], the followers' marks drained and
/// their heartbeats read; once `done`, the record says how it ended.
async fn beat(
    m: Arc<Migration>,
    pool: Arc<Pool>,
    from: Arc<Endpoint>,
    leader: String,
    done: CancellationToken,
) {
    let mut conn: Option<ControlConn> = None;
    loop {
        let finished = tokio::select! {
            _ = done.cancelled() => true,
            _ = tokio::time::sleep(fleet::BEAT) => false,
        };
        if conn.is_none() {
            conn = super::side::connect_as(&pool, &from, fleet::CLIENT_NAME)
                .await
                .ok();
        }
        let Some(c) = conn.as_mut() else {
            if finished {
                return;
            }
            continue;
        };
        let fields = record_fields(&m, &leader);
        if finished {
            if let Err(e) = fleet::end(c, &fields).await {
                tracing::warn!(error = %e, "migration: the record's end was not written (it expires by itself)");
            }
            return;
        }
        let r = async {
            fleet::refresh(c, &fields).await?;
            for mark in fleet::drain(c).await? {
                apply(&m, mark);
            }
            let members = fleet::members(c).await?;
            m.see_followers(&members);
            Ok::<_, fleet::FleetError>(())
        }
        .await;
        if let Err(e) = r {
            tracing::debug!(error = %e, "migration: the record's refresh");
            if matches!(e, fleet::FleetError::Conn(_)) {
                conn = None;
            }
        }
    }
}

/// Once the retired endpoint's connections stopped writing (each stops at
/// its next batch; its replies still come back, its blocked commands
/// wait): only then can a released write not reach the old endpoint.
/// Bounded by the command timeout.
pub(super) async fn retired(old: &Active, timeout: Duration) {
    let until = Instant::now() + timeout;
    while old.writers.load(Ordering::SeqCst) > 0 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Which way keys go: source to target, or (after the cutover) back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Forward,
    Back,
}

/// Why a key is copied.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Why {
    /// The first copy.
    First,
    /// Again, after a write (or a rescan): replaces what is there.
    Again,
}

/// The first copy's pace: keys and bytes per second, and backing off when
/// the source answers much slower than it did.
struct Pace {
    start: Instant,
    keys: u64,
    bytes: u64,
    fastest: Option<Duration>,
}

impl Pace {
    /// How long to wait after a batch of `keys` and `bytes` whose source
    /// reads took `took`; `true` with it when the source slowed down.
    fn after(
        &mut self,
        keys: u64,
        bytes: u64,
        took: Duration,
        kps: u64,
        bps: u64,
    ) -> (Duration, bool) {
        self.keys += keys;
        self.bytes += bytes;
        let fastest = *self.fastest.get_or_insert(took);
        self.fastest = Some(fastest.min(took));
        let due = |n: u64, per_s: u64| {
            if per_s == 0 {
                Duration::ZERO
            } else {
                Duration::from_secs_f64(n as f64 / per_s as f64)
            }
        };
        let paced = due(self.keys, kps)
            .max(due(self.bytes, bps))
            .saturating_sub(self.start.elapsed());
        // Eight times its best and 5 ms more: the source is busy (the
        // app's load, or this copy's); give it the time the batch took.
        let slow = took > fastest * 8 + Duration::from_millis(5);
        let back_off = if slow {
            took.min(Duration::from_secs(1))
        } else {
            Duration::ZERO
        };
        (paced.max(back_off), slow)
    }
}

struct Copier {
    m: Arc<Migration>,
    metrics: crate::metrics::Metrics,
    src: Side,
    dst: Side,
    pool: Arc<Pool>,
    ups: Arc<Upstreams>,
    /// The dbs that held no key on the target when the copy began: there,
    /// the cutover's key counts must be equal.
    target_empty: Option<HashSet<i64>>,
    /// Script bodies already loaded on the side the app goes to.
    scripts_loaded: HashSet<Bytes>,
    /// Leading other sidecars (the record on the source was written).
    lead: Option<Lead>,
}

impl Copier {
    /// Write the record on the source, start its heartbeat, and wait for
    /// the other sidecars seen there to join. A source that refuses the
    /// record is fine while no other sidecar uses it.
    async fn lead(
        &mut self,
        others: Vec<Other>,
        tasks: &TaskTracker,
        done: CancellationToken,
    ) -> Result<(), String> {
        let leader = String::from_utf8_lossy(&self.ups.instance).into_owned();
        let fields = record_fields(&self.m, &leader);
        let from = self.m.from.clone();
        let c = self.fleet_conn().await?;
        // Another sidecar started one from this source a moment ago (before
        // this one could see it and follow): the first one leads.
        if let Ok(Some(rec)) = fleet::read_record(c).await
            && rec.state != State::End
            && rec.leader != leader
        {
            return Err(format!(
                "the sidecar {} leads a migration from this source ({} to {}); this one follows it instead",
                rec.leader, rec.from, rec.to
            ));
        }
        let made = fleet::create(c, &fields, &from).await;
        if let Err(e) = made {
            if others.is_empty() {
                tracing::warn!(error = %e, "migration: no record on the source; a sidecar started during the migration will not join it");
                return Ok(());
            }
            return Err(format!(
                "other sidecars use the source ({}), and the record they would follow cannot be written: {e}",
                names(&others)
            ));
        }
        self.lead = Some(Lead { hold: 0 });
        tasks.spawn(beat(
            self.m.clone(),
            self.pool.clone(),
            self.src.ep.clone(),
            leader,
            done,
        ));
        if others.is_empty() {
            return Ok(());
        }
        self.m.set_phase(
            Phase::Copying,
            &format!("waiting for {} other sidecars to join", others.len()),
        );
        let until = Instant::now() + fleet::JOIN_WAIT;
        loop {
            self.check()?;
            let missing = self.not_joined().await?;
            if missing.is_empty() {
                break;
            }
            if Instant::now() > until {
                let why = format!(
                    "{} did not join the migration within {} s (a sidecar of an older version, or one without an upstream named {})",
                    names(&missing),
                    fleet::JOIN_WAIT.as_secs(),
                    self.m.to
                );
                if self.m.request.other_sidecars == OtherSidecars::Join {
                    return Err(format!(
                        "{why}; send \"other_sidecars\": \"ignore\" to go on without them"
                    ));
                }
                tracing::warn!("migration: {why}; going on without them (other_sidecars = ignore)");
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.m.set_phase(Phase::Copying, "started");
        Ok(())
    }

    /// `e`, and when it is the source's connection that failed, the
    /// migration aborted with that reason (the app stays on the source).
    fn source_lost(&self, e: String) -> String {
        if !self.src.lost {
            return e;
        }
        self.m.cancel.cancel();
        format!("the source was lost: {e}")
    }

    /// The source's connection, in the db the record is in.
    async fn fleet_conn(&mut self) -> Result<&mut ControlConn, String> {
        self.src.select(self.m.url_db).await?;
        Ok(&mut self.src.conn)
    }

    /// The other sidecars in front of the source that are not following
    /// (with a heartbeat, or saying they cannot).
    async fn not_joined(&mut self) -> Result<Vec<Other>, String> {
        let me = self.ups.instance.clone();
        let c = self.fleet_conn().await?;
        let others = other_sidecars(c, &me).await.unwrap_or_default();
        let members = fleet::members(c).await.map_err(|e| e.to_string())?;
        self.m.see_followers(&members);
        Ok(others
            .into_iter()
            .filter(|o| {
                !members
                    .iter()
                    .any(|(id, beat)| *id == o.name && beat.is_some())
            })
            .collect())
    }

    /// While the leader holds its writes: ask every follower to hold, and
    /// wait until each does (its marks pushed), then take their marks.
    /// Fails (the cutover is abandoned) on a follower that stopped
    /// heartbeating with its connections still open, that stopped
    /// following for a while, or that cannot take part, and on another
    /// sidecar that did not join.
    async fn hold_followers(
        &mut self,
        started: Instant,
        max_pause: Duration,
    ) -> Result<(), String> {
        let Some(lead) = self.lead.as_mut() else {
            return Ok(());
        };
        lead.hold += 1;
        let n = lead.hold;
        let me = self.ups.instance.clone();
        let join = self.m.request.other_sidecars == OtherSidecars::Join;
        let m = self.m.clone();
        let c = self.fleet_conn().await?;
        fleet::set_state(c, State::Hold, n, None)
            .await
            .map_err(|e| e.to_string())?;
        loop {
            let members = fleet::members(c).await.map_err(|e| e.to_string())?;
            let others = other_sidecars(c, &me).await;
            let open = |id: &str| {
                others
                    .as_ref()
                    .is_none_or(|o| o.iter().any(|o| o.name == id))
            };
            let mut waiting = Vec::new();
            for (id, beat) in &members {
                let Some(beat) = beat else {
                    if open(id) {
                        return Err(format!(
                            "the sidecar {id} stopped heartbeating, and its connections are still open on the source"
                        ));
                    }
                    // Gone: no heartbeat and no connection left to write
                    // with.
                    tracing::info!(sidecar = %id, "migration: a follower left");
                    fleet::forget(c, id).await.map_err(|e| e.to_string())?;
                    continue;
                };
                if m.epoch_changed(id, &beat.epoch) {
                    return Err(format!(
                        "the sidecar {id} stopped following the migration for a while (the writes it passed then are not known): abort and start again"
                    ));
                }
                match &beat.says {
                    fleet::Says::Held(h) if *h == n => {}
                    fleet::Says::Cannot(why) => {
                        return Err(format!("the sidecar {id} cannot take part: {why}"));
                    }
                    _ => waiting.push(id.clone()),
                }
            }
            if join
                && let Some(o) = others
                    .iter()
                    .flatten()
                    .find(|o| !members.iter().any(|(id, _)| *id == o.name))
            {
                return Err(format!(
                    "the sidecar {o} uses the source and has not joined the migration"
                ));
            }
            if waiting.is_empty() {
                break;
            }
            if started.elapsed() > max_pause {
                return Err(format!(
                    "{} did not hold their writes within max_pause_ms {}",
                    waiting.join(", "),
                    max_pause.as_millis()
                ));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        for mark in fleet::drain(c).await.map_err(|e| e.to_string())? {
            apply(&m, mark);
        }
        Ok(())
    }

    /// Tell the followers where the apps are now (`Some`), or to let their
    /// writes go on where they were (`None`, an abandoned cutover).
    async fn release_followers(&mut self, on: Option<&str>) -> Result<(), String> {
        let Some(n) = self.lead.as_ref().map(|l| l.hold) else {
            return Ok(());
        };
        let c = self.fleet_conn().await?;
        fleet::set_state(c, State::Run, n, on)
            .await
            .map_err(|e| e.to_string())
    }

    fn sides(&mut self, dir: Dir) -> (&mut Side, &mut Side) {
        match dir {
            Dir::Forward => (&mut self.src, &mut self.dst),
            Dir::Back => (&mut self.dst, &mut self.src),
        }
    }

    /// The migration, paused while the target cannot be reached and
    /// resumed once it answers (from the syncing phase if it kept its data,
    /// else with the copy again); a lost source aborts it (the app stays on
    /// the source).
    async fn run(&mut self) -> Result<(), String> {
        let target_id = self.dst.run_id().await?;
        let mut resume = None;
        loop {
            let Err(e) = self.run_once(resume).await else {
                return Ok(());
            };
            let (phase, _) = self.m.phase();
            if self.src.lost && phase.before_switch() && self.m.kind == Kind::Migrate {
                return Err(self.source_lost(e));
            }
            if !(self.dst.lost && phase.before_switch() && self.m.kind == Kind::Migrate) {
                return Err(e);
            }
            let phase = if phase == Phase::CuttingOver {
                Phase::Syncing
            } else {
                phase
            };
            self.m.set_phase(
                phase,
                &format!(
                    "paused: the target cannot be reached ({e}); the copy goes on once it answers"
                ),
            );
            loop {
                self.check()?;
                tokio::time::sleep(Duration::from_secs(1)).await;
                if self.dst.reconnect(&self.pool).await.is_ok() {
                    break;
                }
            }
            let same = self.dst.run_id().await? == target_id;
            // Restarted: what it had may be gone, so all is copied again.
            resume = Some(same && phase == Phase::Syncing);
            self.m.set_phase(
                phase,
                if same {
                    "resumed: the target answers again"
                } else {
                    "resumed: the target restarted; copying every key again"
                },
            );
        }
    }

    /// One go (`resume`: after a pause, `Some(true)` at the syncing phase,
    /// `Some(false)` with every key copied again).
    async fn run_once(&mut self, resume: Option<bool>) -> Result<(), String> {
        let dbs = self.src.databases().await?;
        if self.dst.conn.is_cluster()
            && let Some(db) = dbs.keys().find(|db| **db != 0)
        {
            return Err(format!(
                "db {db} holds keys on the source; a Redis Cluster has db 0 only"
            ));
        }
        if self.target_empty.is_none() {
            let had = self.dst.databases().await?;
            self.target_empty = Some(
                (0..16)
                    .chain(dbs.keys().copied())
                    .filter(|db| !had.contains_key(db))
                    .collect(),
            );
        }
        let mut total: u64 = dbs.values().map(|(n, _)| n).sum();
        if self.lead.is_some() {
            let c = self.fleet_conn().await?;
            total = total.saturating_sub(fleet::count(c).await.unwrap_or(0));
        }
        if self.m.kind == Kind::Carry {
            // The keys written on the fallback (all of them past the
            // bound), then the failback's cutover.
            if self.m.overflowed.load(Ordering::Relaxed) {
                self.m.keys_total.store(total, Ordering::Relaxed);
                self.copy_all(&dbs, Why::Again).await?;
            }
            self.sync(Dir::Forward, ALL).await?;
            return self.switch(Dir::Forward).await;
        }
        self.m.keys_total.store(total, Ordering::Relaxed);
        match resume {
            None => self.copy_all(&dbs, Why::First).await?,
            Some(false) => self.copy_all(&dbs, Why::Again).await?,
            Some(true) => {}
        }
        self.m.set_phase(Phase::Syncing, "every key copied once");
        loop {
            self.check()?;
            self.sync(Dir::Forward, BATCH * 10).await?;
            let asked = self.m.asked() == Some(Ask::Cutover);
            if self.m.request.cutover || asked {
                self.m.clear_ask();
                match self.switch(Dir::Forward).await {
                    Ok(()) => break,
                    Err(why) => {
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
        // Cut over: the writes go back to the old endpoint until finish.
        loop {
            if self.m.cancel.is_cancelled() {
                return Err("the sidecar shuts down".into());
            }
            self.sync(Dir::Back, BATCH * 10).await?;
            match self.m.asked() {
                Some(Ask::Finish) => {
                    self.m.copy_back.store(false, Ordering::Release);
                    self.m.set_phase(
                        Phase::Done,
                        &format!("finished: {} no longer gets the writes", self.m.from),
                    );
                    return Ok(());
                }
                Some(Ask::Rollback) => {
                    self.m.clear_ask();
                    match self.switch(Dir::Back).await {
                        Ok(()) => return Ok(()),
                        Err(why) => {
                            self.m
                                .set_phase(Phase::Done, &format!("rollback abandoned: {why}"));
                        }
                    }
                }
                _ => {}
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Copy every key of `dbs` (with what was written meanwhile copied
    /// again between batches), at the request's pace.
    async fn copy_all(&mut self, dbs: &HashMap<i64, (u64, u64)>, why: Why) -> Result<(), String> {
        let mut order: Vec<i64> = dbs.keys().copied().collect();
        order.sort_unstable();
        let mut pace = Pace {
            start: Instant::now(),
            keys: 0,
            bytes: 0,
            fastest: None,
        };
        for db in order {
            let mut cursor = Bytes::from_static(b"0");
            loop {
                self.check()?;
                self.src.select(db).await?;
                let r = self
                    .src
                    .call(&[vec![
                        Bytes::from_static(b"SCAN"),
                        cursor.clone(),
                        Bytes::from_static(b"COUNT"),
                        Bytes::from(BATCH.to_string()),
                    ]])
                    .await?;
                let (next, keys) = scan_reply(&r[0]).ok_or("SCAN: not an array reply")?;
                let t = Instant::now();
                let bytes = self.copy(Dir::Forward, db, &keys, why).await?;
                let (wait, slow) = pace.after(
                    keys.len() as u64,
                    bytes,
                    t.elapsed(),
                    self.m.request.max_keys_per_second,
                    self.m.request.max_bytes_per_second,
                );
                if slow {
                    self.m.backoffs.fetch_add(1, Ordering::Relaxed);
                }
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                // What was written meanwhile, a bounded share per batch so
                // the copy itself goes on under a busy app.
                self.sync(Dir::Forward, BATCH * 10).await?;
                if next == b"0"[..] {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), String> {
        if self.m.cancel.is_cancelled() {
            return Err("aborted".into());
        }
        if self.m.backlog() > MAX_BACKLOG {
            return Err(format!(
                "more than {MAX_BACKLOG} writes wait to be copied again"
            ));
        }
        Ok(())
    }

    /// Copy `keys` of `db`: DUMP and PTTL from one side, RESTORE on the
    /// other; a key gone from the first is deleted from the other. Answers
    /// the payload bytes copied.
    async fn copy(&mut self, dir: Dir, db: i64, keys: &[Bytes], why: Why) -> Result<u64, String> {
        // The record and the followers' keys stay where they are.
        let keys: Vec<Bytes> = keys.iter().filter(|k| !fleet::ours(k)).cloned().collect();
        let keys = &keys[..];
        if keys.is_empty() {
            return Ok(0);
        }
        let on_conflict = match why {
            Why::First => self.m.request.on_conflict,
            Why::Again => OnConflict::Replace,
        };
        let m = self.m.clone();
        let (from, to) = self.sides(dir);
        from.select(db).await?;
        to.select(db).await?;
        let mut reads = Vec::with_capacity(keys.len() * 2);
        for k in keys {
            reads.push(vec![Bytes::from_static(b"DUMP"), k.clone()]);
            reads.push(vec![Bytes::from_static(b"PTTL"), k.clone()]);
        }
        let got = from.call(&reads).await?;
        let mut writes = Vec::with_capacity(keys.len());
        // Keys rebuilt from their contents instead (with their PTTL).
        let mut rebuild: Vec<(Bytes, i64)> = Vec::new();
        // What each write is for: the key, its PTTL, and whether it is a
        // RESTORE (else a DEL).
        let mut restored: Vec<(&Bytes, i64, bool)> = Vec::with_capacity(keys.len());
        let mut bytes = 0u64;
        let req = &m.request;
        for (i, k) in keys.iter().enumerate() {
            let (dump, ttl) = (&got[2 * i], integer(&got[2 * i + 1]).unwrap_or(-1));
            match bulk(dump) {
                // Gone (deleted or expired) there.
                None => {
                    writes.push(vec![Bytes::from_static(b"DEL"), k.clone()]);
                    restored.push((k, ttl, false));
                }
                Some(payload)
                    if req.rebuild == Rebuild::Always
                        || payload.len() as u64 > req.max_restore_bytes =>
                {
                    rebuild.push((k.clone(), ttl));
                }
                Some(payload) => {
                    bytes += payload.len() as u64;
                    let mut w = vec![
                        Bytes::from_static(b"RESTORE"),
                        k.clone(),
                        Bytes::from(ttl.max(0).to_string()),
                        payload,
                    ];
                    if on_conflict == OnConflict::Replace {
                        w.push(Bytes::from_static(b"REPLACE"));
                    }
                    writes.push(w);
                    restored.push((k, ttl, true));
                }
            }
        }
        let replies = to.call(&writes).await?;
        let what = to.what;
        let mut conflicts = Vec::new();
        for ((k, ttl, restore), r) in restored.into_iter().zip(&replies) {
            if r.starts_with(b"-BUSYKEY") {
                conflicts.push(k.clone());
                continue;
            }
            // A payload of another RDB version (a newer Redis, Valkey), or
            // a target without RESTORE (renamed away, a service that does
            // not offer it): rebuilt from the key's contents.
            let refused = r.starts_with(b"-ERR DUMP payload version or checksum are wrong")
                || r.starts_with(b"-ERR Bad data format")
                || (restore && r.starts_with(b"-ERR unknown command"));
            if refused && req.rebuild != Rebuild::Never {
                rebuild.push((k.clone(), ttl));
                continue;
            }
            if is_error(r) {
                m.errors.fetch_add(1, Ordering::Relaxed);
                return Err(format!(
                    "RESTORE on the {what} (db {db}): {}",
                    error_text(r)
                ));
            }
        }
        if on_conflict != OnConflict::Replace && !rebuild.is_empty() {
            // What RESTORE's BUSYKEY says, for the keys rebuilt.
            let exists: Vec<Vec<Bytes>> = rebuild
                .iter()
                .map(|(k, _)| vec![Bytes::from_static(b"EXISTS"), k.clone()])
                .collect();
            let r = to.call(&exists).await?;
            let mut kept = Vec::new();
            for ((k, t), e) in rebuild.into_iter().zip(&r) {
                if integer(e) == Some(1) {
                    conflicts.push(k);
                } else {
                    kept.push((k, t));
                }
            }
            rebuild = kept;
        }
        for k in &conflicts {
            let ours = m
                .ours
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .contains(&(db, k.clone()));
            match on_conflict {
                // Copied already after a write: that copy is as fresh.
                _ if ours => {}
                OnConflict::Skip => {}
                _ => {
                    return Err(format!(
                        "a key of db {db} already exists on the target (on_conflict = fail)"
                    ));
                }
            }
        }
        for (k, ttl) in &rebuild {
            if let Some(n) = super::rebuild::rebuild(from, to, k, *ttl).await? {
                bytes += n;
                m.keys_rebuilt.fetch_add(1, Ordering::Relaxed);
            }
        }
        let (counter, result) = match (why, dir) {
            (Why::First, _) => (&self.m.keys_copied, "copied"),
            (Why::Again, Dir::Forward) => (&self.m.keys_recopied, "recopied"),
            (Why::Again, Dir::Back) => (&self.m.keys_copied_back, "copied_back"),
        };
        if why == Why::Again && dir == Dir::Forward {
            let mut ours = self.m.ours.lock().unwrap_or_else(PoisonError::into_inner);
            ours.extend(keys.iter().map(|k| (db, k.clone())));
        }
        counter.fetch_add(keys.len() as u64, Ordering::Relaxed);
        self.m.bytes_copied.fetch_add(bytes, Ordering::Relaxed);
        self.metrics
            .migration_copied(result, keys.len() as u64, bytes);
        self.metrics.migration_backlog(self.m.backlog());
        Ok(bytes)
    }

    /// Copy again up to `n` written items, in the order written.
    async fn sync(&mut self, dir: Dir, n: usize) -> Result<(), String> {
        let mut left = n;
        while left > 0 {
            let batch = self.m.take(BATCH.min(left), n == ALL);
            if batch.is_empty() {
                return Ok(());
            }
            left = left.saturating_sub(batch.len());
            let mut at = 0;
            while at < batch.len() {
                match self.apply(dir, &batch[at..]).await {
                    Ok(n) => at += n,
                    Err(e) => {
                        // Not copied: marked again, for after a pause.
                        for item in &batch[at..] {
                            self.m.mark(item.clone());
                        }
                        return Err(e);
                    }
                }
            }
        }
        self.metrics.migration_backlog(self.m.backlog());
        Ok(())
    }

    /// Copy the first items of `items` (the keys of one db in a row, or a
    /// flush); answers how many.
    async fn apply(&mut self, dir: Dir, items: &[Item]) -> Result<usize, String> {
        match &items[0] {
            Item::Key(db, _) => {
                let db = *db;
                let keys: Vec<Bytes> = items
                    .iter()
                    .map_while(|i| match i {
                        Item::Key(d, k) if *d == db => Some(k.clone()),
                        _ => None,
                    })
                    .collect();
                self.copy(dir, db, &keys, Why::Again).await?;
                Ok(keys.len())
            }
            Item::FlushDb(db) => {
                let (_, to) = self.sides(dir);
                to.select(*db).await?;
                to.each_master(&cmd(&[b"FLUSHDB"])).await?;
                Ok(1)
            }
            Item::FlushAll => {
                let (_, to) = self.sides(dir);
                to.each_master(&cmd(&[b"FLUSHALL"])).await?;
                Ok(1)
            }
        }
    }

    /// The cutover (`Forward`) or the rollback (`Back`): hold writes, let
    /// those in flight finish, copy what is left, verify, switch, release.
    async fn switch(&mut self, dir: Dir) -> Result<(), String> {
        let max_pause = Duration::from_millis(self.m.request.max_pause_ms);
        // The scripts first, while the app runs: the pause is for what
        // cannot be done before it.
        self.load_scripts(dir).await?;
        let label = match dir {
            Dir::Forward => "holding writes",
            Dir::Back => "rolling back: holding writes",
        };
        self.m.set_phase(Phase::CuttingOver, label);
        let started = Instant::now();
        self.m.hold();
        let result = self.held(dir, started, max_pause).await;
        if result.is_err() {
            // The followers' writes go on where they were.
            if let Err(e) = self.release_followers(None).await {
                tracing::warn!(error = %e, "migration: the followers were not told to let their writes go (they do once the record expires)");
            }
        }
        self.m.release();
        let took = started.elapsed();
        self.metrics.migration_pause(took);
        self.m
            .pause_ms
            .store(took.as_millis() as u64, Ordering::Relaxed);
        result?;
        let (from, to) = match dir {
            Dir::Forward => (&self.m.from, &self.m.to),
            Dir::Back => (&self.m.to, &self.m.from),
        };
        let why = format!("switched to {to} after a pause of {} ms", took.as_millis());
        match dir {
            Dir::Forward if self.m.kind == Kind::Carry => {
                let carried = self.m.keys_recopied.load(Ordering::Relaxed);
                self.m.set_phase(
                    Phase::Done,
                    &format!("failed back: {why}, with the {carried} keys written on {from}"),
                );
            }
            Dir::Forward => {
                self.m.copy_back.store(true, Ordering::Release);
                self.m.set_phase(
                    Phase::Done,
                    &format!("{why}; the writes are copied back to {from} until finish"),
                );
            }
            Dir::Back => {
                self.m.copy_back.store(false, Ordering::Release);
                self.m.set_phase(Phase::RolledBack, &why);
            }
        }
        Ok(())
    }

    /// What a switch does while writes are held.
    async fn held(
        &mut self,
        dir: Dir,
        started: Instant,
        max_pause: Duration,
    ) -> Result<(), String> {
        let late = |what: &str| {
            format!(
                "{what} after {} ms (max_pause_ms {})",
                started.elapsed().as_millis(),
                max_pause.as_millis()
            )
        };
        while self.m.inflight.load(Ordering::SeqCst) > 0 {
            if started.elapsed() > max_pause {
                return Err(late("writes still in flight"));
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        self.hold_followers(started, max_pause).await?;
        while self.m.backlog() > 0 {
            self.sync(dir, ALL).await?;
        }
        self.rescan(dir).await?;
        self.load_scripts(dir).await?;
        self.copy_functions(dir).await?;
        // A carry's sides differ by design (the endpoint that failed keeps
        // what was not written during the outage).
        if self.m.kind == Kind::Migrate {
            self.verify(dir).await?;
        }
        if started.elapsed() > max_pause {
            return Err(late("the copy was not done"));
        }
        let new = match dir {
            Dir::Forward => self.dst.ep.clone(),
            Dir::Back => self.src.ep.clone(),
        };
        let old = self.ups.active();
        match self.m.kind {
            Kind::Migrate | Kind::Follow => self.ups.activate(new.name()).map(drop),
            Kind::Carry => self
                .ups
                .switch_automatically(new.name(), crate::upstream::failover::reason::FAILBACK),
        }
        .map_err(|e| format!("switching to {}: {e}", new.name()))?;
        // The followers switch once they read it; a record that cannot be
        // written takes this sidecar back (its writes are still held).
        if let Err(e) = self.release_followers(Some(new.name())).await {
            let _ = self.ups.activate(old.endpoint.name());
            return Err(format!("the followers could not be told to switch: {e}"));
        }
        retired(&old, self.pool.settings().command_timeout).await;
        Ok(())
    }

    /// The dbs either side holds keys in, in order.
    async fn dbs_in_use(&mut self) -> Result<Vec<i64>, String> {
        let mut dbs: Vec<i64> = self.src.databases().await?.into_keys().collect();
        dbs.extend(self.dst.databases().await?.into_keys());
        dbs.sort_unstable();
        dbs.dedup();
        Ok(dbs)
    }

    /// Copy again every key of the `cutover_rescan` patterns, and delete
    /// on the side the app goes to those gone from the other: what scripts
    /// wrote without declaring the keys.
    async fn rescan(&mut self, dir: Dir) -> Result<(), String> {
        let patterns = self.m.request.cutover_rescan.clone();
        let kind = self.m.kind;
        if patterns.is_empty() {
            return Ok(());
        }
        for db in self.dbs_in_use().await? {
            for p in &patterns {
                let (from, to) = self.sides(dir);
                from.select(db).await?;
                to.select(db).await?;
                let there = from.scan_all(p.as_bytes()).await?;
                // A carry adds what the fallback holds; the endpoint that
                // failed keeps its own keys of the pattern.
                let here = if kind == Kind::Carry {
                    Vec::new()
                } else {
                    to.scan_all(p.as_bytes()).await?
                };
                let there_set: HashSet<&Bytes> = there.iter().collect();
                let gone: Vec<Bytes> = here
                    .into_iter()
                    .filter(|k| !there_set.contains(k))
                    .collect();
                for chunk in there.chunks(BATCH) {
                    self.copy(dir, db, chunk, Why::Again).await?;
                }
                // Absent from the SCAN there: checked once more, by key (a
                // SCAN may miss nothing that stayed, but the copy above
                // says what is gone).
                for chunk in gone.chunks(BATCH) {
                    self.copy(dir, db, chunk, Why::Again).await?;
                }
            }
        }
        Ok(())
    }

    /// Load on the side the app goes to every script seen through the
    /// sidecar, so EVALSHA does not meet NOSCRIPT there.
    async fn load_scripts(&mut self, dir: Dir) -> Result<(), String> {
        let bodies: Vec<Bytes> = {
            let s = self
                .m
                .scripts
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            s.0.iter()
                .filter(|b| !self.scripts_loaded.contains(*b))
                .cloned()
                .collect()
        };
        if bodies.is_empty() {
            return Ok(());
        }
        let loads: Vec<Vec<Bytes>> = bodies
            .iter()
            .map(|b| {
                vec![
                    Bytes::from_static(b"SCRIPT"),
                    Bytes::from_static(b"LOAD"),
                    b.clone(),
                ]
            })
            .collect();
        let (_, to) = self.sides(dir);
        let replies = to.call(&loads).await?;
        for (b, r) in bodies.into_iter().zip(&replies) {
            // A script that does not compile failed for the client too.
            if !is_error(r) {
                self.m.scripts_loaded.fetch_add(1, Ordering::Relaxed);
            }
            self.scripts_loaded.insert(b);
        }
        Ok(())
    }

    /// The functions (FUNCTION DUMP, FUNCTION RESTORE ... REPLACE), where
    /// there are any.
    async fn copy_functions(&mut self, dir: Dir) -> Result<(), String> {
        let (from, to) = self.sides(dir);
        let r = from
            .call(&[cmd(&[b"FUNCTION", b"LIST"]), cmd(&[b"FUNCTION", b"DUMP"])])
            .await?;
        // Before Redis 7 (an error), or none: nothing to copy.
        if is_error(&r[0]) || r[0].starts_with(b"*0\r\n") {
            return Ok(());
        }
        let Some(payload) = bulk(&r[1]) else {
            return Ok(());
        };
        let w = vec![
            Bytes::from_static(b"FUNCTION"),
            Bytes::from_static(b"RESTORE"),
            payload,
            Bytes::from_static(b"REPLACE"),
        ];
        for r in to.each_master(&w).await? {
            if is_error(&r) {
                return Err(format!(
                    "FUNCTION RESTORE on the {}: {}",
                    to.what,
                    error_text(&r)
                ));
            }
        }
        Ok(())
    }

    /// Compare both sides while writes are held: per db, the keys without a
    /// TTL (equal where the target held nothing at the start, else at
    /// least as many on the target), and a sample of keys by type, size
    /// and whether they expire.
    async fn verify(&mut self, dir: Dir) -> Result<(), String> {
        let target_empty = self.target_empty.clone().unwrap_or_default();
        let (from, to) = self.sides(dir);
        let a = from.databases().await?;
        let b = to.databases().await?;
        let persistent = |m: &HashMap<i64, (u64, u64)>, db: i64| {
            m.get(&db).map_or(0, |(k, e)| k.saturating_sub(*e))
        };
        let mut dbs: Vec<i64> = a.keys().chain(b.keys()).copied().collect();
        dbs.sort_unstable();
        dbs.dedup();
        for db in dbs {
            let (pa, pb) = (persistent(&a, db), persistent(&b, db));
            let exact = target_empty.contains(&db);
            let ok = match dir {
                _ if exact => pa == pb,
                Dir::Forward => pb >= pa,
                Dir::Back => true,
            };
            if !ok {
                return Err(format!(
                    "db {db}: {pa} keys without a TTL on {} and {pb} on {}",
                    from.ep.name(),
                    to.ep.name()
                ));
            }
        }
        for db in a.into_keys() {
            self.sample(dir, db).await?;
        }
        Ok(())
    }

    /// A few random keys of `db`, the same type and size on both sides,
    /// both with a TTL or both without.
    async fn sample(&mut self, dir: Dir, db: i64) -> Result<(), String> {
        let (from, to) = self.sides(dir);
        from.select(db).await?;
        to.select(db).await?;
        let mut keys = from.random_keys(SAMPLE).await?;
        keys.retain(|k| !fleet::ours(k));
        let shape = |k: &Bytes| {
            vec![
                vec![Bytes::from_static(b"TYPE"), k.clone()],
                vec![Bytes::from_static(b"PTTL"), k.clone()],
            ]
        };
        let reads: Vec<Vec<Bytes>> = keys.iter().flat_map(shape).collect();
        let ra = from.call(&reads).await?;
        let rb = to.call(&reads).await?;
        let mut sizes = Vec::new();
        for (i, k) in keys.iter().enumerate() {
            let (ta, tb) = (&ra[2 * i], &rb[2 * i]);
            let (ea, eb) = (
                integer(&ra[2 * i + 1]).unwrap_or(-2),
                integer(&rb[2 * i + 1]).unwrap_or(-2),
            );
            if ea == -2 {
                // Expired since RANDOMKEY chose it.
                continue;
            }
            if ta != tb || (ea == -1) != (eb == -1) {
                return Err(format!(
                    "db {db}: a sampled key differs (type {} / {}, TTL {ea} / {eb} ms)",
                    String::from_utf8_lossy(ta).trim(),
                    String::from_utf8_lossy(tb).trim()
                ));
            }
            let size: &[u8] = match ta.as_ref() {
                b"+string\r\n" => b"STRLEN",
                b"+hash\r\n" => b"HLEN",
                b"+list\r\n" => b"LLEN",
                b"+set\r\n" => b"SCARD",
                b"+zset\r\n" => b"ZCARD",
                b"+stream\r\n" => b"XLEN",
                _ => continue,
            };
            sizes.push(vec![Bytes::copy_from_slice(size), k.clone()]);
        }
        if sizes.is_empty() {
            return Ok(());
        }
        let sa = from.call(&sizes).await?;
        let sb = to.call(&sizes).await?;
        if let Some(i) = (0..sizes.len()).find(|&i| sa[i] != sb[i]) {
            return Err(format!(
                "db {db}: a sampled key differs in size ({} {} / {})",
                String::from_utf8_lossy(&sizes[i][0]),
                integer(&sa[i]).unwrap_or(-1),
                integer(&sb[i]).unwrap_or(-1)
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pace_holds_keys_and_bytes_per_second() {
        let mut p = Pace {
            start: Instant::now(),
            keys: 0,
            bytes: 0,
            fastest: None,
        };
        let ms = Duration::from_millis(1);
        // 1000 keys at 10,000/s: due 100 ms after the start.
        let (wait, slow) = p.after(1000, 10, ms, 10_000, 0);
        assert!(!slow);
        assert!(
            wait > Duration::from_millis(80) && wait <= Duration::from_millis(100),
            "{wait:?}"
        );
        // Bytes bound it too: 1 MiB at 1 MiB/s is a second.
        let (wait, _) = p.after(0, 1 << 20, ms, 0, 1 << 20);
        assert!(wait > Duration::from_millis(900), "{wait:?}");
        // A batch 8x slower than the best, plus 5 ms: back off by it.
        let (wait, slow) = p.after(0, 0, Duration::from_millis(50), 0, 0);
        assert!(slow);
        assert!(wait >= Duration::from_millis(50), "{wait:?}");
    }
}
