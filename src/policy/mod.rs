//! Policy stages: the chain every client command passes through, whatever
//! path it then takes (answered by the sidecar, shared connection,
//! dedicated connection, inside MULTI, while subscribed).
//!
//! A stage sees the command as an [`Exchange`] with a [`Ctx`] describing its
//! client, and returns a [`Verdict`]: continue (after rewriting the
//! command, appending commands whose replies the sidecar consumes, or
//! registering a [`crate::request::exchange::ReplyAction`]), answer it (a cache hit:
//! inside MULTI the client gets `+QUEUED` and the answer takes its place in
//! the EXEC array), refuse it (inside MULTI, EXEC then answers EXECABORT as
//! Redis does for a command refused at queue time), or delay it (the
//! client's later commands wait behind it; other clients never do).
//!
//! The stages, in the order they run: [`access`] (who may run what),
//! [`ratelimit`] (local GCRA buckets or shared ones in the upstream),
//! [`cache`] (the L1 cache: a hit answers here), [`ttl`] (expiries by key
//! pattern, with [`sweep`] for what it cannot see); [`glob`] is the key
//! pattern matcher they share. [`Builder::check`] is each stage's check of
//! its configuration section, which [`crate::app::validate`] calls.
//!
//! The chain is built from the configuration by one [`Builder`] and held
//! by [`Policies`], which swaps it atomically on reload. A session picks up
//! the new chain at its next command; a command already past the chain
//! finishes with the chain it started with. Stages are shared by every
//! session, so they must be cheap and must not block.

pub mod access;
pub mod cache;
pub mod glob;
pub mod hotkeys;
pub mod ratelimit;
pub mod sweep;
pub mod ttl;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use bytes::Bytes;

use crate::config::Config;
use crate::metrics::Metrics;
use crate::request::command::CommandInfo;
pub use crate::request::exchange::{Exchange, ReplyAction};
use crate::wire::Proto;

/// What the client holds, as a stage sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Nothing: commands go to shared connections.
    Normal,
    /// CLIENT TRACKING (and similar): on its dedicated connection for good.
    Pinned,
    /// WATCH is active.
    Watching,
    /// Inside MULTI: commands are queued.
    Transaction,
    /// Subscribed, MONITOR or CLIENT REPLY: the dedicated connection
    /// streams to the client.
    Streaming,
}

/// What a stage knows about the command's client.
pub struct Ctx<'a> {
    pub client_id: u64,
    pub peer: SocketAddr,
    /// The user the client authenticated as (`None`: it did not, and the
    /// upstream URL's credentials apply).
    pub user: Option<&'a [u8]>,
    pub name: Option<&'a [u8]>,
    /// The client's database (`-1`: the endpoint URL's).
    pub db: i64,
    pub proto: Proto,
    pub mode: Mode,
    /// The command's table entry, when the table knows it.
    pub info: Option<&'a CommandInfo>,
    /// When the command was read (a delay counts from here).
    pub since: std::time::Instant,
    /// Now, as far as a stage needs to know: `since` when the stage is
    /// first asked (no clock read of its own), the time of asking again
    /// after a delay or wait.
    pub now: std::time::Instant,
    /// The client authenticated to the upstream itself (AUTH forwarded),
    /// so its commands run as that user there.
    pub upstream_auth: bool,
}

/// What a stage waits for before it is asked again (a token refill from
/// the upstream). It must end by itself (bounded by a timeout).
pub type Wait = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send + 'static>>;

/// A stage's decision.
pub enum Verdict {
    /// Go on to the next stage, then where the command goes.
    Continue,
    /// Answer the client with this reply (encoded for `ctx.proto`);
    /// nothing is sent upstream.
    Answer(Bytes),
    /// Refuse with this error reply; nothing is sent upstream.
    Refuse(Bytes),
    /// Hold the command (and the client's later ones) until then, then go
    /// on to the next stage: the stage has let it pass at that time.
    Delay(tokio::time::Instant),
    /// Hold the command (and the client's later ones) until this ends,
    /// then ask the same stage again.
    Wait(Wait),
}

impl std::fmt::Debug for Verdict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verdict::Continue => f.write_str("Continue"),
            Verdict::Answer(b) => f.debug_tuple("Answer").field(b).finish(),
            Verdict::Refuse(b) => f.debug_tuple("Refuse").field(b).finish(),
            Verdict::Delay(t) => f.debug_tuple("Delay").field(t).finish(),
            Verdict::Wait(_) => f.write_str("Wait"),
        }
    }
}

/// One policy stage (access, rate limit, cache lookup, TTL rewrite).
pub trait Stage: Send + Sync {
    fn name(&self) -> &'static str;
    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict;
    /// Called about once a second by the policy ticker (pruning idle
    /// state, updating gauges).
    fn tick(&self) {}
}

