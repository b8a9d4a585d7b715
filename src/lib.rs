//! redis-sidecar: a Redis-protocol (RESP2/RESP3) sidecar proxy.
//!
//! An application points its Redis client at the sidecar and notices
//! nothing but the port.
//!
//! # Layers
//!
//! Each module imports only from the ones above it in this list (the test
//! `tests/layers.rs` holds the same table and fails on an import that goes
//! up, or on a cycle between sibling modules):
//!
//! 1. [`wire`]: RESP scanners (requests and replies), values, element
//!    splitting, the error a request meets below the client
//!    ([`wire::error::UpstreamError`], with its source and whether the
//!    request was sent).
//! 2. [`config`]: the TOML schema, `${ENV}`, upstream URLs; no checks that
//!    belong to another module.
//! 3. [`metrics`]: the Prometheus registry.
//! 4. [`request`]: the command table ([`request::command`]), the request
//!    record the policy chain works on ([`request::exchange`]), the
//!    client's output queue ([`request::output`]).
//! 5. [`upstream`]: endpoints, failover, connections, the pool of shared
//!    connections; [`upstream::slots`] and [`upstream::cluster`] for a
//!    Redis Cluster.
//! 6. [`policy`]: the stages (access, rate limit, cache, TTL) and their
//!    chain.
//! 7. [`client`]: the listener and one session per client.
//! 8. [`app`]: validation of a whole configuration, reload, admin HTTP.
//!
//! This file wires them together ([`Sidecar`]).
//!
//! # A request's way
//!
//! 1. [`client`] accepts clients (connection cap) and runs one
//!    [`client::session`] per client: its connection state (protocol, db,
//!    user, name) and its mode (normal, pinned, watching, transaction,
//!    streaming). [`client::clients`] is the registry of live clients the
//!    CLIENT family works on.
//! 2. [`wire::scan`] frames requests with a resumable scanner that keeps
//!    the bytes that arrived (re-encoded when their framing was not
//!    canonical, so what reaches an upstream parses one way only); limits
//!    are checked before anything is buffered.
//! 3. [`request::command`] classifies each command (keys, write flag,
//!    blocking, pub/sub, transaction, connection state) from the table
//!    learned from the upstream's `COMMAND`, with a built-in fallback.
//! 4. The session makes one [`request::exchange::Exchange`] per command
//!    and runs the [`policy`] chain on it, whatever path the command then
//!    takes: stages may answer, refuse, delay, rewrite, append commands
//!    whose replies are consumed, or register a reply action. The chain is
//!    built from the configuration and swapped on reload
//!    ([`policy::Policies`]): [`policy::access`], then [`policy::ratelimit`]
//!    (GCRA buckets in the sidecar or, shared, in the upstream), then
//!    [`policy::cache`] (the L1 cache: a hit is answered here, kept
//!    coherent by CLIENT TRACKING), then [`policy::ttl`] (with
//!    [`policy::sweep`] walking the keyspace for what it cannot see).
//! 5. Connection-state commands are answered by the session (and applied
//!    on the client's dedicated connection when it holds state there);
//!    the rest goes [`upstream`]: stateless commands to shared,
//!    auto-pipelined connections keyed by (protocol, db, user)
//!    ([`upstream::pool`]); a client holding state, or one whose large
//!    replies, unread output or deep pipeline would delay the others on a
//!    shared connection (its lane), to its own dedicated connection. In
//!    front of a cluster, a single-slot command goes straight to its
//!    node's shared connection; the rest (split by slot, fanned out to
//!    the masters, redirected, or answered like `CLUSTER SLOTS`) goes
//!    through a router task ([`upstream::cluster::router`]). On a
//!    streaming connection the sidecar's own replies wait for a marked
//!    PING ([`upstream::Mark`]) so they keep their place. The exchange
//!    travels with the command ([`upstream::Job`]) and the connection
//!    matches replies to exchanges in FIFO order ([`upstream::conn`]).
//! 6. The connection applies the exchange to the replies (appended
//!    replies consumed, EXEC array rebuilt, reply actions run) and
//!    completes the client's entry in its output queue; the ready replies
//!    are written, in request order, by whichever side completed them:
//!    usually that upstream connection, once per read, without a hop
//!    through the session's task. A large reply goes to the client in
//!    parts as it arrives; health checks run on a thread of their own
//!    ([`upstream::failover`]).
//!
//! Around it: [`app::control`] (reload of upstreams and policies) and
//! [`app::admin`] (`/metrics`, `/healthz`, `/readyz`, `/upstreams`,
//! `POST /upstreams/{name}/activate`, `POST /reload`, `POST
//! /cache/flush`). [`Sidecar::start`] wires it all together and tracks
//! every task it spawns, so [`Sidecar::shutdown`] ends them all; tests use
//! it on port 0.

