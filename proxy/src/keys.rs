//! The keys the `jwt` filter verifies tokens with: static keys read at load (PEM or JWK files,
//! HMAC secrets from files or environment variables) and remote key sets (JWKS) fetched in the
//! background.
//!
//! A [`VerifyKey`] carries the algorithms it may verify, taken from the key itself (its type and
//! curve, narrowed by its JWK `alg`): a token's `alg` header only picks among those, so an HMAC
//! token can never be checked against a public key. Keys marked for another use (`use` other
//! than `sig`, `key_ops` without `verify`) are never loaded.
//!
//! A [`RemoteKeys`] is one JWKS URL. [`JwksRefresh`], one background service, fetches every
//! source of the config in force when it is due: on its schedule, sooner after a failure
//! (backoff) and at once when a token names an unknown `kid` (at most once per
//! `jwks_min_refresh_secs`). A failed fetch keeps the keys already loaded. Sources live in
//! [`crate::Built`] and an unchanged source keeps its keys across reloads.

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, DecodingKeyKind};
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;

use crate::Built;
use crate::metrics::Metrics;

/// A key a token may be verified with.
pub struct VerifyKey {
    /// The key id tokens name it by (`kid`), if it has one.
    pub kid: Option<String>,
    /// The algorithms this key verifies: from the key's type, narrowed by its `alg`.
    pub algorithms: Vec<Algorithm>,
    /// The key, ready for each of its algorithms: parsed once here, not on every token.
    verifiers: Vec<(Algorithm, Verifier)>,
}

/// One algorithm's verifier of a key, from aws-lc-rs (the crypto jsonwebtoken's `aws_lc_rs`
/// backend uses, without its per-call key parsing).
enum Verifier {
    Hmac(Box<aws_lc_rs::hmac::Key>),
    Public(aws_lc_rs::signature::ParsedPublicKey),
}

impl VerifyKey {
    /// A key for `algorithms` (each must fit the key's family). Fails when the key material
    /// does not parse for one of them.
    pub fn new(
        kid: Option<String>,
        algorithms: Vec<Algorithm>,
        key: &DecodingKey,
    ) -> Result<Self, String> {
        use aws_lc_rs::{hmac, signature as sig};
        let material = match key.kind() {
            DecodingKeyKind::SecretOrDer(bytes) => bytes.clone(),
            DecodingKeyKind::RsaModulusExponent { n, e } => rsa_public_key_der(n, e),
        };
        let mut verifiers = Vec::with_capacity(algorithms.len());
        for &alg in &algorithms {
            let public: &'static dyn sig::VerificationAlgorithm = match alg {
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                    let h = match alg {
                        Algorithm::HS256 => hmac::HMAC_SHA256,
                        Algorithm::HS384 => hmac::HMAC_SHA384,
                        _ => hmac::HMAC_SHA512,
                    };
                    verifiers.push((alg, Verifier::Hmac(Box::new(hmac::Key::new(h, &material)))));
                    continue;
                }
                Algorithm::ES256 => &sig::ECDSA_P256_SHA256_FIXED,
                Algorithm::ES384 => &sig::ECDSA_P384_SHA384_FIXED,
                Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
                Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
                Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
                Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
                Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
                Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
                Algorithm::EdDSA => &sig::ED25519,
                _ => return Err(format!("{alg:?} is not supported")),
            };
            let parsed = sig::ParsedPublicKey::new(public, &material)
                .map_err(|e| format!("not a usable {alg:?} key: {e}"))?;
            verifiers.push((alg, Verifier::Public(parsed)));
        }
        Ok(Self {
            kid,
            algorithms,
            verifiers,
        })
    }

    /// Whether `signature` (raw bytes) is this key's signature of `message` under `alg`.
    /// Constant-time for HMAC.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> bool {
        self.verifiers
            .iter()
            .find(|(a, _)| *a == alg)
            .is_some_and(|(_, v)| match v {
                Verifier::Hmac(key) => aws_lc_rs::hmac::verify(key, message, signature).is_ok(),
                Verifier::Public(key) => key.verify_sig(message, signature).is_ok(),
            })
    }
}

