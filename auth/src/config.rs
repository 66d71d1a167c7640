//! `auth.toml`: the typed configuration of the auth service and its loader.
//!
//! Every struct denies unknown fields. [`Config::load`] reports every error it can find at once,
//! each prefixed by the file and the key path (`auth.toml: database.max_connections: …`): each
//! section is deserialised on its own so one bad section does not hide the errors of another,
//! and the semantic checks run on every section that parsed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole `auth.toml`. Every section is optional; the defaults run the service on loopback
/// with SQLite under `./data`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where the service listens.
    #[serde(default)]
    pub listen: Listen,
    /// The database the service keeps its state in.
    #[serde(default)]
    pub database: Database,
    /// Access and refresh token settings.
    #[serde(default)]
    pub tokens: Tokens,
    /// Request limits.
    #[serde(default)]
    pub limits: Limits,
    /// OTLP export of the service's spans (off unless an endpoint is set).
    #[serde(default)]
    pub tracing: telemetry::TracingConfig,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// The API listener (reached through the proxy).
    #[serde(default = "default_api_addr")]
    pub api: SocketAddr,
    /// The admin listener serving `/metrics`; keep it on loopback.
    #[serde(default = "default_admin_addr")]
    pub admin: SocketAddr,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// `sqlite://path` (created on first start) or `postgres://…`. A URL with a password belongs
    /// in `url_env`, not in a checked-in file.
    #[serde(default)]
    pub url: Option<String>,
    /// Name of an environment variable holding the URL; wins over `url`.
    #[serde(default)]
    pub url_env: Option<String>,
    /// Size of the connection pool.
    #[serde(default = "default_max_connections")]
    pub max_connections: u32,
}

/// `[tokens]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tokens {
    /// `iss` of every access token.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// `aud` of every access token.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Lifetime of an access token.
    #[serde(default = "default_access_ttl")]
    pub access_ttl_secs: u64,
    /// Lifetime of a refresh token; every refresh issues a new one with a fresh lifetime, capped
    /// at the session's absolute end.
    #[serde(default = "default_refresh_ttl")]
    pub refresh_ttl_secs: u64,
    /// Absolute lifetime of a session (one login): its end is fixed at login, refreshes never move
    /// it, and no refresh token outlives it; after it, only a new login gives tokens.
    #[serde(default = "default_session_max_lifetime")]
    pub session_max_lifetime_secs: u64,
    /// The signing key set (current and previous Ed25519 key), generated on first start.
    #[serde(default = "default_keys_path")]
    pub keys_path: PathBuf,
    /// How often the running service looks for a rotated key set on disk.
    #[serde(default = "default_keys_reload")]
    pub keys_reload_secs: u64,
}

/// `[limits]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest request body accepted; larger bodies get 413.
    #[serde(default = "default_body_bytes")]
    pub body_bytes: usize,
}

fn default_api_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 3000))
}
fn default_admin_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9902))
}
fn default_max_connections() -> u32 {
    8
}
fn default_issuer() -> String {
    "vigil-auth".into()
}
fn default_audience() -> String {
    "vigil".into()
}
fn default_access_ttl() -> u64 {
    15 * 60
}
fn default_refresh_ttl() -> u64 {
    7 * 24 * 3600
}
fn default_session_max_lifetime() -> u64 {
    30 * 24 * 3600
}
fn default_keys_path() -> PathBuf {
    PathBuf::from("data/keys/signing.json")
}
fn default_keys_reload() -> u64 {
    5
}
fn default_body_bytes() -> usize {
    64 * 1024
}

/// The database URL used when neither `url` nor `url_env` is set.
pub const DEFAULT_DATABASE_URL: &str = "sqlite://data/vigil.db";

impl Default for Listen {
    fn default() -> Self {
        Self {
            api: default_api_addr(),
            admin: default_admin_addr(),
        }
    }
}
impl Default for Database {
    fn default() -> Self {
        Self {
            url: None,
            url_env: None,
            max_connections: default_max_connections(),
        }
    }
}
impl Default for Tokens {
    fn default() -> Self {
        Self {
            issuer: default_issuer(),
            audience: default_audience(),
            access_ttl_secs: default_access_ttl(),
            refresh_ttl_secs: default_refresh_ttl(),
            session_max_lifetime_secs: default_session_max_lifetime(),
            keys_path: default_keys_path(),
            keys_reload_secs: default_keys_reload(),
        }
    }
}
impl Default for Limits {
    fn default() -> Self {
        Self {
            body_bytes: default_body_bytes(),
        }
    }
}

