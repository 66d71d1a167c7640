//! Every SQL statement of the service, typed. The same text runs on SQLite and PostgreSQL.
//!
//! Ids are UUIDv7, ordered by creation within the process, so listings ordered by
//! `(created_at, id)` keep creation order even for rows made in the same millisecond.
//!
//! Writes that must be atomic run in a transaction whose first statement is a write, so SQLite
//! takes its write lock up front (and waits on `busy_timeout`) instead of failing on upgrade.

use sqlx::any::AnyRow;
use sqlx::{FromRow, Row};

use crate::db::Db;

/// A user's role.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A regular user.
    User,
    /// Sees and changes everything, manages users.
    Admin,
}

impl Role {
    /// The stored and token form.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::User => "user",
            Role::Admin => "admin",
        }
    }
}

impl TryFrom<String> for Role {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "user" => Ok(Role::User),
            "admin" => Ok(Role::Admin),
            other => Err(format!("unknown role {other:?}")),
        }
    }
}

/// Whether content is visible to everyone.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Only the owner and admins see it.
    Draft,
    /// Every signed-in user sees it.
    Published,
}

impl Status {
    /// The stored form.
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Draft => "draft",
            Status::Published => "published",
        }
    }
}

impl TryFrom<String> for Status {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        match s.as_str() {
            "draft" => Ok(Status::Draft),
            "published" => Ok(Status::Published),
            other => Err(format!("unknown status {other:?}")),
        }
    }
}

/// A row of `users`.
#[derive(Debug, Clone, FromRow)]
pub struct User {
    /// UUID.
    pub id: String,
    /// As registered.
    pub email: String,
    /// PHC string.
    pub password_hash: String,
    /// Role.
    #[sqlx(try_from = "String")]
    pub role: Role,
    /// When an admin disabled the account.
    pub disabled_at: Option<i64>,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
    /// Last login, refresh or authenticated request (throttled to a minute), unix ms.
    pub last_seen_at: Option<i64>,
}

/// A row of `content`.
#[derive(Debug, Clone, FromRow)]
pub struct Content {
    /// UUID.
    pub id: String,
    /// The user who made it.
    pub owner_id: String,
    /// Title.
    pub title: String,
    /// Body.
    pub body: String,
    /// Visibility.
    #[sqlx(try_from = "String")]
    pub status: Status,
    /// Unix ms.
    pub created_at: i64,
    /// Unix ms.
    pub updated_at: i64,
}

/// A position in a listing ordered by `(created_at, id)` descending.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cursor {
    /// `created_at` of the last item seen.
    pub created_at: i64,
    /// `id` of the last item seen.
    pub id: String,
}

/// What presenting a refresh token led to.
#[derive(Debug)]
pub enum Refresh {
    /// The token was current: it is now rotated and `new_hash` is the family's current token.
    Rotated {
        /// The session (family).
        session_id: String,
        /// Its user.
        user: Box<User>,
        /// When the new token expires (unix ms): the asked-for expiry, capped at the session's
        /// absolute end.
        expires_at: i64,
    },
    /// The token had been rotated already: the whole family is now revoked.
    ReuseDetected,
    /// Unknown, expired (the token, or the session past its absolute end) or revoked.
    Invalid,
}

const USER_COLUMNS: &str =
    "id, email, password_hash, role, disabled_at, created_at, updated_at, last_seen_at";
const CONTENT_COLUMNS: &str = "id, owner_id, title, body, status, created_at, updated_at";

