//! The edge's traces. Each request gets its trace context once, in `request_filter`: a
//! trusted peer's `traceparent` (`listen.trusted_proxies`, or a route's `trust_traceparent`)
//! is continued, anything else starts a new trace, so an untrusted client never picks the
//! trace id. The upstream always gets a `traceparent` naming the edge's client span.
//!
//! Spans are built once the request is done, from what it recorded (times as `Instant`s, the
//! filter runs): the server span with the HTTP semantic-convention attributes and, for a
//! rejection, an error status with its stage and reason; an event per filter stage that ran;
//! and a client span for the upstream call, a retry as its event. An unsampled request
//! builds nothing: its only cost is its ids.

use std::borrow::Cow;
use std::time::{Instant, SystemTime};

use opentelemetry::KeyValue;
use opentelemetry::trace::{Event, SpanId, SpanKind, Status};
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanLinks};
use telemetry::{Counters, Pipeline, Sampling, StartError, TraceContext, TracingConfig};

use crate::pipeline::StageRun;

/// Events as a span carries them (`SpanEvents` is non-exhaustive: built from its default).
fn span_events(events: Vec<Event>) -> SpanEvents {
    let mut out = SpanEvents::default();
    out.events = events;
    out
}

/// The proxy's tracing: the export pipeline when `[tracing]` has an endpoint.
#[derive(Debug)]
pub struct Tracing {
    pipeline: Option<Pipeline>,
    sampling: Sampling,
}

/// What a finished request recorded, for its spans.
pub struct Finished<'a> {
    pub trace: &'a TraceContext,
    pub started: Instant,
    pub method: &'a str,
    pub route: Option<&'a str>,
    pub path: &'a str,
    pub status: u16,
    pub client_ip: &'a str,
    pub user_agent: &'a str,
    pub tls_version: &'a str,
    pub http_version: &'static str,
    pub host: &'a str,
    pub request_id: &'a str,
    /// Stage and reason of the rejection (enforced or shadowed), and the decision.
    pub stage: &'a str,
    pub reason: &'a str,
    pub decision: &'static str,
    pub stages: &'a [StageRun],
    pub upstream: Option<Upstream<'a>>,
}

/// The upstream call: its span id (sent in `traceparent`), the peer, when it ran.
pub struct Upstream<'a> {
    pub span_id: SpanId,
    pub name: &'a str,
    /// The peer's address (`server.address`) and port (`server.port`).
    pub address: String,
    pub port: Option<u16>,
    pub started: Instant,
    pub ended: Option<Instant>,
    pub retried: bool,
    pub status: u16,
}

impl Tracing {
    /// Starts exporting when `config` has an endpoint; without one, ids are still made and sent
    /// upstream, with new traces unsampled.
    pub fn start(config: &TracingConfig, counters: Counters) -> Result<Self, StartError> {
        let pipeline = Pipeline::start(config, "vigil-proxy", counters)?;
        let sampling = pipeline
            .as_ref()
            .map_or_else(|| Sampling::ratio(0.0), Pipeline::sampling);
        Ok(Self { pipeline, sampling })
    }

    /// Tracing off (tests, `vigil check`).
    pub fn off() -> Self {
        Self {
            pipeline: None,
            sampling: Sampling::ratio(0.0),
        }
    }

    /// The request's trace: the caller's when `trusted` and well-formed, else a new one.
    pub fn begin(
        &self,
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        trusted: bool,
    ) -> TraceContext {
        if trusted {
            TraceContext::continued(traceparent, tracestate, &self.sampling)
        } else {
            TraceContext::root(&self.sampling)
        }
    }

    /// Whether this request's spans are built and exported.
    pub fn records(&self, trace: &TraceContext) -> bool {
        trace.sampled && self.pipeline.is_some()
    }

