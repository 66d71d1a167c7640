//! Vigil's auth and content service: accounts, sessions, Ed25519 access tokens with a JWKS,
//! and content CRUD, over SQLite or PostgreSQL.
//!
//! [`app`] builds the router over an [`AppState`] without any socket (what the tests drive);
//! [`Service`] binds the API and admin listeners and serves them until a shutdown future
//! resolves (what `vigil auth` and `vigil up` run).

pub mod api;
pub mod config;
pub mod db;
pub mod error;
pub mod metrics;
pub mod password;
pub mod store;
pub mod tokens;

use std::future::Future;
use std::net::SocketAddr;
use std::ops::Deref;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::net::TcpListener;

pub use config::Config;

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState(Arc<Inner>);

/// The parts of [`AppState`].
pub struct Inner {
    /// The loaded configuration.
    pub config: Config,
    /// The database.
    pub db: db::Db,
    /// Password hashing.
    pub passwords: password::Passwords,
    /// Token issuing and verification.
    pub tokens: tokens::Tokens,
    /// Metric families.
    pub metrics: metrics::Metrics,
    /// Span export, when `[tracing]` has an endpoint (flushed when the service stops).
    pub tracing: Option<telemetry::Pipeline>,
}

impl Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// A failure to start the service.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The database could not be opened or migrated.
    #[error("database: {0}")]
    Db(#[from] db::DbError),
    /// The signing keys could not be loaded or generated.
    #[error("signing keys: {0}")]
    Keys(#[from] tokens::KeyError),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        source: std::io::Error,
    },
}

impl AppState {
    /// Opens the database (running migrations) and loads or generates the signing keys.
    pub async fn open(
        config: Config,
        tracing: Option<telemetry::Pipeline>,
    ) -> Result<Self, StartError> {
        let db = db::Db::connect(&config.database_url(), config.database.max_connections).await?;
        Self::with_db_traced(config, db, tracing)
    }

    /// Builds the state over an already opened database (tests pass one per schema).
    pub fn with_db(config: Config, db: db::Db) -> Result<Self, StartError> {
        Self::with_db_traced(config, db, None)
    }

    /// Like [`Self::with_db`], with the span export pipeline whose counters it serves.
    pub fn with_db_traced(
        config: Config,
        db: db::Db,
        tracing: Option<telemetry::Pipeline>,
    ) -> Result<Self, StartError> {
        let metrics = match &tracing {
            Some(p) => metrics::Metrics::with_trace(p.counters().clone()),
            None => metrics::Metrics::new(),
        };
        let tokens = tokens::Tokens::load(&config.tokens)?;
        let passwords = password::Passwords::new(metrics.password_hash_duration.clone());
        Ok(Self(Arc::new(Inner {
            config,
            db,
            passwords,
            tokens,
            metrics,
            tracing,
        })))
    }
}

/// The API router.
pub fn app(state: AppState) -> Router {
    api::router(state)
}

/// The service with its listeners bound.
pub struct Service {
    state: AppState,
    api: TcpListener,
    admin: TcpListener,
}

impl Service {
    /// Opens the state and binds both listeners (port 0 picks a free port; see [`Self::api_addr`]).
    pub async fn bind(config: Config) -> Result<Self, StartError> {
        Self::bind_traced(config, None).await
    }

    /// Like [`Self::bind`], exporting spans through `tracing` (started by the caller, since the
    /// `tracing-opentelemetry` layer is installed with the process's subscriber).
    pub async fn bind_traced(
        config: Config,
        tracing: Option<telemetry::Pipeline>,
    ) -> Result<Self, StartError> {
        let (api_addr, admin_addr) = (config.listen.api, config.listen.admin);
        let state = AppState::open(config, tracing).await?;
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind { addr, source })
        };
        Ok(Self {
            state,
            api: bind(api_addr).await?,
            admin: bind(admin_addr).await?,
        })
    }

    /// The address the API listens on.
    pub fn api_addr(&self) -> SocketAddr {
        self.api
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen.api)
    }

    /// The address the admin listener (`/metrics`) listens on.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .unwrap_or_else(|_| self.state.config.listen.admin)
    }

    /// The shared state (for tests and `vigil up`).
    pub fn state(&self) -> &AppState {
        &self.state
    }

    /// Serves until `shutdown` resolves, then lets requests in flight finish.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        tracing::info!(api = %self.api_addr(), admin = %self.admin_addr(), "auth service listening");
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let stopped = move || {
            let mut rx = stop_rx.clone();
            async move {
                let _ = rx.wait_for(|s| *s).await;
            }
        };
        tokio::spawn(reload_keys(self.state.clone(), stopped()));
        let api = axum::serve(self.api, app(self.state.clone())).with_graceful_shutdown(stopped());
        let admin = axum::serve(self.admin, api::admin_router(self.state.clone()))
            .with_graceful_shutdown(stopped());
        let signal = tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let result = tokio::try_join!(api.into_future(), admin.into_future());
        signal.abort();
        self.state.db.pool.close().await;
        if let Some(tracing) = self.state.tracing.clone() {
            let _ = tokio::task::spawn_blocking(move || tracing.shutdown()).await;
        }
        result.map(|_| ())
    }
}

/// Picks up a rotated key set from disk every `tokens.keys_reload_secs`.
async fn reload_keys(state: AppState, stopped: impl Future<Output = ()>) {
    let mut tick = tokio::time::interval(Duration::from_secs(state.config.tokens.keys_reload_secs));
    tokio::pin!(stopped);
    loop {
        tokio::select! {
            _ = &mut stopped => return,
            _ = tick.tick() => {}
        }
        match state.tokens.reload_if_changed() {
            Ok(true) => state
                .metrics
                .key_reloads
                .with_label_values(&["success"])
                .inc(),
            Ok(false) => {}
            Err(e) => {
                state
                    .metrics
                    .key_reloads
                    .with_label_values(&["failure"])
                    .inc();
                tracing::error!(error = %e, "signing key reload failed; keeping the keys in use");
            }
        }
    }
}

/// `vigil auth create-user`: makes an account (an admin with `admin`) and returns its id.
pub async fn create_user(
    config: Config,
    email: &str,
    password: &str,
    admin: bool,
) -> Result<String, CommandError> {
    let state = AppState::open(config, None).await?;
    let role = if admin {
        store::Role::Admin
    } else {
        store::Role::User
    };
    let user = api::auth::create_account(&state, email, password, role)
        .await
        .map_err(|e| CommandError::Refused(e.message.into_owned()))?;
    state.db.pool.close().await;
    Ok(user.id)
}

/// `vigil auth rotate-keys`: rotates the key set on disk; running services pick it up.
/// Returns the new current and the kept previous `kid`.
pub fn rotate_keys(config: &Config) -> Result<(String, Option<String>), tokens::KeyError> {
    let set = tokens::KeySet::rotate(&config.tokens.keys_path)?;
    Ok((
        set.current.kid.clone(),
        set.previous.as_ref().map(|k| k.kid.clone()),
    ))
}

/// A failure of a one-shot command (`create-user`).
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    /// The service could not start.
    #[error(transparent)]
    Start(#[from] StartError),
    /// The input was refused (invalid email, weak password, taken email).
    #[error("{0}")]
    Refused(String),
}
