//! The compiled engine: a pack cut to one route's paranoia level and exclusions, with every
//! rule grouped by its transformation chain. For each value, each chain is applied once and
//! its rules run together: the regular expressions as one `RegexSet`, the phrases as one
//! Aho-Corasick automaton, then the detectors and numeric checks.

use std::collections::HashMap;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use regex::bytes::{RegexSet, RegexSetBuilder};
use serde::Deserialize;

use crate::request::{self, Collection, Collections, Facts, Request, Value};
use crate::rules::{Category, Check, Detector, Operator, Pack, Rule, Selector};
use crate::transform::Transform;

/// Bounds on what one request makes the engine do.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Values inspected per request (arguments, headers, cookies, JSON strings...).
    pub max_values: usize,
    /// JSON nesting inspected.
    pub max_json_depth: usize,
    /// Arguments before the `too_many_args` check fires.
    pub max_args: usize,
    /// Header lines before the `too_many_headers` check fires.
    pub max_headers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_values: 2048,
            max_json_depth: 32,
            max_args: 512,
            max_headers: 100,
        }
    }
}

/// Switch rules off where a route needs it: by id, by category, or for some targets only,
/// everywhere or under a path prefix.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclusion {
    /// Only requests whose path starts with this.
    pub path_prefix: Option<String>,
    /// These rules (none: every rule of `categories`, or every rule).
    #[serde(default)]
    pub rules: Vec<u32>,
    /// The rules of these categories.
    #[serde(default)]
    pub categories: Vec<String>,
    /// Only these targets (`args:password`, `json:body.content`); none: every target.
    #[serde(default)]
    pub targets: Vec<String>,
}

/// How one route runs the engine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Rules up to this paranoia level run (1-4).
    pub paranoia: u8,
    /// The anomaly score at which a request is refused.
    pub threshold: u32,
    pub exclusions: Vec<Exclusion>,
    pub limits: Limits,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            paranoia: 1,
            threshold: 5,
            exclusions: Vec::new(),
            limits: Limits::default(),
        }
    }
}

/// An exclusion, checked against the pack.
#[derive(Debug, Clone)]
struct Except {
    path_prefix: Option<String>,
    /// Rule indexes (into `Engine::rules`) it covers; `None`: every rule.
    rules: Option<Vec<usize>>,
    targets: Vec<Selector>,
}

/// One transformation chain and the rules that read through it.
#[derive(Debug)]
struct Chain {
    transforms: Vec<Transform>,
    /// The step (see [`Step`]) whose output this chain reads; `None`: the value as it is.
    step: Option<usize>,
    /// The collections any of its rules read: other values skip the chain.
    reads: Collections,
    /// The distinct selectors of its rules: a value none of them selects skips the chain.
    selectors: Vec<Selector>,
    regex: Option<(RegexSet, Vec<usize>)>,
    phrases: Option<(AhoCorasick, Vec<usize>, Vec<bool>)>,
    /// Rules with another operator.
    others: Vec<usize>,
}

/// One transformation applied to the output of an earlier step (or to the value): the chains'
/// common prefixes, so `url_decode` then `html_entity_decode` runs once per value however many
/// chains start with them. Steps come after their parents.
#[derive(Debug, Clone, Copy)]
struct Step {
    parent: Option<usize>,
    transform: Transform,
}

/// A step's output for one value: unchanged from its input, or new bytes.
enum Out {
    Same,
    New(Vec<u8>),
}

/// The steps' outputs for one value, computed on demand, each at most once.
struct Outs<'s> {
    steps: &'s [Step],
    outs: Vec<Option<Out>>,
}

impl<'s> Outs<'s> {
    fn new(steps: &'s [Step]) -> Self {
        Outs {
            steps,
            outs: Vec::with_capacity(steps.len()),
        }
    }

    fn reset(&mut self) {
        self.outs.clear();
        self.outs.resize_with(self.steps.len(), || None);
    }

    /// The bytes step `at` (or the value itself, for `None`) gives.
    fn get<'v>(&'v mut self, at: Option<usize>, value: &'v [u8]) -> &'v [u8] {
        let Some(at) = at else { return value };
        self.fill(at, value);
        self.resolve(at, value)
    }

