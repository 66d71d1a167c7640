//! The WAF crate's integration tests: the shipped pack's own rule tests, and the detector
//! against libinjection's unit tests (`../shared/corpora/libinjection-tests/`).

mod corpus;
mod libinjection;

#[test]
fn every_rule_of_the_shipped_pack_passes_its_own_tests() {
    let pack = waf::Pack::embedded().unwrap_or_else(|e| panic!("{e}"));
    let failures = waf::selftest::run(&pack);
    let text: Vec<String> = failures
        .iter()
        .map(|f| format!("{} rule {}: {}: {}", f.file, f.rule, f.test, f.why))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failures:\n{}",
        failures.len(),
        text.join("\n")
    );
}
