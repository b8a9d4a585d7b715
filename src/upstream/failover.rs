//! Which endpoint is active, and when that changes.
//!
//! Every endpoint has a checker task (PING and ROLE on its own connection,
//! every `check_interval`); its health moves to down after
//! `failures_before_down` failed checks and back to up after
//! `successes_before_up` good ones. A supervisor task picks the active
//! endpoint: when the active one is down, the first healthy endpoint in
//! priority order; with `failback = "auto"`, a higher-priority endpoint
//! once it has been up for `failback_after`. Operators switch with
//! [`Upstreams::activate`] and reload with [`Upstreams::reconfigure`].
//!
//! The choice is published on a watch channel as an [`Active`] with a
//! generation. Upstream connections compare generations: a connection made
//! for an older one retires (stops writing, lets its replies arrive, closes)
//! and the next connection goes to the new endpoint.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use tokio::sync::{Notify, watch};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::conn::{self, ConnSettings};
use super::endpoint::EndpointSpec;
use super::endpoint::{Endpoint, HealthState, Stream, role_of, roundtrip};
use super::slots::{self, SlotMap, Topology};
use super::{Identity, URL_DB, UpstreamError};
use crate::config::url::Target;
use crate::config::{Failback, FailoverConfig};
use crate::metrics::Metrics;
use crate::wire::{Proto, ReplyScanner};

/// The active endpoint and the generation of that choice.
#[derive(Clone, Debug)]
pub struct Active {
    pub endpoint: Arc<Endpoint>,
    /// Bumped on every switch, and when a sentinel reports a new master.
    pub generation: u64,
    /// Cancelled when this choice is replaced: connections made for it
    /// retire (checked once per write batch, not on every wake-up).
    pub retired: CancellationToken,
    /// Connections made for this choice whose writer still runs: once
    /// it is retired and this is 0, nothing more is written to its
    /// endpoint (a live migration's cutover waits for that).
    pub writers: Arc<std::sync::atomic::AtomicUsize>,
}

/// The last change of the active endpoint.
#[derive(Clone, Debug)]
pub struct Switch {
    pub at: SystemTime,
    pub from: String,
    pub to: String,
    pub reason: String,
}

struct State {
    endpoints: Vec<Arc<Endpoint>>,
    active: Active,
    last_switch: Option<Switch>,
    /// The active endpoint was chosen by hand: automatic failback leaves it
    /// alone (only its failure moves the sidecar away).
    manual: bool,
    failover: FailoverConfig,
}

/// The endpoints, their health and the active choice.
pub struct Upstreams {
    state: Mutex<State>,
    /// The active choice's generation, readable without a lock.
    generation: std::sync::atomic::AtomicU64,
    active_tx: watch::Sender<Active>,
    settings: ConnSettings,
    metrics: Metrics,
    /// Wakes the supervisor when some endpoint's health changed.
    changed: Notify,
    shutdown: CancellationToken,
    /// Every task of the endpoints (checkers, sentinel listeners).
    tasks: TaskTracker,
    /// Where the health checks run: a runtime on a thread of its own, so
    /// a data path busy with one client's traffic cannot make a check
    /// late (a late check would count as a failure and fail over).
    checks: tokio::runtime::Handle,
    /// Told of every automatic switch, and asked before a failback.
    hook: std::sync::RwLock<Option<std::sync::Weak<dyn SwitchHook>>>,
    /// This sidecar's name on the health checks' connections (`CLIENT
    /// LIST`): how a live migration finds other sidecars in front of the
    /// same Redis.
    pub instance: Bytes,
}

/// Sidecars in one process, numbered.
static INSTANCES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The prefix of every sidecar's checker connection name.
pub const INSTANCE_PREFIX: &str = "redis-sidecar:";

/// `redis-sidecar:<host>:<pid>:<n>`.
fn instance_name() -> Bytes {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let host: String = host.trim().chars().filter(char::is_ascii_graphic).collect();
    let n = INSTANCES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    Bytes::from(format!(
        "{INSTANCE_PREFIX}{host}:{}:{n}",
        std::process::id()
    ))
}

