//! The database connection: one sqlx `AnyPool` for SQLite or PostgreSQL, chosen by the URL,
//! with the embedded migrations run at start.
//!
//! The same SQL runs on both backends (see `migrations/`): `$N` placeholders (sqlx's SQLite
//! driver accepts them), TEXT and BIGINT columns only, `RETURNING` and `ON CONFLICT` which
//! both support. Queries live in [`crate::store`].

use std::str::FromStr;
use std::time::Duration;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Executor};

/// Which backend a [`Db`] talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// A SQLite file.
    Sqlite,
    /// A PostgreSQL server.
    Postgres,
}

impl Backend {
    /// The backend as OpenTelemetry's `db.system` names it.
    pub fn system(self) -> &'static str {
        match self {
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgresql",
        }
    }
}

/// A failure to open or migrate the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The URL names no supported backend.
    #[error("unsupported database URL (expected sqlite: or postgres://)")]
    UnsupportedUrl,
    /// Creating the directory of a SQLite file failed.
    #[error("cannot create {dir}: {source}")]
    CreateDir {
        /// The directory.
        dir: String,
        /// The cause.
        source: std::io::Error,
    },
    /// Connecting failed.
    #[error("cannot connect to the {backend:?} database: {source}")]
    Connect {
        /// The backend.
        backend: Backend,
        /// The cause.
        source: sqlx::Error,
    },
    /// A migration failed.
    #[error("migrating the database failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// The pool and the backend it talks to.
#[derive(Clone, Debug)]
pub struct Db {
    /// The connection pool.
    pub pool: AnyPool,
    /// The backend behind the pool.
    pub backend: Backend,
}

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Db {
    /// Opens the database at `url` (creating a SQLite file and its directory if needed) and
    /// runs the migrations.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, DbError> {
        sqlx::any::install_default_drivers();
        let (backend, url) = if let Some(rest) = url.strip_prefix("sqlite:") {
            (Backend::Sqlite, sqlite_url(rest)?)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            (Backend::Postgres, url.to_owned())
        } else {
            return Err(DbError::UnsupportedUrl);
        };
        let connect = |source| DbError::Connect { backend, source };
        let options = AnyConnectOptions::from_str(&url).map_err(connect)?;
        let pool = AnyPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .after_connect(move |conn, _| {
                Box::pin(async move {
                    if backend == Backend::Sqlite {
                        // WAL lets readers run beside the writer; foreign keys make ON DELETE CASCADE work.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                             PRAGMA foreign_keys = ON; PRAGMA busy_timeout = 5000;",
                        )
                        .await?;
                    }
                    Ok(())
                })
            })
            .connect_with(options)
            .await
            .map_err(connect)?;
        MIGRATOR.run(&pool).await?;
        Ok(Self { pool, backend })
    }

    /// Whether the database answers a trivial query.
    pub async fn ping(&self) -> bool {
        sqlx::query("SELECT 1").execute(&self.pool).await.is_ok()
    }
}

/// `sqlite://path` → a URL that creates the file, after creating its directory.
fn sqlite_url(rest: &str) -> Result<String, DbError> {
    let path = rest.trim_start_matches("//");
    let (file, query) = path.split_once('?').unwrap_or((path, ""));
    let dir = std::path::Path::new(file)
        .parent()
        .filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir
        && file != ":memory:"
    {
        std::fs::create_dir_all(dir).map_err(|source| DbError::CreateDir {
            dir: dir.display().to_string(),
            source,
        })?;
    }
    Ok(match query {
        "" => format!("sqlite://{file}?mode=rwc"),
        q if q.contains("mode=") => format!("sqlite://{file}?{q}"),
        q => format!("sqlite://{file}?{q}&mode=rwc"),
    })
}

/// Milliseconds since the Unix epoch: the unit of every timestamp column.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlite_urls_create_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sub/vigil.db");
        let url = sqlite_url(&format!("//{}", file.display())).unwrap();
        assert_eq!(url, format!("sqlite://{}?mode=rwc", file.display()));
        assert!(file.parent().unwrap().is_dir());
        assert_eq!(
            sqlite_url("//x.db?mode=ro").unwrap(),
            "sqlite://x.db?mode=ro"
        );
    }

    #[tokio::test]
    async fn sqlite_database_is_created_and_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("data/vigil.db").display());
        let db = Db::connect(&url, 2).await.unwrap();
        assert_eq!(db.backend, Backend::Sqlite);
        assert!(db.ping().await);
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM users")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        assert_eq!(n, 0);
        // Opening again re-runs nothing and keeps the data.
        drop(db);
        let db = Db::connect(&url, 2).await.unwrap();
        assert!(db.ping().await);
    }

    #[tokio::test]
    async fn unsupported_urls_are_refused() {
        assert!(matches!(
            Db::connect("mysql://x", 1).await,
            Err(DbError::UnsupportedUrl)
        ));
    }
}
