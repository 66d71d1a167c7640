//! The auth service through `auth::app()`, no sockets: every endpoint and error path, each test
//! body run against SQLite and against the real PostgreSQL (a fresh schema per test).
//!
//! PostgreSQL tests run when `VIGIL_TEST_POSTGRES_URL` is set (`.ci/run` sets it); under
//! `CI=true` a missing variable or an unreachable server fails them instead of skipping.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, Request, StatusCode};
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tower::ServiceExt;

use auth::AppState;
use auth::db::Db;
use auth::store::Role;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Sqlite,
    Postgres,
}

struct TestApp {
    kind: Kind,
    router: Router,
    state: AppState,
    schema: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

struct Resp {
    status: StatusCode,
    headers: HeaderMap,
    body: Value,
}

const PASSWORD: &str = "correct horse battery staple";

fn postgres_url() -> Option<String> {
    match std::env::var("VIGIL_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but VIGIL_TEST_POSTGRES_URL is not set: the PostgreSQL tests must run")
        }
        _ => None,
    }
}

impl TestApp {
    /// A fresh service over a fresh database; `None` when PostgreSQL tests are switched off.
    async fn new(kind: Kind) -> Option<Self> {
        Self::with_config(kind, |_| {}).await
    }

    /// Like [`Self::new`], with the default config changed by `change`.
    async fn with_config(kind: Kind, change: impl FnOnce(&mut auth::Config)) -> Option<Self> {
        let dir = tempfile::tempdir().unwrap();
        let mut config = auth::Config::default();
        change(&mut config);
        config.tokens.keys_path = dir.path().join("keys/signing.json");
        let (url, schema) = match kind {
            Kind::Sqlite => (
                format!("sqlite://{}", dir.path().join("vigil.db").display()),
                None,
            ),
            Kind::Postgres => {
                let base = postgres_url()?;
                let name = format!("vigil_test_{}", uuid::Uuid::new_v4().simple());
                sqlx::any::install_default_drivers();
                let pool = sqlx::AnyPool::connect(&base)
                    .await
                    .unwrap_or_else(|e| panic!("PostgreSQL at {base} is not reachable: {e}"));
                sqlx::query(&format!("CREATE SCHEMA {name}"))
                    .execute(&pool)
                    .await
                    .unwrap();
                pool.close().await;
                let sep = if base.contains('?') { '&' } else { '?' };
                (
                    format!("{base}{sep}options[search_path]={name}"),
                    Some((base, name)),
                )
            }
        };
        let db = Db::connect(&url, 4).await.unwrap();
        let state = AppState::with_db(config, db).unwrap();
        Some(Self {
            kind,
            router: auth::app(state.clone()),
            state,
            schema,
            _dir: dir,
        })
    }

    async fn cleanup(self) {
        self.state.db.pool.close().await;
        if let Some((base, name)) = self.schema {
            let pool = sqlx::AnyPool::connect(&base).await.unwrap();
            sqlx::query(&format!("DROP SCHEMA {name} CASCADE"))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }

    async fn send(&self, req: Request<Body>) -> Resp {
        let resp = self.router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let headers = resp.headers().clone();
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let body = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or_else(|_| panic!("not JSON: {:?}", String::from_utf8_lossy(&bytes)))
        };
        Resp {
            status,
            headers,
            body,
        }
    }

    async fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<Value>,
    ) -> Resp {
        let mut req = Request::builder().method(method).uri(path);
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let req = match body {
            Some(b) => req
                .header("content-type", "application/json")
                .body(Body::from(b.to_string())),
            None => req.body(Body::empty()),
        };
        self.send(req.unwrap()).await
    }

    async fn register(&self, email: &str) -> Value {
        let r = self
            .call(
                "POST",
                "/auth/register",
                None,
                Some(json!({"email": email, "password": PASSWORD})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED, "{}", r.body);
        r.body
    }

    async fn login(&self, email: &str) -> Resp {
        self.call(
            "POST",
            "/auth/login",
            None,
            Some(json!({"email": email, "password": PASSWORD})),
        )
        .await
    }

    async fn refresh(&self, refresh_token: &str) -> Resp {
        self.call(
            "POST",
            "/auth/refresh",
            None,
            Some(json!({ "refresh_token": refresh_token })),
        )
        .await
    }

    async fn logout(&self, refresh_token: &str) -> Resp {
        self.call(
            "POST",
            "/auth/logout",
            None,
            Some(json!({ "refresh_token": refresh_token })),
        )
        .await
    }

    async fn me(&self, access_token: &str) -> Resp {
        self.call("GET", "/auth/me", Some(access_token), None).await
    }

    /// Registers `email` and logs in: (user id, access token, refresh token).
    async fn user(&self, email: &str) -> (String, String, String) {
        let id = self.register(email).await["id"]
            .as_str()
            .unwrap()
            .to_owned();
        let r = self.login(email).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        (
            id,
            r.body["access_token"].as_str().unwrap().into(),
            r.body["refresh_token"].as_str().unwrap().into(),
        )
    }

    /// An admin made the way `vigil auth create-user --admin` makes one, logged in.
    async fn admin(&self) -> (String, String) {
        let user =
            auth::api::auth::create_account(&self.state, "root@example.com", PASSWORD, Role::Admin)
                .await
                .unwrap();
        let r = self.login("root@example.com").await;
        (user.id, r.body["access_token"].as_str().unwrap().into())
    }

    /// Takes user `id` out of the admin set as the holder of `token`: `demote`, `disable` or
    /// `delete`.
    async fn remove_admin(&self, token: &str, id: &str, how: &str) -> Resp {
        let path = format!("/users/{id}");
        match how {
            "demote" => {
                self.call("PATCH", &path, Some(token), Some(json!({"role": "user"})))
                    .await
            }
            "disable" => {
                self.call("PATCH", &path, Some(token), Some(json!({"disabled": true})))
                    .await
            }
            "delete" => self.call("DELETE", &path, Some(token), None).await,
            other => panic!("unknown removal {other}"),
        }
    }

    /// `(created_at, expires_at, absolute_expires_at)` of the session `refresh_token` belongs to.
    async fn session_times(&self, refresh_token: &str) -> (i64, i64, i64) {
        sqlx::query_as(
            "SELECT s.created_at, s.expires_at, s.absolute_expires_at FROM sessions s \
             JOIN refresh_tokens rt ON rt.session_id = s.id WHERE rt.token_hash = $1",
        )
        .bind(auth::tokens::hash_refresh_token(refresh_token))
        .fetch_one(&self.state.db.pool)
        .await
        .unwrap()
    }

    /// Sets `column` (a unix-ms timestamp) of the session `refresh_token` belongs to.
    async fn set_session(&self, refresh_token: &str, column: &str, at: i64) {
        let done = sqlx::query(&format!(
            "UPDATE sessions SET {column} = $1 \
             WHERE id = (SELECT session_id FROM refresh_tokens WHERE token_hash = $2)"
        ))
        .bind(at)
        .bind(auth::tokens::hash_refresh_token(refresh_token))
        .execute(&self.state.db.pool)
        .await
        .unwrap();
        assert_eq!(done.rows_affected(), 1);
    }

    /// How many enabled admins the database holds.
    async fn enabled_admins(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT COUNT(*) FROM users WHERE role = 'admin' AND disabled_at IS NULL",
        )
        .fetch_one(&self.state.db.pool)
        .await
        .unwrap()
    }

    fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = self.state.metrics.render();
        let prefix = if labels.is_empty() {
            format!("{name} ")
        } else {
            format!("{name}{{{labels}}} ")
        };
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .map_or(0.0, |v| v.parse().unwrap())
    }
}

