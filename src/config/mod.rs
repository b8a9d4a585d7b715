//! Configuration: the TOML schema, `${ENV}` expansion, defaults and
//! validation that reports every problem at once.
//!
//! Secrets come from `${ENV}` in string values. Expansion happens after the
//! TOML is parsed, so a parse error can never quote an expanded secret, and
//! no error here ever echoes config text: only field paths and reasons.

use std::fmt;
use std::num::{NonZeroU32, NonZeroUsize};
use std::time::Duration;

use serde::{Deserialize, Deserializer};

pub mod url;

use url::Target;

/// The whole configuration (see `config/redis-sidecar.example.toml`).
/// Its `Debug` never prints a secret (the admin token, URL passwords).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where clients connect.
    pub listen: String,
    /// Admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/upstreams`,
    /// `/reload`); "" disables it.
    pub admin_listen: String,
    /// Bearer token required by the admin endpoints that change state
    /// (`POST /upstreams/{name}/activate`, `POST /reload`); "" = no token.
    pub admin_token: String,
    /// Worker threads. One, like Redis and twemproxy: a sidecar shares its
    /// host with the app and Redis, and one thread avoids cross-thread
    /// wake-ups on every request (measured in README "Performance").
    pub threads: NonZeroUsize,
    /// Upstream endpoints in priority order.
    pub upstream: Vec<UpstreamConfig>,
    pub failover: FailoverConfig,
    pub limits: LimitsConfig,
    pub timeouts: TimeoutsConfig,
    pub pool: PoolConfig,
    pub log: LogConfig,
    /// Commands refused to clients (a policy stage; reloads live).
    pub access: AccessConfig,
    /// Key-pattern TTL rules, first match wins (a policy stage; reloads
    /// live).
    pub ttl: Vec<TtlRule>,
    /// Rate-limit rules; every matching rule applies (a policy stage;
    /// reloads live, unchanged rules keep their buckets).
    pub rate_limit: Vec<RateLimitRule>,
    /// The L1 cache (a policy stage; rules reload live).
    pub cache: CacheConfig,
    /// The hot-key and big-key report from the traffic (a policy stage;
    /// reloads live).
    pub hotkeys: HotKeysConfig,
    /// The sidecar's own password and users (clients AUTH to the sidecar).
    pub client_auth: ClientAuthConfig,
}

/// `[client_auth]`: when set, clients must AUTH (or HELLO .. AUTH) to the
/// sidecar, as to a Redis with `requirepass`; the sidecar uses the
/// upstream URL's credentials.
#[derive(Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientAuthConfig {
    /// The `default` user's password (`AUTH <password>`); `${ENV}` works.
    pub password: Option<String>,
    /// Or a file holding it (a container secret).
    pub password_file: Option<String>,
    /// Named users (`AUTH <name> <password>`).
    pub users: Vec<ClientUser>,
}

#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientUser {
    pub name: String,
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub password_file: Option<String>,
}

/// Passwords never printed.
impl fmt::Debug for ClientAuthConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientAuthConfig")
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("password_file", &self.password_file)
            .field(
                "users",
                &self.users.iter().map(|u| &u.name).collect::<Vec<_>>(),
            )
            .finish()
    }
}

/// `[[ttl]]`: the lifetime of keys matching `pattern`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TtlRule {
    /// A Redis glob (`session:*`, `feed:user:?*`, `[a-z]*`), on raw bytes.
    pub pattern: String,
    /// The rule's name in metrics and logs (default: the pattern).
    #[serde(default)]
    pub name: Option<String>,
    /// A write that leaves a matching key with no TTL gives it this one.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub default: Option<Duration>,
    /// No matching key may live longer: longer TTLs are clamped.
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub max: Option<Duration>,
    /// `enforce`, or `observe` (count what would change, change nothing).
    #[serde(default)]
    pub mode: RuleMode,
    /// Sweep the keyspace for this pattern at this many keys per second
    /// (off when absent): catches keys written by scripts, other apps, or
    /// before the rule existed.
    #[serde(default)]
    pub sweep_rate: Option<NonZeroU32>,
    /// Pause between two sweeps of the keyspace.
    #[serde(default = "default_sweep_every", deserialize_with = "de_duration")]
    pub sweep_every: Duration,
}

