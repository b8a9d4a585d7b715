//! The L1 cache stage: hot reads answered by the sidecar, never with a
//! value Redis has already replaced.
//!
//! A read is cached when a `[[cache.rule]]` covers it: its command is one
//! of the rule's (by default every deterministic read-only command the
//! cache can hold, [`CACHEABLE`]) and every key it reads matches the rule's
//! pattern (the first rule whose pattern matches the first key). Entries are
//! keyed by (db, user, command, arguments). Reads inside MULTI, from a
//! client holding WATCH or another pinned state, or from a client that
//! authenticated to the upstream itself (fills run with the URL's
//! credentials) are not cached (`bypass`).
//!
//! A miss waits for a fill ([`tracker`]); concurrent misses of one entry
//! wait for the same fill (single flight). Coherence:
//! - Redis's invalidation pushes drop entries of changed keys (and a null
//!   one, after FLUSHALL/FLUSHDB, everything);
//! - a write through the sidecar drops the entries of its keys before it is
//!   forwarded and again when its reply arrives (before the client sees
//!   it), and a fill that started before either does not land
//!   ([`store`]): the writer never reads an older value afterwards;
//! - the loss of the tracking connection, a switch of the active endpoint,
//!   a change of the rules on reload and `POST /cache/flush` flush
//!   everything;
//! - an entry never outlives its key's TTL (the fill reads `PTTL` in the
//!   same transaction) nor its rule's ttl.

pub mod hot;
pub mod store;
pub mod tracker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::{BufMut, Bytes, BytesMut};
use prometheus::IntCounter;
use tokio::sync::watch;

use self::store::{Entry, Reason, Store};
use self::tracker::Tracker;
use super::glob::Glob;
use super::{Ctx, Env, Mode, PolicyError, Stage, Verdict};
use crate::config::{CacheConfig, CacheInvalidation, CacheRule, HotKeysCacheConfig};
use crate::metrics::Metrics;
use crate::request::command::CommandInfo;
use crate::request::exchange::{Exchange, ReplyAction};
use crate::wire::Proto;

/// The reads the cache can hold: deterministic and read-only. MGET is
/// cached per key (each key's entry is that of `MGET key`), every other
/// command per argument list.
pub const CACHEABLE: &[&str] = &[
    "get",
    "mget",
    "getrange",
    "strlen",
    "exists",
    "type",
    "hget",
    "hmget",
    "hgetall",
    "hexists",
    "hlen",
    "lrange",
    "llen",
    "smembers",
    "sismember",
    "scard",
    "zrange",
    "zrevrange",
    "zrangebyscore",
    "zrevrangebyscore",
    "zrangebylex",
    "zrevrangebylex",
    "zscore",
    "zcard",
];

/// Commands whose `WITHSCORES` reply is pairs in RESP3, flat in RESP2.
const ZRANGES: &[&str] = &["zrange", "zrevrange", "zrangebyscore", "zrevrangebyscore"];

/// The exchange's mark: a fill was waited for.
const FILLED: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("pattern must not be empty")]
    EmptyPattern,
    #[error("ttl must be at least 1ms")]
    TtlTooShort,
    /// The name is not quoted back (the index says which).
    #[error("commands[{0}]: not a read the cache can hold")]
    NotCacheable(usize),
    #[error("commands[{index}]: unknown command{}", suggest(.near))]
    UnknownCommand {
        index: usize,
        near: Option<&'static str>,
    },
    #[error("max_memory must be at least 1MiB")]
    TooSmall,
    #[error("hot_keys: {0}")]
    HotKeys(&'static str),
}

/// ` (did you mean X?)` for a near command name.
fn suggest(near: &Option<&'static str>) -> String {
    near.map(|s| format!(" (did you mean {}?)", s.to_ascii_uppercase()))
        .unwrap_or_default()
}

struct Rule {
    glob: Glob,
    ttl: Duration,
    commands: Vec<&'static str>,
    stale_if_error: Option<Duration>,
    hit: IntCounter,
    miss: IntCounter,
    bypass: IntCounter,
    stale: IntCounter,
}