/// Asserts the JSON error contract: status, code, a message, and the request id of the header.
#[track_caller]
fn assert_error(r: &Resp, status: u16, code: &str) {
    assert_eq!(r.status.as_u16(), status, "{}", r.body);
    assert_eq!(r.body["error"], code, "{}", r.body);
    assert!(
        r.body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{}",
        r.body
    );
    let header = r.headers.get("x-request-id").unwrap().to_str().unwrap();
    assert_eq!(
        r.body["request_id"], header,
        "the body carries the id of the header"
    );
}

macro_rules! on_both_backends {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let app = super::TestApp::new(super::Kind::Sqlite).await.unwrap();
                super::$name(&app).await;
                app.cleanup().await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let Some(app) = super::TestApp::new(super::Kind::Postgres).await else {
                    eprintln!("skipped: VIGIL_TEST_POSTGRES_URL is not set");
                    return;
                };
                super::$name(&app).await;
                app.cleanup().await;
            })*
        }
    };
}

on_both_backends!(
    register_login_me,
    registration_input_errors,
    duplicate_email_is_a_bare_409,
    login_failures_look_alike,
    disabled_account_cannot_log_in_or_refresh,
    refresh_rotates_the_token,
    replayed_refresh_token_revokes_the_family,
    concurrent_refreshes_with_one_token_let_one_through,
    a_session_ends_at_its_absolute_end,
    the_session_lifetime_comes_from_the_config,
    logout_revokes_the_session,
    access_token_errors,
    content_crud_and_visibility,
    content_input_errors,
    content_pagination,
    admin_user_management,
    the_last_admin_cannot_be_removed,
    concurrent_cross_removals_leave_an_admin,
    system_endpoints,
    unknown_routes_and_methods,
    request_ids_are_propagated_or_made,
    metrics_count_requests_by_route,
    key_rotation_keeps_old_tokens_valid,
);