    fn fill(&mut self, at: usize, value: &[u8]) {
        if self.outs[at].is_some() {
            return;
        }
        let step = self.steps[at];
        if let Some(p) = step.parent {
            self.fill(p, value);
        }
        let input = self.resolve_opt(step.parent, value);
        let out = match step.transform.apply(input) {
            std::borrow::Cow::Borrowed(_) => Out::Same,
            std::borrow::Cow::Owned(v) => Out::New(v),
        };
        self.outs[at] = Some(out);
    }

    fn resolve_opt<'v>(&'v self, at: Option<usize>, value: &'v [u8]) -> &'v [u8] {
        match at {
            Some(at) => self.resolve(at, value),
            None => value,
        }
    }

    fn resolve<'v>(&'v self, mut at: usize, value: &'v [u8]) -> &'v [u8] {
        loop {
            match &self.outs[at] {
                Some(Out::New(v)) => return v,
                _ => match self.steps[at].parent {
                    Some(p) => at = p,
                    None => return value,
                },
            }
        }
    }
}

/// The compiled engine for one route.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    chains: Vec<Chain>,
    /// Per collection (`Collection as usize`), the chains that read it, in chain order, each
    /// with whether a value must pass its selectors (a chain that reads the whole collection
    /// takes every value of it).
    by_collection: Vec<Vec<(usize, bool)>>,
    steps: Vec<Step>,
    checks: Vec<usize>,
    excepts: Vec<Except>,
    settings: Settings,
}

/// One rule that matched: where, on what, and what it adds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub rule: u32,
    pub category: Category,
    pub message: String,
    pub score: u32,
    /// The value it matched (`args:id`, `headers:user-agent`, `request` for checks).
    pub target: String,
    /// The transformed value, shortened to 80 bytes.
    pub value: String,
}

/// What the engine found in one request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    pub matches: Vec<Match>,
    pub score: u32,
    pub threshold: u32,
    pub facts: Facts,
}

impl Report {
    /// `Some(reason)` when the request is to be refused: the category when that category alone
    /// reached the threshold, else `anomaly_score`.
    pub fn blocked(&self) -> Option<&'static str> {
        if self.score < self.threshold {
            return None;
        }
        let mut by_cat: Vec<(Category, u32)> = Vec::new();
        for m in &self.matches {
            match by_cat.iter_mut().find(|(c, _)| *c == m.category) {
                Some((_, s)) => *s += m.score,
                None => by_cat.push((m.category, m.score)),
            }
        }
        let alone = by_cat
            .iter()
            .filter(|(_, s)| *s >= self.threshold)
            .max_by_key(|(_, s)| *s);
        Some(alone.map_or("anomaly_score", |(c, _)| c.name()))
    }

    /// The matched rule ids, in order of matching.
    pub fn rule_ids(&self) -> Vec<u32> {
        self.matches.iter().map(|m| m.rule).collect()
    }
}

/// A route's settings that do not fit the pack.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct SettingsError(pub Vec<String>);

