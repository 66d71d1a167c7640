//! `kind = "rate_limit"`: GCRA per key ([`limiter`], on governor), over a bounded local table
//! ([`table`]). A policy lets `burst` requests through at once and then one every `1/rate`; a
//! request over it gets 429 with `Retry-After` and the JSON body (`stage: rate_limit`, `reason:
//! limited`), and every answer of a route that wants them carries the
//! draft-ietf-httpapi-ratelimit-headers-10 fields of the policy closest to its limit.
//!
//! Keys are derived here ([`Key`]) and hashed: the table never holds an address, a subject or a
//! header value. A policy whose definition did not change keeps its table across reloads
//! (`crate::build` hands the previous [`Policy`] on).

pub mod limiter;
pub mod shared;
pub mod table;

use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::{HeaderName, HeaderValue, StatusCode};
use prometheus::IntCounter;
use serde::Deserialize;

use crate::config::Mode;
use crate::metrics::Metrics;
use crate::pipeline::{Filter, Rejection, RemoteFilter, RequestCtx, Verdict};

/// `[filters.NAME] kind = "rate_limit"`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Requests per second a key may make, on average (exactly one of the three rates).
    #[serde(default)]
    pub rate_per_sec: Option<u32>,
    /// Requests per minute.
    #[serde(default)]
    pub rate_per_min: Option<u32>,
    /// Requests per hour.
    #[serde(default)]
    pub rate_per_hour: Option<u32>,
    /// Requests a key may make at once, back to back, before the rate applies.
    pub burst: u32,
    /// What a client is: `client_ip`, `subject`, `route`, `header:NAME`, or a list of them.
    #[serde(default)]
    pub key: KeySpec,
    /// IPv6 clients are grouped by this prefix length (one household, one /64).
    #[serde(default = "default_ipv6_prefix")]
    pub ipv6_prefix: u8,
    /// With a `subject` key: a request without one is keyed by its `client_ip` or refused.
    #[serde(default)]
    pub anonymous: Anonymous,
    /// Keys remembered at most; past it a key not seen recently is forgotten (CLOCK).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
    /// `enforce` or `shadow` (counted and logged as limited, let through).
    #[serde(default)]
    pub mode: Mode,
    /// Where the counts live: `local` (this process) or `redis` (shared by every proxy on it).
    #[serde(default)]
    pub store: StoreKind,
    /// The Redis URL (`redis://host:6379/0`), without a password.
    #[serde(default)]
    pub redis_url: Option<String>,
    /// An environment variable holding the Redis URL (use it for one with a password).
    #[serde(default)]
    pub redis_url_env: Option<String>,
    /// With `store = "redis"`, when Redis is down, slow or answers an error: `local` (decide
    /// with this process's table), `allow` or `deny` (503). Must be chosen.
    #[serde(default)]
    pub on_store_error: Option<OnStoreError>,
    /// Longest a Redis decision may take before `on_store_error` applies.
    #[serde(default = "default_store_timeout")]
    pub store_timeout_ms: u64,
}

/// Where a policy keeps its counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    /// This process's table.
    #[default]
    Local,
    /// Redis, shared.
    Redis,
}

/// What a shared policy does when its store cannot decide.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnStoreError {
    /// Decide with the local table, as if unshared.
    Local,
    /// Let the request through.
    Allow,
    /// Refuse it (503): fail closed.
    Deny,
}

impl OnStoreError {
    fn label(self) -> &'static str {
        match self {
            OnStoreError::Local => "local",
            OnStoreError::Allow => "allow",
            OnStoreError::Deny => "deny",
        }
    }
}

fn default_store_timeout() -> u64 {
    5
}

fn default_ipv6_prefix() -> u8 {
    64
}
fn default_max_keys() -> usize {
    100_000
}

impl RateLimitConfig {
    /// The emission interval, if exactly one rate is set and it is not zero.
    pub fn period(&self) -> Result<Duration, String> {
        let rates = [
            (self.rate_per_sec, 1),
            (self.rate_per_min, 60),
            (self.rate_per_hour, 3600),
        ];
        let set: Vec<(u32, u64)> = rates
            .iter()
            .filter_map(|(r, secs)| r.map(|r| (r, *secs)))
            .collect();
        match set.as_slice() {
            [(0, _)] => Err("the rate must be at least 1".into()),
            [(rate, secs)] => Ok(Duration::from_secs(*secs) / *rate),
            [] => Err("set one of rate_per_sec, rate_per_min or rate_per_hour".into()),
            _ => Err("set only one of rate_per_sec, rate_per_min and rate_per_hour".into()),
        }
    }

