//! `impl ProxyHttp`: the only code that touches pingora's `Session`.
//!
//! Phases, in order: `request_filter` (client identity, request id, protocol and size limits,
//! route, the route's pipeline) → `upstream_peer` (round-robin over the healthy peers) →
//! `upstream_request_filter` (forwarded headers, identity headers stripped, request id) →
//! `response_filter` (security headers, request id) → `logging` (one access-log line, metrics).
//! Every answer the proxy gives itself goes through [`Edge::respond`]: the JSON error body with
//! its stage and reason, recorded in the context for the log line and the metric.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderName, HeaderValue, StatusCode, header};
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::modules::http::compression::ResponseCompression;

use pingora::prelude::HttpPeer;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};
use pingora::{Error, ErrorSource, ErrorType, Result};

use crate::Built;
use crate::guard::HeaderDeadline;
use crate::metrics::{Metrics, method_label, status_class};
use crate::pipeline::{BodyNeed, Decision, OverLimit, Rejection, RequestCtx};
use crate::routing::{RouteEntry, normalize_host};

/// The proxy: the current config (swapped whole on reload), the pools and the metrics.
pub struct Edge {
    /// The config in force (routes, filters, pools); each request takes one snapshot.
    pub built: Arc<ArcSwap<Built>>,
    /// Metric families.
    pub metrics: Metrics,
    /// Whether this service is the TLS listener (`X-Forwarded-Proto`, HSTS).
    pub tls: bool,
    /// Where access-log lines go.
    pub access_log: crate::access_log::Sink,
    /// Trace contexts and, when `[tracing]` exports, the spans.
    pub tracing: Arc<crate::trace::Tracing>,
}

/// Per-request state.
pub struct Ctx {
    started: Instant,
    built: Arc<Built>,
    req: RequestCtx,
    route: Option<Arc<RouteEntry>>,
    host: Option<String>,
    upstream_started: Option<Instant>,
    upstream_ms: Option<f64>,
    origin: Option<String>,
    peer: Option<pingora::lb::Backend>,
    retried: bool,
    pending: Option<Rejection>,
    body_bytes: u64,
    in_flight: bool,
    /// `req.client_ip` as text (for `X-Forwarded-For` and the access log), made once.
    client_ip_text: String,
    /// The socket peer, when it is a trusted proxy, and the trusted proxies between it and the
    /// client: with the client, the `X-Forwarded-For` the upstream gets.
    forwarded_via: Option<(IpAddr, Vec<IpAddr>)>,
    /// `req.request_id` as a header value (upstream and response), made once.
    request_id: HeaderValue,
    /// The request's trace (set in `request_filter`), its id as the log and bodies write it,
    /// and the edge's span for the upstream call (named in the upstream's `traceparent`).
    trace: Option<telemetry::TraceContext>,
    trace_id: String,
    upstream_span: Option<opentelemetry::trace::SpanId>,
    upstream_ended: Option<Instant>,
    upstream_status: u16,
}

/// Whether a client's header `name` (lower case) is one the edge sets or speaks for: the
/// caller's identity (`x-vigil-*`), the forwarding headers and the request id. `_` counts as
/// `-`, since CGI-style upstreams read `x_vigil_subject` as `HTTP_X_VIGIL_SUBJECT` too.
fn edge_owned(name: &str) -> bool {
    let same = |a: &[u8], b: &[u8]| {
        a.len() == b.len()
            && a.iter()
                .zip(b)
                .all(|(x, y)| x == y || (*x == b'_' && *y == b'-'))
    };
    let n = name.as_bytes();
    let starts = |p: &[u8]| n.len() >= p.len() && same(&n[..p.len()], p);
    starts(b"x-vigil-")
        || starts(b"x-forwarded-")
        || same(n, b"x-real-ip")
        || same(n, b"forwarded")
        || same(n, b"x-request-id")
        || same(n, b"traceparent")
        || same(n, b"tracestate")
}

// Header names looked up on every request, parsed once.
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

impl Edge {
    /// Writes the JSON error for `r`, records it in the context, and returns `Ok(true)` (the
    /// request is answered).
    async fn respond(&self, session: &mut Session, ctx: &mut Ctx, r: Rejection) -> Result<bool> {
        ctx.req.reject(&r);
        // A body the edge did not read is not drained for the next request: the connection
        // closes after the answer (as nginx does), and its bytes never pose as a next header.
        if !session.is_body_done() {
            session.set_keepalive(None);
        }
        let body = Bytes::from(r.body(&ctx.req.request_id, &ctx.trace_id));
        answer(session, ctx, r.status, &r.headers, Some(body)).await
    }

    /// Gives the request its trace: the caller's `traceparent` when `trusted`, else a new one.
    fn begin_trace(&self, ctx: &mut Ctx, req: &RequestHeader, trusted: bool) {
        let header = |name: &HeaderName| req.headers.get(name).and_then(|v| v.to_str().ok());
        let trace = self
            .tracing
            .begin(header(&TRACEPARENT), header(&TRACESTATE), trusted);
        ctx.trace_id = trace.trace_id_hex();
        ctx.req.stages = self.tracing.records(&trace).then(Vec::new);
        ctx.trace = Some(trace);
    }

