//! The probe collector: blackbox-style checks of URLs, as a client outside would see them.
//!
//! - `vigil_probe_success{target}`: 1 when the answer had the expected status (and the body
//!   the expected substring) within the target's timeout, else 0
//! - `vigil_probe_duration_seconds{target,phase}`: how long each phase took, for the phases
//!   that apply and were reached: `dns` (not for an IP literal or `connect_to`), `connect`,
//!   `tls` (https only), `first_byte` (request written to response head read)
//! - `vigil_probe_http_status{target}`: the answer's status, 0 when none came
//!
//! Each target is one `GET` over HTTP/1.1 on a fresh connection, all targets concurrently,
//! each within its own timeout. A failing target is data (`success 0`), not a failed
//! collection: the collection fails only when its own budget (the longest target timeout plus
//! a margin) runs out.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite};

use crate::config::{ProbeTarget, Probes};
use crate::{Collector, Sample};

/// How much of a body is read to look for `expect_body`.
const BODY_LIMIT: usize = 1024 * 1024;

/// The parts of a probe URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    /// `https` or not.
    pub tls: bool,
    /// The host as written (brackets removed from an IPv6 literal).
    pub host: String,
    /// The port, explicit or the scheme's.
    pub port: u16,
    /// Path and query (`/` when empty).
    pub path: String,
    authority: String,
}

impl Url {
    /// Parses an `http://` or `https://` URL without user info.
    pub fn parse(url: &str) -> Result<Self, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("not a URL: {e}"))?;
        let tls = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err("must start with http:// or https://".into()),
        };
        let authority = uri.authority().ok_or("must name a host")?;
        if authority.as_str().contains('@') {
            return Err("must not hold user info".into());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err("must name a host".into());
        }
        if tls && ServerName::try_from(host).is_err() {
            return Err("the host must be a DNS name or an IP address".into());
        }
        Ok(Self {
            tls,
            host: host.to_owned(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            path: uri
                .path_and_query()
                .map_or_else(|| "/".to_owned(), |p| p.as_str().to_owned()),
            authority: authority.as_str().to_owned(),
        })
    }
}

/// One configured target, ready to run.
struct Target {
    name: String,
    url: Url,
    expect_status: u16,
    expect_body: Option<String>,
    ca_file: Option<PathBuf>,
    connect_to: Option<SocketAddr>,
    timeout: Duration,
}

