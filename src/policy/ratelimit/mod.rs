//! The rate-limit stage: `[[rate_limit]]` rules, GCRA buckets per client,
//! address, user, client name, key or globally.
//!
//! Every rule that matches a command applies; the command passes only if
//! all of them let it. A rule that rejects answers
//! `-ERR rate limit exceeded (rule NAME, retry in N ms)` and what earlier
//! rules charged for the command is given back. A `delay` rule books the
//! command's slot and holds it (the client's later commands wait behind
//! it, in order; other clients never do) up to `max_delay`, past which it
//! rejects. `observe` rules count what they would have done and let
//! everything through.
//!
//! A command counts once per rule (a pipeline of n commands counts n); a
//! `per = "key"` rule counts each of the command's keys that match its
//! pattern in that key's bucket (`MSET a 1 b 2` counts one for `a` and one
//! for `b`). AUTH, HELLO, QUIT, RESET and PING are only limited by a rule
//! that names them.
//!
//! State is bounded: idle buckets are dropped once a second (a bucket is
//! idle when it is full again, so dropping it changes no decision), and a
//! rule holds at most `max_tracked_keys` buckets. Past that, commands of
//! keys (clients, ...) without a bucket share the rule's one overflow
//! bucket, counted in `ratelimit_overflow_total`: a flood of distinct keys
//! cannot buy itself more than one bucket's budget. Rules that did not
//! change keep their buckets across reloads.

pub mod buckets;
pub mod shared;

use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use prometheus::{Histogram, IntCounter, IntGauge};

use self::buckets::{Buckets, Gcra, now_ns};
use self::shared::{RefillMetrics, SharedBucket, SharedClient, Take};
use super::access::{AccessError, Rule as CommandRule};
use super::glob::Glob;
use super::{Ctx, Env, PolicyError, Stage, Verdict};
use crate::config::{RateAction, RateLimitRule, RateOnError, RatePer, RateScope, RuleMode};
use crate::metrics::Metrics;
use crate::request::exchange::Exchange;

/// Connection commands no rule limits unless it names them.
const EXEMPT: &[&str] = &["auth", "hello", "quit", "reset", "ping"];

/// A rule that does not validate.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    #[error("name must not be empty")]
    EmptyName,
    #[error("name {0:?} is already used by another rule")]
    DuplicateName(String),
    /// The value is not quoted back (it may be a `${VAR}` expanded there).
    #[error("rate: use <count>/<period>, e.g. 5000/s, 100/min, 10/h, 1/250ms")]
    BadRate,
    #[error("commands[{index}]: {reason}")]
    Command {
        index: usize,
        #[source]
        reason: AccessError,
    },
    #[error("clients[{0}]: not an IP address or CIDR block")]
    BadClient(usize),
    #[error("pattern must not be empty")]
    EmptyPattern,
}

/// `count/period` as nanoseconds per command.
pub fn parse_rate(s: &str) -> Option<(u64, Duration)> {
    let (count, period) = s.split_once('/')?;
    let count: u64 = count.trim().parse().ok().filter(|&n| n > 0)?;
    let period = match period.trim() {
        "s" | "sec" | "second" => Duration::from_secs(1),
        "m" | "min" | "minute" => Duration::from_secs(60),
        "h" | "hour" => Duration::from_secs(3600),
        "d" | "day" => Duration::from_secs(86_400),
        other => humantime::parse_duration(other).ok()?,
    };
    (!period.is_zero()).then_some((count, period))
}

/// An address block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Cidr {
    addr: IpAddr,
    bits: u8,
}

impl Cidr {
    fn parse(s: &str) -> Option<Cidr> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a.parse::<IpAddr>().ok()?, Some(b.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let bits = bits.unwrap_or(max);
        (bits <= max).then_some(Cidr { addr, bits })
    }

    fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        let masked = |x: u128, width: u32| {
            let shift = width - u32::from(self.bits);
            if shift >= 128 { 0 } else { x >> shift }
        };
        match (self.addr, ip) {
            (IpAddr::V4(a), IpAddr::V4(b)) => {
                masked(u128::from(u32::from(a)), 32) == masked(u128::from(u32::from(b)), 32)
            }
            (IpAddr::V6(a), IpAddr::V6(b)) => {
                masked(u128::from(a), 128) == masked(u128::from(b), 128)
            }
            _ => false,
        }
    }
}