fn default_sweep_every() -> Duration {
    Duration::from_secs(600)
}

impl TtlRule {
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.pattern)
    }
}

/// `[hotkeys]`: hot keys and big keys found from the traffic
/// (`GET /hotkeys`, `redis-sidecar hotkeys`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotKeysConfig {
    pub enabled: bool,
    /// Keys kept per window: the most requested (1 to 1,000).
    pub top: usize,
    /// How long a window counts before the next starts.
    #[serde(deserialize_with = "de_duration")]
    pub window: Duration,
    /// A request or a reply at least this large names a big key.
    pub big_key_bytes: ByteSize,
}

impl Default for HotKeysConfig {
    fn default() -> Self {
        HotKeysConfig {
            enabled: false,
            top: 100,
            window: Duration::from_secs(10),
            big_key_bytes: ByteSize(1 << 20),
        }
    }
}

/// `[cache]`: the L1 cache of read replies, kept coherent with Redis.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    /// The bound on everything the cache holds (keys, replies, overhead).
    pub max_memory: ByteSize,
    /// Larger replies are not cached.
    pub max_entry: ByteSize,
    /// `tracking` (Redis tells the sidecar when a key changes) or `ttl`
    /// (entries live at most their rule's ttl).
    pub invalidation: CacheInvalidation,
    /// Which keys are cached, first match wins.
    pub rule: Vec<CacheRule>,
    /// Keys no rule names, cached while they are hot.
    pub hot_keys: HotKeysCacheConfig,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            enabled: false,
            max_memory: ByteSize(64 << 20),
            max_entry: ByteSize(1 << 20),
            invalidation: CacheInvalidation::Tracking,
            rule: Vec::new(),
            hot_keys: HotKeysCacheConfig::default(),
        }
    }
}

/// `[cache.hot_keys]`: a key no rule names is cached, through the same
/// coherent fill as a rule's, once it is read at least `threshold` times
/// in a second, and leaves when its reads fall under half of that.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HotKeysCacheConfig {
    pub enabled: bool,
    /// Reads per second that make a key hot.
    pub threshold: u32,
    /// Hot keys cached at once, at most.
    pub max_keys: usize,
    /// The longest an entry of a hot key lives in the sidecar.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Redis globs of keys never cached as hot.
    pub exclude: Vec<String>,
}

