//! The local key table of one rate-limit policy: each key's GCRA state (its theoretical arrival
//! time, governor's `Nanos`), under a hash of the key (never the key itself), bounded to
//! `max_keys`.
//!
//! Past the bound the least recently seen key is evicted and counted. An evicted key starts
//! fresh, which is what a key idle for longer than its burst window would do anyway; a key last
//! seen at `s` has its arrival time at most `s + burst × T`, so the least recently seen key is
//! the one most likely to have reached that state already, and evicting it changes the fewest
//! decisions. The table is sharded so that concurrent requests rarely wait on one lock.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use governor::nanos::Nanos;
use governor::state::StateStore;
use lru::LruCache;
use prometheus::IntCounter;

const SHARDS: usize = 16;

thread_local! {
    /// The arrival time the last decision on this thread left its key with (`None`: a fresh
    /// key that was refused), read by [`last_arrival`] so the limiter need not look again.
    static LAST: std::cell::Cell<Option<u64>> = const { std::cell::Cell::new(None) };
}

/// The arrival time the last decision made on this thread left its key with.
pub fn last_arrival() -> Option<Nanos> {
    LAST.get().map(Nanos::from)
}

/// Keys' arrival times, bounded.
#[derive(Debug)]
pub struct Table {
    shards: Box<[Mutex<LruCache<u64, u64>>]>,
    evictions: IntCounter,
}

impl Table {
    /// A table of at most `max_keys` keys (at least one per shard); evictions are counted on
    /// `evictions`.
    pub fn new(max_keys: usize, evictions: IntCounter) -> Self {
        let per_shard =
            NonZeroUsize::new(max_keys.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
            evictions,
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, LruCache<u64, u64>> {
        // The key is a hash already: its top bits pick the shard (the map hashes it again).
        self.shards[(key >> 60) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A key's arrival time, without marking it seen.
    pub fn arrival(&self, key: u64) -> Option<Nanos> {
        self.shard(key).peek(&key).copied().map(Nanos::from)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    /// Whether no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A [`Table`] shared between its limiter and whoever reads it (headers, the keys gauge).
#[derive(Debug, Clone)]
pub struct SharedTable(pub std::sync::Arc<Table>);

impl StateStore for SharedTable {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.0.measure_and_replace(key, f)
    }
}

impl StateStore for Table {
    type Key = u64;

    fn measure_and_replace<T, F, E>(&self, key: &u64, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        let mut shard = self.shard(*key);
        // `get` marks the key seen, limited or not.
        let old = shard.get(key).copied();
        LAST.set(old);
        let (outcome, next) = f(old.map(Nanos::from))?;
        LAST.set(Some(next.as_u64()));
        if let Some((evicted, _)) = shard.push(*key, next.as_u64())
            && evicted != *key
        {
            self.evictions.inc();
        }
        Ok(outcome)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(t: &Table, key: u64, v: u64) {
        let _: Result<(), ()> = t.measure_and_replace(&key, |_| Ok(((), Nanos::from(v))));
    }

    #[test]
    fn the_table_holds_at_most_its_bound_and_evicts_the_least_recently_seen() {
        let evictions = IntCounter::new("e", "e").unwrap();
        let t = Table::new(SHARDS, evictions.clone());
        // One key per shard fills it; keys land by their top bits.
        let key = |shard: u64, n: u64| (shard << 60) | n;
        for s in 0..SHARDS as u64 {
            set(&t, key(s, 1), 10);
        }
        assert_eq!(t.len(), SHARDS);
        set(&t, key(3, 1), 11);
        assert_eq!(
            (t.len(), evictions.get()),
            (SHARDS, 0),
            "a known key is replaced"
        );
        set(&t, key(3, 2), 12);
        assert_eq!((t.len(), evictions.get()), (SHARDS, 1), "a new key evicts");
        assert_eq!(t.arrival(key(3, 1)), None);
        assert_eq!(t.arrival(key(3, 2)), Some(Nanos::from(12)));
        // A flood of distinct keys never grows the table past its bound.
        for n in 0..10_000u64 {
            set(&t, n.wrapping_mul(0x9E37_79B9_7F4A_7C15), n);
        }
        assert_eq!(t.len(), SHARDS);
    }
}