/// Inserts a user; `None` when the email is taken (case-insensitively).
#[tracing::instrument(name = "INSERT users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "INSERT", db.collection.name = "users"))]
pub async fn insert_user(
    db: &Db,
    email: &str,
    password_hash: &str,
    role: Role,
    now: i64,
) -> sqlx::Result<Option<User>> {
    let sql = format!(
        "INSERT INTO users (id, email, email_key, password_hash, role, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6) ON CONFLICT (email_key) DO NOTHING RETURNING {USER_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(email)
        .bind(email_key(email))
        .bind(password_hash)
        .bind(role.as_str())
        .bind(now)
        .fetch_optional(&db.pool)
        .await
}

/// The key emails are unique under.
pub fn email_key(email: &str) -> String {
    email.trim().to_lowercase()
}

/// The user with this email (any case).
#[tracing::instrument(name = "SELECT users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "SELECT", db.collection.name = "users"))]
pub async fn user_by_email(db: &Db, email: &str) -> sqlx::Result<Option<User>> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE email_key = $1");
    sqlx::query_as(&sql)
        .bind(email_key(email))
        .fetch_optional(&db.pool)
        .await
}

/// The user with this id.
#[tracing::instrument(name = "SELECT users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "SELECT", db.collection.name = "users"))]
pub async fn user_by_id(db: &Db, id: &str) -> sqlx::Result<Option<User>> {
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
    sqlx::query_as(&sql).bind(id).fetch_optional(&db.pool).await
}

/// The user behind an access token: only if the user exists and is enabled and the token's
/// session is neither revoked nor expired. Also marks the user as seen (at most once a minute).
#[tracing::instrument(name = "SELECT users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "SELECT", db.collection.name = "users"))]
pub async fn authenticated_user(
    db: &Db,
    user_id: &str,
    session_id: &str,
    now: i64,
) -> sqlx::Result<Option<User>> {
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM users WHERE id = $1 AND disabled_at IS NULL AND EXISTS \
         (SELECT 1 FROM sessions WHERE id = $2 AND user_id = $1 AND revoked_at IS NULL AND expires_at > $3)"
    );
    let user: Option<User> = sqlx::query_as(&sql)
        .bind(user_id)
        .bind(session_id)
        .bind(now)
        .fetch_optional(&db.pool)
        .await?;
    if user.is_some() {
        touch_last_seen(db, user_id, now).await?;
    }
    Ok(user)
}

/// `last_seen_at` is written at most this often per user, so reads stay reads.
const LAST_SEEN_RESOLUTION_MS: i64 = 60_000;

/// Sets `last_seen_at` unless it was set less than a minute ago.
#[tracing::instrument(name = "UPDATE users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "UPDATE", db.collection.name = "users"))]
pub async fn touch_last_seen(db: &Db, user_id: &str, now: i64) -> sqlx::Result<()> {
    sqlx::query("UPDATE users SET last_seen_at = $2 WHERE id = $1 AND (last_seen_at IS NULL OR last_seen_at < $3)")
        .bind(user_id)
        .bind(now)
        .bind(now - LAST_SEEN_RESOLUTION_MS)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// One page of users, newest first.
#[tracing::instrument(name = "SELECT users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "SELECT", db.collection.name = "users"))]
pub async fn list_users(db: &Db, limit: i64, after: Option<&Cursor>) -> sqlx::Result<Vec<User>> {
    let sql = format!(
        "SELECT {USER_COLUMNS} FROM users WHERE ($1 IS NULL OR created_at < $1 OR (created_at = $1 AND id < $2)) \
         ORDER BY created_at DESC, id DESC LIMIT $3"
    );
    sqlx::query_as(&sql)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id.clone()))
        .bind(limit)
        .fetch_all(&db.pool)
        .await
}

/// What a change that may take a user out of the admin set led to.
#[derive(Debug)]
pub enum Guarded<T> {
    /// Done.
    Done(T),
    /// No such user.
    NotFound,
    /// Refused: the user is the last enabled admin.
    LastAdmin,
}

/// The last-admin check, part of every `UPDATE`/`DELETE` that may take the user with id `$1` out
/// of the enabled admins: the row qualifies only if it is no enabled admin or another one exists.
const KEEPS_AN_ADMIN: &str = "(role <> 'admin' OR disabled_at IS NOT NULL OR EXISTS \
     (SELECT 1 FROM users other WHERE other.role = 'admin' AND other.disabled_at IS NULL AND other.id <> $1))";