/// What one probe found; filled in as it goes, so a timeout keeps the phases it reached.
#[derive(Debug, Default, Clone)]
pub struct Report {
    /// `(phase, seconds)` in order.
    pub phases: Vec<(&'static str, f64)>,
    /// The answer's status, when one came.
    pub status: Option<u16>,
    /// Whether it met the expectations.
    pub success: bool,
    /// Why not.
    pub error: Option<String>,
}

/// See the module documentation.
pub struct ProbeCollector {
    targets: Vec<Arc<Target>>,
    timeout: Duration,
}

impl ProbeCollector {
    /// The collector of `[probes]`.
    pub fn new(config: &Probes) -> anyhow::Result<Self> {
        let targets = config
            .targets
            .iter()
            .map(|t: &ProbeTarget| {
                Ok(Arc::new(Target {
                    name: t.name.clone(),
                    url: Url::parse(&t.url)
                        .map_err(anyhow::Error::msg)
                        .context("probes")?,
                    expect_status: t.expect_status,
                    expect_body: t.expect_body.clone(),
                    ca_file: t.ca_file.clone(),
                    connect_to: t.connect_to,
                    timeout: Duration::from_millis(t.timeout_ms.unwrap_or(config.timeout_ms)),
                }))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let longest = targets.iter().map(|t| t.timeout).max().unwrap_or_default();
        Ok(Self {
            targets,
            timeout: longest + Duration::from_millis(500),
        })
    }
}

/// Runs `target` within its timeout.
async fn probe(target: &Target) -> Report {
    let report = Arc::new(Mutex::new(Report::default()));
    let outcome = tokio::time::timeout(target.timeout, run(target, &report)).await;
    let mut r = report.lock().map(|r| r.clone()).unwrap_or_default();
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => r.error = Some(format!("{e:#}")),
        Err(_) => r.error = Some(format!("timed out after {} ms", target.timeout.as_millis())),
    }
    r.success = r.error.is_none();
    r
}

fn record(report: &Mutex<Report>, f: impl FnOnce(&mut Report)) {
    if let Ok(mut r) = report.lock() {
        f(&mut r);
    }
}

async fn run(target: &Target, report: &Mutex<Report>) -> anyhow::Result<()> {
    let url = &target.url;
    let phase = |name: &'static str, since: Instant| {
        let s = since.elapsed().as_secs_f64();
        record(report, |r| r.phases.push((name, s)));
    };
    let addrs: Vec<SocketAddr> = if let Some(addr) = target.connect_to {
        vec![addr]
    } else if let Ok(ip) = url.host.parse::<IpAddr>() {
        vec![SocketAddr::new(ip, url.port)]
    } else {
        let t = Instant::now();
        let addrs: Vec<_> = tokio::net::lookup_host((url.host.as_str(), url.port))
            .await
            .with_context(|| format!("resolving {}", url.host))?
            .collect();
        phase("dns", t);
        addrs
    };
    let t = Instant::now();
    let mut last_error = None;
    let mut tcp = None;
    for addr in &addrs {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(s) => {
                tcp = Some(s);
                break;
            }
            Err(e) => last_error = Some(format!("connecting to {addr}: {e}")),
        }
    }
    let tcp = tcp.with_context(|| {
        last_error.unwrap_or_else(|| format!("{} resolves to no address", url.host))
    })?;
    phase("connect", t);
    if url.tls {
        let t = Instant::now();
        let ca = target.ca_file.clone();
        let config = tokio::task::spawn_blocking(move || {
            crate::tls::verifying(ca.as_deref(), &[b"http/1.1"])
        })
        .await??;
        let name = ServerName::try_from(url.host.clone())?;
        let stream = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .context("TLS handshake")?;
        phase("tls", t);
        exchange(target, stream, report).await
    } else {
        exchange(target, tcp, report).await
    }
}

async fn exchange<S>(target: &Target, stream: S, report: &Mutex<Report>) -> anyhow::Result<()>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("HTTP handshake")?;
    let conn = tokio::spawn(conn);
    let request = http::Request::get(target.url.path.as_str())
        .header(http::header::HOST, target.url.authority.as_str())
        .header(http::header::USER_AGENT, "vigil-exporter")
        .header(http::header::CONNECTION, "close")
        .body(Empty::<Bytes>::new())?;
    let t = Instant::now();
    let response = sender.send_request(request).await.context("HTTP request")?;
    let s = t.elapsed().as_secs_f64();
    let status = response.status().as_u16();
    record(report, |r| {
        r.phases.push(("first_byte", s));
        r.status = Some(status);
    });
    let checked: anyhow::Result<()> = async {
        anyhow::ensure!(
            status == target.expect_status,
            "status {status}, expected {}",
            target.expect_status
        );
        if let Some(want) = &target.expect_body {
            let body = Limited::new(response.into_body(), BODY_LIMIT)
                .collect()
                .await
                .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
                .to_bytes();
            anyhow::ensure!(
                memchr_find(&body, want.as_bytes()),
                "the body does not contain {want:?}"
            );
        }
        Ok(())
    }
    .await;
    conn.abort();
    checked
}

