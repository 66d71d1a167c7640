//! The rate limiter's cost per request: one local decision with 1, 10 000 and 1 000 000 live
//! keys in the table, the key derivation of each key kind, and one decision through Redis on
//! loopback (when `VIGIL_TEST_REDIS_URL` names one; the round trip is what it measures).
//! `cargo bench -p vigil-proxy --bench ratelimit`.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::hint::black_box;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use proxy::filters::rate_limit::limiter::Limiter;
use proxy::filters::rate_limit::table::Table;
use proxy::filters::rate_limit::{Policy, RateLimitConfig, RateLimitFilter, shared};
use proxy::metrics::Metrics;
use proxy::pipeline::RequestCtx;

fn spread(n: u64) -> u64 {
    n.wrapping_mul(0x9E37_79B9_7F4A_7C15)
}

fn decisions(c: &mut Criterion) {
    let mut g = c.benchmark_group("ratelimit/local decision");
    for live in [1u64, 10_000, 1_000_000] {
        let evictions = prometheus::IntCounter::new("e", "e").unwrap();
        // A generous policy: every decision is an admission, as on a healthy edge.
        let limiter = Limiter::new(
            Duration::from_micros(1),
            NonZeroU32::new(1_000_000).unwrap(),
            Table::new(live as usize, evictions),
            governor::clock::DefaultClock::default(),
        );
        for n in 0..live {
            limiter.check(spread(n), 1);
        }
        let mut n = 0u64;
        g.bench_function(format!("{live} live keys"), |b| {
            b.iter(|| {
                n = (n + 1) % live;
                black_box(limiter.check(spread(n), 1))
            })
        });
    }
    g.finish();
}

fn keys(c: &mut Criterion) {
    let metrics = Metrics::new();
    let mut g = c.benchmark_group("ratelimit/key");
    let req = http::Request::get("/api/items")
        .header("x-api-key", "k-0123456789abcdef")
        .body(())
        .unwrap()
        .into_parts()
        .0;
    let mut ctx = RequestCtx::new("r".into(), "2001:db8::7".parse().unwrap(), false);
    ctx.subject = Some("0190b7e2-3f3c-7a10-9a4e-3c5d7e8f9a0b".into());
    ctx.route = Arc::from("api");
    for (name, key) in [
        ("client_ip", "\"client_ip\""),
        ("subject", "\"subject\""),
        ("header", "\"header:x-api-key\""),
        ("route", "\"route\""),
        ("route+client_ip", "[\"route\", \"client_ip\"]"),
    ] {
        let config: RateLimitConfig =
            toml::from_str(&format!("rate_per_sec = 1\nburst = 1\nkey = {key}")).unwrap();
        let policy = Arc::new(Policy::new("p", &config, &metrics).unwrap());
        let filter = RateLimitFilter::new("p", policy, &metrics);
        g.bench_function(name, |b| b.iter(|| black_box(filter.key(&req, &ctx))));
    }
    g.finish();
}

fn redis_round_trip(c: &mut Criterion) {
    let Ok(url) = std::env::var("VIGIL_TEST_REDIS_URL") else {
        eprintln!("VIGIL_TEST_REDIS_URL is not set: the Redis round trip is not measured");
        return;
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = Arc::new(shared::SharedStore::new(
        "bench",
        redis::Client::open(url.as_str()).unwrap(),
        Duration::from_micros(1),
        1_000_000,
        Duration::from_secs(1),
        &Metrics::new(),
    ));
    runtime.block_on(store.connect()).unwrap();
    let mut n = 0u64;
    c.bench_function("ratelimit/redis decision (loopback round trip)", |b| {
        b.iter(|| {
            n = (n + 1) % 10_000;
            runtime.block_on(store.check(spread(n)))
        })
    });
}

criterion_group!(benches, decisions, keys, redis_round_trip);
criterion_main!(benches);