    fn trusted(&self, built: &Built, ip: IpAddr) -> bool {
        built
            .config
            .listen
            .trusted_proxies
            .iter()
            .any(|n| n.contains(&ip.to_canonical()))
    }
}

/// Edits the headers of the request to the upstream in place. Pingora's `RequestHeader` keeps a
/// case-preserving name map beside its `HeaderMap`, cannot reserve room ahead, and parses the
/// name on every edit, writing both maps: about 1.2k instructions per header (callgrind). The
/// edge takes the parts out instead, edits the `HeaderMap` with names parsed once and room for
/// `extra` more headers, and puts them back without the case map: names then go on the wire in
/// lower case, as HTTP/2 sends them (HTTP field names are case-insensitive, RFC 9110 §5.1).
/// The request target and the HTTP/2 end-of-stream flag are kept as they were.
fn edit_request(
    up: &mut RequestHeader,
    extra: usize,
    edit: impl FnOnce(&mut http::HeaderMap) -> Result<()>,
) -> Result<()> {
    // The target as a header rebuilt from the URI would send it (pingora's `raw_path`); an
    // absolute-form target differs and is set again.
    let from_uri = up
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .or_else(|| up.uri.authority().map(|a| a.as_str()))
        .unwrap_or_default();
    let raw = (up.raw_path() != from_uri.as_bytes()).then(|| up.raw_path().to_vec());
    let end_stream = up.send_end_stream();
    let mut parts: http::request::Parts = std::mem::replace(
        up,
        RequestHeader::from(http::Request::new(()).into_parts().0),
    )
    .into();
    parts.headers.reserve(extra);
    let edited = edit(&mut parts.headers);
    *up = RequestHeader::from(parts);
    if let Some(raw) = raw {
        up.set_raw_path(&raw)?;
    }
    if let Some(end_stream) = end_stream {
        up.set_send_end_stream(end_stream);
    }
    edited
}

/// [`edit_request`] for the response to the client; a reason phrase of the upstream's own is
/// kept.
fn edit_response(
    resp: &mut ResponseHeader,
    extra: usize,
    edit: impl FnOnce(&mut http::HeaderMap),
) -> Result<()> {
    let reason = resp
        .get_reason_phrase()
        .filter(|r| Some(*r) != resp.status.canonical_reason())
        .map(str::to_owned);
    let mut parts: http::response::Parts = std::mem::replace(
        resp,
        ResponseHeader::from(http::Response::new(()).into_parts().0),
    )
    .into();
    parts.headers.reserve(extra);
    edit(&mut parts.headers);
    *resp = ResponseHeader::from(parts);
    resp.set_reason_phrase(reason.as_deref())
}

/// A header value the edge composed (a host, an address list); bytes a header cannot carry are
/// an error for the request, never a panic.
fn header_value(v: impl TryInto<HeaderValue>) -> Result<HeaderValue> {
    v.try_into()
        .map_err(|_| Error::explain(ErrorType::InvalidHTTPHeader, "invalid header value"))
}

/// Writes an answer of the proxy's own: status, the request id, `headers`, and a JSON body.
async fn answer(
    session: &mut Session,
    ctx: &Ctx,
    status: StatusCode,
    headers: &[(HeaderName, HeaderValue)],
    body: Option<Bytes>,
) -> Result<bool> {
    // The edge's own answers carry the security headers of the route (or the defaults, before
    // a route is known) like proxied ones: HSTS over HTTPS, nosniff, framing, referrer policy.
    let (security, hsts) = match ctx.route.as_deref() {
        Some(r) => (r.security_headers.as_slice(), r.hsts.as_ref()),
        None => {
            let (security, hsts) = crate::routing::default_security_headers();
            (security.as_slice(), hsts.as_ref())
        }
    };
    let mut resp = ResponseHeader::build(status, Some(6 + headers.len() + security.len()))?;
    resp.insert_header("x-request-id", ctx.request_id.clone())?;
    for (k, v) in security {
        resp.insert_header(k.clone(), v.clone())?;
    }
    if ctx.req.tls
        && let Some(hsts) = hsts
    {
        resp.insert_header(header::STRICT_TRANSPORT_SECURITY, hsts.clone())?;
    }
    for (k, v) in headers {
        resp.insert_header(k.clone(), v.clone())?;
    }
    if body.is_some() {
        resp.insert_header(header::CONTENT_TYPE, "application/json")?;
    }
    resp.insert_header(
        header::CONTENT_LENGTH,
        body.as_ref().map_or(0, Bytes::len).to_string(),
    )?;
    session
        .write_response_header(Box::new(resp), body.is_none())
        .await?;
    if let Some(body) = body {
        session.write_response_body(Some(body), true).await?;
    }
    Ok(true)
}

/// A request id unique in this process and, with its random per-process prefix, across
/// instances: 32 hex characters, no system call (a UUID v4 would ask the kernel for randomness on
/// every request).
fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static PREFIX: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| uuid::Uuid::new_v4().as_u64_pair().0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = String::with_capacity(32);
    for v in [prefix, n] {
        for shift in (0..16).rev() {
            id.push(char::from(HEX[((v >> (shift * 4)) & 0xf) as usize]));
        }
    }
    id
}

