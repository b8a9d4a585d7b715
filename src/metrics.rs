//! One Prometheus registry with every metric registered at startup (prefix
//! `redis_sidecar_`). Labels are bounded: commands are named only when the
//! command table knows them (else `other`), never per client or per key.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Handles for one command label, resolved once per command table entry.
pub struct CommandMetrics {
    pub ok: IntCounter,
    pub err: IntCounter,
    pub duration: Histogram,
}

impl std::fmt::Debug for CommandMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("CommandMetrics")
    }
}

struct Inner {
    registry: Registry,
    commands: IntCounterVec,
    duration: HistogramVec,
    client_connections: IntGauge,
    clients_rejected: IntCounterVec,
    upstream_connections: IntGaugeVec,
    upstream_up: IntGaugeVec,
    upstream_active: IntGaugeVec,
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
                "Commands answered, by command and result (ok|error)",
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
        for c in [
            Box::new(commands.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cluster_node_connections.clone()),
            Box::new(cluster_redirects.clone()),
            Box::new(cluster_refreshes.clone()),
            Box::new(cluster_map_read.clone()),
            Box::new(cluster_nodes.clone()),
            Box::new(cache_requests.clone()),
            Box::new(cache_invalidations.clone()),
            Box::new(cache_bytes.clone()),
            Box::new(cache_entries.clone()),
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
            commands,
            duration,
            client_connections,
            clients_rejected,
            upstream_connections,
            upstream_up,
            upstream_active,
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

    /// Prometheus text exposition of every metric.
    pub fn render(&self) -> Vec<u8> {
        let mut buf = Vec::new();
        let _ = TextEncoder::new().encode(&self.0.registry.gather(), &mut buf);
        buf
    }
}
