//! Certificates: loading them, choosing one by SNI, reloading them when their files change, and
//! generating a self-signed one when none is configured.
//!
//! The [`Resolver`] holds a [`CertStore`] behind an `ArcSwap`: a reload builds a whole new store
//! and swaps it in, and handshakes already under way keep the old one. Names come from each
//! certificate's SANs (exact names and `*.` wildcards); a ClientHello without SNI, or with a name
//! no certificate has, gets the first configured certificate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use pingora::tls::sign::CertifiedKey;
use pingora::tls::{ClientHello, CryptoProvider, ResolvesServerCert};

use crate::config::CertPair;
use crate::metrics::Metrics;

/// A certificate that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The files could not be read or parsed.
    #[error("{path}: {reason}")]
    Load {
        /// The certificate or key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Generating the self-signed certificate failed.
    #[error("generating a self-signed certificate in {dir}: {reason}")]
    Generate {
        /// The directory.
        dir: PathBuf,
        /// What failed.
        reason: String,
    },
}

/// The certificates in force, indexed by name.
pub struct CertStore {
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
    /// `(first SAN, not-after unix seconds)` of each certificate, for the exporter and logs.
    pub expiries: Vec<(String, i64)>,
    mtimes: Vec<Option<SystemTime>>,
}

impl CertStore {
    /// Loads every pair; the first is the default. Fails on the first unusable file.
    pub fn load(pairs: &[CertPair]) -> Result<Self, TlsError> {
        pingora::tls::install_default_crypto_provider();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        let mut expiries = Vec::new();
        for pair in pairs {
            let err = |path: &Path, reason: String| TlsError::Load {
                path: path.to_owned(),
                reason,
            };
            let (certs, key) = pingora::tls::load_certs_and_key_files(
                &path_str(&pair.cert_path),
                &path_str(&pair.key_path),
            )
            .map_err(|e| err(&pair.cert_path, e.to_string()))?
            .ok_or_else(|| {
                err(
                    &pair.cert_path,
                    "no certificate or no private key in the files".into(),
                )
            })?;
            let leaf = certs
                .first()
                .ok_or_else(|| err(&pair.cert_path, "no certificate in the file".into()))?
                .clone();
            let (names, not_after) =
                names_and_expiry(&leaf).map_err(|e| err(&pair.cert_path, e))?;
            let provider = CryptoProvider::get_default()
                .ok_or_else(|| err(&pair.key_path, "no crypto provider".into()))?;
            let ck = Arc::new(
                CertifiedKey::from_der(certs, key, provider)
                    .map_err(|e| err(&pair.key_path, e.to_string()))?,
            );
            for name in &names {
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard
                        .entry(suffix.to_owned())
                        .or_insert_with(|| ck.clone()),
                    None => exact.entry(name.clone()).or_insert_with(|| ck.clone()),
                };
            }
            expiries.push((names.first().cloned().unwrap_or_default(), not_after));
            default.get_or_insert(ck);
        }
        let default = default.ok_or_else(|| TlsError::Load {
            path: PathBuf::from("tls.certs"),
            reason: "no certificates".into(),
        })?;
        let mtimes = pairs
            .iter()
            .flat_map(|p| [mtime(&p.cert_path), mtime(&p.key_path)])
            .collect();
        Ok(Self {
            exact,
            wildcard,
            default,
            expiries,
            mtimes,
        })
    }

    /// The certificate for `server_name` (SNI), or the default.
    pub fn pick(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name.map(|n| n.trim_end_matches('.').to_ascii_lowercase()) else {
            return self.default.clone();
        };
        if let Some(ck) = self.exact.get(&name) {
            return ck.clone();
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .cloned()
            .unwrap_or_else(|| self.default.clone())
    }
}

/// Chooses certificates by SNI for the rustls listener; reloadable.
pub struct Resolver {
    store: ArcSwap<CertStore>,
    pairs: Vec<CertPair>,
    metrics: Metrics,
}

impl std::fmt::Debug for Resolver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Resolver")
            .field("pairs", &self.pairs)
            .finish()
    }
}

impl Resolver {
    /// Loads `pairs` into a resolver.
    pub fn new(pairs: Vec<CertPair>, metrics: Metrics) -> Result<Self, TlsError> {
        Ok(Self {
            store: ArcSwap::from_pointee(CertStore::load(&pairs)?),
            pairs,
            metrics,
        })
    }