/// What outlives a reload: the entries, the tracking connection, the fills
/// in flight.
pub struct CacheState {
    store: Arc<Store>,
    tracker: Tracker,
    pool: Arc<crate::upstream::pool::Pool>,
    inflight: Mutex<HashMap<Bytes, watch::Receiver<bool>>>,
    /// The active endpoint's generation the entries came from.
    generation: AtomicU64,
    /// The rules the entries were made under.
    rules: Mutex<(Vec<CacheRule>, HotKeysCacheConfig)>,
    fill_timeout: Duration,
    metrics: Metrics,
    evictions_seen: AtomicU64,
}

impl CacheState {
    pub fn start(
        c: &CacheConfig,
        env: &Env,
        fill_timeout: Duration,
        metrics: &Metrics,
    ) -> Arc<CacheState> {
        let store = Arc::new(Store::new(c.max_memory.as_usize()));
        let tracker = Tracker::start(
            env.pool.clone(),
            store.clone(),
            c.invalidation == CacheInvalidation::Tracking,
            metrics.clone(),
            &env.tasks,
            env.shutdown.clone(),
        );
        Arc::new(CacheState {
            store,
            tracker,
            pool: env.pool.clone(),
            inflight: Mutex::new(HashMap::new()),
            generation: AtomicU64::new(env.pool.ups.active().generation),
            rules: Mutex::new((c.rule.clone(), c.hot_keys.clone())),
            fill_timeout,
            metrics: metrics.clone(),
            evictions_seen: AtomicU64::new(0),
        })
    }

    /// Drop everything; how many entries went.
    pub fn flush(&self, reason: Reason) -> usize {
        let n = self.store.flush();
        self.metrics
            .cache_invalidations(reason.label())
            .inc_by(n as u64);
        if n > 0 || !matches!(reason, Reason::Write | Reason::Tracking) {
            tracing::info!(reason = %reason.label(), entries = n, "cache flushed");
        }
        n
    }

    /// A new configuration: the bound applies at once, changed rules flush.
    fn apply(&self, c: &CacheConfig) {
        self.store.set_max_bytes(c.max_memory.as_usize());
        let mut rules = self.rules.lock().unwrap_or_else(PoisonError::into_inner);
        if rules.0 != c.rule || rules.1 != c.hot_keys {
            *rules = (c.rule.clone(), c.hot_keys.clone());
            drop(rules);
            self.flush(Reason::Reload);
        }
    }

    /// Single flight: claim the fill of each entry of `entries` no fill is
    /// reading yet (their senders, in order, with their index), or join
    /// the one that is (its receiver).
    fn claim(&self, entries: &[Bytes]) -> (Claimed, Vec<watch::Receiver<bool>>) {
        let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut mine, mut theirs) = (Vec::new(), Vec::new());
        for (i, e) in entries.iter().enumerate() {
            match inflight.get(e) {
                Some(rx) => theirs.push(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(false);
                    inflight.insert(e.clone(), rx);
                    mine.push((i, tx));
                }
            }
        }
        if !theirs.is_empty() {
            self.metrics.cache_joins().inc();
        }
        (mine, theirs)
    }

    /// The claimed fills are done (landed or not): their waiters go on.
    async fn release(&self, entries: &[Bytes], mine: Claimed, theirs: Vec<watch::Receiver<bool>>) {
        {
            let mut inflight = self.inflight.lock().unwrap_or_else(PoisonError::into_inner);
            for (i, _) in &mine {
                inflight.remove(&entries[*i]);
            }
        }
        for (_, tx) in mine {
            let _ = tx.send(true);
        }
        for mut rx in theirs {
            let _ = tokio::time::timeout(self.fill_timeout, rx.wait_for(|done| *done)).await;
        }
    }

    /// A fill's reply kept as entry `key` (unless an error, too big, or a
    /// write or flush came since `seen`), for at most the rule's ttl and
    /// never past one of its keys' TTL (`pttls`).
    fn keep(
        &self,
        key: Bytes,
        reply: &[u8],
        keys: Vec<Bytes>,
        pttls: &[i64],
        fit: &Fit,
        seen: &store::Snapshot,
    ) -> bool {
        if crate::wire::is_error(reply) || reply.len() > fit.max_entry {
            return false;
        }
        let Some(resp2) = crate::wire::resp::to_resp2(reply, fit.flatten) else {
            return false;
        };
        let mut life = fit.ttl;
        for p in pttls {
            if *p >= 0 {
                life = life.min(Duration::from_millis(*p as u64));
            }
        }
        if life.is_zero() {
            return false;
        }
        // Its own allocation: a slice would keep the whole read buffer it
        // came in alive. One copy when both protocols read the same bytes.
        let resp3 = Bytes::copy_from_slice(reply);
        let resp2 = if resp2 == resp3 { resp3.clone() } else { resp2 };
        let entry = Entry {
            resp3,
            resp2,
            keys,
            expires: Instant::now() + life,
            rule: fit.rule,
        };
        self.store.insert(key, entry, seen)
    }

    fn check_switch(&self) {
        let g = self.pool.ups.active().generation;
        if self.generation.swap(g, Ordering::AcqRel) != g {
            self.flush(Reason::Switch);
        }
    }
}

