//! The WAF's inspection cost per request: the embedded pack compiled at paranoia 1 and 2, then
//! one `Engine::inspect` per iteration on a typical benign API request (a GET with three
//! arguments, with a browser's headers and with the two the load script's client sends; a POST
//! with a 2 KiB and with a 16 KiB JSON body) and on attacks (SQL injection
//! in a query argument, XSS in a JSON field). The headers are those a browser or an API client
//! sends; every benign case must pass and every attack must be refused, or the bench stops.
//! `cargo bench -p vigil-waf --bench inspect`.
//!
//! The JSON bodies are the ones bench/run.sh and bench/callgrind.sh send (`json_body` there
//! writes the same records with the same generator).
//!
//! `floor/*` is the least any engine on the `regex` crate does for the 16 KiB body, to hold
//! S4b's goal against: the body parsed with nothing kept, and its strings read once by one set
//! of every paranoia-1 regular expression that reads them, as they are (case-insensitive, so no
//! lowercase pass), and once more without white space for the rules that read them so. No
//! transformation, detector, word search or per-value work is counted.

#![allow(clippy::unwrap_used)] // a benchmark: a panic is the failure report

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};

/// `{"items":[...]}` of records in plain words, at least `size` bytes: eight values a record, one
/// per 40 bytes or so (a 16 KiB body has 400 arguments, under `Limits::max_args`).
fn json_body(size: usize) -> String {
    let mut items = Vec::new();
    let mut len = 12;
    let mut i = 0;
    while len < size {
        i += 1;
        let item = format!(
            r#"{{"id":{i},"name":"Item {i}","email":"user{i}@example.com","note":"A short note about item number {i}, in plain words: it came in on a Monday, the team looked it over and sent it on the same week, with nothing further to report on it.","tags":["alpha","beta"],"price":{}.5,"active":true}}"#,
            i % 97
        );
        len += item.len() + 1;
        items.push(item);
    }
    format!(r#"{{"items":[{}]}}"#, items.join(","))
}

const HEADERS: [(&str, &[u8]); 6] = [
    ("host", b"api.example.com"),
    (
        "user-agent",
        b"Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0",
    ),
    ("accept", b"application/json, text/plain, */*"),
    ("accept-language", b"en-US,en;q=0.5"),
    ("accept-encoding", b"gzip, deflate, br"),
    (
        "authorization",
        b"Bearer eyJhbGciOiJFUzI1NiIsImtpZCI6ImsifQ.eyJzdWIiOiIxMjMifQ.c2lnbmF0dXJl",
    ),
];

fn get<'a>(uri: &'a str) -> waf::Request<'a> {
    let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
    waf::Request {
        method: "GET",
        path,
        uri: uri.as_bytes(),
        query: query.as_bytes(),
        headers: HEADERS.to_vec(),
        client_ip: Some("192.0.2.7".parse().unwrap()),
        ..Default::default()
    }
}

fn post<'a>(path: &'a str, body: &'a str, length: &'a str) -> waf::Request<'a> {
    let mut headers = HEADERS.to_vec();
    headers.push(("content-type", b"application/json"));
    headers.push(("content-length", length.as_bytes()));
    waf::Request {
        method: "POST",
        path,
        uri: path.as_bytes(),
        headers,
        body: body.as_bytes(),
        client_ip: Some("192.0.2.7".parse().unwrap()),
        ..Default::default()
    }
}