impl Default for HotKeysCacheConfig {
    fn default() -> Self {
        HotKeysCacheConfig {
            enabled: false,
            threshold: 100,
            max_keys: 1000,
            ttl: Duration::from_secs(10),
            exclude: vec!["bull:*".into()],
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum CacheInvalidation {
    #[default]
    Tracking,
    Ttl,
}

/// `[[cache.rule]]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheRule {
    /// A Redis glob every key of the read must match.
    pub pattern: String,
    /// The metric label (default: the pattern).
    #[serde(default)]
    pub name: Option<String>,
    /// The longest an entry lives in the sidecar.
    #[serde(deserialize_with = "de_duration")]
    pub ttl: Duration,
    /// Which reads (default: every read the cache can hold).
    #[serde(default)]
    pub commands: Option<Vec<String>>,
    /// When a read fails because the upstream is unreachable, answer it
    /// from an entry that outage flushed, if younger than this (off by
    /// default: the one case the cache may serve a stale value).
    #[serde(default, deserialize_with = "de_opt_duration")]
    pub stale_if_error: Option<Duration>,
}

impl CacheRule {
    pub fn label(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.pattern)
    }
}

/// `[[rate_limit]]`: a GCRA limit on the commands it matches. Strings are
/// checked when the policy chain is built (`policy::ratelimit`), so every
/// error is reported with its rule index.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitRule {
    /// The rule's name in errors, metrics and logs.
    pub name: String,
    /// Command names (`GET`, `CONFIG|SET`) or ACL categories (`@write`);
    /// empty: every command (but AUTH, HELLO, QUIT, RESET and PING,
    /// which only a rule naming them limits).
    #[serde(default)]
    pub commands: Vec<String>,
    /// A Redis glob the command's keys must match (at least one of them;
    /// for `per = "key"` each matching key has its own bucket).
    #[serde(default)]
    pub pattern: Option<String>,
    /// Client addresses (`10.0.0.0/8`, `::1`, `127.0.0.1`).
    #[serde(default)]
    pub clients: Vec<String>,
    /// Users the client authenticated as (`default` when it did not).
    #[serde(default)]
    pub users: Vec<String>,
    /// Globs on the client's CLIENT SETNAME name.
    #[serde(default)]
    pub client_names: Vec<String>,
    /// What one bucket counts: `client`, `ip`, `user`, `client_name`,
    /// `key` or `global`.
    #[serde(default)]
    pub per: RatePer,
    /// `5000/s`, `100/min`, `10/h`, `1/250ms`.
    pub rate: String,
    /// Commands allowed at once on an idle bucket (default: the rate's
    /// count).
    #[serde(default)]
    pub burst: Option<NonZeroU32>,
    #[serde(default)]
    pub action: RateAction,
    /// `delay`: the longest a command is held; longer waits are rejected.
    #[serde(default = "default_max_delay", deserialize_with = "de_duration")]
    pub max_delay: Duration,
    #[serde(default)]
    pub mode: RuleMode,
    #[serde(default)]
    pub scope: RateScope,
    /// `shared` scope, upstream unreachable: `local`, `allow` or `reject`.
    #[serde(default)]
    pub on_error: RateOnError,
    /// Buckets kept at most (per client, key, ...); see the README for
    /// what happens past it.
    #[serde(default = "default_max_tracked_keys")]
    pub max_tracked_keys: NonZeroUsize,
    /// `shared` scope: prefix of the upstream keys holding the buckets.
    #[serde(default = "default_shared_prefix")]
    pub shared_prefix: String,
    /// `shared` scope: tokens taken from the upstream per round trip
    /// (default: a tenth of the burst; at most the burst).
    #[serde(default)]
    pub shared_batch: Option<NonZeroU32>,
}

fn default_max_delay() -> Duration {
    Duration::from_secs(1)
}

fn default_max_tracked_keys() -> NonZeroUsize {
    NonZeroUsize::new(100_000).unwrap_or(NonZeroUsize::MIN)
}