    /// Reloads the certificates if any of their files changed since the last load. `Ok(true)`
    /// when a new store was swapped in; on an error the certificates in use stay.
    pub fn reload_if_changed(&self) -> Result<bool, TlsError> {
        let now: Vec<_> = self
            .pairs
            .iter()
            .flat_map(|p| [mtime(&p.cert_path), mtime(&p.key_path)])
            .collect();
        if now == self.store.load().mtimes {
            return Ok(false);
        }
        self.store.store(Arc::new(CertStore::load(&self.pairs)?));
        Ok(true)
    }

    /// The certificates in force.
    pub fn store(&self) -> Arc<CertStore> {
        self.store.load_full()
    }
}

impl ResolvesServerCert for Resolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.metrics
            .tls_handshakes
            .with_label_values(&["", "client_hello"])
            .inc();
        Some(self.store.load().pick(hello.server_name()))
    }
}

/// Handshake hooks: counts completed handshakes by protocol version.
pub struct HandshakeMetrics(pub Metrics);

#[async_trait::async_trait]
impl pingora::listeners::TlsAccept for HandshakeMetrics {
    async fn handshake_complete_callback(
        &self,
        tls: &pingora::protocols::tls::TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let version = normalize_version(tls.version());
        self.0
            .tls_handshakes
            .with_label_values(&[version, "success"])
            .inc();
        None
    }
}

/// `TLSv1_3` (rustls) or `TLSv1.3` (openssl) → `1.3`: one spelling for labels and logs.
pub fn normalize_version(v: Option<&str>) -> &'static str {
    match v.map(|v| v.replace('_', ".")) {
        Some(v) if v.ends_with("1.3") => "1.3",
        Some(v) if v.ends_with("1.2") => "1.2",
        Some(_) => "other",
        None => "",
    }
}

/// How long a generated certificate is valid, and how close to its end a start makes a new
/// one: like an ACME certificate, so the expiry metric and alert mean something here too.
const GENERATED_VALID_DAYS: i64 = 90;
const GENERATED_RENEW_DAYS: i64 = 30;

/// The certificate and key under `dir`, generated (self-signed, for `localhost`, `127.0.0.1`
/// and `::1`, valid 90 days) on first use and kept for later starts until 30 days before it
/// expires; then a start makes a new one.
pub fn self_signed(dir: &Path) -> Result<CertPair, TlsError> {
    let pair = CertPair {
        cert_path: dir.join("self-signed.crt"),
        key_path: dir.join("self-signed.key"),
    };
    let now = time::OffsetDateTime::now_utc();
    let renew_at = (now + time::Duration::days(GENERATED_RENEW_DAYS)).unix_timestamp();
    let expiry = std::fs::read(&pair.cert_path)
        .ok()
        .and_then(|pem| pem_expiry(&pem));
    if pair.key_path.is_file() && expiry.is_some_and(|at| at > renew_at) {
        return Ok(pair);
    }
    let fail = |reason: String| TlsError::Generate {
        dir: dir.to_owned(),
        reason,
    };
    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let key = rcgen::KeyPair::generate().map_err(|e| fail(e.to_string()))?;
    let mut params = rcgen::CertificateParams::new(names).map_err(|e| fail(e.to_string()))?;
    params.not_before = now - time::Duration::hours(1);
    params.not_after = now + time::Duration::days(GENERATED_VALID_DAYS);
    let cert = params.self_signed(&key).map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    write_private(&pair.key_path, key.serialize_pem().as_bytes())
        .map_err(|e| fail(e.to_string()))?;
    std::fs::write(&pair.cert_path, cert.pem()).map_err(|e| fail(e.to_string()))?;
    tracing::info!(cert = %pair.cert_path.display(), "generated a self-signed certificate for localhost");
    Ok(pair)
}

/// The not-after time of the first certificate in `pem`.
fn pem_expiry(pem: &[u8]) -> Option<i64> {
    let (_, block) = x509_parser::pem::parse_x509_pem(pem).ok()?;
    Some(names_and_expiry(&block.contents).ok()?.1)
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
}

