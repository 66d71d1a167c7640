//! `kind = "waf"`: the adapter over the `vigil-waf` engine. It asks the server for the body
//! (read before the upstream is chosen, up to `body_limit`), hands the engine the request as the
//! edge decided it (normalised path, client address), and turns the report into a verdict:
//! 403, `stage = "waf"`, `reason` = the category that alone reached the threshold, or
//! `anomaly_score`. In shadow (`detect`) mode the pipeline lets it through and logs it.

use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::StatusCode;
use http::request::Parts;
use prometheus::{Histogram, IntCounterVec};
use serde::Deserialize;

use crate::config::Mode;
use crate::metrics::Metrics;
use crate::pipeline::{BodyNeed, Filter, OverLimit, Rejection, RequestCtx, Verdict};

/// The most a route may buffer for inspection: Pingora replays at most 64 KiB of a body it
/// has read before the upstream was chosen (`BODY_BUF_LIMIT`).
pub const MAX_BODY_LIMIT: usize = 64 * 1024;

/// `[filters.NAME] kind = "waf"`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WafConfig {
    /// `enforce` (alias `block`) or `shadow` (alias `detect`).
    #[serde(default)]
    pub mode: Mode,
    /// Rules up to this level run (1-4).
    #[serde(default = "default_paranoia")]
    pub paranoia: u8,
    /// The anomaly score that refuses a request.
    #[serde(default = "default_threshold")]
    pub threshold: u32,
    /// Body bytes read and inspected before the upstream sees the request (at most 65536).
    #[serde(default = "default_body_limit")]
    pub body_limit: usize,
    /// A body longer than `body_limit`: `reject` (413) or `inspect_prefix`.
    #[serde(default)]
    pub over_limit: OverLimit,
    /// Media types whose bodies are inspected (`application/json`, `text/*`, `*`); bodies of
    /// other types stream to the upstream uninspected, and so does a body with no type.
    #[serde(default = "default_body_types")]
    pub body_types: Vec<String>,
    /// A folder of rule files (`*.toml`) to load instead of the embedded pack; read again on
    /// every reload.
    pub rules_dir: Option<PathBuf>,
    /// Rules switched off per route, path prefix or target.
    #[serde(default)]
    pub exclusions: Vec<waf::Exclusion>,
    /// Bounds on one inspection.
    #[serde(default)]
    pub limits: waf::Limits,
    /// The methods the route takes; any other is answered 405 (case matters: `get` is not GET).
    #[serde(default = "default_methods")]
    pub methods: Vec<String>,
}

fn default_methods() -> Vec<String> {
    ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
        .map(String::from)
        .to_vec()
}

fn default_paranoia() -> u8 {
    1
}
fn default_threshold() -> u32 {
    5
}
fn default_body_limit() -> usize {
    MAX_BODY_LIMIT
}
fn default_body_types() -> Vec<String> {
    [
        "application/x-www-form-urlencoded",
        "multipart/form-data",
        "application/json",
        "application/*+json",
        "application/xml",
        "text/*",
    ]
    .map(String::from)
    .to_vec()
}

/// The embedded pack, parsed once per process.
fn embedded() -> Result<&'static waf::Pack, String> {
    static PACK: OnceLock<Result<waf::Pack, String>> = OnceLock::new();
    PACK.get_or_init(|| waf::Pack::embedded().map_err(|e| e.to_string()))
        .as_ref()
        .map_err(Clone::clone)
}

/// The rule files of `dir`, read now.
pub fn load_dir(dir: &std::path::Path) -> Result<waf::Pack, String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.map_err(|e| format!("{}: {e}", dir.display()))?.path();
        if path.extension().is_some_and(|x| x == "toml") {
            let text =
                std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            files.push((path.display().to_string(), text));
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(format!("{}: no rule files (*.toml)", dir.display()));
    }
    waf::Pack::from_sources(files).map_err(|e| e.to_string())
}