/// Fills a reader claimed: the entry's index, and who waits for it.
type Claimed = Vec<(usize, watch::Sender<bool>)>;

/// How a fill's reply is kept.
struct Fit {
    ttl: Duration,
    rule: usize,
    /// A `WITHSCORES` range: pairs in RESP3, flat in RESP2.
    flatten: bool,
    max_entry: usize,
}

pub struct Cache {
    state: Arc<CacheState>,
    /// The configured rules, then (with `hot`) the hot keys' own.
    rules: Vec<Rule>,
    /// How many rules are configured ones.
    configured: usize,
    hot: Option<hot::HotKeys>,
    max_entry: usize,
}

/// The rule's label of hot keys' entries.
pub const HOT_LABEL: &str = "hot_keys";

impl Cache {
    /// `None` when the cache is off or has no rule.
    pub fn from_config(
        c: &CacheConfig,
        metrics: &Metrics,
        state: Option<&Arc<CacheState>>,
    ) -> Result<Option<Cache>, Vec<PolicyError>> {
        let mut errors = Vec::new();
        if c.enabled && c.max_memory.0 < 1 << 20 {
            errors.push(PolicyError::Cache {
                index: None,
                reason: CacheError::TooSmall,
            });
        }
        let mut rules = Vec::new();
        for (index, r) in c.rule.iter().enumerate() {
            let mut err = |reason| {
                errors.push(PolicyError::Cache {
                    index: Some(index),
                    reason,
                })
            };
            if r.pattern.is_empty() {
                err(CacheError::EmptyPattern);
            }
            if r.ttl < Duration::from_millis(1) {
                err(CacheError::TtlTooShort);
            }
            let mut commands = Vec::new();
            match &r.commands {
                None => commands.extend_from_slice(CACHEABLE),
                Some(list) => {
                    for (i, name) in list.iter().enumerate() {
                        let lower = name.to_ascii_lowercase();
                        match CACHEABLE.iter().find(|c| **c == lower) {
                            Some(c) => commands.push(*c),
                            None => match crate::request::command::check_name(&lower) {
                                Err(near) => err(CacheError::UnknownCommand { index: i, near }),
                                Ok(()) => err(CacheError::NotCacheable(i)),
                            },
                        }
                    }
                }
            }
            let label = r.label();
            rules.push(Rule {
                glob: Glob::new(r.pattern.as_bytes()),
                ttl: r.ttl,
                commands,
                stale_if_error: r.stale_if_error,
                hit: metrics.cache_requests(label, "hit"),
                miss: metrics.cache_requests(label, "miss"),
                bypass: metrics.cache_requests(label, "bypass"),
                stale: metrics.cache_requests(label, "stale"),
            });
        }
        let configured = rules.len();
        let h = &c.hot_keys;
        let hot = h.enabled.then(|| hot::HotKeys::new(h));
        if h.enabled {
            let mut err = |why| {
                errors.push(PolicyError::Cache {
                    index: None,
                    reason: CacheError::HotKeys(why),
                })
            };
            if h.ttl < Duration::from_millis(1) {
                err("ttl must be at least 1ms");
            }
            if h.threshold == 0 {
                err("threshold must be at least 1");
            }
            if h.max_keys == 0 {
                err("max_keys must be at least 1");
            }
            rules.push(Rule {
                glob: Glob::new(b"*"),
                ttl: h.ttl,
                commands: CACHEABLE.to_vec(),
                stale_if_error: None,
                hit: metrics.cache_requests(HOT_LABEL, "hit"),
                miss: metrics.cache_requests(HOT_LABEL, "miss"),
                bypass: metrics.cache_requests(HOT_LABEL, "bypass"),
                stale: metrics.cache_requests(HOT_LABEL, "stale"),
            });
        }
        if !errors.is_empty() {
            return Err(errors);
        }
        let Some(state) = state.filter(|_| c.enabled && !rules.is_empty()) else {
            return Ok(None);
        };
        state.apply(c);
        *state
            .tracker
            .keep_stale
            .write()
            .unwrap_or_else(PoisonError::into_inner) =
            rules.iter().map(|r| r.stale_if_error.is_some()).collect();
        Ok(Some(Cache {
            state: state.clone(),
            rules,
            configured,
            hot,
            max_entry: c.max_entry.as_usize(),
        }))
    }

