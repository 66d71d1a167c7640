//! `kind = "login_guard"`: protects a login route from password guessing. It counts the route's
//! failed answers (statuses `statuses`, by default 401 and 403) per client address, and once a
//! client has failed `failures` times within `window_secs` of its first failure, its further
//! requests to the route get 429 at the edge for `cooldown_secs`, without reaching the upstream.
//! Successful answers count nothing. The table of clients is bounded like a rate limit's (the
//! least recently seen is forgotten) and holds hashes, never addresses.

use std::hash::{Hash, Hasher};
use std::num::NonZeroUsize;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::request::Parts;
use http::{HeaderValue, StatusCode};
use lru::LruCache;
use prometheus::IntCounter;
use serde::Deserialize;

use crate::config::Mode;
use crate::metrics::Metrics;
use crate::pipeline::{Filter, HeaderEdits, Rejection, RequestCtx, Verdict};

/// `[filters.NAME] kind = "login_guard"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoginGuardConfig {
    /// Failed answers a client may get within `window_secs` before it cools down.
    #[serde(default = "default_failures")]
    pub failures: u32,
    /// The window, from a client's first failure.
    #[serde(default = "default_window")]
    pub window_secs: u64,
    /// How long a client that failed too often is refused.
    #[serde(default = "default_cooldown")]
    pub cooldown_secs: u64,
    /// The answers that count as failures.
    #[serde(default = "default_statuses")]
    pub statuses: Vec<u16>,
    /// IPv6 clients are grouped by this prefix length.
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// Clients remembered at most.
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// `enforce` or `shadow`.
    #[serde(default)]
    pub mode: Mode,
}

fn default_failures() -> u32 {
    10
}
fn default_window() -> u64 {
    300
}
fn default_cooldown() -> u64 {
    900
}
fn default_statuses() -> Vec<u16> {
    vec![401, 403]
}
fn default_ipv6_prefix() -> u8 {
    64
}
fn default_max_keys() -> usize {
    100_000
}

impl LoginGuardConfig {
    /// Every error of this guard, as `(key, message)`.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        for (key, v) in [
            ("failures", u64::from(self.failures)),
            ("window_secs", self.window_secs),
            ("cooldown_secs", self.cooldown_secs),
            ("max_keys", self.max_keys as u64),
        ] {
            if v == 0 {
                errors.push((key.to_owned(), "must be at least 1".to_owned()));
            }
        }
        if self.statuses.is_empty() || self.statuses.iter().any(|s| !(400..600).contains(s)) {
            errors.push(("statuses".into(), "list 4xx or 5xx statuses".into()));
        }
        if self.ipv6_prefix > 128 {
            errors.push(("ipv6_prefix".into(), "must be at most 128".into()));
        }
        errors
    }
}

/// One client's failures.
#[derive(Debug, Clone, Copy)]
struct Client {
    failures: u32,
    since: Instant,
    until: Option<Instant>,
}

const SHARDS: usize = 16;

/// The clients a guard remembers; kept across a reload that leaves the guard unchanged.
#[derive(Debug)]
pub struct Clients {
    /// The definition it was built from.
    pub config: LoginGuardConfig,
    shards: Box<[Mutex<LruCache<u64, Client>>]>,
}

impl Clients {
    /// An empty table for `config` (checked).
    pub fn new(config: &LoginGuardConfig) -> Result<Self, Vec<(String, String)>> {
        let errors = config.check();
        if !errors.is_empty() {
            return Err(errors);
        }
        let per_shard =
            NonZeroUsize::new(config.max_keys.div_ceil(SHARDS).max(1)).unwrap_or(NonZeroUsize::MIN);
        Ok(Self {
            config: config.clone(),
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per_shard)))
                .collect(),
        })
    }

    fn shard(&self, key: u64) -> std::sync::MutexGuard<'_, LruCache<u64, Client>> {
        self.shards[(key >> 60) as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// Clients cooling down at `now`.
    pub fn cooling_down(&self, now: Instant) -> usize {
        self.shards
            .iter()
            .map(|s| {
                let s = s.lock().unwrap_or_else(|p| p.into_inner());
                s.iter()
                    .filter(|(_, c)| c.until.is_some_and(|u| u > now))
                    .count()
            })
            .sum()
    }

    /// How long `key` is still refused at `now`, if it is.
    fn refused_for(&self, key: u64, now: Instant) -> Option<Duration> {
        let until = self.shard(key).peek(&key)?.until?;
        (until > now).then(|| until - now)
    }

    /// Counts a failure of `key` at `now`; whether it started a cool-down.
    fn fail(&self, key: u64, now: Instant) -> bool {
        let c = &self.config;
        let window = Duration::from_secs(c.window_secs);
        let mut shard = self.shard(key);
        let client = shard.get_or_insert_mut(key, || Client {
            failures: 0,
            since: now,
            until: None,
        });
        if client.until.is_some_and(|u| u > now) {
            return false;
        }
        if now.duration_since(client.since) > window || client.until.is_some() {
            *client = Client {
                failures: 0,
                since: now,
                until: None,
            };
        }
        client.failures += 1;
        if client.failures >= c.failures {
            client.until = Some(now + Duration::from_secs(c.cooldown_secs));
            return true;
        }
        false
    }
}

