//! Micro-benchmarks of the auth service's costly parts: argon2id (every login and
//! registration), access-token signing and verification (every authenticated request).
//!
//! `cargo bench -p vigil-auth`; `bench/auth-login.sh` measures login throughput end to end.

use criterion::{Criterion, criterion_group, criterion_main};
use prometheus::{Histogram, HistogramOpts};

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .expect("a runtime")
}

fn passwords(c: &mut Criterion) {
    let rt = runtime();
    let hist = Histogram::with_opts(HistogramOpts::new("h", "h")).expect("a histogram");
    let p = auth::password::Passwords::new(hist);
    let phc = rt
        .block_on(p.hash("correct horse battery staple".into()))
        .expect("hash");
    let mut g = c.benchmark_group("argon2id m=19MiB t=2 p=1");
    g.sample_size(20);
    g.bench_function("hash", |b| {
        b.iter(|| rt.block_on(p.hash("correct horse battery staple".into())))
    });
    g.bench_function("verify", |b| {
        b.iter(|| rt.block_on(p.verify("correct horse battery staple".into(), Some(phc.clone()))))
    });
    g.bench_function("verify unknown account (dummy hash)", |b| {
        b.iter(|| rt.block_on(p.verify("correct horse battery staple".into(), None)))
    });
    g.finish();
}

fn tokens(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("a temp dir");
    let config = auth::config::Tokens {
        keys_path: dir.path().join("keys.json"),
        ..Default::default()
    };
    let t = auth::tokens::Tokens::load(&config).expect("keys");
    let now = u64::try_from(chrono::Utc::now().timestamp()).expect("after 1970");
    let (token, _) = t.issue("user", "user", "session", now).expect("a token");
    let mut g = c.benchmark_group("access token (EdDSA)");
    g.bench_function("issue", |b| {
        b.iter(|| t.issue("user", "user", "session", now))
    });
    g.bench_function("verify", |b| b.iter(|| t.verify(&token)));
    g.bench_function("refresh token (new + hash)", |b| {
        b.iter(auth::tokens::new_refresh_token)
    });
    g.finish();
}

criterion_group!(benches, passwords, tokens);
criterion_main!(benches);
