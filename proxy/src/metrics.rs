//! The proxy's metric families, registered once in the proxy's own registry (prometheus 0.14,
//! the version pingora-prometheus uses) and served by the admin listener. Labels are bounded:
//! route names from the config (`unmatched` otherwise), a fixed method set, status classes, and
//! the bounded stage/reason pairs of rejections. Never a raw path, address or user id.
//!
//! One family lives in a `prometheus-client` registry beside it: the request-duration
//! histogram, whose buckets keep a sampled request's trace id as an exemplar (served in
//! OpenMetrics to a scraper that asks; `telemetry::exposition`).

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry,
};

/// Every metric of the proxy.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `vigil_proxy_trace_spans_{exported,dropped}_total`, `vigil_proxy_trace_export_failures_total`
    pub trace: telemetry::Counters,
    /// `vigil_proxy_requests_total{route,method,status_class}`
    pub requests: IntCounterVec,
    /// `vigil_proxy_request_duration_seconds{route}`, with exemplars
    pub request_duration: telemetry::exposition::ExemplarFamily,
    exemplars: std::sync::Arc<prometheus_client::registry::Registry>,
    /// `vigil_proxy_upstream_duration_seconds{route,upstream}`
    pub upstream_duration: HistogramVec,
    /// `vigil_proxy_rejections_total{route,stage,reason}`
    pub rejections: IntCounterVec,
    /// `vigil_proxy_shadow_decisions_total{route,stage,reason}`: what shadow-mode filters would have rejected
    pub shadow_decisions: IntCounterVec,
    /// `vigil_proxy_connections_active`
    pub connections_active: IntGauge,
    /// `vigil_proxy_requests_in_flight`
    pub requests_in_flight: IntGauge,
    /// `vigil_proxy_access_log_dropped_total`: lines dropped while stdout's reader stalled
    pub access_log_dropped: prometheus::IntCounter,
    /// `vigil_proxy_tls_handshakes_total{version,result}`
    pub tls_handshakes: IntCounterVec,
    /// `vigil_proxy_config_reloads_total{result}`
    pub config_reloads: IntCounterVec,
    /// `vigil_proxy_config_last_reload_successful`
    pub config_last_reload_successful: Gauge,
    /// `vigil_proxy_jwt_validations_total{issuer,result}`
    pub jwt_validations: IntCounterVec,
    /// `vigil_proxy_jwt_cache_lookups_total{issuer,result}`
    pub jwt_cache: IntCounterVec,
    /// `vigil_proxy_jwks_refreshes_total{issuer,result}`
    pub jwks_refreshes: IntCounterVec,
    /// `vigil_proxy_jwks_keys{issuer}`
    pub jwks_keys: IntGaugeVec,
    /// `vigil_proxy_jwks_age_seconds{issuer}`
    pub jwks_age: GaugeVec,
    /// `vigil_proxy_ratelimit_decisions_total{policy,result}` (allowed, limited, shadow_limited)
    pub ratelimit_decisions: IntCounterVec,
    /// `vigil_proxy_ratelimit_keys{policy}`: keys in the local table (set at scrape time)
    pub ratelimit_keys: IntGaugeVec,
    /// `vigil_proxy_ratelimit_evictions_total{policy}`
    pub ratelimit_evictions: IntCounterVec,
    /// `vigil_proxy_ratelimit_store_errors_total{policy,kind}` (timeout, unavailable, error)
    pub ratelimit_store_errors: IntCounterVec,
    /// `vigil_proxy_ratelimit_fallbacks_total{policy,action}` (local, allow, deny)
    pub ratelimit_fallbacks: IntCounterVec,
    /// `vigil_proxy_ratelimit_store_duration_seconds{policy}`: one Redis decision
    pub ratelimit_store_duration: HistogramVec,
    /// `vigil_proxy_waf_rule_matches_total{rule_id,category,mode}`
    pub waf_rule_matches: IntCounterVec,
    /// `vigil_proxy_waf_inspection_duration_seconds`: one request's inspection
    pub waf_inspection_duration: Histogram,
    /// `vigil_proxy_login_guard_cooldowns_total{policy}`: clients sent to cool down
    pub login_guard_cooldowns: IntCounterVec,
    /// `vigil_proxy_login_guard_cooling_down{policy}`: clients cooling down now (at scrape time)
    pub login_guard_cooling_down: IntGaugeVec,
}

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

