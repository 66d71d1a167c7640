//! GCRA per key, on governor: [`Limiter::check`] decides (governor's `check_key_n` over the
//! policy's [`Table`]) and reports what the answer's headers say: how many requests are left
//! now, when the key is back to a full burst, and, when limited, how long to wait.
//!
//! The figures follow the reference model (`shared/corpora/ratelimit`, throttled's GCRA): with
//! emission interval `T` and `burst` cells, `remaining = ⌊(burst·T − (tat − now)) / T⌋`,
//! `reset = tat − now`, `retry_after = earliest − now`; a request for more cells than the burst
//! can never pass (no retry).

use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock, Reference};
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::{Quota, RateLimiter};

use super::table::{SharedTable, Table};

/// One decision.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request was let through.
    pub allowed: bool,
    /// Requests the key could still make now.
    pub remaining: u32,
    /// Time until the key is back to a full burst.
    pub reset: Duration,
    /// When limited: the wait before the same request would pass (`None`: never, or allowed).
    pub retry_after: Option<Duration>,
}

/// A policy's GCRA over its table of keys.
pub struct Limiter<C: Clock = DefaultClock> {
    limiter: RateLimiter<u64, SharedTable, C, NoOpMiddleware<C::Instant>>,
    table: Arc<Table>,
    clock: C,
    /// The clock reading governor's arrival times count from.
    start: C::Instant,
    /// The emission interval `T` and the burst, in cells.
    period: Duration,
    burst: u32,
}

impl<C: Clock> std::fmt::Debug for Limiter<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limiter")
            .field("period", &self.period)
            .field("burst", &self.burst)
            .finish_non_exhaustive()
    }
}

impl<C: Clock + Clone> Limiter<C> {
    /// One request every `period`, `burst` at once, over `table`, timed by `clock`.
    pub fn new(period: Duration, burst: NonZeroU32, table: Table, clock: C) -> Self {
        let table = Arc::new(table);
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_second(NonZeroU32::MIN))
            .allow_burst(burst);
        let start = clock.now();
        Self {
            limiter: RateLimiter::new(quota, SharedTable(table.clone()), clock.clone()),
            table,
            clock,
            start,
            period,
            burst: burst.get(),
        }
    }

    /// Takes `cells` for `key` if it can; `cells = 0` only looks.
    pub fn check(&self, key: u64, cells: u32) -> Decision {
        let result = NonZeroU32::new(cells).map(|n| self.limiter.check_key_n(&key, n));
        let measured = matches!(result, Some(Ok(_)));
        let now = self.clock.now().duration_since(self.start);
        let (allowed, retry_after) = match result {
            None | Some(Ok(Ok(()))) => (true, None),
            Some(Ok(Err(not_until))) => (false, Some(not_until.wait_time_from(self.clock.now()))),
            Some(Err(_insufficient)) => (false, None),
        };
        // The key's arrival time as the decision left it (a look only when nothing was taken).
        let tat = if measured {
            super::table::last_arrival()
        } else {
            self.table.arrival(key)
        };
        let reset: Duration = tat
            .map_or(Nanos::from(0), |tat| tat.saturating_sub(now))
            .into();
        let full = self.period * self.burst;
        let remaining =
            (full.saturating_sub(reset).as_nanos() / self.period.as_nanos().max(1)) as u32;
        Decision {
            allowed,
            remaining,
            reset,
            retry_after,
        }
    }

    /// The table of keys.
    pub fn table(&self) -> &Table {
        &self.table
    }

    /// The burst, in requests.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The time a whole burst takes to come back (the draft's window).
    pub fn window(&self) -> Duration {
        self.period * self.burst
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use governor::clock::FakeRelativeClock;

    /// The reference table: 1 request per second, a burst of 5 (throttled's MaxBurst 4).
    #[test]
    fn decisions_match_the_gcra_reference_table() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../shared/corpora/ratelimit/gcra_throttled_table.json"
        );
        let table: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let period = Duration::from_nanos(table["period_ns"].as_u64().unwrap());
        let limit = table["limit"].as_u64().unwrap() as u32;
        let clock = FakeRelativeClock::default();
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let limiter = Limiter::new(
            period,
            NonZeroU32::new(limit).unwrap(),
            Table::new(10, evictions),
            clock.clone(),
        );
        let mut at = 0u64;
        let rows = table["cases"].as_array().unwrap();
        assert_eq!(rows.len(), 16);
        for row in rows {
            let now = row["now_ns"].as_u64().unwrap();
            clock.advance(Duration::from_nanos(now - at));
            at = now;
            let d = limiter.check(7, row["volume"].as_u64().unwrap() as u32);
            let retry = row["retry_ns"].as_i64().unwrap();
            let want = Decision {
                allowed: !row["limited"].as_bool().unwrap(),
                remaining: row["remaining"].as_u64().unwrap() as u32,
                reset: Duration::from_nanos(row["reset_ns"].as_u64().unwrap()),
                retry_after: (retry >= 0).then(|| Duration::from_nanos(retry as u64)),
            };
            assert_eq!(d, want, "row {}", row["i"]);
        }
    }

    /// Resident memory of this process, from /proc (Linux).
    fn rss_bytes() -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }

    /// The memory figure is the whole process's: other tests of this binary allocating at the
    /// same time would move it, so the measurement runs alone, in a child of this test binary.
    #[test]
    fn a_flood_of_distinct_keys_keeps_the_table_and_memory_bounded() {
        const NAME: &str = "filters::rate_limit::limiter::tests::a_flood_of_distinct_keys_keeps_the_table_and_memory_bounded";
        if std::env::var_os("VIGIL_RSS_CHILD").is_none() {
            let out = std::process::Command::new(std::env::current_exe().unwrap())
                .args([NAME, "--exact", "--test-threads=1", "--nocapture"])
                .env("VIGIL_RSS_CHILD", "1")
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success() && text.contains("1 passed"), "{text}");
            return;
        }
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        let limiter = Limiter::new(
            Duration::from_millis(20),
            NonZeroU32::new(100).unwrap(),
            Table::new(100_000, evictions.clone()),
            governor::clock::DefaultClock::default(),
        );
        let key = |n: u64| n.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        for n in 0..200_000 {
            limiter.check(key(n), 1);
        }
        let at_cap = rss_bytes();
        for n in 200_000..1_000_000 {
            limiter.check(key(n), 1);
        }
        let grown = rss_bytes().saturating_sub(at_cap);
        assert_eq!(limiter.table().len(), 100_000, "at its cap");
        assert_eq!(
            evictions.get(),
            900_000,
            "every key past the cap evicted one"
        );
        // 800 000 more keys kept would take some 60 MiB; a bounded table takes nothing more.
        assert!(
            grown < 16 << 20,
            "RSS grew {grown} bytes after the table was full"
        );
    }
}
