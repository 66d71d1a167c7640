//! The certificate collector: when each configured certificate starts and stops being valid,
//! read from PEM files and from what TLS listeners actually serve.
//!
//! - `vigil_tls_certificate_expiry_timestamp_seconds{cert}`: the certificate's `notAfter`
//! - `vigil_tls_certificate_not_before_timestamp_seconds{cert}`: its `notBefore`
//!
//! `cert` is the name from the config. A file's first certificate is the one reported (the
//! leaf of a chain); an endpoint is asked with its configured SNI name, and the certificate it
//! answers with is reported whatever it is (expired, self-signed, for another name): the
//! handshake accepts any certificate, checking only that the server holds its key. Every
//! source is read concurrently; one that fails leaves its series out and fails the collection,
//! the others are reported.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use rustls::pki_types::ServerName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{CertEndpoint, CertFile, Certificates};
use crate::{Collector, Sample};

/// The validity window of one certificate, as Unix seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Validity {
    /// `notBefore`
    pub not_before: i64,
    /// `notAfter`
    pub not_after: i64,
}

/// The validity of a DER certificate.
pub fn validity(der: &[u8]) -> anyhow::Result<Validity> {
    let (_, cert) = X509Certificate::from_der(der).context("not an X.509 certificate")?;
    let v = cert.validity();
    Ok(Validity {
        not_before: v.not_before.timestamp(),
        not_after: v.not_after.timestamp(),
    })
}

/// See the module documentation.
pub struct CertificateCollector {
    files: Vec<CertFile>,
    endpoints: Vec<CertEndpoint>,
    timeout: Duration,
}

impl CertificateCollector {
    /// The collector of `[certificates]`.
    pub fn new(config: &Certificates) -> Self {
        Self {
            files: config.files.clone(),
            endpoints: config.endpoints.clone(),
            timeout: Duration::from_millis(config.timeout_ms),
        }
    }
}

async fn from_file(file: CertFile) -> anyhow::Result<Validity> {
    let path = file.path.clone();
    let certs = tokio::task::spawn_blocking(move || crate::tls::read_pem_certs(&path)).await??;
    let first = certs.first().context("no certificate")?;
    validity(first).with_context(|| file.path.display().to_string())
}

async fn from_endpoint(endpoint: CertEndpoint) -> anyhow::Result<Validity> {
    let config = Arc::new(crate::tls::inspecting()?);
    let name = ServerName::try_from(endpoint.server_name.clone())?;
    let tcp = tokio::net::TcpStream::connect(endpoint.addr.as_str())
        .await
        .with_context(|| format!("connecting to {}", endpoint.addr))?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .with_context(|| {
            format!(
                "TLS handshake with {} (SNI {})",
                endpoint.addr, endpoint.server_name
            )
        })?;
    let (_, conn) = tls.get_ref();
    let leaf = conn
        .peer_certificates()
        .and_then(|c| c.first())
        .context("the server sent no certificate")?;
    validity(leaf)
}

#[async_trait::async_trait]
impl Collector for CertificateCollector {
    fn name(&self) -> &'static str {
        "certificates"
    }

    fn timeout(&self) -> Duration {
        self.timeout
    }

    async fn collect(&self, out: &mut Sample) -> anyhow::Result<()> {
        let expiry = out.gauge_vec(
            "vigil_tls_certificate_expiry_timestamp_seconds",
            "When the certificate stops being valid (notAfter), as Unix seconds.",
            &["cert"],
        );
        let not_before = out.gauge_vec(
            "vigil_tls_certificate_not_before_timestamp_seconds",
            "When the certificate starts being valid (notBefore), as Unix seconds.",
            &["cert"],
        );
        let mut tasks = tokio::task::JoinSet::new();
        for f in &self.files {
            let (name, f) = (f.name.clone(), f.clone());
            tasks.spawn(async move { (name, from_file(f).await) });
        }
        for e in &self.endpoints {
            let (name, e) = (e.name.clone(), e.clone());
            tasks.spawn(async move { (name, from_endpoint(e).await) });
        }
        let mut failures = Vec::new();
        while let Some(done) = tasks.join_next().await {
            match done {
                Ok((name, Ok(v))) => {
                    expiry.with_label_values(&[&name]).set(v.not_after as f64);
                    not_before
                        .with_label_values(&[&name])
                        .set(v.not_before as f64);
                }
                Ok((name, Err(e))) => failures.push(format!("{name}: {e:#}")),
                Err(e) => failures.push(e.to_string()),
            }
        }
        failures.sort();
        anyhow::ensure!(failures.is_empty(), "{}", failures.join("; "));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_file_reports_its_first_certificate_and_a_missing_one_fails_alone() {
        let dir = tempfile::tempdir().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["a.example".into()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2025, 1, 2);
        params.not_after = rcgen::date_time_ymd(2031, 3, 4);
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let other = rcgen::generate_simple_self_signed(vec!["b.example".into()]).unwrap();
        // A chain: the leaf first.
        let path = dir.path().join("chain.pem");
        std::fs::write(&path, cert.pem() + &other.cert.pem()).unwrap();
        let c = CertificateCollector::new(&Certificates {
            timeout_ms: 1000,
            files: vec![
                CertFile {
                    name: "leaf".into(),
                    path,
                },
                CertFile {
                    name: "gone".into(),
                    path: dir.path().join("missing.pem"),
                },
            ],
            endpoints: Vec::new(),
        });
        let mut out = Sample::new();
        let err = c.collect(&mut out).await.unwrap_err();
        assert!(err.to_string().starts_with("gone: reading"), "{err}");
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &out.gather(), &mut buf)
            .unwrap();
        let text = String::from_utf8(buf).unwrap();
        // 2031-03-04T00:00:00Z and 2025-01-02T00:00:00Z
        assert!(
            text.contains(
                r#"vigil_tls_certificate_expiry_timestamp_seconds{cert="leaf"} 1930348800"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"vigil_tls_certificate_not_before_timestamp_seconds{cert="leaf"} 1735776000"#
            ),
            "{text}"
        );
        assert!(!text.contains("gone"), "{text}");
    }
}
