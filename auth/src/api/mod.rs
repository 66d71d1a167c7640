//! The HTTP API: the router, the request-context middleware (request id, metrics, access
//! log), and the extractors that turn every client mistake into an [`ApiError`].
//!
//! Handlers live in one file per resource: [`auth`] (register, login, refresh, logout, me),
//! [`content`], [`users`] (admin) and [`system`] (health, readiness, JWKS, OpenAPI).

pub mod auth;
pub mod content;
pub mod system;
pub mod users;

use std::time::Instant;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Router, middleware};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::Deserialize;
use tower_http::catch_panic::CatchPanicLayer;

use tracing::Instrument;

use crate::AppState;
use crate::error::{ApiError, REQUEST, RequestIds};
use crate::store::{self, Cursor, Role, User};

/// The API router over `state`; no sockets involved, so tests call it directly.
pub fn router(state: AppState) -> Router {
    let body_limit = state.config.limits.body_bytes;
    Router::new()
        .route("/auth/register", post(auth::register))
        .route("/auth/login", post(auth::login))
        .route("/auth/refresh", post(auth::refresh))
        .route("/auth/logout", post(auth::logout))
        .route("/auth/me", get(auth::me))
        .route("/content", get(content::list).post(content::create))
        .route(
            "/content/{id}",
            get(content::get)
                .patch(content::update)
                .delete(content::delete),
        )
        .route("/users", get(users::list))
        .route("/users/{id}", patch(users::update).delete(users::delete))
        .route("/health", get(system::health))
        .route("/ready", get(system::ready))
        .route("/.well-known/jwks.json", get(system::jwks))
        .route("/openapi.json", get(system::openapi))
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "method not allowed on this route",
            )
        })
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(CatchPanicLayer::custom(|_| {
            ApiError::internal("handler panicked").into_response()
        }))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            request_context,
        ))
        .with_state(state)
}

/// The admin router: `/metrics`.
pub fn admin_router(state: AppState) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(
                |State(s): State<AppState>, headers: axum::http::HeaderMap| async move {
                    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
                    let out = s.metrics.exposition(accept);
                    ([(header::CONTENT_TYPE, out.content_type)], out.body)
                },
            ),
        )
        .with_state(state)
}

/// Gives the request its id (the caller's, if well-formed, else a new one) and its trace (the
/// caller's `traceparent`, else a new one), runs it inside its server span with both in scope,
/// then records the metrics and writes the access-log line.
async fn request_context(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let id = req
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| is_valid_request_id(v))
        .map_or_else(|| uuid::Uuid::new_v4().simple().to_string(), str::to_owned);
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_owned();
    let method = method_label(req.method());
    let path = req.uri().path().to_owned();
    let span = server_span(&req, &id, method, &route, &path);
    let sampled = span.sampled.then(|| span.trace_id.clone());
    let ids = RequestIds {
        request_id: id.clone(),
        trace_id: span.trace_id,
    };
    let span = span.span;
    let mut resp = REQUEST
        .scope(ids, next.run(req))
        .instrument(span.clone())
        .await;
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    let status = resp.status().as_u16();
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    let elapsed = started.elapsed();
    span.record("http.response.status_code", status);
    if status >= 500 {
        span.record("otel.status_code", "error");
    }
    state
        .metrics
        .http_requests
        .with_label_values(&[&route, method, class])
        .inc();
    telemetry::exposition::observe(
        &state.metrics.http_duration(&route, method),
        elapsed.as_secs_f64(),
        sampled.as_deref(),
    );
    span.in_scope(|| {
        tracing::info!(
            target: "auth::access",
            method,
            route = %route,
            path = %path,
            status,
            duration_ms = elapsed.as_secs_f64() * 1000.0,
            "request"
        );
    });
    resp
}

/// A request's server span and the trace id it is in.
struct ServerSpan {
    span: tracing::Span,
    trace_id: String,
    /// Whether the span is exported (its trace id can be an exemplar).
    sampled: bool,
}

