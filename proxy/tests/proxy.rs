//! The proxy over real sockets: an axum upstream, the Pingora server on its own thread, free
//! loopback ports read back from the OS, readiness by polling, and a clean stop.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use serde_json::Value;
use tokio::sync::Notify;

#[path = "../../tests/src/ports.rs"]
mod ports;
use ports::free_port;

/// An upstream that echoes what it received, plus a slow route.
async fn upstream() -> SocketAddr {
    let app = Router::new()
        .route(
            "/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_secs(3)).await;
                "late"
            }),
        )
        .route("/health", get(|| async { "ok" }))
        .route(
            "/login/fail",
            axum::routing::post(|| async {
                (axum::http::StatusCode::UNAUTHORIZED, "wrong password")
            }),
        )
        .route("/login/ok", axum::routing::post(|| async { "welcome" }))
        .route(
            "/app/varied",
            get(|| async { ([("vary", "accept-encoding")], "varies") }),
        )
        .route(
            "/csp/page",
            get(|| async {
                (
                    [
                        ("content-security-policy", "default-src 'self'"),
                        ("server", "upstream/1.2.3"),
                    ],
                    "page",
                )
            }),
        )
        .route(
            "/health/host",
            get(|headers: axum::http::HeaderMap| async move {
                match headers.get("host").and_then(|h| h.to_str().ok()) {
                    Some("health.internal") => axum::http::StatusCode::OK,
                    _ => axum::http::StatusCode::SERVICE_UNAVAILABLE,
                }
            }),
        )
        .route(
            "/sick",
            get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "sick") }),
        )
        .route(
            "/patient/slow",
            get(|| async {
                tokio::time::sleep(Duration::from_millis(800)).await;
                "worth the wait"
            }),
        )
        .fallback(|req: axum::extract::Request| async move {
            let headers: serde_json::Map<String, Value> = req
                .headers()
                .iter()
                .map(|(k, v)| (k.as_str().to_owned(), Value::from(v.to_str().unwrap_or(""))))
                .collect();
            axum::Json(serde_json::json!({
                "path": req.uri().path(),
                "query": req.uri().query(),
                "headers": headers,
            }))
        });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

struct Stop(Arc<Notify>);

#[async_trait::async_trait]
impl ShutdownSignalWatch for Stop {
    async fn recv(&self) -> ShutdownSignal {
        self.0.notified().await;
        ShutdownSignal::FastShutdown
    }
}

/// How a test proxy listens: `redirect` turns plain HTTP into the 308 listener, `listen_extra`
/// adds `[listen]` keys, `tls` replaces the generated certificate with its own `[tls]` keys.
#[derive(Default)]
struct Setup<'a> {
    redirect: bool,
    listen_extra: &'a str,
    tls: Option<&'a str>,
}

