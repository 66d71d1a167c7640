//! The detector (the `libinjectionrs` crate) against libinjection's own unit tests, as
//! libinjection's test driver runs them: `test-tokens-*` print the SQL tokens, `test-folding-*`
//! the folded tokens, `test-sqli-*` the fingerprint of an input found to be SQLi, and
//! `test-html5-*` the HTML5 tokens.

use std::path::{Path, PathBuf};

use libinjectionrs::sqli::{SqliTokenizer, Token, TokenType};
use libinjectionrs::xss::{Html5Flags, Html5State};
use libinjectionrs::{SqliFlags, SqliState};

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/corpora/libinjection-tests")
}

/// A test file's input (bytes as written, lines joined by `\n`) and expected output.
fn parse(bytes: &[u8]) -> Option<(Vec<u8>, String)> {
    let mut section = "";
    let (mut input, mut expected) = (Vec::<&[u8]>::new(), Vec::<String>::new());
    for line in bytes.split(|&b| b == b'\n') {
        let text = String::from_utf8_lossy(line);
        let marker = text.trim();
        match marker {
            "--TEST--" => section = "",
            "--INPUT--" => section = "--INPUT--",
            "--EXPECTED--" => section = "--EXPECTED--",
            _ => {}
        }
        if matches!(marker, "--TEST--" | "--INPUT--" | "--EXPECTED--") {
            continue;
        }
        match section {
            "--INPUT--" => input.push(line),
            "--EXPECTED--" if !marker.is_empty() => expected.push(text.trim_end().to_string()),
            _ => {}
        }
    }
    (section == "--EXPECTED--").then(|| (input.join(&b'\n'), expected.join("\n")))
}

fn token_text(t: &Token) -> String {
    let value = match t.token_type {
        TokenType::String => {
            let mut s = String::new();
            if t.str_open != 0 {
                s.push(t.str_open as char);
            }
            s.push_str(t.value_as_str());
            if t.str_close != 0 {
                s.push(t.str_close as char);
            }
            s
        }
        // A quoted variable: its `@`s, then the quoted name.
        TokenType::Variable if t.str_open != 0 => {
            let mut s = "@".repeat(usize::try_from(t.count).unwrap_or(0));
            s.push(t.str_open as char);
            s.push_str(t.value_as_str());
            if t.str_close != 0 {
                s.push(t.str_close as char);
            }
            s
        }
        _ => t.value_as_str().to_string(),
    };
    if value.is_empty() {
        t.token_type.to_char().to_string()
    } else {
        format!("{} {value}", t.token_type.to_char())
    }
}

fn tokens(input: &[u8]) -> String {
    let mut tok = SqliTokenizer::new(input, SqliFlags::FLAG_SQL_ANSI);
    let mut out = Vec::new();
    while let Some(t) = tok.next_token() {
        out.push(token_text(&t));
    }
    out.join("\n")
}

fn folding(input: &[u8]) -> String {
    let mut state = SqliState::new(input, SqliFlags::FLAG_NONE);
    let n = state.fold_tokens();
    state.tokens[..n]
        .iter()
        .map(token_text)
        .collect::<Vec<_>>()
        .join("\n")
}

fn sqli(input: &[u8]) -> String {
    let mut state = SqliState::new(input, SqliFlags::FLAG_NONE);
    if state.detect() {
        state.fingerprint_string()
    } else {
        String::new()
    }
}

fn html5(input: &[u8]) -> String {
    let mut state = Html5State::new(input, Html5Flags::DataState);
    let mut out = Vec::new();
    while state.next() {
        let data = String::from_utf8_lossy(&state.token_start[..state.token_len]);
        out.push(format!("{},{},{data}", state.token_type, state.token_len));
    }
    out.join("\n")
}

#[test]
fn the_detector_passes_libinjection_s_unit_tests() {
    let dir = corpus();
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .filter_map(|e| Some(e.ok()?.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "txt"))
        .collect();
    files.sort();
    let (mut ran, mut failures) = (std::collections::BTreeMap::new(), Vec::new());
    for path in &files {
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let run: fn(&[u8]) -> String = if name.starts_with("test-tokens-") {
            tokens
        } else if name.starts_with("test-folding-") {
            folding
        } else if name.starts_with("test-sqli-") {
            sqli
        } else if name.starts_with("test-html5-") {
            html5
        } else {
            panic!("{name}: a test file of an unknown kind");
        };
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        let (input, expected) = parse(&bytes).unwrap_or_else(|| panic!("{name}: no EXPECTED"));
        let kind = name.split('-').nth(1).unwrap_or("").to_string();
        *ran.entry(kind).or_insert(0) += 1;
        // Lines compare without trailing blanks: the files' editors trimmed some.
        let actual = run(&input);
        let actual = actual
            .lines()
            .map(str::trim_end)
            .collect::<Vec<_>>()
            .join("\n");
        if actual != expected {
            failures.push(format!(
                "{name}: input {:?}\nexpected:\n{expected}\nactual:\n{actual}",
                String::from_utf8_lossy(&input)
            ));
        }
    }
    println!("libinjection tests run: {ran:?}");
    assert!(
        files.len() > 400,
        "only {} test files in {}",
        files.len(),
        dir.display()
    );
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n\n")
    );
}
