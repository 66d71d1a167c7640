//! The regression corpus (`tests/data/*.jsonl`): realistic benign API requests must all pass at
//! paranoia 1 with the embedded pack, and at least 95% of the attacks must be blocked.
//! Each line is `{"name": ..., "raw": "<raw HTTP request>"}` (attacks also carry `"category"`).

use std::path::Path;

fn cases(file: &str) -> Vec<(String, String, String)> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data")
        .join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let v: serde_json::Value =
                serde_json::from_str(l).unwrap_or_else(|e| panic!("{file}: {e}: {l}"));
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            (s("name"), s("category"), s("raw"))
        })
        .collect()
}

fn engine() -> waf::Engine {
    let pack = waf::Pack::embedded().unwrap_or_else(|e| panic!("{e}"));
    waf::Engine::new(&pack, waf::Settings::default()).expect("engine")
}

#[test]
fn benign_corpus_passes_at_paranoia_1() {
    let engine = engine();
    let cases = cases("benign.jsonl");
    assert!(cases.len() >= 300, "only {} benign cases", cases.len());
    let mut blocked = Vec::new();
    for (name, _, raw) in &cases {
        let req = waf::raw::parse(raw.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        let report = engine.inspect(&req.as_request());
        if report.blocked().is_some() {
            blocked.push(format!("{name}: rules {:?}", report.rule_ids()));
        }
    }
    assert!(
        blocked.is_empty(),
        "{} of {} benign requests blocked:\n{}",
        blocked.len(),
        cases.len(),
        blocked.join("\n")
    );
}

#[test]
fn attack_corpus_is_blocked_at_paranoia_1() {
    let engine = engine();
    let cases = cases("attacks.jsonl");
    assert!(cases.len() >= 200, "only {} attack cases", cases.len());
    let mut missed = Vec::new();
    for (name, category, raw) in &cases {
        let req = waf::raw::parse(raw.as_bytes()).unwrap_or_else(|e| panic!("{name}: {e}"));
        if engine.inspect(&req.as_request()).blocked().is_none() {
            missed.push(format!(
                "{category} {name}: {}",
                raw.lines().next().unwrap_or("")
            ));
        }
    }
    let tpr = 1.0 - missed.len() as f64 / cases.len() as f64;
    println!(
        "attack TPR {tpr:.3} ({} missed of {}):\n{}",
        missed.len(),
        cases.len(),
        missed.join("\n")
    );
    assert!(
        tpr >= 0.95,
        "attack TPR {tpr:.3} below 0.95; missed:\n{}",
        missed.join("\n")
    );
}
