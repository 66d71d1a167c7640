//! `/users`: user administration, admin only. An admin cannot demote, disable or delete
//! themselves, so the service is never left without the admin who holds the session. Nor is it
//! left without any enabled admin when two admins remove each other at once: the last-admin check
//! is part of the `UPDATE`/`DELETE` ([`store::update_user`], [`store::delete_user`]), and the
//! refused one gets a 409.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::UserView;
use super::{Admin, Body, PageQuery, Path, Query, paginate, parse_id};
use crate::AppState;
use crate::db::now_ms;
use crate::error::{ApiError, ErrorBody};
use crate::store::{self, Cursor, Guarded, Role};

/// `PATCH /users/{id}`: the fields to change.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserPatch {
    /// New role.
    pub role: Option<Role>,
    /// Disable (revokes every session; no login or refresh) or enable the account.
    pub disabled: Option<bool>,
}

/// One page of users.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserPage {
    /// Users, newest first.
    pub items: Vec<UserView>,
    /// Pass as `cursor` for the next page; absent on the last page.
    pub next_cursor: Option<String>,
}

/// List users (admin).
#[utoipa::path(get, path = "/users", tag = "users", security(("bearer" = [])), params(PageQuery), responses(
    (status = 200, body = UserPage), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody), (status = 403, body = ErrorBody),
))]
pub async fn list(
    State(state): State<AppState>,
    _admin: Admin,
    Query(q): Query<PageQuery>,
) -> Result<Json<UserPage>, ApiError> {
    let (limit, cursor) = q.parse()?;
    let rows = store::list_users(&state.db, limit + 1, cursor.as_ref()).await?;
    let (items, next_cursor) = paginate(rows, limit, |u| Cursor {
        created_at: u.created_at,
        id: u.id.clone(),
    });
    Ok(Json(UserPage {
        items: items.into_iter().map(Into::into).collect(),
        next_cursor,
    }))
}

/// Change a user's role or disabled state (admin).
#[utoipa::path(patch, path = "/users/{id}", tag = "users", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "User id (UUID)")), request_body = UserPatch, responses(
    (status = 200, body = UserView), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
))]
pub async fn update(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
    Body(patch): Body<UserPatch>,
) -> Result<Json<UserView>, ApiError> {
    if patch.role.is_none() && patch.disabled.is_none() {
        return Err(ApiError::invalid(
            "nothing to change: give role or disabled",
        ));
    }
    let id = parse_id(&id)?;
    let user = store::user_by_id(&state.db, &id)
        .await?
        .ok_or(ApiError::not_found("user"))?;
    let role = patch.role.unwrap_or(user.role);
    let now = now_ms();
    let disabled_at = match patch.disabled {
        Some(true) => user.disabled_at.or(Some(now)),
        Some(false) => None,
        None => user.disabled_at,
    };
    if user.id == admin.id && (role != Role::Admin || disabled_at.is_some()) {
        return Err(ApiError::conflict(
            "admins cannot demote or disable themselves",
        ));
    }
    let user = match store::update_user(&state.db, &id, role, disabled_at, now).await? {
        Guarded::Done(user) => user,
        Guarded::NotFound => return Err(ApiError::not_found("user")),
        Guarded::LastAdmin => return Err(last_admin()),
    };
    tracing::info!(admin_id = %admin.id, user_id = %user.id, role = role.as_str(), disabled = disabled_at.is_some(), "user updated");
    Ok(Json(user.into()))
}

/// Delete a user with their sessions and content (admin).
#[utoipa::path(delete, path = "/users/{id}", tag = "users", security(("bearer" = [])), params(("id" = uuid::Uuid, Path, description = "User id (UUID)")), responses(
    (status = 204, description = "Deleted"), (status = 400, body = ErrorBody), (status = 401, body = ErrorBody),
    (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody),
))]
pub async fn delete(
    State(state): State<AppState>,
    Admin(admin): Admin,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    if id == admin.id {
        return Err(ApiError::conflict("admins cannot delete themselves"));
    }
    match store::delete_user(&state.db, &id).await? {
        Guarded::Done(()) => {}
        Guarded::NotFound => return Err(ApiError::not_found("user")),
        Guarded::LastAdmin => return Err(last_admin()),
    }
    tracing::info!(admin_id = %admin.id, user_id = %id, "user deleted");
    Ok(StatusCode::NO_CONTENT)
}

/// 409 for a change that would leave no enabled admin (two admins removing each other at once:
/// the second to commit gets this).
fn last_admin() -> ApiError {
    ApiError::conflict("the last enabled admin cannot be demoted, disabled or deleted")
}
