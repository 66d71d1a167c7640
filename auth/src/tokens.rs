//! Access and refresh tokens: the token contract of ARCHITECTURE.md, from the issuing side.
//!
//! - The signing key set is one JSON file (`tokens.keys_path`): the current Ed25519 key and the
//!   previous one, PKCS#8, written atomically with mode 0600. It is generated on first start,
//!   rotated by `vigil auth rotate-keys`, and reloaded by the running service when the file
//!   changes, so a rotation needs no restart. JWKS serves both public keys.
//! - Access tokens are EdDSA JWS with `kid`; claims `iss aud sub role sid iat nbf exp jti`.
//! - Refresh tokens are 256 random bits, base64url; only their SHA-256 is stored.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use arc_swap::ArcSwap;
use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{Ed25519KeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// Access tokens longer than this are refused before any parsing.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY_SECS: u64 = 30;

/// The claims of an access token.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// Issuer.
    pub iss: String,
    /// Audience.
    pub aud: String,
    /// The user id.
    pub sub: String,
    /// `user` or `admin`.
    pub role: String,
    /// The session (refresh-token family) the token was issued for.
    pub sid: String,
    /// Issued at, unix seconds.
    pub iat: u64,
    /// Not before, unix seconds.
    pub nbf: u64,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
}

/// Why a token was not accepted. The names are the proxy's `reason` values too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not a JWS, bad base64 or JSON, missing claims, or too large.
    #[error("the token is malformed")]
    Malformed,
    /// `alg` is not EdDSA.
    #[error("the token's algorithm is not allowed")]
    AlgNotAllowed,
    /// `kid` names no current or previous key.
    #[error("the token's key is unknown")]
    UnknownKid,
    /// The signature does not verify.
    #[error("the token's signature is invalid")]
    BadSignature,
    /// `exp` has passed.
    #[error("the token has expired")]
    Expired,
    /// `nbf` is in the future.
    #[error("the token is not valid yet")]
    NotYetValid,
    /// `iss` is not ours.
    #[error("the token was issued by someone else")]
    WrongIssuer,
    /// `aud` is not ours.
    #[error("the token is meant for another audience")]
    WrongAudience,
}

/// A failure to read, write or build the key set.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the file failed.
    #[error("{path}: {source}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The file is not a valid key set.
    #[error("{path}: not a valid key set: {reason}")]
    Invalid {
        /// The key file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// Signing failed (a broken key).
    #[error("signing failed: {0}")]
    Sign(String),
}

/// One Ed25519 key.
pub struct SigningKey {
    /// RFC 7638 thumbprint of the public key.
    pub kid: String,
    /// When the key was made, unix seconds.
    pub created_at: i64,
    pkcs8: Vec<u8>,
    encoding: EncodingKey,
    decoding: DecodingKey,
    public_x: String,
}

impl SigningKey {
    fn from_pkcs8(pkcs8: Vec<u8>, created_at: i64) -> Result<Self, String> {
        let pair = Ed25519KeyPair::from_pkcs8(&pkcs8)
            .map_err(|e| format!("not an Ed25519 PKCS#8 key: {e}"))?;
        let public = pair.public_key().as_ref().to_vec();
        let public_x = B64.encode(&public);
        let thumbprint_input = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{public_x}"}}"#);
        let kid = B64.encode(digest(&SHA256, thumbprint_input.as_bytes()));
        Ok(Self {
            kid,
            created_at,
            encoding: EncodingKey::from_ed_der(&pkcs8),
            decoding: DecodingKey::from_ed_der(&public),
            pkcs8,
            public_x,
        })
    }

    fn generate(now: i64) -> Self {
        let doc =
            Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).expect("the system RNG works");
        Self::from_pkcs8(doc.as_ref().to_vec(), now).expect("a freshly generated key is valid")
    }
}

