//! Spans out of the process: an OTLP exporter behind a bounded queue, on a thread of its own.
//!
//! The SDK's `BatchSpanProcessor` keeps the count of spans it drops to itself (it logs the first
//! drop only), and its thread has no Tokio reactor, so an async HTTP client there fails quietly.
//! This queue does the same job and says what it lost: a request thread only pushes a finished
//! span under a short lock (never blocks on the network, never waits for room; a full queue
//! drops and counts) and wakes the export thread only when a batch is full, so a lightly sampled
//! edge is not interrupted per span. The export thread runs its own current-thread runtime,
//! exports every `export_interval_ms` or per full batch, bounds each export by `timeout_ms`, and
//! counts what it exported, what it dropped (queue full, or in a failed export) and the failed
//! exports. `shutdown` exports what is queued, within the timeout.

use std::collections::HashMap;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use opentelemetry::InstrumentationScope;
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider, SpanData, SpanExporter, SpanProcessor};
use prometheus::{IntCounter, Registry};

use crate::config::{Protocol, TracingConfig};
use crate::context::Sampling;

/// `{prefix}_trace_spans_{exported,dropped}_total` and `{prefix}_trace_export_failures_total`,
/// registered whether or not tracing is on (a dashboard shows 0, not "no data").
#[derive(Clone, Debug)]
pub struct Counters {
    exported: IntCounter,
    dropped: IntCounter,
    failures: IntCounter,
}

impl Counters {
    /// The three counters, named `{prefix}_…`, not yet registered.
    pub fn new(prefix: &str) -> Self {
        let counter = |name: &str, help: &str| {
            IntCounter::new(format!("{prefix}_{name}"), help).expect("valid metric definition")
        };
        Self {
            exported: counter(
                "trace_spans_exported_total",
                "Spans the OTLP collector accepted.",
            ),
            dropped: counter(
                "trace_spans_dropped_total",
                "Sampled spans lost: the export queue was full, or their export failed.",
            ),
            failures: counter(
                "trace_export_failures_total",
                "OTLP export requests that failed or timed out.",
            ),
        }
    }

    /// Registers the three counters in `registry`.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        for c in [&self.exported, &self.dropped, &self.failures] {
            registry.register(Box::new(c.clone()))?;
        }
        Ok(())
    }
}

/// Why tracing could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The OTLP exporter could not be built from the config.
    #[error("tracing: cannot build the OTLP exporter: {0}")]
    Exporter(String),
    /// The export thread could not start.
    #[error("tracing: cannot start the export thread: {0}")]
    Thread(#[from] std::io::Error),
}

/// What the request threads and the export thread share.
#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    wake: Condvar,
    capacity: usize,
    batch_size: usize,
}

#[derive(Debug, Default)]
struct State {
    spans: Vec<SpanData>,
    /// Flush and shutdown callers, answered once what was queued before them is exported.
    waiting: Vec<mpsc::Sender<()>>,
    shutdown: bool,
    stopped: bool,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The sending side of the export queue; also the SDK's span processor (for `tracing` spans).
#[derive(Clone, Debug)]
pub struct Queue {
    shared: Arc<Shared>,
    counters: Counters,
    timeout: Duration,
}

impl Queue {
    /// Queues a finished, sampled span; drops and counts it when the queue is full.
    pub fn send(&self, span: SpanData) {
        let mut state = self.shared.lock();
        if state.stopped || state.spans.len() >= self.shared.capacity {
            drop(state);
            self.counters.dropped.inc();
            return;
        }
        state.spans.push(span);
        let full = state.spans.len() == self.shared.batch_size;
        drop(state);
        if full {
            self.shared.wake.notify_one();
        }
    }

    fn ask(&self, shutdown: bool) -> OTelSdkResult {
        let (done, wait) = mpsc::channel();
        {
            let mut state = self.shared.lock();
            if state.stopped {
                return Err(OTelSdkError::AlreadyShutdown);
            }
            state.waiting.push(done);
            state.shutdown |= shutdown;
        }
        self.shared.wake.notify_one();
        // One export in progress plus the final one, each bounded by the timeout.
        wait.recv_timeout(self.timeout * 2 + Duration::from_secs(1))
            .map_err(|_| OTelSdkError::Timeout(self.timeout * 2))
    }
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &opentelemetry::Context) {}