pub mod app;
pub mod client;
pub mod config;
pub mod metrics;
pub mod policy;
pub mod request;
pub mod upstream;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::app::Validated;
use crate::app::control::{Control, Loader};
use crate::client::{SessionLimits, Shared};
use crate::metrics::Metrics;
use crate::policy::{Builder, Policies};
use crate::upstream::conn::ConnSettings;
use crate::upstream::failover::Upstreams;
use crate::upstream::pool::Pool;

/// A running sidecar.
pub struct Sidecar {
    /// Where clients connect (the real port when configured with port 0).
    pub addr: SocketAddr,
    /// Where the admin HTTP listener is, if enabled.
    pub admin_addr: Option<SocketAddr>,
    pub metrics: Metrics,
    pub pool: Arc<Pool>,
    /// Reload and the endpoints' state.
    pub control: Arc<Control>,
    shutdown: CancellationToken,
    server: JoinHandle<()>,
    /// Every task but the server's sessions (which the server tracks):
    /// endpoint checkers, upstream connections, admin connections, the
    /// command-table learner.
    tasks: TaskTracker,
    grace: Duration,
}

impl Sidecar {
    /// Bind the listeners and start serving. `builder` builds the policy
    /// stages from the configuration (and adds an embedder's own).
    pub async fn start(v: Validated, builder: Builder) -> anyhow::Result<Sidecar> {
        Sidecar::start_with(v, builder, None).await
    }

    /// [`Sidecar::start`], with where a reload gets its configuration.
    pub async fn start_with(
        v: Validated,
        builder: Builder,
        loader: Option<Loader>,
    ) -> anyhow::Result<Sidecar> {
        let c = &v.config;
        let listener = TcpListener::bind(v.listen)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", v.listen))?;
        let addr = listener.local_addr()?;
        let metrics = Metrics::new();
        let settings = ConnSettings {
            connect_timeout: c.timeouts.connect,
            command_timeout: c.timeouts.command,
            queue_timeout: c.timeouts.queue,
            // Replies are bounded like requests: Redis itself never sends a
            // bulk larger than proto-max-bulk-len.
            max_reply_bulk: (512usize << 20).max(c.limits.max_bulk.as_usize()),
        };
        let shutdown = CancellationToken::new();
        let tasks = TaskTracker::new();
        let ups = Upstreams::start(
            v.upstreams.clone(),
            c.failover.clone(),
            settings.clone(),
            metrics.clone(),
            shutdown.clone(),
            tasks.clone(),
        )?;
        let pool = Pool::new(
            ups,
            settings,
            c.pool.shared_connections.get(),
            c.pool.max_identities.get(),
            metrics.clone(),
            tasks.clone(),
        );
        pool.set_advertised(addr);
        let builder = builder.with_env(policy::Env {
            pool: pool.clone(),
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
        });
        let policies = Policies::new(builder, c, metrics.clone())?;
        let control = Control::new(
            pool.clone(),
            policies.clone(),
            metrics.clone(),
            c.clone(),
            loader,
            tasks.clone(),
            shutdown.clone(),
        );
        let admin_addr = match v.admin_listen {
            Some(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|e| anyhow::anyhow!("cannot listen on {a} (admin): {e}"))?;
                let admin_addr = l.local_addr()?;
                tasks.spawn(app::admin::serve(
                    l,
                    pool.clone(),
                    control.clone(),
                    metrics.clone(),
                    shutdown.clone(),
                    tasks.clone(),
                ));
                Some(admin_addr)
            }
            None => None,
        };
        tasks.spawn(learn_commands(
            pool.clone(),
            control.clone(),
            shutdown.clone(),
        ));
        let limits = SessionLimits {
            frame: wire::Limits {
                max_bulk: c.limits.max_bulk.as_usize(),
                max_array: c.limits.max_array_len.get(),
                max_inline: c.limits.max_inline.as_usize(),
                max_request: c.limits.max_request.as_usize(),
            },
            max_inflight: c.limits.max_inflight_per_client.get(),
            max_output: c.limits.max_output_buffer.as_usize(),
            idle_timeout: c.limits.idle_timeout,
            lane_reply: c.limits.lane_after_reply.as_usize(),
            lane_inflight: c.limits.lane_after_inflight.get(),
        };
        let shared = Shared::new(
            pool.clone(),
            policies,
            metrics.clone(),
            limits,
            v.client_auth.clone(),
        );
        // A migration another sidecar leads is joined before any client's
        // write can pass unmarked.
        control.migrations.watch().await;
        let server = tokio::spawn(client::serve(
            listener,
            shared,
            c.limits.max_clients.get(),
            shutdown.clone(),
        ));
        warn_exposure(
            v.listen,
            admin_addr,
            &c.admin_token,
            v.client_auth.is_some(),
        );
        let active = pool.ups.active().endpoint;
        let admin = admin_addr.map_or_else(|| "off".to_string(), |a| a.to_string());
        tracing::info!(%addr, %admin, upstream = %active.name(), url = %active.spec.target, version = %env!("CARGO_PKG_VERSION"), "redis-sidecar listening");
        Ok(Sidecar {
            addr,
            admin_addr,
            metrics,
            pool,
            control,
            shutdown,
            server,
            tasks,
            grace: c.timeouts.shutdown_grace,
        })
    }

    /// The token that stops the sidecar (stop accepting, drain, close).
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Stop: no new clients, in-flight requests finish within the grace
    /// period, then every task ends; `true` if every client session
    /// drained in time.
    pub async fn shutdown(self) -> bool {
        self.shutdown.cancel();
        self.wait().await
    }

    /// Wait for the sidecar to stop (after its token was cancelled).
    ///
    /// Shutdown paths: the token stops the accept loops (clients, admin),
    /// the endpoint checkers and the command-table learner; the server
    /// tells each session to stop reading, and each answers what it read
    /// (its dedicated connection ends with it). Once the sessions are gone
    /// (or the grace period is over and they are aborted), the shared
    /// connections' channels are dropped, so their managers end; then every
    /// tracked task is awaited, within what is left of the grace period.
    pub async fn wait(self) -> bool {
        self.shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut server = self.server;
        let drained = match tokio::time::timeout_at(deadline, &mut server).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(grace = ?self.grace, "shutdown grace period over, closing remaining clients");
                server.abort();
                let _ = server.await;
                false
            }
        };
        self.pool.close();
        self.tasks.close();
        if tokio::time::timeout_at(deadline, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                tasks = self.tasks.len(),
                "tasks still running after the grace period"
            );
            return false;
        }
        drained
    }
}

