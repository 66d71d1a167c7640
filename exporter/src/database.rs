//! The database collector: counts over the auth service's schema (`auth/migrations/`), read
//! only, on SQLite or PostgreSQL through sqlx's `Any` driver, like the service itself.
//!
//! - `vigil_users{role}`: accounts by role (`user`, `admin`; disabled ones included)
//! - `vigil_users_disabled`: accounts with `disabled_at` set
//! - `vigil_active_users{window}`: accounts seen in the last `5m`, `1h`, `24h`. "Seen" is
//!   `users.last_seen_at`, which the auth service writes at every login, every refresh and
//!   every authenticated request (the last at most once a minute per user,
//!   `store::touch_last_seen`): so an account counts from its last login, token refresh or
//!   signed-in call, to a resolution of one minute.
//! - `vigil_content_items{status}`: content by status (`draft`, `published`)
//! - `vigil_sessions_active`: sessions neither revoked nor expired (their current refresh
//!   token's expiry and their absolute end both still ahead)
//! - `vigil_database_up`: 1 when every query answered in this collection, else 0
//! - `vigil_database_query_duration_seconds{query}`: how long each query took
//!   (`users`, `active_users`, `content`, `sessions`)
//!
//! The connection is read-only: a SQLite file opens with `mode=ro` (never created) and
//! `PRAGMA query_only`, a PostgreSQL session is `READ ONLY` with a `statement_timeout` of the
//! collector's budget. The pool connects lazily, so the exporter starts while the database is
//! down and reports `vigil_database_up 0` until it answers.

use std::str::FromStr;
use std::time::{Duration, Instant};

use anyhow::Context;
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

use crate::{Collector, Sample};

/// The windows of `vigil_active_users`, label and length.
pub const WINDOWS: [(&str, i64); 3] = [("5m", 300), ("1h", 3600), ("24h", 86_400)];

const ROLES: [&str; 2] = ["user", "admin"];
const STATUSES: [&str; 2] = ["draft", "published"];