/// An address as text, without `fmt`'s machinery for the common IPv4 case.
pub fn ip_text(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => {
            let mut out = String::with_capacity(15);
            let mut digits = itoa::Buffer::new();
            for (i, octet) in v4.octets().into_iter().enumerate() {
                if i > 0 {
                    out.push('.');
                }
                out.push_str(digits.format(octet));
            }
            out
        }
        IpAddr::V6(_) => ip.to_string(),
    }
}

fn valid_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// The request's host: the `:authority` (h2, absolute form) or the `Host` header, normalized.
fn request_host(req: &RequestHeader) -> Option<String> {
    req.uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| req.headers.get(header::HOST).and_then(|h| h.to_str().ok()))
        .map(|h| normalize_host(h).into_owned())
}

/// Replaces the request's path with `path`, keeping the query and, for an absolute target
/// (HTTP/2, absolute-form), the scheme and authority; `None` when the result is no URI.
fn set_path(req: &mut RequestHeader, path: String) -> Option<()> {
    let target = match req.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = req.uri.clone().into_parts();
    parts.path_and_query = Some(http::uri::PathAndQuery::try_from(target).ok()?);
    req.set_uri(http::Uri::from_parts(parts).ok()?);
    Some(())
}

/// Whether a response's `Vary` already covers `Origin` (or everything, `*`).
fn varies_on_origin(headers: &http::HeaderMap) -> bool {
    headers
        .get_all(header::VARY)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .any(|t| t.eq_ignore_ascii_case(b"origin") || t == b"*")
}

/// What Pingora's parser lets through that an edge must not forward: a request target with
/// white space or control bytes, an HTTP/1.1 request without `Host`, and a transfer coding
/// other than `chunked` (the upstream might frame it otherwise). Pingora itself already refuses
/// duplicate or unparsable `Content-Length`, bad header names, obs-fold and NULs, and answers a
/// `Content-Length` beside `Transfer-Encoding` by dropping the length (RFC 9112 §6.3) and
/// closing the connection after the request (ARCHITECTURE.md, protocol enforcement).
fn framing_violation(req: &RequestHeader) -> Option<Rejection> {
    let refuse = |reason, message| {
        Some(Rejection::new(
            StatusCode::BAD_REQUEST,
            "protocol",
            reason,
            message,
        ))
    };
    if req.raw_path().iter().any(|&b| b <= b' ' || b == 0x7f) {
        return refuse(
            "invalid_request_target",
            "the request target holds white space or a control byte",
        );
    }
    if req.version == http::Version::HTTP_11 && !req.headers.contains_key(header::HOST) {
        return refuse("missing_host", "an HTTP/1.1 request needs a Host header");
    }
    let te: Vec<&[u8]> = req
        .headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
        .collect();
    let only_chunked = matches!(te.as_slice(), [one] if one.eq_ignore_ascii_case(b"chunked"));
    if !te.is_empty() && !only_chunked {
        return refuse(
            "unsupported_transfer_encoding",
            "the only transfer coding the edge takes is chunked",
        );
    }
    None
}

/// Whether the request's `Connection` header is one Pingora's sanitiser accepts (it refuses the
/// request otherwise, after the upstream is chosen, as an error of the edge's): fewer than 10
/// options, each an HTTP token (RFC 9110 §5.6.2), none naming a header the edge sets itself.
fn connection_header_ok(headers: &http::HeaderMap) -> bool {
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    let mut options = 0;
    for token in headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| !t.is_empty())
    {
        options += 1;
        let protected = [
            &b"host"[..],
            b"x-forwarded-for",
            b"x-forwarded-host",
            b"x-forwarded-proto",
        ]
        .iter()
        .any(|p| token.eq_ignore_ascii_case(p));
        if options >= 10 || protected || !token.iter().all(tchar) {
            return false;
        }
    }
    true
}

fn header_size(req: &RequestHeader) -> usize {
    req.raw_path().len()
        + req
            .headers
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len() + 4)
            .sum::<usize>()
}

#[async_trait]
impl ProxyHttp for Edge {
    type CTX = Ctx;

    fn new_ctx(&self) -> Ctx {
        Ctx {
            started: Instant::now(),
            built: self.built.load_full(),
            req: RequestCtx::new(String::new(), IpAddr::from([0, 0, 0, 0]), self.tls),
            route: None,
            host: None,
            upstream_started: None,
            upstream_ms: None,
            origin: None,
            peer: None,
            retried: false,
            pending: None,
            body_bytes: 0,
            in_flight: false,
            client_ip_text: String::new(),
            forwarded_via: None,
            request_id: HeaderValue::from_static(""),
            trace: None,
            trace_id: String::new(),
            upstream_span: None,
            upstream_ended: None,
            upstream_status: 0,
        }
    }