/// Say so at startup when a listener is reachable beyond this host without
/// protection: the admin API can switch upstreams and reload, and clients
/// use the upstream URL's credentials (the sidecar asks them for none).
fn warn_exposure(
    listen: SocketAddr,
    admin: Option<SocketAddr>,
    admin_token: &str,
    client_auth: bool,
) {
    if let Some(a) = admin
        && !a.ip().is_loopback()
        && admin_token.is_empty()
    {
        tracing::warn!(admin = %a, "the admin listener is reachable beyond this host and has no admin_token: anyone who reaches it can reload or switch upstreams; set REDIS_SIDECAR_ADMIN_TOKEN or listen on 127.0.0.1");
    }
    if !listen.ip().is_loopback() && !client_auth {
        tracing::warn!(%listen, "the client listener is reachable beyond this host without [client_auth]: anyone who reaches it uses the upstream URL's credentials; set a client password or keep it on 127.0.0.1 or a private network");
    }
}

/// Learn the command table, retrying in the background until it works,
/// and again whenever the active endpoint changes (it may run another
/// Redis version).
async fn learn_commands(pool: Arc<Pool>, control: Arc<Control>, shutdown: CancellationToken) {
    let mut changes = pool.ups.subscribe();
    loop {
        let mut delay = Duration::from_millis(200);
        let endpoint = changes.borrow_and_update().endpoint.clone();
        let mut warned = false;
        loop {
            match pool.learn_commands().await {
                Ok(n) => {
                    let version = pool.server_version();
                    tracing::info!(upstream = %endpoint.name(), commands = n, %version, "learned the command table from the upstream");
                    // Once per table: a rule naming a command this
                    // upstream lacks (an older Redis, a renamed command)
                    // never matches.
                    let table = pool.table();
                    for name in control.command_names() {
                        if !table.knows(&name) {
                            tracing::warn!(upstream = %endpoint.name(), command = %name, "a configured command is not in the upstream's command table: rules naming it never match");
                        }
                    }
                    if control.has_ttl_rules()
                        && upstream::pool::supports_expire_options(&version) == Some(false)
                    {
                        tracing::warn!(upstream = %endpoint.name(), %version, "TTL rules append PEXPIRE .. NX/LT, which need Redis 7.0: on this upstream they fail (counted in ttl_append_errors_total); in-place SET rewrites still apply");
                    }
                    break;
                }
                // Once: without a password in the URL this fails until a
                // client authenticates, and the built-in table serves.
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(upstream = %endpoint.name(), error = %e, "cannot learn the command table yet (tried again with the first credentials a client authenticates with); using the built-in one");
                }
                Err(e) => {
                    tracing::debug!(upstream = %endpoint.name(), error = %e, "cannot learn the command table yet");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
        // Wait for a different endpoint (a sentinel refresh keeps the same).
        loop {
            tokio::select! {
                r = changes.changed() => if r.is_err() { return },
                _ = shutdown.cancelled() => return,
            }
            if !Arc::ptr_eq(&changes.borrow_and_update().endpoint, &endpoint) {
                break;
            }
        }
    }
}