/// A rule's buckets: what survives a reload when the rule is unchanged.
pub struct RuleState {
    local: Buckets<u64>,
    shared: Buckets<Arc<SharedBucket>>,
    /// Shared by every key without a bucket of its own (over the cap).
    overflow: Mutex<u64>,
}

/// The rules' states kept between builds, and the shared-scope
/// connection (one per sidecar).
#[derive(Default)]
pub struct Kept {
    rules: Mutex<Vec<(RateLimitRule, Arc<RuleState>)>>,
    client: OnceLock<Arc<SharedClient>>,
}

/// What a build keeps, committed by [`Kept::commit`] once the whole chain
/// built.
pub struct ToKeep(Vec<(RateLimitRule, Arc<RuleState>)>);

impl Kept {
    pub fn commit(&self, next: ToKeep) {
        *self.rules.lock().unwrap_or_else(PoisonError::into_inner) = next.0;
    }

    fn state(&self, rule: &RateLimitRule) -> Option<Arc<RuleState>> {
        self.rules
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .find(|(r, _)| r == rule)
            .map(|(_, s)| s.clone())
    }
}

struct Counters {
    allowed: IntCounter,
    delayed: IntCounter,
    rejected: IntCounter,
    observed: IntCounter,
    delay: Histogram,
    overflow: IntCounter,
    fallback: IntCounter,
    tracked: IntGauge,
    refill: RefillMetrics,
}

struct Rule {
    name: String,
    /// `None`: every command but the exempt ones.
    commands: Option<Vec<CommandRule>>,
    /// Exempt commands this rule names.
    names_exempt: Vec<&'static str>,
    pattern: Option<Glob>,
    clients: Vec<Cidr>,
    users: Vec<Vec<u8>>,
    client_names: Vec<Glob>,
    per: RatePer,
    gcra: Gcra,
    delay: bool,
    max_delay: Duration,
    observe: bool,
    shared: Option<SharedScope>,
    state: Arc<RuleState>,
    counters: Counters,
}

struct SharedScope {
    client: Option<Arc<SharedClient>>,
    /// Where refills ahead of need run.
    tasks: Option<tokio_util::task::TaskTracker>,
    prefix: Bytes,
    batch: u64,
    on_error: RateOnError,
}

/// Which bucket a charge went to (to give it back).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Sel {
    /// The one the client context names (client, ip, user, name, global).
    Ctx,
    /// The key at this argument index.
    Arg(usize),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum How {
    Local,
    Overflow,
    Lease,
    FallbackLocal,
    Free,
}

/// A short list kept inline (no allocation up to four).
struct Few<T: Copy> {
    inline: [Option<T>; 4],
    len: usize,
    more: Vec<T>,
}

impl<T: Copy> Default for Few<T> {
    fn default() -> Self {
        Few {
            inline: [None; 4],
            len: 0,
            more: Vec::new(),
        }
    }
}

impl<T: Copy> Few<T> {
    fn push(&mut self, t: T) {
        match self.inline.get_mut(self.len) {
            Some(slot) => *slot = Some(t),
            None => self.more.push(t),
        }
        self.len += 1;
    }

    fn len(&self) -> usize {
        self.len
    }

    fn truncate(&mut self, n: usize) {
        if n < self.len {
            self.more.truncate(n.saturating_sub(self.inline.len()));
            for slot in self.inline.iter_mut().skip(n) {
                *slot = None;
            }
            self.len = n;
        }
    }

    fn iter(&self) -> impl Iterator<Item = T> + '_ {
        self.inline
            .iter()
            .flatten()
            .copied()
            .chain(self.more.iter().copied())
    }
}

#[derive(Clone, Copy, Debug)]
struct Charge {
    rule: usize,
    sel: Sel,
    how: How,
}

enum Outcome {
    /// Charged; passes in this many ns.
    Pass(u64, How),
    /// Not charged; would conform in this many ns.
    Limited(u64),
    /// Ask again after this (a refill, or a shared rule's wait).
    Wait(super::Wait),
}