/// A running `waf` filter.
pub struct WafFilter {
    engine: waf::Engine,
    need: BodyNeed,
    body_types: Vec<String>,
    methods: Vec<String>,
    /// `Allow: GET, HEAD, ...` for the 405.
    allow: http::HeaderValue,
    mode: &'static str,
    matches: IntCounterVec,
    duration: Histogram,
}

impl WafFilter {
    /// The filter for `config`; errors are `(key, message)`.
    pub fn new(config: &WafConfig, metrics: &Metrics) -> Result<Self, Vec<(String, String)>> {
        let mut errors = Vec::new();
        if config.body_limit == 0 || config.body_limit > MAX_BODY_LIMIT {
            errors.push((
                "body_limit".into(),
                format!(
                    "is {}: it must be 1 to {MAX_BODY_LIMIT} (what the edge can hold back from the upstream)",
                    config.body_limit
                ),
            ));
        }
        let allow = http::HeaderValue::from_str(&config.methods.join(", "));
        if config.methods.is_empty() || allow.is_err() {
            errors.push((
                "methods".into(),
                "name at least one method, each an HTTP token".into(),
            ));
        }
        let loaded = match &config.rules_dir {
            Some(dir) => load_dir(dir).map(std::borrow::Cow::Owned),
            None => embedded().map(std::borrow::Cow::Borrowed),
        };
        let pack = match loaded {
            Ok(p) => Some(p),
            Err(e) => {
                errors.push(("rules_dir".into(), e));
                None
            }
        };
        let settings = waf::Settings {
            paranoia: config.paranoia,
            threshold: config.threshold,
            exclusions: config.exclusions.clone(),
            limits: config.limits.clone(),
        };
        let engine = pack.and_then(|p| match waf::Engine::new(&p, settings) {
            Ok(e) => Some(e),
            Err(e) => {
                for msg in e.0 {
                    let key = if msg.starts_with("exclusions") {
                        "exclusions"
                    } else if msg.starts_with("paranoia") {
                        "paranoia"
                    } else {
                        "threshold"
                    };
                    errors.push((key.into(), msg));
                }
                None
            }
        });
        match engine {
            Some(engine) if errors.is_empty() => Ok(Self {
                engine,
                need: BodyNeed {
                    limit: config.body_limit,
                    over_limit: config.over_limit,
                },
                body_types: config
                    .body_types
                    .iter()
                    .map(|t| t.to_ascii_lowercase())
                    .collect(),
                methods: config.methods.clone(),
                allow: allow.unwrap_or(http::HeaderValue::from_static("GET")),
                mode: if config.mode == Mode::Shadow {
                    "detect"
                } else {
                    "block"
                },
                matches: metrics.waf_rule_matches.clone(),
                duration: metrics.waf_inspection_duration.clone(),
            }),
            _ => Err(errors),
        }
    }

    /// The engine, for explanations (`vigil waf test`).
    pub fn engine(&self) -> &waf::Engine {
        &self.engine
    }

    /// `block` or `detect`.
    pub fn mode(&self) -> &'static str {
        self.mode
    }

    /// Whether the body of `req` is one this filter inspects (by its media type).
    pub fn inspects_type(&self, req: &Parts) -> bool {
        let Some(ctype) = req
            .headers
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
        else {
            return false;
        };
        let essence = ctype
            .split(';')
            .next()
            .unwrap_or("")
            .trim()
            .to_ascii_lowercase();
        self.body_types.iter().any(|t| type_matches(t, &essence))
    }
}

/// `pattern` (`*`, `text/*`, `application/*+json`, `application/json`) against a media type.
fn type_matches(pattern: &str, essence: &str) -> bool {
    if pattern == "*" || pattern == essence {
        return true;
    }
    match pattern.split_once('*') {
        Some((head, tail)) => {
            essence.len() >= head.len() + tail.len()
                && essence.starts_with(head)
                && essence.ends_with(tail)
        }
        None => false,
    }
}