async fn register_login_me(app: &TestApp) {
    let user = app.register("Ann@Example.com").await;
    assert_eq!(user["email"], "Ann@Example.com");
    assert_eq!(user["role"], "user");
    assert_eq!(user["disabled"], false);
    assert!(user.get("password_hash").is_none() && !user.to_string().contains("argon2"));
    // Email matching is case-insensitive.
    let r = app.login("ann@EXAMPLE.com").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["expires_in"], 900);
    assert_eq!(r.body["refresh_expires_in"], 7 * 24 * 3600);
    let access = r.body["access_token"].as_str().unwrap();
    let claims = app.state.tokens.verify(access).unwrap();
    assert_eq!(claims.sub, user["id"].as_str().unwrap());
    let me = app.me(access).await;
    assert_eq!(me.status, StatusCode::OK);
    assert_eq!(me.body["id"], user["id"]);
    assert!(
        me.body["last_seen_at"].is_string(),
        "login marks the user as seen"
    );
    assert_eq!(
        app.metric("vigil_auth_logins_total", r#"result="success""#),
        1.0
    );
    assert_eq!(
        app.metric("vigil_auth_registrations_total", r#"result="created""#),
        1.0
    );
}

async fn registration_input_errors(app: &TestApp) {
    let reg = |body: Value| app.call("POST", "/auth/register", None, Some(body));
    assert_error(
        &reg(json!({"email": "not-an-email", "password": PASSWORD})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &reg(json!({"email": "a@example.com", "password": "short"})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &reg(json!({"email": "a@example.com", "password": "x".repeat(129)})).await,
        400,
        "invalid_input",
    );
    let r = reg(json!({"email": "a@example.com", "password": PASSWORD, "role": "admin"})).await;
    assert_error(&r, 400, "invalid_input");
    assert!(
        r.body["message"]
            .as_str()
            .unwrap()
            .contains("unknown field `role`"),
        "{}",
        r.body
    );
    assert_error(
        &reg(json!({"email": "a@example.com"})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &reg(json!({"email": 5, "password": PASSWORD})).await,
        400,
        "invalid_input",
    );
    assert_error(&reg(json!([1, 2])).await, 400, "invalid_input");
    let raw = |ct: Option<&str>, body: String| {
        let mut req = Request::builder().method("POST").uri("/auth/register");
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        app.send(req.body(Body::from(body)).unwrap())
    };
    assert_error(
        &raw(Some("application/json"), "{\"email\":".into()).await,
        400,
        "malformed_json",
    );
    assert_error(
        &raw(Some("text/plain"), "{}".into()).await,
        415,
        "unsupported_media_type",
    );
    assert_error(&raw(None, "{}".into()).await, 415, "unsupported_media_type");
    let huge = json!({"email": "a@example.com", "password": "x".repeat(70_000)}).to_string();
    assert_error(
        &raw(Some("application/json"), huge).await,
        413,
        "payload_too_large",
    );
    assert_eq!(
        app.metric(
            "vigil_auth_registrations_total",
            r#"result="invalid_input""#
        ),
        3.0
    );
    // Nothing was created by any of it.
    let (_, admin) = app.admin().await;
    let users = app.call("GET", "/users", Some(&admin), None).await;
    assert_eq!(users.body["items"].as_array().unwrap().len(), 1);
}

async fn duplicate_email_is_a_bare_409(app: &TestApp) {
    app.register("dup@example.com").await;
    let r = app
        .call(
            "POST",
            "/auth/register",
            None,
            Some(json!({"email": "DUP@example.com", "password": PASSWORD})),
        )
        .await;
    assert_error(&r, 409, "conflict");
    let msg = r.body["message"].as_str().unwrap();
    assert!(
        !msg.contains("dup@") && !msg.contains("DUP@"),
        "the message does not echo the account: {msg}"
    );
    assert_eq!(
        app.metric("vigil_auth_registrations_total", r#"result="conflict""#),
        1.0
    );
}

async fn login_failures_look_alike(app: &TestApp) {
    app.register("known@example.com").await;
    let unknown = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({"email": "nobody@example.com", "password": PASSWORD})),
        )
        .await;
    let wrong = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({"email": "known@example.com", "password": "wrong password!!"})),
        )
        .await;
    assert_error(&unknown, 401, "unauthorized");
    assert_error(&wrong, 401, "unauthorized");
    assert_eq!(unknown.body["message"], wrong.body["message"]);
    assert_eq!(
        unknown.headers.get("www-authenticate"),
        wrong.headers.get("www-authenticate")
    );
    assert_eq!(
        app.metric("vigil_auth_logins_total", r#"result="invalid_credentials""#),
        2.0
    );
    // Both did one argon2 computation, like a successful login (plus the registration's hash).
    let hashes = app.state.metrics.password_hash_duration.get_sample_count();
    assert_eq!(hashes, 3);
}

async fn disabled_account_cannot_log_in_or_refresh(app: &TestApp) {
    let (_, admin) = app.admin().await;
    let (id, access, refresh) = app.user("dis@example.com").await;
    let r = app
        .call(
            "PATCH",
            &format!("/users/{id}"),
            Some(&admin),
            Some(json!({"disabled": true})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(r.body["disabled"], true);
    assert_error(&app.login("dis@example.com").await, 403, "forbidden");
    assert_eq!(
        app.metric("vigil_auth_logins_total", r#"result="disabled""#),
        1.0
    );
    assert_error(&app.refresh(&refresh).await, 401, "unauthorized");
    assert_error(&app.me(&access).await, 401, "unauthorized");
    // A wrong password on a disabled account says nothing about the account.
    let r = app
        .call(
            "POST",
            "/auth/login",
            None,
            Some(json!({"email": "dis@example.com", "password": "wrong password!!"})),
        )
        .await;
    assert_error(&r, 401, "unauthorized");
    // Enabled again: login works, the old sessions stay revoked.
    let r = app
        .call(
            "PATCH",
            &format!("/users/{id}"),
            Some(&admin),
            Some(json!({"disabled": false})),
        )
        .await;
    assert_eq!(r.body["disabled"], false);
    assert_eq!(app.login("dis@example.com").await.status, StatusCode::OK);
    assert_error(&app.me(&access).await, 401, "unauthorized");
}

async fn refresh_rotates_the_token(app: &TestApp) {
    let (id, _, refresh) = app.user("rot@example.com").await;
    let r = app.refresh(&refresh).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let new_refresh = r.body["refresh_token"].as_str().unwrap();
    assert_ne!(new_refresh, refresh);
    let access = r.body["access_token"].as_str().unwrap();
    assert_eq!(app.me(access).await.body["id"], id.as_str());
    let again = app.refresh(new_refresh).await;
    assert_eq!(
        again.status,
        StatusCode::OK,
        "the new token is good for one more refresh"
    );
    assert_error(&app.refresh("made-up").await, 401, "unauthorized");
    assert_error(
        &app.call("POST", "/auth/refresh", None, Some(json!({})))
            .await,
        400,
        "invalid_input",
    );
    assert_eq!(
        app.metric("vigil_auth_token_refreshes_total", r#"result="success""#),
        2.0
    );
    assert_eq!(
        app.metric("vigil_auth_token_refreshes_total", r#"result="invalid""#),
        1.0
    );
}

async fn replayed_refresh_token_revokes_the_family(app: &TestApp) {
    let (_, _, first) = app.user("replay@example.com").await;
    let r = app.refresh(&first).await;
    let second = r.body["refresh_token"].as_str().unwrap().to_owned();
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    // The attacker (or the victim) replays the rotated token: 401, and the family is revoked.
    let replay = app.refresh(&first).await;
    assert_error(&replay, 401, "unauthorized");
    let r = app.refresh(&second).await;
    assert_error(&r, 401, "unauthorized");
    assert_error(&app.me(&access).await, 401, "unauthorized");
    assert_eq!(
        app.metric("vigil_auth_refresh_reuse_detected_total", ""),
        1.0
    );
    // Other sessions of the same user are untouched.
    let other = app.login("replay@example.com").await;
    let r = app
        .refresh(other.body["refresh_token"].as_str().unwrap())
        .await;
    assert_eq!(r.status, StatusCode::OK);
}

async fn concurrent_refreshes_with_one_token_let_one_through(app: &TestApp) {
    let (_, _, refresh) = app.user("race@example.com").await;
    let body = json!({"refresh_token": refresh});
    let (a, b) = tokio::join!(
        app.call("POST", "/auth/refresh", None, Some(body.clone())),
        app.call("POST", "/auth/refresh", None, Some(body.clone())),
    );
    let ok = [&a, &b]
        .iter()
        .filter(|r| r.status == StatusCode::OK)
        .count();
    assert_eq!(
        ok, 1,
        "exactly one of two concurrent refreshes wins: {} / {}",
        a.body, b.body
    );
    // The loser looked like a replay, so the winner's token is revoked too.
    let winner = if a.status == StatusCode::OK { &a } else { &b };
    let r = app
        .refresh(winner.body["refresh_token"].as_str().unwrap())
        .await;
    assert_error(&r, 401, "unauthorized");
}

const DAY_MS: i64 = 24 * 3600 * 1000;

async fn a_session_ends_at_its_absolute_end(app: &TestApp) {
    let (_, _, first) = app.user("end@example.com").await;
    let (created, expires, end) = app.session_times(&first).await;
    assert_eq!(end, created + 30 * DAY_MS, "the end is fixed at login");
    assert_eq!(expires, created + 7 * DAY_MS);
    // Every refresh gives a fresh refresh token, and none moves the end.
    let mut token = first;
    for _ in 0..3 {
        let r = app.refresh(&token).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        let next = r.body["refresh_token"].as_str().unwrap().to_owned();
        assert_ne!(next, token);
        token = next;
        assert_eq!(
            app.session_times(&token).await.2,
            end,
            "a refresh never moves the end"
        );
    }
    // A minute before the end the refresh works, and its token expires at the end, not in 7 days.
    let soon = auth::db::now_ms() + 60_000;
    app.set_session(&token, "absolute_expires_at", soon).await;
    let r = app.refresh(&token).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let secs = r.body["refresh_expires_in"].as_u64().unwrap();
    assert!((50..=60).contains(&secs), "capped at the end: {secs}");
    token = r.body["refresh_token"].as_str().unwrap().to_owned();
    let (_, expires, end) = app.session_times(&token).await;
    assert_eq!((expires, end), (soon, soon), "capped at the end");
    // Past the end a fresh, never-used refresh token is refused like an expired one.
    app.set_session(&token, "absolute_expires_at", auth::db::now_ms() - 1)
        .await;
    let ended = app.refresh(&token).await;
    assert_error(&ended, 401, "unauthorized");
    let (_, _, other) = app.user("expired@example.com").await;
    app.set_session(&other, "expires_at", auth::db::now_ms() - 1)
        .await;
    let expired = app.refresh(&other).await;
    assert_error(&expired, 401, "unauthorized");
    assert_eq!(ended.body["message"], expired.body["message"]);
    assert_eq!(
        app.metric("vigil_auth_token_refreshes_total", r#"result="invalid""#),
        2.0
    );
    assert_eq!(
        app.metric("vigil_auth_refresh_reuse_detected_total", ""),
        0.0
    );
}

async fn the_session_lifetime_comes_from_the_config(app: &TestApp) {
    let short = TestApp::with_config(app.kind, |c| c.tokens.session_max_lifetime_secs = 3)
        .await
        .unwrap();
    short.register("brief@example.com").await;
    let r = short.login("brief@example.com").await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        r.body["refresh_expires_in"], 3,
        "capped at the session's end"
    );
    let first = r.body["refresh_token"].as_str().unwrap().to_owned();
    let (created, expires, end) = short.session_times(&first).await;
    assert_eq!((expires, end), (created + 3000, created + 3000));
    // Before the end: a refresh works and gives a fresh token, still expiring at the end.
    let r = short.refresh(&first).await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert!(r.body["refresh_expires_in"].as_u64().unwrap() <= 3);
    let second = r.body["refresh_token"].as_str().unwrap().to_owned();
    assert_ne!(second, first);
    assert_eq!(short.session_times(&second).await, (created, end, end));
    // After the end: refused, though `second` was issued moments ago and never used.
    let wait = u64::try_from(end - auth::db::now_ms() + 50).unwrap_or(0);
    tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
    assert_error(&short.refresh(&second).await, 401, "unauthorized");
    // A new login starts a new session.
    assert_eq!(
        short.login("brief@example.com").await.status,
        StatusCode::OK
    );
    short.cleanup().await;
}

async fn logout_revokes_the_session(app: &TestApp) {
    let (_, access, refresh) = app.user("bye@example.com").await;
    let r = app.logout(&refresh).await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
    assert_error(&app.refresh(&refresh).await, 401, "unauthorized");
    assert_error(&app.me(&access).await, 401, "unauthorized");
    // Unknown tokens get the same answer: logout is no oracle.
    let r = app.logout("never-issued").await;
    assert_eq!(r.status, StatusCode::NO_CONTENT);
}

async fn access_token_errors(app: &TestApp) {
    let (id, access, _) = app.user("tok@example.com").await;
    let r = app.call("GET", "/auth/me", None, None).await;
    assert_error(&r, 401, "unauthorized");
    assert_eq!(r.headers.get("www-authenticate").unwrap(), "Bearer");
    assert_error(&app.me("garbage").await, 401, "unauthorized");
    let basic = app
        .send(
            Request::get("/auth/me")
                .header("authorization", format!("Basic {access}"))
                .body(Body::empty())
                .unwrap(),
        )
        .await;
    assert_error(&basic, 401, "unauthorized");
    // A token for a live session but issued long ago.
    let claims = app.state.tokens.verify(&access).unwrap();
    let (expired, _) = app
        .state
        .tokens
        .issue(&id, "user", &claims.sid, claims.iat - 3600)
        .unwrap();
    let r = app.me(&expired).await;
    assert_error(&r, 401, "unauthorized");
    assert!(
        r.body["message"].as_str().unwrap().contains("expired"),
        "{}",
        r.body
    );
    // Tampered: claims changed, signature kept.
    let parts: Vec<&str> = access.split('.').collect();
    let forged = format!("{}.{}.{}", parts[0], parts[2], parts[2]);
    assert_error(&app.me(&forged).await, 401, "unauthorized");
    // A valid token for a user that no longer exists.
    let (admin_id, admin) = app.admin().await;
    assert_eq!(
        app.call("DELETE", &format!("/users/{id}"), Some(&admin), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_error(&app.me(&access).await, 401, "unauthorized");
    assert_ne!(admin_id, id);
}

async fn content_crud_and_visibility(app: &TestApp) {
    let (alice_id, alice, _) = app.user("alice@example.com").await;
    let (_, bob, _) = app.user("bob@example.com").await;
    let (_, admin) = app.admin().await;
    let create = |token: String, body: Value| async move {
        app.call("POST", "/content", Some(&token), Some(body)).await
    };
    let draft = create(
        alice.clone(),
        json!({"title": "  Draft  ", "body": "secret"}),
    )
    .await;
    assert_eq!(draft.status, StatusCode::CREATED, "{}", draft.body);
    assert_eq!(draft.body["status"], "draft");
    assert_eq!(draft.body["title"], "Draft");
    assert_eq!(draft.body["owner_id"], alice_id.as_str());
    let public = create(
        alice.clone(),
        json!({"title": "Public", "body": "hi", "status": "published"}),
    )
    .await;
    let (draft_id, public_id) = (
        draft.body["id"].as_str().unwrap(),
        public.body["id"].as_str().unwrap(),
    );

    let titles = |r: &Resp| -> Vec<String> {
        r.body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["title"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        titles(&app.call("GET", "/content", Some(&alice), None).await),
        vec!["Public", "Draft"]
    );
    assert_eq!(
        titles(&app.call("GET", "/content", Some(&bob), None).await),
        vec!["Public"]
    );
    assert_eq!(
        titles(&app.call("GET", "/content", Some(&admin), None).await),
        vec!["Public", "Draft"]
    );

    let path = |id: &str| format!("/content/{id}");
    assert_eq!(
        app.call("GET", &path(draft_id), Some(&alice), None)
            .await
            .body["body"],
        "secret"
    );
    assert_error(
        &app.call("GET", &path(draft_id), Some(&bob), None).await,
        404,
        "not_found",
    );
    assert_eq!(
        app.call("GET", &path(public_id), Some(&bob), None)
            .await
            .status,
        StatusCode::OK
    );
    // Bob cannot change what he cannot see (404) nor what he can see but does not own (403).
    assert_error(
        &app.call(
            "PATCH",
            &path(draft_id),
            Some(&bob),
            Some(json!({"title": "x"})),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        &app.call("DELETE", &path(draft_id), Some(&bob), None).await,
        404,
        "not_found",
    );
    assert_error(
        &app.call(
            "PATCH",
            &path(public_id),
            Some(&bob),
            Some(json!({"title": "x"})),
        )
        .await,
        403,
        "forbidden",
    );
    assert_error(
        &app.call("DELETE", &path(public_id), Some(&bob), None).await,
        403,
        "forbidden",
    );

    let r = app
        .call(
            "PATCH",
            &path(draft_id),
            Some(&alice),
            Some(json!({"status": "published", "body": "now public"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    assert_eq!(
        (r.body["status"].as_str(), r.body["title"].as_str()),
        (Some("published"), Some("Draft"))
    );
    assert_eq!(
        app.call("GET", &path(draft_id), Some(&bob), None)
            .await
            .body["body"],
        "now public"
    );
    let r = app
        .call(
            "PATCH",
            &path(public_id),
            Some(&admin),
            Some(json!({"title": "Moderated"})),
        )
        .await;
    assert_eq!(r.body["title"], "Moderated");
    assert_eq!(
        app.call("DELETE", &path(public_id), Some(&admin), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        app.call("DELETE", &path(draft_id), Some(&alice), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_error(
        &app.call("GET", &path(draft_id), Some(&alice), None).await,
        404,
        "not_found",
    );
    assert!(titles(&app.call("GET", "/content", Some(&admin), None).await).is_empty());
    // Anonymous callers get nothing.
    assert_error(
        &app.call("GET", "/content", None, None).await,
        401,
        "unauthorized",
    );
}

async fn content_input_errors(app: &TestApp) {
    let (_, token, _) = app.user("input@example.com").await;
    let create = |body: Value| app.call("POST", "/content", Some(&token), Some(body));
    assert_error(&create(json!({"title": ""})).await, 400, "invalid_input");
    assert_error(&create(json!({"title": "   "})).await, 400, "invalid_input");
    assert_error(
        &create(json!({"title": "t".repeat(201)})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &create(json!({"title": "ok", "body": "b".repeat(50_001)})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &create(json!({"title": "ok", "status": "secret"})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &create(json!({"title": "ok", "owner_id": "someone"})).await,
        400,
        "invalid_input",
    );
    assert_error(
        &app.call("GET", "/content/not-a-uuid", Some(&token), None)
            .await,
        400,
        "invalid_id",
    );
    assert_error(
        &app.call("GET", "/content/%FF%FE", Some(&token), None).await,
        400,
        "invalid_id",
    );
    let missing = format!("/content/{}", uuid::Uuid::new_v4());
    assert_error(
        &app.call("GET", &missing, Some(&token), None).await,
        404,
        "not_found",
    );
    assert_error(
        &app.call("PATCH", &missing, Some(&token), Some(json!({"title": "x"})))
            .await,
        404,
        "not_found",
    );
    let item = create(json!({"title": "ok"})).await;
    let path = format!("/content/{}", item.body["id"].as_str().unwrap());
    assert_error(
        &app.call("PATCH", &path, Some(&token), Some(json!({})))
            .await,
        400,
        "invalid_input",
    );
    assert_error(
        &app.call("PATCH", &path, Some(&token), Some(json!({"title": ""})))
            .await,
        400,
        "invalid_input",
    );
    assert_eq!(
        app.call("GET", &path, Some(&token), None).await.body["title"],
        "ok",
        "a refused patch changes nothing"
    );
}

async fn content_pagination(app: &TestApp) {
    let (_, token, _) = app.user("pages@example.com").await;
    // Twelve items in quick succession: several share a millisecond, and still come back in
    // creation order.
    for i in 0..12 {
        let r = app
            .call(
                "POST",
                "/content",
                Some(&token),
                Some(json!({"title": format!("item {i}")})),
            )
            .await;
        assert_eq!(r.status, StatusCode::CREATED);
    }
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let url = match &cursor {
            Some(c) => format!("/content?limit=5&cursor={c}"),
            None => "/content?limit=5".to_owned(),
        };
        let r = app.call("GET", &url, Some(&token), None).await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        pages += 1;
        seen.extend(
            r.body["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| i["title"].as_str().unwrap().to_owned()),
        );
        match r.body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_owned()),
            None => break,
        }
        assert!(pages < 10, "pagination must end");
    }
    assert_eq!(pages, 3);
    let newest_first: Vec<String> = (0..12).rev().map(|i| format!("item {i}")).collect();
    assert_eq!(seen, newest_first, "newest first, each once");
    let get = |url: &'static str| app.call("GET", url, Some(&token), None);
    assert_error(&get("/content?limit=0").await, 400, "invalid_input");
    assert_error(&get("/content?limit=101").await, 400, "invalid_input");
    assert_error(&get("/content?limit=many").await, 400, "invalid_input");
    assert_error(&get("/content?cursor=bogus").await, 400, "invalid_input");
    assert_error(&get("/content?page=2").await, 400, "invalid_input");
    assert_eq!(
        get("/content?limit=100").await.body["items"]
            .as_array()
            .unwrap()
            .len(),
        12
    );
}

async fn admin_user_management(app: &TestApp) {
    let (admin_id, admin) = app.admin().await;
    let (carol_id, carol, _) = app.user("carol@example.com").await;
    app.call(
        "POST",
        "/content",
        Some(&carol),
        Some(json!({"title": "carol's"})),
    )
    .await;
    assert_error(
        &app.call("GET", "/users", Some(&carol), None).await,
        403,
        "forbidden",
    );
    assert_error(
        &app.call(
            "PATCH",
            &format!("/users/{carol_id}"),
            Some(&carol),
            Some(json!({"role": "admin"})),
        )
        .await,
        403,
        "forbidden",
    );
    let list = app.call("GET", "/users?limit=1", Some(&admin), None).await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body["items"][0]["email"], "carol@example.com");
    let next = list.body["next_cursor"].as_str().unwrap();
    let page2 = app
        .call(
            "GET",
            &format!("/users?limit=1&cursor={next}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(page2.body["items"][0]["id"], admin_id.as_str());
    assert!(page2.body["next_cursor"].is_null());

    let user = |id: &str| format!("/users/{id}");
    let r = app
        .call(
            "PATCH",
            &user(&carol_id),
            Some(&admin),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.body["role"], "admin");
    assert_eq!(
        app.call("GET", "/users", Some(&carol), None).await.status,
        StatusCode::OK,
        "the new role applies at once"
    );
    app.call(
        "PATCH",
        &user(&carol_id),
        Some(&admin),
        Some(json!({"role": "user"})),
    )
    .await;
    assert_error(
        &app.call("GET", "/users", Some(&carol), None).await,
        403,
        "forbidden",
    );

    assert_error(
        &app.call(
            "PATCH",
            &user(&admin_id),
            Some(&admin),
            Some(json!({"role": "user"})),
        )
        .await,
        409,
        "conflict",
    );
    assert_error(
        &app.call(
            "PATCH",
            &user(&admin_id),
            Some(&admin),
            Some(json!({"disabled": true})),
        )
        .await,
        409,
        "conflict",
    );
    assert_error(
        &app.call("DELETE", &user(&admin_id), Some(&admin), None)
            .await,
        409,
        "conflict",
    );
    assert_error(
        &app.call("PATCH", &user(&carol_id), Some(&admin), Some(json!({})))
            .await,
        400,
        "invalid_input",
    );
    assert_error(
        &app.call(
            "PATCH",
            &user(&carol_id),
            Some(&admin),
            Some(json!({"role": "root"})),
        )
        .await,
        400,
        "invalid_input",
    );
    assert_error(
        &app.call(
            "PATCH",
            "/users/xyz",
            Some(&admin),
            Some(json!({"role": "user"})),
        )
        .await,
        400,
        "invalid_id",
    );
    let ghost = uuid::Uuid::new_v4().to_string();
    assert_error(
        &app.call(
            "PATCH",
            &user(&ghost),
            Some(&admin),
            Some(json!({"role": "user"})),
        )
        .await,
        404,
        "not_found",
    );
    assert_error(
        &app.call("DELETE", &user(&ghost), Some(&admin), None).await,
        404,
        "not_found",
    );

    assert_eq!(
        app.call("DELETE", &user(&carol_id), Some(&admin), None)
            .await
            .status,
        StatusCode::NO_CONTENT
    );
    assert_error(&app.login("carol@example.com").await, 401, "unauthorized");
    let left = app.call("GET", "/content", Some(&admin), None).await;
    assert!(
        left.body["items"].as_array().unwrap().is_empty(),
        "the user's content went with them"
    );
    // The email is free again.
    app.register("carol@example.com").await;
}

async fn the_last_admin_cannot_be_removed(app: &TestApp) {
    use auth::store::{Guarded, delete_user, update_user};
    let (admin_id, admin) = app.admin().await;
    // The API refuses an admin's removal of themselves before it reaches the database...
    for how in ["demote", "disable", "delete"] {
        let r = app.remove_admin(&admin, &admin_id, how).await;
        assert_error(&r, 409, "conflict");
    }
    // ...and the statements themselves never remove the last enabled admin.
    let db = &app.state.db;
    let now = auth::db::now_ms();
    let demote = update_user(db, &admin_id, Role::User, None, now).await;
    assert!(matches!(demote, Ok(Guarded::LastAdmin)), "{demote:?}");
    assert_eq!(app.enabled_admins().await, 1, "demoting the last admin");
    let disable = update_user(db, &admin_id, Role::Admin, Some(now), now).await;
    assert!(matches!(disable, Ok(Guarded::LastAdmin)), "{disable:?}");
    assert_eq!(app.enabled_admins().await, 1, "disabling the last admin");
    let delete = delete_user(db, &admin_id).await;
    assert!(matches!(delete, Ok(Guarded::LastAdmin)), "{delete:?}");
    assert_eq!(app.enabled_admins().await, 1, "deleting the last admin");
    assert_eq!(
        app.me(&admin).await.status,
        StatusCode::OK,
        "a refused disable revokes no session"
    );
    let keep = update_user(db, &admin_id, Role::Admin, None, now).await;
    assert!(
        matches!(keep, Ok(Guarded::Done(_))),
        "a change that keeps the admin: {keep:?}"
    );
    let ghost = uuid::Uuid::new_v4().to_string();
    let missing = update_user(db, &ghost, Role::User, None, now).await;
    assert!(matches!(missing, Ok(Guarded::NotFound)), "{missing:?}");
    let missing = delete_user(db, &ghost).await;
    assert!(matches!(missing, Ok(Guarded::NotFound)), "{missing:?}");
    // With a second enabled admin, either may go; then the other is the last one.
    let (dave_id, _, _) = app.user("dave@example.com").await;
    let r = app
        .call(
            "PATCH",
            &format!("/users/{dave_id}"),
            Some(&admin),
            Some(json!({"role": "admin"})),
        )
        .await;
    assert_eq!(r.status, StatusCode::OK, "{}", r.body);
    let disable = update_user(db, &admin_id, Role::Admin, Some(now), now).await;
    assert!(matches!(disable, Ok(Guarded::Done(_))), "{disable:?}");
    assert_eq!(app.enabled_admins().await, 1, "one of two admins disabled");
    assert_error(&app.me(&admin).await, 401, "unauthorized");
    let delete = delete_user(db, &dave_id).await;
    assert!(
        matches!(delete, Ok(Guarded::LastAdmin)),
        "a disabled admin does not count: {delete:?}"
    );
    assert_eq!(app.enabled_admins().await, 1);
    // Non-admins and disabled admins are never held back.
    let (erin_id, _, _) = app.user("erin@example.com").await;
    let disable = update_user(db, &erin_id, Role::User, Some(now), now).await;
    assert!(matches!(disable, Ok(Guarded::Done(_))), "{disable:?}");
    let delete = delete_user(db, &erin_id).await;
    assert!(matches!(delete, Ok(Guarded::Done(()))), "{delete:?}");
    let delete = delete_user(db, &admin_id).await;
    assert!(
        matches!(delete, Ok(Guarded::Done(()))),
        "the disabled admin: {delete:?}"
    );
    assert_eq!(app.enabled_admins().await, 1);
}

/// Two admins take each other out at the same moment, with every pair of demote, disable and
/// delete: one of them wins, the other is refused, and an enabled admin is left.
async fn concurrent_cross_removals_leave_an_admin(app: &TestApp) {
    let (mut keeper_id, mut keeper) = app.admin().await;
    let ways = ["demote", "disable", "delete"];
    let mut refused_by_the_guard = 0;
    for round in 0..9 {
        let (a_how, b_how) = (ways[round % 3], ways[round / 3]);
        let (other_id, other, _) = app.user(&format!("admin{round}@example.com")).await;
        let r = app
            .call(
                "PATCH",
                &format!("/users/{other_id}"),
                Some(&keeper),
                Some(json!({"role": "admin"})),
            )
            .await;
        assert_eq!(r.status, StatusCode::OK, "{}", r.body);
        assert_eq!(app.enabled_admins().await, 2);
        let (a, b) = tokio::join!(
            app.remove_admin(&keeper, &other_id, a_how),
            app.remove_admin(&other, &keeper_id, b_how),
        );
        let what = format!("round {round} ({a_how} / {b_how}): {} / {}", a.body, b.body);
        assert_eq!(app.enabled_admins().await, 1, "{what}");
        let won = |r: &Resp| r.status.is_success();
        assert!(won(&a) != won(&b), "exactly one wins: {what}");
        let loser = if won(&a) { &b } else { &a };
        // Refused by the last-admin check (409), or, when the winner was quicker than the
        // loser's authentication, because the loser is no admin (403) or no user (401) any more.
        match loser.status.as_u16() {
            409 => {
                assert_error(loser, 409, "conflict");
                refused_by_the_guard += 1;
            }
            403 => assert_error(loser, 403, "forbidden"),
            _ => assert_error(loser, 401, "unauthorized"),
        }
        if !won(&a) {
            (keeper_id, keeper) = (other_id, other);
        }
    }
    eprintln!("{refused_by_the_guard} of 9 races were decided by the last-admin check");
}

async fn system_endpoints(app: &TestApp) {
    assert_eq!(
        app.call("GET", "/health", None, None).await.body,
        json!({"status": "ok"})
    );
    assert_eq!(
        app.call("GET", "/ready", None, None).await.body,
        json!({"status": "ok"})
    );
    let jwks = app.call("GET", "/.well-known/jwks.json", None, None).await;
    let key = &jwks.body["keys"][0];
    assert_eq!(
        (
            key["kty"].as_str(),
            key["crv"].as_str(),
            key["alg"].as_str()
        ),
        (Some("OKP"), Some("Ed25519"), Some("EdDSA"))
    );
    let (_, access, _) = app.user("jwks@example.com").await;
    let header = jsonwebtoken::decode_header(&access).unwrap();
    assert_eq!(header.kid.as_deref(), key["kid"].as_str());
    // The JWKS alone verifies the token: what the proxy will do.
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.clone()).unwrap();
    let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    v.set_audience(&["vigil"]);
    v.set_issuer(&["vigil-auth"]);
    let decoded = jsonwebtoken::decode::<Value>(
        &access,
        &jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap(),
        &v,
    )
    .unwrap();
    for claim in ["iss", "aud", "sub", "role", "iat", "nbf", "exp", "jti"] {
        assert!(
            decoded.claims.get(claim).is_some(),
            "claim {claim} is part of the contract"
        );
    }
    let doc = app.call("GET", "/openapi.json", None, None).await;
    let paths = doc.body["paths"].as_object().unwrap();
    for p in [
        "/auth/register",
        "/auth/login",
        "/auth/refresh",
        "/auth/logout",
        "/auth/me",
        "/content",
        "/content/{id}",
        "/users",
        "/users/{id}",
        "/health",
        "/ready",
    ] {
        assert!(paths.contains_key(p), "openapi documents {p}");
    }
    assert!(doc.body["components"]["securitySchemes"]["bearer"].is_object());
    for patch in ["ContentPatch", "UserPatch"] {
        assert_eq!(
            doc.body["components"]["schemas"][patch]["minProperties"], 1,
            "{patch}: a PATCH body names at least one field"
        );
        assert!(doc.body["components"]["schemas"][patch]["maxProperties"].is_null());
    }
    // Readiness follows the database.
    app.state.db.pool.close().await;
    assert_error(
        &app.call("GET", "/ready", None, None).await,
        503,
        "unavailable",
    );
}

async fn unknown_routes_and_methods(app: &TestApp) {
    assert_error(
        &app.call("GET", "/nope", None, None).await,
        404,
        "not_found",
    );
    assert_error(
        &app.call("PUT", "/content", None, None).await,
        405,
        "method_not_allowed",
    );
    assert_error(
        &app.call("GET", "/auth/login", None, None).await,
        405,
        "method_not_allowed",
    );
}

async fn request_ids_are_propagated_or_made(app: &TestApp) {
    let with = |id: &str| {
        app.send(
            Request::get("/nope")
                .header("x-request-id", id)
                .body(Body::empty())
                .unwrap(),
        )
    };
    let r = with("edge-abc.123").await;
    assert_eq!(r.headers.get("x-request-id").unwrap(), "edge-abc.123");
    assert_eq!(r.body["request_id"], "edge-abc.123");
    let r = with("bad id with spaces").await;
    let made = r.headers.get("x-request-id").unwrap().to_str().unwrap();
    assert_ne!(made, "bad id with spaces");
    assert_eq!(made.len(), 32);
    assert_eq!(
        app.call("GET", "/health", None, None)
            .await
            .headers
            .get("x-request-id")
            .unwrap()
            .len(),
        32
    );
}

async fn metrics_count_requests_by_route(app: &TestApp) {
    let (_, token, _) = app.user("metrics@example.com").await;
    for _ in 0..3 {
        app.call(
            "GET",
            &format!("/content/{}", uuid::Uuid::new_v4()),
            Some(&token),
            None,
        )
        .await;
    }
    app.call("GET", "/no/such/path", None, None).await;
    let text = auth::api::admin_router(app.state.clone())
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    assert_eq!(text.status(), StatusCode::OK);
    let text = String::from_utf8(
        text.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec(),
    )
    .unwrap();
    assert!(text.contains(r#"vigil_auth_http_requests_total{method="GET",route="/content/{id}",status_class="4xx"} 3"#), "{text}");
    assert!(text.contains(
        r#"vigil_auth_http_requests_total{method="GET",route="unmatched",status_class="4xx"} 1"#
    ));
    assert!(text.contains(
        r#"vigil_auth_http_requests_total{method="POST",route="/auth/login",status_class="2xx"} 1"#
    ));
    assert!(text.contains("vigil_auth_http_request_duration_seconds_bucket"));
    assert!(
        text.contains("vigil_auth_password_hash_duration_seconds_count 2"),
        "register + login"
    );
    assert!(
        !text.contains("metrics@example.com") && !text.contains(&token),
        "no ids or secrets in labels"
    );
}

async fn key_rotation_keeps_old_tokens_valid(app: &TestApp) {
    let (_, before, _) = app.user("keys@example.com").await;
    let old_kid = app.state.tokens.current_kid();
    let (new_kid, previous) = auth::rotate_keys(&app.state.config).unwrap();
    assert_eq!(previous.as_deref(), Some(old_kid.as_str()));
    // The running service notices the rotated file (the background task calls this).
    let file = std::fs::File::options()
        .append(true)
        .open(&app.state.config.tokens.keys_path)
        .unwrap();
    file.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(3))
        .unwrap();
    assert!(app.state.tokens.reload_if_changed().unwrap());
    let jwks = app.call("GET", "/.well-known/jwks.json", None, None).await;
    let kids: Vec<_> = jwks.body["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, vec![new_kid.as_str(), old_kid.as_str()]);
    assert_eq!(app.me(&before).await.status, StatusCode::OK);
    let after = app.login("keys@example.com").await;
    let header = jsonwebtoken::decode_header(after.body["access_token"].as_str().unwrap()).unwrap();
    assert_eq!(header.kid, Some(new_kid));
}
