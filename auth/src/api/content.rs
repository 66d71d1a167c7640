//! `/content`: content items, owned by users.
//!
//! Visibility: a user sees their own items and published ones; an admin sees everything. Only
//! the owner or an admin changes an item: others get 404 for drafts they cannot see and 403 for
//! published items they can see but not change.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Body, CurrentUser, PageQuery, Path, Query, paginate, parse_id, rfc3339};
use crate::AppState;
use crate::db::now_ms;
use crate::error::{ApiError, ErrorBody};
use crate::store::{self, Content, Cursor, Role, Status, User};

const MAX_TITLE_CHARS: usize = 200;
const MAX_BODY_CHARS: usize = 50_000;

/// `POST /content`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewContent {
    /// 1 to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub title: String,
    /// Up to 50 000 characters.
    #[serde(default)]
    #[schema(max_length = 50000)]
    pub body: String,
    /// `draft` (default) or `published`.
    #[serde(default)]
    pub status: Option<Status>,
}

/// `PATCH /content/{id}`: the fields to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ContentPatch {
    /// New title: 1 to 200 characters, not blank.
    #[schema(min_length = 1, max_length = 200, pattern = r"\S")]
    pub title: Option<String>,
    /// New body: up to 50 000 characters.
    #[schema(max_length = 50000)]
    pub body: Option<String>,
    /// New status.
    pub status: Option<Status>,
}

/// A content item as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContentView {
    /// UUID.
    pub id: String,
    /// The owner's user id.
    pub owner_id: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Status.
    pub status: Status,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
}

impl From<Content> for ContentView {
    fn from(c: Content) -> Self {
        Self {
            id: c.id,
            owner_id: c.owner_id,
            title: c.title,
            body: c.body,
            status: c.status,
            created_at: rfc3339(c.created_at),
            updated_at: rfc3339(c.updated_at),
        }
    }
}

/// One page of content.
#[derive(Debug, Serialize, ToSchema)]
pub struct ContentPage {
    /// The items, newest first.
    pub items: Vec<ContentView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

fn check_title(title: &str) -> Result<(), ApiError> {
    if title.trim().is_empty() || title.chars().count() > MAX_TITLE_CHARS {
        return Err(ApiError::invalid(
            "title must be 1 to 200 characters and not blank",
        ));
    }
    Ok(())
}

fn check_body(body: &str) -> Result<(), ApiError> {
    if body.chars().count() > MAX_BODY_CHARS {
        return Err(ApiError::invalid("body must be at most 50000 characters"));
    }
    Ok(())
}

/// The item if `viewer` may see it; 404 otherwise (so drafts of others stay invisible).
async fn visible(state: &AppState, viewer: &User, id: &str) -> Result<Content, ApiError> {
    let id = parse_id(id)?;
    let item = store::content_by_id(&state.db, &id)
        .await?
        .ok_or(ApiError::not_found("content"))?;
    if viewer.role == Role::Admin || item.owner_id == viewer.id || item.status == Status::Published
    {
        Ok(item)
    } else {
        Err(ApiError::not_found("content"))
    }
}

/// The item if `viewer` may change it: 404 when not visible, 403 when visible but not theirs.
async fn changeable(state: &AppState, viewer: &User, id: &str) -> Result<Content, ApiError> {
    let item = visible(state, viewer, id).await?;
    if viewer.role == Role::Admin || item.owner_id == viewer.id {
        Ok(item)
    } else {
        Err(ApiError::forbidden(
            "only the owner or an admin can change this content",
        ))
    }
}

/// List the content the caller may see.
#[utoipa::path(get, path = "/content", tag = "content", security(("bearer" = [])), params(PageQuery), responses(
    (status = 200, body = ContentPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
))]
pub async fn list(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Query(q): Query<PageQuery>,
) -> Result<Json<ContentPage>, ApiError> {
    let (limit, cursor) = q.parse()?;
    let rows = store::list_content(&state.db, &user, limit + 1, cursor.as_ref()).await?;
    let (items, next_cursor) = paginate(rows, limit, |c| Cursor {
        created_at: c.created_at,
        id: c.id.clone(),
    });
    Ok(Json(ContentPage {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// Create a content item owned by the caller.
#[utoipa::path(post, path = "/content", tag = "content", security(("bearer" = [])), request_body = NewContent, responses(
    (status = 201, body = ContentView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
))]
pub async fn create(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Body(req): Body<NewContent>,
) -> Result<(StatusCode, Json<ContentView>), ApiError> {
    check_title(&req.title)?;
    check_body(&req.body)?;
    let status = req.status.unwrap_or(Status::Draft);
    let item = store::insert_content(
        &state.db,
        &user.id,
        req.title.trim(),
        &req.body,
        status,
        now_ms(),
    )
    .await?;
    Ok((StatusCode::CREATED, Json(item.into())))
}

/// Read one content item.
#[utoipa::path(get, path = "/content/{id}", tag = "content", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "Content id (UUID)")), responses(
    (status = 200, body = ContentView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn get(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<String>,
) -> Result<Json<ContentView>, ApiError> {
    Ok(Json(visible(&state, &user, &id).await?.into()))
}

/// Change a content item (owner or admin).
#[utoipa::path(patch, path = "/content/{id}", tag = "content", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "Content id (UUID)")), request_body = ContentPatch, responses(
    (status = 200, body = ContentView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn update(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<String>,
    Body(patch): Body<ContentPatch>,
) -> Result<Json<ContentView>, ApiError> {
    if patch.title.is_none() && patch.body.is_none() && patch.status.is_none() {
        return Err(ApiError::invalid(
            "nothing to change: give title, body or status",
        ));
    }
    let mut item = changeable(&state, &user, &id).await?;
    if let Some(title) = patch.title {
        check_title(&title)?;
        item.title = title.trim().to_owned();
    }
    if let Some(body) = patch.body {
        check_body(&body)?;
        item.body = body;
    }
    if let Some(status) = patch.status {
        item.status = status;
    }
    let item = store::update_content(&state.db, &item, now_ms())
        .await?
        .ok_or(ApiError::not_found("content"))?;
    Ok(Json(item.into()))
}

/// Delete a content item (owner or admin).
#[utoipa::path(delete, path = "/content/{id}", tag = "content", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "Content id (UUID)")), responses(
    (status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody),
))]
pub async fn delete(
    State(state): State<AppState>,
    CurrentUser(user): CurrentUser,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let item = changeable(&state, &user, &id).await?;
    if !store::delete_content(&state.db, &item.id).await? {
        return Err(ApiError::not_found("content"));
    }
    Ok(StatusCode::NO_CONTENT)
}