    /// `new_ctx` runs once the request head is read: `ctx.started` and the config snapshot
    /// `ctx.built` are already this request's.
    async fn request_filter(&self, session: &mut Session, ctx: &mut Ctx) -> Result<bool> {
        // The header is parsed: its deadline stops (HTTP/1.1; h2 connections track their own).
        if let Some(guard) = HeaderDeadline::of(session.stream()) {
            guard.mark_header_read();
        }
        self.metrics.requests_in_flight.inc();
        ctx.in_flight = true;
        let built = ctx.built.clone();
        let limits = &built.config.limits;
        session.set_keepalive(Some(limits.keepalive_timeout_secs));

        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map_or(IpAddr::from([0, 0, 0, 0]), |a| a.ip());
        let peer_trusted = self.trusted(&built, peer);
        let req = session.req_header();
        let chain = crate::forwarded::client(
            peer,
            &req.headers,
            built.config.listen.forwarded_header,
            |ip| self.trusted(&built, ip),
        );
        ctx.req.client_ip = chain.client;
        ctx.client_ip_text = ip_text(ctx.req.client_ip);
        ctx.forwarded_via = peer_trusted.then_some((peer, chain.proxies));
        ctx.req.request_id = req
            .headers
            .get(&X_REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .filter(|v| peer_trusted && valid_request_id(v))
            .map_or_else(new_request_id, str::to_owned);
        // Ids are checked or made of [A-Za-z0-9._-]: always a valid header value.
        ctx.request_id = HeaderValue::from_str(&ctx.req.request_id)
            .unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        self.begin_trace(ctx, req, peer_trusted);
        ctx.host = request_host(req);

        if !req.raw_path_is_utf8() {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                "protocol",
                "invalid_path",
                "the request path is not valid UTF-8",
            );
            return self.respond(session, ctx, r).await;
        }
        if let Some(r) = framing_violation(req) {
            return self.respond(session, ctx, r).await;
        }
        if !connection_header_ok(&req.headers) {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                "request",
                "bad_connection_header",
                "the Connection header names too many options, or one the edge sets itself",
            );
            return self.respond(session, ctx, r).await;
        }
        // The one path routing, filters, the log and the upstream see.
        let Ok(path) = crate::path::normalize(req.uri.path()) else {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                "protocol",
                "invalid_path",
                "the request path has a broken percent-escape",
            );
            return self.respond(session, ctx, r).await;
        };
        let encoded_separator = path.encoded_separator;
        if let std::borrow::Cow::Owned(path) = path.path
            && set_path(session.req_header_mut(), path).is_none()
        {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                "protocol",
                "invalid_path",
                "the request path cannot be normalised",
            );
            return self.respond(session, ctx, r).await;
        }
        let req = session.req_header();
        if req.headers.len() > limits.max_headers || header_size(req) > limits.max_header_bytes {
            let r = Rejection::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                "limits",
                "header_too_large",
                "the request header is larger than allowed",
            );
            return self.respond(session, ctx, r).await;
        }
        let Some(route) = built
            .routes
            .find(ctx.host.as_deref(), req.uri.path())
            .cloned()
        else {
            let r = Rejection::new(
                StatusCode::NOT_FOUND,
                "route",
                "no_route",
                "no route matches this request",
            );
            return self.respond(session, ctx, r).await;
        };
        ctx.route = Some(route.clone());
        ctx.req.route = route.name.clone();
        if route.trust_traceparent && !peer_trusted {
            self.begin_trace(ctx, req, true);
        }
        if encoded_separator && route.encoded_separators == crate::config::EncodedSeparators::Reject
        {
            let r = Rejection::new(
                StatusCode::BAD_REQUEST,
                "protocol",
                "encoded_separator",
                "the request path holds an encoded /, \\ or NUL, which this route refuses",
            );
            return self.respond(session, ctx, r).await;
        }
        let declared = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|n| n > route.max_body_bytes) {
            return self.respond(session, ctx, body_too_large()).await;
        }
        if let Some(cors) = &route.cors {
            ctx.origin = req
                .headers
                .get(header::ORIGIN)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            match crate::cors::preflight(cors, req) {
                crate::cors::Preflight::No => {}
                crate::cors::Preflight::Allow(headers) => {
                    return answer(session, ctx, StatusCode::NO_CONTENT, &headers, None).await;
                }
                crate::cors::Preflight::Reject(r) => return self.respond(session, ctx, r).await,
            }
        }
        if let Some(need) = route.pipeline.body_need(req)
            && let Err(r) = read_body(session, need, declared, &mut ctx.req).await
        {
            return self.respond(session, ctx, r).await;
        }
        let req = session.req_header();
        if let Some(r) = route.pipeline.on_request(req, &mut ctx.req).await {
            return self.respond(session, ctx, r).await;
        }
        if let Some(level) = route.compression_level {
            // The module read Accept-Encoding while it was still off (level 0), before this
            // filter ran: turn it on and let it read the header again.
            let req = session.req_header().clone();
            if let Some(c) = session
                .downstream_modules_ctx
                .get_mut::<ResponseCompression>()
            {
                c.adjust_level(level);
                c.request_filter(&req);
            }
        }
        Ok(false)
    }

    async fn request_body_filter(
        &self,
        _session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let Some(route) = ctx.route.clone() else {
            return Ok(());
        };
        if let Some(r) = past_deadline(ctx, StatusCode::REQUEST_TIMEOUT) {
            return defer(ctx, r);
        }
        let chunk = body.as_deref().unwrap_or_default();
        ctx.body_bytes += chunk.len() as u64;
        if ctx.body_bytes > route.max_body_bytes {
            return defer(ctx, body_too_large());
        }
        if let Some(r) = route
            .pipeline
            .on_request_body(chunk, end_of_stream, &mut ctx.req)
        {
            return defer(ctx, r);
        }
        Ok(())
    }

    async fn upstream_peer(&self, _session: &mut Session, ctx: &mut Ctx) -> Result<Box<HttpPeer>> {
        let route = ctx
            .route
            .clone()
            .ok_or_else(|| Error::explain(ErrorType::InternalError, "no route"))?;
        let pool = ctx.built.pools.get(&route.upstream).ok_or_else(|| {
            Error::explain(ErrorType::InternalError, "route names an unknown upstream")
        })?;
        let Some(backend) = pool.lb.select(b"", 256) else {
            let r = Rejection::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "upstream",
                "no_healthy_upstream",
                "no healthy upstream can serve this request",
            );
            return defer(ctx, r);
        };
        ctx.peer = Some(backend.clone());
        ctx.upstream_span.get_or_insert_with(telemetry::new_span_id);
        let mut peer = HttpPeer::new(backend, false, String::new());
        peer.options.connection_timeout = Some(pool.connect_timeout);
        // The upstream gets what is left of the request's total time, at most its own timeouts.
        let left = Duration::from_millis(ctx.built.config.limits.request_timeout_ms)
            .saturating_sub(ctx.started.elapsed());
        peer.options.read_timeout = Some(pool.read_timeout.min(left));
        peer.options.write_timeout = Some(pool.write_timeout.min(left));
        ctx.upstream_started = Some(Instant::now());
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut Ctx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        // Passive ejection: a peer that refuses connections leaves the rotation for a while.
        if let (Some(peer), Some(route)) = (ctx.peer.take(), &ctx.route)
            && let Some(pool) = ctx.built.pools.get(&route.upstream)
        {
            pool.eject(&peer);
        }
        // One retry, on the next peer, for methods that are safe to repeat.
        let idempotent = matches!(
            session.req_header().method.as_str(),
            "GET" | "HEAD" | "OPTIONS" | "PUT" | "DELETE"
        );
        e.set_retry(idempotent && !ctx.retried);
        ctx.retried = true;
        e
    }

    async fn upstream_request_filter(
        &self,
        _session: &mut Session,
        up: &mut RequestHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let extra = 4 + ctx.req.upstream_headers.len();
        edit_request(up, extra, |headers| {
            // Headers the edge speaks for are the edge's alone, in any spelling.
            let owned: Vec<_> = headers
                .keys()
                .filter(|k| edge_owned(k.as_str()))
                .cloned()
                .collect();
            for name in owned {
                headers.remove(name);
            }
            let forwarded_for = match &ctx.forwarded_via {
                Some((peer, proxies)) => {
                    let mut list = ctx.client_ip_text.clone();
                    for hop in proxies.iter().chain([peer]) {
                        list.push_str(", ");
                        list.push_str(&ip_text(*hop));
                    }
                    header_value(list)?
                }
                None => header_value(ctx.client_ip_text.as_str())?,
            };
            headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
            headers.insert(
                X_FORWARDED_PROTO.clone(),
                HeaderValue::from_static(if self.tls { "https" } else { "http" }),
            );
            if let Some(host) = &ctx.host {
                headers.insert(X_FORWARDED_HOST.clone(), header_value(host.as_str())?);
            }
            headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
            if let (Some(trace), Some(span)) = (&ctx.trace, ctx.upstream_span) {
                headers.insert(TRACEPARENT.clone(), header_value(trace.traceparent(span))?);
                if let Some(state) = trace.tracestate() {
                    headers.insert(TRACESTATE.clone(), header_value(state)?);
                }
            }
            for name in &ctx.req.strip_headers {
                headers.remove(name);
            }
            if !ctx.req.strip_cookies.is_empty() {
                match crate::pipeline::cookies_without(headers, &ctx.req.strip_cookies) {
                    Some(kept) => headers.insert(header::COOKIE, kept),
                    None => headers.remove(header::COOKIE),
                };
            }
            for (name, value) in &ctx.req.upstream_headers {
                headers.insert(name.clone(), value.clone());
            }
            Ok(())
        })
    }

    fn response_body_filter(
        &self,
        _session: &mut Session,
        _body: &mut Option<Bytes>,
        _end_of_stream: bool,
        ctx: &mut Ctx,
    ) -> Result<Option<Duration>> {
        // A response still streaming past the request's total time is cut off.
        if let Some(r) = past_deadline(ctx, StatusCode::GATEWAY_TIMEOUT) {
            ctx.req.reject(&r);
            return Error::e_explain(
                ErrorType::WriteTimedout,
                "limits.request_timeout_ms passed while streaming the response",
            );
        }
        Ok(None)
    }

    async fn upstream_response_filter(
        &self,
        _session: &mut Session,
        up: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        if let Some(t) = ctx.upstream_started {
            ctx.upstream_ms = Some(t.elapsed().as_secs_f64() * 1000.0);
        }
        ctx.upstream_ended = Some(Instant::now());
        ctx.upstream_status = up.status.as_u16();
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut Ctx,
    ) -> Result<()> {
        let route = ctx.route.as_deref();
        let cors = match (route.and_then(|r| r.cors.as_ref()), &ctx.origin) {
            (Some(cors), Some(origin)) => crate::cors::response_headers(cors, origin),
            _ => Vec::new(),
        };
        let set = route.map(|r| r.pipeline.on_response(resp.status, &ctx.req).set);
        let extra = 2 + route.map_or(0, |r| r.security_headers.len()) + cors.len();
        edit_response(resp, extra, |headers| {
            headers.insert(X_REQUEST_ID.clone(), ctx.request_id.clone());
            // No name or version of the upstream's software leaves the edge.
            headers.remove(header::SERVER);
            let Some(route) = route else { return };
            if self.tls
                && let Some(hsts) = &route.hsts
            {
                headers.insert(header::STRICT_TRANSPORT_SECURITY, hsts.clone());
            }
            for (k, v) in &route.security_headers {
                headers.insert(k.clone(), v.clone());
            }
            for (k, v) in cors {
                // `Vary: Origin` joins what the upstream varies on; it never replaces it.
                if k == header::VARY {
                    if !varies_on_origin(headers) {
                        headers.append(k, v);
                    }
                } else {
                    headers.insert(k, v);
                }
            }
            for (k, v) in set.into_iter().flatten() {
                headers.insert(k, v);
            }
            if route.ratelimit_headers
                && let Some(standing) = &ctx.req.ratelimit
            {
                for (k, v) in standing.headers() {
                    headers.insert(k, v);
                }
            }
        })
    }

    async fn fail_to_proxy(&self, session: &mut Session, e: &Error, ctx: &mut Ctx) -> FailToProxy {
        let rejection = match (ctx.pending.take(), e.etype()) {
            // A filter, limit or the peer choice already decided; answer what it decided.
            (Some(r), _) => Some(r),
            (
                _,
                ErrorType::ConnectTimedout
                | ErrorType::ConnectRefused
                | ErrorType::ConnectNoRoute
                | ErrorType::ConnectError,
            ) => Some(Rejection::new(
                StatusCode::BAD_GATEWAY,
                "upstream",
                "connect_failed",
                "the upstream could not be reached",
            )),
            (_, ErrorType::ReadTimedout | ErrorType::WriteTimedout)
                if e.esource() == &ErrorSource::Upstream =>
            {
                Some(
                    past_deadline(ctx, StatusCode::GATEWAY_TIMEOUT).unwrap_or_else(|| {
                        Rejection::new(
                            StatusCode::GATEWAY_TIMEOUT,
                            "upstream",
                            "timeout",
                            "the upstream did not answer in time",
                        )
                    }),
                )
            }
            (_, _) if e.esource() == &ErrorSource::Upstream => Some(Rejection::new(
                StatusCode::BAD_GATEWAY,
                "upstream",
                "bad_response",
                "the upstream failed",
            )),
            (_, ErrorType::ReadTimedout) => Some(Rejection::new(
                StatusCode::REQUEST_TIMEOUT,
                "limits",
                "client_timeout",
                "the request was not received in time",
            )),
            (_, ErrorType::ReadError | ErrorType::WriteError | ErrorType::ConnectionClosed) => None,
            // Anything else the client's side got wrong (a malformed chunk size, a header the
            // sanitiser refuses) is the client's mistake, never a 500.
            (_, _) if e.esource() == &ErrorSource::Downstream => Some(Rejection::new(
                StatusCode::BAD_REQUEST,
                "request",
                "malformed",
                "the request could not be read",
            )),
            (_, ErrorType::HTTPStatus(code)) => Some(Rejection::new(
                StatusCode::from_u16(*code).unwrap_or(StatusCode::BAD_REQUEST),
                "protocol",
                "bad_request",
                "the request could not be processed",
            )),
            _ => Some(Rejection::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "proxy",
                "internal",
                "internal error",
            )),
        };
        let Some(r) = rejection else {
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        };
        let code = r.status.as_u16();
        // The connection is not reused after a failed proxy attempt; say so, so clients do not
        // send their next request into a closing socket.
        session.set_keepalive(None);
        if session.response_written().is_none() {
            // The response may be half-sent already; then there is nothing to write.
            let _ = self.respond(session, ctx, r).await;
        } else {
            ctx.req.reject(&r);
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    fn suppress_error_log(&self, _session: &Session, ctx: &Ctx, _e: &Error) -> bool {
        // Decisions are logged once, in the access log; Pingora's own error line would repeat them.
        ctx.req.decision == Decision::Reject
    }

    async fn logging(&self, session: &mut Session, _e: Option<&Error>, ctx: &mut Ctx) {
        // The next request on this connection gets its own header deadline.
        if let Some(guard) = HeaderDeadline::of(session.stream()) {
            guard.mark_idle();
        }
        if ctx.in_flight {
            self.metrics.requests_in_flight.dec();
        }
        let status = session.response_written().map_or(0, |r| r.status.as_u16());
        let route = ctx.route.as_ref().map_or("unmatched", |r| &*r.name);
        let req = session.req_header();
        let elapsed = ctx.started.elapsed();
        // A sampled request's trace id becomes its bucket's exemplar.
        let exemplar = ctx
            .trace
            .as_ref()
            .filter(|t| self.tracing.records(t))
            .map(|_| ctx.trace_id.as_str());
        match &ctx.route {
            Some(r) => {
                r.metrics.requests(&req.method, status).inc();
                telemetry::exposition::observe(
                    &r.metrics.duration,
                    elapsed.as_secs_f64(),
                    exemplar,
                );
                if let Some(ms) = ctx.upstream_ms {
                    r.metrics.upstream_duration.observe(ms / 1000.0);
                }
            }
            None => {
                self.metrics
                    .requests
                    .with_label_values(&[route, method_label(&req.method), status_class(status)])
                    .inc();
                telemetry::exposition::observe(
                    &self.metrics.route_duration(route),
                    elapsed.as_secs_f64(),
                    exemplar,
                );
            }
        }
        let (stage, reason) = (ctx.req.stage.unwrap_or(""), ctx.req.reason.unwrap_or(""));
        match ctx.req.decision {
            Decision::Reject => self
                .metrics
                .rejections
                .with_label_values(&[route, stage, reason])
                .inc(),
            Decision::Shadow => self
                .metrics
                .shadow_decisions
                .with_label_values(&[route, stage, reason])
                .inc(),
            Decision::Allow => {}
        }
        let user_agent = req
            .headers
            .get(header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let tls_version = session
            .digest()
            .and_then(|d| d.ssl_digest.as_ref())
            .map_or("", |d| crate::tls::normalize_version(Some(&d.version)));
        let span_id = ctx
            .trace
            .as_ref()
            .map(telemetry::TraceContext::span_id_hex)
            .unwrap_or_default();
        let written = self.access_log.write(&crate::access_log::Line {
            ts: crate::access_log::timestamp(),
            level: "info",
            service: "proxy",
            request_id: &ctx.req.request_id,
            trace_id: &ctx.trace_id,
            span_id: &span_id,
            client_ip: &ctx.client_ip_text,
            method: req.method.as_str(),
            host: ctx.host.as_deref().unwrap_or(""),
            route,
            path: req.uri.path(),
            status,
            duration_ms: elapsed.as_secs_f64() * 1000.0,
            upstream_ms: ctx.upstream_ms,
            bytes_in: session.body_bytes_read(),
            bytes_out: session.body_bytes_sent(),
            subject: ctx.req.subject.as_deref().unwrap_or(""),
            decision: ctx.req.decision.as_str(),
            stage,
            reason,
            waf_rule_ids: ctx
                .req
                .waf
                .as_ref()
                .map(|w| w.rule_ids.clone())
                .unwrap_or_default(),
            waf_score: ctx.req.waf.as_ref().map_or(0, |w| w.score),
            ratelimit_policy: ctx.req.ratelimit_policy.as_deref().unwrap_or(""),
            tls_version,
            user_agent,
        });
        if !written {
            self.metrics.access_log_dropped.inc();
        }
        if let Some(trace) = ctx.trace.as_ref().filter(|t| self.tracing.records(t)) {
            let upstream = ctx
                .upstream_started
                .zip(ctx.upstream_span)
                .map(|(started, span_id)| crate::trace::Upstream {
                    span_id,
                    name: ctx.route.as_ref().map_or("", |r| &*r.upstream),
                    address: ctx.peer.as_ref().map_or_else(String::new, |p| {
                        p.addr
                            .as_inet()
                            .map_or_else(|| p.addr.to_string(), |a| a.ip().to_string())
                    }),
                    port: ctx
                        .peer
                        .as_ref()
                        .and_then(|p| p.addr.as_inet().map(|a| a.port())),
                    started,
                    ended: ctx.upstream_ended,
                    retried: ctx.retried,
                    status: ctx.upstream_status,
                });
            self.tracing.finish(&crate::trace::Finished {
                trace,
                started: ctx.started,
                method: req.method.as_str(),
                route: ctx.route.as_ref().map(|r| &*r.name),
                path: req.uri.path(),
                status,
                client_ip: &ctx.client_ip_text,
                user_agent,
                tls_version,
                http_version: match req.version {
                    http::Version::HTTP_2 => "2",
                    http::Version::HTTP_10 => "1.0",
                    _ => "1.1",
                },
                host: ctx.host.as_deref().unwrap_or(""),
                request_id: &ctx.req.request_id,
                stage,
                reason,
                decision: ctx.req.decision.as_str(),
                stages: ctx.req.stages.as_deref().unwrap_or_default(),
                upstream,
            });
        }
    }
}

/// The rejection for a request past `limits.request_timeout_ms`, if it is.
fn past_deadline(ctx: &Ctx, status: StatusCode) -> Option<Rejection> {
    let limit = Duration::from_millis(ctx.built.config.limits.request_timeout_ms);
    (ctx.started.elapsed() > limit).then(|| {
        Rejection::new(
            status,
            "limits",
            "request_timeout",
            "the request took longer than the edge allows",
        )
    })
}

/// Records `r` as the answer and fails the proxy attempt with its status, so `fail_to_proxy`
/// writes it (for phases that cannot write a response themselves).
fn defer<T>(ctx: &mut Ctx, r: Rejection) -> Result<T> {
    let code = r.status.as_u16();
    ctx.req.reject(&r);
    ctx.pending = Some(r);
    Error::e_explain(ErrorType::HTTPStatus(code), "decided by the edge")
}

/// Reads the body (up to `need.limit`) before the upstream is chosen, into `ctx.body`, so
/// that a filter refusing the request keeps all of it from the upstream. Pingora keeps what is
/// read here (up to 64 KiB) and replays it to the upstream, then streams the rest; a read that
/// outgrew that buffer lost bytes, so that body cannot be forwarded whole and is answered 413.
async fn read_body(
    session: &mut Session,
    need: BodyNeed,
    declared: Option<u64>,
    ctx: &mut crate::pipeline::RequestCtx,
) -> Result<(), Rejection> {
    let limit = need.limit as u64;
    let fits = crate::filters::waf::MAX_BODY_LIMIT as u64;
    if declared.is_some_and(|n| n > limit && (need.over_limit == OverLimit::Reject || n > fits)) {
        return Err(body_too_large_to_inspect());
    }
    session.enable_retry_buffering();
    let mut body = bytes::BytesMut::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > need.limit {
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                return Err(Rejection::new(
                    StatusCode::BAD_REQUEST,
                    "request",
                    "bad_body",
                    format!("the request body could not be read: {}", e.etype().as_str()),
                ));
            }
        }
    }
    let over = body.len() > need.limit;
    if over && (need.over_limit == OverLimit::Reject || session.retry_buffer_truncated()) {
        return Err(body_too_large_to_inspect());
    }
    // What is still unread streams on after the replayed part, uninspected.
    body.truncate(need.limit);
    ctx.body_truncated = over;
    ctx.body = Some(body.freeze());
    Ok(())
}

