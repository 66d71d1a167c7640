//! The rule pack: rule files (`config/waf/*.toml`) parsed and checked, every error at once and
//! each naming its file and rule id. A rule names what it inspects (targets), how the value is
//! transformed first, and one operator; and it carries the tests that prove it.

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use serde::Deserialize;

use crate::request::{Collection, Origin, Value};
use crate::transform::Transform;

/// The pack shipped in the binary: `config/waf/*.toml`.
pub const EMBEDDED: &[(&str, &str)] = &[
    (
        "913-scanner.toml",
        include_str!("../../config/waf/913-scanner.toml"),
    ),
    (
        "920-protocol.toml",
        include_str!("../../config/waf/920-protocol.toml"),
    ),
    (
        "930-lfi.toml",
        include_str!("../../config/waf/930-lfi.toml"),
    ),
    (
        "931-rfi.toml",
        include_str!("../../config/waf/931-rfi.toml"),
    ),
    (
        "932-rce.toml",
        include_str!("../../config/waf/932-rce.toml"),
    ),
    (
        "933-php.toml",
        include_str!("../../config/waf/933-php.toml"),
    ),
    (
        "934-generic.toml",
        include_str!("../../config/waf/934-generic.toml"),
    ),
    (
        "941-xss.toml",
        include_str!("../../config/waf/941-xss.toml"),
    ),
    (
        "942-sqli.toml",
        include_str!("../../config/waf/942-sqli.toml"),
    ),
    (
        "943-session.toml",
        include_str!("../../config/waf/943-session.toml"),
    ),
    (
        "944-java.toml",
        include_str!("../../config/waf/944-java.toml"),
    ),
];

/// What a rule detects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Category {
    Sqli,
    Xss,
    Lfi,
    Rfi,
    Rce,
    Php,
    Java,
    Protocol,
    Scanner,
    Session,
    Generic,
}

impl Category {
    pub const ALL: [Category; 11] = [
        Category::Sqli,
        Category::Xss,
        Category::Lfi,
        Category::Rfi,
        Category::Rce,
        Category::Php,
        Category::Java,
        Category::Protocol,
        Category::Scanner,
        Category::Session,
        Category::Generic,
    ];

    /// The name configs, labels and reasons use.
    pub fn name(self) -> &'static str {
        match self {
            Category::Sqli => "sqli",
            Category::Xss => "xss",
            Category::Lfi => "lfi",
            Category::Rfi => "rfi",
            Category::Rce => "rce",
            Category::Php => "php",
            Category::Java => "java",
            Category::Protocol => "protocol",
            Category::Scanner => "scanner",
            Category::Session => "session",
            Category::Generic => "generic",
        }
    }

    /// The category named `name`.
    pub fn parse(name: &str) -> Option<Category> {
        Category::ALL.into_iter().find(|c| c.name() == name)
    }
}

impl fmt::Display for Category {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// How much a match adds to the anomaly score.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    Error,
    Warning,
    Notice,
}

impl Severity {
    /// The score a match adds (CRS's defaults: 5, 4, 3, 2).
    pub fn score(self) -> u32 {
        match self {
            Severity::Critical => 5,
            Severity::Error => 4,
            Severity::Warning => 3,
            Severity::Notice => 2,
        }
    }
}

/// A libinjection-class detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Detector {
    Sqli,
    Xss,
}

/// A check of the request as a whole (protocol rules).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Check {
    /// No `Host` header (HTTP/1.1 requires one).
    MissingHost,
    /// More than one `Host` header.
    DuplicateHost,
    /// Both `Content-Length` and `Transfer-Encoding`.
    LengthAndChunked,
    /// More than one `Content-Length`, or one that is not a number.
    BadContentLength,
    /// A body that does not parse as its declared type.
    BodyUnparsed,
    /// A GET or HEAD that carries a body (a length above 0, or chunked).
    BodyOnGet,
    /// A body without a `Content-Type`.
    BodyWithoutType,
    /// More arguments than `Limits::max_args`.
    TooManyArgs,
    /// More header lines than `Limits::max_headers`.
    TooManyHeaders,
    /// More values than `Limits::max_values`: the rest could not be inspected.
    TooManyValues,
}

/// The tests a rule carries: values put in its first target (`attack`, `benign`), or whole
/// raw HTTP requests (`attack_http`, `benign_http`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tests {
    #[serde(default)]
    pub attack: Vec<String>,
    #[serde(default)]
    pub benign: Vec<String>,
    #[serde(default)]
    pub attack_http: Vec<String>,
    #[serde(default)]
    pub benign_http: Vec<String>,
}

