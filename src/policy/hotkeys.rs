//! Hot keys and big keys, found from the traffic (`[hotkeys]`): a
//! count-min sketch of requests per key and database, with the top keys
//! (and their bytes and commands) kept beside it, per time window; big keys seen in requests
//! and replies over a size. Bounded memory whatever the number of keys:
//! the sketch is fixed, the top and the big keys are capped. The report is
//! `GET /hotkeys` (keys are data: behind the admin token, never in metric
//! labels) and `redis-sidecar hotkeys`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Instant, SystemTime};

use bytes::Bytes;

use super::{Ctx, Exchange, ReplyAction, Stage, Verdict};
use crate::config::HotKeysConfig;
use crate::metrics::Metrics;

/// Rows and columns of the count-min sketch (4 x 4096 u32: 64 KiB).
const ROWS: usize = 4;
const COLS: usize = 4096;
/// Replies measured for the bytes and the big keys: one command in this
/// many (attaching a reply action to each would cost an allocation per
/// command).
const REPLY_SAMPLE: u32 = 8;
/// Big keys remembered, at most.
const MAX_BIG: usize = 100;
/// Commands remembered per top key, at most.
const MAX_COMMANDS: usize = 8;

/// A random seed for [`key_hash`] (from the OS's randomness).
pub(crate) fn new_seed() -> u64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u8(0);
    h.finish()
}