/// Opens the request's server span, continuing the caller's W3C trace context. With spans
/// exported (`tracing-opentelemetry` installed) the ids are the OpenTelemetry span's; without,
/// they come from the caller's `traceparent` or are new, so logs and error bodies always carry
/// a trace id.
fn server_span(req: &Request, id: &str, method: &str, route: &str, path: &str) -> ServerSpan {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let header = |n: &str| req.headers().get(n).and_then(|v| v.to_str().ok());
    let trace = telemetry::TraceContext::continued(
        header("traceparent"),
        header("tracestate"),
        &telemetry::Sampling::ratio(0.0),
    );
    let span = tracing::info_span!(
        "request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method,
        http.route = route,
        url.path = path,
        http.response.status_code = tracing::field::Empty,
        request_id = id,
        trace_id = tracing::field::Empty,
        span_id = tracing::field::Empty,
    );
    if let Some(parent) = trace.parent {
        let remote = opentelemetry::Context::new()
            .with_remote_span_context(trace.span_context(parent, true));
        let _ = span.set_parent(remote);
    }
    let exported = span.context().span().span_context().clone();
    let (trace_id, span_id) = if exported.is_valid() {
        (
            exported.trace_id().to_string(),
            exported.span_id().to_string(),
        )
    } else {
        (trace.trace_id_hex(), trace.span_id.to_string())
    };
    span.record("trace_id", trace_id.as_str());
    span.record("span_id", span_id.as_str());
    ServerSpan {
        span,
        trace_id,
        sampled: exported.is_valid() && exported.is_sampled(),
    }
}

fn is_valid_request_id(v: &str) -> bool {
    (1..=128).contains(&v.len())
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// A JSON body whose every problem (syntax, unknown or missing fields, wrong content type, too
/// large) becomes a 4xx [`ApiError`].
#[derive(FromRequest)]
#[from_request(via(axum::Json), rejection(ApiError))]
pub struct Body<T>(pub T);

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        match r {
            JsonRejection::JsonDataError(e) => ApiError::invalid(e.body_text().replace(
                "Failed to deserialize the JSON body into the target type: ",
                "",
            )),
            JsonRejection::JsonSyntaxError(_) => ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_json",
                "the body is not valid JSON",
            ),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "expected a body with content-type application/json",
            ),
            r if r.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                "the body is larger than allowed",
            ),
            r => ApiError::new(StatusCode::BAD_REQUEST, "invalid_body", r.body_text()),
        }
    }
}

/// Query parameters, rejected as 400 [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Query), rejection(ApiError))]
pub struct Query<T>(pub T);

impl From<QueryRejection> for ApiError {
    fn from(r: QueryRejection) -> Self {
        ApiError::invalid(
            r.body_text()
                .replace("Failed to deserialize query string: ", "query: "),
        )
    }
}

/// Path parameters, rejected as 400 [`ApiError`]s.
#[derive(FromRequestParts)]
#[from_request(via(axum::extract::Path), rejection(ApiError))]
pub struct Path<T>(pub T);

impl From<PathRejection> for ApiError {
    fn from(r: PathRejection) -> Self {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_id", r.body_text())
    }
}

/// `?limit=&cursor=` of every listing.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct PageQuery {
    /// Items per page, 1 to 100 (default 20).
    #[param(minimum = 1, maximum = 100)]
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
}

impl PageQuery {
    /// The checked limit and the decoded cursor.
    pub fn parse(&self) -> Result<(i64, Option<Cursor>), ApiError> {
        let limit = self.limit.unwrap_or(20);
        if !(1..=100).contains(&limit) {
            return Err(ApiError::invalid("limit must be between 1 and 100"));
        }
        let cursor = self.cursor.as_deref().map(decode_cursor).transpose()?;
        Ok((i64::from(limit), cursor))
    }
}

