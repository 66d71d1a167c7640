//! Tracing's cost per request, the span work alone, in process: the trace context a request
//! gets (a new root, or a trusted caller's `traceparent` continued), the `traceparent` sent
//! upstream, and the spans built and queued once it is done; at sampling 0 (nothing is built)
//! and 1 (a server span with three stage events and a client span, queued for an exporter
//! whose collector is down, so the queue drops and counts what the export thread has not
//! taken: the request side's cost, as on a busy edge). `cargo bench -p vigil-proxy --bench trace`.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::hint::black_box;
use std::time::{Instant, SystemTime};

use criterion::{Criterion, criterion_group, criterion_main};
use proxy::pipeline::StageRun;
use proxy::trace::{Finished, Tracing, Upstream};

fn tracing(ratio: f64) -> Tracing {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let config = telemetry::TracingConfig {
        endpoint: Some(format!("http://127.0.0.1:{port}")),
        sampling_ratio: ratio,
        ..Default::default()
    };
    Tracing::start(&config, telemetry::Counters::new("bench")).unwrap()
}

fn one_request(t: &Tracing, traceparent: Option<&str>) {
    let started = Instant::now();
    let trace = t.begin(traceparent, None, traceparent.is_some());
    let trace_id = trace.trace_id_hex();
    let upstream_span = telemetry::new_span_id();
    let sent = trace.traceparent(upstream_span);
    let stages: Vec<StageRun> = if t.records(&trace) {
        ["rate_limit", "waf", "jwt"]
            .into_iter()
            .map(|kind| StageRun {
                name: kind.to_owned(),
                kind,
                decision: "allow",
                reason: None,
                at: SystemTime::now(),
            })
            .collect()
    } else {
        Vec::new()
    };
    t.finish(&Finished {
        trace: &trace,
        started,
        method: "GET",
        route: Some("api"),
        path: "/api/items",
        status: 200,
        client_ip: "192.0.2.7",
        user_agent: "curl/8.5.0",
        tls_version: "1.3",
        http_version: "1.1",
        host: "api.example.com",
        request_id: "b81573e0b4e742240000000000000076",
        stage: "",
        reason: "",
        decision: "allow",
        stages: &stages,
        upstream: Some(Upstream {
            span_id: upstream_span,
            name: "app",
            address: "10.0.0.5".to_owned(),
            port: Some(8080),
            started,
            ended: Some(Instant::now()),
            retried: false,
            status: 200,
        }),
    });
    black_box((trace_id, sent));
}

fn per_request(c: &mut Criterion) {
    let mut g = c.benchmark_group("trace/per request");
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00";
    let off = tracing(0.0);
    g.bench_function("sampling 0, new trace", |b| {
        b.iter(|| one_request(&off, None))
    });
    g.bench_function("sampling 0, trusted traceparent", |b| {
        b.iter(|| one_request(&off, Some(parent)))
    });
    let on = tracing(1.0);
    g.bench_function("sampling 1, new trace", |b| {
        b.iter(|| one_request(&on, None))
    });
    g.finish();
}

criterion_group!(benches, per_request);
criterion_main!(benches);
