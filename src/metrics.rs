//! One Prometheus registry with every metric registered at startup (prefix
//! `redis_sidecar_`). Labels are bounded: commands are named only when the
//! command table knows them (else `other`), never per client or per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Handles for one command label, resolved once per command table entry.
pub struct CommandMetrics {
    pub ok: IntCounter,
    /// Redis's error replies (and the upstream's failures).
    pub err: IntCounter,
    /// Refused by the sidecar itself (a policy, `[client_auth]`).
    pub refused: IntCounter,
    pub duration: Histogram,
}

impl std::fmt::Debug for CommandMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommandMetrics")
    }
}

struct Inner {
    registry: Registry,
    /// `process_*` (no prefix, as every Prometheus client names them),
    /// read from `/proc` at each scrape.
    process: Process,
    upstream_latency: HistogramVec,
    migration_phase: IntGaugeVec,
    migration_keys: IntCounterVec,
    migration_bytes: IntCounter,
    migration_backlog: IntGauge,
    migration_pause: prometheus::Gauge,
    commands: IntCounterVec,
    duration: HistogramVec,
    client_connections: IntGauge,
    clients_rejected: IntCounterVec,
    upstream_connections: IntGaugeVec,
    upstream_up: IntGaugeVec,
    upstream_active: IntGaugeVec,
    on_fallback: IntGauge,
    hotkeys_tracked: IntGauge,
    hotkeys_share: prometheus::Gauge,
    failovers: IntCounterVec,
    config_reloads: IntCounterVec,
    check_duration: HistogramVec,
    checks_late: IntCounterVec,
    client_lanes: IntCounterVec,
    protocol_errors: IntCounterVec,
    ttl_enforced: IntCounterVec,
    ttl_append_errors: IntCounterVec,
    access_denied: IntCounterVec,
    ttl_sweep_scanned: IntCounterVec,
    ttl_sweep_passes: IntCounterVec,
    rl_decisions: IntCounterVec,
    rl_delay: HistogramVec,
    rl_tracked: IntGaugeVec,
    rl_overflow: IntCounterVec,
    rl_shared_calls: IntCounterVec,
    rl_fallback: IntCounterVec,
    cache_requests: IntCounterVec,
    cache_invalidations: IntCounterVec,
    cache_bytes: IntGauge,
    cache_entries: IntGauge,
    cache_hot_keys: IntGauge,
    cache_evictions: IntCounter,
    cache_joins: IntCounter,
    cluster_redirects: IntCounterVec,
    cluster_refreshes: IntCounterVec,
    cluster_map_read: IntGaugeVec,
    cluster_nodes: IntGaugeVec,
    cluster_node_connections: IntGaugeVec,
    by_command: Mutex<HashMap<String, Arc<CommandMetrics>>>,
}

/// Cheap to clone: every clone shares the registry.
/// The phases of a live migration, as `migration_phase` labels them.
pub const MIGRATION_PHASES: [&str; 8] = [
    "recording",
    "copying",
    "syncing",
    "cutting_over",
    "done",
    "rolled_back",
    "aborted",
    "failed",
];

/// The results `migration_keys_total` counts.
pub const MIGRATION_RESULTS: [&str; 3] = ["copied", "recopied", "copied_back"];

