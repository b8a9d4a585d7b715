//! The `redis-sidecar` binary: command line, logging, signals.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use redis_sidecar::Sidecar;
use redis_sidecar::config::{Config, LogFormat, UpstreamConfig, process_env};
use redis_sidecar::policy::Builder;

// No `Debug`: `--upstream` URLs may hold passwords.
/// A Redis-protocol sidecar proxy.
#[derive(Parser, Clone)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (see config/redis-sidecar.example.toml).
    #[arg(long, short = 'c', env = "REDIS_SIDECAR_CONFIG")]
    config: Option<PathBuf>,
    /// Validate the configuration, print the result, and exit.
    #[arg(long)]
    check_config: bool,
    /// Listen address (overrides the file).
    #[arg(long)]
    listen: Option<String>,
    /// Admin HTTP address, "" to disable (overrides the file).
    #[arg(long)]
    admin_listen: Option<String>,
    /// Upstream URL (overrides the file's [[upstream]]). Without it and
    /// without a file: $REDIS_URL, else redis://127.0.0.1:6379.
    #[arg(long)]
    upstream: Vec<String>,
    /// Worker threads (overrides the file).
    #[arg(long)]
    threads: Option<std::num::NonZeroUsize>,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long)]
    log_json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug, Clone)]
enum Command {
    /// Move the app to another configured upstream with its data, live:
    /// start a migration through the admin API (or follow the one running
    /// to NAME), show its progress and end with a summary.
    Migrate {
        /// The upstream to move to.
        #[arg(long)]
        to: String,
        /// Cut over once in sync (else it stops there, kept in sync).
        #[arg(long)]
        cutover: bool,
        /// The admin API (default: the configuration's admin_listen). The
        /// token is the configuration's, or $REDIS_SIDECAR_ADMIN_TOKEN.
        #[arg(long)]
        admin: Option<String>,
    },
    /// The hot keys and big keys the running sidecar saw in its traffic
    /// (needs [hotkeys] enabled = true): a table, like `redis-cli
    /// --hotkeys`, with no LFU policy and no SCAN.
    Hotkeys {
        /// The admin API (default: the configuration's admin_listen). The
        /// token is the configuration's, or $REDIS_SIDECAR_ADMIN_TOKEN.
        #[arg(long)]
        admin: Option<String>,
    },
    /// Report, read-only, what the [[ttl]] rules would change: per rule,
    /// keys sampled with SCAN, how many have no TTL, how many a TTL above
    /// the max (on the first upstream endpoint).
    TtlAudit {
        /// Keys to sample per rule and database.
        #[arg(long, default_value_t = 10_000)]
        sample: u64,
        /// Databases to look at (default: the endpoint URL's).
        #[arg(long)]
        db: Vec<i64>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match load(&cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("redis-sidecar: {e:#}");
            return ExitCode::from(2);
        }
    };
    let validated = match config.validate() {
        Ok(v) => v,
        Err(e) => {
            eprintln!("redis-sidecar: {e}");
            return ExitCode::from(2);
        }
    };
    let admin_url = |admin: &Option<String>| {
        let listen = validated
            .config
            .admin_listen
            .replace("0.0.0.0", "127.0.0.1");
        admin.clone().unwrap_or(format!("http://{listen}"))
    };
    if let Some(Command::Hotkeys { admin }) = &cli.command {
        let mut out = std::io::stdout();
        let token = &validated.config.admin_token;
        return match redis_sidecar::app::hotkeys_cli::run(&admin_url(admin), token, &mut out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("redis-sidecar: hotkeys: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::Migrate { to, cutover, admin }) = &cli.command {
        let admin = admin_url(admin);
        let token = &validated.config.admin_token;
        let mut out = std::io::stdout();
        return match redis_sidecar::app::migrate::cli::run(&admin, token, to, *cutover, &mut out) {
            Ok(redis_sidecar::app::migrate::cli::Outcome::Ok) => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("redis-sidecar: migrate: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Some(Command::TtlAudit { sample, db }) = &cli.command {
        let rt = match tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                eprintln!("redis-sidecar: cannot start the runtime: {e}");
                return ExitCode::FAILURE;
            }
        };
        return match rt.block_on(ttl_audit(&validated, *sample, db)) {
            Ok(report) => {
                print!("{report}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("redis-sidecar: ttl-audit: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    if cli.check_config {
        let ups: Vec<String> = validated
            .upstreams
            .iter()
            .map(|u| format!("{}={}", u.name, u.target))
            .collect();
        println!(
            "configuration OK: listen {}, upstream {}",
            validated.listen,
            ups.join(", ")
        );
        for w in redis_sidecar::policy::access::warnings(&validated.config.access) {
            println!("warning: {w}");
        }
        return ExitCode::SUCCESS;
    }
    init_logging(
        &validated.config.log.level,
        cli.log_json || validated.config.log.format == LogFormat::Json,
    );
    if validated
        .upstreams
        .iter()
        .zip(&cli.upstream)
        .any(|(u, _)| u.target.credentials().is_some())
    {
        tracing::warn!(
            "a password given with --upstream is visible to other users in the process list; put the URL in REDIS_URL or the configuration file (\"${{ENV}}\")"
        );
    }
    // One thread: a current-thread runtime, where waking a task is a
    // queue push rather than a cross-thread notification.
    let threads = validated.config.threads.get();
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    let rt = match builder.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("redis-sidecar: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(validated, cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("redis-sidecar: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// `ttl-audit`: sample each rule's keys on the first endpoint.
async fn ttl_audit(
    v: &redis_sidecar::app::Validated,
    sample: u64,
    dbs: &[i64],
) -> anyhow::Result<String> {
    use redis_sidecar::upstream::{conn, endpoint::Endpoint, pool::ControlConn};
    let spec = v
        .upstreams
        .first()
        .cloned()
        .context("no upstream configured")?;
    let endpoint = Endpoint::new(spec);
    let t = &v.config.timeouts;
    let settings = conn::ConnSettings {
        connect_timeout: t.connect,
        command_timeout: t.command,
        queue_timeout: t.queue,
        max_reply_bulk: 512 << 20,
    };
    let ident = redis_sidecar::upstream::Identity {
        proto: redis_sidecar::wire::Proto::Resp2,
        db: redis_sidecar::upstream::URL_DB,
        auth: None,
    };
    let connected = conn::connect(&endpoint, &ident, None, &settings).await?;
    let mut c = ControlConn::new(
        connected,
        settings.max_reply_bulk,
        settings.command_timeout,
        0,
    );
    let dbs = if dbs.is_empty() {
        vec![endpoint.db()]
    } else {
        dbs.to_vec()
    };
    let mut out = format!(
        "TTL audit of {} (read-only; up to {sample} keys per rule and db)\n\n",
        endpoint.spec.target
    );
    out.push_str("| db | rule | sampled | no TTL | TTL above max | a rule would change |\n|---|---|---|---|---|---|\n");
    for db in dbs {
        for r in redis_sidecar::policy::sweep::audit(&mut c, &v.config.ttl, db, sample).await? {
            out.push_str(&format!(
                "| {db} | {} | {} | {} | {} | {} |\n",
                r.rule, r.sampled, r.no_ttl, r.above_max, r.would_change
            ));
        }
    }
    Ok(out)
}

fn load(cli: &Cli) -> anyhow::Result<Config> {
    let mut config = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            Config::from_toml(&text, &process_env)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
        }
        None => Config::default(),
    };
    if let Some(l) = &cli.listen {
        config.listen = l.clone();
    }
    if let Some(t) = cli.threads {
        config.threads = t;
    }
    if let Some(a) = &cli.admin_listen {
        config.admin_listen = a.clone();
    }
    // From the environment (a container's secret), never the command line.
    if let Some(t) = std::env::var("REDIS_SIDECAR_ADMIN_TOKEN")
        .ok()
        .filter(|t| !t.is_empty())
    {
        config.admin_token = t;
    }
    if !cli.upstream.is_empty() {
        config.upstream = cli
            .upstream
            .iter()
            .enumerate()
            .map(|(i, u)| UpstreamConfig {
                name: format!("upstream{i}"),
                url: u.clone(),
                ..UpstreamConfig::default()
            })
            .collect();
    }
    if config.upstream.is_empty() {
        let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
        config.upstream.push(UpstreamConfig {
            name: "default".into(),
            url,
            ..UpstreamConfig::default()
        });
    }
    Ok(config)
}

fn init_logging(level: &str, json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RUST_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only for a person at a terminal: not in files, journald or
    // container logs.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// Run until SIGTERM/SIGINT; a second signal exits at once. SIGHUP
/// reloads the configuration (the file, with the same command-line
/// overrides); a configuration that fails validation is refused and the
/// running one stays.
async fn run(v: redis_sidecar::app::Validated, cli: Cli) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let loader: redis_sidecar::app::control::Loader = std::sync::Arc::new(move || load(&cli));
    let sidecar = Sidecar::start_with(v, Builder::default(), Some(loader)).await?;
    let control = sidecar.control.clone();
    let token = sidecar.shutdown_token();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        let mut seen = 0;
        loop {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
                _ = hup.recv() => {
                    tracing::info!("SIGHUP: reloading the configuration");
                    // Reading a file blocks; keep it off the runtime thread.
                    let c = control.clone();
                    let _ = tokio::task::spawn_blocking(move || c.reload_by("SIGHUP")).await;
                    continue;
                }
            }
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    "shutting down: no new clients, draining in-flight requests (signal again to exit now)"
                );
                token.cancel();
            } else {
                tracing::warn!("second signal: exiting now");
                std::process::exit(1);
            }
        }
    });
    let drained = sidecar.wait().await;
    tracing::info!(drained, "stopped");
    Ok(())
}