/// The first statement of a transaction that may remove an admin: a no-op write to every enabled
/// admin's row. On SQLite it takes the write lock up front; on PostgreSQL it takes those rows'
/// locks, so two such transactions run one after the other. Without it, READ COMMITTED lets two
/// cross-demotions both pass [`KEEPS_AN_ADMIN`], each reading the other's row from before the
/// other's uncommitted change (write skew); with it, the second waits, and its guarded statement
/// (a new statement, so a new snapshot) sees the first one's outcome.
const LOCK_ADMINS: &str =
    "UPDATE users SET updated_at = updated_at WHERE role = 'admin' AND disabled_at IS NULL";

/// Sets a user's role and disabled state; disabling revokes every session of the user.
///
/// Refused ([`Guarded::LastAdmin`]) when it would leave no enabled admin: the check is part of
/// the `UPDATE` itself, never a separate read before it.
#[tracing::instrument(name = "UPDATE users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "UPDATE", db.collection.name = "users"))]
pub async fn update_user(
    db: &Db,
    id: &str,
    role: Role,
    disabled_at: Option<i64>,
    now: i64,
) -> sqlx::Result<Guarded<User>> {
    let mut tx = db.pool.begin().await?;
    if role != Role::Admin || disabled_at.is_some() {
        sqlx::query(LOCK_ADMINS).execute(&mut *tx).await?;
    }
    let sql = format!(
        "UPDATE users SET role = $2, disabled_at = $3, updated_at = $4 WHERE id = $1 \
         AND (($2 = 'admin' AND $3 IS NULL) OR {KEEPS_AN_ADMIN}) RETURNING {USER_COLUMNS}"
    );
    let user: Option<User> = sqlx::query_as(&sql)
        .bind(id)
        .bind(role.as_str())
        .bind(disabled_at)
        .bind(now)
        .fetch_optional(&mut *tx)
        .await?;
    let Some(user) = user else {
        return refused(&mut tx, id).await;
    };
    if disabled_at.is_some() {
        sqlx::query(
            "UPDATE sessions SET revoked_at = $2, revoked_reason = 'user_disabled' WHERE user_id = $1 AND revoked_at IS NULL",
        )
        .bind(id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await?;
    Ok(Guarded::Done(user))
}

/// Deletes a user with their sessions and content, unless they are the last enabled admin.
#[tracing::instrument(name = "DELETE users", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "DELETE", db.collection.name = "users"))]
pub async fn delete_user(db: &Db, id: &str) -> sqlx::Result<Guarded<()>> {
    let mut tx = db.pool.begin().await?;
    sqlx::query(LOCK_ADMINS).execute(&mut *tx).await?;
    let done = sqlx::query(&format!(
        "DELETE FROM users WHERE id = $1 AND {KEEPS_AN_ADMIN}"
    ))
    .bind(id)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() == 0 {
        return refused(&mut tx, id).await;
    }
    tx.commit().await?;
    Ok(Guarded::Done(()))
}

/// Why a guarded statement changed no row: the user is missing, or it was the last-admin check.
async fn refused<T>(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    id: &str,
) -> sqlx::Result<Guarded<T>> {
    let exists: Option<String> = sqlx::query_scalar("SELECT id FROM users WHERE id = $1")
        .bind(id)
        .fetch_optional(&mut **tx)
        .await?;
    Ok(if exists.is_some() {
        Guarded::LastAdmin
    } else {
        Guarded::NotFound
    })
}

/// Starts a session (a refresh-token family) whose first token has `token_hash` and expires at
/// `expires_at`. The session ends for good at `absolute_expires_at`: no refresh moves that, and
/// the first token's expiry is capped at it. Returns the session id and the token's expiry.
#[tracing::instrument(name = "INSERT sessions", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "INSERT", db.collection.name = "sessions"))]
pub async fn create_session(
    db: &Db,
    user_id: &str,
    token_hash: &str,
    now: i64,
    expires_at: i64,
    absolute_expires_at: i64,
) -> sqlx::Result<(String, i64)> {
    let session_id = uuid::Uuid::now_v7().to_string();
    let expires_at = expires_at.min(absolute_expires_at);
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO sessions (id, user_id, created_at, last_used_at, expires_at, absolute_expires_at) \
         VALUES ($1, $2, $3, $3, $4, $5)",
    )
    .bind(&session_id)
    .bind(user_id)
    .bind(now)
    .bind(expires_at)
    .bind(absolute_expires_at)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, issued_at) VALUES ($1, $2, $3)",
    )
    .bind(token_hash)
    .bind(&session_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE users SET last_seen_at = $2 WHERE id = $1")
        .bind(user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok((session_id, expires_at))
}

/// Rotates the refresh token with `old_hash` to `new_hash`, expiring at `expires_at` but never
/// after the session's absolute end, or detects its reuse. A session past its absolute end gives
/// [`Refresh::Invalid`], like an expired token; its end is never moved.
///
/// The conditional UPDATE comes first: of two concurrent refreshes with the same token exactly
/// one rotates it, and the other sees a rotated token, which is reuse.
#[tracing::instrument(name = "UPDATE sessions", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "UPDATE", db.collection.name = "sessions"))]
pub async fn rotate_refresh(
    db: &Db,
    old_hash: &str,
    new_hash: &str,
    now: i64,
    expires_at: i64,
) -> sqlx::Result<Refresh> {
    let mut tx = db.pool.begin().await?;
    let rotated = sqlx::query(
        "UPDATE refresh_tokens SET rotated_at = $2 WHERE token_hash = $1 AND rotated_at IS NULL",
    )
    .bind(old_hash)
    .bind(now)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    let row: Option<AnyRow> = sqlx::query(
        "SELECT rt.session_id, s.user_id, s.expires_at, s.absolute_expires_at, s.revoked_at FROM refresh_tokens rt \
         JOIN sessions s ON s.id = rt.session_id WHERE rt.token_hash = $1",
    )
    .bind(old_hash)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        return Ok(Refresh::Invalid);
    };
    let session_id: String = row.try_get("session_id")?;
    let user_id: String = row.try_get("user_id")?;
    let expires: i64 = row.try_get("expires_at")?;
    let end: i64 = row.try_get("absolute_expires_at")?;
    let revoked: Option<i64> = row.try_get("revoked_at")?;
    if revoked.is_some() {
        return Ok(Refresh::Invalid);
    }
    if rotated == 0 {
        sqlx::query(
            "UPDATE sessions SET revoked_at = $2, revoked_reason = 'refresh_reuse' WHERE id = $1",
        )
        .bind(&session_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        return Ok(Refresh::ReuseDetected);
    }
    if expires <= now || end <= now {
        return Ok(Refresh::Invalid);
    }
    let expires_at = expires_at.min(end);
    let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = $1");
    let Some(user) = sqlx::query_as::<_, User>(&sql)
        .bind(&user_id)
        .fetch_optional(&mut *tx)
        .await?
    else {
        return Ok(Refresh::Invalid);
    };
    sqlx::query(
        "INSERT INTO refresh_tokens (token_hash, session_id, issued_at) VALUES ($1, $2, $3)",
    )
    .bind(new_hash)
    .bind(&session_id)
    .bind(now)
    .execute(&mut *tx)
    .await?;
    sqlx::query("UPDATE sessions SET last_used_at = $2, expires_at = $3 WHERE id = $1")
        .bind(&session_id)
        .bind(now)
        .bind(expires_at)
        .execute(&mut *tx)
        .await?;
    sqlx::query("UPDATE users SET last_seen_at = $2 WHERE id = $1")
        .bind(&user_id)
        .bind(now)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Refresh::Rotated {
        session_id,
        user: Box::new(user),
        expires_at,
    })
}

