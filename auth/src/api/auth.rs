//! `/auth/*`: register, login, refresh, logout, me.
//!
//! Login answers the same 401 for an unknown email and a wrong password after the same argon2
//! work; a disabled account is told so only after its correct password. Refresh rotates the
//! token; a rotated token presented again revokes its whole family. A session (a login) ends for
//! good `tokens.session_max_lifetime_secs` after the login: refreshes never move that end, and
//! no refresh token expires after it.

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::{Body, CurrentUser, rfc3339};
use crate::AppState;
use crate::db::now_ms;
use crate::error::{ApiError, ErrorBody};
use crate::password::check_policy;
use crate::store::{self, Refresh, Role, User};
use crate::tokens::{hash_refresh_token, new_refresh_token};

/// Longest accepted email (RFC 5321 path limit).
const MAX_EMAIL_LEN: usize = 254;

/// `POST /auth/register`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    /// An email address; unique case-insensitively.
    #[schema(format = Email, max_length = 254)]
    pub email: String,
    /// 12 to 128 characters.
    #[schema(min_length = 12, max_length = 128)]
    pub password: String,
}

/// `POST /auth/refresh` and `POST /auth/logout`
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RefreshRequest {
    /// The refresh token from login or the last refresh.
    pub refresh_token: String,
}

/// A user as the API shows it.
#[derive(Debug, Serialize, ToSchema)]
pub struct UserView {
    /// UUID.
    pub id: String,
    /// Email as registered.
    pub email: String,
    /// Role.
    pub role: Role,
    /// Whether an admin disabled the account.
    pub disabled: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339, when the user last logged in, refreshed or called the API.
    pub last_seen_at: Option<String>,
}

impl From<User> for UserView {
    fn from(u: User) -> Self {
        Self {
            id: u.id,
            email: u.email,
            role: u.role,
            disabled: u.disabled_at.is_some(),
            created_at: rfc3339(u.created_at),
            last_seen_at: u.last_seen_at.map(rfc3339),
        }
    }
}

/// Tokens issued by login and refresh.
#[derive(Debug, Serialize, ToSchema)]
pub struct TokenResponse {
    /// EdDSA JWT to send as `Authorization: Bearer`.
    pub access_token: String,
    /// Always `Bearer`.
    pub token_type: &'static str,
    /// Seconds until the access token expires.
    pub expires_in: u64,
    /// Opaque; exchange it at `/auth/refresh`. Single use.
    pub refresh_token: String,
    /// Seconds until the refresh token expires: `tokens.refresh_ttl_secs`, or less near the
    /// session's absolute end.
    pub refresh_expires_in: u64,
}

/// Checks an email's shape, returning it trimmed.
pub fn check_email(email: &str) -> Result<String, ApiError> {
    let email = email.trim();
    if email.len() > MAX_EMAIL_LEN || !email_address::EmailAddress::is_valid(email) {
        return Err(ApiError::invalid("email is not a valid email address"));
    }
    Ok(email.to_owned())
}

/// Creates an account with `role`; shared by the API and `vigil auth create-user`.
pub async fn create_account(
    state: &AppState,
    email: &str,
    password: &str,
    role: Role,
) -> Result<User, ApiError> {
    let email = check_email(email)?;
    check_policy(password, &email).map_err(ApiError::invalid)?;
    let hash = state
        .passwords
        .hash(password.to_owned())
        .await
        .map_err(ApiError::internal)?;
    store::insert_user(&state.db, &email, &hash, role, now_ms())
        .await?
        .ok_or_else(|| ApiError::conflict("an account cannot be created with this email"))
}

/// Create an account.
#[utoipa::path(post, path = "/auth/register", tag = "auth", request_body = Credentials, responses(
    (status = 201, description = "Created", body = UserView),
    (status = 400, description = "Invalid email or password", body = ErrorBody),
    (status = 409, description = "The email is taken", body = ErrorBody),
    (status = 413, body = ErrorBody), (status = 415, body = ErrorBody),
))]
pub async fn register(
    State(state): State<AppState>,
    Body(req): Body<Credentials>,
) -> Result<(StatusCode, Json<UserView>), ApiError> {
    let result = create_account(&state, &req.email, &req.password, Role::User).await;
    let label = match &result {
        Ok(_) => "created",
        Err(e) if e.status == StatusCode::CONFLICT => "conflict",
        Err(e) if e.status.is_client_error() => "invalid_input",
        Err(_) => "error",
    };
    state
        .metrics
        .registrations
        .with_label_values(&[label])
        .inc();
    let user = result?;
    tracing::info!(user_id = %user.id, "user registered");
    Ok((StatusCode::CREATED, Json(user.into())))
}

/// Exchange email and password for tokens.
#[utoipa::path(post, path = "/auth/login", tag = "auth", request_body = Credentials, responses(
    (status = 200, description = "Signed in", body = TokenResponse),
    (status = 400, body = ErrorBody),
    (status = 401, description = "Wrong email or password", body = ErrorBody),
    (status = 403, description = "The account is disabled", body = ErrorBody),
))]
pub async fn login(
    State(state): State<AppState>,
    Body(req): Body<Credentials>,
) -> Result<Json<TokenResponse>, ApiError> {
    let result = login_inner(&state, req).await;
    let label = match &result {
        Ok(_) => "success",
        Err(e) if e.status == StatusCode::UNAUTHORIZED => "invalid_credentials",
        Err(e) if e.status == StatusCode::FORBIDDEN => "disabled",
        Err(e) if e.status.is_client_error() => "invalid_input",
        Err(_) => "error",
    };
    state.metrics.logins.with_label_values(&[label]).inc();
    result.map(Json)
}

