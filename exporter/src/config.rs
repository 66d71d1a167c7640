//! `exporter.toml`: the typed configuration of the exporter and its loader.
//!
//! Every struct denies unknown fields. [`Config::load`] reports every error it can find at once,
//! each prefixed by the file and the key path (`exporter.toml: probes.targets[1].url: …`):
//! each section is deserialised on its own, so one bad section does not hide the errors of
//! another, and the semantic checks run on every section that parsed. Names given here become
//! metric label values (`collector`, `cert`, `target`), so the label sets are bounded by this
//! file.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// The whole `exporter.toml`. Every section is optional; a collector whose section is absent
/// (or lists nothing) does not run.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Where `/metrics` is served.
    #[serde(default)]
    pub listen: Listen,
    /// Scrape-time behaviour shared by every collector.
    #[serde(default)]
    pub scrape: Scrape,
    /// The database collector (the auth service's schema); absent: not collected.
    #[serde(default)]
    pub database: Option<Database>,
    /// The certificate collector.
    #[serde(default)]
    pub certificates: Certificates,
    /// The probe collector.
    #[serde(default)]
    pub probes: Probes,
}

/// `[listen]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Listen {
    /// The `/metrics` listener; keep it on loopback (or a private network).
    #[serde(default = "default_listen")]
    pub addr: SocketAddr,
}

/// `[scrape]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scrape {
    /// How long a collector's result is served again before it is gathered anew: a burst of
    /// scrapes costs one collection (0 gathers on every scrape, still one at a time).
    #[serde(default = "default_cache_ms")]
    pub cache_ms: u64,
}

/// `[database]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Database {
    /// `sqlite://path` (opened read-only; never created) or `postgres://…`. A URL with a
    /// password belongs in `url_env`.
    #[serde(default)]
    pub url: Option<String>,
    /// Name of an environment variable holding the URL; wins over `url`.
    #[serde(default)]
    pub url_env: Option<String>,
    /// The collector's budget per scrape (connecting and every query).
    #[serde(default = "default_db_timeout_ms")]
    pub timeout_ms: u64,
    /// Size of the connection pool.
    #[serde(default = "default_db_connections")]
    pub max_connections: u32,
}

/// `[certificates]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Certificates {
    /// The collector's budget per scrape (every file and handshake, run concurrently).
    #[serde(default = "default_cert_timeout_ms")]
    pub timeout_ms: u64,
    /// PEM files whose first certificate is reported.
    #[serde(default)]
    pub files: Vec<CertFile>,
    /// TLS listeners whose served certificate is reported (one handshake each).
    #[serde(default)]
    pub endpoints: Vec<CertEndpoint>,
}

/// `[[certificates.files]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertFile {
    /// The `cert` label (unique among files and endpoints).
    pub name: String,
    /// A PEM file; its first certificate is the one reported (the leaf of a chain).
    pub path: PathBuf,
}

/// `[[certificates.endpoints]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertEndpoint {
    /// The `cert` label (unique among files and endpoints).
    pub name: String,
    /// `host:port` of the TLS listener.
    pub addr: String,
    /// The SNI name sent in the handshake: the listener picks its certificate by it.
    pub server_name: String,
}

/// `[probes]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Probes {
    /// Each target's budget unless it sets its own.
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
    /// The URLs checked, concurrently.
    #[serde(default)]
    pub targets: Vec<ProbeTarget>,
}

