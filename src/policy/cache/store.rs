//! The cache's entries, on moka: bounded by bytes (a weigher counts keys,
//! both encodings of the reply and a fixed overhead per entry and per
//! index link), TinyLFU admission and eviction (a one-off scan does not
//! flush the hot set, as it would an LRU's), each entry expiring at its
//! own time; indexed by the Redis keys each entry read so that one key's
//! invalidation drops every entry (of every db, user and command) that
//! depends on it.
//!
//! Fills are guarded twice: a fill remembers the store's epoch (bumped by
//! every flush) and the generation slots of its keys (bumped by every
//! invalidation of a key hashing there) when it starts, and is dropped
//! if either moved by the time it lands. A slot is shared by the keys
//! hashing to it, so a write can spoil an unrelated fill, never the
//! reverse. The check and the insert, and an invalidation's bump and
//! removals, happen under the index's lock.
//!
//! The memory bound: moka applies evictions in batches, so its weighted
//! size may pass the bound between two; the store counts the bytes it
//! holds itself and, once an insert passes the bound, has moka apply its
//! pending evictions at once. So the bytes held pass `max_memory` by at
//! most the entry being inserted, and only until that insert returns.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use moka::notification::RemovalCause;
use moka::policy::EvictionPolicy;

/// Bytes counted per entry beyond its key and replies (moka's node and
/// its bookkeeping, the entry's fields).
pub const ENTRY_OVERHEAD: usize = 192;
/// Bytes counted per (key, entry) index link.
pub const INDEX_OVERHEAD: usize = 64;
const SLOTS: usize = 4096;

pub struct Entry {
    pub resp3: Bytes,
    pub resp2: Bytes,
    /// The Redis keys it read.
    pub keys: Vec<Bytes>,
    pub expires: Instant,
    /// Index of its rule (for metrics).
    pub rule: usize,
}

struct Stored {
    entry: Entry,
    size: usize,
    /// Which insert made it: index links name it, so the removal of an
    /// older entry of the same key never unlinks a newer one.
    id: u64,
}

/// How entries are chosen for eviction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// moka's default: admission by frequency (TinyLFU), recency within.
    TinyLfu,
    /// Least recently used first out (what the cache was before moka; for
    /// comparisons).
    Lru,
}

type Map = moka::sync::Cache<Bytes, Arc<Stored>>;

/// Entries moka removed (evicted, expired, replaced, invalidated): their
/// index links are dropped at the next insert.
type Removed = Arc<Mutex<Vec<(Bytes, u64, Vec<Bytes>)>>>;

/// What a fill saw when it started.
#[derive(Clone, Debug)]
pub struct Snapshot {
    epoch: u64,
    slots: Vec<(usize, u64)>,
}

/// Why entries went away (the `reason` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    Tracking,
    Write,
    Flush,
    Switch,
    Reload,
    /// A hot key cooled.
    Cooled,
}

impl Reason {
    pub fn label(self) -> &'static str {
        match self {
            Reason::Tracking => "tracking",
            Reason::Write => "write",
            Reason::Flush => "flush",
            Reason::Switch => "switch",
            Reason::Reload => "reload",
            Reason::Cooled => "cooled",
        }
    }
}

/// Entries an outage flushed, kept to stand in for an error
/// (`stale_if_error`); never hits.
#[derive(Default)]
struct Stale {
    entries: HashMap<Bytes, (usize, Bytes, Bytes)>,
    at: Option<Instant>,
}

/// An entry expires at its own time (the shorter of its rule's ttl and
/// its keys' TTLs).
struct Expiry;

impl moka::Expiry<Bytes, Arc<Stored>> for Expiry {
    fn expire_after_create(
        &self,
        _key: &Bytes,
        value: &Arc<Stored>,
        now: Instant,
    ) -> Option<Duration> {
        Some(value.entry.expires.saturating_duration_since(now))
    }
}

pub struct Store {
    map: RwLock<Map>,
    /// The index: Redis key -> (entry, its id); the lock every change of
    /// entries and fences takes.
    index: Mutex<HashMap<Bytes, Vec<(Bytes, u64)>>>,
    removed: Removed,
    /// Bytes held (the weigher's sizes), kept by the store.
    bytes: Arc<AtomicUsize>,
    next_id: AtomicU64,
    policy: Policy,
    stale: Mutex<Stale>,
    /// Writes through the sidecar not yet answered, per slot (and of
    /// every key: FLUSHALL). A read of such a key is not cached: a fill
    /// runs on another connection and could overtake the write in Redis.
    pending: Box<[AtomicU64]>,
    pending_all: AtomicU64,
    max_bytes: AtomicUsize,
    epoch: AtomicU64,
    slots: Box<[AtomicU64]>,
    hasher: RandomState,
    pub evictions: Arc<AtomicU64>,
}