fn default_shared_prefix() -> String {
    "redis-sidecar:rl:".to_string()
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RatePer {
    Client,
    Ip,
    User,
    ClientName,
    Key,
    #[default]
    Global,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateAction {
    #[default]
    Reject,
    Delay,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateScope {
    #[default]
    Local,
    Shared,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RateOnError {
    #[default]
    Local,
    Allow,
    Reject,
}

/// Whether a policy rule acts or only counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RuleMode {
    #[default]
    Enforce,
    Observe,
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field("listen", &self.listen)
            .field("admin_listen", &self.admin_listen)
            .field(
                "admin_token",
                &if self.admin_token.is_empty() {
                    ""
                } else {
                    "***"
                },
            )
            .field("threads", &self.threads)
            .field("upstream", &self.upstream)
            .field("failover", &self.failover)
            .field("limits", &self.limits)
            .field("timeouts", &self.timeouts)
            .field("pool", &self.pool)
            .field("log", &self.log)
            .field("access", &self.access)
            .field("ttl", &self.ttl)
            .field("rate_limit", &self.rate_limit)
            .field("cache", &self.cache)
            .field("hotkeys", &self.hotkeys)
            .field("client_auth", &self.client_auth)
            .finish()
    }
}

/// `[access]`: commands and ACL categories clients may not run, refused
/// with Redis's `-NOPERM` wording before anything is sent upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccessConfig {
    /// Command names (`KEYS`, `CONFIG|SET`) or ACL categories
    /// (`@dangerous`) that are refused.
    pub deny: Vec<String>,
    /// When not empty, only these commands and categories are allowed
    /// (`deny` still applies on top).
    pub allow: Vec<String>,
    /// Lists for one user (the user a client authenticated as, `default`
    /// when none), used instead of the lists above for that user.
    pub users: Vec<AccessUser>,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessUser {
    pub name: String,
    #[serde(default)]
    pub deny: Vec<String>,
    #[serde(default)]
    pub allow: Vec<String>,
}

#[derive(Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    pub name: String,
    /// `redis://`, `rediss://` (TLS) `[user:password@]host:port[/db]`, or
    /// `redis-sentinel://[user:password@]host:port[,host:port]/master[/db]`.
    pub url: String,
    /// Extra CA certificates (PEM) trusted for `rediss://`, besides the
    /// system roots.
    #[serde(default)]
    pub tls_ca_file: Option<String>,
    /// The name the server certificate must carry, when it differs from the
    /// URL's host (e.g. connecting by IP).
    #[serde(default)]
    pub tls_server_name: Option<String>,
    /// Credentials for the sentinels themselves (`redis-sentinel://` only);
    /// the URL's credentials are the master's.
    #[serde(default)]
    pub sentinel_user: Option<String>,
    #[serde(default)]
    pub sentinel_password: Option<String>,
}

/// Never prints the URL's password or the sentinel password.
impl fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamConfig")
            .field("name", &self.name)
            .field(
                "url",
                &Target::parse(&self.url)
                    .map(|t| t.to_string())
                    .unwrap_or_else(|_| "<invalid>".into()),
            )
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_server_name", &self.tls_server_name)
            .field("sentinel_user", &self.sentinel_user)
            .finish_non_exhaustive()
    }
}

/// Health checks and the choice of the active endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FailoverConfig {
    /// How often each endpoint is checked (PING and ROLE).
    #[serde(deserialize_with = "de_duration")]
    pub check_interval: Duration,
    /// A check that takes longer fails.
    #[serde(deserialize_with = "de_duration")]
    pub check_timeout: Duration,
    /// Consecutive failed checks before an endpoint is down.
    pub failures_before_down: NonZeroUsize,
    /// Consecutive good checks before a down endpoint is up again.
    pub successes_before_up: NonZeroUsize,
    /// `auto`: go back to a higher-priority endpoint once it has been up for
    /// `failback_after`; `manual`: only by `POST /upstreams/{name}/activate`.
    pub failback: Failback,
    #[serde(deserialize_with = "de_duration")]
    pub failback_after: Duration,
    /// Record the keys written while a fallback endpoint is active and copy
    /// them to the recovered endpoint before an automatic failback, which
    /// is cut over like a live migration.
    pub carry_writes: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Failback {
    Auto,
    Manual,
}

