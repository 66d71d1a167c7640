//! The jwt filter's cost per request, by algorithm: a token verified from scratch (cache off,
//! the signature checked every time) and a token seen before (served from the verified-token
//! cache); and the signature check alone, through jsonwebtoken's `crypto::verify` and through
//! the filter's key parsed once. `cargo bench -p vigil-proxy --bench jwt`.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::hint::black_box;
use std::net::IpAddr;

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{self, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use criterion::{Criterion, criterion_group, criterion_main};
use jsonwebtoken::{Algorithm, DecodingKey};
use proxy::config::JwtFilterConfig;
use proxy::filters::jwt::JwtFilter;
use proxy::keys::{KeySet, VerifyKey};
use proxy::metrics::Metrics;
use proxy::pipeline::{Filter, RequestCtx, Verdict};

/// A token signed by `sign` over `header.claims`, and the key that verifies it.
fn token(alg: &str, sign: impl Fn(&[u8]) -> Vec<u8>) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = serde_json::json!({"iss": "vigil-auth", "aud": "vigil",
        "sub": "0190b7e2-3f3c-7a10-9a4e-3c5d7e8f9a0b", "role": "user",
        "sid": "0190b7e2-3f3c-7a10-9a4e-3c5d7e8f9a0c", "iat": now, "nbf": now,
        "exp": now + 900, "jti": "0190b7e2-3f3c-7a10-9a4e-3c5d7e8f9a0d"});
    let message = format!(
        "{}.{}",
        B64.encode(format!(r#"{{"alg":"{alg}","kid":"k"}}"#)),
        B64.encode(claims.to_string())
    );
    let sig = sign(message.as_bytes());
    format!("{message}.{}", B64.encode(sig))
}

fn key(algorithm: Algorithm, key: DecodingKey) -> (Algorithm, DecodingKey) {
    (algorithm, key)
}

/// (name, token, (algorithm, verification key)) for every algorithm family.
fn cases() -> Vec<(&'static str, String, (Algorithm, DecodingKey))> {
    let rng = SystemRandom::new();
    let mut out = Vec::new();
    let secret = [7u8; 64];
    for (name, alg, hmac) in [
        ("HS256", Algorithm::HS256, aws_lc_rs::hmac::HMAC_SHA256),
        ("HS384", Algorithm::HS384, aws_lc_rs::hmac::HMAC_SHA384),
        ("HS512", Algorithm::HS512, aws_lc_rs::hmac::HMAC_SHA512),
    ] {
        let k = aws_lc_rs::hmac::Key::new(hmac, &secret);
        let t = token(name, |m| aws_lc_rs::hmac::sign(&k, m).as_ref().to_vec());
        out.push((name, t, key(alg, DecodingKey::from_secret(&secret))));
    }
    let rsa = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let public = rsa.public_key().as_ref().to_vec();
    for (name, alg, enc) in [
        (
            "RS256",
            Algorithm::RS256,
            &signature::RSA_PKCS1_SHA256 as &'static dyn signature::RsaEncoding,
        ),
        ("PS256", Algorithm::PS256, &signature::RSA_PSS_SHA256),
    ] {
        let t = token(name, |m| {
            let mut sig = vec![0; rsa.public_modulus_len()];
            rsa.sign(enc, &rng, m, &mut sig).unwrap();
            sig
        });
        out.push((name, t, key(alg, DecodingKey::from_rsa_der(&public))));
    }
    for (name, alg, signing) in [
        (
            "ES256",
            Algorithm::ES256,
            &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
        ),
        (
            "ES384",
            Algorithm::ES384,
            &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        ),
    ] {
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(signing, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(signing, pkcs8.as_ref()).unwrap();
        let t = token(name, |m| pair.sign(&rng, m).unwrap().as_ref().to_vec());
        let point = pair.public_key().as_ref().to_vec();
        out.push((name, t, key(alg, DecodingKey::from_ec_der(&point))));
    }
    let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let pair = Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
    let t = token("EdDSA", |m| pair.sign(m).as_ref().to_vec());
    let point = pair.public_key().as_ref().to_vec();
    out.push((
        "EdDSA",
        t,
        key(Algorithm::EdDSA, DecodingKey::from_ed_der(&point)),
    ));
    out
}

fn config(alg: &str, cache: usize) -> JwtFilterConfig {
    let text = format!(
        "issuer = \"vigil-auth\"\naudiences = [\"vigil\"]\nalgorithms = [\"{alg}\"]\n\
         jwks_url = \"http://127.0.0.1:1/\"\ncache_max_entries = {cache}\n\
         forward_claims = {{ sub = \"x-vigil-subject\", role = \"x-vigil-role\" }}\n"
    );
    toml::from_str(&text).unwrap()
}

fn verify(c: &mut Criterion) {
    let metrics = Metrics::new();
    for (name, token, (alg, decoding)) in cases() {
        let req = http::Request::get("/content")
            .header("authorization", format!("Bearer {token}"))
            .body(())
            .unwrap()
            .into_parts()
            .0;
        let check = |filter: &JwtFilter| {
            let mut ctx = RequestCtx::new(String::new(), IpAddr::from([127, 0, 0, 1]), false);
            let v = filter.on_request(&req, &mut ctx);
            assert!(matches!(v, Verdict::Continue), "{name}: {v:?}");
            black_box(ctx);
        };
        let keys = || {
            KeySet::new(vec![
                VerifyKey::new(Some("k".into()), vec![alg], &decoding).unwrap(),
            ])
        };
        // One filter with the cache off (every request checks the signature), one with it on.
        let uncached = JwtFilter::with_keys(&config(name, 0), keys(), None, &metrics);
        let cached = JwtFilter::with_keys(&config(name, 1000), keys(), None, &metrics);
        check(&cached);
        c.bench_function(&format!("jwt/{name}/uncached"), |b| {
            b.iter(|| check(&uncached))
        });
        c.bench_function(&format!("jwt/{name}/cached"), |b| b.iter(|| check(&cached)));
        // The signature check alone: jsonwebtoken's `crypto::verify` (which parses the key on
        // every call) against the key parsed once, as the filter holds it.
        let (message, sig_b64) = token.rsplit_once('.').unwrap();
        let sig = B64.decode(sig_b64).unwrap();
        let parsed = VerifyKey::new(None, vec![alg], &decoding).unwrap();
        assert!(parsed.verify(alg, message.as_bytes(), &sig));
        c.bench_function(&format!("signature/{name}/jsonwebtoken"), |b| {
            b.iter(|| {
                jsonwebtoken::crypto::verify(sig_b64, message.as_bytes(), &decoding, alg).unwrap()
            })
        });
        c.bench_function(&format!("signature/{name}/parsed_once"), |b| {
            b.iter(|| parsed.verify(alg, message.as_bytes(), &sig))
        });
    }
}

criterion_group!(benches, verify);
criterion_main!(benches);