fn memchr_find(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

#[async_trait::async_trait]
impl Collector for ProbeCollector {
    fn name(&self) -> &'static str {
        "probes"
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn collect(&self, out: &mut Sample) -> anyhow::Result<()> {
        let success = out.gauge_vec(
            "vigil_probe_success",
            "Whether the target answered as expected within its timeout.",
            &["target"],
        );
        let duration = out.gauge_vec(
            "vigil_probe_duration_seconds",
            "How long each phase of the probe took (dns, connect, tls, first_byte).",
            &["target", "phase"],
        );
        let status = out.gauge_vec(
            "vigil_probe_http_status",
            "The status the target answered with (0: no answer).",
            &["target"],
        );
        let mut tasks = tokio::task::JoinSet::new();
        for t in &self.targets {
            let t = t.clone();
            tasks.spawn(async move {
                let report = probe(&t).await;
                (t, report)
            });
        }
        while let Some(done) = tasks.join_next().await {
            let (t, report) = done?;
            if let Some(e) = &report.error {
                tracing::debug!(target = %t.name, error = %e, "probe failed");
            }
            success
                .with_label_values(&[&t.name])
                .set(if report.success { 1.0 } else { 0.0 });
            status
                .with_label_values(&[&t.name])
                .set(f64::from(report.status.unwrap_or(0)));
            for (phase, s) in &report.phases {
                duration
                    .with_label_values(&[t.name.as_str(), phase])
                    .set(*s);
            }
        }
        Ok(())
    }
}

/// Probes one target described by `config` (its own timeout, `probes.timeout_ms` otherwise)
/// and says what it found; for tests and diagnostics.
pub async fn probe_once(config: &ProbeTarget, default_timeout_ms: u64) -> anyhow::Result<Report> {
    let c = ProbeCollector::new(&Probes {
        timeout_ms: default_timeout_ms,
        targets: vec![config.clone()],
    })?;
    let target = c.targets.first().context("one target")?;
    Ok(probe(target).await)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_taken_apart() {
        let u = Url::parse("https://localhost:8443/.well-known/jwks.json").unwrap();
        assert!(u.tls);
        assert_eq!((u.host.as_str(), u.port), ("localhost", 8443));
        assert_eq!(u.path, "/.well-known/jwks.json");
        let u = Url::parse("http://[::1]/health?x=1").unwrap();
        assert_eq!(
            (u.host.as_str(), u.port, u.path.as_str()),
            ("::1", 80, "/health?x=1")
        );
        assert_eq!(u.authority, "[::1]");
        assert_eq!(Url::parse("https://example.com").unwrap().path, "/");
        assert!(Url::parse("ftp://x/").is_err());
        assert!(Url::parse("https://u:p@x/").is_err());
        assert!(Url::parse("/relative").is_err());
    }

    async fn serve(status: u16, body: &'static str) -> SocketAddr {
        let app = axum::Router::new().route(
            "/",
            axum::routing::get(move || async move {
                (http::StatusCode::from_u16(status).unwrap(), body)
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        addr
    }

    #[tokio::test]
    async fn a_probe_checks_the_status_and_the_body() {
        let addr = serve(200, "all is well").await;
        let mut t = ProbeTarget::new("t", format!("http://{addr}/"));
        t.expect_body = Some("is well".into());
        let r = probe_once(&t, 2000).await.unwrap();
        assert!(r.success, "{r:?}");
        assert_eq!(r.status, Some(200));
        let phases: Vec<_> = r.phases.iter().map(|(p, _)| *p).collect();
        assert_eq!(
            phases,
            ["connect", "first_byte"],
            "no dns for an IP literal"
        );

        t.expect_body = Some("trouble".into());
        let r = probe_once(&t, 2000).await.unwrap();
        assert!(!r.success);
        assert!(r.error.unwrap().contains("does not contain"));

        t.expect_body = None;
        t.expect_status = 204;
        let r = probe_once(&t, 2000).await.unwrap();
        assert_eq!((r.success, r.status), (false, Some(200)));

        // A name is resolved (dns phase); connect_to skips the lookup.
        let mut t = ProbeTarget::new("t", format!("http://localhost:{}/", addr.port()));
        t.connect_to = Some(addr);
        let r = probe_once(&t, 2000).await.unwrap();
        assert!(r.success, "{r:?}");
        assert_eq!(r.phases[0].0, "connect");
    }

    #[tokio::test]
    async fn a_silent_server_times_out_with_the_phases_it_reached() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let mut kept = Vec::new();
            while let Ok((s, _)) = l.accept().await {
                kept.push(s);
            }
        });
        let mut t = ProbeTarget::new("t", format!("http://{addr}/"));
        t.timeout_ms = Some(200);
        let r = probe_once(&t, 5000).await.unwrap();
        assert!(!r.success);
        assert_eq!(r.status, None);
        assert!(r.error.unwrap().contains("timed out"));
        assert_eq!(
            r.phases.iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            ["connect"]
        );
    }
}