impl Engine {
    /// `pack` compiled for `settings`.
    pub fn new(pack: &Pack, settings: Settings) -> Result<Engine, SettingsError> {
        let mut errors = Vec::new();
        if !(1..=4).contains(&settings.paranoia) {
            errors.push(format!(
                "paranoia is {}: it must be 1 to 4",
                settings.paranoia
            ));
        }
        if settings.threshold == 0 {
            errors.push("threshold is 0: every request would be refused".into());
        }
        let rules: Vec<Rule> = pack
            .rules
            .iter()
            .filter(|r| r.paranoia <= settings.paranoia)
            .cloned()
            .collect();
        let mut excepts = Vec::new();
        for (i, x) in settings.exclusions.iter().enumerate() {
            match except(pack, &rules, x) {
                Ok(e) => excepts.push(e),
                Err(e) => errors.push(format!("exclusions[{i}]: {e}")),
            }
        }
        if !errors.is_empty() {
            return Err(SettingsError(errors));
        }
        // An exclusion for every path and target takes its rules out of the engine at once.
        let dropped: Vec<usize> = excepts
            .iter()
            .filter(|e| e.path_prefix.is_none() && e.targets.is_empty())
            .flat_map(|e| {
                e.rules
                    .clone()
                    .unwrap_or_else(|| (0..rules.len()).collect())
            })
            .collect();
        let mut chains: Vec<Chain> = Vec::new();
        // Rules group by transformation chain; rules that read only named values (one header,
        // one argument) group apart, by those names, so other values never scan their patterns.
        let mut by_chain: HashMap<(Vec<Transform>, Vec<String>), usize> = HashMap::new();
        let mut checks = Vec::new();
        let mut members: Vec<Vec<usize>> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            if dropped.contains(&i) {
                continue;
            }
            if matches!(rule.operator, Operator::Check(_)) {
                checks.push(i);
                continue;
            }
            let narrow: Vec<String> = if rule.targets.iter().all(|t| t.key.is_some()) {
                let mut names: Vec<String> = rule.targets.iter().map(ToString::to_string).collect();
                names.sort();
                names
            } else {
                Vec::new()
            };
            let key = (rule.transforms.clone(), narrow);
            let c = *by_chain.entry(key).or_insert_with(|| {
                chains.push(Chain {
                    transforms: rule.transforms.clone(),
                    step: None,
                    reads: Collections::default(),
                    selectors: Vec::new(),
                    regex: None,
                    phrases: None,
                    others: Vec::new(),
                });
                members.push(Vec::new());
                chains.len() - 1
            });
            for t in &rule.targets {
                chains[c].reads.insert(t.collection);
                if !chains[c].selectors.contains(t) {
                    chains[c].selectors.push(t.clone());
                }
            }
            members[c].push(i);
        }
        let mut steps: Vec<Step> = Vec::new();
        let mut by_prefix: HashMap<Vec<Transform>, usize> = HashMap::new();
        for chain in &mut chains {
            let mut parent = None;
            for k in 1..=chain.transforms.len() {
                let prefix = chain.transforms[..k].to_vec();
                let id = *by_prefix.entry(prefix).or_insert_with(|| {
                    steps.push(Step {
                        parent,
                        transform: chain.transforms[k - 1],
                    });
                    steps.len() - 1
                });
                parent = Some(id);
            }
            chain.step = parent;
        }
        for (chain, members) in chains.iter_mut().zip(members) {
            let (mut pats, mut pat_rules) = (Vec::new(), Vec::new());
            let (mut phrases, mut phrase_rules, mut phrase_words) =
                (Vec::new(), Vec::new(), Vec::new());
            for i in members {
                match &rules[i].operator {
                    Operator::Regex(r) => {
                        pats.push(r.clone());
                        pat_rules.push(i);
                    }
                    Operator::Phrases { list, words } => {
                        for p in list {
                            phrases.push(p.clone());
                            phrase_rules.push(i);
                            phrase_words.push(*words);
                        }
                    }
                    _ => chain.others.push(i),
                }
            }
            if !pats.is_empty() {
                let set = RegexSetBuilder::new(&pats)
                    .size_limit(1 << 26)
                    .dfa_size_limit(1 << 24)
                    .build()
                    .map_err(|e| SettingsError(vec![format!("the rules' regex set: {e}")]))?;
                chain.regex = Some((set, pat_rules));
            }
            if !phrases.is_empty() {
                let ac = AhoCorasickBuilder::new()
                    .ascii_case_insensitive(true)
                    .match_kind(MatchKind::Standard)
                    .build(&phrases)
                    .map_err(|e| SettingsError(vec![format!("the rules' phrases: {e}")]))?;
                chain.phrases = Some((ac, phrase_rules, phrase_words));
            }
        }
        let by_collection = Collection::ALL
            .iter()
            .map(|&c| {
                chains
                    .iter()
                    .enumerate()
                    .filter(|(_, chain)| chain.reads.contains(c))
                    .map(|(i, chain)| {
                        let whole = chain
                            .selectors
                            .iter()
                            .any(|s| s.collection == c && s.key.is_none() && !s.json_only);
                        (i, !whole)
                    })
                    .collect()
            })
            .collect();
        Ok(Engine {
            rules,
            chains,
            by_collection,
            steps,
            checks,
            excepts,
            settings,
        })
    }

    /// The settings this engine was built with.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The rules this engine runs (the pack up to its paranoia level).
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Inspects `req`.
    pub fn inspect(&self, req: &Request<'_>) -> Report {
        let (values, facts) = request::values(req, &self.settings.limits);
        let mut hits = Hits {
            done: vec![false; self.rules.len()],
            report: Report {
                threshold: self.settings.threshold,
                ..Report::default()
            },
        };
        let excepts: Vec<&Except> = self
            .excepts
            .iter()
            .filter(|e| {
                e.path_prefix
                    .as_deref()
                    .is_none_or(|p| req.path.starts_with(p))
            })
            .collect();
        let mut found = Vec::new();
        let mut outs = Outs::new(&self.steps);
        for v in &values {
            outs.reset();
            for &(c, check) in &self.by_collection[v.collection as usize] {
                let chain = &self.chains[c];
                if check && !chain.selectors.iter().any(|s| s.selects(v)) {
                    continue;
                }
                let t = outs.get(chain.step, &v.bytes);
                found.clear();
                chain.matches(&self.rules, t, req, &mut found);
                for &i in &found {
                    let rule = &self.rules[i];
                    if hits.done[i] || !rule.wants(t) || !rule.reads(v) || excluded(&excepts, i, v)
                    {
                        continue;
                    }
                    hits.add(i, rule, target_name(v), t);
                }
            }
        }
        for &i in &self.checks {
            let rule = &self.rules[i];
            let Operator::Check(check) = rule.operator else {
                continue;
            };
            let whole = excepts.iter().any(|e| e.targets.is_empty() && e.covers(i));
            if !whole && self.check(check, req, &facts) {
                hits.add(i, rule, "request".into(), b"");
            }
        }
        hits.report.facts = facts;
        hits.report
    }

    fn check(&self, check: Check, req: &Request<'_>, facts: &Facts) -> bool {
        let count = |name: &str| {
            req.headers
                .iter()
                .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                .count()
        };
        let limits = &self.settings.limits;
        match check {
            Check::MissingHost => count("host") == 0,
            Check::DuplicateHost => count("host") > 1,
            Check::LengthAndChunked => {
                count("content-length") > 0 && count("transfer-encoding") > 0
            }
            Check::BadContentLength => {
                count("content-length") > 1
                    || req
                        .header("content-length")
                        .is_some_and(|v| v.is_empty() || !v.iter().all(u8::is_ascii_digit))
            }
            Check::BodyUnparsed => facts.body_unparsed,
            Check::BodyOnGet => {
                matches!(req.method, "GET" | "HEAD")
                    && (count("transfer-encoding") > 0
                        || req
                            .header("content-length")
                            .is_some_and(|v| v.iter().any(|b| (b'1'..=b'9').contains(b))))
            }
            Check::BodyWithoutType => !req.body.is_empty() && count("content-type") == 0,
            Check::TooManyArgs => facts.args > limits.max_args,
            Check::TooManyHeaders => facts.headers > limits.max_headers,
            Check::TooManyValues => facts.values_over_limit,
        }
    }
}

