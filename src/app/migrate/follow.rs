//! A sidecar that did not start the migration follows it: every sidecar
//! looks for a record on its active endpoint (at its start, before it
//! takes clients, and every [`fleet::IDLE_POLL`] after), and, finding
//! one, marks and holds its own writes as the leader asks (see
//! [`super::fleet`]).

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use super::fleet::{self, Beat, Mark, Record, Says, State};
use super::{Kind, Migration, Migrator, OtherSidecars, Phase, Request, side};
use crate::upstream::endpoint::Endpoint;
use crate::upstream::pool::ControlConn;

/// A record found, where, on which connection, and this sidecar's
/// migration following it (`None`: it cannot follow).
type Found = (Record, Arc<Endpoint>, ControlConn, Option<Arc<Migration>>);

/// Marks a follower keeps while it cannot push them, at most: past it,
/// it stops following (and the leader's cutover fails on its silence).
const MAX_UNSENT: usize = 1_000_000;

impl Migrator {
    /// Look for a migration to follow now (bounded by the connect
    /// timeout; one found is joined before this returns, so the sidecar
    /// takes clients with the stage that marks and holds in), then every
    /// [`fleet::IDLE_POLL`], on one task that follows what it finds.
    pub async fn watch(self: &Arc<Self>) {
        let mut conn = None;
        let first = self.pool.settings().connect_timeout + Duration::from_secs(1);
        let mut found = match tokio::time::timeout(first, self.look(&mut conn)).await {
            Ok(Some(rec)) => self.joined(rec, &mut conn),
            _ => None,
        };
        let me = self.clone();
        self.tasks.spawn(async move {
            loop {
                if let Some((rec, ep, c, m)) = found.take() {
                    me.follow_with(rec, ep, c, m).await;
                }
                tokio::select! {
                    _ = me.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(fleet::IDLE_POLL) => {}
                }
                if me.current().is_some_and(|m| m.running()) {
                    continue;
                }
                if let Some(rec) = me.look(&mut conn).await {
                    found = me.joined(rec, &mut conn);
                }
            }
        });
    }

