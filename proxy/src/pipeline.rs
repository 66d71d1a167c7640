//! The filter pipeline: the `Filter` trait, its `Verdict`, the per-request `RequestCtx`, and
//! `Pipeline`, the one place a filter's verdict becomes a decision.
//!
//! Filters are synchronous and do no I/O; they see plain `http` types, so each is unit-tested as
//! a table of request in, verdict out. A rejection is a value with a bounded `stage` (the filter
//! kind or a core stage) and `reason`; the same pair goes into the 4xx body, the access log and
//! the metric. Shadow mode is handled here once for every policy: a shadowed filter's rejection
//! is recorded as `decision = shadow` and the request goes on.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};

use crate::config::Mode;

/// Why a request is not let through.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The status answered.
    pub status: StatusCode,
    /// The filter kind or core stage that decided (`ip`, `route`, `limits`, `upstream`, …).
    pub stage: &'static str,
    /// The reason, from the stage's bounded set (`denied`, `no_route`, …).
    pub reason: &'static str,
    /// A sentence for the client.
    pub message: Cow<'static, str>,
    /// Extra response headers (`WWW-Authenticate`, `Retry-After`, …).
    pub headers: Vec<(HeaderName, HeaderValue)>,
}

impl Rejection {
    /// A rejection without extra headers.
    pub fn new(
        status: StatusCode,
        stage: &'static str,
        reason: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            stage,
            reason,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    /// The JSON error body: `{"error": reason, "message", "request_id", "stage"}`.
    pub fn body(&self, request_id: &str, trace_id: &str) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({
            "error": self.reason,
            "message": self.message,
            "request_id": request_id,
            "trace_id": trace_id,
            "stage": self.stage,
        }))
        .unwrap_or_default()
    }
}

/// What a filter says about a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Let it through to the next filter.
    Continue,
    /// Stop it here (or, in shadow mode, record that this would have happened).
    Reject(Rejection),
}

/// What was decided about a request, for the access log.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Decision {
    /// Every filter let it through.
    #[default]
    Allow,
    /// A filter (or a core stage) rejected it.
    Reject,
    /// Let through, but a shadow-mode filter would have rejected it.
    Shadow,
}

impl Decision {
    /// The access-log and Loki label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Allow => "allow",
            Decision::Reject => "reject",
            Decision::Shadow => "shadow",
        }
    }
}

/// What the proxy knows about a request while it runs; filters read and extend it.
#[derive(Debug, Clone)]
pub struct RequestCtx {
    /// The request id (the trusted caller's or a new one), echoed on the response.
    pub request_id: String,
    /// The client address after `trusted_proxies`.
    pub client_ip: IpAddr,
    /// Whether the client came over TLS.
    pub tls: bool,
    /// The authenticated caller, set by the `jwt` filter; later filters key on it.
    pub subject: Option<String>,
    /// Headers filters ask the upstream to receive (the caller's identity); set after the
    /// client's own `x-vigil-*` headers are removed.
    pub upstream_headers: Vec<(HeaderName, HeaderValue)>,
    /// Request headers filters keep from the upstream (a bearer token the edge has consumed).
    pub strip_headers: Vec<HeaderName>,
    /// Cookies, by name, filters keep from the upstream (a token cookie); the others go on.
    pub strip_cookies: Vec<String>,
    /// The route's name (a rate-limit key can be per route).
    pub route: Arc<str>,
    /// The rate-limit policy closest to its limit, for the `RateLimit` fields.
    pub ratelimit: Option<crate::filters::rate_limit::Standing>,
    /// The rate-limit policy that limited the request (enforced or shadowed), for the log.
    pub ratelimit_policy: Option<Arc<str>>,
    /// The request body read before the upstream was chosen, when a filter asked for it.
    pub body: Option<bytes::Bytes>,
    /// Whether `body` is only the first part of a longer body.
    pub body_truncated: bool,
    /// What the WAF found, for the log.
    pub waf: Option<Arc<WafOutcome>>,
    /// What was decided.
    pub decision: Decision,
    /// The stage and reason of the rejection (enforced or shadowed) that decided.
    pub stage: Option<&'static str>,
    /// See `stage`.
    pub reason: Option<&'static str>,
    /// The filters that ran, for the trace; `None` unless the request is sampled.
    pub stages: Option<Vec<StageRun>>,
}

/// One filter's run, as the request's trace shows it (an event on the server span).
#[derive(Debug, Clone)]
pub struct StageRun {
    /// `[filters.NAME]`
    pub name: String,
    /// The filter's kind (`ip`, `rate_limit`, `waf`, `jwt`, …).
    pub kind: &'static str,
    /// `allow`, `reject` or `shadow`.
    pub decision: &'static str,
    /// The reason of a rejection (enforced or shadowed).
    pub reason: Option<&'static str>,
    pub at: std::time::SystemTime,
}