impl Chain {
    /// The rules (indexes) whose operator matches `value`, before target and exclusion checks.
    fn matches(&self, rules: &[Rule], value: &[u8], req: &Request<'_>, out: &mut Vec<usize>) {
        if let Some((set, idx)) = &self.regex
            && set.is_match(value)
        {
            out.extend(set.matches(value).iter().map(|p| idx[p]));
        }
        if let Some((ac, idx, words)) = &self.phrases {
            for m in ac.find_overlapping_iter(value) {
                let p = m.pattern().as_usize();
                if words[p] && !whole_word(value, m.start(), m.end()) {
                    continue;
                }
                out.push(idx[p]);
            }
        }
        for &i in &self.others {
            if !rules[i].wants(value) {
                continue;
            }
            let hit = match &rules[i].operator {
                Operator::Detect(Detector::Sqli) => {
                    libinjectionrs::detect_sqli(value).is_injection()
                }
                Operator::Detect(Detector::Xss) => libinjectionrs::detect_xss(value).is_injection(),
                Operator::LengthGt(n) => value.len() > *n,
                Operator::ByteRanges(ranges) => value
                    .iter()
                    .any(|b| !ranges.iter().any(|[lo, hi]| (lo..=hi).contains(&b))),
                Operator::IpMatch(nets) => std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .or(req.client_ip.filter(|_| value.is_empty()))
                    .is_some_and(|ip| Rule::ip_matches(nets, ip)),
                Operator::Regex(_) | Operator::Phrases { .. } | Operator::Check(_) => false,
            };
            if hit {
                out.push(i);
            }
        }
    }
}