/// The current signing key and the one before it.
pub struct KeySet {
    /// Signs every new token.
    pub current: SigningKey,
    /// Still verifies tokens signed before the last rotation.
    pub previous: Option<SigningKey>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFile {
    keys: Vec<KeyFileEntry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct KeyFileEntry {
    kid: String,
    created_at: i64,
    pkcs8: String,
}

impl KeySet {
    /// Loads the key set at `path`, generating and saving a new one if the file does not exist.
    pub fn load_or_generate(path: &Path) -> Result<Self, KeyError> {
        match std::fs::metadata(path) {
            Ok(_) => Self::load(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let set = KeySet {
                    current: SigningKey::generate(now_secs()),
                    previous: None,
                };
                set.save(path)?;
                tracing::info!(path = %path.display(), kid = %set.current.kid, "generated a new signing key");
                Ok(set)
            }
            Err(source) => Err(KeyError::Io {
                path: path.into(),
                source,
            }),
        }
    }

    /// Loads the key set at `path`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let text = std::fs::read_to_string(path).map_err(|source| KeyError::Io {
            path: path.into(),
            source,
        })?;
        let invalid = |reason: String| KeyError::Invalid {
            path: path.into(),
            reason,
        };
        let file: KeyFile = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        let mut keys = Vec::new();
        for entry in file.keys.into_iter().take(2) {
            let der = B64
                .decode(entry.pkcs8.as_bytes())
                .map_err(|e| invalid(format!("key {}: {e}", entry.kid)))?;
            let key = SigningKey::from_pkcs8(der, entry.created_at)
                .map_err(|e| invalid(format!("key {}: {e}", entry.kid)))?;
            if key.kid != entry.kid {
                return Err(invalid(format!(
                    "key {}: kid does not match the key",
                    entry.kid
                )));
            }
            keys.push(key);
        }
        let mut keys = keys.into_iter();
        let current = keys.next().ok_or_else(|| invalid("no keys".into()))?;
        Ok(KeySet {
            current,
            previous: keys.next(),
        })
    }

    /// Makes a new current key, keeps the old current one as previous, and saves the set.
    pub fn rotate(path: &Path) -> Result<Self, KeyError> {
        let old = Self::load_or_generate(path)?;
        let set = KeySet {
            current: SigningKey::generate(now_secs()),
            previous: Some(old.current),
        };
        set.save(path)?;
        Ok(set)
    }

    fn save(&self, path: &Path) -> Result<(), KeyError> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let io = |source| KeyError::Io {
            path: path.into(),
            source,
        };
        let keys = std::iter::once(&self.current).chain(self.previous.as_ref());
        let file = KeyFile {
            keys: keys
                .map(|k| KeyFileEntry {
                    kid: k.kid.clone(),
                    created_at: k.created_at,
                    pkcs8: B64.encode(&k.pkcs8),
                })
                .collect(),
        };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| KeyError::Sign(e.to_string()))?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let tmp = path.with_extension("tmp");
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(io)?;
        f.write_all(&json).and_then(|()| f.sync_all()).map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)
    }

    fn find(&self, kid: &str) -> Option<&SigningKey> {
        std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .find(|k| k.kid == kid)
    }

    /// The public keys as a JWK Set.
    pub fn jwks(&self) -> serde_json::Value {
        let keys: Vec<_> = std::iter::once(&self.current)
            .chain(self.previous.as_ref())
            .map(|k| {
                serde_json::json!({
                    "kty": "OKP", "crv": "Ed25519", "x": k.public_x, "kid": k.kid, "alg": "EdDSA", "use": "sig",
                })
            })
            .collect();
        serde_json::json!({ "keys": keys })
    }
}

/// Issues and verifies access tokens with the key set on disk.
pub struct Tokens {
    keys: ArcSwap<KeySet>,
    keys_path: PathBuf,
    keys_mtime: Mutex<Option<SystemTime>>,
    issuer: String,
    audience: String,
    /// Access token lifetime.
    pub access_ttl_secs: u64,
    /// Refresh token lifetime.
    pub refresh_ttl_secs: u64,
}

impl Tokens {
    /// Loads (or generates) the key set named by `config`.
    pub fn load(config: &crate::config::Tokens) -> Result<Self, KeyError> {
        let keys = KeySet::load_or_generate(&config.keys_path)?;
        Ok(Self {
            keys: ArcSwap::from_pointee(keys),
            keys_mtime: Mutex::new(mtime(&config.keys_path)),
            keys_path: config.keys_path.clone(),
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            access_ttl_secs: config.access_ttl_secs,
            refresh_ttl_secs: config.refresh_ttl_secs,
        })
    }

    /// Reloads the key set if its file changed. `Ok(true)` when new keys were swapped in; on an
    /// error the keys in use stay.
    pub fn reload_if_changed(&self) -> Result<bool, KeyError> {
        let now = mtime(&self.keys_path);
        let mut seen = self.keys_mtime.lock().unwrap_or_else(|p| p.into_inner());
        if now == *seen {
            return Ok(false);
        }
        let keys = KeySet::load(&self.keys_path)?;
        *seen = now;
        tracing::info!(kid = %keys.current.kid, "signing keys reloaded");
        self.keys.store(keys.into());
        Ok(true)
    }

    /// The public keys as a JWK Set.
    pub fn jwks(&self) -> serde_json::Value {
        self.keys.load().jwks()
    }

    /// The `kid` of the key signing new tokens.
    pub fn current_kid(&self) -> String {
        self.keys.load().current.kid.clone()
    }