impl RequestCtx {
    /// A context for a request from `client_ip`.
    pub fn new(request_id: String, client_ip: IpAddr, tls: bool) -> Self {
        Self {
            request_id,
            client_ip,
            tls,
            subject: None,
            upstream_headers: Vec::new(),
            strip_headers: Vec::new(),
            strip_cookies: Vec::new(),
            route: Arc::from(""),
            ratelimit: None,
            ratelimit_policy: None,
            body: None,
            body_truncated: false,
            waf: None,
            decision: Decision::Allow,
            stage: None,
            reason: None,
            stages: None,
        }
    }

    /// Records an enforced rejection (by a filter or a core stage).
    pub fn reject(&mut self, r: &Rejection) {
        self.decision = Decision::Reject;
        self.stage = Some(r.stage);
        self.reason = Some(r.reason);
    }

    fn shadow(&mut self, r: &Rejection) {
        if self.decision == Decision::Allow {
            self.decision = Decision::Shadow;
            self.stage = Some(r.stage);
            self.reason = Some(r.reason);
        }
    }
}

/// What the WAF found in a request: the rules that matched and the score they add up to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WafOutcome {
    pub rule_ids: Vec<u32>,
    pub score: u32,
}

/// What a body longer than a filter's limit gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OverLimit {
    /// 413, before the upstream sees anything.
    #[default]
    Reject,
    /// The first `limit` bytes are inspected and the whole body is forwarded, when it fits
    /// what the edge can hold back (64 KiB); a longer one is answered 413.
    InspectPrefix,
}

/// A filter's wish to see the body before the upstream is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BodyNeed {
    /// Bytes to read at most.
    pub limit: usize,
    pub over_limit: OverLimit,
}

/// Header changes a filter asks for on the response.
#[derive(Debug, Default)]
pub struct HeaderEdits {
    /// Headers to set, replacing any the upstream sent.
    pub set: Vec<(HeaderName, HeaderValue)>,
}

/// One kind of request policy. Override only the phases the filter uses.
pub trait Filter: Send + Sync {
    /// The filter's kind (`ip`, `jwt`, …): the `stage` of its rejections.
    fn kind(&self) -> &'static str;

    /// Whether the filter needs the body of `req` (up to a limit) in [`RequestCtx::body`]
    /// before its `on_request` runs; the server then reads it before choosing the upstream.
    fn body(&self, _req: &Parts) -> Option<BodyNeed> {
        None
    }

    /// Sees the request head before anything is sent upstream.
    fn on_request(&self, _req: &Parts, _ctx: &mut RequestCtx) -> Verdict {
        Verdict::Continue
    }

    /// Sees each chunk of the request body as it streams through.
    fn on_request_body(&self, _chunk: &[u8], _end: bool, _ctx: &mut RequestCtx) -> Verdict {
        Verdict::Continue
    }

    /// Adds response headers (rate-limit headers, …).
    fn on_response(&self, _status: StatusCode, _ctx: &RequestCtx, _out: &mut HeaderEdits) {}

    /// A filter whose decision needs a round trip (a rate limit shared through Redis) answers
    /// through this instead of [`Filter::on_request`]; the pipeline awaits it in its place among
    /// the stages. Every other filter stays synchronous.
    fn remote(&self) -> Option<&dyn RemoteFilter> {
        None
    }
}

/// The request hook of a filter that must wait for another service, bounded by its own timeout.
#[async_trait::async_trait]
pub trait RemoteFilter: Send + Sync {
    /// Like [`Filter::on_request`], awaited.
    async fn on_request(&self, req: &Parts, ctx: &mut RequestCtx) -> Verdict;
}

/// A filter as a route uses it: its config name, the filter, and whether it is enforced.
#[derive(Clone)]
pub struct Stage {
    /// `[filters.NAME]`
    pub name: String,
    /// The filter.
    pub filter: Arc<dyn Filter>,
    /// Enforce or shadow.
    pub mode: Mode,
}

impl std::fmt::Debug for Stage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stage")
            .field("name", &self.name)
            .field("kind", &self.filter.kind())
            .field("mode", &self.mode)
            .finish()
    }
}

/// The ordered filters of one route.
#[derive(Debug, Clone, Default)]
pub struct Pipeline {
    stages: Vec<Stage>,
}

impl Pipeline {
    /// A pipeline running `stages` in order.
    pub fn new(stages: Vec<Stage>) -> Self {
        Self { stages }
    }

    /// The stages, in order.
    pub fn stages(&self) -> &[Stage] {
        &self.stages
    }