fn whole_word(v: &[u8], start: usize, end: usize) -> bool {
    let word = |b: Option<&u8>| b.is_some_and(|b| b.is_ascii_alphanumeric() || *b == b'_');
    !word(start.checked_sub(1).and_then(|s| v.get(s))) && !word(v.get(end))
}

struct Hits {
    done: Vec<bool>,
    report: Report,
}

impl Hits {
    fn add(&mut self, i: usize, rule: &Rule, target: String, value: &[u8]) {
        self.done[i] = true;
        let score = rule.severity.score();
        self.report.score += score;
        self.report.matches.push(Match {
            rule: rule.id,
            category: rule.category,
            message: rule.message.clone(),
            score,
            target,
            value: shorten(value),
        });
    }
}

fn shorten(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(&v[..v.len().min(80)]);
    let mut s: String = s
        .chars()
        .map(|c| if c.is_control() { '.' } else { c })
        .collect();
    if v.len() > 80 {
        s.push('…');
    }
    s
}

fn target_name(v: &Value<'_>) -> String {
    if v.key.is_empty() {
        v.collection.name().to_string()
    } else if v.origin == request::Origin::Json {
        format!("json:{}", v.key)
    } else {
        format!("{}:{}", v.collection.name(), v.key)
    }
}

impl Except {
    fn covers(&self, rule: usize) -> bool {
        self.rules.as_ref().is_none_or(|r| r.contains(&rule))
    }
}

fn excluded(excepts: &[&Except], rule: usize, v: &Value<'_>) -> bool {
    excepts
        .iter()
        .any(|e| e.covers(rule) && (e.targets.is_empty() || e.targets.iter().any(|s| s.selects(v))))
}

