//! The one error type of the API and the JSON body every error answers with:
//! `{"error": code, "message": …, "request_id": …, "trace_id": …}`.
//!
//! A handler returns `ApiError`; internal causes are logged with the request id and never shown to
//! the client. The request id comes from a task-local that the request-id middleware sets, so
//! every error, including extractor rejections and the fallback, carries the id the response
//! header carries.

use std::borrow::Cow;

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

/// The ids of the request being served.
#[derive(Clone, Debug)]
pub struct RequestIds {
    /// The request id (the caller's, if well-formed, else a new one).
    pub request_id: String,
    /// The W3C trace id the request belongs to.
    pub trace_id: String,
}

tokio::task_local! {
    /// The ids of the request being served, set by [`crate::api::request_context`].
    pub static REQUEST: RequestIds;
}

/// The current request's id, or `-` outside a request.
pub fn current_request_id() -> String {
    REQUEST
        .try_with(|ids| ids.request_id.clone())
        .unwrap_or_else(|_| "-".to_owned())
}

/// The current request's trace id, or empty outside a request.
pub fn current_trace_id() -> String {
    REQUEST
        .try_with(|ids| ids.trace_id.clone())
        .unwrap_or_default()
}

/// An error the API answers with.
#[derive(Debug)]
pub struct ApiError {
    /// HTTP status.
    pub status: StatusCode,
    /// Machine-readable code, from a bounded set (`invalid_input`, `unauthorized`, …).
    pub code: &'static str,
    /// Human-readable explanation, safe to show to the client.
    pub message: Cow<'static, str>,
}

/// The error body, also used by the OpenAPI document.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// Machine-readable code.
    pub error: String,
    /// Human-readable explanation.
    pub message: String,
    /// The request id, also in the `x-request-id` response header.
    pub request_id: String,
    /// The W3C trace id of the request, as the logs and traces carry it.
    pub trace_id: String,
}

impl ApiError {
    /// An error with any status.
    pub fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<Cow<'static, str>>,
    ) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    /// 400 for a field or value the client got wrong.
    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_input", message)
    }
    /// 401: no valid credentials.
    pub fn unauthorized(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    /// 403: authenticated but not allowed.
    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "forbidden", message)
    }
    /// 404.
    pub fn not_found(what: &'static str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{what} not found"),
        )
    }
    /// 409.
    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    /// 500: the cause is logged, the client sees a generic message.
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        tracing::error!(error = %cause, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error",
        )
    }
    /// 503.
    pub fn unavailable(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        match e {
            sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed => {
                tracing::warn!(error = %e, "database unavailable");
                Self::unavailable("the database is not reachable, try again")
            }
            e => Self::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_owned(),
            message: self.message.into_owned(),
            request_id: current_request_id(),
            trace_id: current_trace_id(),
        };
        let mut resp = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}
