//! Spans out of the process: an OTLP exporter behind a bounded queue, on a thread of its own.
//!
//! The SDK's `BatchSpanProcessor` keeps the count of spans it drops to itself (it logs the first
//! drop only), and its thread has no Tokio reactor, so an async HTTP client there fails quietly.
//! This queue does the same job and says what it lost: a request thread only ever `try_send`s a
//! finished span (never blocks, never waits on the network); the export thread runs its own
//! current-thread runtime, batches by size or interval, bounds each export by `timeout_ms`, and
//! counts what it exported, what it dropped (queue full, or in a failed export) and the failed
//! exports. `shutdown` exports what is queued, within the timeout.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
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

enum Message {
    Span(Box<SpanData>),
    Flush(mpsc::Sender<()>),
    Shutdown(mpsc::Sender<()>),
}

/// The sending side of the export queue; also the SDK's span processor (for `tracing` spans).
#[derive(Clone, Debug)]
pub struct Queue {
    tx: SyncSender<Message>,
    counters: Counters,
    timeout: Duration,
}

impl Queue {
    /// Queues a finished, sampled span; drops and counts it when the queue is full.
    pub fn send(&self, span: SpanData) {
        match self.tx.try_send(Message::Span(Box::new(span))) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped.inc()
            }
        }
    }

    fn ask(&self, message: fn(mpsc::Sender<()>) -> Message) -> OTelSdkResult {
        let (done, wait) = mpsc::channel();
        self.tx
            .send(message(done))
            .map_err(|_| OTelSdkError::AlreadyShutdown)?;
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
        self.ask(Message::Flush)
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        self.ask(Message::Shutdown)
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
        let (tx, rx) = mpsc::sync_channel(config.queue_size);
        let (built_tx, built_rx) = mpsc::channel();
        let worker = Worker {
            rx,
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
                tx,
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
        if let Err(e) = self.queue.ask(Message::Shutdown) {
            tracing::warn!(error = %e, "tracing: spans still queued at shutdown were lost");
        }
    }

    /// Exports what is queued now (tests, and before an upgrade hands over).
    pub fn flush(&self) {
        let _ = self.queue.ask(Message::Flush);
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

/// The receiving end: batches spans and exports them.
struct Worker {
    rx: Receiver<Message>,
    counters: Counters,
    batch_size: usize,
    interval: Duration,
    timeout: Duration,
}

impl Worker {
    fn run(self, runtime: &tokio::runtime::Runtime, exporter: &impl SpanExporter) {
        let mut batch = Vec::with_capacity(self.batch_size);
        let mut next = Instant::now() + self.interval;
        loop {
            let message = self
                .rx
                .recv_timeout(next.saturating_duration_since(Instant::now()));
            match message {
                Ok(Message::Span(span)) => {
                    batch.push(*span);
                    if batch.len() >= self.batch_size {
                        self.export(runtime, exporter, &mut batch);
                    }
                }
                Ok(Message::Flush(done)) => {
                    self.drain(runtime, exporter, &mut batch);
                    let _ = done.send(());
                }
                Ok(Message::Shutdown(done)) => {
                    self.drain(runtime, exporter, &mut batch);
                    let _ = exporter.shutdown_with_timeout(self.timeout);
                    let _ = done.send(());
                    return;
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    self.drain(runtime, exporter, &mut batch);
                    return;
                }
            }
            if Instant::now() >= next {
                self.export(runtime, exporter, &mut batch);
                next = Instant::now() + self.interval;
            }
        }
    }

    /// Exports everything already queued.
    fn drain(
        &self,
        runtime: &tokio::runtime::Runtime,
        exporter: &impl SpanExporter,
        batch: &mut Vec<SpanData>,
    ) {
        while let Ok(Message::Span(span)) = self.rx.try_recv() {
            batch.push(*span);
            if batch.len() >= self.batch_size {
                self.export(runtime, exporter, batch);
            }
        }
        self.export(runtime, exporter, batch);
    }

    fn export(
        &self,
        runtime: &tokio::runtime::Runtime,
        exporter: &impl SpanExporter,
        batch: &mut Vec<SpanData>,
    ) {
        if batch.is_empty() {
            return;
        }
        let spans = std::mem::replace(batch, Vec::with_capacity(self.batch_size));
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
