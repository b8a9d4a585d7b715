//! GCRA and the bounded bucket maps the rate-limit rules keep.
//!
//! GCRA (the generic cell rate algorithm) keeps one number per bucket: the
//! theoretical arrival time `tat` of the next command. A command of weight
//! `n` arriving at `now` moves it to `max(tat, now) + n·T` (`T` = the
//! period divided by the rate); it conforms when the new `tat` is at most
//! `burst·T` ahead of `now`. A bucket whose `tat` is in the past holds no
//! information (it is a full bucket), so it can be dropped without
//! changing any decision: that is how idle state goes away.
//!
//! Why not the `governor` crate: a `delay` rule must *book* a slot (charge
//! now, pass later) so that the commands it holds keep their order and
//! later arrivals queue behind them; a command matched by several rules
//! must give back what earlier rules charged when a later one rejects it;
//! and per-key state must be capped, not only pruned. governor 0.10 checks
//! without booking, cannot refund and has no cap. GCRA itself is the few
//! lines below, the same as the shared scope's Lua script.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Instant;

/// Nanoseconds since the first use of the rate limiter: the clock every
/// bucket uses (monotonic; survives reloads).
pub fn now_ns() -> u64 {
    ns_at(Instant::now())
}

/// [`now_ns`] of an instant.
pub fn ns_at(t: Instant) -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    // A second before the first use, so that instants read just before it
    // are not all zero.
    let base = *BASE.get_or_init(|| {
        let now = Instant::now();
        now.checked_sub(std::time::Duration::from_secs(1))
            .unwrap_or(now)
    });
    u64::try_from(t.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}

/// One rule's rate: emission interval and burst.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gcra {
    /// Nanoseconds per command (the period over the rate).
    pub interval: u64,
    /// How far ahead of now `tat` may be: burst × interval.
    pub tau: u64,
}

impl Gcra {
    pub fn new(interval: u64, burst: u64) -> Gcra {
        let interval = interval.max(1);
        Gcra {
            interval,
            tau: interval.saturating_mul(burst),
        }
    }

    /// Charge `n` at `now` if it conforms within `max_wait`: `Ok(wait)`
    /// (charged; the command passes `wait` ns from now), or `Err(retry)`
    /// (nothing charged; it would conform in `retry` ns).
    pub fn charge(&self, tat: &mut u64, now: u64, n: u64, max_wait: u64) -> Result<u64, u64> {
        let next = (*tat)
            .max(now)
            .saturating_add(n.saturating_mul(self.interval));
        let wait = next.saturating_sub(now.saturating_add(self.tau));
        if wait <= max_wait {
            *tat = next;
            Ok(wait)
        } else {
            Err(wait)
        }
    }

    /// Give back what [`Gcra::charge`] took.
    pub fn refund(&self, tat: &mut u64, n: u64) {
        *tat = tat.saturating_sub(n.saturating_mul(self.interval));
    }
}

/// What a bucket map holds per key.
pub trait Bucket {
    /// The bucket says nothing any more (a fresh one would decide the
    /// same): it may be dropped.
    fn idle(&self, now: u64) -> bool;
}

impl Bucket for u64 {
    fn idle(&self, now: u64) -> bool {
        *self <= now
    }
}

const SHARDS: usize = 16;

/// A seeded multiply-xor hash (8 bytes per step): a bucket lookup is on
/// every limited command's path, and SipHash cost a third of it. Keys are
/// attacker-chosen only for per-key rules, whose shards are capped
/// (`max_tracked_keys`), so a collision flood degrades one bounded shard.
#[derive(Clone, Copy)]
pub struct SeededHash(u64);

impl BuildHasher for SeededHash {
    type Hasher = FastHasher;
    fn build_hasher(&self) -> FastHasher {
        FastHasher(self.0)
    }
}

pub struct FastHasher(u64);

const MUL: u64 = 0x9E37_79B9_7F4A_7C15;

impl std::hash::Hasher for FastHasher {
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.0 = (self.0 ^ u64::from_le_bytes(w))
                .wrapping_mul(MUL)
                .rotate_left(29);
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.0 = (self.0 ^ u64::from_le_bytes(w))
                .wrapping_mul(MUL)
                .rotate_left(29);
        }
    }

    fn write_usize(&mut self, n: usize) {
        self.0 = (self.0 ^ n as u64).wrapping_mul(MUL).rotate_left(29);
    }

    fn finish(&self) -> u64 {
        let h = self.0 ^ (self.0 >> 31);
        h.wrapping_mul(MUL) ^ (h >> 29)
    }
}

struct Inner<V> {
    map: HashMap<Box<[u8]>, V, SeededHash>,
    /// When a full shard was last scanned for idle buckets: a full shard
    /// of live buckets is scanned at most once per [`RESCAN`].
    scanned: u64,
}

type Shard<V> = Mutex<Inner<V>>;

/// Nanoseconds between two scans of a full shard.
const RESCAN: u64 = 1_000_000;

/// Buckets by key, in mutex-guarded shards, holding at most `cap` of them.
pub struct Buckets<V> {
    shards: Box<[Shard<V>]>,
    /// Seed of the shard choice and of the maps' hash.
    seed: u64,
    per_shard: usize,
}