/// An RSA public key's DER (RFC 8017 `RSAPublicKey`) from its big-endian modulus and exponent.
fn rsa_public_key_der(n: &[u8], e: &[u8]) -> Vec<u8> {
    fn push_len(out: &mut Vec<u8>, len: usize) {
        if len < 0x80 {
            out.push(u8::try_from(len).unwrap_or(0));
        } else {
            let bytes = len.to_be_bytes();
            let skip = bytes.iter().take_while(|b| **b == 0).count();
            out.push(0x80 | u8::try_from(bytes.len() - skip).unwrap_or(0));
            out.extend_from_slice(&bytes[skip..]);
        }
    }
    fn integer(out: &mut Vec<u8>, v: &[u8]) {
        let v = &v[v
            .iter()
            .take_while(|b| **b == 0)
            .count()
            .min(v.len().saturating_sub(1))..];
        let pad = v.first().is_some_and(|b| b & 0x80 != 0);
        out.push(0x02);
        push_len(out, v.len() + usize::from(pad));
        if pad {
            out.push(0);
        }
        out.extend_from_slice(v);
    }
    let mut body = Vec::with_capacity(n.len() + e.len() + 16);
    integer(&mut body, n);
    integer(&mut body, e);
    let mut out = Vec::with_capacity(body.len() + 4);
    out.push(0x30);
    push_len(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

impl std::fmt::Debug for VerifyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material: an HMAC secret must not reach a log line.
        f.debug_struct("VerifyKey")
            .field("kid", &self.kid)
            .field("algorithms", &self.algorithms)
            .finish()
    }
}

/// Why a token's key could not be chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LookupError {
    /// No key has that `kid` (or, without a `kid`, no single key fits).
    UnknownKid,
    /// The key named cannot verify the token's algorithm.
    AlgNotAllowed,
}

/// A set of verification keys.
#[derive(Debug, Default)]
pub struct KeySet {
    keys: Vec<Arc<VerifyKey>>,
}

impl KeySet {
    /// A set of `keys`.
    pub fn new(keys: Vec<VerifyKey>) -> Self {
        Self {
            keys: keys.into_iter().map(Arc::new).collect(),
        }
    }

    /// Number of keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether the set has no key.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The key for a token with `kid` and `alg`. With a `kid`, the key of that id, which must
    /// verify `alg`. Without one, the only key without an id that verifies `alg`.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Result<&VerifyKey, LookupError> {
        match kid {
            Some(kid) => {
                let key = self
                    .keys
                    .iter()
                    .find(|k| k.kid.as_deref() == Some(kid))
                    .ok_or(LookupError::UnknownKid)?;
                if key.algorithms.contains(&alg) {
                    Ok(key)
                } else {
                    Err(LookupError::AlgNotAllowed)
                }
            }
            None => {
                let mut fits = self
                    .keys
                    .iter()
                    .filter(|k| k.kid.is_none() && k.algorithms.contains(&alg));
                match (fits.next(), fits.next()) {
                    (Some(key), None) => Ok(key),
                    _ => Err(LookupError::UnknownKid),
                }
            }
        }
    }
}

/// The algorithms a key of `family` can verify (for EC and OKP keys, `curve` decides).
fn key_algorithms(family: AlgorithmFamily, curve: Option<&EllipticCurve>) -> Vec<Algorithm> {
    match (family, curve) {
        (AlgorithmFamily::Ec, Some(EllipticCurve::P256)) => vec![Algorithm::ES256],
        (AlgorithmFamily::Ec, Some(EllipticCurve::P384)) => vec![Algorithm::ES384],
        (AlgorithmFamily::Ec, _) => Vec::new(),
        (AlgorithmFamily::Ed, Some(EllipticCurve::Ed25519) | None) => vec![Algorithm::EdDSA],
        (AlgorithmFamily::Ed, _) => Vec::new(),
        (family, _) => family.algorithms().to_vec(),
    }
}

/// HMAC algorithms a secret of `len` bytes is long enough for (RFC 7518 §3.2: at least the
/// hash's size).
fn hmac_algorithms(len: usize) -> Vec<Algorithm> {
    [
        (Algorithm::HS256, 32),
        (Algorithm::HS384, 48),
        (Algorithm::HS512, 64),
    ]
    .into_iter()
    .filter(|&(_, min)| len >= min)
    .map(|(alg, _)| alg)
    .collect()
}

