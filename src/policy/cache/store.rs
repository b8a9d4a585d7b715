//! The cache's entries: bounded by bytes (keys, both encodings of the
//! reply and a fixed overhead per entry and per index slot), least
//! recently used first out, indexed by the Redis keys each entry read so
//! that one key's invalidation drops every entry (of every db, user and
//! command) that depends on it.
//!
//! Fills are guarded twice: a fill remembers the store's epoch (bumped by
//! every flush) and the generation slots of its keys (bumped by every
//! invalidation of a key hashing there) when it starts, and is dropped
//! if either moved by the time it lands. A slot is shared by the keys
//! hashing to it, so a write can spoil an unrelated fill, never the
//! reverse.

use std::collections::{BTreeMap, HashMap};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use bytes::Bytes;

/// Bytes counted per entry beyond its key and replies (the map slot, the
/// LRU slot, the entry's fields).
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
    /// Last used.
    tick: u64,
    /// Its slot in the LRU queue (the tick it was queued at).
    queued: u64,
    size: usize,
}

#[derive(Default)]
struct Inner {
    entries: HashMap<Bytes, Stored>,
    by_key: HashMap<Bytes, Vec<Bytes>>,
    lru: BTreeMap<u64, Bytes>,
    tick: u64,
    bytes: usize,
}

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

pub struct Store {
    inner: Mutex<Inner>,
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
    pub evictions: AtomicU64,
}

impl Store {
    pub fn new(max_bytes: usize) -> Store {
        Store {
            inner: Mutex::new(Inner::default()),
            stale: Mutex::new(Stale::default()),
            pending: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            pending_all: AtomicU64::new(0),
            max_bytes: AtomicUsize::new(max_bytes),
            epoch: AtomicU64::new(0),
            slots: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            hasher: RandomState::new(),
            evictions: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn set_max_bytes(&self, max: usize) {
        self.max_bytes.store(max, Ordering::Relaxed);
        let mut inner = self.lock();
        self.evict(&mut inner);
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
        let mut inner = self.lock();
        let inner = &mut *inner;
        let stored = inner.entries.get_mut(key)?;
        if stored.entry.expires <= now {
            let k = Bytes::copy_from_slice(key);
            Self::remove(inner, &k);
            return None;
        }
        // The LRU queue is fixed up lazily, at eviction: a hit only
        // records when it happened.
        inner.tick += 1;
        stored.tick = inner.tick;
        let reply = if resp3 {
            stored.entry.resp3.clone()
        } else {
            stored.entry.resp2.clone()
        };
        Some((stored.entry.rule, reply))
    }

    /// Store a fill unless a flush or an invalidation of one of its keys
    /// happened since `seen`; whether it was stored.
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
        let mut inner = self.lock();
        // Checked under the lock: invalidations bump slots under it too.
        if self.epoch.load(Ordering::Acquire) != seen.epoch
            || seen
                .slots
                .iter()
                .any(|&(i, g)| self.slots[i].load(Ordering::Acquire) != g)
        {
            return false;
        }
        if size > self.max_bytes.load(Ordering::Relaxed) {
            return false;
        }
        Self::remove(&mut inner, &key);
        inner.tick += 1;
        let tick = inner.tick;
        for k in &entry.keys {
            inner.by_key.entry(k.clone()).or_default().push(key.clone());
        }
        inner.lru.insert(tick, key.clone());
        inner.bytes += size;
        inner.entries.insert(
            key,
            Stored {
                entry,
                tick,
                queued: tick,
                size,
            },
        );
        self.evict(&mut inner);
        true
    }

    fn evict(&self, inner: &mut Inner) {
        let max = self.max_bytes.load(Ordering::Relaxed);
        while inner.bytes > max {
            let Some((queued, k)) = inner.lru.pop_first() else {
                break;
            };
            match inner.entries.get(&k).map(|s| s.tick) {
                // Used since it was queued: queued again as of then.
                Some(t) if t != queued => {
                    if let Some(s) = inner.entries.get_mut(&k) {
                        s.queued = t;
                    }
                    inner.lru.insert(t, k);
                }
                _ => {
                    Self::remove_queued(inner, &k);
                    self.evictions.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn remove(inner: &mut Inner, key: &Bytes) -> bool {
        let Some(queued) = inner.entries.get(key).map(|s| s.queued) else {
            return false;
        };
        inner.lru.remove(&queued);
        Self::remove_queued(inner, key)
    }

    /// Remove an entry whose LRU slot is already gone.
    fn remove_queued(inner: &mut Inner, key: &Bytes) -> bool {
        let Some(stored) = inner.entries.remove(key) else {
            return false;
        };
        inner.bytes -= stored.size;
        for k in &stored.entry.keys {
            if let Some(list) = inner.by_key.get_mut(k) {
                list.retain(|e| e != key);
                if list.is_empty() {
                    inner.by_key.remove(k);
                }
            }
        }
        true
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
        let mut inner = self.lock();
        let i = self.slot(key);
        self.slots[i].fetch_add(1, Ordering::AcqRel);
        let Some(list) = inner.by_key.remove(key) else {
            return 0;
        };
        list.iter().filter(|e| Self::remove(&mut inner, e)).count()
    }

    /// Drop everything; fills in flight will not land. How many went.
    pub fn flush(&self) -> usize {
        self.flush_keeping(|_| false)
    }

    /// [`Store::flush`] for an outage: the entries of rules `keep` says
    /// may stand in for an error are kept aside (replacing those of an
    /// earlier outage).
    pub fn flush_keeping(&self, keep: impl Fn(usize) -> bool) -> usize {
        let mut inner = self.lock();
        self.epoch.fetch_add(1, Ordering::AcqRel);
        let old = std::mem::take(&mut *inner);
        drop(inner);
        let n = old.entries.len();
        let mut stale = self.stale.lock().unwrap_or_else(PoisonError::into_inner);
        stale.entries = old
            .entries
            .into_iter()
            .filter(|(_, s)| keep(s.entry.rule))
            .map(|(k, s)| (k, (s.entry.rule, s.entry.resp3, s.entry.resp2)))
            .collect();
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

    /// (entries, bytes).
    pub fn size(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.entries.len(), inner.bytes)
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
        // The byte bound evicts the least recently used.
        for i in 0..200 {
            let seen = s.snapshot(&[Bytes::from(format!("k{i}"))]);
            let k = format!("k{i}");
            assert!(s.insert(Bytes::from(format!("e{i}")), entry(&[&k], "x"), &seen));
        }
        let (n, bytes) = s.size();
        assert!(bytes <= 10_000 && n < 200, "{n} {bytes}");
        assert!(s.evictions.load(Ordering::Relaxed) > 0);
        assert!(s.get(b"e199", true, now).is_some());
        assert!(s.get(b"e0", true, now).is_none());
    }
}