/// The stages in their order.
#[derive(Clone, Default)]
pub struct Chain {
    stages: Vec<Arc<dyn Stage>>,
}

impl Chain {
    pub fn new(stages: Vec<Arc<dyn Stage>>) -> Chain {
        Chain { stages }
    }

    pub fn is_empty(&self) -> bool {
        self.stages.is_empty()
    }

    pub fn names(&self) -> Vec<&'static str> {
        self.stages.iter().map(|s| s.name()).collect()
    }

    /// Run the stages from `*next` on until one answers, refuses, delays
    /// or waits; then call again with the same `next` (after a delay it
    /// points past the stage that delayed, after a wait at the stage that
    /// waited).
    pub fn run(&self, ctx: &Ctx<'_>, ex: &mut Exchange, next: &mut usize) -> Verdict {
        while let Some(stage) = self.stages.get(*next) {
            match stage.on_command(ctx, ex) {
                Verdict::Continue => *next += 1,
                v @ Verdict::Delay(_) => {
                    *next += 1;
                    return v;
                }
                other => return other,
            }
        }
        Verdict::Continue
    }

    fn tick(&self) {
        for s in &self.stages {
            s.tick();
        }
    }
}

/// A configuration's policy sections did not validate.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    #[error("{field}[{index}]: {reason}")]
    Access {
        /// `access.deny`, `access.users[0].allow` ...
        field: String,
        index: usize,
        reason: access::AccessError,
    },
    #[error("ttl[{index}]: {reason}")]
    Ttl { index: usize, reason: ttl::TtlError },
    #[error("rate_limit[{index}]: {reason}")]
    RateLimit {
        index: usize,
        reason: ratelimit::RateLimitError,
    },
    #[error("cache{}: {reason}", .index.map(|i| format!(".rule[{i}]")).unwrap_or_default())]
    Cache {
        index: Option<usize>,
        reason: cache::CacheError,
    },
    #[error("hotkeys.{field}: {reason}")]
    HotKeys {
        field: &'static str,
        reason: &'static str,
    },
}

/// What stages that talk to the upstream (shared rate limits) need.
#[derive(Clone)]
pub struct Env {
    pub pool: Arc<crate::upstream::pool::Pool>,
    pub tasks: tokio_util::task::TaskTracker,
    pub shutdown: tokio_util::sync::CancellationToken,
}

/// Every policy error of a configuration.
#[derive(Debug, thiserror::Error)]
#[error("invalid policy configuration: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
pub struct PolicyErrors(pub Vec<PolicyError>);

/// Builds the chain from the configuration, in the order of the request
/// flow: access, rate limit, TTL, then the stages an embedder adds
/// (tests). The cache stage will go between rate limit and TTL.
#[derive(Clone, Default)]
pub struct Builder {
    extra: Vec<Arc<dyn Stage>>,
    env: Option<Env>,
    /// Rate-limit buckets of unchanged rules, kept across reloads.
    kept: Arc<ratelimit::Kept>,
    /// The cache's entries and connection, made on the first build with
    /// the cache on, kept across reloads.
    cache: Arc<std::sync::OnceLock<Arc<cache::CacheState>>>,
    /// The hot-key counts, made on the first build with them on, kept
    /// across reloads.
    hotkeys: Arc<std::sync::OnceLock<Arc<hotkeys::HotKeys>>>,
}

impl Builder {
    /// Give stages the upstream (shared rate limits) and the task tracker
    /// (the policy ticker).
    pub fn with_env(mut self, env: Env) -> Builder {
        self.env = Some(env);
        self
    }

    /// Add a stage that is not configured by the file (tests, embedders);
    /// it runs after the configured stages and survives reloads.
    pub fn with_stage(mut self, stage: Arc<dyn Stage>) -> Builder {
        self.extra.push(stage);
        self
    }

    /// Validate the policy sections (every error).
    pub fn check(c: &Config) -> Result<(), crate::config::ConfigErrors> {
        Builder::default()
            .build(c, &Metrics::new())
            .map(|_| ())
            .map_err(|e| crate::config::ConfigErrors(e.0.iter().map(ToString::to_string).collect()))
    }