/// A rule as written in a rule file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleDef {
    pub id: u32,
    pub message: String,
    pub category: Category,
    pub paranoia: u8,
    pub severity: Severity,
    #[serde(default)]
    pub targets: Vec<String>,
    #[serde(default)]
    pub transforms: Vec<Transform>,
    /// A regular expression (the `regex` crate's syntax: linear time, no look-around).
    pub regex: Option<String>,
    /// Phrases, any of which matches (ASCII case-insensitive).
    pub phrases: Option<Vec<String>>,
    /// Phrases that match only as whole words (not inside a longer word).
    #[serde(default)]
    pub words: bool,
    pub detect: Option<Detector>,
    /// The value is longer than this many bytes.
    pub length_gt: Option<usize>,
    /// The value holds a byte outside these inclusive ranges (`[[32, 126], [128, 255]]`).
    pub byte_ranges: Option<Vec<[u8; 2]>>,
    /// The value is an address inside one of these networks.
    pub ip_match: Option<Vec<IpNet>>,
    pub check: Option<Check>,
    /// The rule reads only values holding at least one of these bytes (the characters an
    /// attack of its class cannot do without): prose without them is never matched.
    pub needs_any_of: Option<String>,
    #[serde(default)]
    pub tests: Tests,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleFile {
    #[serde(default, rename = "rule")]
    rules: Vec<RuleDef>,
}

/// What a rule does with a value.
#[derive(Debug, Clone)]
pub enum Operator {
    Regex(String),
    Phrases { list: Vec<String>, words: bool },
    Detect(Detector),
    LengthGt(usize),
    ByteRanges(Vec<[u8; 2]>),
    IpMatch(Vec<IpNet>),
    Check(Check),
}

/// Which values a rule reads: a collection, maybe one key of it, maybe only JSON values.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    pub collection: Collection,
    pub key: Option<String>,
    pub json_only: bool,
}

impl Selector {
    /// `args`, `args:id`, `headers:user-agent`, `json:body.content`.
    pub fn parse(s: &str) -> Result<Selector, String> {
        let (coll, key) = match s.split_once(':') {
            Some((c, k)) if !k.is_empty() => (c, Some(k)),
            Some(_) => return Err(format!("target `{s}` has an empty key")),
            None => (s, None),
        };
        if coll == "json" {
            let Some(key) = key else {
                return Err("target `json` needs a path: `json:body.NAME`".into());
            };
            if key != "body" && !key.starts_with("body.") {
                return Err(format!("target `{s}`: a JSON path starts with `body`"));
            }
            return Ok(Selector {
                collection: Collection::Args,
                key: Some(key.to_string()),
                json_only: true,
            });
        }
        let collection =
            Collection::parse(coll).ok_or_else(|| format!("unknown target `{coll}`"))?;
        let key = key.map(|k| {
            if collection == Collection::Headers {
                k.to_ascii_lowercase()
            } else {
                k.to_string()
            }
        });
        Ok(Selector {
            collection,
            key,
            json_only: false,
        })
    }

    /// Whether value `v` is one this selector reads.
    pub fn selects(&self, v: &Value<'_>) -> bool {
        if v.collection != self.collection || (self.json_only && v.origin != Origin::Json) {
            return false;
        }
        match &self.key {
            None => true,
            Some(k) if self.collection == Collection::Headers => v.key.eq_ignore_ascii_case(k),
            Some(k) if self.json_only => {
                // `json:body.a` also covers what is inside `a`.
                v.key.as_ref() == k
                    || (v.key.starts_with(k.as_str())
                        && v.key.as_bytes().get(k.len()) == Some(&b'.'))
            }
            Some(k) => v.key.as_ref() == k,
        }
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (&self.key, self.json_only) {
            (Some(k), true) => write!(f, "json:{k}"),
            (Some(k), false) => write!(f, "{}:{k}", self.collection.name()),
            (None, _) => f.write_str(self.collection.name()),
        }
    }
}

/// A checked rule.
#[derive(Debug, Clone)]
pub struct Rule {
    pub id: u32,
    pub message: String,
    pub category: Category,
    pub paranoia: u8,
    pub severity: Severity,
    /// What it reads.
    pub targets: Vec<Selector>,
    /// What it never reads, even where a target would (`!headers:cookie`).
    pub except: Vec<Selector>,
    pub transforms: Vec<Transform>,
    pub operator: Operator,
    /// See [`RuleDef::needs_any_of`].
    pub needs_any_of: Option<Vec<u8>>,
    pub tests: Tests,
    /// The file it came from.
    pub file: String,
}