async fn login_inner(state: &AppState, req: Credentials) -> Result<TokenResponse, ApiError> {
    if req.email.len() > MAX_EMAIL_LEN || req.password.chars().count() > crate::password::MAX_LEN {
        return Err(ApiError::invalid("email or password is too long"));
    }
    let user = store::user_by_email(&state.db, &req.email).await?;
    let matched = state
        .passwords
        .verify(req.password, user.as_ref().map(|u| u.password_hash.clone()))
        .await
        .map_err(ApiError::internal)?;
    let user = match user {
        Some(user) if matched => user,
        _ => return Err(ApiError::unauthorized("wrong email or password")),
    };
    if user.disabled_at.is_some() {
        return Err(ApiError::forbidden("this account is disabled"));
    }
    let now = now_ms();
    let (refresh, refresh_hash) = new_refresh_token();
    let expires = now.saturating_add(ttl_ms(state.tokens.refresh_ttl_secs));
    let end = now.saturating_add(ttl_ms(state.config.tokens.session_max_lifetime_secs));
    let (session_id, expires) =
        store::create_session(&state.db, &user.id, &refresh_hash, now, expires, end).await?;
    tracing::info!(user_id = %user.id, session_id = %session_id, "login");
    issue(state, &user, &session_id, refresh, secs_until(now, expires))
}

/// Exchange a refresh token for new tokens; the old refresh token stops working.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth", request_body = RefreshRequest, responses(
    (status = 200, description = "New tokens", body = TokenResponse),
    (status = 400, body = ErrorBody),
    (status = 401, description = "Unknown, expired, revoked or reused refresh token, or a session past its absolute end", body = ErrorBody),
))]
pub async fn refresh(
    State(state): State<AppState>,
    Body(req): Body<RefreshRequest>,
) -> Result<Json<TokenResponse>, ApiError> {
    let now = now_ms();
    let (refresh, refresh_hash) = new_refresh_token();
    let expires = now.saturating_add(ttl_ms(state.tokens.refresh_ttl_secs));
    let outcome = store::rotate_refresh(
        &state.db,
        &hash_refresh_token(&req.refresh_token),
        &refresh_hash,
        now,
        expires,
    )
    .await?;
    let invalid = || ApiError::unauthorized("the refresh token is not valid");
    let count = |label: &str| state.metrics.refreshes.with_label_values(&[label]).inc();
    match outcome {
        Refresh::Rotated { user, .. } if user.disabled_at.is_some() => {
            store::revoke_session_of(&state.db, &refresh_hash, now).await?;
            count("disabled");
            Err(invalid())
        }
        Refresh::Rotated {
            session_id,
            user,
            expires_at,
        } => {
            count("success");
            issue(
                &state,
                &user,
                &session_id,
                refresh,
                secs_until(now, expires_at),
            )
            .map(Json)
        }
        Refresh::ReuseDetected => {
            count("reuse_detected");
            state.metrics.refresh_reuse_detected.inc();
            tracing::warn!("refresh token reuse detected; session revoked");
            Err(invalid())
        }
        Refresh::Invalid => {
            count("invalid");
            Err(invalid())
        }
    }
}

/// Revoke the session a refresh token belongs to. Answers 204 whether or not the token was known.
#[utoipa::path(post, path = "/auth/logout", tag = "auth", request_body = RefreshRequest, responses(
    (status = 204, description = "The session is revoked"),
    (status = 400, body = ErrorBody),
))]
pub async fn logout(
    State(state): State<AppState>,
    Body(req): Body<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    store::revoke_session_of(&state.db, &hash_refresh_token(&req.refresh_token), now_ms()).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// The signed-in user.
#[utoipa::path(get, path = "/auth/me", tag = "auth", security(("bearer" = [])), responses(
    (status = 200, body = UserView), (status = 401, body = ErrorBody),
))]
pub async fn me(CurrentUser(user): CurrentUser) -> Json<UserView> {
    Json(user.into())
}

fn issue(
    state: &AppState,
    user: &User,
    session_id: &str,
    refresh_token: String,
    refresh_expires_in: u64,
) -> Result<TokenResponse, ApiError> {
    let now = u64::try_from(now_ms() / 1000).unwrap_or(0);
    let (access_token, _) = state
        .tokens
        .issue(&user.id, user.role.as_str(), session_id, now)
        .map_err(ApiError::internal)?;
    Ok(TokenResponse {
        access_token,
        token_type: "Bearer",
        expires_in: state.tokens.access_ttl_secs,
        refresh_token,
        refresh_expires_in,
    })
}

/// Whole seconds from `now` to `at` (both unix ms), 0 when `at` has passed.
fn secs_until(now: i64, at: i64) -> u64 {
    u64::try_from(at.saturating_sub(now) / 1000).unwrap_or(0)
}

fn ttl_ms(secs: u64) -> i64 {
    i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)
}