    fn on_end(&self, span: SpanData) {
        if span.span_context.is_sampled() {
            self.send(span);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.ask(false)
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.ask(true)
    }
}

/// A role's tracing: the queue to the collector, the sampling ratio, the scope its spans carry.
#[derive(Clone, Debug)]
pub struct Pipeline {
    queue: Queue,
    sampling_ratio: f64,
    scope: InstrumentationScope,
    resource: Resource,
}

impl Pipeline {
    /// Starts exporting for `service` (`vigil-proxy`, `vigil-auth`) when `config` has an
    /// endpoint; `None` when tracing is off.
    pub fn start(
        config: &TracingConfig,
        service: &'static str,
        counters: Counters,
    ) -> Result<Option<Self>, StartError> {
        let Some(endpoint) = config.endpoint.clone() else {
            return Ok(None);
        };
        let resource = Resource::builder()
            .with_service_name(service)
            .with_attribute(opentelemetry::KeyValue::new(
                "service.version",
                env!("CARGO_PKG_VERSION"),
            ))
            .build();
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            capacity: config.queue_size,
            batch_size: config.batch_size,
        });
        let (built_tx, built_rx) = mpsc::channel();
        let worker = Worker {
            shared: shared.clone(),
            counters: counters.clone(),
            batch_size: config.batch_size,
            interval: Duration::from_millis(config.export_interval_ms),
            timeout: Duration::from_millis(config.timeout_ms),
        };
        let (thread_config, thread_resource) = (config.clone(), resource.clone());
        std::thread::Builder::new()
            .name(format!("{service}-otlp"))
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = built_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                // The exporter is made inside the runtime: gRPC's channel needs one.
                let exporter = runtime.block_on(async { exporter(&thread_config, &endpoint) });
                match exporter {
                    Ok(mut exporter) => {
                        exporter.set_resource(&thread_resource);
                        let _ = built_tx.send(Ok(()));
                        worker.run(&runtime, &exporter);
                    }
                    Err(e) => {
                        let _ = built_tx.send(Err(e));
                    }
                }
            })?;
        built_rx
            .recv()
            .map_err(|_| StartError::Exporter("the export thread stopped".to_owned()))?
            .map_err(StartError::Exporter)?;
        Ok(Some(Self {
            queue: Queue {
                shared,
                counters,
                timeout: Duration::from_millis(config.timeout_ms),
            },
            sampling_ratio: config.sampling_ratio,
            scope: InstrumentationScope::builder(service)
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
            resource,
        }))
    }

    /// Queues a span built by hand (the proxy's spans).
    pub fn export(&self, span: SpanData) {
        self.queue.send(span);
    }

    /// The sampling of new traces (a continued trace keeps its caller's decision).
    pub fn sampling(&self) -> Sampling {
        Sampling::ratio(self.sampling_ratio)
    }

    /// The counters this pipeline moves.
    pub fn counters(&self) -> &Counters {
        &self.queue.counters
    }

    /// The instrumentation scope hand-built spans carry.
    pub fn scope(&self) -> &InstrumentationScope {
        &self.scope
    }

    /// An SDK tracer provider feeding this queue, parent-based with the configured ratio (for
    /// `tracing-opentelemetry`).
    pub fn tracer_provider(&self) -> SdkTracerProvider {
        SdkTracerProvider::builder()
            .with_span_processor(self.queue.clone())
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                self.sampling_ratio,
            ))))
            .with_resource(self.resource.clone())
            .build()
    }

    /// Exports what is queued and stops the export thread (graceful shutdown and upgrade);
    /// bounded by twice the export timeout.
    pub fn shutdown(&self) {
        if let Err(e) = self.queue.ask(true) {
            tracing::warn!(error = %e, "tracing: spans still queued at shutdown were lost");
        }
    }

    /// Exports what is queued now (tests, and before an upgrade hands over).
    pub fn flush(&self) {
        let _ = self.queue.ask(false);
    }
}

/// The OTLP exporter `config` asks for, with `/v1/traces` added to a bare HTTP base URL.
fn exporter(
    config: &TracingConfig,
    endpoint: &str,
) -> Result<opentelemetry_otlp::SpanExporter, String> {
    let timeout = Duration::from_millis(config.timeout_ms);
    match config.protocol {
        Protocol::HttpProtobuf => {
            let url = match endpoint.parse::<http::Uri>() {
                Ok(u) if matches!(u.path(), "" | "/") => {
                    format!("{}/v1/traces", endpoint.trim_end_matches('/'))
                }
                _ => endpoint.to_owned(),
            };
            let client = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| e.to_string())?;
            opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_http_client(Client(client))
                .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
                .with_endpoint(url)
                .with_timeout(timeout)
                .with_headers(
                    config
                        .headers
                        .clone()
                        .into_iter()
                        .collect::<HashMap<_, _>>(),
                )
                .build()
                .map_err(|e| e.to_string())
        }
        #[cfg(feature = "grpc")]
        Protocol::Grpc => {
            use opentelemetry_otlp::WithTonicConfig;
            let mut headers = http::HeaderMap::new();
            for (k, v) in &config.headers {
                if let (Ok(k), Ok(v)) = (
                    http::HeaderName::try_from(k.as_str()),
                    http::HeaderValue::try_from(v.as_str()),
                ) {
                    headers.insert(k, v);
                }
            }
            let metadata =
                opentelemetry_otlp::tonic_types::metadata::MetadataMap::from_headers(headers);
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint)
                .with_timeout(timeout)
                .with_metadata(metadata)
                .build()
                .map_err(|e| e.to_string())
        }
        #[cfg(not(feature = "grpc"))]
        Protocol::Grpc => Err("this build has no gRPC exporter (feature otlp-grpc)".to_owned()),
    }
}