/// What the layer above (the live migration's failback carry) hears from
/// the supervisor's decisions.
pub trait SwitchHook: Send + Sync {
    /// The supervisor is about to fail over from `from` (down) to `to`.
    fn failing_over(&self, from: &Arc<Endpoint>, to: &Arc<Endpoint>);
    /// A failback from `from` to `to` is due: `true` when the hook carries
    /// it out itself (it calls [`Upstreams::switch_automatically`] once the
    /// writes made on `from` are on `to`), `false` to switch at once.
    fn failback(&self, from: &Arc<Endpoint>, to: &Arc<Endpoint>) -> bool;
}

/// Start the health checks' runtime on its own thread; it runs until
/// `shutdown`, and a task on `tasks` ends with the thread (so shutdown
/// waits for it). `Err`: the thread or runtime could not be made.
fn start_check_runtime(
    shutdown: &CancellationToken,
    tasks: &TaskTracker,
) -> std::io::Result<tokio::runtime::Handle> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let handle = rt.handle().clone();
    let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
    let stop = shutdown.clone();
    std::thread::Builder::new()
        .name("redis-sidecar-checks".into())
        .spawn(move || {
            rt.block_on(stop.cancelled());
            // The checkers end on the same signal; what is left is dropped.
            rt.shutdown_timeout(Duration::from_secs(1));
            let _ = done_tx.send(());
        })?;
    tasks.spawn(async move {
        let _ = done_rx.await;
    });
    Ok(handle)
}

/// Why a switch happened (the `reason` label of `failovers_total`).
pub mod reason {
    pub const DOWN: &str = "down";
    pub const FAILBACK: &str = "failback";
    pub const MANUAL: &str = "manual";
    pub const RELOAD: &str = "reload";
    pub const SENTINEL: &str = "sentinel_switch_master";
}

/// Slot map reads a router asks for are this far apart at least.
const MIN_REFRESH: Duration = Duration::from_millis(100);

/// Resolves when a router asks `e`'s checker to read the slot map now
/// (never for an endpoint that is not a cluster).
async fn refresh_asked(e: &Endpoint) {
    match &e.cluster {
        Some(t) => t.refresh.notified().await,
        None => std::future::pending().await,
    }
}

/// Why the endpoints could not start.
#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    #[error("no upstream configured")]
    NoEndpoint,
    #[error("cannot start the health checks' thread")]
    CheckThread(#[source] std::io::Error),
}