/// A key from one JWK (RFC 7517), or why it cannot verify signatures.
pub fn from_jwk(value: &serde_json::Value) -> Result<VerifyKey, String> {
    let jwk: Jwk = serde_json::from_value(value.clone()).map_err(|e| format!("not a JWK: {e}"))?;
    let kid = jwk.common.key_id.clone();
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(_) => return Err("its \"use\" is not \"sig\"".into()),
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("its \"key_ops\" do not include \"verify\"".into());
    }
    let key = DecodingKey::from_jwk(&jwk).map_err(|e| format!("unusable key: {e}"))?;
    let mut algorithms = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => {
            key_algorithms(AlgorithmFamily::Ec, Some(&p.curve))
        }
        AlgorithmParameters::OctetKeyPair(p) => key_algorithms(AlgorithmFamily::Ed, Some(&p.curve)),
        AlgorithmParameters::OctetKey(_) => {
            hmac_algorithms(key.try_get_as_bytes().map_or(0, <[u8]>::len))
        }
        AlgorithmParameters::RSA(_) => key_algorithms(AlgorithmFamily::Rsa, None),
        _ => Vec::new(),
    };
    if let Some(alg) = jwk.common.key_algorithm {
        let alg = Algorithm::try_from(alg)
            .map_err(|_| format!("its \"alg\" {alg} is not a signature algorithm"))?;
        algorithms.retain(|a| *a == alg);
    }
    if algorithms.is_empty() {
        return Err("it fits no supported signature algorithm".into());
    }
    VerifyKey::new(kid, algorithms, &key)
}

/// The usable keys of a JWK Set document.
pub struct Jwks {
    /// The keys that can verify signatures.
    pub keys: Vec<VerifyKey>,
    /// Why each other key was left out (`keys[2] (kid x): …`).
    pub skipped: Vec<String>,
    /// A digest of the usable keys' JWKs: equal digests, the same key set.
    pub fingerprint: [u8; 32],
}

/// The keys of a JWK Set document. Keys that cannot verify signatures are skipped, each with
/// its reason, and so are symmetric (`oct`) keys unless `symmetric`: a secret published at a
/// URL is no secret. The document itself must be a JSON object with a `keys` array.
pub fn from_jwks(body: &[u8], symmetric: bool) -> Result<Jwks, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document = serde_json::from_slice(body).map_err(|e| format!("not a JWK Set: {e}"))?;
    let mut keys = Vec::new();
    let mut skipped = Vec::new();
    let mut digest = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for (i, value) in doc.keys.iter().enumerate() {
        let key = if !symmetric && value.get("kty").and_then(|k| k.as_str()) == Some("oct") {
            Err("a symmetric key is never taken from a JWK Set URL".to_owned())
        } else {
            from_jwk(value)
        };
        match key {
            Ok(k) => {
                // serde_json's maps are sorted: the text of a JWK is canonical.
                digest.update(value.to_string().as_bytes());
                digest.update(b"\n");
                keys.push(k);
            }
            Err(why) => {
                let kid = value.get("kid").and_then(|k| k.as_str()).unwrap_or("-");
                skipped.push(format!("keys[{i}] (kid {kid}): {why}"));
            }
        }
    }
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(digest.finish().as_ref());
    Ok(Jwks {
        keys,
        skipped,
        fingerprint,
    })
}