/// The receiving end: takes what is queued every interval (or when a batch is full, or a
/// flush asks) and exports it.
struct Worker {
    shared: Arc<Shared>,
    counters: Counters,
    batch_size: usize,
    interval: Duration,
    timeout: Duration,
}

impl Worker {
    fn run(self, runtime: &tokio::runtime::Runtime, exporter: &impl SpanExporter) {
        loop {
            let (mut spans, waiting, shutdown) = {
                let mut state = self.shared.lock();
                let deadline = Instant::now() + self.interval;
                while state.spans.len() < self.batch_size
                    && state.waiting.is_empty()
                    && !state.shutdown
                {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break;
                    }
                    state = self
                        .shared
                        .wake
                        .wait_timeout(state, left)
                        .unwrap_or_else(PoisonError::into_inner)
                        .0;
                }
                let shutdown = state.shutdown;
                // Nobody left to send (every `Queue` dropped): export the rest and stop.
                let orphaned = Arc::strong_count(&self.shared) == 1;
                state.stopped = shutdown || orphaned;
                (
                    std::mem::take(&mut state.spans),
                    std::mem::take(&mut state.waiting),
                    shutdown || orphaned,
                )
            };
            while !spans.is_empty() {
                let rest = spans.split_off(spans.len().min(self.batch_size));
                self.export(runtime, exporter, spans);
                spans = rest;
            }
            if shutdown {
                let _ = exporter.shutdown_with_timeout(self.timeout);
            }
            for done in waiting {
                let _ = done.send(());
            }
            if shutdown {
                return;
            }
        }
    }

    fn export(
        &self,
        runtime: &tokio::runtime::Runtime,
        exporter: &impl SpanExporter,
        spans: Vec<SpanData>,
    ) {
        let n = spans.len() as u64;
        let result = runtime
            .block_on(async { tokio::time::timeout(self.timeout, exporter.export(spans)).await });
        match result {
            Ok(Ok(())) => self.counters.exported.inc_by(n),
            Ok(Err(_)) | Err(_) => {
                self.counters.failures.inc();
                self.counters.dropped.inc_by(n);
            }
        }
    }
}

/// The exporter's HTTP client: the workspace's reqwest, driven by the export thread's runtime.
#[derive(Debug)]
struct Client(reqwest::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for Client {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body)
            .send()
            .await?;
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await?;
        let mut out = http::Response::new(body);
        *out.status_mut() = status;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::borrow::Cow;
    use std::time::SystemTime;

    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };

    use super::*;

    fn span() -> SpanData {
        SpanData {
            span_context: SpanContext::new(
                TraceId::from(1),
                SpanId::from(2),
                TraceFlags::SAMPLED,
                false,
                TraceState::NONE,
            ),
            parent_span_id: SpanId::INVALID,
            parent_span_is_remote: false,
            span_kind: SpanKind::Server,
            name: Cow::Borrowed("GET"),
            start_time: SystemTime::now(),
            end_time: SystemTime::now(),
            attributes: Vec::new(),
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: InstrumentationScope::builder("test").build(),
        }
    }

    #[test]
    fn a_full_queue_drops_and_counts_and_never_blocks() {
        let counters = Counters::new("test");
        let queue = Queue {
            shared: Arc::new(Shared {
                state: Mutex::new(State::default()),
                wake: Condvar::new(),
                capacity: 4,
                batch_size: 4,
            }),
            counters: counters.clone(),
            timeout: Duration::from_millis(10),
        };
        for _ in 0..6 {
            queue.send(span());
        }
        assert_eq!(queue.shared.lock().spans.len(), 4);
        assert_eq!(counters.dropped.get(), 2);
        queue.shared.lock().stopped = true;
        queue.send(span());
        assert_eq!(
            counters.dropped.get(),
            3,
            "after shutdown every span is a drop"
        );
        assert!(queue.ask(false).is_err(), "a stopped queue answers at once");
    }

    #[test]
    fn a_dead_collector_fails_the_export_and_counts_its_spans() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .unwrap()
            .port();
        let config = TracingConfig {
            endpoint: Some(format!("http://127.0.0.1:{port}")),
            timeout_ms: 2000,
            export_interval_ms: 60_000,
            ..Default::default()
        };
        let counters = Counters::new("test");
        let pipeline = Pipeline::start(&config, "vigil-test", counters.clone())
            .unwrap()
            .unwrap();
        for _ in 0..3 {
            pipeline.export(span());
        }
        pipeline.flush();
        assert_eq!(counters.failures.get(), 1);
        assert_eq!(counters.dropped.get(), 3);
        assert_eq!(counters.exported.get(), 0);
        pipeline.shutdown();
        pipeline.export(span());
        assert_eq!(counters.dropped.get(), 4);
    }
}