/// See the module documentation.
pub struct DatabaseCollector {
    pool: AnyPool,
    timeout: Duration,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The URL the collector connects with: a SQLite URL made read-only (and never creating the
/// file) unless it names a mode itself.
fn read_only_url(url: &str) -> anyhow::Result<(Backend, String)> {
    if let Some(rest) = url.strip_prefix("sqlite:") {
        let path = rest.trim_start_matches("//");
        let url = match path.split_once('?') {
            None => format!("sqlite://{path}?mode=ro"),
            Some((_, q)) if q.split('&').any(|kv| kv.starts_with("mode=")) => {
                format!("sqlite://{path}")
            }
            Some((file, q)) => format!("sqlite://{file}?{q}&mode=ro"),
        };
        Ok((Backend::Sqlite, url))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        Ok((Backend::Postgres, url.to_owned()))
    } else {
        anyhow::bail!("unsupported database URL (expected sqlite: or postgres://)")
    }
}

impl DatabaseCollector {
    /// A collector over `[database]`'s URL; connects on the first collection.
    pub fn new(config: &crate::config::Database) -> anyhow::Result<Self> {
        sqlx::any::install_default_drivers();
        let url = config.url().context("database: no URL")?;
        let (backend, url) = read_only_url(&url)?;
        let timeout = Duration::from_millis(config.timeout_ms);
        let options = AnyConnectOptions::from_str(&url).context("database.url")?;
        let statement_timeout = config.timeout_ms;
        let pool = AnyPoolOptions::new()
            .max_connections(config.max_connections)
            .min_connections(0)
            .acquire_timeout(timeout)
            .idle_timeout(Duration::from_secs(300))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    match backend {
                        Backend::Sqlite => {
                            conn.execute("PRAGMA query_only = ON; PRAGMA busy_timeout = 1000;")
                                .await?;
                        }
                        Backend::Postgres => {
                            conn.execute(
                                format!(
                                    "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY; \
                                     SET statement_timeout = {statement_timeout}"
                                )
                                .as_str(),
                            )
                            .await?;
                        }
                    }
                    Ok(())
                })
            })
            .connect_lazy_with(options);
        Ok(Self { pool, timeout })
    }

    /// Closes the pool.
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Counts keyed by a bounded label set: the expected keys always present (0 when absent),
/// anything else ignored.
async fn counts_by(
    pool: &AnyPool,
    sql: &str,
    keys: &[&'static str],
) -> sqlx::Result<Vec<(&'static str, i64)>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(sql).fetch_all(pool).await?;
    Ok(keys
        .iter()
        .map(|k| {
            let n = rows.iter().filter(|(v, _)| v == k).map(|(_, n)| n).sum();
            (*k, n)
        })
        .collect())
}

#[async_trait::async_trait]
impl Collector for DatabaseCollector {
    fn name(&self) -> &'static str {
        "database"
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn collect(&self, out: &mut Sample) -> anyhow::Result<()> {
        let up = out.gauge(
            "vigil_database_up",
            "Whether every query of the last collection answered (1) or not (0).",
        );
        up.set(0.0);
        let took = out.gauge_vec(
            "vigil_database_query_duration_seconds",
            "How long each query of the last collection took.",
            &["query"],
        );
        let users = out.gauge_vec("vigil_users", "Accounts by role.", &["role"]);
        let disabled = out.gauge("vigil_users_disabled", "Disabled accounts.");
        let active = out.gauge_vec(
            "vigil_active_users",
            "Accounts seen (login, refresh or signed-in request) within the window.",
            &["window"],
        );
        let content = out.gauge_vec(
            "vigil_content_items",
            "Content items by status.",
            &["status"],
        );
        let sessions = out.gauge(
            "vigil_sessions_active",
            "Sessions neither revoked nor expired.",
        );
        let now_ms = (crate::unix_now() * 1000.0) as i64;
        let pool = &self.pool;

        let t = Instant::now();
        let by_role = counts_by(
            pool,
            "SELECT role, COUNT(*) FROM users GROUP BY role",
            &ROLES,
        )
        .await
        .context("counting users")?;
        let n_disabled: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM users WHERE disabled_at IS NOT NULL")
                .fetch_one(pool)
                .await
                .context("counting disabled users")?;
        took.with_label_values(&["users"])
            .set(t.elapsed().as_secs_f64());
        for (role, n) in by_role {
            users.with_label_values(&[role]).set(n as f64);
        }
        disabled.set(n_disabled as f64);

        let t = Instant::now();
        let seen: (i64, i64, i64) = sqlx::query_as(
            "SELECT COUNT(CASE WHEN last_seen_at >= $1 THEN 1 END), \
                    COUNT(CASE WHEN last_seen_at >= $2 THEN 1 END), \
                    COUNT(CASE WHEN last_seen_at >= $3 THEN 1 END) FROM users",
        )
        .bind(now_ms - WINDOWS[0].1 * 1000)
        .bind(now_ms - WINDOWS[1].1 * 1000)
        .bind(now_ms - WINDOWS[2].1 * 1000)
        .fetch_one(pool)
        .await
        .context("counting active users")?;
        took.with_label_values(&["active_users"])
            .set(t.elapsed().as_secs_f64());
        for ((window, _), n) in WINDOWS.iter().zip([seen.0, seen.1, seen.2]) {
            active.with_label_values(&[window]).set(n as f64);
        }

        let t = Instant::now();
        let by_status = counts_by(
            pool,
            "SELECT status, COUNT(*) FROM content GROUP BY status",
            &STATUSES,
        )
        .await
        .context("counting content")?;
        took.with_label_values(&["content"])
            .set(t.elapsed().as_secs_f64());
        for (status, n) in by_status {
            content.with_label_values(&[status]).set(n as f64);
        }

        let t = Instant::now();
        let live: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM sessions WHERE revoked_at IS NULL AND expires_at > $1 \
             AND absolute_expires_at > $2",
        )
        .bind(now_ms)
        .bind(now_ms)
        .fetch_one(pool)
        .await
        .context("counting sessions")?;
        took.with_label_values(&["sessions"])
            .set(t.elapsed().as_secs_f64());
        sessions.set(live as f64);

        up.set(1.0);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_are_made_read_only() {
        let url = |u: &str| read_only_url(u).unwrap().1;
        assert_eq!(
            url("sqlite://data/vigil.db"),
            "sqlite://data/vigil.db?mode=ro"
        );
        assert_eq!(
            url("sqlite:data/vigil.db"),
            "sqlite://data/vigil.db?mode=ro"
        );
        assert_eq!(
            url("sqlite:///abs/v.db?cache=shared"),
            "sqlite:///abs/v.db?cache=shared&mode=ro"
        );
        assert_eq!(url("sqlite://v.db?mode=rw"), "sqlite://v.db?mode=rw");
        assert_eq!(url("postgres://u@h/db"), "postgres://u@h/db");
        assert!(read_only_url("mysql://x").is_err());
    }

    #[tokio::test]
    async fn a_missing_sqlite_file_is_down_and_never_created() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("vigil.db");
        let c = DatabaseCollector::new(&crate::config::Database::with_url(format!(
            "sqlite://{}",
            file.display()
        )))
        .unwrap();
        let mut out = Sample::new();
        assert!(c.collect(&mut out).await.is_err());
        let families = out.gather();
        let up = families
            .iter()
            .find(|f| f.name() == "vigil_database_up")
            .unwrap();
        assert_eq!(up.get_metric()[0].get_gauge().get_value(), 0.0);
        assert!(!file.exists());
    }
}