impl Metrics {
    /// Creates every family in a fresh registry.
    pub fn new() -> Self {
        let registry = Registry::new();
        let reg = |c: Box<dyn prometheus::core::Collector>| {
            registry.register(c).expect("metric registered once")
        };
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            reg(Box::new(c.clone()));
            c
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let h = HistogramVec::new(
                HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec()),
                labels,
            )
            .expect("valid metric definition");
            reg(Box::new(h.clone()));
            h
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric definition");
            reg(Box::new(g.clone()));
            g
        };
        let request_duration =
            telemetry::exposition::ExemplarFamily::new_with_constructor(duration_histogram);
        let mut exemplars = prometheus_client::registry::Registry::default();
        exemplars.register(
            "vigil_proxy_request_duration_seconds",
            "Time from request header to the end of the response, by route.",
            request_duration.clone(),
        );
        let config_last_reload_successful = Gauge::new(
            "vigil_proxy_config_last_reload_successful",
            "1 when the last config load or reload succeeded, 0 when it failed and the previous config is serving.",
        )
        .expect("valid metric definition");
        reg(Box::new(config_last_reload_successful.clone()));
        config_last_reload_successful.set(1.0);
        // process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, …
        reg(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ));
        let jwks_keys = IntGaugeVec::new(
            Opts::new(
                "vigil_proxy_jwks_keys",
                "Keys in the issuer's last fetched JWK Set; 0 while none has loaded (its tokens get 503).",
            ),
            &["issuer"],
        )
        .expect("valid metric definition");
        reg(Box::new(jwks_keys.clone()));
        let jwks_age = GaugeVec::new(
            Opts::new(
                "vigil_proxy_jwks_age_seconds",
                "Seconds since the issuer's JWK Set was last fetched successfully.",
            ),
            &["issuer"],
        )
        .expect("valid metric definition");
        reg(Box::new(jwks_age.clone()));
        let gauges = |name: &str, help: &str| {
            let g = IntGaugeVec::new(Opts::new(name, help), &["policy"])
                .expect("valid metric definition");
            reg(Box::new(g.clone()));
            g
        };
        let ratelimit_keys = gauges(
            "vigil_proxy_ratelimit_keys",
            "Keys a rate-limit policy's local table holds now (at most its max_keys).",
        );
        let login_guard_cooling_down = gauges(
            "vigil_proxy_login_guard_cooling_down",
            "Clients a login guard refuses now, until their cool-down ends.",
        );
        Self {
            ratelimit_decisions: counter(
                "vigil_proxy_ratelimit_decisions_total",
                "Rate-limit decisions by policy and result (allowed, limited, shadow_limited).",
                &["policy", "result"],
            ),
            ratelimit_keys,
            ratelimit_evictions: counter(
                "vigil_proxy_ratelimit_evictions_total",
                "Keys a rate-limit policy forgot because its table was full (the least recently seen).",
                &["policy"],
            ),
            ratelimit_store_errors: counter(
                "vigil_proxy_ratelimit_store_errors_total",
                "Shared rate-limit decisions Redis could not make, by policy and kind (timeout, unavailable, error).",
                &["policy", "kind"],
            ),
            ratelimit_fallbacks: counter(
                "vigil_proxy_ratelimit_fallbacks_total",
                "Shared rate-limit decisions that fell back to on_store_error, by policy and action.",
                &["policy", "action"],
            ),
            ratelimit_store_duration: {
                let h = HistogramVec::new(
                    HistogramOpts::new(
                        "vigil_proxy_ratelimit_store_duration_seconds",
                        "Time of one shared rate-limit decision in Redis (the round trip), by policy.",
                    )
                    .buckets(vec![0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025]),
                    &["policy"],
                )
                .expect("valid metric definition");
                reg(Box::new(h.clone()));
                h
            },
            waf_rule_matches: counter(
                "vigil_proxy_waf_rule_matches_total",
                "WAF rules that matched a request, by rule, category and mode (block or detect).",
                &["rule_id", "category", "mode"],
            ),
            waf_inspection_duration: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "vigil_proxy_waf_inspection_duration_seconds",
                        "Time the WAF took to inspect one request (head and body).",
                    )
                    .buckets(vec![
                        0.000_005, 0.00001, 0.000_025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001,
                        0.0025, 0.01,
                    ]),
                )
                .expect("valid metric definition");
                reg(Box::new(h.clone()));
                h
            },
            login_guard_cooldowns: counter(
                "vigil_proxy_login_guard_cooldowns_total",
                "Clients a login guard sent to cool down after too many failed answers.",
                &["policy"],
            ),
            login_guard_cooling_down,
            jwt_validations: counter(
                "vigil_proxy_jwt_validations_total",
                "Token checks by the jwt filter, by issuer and result (ok or the rejection reason).",
                &["issuer", "result"],
            ),
            jwt_cache: counter(
                "vigil_proxy_jwt_cache_lookups_total",
                "Lookups in the verified-token cache, by issuer and result (hit, miss).",
                &["issuer", "result"],
            ),
            jwks_refreshes: counter(
                "vigil_proxy_jwks_refreshes_total",
                "JWK Set fetches by issuer and result (success, failure).",
                &["issuer", "result"],
            ),
            jwks_keys,
            jwks_age,
            requests: counter(
                "vigil_proxy_requests_total",
                "Requests answered, by route, method and status class.",
                &["route", "method", "status_class"],
            ),
            request_duration,
            exemplars: std::sync::Arc::new(exemplars),
            upstream_duration: histogram(
                "vigil_proxy_upstream_duration_seconds",
                "Time from sending the request upstream to its response header, by route and upstream.",
                &["route", "upstream"],
            ),
            rejections: counter(
                "vigil_proxy_rejections_total",
                "Requests the proxy answered itself with an error, by route, stage and reason.",
                &["route", "stage", "reason"],
            ),
            shadow_decisions: counter(
                "vigil_proxy_shadow_decisions_total",
                "Requests a shadow-mode filter would have rejected (they were let through).",
                &["route", "stage", "reason"],
            ),
            connections_active: gauge(
                "vigil_proxy_connections_active",
                "Client connections open now.",
            ),
            requests_in_flight: gauge(
                "vigil_proxy_requests_in_flight",
                "Requests being served now.",
            ),
            access_log_dropped: {
                let c = prometheus::IntCounter::new(
                    "vigil_proxy_access_log_dropped_total",
                    "Access-log lines dropped because stdout's reader fell behind (the queue was full).",
                )
                .expect("valid metric definition");
                reg(Box::new(c.clone()));
                c
            },
            tls_handshakes: counter(
                "vigil_proxy_tls_handshakes_total",
                "TLS handshakes by protocol version and result.",
                &["version", "result"],
            ),
            config_reloads: counter(
                "vigil_proxy_config_reloads_total",
                "Config reloads by result.",
                &["result"],
            ),
            config_last_reload_successful,
            trace: {
                let c = telemetry::Counters::new("vigil_proxy");
                c.register(&registry).expect("metric registered once");
                c
            },
            registry,
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

    /// `vigil_proxy_request_duration_seconds{route}`
    pub fn route_duration(&self, route: &str) -> telemetry::exposition::ExemplarHistogram {
        self.request_duration
            .get_or_create(&vec![("route".to_owned(), route.to_owned())])
            .clone()
    }
}

