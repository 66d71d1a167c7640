//! The local key table of one rate-limit policy: each key's GCRA state (its theoretical arrival
//! time, governor's `Nanos`), under a hash of the key (never the key itself), bounded to
//! `max_keys`.
//!
//! Past the bound a key not seen recently is evicted and counted, chosen by CLOCK (second
//! chance), the usual approximation of least-recently-seen: each key has a bit set when it is
//! seen, and the eviction hand clears bits as it passes and takes the first key whose bit is
//! clear, so a key seen since the hand last passed survives. An evicted key starts fresh, which
//! is what a key idle for longer than its burst window would do anyway; a key last seen at `s`
//! has its arrival time at most `s + burst × T`, so a key not seen for longest is the one most
//! likely to have reached that state already, and evicting it changes the fewest decisions.
//! CLOCK rather than a linked LRU: a hit writes one bit in the slot it reads, where an LRU
//! relinks the node and its neighbours (cache misses at 100 000 keys). The table is sharded so
//! that concurrent requests rarely wait on one lock.

use std::sync::Mutex;

use governor::nanos::Nanos;
use governor::state::StateStore;
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

/// One shard: slots in a ring for the clock hand, and the index of each key's slot.
#[derive(Debug)]
struct Shard {
    index: hashbrown::HashMap<u64, u32>,
    slots: Vec<Slot>,
    hand: usize,
    cap: usize,
}

#[derive(Debug, Clone, Copy)]
struct Slot {
    key: u64,
    tat: u64,
    seen: bool,
}

impl Shard {
    fn new(cap: usize) -> Self {
        Self {
            index: hashbrown::HashMap::with_capacity(cap.min(1 << 16)),
            slots: Vec::with_capacity(cap.min(1 << 16)),
            hand: 0,
            cap,
        }
    }

    /// A key's arrival time, marking it seen.
    fn get(&mut self, key: u64) -> Option<u64> {
        let slot = &mut self.slots[*self.index.get(&key)? as usize];
        slot.seen = true;
        Some(slot.tat)
    }

    fn peek(&self, key: u64) -> Option<u64> {
        Some(self.slots[*self.index.get(&key)? as usize].tat)
    }

    /// Stores `tat` for `key`; whether another key was evicted for it.
    fn put(&mut self, key: u64, tat: u64) -> bool {
        if let Some(&i) = self.index.get(&key) {
            self.slots[i as usize].tat = tat;
            return false;
        }
        let slot = Slot {
            key,
            tat,
            seen: false,
        };
        if self.slots.len() < self.cap {
            self.index.insert(key, self.slots.len() as u32);
            self.slots.push(slot);
            return false;
        }
        // Second chance: clear the bits of keys seen since the hand last passed, take the first
        // key whose bit is clear (at most one lap).
        while self.slots[self.hand].seen {
            self.slots[self.hand].seen = false;
            self.hand = (self.hand + 1) % self.slots.len();
        }
        let i = self.hand;
        self.index.remove(&self.slots[i].key);
        self.index.insert(key, i as u32);
        self.slots[i] = slot;
        self.hand = (self.hand + 1) % self.slots.len();
        true
    }
}

/// Keys' arrival times, bounded.
#[derive(Debug)]
pub struct Table {
    shards: Box<[Mutex<Shard>]>,
    evictions: IntCounter,
}

impl Table {
    /// A table of at most `max_keys` keys (at least one per shard); evictions are counted on
    /// `evictions`.
    pub fn new(max_keys: usize, evictions: IntCounter) -> Self {
        let per_shard = max_keys.div_ceil(SHARDS).max(1);
        Self {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(Shard::new(per_shard)))
                .collect(),
            evictions,
        }
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, Shard> {
        // The key is a hash already: its top bits pick the shard (the map hashes it again).
        self.shards[(key >> 60) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// A key's arrival time, without marking it seen.
    pub fn arrival(&self, key: u64) -> Option<Nanos> {
        self.shard(key).peek(key).map(Nanos::from)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).index.len())
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
        let old = shard.get(*key);
        LAST.set(old);
        let (outcome, next) = f(old.map(Nanos::from))?;
        LAST.set(Some(next.as_u64()));
        if shard.put(*key, next.as_u64()) {
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
    fn the_table_holds_at_most_its_bound_and_evicts_a_key_not_seen_recently() {
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
        // Second chance: in a shard of 4, a key seen since the hand last passed survives.
        let t2 = Table::new(4 * SHARDS, IntCounter::new("e2", "e").unwrap());
        for n in 1..=4 {
            set(&t2, key(0, n), n);
        }
        set(&t2, key(0, 1), 11); // seen again
        set(&t2, key(0, 5), 5);
        assert!(
            t2.arrival(key(0, 1)).is_some(),
            "a key seen since the hand passed survives"
        );
        assert_eq!(t2.arrival(key(0, 2)), None, "the first unseen key goes");
        let _: Result<(), ()> = t2.measure_and_replace(&key(0, 3), |v| Ok(((), v.unwrap())));
        set(&t2, key(0, 6), 6);
        assert!(t2.arrival(key(0, 3)).is_some());
        assert_eq!(t2.arrival(key(0, 4)), None);
        assert_eq!(t2.len(), 4);
        // A flood of distinct keys never grows the table past its bound.
        for n in 0..10_000u64 {
            set(&t, n.wrapping_mul(0x9E37_79B9_7F4A_7C15), n);
        }
        assert_eq!(t.len(), SHARDS);
    }
}