/// A running `login_guard` filter.
#[derive(Debug)]
pub struct LoginGuard {
    name: Arc<str>,
    clients: Arc<Clients>,
    cooldowns: IntCounter,
}

impl LoginGuard {
    /// The guard `name` over `clients`.
    pub fn new(name: &str, clients: Arc<Clients>, metrics: &Metrics) -> Self {
        Self {
            name: Arc::from(name),
            cooldowns: metrics.login_guard_cooldowns.with_label_values(&[name]),
            clients,
        }
    }

    fn key(&self, ctx: &RequestCtx) -> u64 {
        let mut h = std::hash::DefaultHasher::new();
        self.name.hash(&mut h);
        super::rate_limit::client_bits(ctx.client_ip, self.clients.config.ipv6_prefix).hash(&mut h);
        h.finish()
    }
}

impl Filter for LoginGuard {
    fn kind(&self) -> &'static str {
        "login_guard"
    }

    fn on_request(&self, _req: &Parts, ctx: &mut RequestCtx) -> Verdict {
        let Some(wait) = self.clients.refused_for(self.key(ctx), Instant::now()) else {
            return Verdict::Continue;
        };
        let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
        let mut r = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "login_guard",
            "cooling_down",
            "too many failed attempts: retry after the time Retry-After gives",
        );
        r.headers
            .push((http::header::RETRY_AFTER, HeaderValue::from(secs.max(1))));
        Verdict::Reject(r)
    }

    fn on_response(&self, status: StatusCode, ctx: &RequestCtx, _out: &mut HeaderEdits) {
        if self.clients.config.statuses.contains(&status.as_u16())
            && self.clients.fail(self.key(ctx), Instant::now())
        {
            self.cooldowns.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_past_the_threshold_cool_a_client_down_and_successes_count_nothing() {
        let c: LoginGuardConfig =
            toml::from_str("failures = 3\nwindow_secs = 60\ncooldown_secs = 30").unwrap();
        let clients = Clients::new(&c).unwrap();
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert!(!clients.fail(1, at(0)));
        assert!(!clients.fail(1, at(1)));
        assert_eq!(clients.refused_for(1, at(1)), None);
        assert!(clients.fail(1, at(2)), "the third failure");
        assert_eq!(clients.refused_for(1, at(2)), Some(Duration::from_secs(30)));
        assert_eq!(clients.refused_for(2, at(2)), None, "others are not");
        assert_eq!(clients.cooling_down(at(3)), 1);
        assert_eq!(clients.refused_for(1, at(32)), None, "after the cool-down");
        assert!(!clients.fail(1, at(33)), "it starts over");
        // Failures further apart than the window do not add up.
        assert!(!clients.fail(3, at(0)));
        assert!(!clients.fail(3, at(1)));
        assert!(!clients.fail(3, at(100)));
        assert_eq!(clients.refused_for(3, at(100)), None);
    }

    #[test]
    fn the_guard_answers_429_and_counts_only_failed_statuses() {
        let c: LoginGuardConfig = toml::from_str("failures = 2").unwrap();
        let metrics = Metrics::new();
        let g = LoginGuard::new("login", Arc::new(Clients::new(&c).unwrap()), &metrics);
        let req = http::Request::post("/auth/login")
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let mut ctx = RequestCtx::new("r".into(), "192.0.2.1".parse().unwrap(), false);
        let mut out = HeaderEdits::default();
        for status in [200, 200, 401] {
            assert_eq!(g.on_request(&req, &mut ctx), Verdict::Continue);
            g.on_response(StatusCode::from_u16(status).unwrap(), &ctx, &mut out);
        }
        assert_eq!(
            g.on_request(&req, &mut ctx),
            Verdict::Continue,
            "one failure"
        );
        g.on_response(StatusCode::FORBIDDEN, &ctx, &mut out);
        let Verdict::Reject(r) = g.on_request(&req, &mut ctx) else {
            panic!("cooling down")
        };
        assert_eq!(
            (r.status.as_u16(), r.stage, r.reason),
            (429, "login_guard", "cooling_down")
        );
        assert!(
            r.headers
                .iter()
                .any(|(k, v)| k == "retry-after" && v == "900")
        );
        assert!(bad_guards().iter().all(|(toml, key)| {
            let c: LoginGuardConfig = toml::from_str(toml).unwrap();
            c.check().iter().any(|(k, _)| k == key)
        }));
    }

    fn bad_guards() -> [(&'static str, &'static str); 3] {
        [
            ("failures = 0", "failures"),
            ("statuses = [200]", "statuses"),
            ("cooldown_secs = 0", "cooldown_secs"),
        ]
    }
}