    /// The rule that covers this read, and its keys: a configured rule,
    /// else (with `[cache.hot_keys]`) the hot keys' when all its keys are
    /// hot (the read is counted).
    fn rule_for(
        &self,
        ctx: &Ctx<'_>,
        info: &CommandInfo,
        args: &[Bytes],
    ) -> Option<(usize, Vec<Bytes>)> {
        let name = info.name.as_str();
        if !CACHEABLE.contains(&name) {
            return None;
        }
        let keys: Vec<Bytes> = info
            .keys(args)
            .into_iter()
            .filter_map(|k| args.get(k.index).cloned())
            .collect();
        let first = keys.first()?;
        let rules = &self.rules[..self.configured];
        match rules
            .iter()
            .position(|r| r.commands.contains(&name) && r.glob.matches(first))
        {
            Some(ri) => {
                let glob = &rules[ri].glob;
                keys.iter().all(|k| glob.matches(k)).then_some((ri, keys))
            }
            None => {
                let hot = self.hot.as_ref()?;
                let mut cooled = Vec::new();
                let is_hot = hot.read(ctx.db, &keys, ctx.now, &mut cooled);
                self.cooled(&cooled);
                is_hot.then_some((self.configured, keys))
            }
        }
    }

    /// Hot keys that cooled leave with their entries.
    fn cooled(&self, keys: &[Bytes]) {
        if keys.is_empty() {
            return;
        }
        let n: usize = keys.iter().map(|k| self.state.store.invalidate(k)).sum();
        self.state
            .metrics
            .cache_invalidations(Reason::Cooled.label())
            .inc_by(n as u64);
    }

    /// A write: its keys' entries go now, and again when its reply comes.
    fn on_write(&self, info: &CommandInfo, ex: &mut Exchange) {
        let name = info.name.as_str();
        if matches!(name, "flushall" | "flushdb" | "swapdb") {
            self.state.store.flush_begins();
            self.state.flush(Reason::Write);
            ex.on_reply(Arc::new(Invalidate::new(&self.state, None, Vec::new())));
            return;
        }
        let keys: Vec<Bytes> = info
            .keys(ex.args())
            .into_iter()
            .filter(|k| k.write)
            .filter_map(|k| ex.args().get(k.index).cloned())
            // With hot keys any key may be cached.
            .filter(|k| self.hot.is_some() || self.rules.iter().any(|r| r.glob.matches(k)))
            .collect();
        if keys.is_empty() {
            return;
        }
        let slots = keys
            .iter()
            .map(|k| self.state.store.write_begins(k))
            .collect();
        let n: usize = keys.iter().map(|k| self.state.store.invalidate(k)).sum();
        self.state
            .metrics
            .cache_invalidations(Reason::Write.label())
            .inc_by(n as u64);
        ex.on_reply(Arc::new(Invalidate::new(&self.state, Some(keys), slots)));
    }