/// The keys of one key file: a PEM public key (RSA, EC P-256/P-384 or Ed25519), a JWK, or a
/// JWK Set. `kid` names a PEM key (JWKs carry their own).
pub fn from_file(path: &Path, kid: Option<&str>) -> Result<Vec<VerifyKey>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let text = String::from_utf8_lossy(&bytes);
    if text.trim_start().starts_with('{') {
        let value: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| format!("{}: not JSON: {e}", path.display()))?;
        return if value.get("keys").is_some() {
            let set = from_jwks(&bytes, true).map_err(|e| format!("{}: {e}", path.display()))?;
            match set.skipped.first() {
                Some(why) => Err(format!("{}: {why}", path.display())),
                None => Ok(set.keys),
            }
        } else {
            from_jwk(&value)
                .map(|k| vec![k])
                .map_err(|e| format!("{}: {e}", path.display()))
        };
    }
    let key = DecodingKey::from_rsa_pem(&bytes)
        .map(|k| (k, key_algorithms(AlgorithmFamily::Rsa, None)))
        .or_else(|_| {
            DecodingKey::from_ec_pem(&bytes).map(|k| {
                let curve = match k.try_get_as_bytes().map_or(0, <[u8]>::len) {
                    65 => Some(EllipticCurve::P256),
                    97 => Some(EllipticCurve::P384),
                    _ => None,
                };
                let algs = key_algorithms(AlgorithmFamily::Ec, curve.as_ref());
                (k, algs)
            })
        })
        .or_else(|_| {
            DecodingKey::from_ed_pem(&bytes).map(|k| (k, key_algorithms(AlgorithmFamily::Ed, None)))
        })
        .map_err(|_| {
            format!(
                "{}: not a PEM public key (RSA, EC P-256/P-384 or Ed25519), JWK or JWK Set",
                path.display()
            )
        })?;
    let (key, algorithms) = key;
    if algorithms.is_empty() {
        return Err(format!(
            "{}: the key's curve is not supported",
            path.display()
        ));
    }
    VerifyKey::new(kid.map(str::to_owned), algorithms, &key)
        .map(|k| vec![k])
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// An HMAC key from a secret (raw bytes, as read from a file or an environment variable).
pub fn from_secret(secret: &[u8], kid: Option<&str>) -> Result<VerifyKey, String> {
    let algorithms = hmac_algorithms(secret.len());
    if algorithms.is_empty() {
        return Err(format!(
            "the secret is {} bytes; HMAC needs at least 32 (HS256), 48 (HS384) or 64 (HS512)",
            secret.len()
        ));
    }
    VerifyKey::new(
        kid.map(str::to_owned),
        algorithms,
        &DecodingKey::from_secret(secret),
    )
}

/// Decodes base64url without padding, strictly (no padding, no stray bits).
pub fn b64url(s: &[u8]) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// What makes two remote key sources the same: a reload that keeps these keeps the keys.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct JwksSettings {
    /// The issuer whose keys these are (a metric label).
    pub issuer: String,
    /// The JWK Set URL.
    pub url: String,
    /// Scheduled refresh interval.
    pub refresh: Duration,
    /// Shortest time between two fetches asked for by unknown `kid`s.
    pub min_refresh: Duration,
    /// Timeout of one fetch.
    pub timeout: Duration,
    /// How long keys fetched once stay usable while every later fetch fails.
    pub max_stale: Duration,
}

/// The largest JWK Set document accepted.
const MAX_JWKS_BYTES: usize = 512 * 1024;
/// First retry after a failed fetch; doubled per failure up to the refresh interval (30 s at
/// most while no key has ever loaded).
const FIRST_RETRY: Duration = Duration::from_millis(500);

/// One JWKS URL and the keys last fetched from it.
pub struct RemoteKeys {
    /// Where and how often.
    pub settings: JwksSettings,
    keys: ArcSwapOption<KeySet>,
    /// The fingerprint of `keys` (see [`Jwks::fingerprint`]).
    fingerprint: Mutex<[u8; 32]>,
    generation: AtomicU64,
    /// Unix seconds of the last successful fetch.
    confirmed_at: AtomicU64,
    wanted: AtomicBool,
    state: Mutex<FetchState>,
}

#[derive(Debug)]
struct FetchState {
    next_due: Instant,
    last_attempt: Option<Instant>,
    loaded_at: Option<Instant>,
    failures: u32,
}

impl std::fmt::Debug for RemoteKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeys")
            .field("settings", &self.settings)
            .finish()
    }
}

impl RemoteKeys {
    /// A source with no keys yet, due at once.
    pub fn new(settings: JwksSettings) -> Self {
        Self {
            settings,
            keys: ArcSwapOption::empty(),
            fingerprint: Mutex::new([0; 32]),
            generation: AtomicU64::new(0),
            confirmed_at: AtomicU64::new(0),
            wanted: AtomicBool::new(false),
            state: Mutex::new(FetchState {
                next_due: Instant::now(),
                last_attempt: None,
                loaded_at: None,
                failures: 0,
            }),
        }
    }