    /// How much of the body the route's filters need before they run: the largest limit, and
    /// `reject` past it if any of them says so.
    pub fn body_need(&self, req: &Parts) -> Option<BodyNeed> {
        self.stages
            .iter()
            .filter_map(|s| s.filter.body(req))
            .reduce(|a, b| BodyNeed {
                limit: a.limit.max(b.limit),
                over_limit: if a.over_limit == OverLimit::Reject
                    || b.over_limit == OverLimit::Reject
                {
                    OverLimit::Reject
                } else {
                    OverLimit::InspectPrefix
                },
            })
    }

    /// Runs every filter's `on_request` in order. The first enforced rejection stops the
    /// pipeline and is returned (and recorded in `ctx`); shadowed ones are recorded and skipped.
    pub async fn on_request(&self, req: &Parts, ctx: &mut RequestCtx) -> Option<Rejection> {
        for s in &self.stages {
            let verdict = match s.filter.remote() {
                Some(remote) => remote.on_request(req, ctx).await,
                None => s.filter.on_request(req, ctx),
            };
            record(s, &verdict, ctx);
            if let Some(r) = settle(s.mode, verdict, ctx) {
                return Some(r);
            }
        }
        None
    }

    /// Runs every filter's `on_request_body` on one chunk, like [`Self::on_request`].
    pub fn on_request_body(
        &self,
        chunk: &[u8],
        end: bool,
        ctx: &mut RequestCtx,
    ) -> Option<Rejection> {
        self.decide(ctx, |f, ctx| f.on_request_body(chunk, end, ctx))
    }

    /// Collects every filter's response headers.
    pub fn on_response(&self, status: StatusCode, ctx: &RequestCtx) -> HeaderEdits {
        let mut out = HeaderEdits::default();
        for s in &self.stages {
            s.filter.on_response(status, ctx, &mut out);
        }
        out
    }

    fn decide(
        &self,
        ctx: &mut RequestCtx,
        mut run: impl FnMut(&dyn Filter, &mut RequestCtx) -> Verdict,
    ) -> Option<Rejection> {
        for s in &self.stages {
            let verdict = run(s.filter.as_ref(), ctx);
            if verdict != Verdict::Continue {
                record(s, &verdict, ctx);
            }
            if let Some(r) = settle(s.mode, verdict, ctx) {
                return Some(r);
            }
        }
        None
    }
}

/// A stage's verdict as a decision: an enforced rejection stops the request; a shadowed one is
/// recorded and the request goes on.
/// Adds a stage's run to a sampled request's trace.
fn record(s: &Stage, verdict: &Verdict, ctx: &mut RequestCtx) {
    let Some(runs) = ctx.stages.as_mut() else {
        return;
    };
    let (decision, reason) = match (verdict, s.mode) {
        (Verdict::Continue, _) => ("allow", None),
        (Verdict::Reject(r), Mode::Enforce) => ("reject", Some(r.reason)),
        (Verdict::Reject(r), Mode::Shadow) => ("shadow", Some(r.reason)),
    };
    runs.push(StageRun {
        name: s.name.clone(),
        kind: s.filter.kind(),
        decision,
        reason,
        at: std::time::SystemTime::now(),
    });
}

fn settle(mode: Mode, verdict: Verdict, ctx: &mut RequestCtx) -> Option<Rejection> {
    let Verdict::Reject(r) = verdict else {
        return None;
    };
    match mode {
        Mode::Enforce => {
            ctx.reject(&r);
            Some(r)
        }
        Mode::Shadow => {
            ctx.shadow(&r);
            None
        }
    }
}

/// The `name=value` pairs of a request's `Cookie` headers, trimmed (HTTP/2 may split them over
/// several headers).
fn cookie_pairs(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b';'))
        .map(<[u8]>::trim_ascii)
        .filter(|pair| !pair.is_empty())
}

/// A `name=value` pair as `(name, value)`; a pair without `=` is no cookie.
fn split_cookie(pair: &[u8]) -> Option<(&[u8], &[u8])> {
    let eq = pair.iter().position(|b| *b == b'=')?;
    Some((&pair[..eq], &pair[eq + 1..]))
}

/// A request's cookies as `(name, value)`.
pub fn cookies(headers: &HeaderMap) -> impl Iterator<Item = (&[u8], &[u8])> {
    cookie_pairs(headers).filter_map(split_cookie)
}