impl Store {
    pub fn new(max_bytes: usize) -> Store {
        Store::with_policy(max_bytes, Policy::TinyLfu)
    }

    pub fn with_policy(max_bytes: usize, policy: Policy) -> Store {
        let removed: Removed = Arc::default();
        let bytes = Arc::new(AtomicUsize::new(0));
        let evictions = Arc::new(AtomicU64::new(0));
        let map = Self::map(max_bytes, policy, &removed, &bytes, &evictions);
        Store {
            map: RwLock::new(map),
            index: Mutex::new(HashMap::new()),
            removed,
            bytes,
            next_id: AtomicU64::new(0),
            policy,
            stale: Mutex::new(Stale::default()),
            pending: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            pending_all: AtomicU64::new(0),
            max_bytes: AtomicUsize::new(max_bytes),
            epoch: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            evictions,
        }
    }

    fn map(
        max_bytes: usize,
        policy: Policy,
        removed: &Removed,
        bytes: &Arc<AtomicUsize>,
        evictions: &Arc<AtomicU64>,
    ) -> Map {
        let (removed, bytes, evictions) = (removed.clone(), bytes.clone(), evictions.clone());
        moka::sync::Cache::builder()
            .max_capacity(max_bytes as u64)
            .weigher(|_, v: &Arc<Stored>| u32::try_from(v.size).unwrap_or(u32::MAX))
            .expire_after(Expiry)
            .eviction_policy(match policy {
                Policy::TinyLfu => EvictionPolicy::tiny_lfu(),
                Policy::Lru => EvictionPolicy::lru(),
            })
            .eviction_listener(move |key: Arc<Bytes>, v: Arc<Stored>, cause| {
                bytes.fetch_sub(v.size, Ordering::AcqRel);
                if cause == RemovalCause::Size {
                    evictions.fetch_add(1, Ordering::Relaxed);
                }
                removed
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push(((*key).clone(), v.id, v.entry.keys.clone()));
            })
            .build()
    }