/// `[[probes.targets]]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProbeTarget {
    /// The `target` label (unique).
    pub name: String,
    /// An `http://` or `https://` URL, fetched with `GET` over HTTP/1.1.
    pub url: String,
    /// The status that counts as success.
    #[serde(default = "default_expect_status")]
    pub expect_status: u16,
    /// A substring the body must contain (the first 1 MiB is read).
    #[serde(default)]
    pub expect_body: Option<String>,
    /// A PEM file of the certificates trusted for an `https://` URL (a CA, or the edge's own
    /// self-signed certificate); the Mozilla roots when absent.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// Connect here instead of resolving the URL's host (`curl --connect-to`); the host still
    /// names the server (SNI, certificate check, `Host`).
    #[serde(default)]
    pub connect_to: Option<SocketAddr>,
    /// This target's budget; `probes.timeout_ms` when absent.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9903))
}
fn default_cache_ms() -> u64 {
    5000
}
fn default_db_timeout_ms() -> u64 {
    2000
}
fn default_db_connections() -> u32 {
    2
}
fn default_cert_timeout_ms() -> u64 {
    3000
}
fn default_probe_timeout_ms() -> u64 {
    5000
}
fn default_expect_status() -> u16 {
    200
}

/// The longest budget any collector may have: a scrape must answer before Prometheus gives up
/// (its default `scrape_timeout` is 10 s).
pub const MAX_TIMEOUT_MS: u64 = 30_000;

impl Default for Listen {
    fn default() -> Self {
        Self {
            addr: default_listen(),
        }
    }
}
impl Default for Scrape {
    fn default() -> Self {
        Self {
            cache_ms: default_cache_ms(),
        }
    }
}
impl Default for Certificates {
    fn default() -> Self {
        Self {
            timeout_ms: default_cert_timeout_ms(),
            files: Vec::new(),
            endpoints: Vec::new(),
        }
    }
}
impl Default for Probes {
    fn default() -> Self {
        Self {
            timeout_ms: default_probe_timeout_ms(),
            targets: Vec::new(),
        }
    }
}

impl Database {
    /// A database section for `url` with the defaults.
    pub fn with_url(url: impl Into<String>) -> Self {
        Self {
            url: Some(url.into()),
            url_env: None,
            timeout_ms: default_db_timeout_ms(),
            max_connections: default_db_connections(),
        }
    }

    /// The URL this section selects (`url_env` first, then `url`).
    pub fn url(&self) -> Option<String> {
        self.url_env
            .as_ref()
            .and_then(|name| std::env::var(name).ok())
            .or_else(|| self.url.clone())
    }
}

impl ProbeTarget {
    /// A target expecting 200 from `url`, with the defaults.
    pub fn new(name: impl Into<String>, url: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            url: url.into(),
            expect_status: default_expect_status(),
            expect_body: None,
            ca_file: None,
            connect_to: None,
            timeout_ms: None,
        }
    }
}

pub use settings::ConfigError;

const SECTIONS: [&str; 5] = ["listen", "scrape", "database", "certificates", "probes"];

