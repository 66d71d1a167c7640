//! A policy's counts in Redis, shared by every proxy on the same server: the same GCRA as
//! [`super::limiter`], done atomically on the server by one Lua script (`EVALSHA`, loaded once
//! and again on `NOSCRIPT`, by `redis::Script`), timed by Redis's own clock, one round trip per
//! decision. Each key expires when its burst is whole again, so Redis holds only live keys.
//!
//! A decision waits at most `store_timeout_ms`. A Redis that is down, slow or answers an error
//! gives [`Outcome::Failed`] and the policy's `on_store_error` applies; the connection is made
//! in the background (at most one attempt a second) and, once made, reconnects by itself, so a
//! Redis that comes back is used again without a restart. The store says when it goes down or
//! comes back in one log line each, never one per request.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use prometheus::{Histogram, IntCounter};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use super::limiter::Decision;
use crate::metrics::Metrics;

/// GCRA in microseconds: KEYS[1] the key; ARGV period, burst, cells (and a time, from tests
/// only: the proxy always lets Redis's clock decide). Returns allowed (0/1), remaining, reset
/// and retry (-1: none) as integers.
const GCRA: &str = r"
local now
if ARGV[4] then
  now = tonumber(ARGV[4])
else
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000000 + tonumber(t[2])
end
local period = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local cells = tonumber(ARGV[3])
local tau = period * (burst - 1)
local tat = tonumber(redis.call('GET', KEYS[1]))
if not tat or tat < now then tat = now end
local allowed, retry = 0, -1
if cells <= burst then
  local earliest = tat + period * (cells - 1) - tau
  if now >= earliest then
    allowed = 1
    tat = tat + period * cells
    redis.call('SET', KEYS[1], string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  else
    retry = earliest - now
  end
end
local reset = tat - now
local remaining = math.floor((burst * period - reset) / period)
if remaining < 0 then remaining = 0 end
return {allowed, remaining, reset, retry}
";

/// What the store answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Redis decided.
    Decided(Decision),
    /// It could not: `timeout`, `unavailable` (no connection) or `error`.
    Failed(&'static str),
}

/// One policy's shared store.
pub struct SharedStore {
    policy: String,
    client: redis::Client,
    conn: ArcSwapOption<ConnectionManager>,
    connecting: AtomicBool,
    last_attempt_ms: AtomicU64,
    healthy: AtomicBool,
    script: redis::Script,
    timeout: Duration,
    period_us: u64,
    burst: u32,
    duration: Histogram,
    errors: [IntCounter; 3],
}

impl std::fmt::Debug for SharedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedStore")
            .field("policy", &self.policy)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

const KINDS: [&str; 3] = ["timeout", "unavailable", "error"];

impl SharedStore {
    /// The store of `policy` on `client` (nothing is connected yet).
    pub fn new(
        policy: &str,
        client: redis::Client,
        period: Duration,
        burst: u32,
        timeout: Duration,
        metrics: &Metrics,
    ) -> Self {
        Self {
            policy: policy.to_owned(),
            client,
            conn: ArcSwapOption::empty(),
            connecting: AtomicBool::new(false),
            last_attempt_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            script: redis::Script::new(GCRA),
            timeout,
            period_us: u64::try_from(period.as_micros()).unwrap_or(u64::MAX).max(1),
            burst,
            duration: metrics
                .ratelimit_store_duration
                .with_label_values(&[policy]),
            errors: KINDS.map(|k| {
                metrics
                    .ratelimit_store_errors
                    .with_label_values(&[policy, k])
            }),
        }
    }

    /// Connects now (tests, and a first decision that should not fall back).
    pub async fn connect(&self) -> Result<(), redis::RedisError> {
        let conn = ConnectionManager::new(self.client.clone()).await?;
        self.conn.store(Some(Arc::new(conn)));
        Ok(())
    }

    /// Whether the last decision was Redis's (for `/readyz`).
    pub fn healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// Takes one cell for `key` (a hash), in Redis.
    pub async fn check(self: &Arc<Self>, key: u64) -> Outcome {
        self.decide(key, 1, None).await
    }

    /// Takes `cells` for `key`; `at` (microseconds) replaces Redis's clock, for tests against
    /// the reference table.
    pub async fn decide(self: &Arc<Self>, key: u64, cells: u32, at: Option<u64>) -> Outcome {
        let Some(conn) = self.conn.load_full() else {
            self.connect_soon();
            return self.failed("unavailable", "no connection yet");
        };
        let mut conn = (*conn).clone();
        let name = format!("vigil:rl:{}:{key:016x}", self.policy);
        let started = Instant::now();
        let mut call = self.script.key(name);
        call.arg(self.period_us).arg(self.burst).arg(cells);
        if let Some(at) = at {
            call.arg(at);
        }
        let answer = tokio::time::timeout(
            self.timeout,
            call.invoke_async::<(i64, i64, i64, i64)>(&mut conn),
        )
        .await;
        self.duration.observe(started.elapsed().as_secs_f64());
        match answer {
            Err(_) => self.failed("timeout", "no answer within store_timeout_ms"),
            Ok(Err(e)) => self.failed("error", &e.to_string()),
            Ok(Ok((allowed, remaining, reset, retry))) => {
                if !self.healthy.swap(true, Ordering::Relaxed) {
                    tracing::info!(policy = %self.policy, "rate-limit store answers again; decisions are shared again");
                }
                let micros = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
                Outcome::Decided(Decision {
                    allowed: allowed == 1,
                    remaining: u32::try_from(remaining).unwrap_or(0),
                    reset: micros(reset),
                    retry_after: (retry >= 0).then(|| micros(retry)),
                })
            }
        }
    }

    fn failed(&self, kind: &'static str, detail: &str) -> Outcome {
        if let Some(i) = KINDS.iter().position(|k| *k == kind) {
            self.errors[i].inc();
        }
        if self.healthy.swap(false, Ordering::Relaxed) {
            tracing::warn!(policy = %self.policy, kind, detail, "rate-limit store failed; on_store_error applies until it answers again");
        }
        Outcome::Failed(kind)
    }

    /// Starts a connection attempt in the background unless one is under way or the last was
    /// less than a second ago.
    fn connect_soon(self: &Arc<Self>) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        if now_ms.saturating_sub(self.last_attempt_ms.load(Ordering::Relaxed)) < 1000
            || self.connecting.swap(true, Ordering::AcqRel)
        {
            return;
        }
        self.last_attempt_ms.store(now_ms, Ordering::Relaxed);
        let store = self.clone();
        tokio::spawn(async move {
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Duration::from_secs(1))
                .set_response_timeout(Duration::from_secs(1))
                .set_number_of_retries(1);
            match ConnectionManager::new_with_config(store.client.clone(), config).await {
                Ok(conn) => store.conn.store(Some(Arc::new(conn))),
                Err(e) => {
                    tracing::debug!(policy = %store.policy, error = %e, "rate-limit store: connection failed");
                }
            }
            store.connecting.store(false, Ordering::Release);
        });
    }
}