pub use settings::ConfigError;

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&settings::read(path)?, &path.display().to_string())
    }

    /// Parses and checks `text`; `origin` names the file in the errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let table = settings::table(text, origin)?;
        let mut errors = Vec::new();
        settings::unknown_sections(
            &table,
            &["listen", "database", "tokens", "limits", "tracing"],
            &mut errors,
        );
        let config = Config {
            listen: settings::section(&table, "listen", &mut errors),
            database: settings::section(&table, "database", &mut errors),
            tokens: settings::section(&table, "tokens", &mut errors),
            limits: settings::section(&table, "limits", &mut errors),
            tracing: settings::section(&table, "tracing", &mut errors),
        };
        config.check(&mut errors);
        settings::finish(config, origin, errors)
    }

    fn check(&self, errors: &mut Vec<String>) {
        for (key, msg) in self.tracing.problems() {
            errors.push(format!("tracing.{key}: {msg}"));
        }
        let mut bad = |key: &str, msg: &str| errors.push(format!("{key}: {msg}"));
        if self.database.max_connections == 0 {
            bad("database.max_connections", "must be at least 1");
        }
        if let Some(url) = &self.database.url
            && !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
        {
            bad(
                "database.url",
                "must start with sqlite:, postgres:// or postgresql://",
            );
        }
        if let Some(name) = &self.database.url_env
            && std::env::var_os(name).is_none()
        {
            bad(
                "database.url_env",
                &format!("environment variable {name} is not set"),
            );
        }
        if self.tokens.issuer.is_empty() {
            bad("tokens.issuer", "must not be empty");
        }
        if self.tokens.audience.is_empty() {
            bad("tokens.audience", "must not be empty");
        }
        if !(60..=3600).contains(&self.tokens.access_ttl_secs) {
            bad("tokens.access_ttl_secs", "must be between 60 and 3600");
        }
        if self.tokens.refresh_ttl_secs < self.tokens.access_ttl_secs {
            bad(
                "tokens.refresh_ttl_secs",
                "must not be shorter than tokens.access_ttl_secs",
            );
        }
        if self.tokens.session_max_lifetime_secs == 0 {
            bad("tokens.session_max_lifetime_secs", "must be at least 1");
        }
        if self.tokens.keys_reload_secs == 0 {
            bad("tokens.keys_reload_secs", "must be at least 1");
        }
        if !(1024..=16 * 1024 * 1024).contains(&self.limits.body_bytes) {
            bad("limits.body_bytes", "must be between 1024 and 16777216");
        }
    }

    /// The database URL this config selects (`url_env` first, then `url`, then the default).
    pub fn database_url(&self) -> String {
        self.database
            .url_env
            .as_ref()
            .and_then(|name| std::env::var(name).ok())
            .or_else(|| self.database.url.clone())
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults() {
        let c = Config::parse("", "auth.toml").unwrap();
        assert_eq!(c.listen.api.port(), 3000);
        assert_eq!(c.tokens.access_ttl_secs, 900);
        assert_eq!(c.tokens.session_max_lifetime_secs, 30 * 24 * 3600);
        assert_eq!(c.database_url(), DEFAULT_DATABASE_URL);
    }

    #[test]
    fn the_shipped_file_is_valid_and_says_the_defaults() {
        let shipped = include_str!("../../config/auth.toml");
        let c = Config::parse(shipped, "config/auth.toml").unwrap();
        let d = Config::default();
        assert_eq!(format!("{:?}", c.listen), format!("{:?}", d.listen));
        assert_eq!(format!("{:?}", c.tokens), format!("{:?}", d.tokens));
        assert_eq!(format!("{:?}", c.limits), format!("{:?}", d.limits));
        assert_eq!(c.database_url(), DEFAULT_DATABASE_URL);
        assert_eq!(c.database.max_connections, d.database.max_connections);
    }

    #[test]
    fn session_max_lifetime_must_be_positive() {
        let err = Config::parse("[tokens]\nsession_max_lifetime_secs = 0\n", "auth.toml")
            .unwrap_err()
            .errors;
        assert_eq!(
            err,
            ["auth.toml: tokens.session_max_lifetime_secs: must be at least 1"]
        );
        let err = Config::parse("[tokens]\nsession_max_lifetime_secs = -1\n", "auth.toml")
            .unwrap_err()
            .errors;
        assert!(
            err[0].starts_with("auth.toml: tokens.session_max_lifetime_secs: "),
            "{err:?}"
        );
        let c = Config::parse("[tokens]\nsession_max_lifetime_secs = 3600\n", "auth.toml").unwrap();
        assert_eq!(c.tokens.session_max_lifetime_secs, 3600);
    }

    #[test]
    fn every_error_is_reported_at_once_with_file_and_key() {
        let text = r#"
            [listen]
            api = "not an address"
            [database]
            max_connections = 0
            colour = "blue"
            [tokens]
            access_ttl_secs = 5
            [limits]
            body_bytes = 10
            [extra]
        "#;
        let err = Config::parse(text, "auth.toml").unwrap_err().errors;
        let joined = err.join("\n");
        assert!(
            joined.contains("auth.toml: listen.api: invalid socket address"),
            "{joined}"
        );
        assert!(
            joined.contains("auth.toml: database.colour: unknown field `colour`"),
            "{joined}"
        );
        assert!(
            joined.contains("auth.toml: tokens.access_ttl_secs: must be between"),
            "{joined}"
        );
        assert!(
            joined.contains("auth.toml: limits.body_bytes: must be between"),
            "{joined}"
        );
        assert!(
            joined.contains("auth.toml: extra: unknown section"),
            "{joined}"
        );
        assert_eq!(err.len(), 5, "{joined}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Config::parse("[listen]\napi = \n", "auth.toml")
            .unwrap_err()
            .errors;
        assert!(err[0].starts_with("auth.toml:2: "), "{err:?}");
    }

    #[test]
    fn url_env_wins_and_must_exist() {
        let err = Config::parse(
            "[database]\nurl_env = \"VIGIL_TEST_SURELY_UNSET\"\n",
            "a.toml",
        )
        .unwrap_err();
        assert!(
            err.errors[0]
                .contains("database.url_env: environment variable VIGIL_TEST_SURELY_UNSET")
        );
        let err = Config::parse("[database]\nurl = \"mysql://x\"\n", "a.toml").unwrap_err();
        assert!(err.errors[0].contains("database.url: must start with"));
    }
}
