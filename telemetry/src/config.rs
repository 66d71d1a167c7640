//! The `[tracing]` section the proxy's and the auth service's config files share: where spans
//! go (OTLP), how many are kept (sampling), and how much may wait for export.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[tracing]`: off unless `endpoint` is set.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TracingConfig {
    /// The collector's OTLP base URL (`http://127.0.0.1:4318`; `/v1/traces` is added for
    /// HTTP). Unset: no spans are exported, though trace ids are still made, logged and sent
    /// upstream.
    pub endpoint: Option<String>,
    /// `http/protobuf` (the default) or `grpc` (a build with the `otlp-grpc` feature).
    pub protocol: Protocol,
    /// Extra request headers for the collector. Keep credentials out of committed files:
    /// `OTEL_EXPORTER_OTLP_HEADERS` (`key=value,…`) is read too.
    pub headers: BTreeMap<String, String>,
    /// How long one export may take before it counts as failed.
    pub timeout_ms: u64,
    /// The share of new traces that are sampled, 0.0–1.0; a trusted caller's decision is kept
    /// (parent-based).
    pub sampling_ratio: f64,
    /// Finished spans that may wait for export; past it spans are dropped and counted.
    pub queue_size: usize,
    /// Spans per export request.
    pub batch_size: usize,
    /// How often waiting spans are exported.
    pub export_interval_ms: u64,
}

/// The OTLP transport.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
pub enum Protocol {
    /// OTLP/HTTP with protobuf bodies.
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC.
    #[serde(rename = "grpc")]
    Grpc,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            endpoint: None,
            protocol: Protocol::HttpProtobuf,
            headers: BTreeMap::new(),
            timeout_ms: 10_000,
            sampling_ratio: 0.1,
            queue_size: 2048,
            batch_size: 512,
            export_interval_ms: 5_000,
        }
    }
}

impl TracingConfig {
    /// Whether spans are exported.
    pub fn enabled(&self) -> bool {
        self.endpoint.is_some()
    }

    /// Every problem, as `(key under [tracing], message)`.
    pub fn problems(&self) -> Vec<(&'static str, String)> {
        let mut out = Vec::new();
        if let Some(endpoint) = &self.endpoint {
            match endpoint.parse::<http::Uri>() {
                Ok(uri)
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.authority().is_some() => {}
                _ => out.push((
                    "endpoint",
                    format!("{endpoint:?} is not an http:// or https:// URL"),
                )),
            }
        }
        if self.protocol == Protocol::Grpc && !cfg!(feature = "grpc") {
            out.push((
                "protocol",
                "this build has no gRPC exporter (build with --features otlp-grpc), use \"http/protobuf\""
                    .to_owned(),
            ));
        }
        for (k, v) in &self.headers {
            if http::HeaderName::try_from(k.as_str()).is_err()
                || http::HeaderValue::try_from(v.as_str()).is_err()
            {
                out.push(("headers", format!("{k:?} is not a valid header")));
            }
        }
        if !(0.0..=1.0).contains(&self.sampling_ratio) {
            out.push(("sampling_ratio", "must be between 0.0 and 1.0".to_owned()));
        }
        if self.timeout_ms == 0 {
            out.push(("timeout_ms", "must be at least 1".to_owned()));
        }
        if self.export_interval_ms == 0 {
            out.push(("export_interval_ms", "must be at least 1".to_owned()));
        }
        if self.queue_size == 0 {
            out.push(("queue_size", "must be at least 1".to_owned()));
        }
        if self.batch_size == 0 || self.batch_size > self.queue_size {
            out.push(("batch_size", "must be between 1 and queue_size".to_owned()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_off_and_valid() {
        let c = TracingConfig::default();
        assert!(!c.enabled());
        assert!(c.problems().is_empty());
    }

    #[test]
    fn every_problem_is_named_by_its_key() {
        let c: TracingConfig = toml::from_str(
            "endpoint = \"ftp://x\"\nsampling_ratio = 1.5\ntimeout_ms = 0\nqueue_size = 4\nbatch_size = 8\nheaders = { \"bad name\" = \"v\" }\n",
        )
        .unwrap();
        let keys: Vec<_> = c.problems().into_iter().map(|(k, _)| k).collect();
        assert_eq!(
            keys,
            [
                "endpoint",
                "headers",
                "sampling_ratio",
                "timeout_ms",
                "batch_size"
            ]
        );
    }

    #[test]
    fn unknown_keys_and_protocols_are_refused() {
        assert!(toml::from_str::<TracingConfig>("endpont = \"http://x\"").is_err());
        assert!(toml::from_str::<TracingConfig>("protocol = \"http/json\"").is_err());
    }
}
