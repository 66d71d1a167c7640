//! The auth service's metric families, registered once into the service's own registry and
//! served on the admin listener. Labels are bounded: route templates, methods, status classes
//! and result names, never raw paths or user ids.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, Opts, Registry};

/// Every metric of the auth service.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `vigil_auth_http_requests_total{route,method,status_class}`
    pub http_requests: IntCounterVec,
    /// `vigil_auth_http_request_duration_seconds{route,method}`, with exemplars
    http_duration: telemetry::exposition::ExemplarFamily,
    exemplars: std::sync::Arc<prometheus_client::registry::Registry>,
    /// `vigil_auth_logins_total{result}`: success, invalid_credentials, disabled, invalid_input
    pub logins: IntCounterVec,
    /// `vigil_auth_registrations_total{result}`: created, conflict, invalid_input
    pub registrations: IntCounterVec,
    /// `vigil_auth_token_refreshes_total{result}`: success, invalid, reuse_detected, disabled
    pub refreshes: IntCounterVec,
    /// `vigil_auth_password_hash_duration_seconds`: every argon2 computation, hash or verify
    pub password_hash_duration: Histogram,
    /// `vigil_auth_refresh_reuse_detected_total`: rotated refresh tokens presented again
    pub refresh_reuse_detected: IntCounter,
    /// `vigil_auth_signing_key_reloads_total{result}`: key set reloads from disk
    pub key_reloads: IntCounterVec,
    /// `vigil_auth_trace_spans_{exported,dropped}_total`, `vigil_auth_trace_export_failures_total`
    pub trace: telemetry::Counters,
}

impl Metrics {
    /// Creates the families in a fresh registry.
    pub fn new() -> Self {
        Self::with_trace(telemetry::Counters::new("vigil_auth"))
    }

    /// Like [`Self::new`], with the span counters an export pipeline already moves.
    pub fn with_trace(trace: telemetry::Counters) -> Self {
        let registry = Registry::new();
        trace.register(&registry).expect("metric registered once");
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let http_requests = counter(
            "vigil_auth_http_requests_total",
            "HTTP requests answered, by route template, method and status class.",
            &["route", "method", "status_class"],
        );
        let logins = counter(
            "vigil_auth_logins_total",
            "Login attempts by result.",
            &["result"],
        );
        let registrations = counter(
            "vigil_auth_registrations_total",
            "Registration attempts by result.",
            &["result"],
        );
        let refreshes = counter(
            "vigil_auth_token_refreshes_total",
            "Refresh-token uses by result.",
            &["result"],
        );
        let key_reloads = counter(
            "vigil_auth_signing_key_reloads_total",
            "Signing key set reloads by result.",
            &["result"],
        );
        let http_duration =
            telemetry::exposition::ExemplarFamily::new_with_constructor(duration_histogram);
        let mut exemplars = prometheus_client::registry::Registry::default();
        exemplars.register(
            "vigil_auth_http_request_duration_seconds",
            "Time from request to response head, by route template and method.",
            http_duration.clone(),
        );
        let password_hash_duration = Histogram::with_opts(
            HistogramOpts::new(
                "vigil_auth_password_hash_duration_seconds",
                "Wall time of one argon2id computation (hash or verify).",
            )
            .buckets(vec![
                0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0,
            ]),
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(password_hash_duration.clone()))
            .expect("metric registered once");
        let refresh_reuse_detected = IntCounter::new(
            "vigil_auth_refresh_reuse_detected_total",
            "Rotated refresh tokens presented again; each revoked its whole session.",
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(refresh_reuse_detected.clone()))
            .expect("metric registered once");
        Self {
            registry,
            exemplars: std::sync::Arc::new(exemplars),
            http_requests,
            http_duration,
            logins,
            registrations,
            refreshes,
            password_hash_duration,
            refresh_reuse_detected,
            key_reloads,
            trace,
        }
    }

    /// Every family in the classic text format.
    pub fn render(&self) -> String {
        self.exposition(None).body
    }

    /// Every family in the format a scraper's `Accept` asks for: OpenMetrics with exemplars,
    /// or the classic text format.
    pub fn exposition(&self, accept: Option<&str>) -> telemetry::exposition::Exposition {
        telemetry::exposition::render(&self.registry.gather(), &self.exemplars, accept)
    }

    /// `vigil_auth_http_request_duration_seconds{route,method}`
    pub fn http_duration(
        &self,
        route: &str,
        method: &str,
    ) -> telemetry::exposition::ExemplarHistogram {
        self.http_duration
            .get_or_create(&vec![
                ("route".to_owned(), route.to_owned()),
                ("method".to_owned(), method.to_owned()),
            ])
            .clone()
    }
}

fn duration_histogram() -> telemetry::exposition::ExemplarHistogram {
    telemetry::exposition::ExemplarHistogram::new(
        [
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
        ]
        .into_iter(),
    )
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
