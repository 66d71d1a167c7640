//! The exporter over real sockets: its numbers against a database written by the auth
//! service's own store (SQLite and PostgreSQL), a database that does not answer, and the
//! certificate a TLS listener serves.
//!
//! PostgreSQL tests run when `VIGIL_TEST_POSTGRES_URL` is set; under `CI=true` a missing
//! variable or an unreachable server fails them instead of skipping.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use auth::db::Db;
use auth::store::{self, Role, Status};
use exporter::Config;
use exporter::config::{CertEndpoint, CertFile, Database, ProbeTarget};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn postgres_url() -> Option<String> {
    match std::env::var("VIGIL_TEST_POSTGRES_URL") {
        Ok(url) if !url.is_empty() => Some(url),
        _ if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but VIGIL_TEST_POSTGRES_URL is not set: the PostgreSQL tests must run")
        }
        _ => None,
    }
}

/// A migrated database: a SQLite file, or a fresh schema on the test PostgreSQL server.
struct TestDb {
    url: String,
    db: Db,
    schema: Option<(String, String)>,
    _dir: tempfile::TempDir,
}

impl TestDb {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("vigil.db").display());
        let db = Db::connect(&url, 2).await.unwrap();
        Self {
            url,
            db,
            schema: None,
            _dir: dir,
        }
    }

    async fn postgres() -> Option<Self> {
        let base = postgres_url()?;
        let name = format!("vigil_exporter_test_{}", uuid::Uuid::new_v4().simple());
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
        let url = format!("{base}{sep}options[search_path]={name}");
        let db = Db::connect(&url, 2).await.unwrap();
        Some(Self {
            url,
            db,
            schema: Some((base, name)),
            _dir: tempfile::tempdir().unwrap(),
        })
    }

    async fn cleanup(self) {
        self.db.pool.close().await;
        if let Some((base, name)) = self.schema {
            let pool = sqlx::AnyPool::connect(&base).await.unwrap();
            sqlx::query(&format!("DROP SCHEMA {name} CASCADE"))
                .execute(&pool)
                .await
                .unwrap();
            pool.close().await;
        }
    }
}

/// An exporter serving `config` on an ephemeral port, and its `/metrics` URL.
async fn serve(mut config: Config) -> String {
    config.listen.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let server = exporter::Server::bind(&config).await.unwrap();
    let url = format!("http://{}/metrics", server.local_addr().unwrap());
    tokio::spawn(server.run(std::future::pending()));
    url
}

async fn scrape(url: &str) -> String {
    let r = reqwest::get(url).await.unwrap();
    assert_eq!(r.status(), 200);
    r.text().await.unwrap()
}

/// The value of `series` (`name{labels}` exactly as exported), `None` when absent.
fn value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// The writes the issue names: 3 users and 1 admin, 2 content items; beside them one account
/// disabled, one last seen 2 hours ago, and a revoked session.
async fn known_writes(db: &Db) {
    let now = auth::db::now_ms();
    let hour = 3_600_000;
    let mut ids = Vec::new();
    for (email, role) in [
        ("ann@example.com", Role::User),
        ("bob@example.com", Role::User),
        ("cid@example.com", Role::User),
        ("root@example.com", Role::Admin),
    ] {
        let u = store::insert_user(db, email, "$argon2id$stand-in", role, now)
            .await
            .unwrap()
            .unwrap();
        ids.push(u.id);
    }
    // ann and root sign in (sessions, last seen now); bob signed in and out two hours ago.
    for (i, token) in [(0, "t-ann"), (3, "t-root")] {
        store::create_session(db, &ids[i], token, now, now + hour, now + 24 * hour)
            .await
            .unwrap();
    }
    store::create_session(
        db,
        &ids[1],
        "t-bob",
        now - 2 * hour,
        now + hour,
        now + 24 * hour,
    )
    .await
    .unwrap();
    store::revoke_session_of(db, "t-bob", now).await.unwrap();
    sqlx::query("UPDATE users SET last_seen_at = $2, disabled_at = $3 WHERE id = $1")
        .bind(&ids[1])
        .bind(now - 2 * hour)
        .bind(now)
        .execute(&db.pool)
        .await
        .unwrap();
    store::insert_content(db, &ids[0], "draft", "text", Status::Draft, now)
        .await
        .unwrap();
    store::insert_content(db, &ids[0], "out", "text", Status::Published, now)
        .await
        .unwrap();
}

