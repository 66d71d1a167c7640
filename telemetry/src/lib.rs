//! OpenTelemetry for every role, in one place so the proxy and the auth service trace, count
//! and log the same way: the `[tracing]` config section ([`config`]), a request's W3C trace
//! context and sampling decision ([`context`]), the OTLP export queue with its counters
//! ([`export`]), `/metrics` with exemplars in OpenMetrics ([`exposition`]), and the JSON log
//! line with the request's ids ([`log`]).
//!
//! The proxy builds its spans by hand from what a request recorded (no span objects at all
//! for an unsampled request) and queues them with [`Pipeline::export`]; the auth service uses
//! `tracing` spans through `tracing-opentelemetry` and [`Pipeline::tracer_provider`].

pub mod config;
pub mod context;
pub mod export;
pub mod exposition;
pub mod log;

pub use config::{Protocol, TracingConfig};
pub use context::{Sampling, TraceContext, new_span_id};
pub use export::{Counters, Pipeline, Queue, StartError};
pub use log::{IdsLayer, JsonLines};