impl Rule {
    fn compile(
        r: &RateLimitRule,
        index: usize,
        metrics: &Metrics,
        env: Option<&Env>,
        kept: &Kept,
        errors: &mut Vec<PolicyError>,
    ) -> Option<Rule> {
        let before = errors.len();
        let mut err = |reason| errors.push(PolicyError::RateLimit { index, reason });
        if r.name.is_empty() {
            err(RateLimitError::EmptyName);
        }
        let rate = parse_rate(&r.rate);
        if rate.is_none() {
            err(RateLimitError::BadRate);
        }
        let mut commands = Vec::new();
        for (i, c) in r.commands.iter().enumerate() {
            match CommandRule::parse(c) {
                Ok(c) => commands.push(c),
                Err(reason) => err(RateLimitError::Command { index: i, reason }),
            }
        }
        let mut clients = Vec::new();
        for (i, c) in r.clients.iter().enumerate() {
            match Cidr::parse(c.trim()) {
                Some(c) => clients.push(c),
                None => err(RateLimitError::BadClient(i)),
            }
        }
        if r.pattern.as_deref() == Some("") {
            err(RateLimitError::EmptyPattern);
        }
        let (count, period) = rate?;
        if errors.len() > before {
            return None;
        }
        let interval = u64::try_from(period.as_nanos() / u128::from(count)).unwrap_or(u64::MAX);
        let burst = r.burst.map_or(count, |b| u64::from(b.get()));
        let names_exempt = EXEMPT
            .iter()
            .copied()
            .filter(|e| commands.iter().any(|c| c.names(e)))
            .collect();
        let all = commands.is_empty() || commands.iter().any(CommandRule::is_all);
        let keyed = r.per != RatePer::Global;
        let state = kept.state(r).unwrap_or_else(|| {
            Arc::new(RuleState {
                local: Buckets::new(keyed, r.max_tracked_keys.get()),
                shared: Buckets::new(keyed, r.max_tracked_keys.get()),
                overflow: Mutex::new(0),
            })
        });
        let label = r.name.as_str();
        let shared = (r.scope == RateScope::Shared).then(|| SharedScope {
            client: env.map(|e| {
                kept.client
                    .get_or_init(|| {
                        SharedClient::start(e.pool.clone(), &e.tasks, e.shutdown.clone())
                    })
                    .clone()
            }),
            tasks: env.map(|e| e.tasks.clone()),
            prefix: Bytes::from(format!("{}{}:", r.shared_prefix, r.name)),
            // All or nothing per call, so never more than the burst.
            batch: r
                .shared_batch
                .map_or(burst / 10, |b| u64::from(b.get()))
                .clamp(1, burst.max(1)),
            on_error: r.on_error,
        });
        Some(Rule {
            name: r.name.clone(),
            commands: (!all).then_some(commands),
            names_exempt,
            pattern: r.pattern.as_ref().map(|p| Glob::new(p.as_bytes())),
            clients,
            users: r.users.iter().map(|u| u.as_bytes().to_vec()).collect(),
            client_names: r
                .client_names
                .iter()
                .map(|n| Glob::new(n.as_bytes()))
                .collect(),
            per: r.per,
            gcra: Gcra::new(interval, burst),
            delay: r.action == RateAction::Delay,
            max_delay: r.max_delay,
            observe: r.mode == RuleMode::Observe,
            shared,
            state,
            counters: Counters {
                allowed: metrics.ratelimit_decisions(label, "allowed"),
                delayed: metrics.ratelimit_decisions(label, "delayed"),
                rejected: metrics.ratelimit_decisions(label, "rejected"),
                observed: metrics.ratelimit_decisions(label, "observed"),
                delay: metrics.ratelimit_delay(label),
                overflow: metrics.ratelimit_overflow(label),
                fallback: metrics.ratelimit_fallback(label),
                tracked: metrics.ratelimit_tracked(label),
                refill: RefillMetrics {
                    ok: metrics.ratelimit_shared_calls(label, "ok"),
                    error: metrics.ratelimit_shared_calls(label, "error"),
                },
            },
        })
    }

    /// Whether the rule applies to the command, by everything but keys.
    fn applies(&self, ctx: &Ctx<'_>, name: &str, cats: &[String]) -> bool {
        // The exempt commands have no subcommands and short names.
        if name.len() <= 5 && EXEMPT.contains(&name) && !self.names_exempt.contains(&name) {
            return false;
        }
        if let Some(cmds) = &self.commands
            && !cmds.iter().any(|c| c.matches(name, cats))
        {
            return false;
        }
        if !self.clients.is_empty() && !self.clients.iter().any(|c| c.contains(ctx.peer.ip())) {
            return false;
        }
        if !self.users.is_empty() {
            let user = ctx.user.unwrap_or(b"default");
            if !self.users.iter().any(|u| u[..] == *user) {
                return false;
            }
        }
        if !self.client_names.is_empty() {
            match ctx.name {
                Some(n) if self.client_names.iter().any(|g| g.matches(n)) => {}
                _ => return false,
            }
        }
        true
    }