async fn the_gauges_match_the_database(t: &TestDb) {
    known_writes(&t.db).await;
    let mut config = Config::default();
    config.scrape.cache_ms = 0;
    config.database = Some(Database::with_url(&t.url));
    let text = scrape(&serve(config).await).await;
    for (series, want) in [
        (
            r#"vigil_exporter_collector_success{collector="database"}"#,
            1.0,
        ),
        ("vigil_database_up", 1.0),
        (r#"vigil_users{role="user"}"#, 3.0),
        (r#"vigil_users{role="admin"}"#, 1.0),
        ("vigil_users_disabled", 1.0),
        (r#"vigil_active_users{window="5m"}"#, 2.0),
        (r#"vigil_active_users{window="1h"}"#, 2.0),
        (r#"vigil_active_users{window="24h"}"#, 3.0),
        (r#"vigil_content_items{status="draft"}"#, 1.0),
        (r#"vigil_content_items{status="published"}"#, 1.0),
        ("vigil_sessions_active", 2.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series}\n{text}");
    }
    for query in ["users", "active_users", "content", "sessions"] {
        let series = format!(r#"vigil_database_query_duration_seconds{{query="{query}"}}"#);
        assert!(
            value(&text, &series).is_some_and(|s| s >= 0.0),
            "{series}\n{text}"
        );
    }
    // The exporter only reads: the service's next write is unaffected, and seen on the next scrape.
    let u = store::insert_user(
        &t.db,
        "dee@example.com",
        "x",
        Role::User,
        auth::db::now_ms(),
    )
    .await
    .unwrap();
    assert!(u.is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_match_the_database_on_sqlite() {
    let t = TestDb::sqlite().await;
    // The service stopped: its WAL files are gone, and a read-only reader still opens the file.
    t.db.pool.close().await;
    let t = TestDb {
        db: Db::connect(&t.url, 2).await.unwrap(),
        ..t
    };
    the_gauges_match_the_database(&t).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gauges_match_the_database_on_postgres() {
    let Some(t) = TestDb::postgres().await else {
        eprintln!("skipped: VIGIL_TEST_POSTGRES_URL is not set");
        return;
    };
    the_gauges_match_the_database(&t).await;
    t.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scrape_storm_reads_the_database_once_per_cache_period() {
    let t = TestDb::sqlite().await;
    known_writes(&t.db).await;
    let mut config = Config::default();
    config.scrape.cache_ms = 60_000;
    config.database = Some(Database::with_url(&t.url));
    let url = serve(config).await;
    let first = scrape(&url).await;
    assert_eq!(value(&first, r#"vigil_users{role="user"}"#), Some(3.0));
    store::insert_user(
        &t.db,
        "dee@example.com",
        "x",
        Role::User,
        auth::db::now_ms(),
    )
    .await
    .unwrap();
    // Within the cache period every scrape is the first one's result, durations included.
    for _ in 0..20 {
        assert_eq!(scrape(&url).await, first);
    }
    t.cleanup().await;
}

/// A listener that accepts connections and never says a word: a database (or anything) that hangs.
async fn silent_listener() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = l.accept().await {
            held.push(s);
        }
    });
    addr
}

/// A self-signed certificate for `localhost` valid from 2025-01-02 to 2031-03-04, written as
/// PEM under `dir`; returns the certificate and key paths.
fn certificate(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let mut params = rcgen::CertificateParams::new(vec!["localhost".into()]).unwrap();
    params.not_before = rcgen::date_time_ymd(2025, 1, 2);
    params.not_after = rcgen::date_time_ymd(2031, 3, 4);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let (c, k) = (dir.join("edge.crt"), dir.join("edge.key"));
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

/// A TLS listener serving `cert` that answers every request `200 {"keys":[]}` over HTTP/1.1.
async fn tls_server(cert: &std::path::Path, key: &std::path::Path) -> SocketAddr {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = vec![CertificateDer::from_pem_file(cert).unwrap()];
    let key = PrivateKeyDer::from_pem_file(key).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(s).await else {
                    return;
                };
                let mut buf = Vec::new();
                let mut chunk = [0u8; 1024];
                while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                }
                let body = r#"{"keys":[]}"#;
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(answer.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_certificate_collector_reports_the_served_certificate_and_probes_trust_it() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = certificate(dir.path());
    let addr = tls_server(&cert, &key).await;
    let mut config = Config::default();
    config.certificates.files.push(CertFile {
        name: "edge_file".into(),
        path: cert.clone(),
    });
    config.certificates.endpoints.push(CertEndpoint {
        name: "edge_https".into(),
        addr: addr.to_string(),
        server_name: "localhost".into(),
    });
    let mut jwks = ProbeTarget::new(
        "edge_jwks",
        format!("https://localhost:{}/.well-known/jwks.json", addr.port()),
    );
    jwks.ca_file = Some(cert.clone());
    jwks.expect_body = Some("\"keys\"".into());
    // Without the edge's certificate the same URL is refused: the probe verifies.
    let mut untrusted = ProbeTarget::new("edge_untrusted", jwks.url.clone());
    untrusted.connect_to = Some(addr);
    config.probes.targets = vec![jwks, untrusted];
    let text = scrape(&serve(config).await).await;
    // 2031-03-04T00:00:00Z and 2025-01-02T00:00:00Z, the certificate's notAfter and notBefore.
    for cert in ["edge_file", "edge_https"] {
        let series = |name: &str| format!(r#"{name}{{cert="{cert}"}}"#);
        assert_eq!(
            value(
                &text,
                &series("vigil_tls_certificate_expiry_timestamp_seconds")
            ),
            Some(1_930_348_800.0),
            "{text}"
        );
        assert_eq!(
            value(
                &text,
                &series("vigil_tls_certificate_not_before_timestamp_seconds")
            ),
            Some(1_735_776_000.0),
            "{text}"
        );
    }
    for (series, want) in [
        (
            r#"vigil_exporter_collector_success{collector="certificates"}"#,
            1.0,
        ),
        (
            r#"vigil_exporter_collector_success{collector="probes"}"#,
            1.0,
        ),
        (r#"vigil_probe_success{target="edge_jwks"}"#, 1.0),
        (r#"vigil_probe_http_status{target="edge_jwks"}"#, 200.0),
        (r#"vigil_probe_success{target="edge_untrusted"}"#, 0.0),
        (r#"vigil_probe_http_status{target="edge_untrusted"}"#, 0.0),
    ] {
        assert_eq!(value(&text, series), Some(want), "{series}\n{text}");
    }
    for phase in ["dns", "connect", "tls", "first_byte"] {
        let series =
            format!(r#"vigil_probe_duration_seconds{{phase="{phase}",target="edge_jwks"}}"#);
        assert!(value(&text, &series).is_some(), "{series}\n{text}");
    }
    // The untrusted probe connected (no dns: connect_to) and stopped at the handshake.
    assert!(
        value(
            &text,
            r#"vigil_probe_duration_seconds{phase="connect",target="edge_untrusted"}"#
        )
        .is_some()
    );
    assert!(
        !text.contains(r#"phase="tls",target="edge_untrusted""#),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_alone_and_never_holds_the_scrape() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _) = certificate(dir.path());
    let hung = silent_listener().await;
    let mut config = Config::default();
    config.scrape.cache_ms = 0;
    let mut db = Database::with_url(format!("postgres://postgres@{hung}/vigil"));
    db.timeout_ms = 300;
    config.database = Some(db);
    config.certificates.files.push(CertFile {
        name: "edge".into(),
        path: cert,
    });
    let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let health_addr = health.local_addr().unwrap();
    tokio::spawn(async move {
        let app = axum::Router::new().route("/health", axum::routing::get(|| async { "ok" }));
        axum::serve(health, app).await
    });
    config.probes.targets.push(ProbeTarget::new(
        "auth_health",
        format!("http://{health_addr}/health"),
    ));
    let url = serve(config).await;
    for _ in 0..2 {
        let started = Instant::now();
        let text = scrape(&url).await;
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "the database's timeout bounds the scrape: {:?}",
            started.elapsed()
        );
        for (series, want) in [
            (
                r#"vigil_exporter_collector_success{collector="database"}"#,
                0.0,
            ),
            ("vigil_database_up", 0.0),
            (
                r#"vigil_exporter_collector_success{collector="certificates"}"#,
                1.0,
            ),
            (
                r#"vigil_exporter_collector_success{collector="probes"}"#,
                1.0,
            ),
            (r#"vigil_probe_success{target="auth_health"}"#, 1.0),
            (
                r#"vigil_tls_certificate_expiry_timestamp_seconds{cert="edge"}"#,
                1_930_348_800.0,
            ),
        ] {
            assert_eq!(value(&text, series), Some(want), "{series}\n{text}");
        }
        assert!(
            value(&text, r#"vigil_users{role="user"}"#).is_none(),
            "{text}"
        );
        let took = value(
            &text,
            r#"vigil_exporter_collector_duration_seconds{collector="database"}"#,
        )
        .unwrap();
        assert!((0.3..2.0).contains(&took), "{took}");
    }
    // A SQLite file that does not exist is down the same way (and is not created).
    let missing = dir.path().join("nothing.db");
    let config = Config {
        database: Some(Database::with_url(format!(
            "sqlite://{}",
            missing.display()
        ))),
        ..Config::default()
    };
    let text = scrape(&serve(config).await).await;
    assert_eq!(
        value(
            &text,
            r#"vigil_exporter_collector_success{collector="database"}"#
        ),
        Some(0.0)
    );
    assert_eq!(value(&text, "vigil_database_up"), Some(0.0));
    assert!(!missing.exists());
}