    /// Every error of this policy, as `(key, message)`.
    pub fn check(&self) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        if let Err(e) = self.period() {
            errors.push(("rate_per_sec".into(), e));
        }
        if self.burst == 0 {
            errors.push(("burst".into(), "must be at least 1".into()));
        }
        if self.max_keys == 0 {
            errors.push(("max_keys".into(), "must be at least 1".into()));
        }
        if self.ipv6_prefix > 128 {
            errors.push(("ipv6_prefix".into(), "must be at most 128".into()));
        }
        if self.store == StoreKind::Redis {
            if let Err((key, e)) = self.redis_client() {
                errors.push((key.into(), e));
            }
            if self.on_store_error.is_none() {
                errors.push((
                    "on_store_error".into(),
                    "choose local, allow or deny: what happens when Redis cannot decide".into(),
                ));
            }
            if self.store_timeout_ms == 0 {
                errors.push(("store_timeout_ms".into(), "must be at least 1".into()));
            }
        } else if self.redis_url.is_some() || self.redis_url_env.is_some() {
            errors.push((
                "store".into(),
                "set store = \"redis\" to use a Redis URL".into(),
            ));
        }
        errors
    }

    /// The Redis client of a shared policy (no connection is made); errors name their key.
    pub fn redis_client(&self) -> Result<redis::Client, (&'static str, String)> {
        let (key, url) = match (&self.redis_url, &self.redis_url_env) {
            (Some(url), None) => ("redis_url", url.clone()),
            (None, Some(var)) => (
                "redis_url_env",
                std::env::var(var).map_err(|_| ("redis_url_env", format!("{var} is not set")))?,
            ),
            _ => {
                return Err((
                    "redis_url",
                    "set exactly one of redis_url and redis_url_env".into(),
                ));
            }
        };
        let client = redis::Client::open(url.as_str())
            .map_err(|e| (key, format!("not a Redis URL: {e}")))?;
        if key == "redis_url" && client.get_connection_info().redis.password.is_some() {
            return Err((
                key,
                "holds a password: put the URL in an environment variable and name it in redis_url_env".into(),
            ));
        }
        Ok(client)
    }
}

/// What a request without a subject is keyed by, under a `subject` key.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Anonymous {
    /// Its client address.
    #[default]
    ClientIp,
    /// Nothing: it is refused (401).
    Reject,
}

/// One part of a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    /// The client address (IPv6 by its prefix, IPv4-mapped as IPv4).
    ClientIp,
    /// The subject the `jwt` filter set.
    Subject,
    /// The route's name.
    Route,
    /// A request header's value (its absence: the client address).
    Header(HeaderName),
}

/// A policy's key: its parts, hashed together.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(try_from = "KeyInput")]
pub struct KeySpec(pub Vec<Key>);