fn inspect(c: &mut Criterion) {
    let pack = waf::Pack::embedded().unwrap();
    let (small, large) = (json_body(2048), json_body(16 * 1024));
    let (small_len, large_len) = (small.len().to_string(), large.len().to_string());
    let xss = r#"{"title":"Notes","content":"<script>alert(document.cookie)</script>"}"#;
    let xss_len = xss.len().to_string();
    // The GET bench/callgrind.sh's S4 sends: Python's http.client, two headers.
    let bare = waf::Request {
        headers: vec![
            ("host", b"127.0.0.1:8080"),
            ("accept-encoding", b"identity"),
        ],
        ..get("/waf/items?page=2&limit=20&sort=name")
    };
    let cases: [(&str, waf::Request<'_>, bool); 6] = [
        (
            "get_3_args",
            get("/api/items?page=2&limit=20&sort=name"),
            false,
        ),
        ("get_bare", bare, false),
        (
            "post_json_2k",
            post("/api/items", &small, &small_len),
            false,
        ),
        (
            "post_json_16k",
            post("/api/items", &large, &large_len),
            false,
        ),
        (
            "attack_sqli_get",
            get("/api/items?page=2&q=1%27%20or%20%271%27%3D%271&sort=name"),
            true,
        ),
        ("attack_xss_json", post("/api/content", xss, &xss_len), true),
    ];
    for paranoia in [1, 2] {
        let engine = waf::Engine::new(
            &pack,
            waf::Settings {
                paranoia,
                ..Default::default()
            },
        )
        .unwrap();
        for (name, req, attack) in &cases {
            let report = engine.inspect(req);
            assert_eq!(
                report.blocked().is_some(),
                *attack,
                "{name} at paranoia {paranoia}: rules {:?}",
                report.rule_ids()
            );
            c.bench_function(&format!("inspect/pl{paranoia}/{name}"), |b| {
                b.iter(|| engine.inspect(black_box(req)))
            });
        }
    }
}

/// The floor of inspecting the 16 KiB body (see the module's doc).
fn floor(c: &mut Criterion) {
    let pack = waf::Pack::embedded().unwrap();
    let engine = waf::Engine::new(&pack, waf::Settings::default()).unwrap();
    let body = json_body(16 * 1024);
    let len = body.len().to_string();
    let req = post("/api/items", &body, &len);
    let (values, _) = waf::request::values(
        &req,
        &waf::Limits::default(),
        waf::request::Collections::all(),
    );
    let strings: Vec<_> = values
        .iter()
        .filter(|v| v.origin == waf::request::Origin::Json)
        .collect();
    // Every string on a line of its own, so the rules' anchors keep their meaning (`(?m)`).
    let text: Vec<u8> = strings
        .iter()
        .flat_map(|v| v.bytes.iter().copied().chain([b'\n']))
        .collect();
    let squeezed: Vec<u8> = strings
        .iter()
        .flat_map(|v| {
            let s = waf::transform::Transform::RemoveWhitespace.apply(&v.bytes);
            s.into_owned().into_iter().chain([b'\n'])
        })
        .collect();
    let (mut plain, mut unspaced) = (Vec::new(), Vec::new());
    for rule in engine.rules() {
        let waf::rules::Operator::Regex(pattern) = &rule.operator else {
            continue;
        };
        if !strings.iter().any(|v| rule.reads(v)) {
            continue;
        }
        let into = if rule
            .transforms
            .contains(&waf::transform::Transform::RemoveWhitespace)
        {
            &mut unspaced
        } else {
            &mut plain
        };
        into.push(format!("(?mi){pattern}"));
    }
    // The rules that read line breaks match the text's own: they are left out (the floor
    // only gets lower).
    let misses = |p: &String, text: &[u8]| !regex::bytes::Regex::new(p).unwrap().is_match(text);
    plain.retain(|p| misses(p, &text));
    unspaced.retain(|p| misses(p, &squeezed));
    let set = |patterns: &[String]| {
        regex::bytes::RegexSetBuilder::new(patterns)
            .size_limit(1 << 28)
            .dfa_size_limit(1 << 26)
            .build()
            .unwrap()
    };
    let (plain, unspaced) = (set(&plain), set(&unspaced));
    // A benign body: no pattern matches, so each search reads the whole text.
    assert!(!plain.is_match(&text) && !unspaced.is_match(&squeezed));
    c.bench_function("floor/json_16k_parse", |b| {
        b.iter(|| serde_json::from_slice::<serde::de::IgnoredAny>(black_box(body.as_bytes())))
    });
    c.bench_function(
        &format!("floor/json_16k_one_set_{}_rules", plain.len()),
        |b| b.iter(|| plain.is_match(black_box(&text))),
    );
    c.bench_function(
        &format!("floor/json_16k_unspaced_set_{}_rules", unspaced.len()),
        |b| b.iter(|| unspaced.is_match(black_box(&squeezed))),
    );
}

criterion_group!(benches, inspect, floor);
criterion_main!(benches);
