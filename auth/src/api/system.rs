//! Liveness, readiness, the JWKS and the OpenAPI document.

use axum::Json;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use utoipa::OpenApi;

use crate::AppState;
use crate::error::{ApiError, ErrorBody};

/// `{"status": "ok"}`
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct StatusBody {
    /// Always `ok`.
    pub status: &'static str,
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health", tag = "system", responses((status = 200, body = StatusBody)))]
pub async fn health() -> Json<StatusBody> {
    Json(StatusBody { status: "ok" })
}

/// Readiness: the database answers.
#[utoipa::path(get, path = "/ready", tag = "system", responses(
    (status = 200, body = StatusBody), (status = 503, description = "The database is unreachable", body = ErrorBody),
))]
pub async fn ready(State(state): State<AppState>) -> Result<Json<StatusBody>, ApiError> {
    if state.db.ping().await {
        Ok(Json(StatusBody { status: "ok" }))
    } else {
        Err(ApiError::unavailable("the database is not reachable"))
    }
}

/// The public keys that verify access tokens: the current key and the previous one.
#[utoipa::path(get, path = "/.well-known/jwks.json", tag = "system", responses(
    (status = 200, description = "A JWK Set", body = serde_json::Value),
))]
pub async fn jwks(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(header::CACHE_CONTROL, "public, max-age=60")],
        Json(state.tokens.jwks()),
    )
}

/// This document.
#[utoipa::path(get, path = "/openapi.json", tag = "system", responses((status = 200, description = "OpenAPI 3.1", body = serde_json::Value)))]
pub async fn openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

struct BearerAuth;

impl utoipa::Modify for BearerAuth {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
        let scheme = HttpBuilder::new()
            .scheme(HttpAuthScheme::Bearer)
            .bearer_format("JWT")
            .build();
        doc.components
            .get_or_insert_with(Default::default)
            .add_security_scheme("bearer", SecurityScheme::Http(scheme));
    }
}

/// A PATCH body must name at least one field (the handlers answer 400 "nothing to change"
/// otherwise); the schemas say so. Set here because utoipa-gen 5.5's `min_properties` attribute
/// writes `maxProperties`.
struct PatchNeedsAField;

impl utoipa::Modify for PatchNeedsAField {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{RefOr, schema::Schema};
        let Some(components) = doc.components.as_mut() else {
            return;
        };
        for name in ["ContentPatch", "UserPatch"] {
            if let Some(RefOr::T(Schema::Object(schema))) = components.schemas.get_mut(name) {
                schema.min_properties = Some(1);
            }
        }
    }
}

/// The OpenAPI document, generated from the handlers' annotations.
#[derive(OpenApi)]
#[openapi(
    info(title = "Vigil auth", description = "Accounts, sessions and content behind the Vigil edge."),
    modifiers(&BearerAuth, &PatchNeedsAField),
    paths(
        super::auth::register, super::auth::login, super::auth::refresh, super::auth::logout, super::auth::me,
        super::content::list, super::content::create, super::content::get, super::content::update, super::content::delete,
        super::users::list, super::users::update, super::users::delete,
        health, ready, jwks, openapi,
    )
)]
pub struct ApiDoc;