impl<V: Bucket> Buckets<V> {
    /// `keyed`: many keys (16 shards) or one (`global`).
    pub fn new(keyed: bool, cap: usize) -> Buckets<V> {
        let n = if keyed { SHARDS } else { 1 };
        let seed = RandomState::new().hash_one(0u64) | 1;
        Buckets {
            shards: (0..n)
                .map(|_| {
                    Mutex::new(Inner {
                        map: HashMap::with_hasher(SeededHash(seed.rotate_left(17))),
                        scanned: 0,
                    })
                })
                .collect(),
            seed,
            per_shard: cap.div_ceil(n).max(1),
        }
    }

    fn shard(&self, key: &[u8]) -> &Shard<V> {
        let i = if self.shards.len() == 1 {
            0
        } else {
            // FNV-1a from a random seed: cheap, and spread enough to pick
            // one of 16 shards.
            let mut h = self.seed;
            for &b in key {
                h = (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
            }
            ((h ^ (h >> 32)) as usize) % self.shards.len()
        };
        &self.shards[i]
    }

    /// Run `f` on the key's bucket (made by `make` when missing); `None`
    /// when the map is full of live buckets.
    pub fn with<R>(
        &self,
        key: &[u8],
        now: u64,
        make: impl FnOnce() -> V,
        f: impl FnOnce(&mut V) -> R,
    ) -> Option<R> {
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let shard = &mut *shard;
        if let Some(v) = shard.map.get_mut(key) {
            return Some(f(v));
        }
        if shard.map.len() >= self.per_shard {
            if now.saturating_sub(shard.scanned) < RESCAN {
                return None;
            }
            shard.scanned = now;
            shard.map.retain(|_, v| !v.idle(now));
            if shard.map.len() >= self.per_shard {
                return None;
            }
        }
        let v = shard.map.entry(key.into()).or_insert_with(make);
        Some(f(v))
    }

    /// Run `f` on the key's bucket if it exists.
    pub fn existing<R>(&self, key: &[u8], f: impl FnOnce(&mut V) -> R) -> Option<R> {
        let mut shard = self
            .shard(key)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        shard.map.get_mut(key).map(f)
    }

    /// Drop idle buckets (and `gone` ones); how many are left.
    pub fn prune(&self, now: u64, gone: impl Fn(&V) -> bool) -> usize {
        let mut left = 0;
        for s in &self.shards {
            let mut shard = s.lock().unwrap_or_else(PoisonError::into_inner);
            shard.map.retain(|_, v| !v.idle(now) && !gone(v));
            if shard.map.capacity() > 64 && shard.map.capacity() > 4 * shard.map.len() {
                shard.map.shrink_to_fit();
            }
            left += shard.map.len();
        }
        left
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let g = Gcra::new(10, 5);
        let mut tat = 0;
        let now = 1_000;
        let allowed = (0..20)
            .filter(|_| g.charge(&mut tat, now, 1, 0).is_ok())
            .count();
        assert_eq!(allowed, 5);
        assert_eq!(g.charge(&mut tat, now, 1, 0), Err(10));
        // One interval later, one more.
        assert_eq!(g.charge(&mut tat, now + 10, 1, 0), Ok(0));
        assert!(g.charge(&mut tat, now + 10, 1, 0).is_err());
        // A delay books the slot: the next two wait 10 and 20.
        assert_eq!(g.charge(&mut tat, now + 10, 1, 100), Ok(10));
        assert_eq!(g.charge(&mut tat, now + 10, 1, 100), Ok(20));
        g.refund(&mut tat, 2);
        assert_eq!(g.charge(&mut tat, now + 10, 1, 100), Ok(10));
        // Idle long enough: a full bucket again.
        assert!(tat.idle(now + 1_000));
    }

    #[test]
    fn weight_larger_than_the_burst_never_conforms_at_once() {
        let g = Gcra::new(10, 2);
        let mut tat = 0;
        assert_eq!(g.charge(&mut tat, 100, 3, 0), Err(10));
        assert_eq!(tat, 0);
    }

    #[test]
    fn the_cap_holds_and_idle_buckets_make_room() {
        let b: Buckets<u64> = Buckets::new(true, 32);
        let mut placed = 0;
        for i in 0..1_000u32 {
            if b.with(&i.to_be_bytes(), 0, || 100, |_| ()).is_some() {
                placed += 1;
            }
        }
        assert!(
            placed >= 32 && b.len() <= 32 + SHARDS,
            "{placed} {}",
            b.len()
        );
        // At time 200 every bucket is idle: new keys find room.
        // Later, the idle ones make room (a full shard is scanned at most
        // once per RESCAN).
        let mut now = 0;
        for i in 1_000..2_000u32 {
            now = u64::from(i) * RESCAN;
            assert!(b.with(&i.to_be_bytes(), now, || now, |_| ()).is_some());
        }
        // Meanwhile, a full shard of live buckets refuses new keys.
        let live: Buckets<u64> = Buckets::new(false, 2);
        assert!(live.with(b"a", 0, || 10, |_| ()).is_some());
        assert!(live.with(b"b", 0, || 10, |_| ()).is_some());
        assert!(live.with(b"c", 5, || 10, |_| ()).is_none());
        assert!(live.with(b"c", RESCAN + 11, || 10, |_| ()).is_some());
        assert_eq!(b.prune(now + 1, |_| false), 0);
        assert!(b.is_empty());
    }
}
