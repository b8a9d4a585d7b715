//! The cache store's hit ratio under a Zipf load with a one-off scan in
//! the middle: TinyLFU (the store's policy) against LRU (what the store
//! was before moka, and moka's other policy). Not a timing: every figure
//! is a count, the same on any machine for a given seed.
//!
//! A store sized for `CAPACITY` entries; reads of 100,000 keys drawn from
//! a Zipf distribution (s = 1.1); every miss is one upstream read and
//! fills the entry. After `BEFORE` reads, a scan reads 10x the capacity
//! of keys never read before, once each; then `AFTER` more Zipf reads.
//! Printed per policy: the hit ratio before the scan, right after it (the
//! next 2,000 reads: how much of the hot set the scan flushed), over the
//! whole run, and the upstream reads.
//!
//! `cargo bench --bench cache_store`

use std::time::{Duration, Instant};

use bytes::Bytes;
use redis_sidecar::policy::cache::store::{ENTRY_OVERHEAD, Entry, INDEX_OVERHEAD, Policy, Store};

const KEYS: u64 = 100_000;
const CAPACITY: usize = 2_000;
const BEFORE: usize = 200_000;
const AFTER: usize = 200_000;
const RIGHT_AFTER: usize = 2_000;
const VALUE: usize = 100;

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn next_f64(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Zipf(s) over 1..=n by inverting its cumulative weights.
struct Zipf {
    cdf: Vec<f64>,
}

impl Zipf {
    fn new(n: u64, s: f64) -> Zipf {
        let mut acc = 0.0;
        let mut cdf = Vec::with_capacity(n as usize);
        for k in 1..=n {
            acc += 1.0 / (k as f64).powf(s);
            cdf.push(acc);
        }
        let total = acc;
        for c in &mut cdf {
            *c /= total;
        }
        Zipf { cdf }
    }

    fn sample(&self, rng: &mut Rng) -> u64 {
        let u = rng.next_f64();
        self.cdf.partition_point(|c| *c < u) as u64
    }
}

#[derive(Default)]
struct Counts {
    reads: u64,
    hits: u64,
}

impl Counts {
    fn ratio(&self) -> f64 {
        self.hits as f64 / self.reads.max(1) as f64
    }
}

fn read(store: &Store, key: &str, value: &Bytes, counts: &mut Counts, upstream: &mut u64) {
    counts.reads += 1;
    let entry_key = Bytes::from(format!("e:{key}"));
    if store.get(&entry_key, true, Instant::now()).is_some() {
        counts.hits += 1;
        return;
    }
    *upstream += 1;
    let k = Bytes::from(key.to_string());
    let seen = store.snapshot(std::slice::from_ref(&k));
    store.insert(
        entry_key,
        Entry {
            resp3: value.clone(),
            resp2: value.clone(),
            keys: vec![k],
            expires: Instant::now() + Duration::from_secs(3600),
            rule: 0,
        },
        &seen,
    );
}

fn main() {
    let zipf = Zipf::new(KEYS, 1.1);
    let value = Bytes::from(vec![b'v'; VALUE]);
    // Bytes one entry counts: overhead, its entry key, the value, the link.
    let per_entry = ENTRY_OVERHEAD + 8 + VALUE + INDEX_OVERHEAD + 6;
    println!(
        "Zipf s=1.1 over {KEYS} keys, a store of {CAPACITY} entries ({} bytes), {BEFORE} reads, a scan of {} new keys, {AFTER} reads",
        CAPACITY * per_entry,
        CAPACITY * 10
    );
    println!(
        "{:<8} {:>14} {:>20} {:>12} {:>15}",
        "policy", "before scan", "right after scan", "whole run", "upstream reads"
    );
    for (name, policy) in [("tinylfu", Policy::TinyLfu), ("lru", Policy::Lru)] {
        let store = Store::with_policy(CAPACITY * per_entry, policy);
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        let (mut before, mut right_after, mut whole) =
            (Counts::default(), Counts::default(), Counts::default());
        let mut upstream = 0;
        for _ in 0..BEFORE {
            let k = format!("k{}", zipf.sample(&mut rng));
            let mut c = Counts::default();
            read(&store, &k, &value, &mut c, &mut upstream);
            before.reads += c.reads;
            before.hits += c.hits;
        }
        for i in 0..CAPACITY * 10 {
            let k = format!("scan{i}");
            read(&store, &k, &value, &mut whole, &mut upstream);
        }
        for i in 0..AFTER {
            let k = format!("k{}", zipf.sample(&mut rng));
            let mut c = Counts::default();
            read(&store, &k, &value, &mut c, &mut upstream);
            if i < RIGHT_AFTER {
                right_after.reads += c.reads;
                right_after.hits += c.hits;
            }
            whole.reads += c.reads;
            whole.hits += c.hits;
        }
        whole.reads += before.reads;
        whole.hits += before.hits;
        println!(
            "{name:<8} {:>13.1}% {:>19.1}% {:>11.1}% {:>15}",
            before.ratio() * 100.0,
            right_after.ratio() * 100.0,
            whole.ratio() * 100.0,
            upstream
        );
    }
}