/// FNV-1a of the db and the key, from a random seed (a client cannot aim
/// collisions), mixed: fast for short keys.
pub(crate) fn key_hash(seed: u64, db: i64, key: &[u8]) -> u64 {
    let mut h = seed ^ (db as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for &b in key {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The finalizer of splitmix64: every bit of the key reaches the bits
    // the sketch's rows use.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// A count-min sketch of 4 x 4096 counters (64 KiB), for hashes of keys.
pub(crate) struct Sketch {
    rows: Vec<[u32; COLS]>,
}

impl Sketch {
    pub(crate) fn new() -> Sketch {
        Sketch {
            rows: vec![[0; COLS]; ROWS],
        }
    }

    /// Add `n` at `h`; the estimate after.
    pub(crate) fn add(&mut self, h: u64, n: u32) -> u32 {
        let mut est = u32::MAX;
        for (i, row) in self.rows.iter_mut().enumerate() {
            let c = &mut row[((h >> (i * 12)) as usize) & (COLS - 1)];
            *c = c.saturating_add(n);
            est = est.min(*c);
        }
        est
    }

    pub(crate) fn clear(&mut self) {
        for row in &mut self.rows {
            row.fill(0);
        }
    }
}

/// A map keyed by hashes already computed: its hasher passes them on.
#[derive(Clone, Copy, Default)]
pub(crate) struct Prehashed;

impl BuildHasher for Prehashed {
    type Hasher = PassOn;
    fn build_hasher(&self) -> PassOn {
        PassOn(0)
    }
}

#[derive(Default)]
pub(crate) struct PassOn(u64);

impl Hasher for PassOn {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 << 8) | u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

/// One of the top keys.
#[derive(Clone, Debug)]
struct Top {
    db: i64,
    key: Bytes,
    requests: u32,
    bytes: u64,
    commands: Vec<(String, u32)>,
}

/// One window's counts.
struct Window {
    started: SystemTime,
    requests: Sketch,
    /// By the key's hash (the sketch's): a lookup clones nothing.
    top: HashMap<u64, Top, Prehashed>,
    /// The smallest request estimate in `top` once it is full.
    floor: u32,
    total: u64,
}

impl Window {
    fn new() -> Window {
        Window {
            started: SystemTime::now(),
            requests: Sketch::new(),
            top: HashMap::with_hasher(Prehashed),
            floor: 0,
            total: 0,
        }
    }
}

/// A big key: db, key, bytes, the command, when.
pub type BigKey = (i64, Bytes, u64, String, SystemTime);

/// A top key: db, key, requests, bytes, and its commands with counts.
pub type TopKey = (i64, Bytes, u32, u64, Vec<(String, u32)>);

/// A window's report.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub started: Option<SystemTime>,
    pub total: u64,
    /// (db, key, requests, bytes, commands), most requested first.
    pub top: Vec<TopKey>,
}

/// The hot-key and big-key state, shared by the stage and the admin API;
/// it outlives reloads.
pub struct HotKeys {
    config: Mutex<HotKeysConfig>,
    state: Mutex<State>,
    seed: u64,
    sample: AtomicU32,
    metrics: Metrics,
}

struct State {
    current: Window,
    last: Option<Report>,
    rotated: Instant,
    /// (db, key) → (bytes, command, when).
    big: HashMap<(i64, Bytes), (u64, String, SystemTime)>,
}

impl HotKeys {
    pub fn new(config: &HotKeysConfig, metrics: &Metrics) -> Arc<HotKeys> {
        Arc::new(HotKeys {
            config: Mutex::new(config.clone()),
            state: Mutex::new(State {
                current: Window::new(),
                last: None,
                rotated: Instant::now(),
                big: HashMap::new(),
            }),
            seed: new_seed(),
            sample: AtomicU32::new(0),
            metrics: metrics.clone(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn conf(&self) -> HotKeysConfig {
        self.config
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A reload's settings (the counts so far stay).
    pub fn configure(&self, config: &HotKeysConfig) {
        *self.config.lock().unwrap_or_else(PoisonError::into_inner) = config.clone();
    }

    /// `key` of `db` was requested by `command`, with `bytes` of request
    /// (and, when measured, reply).
    pub fn record(&self, db: i64, key: &Bytes, command: &str, bytes: u64, top_n: usize) {
        let h = key_hash(self.seed, db, key);
        let mut st = self.lock();
        let w = &mut st.current;
        w.total += 1;
        let est = w.requests.add(h, 1);
        if let Some(t) = w.top.get_mut(&h) {
            t.requests = est;
            t.bytes = t.bytes.saturating_add(bytes);
            note_command(&mut t.commands, command);
            return;
        }
        if w.top.len() >= top_n && est <= w.floor {
            return;
        }
        if w.top.len() >= top_n {
            // The least requested leaves; the floor rises to the next.
            if let Some(min) = w
                .top
                .iter()
                .min_by_key(|(_, t)| t.requests)
                .map(|(k, _)| *k)
            {
                w.top.remove(&min);
            }
        }
        let mut commands = Vec::new();
        note_command(&mut commands, command);
        w.top.insert(
            h,
            Top {
                db,
                key: key.clone(),
                requests: est,
                bytes,
                commands,
            },
        );
        if w.top.len() >= top_n {
            w.floor = w.top.values().map(|t| t.requests).min().unwrap_or(0);
        }
    }

    /// A request or a reply of `bytes` (at least the big-key size) for
    /// `key`.
    pub fn saw_big(&self, db: i64, key: &Bytes, command: &str, bytes: u64) {
        let mut st = self.lock();
        let big = &mut st.big;
        if big.len() >= MAX_BIG && !big.contains_key(&(db, key.clone())) {
            // The smallest makes room for a larger one.
            let Some(min) = big
                .iter()
                .min_by_key(|(_, v)| v.0)
                .filter(|(_, v)| v.0 < bytes)
                .map(|(k, _)| k.clone())
            else {
                return;
            };
            big.remove(&min);
        }
        big.insert(
            (db, key.clone()),
            (bytes, command.to_string(), SystemTime::now()),
        );
    }

    /// Close the window when it is due (the ticker, about once a second).
    pub fn rotate_if_due(&self) {
        let window = self.conf().window;
        let mut st = self.lock();
        if st.rotated.elapsed() < window {
            return;
        }
        let report = report_of(&st.current);
        let share = share_of(&report);
        self.metrics.hotkeys(report.top.len(), share);
        st.last = Some(report);
        st.current.requests.clear();
        st.current.top.clear();
        st.current.floor = 0;
        st.current.total = 0;
        st.current.started = SystemTime::now();
        st.rotated = Instant::now();
    }

    /// The current window's report, the last complete one's, the big keys.
    pub fn report(&self) -> (Report, Option<Report>, Vec<BigKey>) {
        let st = self.lock();
        let mut big: Vec<BigKey> = st
            .big
            .iter()
            .map(|((db, k), (b, c, at))| (*db, k.clone(), *b, c.clone(), *at))
            .collect();
        big.sort_by_key(|b| std::cmp::Reverse(b.2));
        (report_of(&st.current), st.last.clone(), big)
    }

    /// Whether this command's reply is measured (one in [`REPLY_SAMPLE`]).
    fn sample_reply(&self) -> bool {
        self.sample
            .fetch_add(1, Ordering::Relaxed)
            .is_multiple_of(REPLY_SAMPLE)
    }
}

fn note_command(commands: &mut Vec<(String, u32)>, command: &str) {
    if let Some(c) = commands.iter_mut().find(|(n, _)| n == command) {
        c.1 += 1;
    } else if commands.len() < MAX_COMMANDS {
        commands.push((command.to_string(), 1));
    }
}

fn report_of(w: &Window) -> Report {
    let mut top: Vec<_> = w
        .top
        .values()
        .map(|t| (t.db, t.key.clone(), t.requests, t.bytes, t.commands.clone()))
        .collect();
    top.sort_by(|a, b| b.2.cmp(&a.2).then_with(|| a.1.cmp(&b.1)));
    Report {
        started: Some(w.started),
        total: w.total,
        top,
    }
}

/// The share of the window's requests the top keys carry.
fn share_of(r: &Report) -> f64 {
    if r.total == 0 {
        return 0.0;
    }
    r.top.iter().map(|t| u64::from(t.2)).sum::<u64>() as f64 / r.total as f64
}

/// The policy stage: every command's keys counted (before the cache
/// answers, so cached reads count too).
pub struct HotKeysStage {
    pub state: Arc<HotKeys>,
    top: usize,
    big: u64,
}

impl HotKeysStage {
    pub fn new(state: Arc<HotKeys>, config: &HotKeysConfig) -> HotKeysStage {
        state.configure(config);
        HotKeysStage {
            state,
            top: config.top,
            big: config.big_key_bytes.0,
        }
    }
}

/// A sampled reply's size, for its command's first key.
struct ReplySize {
    state: Arc<HotKeys>,
    db: i64,
    key: Bytes,
    command: String,
    big: u64,
}

impl ReplyAction for ReplySize {
    fn on_reply(&self, index: u32, reply: &Bytes) {
        if index == 0 && reply.len() as u64 >= self.big {
            self.state
                .saw_big(self.db, &self.key, &self.command, reply.len() as u64);
        }
    }
}

impl Stage for HotKeysStage {
    fn name(&self) -> &'static str {
        "hotkeys"
    }

    fn on_command(&self, ctx: &Ctx<'_>, ex: &mut Exchange) -> Verdict {
        let Some(info) = ctx.info else {
            return Verdict::Continue;
        };
        let args = ex.args();
        let command = info.name.as_str();
        let size: u64 = args.iter().map(|a| a.len() as u64).sum();
        let mut first = None;
        info.each_key(args, |k| {
            if let Some(key) = args.get(k.index) {
                self.state.record(ctx.db, key, command, size, self.top);
                if first.is_none() {
                    first = Some(key.clone());
                }
            }
        });
        if let Some(key) = first {
            if size >= self.big {
                self.state.saw_big(ctx.db, &key, command, size);
            }
            if self.state.sample_reply() {
                ex.on_reply(Arc::new(ReplySize {
                    state: self.state.clone(),
                    db: ctx.db,
                    key,
                    command: command.to_string(),
                    big: self.big,
                }));
            }
        }
        Verdict::Continue
    }

    fn tick(&self) {
        self.state.rotate_if_due();
    }
}

fn unix_s(t: Option<SystemTime>) -> f64 {
    t.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
        .map_or(0.0, |d| (d.as_secs_f64() * 1000.0).round() / 1000.0)
}

fn window_json(r: &Report) -> serde_json::Value {
    let total = r.total.max(1) as f64;
    serde_json::json!({
        "since_unix_s": unix_s(r.started),
        "requests": r.total,
        "top_share": (share_of(r) * 1000.0).round() / 1000.0,
        "keys": r.top.iter().map(|(db, key, requests, bytes, commands)| serde_json::json!({
            "db": db,
            "key": String::from_utf8_lossy(key),
            "requests": requests,
            "share": (f64::from(*requests) / total * 1000.0).round() / 1000.0,
            "bytes": bytes,
            "commands": commands.iter().map(|(c, n)| (c.clone(), serde_json::json!(n))).collect::<serde_json::Map<_, _>>(),
        })).collect::<Vec<_>>(),
    })
}

/// `GET /hotkeys`: the current window, the last complete one, the big
/// keys (db `-1`: the endpoint URL's database).
pub fn report_json(h: &HotKeys) -> serde_json::Value {
    let (now, last, big) = h.report();
    let conf = h.conf();
    serde_json::json!({
        "window_seconds": conf.window.as_secs_f64(),
        "big_key_bytes": conf.big_key_bytes.0,
        "current": window_json(&now),
        "last": last.as_ref().map(window_json),
        "big_keys": big.iter().map(|(db, key, bytes, command, at)| serde_json::json!({
            "db": db,
            "key": String::from_utf8_lossy(key),
            "bytes": bytes,
            "command": command,
            "seen_unix_s": unix_s(Some(*at)),
        })).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(top: usize) -> HotKeysConfig {
        HotKeysConfig {
            top,
            ..HotKeysConfig::default()
        }
    }

    /// A Zipf(s) sample over `n` keys from a fixed-seed generator: key
    /// `i` (from 0) is drawn with weight 1 / (i + 1)^s.
    fn zipf(n: usize, s: f64, draws: usize) -> Vec<usize> {
        let mut cdf = Vec::with_capacity(n);
        let mut acc = 0.0;
        for i in 0..n {
            acc += 1.0 / ((i + 1) as f64).powf(s);
            cdf.push(acc);
        }
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..draws)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let u = (x >> 11) as f64 / (1u64 << 53) as f64 * acc;
                cdf.partition_point(|c| *c < u).min(n - 1)
            })
            .collect()
    }

    #[test]
    fn the_top_ten_of_a_zipf_load_is_found() {
        let h = HotKeys::new(&config(100), &Metrics::new());
        let draws = zipf(100_000, 1.1, 500_000);
        let mut truth: HashMap<usize, u32> = HashMap::new();
        for &k in &draws {
            *truth.entry(k).or_default() += 1;
            h.record(0, &Bytes::from(format!("key:{k}")), "get", 10, 100);
        }
        let mut true_top: Vec<(usize, u32)> = truth.into_iter().collect();
        true_top.sort_by_key(|t| std::cmp::Reverse(t.1));
        let true_top: Vec<Bytes> = true_top[..10]
            .iter()
            .map(|(k, _)| Bytes::from(format!("key:{k}")))
            .collect();
        let (now, _, _) = h.report();
        let found: Vec<Bytes> = now.top[..10].iter().map(|t| t.1.clone()).collect();
        let hits = found.iter().filter(|k| true_top.contains(k)).count();
        assert!(
            hits >= 9,
            "{hits} of the true top 10: {found:?} / {true_top:?}"
        );
        assert_eq!(now.total, 500_000);
        assert_eq!(now.top[0].4, vec![("get".to_string(), now.top[0].4[0].1)]);
    }

    #[test]
    fn memory_stays_bounded_with_a_million_keys() {
        let h = HotKeys::new(&config(50), &Metrics::new());
        for k in 0..1_000_000u32 {
            let key = Bytes::from(k.to_be_bytes().to_vec());
            h.record(0, &key, "set", 10, 50);
            if k < 10_000 {
                h.saw_big(0, &key, "set", 1 << 20);
            }
        }
        let st = h.lock();
        assert!(st.current.top.len() <= 50, "{}", st.current.top.len());
        assert!(st.big.len() <= MAX_BIG, "{}", st.big.len());
        assert_eq!(st.current.requests.rows.len(), ROWS);
    }

    #[test]
    fn big_keys_keep_the_largest() {
        let h = HotKeys::new(&config(10), &Metrics::new());
        for i in 0..(MAX_BIG as u64 + 20) {
            h.saw_big(0, &Bytes::from(format!("b{i}")), "get", (1 << 20) + i);
        }
        let (_, _, big) = h.report();
        assert_eq!(big.len(), MAX_BIG);
        assert_eq!(big[0].1, Bytes::from(format!("b{}", MAX_BIG + 19)));
        assert!(big.iter().all(|b| b.2 >= (1 << 20) + 20));
    }
}