impl Filter for WafFilter {
    fn kind(&self) -> &'static str {
        "waf"
    }

    fn body(&self, req: &Parts) -> Option<BodyNeed> {
        self.inspects_type(req).then_some(self.need)
    }

    fn on_request(&self, req: &Parts, ctx: &mut RequestCtx) -> Verdict {
        if !self.methods.iter().any(|m| m == req.method.as_str()) {
            let mut r = Rejection::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "waf",
                "method_not_allowed",
                "this route does not take that method",
            );
            r.headers.push((http::header::ALLOW, self.allow.clone()));
            return Verdict::Reject(r);
        }
        let started = Instant::now();
        let mut headers: Vec<(&str, &[u8])> = req
            .headers
            .iter()
            .map(|(n, v)| (n.as_str(), v.as_bytes()))
            .collect();
        // HTTP/2 carries the host as `:authority`, which `http` keeps in the URI.
        if !req.headers.contains_key(http::header::HOST)
            && let Some(authority) = req.uri.authority()
        {
            headers.push(("host", authority.as_str().as_bytes()));
        }
        let uri = req
            .uri
            .path_and_query()
            .map_or(req.uri.path(), |pq| pq.as_str());
        let body = ctx.body.as_deref().filter(|_| self.inspects_type(req));
        let report = self.engine.inspect(&waf::Request {
            method: req.method.as_str(),
            path: req.uri.path(),
            uri: uri.as_bytes(),
            query: req.uri.query().unwrap_or("").as_bytes(),
            headers,
            body: body.unwrap_or_default(),
            body_truncated: ctx.body_truncated,
            client_ip: Some(ctx.client_ip),
        });
        self.duration.observe(started.elapsed().as_secs_f64());
        let mut ids = itoa::Buffer::new();
        for m in &report.matches {
            self.matches
                .with_label_values(&[ids.format(m.rule), m.category.name(), self.mode])
                .inc();
        }
        let blocked = report.blocked();
        if !report.matches.is_empty() {
            // The explanation `vigil waf test` prints, in short: what detect mode leaves to read.
            let found: Vec<String> = report
                .matches
                .iter()
                .map(|m| format!("{}@{}", m.rule, m.target))
                .collect();
            tracing::info!(
                target: "waf",
                request_id = %ctx.request_id,
                route = %ctx.route,
                mode = self.mode,
                score = report.score,
                threshold = report.threshold,
                verdict = blocked.unwrap_or("pass"),
                matches = %found.join(","),
                "waf matches"
            );
        }
        ctx.waf = Some(Arc::new(crate::pipeline::WafOutcome {
            rule_ids: report.rule_ids(),
            score: report.score,
        }));
        match blocked {
            None => Verdict::Continue,
            Some(reason) => Verdict::Reject(Rejection::new(
                StatusCode::FORBIDDEN,
                "waf",
                reason,
                "the request looks like an attack and was refused",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filter(toml: &str) -> Result<WafFilter, Vec<(String, String)>> {
        let c: WafConfig = toml::from_str(toml).expect("config");
        WafFilter::new(&c, &Metrics::new())
    }

    fn run(f: &WafFilter, uri: &str, body: Option<(&str, &str)>) -> (Verdict, RequestCtx) {
        let mut b = http::Request::builder().method("POST").uri(uri);
        if uri.starts_with('/') {
            b = b.header("host", "example.com");
        }
        if let Some((ctype, _)) = body {
            b = b.header("content-type", ctype);
        }
        let (parts, ()) = b.body(()).expect("request").into_parts();
        let mut ctx = RequestCtx::new("r".into(), "192.0.2.1".parse().expect("ip"), false);
        ctx.body = body.map(|(_, b)| bytes::Bytes::copy_from_slice(b.as_bytes()));
        (f.on_request(&parts, &mut ctx), ctx)
    }

    #[test]
    fn attacks_are_refused_by_category_and_benign_requests_pass() {
        let f = filter("").expect("filter");
        let (v, ctx) = run(&f, "/search?q=1%27%20or%20%271%27%3D%271", None);
        let Verdict::Reject(r) = v else {
            panic!("not refused")
        };
        assert_eq!(
            (r.status, r.stage, r.reason),
            (StatusCode::FORBIDDEN, "waf", "sqli")
        );
        assert!(ctx.waf.expect("outcome").rule_ids.contains(&942100));
        let body = r#"{"title":"Notes","content":"Email me at a.b@example.com, see https://example.com/docs?id=3 and `ls -la` in *Markdown*."}"#;
        let (v, _) = run(&f, "/content", Some(("application/json", body)));
        assert_eq!(v, Verdict::Continue);
        let (v, _) = run(
            &f,
            "/content",
            Some(("application/json", r#"{"x":"<script>alert(1)</script>"}"#)),
        );
        assert!(matches!(v, Verdict::Reject(r) if r.reason == "xss"));
        // Methods outside the route's list get 405 and `Allow`; case matters.
        for method in ["TRACE", "get"] {
            let (parts, ()) = http::Request::builder()
                .method(method)
                .uri("/")
                .header("host", "h")
                .body(())
                .expect("request")
                .into_parts();
            let mut ctx = RequestCtx::new("r".into(), "192.0.2.1".parse().expect("ip"), false);
            let Verdict::Reject(r) = f.on_request(&parts, &mut ctx) else {
                panic!("{method} let through")
            };
            assert_eq!(
                (r.status, r.reason),
                (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed")
            );
            assert_eq!(
                r.headers[0].1,
                "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"
            );
        }
        // HTTP/2: no Host header, the authority is in the URI; that is no missing Host.
        let (v, _) = run(&f, "https://example.com/a?b=c", None);
        assert_eq!(v, Verdict::Continue);
        // A type the route does not inspect is not read as a body at all.
        let (v, _) = run(
            &f,
            "/upload",
            Some(("image/png", "<script>alert(1)</script>")),
        );
        assert_eq!(v, Verdict::Continue);
    }

    #[test]
    fn exclusions_switch_rules_off_for_a_target_under_a_prefix() {
        let f = filter(
            r#"
[[exclusions]]
path_prefix = "/content"
categories = ["xss"]
targets = ["json:body.content"]
"#,
        )
        .expect("filter");
        let xss = r#"{"content":"<script>alert(1)</script>"}"#;
        assert_eq!(
            run(&f, "/content", Some(("application/json", xss))).0,
            Verdict::Continue
        );
        assert!(matches!(
            run(&f, "/other", Some(("application/json", xss))).0,
            Verdict::Reject(_)
        ));
        let title = r#"{"title":"<script>alert(1)</script>"}"#;
        assert!(matches!(
            run(&f, "/content", Some(("application/json", title))).0,
            Verdict::Reject(_)
        ));
    }

    #[test]
    fn bad_settings_are_errors_with_their_key() {
        let keys = |toml: &str| -> Vec<String> {
            filter(toml)
                .err()
                .expect("an error")
                .into_iter()
                .map(|(k, _)| k)
                .collect()
        };
        assert_eq!(keys("body_limit = 100000"), ["body_limit"]);
        assert_eq!(keys("paranoia = 9"), ["paranoia"]);
        assert_eq!(keys("[[exclusions]]\nrules = [1]"), ["exclusions"]);
        assert_eq!(keys("rules_dir = \"/nonexistent\""), ["rules_dir"]);
        assert_eq!(keys("methods = []"), ["methods"]);
        assert!(toml::from_str::<WafConfig>("bogus = 1").is_err());
        assert!(type_matches(
            "application/*+json",
            "application/vnd.api+json"
        ));
        assert!(!type_matches("text/*", "application/json"));
    }
}