#[derive(Clone)]
pub struct Metrics(Arc<Inner>);

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        // Metric definitions are static: registering them cannot fail except
        // by a programming error (duplicate names), caught by the tests.
        let registry =
            Registry::new_custom(Some("redis_sidecar".into()), None).expect("static registry");
        let commands = IntCounterVec::new(
            Opts::new(
                "commands_total",
                "Commands answered, by command and result (ok|error|refused: error is Redis's reply or an upstream failure, refused the sidecar's own policy)",
            ),
            &["command", "result"],
        )
        .expect("static metric");
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "command_duration_seconds",
                "Time from reading a command to having its reply",
            )
            .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 18).expect("static buckets")),
            &["command"],
        )
        .expect("static metric");
        let client_connections =
            IntGauge::new("client_connections", "Client connections open").expect("static metric");
        let clients_rejected = IntCounterVec::new(
            Opts::new(
                "client_connections_rejected_total",
                "Client connections refused or closed by a limit",
            ),
            &["reason"],
        )
        .expect("static metric");
        let upstream_connections = IntGaugeVec::new(
            Opts::new(
                "upstream_connections",
                "Upstream connections open, by kind (shared|dedicated)",
            ),
            &["upstream", "kind"],
        )
        .expect("static metric");
        let upstream_up = IntGaugeVec::new(
            Opts::new(
                "upstream_up",
                "1 when the endpoint's health checks say it is up",
            ),
            &["upstream"],
        )
        .expect("static metric");
        let upstream_active = IntGaugeVec::new(
            Opts::new("upstream_active", "1 for the endpoint new requests go to"),
            &["upstream"],
        )
        .expect("static metric");
        let on_fallback = IntGauge::with_opts(Opts::new(
            "upstream_fallback_active",
            "1 while the active endpoint is not the first configured one (a failover or a switch)",
        ))
        .expect("static metric");
        let hotkeys_tracked = IntGauge::with_opts(Opts::new(
            "hotkeys_tracked",
            "Keys in the last complete window's hot-key report ([hotkeys])",
        ))
        .expect("static metric");
        let hotkeys_share = prometheus::Gauge::with_opts(Opts::new(
            "hotkeys_top_share",
            "The share of the last complete window's requests its top keys carry ([hotkeys])",
        ))
        .expect("static metric");
        let failovers = IntCounterVec::new(
            Opts::new(
                "failovers_total",
                "Switches of the active endpoint, by reason (down|failback|manual|reload|sentinel_switch_master)",
            ),
            &["from", "to", "reason"],
        )
        .expect("static metric");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "config_reloads_total",
                "Configuration reloads (SIGHUP, POST /reload), by result (ok|error)",
            ),
            &["result"],
        )
        .expect("static metric");
        let check_duration = HistogramVec::new(
            HistogramOpts::new(
                "upstream_check_duration_seconds",
                "Health check (PING and ROLE) time, failed checks included",
            )
            .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("static buckets")),
            &["upstream"],
        )
        .expect("static metric");
        let checks_late = IntCounterVec::new(
            Opts::new(
                "upstream_checks_late_total",
                "Health checks that timed out while the data path kept reading replies from the endpoint (not counted as failures)",
            ),
            &["upstream"],
        )
        .expect("static metric");
        let client_lanes = IntCounterVec::new(
            Opts::new(
                "client_lanes_total",
                "Clients moved from shared upstream connections to one of their own",
            ),
            &["reason"],
        )
        .expect("static metric");
        let protocol_errors = IntCounterVec::new(
            Opts::new(
                "protocol_errors_total",
                "Malformed or unexpected RESP, by kind",
            ),
            &["kind"],
        )
        .expect("static metric");
        let ttl_enforced = IntCounterVec::new(
            Opts::new(
                "ttl_enforced_total",
                "TTL policy actions, by rule and action (default|clamp|observe)",
            ),
            &["rule", "action"],
        )
        .expect("static metric");
        let ttl_append_errors = IntCounterVec::new(
            Opts::new(
                "ttl_append_errors_total",
                "Error replies to the PEXPIRE a TTL rule appended (never shown to clients)",
            ),
            &["rule"],
        )
        .expect("static metric");
        let access_denied = IntCounterVec::new(
            Opts::new(
                "access_denied_total",
                "Commands refused by the [access] stage, by command",
            ),
            &["command"],
        )
        .expect("static metric");
        let ttl_sweep_scanned = IntCounterVec::new(
            Opts::new(
                "ttl_sweep_keys_scanned_total",
                "Keys the TTL sweeper looked at, by rule",
            ),
            &["rule"],
        )
        .expect("static metric");
        let ttl_sweep_passes = IntCounterVec::new(
            Opts::new(
                "ttl_sweep_passes_total",
                "Complete walks of the keyspace by the TTL sweeper, by rule",
            ),
            &["rule"],
        )
        .expect("static metric");
        let rl_decisions = IntCounterVec::new(
            Opts::new(
                "ratelimit_decisions_total",
                "Rate-limit decisions, by rule and result (allowed|delayed|rejected|observed)",
            ),
            &["rule", "result"],
        )
        .expect("static metric");
        let rl_delay = HistogramVec::new(
            HistogramOpts::new(
                "ratelimit_delay_seconds",
                "How long delay rules held commands, by rule",
            )
            .buckets(prometheus::exponential_buckets(0.000_1, 2.0, 16).expect("static buckets")),
            &["rule"],
        )
        .expect("static metric");
        let rl_tracked = IntGaugeVec::new(
            Opts::new(
                "ratelimit_tracked_keys",
                "Buckets a rate-limit rule holds (per client, ip, user, name or key), as of the last prune",
            ),
            &["rule"],
        )
        .expect("static metric");
        let rl_overflow = IntCounterVec::new(
            Opts::new(
                "ratelimit_overflow_total",
                "Commands counted against a rule's overflow bucket because it tracked max_tracked_keys buckets",
            ),
            &["rule"],
        )
        .expect("static metric");
        let rl_shared_calls = IntCounterVec::new(
            Opts::new(
                "ratelimit_shared_calls_total",
                "Token requests a shared-scope rule sent to the upstream, by result (ok|error)",
            ),
            &["rule", "result"],
        )
        .expect("static metric");
        let rl_fallback = IntCounterVec::new(
            Opts::new(
                "ratelimit_fallback_total",
                "Decisions of a shared-scope rule made by its on_error fallback (upstream unreachable)",
            ),
            &["rule"],
        )
        .expect("static metric");
        let cache_requests = IntCounterVec::new(
            Opts::new(
                "cache_requests_total",
                "Reads a cache rule matched, by rule and result (hit|miss|bypass)",
            ),
            &["rule", "result"],
        )
        .expect("static metric");
        let cache_invalidations = IntCounterVec::new(
            Opts::new(
                "cache_invalidations_total",
                "Cache entries dropped, by reason (tracking|write|flush|switch|reload)",
            ),
            &["reason"],
        )
        .expect("static metric");
        let cache_bytes = IntGauge::new(
            "cache_bytes",
            "Bytes the cache holds (as counted against max_memory)",
        )
        .expect("static metric");
        let cache_entries =
            IntGauge::new("cache_entries", "Entries the cache holds").expect("static metric");
        let cache_hot_keys = IntGauge::new(
            "cache_hot_keys",
            "Keys no cache rule names, cached while hot ([cache.hot_keys])",
        )
        .expect("static metric");
        let cache_evictions = IntCounter::new(
            "cache_evictions_total",
            "Entries evicted to stay within max_memory",
        )
        .expect("static metric");
        let cache_joins = IntCounter::new(
            "cache_singleflight_joins_total",
            "Cache misses that waited for another client's fill of the same entry",
        )
        .expect("static metric");
        let cluster_redirects = IntCounterVec::new(
            Opts::new(
                "cluster_redirects_total",
                "Cluster redirections followed, by kind (moved|ask|retry|noscript|exhausted)",
            ),
            &["upstream", "kind"],
        )
        .expect("static metric");
        let cluster_refreshes = IntCounterVec::new(
            Opts::new(
                "cluster_slot_map_refreshes_total",
                "Slot map reads from the cluster, by result (read|changed|error)",
            ),
            &["upstream", "result"],
        )
        .expect("static metric");
        let cluster_map_read = IntGaugeVec::new(
            Opts::new(
                "cluster_slot_map_read_timestamp_seconds",
                "Unix time of the last successful read of the slot map (its age: time() minus this)",
            ),
            &["upstream"],
        )
        .expect("static metric");
        let cluster_nodes = IntGaugeVec::new(
            Opts::new(
                "cluster_nodes",
                "Cluster nodes in the slot map, by role (master|replica)",
            ),
            &["upstream", "role"],
        )
        .expect("static metric");
        let cluster_node_connections = IntGaugeVec::new(
            Opts::new(
                "cluster_node_connections",
                "Connections open to each node of a cluster endpoint (shared and pinned clients')",
            ),
            &["upstream", "node"],
        )
        .expect("static metric");
        let build_info = IntGaugeVec::new(
            Opts::new("build_info", "The running build (value 1)"),
            &["version"],
        )
        .expect("static metric");
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        let upstream_latency = HistogramVec::new(
            HistogramOpts::new(
                "upstream_request_duration_seconds",
                "From a request's hand-off to an upstream connection to its reply, by endpoint (compare endpoints across a switch)",
            )
            .buckets(prometheus::exponential_buckets(0.000_05, 2.0, 18).expect("static buckets")),
            &["upstream"],
        )
        .expect("static metric");
        let migration_phase = IntGaugeVec::new(
            Opts::new(
                "migration_phase",
                "1 for the phase the last live migration (or failback carry) is in (recording|copying|syncing|cutting_over|done|rolled_back|aborted|failed)",
            ),
            &["phase"],
        )
        .expect("static metric");
        let migration_keys = IntCounterVec::new(
            Opts::new(
                "migration_keys_total",
                "Keys a live migration copied, by result (copied: the first copy, recopied: again after a write, copied_back: to the old endpoint after the cutover)",
            ),
            &["result"],
        )
        .expect("static metric");
        let migration_bytes = IntCounter::new(
            "migration_bytes_total",
            "DUMP payload bytes a live migration copied",
        )
        .expect("static metric");
        let migration_backlog = IntGauge::new(
            "migration_backlog_keys",
            "Keys written during a live migration that wait to be copied again",
        )
        .expect("static metric");
        let migration_pause = prometheus::Gauge::new(
            "migration_cutover_pause_seconds",
            "How long the last cutover held writes",
        )
        .expect("static metric");
        for r in MIGRATION_RESULTS {
            migration_keys.with_label_values(&[r]);
        }
        // Every counter whose labels are known at startup is there at 0.
        for r in ["ok", "error"] {
            config_reloads.with_label_values(&[r]);
        }
        for r in ["max_clients", "idle_timeout"] {
            clients_rejected.with_label_values(&[r]);
        }
        for r in ["large_replies", "deep_pipeline"] {
            client_lanes.with_label_values(&[r]);
        }
        for k in [
            "invalid_multibulk_length",
            "invalid_bulk_length",
            "expected_bulk",
            "inline_too_big",
            "count_too_big",
            "unbalanced_quotes",
            "bad_reply",
            "request_too_big",
            "unexpected_push",
            "unsolicited_reply",
            "upstream_refused_request",
        ] {
            protocol_errors.with_label_values(&[k]);
        }
        for c in [
            Box::new(commands.clone()) as Box<dyn Collector>,
            Box::new(build_info),
            Box::new(upstream_latency.clone()),
            Box::new(migration_phase.clone()),
            Box::new(migration_keys.clone()),
            Box::new(migration_bytes.clone()),
            Box::new(migration_backlog.clone()),
            Box::new(migration_pause.clone()),
            Box::new(cluster_node_connections.clone()),
            Box::new(cluster_redirects.clone()),
            Box::new(cluster_refreshes.clone()),
            Box::new(cluster_map_read.clone()),
            Box::new(cluster_nodes.clone()),
            Box::new(cache_requests.clone()),
            Box::new(cache_invalidations.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_entries.clone()),
            Box::new(cache_hot_keys.clone()),
            Box::new(cache_evictions.clone()),
            Box::new(cache_joins.clone()),
            Box::new(rl_decisions.clone()),
            Box::new(rl_delay.clone()),
            Box::new(rl_tracked.clone()),
            Box::new(rl_overflow.clone()),
            Box::new(rl_shared_calls.clone()),
            Box::new(rl_fallback.clone()),
            Box::new(ttl_sweep_scanned.clone()),
            Box::new(ttl_sweep_passes.clone()),
            Box::new(ttl_enforced.clone()),
            Box::new(ttl_append_errors.clone()),
            Box::new(access_denied.clone()),
            Box::new(duration.clone()),
            Box::new(client_connections.clone()),
            Box::new(clients_rejected.clone()),
            Box::new(upstream_connections.clone()),
            Box::new(upstream_up.clone()),
            Box::new(upstream_active.clone()),
            Box::new(on_fallback.clone()),
            Box::new(hotkeys_tracked.clone()),
            Box::new(hotkeys_share.clone()),
            Box::new(failovers.clone()),
            Box::new(config_reloads.clone()),
            Box::new(check_duration.clone()),
            Box::new(checks_late.clone()),
            Box::new(client_lanes.clone()),
            Box::new(protocol_errors.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Metrics(Arc::new(Inner {
            registry,
            process: Process::new(),
            upstream_latency,
            migration_phase,
            migration_keys,
            migration_bytes,
            migration_backlog,
            migration_pause,
            commands,
            duration,
            client_connections,
            clients_rejected,
            upstream_connections,
            upstream_up,
            upstream_active,
            on_fallback,
            hotkeys_tracked,
            hotkeys_share,
            failovers,
            config_reloads,
            check_duration,
            checks_late,
            client_lanes,
            protocol_errors,
            ttl_enforced,
            ttl_append_errors,
            access_denied,
            ttl_sweep_scanned,
            ttl_sweep_passes,
            rl_decisions,
            rl_delay,
            rl_tracked,
            rl_overflow,
            rl_shared_calls,
            rl_fallback,
            cache_requests,
            cache_invalidations,
            cache_bytes,
            cache_entries,
            cache_hot_keys,
            cache_evictions,
            cache_joins,
            cluster_redirects,
            cluster_refreshes,
            cluster_map_read,
            cluster_nodes,
            cluster_node_connections,
            by_command: Mutex::new(HashMap::new()),
        }))
    }

    /// `ttl_enforced_total{rule, action}` (rules are bounded by the
    /// configuration).
    pub fn ttl_enforced(&self, rule: &str, action: &str) -> IntCounter {
        self.0.ttl_enforced.with_label_values(&[rule, action])
    }

    pub fn ttl_append_errors(&self, rule: &str) -> IntCounter {
        self.0.ttl_append_errors.with_label_values(&[rule])
    }

    pub fn ttl_sweep_scanned(&self, rule: &str) -> IntCounter {
        self.0.ttl_sweep_scanned.with_label_values(&[rule])
    }

    pub fn ttl_sweep_passes(&self, rule: &str) -> IntCounter {
        self.0.ttl_sweep_passes.with_label_values(&[rule])
    }

    /// `ratelimit_decisions_total{rule, result}`.
    pub fn ratelimit_decisions(&self, rule: &str, result: &str) -> IntCounter {
        self.0.rl_decisions.with_label_values(&[rule, result])
    }

    pub fn ratelimit_delay(&self, rule: &str) -> Histogram {
        self.0.rl_delay.with_label_values(&[rule])
    }

    pub fn ratelimit_tracked(&self, rule: &str) -> IntGauge {
        self.0.rl_tracked.with_label_values(&[rule])
    }

    pub fn ratelimit_overflow(&self, rule: &str) -> IntCounter {
        self.0.rl_overflow.with_label_values(&[rule])
    }

    pub fn ratelimit_shared_calls(&self, rule: &str, result: &str) -> IntCounter {
        self.0.rl_shared_calls.with_label_values(&[rule, result])
    }

    pub fn ratelimit_fallback(&self, rule: &str) -> IntCounter {
        self.0.rl_fallback.with_label_values(&[rule])
    }

    pub fn cache_requests(&self, rule: &str, result: &str) -> IntCounter {
        self.0.cache_requests.with_label_values(&[rule, result])
    }

    pub fn cache_invalidations(&self, reason: &str) -> IntCounter {
        self.0.cache_invalidations.with_label_values(&[reason])
    }

    pub fn cache_bytes(&self) -> &IntGauge {
        &self.0.cache_bytes
    }

    pub fn cache_entries(&self) -> &IntGauge {
        &self.0.cache_entries
    }

    pub fn cache_hot_keys(&self) -> &IntGauge {
        &self.0.cache_hot_keys
    }

    pub fn cache_evictions(&self) -> &IntCounter {
        &self.0.cache_evictions
    }

    pub fn cache_joins(&self) -> &IntCounter {
        &self.0.cache_joins
    }

    /// `access_denied_total{command}`: `command` is a name of the command
    /// table or `other`.
    pub fn access_denied(&self, command: &str) -> IntCounter {
        self.0.access_denied.with_label_values(&[command])
    }

    /// Handles for a command label (`other` for commands the table lacks).
    pub fn command(&self, label: &str) -> Arc<CommandMetrics> {
        let mut map = self
            .0
            .by_command
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        map.entry(label.to_string())
            .or_insert_with(|| {
                Arc::new(CommandMetrics {
                    ok: self.0.commands.with_label_values(&[label, "ok"]),
                    err: self.0.commands.with_label_values(&[label, "error"]),
                    refused: self.0.commands.with_label_values(&[label, "refused"]),
                    duration: self.0.duration.with_label_values(&[label]),
                })
            })
            .clone()
    }

    pub fn client_connections(&self) -> &IntGauge {
        &self.0.client_connections
    }

    pub fn client_rejected(&self, reason: &str) {
        self.0.clients_rejected.with_label_values(&[reason]).inc();
    }

    pub fn upstream_connections(&self, upstream: &str, kind: &str) -> IntGauge {
        self.0
            .upstream_connections
            .with_label_values(&[upstream, kind])
    }

    pub fn upstream_up(&self, upstream: &str, up: bool) {
        self.0
            .upstream_up
            .with_label_values(&[upstream])
            .set(i64::from(up));
    }

    /// The last complete hot-key window: keys reported, their share.
    pub fn hotkeys(&self, tracked: usize, share: f64) {
        self.0.hotkeys_tracked.set(tracked as i64);
        self.0.hotkeys_share.set(share);
    }

    /// Whether the active endpoint is a fallback (not the first one).
    pub fn on_fallback(&self, yes: bool) {
        self.0.on_fallback.set(i64::from(yes));
    }

    pub fn upstream_active(&self, upstream: &str, active: bool) {
        self.0
            .upstream_active
            .with_label_values(&[upstream])
            .set(i64::from(active));
    }

    pub fn failover(&self, from: &str, to: &str, reason: &str) {
        self.0
            .failovers
            .with_label_values(&[from, to, reason])
            .inc();
    }

    pub fn config_reload(&self, ok: bool) {
        self.0
            .config_reloads
            .with_label_values(&[if ok { "ok" } else { "error" }])
            .inc();
    }

    pub fn check_duration(&self, upstream: &str, took: std::time::Duration) {
        self.0
            .check_duration
            .with_label_values(&[upstream])
            .observe(took.as_secs_f64());
    }

    /// A client moved to an upstream connection of its own
    /// (`large_replies` or `deep_pipeline`).
    pub fn client_lane(&self, reason: &'static str) {
        self.0.client_lanes.with_label_values(&[reason]).inc();
    }

    /// A health check was late while the endpoint kept answering.
    pub fn check_late(&self, upstream: &str) {
        self.0.checks_late.with_label_values(&[upstream]).inc();
    }

    /// Drop the per-endpoint gauges of an endpoint a reload removed.
    pub fn forget_upstream(&self, upstream: &str) {
        let _ = self.0.upstream_up.remove_label_values(&[upstream]);
        let _ = self.0.upstream_active.remove_label_values(&[upstream]);
        let _ = self.0.check_duration.remove_label_values(&[upstream]);
        let _ = self.0.checks_late.remove_label_values(&[upstream]);
        let _ = self.0.upstream_latency.remove_label_values(&[upstream]);
    }

    pub fn cluster_redirect(&self, upstream: &str, kind: &str) {
        self.0
            .cluster_redirects
            .with_label_values(&[upstream, kind])
            .inc();
    }

    /// A slot map read; `nodes` is the (masters, replicas) of what was
    /// read (`None`: the read failed or changed nothing to count).
    pub fn cluster_refresh(&self, upstream: &str, result: &str, nodes: Option<(usize, usize)>) {
        self.0
            .cluster_refreshes
            .with_label_values(&[upstream, result])
            .inc();
        if let Some((masters, replicas)) = nodes {
            self.0
                .cluster_nodes
                .with_label_values(&[upstream, "master"])
                .set(masters as i64);
            self.0
                .cluster_nodes
                .with_label_values(&[upstream, "replica"])
                .set(replicas as i64);
        }
    }

    /// `node` is a cluster node's address (bounded by the cluster's size).
    pub fn cluster_node_connections(&self, upstream: &str, node: &str) -> IntGauge {
        self.0
            .cluster_node_connections
            .with_label_values(&[upstream, node])
    }

    /// The slot map was just read.
    pub fn cluster_map_read(&self, upstream: &str) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.0
            .cluster_map_read
            .with_label_values(&[upstream])
            .set(now as i64);
    }

    pub fn protocol_error(&self, kind: &str) {
        self.0.protocol_errors.with_label_values(&[kind]).inc();
    }

    /// The endpoints configured (at startup and on reload): their
    /// failover counters are there at 0 for every pair and reason.
    pub fn endpoints(&self, names: &[&str]) {
        for from in names {
            for to in names.iter().filter(|t| *t != from) {
                for why in [
                    "down",
                    "failback",
                    "manual",
                    "reload",
                    "sentinel_switch_master",
                ] {
                    self.0.failovers.with_label_values(&[from, to, why]);
                }
            }
            self.0.checks_late.with_label_values(&[from]);
        }
    }

    /// The live migration entered `phase` (the others go to 0).
    pub fn migration_phase(&self, phase: &str) {
        for p in MIGRATION_PHASES {
            self.0
                .migration_phase
                .with_label_values(&[p])
                .set(i64::from(p == phase));
        }
    }

    /// Keys and bytes a live migration copied, by `result` (one of
    /// [`MIGRATION_RESULTS`]).
    pub fn migration_copied(&self, result: &str, keys: u64, bytes: u64) {
        self.0
            .migration_keys
            .with_label_values(&[result])
            .inc_by(keys);
        self.0.migration_bytes.inc_by(bytes);
    }

    pub fn migration_backlog(&self, keys: usize) {
        self.0.migration_backlog.set(keys as i64);
    }

    pub fn migration_pause(&self, took: std::time::Duration) {
        self.0.migration_pause.set(took.as_secs_f64());
    }

    /// A request's time on `upstream`, from hand-off to reply.
    pub fn upstream_latency(&self, upstream: &str) -> Histogram {
        self.0.upstream_latency.with_label_values(&[upstream])
    }

    /// Drop the series of rate-limit, cache and TTL rules no longer
    /// configured (a reload removed them): `keep` are the rule labels that
    /// stay.
    pub fn forget_rules(&self, keep: &[&str]) {
        let i = &self.0;
        let two = ["rule", "result"];
        for v in [&i.rl_decisions, &i.rl_shared_calls, &i.cache_requests] {
            forget_stale(v.collect(), &two, keep, |l| {
                let _ = v.remove_label_values(l);
            });
        }
        forget_stale(i.ttl_enforced.collect(), &["rule", "action"], keep, |l| {
            let _ = i.ttl_enforced.remove_label_values(l);
        });
        for v in [
            &i.rl_overflow,
            &i.rl_fallback,
            &i.ttl_append_errors,
            &i.ttl_sweep_scanned,
            &i.ttl_sweep_passes,
        ] {
            forget_stale(v.collect(), &["rule"], keep, |l| {
                let _ = v.remove_label_values(l);
            });
        }
        forget_stale(i.rl_tracked.collect(), &["rule"], keep, |l| {
            let _ = i.rl_tracked.remove_label_values(l);
        });
        forget_stale(i.rl_delay.collect(), &["rule"], keep, |l| {
            let _ = i.rl_delay.remove_label_values(l);
        });
    }

    /// Drop the node series of `upstream` for nodes no longer in its slot
    /// map (`nodes`: the `host:port` of every node it has now).
    pub fn forget_nodes(&self, upstream: &str, nodes: &[String]) {
        let v = &self.0.cluster_node_connections;
        let gone = |l: &Labels| {
            l.get("upstream") == Some(&upstream)
                && l.get("node").is_some_and(|n| !nodes.iter().any(|k| k == n))
        };
        forget_where(v.collect(), &["upstream", "node"], gone, |l| {
            let _ = v.remove_label_values(l);
        });
    }

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let mut families = self.0.registry.gather();
        families.extend(self.0.process.gather());
        let _ = TextEncoder::new().encode(&families, &mut buf);
        buf
    }
}