impl Upstreams {
    /// Start checking `specs` (priority order; the first is active).
    pub fn start(
        specs: Vec<EndpointSpec>,
        failover: FailoverConfig,
        settings: ConnSettings,
        metrics: Metrics,
        shutdown: CancellationToken,
        tasks: TaskTracker,
    ) -> Result<Arc<Upstreams>, FailoverError> {
        let endpoints: Vec<Arc<Endpoint>> = specs
            .into_iter()
            .map(|s| Arc::new(Endpoint::new(s)))
            .collect();
        let first = endpoints
            .first()
            .cloned()
            .ok_or(FailoverError::NoEndpoint)?;
        metrics.endpoints(&endpoints.iter().map(|e| e.name()).collect::<Vec<_>>());
        let active = Active {
            endpoint: first,
            generation: 1,
            retired: CancellationToken::new(),
            writers: Arc::default(),
        };
        let (active_tx, _) = watch::channel(active.clone());
        let checks = start_check_runtime(&shutdown, &tasks).map_err(FailoverError::CheckThread)?;
        let ups = Arc::new(Upstreams {
            generation: std::sync::atomic::AtomicU64::new(1),
            state: Mutex::new(State {
                endpoints: endpoints.clone(),
                active,
                last_switch: None,
                manual: false,
                failover,
            }),
            active_tx,
            settings,
            metrics,
            changed: Notify::new(),
            shutdown,
            tasks,
            checks,
            hook: std::sync::RwLock::new(None),
            instance: instance_name(),
        });
        for e in &endpoints {
            ups.spawn_endpoint_tasks(e);
        }
        ups.publish_active_metric();
        ups.tasks.spawn(ups.clone().supervise());
        Ok(ups)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The current choice.
    pub fn active(&self) -> Active {
        self.active_tx.borrow().clone()
    }

    /// The current choice's generation (one atomic load).
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Follow the choice.
    pub fn subscribe(&self) -> watch::Receiver<Active> {
        self.active_tx.subscribe()
    }

    /// Ask `endpoint`'s checker to check now (a connection to it failed).
    pub fn nudge(&self, endpoint: &Endpoint) {
        endpoint.nudge.notify_one();
    }

    pub fn endpoints(&self) -> Vec<Arc<Endpoint>> {
        self.lock().endpoints.clone()
    }

    pub fn last_switch(&self) -> Option<Switch> {
        self.lock().last_switch.clone()
    }

    fn spawn_endpoint_tasks(self: &Arc<Self>, e: &Arc<Endpoint>) {
        self.tasks
            .spawn_on(self.clone().check_loop(e.clone()), &self.checks);
        if matches!(e.spec.target, Target::Sentinel(_)) {
            self.tasks.spawn(self.clone().watch_sentinels(e.clone()));
        }
    }

    /// Make `to` active (the caller holds the state lock).
    fn switch_locked(&self, st: &mut State, to: Arc<Endpoint>, why: &str) {
        let from = st.active.endpoint.name().to_string();
        st.active.retired.cancel();
        st.active = Active {
            endpoint: to.clone(),
            generation: st.active.generation + 1,
            retired: CancellationToken::new(),
            writers: Arc::default(),
        };
        st.last_switch = Some(Switch {
            at: SystemTime::now(),
            from: from.clone(),
            to: to.name().to_string(),
            reason: why.to_string(),
        });
        self.metrics.failover(&from, to.name(), why);
        // Clients with a connection of their own to the old endpoint: those
        // holding state there (MULTI, WATCH, subscriptions) are closed.
        let dedicated = self.metrics.upstream_connections(&from, "dedicated").get();
        tracing::warn!(from = %from, to = %to.name(), url = %to.spec.target, reason = %why, dedicated_clients = dedicated, "switching the active upstream; clients holding state on the old one are closed");
        self.generation
            .store(st.active.generation, std::sync::atomic::Ordering::Release);
        self.active_tx.send_replace(st.active.clone());
    }

    fn publish_active_metric(&self) {
        let st = self.lock();
        for e in &st.endpoints {
            self.metrics
                .upstream_active(e.name(), Arc::ptr_eq(e, &st.active.endpoint));
        }
        self.metrics.on_fallback(
            st.endpoints
                .first()
                .is_some_and(|e| !Arc::ptr_eq(e, &st.active.endpoint)),
        );
    }

    /// Switch to `name` now (operator's `POST /upstreams/{name}/activate`).
    /// A down endpoint is refused; automatic failback then leaves the
    /// choice alone until the chosen endpoint fails.
    pub fn activate(&self, name: &str) -> Result<String, ActivateError> {
        let mut st = self.lock();
        let Some(to) = st.endpoints.iter().find(|e| e.name() == name).cloned() else {
            return Err(ActivateError::NotFound(name.to_string()));
        };
        let h = to.health();
        if h.state == HealthState::Down {
            return Err(ActivateError::Down(
                name.to_string(),
                h.last_error.unwrap_or_default(),
            ));
        }
        st.manual = true;
        if Arc::ptr_eq(&to, &st.active.endpoint) {
            return Ok(format!("{name} is already active"));
        }
        self.switch_locked(&mut st, to, reason::MANUAL);
        drop(st);
        self.publish_active_metric();
        Ok(format!("{name} is now active"))
    }

    /// Bump the generation of the active endpoint (its connections move to
    /// where the endpoint now resolves, e.g. a new sentinel master).
    fn refresh(&self, endpoint: &Arc<Endpoint>, why: &str) {
        let mut st = self.lock();
        if Arc::ptr_eq(endpoint, &st.active.endpoint) {
            self.switch_locked(&mut st, endpoint.clone(), why);
        }
    }

    /// Apply a reloaded endpoint list and failover settings. Endpoints that
    /// did not change keep their health; the active one stays active if it
    /// is still listed, else the first healthy one (or the first) is chosen.
    /// A pin from `activate` is dropped (automatic failback applies again).
    pub fn reconfigure(self: &Arc<Self>, specs: Vec<EndpointSpec>, failover: FailoverConfig) {
        let mut st = self.lock();
        let old = std::mem::take(&mut st.endpoints);
        let mut kept = Vec::with_capacity(specs.len());
        for spec in specs {
            match old.iter().find(|e| e.spec.same_as(&spec)) {
                Some(e) => kept.push(e.clone()),
                None => {
                    let e = Arc::new(Endpoint::new(spec));
                    self.spawn_endpoint_tasks(&e);
                    kept.push(e);
                }
            }
        }
        for e in &old {
            if !kept.iter().any(|k| Arc::ptr_eq(k, e)) {
                e.stop.cancel();
                self.metrics.forget_upstream(e.name());
            }
        }
        st.endpoints = kept;
        self.metrics
            .endpoints(&st.endpoints.iter().map(|e| e.name()).collect::<Vec<_>>());
        st.failover = failover;
        // A reload applies the file as written: a choice made by hand no
        // longer holds off automatic failback.
        st.manual = false;
        if !st
            .endpoints
            .iter()
            .any(|e| Arc::ptr_eq(e, &st.active.endpoint))
        {
            let to = st
                .endpoints
                .iter()
                .find(|e| e.health().state == HealthState::Up)
                .or(st.endpoints.first())
                .cloned();
            if let Some(to) = to {
                self.switch_locked(&mut st, to, reason::RELOAD);
            }
        }
        drop(st);
        self.publish_active_metric();
        self.changed.notify_one();
    }

    /// Choose the active endpoint whenever health changes, and once a
    /// second for failback timing.
    async fn supervise(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = self.shutdown.cancelled() => return,
            }
            self.decide();
        }
    }

    /// One decision (see the module docs).
    fn decide(&self) {
        let mut st = self.lock();
        let active = st.active.endpoint.clone();
        let up = |e: &Arc<Endpoint>| e.health().state == HealthState::Up;
        let target = if active.health().state == HealthState::Down {
            st.endpoints
                .iter()
                .find(|e| !Arc::ptr_eq(e, &active) && up(e))
                .cloned()
                .map(|t| (t, reason::DOWN))
        } else if st.failover.failback == Failback::Auto && !st.manual {
            let idx = st
                .endpoints
                .iter()
                .position(|e| Arc::ptr_eq(e, &active))
                .unwrap_or(st.endpoints.len());
            let after = st.failover.failback_after;
            st.endpoints[..idx]
                .iter()
                .find(|e| {
                    let h = e.health();
                    h.state == HealthState::Up && h.up_since.is_some_and(|t| t.elapsed() >= after)
                })
                .cloned()
                .map(|t| (t, reason::FAILBACK))
        } else {
            None
        };
        let Some((to, why)) = target else {
            return;
        };
        if let Some(hook) = self.hook() {
            drop(st);
            // Before the switch: what is written on `to` from now on is
            // recorded.
            if why == reason::DOWN {
                hook.failing_over(&active, &to);
            }
            if why == reason::FAILBACK && hook.failback(&active, &to) {
                return;
            }
            st = self.lock();
            if !Arc::ptr_eq(&st.active.endpoint, &active) {
                return;
            }
        }
        if why == reason::DOWN {
            st.manual = false;
        }
        self.switch_locked(&mut st, to, why);
        drop(st);
        self.publish_active_metric();
    }

    fn hook(&self) -> Option<Arc<dyn SwitchHook>> {
        self.hook
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            .and_then(std::sync::Weak::upgrade)
    }

    /// Tell `hook` of the supervisor's switches and ask it before each
    /// failback.
    pub fn set_hook(&self, hook: std::sync::Weak<dyn SwitchHook>) {
        *self.hook.write().unwrap_or_else(PoisonError::into_inner) = Some(hook);
    }

    /// Switch to `name` as the supervisor would (`why`), without pinning
    /// it as `activate` does: automatic failover and failback go on.
    pub fn switch_automatically(&self, name: &str, why: &str) -> Result<(), ActivateError> {
        let mut st = self.lock();
        let Some(to) = st.endpoints.iter().find(|e| e.name() == name).cloned() else {
            return Err(ActivateError::NotFound(name.to_string()));
        };
        if Arc::ptr_eq(&to, &st.active.endpoint) {
            return Ok(());
        }
        self.switch_locked(&mut st, to, why);
        drop(st);
        self.publish_active_metric();
        Ok(())
    }

    pub fn failover_config(&self) -> FailoverConfig {
        self.lock().failover.clone()
    }

    /// Check `e` every interval (or when nudged) until it is removed.
    async fn check_loop(self: Arc<Self>, e: Arc<Endpoint>) {
        let mut conn: Option<(Stream, BytesMut)> = None;
        let mut last: Option<Instant> = None;
        loop {
            let cfg = self.failover_config();
            if let Some(at) = last {
                let due = at + cfg.check_interval;
                tokio::select! {
                    _ = tokio::time::sleep_until(due.into()) => {}
                    // A connection to the endpoint failed: check at once,
                    // if this is the first sign of trouble. Confirming
                    // checks keep the interval, so `failures_before_down`
                    // still spans (N-1) intervals.
                    _ = e.nudge.notified() => {
                        if e.lock_health().fail_streak > 0 || at.elapsed() < Duration::from_millis(50) {
                            continue;
                        }
                    }
                    // A router saw a MOVED or lost a node: read the slot
                    // map now, at most every `MIN_REFRESH`.
                    _ = refresh_asked(&e) => {
                        let since = at.elapsed();
                        if since < MIN_REFRESH {
                            tokio::time::sleep(MIN_REFRESH - since).await;
                        }
                    }
                    _ = e.stop.cancelled() => return,
                    _ = self.shutdown.cancelled() => return,
                }
            }
            let started = Instant::now();
            last = Some(started);
            let reads = e.data_reads.load(std::sync::atomic::Ordering::Relaxed);
            let result = tokio::time::timeout(cfg.check_timeout, self.check(&e, &mut conn)).await;
            let took = started.elapsed();
            let result = match result {
                Ok(r) => r,
                // Late, while the data path kept reading replies from this
                // endpoint: the sidecar or Redis was busy (a client pulling
                // large values, say), the upstream is not down. Not a
                // failure: one client's load must not make the sidecar
                // fail over. The check's connection is dropped (its reply
                // would come late).
                Err(_) if e.data_reads.load(std::sync::atomic::Ordering::Relaxed) != reads => {
                    conn = None;
                    tracing::debug!(upstream = %e.name(), ?took, "health check late while the upstream kept answering the data path; not counted as a failure");
                    self.metrics.check_late(e.name());
                    continue;
                }
                Err(_) => Err(UpstreamError::unreachable(format!(
                    "health check timed out after {:?}",
                    cfg.check_timeout
                ))),
            };
            if result.is_err() {
                conn = None;
            }
            if self.record(&e, &cfg, result, took) {
                self.changed.notify_one();
            }
        }
    }

    /// PING and ROLE on the checker's connection (made if needed, with the
    /// URL's credentials). `Ok`: the address reached.
    async fn check(
        &self,
        e: &Endpoint,
        conn: &mut Option<(Stream, BytesMut)>,
    ) -> Result<String, UpstreamError> {
        if conn.is_none() {
            let ident = Identity {
                proto: Proto::Resp2,
                db: URL_DB,
                auth: None,
            };
            let c = conn::connect(e, &ident, Some(&self.instance), &self.settings).await?;
            let addr = c.addr.clone();
            let (s, b) = c.into_parts();
            *conn = Some((s, b));
            e.lock_health().address = Some(addr);
        }
        let Some((stream, rbuf)) = conn.as_mut() else {
            return Err(UpstreamError::ConnectionLost);
        };
        if let Some(topo) = &e.cluster {
            return self.check_cluster(e, topo, stream, rbuf).await;
        }
        let cmds = [
            vec![Bytes::from_static(b"PING")],
            vec![Bytes::from_static(b"ROLE")],
        ];
        let replies = roundtrip(stream, rbuf, &cmds, self.settings.max_reply_bulk).await?;
        if crate::wire::is_error(&replies[0]) {
            let msg = conn::error_text(&replies[0]);
            // NOAUTH: the URL has no credentials and clients authenticate
            // themselves. The server answered, so it is up (its role is
            // then unknown).
            if !msg.starts_with("NOAUTH") {
                return Err(UpstreamError::Refused(msg));
            }
        }
        if let Some(role) = role_of(&replies[1]).filter(|r| r != "master") {
            return Err(UpstreamError::unreachable(format!(
                "is a {role}, not a primary"
            )));
        }
        Ok(e.lock_health().address.clone().unwrap_or_default())
    }

    /// A cluster endpoint: read the slot map (`CLUSTER SHARDS`, else
    /// `CLUSTER SLOTS`) and its state. Up when `cluster_state:ok` and every
    /// slot has an owner.
    async fn check_cluster(
        &self,
        e: &Endpoint,
        topo: &Topology,
        stream: &mut Stream,
        rbuf: &mut BytesMut,
    ) -> Result<String, UpstreamError> {
        let cmd =
            |a: &'static [u8], b: &'static [u8]| vec![Bytes::from_static(a), Bytes::from_static(b)];
        let cmds = [
            cmd(b"CLUSTER", b"INFO"),
            cmd(b"CLUSTER", b"SHARDS"),
            cmd(b"CLUSTER", b"SLOTS"),
        ];
        let replies = roundtrip(stream, rbuf, &cmds, self.settings.max_reply_bulk).await?;
        let addr = e.lock_health().address.clone().unwrap_or_default();
        if crate::wire::is_error(&replies[0]) {
            self.metrics.cluster_refresh(e.name(), "error", None);
            return Err(UpstreamError::Refused(conn::error_text(&replies[0])));
        }
        let asked = addr.rsplit_once(':').map_or(addr.as_str(), |(h, _)| h);
        let asked = asked.trim_start_matches('[').trim_end_matches(']');
        let tls = matches!(&e.spec.target, Target::Cluster(c) if c.tls);
        let Some(map) = slots::parse_map(&replies[1], Some(&replies[2]), asked, tls) else {
            self.metrics.cluster_refresh(e.name(), "error", None);
            return Err(UpstreamError::Protocol("unreadable slot map".into()));
        };
        let complete = map.complete();
        let masters = map.masters.len();
        self.metrics.cluster_refresh(
            e.name(),
            "read",
            Some((map.masters.len(), map.replicas.iter().map(Vec::len).sum())),
        );
        let nodes: Vec<String> = map
            .masters
            .iter()
            .chain(map.replicas.iter().flatten())
            .map(SlotMap::addr)
            .collect();
        if topo.set(map) {
            // A node that left the map leaves the metrics too.
            self.metrics.forget_nodes(e.name(), &nodes);
            tracing::info!(upstream = %e.name(), masters, complete, "cluster slot map changed");
            self.metrics.cluster_refresh(e.name(), "changed", None);
        }
        self.metrics.cluster_map_read(e.name());
        if !slots::state_ok(&replies[0]) {
            return Err(UpstreamError::unreachable("cluster_state is not ok"));
        }
        if !complete {
            return Err(UpstreamError::unreachable("some slots have no master"));
        }
        Ok(addr)
    }

    /// Update `e`'s health with one check result; `true` if its state
    /// changed.
    fn record(
        &self,
        e: &Endpoint,
        cfg: &FailoverConfig,
        result: Result<String, UpstreamError>,
        took: Duration,
    ) -> bool {
        self.metrics.check_duration(e.name(), took);
        let mut h = e.lock_health();
        let before = h.state;
        match result {
            Ok(_) => {
                h.ok_streak += 1;
                h.fail_streak = 0;
                h.latency = Some(took);
                h.last_error = None;
                let up = match h.state {
                    HealthState::Unknown => true,
                    HealthState::Down => h.ok_streak >= cfg.successes_before_up.get(),
                    HealthState::Up => false,
                };
                if up {
                    h.state = HealthState::Up;
                    h.up_since = Some(Instant::now());
                }
            }
            Err(err) => {
                h.fail_streak += 1;
                h.ok_streak = 0;
                h.last_error = Some(err.to_string());
                if h.state != HealthState::Down && h.fail_streak >= cfg.failures_before_down.get() {
                    h.state = HealthState::Down;
                    h.up_since = None;
                }
            }
        }
        let after = h.state;
        drop(h);
        self.metrics.upstream_up(e.name(), after == HealthState::Up);
        if before != after {
            tracing::info!(upstream = %e.name(), from = before.as_str(), to = after.as_str(), "upstream health changed");
        }
        before != after
    }

    /// Listen on the sentinels for `+switch-master` of this endpoint's
    /// master: connections then move to the new master at once instead of
    /// after the old one fails. Messages can be lost, so this only speeds
    /// up what the checks and reconnects find anyway.
    async fn watch_sentinels(self: Arc<Self>, e: Arc<Endpoint>) {
        let Target::Sentinel(s) = &e.spec.target else {
            return;
        };
        let master = s.master.clone();
        loop {
            for (host, port) in e.sentinels() {
                let addr = super::url::host_port(&host, port);
                let listened = tokio::select! {
                    r = self.listen_one(&e, &addr, &master) => r,
                    _ = e.stop.cancelled() => return,
                    _ = self.shutdown.cancelled() => return,
                };
                if let Err(err) = listened {
                    tracing::debug!(sentinel = %addr, error = %err, "sentinel subscription ended");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = e.stop.cancelled() => return,
                _ = self.shutdown.cancelled() => return,
            }
        }
    }

    async fn listen_one(&self, e: &Arc<Endpoint>, addr: &str, master: &str) -> Result<(), String> {
        use tokio::io::AsyncReadExt;
        let tcp = tokio::time::timeout(
            self.settings.connect_timeout,
            tokio::net::TcpStream::connect(addr),
        )
        .await
        .map_err(|_| "connect timed out".to_string())?
        .map_err(|err| err.to_string())?;
        let mut stream = Stream::Tcp(tcp);
        let mut cmds: Vec<Vec<Bytes>> = e.sentinel_auth().into_iter().collect();
        cmds.push(vec![
            Bytes::from_static(b"SUBSCRIBE"),
            Bytes::from_static(b"+switch-master"),
        ]);
        let mut rbuf = BytesMut::new();
        let replies = roundtrip(&mut stream, &mut rbuf, &cmds, 1 << 20)
            .await
            .map_err(|err| err.to_string())?;
        if let Some(err) = replies.iter().find(|r| crate::wire::is_error(r)) {
            return Err(conn::error_text(err));
        }
        let mut scanner = ReplyScanner::new(1 << 20);
        let prefix = format!("{master} ");
        loop {
            while let Some(frame) = scanner.next(&mut rbuf).map_err(|err| err.to_string())? {
                // ["message", "+switch-master", "<name> <old-ip> <old-port> <new-ip> <new-port>"]
                if memchr::memmem::find(&frame, prefix.as_bytes()).is_some()
                    && memchr::memmem::find(&frame, b"message").is_some()
                {
                    tracing::info!(upstream = %e.name(), master, "sentinel reported +switch-master");
                    self.nudge(e);
                    self.refresh(e, reason::SENTINEL);
                }
            }
            if stream
                .read_buf(&mut rbuf)
                .await
                .map_err(|err| err.to_string())?
                == 0
            {
                return Err("sentinel closed the connection".into());
            }
        }
    }
}

/// Why an activation was refused.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("no upstream named {0:?}")]
    NotFound(String),
    #[error("upstream {0:?} is down ({1}); not switching to it")]
    Down(String, String),
}