fn duration_histogram() -> telemetry::exposition::ExemplarHistogram {
    telemetry::exposition::ExemplarHistogram::new(LATENCY_BUCKETS.iter().copied())
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// The method labels: the standard methods by name, anything else `other`.
const METHODS: [&str; 8] = [
    "GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other",
];
/// The status-class labels.
const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

/// The index of a request method's label in `METHODS`.
fn method_index(m: &http::Method) -> usize {
    METHODS[..7]
        .iter()
        .position(|x| *x == m.as_str())
        .unwrap_or(7)
}

/// The index of a status's class in `CLASSES` (0, or anything else odd, counts as `5xx`).
fn class_index(status: u16) -> usize {
    match status {
        100..=499 => usize::from(status / 100) - 1,
        _ => 4,
    }
}

/// A bounded label for a request method: the standard ones by name, anything else `other`.
pub fn method_label(m: &http::Method) -> &'static str {
    METHODS[method_index(m)]
}

/// `2xx`, `4xx`, …
pub fn status_class(status: u16) -> &'static str {
    CLASSES[class_index(status)]
}

/// One route's request metrics, resolved once instead of looked up by label on every request.
/// Request counters are resolved on first use, so a route exports only the method and status
/// pairs it has seen.
pub struct RouteMetrics {
    metrics: Metrics,
    route: String,
    requests: [std::sync::OnceLock<prometheus::IntCounter>; METHODS.len() * CLASSES.len()],
    /// `vigil_proxy_request_duration_seconds{route}`
    pub duration: telemetry::exposition::ExemplarHistogram,
    /// `vigil_proxy_upstream_duration_seconds{route,upstream}`
    pub upstream_duration: prometheus::Histogram,
}

impl RouteMetrics {
    /// The metrics of route `route`, whose upstream is `upstream`.
    pub fn new(metrics: &Metrics, route: &str, upstream: &str) -> Self {
        Self {
            duration: metrics.route_duration(route),
            upstream_duration: metrics
                .upstream_duration
                .with_label_values(&[route, upstream]),
            requests: std::array::from_fn(|_| std::sync::OnceLock::new()),
            metrics: metrics.clone(),
            route: route.to_owned(),
        }
    }

    /// `vigil_proxy_requests_total{route,method,status_class}` for one request.
    pub fn requests(&self, method: &http::Method, status: u16) -> &prometheus::IntCounter {
        let (m, c) = (method_index(method), class_index(status));
        self.requests[m * CLASSES.len() + c].get_or_init(|| {
            self.metrics
                .requests
                .with_label_values(&[self.route.as_str(), METHODS[m], CLASSES[c]])
        })
    }
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("route", &self.route)
            .finish()
    }
}