    fn fill(
        &self,
        key: Bytes,
        db: i64,
        rule: usize,
        keys: Vec<Bytes>,
        args: Vec<Bytes>,
    ) -> super::Wait {
        let state = self.state.clone();
        let ttl = self.rules[rule].ttl;
        let max_entry = self.max_entry;
        Box::pin(async move {
            let entries = [key];
            let (mine, theirs) = state.claim(&entries);
            if mine.is_empty() {
                return state.release(&entries, mine, theirs).await;
            }
            let [key] = &entries;
            let seen = state.store.snapshot(&keys);
            let flatten = ZRANGES
                .iter()
                .any(|z| args[0].eq_ignore_ascii_case(z.as_bytes()))
                && args.iter().any(|a| a.eq_ignore_ascii_case(b"withscores"));
            let fill = tokio::time::timeout(
                state.fill_timeout,
                state.tracker.fill(db, keys.clone(), args),
            )
            .await;
            if let Ok(Ok(fill)) = fill {
                let reply = &fill.reply[..];
                let spec = Fit {
                    ttl,
                    rule,
                    flatten,
                    max_entry,
                };
                state.keep(key.clone(), reply, keys, &fill.pttls, &spec, &seen);
            }
            state.release(&entries, mine, theirs).await;
        })
    }
}

/// (db, user, command, arguments) as one key.
fn entry_key(ctx: &Ctx<'_>, name: &str, args: &[Bytes]) -> Bytes {
    entry_key_of(ctx, name, args.iter().skip(1).map(|a| &a[..]))
}

/// The entry of one key of an MGET: the entry of `MGET key`, whose reply
/// is that key's element.
fn element_key(ctx: &Ctx<'_>, key: &[u8]) -> Bytes {
    entry_key_of(ctx, "mget", std::iter::once(key))
}

fn entry_key_of<'a>(
    ctx: &Ctx<'_>,
    name: &str,
    args: impl Iterator<Item = &'a [u8]> + Clone,
) -> Bytes {
    let user = ctx.user.unwrap_or(b"");
    let len = 16 + name.len() + user.len() + args.clone().map(|a| a.len() + 4).sum::<usize>();
    let mut b = BytesMut::with_capacity(len);
    b.put_i64_le(ctx.db);
    b.put_u32_le(user.len() as u32);
    b.put_slice(user);
    b.put_u32_le(name.len() as u32);
    b.put_slice(name.as_bytes());
    for a in args {
        b.put_u32_le(a.len() as u32);
        b.put_slice(a);
    }
    b.freeze()
}

/// An MGET reply from its keys' elements (each the reply of `MGET key`:
/// `*1` and the element); `None` if one is not such a reply.
fn assemble(elements: &[Bytes]) -> Option<Bytes> {
    let mut out = BytesMut::with_capacity(16 + elements.iter().map(Bytes::len).sum::<usize>());
    crate::wire::scan::push_header(&mut out, b'*', elements.len());
    for e in elements {
        out.put_slice(e.strip_prefix(b"*1\r\n")?);
    }
    Some(out.freeze())
}

/// A write's reply arrived: its keys' entries (all, for a flush) go again,
/// and fills that started before do not land.
struct Invalidate {
    state: Arc<CacheState>,
    keys: Option<Vec<Bytes>>,
    /// The pending-write slots it holds, released when it goes (after the
    /// reply, or with a command that failed or was never sent).
    slots: Vec<usize>,
    /// The write's reply came (and its invalidation is done).
    answered: std::sync::atomic::AtomicBool,
}

