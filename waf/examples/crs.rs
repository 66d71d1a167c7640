//! Scores the pack offline on the CRS cases (see `crs_requests.py`): per family, the share of
//! attacks it blocks and of benign cases it blocks, at paranoia 1. Rule tuning runs this; the
//! figure that counts is `replay_crs.py` against a running proxy.
//!
//!   cargo run -p vigil-waf --example crs -- /tmp/crs.jsonl [--show FAMILY] [--paranoia N]
//!       [--dir config/waf] [--selftest]
//!
//! `--dir` reads the rule files from that folder at run time (no rebuild while tuning);
//! `--selftest` also runs every rule's own tests.

use std::collections::BTreeMap;

use base64::Engine as _;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let file = args
        .first()
        .expect("usage: crs CASES.jsonl [--show FAMILY] [--paranoia N] [--dir D] [--selftest]");
    let flag = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1).cloned())
    };
    let show = flag("--show");
    let paranoia = flag("--paranoia").map_or(1, |p| p.parse().expect("--paranoia N"));
    let pack = match flag("--dir") {
        Some(dir) => {
            let mut files: Vec<(String, String)> = std::fs::read_dir(&dir)
                .expect("--dir")
                .filter_map(|e| {
                    let p = e.ok()?.path();
                    let name = p.file_name()?.to_str()?.to_string();
                    name.ends_with(".toml")
                        .then(|| (name, std::fs::read_to_string(&p).expect("rule file")))
                })
                .collect();
            files.sort();
            waf::Pack::from_sources(files)
        }
        None => waf::Pack::embedded(),
    };
    let pack = pack.unwrap_or_else(|e| {
        eprintln!("{e}");
        std::process::exit(2)
    });
    if args.iter().any(|a| a == "--selftest") {
        for f in waf::selftest::run(&pack) {
            println!("SELFTEST {} rule {}: {}: {}", f.file, f.rule, f.test, f.why);
        }
    }
    let engine = waf::Engine::new(
        &pack,
        waf::Settings {
            paranoia,
            ..waf::Settings::default()
        },
    )
    .expect("engine");
    let mut tally: BTreeMap<String, [usize; 4]> = BTreeMap::new();
    for line in std::fs::read_to_string(file).expect("cases").lines() {
        let c: serde_json::Value = serde_json::from_str(line).expect("json");
        let fam = c["family"].as_str().unwrap_or("").to_string();
        let attack = c["kind"] == "attack";
        let raw = base64::engine::general_purpose::STANDARD
            .decode(c["raw"].as_str().unwrap_or(""))
            .expect("base64");
        let (blocked, why) = match waf::raw::parse(&raw) {
            Ok(req) => {
                let report = engine.inspect(&req.as_request());
                let ids = report.rule_ids();
                (
                    report.blocked().is_some(),
                    format!("score {} {ids:?}", report.score),
                )
            }
            // Malformed: the proxy's parser refuses it before the WAF; protocol families count that.
            Err(e) => (fam == "920" || fam == "921", format!("parse: {e}")),
        };
        for f in [fam.as_str(), "ALL"] {
            let t = tally.entry(f.to_string()).or_default();
            let k = if attack { 0 } else { 2 };
            t[k] += 1;
            t[k + 1] += usize::from(blocked);
        }
        if show.as_deref() == Some(fam.as_str()) && (attack != blocked) {
            let text = String::from_utf8_lossy(&raw);
            let text: String = text.chars().take(600).collect();
            println!(
                "--- {} {} {why}\n{text}\n",
                c["id"].as_str().unwrap_or(""),
                if attack { "MISSED" } else { "FALSE POSITIVE" }
            );
        }
    }
    println!(
        "{:8} {:>8} {:>7} {:>7} {:>7}",
        "family", "attacks", "TPR", "benign", "FPR"
    );
    for (f, [a, ab, b, bb]) in tally
        .iter()
        .filter(|(f, _)| *f != "ALL")
        .chain(tally.get_key_value("ALL"))
    {
        let r = |x: usize, n: usize| {
            if n == 0 {
                f64::NAN
            } else {
                x as f64 / n as f64
            }
        };
        println!("{f:8} {a:8} {:7.3} {b:7} {:7.3}", r(*ab, *a), r(*bb, *b));
    }
}