    /// A record of another sidecar's running migration on the active
    /// endpoint (`conn`: the connection to it, made or replaced here).
    async fn look(&self, conn: &mut Option<(Arc<Endpoint>, ControlConn)>) -> Option<Record> {
        let ep = self.ups.active().endpoint;
        if conn.as_ref().is_none_or(|(e, _)| !Arc::ptr_eq(e, &ep)) {
            *conn = None;
            let c = side::connect_as(&self.pool, &ep, fleet::CLIENT_NAME)
                .await
                .ok()?;
            *conn = Some((ep.clone(), c));
        }
        let (_, c) = conn.as_mut()?;
        match fleet::read_record(c).await {
            Ok(Some(rec))
                if rec.state != State::End
                    && rec.leader.as_bytes() != &self.ups.instance[..]
                    && rec.from == ep.name() =>
            {
                Some(rec)
            }
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "looking for a migration to follow");
                if matches!(e, fleet::FleetError::Conn(_)) {
                    *conn = None;
                }
                None
            }
        }
    }

    /// `rec` joined, with the connection it was found on (taken).
    fn joined(
        &self,
        rec: Record,
        conn: &mut Option<(Arc<Endpoint>, ControlConn)>,
    ) -> Option<Found> {
        let (ep, c) = conn.take()?;
        let m = self.join(&rec, &ep);
        Some((rec, ep, c, m))
    }

    /// The follower's migration, its stage added (`None`: this sidecar has
    /// no upstream of the target's name, and cannot follow).
    fn join(&self, rec: &Record, from: &Arc<Endpoint>) -> Option<Arc<Migration>> {
        let to = self
            .ups
            .endpoints()
            .into_iter()
            .find(|e| e.name() == rec.to)?;
        let request = Request {
            max_pause_ms: rec.max_pause_ms,
            other_sidecars: OtherSidecars::Ignore,
            ..Request::defaults(&rec.to)
        };
        let phase = Phase::from_label(&rec.phase).unwrap_or(Phase::Copying);
        let m = self.begin(
            Kind::Follow,
            request,
            from,
            &to,
            (
                phase,
                &format!("following the migration led by {}", rec.leader),
            ),
            Some(rec.id.clone()),
        );
        *m.leader.lock().unwrap_or_else(PoisonError::into_inner) = Some(rec.leader.clone());
        Some(m)
    }

    /// Follow the record until it ends, is gone, or the sidecar shuts down.
    async fn follow_with(
        self: &Arc<Self>,
        rec: Record,
        from: Arc<Endpoint>,
        mut c: ControlConn,
        m: Option<Arc<Migration>>,
    ) {
        let id = String::from_utf8_lossy(&self.ups.instance).into_owned();
        let mut f = Follower {
            beat: Beat {
                epoch: super::new_id(),
                says: match &m {
                    Some(_) => Says::Following,
                    None => Says::Cannot(format!("it has no upstream named {}", rec.to)),
                },
            },
            unsent: Vec::new(),
            scripts_sent: HashSet::new(),
            acked: 0,
            last_ok: Instant::now(),
        };
        if let Err(e) = fleet::join(&mut c, &id).await {
            tracing::warn!(error = %e, leader = %rec.leader, "could not join the migration");
        }
        tracing::info!(leader = %rec.leader, from = %rec.from, to = %rec.to, "following a migration");
        let end = loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break (Phase::Aborted, "the sidecar shuts down".to_string()),
                _ = tokio::time::sleep(fleet::FOLLOW_POLL) => {}
            }
            if let Some(m) = &m {
                f.collect(m);
            }
            if f.unsent.len() > MAX_UNSENT {
                break (
                    Phase::Failed,
                    "the source took none of this sidecar's marks for too long".to_string(),
                );
            }
            let now = match fleet::follow_step(&mut c, &id, &f.beat, &f.unsent).await {
                Ok(r) => {
                    f.unsent.clear();
                    f.last_ok = Instant::now();
                    r
                }
                Err(e) => {
                    if f.last_ok.elapsed() > Duration::from_millis(fleet::RECORD_TTL_MS) {
                        break (Phase::Aborted, format!("the source cannot be reached: {e}"));
                    }
                    if let fleet::FleetError::Conn(_) = e
                        && let Ok(n) = side::connect_as(&self.pool, &from, fleet::CLIENT_NAME).await
                    {
                        c = n;
                    }
                    continue;
                }
            };
            let Some(now) = now.filter(|r| r.id == rec.id) else {
                break (
                    Phase::Aborted,
                    format!("the leader {} stopped (its record expired)", rec.leader),
                );
            };
            let Some(m) = &m else {
                if now.state == State::End {
                    break (Phase::Aborted, now.reason);
                }
                continue;
            };
            if let Some(p) = Phase::from_label(&now.phase)
                && (p, now.reason.as_str()) != (m.phase().0, m.phase().1.as_str())
            {
                m.set_phase(p, &now.reason);
            }
            m.keys_copied.store(now.keys_copied, Ordering::Relaxed);
            m.keys_total.store(now.keys_total, Ordering::Relaxed);
            // The last word too: a rollback's switch, then the end.
            self.obey(m, &mut f, &now, &mut c, &id).await;
            if now.state == State::End {
                let p = Phase::from_label(&now.phase).unwrap_or(Phase::Aborted);
                break (p, now.reason);
            }
        };
        let (mut phase, why) = end;
        if let Some(m) = &m {
            if m.copy_back.load(Ordering::Acquire) && phase == Phase::Aborted {
                // Switched already: the apps stay on the target.
                phase = Phase::Done;
            }
            m.release();
            m.copy_back.store(false, Ordering::Release);
            self.policies.remove_runtime("migration");
            m.set_phase(phase, &why);
        }
        let _ = fleet::leave(&mut c, &id).await;
        tracing::info!(leader = %rec.leader, phase = phase.label(), reason = %why, "no longer following the migration");
    }

    /// What the record asks: hold (acknowledged once no write is in flight
    /// and the marks are pushed), switch to where the apps are now, let
    /// the writes go.
    async fn obey(
        &self,
        m: &Arc<Migration>,
        f: &mut Follower,
        now: &Record,
        c: &mut ControlConn,
        id: &str,
    ) {
        if now.state == State::Hold && now.hold != f.acked {
            m.hold();
            // Within the leader's bound, and short of the heartbeat's TTL.
            let wait = Duration::from_millis(now.max_pause_ms.min(fleet::RECORD_TTL_MS / 2));
            let until = Instant::now() + wait;
            while m.inflight.load(Ordering::SeqCst) > 0 && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            if m.inflight.load(Ordering::SeqCst) == 0 {
                f.collect(m);
                let held = Beat {
                    epoch: f.beat.epoch.clone(),
                    says: Says::Held(now.hold),
                };
                if fleet::follow_step(c, id, &held, &f.unsent).await.is_ok() {
                    f.unsent.clear();
                    f.beat = held;
                    f.acked = now.hold;
                }
            }
        }
        let active = self.ups.active();
        if now.on != active.endpoint.name() && (now.on == m.from || now.on == m.to) {
            match self.ups.activate(&now.on) {
                Ok(_) => {
                    super::run::retired(&active, self.pool.settings().command_timeout).await;
                    m.copy_back.store(now.on == m.to, Ordering::Release);
                    tracing::info!(to = %now.on, leader = %now.leader, "migration: switched as the leader asked");
                }
                Err(e) => {
                    tracing::error!(to = %now.on, error = %e, "migration: cannot switch as the leader asked");
                }
            }
        }
        if now.state == State::Run && m.hold.load(Ordering::SeqCst) {
            m.release();
            f.beat.says = Says::Following;
        }
    }
}

/// A follower's own state.
struct Follower {
    beat: Beat,
    /// Marks taken from the migration, not yet on the source.
    unsent: Vec<Bytes>,
    scripts_sent: HashSet<Bytes>,
    /// The last hold acknowledged.
    acked: u64,
    last_ok: Instant,
}

impl Follower {
    /// What the writes marked, and the scripts not pushed yet.
    fn collect(&mut self, m: &Migration) {
        for item in m.take(usize::MAX, true) {
            self.unsent.push(fleet::encode(&Mark::Item(item)));
        }
        let scripts: Vec<Bytes> = {
            let s = m.scripts.lock().unwrap_or_else(PoisonError::into_inner);
            s.0.iter()
                .filter(|b| !self.scripts_sent.contains(*b))
                .cloned()
                .collect()
        };
        for b in scripts {
            self.unsent.push(fleet::encode(&Mark::Script(b.clone())));
            self.scripts_sent.insert(b);
        }
    }
}