/// The request's cookies as one `Cookie` value, without those named in `names`; `None` when
/// none is left. Every other pair goes on as it came.
pub fn cookies_without(headers: &HeaderMap, names: &[String]) -> Option<HeaderValue> {
    let mut kept = Vec::new();
    for pair in cookie_pairs(headers) {
        let named =
            split_cookie(pair).is_some_and(|(name, _)| names.iter().any(|n| n.as_bytes() == name));
        if named {
            continue;
        }
        if !kept.is_empty() {
            kept.extend_from_slice(b"; ");
        }
        kept.extend_from_slice(pair);
    }
    // Pieces of valid header values joined by "; ": valid whenever there is one.
    HeaderValue::from_bytes(&kept)
        .ok()
        .filter(|_| !kept.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    struct Always(&'static str);
    impl Filter for Always {
        fn kind(&self) -> &'static str {
            "test"
        }
        fn on_request(&self, _: &Parts, _: &mut RequestCtx) -> Verdict {
            Verdict::Reject(Rejection::new(StatusCode::FORBIDDEN, "test", self.0, "no"))
        }
    }

    struct Counts(std::sync::atomic::AtomicUsize);
    impl Filter for Counts {
        fn kind(&self) -> &'static str {
            "count"
        }
        fn on_request(&self, _: &Parts, _: &mut RequestCtx) -> Verdict {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Verdict::Continue
        }
    }

    #[test]
    fn a_named_cookie_is_taken_out_and_the_rest_go_on_as_they_came() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; vigil_token=abc.def"),
        );
        headers.append(
            header::COOKIE,
            HeaderValue::from_static(" lang=en ;flag; x=a=b"),
        );
        let found: Vec<_> = cookies(&headers).collect();
        assert_eq!(
            found,
            [
                (&b"theme"[..], &b"dark"[..]),
                (b"vigil_token", b"abc.def"),
                (b"lang", b"en"),
                (b"x", b"a=b")
            ]
        );
        let names = ["vigil_token".to_owned()];
        assert_eq!(
            cookies_without(&headers, &names).unwrap(),
            "theme=dark; lang=en; flag; x=a=b"
        );
        let only =
            HeaderMap::from_iter([(header::COOKIE, HeaderValue::from_static("vigil_token=t"))]);
        assert_eq!(cookies_without(&only, &names), None);
        assert_eq!(cookies_without(&HeaderMap::new(), &names), None);
    }

    fn stage(name: &str, filter: Arc<dyn Filter>, mode: Mode) -> Stage {
        Stage {
            name: name.into(),
            filter,
            mode,
        }
    }

    fn ctx() -> RequestCtx {
        RequestCtx::new("rid".into(), IpAddr::from([192, 0, 2, 1]), false)
    }

    fn parts() -> Parts {
        http::Request::get("/x").body(()).unwrap().into_parts().0
    }

    #[test]
    fn the_first_enforced_rejection_stops_the_pipeline() {
        let after = Arc::new(Counts(0.into()));
        let p = Pipeline::new(vec![
            stage("a", Arc::new(Always("first")), Mode::Enforce),
            stage("b", after.clone(), Mode::Enforce),
        ]);
        let mut c = ctx();
        let r = block_on(p.on_request(&parts(), &mut c)).unwrap();
        assert_eq!((r.stage, r.reason), ("test", "first"));
        assert_eq!(
            (c.decision, c.stage, c.reason),
            (Decision::Reject, Some("test"), Some("first"))
        );
        assert_eq!(
            after.0.load(std::sync::atomic::Ordering::SeqCst),
            0,
            "later filters do not run"
        );
    }

    #[test]
    fn shadowed_rejections_are_recorded_and_the_request_goes_on() {
        let after = Arc::new(Counts(0.into()));
        let p = Pipeline::new(vec![
            stage("a", Arc::new(Always("would_block")), Mode::Shadow),
            stage("b", Arc::new(Always("second_shadow")), Mode::Shadow),
            stage("c", after.clone(), Mode::Enforce),
        ]);
        let mut c = ctx();
        assert_eq!(block_on(p.on_request(&parts(), &mut c)), None);
        assert_eq!(
            (c.decision, c.reason),
            (Decision::Shadow, Some("would_block")),
            "the first shadow decision is kept"
        );
        assert_eq!(after.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    }

    #[test]
    fn an_enforced_rejection_after_a_shadowed_one_wins() {
        let p = Pipeline::new(vec![
            stage("a", Arc::new(Always("shadowed")), Mode::Shadow),
            stage("b", Arc::new(Always("enforced")), Mode::Enforce),
        ]);
        let mut c = ctx();
        assert_eq!(
            block_on(p.on_request(&parts(), &mut c)).map(|r| r.reason),
            Some("enforced")
        );
        assert_eq!((c.decision, c.reason), (Decision::Reject, Some("enforced")));
    }

    #[test]
    fn the_body_carries_reason_stage_request_and_trace_id() {
        let r = Rejection::new(
            StatusCode::FORBIDDEN,
            "ip",
            "denied",
            "your network is not allowed",
        );
        let v: serde_json::Value =
            serde_json::from_slice(&r.body("abc", "4bf92f3577b34da6a3ce929d0e0e4736")).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"error": "denied", "message": "your network is not allowed", "request_id": "abc", "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "stage": "ip"})
        );
    }
}