/// Splits `rows` (fetched with `limit + 1`) into a page and the cursor of the next one.
pub fn paginate<T>(
    mut rows: Vec<T>,
    limit: i64,
    key: impl Fn(&T) -> Cursor,
) -> (Vec<T>, Option<String>) {
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    if rows.len() <= limit {
        return (rows, None);
    }
    rows.truncate(limit);
    let next = rows.last().map(|last| encode_cursor(&key(last)));
    (rows, next)
}

fn encode_cursor(c: &Cursor) -> String {
    B64.encode(format!("{}:{}", c.created_at, c.id))
}

fn decode_cursor(s: &str) -> Result<Cursor, ApiError> {
    let bad = || ApiError::invalid("cursor is not one this service issued");
    let raw = B64.decode(s).map_err(|_| bad())?;
    let text = String::from_utf8(raw).map_err(|_| bad())?;
    let (at, id) = text.split_once(':').ok_or_else(bad)?;
    Ok(Cursor {
        created_at: at.parse().map_err(|_| bad())?,
        id: parse_id(id)?,
    })
}

/// Checks that a path id is a UUID and returns it in canonical form.
pub fn parse_id(id: &str) -> Result<String, ApiError> {
    uuid::Uuid::parse_str(id)
        .map(|u| u.to_string())
        .map_err(|_| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_id",
                "the id is not a UUID",
            )
        })
}

/// The signed-in user: a valid access token whose session is live and whose user is enabled.
pub struct CurrentUser(pub User);

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .ok_or_else(|| ApiError::unauthorized("a bearer access token is required"))?;
        let claims = state
            .tokens
            .verify(token)
            .map_err(|e| ApiError::unauthorized(e.to_string()))?;
        let user =
            store::authenticated_user(&state.db, &claims.sub, &claims.sid, crate::db::now_ms())
                .await?
                .ok_or_else(|| ApiError::unauthorized("the session is no longer valid"))?;
        Ok(CurrentUser(user))
    }
}

/// The signed-in user, who must be an admin (403 otherwise).
pub struct Admin(pub User);

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let CurrentUser(user) = CurrentUser::from_request_parts(parts, state).await?;
        if user.role != Role::Admin {
            return Err(ApiError::forbidden("this needs the admin role"));
        }
        Ok(Admin(user))
    }
}

/// A unix-ms timestamp as RFC 3339.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_garbage_is_refused() {
        let c = Cursor {
            created_at: 1_700_000_000_123,
            id: uuid::Uuid::new_v4().to_string(),
        };
        assert_eq!(decode_cursor(&encode_cursor(&c)).unwrap(), c);
        for bad in [
            "",
            "!!",
            &B64.encode("no-colon"),
            &B64.encode("x:y"),
            &B64.encode("1:not-a-uuid"),
        ] {
            assert_eq!(
                decode_cursor(bad).unwrap_err().status,
                StatusCode::BAD_REQUEST,
                "{bad}"
            );
        }
    }

    #[test]
    fn request_ids_from_callers_are_checked() {
        assert!(is_valid_request_id("abc-123_x.y"));
        assert!(!is_valid_request_id(""));
        assert!(!is_valid_request_id("has space"));
        assert!(!is_valid_request_id(&"a".repeat(129)));
    }

    #[test]
    fn pages_cut_at_the_limit() {
        let rows: Vec<i64> = (0..5).collect();
        let key = |n: &i64| Cursor {
            created_at: *n,
            id: "00000000-0000-0000-0000-000000000000".into(),
        };
        let (page, next) = paginate(rows.clone(), 5, key);
        assert_eq!((page.len(), next), (5, None));
        let (page, next) = paginate(rows, 4, key);
        assert_eq!(page, vec![0, 1, 2, 3]);
        assert_eq!(decode_cursor(&next.unwrap()).unwrap().created_at, 3);
    }
}