    /// A source for `settings` that starts with what `previous` (the same URL under other
    /// timings, before a reload) has: its keys stay in use, and it is due at once.
    pub fn succeeding(settings: JwksSettings, previous: &RemoteKeys) -> Self {
        let next = Self::new(settings);
        next.keys.store(previous.keys.load_full());
        *next.fingerprint.lock().unwrap_or_else(|p| p.into_inner()) = *previous
            .fingerprint
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        next.generation
            .store(previous.generation(), Ordering::Release);
        next.confirmed_at.store(
            previous.confirmed_at.load(Ordering::Acquire),
            Ordering::Release,
        );
        let loaded_at = previous
            .state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .loaded_at;
        next.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .loaded_at = loaded_at;
        next
    }

    /// The keys last fetched; `None` until a fetch has succeeded.
    pub fn keys(&self) -> Option<Arc<KeySet>> {
        self.keys.load_full()
    }

    /// The keys usable at `now` (unix seconds): `None` until a fetch has succeeded, and again
    /// once no fetch has succeeded for `max_stale`.
    pub fn keys_at(&self, now: u64) -> Option<Arc<KeySet>> {
        let confirmed = self.confirmed_at.load(Ordering::Acquire);
        (now.saturating_sub(confirmed) <= self.settings.max_stale.as_secs())
            .then(|| self.keys())
            .flatten()
    }

    /// Whether keys fetched once are still usable at `now`: [`Self::keys_at`] without the
    /// keys (what a cached verification must also obey).
    pub fn usable_at(&self, now: u64) -> bool {
        let confirmed = self.confirmed_at.load(Ordering::Acquire);
        now.saturating_sub(confirmed) <= self.settings.max_stale.as_secs()
            && self.keys.load().is_some()
    }

    /// Counts the key sets swapped in: a cached verification made with an older one is stale.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Asks for a fetch soon (a token named a `kid` the set lacks). Never blocks.
    pub fn request_refresh(&self) {
        self.wanted.store(true, Ordering::Relaxed);
    }

    /// Takes a fetched key set: swapped in when it differs from the one in use (which makes
    /// cached verifications stale), and in any case confirmed as current. Returns whether it
    /// changed.
    pub fn install(&self, jwks: Jwks) -> bool {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let mut fingerprint = self.fingerprint.lock().unwrap_or_else(|p| p.into_inner());
        let changed = self.keys.load().is_none() || *fingerprint != jwks.fingerprint;
        if changed {
            *fingerprint = jwks.fingerprint;
            self.keys.store(Some(Arc::new(KeySet::new(jwks.keys))));
            self.generation.fetch_add(1, Ordering::AcqRel);
        }
        self.confirmed_at.store(now, Ordering::Release);
        changed
    }

    /// Whether a fetch is due at `now`.
    fn due(&self, now: Instant) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.next_due <= now {
            return true;
        }
        self.wanted.load(Ordering::Relaxed)
            && state
                .last_attempt
                .is_none_or(|t| now.duration_since(t) >= self.settings.min_refresh)
    }

    /// Fetches the set now and swaps it in; a failure keeps the keys in use.
    async fn refresh(&self, client: &reqwest::Client, metrics: &Metrics) {
        let started = Instant::now();
        self.wanted.store(false, Ordering::Relaxed);
        let result = self.fetch(client).await;
        let issuer = self.settings.issuer.as_str();
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.last_attempt = Some(started);
        match result {
            Ok(jwks) => {
                for why in &jwks.skipped {
                    tracing::warn!(issuer, url = %self.settings.url, "JWKS key skipped: {why}");
                }
                let count = jwks.keys.len();
                if self.install(jwks) {
                    tracing::info!(issuer, keys = count, "JWKS loaded a new key set");
                }
                state.loaded_at = Some(Instant::now());
                state.failures = 0;
                state.next_due = started + self.settings.refresh;
                metrics
                    .jwks_refreshes
                    .with_label_values(&[issuer, "success"])
                    .inc();
            }
            Err(why) => {
                state.failures = state.failures.saturating_add(1);
                let cap = if state.loaded_at.is_some() {
                    self.settings.refresh
                } else {
                    self.settings.refresh.min(Duration::from_secs(30))
                };
                let backoff = FIRST_RETRY
                    .saturating_mul(1 << state.failures.saturating_sub(1).min(16))
                    .min(cap);
                state.next_due = started + backoff;
                metrics
                    .jwks_refreshes
                    .with_label_values(&[issuer, "failure"])
                    .inc();
                let kept = self.keys.load().as_ref().map_or(0, |k| k.len());
                tracing::warn!(issuer, url = %self.settings.url, error = %why, keys_kept = kept,
                    retry_in_ms = u64::try_from(backoff.as_millis()).unwrap_or(u64::MAX),
                    "JWKS refresh failed");
            }
        }
    }

    async fn fetch(&self, client: &reqwest::Client) -> Result<Jwks, String> {
        let mut resp = client
            .get(&self.settings.url)
            .timeout(self.settings.timeout)
            .header(http::header::ACCEPT, "application/json")
            .send()
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(format!(
                    "the document is larger than {MAX_JWKS_BYTES} bytes"
                ));
            }
            body.extend_from_slice(&chunk);
        }
        from_jwks(&body, false)
    }

    /// Seconds since the keys were last fetched, if they ever were.
    fn age(&self, now: Instant) -> Option<f64> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.loaded_at.map(|t| now.duration_since(t).as_secs_f64())
    }
}

