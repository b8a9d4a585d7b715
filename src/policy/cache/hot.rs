//! Hot keys cached without a rule (`[cache.hot_keys]`): reads of keys no
//! rule names are counted per second (a count-min sketch: bounded memory
//! whatever the number of keys); a key read at least `threshold` times in
//! a second becomes hot (up to `max_keys`) and is cached from then on,
//! through the same coherent fill as a rule's key; a hot key read fewer
//! than `threshold / 2` times in a second cools: it leaves, with its
//! entries.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::config::HotKeysCacheConfig;
use crate::policy::glob::Glob;
use crate::policy::hotkeys::{Prehashed, Sketch, key_hash, new_seed};

/// How long reads are counted before a key is judged again.
pub const WINDOW: Duration = Duration::from_secs(1);

struct State {
    started: Instant,
    sketch: Sketch,
    /// Hot keys by their hash (the sketch's): the key, and its reads
    /// this window. Two keys of one 64-bit hash count as one: the other
    /// is cached too, harmlessly (the same coherent fill; its entries
    /// leave with writes or their ttl).
    hot: HashMap<u64, (Bytes, u32), Prehashed>,
}

pub struct HotKeys {
    threshold: u32,
    max_keys: usize,
    exclude: Vec<Glob>,
    seed: u64,
    state: Mutex<State>,
}

impl HotKeys {
    pub fn new(c: &HotKeysCacheConfig) -> HotKeys {
        HotKeys {
            threshold: c.threshold.max(1),
            max_keys: c.max_keys,
            exclude: c.exclude.iter().map(|p| Glob::new(p.as_bytes())).collect(),
            seed: new_seed(),
            state: Mutex::new(State {
                started: Instant::now(),
                sketch: Sketch::new(),
                hot: HashMap::with_hasher(Prehashed),
            }),
        }
    }

    /// Count a read of `keys` (in `db`); whether every one of them is hot
    /// (the read is cached). `cooled` gets the keys that cooled if a
    /// window ended.
    pub fn read(&self, db: i64, keys: &[Bytes], now: Instant, cooled: &mut Vec<Bytes>) -> bool {
        if keys.is_empty()
            || keys
                .iter()
                .any(|k| self.exclude.iter().any(|g| g.matches(k)))
        {
            return false;
        }
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.rotate(&mut st, now, cooled);
        let mut all = true;
        for k in keys {
            let h = key_hash(self.seed, db, k);
            if let Some((_, n)) = st.hot.get_mut(&h) {
                *n = n.saturating_add(1);
                continue;
            }
            let est = st.sketch.add(h, 1);
            if est >= self.threshold && st.hot.len() < self.max_keys {
                st.hot.insert(h, (k.clone(), est));
            } else {
                all = false;
            }
        }
        all
    }

    /// End the window if it is due: keys read under half the threshold
    /// cool (into `cooled`), the others count again from 0.
    fn rotate(&self, st: &mut State, now: Instant, cooled: &mut Vec<Bytes>) {
        if now.duration_since(st.started) < WINDOW {
            return;
        }
        // A window of more than a second (no reads for a while) counts
        // as that many seconds.
        let secs = now.duration_since(st.started).as_secs_f64().max(1.0);
        let floor = f64::from(self.threshold) / 2.0 * secs;
        st.hot.retain(|_, (k, n)| {
            let keep = f64::from(*n) >= floor;
            if !keep {
                cooled.push(k.clone());
            }
            *n = 0;
            keep
        });
        st.sketch.clear();
        st.started = now;
    }

    /// End the window if due (with no reads, keys cool too); how many
    /// keys are hot.
    pub fn tick(&self, now: Instant, cooled: &mut Vec<Bytes>) -> usize {
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.rotate(&mut st, now, cooled);
        st.hot.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(threshold: u32, max_keys: usize) -> HotKeysCacheConfig {
        HotKeysCacheConfig {
            enabled: true,
            threshold,
            max_keys,
            ..HotKeysCacheConfig::default()
        }
    }

    #[test]
    fn a_key_turns_hot_at_the_threshold_and_cools_under_half() {
        let h = HotKeys::new(&config(10, 2));
        let t0 = Instant::now();
        let k = [Bytes::from_static(b"feed:1")];
        let mut cooled = Vec::new();
        let hot: Vec<bool> = (0..10).map(|_| h.read(0, &k, t0, &mut cooled)).collect();
        assert_eq!(hot.iter().filter(|h| **h).count(), 1, "{hot:?}");
        assert!(hot[9], "the 10th read makes it hot");
        // Another db is another key.
        assert!(!h.read(1, &k, t0, &mut cooled));
        // The next second: 5 reads (half the threshold) keep it hot.
        let t1 = t0 + WINDOW;
        for _ in 0..5 {
            assert!(h.read(0, &k, t1, &mut cooled));
        }
        // The one after: 4 reads, then the window ends: it cooled.
        let t2 = t1 + WINDOW;
        for _ in 0..4 {
            assert!(h.read(0, &k, t2, &mut cooled));
        }
        assert!(cooled.is_empty());
        assert_eq!(h.tick(t2 + WINDOW, &mut cooled), 0);
        assert_eq!(cooled, k);
    }

    #[test]
    fn excluded_keys_and_max_keys() {
        let h = HotKeys::new(&config(1, 2));
        let now = Instant::now();
        let mut cooled = Vec::new();
        assert!(!h.read(0, &[Bytes::from_static(b"bull:q:1")], now, &mut cooled));
        assert!(h.read(0, &[Bytes::from_static(b"a")], now, &mut cooled));
        assert!(h.read(0, &[Bytes::from_static(b"b")], now, &mut cooled));
        // Full: a third key is not cached, however hot.
        assert!(!h.read(0, &[Bytes::from_static(b"c")], now, &mut cooled));
        // A read of several keys is hot only if all are.
        let ab = [Bytes::from_static(b"a"), Bytes::from_static(b"b")];
        assert!(h.read(0, &ab, now, &mut cooled));
        let ac = [Bytes::from_static(b"a"), Bytes::from_static(b"c")];
        assert!(!h.read(0, &ac, now, &mut cooled));
    }
}