impl Default for FailoverConfig {
    fn default() -> Self {
        FailoverConfig {
            check_interval: Duration::from_millis(500),
            check_timeout: Duration::from_secs(1),
            failures_before_down: NonZeroUsize::new(3).unwrap_or(NonZeroUsize::MIN),
            successes_before_up: NonZeroUsize::new(2).unwrap_or(NonZeroUsize::MIN),
            failback: Failback::Auto,
            failback_after: Duration::from_secs(30),
            carry_writes: false,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Client connections at once; more get `-ERR max number of clients reached`.
    pub max_clients: NonZeroUsize,
    /// Largest bulk string in a request (Redis `proto-max-bulk-len`).
    pub max_bulk: ByteSize,
    /// Most arguments in one request.
    pub max_array_len: NonZeroUsize,
    /// Longest inline command.
    pub max_inline: ByteSize,
    /// Largest whole request, all its arguments together (Redis
    /// `client-query-buffer-limit`, 1 GiB): refused from the declared
    /// lengths, before the bytes are buffered.
    pub max_request: ByteSize,
    /// Requests of one client waiting for replies; the client's socket is
    /// not read past this (backpressure, not an error).
    pub max_inflight_per_client: NonZeroUsize,
    /// Replies buffered for a client that does not read; past this the
    /// client is disconnected (as Redis does for output buffer limits).
    pub max_output_buffer: ByteSize,
    /// Close clients idle this long; "0s" never (Redis `timeout 0`).
    #[serde(deserialize_with = "de_duration")]
    pub idle_timeout: Duration,
    /// A client that gets a reply this large, or leaves 16 times this
    /// unread, moves to an upstream connection of its own (its lane): on
    /// a shared connection its replies would be ahead of everyone's.
    pub lane_after_reply: ByteSize,
    /// A client with this many requests in flight moves to its lane too
    /// (a deep pipeline of unknown replies would queue ahead of others).
    pub lane_after_inflight: NonZeroUsize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TimeoutsConfig {
    /// TCP connect plus handshake (HELLO, AUTH, SELECT).
    #[serde(deserialize_with = "de_duration")]
    pub connect: Duration,
    /// Longest wait for a reply (blocking commands excepted); the
    /// connection is then closed and its requests in flight get errors.
    #[serde(deserialize_with = "de_duration")]
    pub command: Duration,
    /// How long a request may wait for an upstream connection.
    #[serde(deserialize_with = "de_duration")]
    pub queue: Duration,
    /// On SIGTERM, how long in-flight requests may take to finish.
    #[serde(deserialize_with = "de_duration")]
    pub shutdown_grace: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    /// Shared (multiplexed) upstream connections per (protocol, db, user).
    /// One by default, like twemproxy's `server_connections: 1`: one FIFO
    /// queue in front of Redis serves clients in arrival order and makes
    /// the largest batches; split over two, a request may wait behind the
    /// other connection's batch as well as its own (a longer tail).
    pub shared_connections: NonZeroUsize,
    /// Distinct (protocol, db, user) identities with shared connections.
    pub max_identities: NonZeroUsize,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `human` or `json`.
    pub format: LogFormat,
    /// A tracing filter such as `info` or `redis_sidecar=debug`.
    pub level: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "127.0.0.1:6380".into(),
            admin_listen: "127.0.0.1:9121".into(),
            admin_token: String::new(),
            threads: NonZeroUsize::MIN,
            upstream: Vec::new(),
            failover: FailoverConfig::default(),
            limits: LimitsConfig::default(),
            timeouts: TimeoutsConfig::default(),
            pool: PoolConfig::default(),
            access: AccessConfig::default(),
            ttl: Vec::new(),
            rate_limit: Vec::new(),
            cache: CacheConfig::default(),
            hotkeys: HotKeysConfig::default(),
            client_auth: ClientAuthConfig::default(),
            log: LogConfig::default(),
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_clients: NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN),
            max_bulk: ByteSize(512 << 20),
            max_array_len: NonZeroUsize::new(i32::MAX as usize).unwrap_or(NonZeroUsize::MIN),
            max_inline: ByteSize(64 << 10),
            max_request: ByteSize(1 << 30),
            max_inflight_per_client: NonZeroUsize::new(1024).unwrap_or(NonZeroUsize::MIN),
            max_output_buffer: ByteSize(64 << 20),
            idle_timeout: Duration::ZERO,
            lane_after_reply: ByteSize(64 << 10),
            lane_after_inflight: NonZeroUsize::new(32).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

impl Default for TimeoutsConfig {
    fn default() -> Self {
        TimeoutsConfig {
            connect: Duration::from_secs(2),
            command: Duration::from_secs(5),
            queue: Duration::from_secs(2),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            shared_connections: NonZeroUsize::MIN,
            max_identities: NonZeroUsize::new(64).unwrap_or(NonZeroUsize::MIN),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Human,
            level: "info".into(),
        }
    }
}

/// A size in bytes, written `512MiB`, `64kb`, `1000k` (the units of
/// redis.conf) or a bare number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(s: &str) -> Result<ByteSize, String> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            "invalid size (use a number with B, KiB, MiB, GiB, KB, MB or GB)".to_string()
        })?;
        // As redis.conf: `1k` is 1000 bytes, `1kb` 1024 (case does not
        // matter); `KiB`, `MiB`, `GiB` are 1024-based too.
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" => 1000,
            "kb" | "kib" => 1 << 10,
            "m" => 1_000_000,
            "mb" | "mib" => 1 << 20,
            "g" => 1_000_000_000,
            "gb" | "gib" => 1 << 30,
            _ => {
                return Err(
                    "invalid size unit (use B, KiB/KB, MiB/MB, GiB/GB, or k, m, g for 1000s)"
                        .to_string(),
                );
            }
        };
        n.checked_mul(mult)
            .map(ByteSize)
            .ok_or_else(|| "size is too large".to_string())
    }

    pub fn as_usize(self) -> usize {
        usize::try_from(self.0).unwrap_or(usize::MAX)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => ByteSize::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let s = String::deserialize(d)?;
    humantime::parse_duration(&s)
        .map_err(|e| serde::de::Error::custom(format!("invalid duration ({e}; use 250ms, 2s, 1m)")))
}

