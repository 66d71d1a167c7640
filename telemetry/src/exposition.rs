//! `/metrics` for a role whose families live in two registries: the `prometheus` crate's (0.14,
//! which Pingora uses and which cannot write exemplars) holds almost everything;
//! `prometheus-client`'s holds the request-duration histograms, whose buckets keep the trace id
//! of a sampled request as an exemplar.
//!
//! A scraper that asks for OpenMetrics (`Accept: application/openmetrics-text`, as Prometheus
//! does with `--enable-feature=exemplar-storage`) gets both registries in OpenMetrics, the
//! exemplars included; any other gets the classic text format (0.0.4), exemplars left out, so
//! a plain scrape, `curl` or `promtool check metrics` read the same families as before.

use std::fmt::Write as _;
use std::time::SystemTime;

use prometheus::proto::{MetricFamily, MetricType};
use prometheus_client::metrics::exemplar::HistogramWithExemplars;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

/// A metric's or an exemplar's labels, in order.
pub type Labels = Vec<(String, String)>;

/// A histogram whose buckets carry the trace id of a sampled request.
pub type ExemplarHistogram = HistogramWithExemplars<Labels>;

/// A labelled family of [`ExemplarHistogram`]s with fixed buckets.
pub type ExemplarFamily = Family<Labels, ExemplarHistogram, fn() -> ExemplarHistogram>;

/// Records `seconds` in `h`, with the trace as the bucket's exemplar when it is sampled.
pub fn observe(h: &ExemplarHistogram, seconds: f64, sampled_trace: Option<&str>) {
    match sampled_trace {
        Some(trace_id) => h.observe(
            seconds,
            Some(vec![("trace_id".to_owned(), trace_id.to_owned())]),
            Some(SystemTime::now()),
        ),
        None => h.observe(seconds, None, None),
    }
}

/// A `/metrics` answer.
#[derive(Debug)]
pub struct Exposition {
    pub content_type: &'static str,
    pub body: String,
}

/// Whether an `Accept` header asks for OpenMetrics.
pub fn wants_openmetrics(accept: Option<&str>) -> bool {
    accept.is_some_and(|a| a.contains("application/openmetrics-text"))
}

/// Both registries in the format `accept` asks for.
pub fn render(classic: &[MetricFamily], exemplars: &Registry, accept: Option<&str>) -> Exposition {
    let mut client = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode_registry(&mut client, exemplars);
    if wants_openmetrics(accept) {
        let mut body = openmetrics(classic);
        body.push_str(&client);
        body.push_str("# EOF\n");
        return Exposition {
            content_type: "application/openmetrics-text; version=1.0.0; charset=utf-8",
            body,
        };
    }
    let mut body = String::new();
    let mut bytes = Vec::new();
    if prometheus::Encoder::encode(&prometheus::TextEncoder::new(), classic, &mut bytes).is_ok() {
        body = String::from_utf8(bytes).unwrap_or_default();
    }
    for line in client.lines() {
        body.push_str(without_exemplar(line));
        body.push('\n');
    }
    Exposition {
        content_type: "text/plain; version=0.0.4; charset=utf-8",
        body,
    }
}

/// A sample line without its ` # {…} value timestamp` exemplar (the classic format has none).
fn without_exemplar(line: &str) -> &str {
    if line.starts_with('#') {
        return line;
    }
    // Skip the label set, whose quoted values may hold anything.
    let mut in_quotes = false;
    let mut escaped = false;
    let mut past_labels = !line.contains('{');
    for (i, c) in line.char_indices() {
        if past_labels {
            if line[i..].starts_with(" # ") {
                return &line[..i];
            }
            continue;
        }
        match (c, in_quotes, escaped) {
            (_, true, true) => escaped = false,
            ('\\', true, false) => escaped = true,
            ('"', _, false) => in_quotes = !in_quotes,
            ('}', false, _) => past_labels = true,
            _ => {}
        }
    }
    line
}

/// The classic registry's families in OpenMetrics text.
pub fn openmetrics(families: &[MetricFamily]) -> String {
    let mut out = String::new();
    for f in families {
        let name = f.name();
        let (family, kind) = match f.get_field_type() {
            MetricType::COUNTER => match name.strip_suffix("_total") {
                Some(base) => (base, "counter"),
                None => (name, "unknown"),
            },
            MetricType::GAUGE => (name, "gauge"),
            MetricType::HISTOGRAM => (name, "histogram"),
            MetricType::SUMMARY => (name, "summary"),
            MetricType::UNTYPED => (name, "unknown"),
        };
        let _ = writeln!(out, "# HELP {family} {}", escape(f.help()));
        let _ = writeln!(out, "# TYPE {family} {kind}");
        for m in f.get_metric() {
            let labels: Vec<(&str, &str)> = m
                .get_label()
                .iter()
                .map(|l| (l.name(), l.value()))
                .collect();
            match f.get_field_type() {
                MetricType::COUNTER => {
                    sample(&mut out, name, &labels, None, m.get_counter().get_value());
                }
                MetricType::GAUGE => {
                    sample(&mut out, name, &labels, None, m.get_gauge().get_value())
                }
                MetricType::UNTYPED => {
                    // The crate marks the accessor deprecated (protobuf-specific) with no other.
                    #[allow(deprecated)]
                    let value = m.get_untyped().get_value();
                    sample(&mut out, name, &labels, None, value);
                }
                MetricType::HISTOGRAM => {
                    let h = m.get_histogram();
                    for b in h.get_bucket() {
                        let le = number(b.upper_bound());
                        let value = b.cumulative_count() as f64;
                        sample(
                            &mut out,
                            &format!("{name}_bucket"),
                            &labels,
                            Some(("le", &le)),
                            value,
                        );
                    }
                    let count = h.get_sample_count() as f64;
                    sample(
                        &mut out,
                        &format!("{name}_bucket"),
                        &labels,
                        Some(("le", "+Inf")),
                        count,
                    );
                    sample(
                        &mut out,
                        &format!("{name}_sum"),
                        &labels,
                        None,
                        h.get_sample_sum(),
                    );
                    sample(&mut out, &format!("{name}_count"), &labels, None, count);
                }
                MetricType::SUMMARY => {
                    let s = m.get_summary();
                    for q in s.get_quantile() {
                        let quantile = number(q.quantile());
                        sample(
                            &mut out,
                            name,
                            &labels,
                            Some(("quantile", &quantile)),
                            q.value(),
                        );
                    }
                    sample(
                        &mut out,
                        &format!("{name}_sum"),
                        &labels,
                        None,
                        s.sample_sum(),
                    );
                    sample(
                        &mut out,
                        &format!("{name}_count"),
                        &labels,
                        None,
                        s.sample_count() as f64,
                    );
                }
            }
        }
    }
    out
}

