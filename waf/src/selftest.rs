//! Every rule's own tests run against an engine holding the whole pack: each attack must make
//! the rule match, each benign look-alike must not. `cargo test` and `vigil waf rules --test`
//! run it; a failure names the rule, the test and what happened.

use std::net::IpAddr;

use crate::engine::{Engine, Settings};
use crate::raw::{self, OwnedRequest};
use crate::request::Collection;
use crate::rules::{Pack, Rule};

/// One rule test that did not hold.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub rule: u32,
    pub file: String,
    pub test: String,
    pub why: String,
}

/// Runs the tests of every rule in `pack`; the failures, none when all hold.
pub fn run(pack: &Pack) -> Vec<Failure> {
    let engine = match Engine::new(
        pack,
        Settings {
            paranoia: 4,
            ..Settings::default()
        },
    ) {
        Ok(e) => e,
        Err(e) => {
            return vec![Failure {
                rule: 0,
                file: String::new(),
                test: String::new(),
                why: e.to_string(),
            }];
        }
    };
    let mut failures = Vec::new();
    for rule in &pack.rules {
        let t = &rule.tests;
        let cases = t
            .attack
            .iter()
            .map(|v| (true, request_with(rule, v)))
            .chain(t.benign.iter().map(|v| (false, request_with(rule, v))))
            .chain(t.attack_http.iter().map(|r| (true, from_raw(r))))
            .chain(t.benign_http.iter().map(|r| (false, from_raw(r))));
        let inputs = t
            .attack
            .iter()
            .chain(&t.benign)
            .chain(&t.attack_http)
            .chain(&t.benign_http);
        for ((attack, req), input) in cases.zip(inputs) {
            let fail = |why: String| Failure {
                rule: rule.id,
                file: rule.file.clone(),
                test: format!("{} {input:?}", if attack { "attack" } else { "benign" }),
                why,
            };
            let req = match req {
                Ok(r) => r,
                Err(e) => {
                    failures.push(fail(e));
                    continue;
                }
            };
            let report = engine.inspect(&req.as_request());
            let matched = report.rule_ids().contains(&rule.id);
            if matched != attack {
                failures.push(fail(if attack {
                    format!(
                        "rule {} did not match (matched: {:?})",
                        rule.id,
                        report.rule_ids()
                    )
                } else {
                    format!("rule {} matched a benign value", rule.id)
                }));
            }
        }
    }
    failures
}

fn from_raw(text: &str) -> Result<OwnedRequest, String> {
    raw::parse(text.as_bytes()).map_err(|e| e.to_string())
}

/// A request holding `value` in the rule's first target.
fn request_with(rule: &Rule, value: &str) -> Result<OwnedRequest, String> {
    let target = rule
        .targets
        .first()
        .ok_or_else(|| "a value test needs a target".to_string())?;
    let key = target.key.clone();
    let mut req = OwnedRequest {
        method: "GET".into(),
        uri: b"/".to_vec(),
        path: "/".into(),
        headers: vec![("Host".into(), b"localhost".to_vec())],
        ..OwnedRequest::default()
    };
    let enc = |s: &str| {
        percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    let v = value.as_bytes().to_vec();
    match target.collection {
        Collection::Method => req.method = value.into(),
        Collection::Path => {
            req.path = value.into();
            req.uri = v;
        }
        Collection::Uri => req.uri = v,
        Collection::Query => {
            req.query = v.clone();
            req.uri = [b"/?".as_slice(), &v].concat();
        }
        Collection::Args if target.json_only => {
            let path = key.unwrap_or_else(|| "body.value".into());
            let mut doc = serde_json::Value::String(value.into());
            for part in path
                .split('.')
                .skip(1)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
            {
                doc = serde_json::json!({ part: doc });
            }
            req.method = "POST".into();
            req.headers
                .push(("Content-Type".into(), b"application/json".to_vec()));
            req.body = doc.to_string().into_bytes();
        }
        Collection::Args => {
            req.query =
                format!("{}={}", key.as_deref().unwrap_or("value"), enc(value)).into_bytes();
        }
        Collection::ArgsNames => req.query = format!("{}=1", enc(value)).into_bytes(),
        Collection::Headers => req
            .headers
            .push((key.unwrap_or_else(|| "x-test".into()), v)),
        Collection::HeadersNames => req.headers.push((value.into(), b"1".to_vec())),
        Collection::Cookies => req.headers.push((
            "Cookie".into(),
            format!("{}={value}", key.as_deref().unwrap_or("c")).into_bytes(),
        )),
        Collection::CookiesNames => req
            .headers
            .push(("Cookie".into(), format!("{value}=1").into_bytes())),
        Collection::Body => {
            req.method = "POST".into();
            req.headers
                .push(("Content-Type".into(), b"text/plain".to_vec()));
            req.body = v;
        }
        Collection::Files => {
            req.method = "POST".into();
            req.headers.push((
                "Content-Type".into(),
                b"multipart/form-data; boundary=b0undary".to_vec(),
            ));
            req.body = format!(
                "--b0undary\r\nContent-Disposition: form-data; name=\"f\"; filename=\"{value}\"\r\n\r\nx\r\n--b0undary--\r\n"
            )
            .into_bytes();
        }
        Collection::RemoteAddr => {
            req.client_ip = Some(
                value
                    .parse::<IpAddr>()
                    .map_err(|e| format!("`{value}` is not an address: {e}"))?,
            );
        }
    }
    if !req.query.is_empty() && target.collection != Collection::Query {
        req.uri = [b"/?".as_slice(), &req.query].concat();
    }
    Ok(req)
}