    /// Builds and queues the spans of a sampled request.
    pub fn finish(&self, f: &Finished<'_>) {
        let Some(pipeline) = &self.pipeline else {
            return;
        };
        if !f.trace.sampled {
            return;
        }
        let (now, now_wall) = (Instant::now(), SystemTime::now());
        let wall = |t: Instant| now_wall - now.saturating_duration_since(t);
        let name = match f.route {
            Some(route) => format!("{} {route}", f.method),
            None => f.method.to_owned(),
        };
        let mut attributes = vec![
            KeyValue::new("http.request.method", f.method.to_owned()),
            KeyValue::new("url.path", f.path.to_owned()),
            KeyValue::new("http.response.status_code", i64::from(f.status)),
            KeyValue::new("client.address", f.client_ip.to_owned()),
            KeyValue::new("network.protocol.version", f.http_version),
            KeyValue::new("vigil.request_id", f.request_id.to_owned()),
            KeyValue::new("vigil.decision", f.decision),
        ];
        let optional = [
            ("http.route", f.route.unwrap_or("")),
            ("server.address", f.host),
            ("user_agent.original", f.user_agent),
            (
                "tls.protocol.version",
                f.tls_version.trim_start_matches("TLSv"),
            ),
            ("vigil.stage", f.stage),
            ("vigil.reason", f.reason),
        ];
        for (k, v) in optional {
            if !v.is_empty() {
                attributes.push(KeyValue::new(k, v.to_owned()));
            }
        }
        let events = f
            .stages
            .iter()
            .map(|s| {
                let mut attrs = vec![
                    KeyValue::new("vigil.filter", s.name.clone()),
                    KeyValue::new("vigil.filter.kind", s.kind),
                    KeyValue::new("vigil.decision", s.decision),
                ];
                if let Some(reason) = s.reason {
                    attrs.push(KeyValue::new("vigil.reason", reason));
                }
                Event::new(Cow::Owned(format!("stage {}", s.kind)), s.at, attrs, 0)
            })
            .collect();
        let status = if f.decision == "reject" || f.status >= 500 {
            Status::error(match (f.stage, f.reason) {
                ("", _) => format!("status {}", f.status),
                (stage, reason) => format!("{stage}: {reason}"),
            })
        } else {
            Status::Unset
        };
        let server = SpanData {
            span_context: f.trace.span_context(f.trace.span_id, false),
            parent_span_id: f.trace.parent.unwrap_or(SpanId::INVALID),
            parent_span_is_remote: f.trace.parent.is_some(),
            span_kind: SpanKind::Server,
            name: Cow::Owned(name),
            start_time: wall(f.started),
            end_time: now_wall,
            attributes,
            dropped_attributes_count: 0,
            events: span_events(events),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: pipeline.scope().clone(),
        };
        pipeline.export(server);
        let Some(up) = &f.upstream else { return };
        let started = wall(up.started);
        let events = if up.retried {
            vec![Event::new("retry", started, Vec::new(), 0)]
        } else {
            Vec::new()
        };
        let client = SpanData {
            span_context: f.trace.span_context(up.span_id, false),
            parent_span_id: f.trace.span_id,
            parent_span_is_remote: false,
            span_kind: SpanKind::Client,
            name: Cow::Owned(format!("{} {}", f.method, up.name)),
            start_time: started,
            end_time: up.ended.map_or(now_wall, wall),
            attributes: [
                KeyValue::new("http.request.method", f.method.to_owned()),
                KeyValue::new("server.address", up.address.clone()),
                KeyValue::new("vigil.upstream", up.name.to_owned()),
                KeyValue::new("http.response.status_code", i64::from(up.status)),
            ]
            .into_iter()
            .chain(up.port.map(|p| KeyValue::new("server.port", i64::from(p))))
            .collect(),
            dropped_attributes_count: 0,
            events: span_events(events),
            links: SpanLinks::default(),
            status: if up.status >= 500 || up.status == 0 {
                Status::error(format!("upstream status {}", up.status))
            } else {
                Status::Unset
            },
            instrumentation_scope: pipeline.scope().clone(),
        };
        pipeline.export(client);
    }

    /// Exports what is queued (graceful shutdown and upgrade).
    pub fn shutdown(&self) {
        if let Some(p) = &self.pipeline {
            p.shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_trusted_caller_picks_the_trace_id() {
        let tracing = Tracing::off();
        let sent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let trusted = tracing.begin(Some(sent), None, true);
        assert_eq!(trusted.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        let untrusted = tracing.begin(Some(sent), None, false);
        assert_ne!(untrusted.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(untrusted.parent, None);
        assert!(
            !untrusted.sampled,
            "tracing off: new traces are not sampled"
        );
        assert!(!tracing.records(&trusted), "no pipeline: nothing is built");
    }
}