    /// The bucket key the client context names.
    fn ctx_key<'a>(&self, ctx: &'a Ctx<'_>, buf: &'a mut [u8; 16]) -> &'a [u8] {
        match self.per {
            RatePer::Client => {
                buf[..8].copy_from_slice(&ctx.client_id.to_be_bytes());
                &buf[..8]
            }
            RatePer::Ip => match ctx.peer.ip() {
                IpAddr::V4(v4) => {
                    buf[..4].copy_from_slice(&v4.octets());
                    &buf[..4]
                }
                IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                    Some(v4) => {
                        buf[..4].copy_from_slice(&v4.octets());
                        &buf[..4]
                    }
                    None => {
                        *buf = v6.octets();
                        &buf[..]
                    }
                },
            },
            RatePer::User => ctx.user.unwrap_or(b"default"),
            RatePer::ClientName => ctx.name.unwrap_or(b""),
            RatePer::Key | RatePer::Global => b"",
        }
    }

    /// The upstream key of a shared bucket.
    fn shared_key(&self, prefix: &Bytes, ctx: &Ctx<'_>, key: &[u8]) -> Bytes {
        let mut b = BytesMut::with_capacity(prefix.len() + key.len() + 24);
        b.put_slice(prefix);
        match self.per {
            RatePer::Client => b.put_slice(format!("client:{}", ctx.client_id).as_bytes()),
            RatePer::Ip => {
                let ip = match ctx.peer.ip() {
                    IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
                    v4 => v4,
                };
                b.put_slice(ip.to_string().as_bytes());
            }
            _ => b.put_slice(key),
        }
        b.freeze()
    }

    /// Charge one bucket.
    fn charge(&self, ctx: &Ctx<'_>, key: &[u8], now: u64, budget: u64) -> Outcome {
        let g = &self.gcra;
        let Some(scope) = &self.shared else {
            return match self
                .state
                .local
                .with(key, now, || 0, |tat| g.charge(tat, now, 1, budget))
            {
                Some(Ok(w)) => Outcome::Pass(w, How::Local),
                Some(Err(r)) => Outcome::Limited(r),
                None => self.overflow(now, budget),
            };
        };
        let Some(bucket) = self
            .state
            .shared
            .with(key, now, Arc::default, |b| b.clone())
        else {
            return self.overflow(now, budget);
        };
        let down = scope.client.as_ref().is_none_or(|c| c.is_down(now));
        match bucket.take(now, 1, down) {
            Take::Taken { left } => {
                if left < scope.batch.div_ceil(2)
                    && let (Some(client), Some(tasks)) = (&scope.client, &scope.tasks)
                    && bucket.start_prefetch()
                {
                    tasks.spawn(shared::refill(
                        bucket,
                        client.clone(),
                        self.shared_key(&scope.prefix, ctx, key),
                        *g,
                        scope.batch,
                        true,
                        self.counters.refill.clone(),
                    ));
                }
                Outcome::Pass(0, How::Lease)
            }
            Take::Retry(r) if r <= budget => {
                Outcome::Wait(Box::pin(tokio::time::sleep(Duration::from_nanos(r))))
            }
            Take::Retry(r) => Outcome::Limited(r),
            Take::Refill => match &scope.client {
                Some(client) => Outcome::Wait(shared::refill(
                    bucket,
                    client.clone(),
                    self.shared_key(&scope.prefix, ctx, key),
                    *g,
                    scope.batch,
                    false,
                    self.counters.refill.clone(),
                )),
                None => Outcome::Pass(0, How::Free),
            },
            Take::Fallback => {
                self.counters.fallback.inc();
                match scope.on_error {
                    RateOnError::Allow => Outcome::Pass(0, How::Free),
                    RateOnError::Reject => {
                        Outcome::Limited(shared::FALLBACK_HOLD.as_nanos() as u64)
                    }
                    RateOnError::Local => match bucket.local(g, now, 1, budget) {
                        Ok(w) => Outcome::Pass(w, How::FallbackLocal),
                        Err(r) => Outcome::Limited(r),
                    },
                }
            }
        }
    }

    fn overflow(&self, now: u64, budget: u64) -> Outcome {
        self.counters.overflow.inc();
        let mut tat = self
            .state
            .overflow
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match self.gcra.charge(&mut tat, now, 1, budget) {
            Ok(w) => Outcome::Pass(w, How::Overflow),
            Err(r) => Outcome::Limited(r),
        }
    }

    fn refund(&self, key: &[u8], how: How) {
        let g = &self.gcra;
        match how {
            How::Local => {
                self.state.local.existing(key, |tat| g.refund(tat, 1));
            }
            How::Overflow => g.refund(
                &mut self
                    .state
                    .overflow
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner),
                1,
            ),
            How::Lease => {
                self.state.shared.existing(key, |b| b.give_back(1));
            }
            How::FallbackLocal => {
                self.state.shared.existing(key, |b| b.local_refund(g, 1));
            }
            How::Free => {}
        }
    }

    fn tick(&self, now: u64) {
        let n = self.state.local.prune(now, |_| false) + self.state.shared.prune(now, |_| false);
        self.counters
            .tracked
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }
}