fn de_opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    de_duration(d).map(Some)
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigErrors(pub Vec<String>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid configuration ({} error{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for e in &self.0 {
            write!(f, "\n  - {e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// A deserializer's message without the value it quotes: serde writes
/// `invalid type: integer \`987654321\`, expected a string` and `unknown
/// variant \`X\``, and the value may be a password or a `${VAR}` expanded
/// into the wrong field. What comes from `, expected` on is the schema's
/// (the variants allowed) and stays; so does the name of an unknown field
/// (a key, not a value).
fn without_values(msg: &str) -> String {
    if msg.starts_with("unknown field") {
        return msg.to_string();
    }
    let (head, tail) = msg.split_at(msg.find(", expected").unwrap_or(msg.len()));
    let mut out = String::with_capacity(msg.len());
    let mut quote = None;
    for c in head.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '`' || c == '"' => quote = Some(c),
            None => out.push(c),
        }
    }
    let mut out = out.split_whitespace().collect::<Vec<_>>().join(" ");
    out.push_str(tail);
    out
}

impl Config {
    /// Parse TOML text, expanding `${ENV}` with `env`.
    pub fn from_toml(
        text: &str,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Config, ConfigErrors> {
        let mut value: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            // The message only, never the snippet of config text toml adds.
            let line = e
                .span()
                .map(|s| text[..s.start.min(text.len())].lines().count().max(1));
            ConfigErrors(vec![match line {
                Some(l) => format!("TOML syntax error at line {l}: {}", e.message()),
                None => format!("TOML syntax error: {}", e.message()),
            }])
        })?;
        let mut errors = Vec::new();
        for (k, v) in value.iter_mut() {
            expand_env(v, k, env, &mut errors);
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        // The field path ("failover.check_interval: invalid duration ...")
        // tells the operator where to look; values are never echoed. Each
        // top-level key is tried on its own first (the others at their
        // defaults), so every section's error is reported, not only the
        // first one serde meets.
        let path_error = |e: serde_path_to_error::Error<toml::de::Error>| {
            let path = e.path().to_string();
            let msg = without_values(e.into_inner().message());
            if path == "." {
                msg
            } else {
                format!("{path}: {msg}")
            }
        };
        for (k, v) in &value {
            let mut one = toml::Table::new();
            one.insert(k.clone(), v.clone());
            if let Err(e) = serde_path_to_error::deserialize::<_, Config>(toml::Value::Table(one)) {
                errors.push(path_error(e));
            }
        }
        if !errors.is_empty() {
            return Err(ConfigErrors(errors));
        }
        serde_path_to_error::deserialize(toml::Value::Table(value))
            .map_err(|e| ConfigErrors(vec![path_error(e)]))
    }
}

impl Config {
    /// Settings that differ from `new` and only take effect on a restart
    /// (everything but `[[upstream]]`, `[failover]`, `admin_token` and the
    /// policy sections; `[client_auth]` needs a restart).
    pub fn restart_needed(&self, new: &Config) -> Vec<&'static str> {
        let mut out = Vec::new();
        let checks: [(&'static str, bool); 10] = [
            ("cache.enabled", self.cache.enabled == new.cache.enabled),
            (
                "cache.invalidation",
                self.cache.invalidation == new.cache.invalidation,
            ),
            ("client_auth", self.client_auth == new.client_auth),
            ("listen", self.listen == new.listen),
            ("admin_listen", self.admin_listen == new.admin_listen),
            ("threads", self.threads == new.threads),
            ("limits", self.limits == new.limits),
            ("timeouts", self.timeouts == new.timeouts),
            ("pool", self.pool == new.pool),
            ("log", self.log == new.log),
        ];
        for (name, same) in checks {
            if !same {
                out.push(name);
            }
        }
        out
    }
}

/// Expand `${NAME}` in every string value; `$$` is a literal `$`.
fn expand_env(
    v: &mut toml::Value,
    path: &str,
    env: &dyn Fn(&str) -> Option<String>,
    errors: &mut Vec<String>,
) {
    match v {
        toml::Value::String(s) => match expand_str(s, env) {
            Ok(x) => *s = x,
            Err(name) => errors.push(format!("{path}: environment variable {name} is not set")),
        },
        toml::Value::Array(a) => {
            for (i, x) in a.iter_mut().enumerate() {
                expand_env(x, &format!("{path}[{i}]"), env, errors);
            }
        }
        toml::Value::Table(t) => {
            for (k, x) in t.iter_mut() {
                expand_env(x, &format!("{path}.{k}"), env, errors);
            }
        }
        _ => {}
    }
}

fn expand_str(s: &str, env: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(r) = after.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = after.strip_prefix('{')
            && let Some(end) = r.find('}')
        {
            let name = &r[..end];
            out.push_str(&env(name).ok_or_else(|| name.to_string())?);
            rest = &r[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// The process environment, for [`Config::from_toml`].
pub fn process_env(name: &str) -> Option<String> {
    std::env::var(name).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(n: &str) -> Option<String> {
        (n == "PW").then(|| "s3cret".to_string())
    }

    #[test]
    fn every_section_error_at_once_and_no_value_echoed() {
        let text = "not_a_field = 1\n[failover]\ncheck_interval = \"s3cret-a\"\n[limits]\nmax_bulk = \"s3cret-b\"\n[timeouts]\ncommand = \"s3cret-c\"\n";
        let e = Config::from_toml(text, &|_| None).unwrap_err();
        assert_eq!(e.0.len(), 4, "{e}");
        let text = e.to_string();
        for want in [
            "failover.check_interval",
            "limits.max_bulk",
            "timeouts.command",
            "not_a_field",
        ] {
            assert!(text.contains(want), "{want} missing: {text}");
        }
        assert!(!text.contains("s3cret"), "value echoed: {text}");
    }

    #[test]
    fn debug_never_prints_secrets() {
        let c = Config {
            admin_token: "tok3n-s3cret".into(),
            upstream: vec![UpstreamConfig {
                name: "u".into(),
                url: "redis://app:pa55w0rd@h:6379".into(),
                sentinel_password: Some("sent1nel".into()),
                ..UpstreamConfig::default()
            }],
            ..Config::default()
        };
        let text = format!("{c:?}");
        for secret in ["tok3n-s3cret", "pa55w0rd", "sent1nel"] {
            assert!(!text.contains(secret), "{text}");
        }
    }

    #[test]
    fn size_units_as_redis_conf() {
        for (text, bytes) in [
            ("1k", 1000),
            ("1kb", 1024),
            ("1KB", 1024),
            ("1KiB", 1024),
            ("2m", 2_000_000),
            ("2mb", 2 << 20),
            ("2MiB", 2 << 20),
            ("1g", 1_000_000_000),
            ("1gb", 1 << 30),
            ("512", 512),
            ("512b", 512),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        assert!(ByteSize::parse("1kk").is_err());
        assert!(ByteSize::parse("k").is_err());
    }

    #[test]
    fn defaults_and_env_expansion() {
        let c = Config::from_toml(
            "[[upstream]]\nname = \"a\"\nurl = \"redis://u:${PW}@127.0.0.1:6379/2\"\n[timeouts]\ncommand = \"250ms\"\n[limits]\nmax_bulk = \"1MiB\"\n",
            &env,
        )
        .unwrap();
        assert_eq!(c.timeouts.command, Duration::from_millis(250));
        assert_eq!(c.limits.max_bulk, ByteSize(1 << 20));
        let v = c.validate().unwrap();
        assert_eq!(v.upstreams[0].target.db(), 2);
        assert_eq!(v.listen.port(), 6380);
    }

    #[test]
    fn every_error_at_once_and_no_secret_echoed() {
        let c = Config::from_toml(
            "listen = \"nope\"\n[[upstream]]\nname = \"\"\nurl = \"http://x:${PW}@h\"\n[timeouts]\nconnect = \"0s\"\n",
            &env,
        )
        .unwrap();
        let e = c.validate().unwrap_err();
        assert!(e.0.len() >= 4, "{e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
        let own = Config::from_toml(
            "[[upstream]]\nname = \"a\"\nurl = \"redis://localhost:6380\"\n",
            &env,
        )
        .unwrap();
        let e = own.validate().unwrap_err();
        assert!(e.to_string().contains("own listen address"), "{e}");
        let two = Config::from_toml(
            "[[upstream]]\nname = \"a\"\nurl = \"redis://h:1\"\n[[upstream]]\nname = \"a b\"\nurl = \"redis://h:2\"\ntls_ca_file = \"/x\"\n[[upstream]]\nname = \"a\"\nurl = \"rediss://h:3\"\ntls_ca_file = \"/does/not/exist.pem\"\n",
            &env,
        )
        .unwrap();
        let e = two.validate().unwrap_err().to_string();
        assert!(e.contains("may only contain"), "{e}");
        assert!(
            e.contains("need a rediss:// or rediss-cluster:// URL"),
            "{e}"
        );
        assert!(e.contains("used twice"), "{e}");
        assert!(e.contains("/does/not/exist.pem"), "{e}");
        let e = Config::from_toml("bogus = 1\n", &env).unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let e = Config::from_toml("[[upstream]]\nname=\"a\"\nurl=\"${NOPE}\"\n", &env).unwrap_err();
        assert!(e.to_string().contains("NOPE is not set"), "{e}");
        let e = Config::from_toml("listen = \"secretpw\n", &env).unwrap_err();
        assert!(!e.to_string().contains("secretpw"), "{e}");
    }
}

#[cfg(test)]
mod shipped_files {
    use super::*;

    #[test]
    fn shipped_configs_are_valid() {
        for text in [
            include_str!("../../config/redis-sidecar.example.toml"),
            include_str!("../../config/redis-sidecar.toml"),
        ] {
            let c = Config::from_toml(text, &|_| None).unwrap();
            c.validate().unwrap();
        }
    }
}