impl Default for KeySpec {
    fn default() -> Self {
        Self(vec![Key::ClientIp])
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum KeyInput {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<KeyInput> for KeySpec {
    type Error = String;
    fn try_from(input: KeyInput) -> Result<Self, String> {
        let parts = match input {
            KeyInput::One(s) => vec![s],
            KeyInput::Many(v) => v,
        };
        if parts.is_empty() {
            return Err(
                "key = []: name at least one of client_ip, subject, route, header:NAME".into(),
            );
        }
        parts
            .iter()
            .map(|p| match p.split_once(':') {
                None if p == "client_ip" => Ok(Key::ClientIp),
                None if p == "subject" => Ok(Key::Subject),
                None if p == "route" => Ok(Key::Route),
                Some(("header", name)) => HeaderName::try_from(name)
                    .map(Key::Header)
                    .map_err(|_| format!("key {p:?}: not a header name")),
                _ => Err(format!(
                    "key {p:?}: expected client_ip, subject, route or header:NAME"
                )),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(KeySpec)
    }
}

/// A policy's state that outlives a reload when its definition does not change.
#[derive(Debug)]
pub struct Policy {
    /// The definition it was built from.
    pub config: RateLimitConfig,
    /// Its GCRA and table (with a shared store: the `on_store_error = "local"` fallback).
    pub limiter: limiter::Limiter,
    /// Its counts in Redis, when shared.
    pub shared: Option<Arc<shared::SharedStore>>,
}

impl Policy {
    /// A fresh policy for `config` (checked), its evictions counted under `name`.
    pub fn new(
        name: &str,
        config: &RateLimitConfig,
        metrics: &Metrics,
    ) -> Result<Self, Vec<(String, String)>> {
        let errors = config.check();
        let (Ok(period), Some(burst)) = (config.period(), NonZeroU32::new(config.burst)) else {
            return Err(errors);
        };
        if !errors.is_empty() {
            return Err(errors);
        }
        let evictions = metrics.ratelimit_evictions.with_label_values(&[name]);
        let shared = match config.store {
            StoreKind::Local => None,
            StoreKind::Redis => {
                let client = config
                    .redis_client()
                    .map_err(|(k, e)| vec![(k.to_owned(), e)])?;
                Some(Arc::new(shared::SharedStore::new(
                    name,
                    client,
                    period,
                    burst.get(),
                    Duration::from_millis(config.store_timeout_ms),
                    metrics,
                )))
            }
        };
        Ok(Self {
            config: config.clone(),
            shared,
            limiter: limiter::Limiter::new(
                period,
                burst,
                table::Table::new(config.max_keys, evictions),
                governor::clock::DefaultClock::default(),
            ),
        })
    }
}

/// A policy's fixed part of the draft-10 fields, made once per policy.
#[derive(Debug, PartialEq, Eq)]
pub struct Fields {
    /// The policy's name (letters, digits, `_` and `-`: a valid structured-field string).
    pub name: Arc<str>,
    /// Its burst (`q`).
    pub quota: u32,
    /// `RateLimit-Policy: "NAME";q=Q;w=W` (`w`: seconds a whole burst takes to come back).
    policy: HeaderValue,
}

impl Fields {
    /// The fields of policy `name`: `quota` requests per `window_secs`.
    pub fn new(name: &str, quota: u32, window_secs: u64) -> Arc<Self> {
        let policy = HeaderValue::from_str(&format!("\"{name}\";q={quota};w={window_secs}"))
            .unwrap_or(HeaderValue::from_static("\"invalid\""));
        Arc::new(Self {
            name: Arc::from(name),
            quota,
            policy,
        })
    }
}

/// What the `RateLimit` fields say about a request: the policy closest to its limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    /// The policy.
    pub fields: Arc<Fields>,
    /// Requests left now (`r`).
    pub remaining: u32,
    /// Seconds until the key is back to a full burst (`t`).
    pub reset_secs: u64,
}

impl Standing {
    /// Whether `self` is closer to its limit than `other`: the smaller share left.
    fn closer_than(&self, other: &Standing) -> bool {
        u64::from(self.remaining) * u64::from(other.fields.quota)
            < u64::from(other.remaining) * u64::from(self.fields.quota)
    }

    /// `RateLimit-Policy` and `RateLimit` (draft-10 structured fields).
    pub fn headers(&self) -> [(HeaderName, HeaderValue); 2] {
        let mut ints = itoa::Buffer::new();
        let mut value = Vec::with_capacity(self.fields.name.len() + 24);
        value.push(b'"');
        value.extend_from_slice(self.fields.name.as_bytes());
        value.extend_from_slice(b"\";r=");
        value.extend_from_slice(ints.format(self.remaining).as_bytes());
        value.extend_from_slice(b";t=");
        value.extend_from_slice(ints.format(self.reset_secs).as_bytes());
        [
            (
                HeaderName::from_static("ratelimit-policy"),
                self.fields.policy.clone(),
            ),
            (
                HeaderName::from_static("ratelimit"),
                HeaderValue::from_bytes(&value).unwrap_or(HeaderValue::from_static("\"invalid\"")),
            ),
        ]
    }
}

/// Whole seconds, rounded up.
fn ceil_secs(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

/// A running `rate_limit` filter.
#[derive(Debug)]
pub struct RateLimitFilter {
    name: Arc<str>,
    /// The name hashed once: every key of this policy starts from it.
    seed: u64,
    fields: Arc<Fields>,
    policy: Arc<Policy>,
    shadow: bool,
    allowed: IntCounter,
    limited: IntCounter,
    /// `vigil_proxy_ratelimit_fallbacks_total{action}` of a shared policy.
    fallbacks: Option<IntCounter>,
}

impl RateLimitFilter {
    /// The filter `name` over `policy`.
    pub fn new(name: &str, policy: Arc<Policy>, metrics: &Metrics) -> Self {
        let shadow = policy.config.mode == Mode::Shadow;
        let decisions = |result: &str| {
            metrics
                .ratelimit_decisions
                .with_label_values(&[name, result])
        };
        let fallbacks = policy.config.on_store_error.map(|a| {
            metrics
                .ratelimit_fallbacks
                .with_label_values(&[name, a.label()])
        });
        let limiter = &policy.limiter;
        Self {
            name: Arc::from(name),
            seed: xxhash_rust::xxh3::xxh3_64(name.as_bytes()),
            fields: Fields::new(name, limiter.burst(), ceil_secs(limiter.window())),
            fallbacks,
            allowed: decisions("allowed"),
            limited: decisions(if shadow { "shadow_limited" } else { "limited" }),
            shadow,
            policy,
        }
    }

    /// The request's key, hashed; `None` for an anonymous request that must be refused.
    pub fn key(&self, req: &Parts, ctx: &RequestCtx) -> Option<u64> {
        let c = &self.policy.config;
        if let [one] = c.key.0.as_slice() {
            return self.one_part_key(one, req, ctx);
        }
        // XXH3 seeded with the policy's name: a key hashes alike in every process and every
        // build (a shared store needs that); the table's own map hashes again with random keys.
        let mut h = xxhash_rust::xxh3::Xxh3::with_seed(self.seed);
        for part in &c.key.0 {
            match part {
                Key::ClientIp => client_bits(ctx.client_ip, c.ipv6_prefix).hash(&mut h),
                Key::Subject => match (&ctx.subject, c.anonymous) {
                    (Some(s), _) => (1u8, s.as_bytes()).hash(&mut h),
                    (None, Anonymous::ClientIp) => {
                        (2u8, client_bits(ctx.client_ip, c.ipv6_prefix)).hash(&mut h)
                    }
                    (None, Anonymous::Reject) => return None,
                },
                Key::Route => ctx.route.hash(&mut h),
                Key::Header(name) => match req.headers.get(name) {
                    Some(v) => (1u8, v.as_bytes()).hash(&mut h),
                    None => (2u8, client_bits(ctx.client_ip, c.ipv6_prefix)).hash(&mut h),
                },
            }
        }
        Some(h.finish())
    }
}

impl RateLimitFilter {
    /// A one-part key (the common case) in one XXH3 call over its bytes; each kind of part (and
    /// the client-address fallback) has its own seed, so their values never collide by kind.
    fn one_part_key(&self, part: &Key, req: &Parts, ctx: &RequestCtx) -> Option<u64> {
        use xxhash_rust::xxh3::xxh3_64_with_seed as xxh3;
        let c = &self.policy.config;
        let client = || {
            xxh3(
                &client_bits(ctx.client_ip, c.ipv6_prefix).to_le_bytes(),
                self.seed.wrapping_add(1),
            )
        };
        Some(match part {
            Key::ClientIp => client(),
            Key::Subject => match (&ctx.subject, c.anonymous) {
                (Some(s), _) => xxh3(s.as_bytes(), self.seed.wrapping_add(2)),
                (None, Anonymous::ClientIp) => client(),
                (None, Anonymous::Reject) => return None,
            },
            Key::Route => xxh3(ctx.route.as_bytes(), self.seed.wrapping_add(3)),
            Key::Header(name) => match req.headers.get(name) {
                Some(v) => xxh3(v.as_bytes(), self.seed.wrapping_add(4)),
                None => client(),
            },
        })
    }
}

/// The bits of an address a key counts: IPv4 whole (an IPv4-mapped IPv6 address is IPv4),
/// IPv6 up to `prefix`.
pub(crate) fn client_bits(ip: IpAddr, prefix: u8) -> u128 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => u128::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let keep = u32::from(prefix.min(128));
            let mask = if keep == 0 {
                0
            } else {
                u128::MAX << (128 - keep)
            };
            (bits & mask) | (1 << 127) // tell apart from IPv4 values
        }
    }
}

impl Filter for RateLimitFilter {
    fn kind(&self) -> &'static str {
        "rate_limit"
    }

    fn on_request(&self, req: &Parts, ctx: &mut RequestCtx) -> Verdict {
        match self.key(req, ctx) {
            Some(key) => self.answer(self.policy.limiter.check(key, 1), ctx),
            None => anonymous(),
        }
    }

    fn remote(&self) -> Option<&dyn RemoteFilter> {
        self.policy
            .shared
            .is_some()
            .then_some(self as &dyn RemoteFilter)
    }
}

#[async_trait::async_trait]
impl RemoteFilter for RateLimitFilter {
    async fn on_request(&self, req: &Parts, ctx: &mut RequestCtx) -> Verdict {
        let (Some(key), Some(store)) = (self.key(req, ctx), &self.policy.shared) else {
            return anonymous();
        };
        let d = match store.check(key).await {
            shared::Outcome::Decided(d) => d,
            shared::Outcome::Failed(_) => {
                if let Some(c) = &self.fallbacks {
                    c.inc();
                }
                match self.policy.config.on_store_error {
                    Some(OnStoreError::Allow) => return Verdict::Continue,
                    Some(OnStoreError::Deny) => {
                        return Verdict::Reject(Rejection::new(
                            StatusCode::SERVICE_UNAVAILABLE,
                            "rate_limit",
                            "store_unavailable",
                            "the rate limit cannot be checked now",
                        ));
                    }
                    Some(OnStoreError::Local) | None => self.policy.limiter.check(key, 1),
                }
            }
        };
        self.answer(d, ctx)
    }
}

/// The answer to an anonymous request on a policy keyed by subject that refuses them.
fn anonymous() -> Verdict {
    Verdict::Reject(Rejection::new(
        StatusCode::UNAUTHORIZED,
        "rate_limit",
        "anonymous",
        "this route is limited per caller: sign in",
    ))
}

impl RateLimitFilter {
    /// Records decision `d` and turns it into the verdict.
    fn answer(&self, d: limiter::Decision, ctx: &mut RequestCtx) -> Verdict {
        let limiter = &self.policy.limiter;
        let standing = Standing {
            fields: self.fields.clone(),
            remaining: d.remaining,
            reset_secs: ceil_secs(d.reset),
        };
        if d.allowed {
            self.allowed.inc();
        } else {
            self.limited.inc();
            ctx.ratelimit_policy = Some(self.name.clone());
        }
        let fields = (!d.allowed).then(|| standing.headers());
        // A shadowed policy changes nothing the client sees, headers included.
        if !self.shadow
            && ctx
                .ratelimit
                .as_ref()
                .is_none_or(|s| standing.closer_than(s))
        {
            ctx.ratelimit = Some(standing);
        }
        let Some(fields) = fields else {
            return Verdict::Continue;
        };
        let wait = ceil_secs(d.retry_after.unwrap_or(limiter.window())).max(1);
        let mut r = Rejection::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit",
            "limited",
            "too many requests: slow down and retry after the time Retry-After gives",
        );
        r.headers
            .push((http::header::RETRY_AFTER, HeaderValue::from(wait)));
        r.headers.extend(fields);
        Verdict::Reject(r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(toml: &str) -> RateLimitFilter {
        let c: RateLimitConfig = toml::from_str(toml).unwrap();
        let metrics = Metrics::new();
        RateLimitFilter::new(
            "p",
            Arc::new(Policy::new("p", &c, &metrics).unwrap()),
            &metrics,
        )
    }

    fn request(headers: &[(&str, &str)]) -> Parts {
        let mut b = http::Request::get("/");
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        b.body(()).unwrap().into_parts().0
    }

    fn ctx(ip: &str, subject: Option<&str>) -> RequestCtx {
        let mut c = RequestCtx::new("r".into(), ip.parse().unwrap(), false);
        c.subject = subject.map(str::to_owned);
        c
    }

    #[test]
    fn keys_are_derived_as_configured() {
        let f = policy("rate_per_sec = 1\nburst = 1");
        let k = |ip: &str| f.key(&request(&[]), &ctx(ip, None)).unwrap();
        assert_eq!(k("2001:db8::1"), k("2001:db8::ffff:1"), "one /64");
        assert_ne!(k("2001:db8::1"), k("2001:db8:0:1::1"));
        assert_eq!(k("192.0.2.1"), k("::ffff:192.0.2.1"), "IPv4-mapped is IPv4");
        assert_ne!(k("192.0.2.1"), k("192.0.2.2"));

        let f = policy("rate_per_sec = 1\nburst = 1\nkey = \"header:x-api-key\"");
        let k = |h: &[(&str, &str)], ip: &str| f.key(&request(h), &ctx(ip, None)).unwrap();
        assert_eq!(
            k(&[("x-api-key", "a")], "192.0.2.1"),
            k(&[("x-api-key", "a")], "192.0.2.2")
        );
        assert_ne!(
            k(&[("x-api-key", "a")], "192.0.2.1"),
            k(&[("x-api-key", "b")], "192.0.2.1")
        );
        assert_ne!(
            k(&[], "192.0.2.1"),
            k(&[], "192.0.2.2"),
            "no header: the address"
        );

        let f = policy("rate_per_sec = 1\nburst = 1\nkey = \"subject\"\nanonymous = \"reject\"");
        assert!(f.key(&request(&[]), &ctx("192.0.2.1", None)).is_none());
        assert_eq!(
            f.key(&request(&[]), &ctx("192.0.2.1", Some("u1"))),
            f.key(&request(&[]), &ctx("192.0.2.9", Some("u1")))
        );

        let f = policy("rate_per_sec = 1\nburst = 1\nkey = [\"route\", \"client_ip\"]");
        let mut a = ctx("192.0.2.1", None);
        a.route = Arc::from("a");
        let mut b = ctx("192.0.2.1", None);
        b.route = Arc::from("b");
        assert_ne!(f.key(&request(&[]), &a), f.key(&request(&[]), &b));
    }

    #[test]
    fn a_limited_request_gets_429_retry_after_and_the_draft_fields() {
        let f = policy("rate_per_min = 60\nburst = 3");
        let req = request(&[]);
        for left in [2, 1, 0] {
            let mut c = ctx("192.0.2.1", None);
            assert_eq!(Filter::on_request(&f, &req, &mut c), Verdict::Continue);
            let s = c.ratelimit.unwrap();
            assert_eq!((s.remaining, s.fields.quota), (left, 3));
            assert_eq!(s.headers()[0].1, "\"p\";q=3;w=3");
        }
        let mut c = ctx("192.0.2.1", None);
        let Verdict::Reject(r) = Filter::on_request(&f, &req, &mut c) else {
            panic!("the fourth request is limited")
        };
        assert_eq!(
            (r.status.as_u16(), r.stage, r.reason),
            (429, "rate_limit", "limited")
        );
        let h = |name: &str| {
            r.headers
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.to_str().unwrap().to_owned())
                .unwrap()
        };
        assert_eq!(h("retry-after"), "1");
        assert_eq!(h("ratelimit-policy"), "\"p\";q=3;w=3");
        assert_eq!(h("ratelimit"), "\"p\";r=0;t=3");
        assert_eq!(c.ratelimit_policy.as_deref(), Some("p"));
        // Another client is not limited by this one.
        assert_eq!(
            Filter::on_request(&f, &req, &mut ctx("192.0.2.2", None)),
            Verdict::Continue
        );
    }