    /// Signs an access token for `sub` issued at `now` (unix seconds); returns it with its claims.
    pub fn issue(
        &self,
        sub: &str,
        role: &str,
        sid: &str,
        now: u64,
    ) -> Result<(String, Claims), KeyError> {
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: sub.to_owned(),
            role: role.to_owned(),
            sid: sid.to_owned(),
            iat: now,
            nbf: now,
            exp: now + self.access_ttl_secs,
            jti: uuid::Uuid::new_v4().to_string(),
        };
        let keys = self.keys.load();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(keys.current.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &keys.current.encoding)
            .map_err(|e| KeyError::Sign(e.to_string()))?;
        Ok((token, claims))
    }

    /// Verifies an access token: EdDSA only, a known `kid`, our issuer and audience, `exp`,
    /// `nbf` and `iat` present and honoured with [`LEEWAY_SECS`].
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::Malformed);
        }
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        if header.alg != Algorithm::EdDSA {
            return Err(TokenError::AlgNotAllowed);
        }
        if header.crit.is_some() {
            return Err(TokenError::Malformed);
        }
        let keys = self.keys.load();
        let key = header
            .kid
            .as_deref()
            .and_then(|kid| keys.find(kid))
            .ok_or(TokenError::UnknownKid)?;
        let mut validation = Validation::new(Algorithm::EdDSA);
        validation.leeway = LEEWAY_SECS;
        validation.validate_nbf = true;
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[&self.audience]);
        validation.set_required_spec_claims(&["exp", "nbf", "iat", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Claims>(token, &key.decoding, &validation).map_err(
            |e| match e.kind() {
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidAlgorithm => TokenError::AlgNotAllowed,
                _ => TokenError::Malformed,
            },
        )?;
        if data.claims.iat > now_secs_u64() + LEEWAY_SECS {
            return Err(TokenError::NotYetValid);
        }
        Ok(data.claims)
    }
}

/// A new refresh token and the hash to store for it.
pub fn new_refresh_token() -> (String, String) {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("the system RNG works");
    let token = B64.encode(bytes);
    let hash = hash_refresh_token(&token);
    (token, hash)
}