fn body_too_large_to_inspect() -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "limits",
        "body_too_large",
        "the request body is larger than this route inspects",
    )
}

fn body_too_large() -> Rejection {
    Rejection::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "limits",
        "body_too_large",
        "the request body is larger than allowed",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_headers_the_edge_speaks_for_are_known_in_any_spelling() {
        for name in [
            "x-vigil-subject",
            "x_vigil_subject",
            "x-vigil_role",
            "x-forwarded-for",
            "x_forwarded_for",
            "x-forwarded-host",
            "x_real_ip",
            "x-real-ip",
            "forwarded",
            "x-request-id",
            "x_request_id",
        ] {
            assert!(edge_owned(name), "{name}");
        }
        for name in [
            "x-vigilant",
            "accept",
            "x-forwarded",
            "x-request-ids",
            "forwarded-x",
        ] {
            assert!(!edge_owned(name), "{name}");
        }
    }

    #[test]
    fn new_request_ids_are_distinct_and_well_formed() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(
            valid_request_id(&a) && a[..16] == b[..16],
            "one prefix per process"
        );
    }

    #[test]
    fn request_ids_from_callers_are_checked() {
        assert!(valid_request_id("edge-1.2_x"));
        assert!(!valid_request_id(""));
        assert!(!valid_request_id("a b"));
        assert!(!valid_request_id(&"x".repeat(129)));
    }

    fn wire(up: &RequestHeader) -> String {
        let mut buf = Vec::new();
        up.header_to_h1_wire(&mut buf);
        String::from_utf8(buf).unwrap()
    }

    #[test]
    fn an_edited_request_keeps_its_target_method_and_headers_in_order() {
        for target in [&b"/a/b?c=d"[..], b"http://example.com/x?y", b"*"] {
            let mut up = RequestHeader::build("OPTIONS", target, None).unwrap();
            up.append_header("X-First", "1").unwrap();
            up.append_header("x-vigil-subject", "mallory").unwrap();
            up.append_header("X-First", "2").unwrap();
            up.append_header("Accept", "*/*").unwrap();
            edit_request(&mut up, 1, |h| {
                h.remove("x-vigil-subject");
                h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("id-1"));
                Ok(())
            })
            .unwrap();
            assert_eq!(up.raw_path(), target, "the target goes on as it came");
            assert_eq!(up.method, http::Method::OPTIONS);
            assert_eq!(
                wire(&up),
                "x-first: 1\r\nx-first: 2\r\naccept: */*\r\nx-request-id: id-1\r\n",
                "the client's headers in their order, repeated ones kept, the edit applied"
            );
        }
        let mut h2 = RequestHeader::build("POST", b"/", None).unwrap();
        h2.set_version(http::Version::HTTP_2);
        h2.set_send_end_stream(false);
        edit_request(&mut h2, 0, |_| Ok(())).unwrap();
        assert_eq!(h2.send_end_stream(), Some(false));
        assert_eq!(h2.version, http::Version::HTTP_2);
    }

    #[test]
    fn an_edited_response_keeps_its_status_and_reason_phrase() {
        let mut resp = ResponseHeader::build(StatusCode::IM_A_TEAPOT, None).unwrap();
        resp.set_reason_phrase(Some("Short And Stout")).unwrap();
        resp.append_header("Server", "nginx/1.22").unwrap();
        edit_response(&mut resp, 1, |h| {
            h.remove(header::SERVER);
            h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("id-2"));
        })
        .unwrap();
        assert_eq!(resp.status, StatusCode::IM_A_TEAPOT);
        assert_eq!(resp.get_reason_phrase(), Some("Short And Stout"));
        assert_eq!(resp.headers.len(), 1);
        assert_eq!(resp.headers["x-request-id"], "id-2");

        let mut plain = ResponseHeader::build(StatusCode::OK, None).unwrap();
        edit_response(&mut plain, 0, |_| {}).unwrap();
        assert_eq!(plain.get_reason_phrase(), Some("OK"));
    }
}