    #[test]
    fn the_closest_policy_describes_the_request() {
        let a = Standing {
            fields: Fields::new("a", 100, 2),
            remaining: 10,
            reset_secs: 1,
        };
        let b = Standing {
            fields: Fields::new("b", 5, 5),
            remaining: 4,
            reset_secs: 1,
        };
        assert!(a.closer_than(&b), "10 % left is closer than 80 %");
        assert!(!b.closer_than(&a));
    }

    #[test]
    fn bad_policies_are_config_errors() {
        for (toml, key) in [
            ("rate_per_sec = 0\nburst = 1", "rate_per_sec"),
            ("burst = 1", "rate_per_sec"),
            (
                "rate_per_sec = 1\nrate_per_min = 1\nburst = 1",
                "rate_per_sec",
            ),
            ("rate_per_sec = 1\nburst = 0", "burst"),
            (
                "rate_per_sec = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"not a url\"\non_store_error = \"local\"",
                "redis_url",
            ),
            (
                "rate_per_sec = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"redis://:secret@127.0.0.1\"\non_store_error = \"local\"",
                "redis_url",
            ),
            (
                "rate_per_sec = 1\nburst = 1\nstore = \"redis\"\nredis_url = \"redis://127.0.0.1\"",
                "on_store_error",
            ),
            (
                "rate_per_sec = 1\nburst = 1\nredis_url = \"redis://127.0.0.1\"",
                "store",
            ),
        ] {
            let c: RateLimitConfig = toml::from_str(toml).unwrap();
            assert!(c.check().iter().any(|(k, _)| k == key), "{toml}");
        }
        for toml in [
            "rate_per_sec = 1\nburst = 1\nkey = \"ip\"",
            "rate_per_sec = 1\nburst = 1\nkey = \"header:bad name\"",
        ] {
            assert!(toml::from_str::<RateLimitConfig>(toml).is_err(), "{toml}");
        }
    }
}