impl Config {
    /// Reads and checks `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&settings::read(path)?, &path.display().to_string())
    }

    /// Parses and checks `text`; `origin` names the file in the errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let table = settings::table(text, origin)?;
        let mut errors = Vec::new();
        settings::unknown_sections(&table, &SECTIONS, &mut errors);
        let config = Config {
            listen: settings::section(&table, "listen", &mut errors),
            scrape: settings::section(&table, "scrape", &mut errors),
            database: settings::section(&table, "database", &mut errors),
            certificates: settings::section(&table, "certificates", &mut errors),
            probes: settings::section(&table, "probes", &mut errors),
        };
        config.check(&mut errors);
        settings::finish(config, origin, errors)
    }

    /// The semantic checks; `Exporter::new` runs them too, for configs built in code.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut errors = Vec::new();
        self.check(&mut errors);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { errors })
        }
    }

    fn check(&self, errors: &mut Vec<String>) {
        let mut bad = |key: String, msg: &str| errors.push(format!("{key}: {msg}"));
        if self.scrape.cache_ms > 60_000 {
            bad("scrape.cache_ms".into(), "must be at most 60000");
        }
        let timeout = |key: String, ms: u64, bad: &mut dyn FnMut(String, &str)| {
            if !(1..=MAX_TIMEOUT_MS).contains(&ms) {
                bad(key, &format!("must be between 1 and {MAX_TIMEOUT_MS}"));
            }
        };
        if let Some(db) = &self.database {
            timeout("database.timeout_ms".into(), db.timeout_ms, &mut bad);
            if db.max_connections == 0 {
                bad("database.max_connections".into(), "must be at least 1");
            }
            match (&db.url, &db.url_env) {
                (None, None) => bad("database".into(), "needs url or url_env"),
                (Some(url), _) if !is_database_url(url) => bad(
                    "database.url".into(),
                    "must start with sqlite:, postgres:// or postgresql://",
                ),
                _ => {}
            }
            if let Some(name) = &db.url_env {
                match std::env::var(name) {
                    Err(_) => bad(
                        "database.url_env".into(),
                        &format!("environment variable {name} is not set"),
                    ),
                    Ok(url) if !is_database_url(&url) => bad(
                        "database.url_env".into(),
                        &format!(
                            "environment variable {name} must hold a sqlite:, postgres:// or postgresql:// URL"
                        ),
                    ),
                    Ok(_) => {}
                }
            }
        }
        let certs = &self.certificates;
        timeout("certificates.timeout_ms".into(), certs.timeout_ms, &mut bad);
        let mut cert_names = HashSet::new();
        for (i, f) in certs.files.iter().enumerate() {
            let key = format!("certificates.files[{i}]");
            name_check(&key, &f.name, &mut cert_names, &mut bad);
            if f.path.as_os_str().is_empty() {
                bad(format!("{key}.path"), "must not be empty");
            }
        }
        for (i, e) in certs.endpoints.iter().enumerate() {
            let key = format!("certificates.endpoints[{i}]");
            name_check(&key, &e.name, &mut cert_names, &mut bad);
            if e.addr
                .rsplit_once(':')
                .is_none_or(|(host, port)| host.is_empty() || port.parse::<u16>().is_err())
            {
                bad(format!("{key}.addr"), "must be host:port");
            }
            if rustls::pki_types::ServerName::try_from(e.server_name.as_str()).is_err() {
                bad(
                    format!("{key}.server_name"),
                    "must be a DNS name or an IP address",
                );
            }
        }
        let probes = &self.probes;
        timeout("probes.timeout_ms".into(), probes.timeout_ms, &mut bad);
        let mut target_names = HashSet::new();
        for (i, t) in probes.targets.iter().enumerate() {
            let key = format!("probes.targets[{i}]");
            name_check(&key, &t.name, &mut target_names, &mut bad);
            if let Err(e) = crate::probes::Url::parse(&t.url) {
                bad(format!("{key}.url"), &e);
            }
            if !(100..=599).contains(&t.expect_status) {
                bad(
                    format!("{key}.expect_status"),
                    "must be an HTTP status (100-599)",
                );
            }
            if t.expect_body.as_deref() == Some("") {
                bad(
                    format!("{key}.expect_body"),
                    "must not be empty (leave it out)",
                );
            }
            if let Some(ms) = t.timeout_ms {
                timeout(format!("{key}.timeout_ms"), ms, &mut bad);
            }
        }
    }
}

fn is_database_url(url: &str) -> bool {
    url.starts_with("sqlite:") || url.starts_with("postgres://") || url.starts_with("postgresql://")
}