    fn read_map(&self) -> std::sync::RwLockReadGuard<'_, Map> {
        self.map.read().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Bytes, Vec<(Bytes, u64)>>> {
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A new bound: moka's is fixed when it is built, so the entries go
    /// (as on a flush) and a map of the new size takes their place.
    pub fn set_max_bytes(&self, max: usize) {
        if self.max_bytes.swap(max, Ordering::AcqRel) == max {
            return;
        }
        let fresh = Self::map(
            max,
            self.policy,
            &self.removed,
            &self.bytes,
            &self.evictions,
        );
        self.flush();
        let mut map = self.map.write().unwrap_or_else(PoisonError::into_inner);
        map.run_pending_tasks();
        *map = fresh;
    }

    fn slot(&self, key: &[u8]) -> usize {
        (self.hasher.hash_one(key) as usize) % SLOTS
    }

    pub fn snapshot(&self, keys: &[Bytes]) -> Snapshot {
        Snapshot {
            epoch: self.epoch.load(Ordering::Acquire),
            slots: keys
                .iter()
                .map(|k| {
                    let i = self.slot(k);
                    (i, self.slots[i].load(Ordering::Acquire))
                })
                .collect(),
        }
    }

    /// The entry, if present and not expired: (its rule, the reply in the
    /// protocol asked for).
    pub fn get(&self, key: &[u8], resp3: bool, now: Instant) -> Option<(usize, Bytes)> {
        let stored = self.read_map().get(key)?;
        if stored.entry.expires <= now {
            return None;
        }
        let reply = if resp3 {
            stored.entry.resp3.clone()
        } else {
            stored.entry.resp2.clone()
        };
        Some((stored.entry.rule, reply))
    }

    /// Store a fill unless a flush or an invalidation of one of its keys
    /// happened since `seen`; whether it was stored (admission may still
    /// turn it away: moka decides at its next maintenance).
    pub fn insert(&self, key: Bytes, entry: Entry, seen: &Snapshot) -> bool {
        let size = ENTRY_OVERHEAD
            + key.len()
            + entry.resp3.len()
            + if entry.resp2 == entry.resp3 {
                0
            } else {
                entry.resp2.len()
            }
            + entry
                .keys
                .iter()
                .map(|k| k.len() + INDEX_OVERHEAD)
                .sum::<usize>();
        let max = self.max_bytes.load(Ordering::Relaxed);
        if size > max {
            return false;
        }
        {
            let mut index = self.lock();
            // Checked under the lock: invalidations bump slots under it too.
            if self.epoch.load(Ordering::Acquire) != seen.epoch
                || seen
                    .slots
                    .iter()
                    .any(|&(i, g)| self.slots[i].load(Ordering::Acquire) != g)
            {
                return false;
            }
            self.unlink_removed(&mut index);
            let id = self.next_id.fetch_add(1, Ordering::Relaxed);
            for k in &entry.keys {
                index.entry(k.clone()).or_default().push((key.clone(), id));
            }
            self.bytes.fetch_add(size, Ordering::AcqRel);
            self.read_map()
                .insert(key, Arc::new(Stored { entry, size, id }));
        }
        if self.bytes.load(Ordering::Acquire) > max {
            // Past the bound: the evictions moka has pending, now.
            self.read_map().run_pending_tasks();
        }
        true
    }

    /// Drop the index links of entries moka removed (by id: a newer entry
    /// of the same key keeps its own).
    fn unlink_removed(&self, index: &mut HashMap<Bytes, Vec<(Bytes, u64)>>) {
        let removed =
            std::mem::take(&mut *self.removed.lock().unwrap_or_else(PoisonError::into_inner));
        for (entry, id, keys) in removed {
            for k in keys {
                if let Some(list) = index.get_mut(&k) {
                    list.retain(|(e, i)| !(*i == id && *e == entry));
                    if list.is_empty() {
                        index.remove(&k);
                    }
                }
            }
        }
    }

    /// A write of `key` is on its way: reads of it are not cached until
    /// [`Store::write_done`] with the returned slot.
    pub fn write_begins(&self, key: &[u8]) -> usize {
        let i = self.slot(key);
        self.pending[i].fetch_add(1, Ordering::AcqRel);
        i
    }

    pub fn write_done(&self, slot: usize) {
        self.pending[slot].fetch_sub(1, Ordering::AcqRel);
    }

    /// A FLUSHALL/FLUSHDB/SWAPDB is on its way: no read is cached until
    /// [`Store::flush_done`].
    pub fn flush_begins(&self) {
        self.pending_all.fetch_add(1, Ordering::AcqRel);
    }

    pub fn flush_done(&self) {
        self.pending_all.fetch_sub(1, Ordering::AcqRel);
    }

    /// A write of one of `keys` through the sidecar is not answered yet.
    pub fn write_pending(&self, keys: &[Bytes]) -> bool {
        self.pending_all.load(Ordering::Acquire) > 0
            || keys
                .iter()
                .any(|k| self.pending[self.slot(k)].load(Ordering::Acquire) > 0)
    }

    /// Drop every entry that read `key` (in any db); fills in flight that
    /// read it will not land. How many entries went.
    pub fn invalidate(&self, key: &[u8]) -> usize {
        let mut index = self.lock();
        let i = self.slot(key);
        self.slots[i].fetch_add(1, Ordering::AcqRel);
        let Some(list) = index.remove(key) else {
            return 0;
        };
        drop(index);
        // An entry key always reads the same keys (they come from its
        // arguments): whatever entry it holds now read `key` too.
        let map = self.read_map();
        list.iter().filter(|(e, _)| map.remove(e).is_some()).count()
    }

    /// Drop everything; fills in flight will not land. How many went.
    pub fn flush(&self) -> usize {
        self.flush_keeping(|_| false)
    }

    /// [`Store::flush`] for an outage: the entries of rules `keep` says
    /// may stand in for an error are kept aside (replacing those of an
    /// earlier outage).
    pub fn flush_keeping(&self, keep: impl Fn(usize) -> bool) -> usize {
        let mut index = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        index.clear();
        let map = self.read_map();
        let mut n = 0;
        let mut kept = HashMap::new();
        for (k, s) in map.iter() {
            n += 1;
            if keep(s.entry.rule) {
                let e = &s.entry;
                kept.insert((*k).clone(), (e.rule, e.resp3.clone(), e.resp2.clone()));
            }
        }
        map.invalidate_all();
        drop(index);
        map.run_pending_tasks();
        drop(map);
        // What the flush removed was unlinked above (the index cleared).
        self.removed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        stale.entries = kept;
        stale.at = (!stale.entries.is_empty()).then(Instant::now);
        n
    }

    /// An entry an outage flushed less than `window` ago.
    pub fn stale(&self, key: &[u8], resp3: bool, window: std::time::Duration) -> Option<Bytes> {
        let stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        if stale.at.is_none_or(|at| at.elapsed() >= window) {
            return None;
        }
        stale
            .entries
            .get(key)
            .map(|(_, r3, r2)| if resp3 { r3.clone() } else { r2.clone() })
    }

    /// Forget stale entries older than `window`.
    pub fn expire_stale(&self, window: std::time::Duration) {
        let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        if stale.at.is_some_and(|at| at.elapsed() >= window) {
            *stale = Stale::default();
        }
    }

    /// (entries, bytes), once moka's pending work is applied.
    pub fn size(&self) -> (usize, usize) {
        let map = self.read_map();
        map.run_pending_tasks();
        (
            map.entry_count() as usize,
            self.bytes.load(Ordering::Acquire),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn entry(keys: &[&str], value: &str) -> Entry {
        Entry {
            resp3: Bytes::from(value.to_string()),
            resp2: Bytes::from(value.to_string()),
            keys: keys.iter().map(|k| Bytes::from(k.to_string())).collect(),
            expires: Instant::now() + Duration::from_secs(60),
            rule: 0,
        }
    }

    #[test]
    fn invalidation_fences_and_bounds() {
        let s = Store::new(10_000);
        let now = Instant::now();
        let seen = s.snapshot(&[Bytes::from("a")]);
        assert!(s.insert(Bytes::from("e1"), entry(&["a"], "v1"), &seen));
        assert_eq!(
            s.get(b"e1", true, now).map(|r| r.1),
            Some(Bytes::from("v1"))
        );
        // A fill that started before an invalidation of its key is dropped.
        let seen = s.snapshot(&[Bytes::from("a")]);
        assert_eq!(s.invalidate(b"a"), 1);
        assert!(s.get(b"e1", true, now).is_none());
        assert!(!s.insert(Bytes::from("e1"), entry(&["a"], "old"), &seen));
        // ... and one before a flush.
        let seen = s.snapshot(&[Bytes::from("b")]);
        s.flush();
        assert!(!s.insert(Bytes::from("e2"), entry(&["b"], "old"), &seen));
        // The byte bound, whatever the policy; a hot entry survives a scan
        // of entries read once under TinyLFU, not under LRU.
        for policy in [Policy::Lru, Policy::TinyLfu] {
            let s = Store::with_policy(10_000, policy);
            let seen = s.snapshot(&[Bytes::from("hot")]);
            assert!(s.insert(Bytes::from("hot"), entry(&["hot"], "h"), &seen));
            for _ in 0..20 {
                assert!(s.get(b"hot", true, now).is_some());
            }
            for i in 0..200 {
                let k = format!("k{i}");
                let seen = s.snapshot(&[Bytes::from(k.clone())]);
                assert!(s.insert(Bytes::from(format!("e{i}")), entry(&[&k], "x"), &seen));
                assert!(
                    s.bytes.load(Ordering::Relaxed) <= 10_000 + 300,
                    "{policy:?}"
                );
            }
            let (n, bytes) = s.size();
            assert!(bytes <= 10_000 && n < 200, "{policy:?}: {n} {bytes}");
            assert!(s.evictions.load(Ordering::Relaxed) > 0);
            let hot = s.get(b"hot", true, now).is_some();
            match policy {
                Policy::Lru => {
                    assert!(!hot, "scanned out");
                    assert!(s.get(b"e199", true, now).is_some());
                    assert!(s.get(b"e0", true, now).is_none());
                }
                Policy::TinyLfu => assert!(hot, "kept through the scan"),
            }
            // An invalidation after evictions still finds what is left.
            assert!(s.invalidate(b"k199") <= 1);
            assert!(s.get(b"e199", true, now).is_none());
        }
    }

    #[test]
    fn a_new_bound_flushes_and_applies() {
        let s = Store::new(100_000);
        let now = Instant::now();
        let seen = s.snapshot(&[Bytes::from("a")]);
        assert!(s.insert(Bytes::from("e1"), entry(&["a"], "v1"), &seen));
        s.set_max_bytes(100_000);
        assert!(
            s.get(b"e1", true, now).is_some(),
            "the same bound keeps entries"
        );
        s.set_max_bytes(1_000);
        assert!(s.get(b"e1", true, now).is_none(), "a new bound flushes");
        // A fill that started before the change does not land.
        assert!(!s.insert(Bytes::from("e1"), entry(&["a"], "v1"), &seen));
        for i in 0..20 {
            let k = format!("k{i}");
            let seen = s.snapshot(&[Bytes::from(k.clone())]);
            s.insert(Bytes::from(format!("e{i}")), entry(&[&k], "x"), &seen);
        }
        assert!(s.size().1 <= 1_000, "{:?}", s.size());
    }
}
