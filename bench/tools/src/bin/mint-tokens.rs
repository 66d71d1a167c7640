//! Makes a signing key and tokens for the load script's JWT scenarios.
//!
//! `mint-tokens ALG COUNT DIR [FILES]` with ALG `ES256` or `HS256` writes `DIR/key` (a public
//! JWK for ES256, the raw secret for HS256) and FILES files `DIR/tokens-0`, `DIR/tokens-1`, …
//! (default 1) of COUNT tokens each, one per line, every token distinct, valid for an hour,
//! claims shaped like the auth service's. One file per load run keeps "fresh" fresh.

use std::io::Write;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (alg, count, dir, files) = match args.as_slice() {
        [alg, count, dir] => (alg, count, dir, "1"),
        [alg, count, dir, files] => (alg, count, dir, files.as_str()),
        _ => return Err("usage: mint-tokens ES256|HS256 COUNT DIR [FILES]".into()),
    };
    let count: usize = count.parse()?;
    let files: usize = files.parse()?;
    let dir = std::path::Path::new(dir);
    std::fs::create_dir_all(dir)?;
    let (alg, key, kid) = match alg.as_str() {
        "ES256" => {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .map_err(|e| format!("key generation: {e}"))?;
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref())
                .map_err(|e| format!("key: {e}"))?;
            let point = pair.public_key().as_ref();
            let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "bench-es",
                "x": B64.encode(&point[1..33]), "y": B64.encode(&point[33..]), "use": "sig"});
            std::fs::write(dir.join("key"), jwk.to_string())?;
            (
                Algorithm::ES256,
                EncodingKey::from_ec_der(pkcs8.as_ref()),
                "bench-es",
            )
        }
        "HS256" => {
            let mut secret = [0u8; 32];
            aws_lc_rs::rand::fill(&mut secret).map_err(|e| format!("rng: {e}"))?;
            let text = B64.encode(secret);
            std::fs::write(dir.join("key"), &text)?;
            (
                Algorithm::HS256,
                EncodingKey::from_secret(text.as_bytes()),
                "bench-hs",
            )
        }
        other => return Err(format!("unknown algorithm {other}").into()),
    };
    let header = B64.encode(format!(r#"{{"alg":"{alg:?}","kid":"{kid}","typ":"JWT"}}"#));
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    for file in 0..files {
        let path = dir.join(format!("tokens-{file}"));
        let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
        for n in 0..count {
            let i = file * count + n;
            let claims = serde_json::json!({"iss": "vigil-auth", "aud": "vigil",
                "sub": format!("00000000-0000-7000-8000-{i:012}"), "role": "user",
                "sid": format!("s{i}"), "iat": now, "nbf": now, "exp": now + 3600,
                "jti": format!("bench-{i}")});
            let message = format!("{header}.{}", B64.encode(claims.to_string()));
            let sig = jsonwebtoken::crypto::sign(message.as_bytes(), &key, alg)?;
            writeln!(out, "{message}.{sig}")?;
        }
        out.flush()?;
    }
    Ok(())
}