pub struct RateLimit {
    rules: Vec<Rule>,
}

impl RateLimit {
    /// `None` when there is no rule.
    pub fn from_config(
        rules: &[RateLimitRule],
        metrics: &Metrics,
        env: Option<&Env>,
        kept: &Kept,
    ) -> Result<(Option<RateLimit>, ToKeep), Vec<PolicyError>> {
        let mut errors = Vec::new();
        let mut out = Vec::new();
        for (index, r) in rules.iter().enumerate() {
            if rules[..index].iter().any(|o| o.name == r.name) {
                errors.push(PolicyError::RateLimit {
                    index,
                    reason: RateLimitError::DuplicateName(r.name.clone()),
                });
            }
            if let Some(rule) = Rule::compile(r, index, metrics, env, kept, &mut errors) {
                out.push(rule);
            }
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let keep = ToKeep(
            rules
                .iter()
                .cloned()
                .zip(out.iter().map(|r| r.state.clone()))
                .collect(),
        );
        Ok(((!out.is_empty()).then_some(RateLimit { rules: out }), keep))
    }

    fn refund_all(&self, ctx: &Ctx<'_>, ex: &Exchange, charges: impl Iterator<Item = Charge>) {
        let mut buf = [0u8; 16];
        for c in charges {
            let rule = &self.rules[c.rule];
            match c.sel {
                Sel::Ctx => rule.refund(rule.ctx_key(ctx, &mut buf), c.how),
                Sel::Arg(i) => {
                    if let Some(k) = ex.args().get(i) {
                        rule.refund(k, c.how);
                    }
                }
            }
        }
    }

    fn reject(rule: &Rule, retry_ns: u64) -> Verdict {
        rule.counters.rejected.inc();
        let ms = retry_ns.div_ceil(1_000_000).max(1);
        Verdict::Refuse(Bytes::from(format!(
            "-ERR rate limit exceeded (rule {}, retry in {ms} ms)\r\n",
            rule.name
        )))
    }
}

impl Stage for RateLimit {
    fn name(&self) -> &'static str {
        "rate_limit"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let lowered;
        let name: &str = match ctx.info {
            Some(i) => &i.name,
            None => match ex.args().first() {
                Some(n) => {
                    lowered = String::from_utf8_lossy(n).to_ascii_lowercase();
                    &lowered
                }
                None => return Verdict::Continue,
            },
        };
        let cats: &[String] = ctx.info.map(|i| &i.acl_categories[..]).unwrap_or(&[]);
        let now = buckets::ns_at(ctx.now);
        // What was charged (to give back if a later rule refuses), and the
        // rules that let the command pass with their wait; no allocation
        // for the usual few.
        let mut charges: Few<Charge> = Few::default();
        let mut passed: Few<(usize, u64)> = Few::default();
        let mut keys: Option<Vec<usize>> = None;
        for (ri, rule) in self.rules.iter().enumerate() {
            if !rule.applies(ctx, name, cats) {
                continue;
            }
            // An observing rule holds nothing: what a delay rule would
            // hold is counted as observed too.
            let budget = if rule.delay && !rule.observe {
                let left = rule.max_delay.saturating_sub(ctx.since.elapsed());
                u64::try_from(left.as_nanos()).unwrap_or(u64::MAX)
            } else {
                0
            };
            let start = charges.len();
            let mut wait = 0;
            let mut buf = [0u8; 16];
            let mut charge = |sel: Sel, charges: &mut Few<Charge>| {
                let key: &[u8] = match sel {
                    Sel::Ctx => rule.ctx_key(ctx, &mut buf),
                    Sel::Arg(i) => ex.args().get(i).map_or(&[][..], |k| &k[..]),
                };
                match rule.charge(ctx, key, now, budget) {
                    Outcome::Pass(w, how) => {
                        wait = wait.max(w);
                        charges.push(Charge { rule: ri, sel, how });
                        None
                    }
                    other => Some(other),
                }
            };
            let stop = if rule.per == RatePer::Key || rule.pattern.is_some() {
                // The command's keys (found once for every rule).
                let ks = keys.get_or_insert_with(|| {
                    ctx.info
                        .map(|i| i.keys(ex.args()))
                        .unwrap_or_default()
                        .into_iter()
                        .map(|k| k.index)
                        .collect()
                });
                let mut matching = ks.iter().copied().filter(|&i| {
                    rule.pattern
                        .as_ref()
                        .is_none_or(|g| ex.args().get(i).is_some_and(|k| g.matches(k)))
                });
                if rule.per == RatePer::Key {
                    let mut stop = None;
                    let mut any = false;
                    for i in matching {
                        any = true;
                        stop = charge(Sel::Arg(i), &mut charges);
                        if stop.is_some() {
                            break;
                        }
                    }
                    if !any {
                        continue;
                    }
                    stop
                } else if matching.next().is_some() {
                    charge(Sel::Ctx, &mut charges)
                } else {
                    continue;
                }
            } else {
                charge(Sel::Ctx, &mut charges)
            };
            if rule.observe {
                // Count what enforcing would do; hold nothing.
                match stop {
                    Some(Outcome::Limited(_)) => {
                        self.refund_all(ctx, ex, charges.iter().skip(start));
                        charges.truncate(start);
                        rule.counters.observed.inc();
                    }
                    Some(Outcome::Wait(w)) => {
                        // A shared rule's refill (with a zero budget that
                        // is the only wait): waited for as when enforcing,
                        // so that the count is right.
                        self.refund_all(ctx, ex, charges.iter());
                        return Verdict::Wait(w);
                    }
                    _ if wait > 0 => rule.counters.observed.inc(),
                    _ => rule.counters.allowed.inc(),
                }
                continue;
            }
            match stop {
                Some(Outcome::Limited(retry)) => {
                    self.refund_all(ctx, ex, charges.iter());
                    return Self::reject(rule, retry);
                }
                Some(Outcome::Wait(w)) => {
                    self.refund_all(ctx, ex, charges.iter());
                    return Verdict::Wait(w);
                }
                _ => passed.push((ri, wait)),
            }
        }
        let mut longest = 0;
        for (ri, wait) in passed.iter() {
            let c = &self.rules[ri].counters;
            if wait > 0 {
                c.delayed.inc();
                c.delay.observe(wait as f64 / 1e9);
                longest = longest.max(wait);
            } else {
                c.allowed.inc();
            }
        }
        if longest > 0 {
            Verdict::Delay(tokio::time::Instant::now() + Duration::from_nanos(longest))
        } else {
            Verdict::Continue
        }
    }