impl Invalidate {
    fn new(state: &Arc<CacheState>, keys: Option<Vec<Bytes>>, slots: Vec<usize>) -> Invalidate {
        Invalidate {
            state: state.clone(),
            keys,
            slots,
            answered: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Drop the entries of the write's keys (everything, for a flush).
    fn invalidate(&self) -> usize {
        match &self.keys {
            Some(keys) => keys.iter().map(|k| self.state.store.invalidate(k)).sum(),
            None => self.state.store.flush(),
        }
    }
}

impl ReplyAction for Invalidate {
    fn on_reply(&self, _index: u32, _reply: &Bytes) {
        // Once: the replies of commands appended to the write come here too.
        if self.answered.swap(true, Ordering::AcqRel) {
            return;
        }
        let n = self.invalidate();
        self.state
            .metrics
            .cache_invalidations(Reason::Write.label())
            .inc_by(n as u64);
    }
}

impl Drop for Invalidate {
    fn drop(&mut self) {
        // No reply: the write's fate is unknown, so fills that overlapped
        // it do not land either.
        if !self.answered.load(Ordering::Acquire) {
            self.invalidate();
        }
        if self.keys.is_none() {
            self.state.store.flush_done();
        }
        for &slot in &self.slots {
            self.state.store.write_done(slot);
        }
    }
}

impl Cache {
    /// A read answered from `entries` (joined by `join`) when all are
    /// there: a hit, unless asked again after its fill (counted as a miss
    /// then). Asked again after a fill that did not land for all (a write
    /// raced it, the reply is an error or too big, the upstream failed):
    /// entries an outage flushed stand in while the upstream is
    /// unreachable (`stale_if_error`), else the read goes to Redis. `Err`:
    /// a first miss, with the entries missing.
    fn answer(
        &self,
        ctx: &Ctx<'_>,
        ex: &mut Exchange,
        rule: &Rule,
        entries: &[Bytes],
        join: impl Fn(&[Bytes]) -> Option<Bytes>,
    ) -> Result<Verdict, Vec<usize>> {
        let resp3 = ctx.proto == Proto::Resp3;
        let again = ex.mark(FILLED);
        let store = &self.state.store;
        let get = |e: &Bytes| store.get(e, resp3, ctx.now).map(|(_, r)| r);
        // One entry (every read but MGET): no list to build on a hit.
        let reply = match entries {
            [e] => get(e),
            _ => entries
                .iter()
                .map(get)
                .collect::<Option<Vec<Bytes>>>()
                .and_then(|found| join(&found)),
        };
        if let Some(reply) = reply {
            if !again {
                rule.hit.inc();
            }
            return Ok(Verdict::Answer(reply));
        }
        if !again {
            let missing = (0..entries.len())
                .filter(|&i| get(&entries[i]).is_none())
                .collect();
            return Err(missing);
        }
        if let Some(window) = rule.stale_if_error
            && self.state.tracker.unreachable.load(Ordering::Relaxed)
        {
            let stale: Option<Vec<Bytes>> = entries
                .iter()
                .map(|e| store.stale(e, resp3, window))
                .collect();
            if let Some(reply) = stale.as_deref().and_then(&join) {
                rule.stale.inc();
                return Ok(Verdict::Answer(reply));
            }
        }
        Ok(Verdict::Continue)
    }

    /// MGET per key: answered from each key's entry when all are there;
    /// otherwise one fill reads only the missing keys (each key's fill
    /// shared with concurrent MGETs of it), and the reply is assembled in
    /// the keys' order.
    fn mget(&self, ctx: &Ctx<'_>, ex: &mut Exchange, ri: usize, keys: Vec<Bytes>) -> Verdict {
        let rule = &self.rules[ri];
        let entries: Vec<Bytes> = keys.iter().map(|k| element_key(ctx, k)).collect();
        let missing = match self.answer(ctx, ex, rule, &entries, assemble) {
            Ok(v) => return v,
            Err(missing) => missing,
        };
        rule.miss.inc();
        let wanted = missing
            .into_iter()
            .map(|i| (keys[i].clone(), entries[i].clone()))
            .collect();
        Verdict::Wait(self.fill_elements(ctx.db, ri, wanted))
    }

    /// Fill the elements of `wanted` (key, its element's entry) that no
    /// fill is reading yet, in one MGET (one per slot on a cluster), and
    /// wait for the others' fills.
    fn fill_elements(&self, db: i64, rule: usize, wanted: Vec<(Bytes, Bytes)>) -> super::Wait {
        let state = self.state.clone();
        let fit = Fit {
            ttl: self.rules[rule].ttl,
            rule,
            flatten: false,
            max_entry: self.max_entry,
        };
        Box::pin(async move {
            let (keys, entries): (Vec<Bytes>, Vec<Bytes>) = wanted.into_iter().unzip();
            let (claimed, theirs) = state.claim(&entries);
            // (key, entry, what its fill saw at the start) of those claimed.
            let mine: Vec<(&Bytes, &Bytes, store::Snapshot)> = claimed
                .iter()
                .map(|&(i, _)| {
                    let seen = state.store.snapshot(std::slice::from_ref(&keys[i]));
                    (&keys[i], &entries[i], seen)
                })
                .collect();
            // One MGET per slot on a cluster (a fill runs on its keys'
            // node), else one; all sent before any is awaited.
            let cluster = state.pool.ups.active().endpoint.cluster.is_some();
            let mut groups: Vec<(u16, Vec<usize>)> = Vec::new();
            for (i, (key, ..)) in mine.iter().enumerate() {
                let slot = if cluster {
                    crate::upstream::cluster::key_slot(key)
                } else {
                    0
                };
                match groups.iter_mut().find(|(s, _)| *s == slot) {
                    Some((_, g)) => g.push(i),
                    None => groups.push((slot, vec![i])),
                }
            }
            let mut fills = Vec::with_capacity(groups.len());
            for (_, group) in &groups {
                let group_keys: Vec<Bytes> = group.iter().map(|&i| mine[i].0.clone()).collect();
                let mut read = Vec::with_capacity(group_keys.len() + 1);
                read.push(Bytes::from_static(b"MGET"));
                read.extend(group_keys.iter().cloned());
                fills.push(state.tracker.send(db, group_keys, read));
            }
            for ((_, group), fill) in groups.iter().zip(fills) {
                let Ok(rx) = fill else { continue };
                let Ok(Ok(Ok(fill))) = tokio::time::timeout(state.fill_timeout, rx).await else {
                    continue;
                };
                let reply = fill.reply;
                let Some(ranges) = crate::wire::scan::split_array(&reply) else {
                    continue;
                };
                if ranges.len() != group.len() || fill.pttls.len() != group.len() {
                    continue;
                }
                for ((&i, (s, e)), pttl) in group.iter().zip(ranges).zip(&fill.pttls) {
                    let (key, entry, seen) = &mine[i];
                    let mut one = BytesMut::with_capacity(e - s + 4);
                    one.put_slice(b"*1\r\n");
                    one.put_slice(&reply[s..e]);
                    state.keep(
                        (*entry).clone(),
                        &one,
                        vec![(*key).clone()],
                        std::slice::from_ref(pttl),
                        &fit,
                        seen,
                    );
                }
            }
            drop(mine);
            state.release(&entries, claimed, theirs).await;
        })
    }
}

impl Stage for Cache {
    fn name(&self) -> &'static str {
        "cache"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let Some(info) = ctx.info else {
            return Verdict::Continue;
        };
        if info.flags.write
            || info.may_store()
            || matches!(info.name.as_str(), "flushall" | "flushdb" | "swapdb")
        {
            self.on_write(info, ex);
            return Verdict::Continue;
        }
        let Some((ri, keys)) = self.rule_for(ctx, info, ex.args()) else {
            return Verdict::Continue;
        };
        let rule = &self.rules[ri];
        if ctx.mode != Mode::Normal
            || ctx.upstream_auth
            || self.state.tracker.refused.load(Ordering::Relaxed)
            || self.state.store.write_pending(&keys)
        {
            rule.bypass.inc();
            return Verdict::Continue;
        }
        self.state.check_switch();
        if info.name == "mget" {
            return self.mget(ctx, ex, ri, keys);
        }
        let key = entry_key(ctx, &info.name, ex.args());
        let one = |replies: &[Bytes]| replies.first().cloned();
        if let Ok(v) = self.answer(ctx, ex, rule, std::slice::from_ref(&key), one) {
            return v;
        }
        rule.miss.inc();
        Verdict::Wait(self.fill(key, ctx.db, ri, keys, ex.args().to_vec()))
    }

    fn tick(&self) {
        let window = self
            .rules
            .iter()
            .filter_map(|r| r.stale_if_error)
            .max()
            .unwrap_or_default();
        self.state.store.expire_stale(window);
        let (entries, bytes) = self.state.store.size();
        let m = &self.state.metrics;
        if let Some(hot) = &self.hot {
            let mut cooled = Vec::new();
            let n = hot.tick(Instant::now(), &mut cooled);
            self.cooled(&cooled);
            m.cache_hot_keys().set(n as i64);
        }
        m.cache_entries().set(entries as i64);
        m.cache_bytes().set(bytes as i64);
        let ev = self.state.store.evictions.load(Ordering::Relaxed);
        let seen = self.state.evictions_seen.swap(ev, Ordering::Relaxed);
        m.cache_evictions().inc_by(ev.saturating_sub(seen));
    }
}