/// Revokes the session the refresh token with `token_hash` belongs to. Unknown tokens are ignored.
#[tracing::instrument(name = "UPDATE sessions", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "UPDATE", db.collection.name = "sessions"))]
pub async fn revoke_session_of(db: &Db, token_hash: &str, now: i64) -> sqlx::Result<()> {
    sqlx::query(
        "UPDATE sessions SET revoked_at = $2, revoked_reason = 'logout' WHERE revoked_at IS NULL \
         AND id = (SELECT session_id FROM refresh_tokens WHERE token_hash = $1)",
    )
    .bind(token_hash)
    .bind(now)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Inserts a content item.
#[tracing::instrument(name = "INSERT content", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "INSERT", db.collection.name = "content"))]
pub async fn insert_content(
    db: &Db,
    owner_id: &str,
    title: &str,
    body: &str,
    status: Status,
    now: i64,
) -> sqlx::Result<Content> {
    let sql = format!(
        "INSERT INTO content (id, owner_id, title, body, status, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $6) RETURNING {CONTENT_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(uuid::Uuid::now_v7().to_string())
        .bind(owner_id)
        .bind(title)
        .bind(body)
        .bind(status.as_str())
        .bind(now)
        .fetch_one(&db.pool)
        .await
}

/// A content item by id.
#[tracing::instrument(name = "SELECT content", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "SELECT", db.collection.name = "content"))]
pub async fn content_by_id(db: &Db, id: &str) -> sqlx::Result<Option<Content>> {
    let sql = format!("SELECT {CONTENT_COLUMNS} FROM content WHERE id = $1");
    sqlx::query_as(&sql).bind(id).fetch_optional(&db.pool).await
}

/// One page of the content `viewer` may see (own and published; everything for admins), newest first.
#[tracing::instrument(name = "SELECT content", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "SELECT", db.collection.name = "content"))]
pub async fn list_content(
    db: &Db,
    viewer: &User,
    limit: i64,
    after: Option<&Cursor>,
) -> sqlx::Result<Vec<Content>> {
    let sql = format!(
        "SELECT {CONTENT_COLUMNS} FROM content \
         WHERE ($1 = 1 OR owner_id = $2 OR status = 'published') \
         AND ($3 IS NULL OR created_at < $3 OR (created_at = $3 AND id < $4)) \
         ORDER BY created_at DESC, id DESC LIMIT $5"
    );
    sqlx::query_as(&sql)
        .bind(i64::from(viewer.role == Role::Admin))
        .bind(&viewer.id)
        .bind(after.map(|c| c.created_at))
        .bind(after.map(|c| c.id.clone()))
        .bind(limit)
        .fetch_all(&db.pool)
        .await
}

/// Writes a content item's editable fields.
#[tracing::instrument(name = "UPDATE content", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "UPDATE", db.collection.name = "content"))]
pub async fn update_content(db: &Db, item: &Content, now: i64) -> sqlx::Result<Option<Content>> {
    let sql = format!(
        "UPDATE content SET title = $2, body = $3, status = $4, updated_at = $5 WHERE id = $1 RETURNING {CONTENT_COLUMNS}"
    );
    sqlx::query_as(&sql)
        .bind(&item.id)
        .bind(&item.title)
        .bind(&item.body)
        .bind(item.status.as_str())
        .bind(now)
        .fetch_optional(&db.pool)
        .await
}

/// Deletes a content item; whether it existed.
#[tracing::instrument(name = "DELETE content", skip_all, fields(otel.kind = "client", db.system = db.backend.system(), db.operation.name = "DELETE", db.collection.name = "content"))]
pub async fn delete_content(db: &Db, id: &str) -> sqlx::Result<bool> {
    let done = sqlx::query("DELETE FROM content WHERE id = $1")
        .bind(id)
        .execute(&db.pool)
        .await?;
    Ok(done.rows_affected() == 1)
}
