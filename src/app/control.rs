//! Live changes: configuration reload (SIGHUP and `POST /reload`) and the
//! admin token. A reload re-reads the configuration, validates all of it,
//! and applies it only if everything passed; otherwise the running
//! configuration stays and the error is returned, logged and counted.

use std::sync::{Arc, Mutex, PoisonError};

use crate::config::{Config, ConfigErrors};
use crate::metrics::Metrics;
use crate::policy::{Policies, PolicyErrors, sweep};
use crate::upstream::failover::Upstreams;
use crate::upstream::pool::Pool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Produces the configuration to reload (the binary re-reads its file and
/// applies its command-line overrides).
pub type Loader = Arc<dyn Fn() -> anyhow::Result<Config> + Send + Sync>;

/// Why a reload changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    #[error("no configuration source to reload (started without --config)")]
    NoSource,
    /// The file could not be read or parsed.
    #[error("{0:#}")]
    Load(anyhow::Error),
    #[error(transparent)]
    Invalid(#[from] ConfigErrors),
    #[error("these settings cannot change without a restart: {}", .0.join(", "))]
    RestartNeeded(Vec<&'static str>),
    #[error(transparent)]
    Policy(#[from] PolicyErrors),
}

pub struct Control {
    pub ups: Arc<Upstreams>,
    pub policies: Arc<Policies>,
    /// Live migrations to another endpoint.
    pub migrations: Arc<crate::app::migrate::Migrator>,
    pool: Arc<Pool>,
    tasks: TaskTracker,
    /// Stops the TTL sweepers of the running configuration (a child of
    /// the shutdown token).
    sweepers: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    metrics: Metrics,
    current: Mutex<Config>,
    loader: Option<Loader>,
}

impl Control {
    pub fn new(
        pool: Arc<Pool>,
        policies: Arc<Policies>,
        metrics: Metrics,
        config: Config,
        loader: Option<Loader>,
        tasks: TaskTracker,
        shutdown: CancellationToken,
    ) -> Arc<Control> {
        let sweepers = shutdown.child_token();
        sweep::start(&config.ttl, &pool, &metrics, &tasks, &sweepers);
        let migrations = Arc::new(crate::app::migrate::Migrator::new(
            pool.ups.clone(),
            metrics.clone(),
            policies.clone(),
            pool.clone(),
            tasks.clone(),
            shutdown.clone(),
        ));
        // A weak reference: the migrator holds the upstreams.
        let hook: std::sync::Weak<dyn crate::upstream::failover::SwitchHook> =
            Arc::downgrade(&migrations) as _;
        pool.ups.set_hook(hook);
        Arc::new(Control {
            migrations,
            ups: pool.ups.clone(),
            pool,
            tasks,
            sweepers: Mutex::new(sweepers),
            shutdown,
            policies,
            metrics,
            current: Mutex::new(config),
            loader,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Config> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the running configuration has TTL rules.
    pub fn has_ttl_rules(&self) -> bool {
        !self.lock().ttl.is_empty()
    }

    /// Every command name the running configuration's lists name (access,
    /// rate limits, cache rules), lower case; categories (`@write`) left
    /// out.
    pub fn command_names(&self) -> Vec<String> {
        let c = self.lock();
        let a = &c.access;
        let mut out: Vec<String> = a
            .deny
            .iter()
            .chain(&a.allow)
            .chain(a.users.iter().flat_map(|u| u.deny.iter().chain(&u.allow)))
            .chain(c.rate_limit.iter().flat_map(|r| &r.commands))
            .chain(
                c.cache
                    .rule
                    .iter()
                    .flat_map(|r| r.commands.iter().flatten()),
            )
            .filter(|n| !n.starts_with('@'))
            .map(|n| n.to_ascii_lowercase())
            .collect();
        out.sort_unstable();
        out.dedup();
        out
    }

    /// The token state-changing admin requests need ("" = none).
    pub fn admin_token(&self) -> String {
        self.lock().admin_token.clone()
    }

    /// Reload; `Ok` says what changed, `Err` why nothing did.
    pub fn reload(&self) -> Result<String, ReloadError> {
        self.reload_by("a caller of the library")
    }

    /// [`Control::reload`], asked for by `by` (`SIGHUP`, the admin
    /// request's peer address): logged with what changed, one event per
    /// line.
    pub fn reload_by(&self, by: &str) -> Result<String, ReloadError> {
        let result = self.try_reload();
        self.metrics.config_reload(result.is_ok());
        match &result {
            Ok(msg) => tracing::info!(by = %by, %msg, "configuration reloaded"),
            Err(e) => {
                let text = e.to_string();
                let mut lines = text.lines();
                let first = lines.next().unwrap_or_default();
                tracing::error!(by = %by, error = %first, "configuration reload refused; the running configuration stays");
                // A validation error lists every problem: one line each.
                for problem in lines {
                    let problem = problem.trim_start_matches([' ', '-']);
                    tracing::error!(by = %by, %problem, "configuration reload refused");
                }
            }
        }
        result
    }

    fn try_reload(&self) -> Result<String, ReloadError> {
        let loader = self.loader.as_ref().ok_or(ReloadError::NoSource)?;
        let config = loader().map_err(ReloadError::Load)?;
        let v = config.validate()?;
        let mut current = self.lock();
        let fixed = current.restart_needed(&v.config);
        if !fixed.is_empty() {
            return Err(ReloadError::RestartNeeded(fixed));
        }
        // Policies first: their errors refuse the reload before anything
        // changed.
        let stages = self.policies.apply(&v.config)?;
        let names: Vec<&str> = v.upstreams.iter().map(|u| u.name.as_str()).collect();
        let changes = diff(&current, &v.config);
        let msg = format!(
            "upstreams in priority order: {}; policy stages: {}; changed: {}",
            names.join(", "),
            if stages.is_empty() {
                "none".to_string()
            } else {
                stages.join(", ")
            },
            if changes.is_empty() {
                "nothing".to_string()
            } else {
                changes.join(", ")
            }
        );
        self.ups
            .reconfigure(v.upstreams.clone(), v.config.failover.clone());
        if current.ttl != v.config.ttl {
            let next = self.shutdown.child_token();
            sweep::start(&v.config.ttl, &self.pool, &self.metrics, &self.tasks, &next);
            let old = std::mem::replace(
                &mut *self.sweepers.lock().unwrap_or_else(PoisonError::into_inner),
                next,
            );
            old.cancel();
        }
        // Series of rules that are gone go with them.
        let rules: Vec<&str> = v
            .config
            .rate_limit
            .iter()
            .map(|r| r.name.as_str())
            .chain(v.config.cache.rule.iter().map(|r| r.label()))
            .chain(
                v.config
                    .cache
                    .hot_keys
                    .enabled
                    .then_some(crate::policy::cache::HOT_LABEL),
            )
            .chain(v.config.ttl.iter().map(|r| r.label()))
            .collect();
        self.metrics.forget_rules(&rules);
        *current = v.config;
        Ok(msg)
    }
}

/// What a reload changes, by name (`+` added, `-` removed, `~` changed):
/// `upstream ~cloud`, `rate_limit +burst`, `ttl -session:*`, `access ~`.
/// Never a value: URLs and tokens stay out (names and patterns only).
pub fn diff(old: &Config, new: &Config) -> Vec<String> {
    fn by_name<T: PartialEq>(
        section: &str,
        old: &[T],
        new: &[T],
        name: impl Fn(&T) -> &str,
        out: &mut Vec<String>,
    ) {
        for n in new {
            match old.iter().find(|o| name(o) == name(n)) {
                None => out.push(format!("{section} +{}", name(n))),
                Some(o) if o != n => out.push(format!("{section} ~{}", name(n))),
                Some(_) => {}
            }
        }
        for o in old {
            if !new.iter().any(|n| name(n) == name(o)) {
                out.push(format!("{section} -{}", name(o)));
            }
        }
    }
    let mut out = Vec::new();
    by_name(
        "upstream",
        &old.upstream,
        &new.upstream,
        |u| &u.name,
        &mut out,
    );
    by_name(
        "rate_limit",
        &old.rate_limit,
        &new.rate_limit,
        |r| &r.name,
        &mut out,
    );
    by_name(
        "cache",
        &old.cache.rule,
        &new.cache.rule,
        |r| r.label(),
        &mut out,
    );
    by_name("ttl", &old.ttl, &new.ttl, |r| r.label(), &mut out);
    if old.cache.hot_keys != new.cache.hot_keys {
        out.push("cache.hot_keys ~".into());
    }
    if old.access != new.access {
        out.push("access ~".into());
    }
    if old.failover != new.failover {
        out.push("failover ~".into());
    }
    if old.admin_token != new.admin_token {
        out.push("admin_token ~".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::from_toml(
            &format!("{text}\n[[upstream]]\nname = \"a\"\nurl = \"redis://127.0.0.1:6379\"\n"),
            &|_| None,
        )
        .unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn a_reload_diff_names_what_changed_and_no_value() {
        let old = config(
            "admin_token = \"s3cret-old\"\n[[rate_limit]]\nname = \"gone\"\nrate = \"1/s\"\n[[rate_limit]]\nname = \"kept\"\nrate = \"1/s\"\n[[ttl]]\npattern = \"s:*\"\ndefault = \"1h\"\n",
        );
        let new = config(
            "admin_token = \"s3cret-new\"\n[access]\ndeny = [\"KEYS\"]\n[[rate_limit]]\nname = \"kept\"\nrate = \"2/s\"\n[[rate_limit]]\nname = \"new\"\nrate = \"1/s\"\n",
        );
        let d = diff(&old, &new);
        assert_eq!(
            d,
            [
                "rate_limit ~kept",
                "rate_limit +new",
                "rate_limit -gone",
                "ttl -s:*",
                "access ~",
                "admin_token ~"
            ]
        );
        assert!(!d.concat().contains("s3cret"));
        assert!(diff(&new, &new).is_empty());
    }
}
