//! One request's place in a trace, decided once where the request enters: the W3C
//! `traceparent`/`tracestate` a trusted caller sent (checked by the SDK's propagator), or a
//! new trace; the parent-based sampling decision; the `traceparent` sent on.

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, TraceContextExt, TraceFlags, TraceId, TraceState,
};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    IdGenerator, RandomIdGenerator, Sampler, SamplingDecision, ShouldSample,
};

/// A request's trace: its trace id, its own span, the caller's span when it continued one.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceContext {
    /// The trace this request belongs to.
    pub trace_id: TraceId,
    /// This service's span for the request.
    pub span_id: SpanId,
    /// The caller's span, when a trusted caller's `traceparent` was continued.
    pub parent: Option<SpanId>,
    /// Whether the trace is sampled (its spans are exported).
    pub sampled: bool,
    /// The caller's `tracestate`, passed on unchanged.
    pub state: TraceState,
}

/// The new-trace sampling ratio; a continued trace keeps its caller's decision.
#[derive(Clone, Debug)]
pub struct Sampling(Sampler);

impl Sampling {
    /// Samples `ratio` (0.0–1.0) of new traces.
    pub fn ratio(ratio: f64) -> Self {
        Self(Sampler::TraceIdRatioBased(ratio))
    }

    fn sampled(&self, trace_id: TraceId) -> bool {
        match self.0 {
            Sampler::TraceIdRatioBased(r) if r <= 0.0 => false,
            Sampler::TraceIdRatioBased(r) if r >= 1.0 => true,
            _ => {
                let result = self
                    .0
                    .should_sample(None, trace_id, "", &SpanKind::Server, &[], &[]);
                result.decision == SamplingDecision::RecordAndSample
            }
        }
    }
}

/// The two W3C headers, as the propagator reads them.
struct Headers<'a> {
    traceparent: Option<&'a str>,
    tracestate: Option<&'a str>,
}

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        match key {
            "traceparent" => self.traceparent,
            "tracestate" => self.tracestate,
            _ => None,
        }
    }

    fn keys(&self) -> Vec<&str> {
        vec!["traceparent", "tracestate"]
    }
}

thread_local! {
    static IDS: RandomIdGenerator = RandomIdGenerator::default();
}

/// A new random span id.
pub fn new_span_id() -> SpanId {
    IDS.with(IdGenerator::new_span_id)
}

/// Ids as hex without `fmt`'s machinery (every request writes three).
fn push_hex(out: &mut String, bytes: &[u8]) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    for b in bytes {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
}

impl TraceContext {
    /// A new trace, sampled or not by `sampling`.
    pub fn root(sampling: &Sampling) -> Self {
        let (trace_id, span_id) = IDS.with(|g| (g.new_trace_id(), g.new_span_id()));
        Self {
            trace_id,
            span_id,
            parent: None,
            sampled: sampling.sampled(trace_id),
            state: TraceState::NONE,
        }
    }

    /// Continues the caller's trace when `traceparent` is well-formed; a new trace otherwise
    /// (a malformed header is ignored, as W3C Trace Context asks).
    pub fn continued(
        traceparent: Option<&str>,
        tracestate: Option<&str>,
        sampling: &Sampling,
    ) -> Self {
        if traceparent.is_none() {
            return Self::root(sampling);
        }
        let cx = TraceContextPropagator::new().extract(&Headers {
            traceparent,
            tracestate,
        });
        let span = cx.span();
        let caller = span.span_context();
        if !caller.is_valid() {
            return Self::root(sampling);
        }
        Self {
            trace_id: caller.trace_id(),
            span_id: new_span_id(),
            parent: Some(caller.span_id()),
            sampled: caller.is_sampled(),
            state: caller.trace_state().clone(),
        }
    }

    /// The `traceparent` naming `span` of this trace as the parent.
    pub fn traceparent(&self, span: SpanId) -> String {
        let mut out = String::with_capacity(55);
        out.push_str("00-");
        push_hex(&mut out, &self.trace_id.to_bytes());
        out.push('-');
        push_hex(&mut out, &span.to_bytes());
        out.push_str(if self.sampled { "-01" } else { "-00" });
        out
    }

    /// `tracestate` to send on, when the caller sent one.
    pub fn tracestate(&self) -> Option<String> {
        let header = self.state.header();
        (!header.is_empty()).then_some(header)
    }

    /// The trace id as the logs and error bodies write it: 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        let mut out = String::with_capacity(32);
        push_hex(&mut out, &self.trace_id.to_bytes());
        out
    }

    /// This request's span id as the logs write it: 16 lower-case hex digits.
    pub fn span_id_hex(&self) -> String {
        let mut out = String::with_capacity(16);
        push_hex(&mut out, &self.span_id.to_bytes());
        out
    }

    /// The span context of `span` in this trace (for a span's parent or an exemplar).
    pub fn span_context(&self, span: SpanId, remote: bool) -> SpanContext {
        let flags = if self.sampled {
            TraceFlags::SAMPLED
        } else {
            TraceFlags::default()
        };
        SpanContext::new(self.trace_id, span, flags, remote, self.state.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn a_valid_traceparent_is_continued_with_its_decision_and_state() {
        let t = TraceContext::continued(Some(PARENT), Some("vendor=a1"), &Sampling::ratio(0.0));
        assert_eq!(t.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(t.trace_id_hex(), t.trace_id.to_string());
        assert_eq!(t.span_id_hex(), t.span_id.to_string());
        assert_eq!(
            t.parent.map(|s| s.to_string()).as_deref(),
            Some("00f067aa0ba902b7")
        );
        assert!(
            t.sampled,
            "the caller sampled it; ratio 0 applies to new traces only"
        );
        assert_eq!(t.tracestate().as_deref(), Some("vendor=a1"));
        let sent = t.traceparent(t.span_id);
        assert!(sent.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(sent.ends_with("-01") && sent.len() == 55);
        assert_ne!(&sent[36..52], "00f067aa0ba902b7");
    }

    #[test]
    fn malformed_traceparents_start_a_new_trace() {
        for bad in [
            "",
            "garbage",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            let t = TraceContext::continued(Some(bad), None, &Sampling::ratio(1.0));
            assert_eq!(t.parent, None, "{bad:?}");
            assert_ne!(
                t.trace_id_hex(),
                "4bf92f3577b34da6a3ce929d0e0e4736",
                "{bad:?}"
            );
            assert!(t.sampled && t.trace_id != TraceId::INVALID, "{bad:?}");
        }
    }

    #[test]
    fn new_traces_follow_the_ratio() {
        let never = (0..200).filter(|_| TraceContext::root(&Sampling::ratio(0.0)).sampled);
        assert_eq!(never.count(), 0);
        let always = (0..200).filter(|_| TraceContext::root(&Sampling::ratio(1.0)).sampled);
        assert_eq!(always.count(), 200);
        let half = (0..2000)
            .filter(|_| TraceContext::root(&Sampling::ratio(0.5)).sampled)
            .count();
        assert!((800..1200).contains(&half), "{half}");
        let a = TraceContext::root(&Sampling::ratio(1.0));
        assert_eq!(a.traceparent(a.span_id).len(), 55);
        assert!(a.traceparent(a.span_id).ends_with("-01"));
        assert_ne!(
            a.trace_id,
            TraceContext::root(&Sampling::ratio(1.0)).trace_id
        );
    }
}