    fn tick(&self) {
        let now = now_ns();
        for r in &self.rules {
            r.tick(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        let ns = |s| parse_rate(s).map(|(n, p)| p.as_nanos() / u128::from(n));
        assert_eq!(ns("5000/s"), Some(200_000));
        assert_eq!(ns("100/min"), Some(600_000_000));
        assert_eq!(ns("10/h"), Some(360_000_000_000));
        assert_eq!(ns("1/250ms"), Some(250_000_000));
        assert_eq!(ns("0/s"), None);
        assert_eq!(ns("5000"), None);
        assert_eq!(ns("5/0s"), None);
        assert_eq!(ns("x/s"), None);
    }

    #[test]
    fn cidrs() {
        let c = |s| {
            Cidr::parse(s).unwrap_or(Cidr {
                addr: IpAddr::from([0u8; 16]),
                bits: 200,
            })
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap_or(IpAddr::from([0u8; 4]));
        assert!(c("10.0.0.0/8").contains(ip("10.1.2.3")));
        assert!(!c("10.0.0.0/8").contains(ip("11.1.2.3")));
        assert!(c("127.0.0.1").contains(ip("127.0.0.1")));
        assert!(c("127.0.0.1").contains(ip("::ffff:127.0.0.1")));
        assert!(!c("127.0.0.1").contains(ip("127.0.0.2")));
        assert!(c("0.0.0.0/0").contains(ip("1.2.3.4")));
        assert!(c("::1").contains(ip("::1")));
        assert!(c("fd00::/8").contains(ip("fd12::1")));
        assert!(!c("fd00::/8").contains(ip("fe12::1")));
        assert!(Cidr::parse("10.0.0.0/33").is_none());
        assert!(Cidr::parse("nope").is_none());
    }
}