/// The stored form of a refresh token. A fast hash is enough: the input has 256 bits of entropy.
pub fn hash_refresh_token(token: &str) -> String {
    B64.encode(digest(&SHA256, token.as_bytes()))
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn now_secs() -> i64 {
    chrono::Utc::now().timestamp()
}

fn now_secs_u64() -> u64 {
    u64::try_from(now_secs()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(dir: &Path) -> Tokens {
        let config = crate::config::Tokens {
            keys_path: dir.join("keys/signing.json"),
            ..Default::default()
        };
        Tokens::load(&config).unwrap()
    }

    fn now() -> u64 {
        now_secs_u64()
    }

    fn tamper_payload(token: &str, f: impl FnOnce(&mut serde_json::Value)) -> String {
        let parts: Vec<&str> = token.split('.').collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&B64.decode(parts[1]).unwrap()).unwrap();
        f(&mut claims);
        format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(claims.to_string()),
            parts[2]
        )
    }

    #[test]
    fn issued_token_verifies_with_the_contract_claims() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let (token, claims) = t.issue("user-1", "admin", "sess-1", now()).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        assert_eq!(header.kid.as_deref(), Some(t.current_kid().as_str()));
        let got = t.verify(&token).unwrap();
        assert_eq!(got, claims);
        assert_eq!(
            (got.iss.as_str(), got.aud.as_str(), got.role.as_str()),
            ("vigil-auth", "vigil", "admin")
        );
        assert_eq!(got.exp - got.iat, 900);
    }

    #[test]
    fn tampered_claims_fail_the_signature() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let (token, _) = t.issue("user-1", "user", "s", now()).unwrap();
        let forged = tamper_payload(&token, |c| c["role"] = "admin".into());
        assert_eq!(t.verify(&forged), Err(TokenError::BadSignature));
        // Flip one byte in the middle of the signature (the last base64 character also holds
        // padding bits, so changing it may only make the encoding non-canonical).
        let (head, sig) = token.rsplit_once('.').unwrap();
        let mut raw = B64.decode(sig).unwrap();
        raw[32] ^= 0x01;
        let sig_flipped = format!("{head}.{}", B64.encode(raw));
        assert_eq!(t.verify(&sig_flipped), Err(TokenError::BadSignature));
    }

    #[test]
    fn wrong_kid_and_foreign_keys_are_unknown() {
        let dir = tempfile::tempdir().unwrap();
        let other = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let foreign = tokens(other.path());
        let (token, _) = foreign.issue("u", "user", "s", now()).unwrap();
        assert_eq!(t.verify(&token), Err(TokenError::UnknownKid));
        // A foreign signature under our kid still fails.
        let keys = foreign.keys.load();
        let mut header = Header::new(Algorithm::EdDSA);
        header.kid = Some(t.current_kid());
        let (_, claims) = t.issue("u", "user", "s", now()).unwrap();
        let forged = jsonwebtoken::encode(&header, &claims, &keys.current.encoding).unwrap();
        assert_eq!(t.verify(&forged), Err(TokenError::BadSignature));
    }

    #[test]
    fn expired_and_future_tokens_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let (old, _) = t
            .issue("u", "user", "s", now() - 900 - LEEWAY_SECS - 5)
            .unwrap();
        assert_eq!(t.verify(&old), Err(TokenError::Expired));
        let (within_leeway, _) = t
            .issue("u", "user", "s", now() - 900 - LEEWAY_SECS + 10)
            .unwrap();
        assert!(t.verify(&within_leeway).is_ok());
        let (future, _) = t.issue("u", "user", "s", now() + 600).unwrap();
        assert_eq!(t.verify(&future), Err(TokenError::NotYetValid));
    }

    #[test]
    fn other_algorithms_and_garbage_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let (_, claims) = t.issue("u", "user", "s", now()).unwrap();
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(t.current_kid());
        // HS256 "signed" with the public key: the classic algorithm-confusion attack.
        let public = B64.decode(&t.keys.load().current.public_x).unwrap();
        let hs =
            jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&public)).unwrap();
        assert_eq!(t.verify(&hs), Err(TokenError::AlgNotAllowed));
        let none = format!(
            "{}.{}.",
            B64.encode(r#"{"alg":"none"}"#),
            B64.encode(serde_json::to_vec(&claims).unwrap())
        );
        assert_eq!(t.verify(&none), Err(TokenError::Malformed));
        assert_eq!(t.verify("not.a.token"), Err(TokenError::Malformed));
        assert_eq!(
            t.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn wrong_issuer_or_audience_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let other = Tokens {
            issuer: "someone-else".into(),
            ..Tokens::load(&crate::config::Tokens {
                keys_path: dir.path().join("keys/signing.json"),
                ..Default::default()
            })
            .unwrap()
        };
        let (token, _) = other.issue("u", "user", "s", now()).unwrap();
        assert_eq!(t.verify(&token), Err(TokenError::WrongIssuer));
        let other = Tokens {
            audience: "elsewhere".into(),
            ..tokens(dir.path())
        };
        let (token, _) = other.issue("u", "user", "s", now()).unwrap();
        assert_eq!(t.verify(&token), Err(TokenError::WrongAudience));
    }

    #[test]
    fn rotation_keeps_the_previous_key_and_is_picked_up_by_a_running_service() {
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let (before, _) = t.issue("u", "user", "s", now()).unwrap();
        let old_kid = t.current_kid();
        let rotated = KeySet::rotate(&dir.path().join("keys/signing.json")).unwrap();
        assert_eq!(
            rotated.previous.as_ref().map(|k| k.kid.as_str()),
            Some(old_kid.as_str())
        );
        // Make sure the mtime differs even on coarse file systems.
        let f = std::fs::File::options()
            .append(true)
            .open(dir.path().join("keys/signing.json"))
            .unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(2))
            .unwrap();
        assert!(t.reload_if_changed().unwrap());
        assert!(!t.reload_if_changed().unwrap(), "nothing changed since");
        assert_ne!(t.current_kid(), old_kid);
        assert!(
            t.verify(&before).is_ok(),
            "tokens of the previous key still verify"
        );
        let kids: Vec<_> = t.jwks()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .map(|k| k["kid"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(kids, vec![t.current_kid(), old_kid]);
        // A second rotation retires the first key.
        KeySet::rotate(&dir.path().join("keys/signing.json")).unwrap();
        let f = std::fs::File::options()
            .append(true)
            .open(dir.path().join("keys/signing.json"))
            .unwrap();
        f.set_modified(SystemTime::now() + std::time::Duration::from_secs(4))
            .unwrap();
        assert!(t.reload_if_changed().unwrap());
        assert_eq!(t.verify(&before), Err(TokenError::UnknownKid));
    }

    #[test]
    fn key_file_is_private_and_survives_reload() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let t = tokens(dir.path());
        let path = dir.path().join("keys/signing.json");
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(KeySet::load(&path).unwrap().current.kid, t.current_kid());
        std::fs::write(&path, "{\"keys\": []}").unwrap();
        assert!(matches!(KeySet::load(&path), Err(KeyError::Invalid { .. })));
    }

    #[test]
    fn refresh_tokens_are_random_and_stored_hashed() {
        let (a, ha) = new_refresh_token();
        let (b, _) = new_refresh_token();
        assert_ne!(a, b);
        assert_eq!(B64.decode(&a).unwrap().len(), 32);
        assert_eq!(hash_refresh_token(&a), ha);
        assert_ne!(ha, a);
    }
}