/// A series' labels by name.
type Labels<'a> = HashMap<&'a str, &'a str>;

/// Remove every series of `families` whose labels `gone` says: `remove`
/// gets its label values in the vector's order (`order`).
fn forget_where(
    families: Vec<prometheus::proto::MetricFamily>,
    order: &[&str],
    gone: impl Fn(&Labels) -> bool,
    remove: impl Fn(&[&str]),
) {
    for m in families.iter().flat_map(|f| f.get_metric().to_vec()) {
        let labels: Labels = m
            .get_label()
            .iter()
            .map(|l| (l.name(), l.value()))
            .collect();
        if gone(&labels) {
            let values: Vec<&str> = order
                .iter()
                .map(|n| labels.get(n).copied().unwrap_or(""))
                .collect();
            remove(&values);
        }
    }
}

/// [`forget_where`] for a rule vector (labels `order`, `rule` among them):
/// the series of rules not in `keep`.
fn forget_stale(
    families: Vec<prometheus::proto::MetricFamily>,
    order: &[&str],
    keep: &[&str],
    remove: impl Fn(&[&str]),
) {
    let gone = |l: &Labels| l.get("rule").is_some_and(|r| !keep.contains(r));
    forget_where(families, order, gone, remove);
}

/// `process_*` series of this process, read from `/proc` at each scrape
/// (Linux; elsewhere there are none).
struct Process {
    registry: Registry,
    rss: prometheus::Gauge,
    cpu: prometheus::Counter,
    fds: IntGauge,
    max_fds: IntGauge,
    start: prometheus::Gauge,
    /// The CPU seconds already counted (the counter only grows by deltas).
    cpu_seen: Mutex<f64>,
}