/// A label value from the config: short, plain, unique in its set.
fn name_check(
    key: &str,
    name: &str,
    seen: &mut HashSet<String>,
    bad: &mut dyn FnMut(String, &str),
) {
    let plain = name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if name.is_empty() || name.len() > 64 || !plain {
        bad(
            format!("{key}.name"),
            "must be 1 to 64 characters of A-Z a-z 0-9 _ - .",
        );
    } else if !seen.insert(name.to_owned()) {
        bad(format!("{key}.name"), &format!("{name:?} is used twice"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_the_defaults_and_no_collector() {
        let c = Config::parse("", "exporter.toml").unwrap();
        assert_eq!(c.listen.addr, default_listen());
        assert_eq!(c.scrape.cache_ms, 5000);
        assert!(c.database.is_none());
        assert!(c.certificates.files.is_empty() && c.probes.targets.is_empty());
    }

    #[test]
    fn the_shipped_file_is_valid() {
        let shipped = include_str!("../../config/exporter.toml");
        let c = Config::parse(shipped, "config/exporter.toml").unwrap();
        assert_eq!(c.listen.addr, default_listen());
        assert_eq!(c.scrape.cache_ms, default_cache_ms());
        let db = c.database.unwrap();
        assert_eq!(db.url.as_deref(), Some("sqlite://data/vigil.db"));
        assert_eq!(db.timeout_ms, default_db_timeout_ms());
        assert_eq!(c.certificates.timeout_ms, default_cert_timeout_ms());
        assert_eq!(c.probes.timeout_ms, default_probe_timeout_ms());
        assert!(!c.certificates.files.is_empty() && !c.certificates.endpoints.is_empty());
        assert!(!c.probes.targets.is_empty());
    }

    #[test]
    fn every_error_is_reported_at_once_with_file_and_key() {
        let text = r#"
            [listen]
            addr = "nowhere"
            [scrape]
            cache_ms = 100000
            [database]
            url = "mysql://x"
            timeout_ms = 0
            [[certificates.files]]
            name = "edge"
            path = "a.crt"
            [[certificates.endpoints]]
            name = "edge"
            addr = "localhost"
            server_name = "not a name!"
            [[probes.targets]]
            name = "a b"
            url = "ftp://x/"
            expect_status = 42
            colour = "blue"
            [extra]
        "#;
        let err = Config::parse(text, "exporter.toml").unwrap_err().errors;
        let joined = err.join("\n");
        for want in [
            "exporter.toml: listen.addr: invalid socket address",
            "exporter.toml: scrape.cache_ms: must be at most 60000",
            "exporter.toml: database.url: must start with",
            "exporter.toml: database.timeout_ms: must be between 1 and 30000",
            "exporter.toml: certificates.endpoints[0].name: \"edge\" is used twice",
            "exporter.toml: certificates.endpoints[0].addr: must be host:port",
            "exporter.toml: certificates.endpoints[0].server_name: must be a DNS name",
            "exporter.toml: probes.targets[0].colour: unknown field `colour`",
            "exporter.toml: extra: unknown section",
        ] {
            assert!(joined.contains(want), "{want}\n---\n{joined}");
        }
        assert_eq!(err.len(), 9, "{joined}");
        // Once the probe parses, its own mistakes are named by key.
        let text = "[[probes.targets]]\nname = \"a b\"\nurl = \"ftp://x/\"\nexpect_status = 42\n";
        let err = Config::parse(text, "e.toml").unwrap_err().errors;
        let joined = err.join("\n");
        assert!(joined.contains("e.toml: probes.targets[0].name: must be 1 to 64"));
        assert!(joined.contains("e.toml: probes.targets[0].url: "));
        assert!(joined.contains("e.toml: probes.targets[0].expect_status: must be an HTTP"));
        assert_eq!(err.len(), 3, "{joined}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = Config::parse("[listen]\naddr = \n", "e.toml")
            .unwrap_err()
            .errors;
        assert!(err[0].starts_with("e.toml:2: "), "{err:?}");
    }

    #[test]
    fn the_database_needs_a_url_and_url_env_must_be_set() {
        let err = Config::parse("[database]\n", "e.toml").unwrap_err().errors;
        assert_eq!(err, ["e.toml: database: needs url or url_env"]);
        let err = Config::parse(
            "[database]\nurl_env = \"VIGIL_TEST_SURELY_UNSET\"\n",
            "e.toml",
        )
        .unwrap_err()
        .errors;
        assert_eq!(
            err,
            ["e.toml: database.url_env: environment variable VIGIL_TEST_SURELY_UNSET is not set"]
        );
    }
}