/// Fetches every remote key set of the config in force when it is due, one at a time (so
/// fetches of one source never overlap), and keeps the key-set age gauges current.
pub struct JwksRefresh {
    /// The config in force.
    pub built: Arc<ArcSwap<Built>>,
    /// `jwks_*` metrics.
    pub metrics: Metrics,
}

#[async_trait::async_trait]
impl BackgroundService for JwksRefresh {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // No redirects: the proxy fetches exactly the URL its config names.
        let client = match reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .user_agent("vigil-proxy")
            .build()
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "the JWKS client cannot start; remote keys never load");
                return;
            }
        };
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.changed() => return,
                _ = tick.tick() => {}
            }
            let built = self.built.load_full();
            for source in built.jwks.values() {
                if source.due(Instant::now()) {
                    tokio::select! {
                        _ = shutdown.changed() => return,
                        () = source.refresh(&client, &self.metrics) => {}
                    }
                }
                let issuer = source.settings.issuer.as_str();
                let keys = source.keys().map_or(0, |k| k.len());
                self.metrics
                    .jwks_keys
                    .with_label_values(&[issuer])
                    .set(i64::try_from(keys).unwrap_or(i64::MAX));
                if let Some(age) = source.age(Instant::now()) {
                    self.metrics.jwks_age.with_label_values(&[issuer]).set(age);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ed_jwk(kid: &str) -> serde_json::Value {
        json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo", "kid": kid, "alg": "EdDSA", "use": "sig"})
    }

    #[test]
    fn the_algorithm_comes_from_the_key() {
        let k = from_jwk(&ed_jwk("a")).unwrap();
        assert_eq!(k.algorithms, [Algorithm::EdDSA]);
        let rsa = json!({"kty": "RSA", "n": "sXchDaQebHnPiGvyDOAT4saGEUetSyo9MKLOoWFsueri23bOdgWp4Dy1WlUzewbgBHod5pcM9H95GQRV3JDXboIRROSBigeC5yjU1hGzHHyXss8UDprecbAYxknTcQkhslANGRUZmdTOQ5qTRsLAt6BTYuyvVRdhS8exSZEy_c4gs_7svlJJQ4H9_NxsiIoLwAEk7-Q3UXERGYw_75IDrGA84-lA_-Ct4eTlXHBIY2EaV7t7LjJaynVJCpkv4LKjTTAumiGUIuQhrNhZLuF_RJLqHpM2kgWFLU7-VTdL1VbC2tejvcI2BlMkEpk1BzBZI0KQB0GaDWFLN-aEAw3vRw", "e": "AQAB"});
        let k = from_jwk(&rsa).unwrap();
        assert_eq!(k.algorithms.len(), 6, "RS* and PS* without an alg");
        let mut pinned = rsa.clone();
        pinned["alg"] = json!("PS256");
        assert_eq!(from_jwk(&pinned).unwrap().algorithms, [Algorithm::PS256]);
        let short = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 40])});
        assert_eq!(
            from_jwk(&short).unwrap().algorithms,
            [Algorithm::HS256],
            "a 40-byte secret is too short for HS384 and HS512"
        );
    }

    #[test]
    fn keys_for_other_uses_are_refused() {
        let mut enc = ed_jwk("e");
        enc["use"] = json!("enc");
        assert!(from_jwk(&enc).unwrap_err().contains("use"));
        let mut ops = ed_jwk("o");
        ops.as_object_mut().unwrap().remove("use");
        ops["key_ops"] = json!(["sign"]);
        assert!(from_jwk(&ops).unwrap_err().contains("key_ops"));
        let mut alg = ed_jwk("r");
        alg["alg"] = json!("RSA-OAEP");
        assert!(from_jwk(&alg).is_err());
        assert!(
            from_secret(&[1; 16], None).is_err(),
            "a 16-byte HMAC secret"
        );
    }

    #[test]
    fn a_jwks_keeps_the_usable_keys_and_says_why_it_skipped_the_others() {
        let mut enc = ed_jwk("enc");
        enc["use"] = json!("enc");
        let secret = json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode([7u8; 32]), "kid": "s"});
        let doc = json!({"keys": [ed_jwk("a"), enc, {"kty": "XYZ", "kid": "weird"}, secret]});
        let set = from_jwks(doc.to_string().as_bytes(), false).unwrap();
        assert_eq!(set.keys.len(), 1);
        assert_eq!(set.skipped.len(), 3, "{:?}", set.skipped);
        assert!(set.skipped[2].contains("symmetric"), "{:?}", set.skipped);
        assert_eq!(
            from_jwks(doc.to_string().as_bytes(), true)
                .unwrap()
                .keys
                .len(),
            2,
            "a key file may hold an HMAC secret"
        );
        assert!(from_jwks(b"[1,2]", false).is_err());
    }

    fn settings() -> JwksSettings {
        JwksSettings {
            issuer: "i".into(),
            url: "http://127.0.0.1:1/".into(),
            refresh: Duration::from_secs(300),
            min_refresh: Duration::from_secs(5),
            timeout: Duration::from_secs(1),
            max_stale: Duration::from_secs(3600),
        }
    }

    fn now() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    #[test]
    fn the_same_key_set_fetched_again_keeps_its_generation() {
        let remote = RemoteKeys::new(settings());
        let doc = |kids: &[&str]| {
            let keys: Vec<_> = kids.iter().map(|k| ed_jwk(k)).collect();
            from_jwks(json!({ "keys": keys }).to_string().as_bytes(), false).unwrap()
        };
        assert!(remote.keys_at(now()).is_none(), "nothing fetched yet");
        assert!(remote.install(doc(&["a"])));
        let first = remote.generation();
        assert!(!remote.install(doc(&["a"])), "unchanged");
        assert_eq!(remote.generation(), first, "cached verifications stay good");
        assert!(remote.install(doc(&["a", "b"])));
        assert_ne!(remote.generation(), first);
        // Keys confirmed an hour ago are still in use; older than max_stale, they are not.
        assert!(remote.keys_at(now() + 3600).is_some());
        assert!(remote.keys_at(now() + 3602).is_none());
        // A reload that changes only the timings keeps the keys.
        let mut faster = settings();
        faster.refresh = Duration::from_secs(60);
        let next = RemoteKeys::succeeding(faster, &remote);
        assert_eq!(next.keys().map(|k| k.len()), Some(2));
        assert_eq!(next.generation(), remote.generation());
    }

    #[test]
    fn lookup_by_kid_and_without_one() {
        let set = KeySet::new(vec![
            from_jwk(&ed_jwk("a")).unwrap(),
            from_secret(&[1; 32], None).unwrap(),
        ]);
        assert!(set.find(Some("a"), Algorithm::EdDSA).is_ok());
        assert_eq!(
            set.find(Some("a"), Algorithm::HS256).unwrap_err(),
            LookupError::AlgNotAllowed,
            "an HMAC token naming a public key"
        );
        assert_eq!(
            set.find(Some("b"), Algorithm::EdDSA).unwrap_err(),
            LookupError::UnknownKid
        );
        assert!(
            set.find(None, Algorithm::HS256).is_ok(),
            "the one key without an id"
        );
        assert_eq!(
            set.find(None, Algorithm::EdDSA).unwrap_err(),
            LookupError::UnknownKid
        );
    }
}