fn sample(
    out: &mut String,
    name: &str,
    labels: &[(&str, &str)],
    extra: Option<(&str, &str)>,
    value: f64,
) {
    out.push_str(name);
    let all: Vec<_> = labels.iter().copied().chain(extra).collect();
    if !all.is_empty() {
        out.push('{');
        for (i, (k, v)) in all.iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            let _ = write!(out, "{k}=\"{}\"", escape(v));
        }
        out.push('}');
    }
    out.push(' ');
    out.push_str(&number(value));
    out.push('\n');
}

fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".to_owned()
    } else if v == f64::INFINITY {
        "+Inf".to_owned()
    } else if v == f64::NEG_INFINITY {
        "-Inf".to_owned()
    } else {
        format!("{v}")
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('\n', "\\n")
        .replace('"', "\\\"")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture() -> (prometheus::Registry, Registry, ExemplarHistogram) {
        let classic = prometheus::Registry::new();
        let c = prometheus::IntCounterVec::new(
            prometheus::Opts::new("demo_requests_total", "Requests \"seen\"."),
            &["route"],
        )
        .unwrap();
        classic.register(Box::new(c.clone())).unwrap();
        c.with_label_values(&["a\"b"]).inc_by(3);
        let h = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new("demo_upstream_seconds", "Upstream.")
                .buckets(vec![0.1, 1.0]),
        )
        .unwrap();
        classic.register(Box::new(h.clone())).unwrap();
        h.observe(0.5);
        let mut exemplars = Registry::default();
        fn make() -> ExemplarHistogram {
            ExemplarHistogram::new([0.1, 1.0].into_iter())
        }
        let family = ExemplarFamily::new_with_constructor(make);
        exemplars.register("demo_duration_seconds", "Duration.", family.clone());
        let route = family
            .get_or_create(&vec![("route".to_owned(), "me".to_owned())])
            .clone();
        (classic, exemplars, route)
    }

    #[test]
    fn openmetrics_carries_the_exemplar_and_the_classic_families() {
        let (classic, exemplars, route) = fixture();
        observe(&route, 0.05, Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        observe(&route, 0.5, None);
        let out = render(
            &classic.gather(),
            &exemplars,
            Some("application/openmetrics-text;version=1.0.0"),
        );
        assert!(out.content_type.starts_with("application/openmetrics-text"));
        let body = out.body;
        assert!(body.ends_with("# EOF\n"), "{body}");
        assert!(body.contains("# TYPE demo_requests counter\n"), "{body}");
        assert!(
            body.contains("demo_requests_total{route=\"a\\\"b\"} 3\n"),
            "{body}"
        );
        assert!(
            body.contains("demo_upstream_seconds_bucket{le=\"+Inf\"} 1\n"),
            "{body}"
        );
        let bucket = body
            .lines()
            .find(|l| {
                l.starts_with("demo_duration_seconds_bucket{le=\"0.1\"")
                    || l.starts_with("demo_duration_seconds_bucket{route=\"me\",le=\"0.1\"")
            })
            .unwrap_or_else(|| panic!("{body}"));
        assert!(
            bucket.contains(" # {trace_id=\"4bf92f3577b34da6a3ce929d0e0e4736\"} 0.05"),
            "{bucket}"
        );
    }

    #[test]
    fn the_classic_format_has_the_same_series_and_no_exemplars() {
        let (classic, exemplars, route) = fixture();
        observe(&route, 0.05, Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        let out = render(&classic.gather(), &exemplars, Some("text/plain"));
        assert!(out.content_type.starts_with("text/plain; version=0.0.4"));
        assert!(!out.body.contains("trace_id"), "{}", out.body);
        assert!(!out.body.contains("# EOF"));
        assert!(out.body.contains("# TYPE demo_requests_total counter"));
        assert!(out.body.contains("# TYPE demo_duration_seconds histogram"));
        assert!(
            out.body
                .contains("demo_duration_seconds_count{route=\"me\"} 1"),
            "{}",
            out.body
        );
    }

    #[test]
    fn exemplars_are_cut_after_the_labels_only() {
        assert_eq!(
            without_exemplar("x_bucket{route=\"a # {b}\",le=\"1\"} 2 # {trace_id=\"t\"} 0.5 1.0"),
            "x_bucket{route=\"a # {b}\",le=\"1\"} 2"
        );
        assert_eq!(without_exemplar("x_count 2"), "x_count 2");
        assert_eq!(without_exemplar("# HELP x a # b"), "# HELP x a # b");
    }
}