fn except(pack: &Pack, rules: &[Rule], x: &Exclusion) -> Result<Except, String> {
    if x.rules.is_empty() && x.categories.is_empty() && x.targets.is_empty() {
        return Err("names no rules, categories or targets: it would switch the WAF off".into());
    }
    let mut covered: Option<Vec<usize>> = None;
    if !x.rules.is_empty() || !x.categories.is_empty() {
        let mut idx = Vec::new();
        for id in &x.rules {
            if pack.rule(*id).is_none() {
                return Err(format!("rule {id} is not in the loaded pack"));
            }
            idx.extend(rules.iter().position(|r| r.id == *id));
        }
        for name in &x.categories {
            let Some(cat) = Category::parse(name) else {
                return Err(format!("unknown category `{name}`"));
            };
            if !pack.rules.iter().any(|r| r.category == cat) {
                return Err(format!("category `{name}` has no rule in the loaded pack"));
            }
            idx.extend(
                rules
                    .iter()
                    .enumerate()
                    .filter(|(_, r)| r.category == cat)
                    .map(|(i, _)| i),
            );
        }
        covered = Some(idx);
    }
    let mut targets = Vec::new();
    for t in &x.targets {
        targets.push(Selector::parse(t)?);
    }
    if let Some(prefix) = &x.path_prefix
        && !prefix.starts_with('/')
    {
        return Err(format!("path_prefix `{prefix}` must start with `/`"));
    }
    Ok(Except {
        path_prefix: x.path_prefix.clone(),
        rules: covered,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn engine() -> Engine {
        let pack = Pack::embedded().expect("pack");
        Engine::new(
            &pack,
            Settings {
                paranoia: 4,
                ..Settings::default()
            },
        )
        .expect("engine")
    }

    /// A deterministic byte source (xorshift): the same inputs on every run.
    struct Bytes(u64);
    impl Bytes {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn take(&mut self, n: usize) -> Vec<u8> {
            // Mostly the bytes attacks are made of, some of anything.
            const ALPHABET: &[u8] = b"%'\"<>;|&$(){}[]\\/.-_=+*#@!?:,~` \r\n\tabcdefxyzOR01259uU";
            (0..n)
                .map(|_| {
                    let r = self.next();
                    if r.is_multiple_of(5) {
                        (r >> 8) as u8
                    } else {
                        ALPHABET[(r >> 8) as usize % ALPHABET.len()]
                    }
                })
                .collect()
        }
    }

    #[test]
    fn arbitrary_input_in_every_place_never_panics() {
        let e = engine();
        let mut rng = Bytes(0x9e37_79b9_7f4a_7c15);
        let types: [&[u8]; 5] = [
            b"application/json",
            b"application/x-www-form-urlencoded",
            b"multipart/form-data; boundary=xx",
            b"text/plain",
            b"application/xml",
        ];
        for i in 0..400 {
            let (q, h, b) = (
                rng.take(i % 97),
                rng.take(i % 61),
                rng.take((i * 37) % 2000),
            );
            let path = String::from_utf8_lossy(&rng.take(i % 40)).into_owned();
            let name = format!("x-h{i}");
            let req = Request {
                method: "POST",
                path: &path,
                uri: &q,
                query: &q,
                headers: vec![
                    ("Host", b"h"),
                    ("Content-Type", types[i % types.len()]),
                    ("Cookie", &h),
                    (&name, &h),
                ],
                body: &b,
                body_truncated: i.is_multiple_of(3),
                client_ip: None,
            };
            let report = e.inspect(&req);
            assert!(report.score >= report.matches.len() as u32 * 2);
        }
    }

    #[test]
    fn pathological_inputs_stay_bounded() {
        let e = engine();
        let nested = "[".repeat(20_000);
        let escapes = "%25".repeat(20_000);
        let many = "a=1&".repeat(20_000);
        for (ctype, body, query) in [
            ("application/json", nested.as_bytes(), &b""[..]),
            ("text/plain", escapes.as_bytes(), escapes.as_bytes()),
            (
                "application/x-www-form-urlencoded",
                many.as_bytes(),
                many.as_bytes(),
            ),
        ] {
            let report = e.inspect(&Request {
                method: "POST",
                path: "/",
                query,
                headers: vec![("Host", b"h"), ("Content-Type", ctype.as_bytes())],
                body,
                ..Request::default()
            });
            // Inspected, and every match names a rule of the pack.
            assert!(
                report
                    .matches
                    .iter()
                    .all(|m| e.rules.iter().any(|r| r.id == m.rule))
            );
        }
    }

    #[test]
    fn scores_add_up_and_one_category_alone_names_the_reason() {
        let e = Engine::new(&Pack::embedded().expect("pack"), Settings::default()).expect("engine");
        let report = e.inspect(&Request {
            method: "GET",
            path: "/",
            query: b"id=1%27%20or%20%271%27%3D%271",
            headers: vec![("Host", b"h")],
            ..Request::default()
        });
        assert_eq!(
            report.score,
            report.matches.iter().map(|m| m.score).sum::<u32>()
        );
        assert_eq!(report.blocked(), Some("sqli"));
        let clean = e.inspect(&Request {
            method: "GET",
            path: "/products",
            query: b"page=2&sort=price&q=red+shoes",
            headers: vec![("Host", b"h"), ("User-Agent", b"curl/8.5.0")],
            ..Request::default()
        });
        assert_eq!(
            (clean.score, clean.blocked()),
            (0, None),
            "{:?}",
            clean.matches
        );
    }
}