impl Rule {
    /// Whether `value` (transformed) holds a byte the rule needs, if it names any.
    pub fn wants(&self, value: &[u8]) -> bool {
        self.needs_any_of
            .as_deref()
            .is_none_or(|needs| value.iter().any(|b| needs.contains(b)))
    }

    /// Whether this rule reads value `v`.
    pub fn reads(&self, v: &Value<'_>) -> bool {
        self.targets.iter().any(|s| s.selects(v)) && !self.except.iter().any(|s| s.selects(v))
    }

    /// Whether `ip` is inside the rule's networks.
    pub fn ip_matches(nets: &[IpNet], ip: IpAddr) -> bool {
        nets.iter().any(|n| n.contains(&ip))
    }
}

/// A rule file's error: the file, the rule (when one is to blame) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}{}: {message}", rule.map(|r| format!(", rule {r}")).unwrap_or_default())]
pub struct RuleError {
    pub file: String,
    pub rule: Option<u32>,
    pub message: String,
}

/// Every error of a pack, at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct PackError(pub Vec<RuleError>);

/// A checked set of rules.
#[derive(Debug, Clone)]
pub struct Pack {
    pub rules: Vec<Rule>,
}

impl Pack {
    /// The pack shipped in the binary.
    pub fn embedded() -> Result<Pack, PackError> {
        Pack::from_sources(
            EMBEDDED
                .iter()
                .map(|&(f, t)| (f.to_string(), t.to_string())),
        )
    }