    pub fn build(&self, c: &Config, metrics: &Metrics) -> Result<Chain, PolicyErrors> {
        let mut errors = Vec::new();
        let mut stages: Vec<Arc<dyn Stage>> = Vec::new();
        match access::Access::from_config(&c.access, metrics) {
            Ok(Some(a)) => stages.push(Arc::new(a)),
            Ok(None) => {}
            Err(e) => errors.extend(e),
        }
        let mut keep = None;
        match ratelimit::RateLimit::from_config(
            &c.rate_limit,
            metrics,
            self.env.as_ref(),
            &self.kept,
        ) {
            Ok((r, k)) => {
                if let Some(r) = r {
                    stages.push(Arc::new(r));
                }
                keep = Some(k);
            }
            Err(e) => errors.extend(e),
        }
        let h = &c.hotkeys;
        if h.top == 0 || h.top > 1000 {
            errors.push(PolicyError::HotKeys {
                field: "top",
                reason: "must be from 1 to 1000",
            });
        } else if h.window < std::time::Duration::from_secs(1) {
            errors.push(PolicyError::HotKeys {
                field: "window",
                reason: "must be at least 1s",
            });
        } else if h.enabled {
            // Before the cache: a read the cache answers counts too.
            let state = self
                .hotkeys
                .get_or_init(|| hotkeys::HotKeys::new(h, metrics));
            stages.push(Arc::new(hotkeys::HotKeysStage::new(state.clone(), h)));
        }
        let state = match (&self.env, c.cache.enabled) {
            (Some(env), true) => Some(self.cache.get_or_init(|| {
                cache::CacheState::start(&c.cache, env, c.timeouts.command, metrics)
            })),
            _ => None,
        };
        match cache::Cache::from_config(&c.cache, metrics, state) {
            Ok(Some(cache)) => stages.push(Arc::new(cache)),
            Ok(None) => {}
            Err(e) => errors.extend(e),
        }
        match ttl::Ttl::from_config(&c.ttl, metrics) {
            Ok(Some(t)) => stages.push(Arc::new(t)),
            Ok(None) => {}
            Err(e) => errors.extend(e),
        }
        stages.extend(self.extra.iter().cloned());
        match (errors.is_empty(), keep) {
            (true, Some(keep)) => {
                self.kept.commit(keep);
                Ok(Chain::new(stages))
            }
            _ => Err(PolicyErrors(errors)),
        }
    }
}

/// The live chain. Sessions cache it with its generation and check the
/// generation (one atomic load) per command, as they do the command table.
pub struct Policies {
    builder: Builder,
    metrics: Metrics,
    current: RwLock<Arc<Chain>>,
    generation: AtomicU64,
    /// Stages added while the sidecar runs (a live migration's): after
    /// the configured ones, kept across reloads until removed.
    runtime: RwLock<Vec<Arc<dyn Stage>>>,
}

impl Policies {
    /// The hot-key report's state, while `[hotkeys]` is on.
    pub fn hotkeys(&self) -> Option<Arc<hotkeys::HotKeys>> {
        let on = self.current().names().contains(&"hotkeys");
        on.then(|| self.builder.hotkeys.get().cloned()).flatten()
    }

    pub fn new(
        builder: Builder,
        config: &Config,
        metrics: Metrics,
    ) -> Result<Arc<Policies>, PolicyErrors> {
        let chain = builder.build(config, &metrics)?;
        let env = builder.env.clone();
        let policies = Arc::new(Policies {
            builder,
            metrics,
            current: RwLock::new(Arc::new(chain)),
            generation: AtomicU64::new(0),
            runtime: RwLock::new(Vec::new()),
        });
        if let Some(env) = env {
            // Stages' upkeep (idle rate-limit buckets) once a second.
            let weak = Arc::downgrade(&policies);
            env.tasks.spawn(async move {
                let mut every = tokio::time::interval(std::time::Duration::from_secs(1));
                every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = every.tick() => {}
                        _ = env.shutdown.cancelled() => return,
                    }
                    match weak.upgrade() {
                        Some(p) => p.current().tick(),
                        None => return,
                    }
                }
            });
        }
        Ok(policies)
    }

    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    pub fn current(&self) -> Arc<Chain> {
        self.current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `POST /cache/flush`: how many entries went (`None`: no cache).
    pub fn flush_cache(&self) -> Option<usize> {
        self.builder
            .cache
            .get()
            .map(|c| c.flush(cache::store::Reason::Flush))
    }

    /// Build the chain for `config` and swap it in; on error the running
    /// chain stays.
    pub fn apply(&self, config: &Config) -> Result<Vec<&'static str>, PolicyErrors> {
        let mut chain = self.builder.build(config, &self.metrics)?;
        chain.stages.extend(
            self.runtime
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .cloned(),
        );
        let names = chain.names();
        self.swap(chain);
        Ok(names)
    }

    fn swap(&self, chain: Chain) {
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(chain);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Add a stage while running (it runs after the configured ones; a
    /// reload keeps it): sessions pick it up at their next command.
    pub fn add_runtime(&self, stage: Arc<dyn Stage>) {
        self.runtime
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .push(stage.clone());
        let mut chain = (*self.current()).clone();
        chain.stages.push(stage);
        self.swap(chain);
    }

    /// Remove the runtime stages named `name`.
    pub fn remove_runtime(&self, name: &str) {
        self.runtime
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|s| s.name() != name);
        let mut chain = (*self.current()).clone();
        chain.stages.retain(|s| s.name() != name);
        self.swap(chain);
    }
}