impl Process {
    fn new() -> Process {
        let registry = Registry::new();
        let rss = prometheus::Gauge::new(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
        )
        .expect("static metric");
        let cpu = prometheus::Counter::new(
            "process_cpu_seconds_total",
            "User and system CPU time spent in seconds",
        )
        .expect("static metric");
        let fds =
            IntGauge::new("process_open_fds", "Open file descriptors").expect("static metric");
        let max_fds = IntGauge::new("process_max_fds", "The limit of open file descriptors")
            .expect("static metric");
        let start = prometheus::Gauge::new(
            "process_start_time_seconds",
            "Start time of the process since the Unix epoch in seconds",
        )
        .expect("static metric");
        for c in [
            Box::new(rss.clone()) as Box<dyn Collector>,
            Box::new(cpu.clone()),
            Box::new(fds.clone()),
            Box::new(max_fds.clone()),
            Box::new(start.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Process {
            registry,
            rss,
            cpu,
            fds,
            max_fds,
            start,
            cpu_seen: Mutex::new(0.0),
        }
    }

    fn gather(&self) -> Vec<prometheus::proto::MetricFamily> {
        let Some(stat) = read_proc("/proc/self/stat") else {
            return Vec::new();
        };
        // Fields after the command name (which may hold spaces): state is
        // field 3; utime 14, stime 15, starttime 22, rss 24 (pages).
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest.split_whitespace().collect())
            .unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        // USER_HZ is 100 on every Linux ABI /proc reports in.
        const TICKS: f64 = 100.0;
        const PAGE: f64 = 4096.0;
        if let (Some(u), Some(s)) = (field(14), field(15)) {
            let total = (u + s) / TICKS;
            let mut seen = self.cpu_seen.lock().unwrap_or_else(PoisonError::into_inner);
            if total > *seen {
                self.cpu.inc_by(total - *seen);
                *seen = total;
            }
        }
        if let Some(pages) = field(24) {
            self.rss.set(pages * PAGE);
        }
        let boot = read_proc("/proc/stat").and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("btime "))
                .and_then(|v| v.trim().parse::<f64>().ok())
        });
        if let (Some(boot), Some(ticks)) = (boot, field(22)) {
            self.start.set(boot + ticks / TICKS);
        }
        if let Ok(dir) = std::fs::read_dir("/proc/self/fd") {
            self.fds.set(dir.count() as i64);
        }
        if let Some(limit) = read_proc("/proc/self/limits").and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(3)
                        .and_then(|v| v.parse::<i64>().ok())
                })
        }) {
            self.max_fds.set(limit);
        }
        self.registry.gather()
    }
}

fn read_proc(path: &str) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_node_that_left_the_map_leaves_the_metrics() {
        let m = Metrics::new();
        m.cluster_node_connections("c", "10.0.0.1:7000").set(1);
        m.cluster_node_connections("c", "10.0.0.2:7000").set(1);
        m.cluster_node_connections("other", "10.0.0.2:7000").set(1);
        m.forget_nodes("c", &["10.0.0.1:7000".to_string()]);
        let text = String::from_utf8(m.render()).unwrap_or_default();
        assert!(
            text.contains(r#"node="10.0.0.1:7000",upstream="c""#),
            "{text}"
        );
        assert!(
            !text.contains(r#"node="10.0.0.2:7000",upstream="c""#),
            "{text}"
        );
        assert!(
            text.contains(r#"node="10.0.0.2:7000",upstream="other""#),
            "{text}"
        );
    }
}