/// The DNS and IP SANs of a certificate (lower-cased; the subject CN when there are none) and
/// its not-after time.
fn names_and_expiry(der: &[u8]) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};
    let (_, cert) =
        X509Certificate::from_der(der).map_err(|e| format!("not an X.509 certificate: {e}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::DNSName(d) => names.push(d.to_ascii_lowercase()),
                GeneralName::IPAddress(b) => match b.len() {
                    4 => names.push(
                        std::net::Ipv4Addr::from(<[u8; 4]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    16 => names.push(
                        std::net::Ipv6Addr::from(<[u8; 16]>::try_from(*b).unwrap_or_default())
                            .to_string(),
                    ),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    if names.is_empty() {
        names.extend(
            cert.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    Ok((names, cert.validity().not_after.timestamp()))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A self-signed certificate for `names`, written under `dir` as `stem.crt`/`stem.key`.
    pub(crate) fn cert_for(dir: &Path, stem: &str, names: &[&str]) -> CertPair {
        let g = rcgen::generate_simple_self_signed(
            names.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let pair = CertPair {
            cert_path: dir.join(format!("{stem}.crt")),
            key_path: dir.join(format!("{stem}.key")),
        };
        std::fs::write(&pair.cert_path, g.cert.pem()).unwrap();
        std::fs::write(&pair.key_path, g.signing_key.serialize_pem()).unwrap();
        pair
    }

    fn leaf_names(ck: &CertifiedKey) -> Vec<String> {
        names_and_expiry(ck.cert[0].as_ref()).unwrap().0
    }

    #[test]
    fn sni_picks_by_san_with_wildcards_and_a_default() {
        let dir = tempfile::tempdir().unwrap();
        let a = cert_for(dir.path(), "a", &["a.test"]);
        let b = cert_for(dir.path(), "b", &["b.test", "*.b.test"]);
        let store = CertStore::load(&[a, b]).unwrap();
        assert_eq!(leaf_names(&store.pick(Some("a.test"))), ["a.test"]);
        assert_eq!(
            leaf_names(&store.pick(Some("B.TEST."))),
            ["b.test", "*.b.test"]
        );
        assert_eq!(
            leaf_names(&store.pick(Some("x.b.test"))),
            ["b.test", "*.b.test"]
        );
        assert_eq!(
            leaf_names(&store.pick(Some("y.x.b.test"))),
            ["a.test"],
            "a wildcard covers one label"
        );
        assert_eq!(
            leaf_names(&store.pick(Some("unknown.test"))),
            ["a.test"],
            "the first is the default"
        );
        assert_eq!(leaf_names(&store.pick(None)), ["a.test"]);
        assert!(store.expiries[0].1 > chrono_now());
    }

    #[test]
    fn changed_files_are_reloaded_and_broken_ones_keep_the_old_store() {
        let dir = tempfile::tempdir().unwrap();
        let pair = cert_for(dir.path(), "edge", &["one.test"]);
        let r = Resolver::new(vec![pair.clone()], Metrics::new()).unwrap();
        assert!(!r.reload_if_changed().unwrap(), "nothing changed yet");
        cert_for(dir.path(), "edge", &["two.test"]);
        bump(&pair.cert_path, 2);
        assert!(r.reload_if_changed().unwrap());
        assert_eq!(leaf_names(&r.store().pick(None)), ["two.test"]);
        std::fs::write(&pair.cert_path, "garbage").unwrap();
        bump(&pair.cert_path, 4);
        assert!(r.reload_if_changed().is_err());
        assert_eq!(
            leaf_names(&r.store().pick(None)),
            ["two.test"],
            "the old certificate keeps serving"
        );
    }

    #[test]
    fn a_self_signed_certificate_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let pair = self_signed(&dir.path().join("certs")).unwrap();
        let first = std::fs::read(&pair.cert_path).unwrap();
        let store = CertStore::load(std::slice::from_ref(&pair)).unwrap();
        assert_eq!(
            leaf_names(&store.pick(Some("localhost"))),
            ["localhost", "127.0.0.1", "::1"]
        );
        self_signed(&dir.path().join("certs")).unwrap();
        assert_eq!(
            std::fs::read(&pair.cert_path).unwrap(),
            first,
            "kept, not regenerated"
        );
        let days = (pem_expiry(&first).unwrap() - chrono::Utc::now().timestamp()) / 86_400;
        assert!((89..=90).contains(&days), "valid for 90 days: {days}");
        // One that ends within 30 days is replaced at the next start.
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).unwrap();
        params.not_after = time::OffsetDateTime::now_utc() + time::Duration::days(10);
        std::fs::write(&pair.cert_path, params.self_signed(&key).unwrap().pem()).unwrap();
        self_signed(&dir.path().join("certs")).unwrap();
        let renewed = std::fs::read(&pair.cert_path).unwrap();
        assert!(pem_expiry(&renewed).unwrap() > chrono::Utc::now().timestamp() + 80 * 86_400);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&pair.key_path)
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
    }

    #[test]
    fn unusable_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = CertPair {
            cert_path: dir.path().join("none.crt"),
            key_path: dir.path().join("none.key"),
        };
        let err = CertStore::load(&[missing]).err().unwrap().to_string();
        assert!(err.contains("none.crt"), "{err}");
    }

    fn bump(path: &Path, secs: u64) {
        let f = std::fs::File::options().append(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(secs))
            .unwrap();
    }

    fn chrono_now() -> i64 {
        i64::try_from(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap()
                .as_secs(),
        )
        .unwrap()
    }
}