    /// A pack from `(file name, text)` pairs.
    pub fn from_sources(
        files: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Pack, PackError> {
        let mut errors = Vec::new();
        let mut rules = Vec::new();
        let mut seen = HashSet::new();
        for (file, text) in files {
            let parsed: RuleFile = match toml::from_str(&text) {
                Ok(p) => p,
                Err(e) => {
                    errors.push(RuleError {
                        file: file.clone(),
                        rule: None,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            for def in parsed.rules {
                let id = def.id;
                let fail = |message: String| RuleError {
                    file: file.clone(),
                    rule: Some(id),
                    message,
                };
                if !seen.insert(id) {
                    errors.push(fail("the id is used by another rule".into()));
                    continue;
                }
                match check_rule(def, &file) {
                    Ok(rule) => rules.push(rule),
                    Err(msgs) => errors.extend(msgs.into_iter().map(fail)),
                }
            }
        }
        if errors.is_empty() {
            rules.sort_by_key(|r| r.id);
            Ok(Pack { rules })
        } else {
            Err(PackError(errors))
        }
    }

    /// The rule with id `id`.
    pub fn rule(&self, id: u32) -> Option<&Rule> {
        self.rules.iter().find(|r| r.id == id)
    }
}

fn check_rule(def: RuleDef, file: &str) -> Result<Rule, Vec<String>> {
    let mut errors = Vec::new();
    if !(1..=4).contains(&def.paranoia) {
        errors.push(format!("`paranoia` is {}: it must be 1 to 4", def.paranoia));
    }
    let mut ops = Vec::new();
    if let Some(r) = def.regex {
        if let Err(e) = regex::bytes::RegexBuilder::new(&r)
            .size_limit(1 << 22)
            .build()
        {
            errors.push(format!("`regex` does not compile: {e}"));
        }
        ops.push(Operator::Regex(r));
    }
    if let Some(list) = def.phrases {
        if list.is_empty() || list.iter().any(String::is_empty) {
            errors.push("`phrases` must hold phrases, none empty".into());
        }
        ops.push(Operator::Phrases {
            list,
            words: def.words,
        });
    }
    if let Some(d) = def.detect {
        ops.push(Operator::Detect(d));
    }
    if let Some(n) = def.length_gt {
        ops.push(Operator::LengthGt(n));
    }
    if let Some(r) = def.byte_ranges {
        if r.iter().any(|[lo, hi]| lo > hi) {
            errors.push("`byte_ranges`: each range is [low, high]".into());
        }
        ops.push(Operator::ByteRanges(r));
    }
    if let Some(n) = def.ip_match {
        ops.push(Operator::IpMatch(n));
    }
    if let Some(c) = def.check {
        ops.push(Operator::Check(c));
    }
    if ops.len() != 1 {
        errors.push(format!(
            "a rule has one operator (regex, phrases, detect, length_gt, byte_ranges, ip_match or check); this one has {}",
            ops.len()
        ));
    }
    let is_check = matches!(ops.first(), Some(Operator::Check(_)));
    let mut targets = Vec::new();
    let mut except = Vec::new();
    for t in &def.targets {
        let (neg, s) = match t.strip_prefix('!') {
            Some(s) => (true, s),
            None => (false, t.as_str()),
        };
        match Selector::parse(s) {
            Ok(sel) if neg => except.push(sel),
            Ok(sel) => targets.push(sel),
            Err(e) => errors.push(e),
        }
    }
    if is_check != targets.is_empty() {
        errors.push(if is_check {
            "a `check` rule reads the whole request: it has no targets".into()
        } else {
            "`targets` is empty: name what the rule reads (args, headers:user-agent, ...)".into()
        });
    }
    if def.needs_any_of.as_deref() == Some("") {
        errors.push("`needs_any_of` is empty: the rule would never run".into());
    }
    let t = &def.tests;
    if t.attack.is_empty() && t.attack_http.is_empty() {
        errors.push("no attack test: add `tests.attack` (or `attack_http`)".into());
    }
    if t.benign.is_empty() && t.benign_http.is_empty() {
        errors.push("no benign test: add `tests.benign` (or `benign_http`)".into());
    }
    if is_check && !(t.attack.is_empty() && t.benign.is_empty()) {
        errors.push(
            "a `check` rule is tested with whole requests: `attack_http`, `benign_http`".into(),
        );
    }
    if !errors.is_empty() {
        return Err(errors);
    }
    Ok(Rule {
        id: def.id,
        message: def.message,
        category: def.category,
        paranoia: def.paranoia,
        severity: def.severity,
        targets,
        except,
        transforms: def.transforms,
        operator: ops.remove(0),
        needs_any_of: def.needs_any_of.map(String::into_bytes),
        tests: def.tests,
        file: file.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_pack_loads() {
        let pack = Pack::embedded().unwrap_or_else(|e| panic!("{e}"));
        assert!(pack.rules.len() >= 150, "{} rules", pack.rules.len());
    }

    #[test]
    fn the_embedded_list_is_the_folder() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/waf");
        let mut on_disk: Vec<String> = std::fs::read_dir(dir)
            .unwrap_or_else(|e| panic!("{dir}: {e}"))
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.ends_with(".toml"))
            .collect();
        on_disk.sort();
        let embedded: Vec<String> = EMBEDDED.iter().map(|(f, _)| f.to_string()).collect();
        assert_eq!(on_disk, embedded);
    }

    #[test]
    fn every_error_names_its_file_and_rule() {
        let bad = r#"
[[rule]]
id = 1
message = "m"
category = "sqli"
paranoia = 7
severity = "critical"
targets = ["args", "nowhere"]
regex = "(unclosed"
[[rule]]
id = 1
message = "dup"
category = "sqli"
paranoia = 1
severity = "critical"
targets = ["args"]
regex = "x"
tests = { attack = ["x"], benign = ["y"] }
"#;
        let err = Pack::from_sources([("bad.toml".to_string(), bad.to_string())]).unwrap_err();
        let text = err.to_string();
        for want in [
            "bad.toml, rule 1: `paranoia` is 7",
            "bad.toml, rule 1: unknown target `nowhere`",
            "bad.toml, rule 1: `regex` does not compile",
            "bad.toml, rule 1: no attack test",
            "bad.toml, rule 1: the id is used by another rule",
        ] {
            assert!(text.contains(want), "{want} not in:\n{text}");
        }
        let unknown = "[[rule]]\nid = 2\nfoo = 1\n";
        let err = Pack::from_sources([("u.toml".to_string(), unknown.to_string())]).unwrap_err();
        let text = err.to_string();
        assert!(
            text.starts_with("u.toml: ") && text.contains("unknown field `foo`"),
            "{text}"
        );
    }

    #[test]
    fn selectors() {
        let s = Selector::parse("json:body.content").unwrap();
        let v = Value {
            collection: Collection::Args,
            origin: Origin::Json,
            key: "body.content.0".into(),
            bytes: b"x"[..].into(),
        };
        assert!(s.selects(&v));
        let q = Value {
            origin: Origin::Query,
            ..v.clone()
        };
        assert!(!s.selects(&q));
        assert!(
            Selector::parse("headers:User-Agent")
                .unwrap()
                .selects(&Value {
                    collection: Collection::Headers,
                    origin: Origin::Other,
                    key: "user-agent".into(),
                    bytes: b"x"[..].into(),
                })
        );
        assert!(Selector::parse("json").is_err());
        assert!(Selector::parse("bogus").is_err());
    }
}