/// A running proxy.
struct Edge {
    http: String,
    https: Option<SocketAddr>,
    admin: String,
    stop: Arc<Notify>,
    thread: Option<std::thread::JoinHandle<()>>,
    metrics: proxy::metrics::Metrics,
    config: std::path::PathBuf,
    reloader: proxy::reload::Reloader,
    listen: String,
    upstream: SocketAddr,
    log: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl Edge {
    /// Starts a proxy for `toml` (with `{upstream}`, `{dead}` and the listener addresses filled in).
    async fn start(toml: &str, upstream: SocketAddr, dir: &Path, tls: bool) -> Self {
        Self::start_with(
            Setup {
                redirect: tls,
                ..Setup::default()
            },
            toml,
            upstream,
            dir,
        )
        .await
    }

    /// Starts a proxy whose `[listen]` trusts `net` as a proxy in front of it.
    async fn start_trusting(toml: &str, upstream: SocketAddr, dir: &Path, net: &str) -> Self {
        let extra = format!("trusted_proxies = [\"{net}\"]\n");
        Self::start_with(
            Setup {
                listen_extra: &extra,
                ..Setup::default()
            },
            toml,
            upstream,
            dir,
        )
        .await
    }

    async fn start_with(setup: Setup<'_>, toml: &str, upstream: SocketAddr, dir: &Path) -> Self {
        let (http, admin, https) = (free_port(), free_port(), free_port());
        let redirect = if setup.redirect {
            ""
        } else {
            "http_redirect = false\n"
        };
        let tls = setup.tls.map_or_else(
            || format!("generated_dir = \"{}\"\n", dir.join("certs").display()),
            str::to_owned,
        );
        let listen = format!(
            "[listen]\nhttp = \"127.0.0.1:{http}\"\n{redirect}https = \"127.0.0.1:{https}\"\nadmin = \"127.0.0.1:{admin}\"\n{}[tls]\n{tls}",
            setup.listen_extra
        );
        let config = dir.join("proxy.toml");
        std::fs::write(&config, fill(&format!("{listen}{toml}"), upstream)).unwrap();
        let built = proxy::load(&config).unwrap();
        let log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let opts = proxy::RunOptions {
            threads: 1,
            grace_period_secs: 0,
            upgrade_sock: dir.join("upgrade.sock").display().to_string(),
            config_path: Some(config.clone()),
            access_log: proxy::access_log::Sink::Memory(log.clone()),
            upgrade: false,
        };
        let p = proxy::Proxy::new(built, &opts).unwrap();
        let metrics = p.metrics.clone();
        let reloader = p.reloader(&config);
        let stop = Arc::new(Notify::new());
        let signal = Stop(stop.clone());
        let thread = std::thread::spawn(move || p.run(Box::new(signal)));
        let edge = Edge {
            http: format!("http://127.0.0.1:{http}"),
            https: Some(SocketAddr::from(([127, 0, 0, 1], https))),
            admin: format!("http://127.0.0.1:{admin}"),
            stop,
            thread: Some(thread),
            metrics,
            config,
            reloader,
            listen,
            upstream,
            log,
        };
        edge.wait_ready(http).await;
        edge
    }

    async fn wait_ready(&self, http: u16) {
        for _ in 0..400 {
            let admin = reqwest::get(format!("{}/healthz", self.admin))
                .await
                .is_ok_and(|r| r.status() == 200);
            let proxy = tokio::net::TcpStream::connect(("127.0.0.1", http))
                .await
                .is_ok();
            if admin && proxy {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("the proxy did not come up");
    }

    /// Rewrites the config file with the same listeners and `toml` for the rest.
    fn rewrite(&self, toml: &str) {
        std::fs::write(
            &self.config,
            fill(&format!("{}{toml}", self.listen), self.upstream),
        )
        .unwrap();
    }

    /// The access-log lines written so far.
    fn log_lines(&self) -> Vec<Value> {
        let text = String::from_utf8(self.log.lock().unwrap().clone()).unwrap();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// The last access-log line `pred` accepts; lines are written after the response is sent,
    /// so this polls (bounded).
    async fn log_line(&self, pred: impl Fn(&Value) -> bool) -> Value {
        for _ in 0..200 {
            if let Some(line) = self.log_lines().into_iter().rev().find(|l| pred(l)) {
                return line;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("no such access-log line in {:?}", self.log_lines());
    }

    fn metric(&self, series: &str) -> f64 {
        self.metrics
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Edge {
    fn drop(&mut self) {
        self.stop.notify_one();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn fill(text: &str, upstream: SocketAddr) -> String {
    text.replace("{upstream}", &upstream.to_string())
        .replace("{dead}", &format!("127.0.0.1:{}", free_port()))
}

const ROUTES: &str = r#"
[upstreams.echo]
addrs = ["{upstream}"]
read_timeout_ms = 500
health_check = { kind = "tcp", interval_ms = 200 }

[upstreams.dead]
addrs = ["{dead}"]
health_check = { kind = "tcp", interval_ms = 100000 }

[filters.deny_local]
kind = "ip"
deny = ["127.0.0.0/8"]

[filters.watch_local]
kind = "ip"
deny = ["127.0.0.0/8"]
mode = "shadow"

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
max_body_bytes = 100

[[routes]]
name = "api-v2"
path_prefix = "/api/v2/"
upstream = "echo"

[[routes]]
name = "slow"
path_prefix = "/slow"
upstream = "echo"

[[routes]]
name = "gone"
path_prefix = "/gone/"
upstream = "dead"

[[routes]]
name = "blocked"
path_prefix = "/blocked/"
upstream = "echo"
filters = ["deny_local"]

[[routes]]
name = "watched"
path_prefix = "/watched/"
upstream = "echo"
filters = ["watch_local"]
"#;

async fn json(r: reqwest::Response) -> (u16, reqwest::header::HeaderMap, Value) {
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.json::<Value>().await.unwrap_or(Value::Null);
    (status, headers, body)
}

/// Polls `url` until it answers `want` (health checks take a few rounds); the last status.
async fn status_soon(c: &reqwest::Client, url: &str, want: u16) -> u16 {
    let mut last = 0;
    for _ in 0..100 {
        last = c.get(url).send().await.unwrap().status().as_u16();
        if last == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[track_caller]
fn assert_rejection(
    got: &(u16, reqwest::header::HeaderMap, Value),
    status: u16,
    stage: &str,
    reason: &str,
) {
    let (s, headers, body) = got;
    assert_eq!(*s, status, "{body}");
    assert_eq!(
        (body["stage"].as_str(), body["error"].as_str()),
        (Some(stage), Some(reason)),
        "{body}"
    );
    assert!(body["message"].is_string());
    let id = headers.get("x-request-id").unwrap().to_str().unwrap();
    assert_eq!(
        body["request_id"], id,
        "body and header carry the same request id"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_forward_and_answer_errors_in_json() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(ROUTES, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();

    // Longest prefix wins; forwarded headers are set; spoofed identity headers are gone.
    let r = c
        .get(format!("{}/api/v2/things", edge.http))
        .header("x-vigil-subject", "admin")
        .header("X-Vigil-Role", "admin")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-request-id", "client-chosen")
        .send()
        .await
        .unwrap();
    let (status, headers, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["path"], "/api/v2/things");
    let up = &body["headers"];
    assert!(
        up.get("x-vigil-subject").is_none() && up.get("x-vigil-role").is_none(),
        "{up}"
    );
    assert_eq!(
        up["x-forwarded-for"], "127.0.0.1",
        "an untrusted peer's XFF is replaced"
    );
    assert_eq!(up["x-forwarded-proto"], "http");
    let id = headers.get("x-request-id").unwrap().to_str().unwrap();
    assert_ne!(
        id, "client-chosen",
        "an untrusted client cannot choose the request id"
    );
    assert_eq!(
        up["x-request-id"], id,
        "the upstream sees the id the client gets back"
    );
    assert_eq!(headers.get("x-content-type-options").unwrap(), "nosniff");
    assert_eq!(headers.get("x-frame-options").unwrap(), "DENY");
    assert!(
        headers.get("server").is_none(),
        "the upstream's software is not named"
    );
    assert!(
        headers.get("strict-transport-security").is_none(),
        "no HSTS over plain HTTP"
    );

    assert_rejection(
        &json(
            c.get(format!("{}/nowhere", edge.http))
                .send()
                .await
                .unwrap(),
        )
        .await,
        404,
        "route",
        "no_route",
    );
    let big = c
        .post(format!("{}/api/upload", edge.http))
        .body(vec![b'x'; 101])
        .send()
        .await
        .unwrap();
    assert_rejection(&json(big).await, 413, "limits", "body_too_large");
    let mut many = c.get(format!("{}/api/x", edge.http));
    for i in 0..120 {
        many = many.header(format!("x-h{i}"), "v");
    }
    assert_rejection(
        &json(many.send().await.unwrap()).await,
        431,
        "limits",
        "header_too_large",
    );
    let gone = c.get(format!("{}/gone/x", edge.http)).send().await.unwrap();
    assert_rejection(&json(gone).await, 502, "upstream", "connect_failed");
    let slow = c.get(format!("{}/slow", edge.http)).send().await.unwrap();
    assert_rejection(&json(slow).await, 504, "upstream", "timeout");

    // The ip filter, enforced and shadowed.
    let blocked = c
        .get(format!("{}/blocked/x", edge.http))
        .send()
        .await
        .unwrap();
    assert_rejection(&json(blocked).await, 403, "ip", "denied");
    let watched = c
        .get(format!("{}/watched/x", edge.http))
        .send()
        .await
        .unwrap();
    assert_eq!(watched.status(), 200, "shadow mode never blocks");

    // The metrics say exactly what happened.
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_requests_total{method="GET",route="api-v2",status_class="2xx"}"#
        ),
        1.0
    );
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_rejections_total{reason="no_route",route="unmatched",stage="route"}"#
        ),
        1.0
    );
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_rejections_total{reason="body_too_large",route="api",stage="limits"}"#
        ),
        1.0
    );
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_rejections_total{reason="connect_failed",route="gone",stage="upstream"}"#
        ),
        1.0
    );
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_rejections_total{reason="timeout",route="slow",stage="upstream"}"#
        ),
        1.0
    );
    assert_eq!(
        edge.metric(r#"vigil_proxy_rejections_total{reason="denied",route="blocked",stage="ip"}"#),
        1.0
    );
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_shadow_decisions_total{reason="denied",route="watched",stage="ip"}"#
        ),
        1.0
    );
    let scraped = reqwest::get(format!("{}/metrics", edge.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        scraped.contains("vigil_proxy_requests_in_flight 0"),
        "{scraped}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_serves_h2_by_sni_and_http_redirects() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(ROUTES, upstream().await, dir.path(), true).await;
    let https = edge.https.unwrap();
    let ca = reqwest::Certificate::from_pem(
        &std::fs::read(dir.path().join("certs/self-signed.crt")).unwrap(),
    )
    .unwrap();
    let client = |version: reqwest::tls::Version| {
        reqwest::Client::builder()
            .add_root_certificate(ca.clone())
            .resolve("localhost", https)
            .min_tls_version(version)
            .max_tls_version(version)
            .build()
            .unwrap()
    };
    let url = format!("https://localhost:{}/api/x", https.port());
    for version in [
        reqwest::tls::Version::TLS_1_2,
        reqwest::tls::Version::TLS_1_3,
    ] {
        let r = client(version).get(&url).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.version(), reqwest::Version::HTTP_2, "h2 by ALPN");
        assert!(
            r.headers()
                .get("strict-transport-security")
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("max-age=")
        );
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    }
    assert_eq!(
        edge.metric(r#"vigil_proxy_tls_handshakes_total{result="success",version="1.3"}"#),
        1.0
    );
    assert_eq!(
        edge.metric(r#"vigil_proxy_tls_handshakes_total{result="success",version="1.2"}"#),
        1.0
    );
    let lines = edge.log_lines();
    let line = lines
        .iter()
        .find(|l| l["tls_version"] == "1.3")
        .expect("a line for the TLS 1.3 request");
    let fields: Vec<&str> = line
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for f in proxy::access_log::FIELDS {
        assert!(fields.contains(&f), "the access log carries {f}: {line}");
    }
    assert_eq!(
        (
            line["service"].as_str(),
            line["route"].as_str(),
            line["status"].as_u64()
        ),
        (Some("proxy"), Some("api"), Some(200))
    );
    assert_eq!(
        (
            line["decision"].as_str(),
            line["client_ip"].as_str(),
            line["host"].as_str()
        ),
        (Some("allow"), Some("127.0.0.1"), Some("localhost"))
    );
    assert!(
        line["ts"].as_str().unwrap().ends_with('Z') && line["upstream_ms"].as_f64().unwrap() > 0.0
    );

    let no_redirects = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_redirects
        .get(format!("{}/api/x?y=1", edge.http))
        .header("host", "localhost")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers().get("location").unwrap().to_str().unwrap(),
        format!("https://localhost:{}/api/x?y=1", https.port())
    );
}

const PATIENT: &str = r#"
[upstreams.echo]
addrs = ["{upstream}"]
health_check = { kind = "tcp", interval_ms = 200 }

[[routes]]
name = "patient"
path_prefix = "/patient/"
upstream = "echo"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_swap_routes_keep_requests_in_flight_and_survive_broken_files() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(PATIENT, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    assert_eq!(
        c.get(format!("{}/added/x", edge.http))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );

    // A request in flight while its route disappears still completes.
    let in_flight = tokio::spawn(c.get(format!("{}/patient/slow", edge.http)).send());
    tokio::time::sleep(Duration::from_millis(200)).await;
    edge.rewrite(&PATIENT.replace(
        "name = \"patient\"\npath_prefix = \"/patient/\"",
        "name = \"added\"\npath_prefix = \"/added/\"",
    ));
    edge.reloader.reload().unwrap();
    let done = in_flight.await.unwrap().unwrap();
    assert_eq!(
        (done.status().as_u16(), done.text().await.unwrap()),
        (200, "worth the wait".to_owned())
    );
    assert_eq!(
        c.get(format!("{}/added/x", edge.http))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        c.get(format!("{}/patient/x", edge.http))
            .send()
            .await
            .unwrap()
            .status(),
        404
    );
    assert_eq!(
        edge.metric(r#"vigil_proxy_config_reloads_total{result="success"}"#),
        1.0
    );

    // A broken file changes nothing and says so.
    edge.rewrite("[[routes]]\nname = \"x\"\npath_prefix = \"/x/\"\nupstream = \"missing\"\n");
    let err = edge.reloader.reload().unwrap_err().to_string();
    assert!(
        err.contains("routes[0].upstream: no [upstreams.missing]"),
        "{err}"
    );
    assert_eq!(
        c.get(format!("{}/added/x", edge.http))
            .send()
            .await
            .unwrap()
            .status(),
        200,
        "the old config serves"
    );
    assert_eq!(
        edge.metric(r#"vigil_proxy_config_reloads_total{result="failure"}"#),
        1.0
    );
    assert_eq!(
        edge.metric("vigil_proxy_config_last_reload_successful"),
        0.0
    );

    // SIGHUP runs the same reload.
    edge.rewrite(PATIENT);
    let pid = std::process::id().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    for _ in 0..200 {
        if edge.metric("vigil_proxy_config_last_reload_successful") == 1.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(
        edge.metric("vigil_proxy_config_last_reload_successful"),
        1.0,
        "SIGHUP reloaded the fixed file"
    );
    assert_eq!(
        c.get(format!("{}/patient/x", edge.http))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
}

/// A certificate for `names` written as `dir/stem.{crt,key}`; returns its PEM for a client.
fn write_cert(dir: &Path, stem: &str, names: &[&str]) -> reqwest::Certificate {
    let g =
        rcgen::generate_simple_self_signed(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .unwrap();
    std::fs::write(dir.join(format!("{stem}.crt")), g.cert.pem()).unwrap();
    std::fs::write(
        dir.join(format!("{stem}.key")),
        g.signing_key.serialize_pem(),
    )
    .unwrap();
    reqwest::Certificate::from_pem(g.cert.pem().as_bytes()).unwrap()
}

fn tls_client(trust: &reqwest::Certificate, https: SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .add_root_certificate(trust.clone())
        .resolve("a.test", https)
        .resolve("b.test", https)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_the_certificate_and_replaced_files_are_served_without_restart() {
    let dir = tempfile::tempdir().unwrap();
    let a = write_cert(dir.path(), "a", &["a.test"]);
    let b = write_cert(dir.path(), "b", &["b.test"]);
    let certs = format!(
        "certs = [{{ cert_path = \"{d}/a.crt\", key_path = \"{d}/a.key\" }}, {{ cert_path = \"{d}/b.crt\", key_path = \"{d}/b.key\" }}]\n",
        d = dir.path().display()
    );
    let setup = Setup {
        redirect: true,
        tls: Some(&certs),
        ..Setup::default()
    };
    let edge = Edge::start_with(setup, ROUTES, upstream().await, dir.path()).await;
    let https = edge.https.unwrap();
    let port = https.port();

    let ok = |c: reqwest::Client, host: &'static str| async move {
        c.get(format!("https://{host}:{port}/api/x"))
            .send()
            .await
            .map(|r| r.status().as_u16())
    };
    assert_eq!(ok(tls_client(&a, https), "a.test").await.unwrap(), 200);
    assert_eq!(ok(tls_client(&b, https), "b.test").await.unwrap(), 200);
    assert!(
        ok(tls_client(&a, https), "b.test").await.is_err(),
        "b.test is served b's certificate, not a's"
    );

    // Replace a's files on disk: the new certificate is served within the reload interval.
    let a2 = write_cert(dir.path(), "a", &["a.test"]);
    let mut served = false;
    for _ in 0..120 {
        if ok(tls_client(&a2, https), "a.test")
            .await
            .is_ok_and(|s| s == 200)
        {
            served = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(served, "the replaced certificate was not picked up");

    // TLS 1.1 is refused; the same probe at TLS 1.2 completes.
    let probe = |version: &str| {
        std::process::Command::new("openssl")
            .args([
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                "a.test",
                version,
            ])
            .args(["-cipher", "DEFAULT@SECLEVEL=0"])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    };
    assert!(
        probe("-tls1_2").status.success(),
        "the probe works at TLS 1.2"
    );
    let oldest = probe("-tls1");
    assert!(!oldest.status.success(), "TLS 1.0 must be refused");
    let old = probe("-tls1_1");
    assert!(
        !old.status.success(),
        "TLS 1.1 must be refused: {}",
        String::from_utf8_lossy(&old.stdout)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_is_honoured_only_from_trusted_peers_and_sick_pools_answer_503() {
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[upstreams.sick]
addrs = ["{upstream}"]
health_check = { kind = "http", path = "/sick", interval_ms = 100, unhealthy_after = 1 }
[filters.no_docs]
kind = "ip"
deny = ["192.0.2.0/24"]
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
filters = ["no_docs"]
[[routes]]
name = "sick"
path_prefix = "/sick/"
upstream = "sick"
"#;
    let edge = Edge::start_trusting(toml, upstream().await, dir.path(), "127.0.0.0/8").await;
    let c = reqwest::Client::new();
    let r = c
        .get(format!("{}/api/x", edge.http))
        .header("x-forwarded-for", "6.6.6.6, 198.51.100.7")
        .header("x-request-id", "from-the-lb")
        .send()
        .await
        .unwrap();
    let (status, headers, body) = json(r).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["headers"]["x-forwarded-for"], "198.51.100.7, 127.0.0.1",
        "the corrected chain: the client, then the proxies that vouch for it"
    );
    assert_eq!(
        headers.get("x-request-id").unwrap(),
        "from-the-lb",
        "a trusted peer's request id is kept"
    );
    // The filter judges the client the trusted chain names: the rightmost untrusted hop.
    let r = c
        .get(format!("{}/api/x", edge.http))
        .header("x-forwarded-for", "192.0.2.9")
        .send()
        .await
        .unwrap();
    assert_rejection(&json(r).await, 403, "ip", "denied");

    assert_eq!(
        status_soon(&c, &format!("{}/sick/x", edge.http), 503).await,
        503,
        "a pool whose health checks fail has no peer to offer"
    );
    let r = c.get(format!("{}/sick/x", edge.http)).send().await.unwrap();
    assert_rejection(&json(r).await, 503, "upstream", "no_healthy_upstream");
    let ready = reqwest::get(format!("{}/readyz", edge.admin))
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(
        ready.json::<Value>().await.unwrap()["upstreams_without_healthy_peers"][0],
        "sick"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_address_is_decided_once_from_every_forwarded_line() {
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[filters.no_docs]
kind = "ip"
deny = ["192.0.2.0/24"]
[filters.partners]
kind = "ip"
allow = ["127.0.0.0/8", "198.51.100.0/24", "2001:db8::/32"]
[[routes]]
name = "deny"
path_prefix = "/deny/"
upstream = "echo"
filters = ["no_docs"]
[[routes]]
name = "allow"
path_prefix = "/allow/"
upstream = "echo"
filters = ["partners"]
"#;
    // The test client is the balancer (127.0.0.1, trusted); each case is the header lines it
    // forwards, the client the edge must decide on, and the list the upstream must get.
    let edge = Edge::start_trusting(toml, upstream().await, dir.path(), "127.0.0.0/8").await;
    let c = reqwest::Client::new();
    for (lines, client, denied, allowed) in [
        // A client's own line in front of the balancer's does not choose the address.
        (
            &[&b"192.0.2.9"[..], b"198.51.100.7"][..],
            "198.51.100.7",
            false,
            true,
        ),
        (&[b"198.51.100.7", b"192.0.2.9"], "192.0.2.9", true, false),
        (&[b"198.51.100.7, 192.0.2.9"], "192.0.2.9", true, false),
        // Garbage or a non-ASCII byte is an unknown client, not the balancer.
        (&[b"198.51.100.7, \xff"], "0.0.0.0", false, false),
        (&[b"bogus"], "0.0.0.0", false, false),
        // Hops as balancers write them.
        (&[b"192.0.2.9:4711"], "192.0.2.9", true, false),
        (&[b"[2001:db8::1]:443"], "2001:db8::1", false, true),
    ] {
        let send = |route: &str| {
            let mut r = c.get(format!("{}/{route}/x", edge.http));
            for l in lines {
                r = r.header(
                    "x-forwarded-for",
                    reqwest::header::HeaderValue::from_bytes(l).unwrap(),
                );
            }
            r.send()
        };
        let (status, _, body) = json(send("deny").await.unwrap()).await;
        assert_eq!(status, if denied { 403 } else { 200 }, "{lines:?}");
        let (status, _, body2) = json(send("allow").await.unwrap()).await;
        assert_eq!(status, if allowed { 200 } else { 403 }, "{lines:?}");
        let seen = if denied { body2 } else { body };
        if !seen.is_null() && seen.get("headers").is_some() {
            assert_eq!(
                seen["headers"]["x-forwarded-for"],
                format!("{client}, 127.0.0.1"),
                "{lines:?}"
            );
        }
        let line = edge
            .log_line(|l| l["route"] == "allow" && l["client_ip"] == client)
            .await;
        assert_eq!(line["client_ip"], client, "the log names the same client");
    }
}

/// Sends `target` as the raw request target over HTTP/1.1; the status and the JSON body.
async fn raw_get(addr: &str, target: &str) -> (u16, Value) {
    use tokio::io::AsyncWriteExt;
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let got = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&got);
    let status = text[9..12].parse().unwrap();
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_and_the_upstream_see_the_same_normalised_path() {
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[filters.deny_local]
kind = "ip"
deny = ["127.0.0.0/8"]
[[routes]]
name = "admin"
path_prefix = "/admin/"
upstream = "echo"
filters = ["deny_local"]
[[routes]]
name = "files"
path_prefix = "/files/"
upstream = "echo"
encoded_separators = "keep"
[[routes]]
name = "public"
path_prefix = "/"
upstream = "echo"
"#;
    let edge = Edge::start(toml, upstream().await, dir.path(), false).await;
    let addr = edge.http.trim_start_matches("http://").to_owned();
    // target → the route's answer, and the path (and query) the upstream was sent.
    for (target, status, path, query) in [
        ("/public/x", 200, "/public/x", None),
        ("/%61dmin/x", 403, "", None),
        ("/public/../admin/x", 403, "", None),
        ("/public/%2e%2E/admin/x", 403, "", None),
        ("//admin/x", 403, "", None),
        ("/./admin/x", 403, "", None),
        (
            "/public//a/./b/../c?q=%2e&r",
            200,
            "/public/a/c",
            Some("q=%2e&r"),
        ),
        ("/%7Euser/%41%62", 200, "/~user/Ab", None),
        ("/public/a%2Fb", 400, "", None),
        ("/public/a%5cb", 400, "", None),
        ("/public/a%00b", 400, "", None),
        ("/public/a%zz", 400, "", None),
        ("/files/a%2fb", 200, "/files/a%2Fb", None),
        ("/files/../admin/x", 403, "", None),
        ("http://x/%61dmin/x", 403, "", None),
        ("http://x/public/../y", 200, "/y", None),
    ] {
        let (got, body) = raw_get(&addr, target).await;
        assert_eq!(got, status, "{target}: {body}");
        if status == 200 {
            assert_eq!(body["path"], path, "{target}");
            assert_eq!(body["query"], serde_json::json!(query), "{target}");
        }
        if status == 400 {
            assert_eq!(body["stage"], "protocol", "{target}");
        }
    }
    let line = edge.log_line(|l| l["path"] == "/public/a/c").await;
    assert_eq!(line["route"], "public", "the log shows the normalised path");
    // HTTP/2 (TLS) targets are normalised the same way.
    let https = edge.https.unwrap();
    let h2 = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let r = h2
        .get(format!("https://127.0.0.1:{}/%61dmin/x", https.port()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_headers_cannot_be_smuggled_in_another_spelling() {
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
"#;
    let edge = Edge::start(toml, upstream().await, dir.path(), false).await;
    let https = edge.https.unwrap();
    let h1 = reqwest::Client::new();
    let h2 = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    for (client, url, version) in [
        (
            &h1,
            format!("{}/api/x", edge.http),
            reqwest::Version::HTTP_11,
        ),
        (
            &h2,
            format!("https://127.0.0.1:{}/api/x", https.port()),
            reqwest::Version::HTTP_2,
        ),
    ] {
        let r = client
            .get(&url)
            .header("x-vigil-subject", "mallory")
            .header("x_vigil_subject", "mallory")
            .header("x_vigil_role", "admin")
            .header("x_forwarded_for", "6.6.6.6")
            .header("x_forwarded_host", "evil.example")
            .header("x-real-ip", "6.6.6.6")
            .header("x_real_ip", "6.6.6.6")
            .header("forwarded", "for=6.6.6.6")
            .header("x_request_id", "chosen-by-client")
            .header("x-request-id", "chosen-by-client")
            .send()
            .await
            .unwrap();
        assert_eq!(r.version(), version);
        let (status, headers, body) = json(r).await;
        assert_eq!(status, 200);
        let sent = body["headers"].as_object().unwrap();
        for name in sent.keys() {
            assert!(
                !name.starts_with("x_")
                    && !name.starts_with("x-vigil")
                    && name != "forwarded"
                    && name != "x-real-ip",
                "{version:?}: {name} reached the upstream"
            );
        }
        assert_eq!(sent["x-forwarded-for"], "127.0.0.1", "{version:?}");
        assert_ne!(sent["x-request-id"], "chosen-by-client");
        assert_eq!(
            sent["x-request-id"],
            headers["x-request-id"].to_str().unwrap()
        );
    }
}

/// Sends `raw` bytes as they are; the status and the JSON body of the answer (read up to its
/// `Content-Length`: the connection may stay open).
async fn raw_request(addr: &str, raw: &[u8]) -> (u16, Value) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(raw).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let len = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")?
                        .trim()
                        .parse()
                        .ok()
                })
                .unwrap_or(0usize);
            if body.len() >= len {
                let status = head.get(9..12).and_then(|c| c.parse().ok()).unwrap_or(0);
                return (status, serde_json::from_str(body).unwrap_or(Value::Null));
            }
        }
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => got.extend_from_slice(&buf[..n]),
            _ => panic!("no whole answer: {text:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_mistakes_in_framing_are_400s_with_the_json_body() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(ROUTES, upstream().await, dir.path(), false).await;
    let addr = edge.http.trim_start_matches("http://").to_owned();
    let many: Vec<String> = (0..10).map(|i| format!("x-opt-{i}")).collect();
    for (raw, reason) in [
        (
            "GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: x-forwarded-for\r\n\r\n".to_owned(),
            "bad_connection_header",
        ),
        (
            format!(
                "GET /api/x HTTP/1.1\r\nHost: x\r\nConnection: {}\r\n\r\n",
                many.join(", ")
            ),
            "bad_connection_header",
        ),
        (
            "POST /api/v2/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                .to_owned(),
            "malformed",
        ),
    ] {
        let (status, body) = raw_request(&addr, raw.as_bytes()).await;
        assert_eq!(status, 400, "{raw:?}: {body}");
        assert_eq!(body["stage"], "request", "{raw:?}");
        assert_eq!(body["error"], reason, "{raw:?}");
        assert!(body["request_id"].is_string());
    }
    // What Pingora's parser lets through and the edge refuses itself (stage `protocol`).
    for (raw, reason) in [
        ("GET /api/x HTTP/1.1\r\n\r\n", "missing_host"),
        (
            "POST /api/x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            "unsupported_transfer_encoding",
        ),
    ] {
        let (status, body) = raw_request(&addr, raw.as_bytes()).await;
        assert_eq!(
            (status, body["stage"].as_str()),
            (400, Some("protocol")),
            "{raw:?}: {body}"
        );
        assert_eq!(body["error"], reason, "{raw:?}");
    }
    // A space or control byte in the target: Pingora's parser percent-encodes it, so the edge,
    // its filters and the upstream all read the same path.
    for (raw, seen) in [
        (
            &b"GET /api/a b HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            "/api/a%20b",
        ),
        (b"GET /api/a\x01b HTTP/1.1\r\nHost: x\r\n\r\n", "/api/a%01b"),
    ] {
        let (status, body) = raw_request(&addr, raw).await;
        assert_eq!((status, body["path"].as_str()), (200, Some(seen)), "{body}");
    }
    // HTTP/1.0 needs no Host.
    let (status, _) = raw_request(&addr, b"GET /api/x HTTP/1.0\r\n\r\n").await;
    assert_eq!(status, 200);
    let line = edge.log_line(|l| l["reason"] == "malformed").await;
    assert_eq!(
        (line["status"].as_u64(), line["stage"].as_str()),
        (Some(400), Some("request"))
    );
    assert_eq!(
        edge.metric(
            "vigil_proxy_rejections_total{reason=\"bad_connection_header\",route=\"unmatched\",stage=\"request\"}"
        ),
        2.0
    );
    assert_eq!(
        edge.metric(
            "vigil_proxy_rejections_total{reason=\"internal\",route=\"api-v2\",stage=\"proxy\"}"
        ),
        0.0,
        "never a 500"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edges_own_answers_over_https_carry_the_security_headers() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(ROUTES, upstream().await, dir.path(), false).await;
    let https = edge.https.unwrap();
    let c = reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .build()
        .unwrap();
    let base = format!("https://127.0.0.1:{}", https.port());
    for (path, status) in [("/nowhere", 404), ("/blocked/x", 403), ("/gone/x", 502)] {
        let r = c.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), status, "{path}");
        let h = r.headers();
        assert_eq!(
            h.get("strict-transport-security")
                .map(|v| v.to_str().unwrap()),
            Some("max-age=31536000; includeSubDomains"),
            "{path}"
        );
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
    }
    let big = c
        .post(format!("{base}/api/x"))
        .body(vec![b'x'; 1000])
        .send()
        .await
        .unwrap();
    assert_eq!(big.status(), 413);
    assert!(big.headers().contains_key("strict-transport-security"));
    // Plain HTTP answers get no HSTS.
    let r = reqwest::get(format!("{}/nowhere", edge.http))
        .await
        .unwrap();
    assert!(!r.headers().contains_key("strict-transport-security"));
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
}

const LIMITED: &str = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[filters.per_ip]
kind = "rate_limit"
rate_per_min = 60
burst = 3
[filters.per_key]
kind = "rate_limit"
rate_per_min = 60
burst = 2
key = "header:x-api-key"
[filters.watch]
kind = "rate_limit"
rate_per_min = 1
burst = 1
mode = "shadow"
[filters.guess]
kind = "login_guard"
failures = 3
window_secs = 60
cooldown_secs = 2
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
filters = ["per_ip"]
[[routes]]
name = "keyed"
path_prefix = "/keyed/"
upstream = "echo"
filters = ["per_key"]
[[routes]]
name = "watched"
path_prefix = "/watched/"
upstream = "echo"
filters = ["watch"]
[[routes]]
name = "login"
path_prefix = "/login/"
upstream = "echo"
filters = ["guess"]
ratelimit_headers = false
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_limits_answer_429_with_the_draft_fields_and_keep_their_state_across_reloads() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(LIMITED, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let get = |path: &str| c.get(format!("{}{path}", edge.http)).send();
    // A burst of 3, each answer saying what is left; the fourth is limited.
    for left in [2, 1, 0] {
        let r = get("/api/x").await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["ratelimit-policy"], "\"per_ip\";q=3;w=3");
        assert_eq!(
            r.headers()["ratelimit"].to_str().unwrap(),
            format!("\"per_ip\";r={left};t={}", 3 - left)
        );
    }
    let (status, headers, body) = json(get("/api/x").await.unwrap()).await;
    assert_rejection(
        &(status, headers.clone(), body),
        429,
        "rate_limit",
        "limited",
    );
    assert_eq!(headers["retry-after"], "1");
    assert_eq!(headers["ratelimit"], "\"per_ip\";r=0;t=3");
    let line = edge.log_line(|l| l["status"] == 429).await;
    assert_eq!(
        (line["ratelimit_policy"].as_str(), line["stage"].as_str()),
        (Some("per_ip"), Some("rate_limit"))
    );
    assert_eq!(
        edge.metric("vigil_proxy_ratelimit_decisions_total{policy=\"per_ip\",result=\"limited\"}"),
        1.0
    );
    // A reload that leaves the policy as it was keeps its counts: still limited.
    edge.rewrite(&format!(
        "{LIMITED}\n[[routes]]\nname = \"extra\"\npath_prefix = \"/extra/\"\nupstream = \"echo\"\n"
    ));
    edge.reloader.reload().unwrap();
    assert_eq!(
        get("/api/x").await.unwrap().status(),
        429,
        "unchanged policy, same table"
    );
    // A changed policy starts fresh.
    edge.rewrite(&LIMITED.replace("burst = 3", "burst = 5"));
    edge.reloader.reload().unwrap();
    assert_eq!(
        get("/api/x").await.unwrap().status(),
        200,
        "a changed policy starts fresh"
    );

    // Keyed by a header: one key's exhaustion does not touch another's.
    let keyed = |key: &'static str| {
        c.get(format!("{}/keyed/x", edge.http))
            .header("x-api-key", key)
            .send()
    };
    for _ in 0..2 {
        assert_eq!(keyed("a").await.unwrap().status(), 200);
    }
    assert_eq!(keyed("a").await.unwrap().status(), 429);
    assert_eq!(
        keyed("b").await.unwrap().status(),
        200,
        "another key is not limited"
    );

    // Shadow: counted and logged as limited, let through, no headers.
    for _ in 0..3 {
        let r = get("/watched/x").await.unwrap();
        assert_eq!(r.status(), 200);
        assert!(!r.headers().contains_key("ratelimit"));
    }
    assert_eq!(
        edge.metric(
            "vigil_proxy_ratelimit_decisions_total{policy=\"watch\",result=\"shadow_limited\"}"
        ),
        2.0
    );
    let line = edge
        .log_line(|l| l["route"] == "watched" && l["decision"] == "shadow")
        .await;
    assert_eq!(line["ratelimit_policy"], "watch");
    assert_eq!(line["status"], 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_login_guard_cools_down_a_client_that_keeps_failing() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(LIMITED, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let post = |path: &str| c.post(format!("{}{path}", edge.http)).send();
    // Successes count nothing.
    for _ in 0..5 {
        assert_eq!(post("/login/ok").await.unwrap().status(), 200);
    }
    for _ in 0..3 {
        assert_eq!(post("/login/fail").await.unwrap().status(), 401);
    }
    let (status, headers, body) = json(post("/login/ok").await.unwrap()).await;
    assert_rejection(
        &(status, headers.clone(), body),
        429,
        "login_guard",
        "cooling_down",
    );
    assert_eq!(headers["retry-after"], "2");
    assert!(
        !headers.contains_key("ratelimit"),
        "ratelimit_headers = false"
    );
    let line = edge.log_line(|l| l["status"] == 429).await;
    assert_eq!(
        line["upstream_ms"],
        Value::Null,
        "the upstream was not called"
    );
    assert_eq!(
        edge.metric("vigil_proxy_login_guard_cooldowns_total{policy=\"guess\"}"),
        1.0
    );
    let gauge = reqwest::get(format!("{}/metrics", edge.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        gauge.contains("vigil_proxy_login_guard_cooling_down{policy=\"guess\"} 1"),
        "{gauge}"
    );
    // After the cool-down the client is let in again (polled, bounded).
    let mut status = 0;
    for _ in 0..100 {
        status = post("/login/ok").await.unwrap().status().as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200);
}

/// The Redis of the shared-store tests: `VIGIL_TEST_REDIS_URL` (set by `.ci/run`); `None`
/// skips them when it is not set.
fn test_redis() -> Option<String> {
    let url = std::env::var("VIGIL_TEST_REDIS_URL").ok()?;
    Some(url)
}

/// A policy name no earlier run used: shared counts live in Redis for their window.
fn fresh_policy() -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("shared_{}_{nanos}", std::process::id())
}

async fn redis_cmd(url: &str, args: &[&str]) -> redis::Value {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_script_matches_the_gcra_reference_table() {
    let Some(url) = test_redis() else {
        eprintln!("VIGIL_TEST_REDIS_URL is not set: skipped");
        return;
    };
    use proxy::filters::rate_limit::{limiter::Decision, shared};
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../shared/corpora/ratelimit/gcra_throttled_table.json"
    );
    let table: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let store = Arc::new(shared::SharedStore::new(
        &fresh_policy(),
        redis::Client::open(url.as_str()).unwrap(),
        Duration::from_nanos(table["period_ns"].as_u64().unwrap()),
        table["limit"].as_u64().unwrap() as u32,
        Duration::from_secs(2),
        &proxy::metrics::Metrics::new(),
    ));
    store.connect().await.unwrap();
    // The table's times, from a base in microseconds (the script's unit).
    let base = 1_000_000_000_000u64;
    for row in table["cases"].as_array().unwrap() {
        let at = base + row["now_ns"].as_u64().unwrap() / 1000;
        let got = store
            .decide(7, row["volume"].as_u64().unwrap() as u32, Some(at))
            .await;
        let retry = row["retry_ns"].as_i64().unwrap();
        let want = shared::Outcome::Decided(Decision {
            allowed: !row["limited"].as_bool().unwrap(),
            remaining: row["remaining"].as_u64().unwrap() as u32,
            reset: Duration::from_nanos(row["reset_ns"].as_u64().unwrap()),
            retry_after: (retry >= 0).then(|| Duration::from_nanos(retry as u64)),
        });
        assert_eq!(got, want, "row {}", row["i"]);
    }
}

fn shared_config(policy: &str, redis: &str, on_error: &str, timeout_ms: u64) -> String {
    format!(
        r#"
[upstreams.echo]
addrs = ["{{upstream}}"]
[filters.{policy}]
kind = "rate_limit"
rate_per_min = 1
burst = 20
store = "redis"
redis_url = "{redis}"
on_store_error = "{on_error}"
store_timeout_ms = {timeout_ms}
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
filters = ["{policy}"]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_redis_enforce_one_combined_limit() {
    let Some(url) = test_redis() else {
        eprintln!("VIGIL_TEST_REDIS_URL is not set: skipped");
        return;
    };
    let upstream = upstream().await;
    let policy = fresh_policy();
    let toml = shared_config(&policy, &url, "deny", 200);
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = Edge::start(&toml, upstream, d1.path(), false).await;
    let b = Edge::start(&toml, upstream, d2.path(), false).await;
    let c = reqwest::Client::new();
    // The first decision connects in the background; wait until Redis decides (bounded).
    for edge in [&a, &b] {
        let ready = format!("{}/readyz", edge.admin);
        let mut connected = false;
        for _ in 0..200 {
            let _ = c.get(format!("{}/health", edge.http)).send().await;
            let body: Value = c.get(&ready).send().await.unwrap().json().await.unwrap();
            if body["ratelimit_stores_unavailable"]
                .as_array()
                .is_some_and(Vec::is_empty)
                && edge.metric(&format!(
                    "vigil_proxy_ratelimit_store_duration_seconds_count{{policy=\"{policy}\"}}"
                )) > 0.0
            {
                connected = true;
                break;
            }
            let _ = c.get(format!("{}/api/warm", edge.http)).send().await;
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        assert!(connected, "the proxy reached Redis");
    }
    // Start from a clean key: the warm-up requests above took cells.
    let keys = redis_cmd(&url, &["KEYS", &format!("vigil:rl:{policy}:*")]).await;
    if let redis::Value::Array(keys) = keys {
        for k in keys {
            if let redis::Value::BulkString(k) = k {
                redis_cmd(&url, &["DEL", &String::from_utf8(k).unwrap()]).await;
            }
        }
    }
    // 60 requests, alternating between the two proxies: one burst of 20 between them (each
    // alone would have let 20 through: 40).
    let mut admitted = 0;
    for i in 0..60 {
        let edge = if i % 2 == 0 { &a } else { &b };
        let status = c
            .get(format!("{}/api/x", edge.http))
            .send()
            .await
            .unwrap()
            .status();
        assert!(status == 200 || status == 429, "{status}");
        admitted += usize::from(status == 200);
    }
    assert!(
        (18..=22).contains(&admitted),
        "admitted {admitted}, one combined burst of 20"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_or_paused_redis_gives_the_fallback_within_the_timeout_and_recovers() {
    let Some(url) = test_redis() else {
        eprintln!("VIGIL_TEST_REDIS_URL is not set: skipped");
        return;
    };
    let upstream = upstream().await;
    let c = reqwest::Client::new();
    // Nothing listens there: every decision falls back, and none waits.
    let dead = format!("redis://127.0.0.1:{}", free_port());
    let policy = fresh_policy();
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(
        &shared_config(&policy, &dead, "local", 5),
        upstream,
        dir.path(),
        false,
    )
    .await;
    for _ in 0..5 {
        let started = std::time::Instant::now();
        let r = c.get(format!("{}/api/x", edge.http)).send().await.unwrap();
        assert_eq!(r.status(), 200, "local fallback: within the local burst");
        assert!(started.elapsed() < Duration::from_secs(2), "never a hang");
    }
    let series = |what: &str| format!("vigil_proxy_ratelimit_{what}");
    assert!(
        edge.metric(&series(&format!(
            "fallbacks_total{{action=\"local\",policy=\"{policy}\"}}"
        ))) >= 5.0
    );
    assert!(
        edge.metric(&series(&format!(
            "store_errors_total{{kind=\"unavailable\",policy=\"{policy}\"}}"
        ))) >= 1.0
    );
    let ready: Value = c
        .get(format!("{}/readyz", edge.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["ratelimit_stores_unavailable"][0], policy.as_str());
    drop(edge);

    // A real Redis, paused: decisions time out (20 ms here) and deny, then recover.
    let policy = fresh_policy();
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(
        &shared_config(&policy, &url, "deny", 20),
        upstream,
        dir.path(),
        false,
    )
    .await;
    let url_x = format!("{}/api/x", edge.http);
    assert_eq!(
        status_soon(&c, &url_x, 200).await,
        200,
        "Redis decides once connected"
    );
    redis_cmd(&url, &["CLIENT", "PAUSE", "1500", "ALL"]).await;
    let started = std::time::Instant::now();
    let r = c.get(format!("{}/api/x", edge.http)).send().await.unwrap();
    let took = started.elapsed();
    let (status, headers, body) = json(r).await;
    assert_rejection(
        &(status, headers, body),
        503,
        "rate_limit",
        "store_unavailable",
    );
    assert!(
        took < Duration::from_millis(1000),
        "answered within the timeout, not after the pause: {took:?}"
    );
    assert!(
        edge.metric(&series(&format!(
            "store_errors_total{{kind=\"timeout\",policy=\"{policy}\"}}"
        ))) >= 1.0
    );
    // After the pause, Redis decides again without a restart (200, or 429 once the commands
    // sent during the pause, which Redis runs when it wakes, have spent the burst).
    let mut status = 0;
    for _ in 0..200 {
        status = c
            .get(format!("{}/api/x", edge.http))
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status != 503 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(status == 200 || status == 429, "recovered: {status}");
    let ready: Value = c
        .get(format!("{}/readyz", edge.admin))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ready["ratelimit_stores_unavailable"], serde_json::json!([]));
}

const GUARDED: &str = r#"
[limits]
header_read_timeout_ms = 1000
max_connections = 3

[upstreams.echo]
addrs = ["{upstream}"]

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
"#;

/// Reads until the peer closes (Ok(bytes)) or `limit` passes (Err).
async fn read_until_closed(s: &mut tokio::net::TcpStream, limit: Duration) -> Result<Vec<u8>, ()> {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
            Err(_) => return Err(()),
        }
    }
}

/// Sends `first`, then `drip` one byte at a time, 200 ms apart, until the edge closes.
async fn trickle(s: &mut tokio::net::TcpStream, first: &[u8], drip: &[u8]) {
    use tokio::io::AsyncWriteExt;
    if s.write_all(first).await.is_err() {
        return;
    }
    for b in drip.iter().cycle().take(100) {
        tokio::time::sleep(Duration::from_millis(200)).await;
        if s.write_all(std::slice::from_ref(b)).await.is_err() {
            return;
        }
    }
}

/// A TLS connection to `addr` that offers only h2 and then says nothing.
async fn silent_h2(
    connector: &tokio_rustls::TlsConnector,
    addr: SocketAddr,
) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let name = tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let tls = connector.connect(name, tcp).await.unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// Whether the peer closes `s` within `limit` (what it sends first, such as h2's SETTINGS, is
/// read and dropped).
async fn closes(s: &mut (impl tokio::io::AsyncRead + Unpin), limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let until = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(until, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return true,
            Ok(Ok(_)) => {}
            Err(_) => return false,
        }
    }
}

/// A client that trusts `dir/edge.crt` and offers only h2.
fn h2_connector(dir: &Path) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(dir.join("edge.crt")).unwrap();
    roots
        .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// Waits (bounded) until `series` reads `want`; the last value read.
async fn metric_soon(edge: &Edge, series: &str, want: f64, limit: Duration) -> f64 {
    let until = std::time::Instant::now() + limit;
    loop {
        let v = edge.metric(series);
        if v == want || std::time::Instant::now() > until {
            return v;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

const SLOW: &str = r#"
[limits]
header_read_timeout_ms = 1500
keepalive_timeout_secs = 30

[upstreams.echo]
addrs = ["{upstream}"]

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_headers_are_cut_off_on_every_request_and_protocol() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    write_cert(dir.path(), "edge", &["localhost"]);
    let certs = format!(
        "certs = [{{ cert_path = \"{d}/edge.crt\", key_path = \"{d}/edge.key\" }}]\n",
        d = dir.path().display()
    );
    let setup = Setup {
        tls: Some(&certs),
        ..Setup::default()
    };
    let edge = Edge::start_with(setup, SLOW, upstream().await, dir.path()).await;
    let addr = edge.http.trim_start_matches("http://").to_owned();
    let deadline = Duration::from_millis(1500);
    // Each client is cut off after the deadline and well before its trickle would end (20 s).
    let cut_off = |what: &'static str, started: std::time::Instant| {
        let took = started.elapsed();
        assert!(
            took >= deadline - Duration::from_millis(100) && took < deadline * 3,
            "{what}: closed after {took:?}"
        );
    };

    // 1. A header that trickles in, line by line.
    let started = std::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let normal = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let r = reqwest::get(format!("{}/api/ok", edge.http)).await.unwrap();
        assert_eq!(r.status(), 200, "a normal client is served meanwhile");
    };
    tokio::join!(
        trickle(
            &mut slow,
            b"GET /api/x HTTP/1.1\r\nHost: x\r\n",
            b"x-drip: 1\r\n"
        ),
        normal
    );
    cut_off("a dripping header", started);

    // 2. Empty lines first (the parser skips them), then one byte at a time.
    let started = std::time::Instant::now();
    let mut slow = tokio::net::TcpStream::connect(&addr).await.unwrap();
    trickle(&mut slow, b"\r\n\r\n", b"GET /api/x HTTP/1.1\r\n").await;
    cut_off("empty lines, then a dripping request line", started);

    // 3. A kept-alive connection's second request.
    let mut kept = tokio::net::TcpStream::connect(&addr).await.unwrap();
    kept.write_all(b"GET /api/first HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("/api/first\"") {
        let n = kept.read(&mut buf).await.unwrap();
        assert!(n > 0, "the first request is answered");
        got.extend_from_slice(&buf[..n]);
    }
    // Idle between requests is the keep-alive's (30 s), not the header deadline's.
    tokio::time::sleep(deadline + Duration::from_millis(300)).await;
    let started = std::time::Instant::now();
    trickle(&mut kept, b"G", b"ET /api/second HTTP/1.1\r\n").await;
    cut_off("a kept-alive connection's second header", started);

    // 4. A header that grows past twice max_header_bytes is cut off at once, not at the deadline.
    let started = std::time::Instant::now();
    let mut flood = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = flood.write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n").await;
    let line = format!("x-pad: {}\r\n", "a".repeat(1000));
    for _ in 0..40 {
        if flood.write_all(line.as_bytes()).await.is_err() {
            break;
        }
    }
    let closed = read_until_closed(&mut flood, deadline * 3).await;
    assert!(closed.is_ok_and(|b| b.is_empty()), "the flood is closed");
    assert!(
        started.elapsed() < deadline - Duration::from_millis(500),
        "closed by the byte budget after {:?}",
        started.elapsed()
    );

    // 5. HTTP/2: a TLS handshake with ALPN h2, then silence.
    let https = edge.https.unwrap();
    let connector = h2_connector(dir.path());
    let started = std::time::Instant::now();
    let mut quiet = silent_h2(&connector, https).await;
    assert!(
        closes(&mut quiet, deadline * 3).await,
        "the silent h2 connection is closed"
    );
    cut_off("a silent h2 connection", started);
    assert_eq!(
        metric_soon(&edge, "vigil_proxy_connections_active", 0.0, deadline).await,
        0.0
    );
}

const H2_IDLE: &str = r#"
[limits]
header_read_timeout_ms = 6000
keepalive_timeout_secs = 1
max_connections = 400

[upstreams.echo]
addrs = ["{upstream}"]

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_h2_connections_are_closed_and_their_places_come_back() {
    let dir = tempfile::tempdir().unwrap();
    let trust = write_cert(dir.path(), "edge", &["localhost"]);
    let certs = format!(
        "certs = [{{ cert_path = \"{d}/edge.crt\", key_path = \"{d}/edge.key\" }}]\n",
        d = dir.path().display()
    );
    let setup = Setup {
        tls: Some(&certs),
        ..Setup::default()
    };
    let edge = Edge::start_with(setup, H2_IDLE, upstream().await, dir.path()).await;
    let https = edge.https.unwrap();
    assert_eq!(
        metric_soon(
            &edge,
            "vigil_proxy_connections_active",
            0.0,
            Duration::from_secs(5)
        )
        .await,
        0.0
    );

    // A client that made one request and went idle: the h2 idle timeout closes it.
    let client = reqwest::Client::builder()
        .add_root_certificate(trust.clone())
        .resolve("localhost", https)
        .build()
        .unwrap();
    let url = format!("https://localhost:{}/api/x", https.port());
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(
        metric_soon(
            &edge,
            "vigil_proxy_connections_active",
            0.0,
            Duration::from_secs(5)
        )
        .await,
        0.0,
        "closed by the h2 idle timeout (1 s)"
    );

    // 400 connections that never send a frame fill the cap (the idle timeout does not apply
    // before a client's first header: the header deadline does)...
    let connector = h2_connector(dir.path());
    let mut quiet = Vec::new();
    for _ in 0..4 {
        let mut batch = tokio::task::JoinSet::new();
        for _ in 0..100 {
            let connector = connector.clone();
            batch.spawn(async move { silent_h2(&connector, https).await });
        }
        quiet.extend(batch.join_all().await);
    }
    assert_eq!(
        metric_soon(
            &edge,
            "vigil_proxy_connections_active",
            400.0,
            Duration::from_secs(5)
        )
        .await,
        400.0
    );
    // A new client is refused while the cap is full (its TLS would otherwise succeed).
    let refused = reqwest::Client::builder()
        .add_root_certificate(trust.clone())
        .resolve("localhost", https)
        .pool_max_idle_per_host(0)
        .build()
        .unwrap()
        .get(&url)
        .send()
        .await;
    assert!(refused.is_err(), "the cap is full");
    // ...and are all closed by the deadline; their places come back.
    assert_eq!(
        metric_soon(
            &edge,
            "vigil_proxy_connections_active",
            0.0,
            Duration::from_secs(20)
        )
        .await,
        0.0
    );
    for conn in &mut quiet {
        assert!(
            closes(conn, Duration::from_secs(5)).await,
            "closed by the edge"
        );
    }
    let r = client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200, "a new client is served again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_closed_until_a_slot_frees() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(GUARDED, upstream().await, dir.path(), false).await;
    let addr = edge.http.trim_start_matches("http://").to_owned();
    // The harness's readiness probe may still hold a slot for a moment: wait for the gauge to settle.
    for _ in 0..100 {
        if edge.metric("vigil_proxy_connections_active") == 0.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    for _ in 0..100 {
        if edge.metric("vigil_proxy_connections_active") == 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(edge.metric("vigil_proxy_connections_active"), 3.0);
    let mut extra = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = extra
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut extra, Duration::from_secs(3))
        .await
        .expect("closed at once");
    assert!(
        answer.is_empty(),
        "the fourth connection gets no answer: {}",
        String::from_utf8_lossy(&answer)
    );
    held.pop();
    let mut ok = false;
    for _ in 0..100 {
        if let Ok(r) = reqwest::get(format!("{}/api/x", edge.http)).await
            && r.status() == 200
        {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a freed slot admits a new connection");

    // A reload lowers the cap for the next connections, without a restart.
    edge.rewrite(&GUARDED.replace("max_connections = 3", "max_connections = 1"));
    edge.reloader.reload().unwrap();
    drop(held);
    assert_eq!(
        metric_soon(
            &edge,
            "vigil_proxy_connections_active",
            0.0,
            Duration::from_secs(5)
        )
        .await,
        0.0
    );
    let _one = tokio::net::TcpStream::connect(&addr).await.unwrap();
    assert_eq!(
        metric_soon(
            &edge,
            "vigil_proxy_connections_active",
            1.0,
            Duration::from_secs(5)
        )
        .await,
        1.0
    );
    let mut second = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let _ = second
        .write_all(b"GET /api/x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await;
    let answer = read_until_closed(&mut second, Duration::from_secs(3))
        .await
        .expect("closed at once");
    assert!(answer.is_empty(), "the reloaded cap of 1 holds");
}

const CORS: &str = r#"
[upstreams.echo]
addrs = ["{upstream}"]

[[routes]]
name = "app"
path_prefix = "/app/"
upstream = "echo"
compression_level = 5
cors = { allowed_origins = ["https://app.example"], allow_credentials = true, expose_headers = ["x-request-id"] }

[[routes]]
name = "plain"
path_prefix = "/plain/"
upstream = "echo"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cors_preflights_are_answered_at_the_edge_and_responses_compressed_on_request() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(CORS, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let preflight = |origin: &'static str, method: &'static str| {
        c.request(reqwest::Method::OPTIONS, format!("{}/app/items", edge.http))
            .header("origin", origin)
            .header("access-control-request-method", method)
            .send()
    };
    let ok = preflight("https://app.example", "POST").await.unwrap();
    assert_eq!(ok.status(), 204, "answered by the edge, not the upstream");
    assert_eq!(
        ok.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(ok.headers()["access-control-allow-credentials"], "true");
    assert_rejection(
        &json(preflight("https://evil.example", "POST").await.unwrap()).await,
        403,
        "cors",
        "origin_not_allowed",
    );

    let get = |origin: &'static str| {
        c.get(format!("{}/app/items", edge.http))
            .header("origin", origin)
            .send()
    };
    let r = get("https://app.example").await.unwrap();
    assert_eq!(
        r.headers()["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(r.headers()["access-control-expose-headers"], "x-request-id");
    assert!(
        get("https://evil.example")
            .await
            .unwrap()
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );

    // The upstream's Vary is kept; Origin joins it.
    let varied = c
        .get(format!("{}/app/varied", edge.http))
        .header("origin", "https://app.example")
        .send()
        .await
        .unwrap();
    let vary: Vec<String> = varied
        .headers()
        .get_all("vary")
        .iter()
        .map(|v| v.to_str().unwrap().to_ascii_lowercase())
        .collect();
    assert!(
        vary.iter().any(|v| v.contains("accept-encoding"))
            && vary.iter().any(|v| v.contains("origin")),
        "{vary:?}"
    );
    let zipped = c
        .get(format!("{}/app/items", edge.http))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert_eq!(
        zipped
            .headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("gzip")
    );
    // The body is real gzip (flate2's zlib-ng API, answered by zlib-rs: patches/libz-ng-sys).
    let zipped = zipped.bytes().await.unwrap();
    let mut unzipped = String::new();
    std::io::Read::read_to_string(
        &mut flate2::read::GzDecoder::new(&zipped[..]),
        &mut unzipped,
    )
    .unwrap();
    let plain_body: Value = c
        .get(format!("{}/app/items", edge.http))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        serde_json::from_str::<Value>(&unzipped).unwrap()["path"],
        plain_body["path"]
    );
    let br = c
        .get(format!("{}/app/items", edge.http))
        .header("accept-encoding", "br")
        .send()
        .await
        .unwrap();
    assert_eq!(
        br.headers()
            .get("content-encoding")
            .map(|v| v.to_str().unwrap()),
        Some("br")
    );
    let plain = c
        .get(format!("{}/plain/items", edge.http))
        .header("accept-encoding", "gzip")
        .send()
        .await
        .unwrap();
    assert!(
        plain.headers().get("content-encoding").is_none(),
        "compression is per route"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_listener_serves_process_metrics_health_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(CORS, upstream().await, dir.path(), false).await;
    let text = reqwest::get(format!("{}/metrics", edge.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for family in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "vigil_proxy_connections_active",
    ] {
        assert!(text.contains(family), "{family} is exported");
    }
    assert_eq!(
        reqwest::get(format!("{}/readyz", edge.admin))
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        reqwest::get(format!("{}/nothing", edge.admin))
            .await
            .unwrap()
            .status(),
        404
    );
}

const HALF_DEAD: &str = r#"
[upstreams.pair]
addrs = ["{dead}", "{upstream}"]
health_check = { kind = "tcp", interval_ms = 600000, unhealthy_after = 5 }
eject_on_connect_failure_secs = 60

[[routes]]
name = "pair"
path_prefix = "/"
upstream = "pair"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_connection_is_retried_once_and_its_peer_ejected() {
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(HALF_DEAD, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    for i in 0..4 {
        let r = c
            .get(format!("{}/get/{i}", edge.http))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            200,
            "GET {i}: a connect failure is retried on the other peer"
        );
    }
    // POSTs are not retried: they all succeed only because the dead peer was ejected.
    for i in 0..4 {
        let r = c
            .post(format!("{}/post/{i}", edge.http))
            .body("x")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "POST {i} went to an ejected peer");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_past_its_total_time_is_answered_504_by_the_edge() {
    let dir = tempfile::tempdir().unwrap();
    let toml = format!("[limits]\nrequest_timeout_ms = 300\n{PATIENT}");
    let edge = Edge::start(&toml, upstream().await, dir.path(), false).await;
    let started = std::time::Instant::now();
    let r = reqwest::get(format!("{}/patient/slow", edge.http))
        .await
        .unwrap();
    assert_rejection(&json(r).await, 504, "limits", "request_timeout");
    assert!(
        started.elapsed() < Duration::from_millis(700),
        "answered at the deadline, not when the upstream was done"
    );
    assert_eq!(
        reqwest::get(format!("{}/patient/fast", edge.http))
            .await
            .unwrap()
            .status(),
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_path_that_is_not_utf8_is_refused_before_any_filter() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(ROUTES, upstream().await, dir.path(), false).await;
    let mut s = tokio::net::TcpStream::connect(edge.http.trim_start_matches("http://"))
        .await
        .unwrap();
    s.write_all(b"GET /blocked/\xff\xfe HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut s, Duration::from_secs(5))
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&answer);
    // Pingora's HTTP/1 parser refuses these bytes itself, before any phase of the proxy runs
    // (so without the JSON body; see README). What matters: 400, and no filter saw the request.
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert_eq!(
        edge.metric(r#"vigil_proxy_rejections_total{reason="denied",route="blocked",stage="ip"}"#),
        0.0
    );
    assert!(
        edge.log_lines().is_empty(),
        "nothing was proxied or filtered"
    );
}

/// An HS256 token for `sub` with `role`, signed with `secret`, valid for 15 minutes.
fn hs256(secret: &[u8], sub: &str, role: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"iss": "edge-test", "aud": "api", "sub": sub, "role": role,
        "iat": now, "exp": now + 900});
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
    header.kid = Some("h1".into());
    jsonwebtoken::encode(
        &header,
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

const JWT: &str = r#"
[upstreams.echo]
addrs = ["{upstream}"]
health_check = { kind = "tcp", interval_ms = 200 }

[filters.auth]
kind = "jwt"
issuer = "edge-test"
audiences = ["api"]
algorithms = ["HS256"]
hmac_secrets = [{ file = "{secret}", kid = "h1" }]
forward_claims = { sub = "x-vigil-subject", role = "x-vigil-role" }

[filters.maybe]
kind = "jwt"
issuer = "edge-test"
audiences = ["api"]
algorithms = ["HS256"]
hmac_secrets = [{ file = "{secret}", kid = "h1" }]
required = false
forward_token = true

[filters.crumb]
kind = "jwt"
issuer = "edge-test"
audiences = ["api"]
algorithms = ["HS256"]
hmac_secrets = [{ file = "{secret}", kid = "h1" }]
token_from = "cookie:vigil_token"

[filters.watch]
kind = "jwt"
issuer = "edge-test"
audiences = ["api"]
algorithms = ["HS256"]
hmac_secrets = [{ file = "{secret}", kid = "h1" }]
mode = "shadow"

[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
filters = ["auth"]

[[routes]]
name = "maybe"
path_prefix = "/maybe/"
upstream = "echo"
filters = ["maybe"]

[[routes]]
name = "crumb"
path_prefix = "/crumb/"
upstream = "echo"
filters = ["crumb"]

[[routes]]
name = "watch"
path_prefix = "/watch/"
upstream = "echo"
filters = ["watch"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_jwt_filter_tells_the_upstream_who_the_caller_is() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    let secret = b"a secret of at least thirty-two bytes, for HS256".to_vec();
    std::fs::write(&secret_file, &secret).unwrap();
    let toml = JWT.replace("{secret}", &secret_file.display().to_string());
    let edge = Edge::start(&toml, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let token = hs256(&secret, "alice", "user");

    // The caller's claims reach the upstream; the client's own identity headers do not.
    let r = c
        .get(format!("{}/api/x", edge.http))
        .bearer_auth(&token)
        .header("x-vigil-subject", "mallory")
        .header("x-vigil-role", "admin")
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-vigil-subject"], "alice");
    assert_eq!(body["headers"]["x-vigil-role"], "user");
    assert!(
        body["headers"].get("authorization").is_none(),
        "the token stops at the edge: {body}"
    );
    let line = edge.log_line(|l| l["route"] == "api").await;
    assert_eq!(line["subject"], "alice");

    let r = c
        .get(format!("{}/api/x", edge.http))
        .header("x-vigil-subject", "mallory")
        .send()
        .await
        .unwrap();
    let got = json(r).await;
    assert_rejection(&got, 401, "jwt", "missing");
    assert_eq!(got.1["www-authenticate"], r#"Bearer realm="vigil""#);

    // Optional: no token passes, anonymous (the spoofed subject is gone); a bad one does not.
    let r = c
        .get(format!("{}/maybe/x", edge.http))
        .header("x-vigil-subject", "mallory")
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 200);
    assert!(body["headers"].get("x-vigil-subject").is_none(), "{body}");
    let r = c
        .get(format!("{}/maybe/x", edge.http))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 200);
    assert_eq!(
        body["headers"]["authorization"],
        format!("Bearer {token}"),
        "forward_token passes the token on"
    );
    let forged = hs256(
        b"another secret of at least thirty-two bytes",
        "alice",
        "user",
    );
    let r = c
        .get(format!("{}/maybe/x", edge.http))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    assert_rejection(&json(r).await, 401, "jwt", "bad_signature");

    // From a cookie: the token cookie stops at the edge, the caller's other cookies go on.
    let r = c
        .get(format!("{}/crumb/x", edge.http))
        .header(
            "cookie",
            format!("theme=dark; vigil_token={token}; lang=en"),
        )
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["headers"]["x-vigil-subject"], "alice");
    assert_eq!(body["headers"]["cookie"], "theme=dark; lang=en");
    let r = c
        .get(format!("{}/crumb/x", edge.http))
        .header("cookie", format!("vigil_token={token}"))
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["headers"].get("cookie").is_none(), "{body}");

    // Shadow: the forged token goes through, logged and counted as what would have happened.
    let r = c
        .get(format!("{}/watch/x", edge.http))
        .bearer_auth(&forged)
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 200);
    assert!(
        body["headers"].get("x-vigil-subject").is_none(),
        "no identity from a bad token"
    );
    let line = edge.log_line(|l| l["route"] == "watch").await;
    assert_eq!(
        (
            line["decision"].as_str(),
            line["stage"].as_str(),
            line["reason"].as_str()
        ),
        (Some("shadow"), Some("jwt"), Some("bad_signature"))
    );
    assert_eq!(
        edge.metric(r#"vigil_proxy_shadow_decisions_total{reason="bad_signature",route="watch",stage="jwt"}"#),
        1.0
    );
    assert_eq!(
        edge.metric(
            r#"vigil_proxy_jwt_validations_total{issuer="edge-test",result="bad_signature"}"#
        ),
        2.0
    );

    // A rotated secret is read on reload: the old token is refused, a new one passes.
    let rotated = b"the next secret, also thirty-two bytes or more".to_vec();
    std::fs::write(&secret_file, &rotated).unwrap();
    edge.reloader.reload().unwrap();
    let status = |t: String| {
        let c = c.clone();
        let url = format!("{}/api/x", edge.http);
        async move {
            c.get(url)
                .bearer_auth(t)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(status(token.clone()).await, 401);
    assert_eq!(status(hs256(&rotated, "alice", "user")).await, 200);

    // A secret that cannot be read fails the reload and names the key; the old config serves.
    std::fs::remove_file(&secret_file).unwrap();
    let err = edge.reloader.reload().unwrap_err().to_string();
    assert!(
        err.contains("filters.auth.hmac_secrets[0]: cannot read"),
        "{err}"
    );
    assert_eq!(status(hs256(&rotated, "alice", "user")).await, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_health_checks_send_the_configured_host() {
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[upstreams.named]
addrs = ["{upstream}"]
health_check = { kind = "http", path = "/health/host", host = "health.internal", interval_ms = 100, unhealthy_after = 1 }
[upstreams.unnamed]
addrs = ["{upstream}"]
health_check = { kind = "http", path = "/health/host", interval_ms = 100, unhealthy_after = 1 }
[[routes]]
name = "named"
path_prefix = "/named/"
upstream = "named"
[[routes]]
name = "unnamed"
path_prefix = "/unnamed/"
upstream = "unnamed"
"#;
    let edge = Edge::start(toml, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    // The upstream is healthy only for checks that say Host: health.internal.
    assert_eq!(
        status_soon(&c, &format!("{}/unnamed/x", edge.http), 503).await,
        503,
        "checked with the peer's own host, the pool is down"
    );
    let r = c
        .get(format!("{}/named/x", edge.http))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.status(),
        200,
        "checked with the configured host, it is up"
    );
    let ready = reqwest::get(format!("{}/readyz", edge.admin))
        .await
        .unwrap();
    let body = ready.json::<Value>().await.unwrap();
    assert_eq!(
        body["upstreams_without_healthy_peers"],
        serde_json::json!(["unnamed"])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_security_policies_are_kept_and_its_server_is_not_named() {
    let dir = tempfile::tempdir().unwrap();
    let toml = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[[routes]]
name = "all"
path_prefix = "/"
upstream = "echo"
"#;
    let edge = Edge::start(toml, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let r = c
        .get(format!("{}/csp/page", edge.http))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["content-security-policy"], "default-src 'self'");
    assert_eq!(r.headers()["x-frame-options"], "DENY");
    assert!(
        r.headers().get("server").is_none(),
        "no name or version of the upstream's software"
    );
    let r = c.get(format!("{}/other", edge.http)).send().await.unwrap();
    assert!(
        r.headers().get("content-security-policy").is_none(),
        "the edge's framing rule is X-Frame-Options"
    );
    assert_eq!(r.headers()["x-frame-options"], "DENY");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subject_keyed_limit_isolates_callers_behind_one_address() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    let secret = b"a secret of at least thirty-two bytes, for HS256".to_vec();
    std::fs::write(&secret_file, &secret).unwrap();
    let toml = format!(
        "{}\n[filters.per_caller]\nkind = \"rate_limit\"\nrate_per_hour = 1\nburst = 2\nkey = \"subject\"\n\n[[routes]]\nname = \"limited\"\npath_prefix = \"/limited/\"\nupstream = \"echo\"\nfilters = [\"auth\", \"per_caller\"]\n",
        JWT.replace("{secret}", &secret_file.display().to_string())
    );
    let edge = Edge::start(&toml, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let call = |token: String| {
        c.get(format!("{}/limited/x", edge.http))
            .bearer_auth(token)
            .send()
    };
    // Both callers come from 127.0.0.1: the key is who they are, set by the jwt filter before.
    for _ in 0..2 {
        assert_eq!(
            call(hs256(&secret, "alice", "user"))
                .await
                .unwrap()
                .status(),
            200
        );
    }
    let r = call(hs256(&secret, "alice", "user")).await.unwrap();
    assert_eq!(r.status(), 429, "alice spent her burst");
    assert_eq!(r.headers()["ratelimit"], "\"per_caller\";r=0;t=7200");
    let r = call(hs256(&secret, "bob", "user")).await.unwrap();
    assert_eq!(r.status(), 200, "bob is not limited by alice");
    assert_eq!(r.headers()["ratelimit"], "\"per_caller\";r=1;t=3600");
}

/// A POST of `body` as `ctype`: the status and the JSON answer.
async fn post(
    c: &reqwest::Client,
    url: String,
    ctype: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let (status, _, body) = json(
        c.post(url)
            .header("content-type", ctype)
            .body(body)
            .send()
            .await
            .unwrap(),
    )
    .await;
    (status, body)
}

/// What the counting upstream has seen: connections, and body bytes over all requests.
#[derive(Default)]
struct Seen {
    connections: std::sync::atomic::AtomicUsize,
    body_bytes: std::sync::atomic::AtomicUsize,
}

/// An upstream that counts connections and body bytes, and answers each request with the
/// length of the body it received (`{"body_bytes": N}`).
async fn counting_upstream() -> (SocketAddr, Arc<Seen>) {
    use std::sync::atomic::Ordering::SeqCst;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            counts.connections.fetch_add(1, SeqCst);
            let counts = counts.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let chunked = head.contains("transfer-encoding: chunked");
                    let len: usize = head
                        .lines()
                        .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                        .unwrap_or(0);
                    let start = end + 4;
                    let body_len = loop {
                        let body = &buf[start..];
                        if chunked && body.ends_with(b"0\r\n\r\n") {
                            break decode_chunked(body).len();
                        }
                        if !chunked && body.len() >= len {
                            break len;
                        }
                        match s.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                    };
                    counts.body_bytes.fetch_add(body_len, SeqCst);
                    let consumed = if chunked { buf.len() } else { start + len };
                    buf.drain(..consumed);
                    let reply = format!("{{\"body_bytes\":{body_len}}}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

fn decode_chunked(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = body.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap_or("0").trim(), 16)
                .unwrap_or(0);
        if size == 0 {
            break;
        }
        out.extend_from_slice(&body[eol + 2..eol + 2 + size]);
        body = &body[eol + 4 + size..];
    }
    out
}

const WAF: &str = r#"
[upstreams.echo]
addrs = ["{upstream}"]
health_check = { kind = "tcp", interval_ms = 60000 }

[filters.waf]
kind = "waf"
body_limit = 1024

[filters.waf_prefix]
kind = "waf"
body_limit = 16
over_limit = "inspect_prefix"

[filters.waf_detect]
kind = "waf"
mode = "detect"

[[routes]]
name = "guarded"
path_prefix = "/"
upstream = "echo"
filters = ["waf"]

[[routes]]
name = "prefix"
path_prefix = "/prefix/"
upstream = "echo"
filters = ["waf_prefix"]

[[routes]]
name = "detect"
path_prefix = "/detect/"
upstream = "echo"
filters = ["waf_detect"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_waf_refuses_attacks_before_the_upstream_sees_a_byte() {
    use std::sync::atomic::Ordering::SeqCst;
    let dir = tempfile::tempdir().unwrap();
    let (up, seen) = counting_upstream().await;
    let edge = Edge::start(WAF, up, dir.path(), false).await;
    let c = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let url = |p: &str| format!("{}{p}", edge.http);
    let before = seen.connections.load(SeqCst);
    let attacks = [
        c.get(url("/search?q=1%27%20or%20%271%27%3D%271")),
        c.post(url("/items"))
            .header("content-type", "application/json")
            .body(r#"{"name":"x","bio":"<script>alert(document.cookie)</script>"}"#),
        c.post(url("/items"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body("id=1 union select password from users--"),
    ];
    for req in attacks {
        let (status, headers, body) = json(req.send().await.unwrap()).await;
        assert_eq!(status, 403, "{body}");
        assert_eq!(body["stage"], "waf");
        assert!(
            ["sqli", "xss", "anomaly_score"].contains(&body["error"].as_str().unwrap()),
            "{body}"
        );
        assert!(body["request_id"].is_string());
        assert_eq!(headers["content-type"], "application/json");
    }
    // Chunked: the edge reads the body whole before it decides.
    let addr = edge.http.trim_start_matches("http://");
    let chunked = b"POST /items HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nc\r\n{\"q\":\"1' or \r\n8\r\n'1'='1\"}\r\n0\r\n\r\n";
    let (status, body) = raw_request(addr, chunked).await;
    assert_eq!(
        (status, body["stage"].clone()),
        (403, Value::from("waf")),
        "{body}"
    );
    // A body over the route's limit is refused too, and never reaches the upstream.
    let (status, body) = post(
        &c,
        url("/items"),
        "application/json",
        format!(r#"{{"pad":"{}"}}"#, "a".repeat(2000)),
    )
    .await;
    assert_eq!((status, body["reason"].clone()), (413, Value::Null));
    assert_eq!(body["error"], "body_too_large");
    assert_eq!(
        seen.connections.load(SeqCst),
        before,
        "the upstream saw a connection"
    );
    assert_eq!(
        seen.body_bytes.load(SeqCst),
        0,
        "the upstream saw body bytes"
    );
    let line = edge
        .log_line(|l| l["status"] == 403 && l["path"] == "/items")
        .await;
    assert_eq!(line["stage"], "waf");
    assert!(line["waf_score"].as_u64().unwrap() >= 5, "{line}");
    assert!(
        !line["waf_rule_ids"].as_array().unwrap().is_empty(),
        "{line}"
    );

    // Ordinary API traffic passes, body and all.
    let prose = serde_json::json!({
        "title": "Release notes",
        "content": "Select the plan you want from the list, then update your profile. Mail a.b@example.com or see https://example.com/docs?page=2&lang=en.\n\n## Usage\n\n```\nls -la /tmp\n```\n",
        "tags": ["sql", "how-to"],
    })
    .to_string();
    let (status, body) = post(&c, url("/items"), "application/json", prose.clone()).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["body_bytes"], prose.len());
    // A type the WAF does not inspect streams through.
    let png = "<script>alert(1)</script>".repeat(100);
    let (status, body) = post(&c, url("/upload"), "image/png", png.clone()).await;
    assert_eq!(
        (status, body["body_bytes"].clone()),
        (200, Value::from(png.len()))
    );

    // inspect_prefix: the first 16 bytes are inspected, the whole body is forwarded.
    let long = format!("{{\"a\":\"{}\"}}", "b".repeat(3000));
    let (status, body) = post(&c, url("/prefix/x"), "application/json", long.clone()).await;
    assert_eq!(
        (status, body["body_bytes"].clone()),
        (200, Value::from(long.len()))
    );
    let form = format!("q=<script>alert(1)</script>&pad={}", "c".repeat(3000));
    let (status, _) = post(
        &c,
        url("/prefix/x"),
        "application/x-www-form-urlencoded",
        form,
    )
    .await;
    assert_eq!(status, 403);

    // detect: let through, logged as shadow with the rules, counted with mode="detect".
    let r = c
        .get(url("/detect/?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let line = edge.log_line(|l| l["route"] == "detect").await;
    assert_eq!(
        (line["decision"].clone(), line["stage"].clone()),
        ("shadow".into(), "waf".into())
    );
    // The rules that matched, in the log and in the counter with mode="detect".
    let first = line["waf_rule_ids"][0].as_u64().expect("a rule id");
    assert!(line["waf_score"].as_u64().unwrap() >= 5, "{line}");
    let text = reqwest::get(format!("{}/metrics", edge.admin))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let series = format!(
        "vigil_proxy_waf_rule_matches_total{{category=\"xss\",mode=\"detect\",rule_id=\"{first}\"}} 1"
    );
    assert!(text.contains(&series), "{series} not in {text}");
    assert!(text.contains("vigil_proxy_waf_inspection_duration_seconds_count"));
    assert!(
        edge.metric(r#"vigil_proxy_rejections_total{reason="sqli",route="guarded",stage="waf"}"#)
            >= 2.0,
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rule_files_reload_with_the_config_and_a_broken_rule_keeps_the_old_pack() {
    let dir = tempfile::tempdir().unwrap();
    let rules = dir.path().join("rules");
    std::fs::create_dir(&rules).unwrap();
    let rule = |id: u32, regex: &str| {
        format!(
            "[[rule]]\nid = {id}\nmessage = \"m\"\ncategory = \"generic\"\nparanoia = 1\nseverity = \"critical\"\ntargets = [\"args\"]\nregex = '{regex}'\ntests = {{ attack = [\"forbidden\"], benign = [\"fine\"] }}\n"
        )
    };
    std::fs::write(rules.join("local.toml"), rule(990001, "forbidden")).unwrap();
    let config = format!(
        "[upstreams.echo]\naddrs = [\"{{upstream}}\"]\n[filters.waf]\nkind = \"waf\"\nrules_dir = \"{}\"\n[[routes]]\nname = \"all\"\npath_prefix = \"/\"\nupstream = \"echo\"\nfilters = [\"waf\"]\n",
        rules.display()
    );
    let edge = Edge::start(&config, upstream().await, dir.path(), false).await;
    let c = reqwest::Client::new();
    let status = |q: &'static str| {
        let c = c.clone();
        let url = format!("{}/x?q={q}", edge.http);
        async move { c.get(url).send().await.unwrap().status().as_u16() }
    };
    assert_eq!(
        (status("forbidden").await, status("other").await),
        (403, 200)
    );

    // A rule that does not compile: the reload names the file and the rule, the old pack serves.
    std::fs::write(rules.join("local.toml"), rule(990001, "(unclosed")).unwrap();
    let err = edge.reloader.reload().unwrap_err().to_string();
    assert!(
        err.contains("local.toml, rule 990001: `regex` does not compile"),
        "{err}"
    );
    assert!(err.contains("filters.waf.rules_dir"), "{err}");
    assert_eq!(status("forbidden").await, 403, "the old pack serves");

    // A good file takes effect on the next reload.
    std::fs::write(rules.join("local.toml"), rule(990001, "other")).unwrap();
    edge.reloader.reload().unwrap();
    assert_eq!(
        (status("forbidden").await, status("other").await),
        (200, 403)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_trusted_callers_pick_the_trace_and_the_upstream_always_gets_one() {
    let toml = r#"
[upstreams.echo]
addrs = ["{upstream}"]
[[routes]]
name = "partner"
path_prefix = "/partner/"
upstream = "echo"
trust_traceparent = true
[[routes]]
name = "api"
path_prefix = "/api/"
upstream = "echo"
"#;
    const SENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let up = upstream().await;
    let c = reqwest::Client::new();
    // What the upstream got: (traceparent, tracestate), and the edge's access-log line.
    let seen = async |edge: &Edge, path: &str, traceparent: &str| {
        let r = c
            .get(format!("{}{path}", edge.http))
            .header("traceparent", traceparent)
            .header("tracestate", "partner=7")
            .send()
            .await
            .unwrap();
        let (status, headers, body) = json(r).await;
        assert_eq!(status, 200);
        let id = headers["x-request-id"].to_str().unwrap().to_owned();
        let sent = body["headers"]["traceparent"].as_str().unwrap().to_owned();
        let state = body["headers"]["tracestate"].as_str().map(str::to_owned);
        let line = edge.log_line(|l| l["request_id"] == id.as_str()).await;
        (sent, state, line)
    };
    let parts = |tp: &str| -> Vec<String> { tp.split('-').map(str::to_owned).collect() };

    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start(toml, up, dir.path(), false).await;
    // An untrusted client: a new trace, the client's header gone, a well-formed one sent.
    let (sent, state, line) = seen(&edge, "/api/x", SENT).await;
    let p = parts(&sent);
    assert_eq!(p.len(), 4, "{sent}");
    assert_eq!(p[0], "00");
    assert_ne!(p[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(p[1], line["trace_id"].as_str().unwrap());
    assert_eq!(p[3], "00", "tracing is off: new traces are not sampled");
    assert_eq!(state, None, "an untrusted tracestate is not passed on");
    // A route that trusts its callers' trace context continues it.
    let (sent, state, line) = seen(&edge, "/partner/x", SENT).await;
    let p = parts(&sent);
    assert_eq!(p[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(line["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        p[2], "00f067aa0ba902b7",
        "the upstream's parent is the edge's span"
    );
    assert_ne!(
        p[2],
        line["span_id"].as_str().unwrap(),
        "…its client span, under the server span"
    );
    assert_eq!(p[3], "01", "the caller's sampling decision is kept");
    assert_eq!(state.as_deref(), Some("partner=7"));
    // A malformed header is ignored there too.
    let (sent, _, _) = seen(
        &edge,
        "/partner/x",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-zz-01",
    )
    .await;
    assert_ne!(parts(&sent)[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    // Error bodies name the trace.
    let r = c
        .get(format!("{}/nowhere", edge.http))
        .send()
        .await
        .unwrap();
    let (status, _, body) = json(r).await;
    assert_eq!(status, 404);
    assert_eq!(body["trace_id"].as_str().unwrap().len(), 32);

    // Behind a trusted proxy, every route continues the trace.
    let dir = tempfile::tempdir().unwrap();
    let edge = Edge::start_trusting(toml, up, dir.path(), "127.0.0.0/8").await;
    let (sent, state, _) = seen(&edge, "/api/x", SENT).await;
    assert_eq!(parts(&sent)[1], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(state.as_deref(), Some("partner=7"));
}
