//! The compiled engine: a pack cut to one route's paranoia level and exclusions, with every
//! rule grouped by its transformation chain. A value visits the chains that read its
//! collection and key; a chain none of whose rules can match the value (its bytes and words,
//! see [`crate::needs`]) is skipped with its transformations. What a value's mask alone
//! decides is worked out once per mask in a request of many values (`Plans`). Otherwise the
//! chain is applied once (a transformation the mask says keeps the value is not run) and its
//! rules run together: the regular expressions as one `RegexSet`, the phrases as one
//! Aho-Corasick automaton, then the detectors and numeric checks.

use std::borrow::Cow;
use std::collections::HashMap;

use aho_corasick::{AhoCorasick, AhoCorasickBuilder, AhoCorasickKind, MatchKind};
use regex::bytes::{RegexSet, RegexSetBuilder};
use serde::Deserialize;

use crate::needs::{Mask, Needs, Passage};
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
    /// The step of each transformation of the chain, in order.
    steps: Vec<usize>,
    /// What its transformations do to a value's mask, in short.
    passage: Passage,
    /// The distinct selectors of its rules: a value none of them selects skips the chain.
    selectors: Vec<Selector>,
    regex: Option<(RegexSet, Vec<usize>)>,
    phrases: Option<(AhoCorasick, Vec<usize>, Vec<bool>)>,
    /// Rules with another operator.
    others: Vec<usize>,
    /// Every rule of the chain.
    members: Vec<usize>,
}

/// What a value needs for some rule of a chain that reads it to match it (see [`Needs`]), past
/// what its [`Visit`] tells at once: the rules' alternatives that need no word, and those that
/// do (checked by their bytes alone when a value is not judged by its words), and the rules
/// that need words.
#[derive(Debug, Clone, Default)]
struct Gate {
    plain: Gates,
    worded: Gates,
    /// The rules that need words, a bit per rule (by index).
    rules: Vec<u64>,
    /// The fewest bytes of a value one of those rules may match: a shorter one is not searched
    /// for words.
    worded_shortest: usize,
}

/// A gate's answer for every value of one mask, known before the value is read further.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Not known: the chain's decoders have something to decode.
    Ask,
    Skip,
    Run,
    /// Run if the value holds one of the words (its mask after the chain is this).
    Words(Mask),
    /// Not worked out yet: asked when a value comes.
    Later,
}

impl Gate {
    /// What the gate answers for a value of mask `raw` read through `passage`, by the mask
    /// alone; `always`: some rule needs nothing but length.
    fn known(&self, always: bool, passage: &Passage, raw: Mask) -> Known {
        if always {
            return Known::Run;
        }
        let Some((m, by_words)) = passage.quick(raw) else {
            return Known::Ask;
        };
        if self.plain.met_by(m) || (!by_words && self.worded.met_by(m)) {
            Known::Run
        } else if self.worded.met_by(m) {
            Known::Words(m)
        } else {
            Known::Skip
        }
    }
}

/// `n` as a visit's or plan's index (the engine's tables are far smaller than `u32::MAX`).
fn index(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A plan: the visits (by index into their list) a value of one mask makes, but for those its
/// gates skip, with the gates' answers.
type Plan = [(u32, Known)];

/// The plans values of a request make, each worked out at the second value of its mask and
/// visits: a JSON array of records, or a long form, has many values and few masks. Only a
/// request of many values keeps them (for a few, keeping costs more than it saves), and at
/// most [`PLANS`]: a request of more kinds of value starts over.
struct Plans {
    keep: bool,
    /// The visits (by address), the mask, and where its plan is in `steps` once made.
    made: Vec<(usize, Mask, Option<std::ops::Range<usize>>)>,
    steps: Vec<(u32, Known)>,
}

/// Plans kept per request.
const PLANS: usize = 64;
/// The fewest values a request has for its plans to be kept.
const PLANNED: usize = 32;

impl Plans {
    fn new(keep: bool) -> Plans {
        Plans {
            keep,
            made: Vec::new(),
            steps: Vec::new(),
        }
    }

    /// The plan of a value of mask `raw` and `len` bytes through `visits`.
    fn of<'a>(
        &'a mut self,
        engine: &Engine,
        visits: &'a Visits,
        raw: Mask,
        len: usize,
    ) -> &'a Plan {
        if !engine.skipping {
            return &visits.later;
        }
        if let Some(k) = Mask::SIMPLE.iter().position(|&m| m == raw) {
            return &visits.simple[k];
        }
        if !self.keep {
            return &visits.later;
        }
        let list = visits.all.as_ptr() as usize;
        let Some(at) = self
            .made
            .iter()
            .position(|(l, m, _)| *l == list && *m == raw)
        else {
            if self.made.len() == PLANS {
                self.made.clear();
                self.steps.clear();
            }
            self.made.push((list, raw, None));
            return &visits.later;
        };
        if let Some(made) = &self.made[at].2 {
            return &self.steps[made.clone()];
        }
        let start = self.steps.len();
        for (i, visit) in visits.all.iter().enumerate() {
            let known = if len < visit.shortest as usize {
                Known::Later
            } else {
                engine.known(visit, raw)
            };
            if known != Known::Skip {
                self.steps.push((index(i), known));
            }
        }
        self.made[at].2 = Some(start..self.steps.len());
        &self.steps[start..]
    }
}

/// Alternatives of rules: byte clauses each, and the union of their first clauses (a mask that
/// misses it meets none); `open` when one has no clause (every mask meets it).
#[derive(Debug, Clone, Default)]
struct Gates {
    open: bool,
    any: Mask,
    each: Vec<Vec<Mask>>,
}

impl Gates {
    /// Adds an alternative, unless one already there is met whenever it is; drops those it is
    /// met whenever they are (only whether some alternative is met counts).
    fn push(&mut self, clauses: &[Mask]) {
        if self.each.iter().any(|old| implied(clauses, old)) {
            return;
        }
        self.each.retain(|old| !implied(old, clauses));
        self.each.push(clauses.to_vec());
        self.open = self.each.iter().any(Vec::is_empty);
        self.any = self.each.iter().fold(Mask::default(), |m, c| {
            m.union(c.first().copied().unwrap_or_default())
        });
    }

    fn met_by(&self, m: Mask) -> bool {
        self.open || (m.meets(self.any) && self.each.iter().any(|c| met(c, m)))
    }
}

/// Whether every value that meets `a` meets `b`: each clause of `b` holds one of `a` whole.
fn implied(a: &[Mask], b: &[Mask]) -> bool {
    b.iter().all(|bc| a.iter().any(|ac| ac.within(*bc)))
}

fn met(clauses: &[Mask], m: Mask) -> bool {
    clauses.iter().all(|c| c.meets(m))
}

/// A chain as a value of one collection and key visits it: whether the value must still pass
/// the chain's selectors (those that read JSON values only), and the gate of the chain's rules
/// that read such a value. What a value's walk over its visits reads first is here, in 16 bytes,
/// so the walk reads a few cache lines; the rest is in `Engine::gates`.
#[derive(Debug, Clone, Copy)]
struct Visit {
    chain: u32,
    /// Its [`Gate`] (index into `Engine::gates`).
    gate: u32,
    /// The fewest bytes of a value some rule may match: a shorter one skips the chain.
    shortest: u32,
    check: bool,
    /// Some rule needs nothing but length: every value long enough runs the chain.
    always: bool,
}

// The walk over a value's visits reads them in a row: they stay within 16 bytes.
const _: () = assert!(std::mem::size_of::<Visit>() <= 16);

/// The visits of a value of one key, in chain order; the plans of values of each
/// [`Mask::SIMPLE`] mask (most names, ids and words), made with the engine; and the plan of a
/// value of a mask not seen before: every visit, its gate asked when the value comes.
#[derive(Debug, Default)]
struct Visits {
    all: Vec<Visit>,
    simple: [Vec<(u32, Known)>; 2],
    later: Vec<(u32, Known)>,
}

/// The chains that read one collection, by the key of the value, each in chain order.
#[derive(Debug, Default)]
struct Route {
    /// For a value whose key no selector of the collection names.
    any: Visits,
    /// For a value of a key some selector names (lower case for headers).
    keys: Vec<(String, Visits)>,
    /// Whether keys compare without case (header names).
    caseless: bool,
}

impl Route {
    /// The route of collection `c`; the visits' gates go into `gates`.
    fn new(
        c: Collection,
        chains: &[Chain],
        rules: &[Rule],
        needs: &[Needs],
        gates: &mut Vec<Gate>,
    ) -> Route {
        let named = |s: &Selector| s.collection == c && !s.json_only;
        let mut keys: Vec<String> = chains
            .iter()
            .flat_map(|chain| chain.selectors.iter().filter(|s| named(s)))
            .filter_map(|s| s.key.clone())
            .collect();
        keys.sort();
        keys.dedup();
        // The chains a value of key `key` (none: any other key) visits.
        let mut visits = |key: Option<&str>| -> Visits {
            let reads = |s: &Selector| {
                s.collection == c && (s.json_only || s.key.is_none() || s.key.as_deref() == key)
            };
            let mut list = Vec::new();
            let mut simple = [Vec::new(), Vec::new()];
            for (i, chain) in chains.iter().enumerate() {
                let picks = chain
                    .selectors
                    .iter()
                    .any(|s| named(s) && (s.key.is_none() || s.key.as_deref() == key));
                let maybe = chain
                    .selectors
                    .iter()
                    .any(|s| s.collection == c && s.json_only);
                if !(picks || maybe) {
                    continue;
                }
                let mut gate = Gate {
                    worded_shortest: usize::MAX,
                    ..Gate::default()
                };
                let (mut shortest, mut always) = (usize::MAX, false);
                for &r in &chain.members {
                    if !rules[r].targets.iter().any(reads) {
                        continue;
                    }
                    shortest = shortest.min(needs[r].shortest());
                    always |= needs[r].is_nothing();
                    for (clauses, needs_word) in needs[r].alternatives() {
                        if needs_word {
                            gate.worded.push(clauses);
                            gate.rules.resize(rules.len().div_ceil(64), 0);
                            gate.rules[r / 64] |= 1 << (r % 64);
                            gate.worded_shortest = gate.worded_shortest.min(needs[r].shortest());
                        } else {
                            gate.plain.push(clauses);
                        }
                    }
                }
                for (plan, m) in simple.iter_mut().zip(Mask::SIMPLE) {
                    match gate.known(always, &chain.passage, m) {
                        Known::Skip => {}
                        known => plan.push((index(list.len()), known)),
                    }
                }
                list.push(Visit {
                    chain: index(i),
                    gate: index(gates.len()),
                    shortest: index(shortest),
                    check: !picks,
                    always,
                });
                gates.push(gate);
            }
            let later = (0..list.len()).map(|i| (index(i), Known::Later)).collect();
            Visits {
                all: list,
                simple,
                later,
            }
        };
        let any = visits(None);
        let keys = keys.iter().map(|k| (k.clone(), visits(Some(k)))).collect();
        Route {
            any,
            keys,
            caseless: c == Collection::Headers,
        }
    }

    #[inline]
    fn visits(&self, key: &str) -> &Visits {
        if self.keys.is_empty() {
            return &self.any;
        }
        let lower;
        let key = if self.caseless && key.bytes().any(|b| b.is_ascii_uppercase()) {
            lower = key.to_ascii_lowercase();
            &lower
        } else {
            key
        };
        self.keys
            .iter()
            .find(|(k, _)| k == key)
            .map_or(&self.any, |(_, v)| v)
    }
}

/// One transformation applied to the output of an earlier step (or to the value): the chains'
/// common prefixes, so `url_decode` then `html_entity_decode` runs once per value however many
/// chains start with them. Steps come after their parents.
#[derive(Debug, Clone, Copy)]
struct Step {
    parent: Option<usize>,
    transform: Transform,
}

/// A step's output for one value: the value itself (no step on the way changed it), new
/// bytes (a part of its input, as `trim` gives, is new bytes too), or the new bytes of another
/// step (an ancestor, or a step of another chain that applied the same transformation to the
/// value itself).
enum Out {
    Value,
    New(Vec<u8>),
    As(usize),
}

/// The steps' outputs for one value, computed on demand, each at most once.
struct Outs<'s> {
    steps: &'s [Step],
    /// Per step, the value (by number) it was computed for, and its output then.
    outs: Vec<(u32, Out)>,
    /// The current value's number: an output of another is stale.
    current: u32,
    /// The current value's mask: a transformation it says keeps the value is not run.
    raw: Mask,
    /// Per transformation (`Transform as usize`), the step that applied it to the value itself,
    /// and for which value: steps of other chains that do the same reuse its output.
    on_value: [(u32, usize); Transform::ALL.len()],
}

impl<'s> Outs<'s> {
    fn new(steps: &'s [Step]) -> Self {
        Outs {
            steps,
            outs: steps.iter().map(|_| (0, Out::Value)).collect(),
            current: 0,
            raw: Mask::default(),
            on_value: [(0, 0); Transform::ALL.len()],
        }
    }

    /// On to the next value, of mask `raw`: every output is stale at once.
    fn reset(&mut self, raw: Mask) {
        self.current += 1;
        self.raw = raw;
    }

    /// The bytes step `at` (or the value itself, for `None`) gives.
    fn get<'v>(&'v mut self, at: Option<usize>, value: &'v [u8]) -> &'v [u8] {
        let Some(at) = at else { return value };
        self.fill(at, value);
        match self.source(at) {
            Some(k) => self.new_bytes(k),
            None => value,
        }
    }

    /// The step whose new bytes step `at` gives (none: the value itself), once filled.
    fn source(&self, at: usize) -> Option<usize> {
        match self.outs[at].1 {
            Out::Value => None,
            Out::New(_) => Some(at),
            Out::As(k) => Some(k),
        }
    }

    fn new_bytes(&self, at: usize) -> &[u8] {
        match &self.outs[at].1 {
            Out::New(v) => v,
            Out::Value | Out::As(_) => &[],
        }
    }

    fn fill(&mut self, at: usize, value: &[u8]) {
        if self.outs[at].0 == self.current {
            return;
        }
        let step = self.steps[at];
        let from = step.parent.and_then(|p| {
            self.fill(p, value);
            self.source(p)
        });
        let t = step.transform as usize;
        let out = match from {
            None if self.raw.keeps(step.transform) => Out::Value,
            None if self.on_value[t].0 == self.current => {
                self.source(self.on_value[t].1).map_or(Out::Value, Out::As)
            }
            None => {
                self.on_value[t] = (self.current, at);
                match step.transform.apply(value) {
                    Cow::Borrowed(b) if b.len() == value.len() => Out::Value,
                    Cow::Borrowed(b) => Out::New(b.to_vec()),
                    Cow::Owned(v) => Out::New(v),
                }
            }
            Some(k) => {
                let input = self.new_bytes(k);
                match step.transform.apply(input) {
                    Cow::Borrowed(b) if b.len() == input.len() => Out::As(k),
                    Cow::Borrowed(b) => Out::New(b.to_vec()),
                    Cow::Owned(v) => Out::New(v),
                }
            }
        };
        self.outs[at] = (self.current, out);
    }

    /// What step `at` wrote, if it changed its input.
    fn changed<'v>(&'v mut self, at: usize, value: &[u8]) -> Option<&'v [u8]> {
        self.fill(at, value);
        let mine = self.source(at)?;
        let input = self.steps[at].parent.and_then(|p| self.source(p));
        (input != Some(mine)).then(|| self.new_bytes(mine))
    }
}

/// The rules one of whose words a value holds, a bit per rule, once looked for (`fresh`); the
/// buffer serves every value of a request.
#[derive(Default)]
struct Words {
    fresh: bool,
    seen: Vec<u64>,
}

/// The compiled engine for one route.
#[derive(Debug)]
pub struct Engine {
    rules: Vec<Rule>,
    chains: Vec<Chain>,
    /// Per collection (`Collection as usize`), the chains each of its values visits.
    by_collection: Vec<Route>,
    /// The collections some chain reads (the others' values are not taken out).
    reads: Collections,
    steps: Vec<Step>,
    checks: Vec<usize>,
    excepts: Vec<Except>,
    settings: Settings,
    /// The words rules need, and for each word the rules that need it.
    words: Option<(AhoCorasick, Vec<Vec<usize>>)>,
    /// Per rule, its alternatives that need a word.
    worded: Vec<Gates>,
    /// The visits' gates, by [`Visit::gate`].
    gates: Vec<Gate>,
    /// Whether values skip the chains none of whose rules they can match (off only in the
    /// test that proves skipping changes no report).
    skipping: bool,
    /// The fewest values a request has for its plans to be kept ([`PLANNED`]; none in that
    /// test, so its every request keeps them).
    planned: usize,
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
                    steps: Vec::new(),
                    passage: Passage::of(&rule.transforms),
                    selectors: Vec::new(),
                    regex: None,
                    phrases: None,
                    others: Vec::new(),
                    members: Vec::new(),
                });
                members.push(Vec::new());
                chains.len() - 1
            });
            for t in &rule.targets {
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
                chain.steps.push(id);
            }
            chain.step = parent;
        }
        let needs: Vec<Needs> = rules.iter().map(Needs::of_rule).collect();
        let mut words: Vec<(Vec<u8>, Vec<usize>)> = Vec::new();
        for (i, n) in needs.iter().enumerate() {
            for w in n.words() {
                match words.iter_mut().find(|(x, _)| x == w) {
                    Some((_, rules)) => rules.push(i),
                    None => words.push((w.clone(), vec![i])),
                }
            }
        }
        let words = if words.is_empty() {
            None
        } else {
            // A DFA: every value is searched, overlapping, so speed per byte is what counts.
            let ac = AhoCorasickBuilder::new()
                .ascii_case_insensitive(true)
                .match_kind(MatchKind::Standard)
                .kind(Some(AhoCorasickKind::DFA))
                .build(words.iter().map(|(w, _)| w))
                .map_err(|e| SettingsError(vec![format!("the rules' words: {e}")]))?;
            Some((ac, words.into_iter().map(|(_, r)| r).collect()))
        };
        let mut worded: Vec<Gates> = (0..rules.len()).map(|_| Gates::default()).collect();
        for (i, n) in needs.iter().enumerate() {
            for (clauses, needs_word) in n.alternatives() {
                if needs_word {
                    worded[i].push(clauses);
                }
            }
        }
        for (chain, members) in chains.iter_mut().zip(members) {
            chain.members.clone_from(&members);
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
        let mut gates = Vec::new();
        let by_collection: Vec<Route> = Collection::ALL
            .iter()
            .map(|&c| Route::new(c, &chains, &rules, &needs, &mut gates))
            .collect();
        let mut reads = Collections::default();
        for (&c, route) in Collection::ALL.iter().zip(&by_collection) {
            if !route.any.all.is_empty() || !route.keys.is_empty() {
                reads.insert(c);
            }
        }
        Ok(Engine {
            rules,
            chains,
            by_collection,
            reads,
            steps,
            checks,
            excepts,
            settings,
            words,
            worded,
            gates,
            skipping: true,
            planned: PLANNED,
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
        let (values, facts) = request::values(req, &self.settings.limits, self.reads);
        let mut hits = Hits {
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
        let mut words = Words::default();
        let mut plans = Plans::new(values.len() >= self.planned);
        for v in &values {
            let raw = Mask::of(&v.bytes);
            outs.reset(raw);
            words.fresh = false;
            let visits = self.by_collection[v.collection as usize].visits(&v.key);
            for &(i, known) in plans.of(self, visits, raw, v.bytes.len()) {
                let visit = &visits.all[i as usize];
                if self.skipping
                    && !self.may_match(visit, known, raw, &v.bytes, &mut outs, &mut words)
                {
                    continue;
                }
                let chain = &self.chains[visit.chain as usize];
                if visit.check && !chain.selectors.iter().any(|s| s.selects(v)) {
                    continue;
                }
                let t = outs.get(chain.step, &v.bytes);
                found.clear();
                chain.matches(&self.rules, t, req, &mut found);
                for &i in &found {
                    let rule = &self.rules[i];
                    if hits.has(rule)
                        || !rule.wants(t)
                        || !rule.reads(v)
                        || excluded(&excepts, i, v)
                    {
                        continue;
                    }
                    hits.add(rule, target_name(v), t);
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
                hits.add(rule, "request".into(), b"");
            }
        }
        hits.report.facts = facts;
        hits.report
    }

    /// What the gate of `visit` answers for a value of mask `raw`, by the mask alone.
    fn known(&self, visit: &Visit, raw: Mask) -> Known {
        let passage = &self.chains[visit.chain as usize].passage;
        self.gates[visit.gate as usize].known(visit.always, passage, raw)
    }

    /// Whether a value (its gate's answer by its mask: `known`) may match a rule of the chain
    /// it visits: one whose byte clauses the transformed value's mask meets and, when the value
    /// is judged by its words, one of whose words it holds (`words`, found on first use).
    fn may_match(
        &self,
        visit: &Visit,
        known: Known,
        raw: Mask,
        value: &[u8],
        outs: &mut Outs<'_>,
        words: &mut Words,
    ) -> bool {
        if value.len() < visit.shortest as usize {
            return false;
        }
        let gate = &self.gates[visit.gate as usize];
        let known = match known {
            Known::Later => self.known(visit, raw),
            known => known,
        };
        match known {
            Known::Skip => return false,
            Known::Run => return true,
            Known::Words(m) => return self.holds_word(gate, m, value, words),
            Known::Ask | Known::Later => {}
        }
        // A decoder's escape is there: the decoders run (their output is shared with the chain
        // that follows), so what they wrote, if anything, is known exactly. Then the
        // transformed value's bytes, and whether its words are all in the raw value.
        let chain = &self.chains[visit.chain as usize];
        let (mut m, mut by_words) = (raw, !raw.hides_words());
        for (&t, &at) in chain.transforms.iter().zip(&chain.steps) {
            if !m.writes_words(t) {
                m = m.after(t);
            } else if t.decodes() {
                if let Some(out) = outs.changed(at, value) {
                    m = Mask::of(out);
                    by_words = false;
                }
            } else {
                m = m.after(t);
                by_words = false;
            }
        }
        if gate.plain.met_by(m) {
            return true;
        }
        // An alternative that needs a word needs its bytes too: without them, no word search.
        if !gate.worded.met_by(m) {
            return false;
        }
        if !by_words {
            return true;
        }
        self.holds_word(gate, m, value, words)
    }

    /// Whether `value` (of transformed mask `m`) holds a word of a rule of `gate`, with that
    /// rule's bytes. The words are looked for once per value (`words`), and only here.
    fn holds_word(&self, gate: &Gate, m: Mask, value: &[u8], words: &mut Words) -> bool {
        if value.len() < gate.worded_shortest {
            return false;
        }
        if !words.fresh {
            self.find_words(value, words);
        }
        words
            .seen
            .iter()
            .zip(&gate.rules)
            .enumerate()
            .any(|(w, (&seen, &rules))| {
                let mut bits = seen & rules;
                while bits != 0 {
                    if self.worded[w * 64 + bits.trailing_zeros() as usize].met_by(m) {
                        return true;
                    }
                    bits &= bits - 1;
                }
                false
            })
    }

    /// Finds the rules one of whose words `value` holds, into `words`.
    fn find_words(&self, value: &[u8], words: &mut Words) {
        words.fresh = true;
        words.seen.clear();
        let Some((ac, rules)) = &self.words else {
            return;
        };
        // Most values hold no word: the set is made at the first.
        for m in ac.find_overlapping_iter(value) {
            if words.seen.is_empty() {
                words.seen.resize(self.rules.len().div_ceil(64), 0u64);
            }
            for &i in &rules[m.pattern().as_usize()] {
                words.seen[i / 64] |= 1 << (i % 64);
            }
        }
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
    report: Report,
}

impl Hits {
    /// Whether `rule` matched already (it counts once per request).
    fn has(&self, rule: &Rule) -> bool {
        self.report.matches.iter().any(|m| m.rule == rule.id)
    }

    fn add(&mut self, rule: &Rule, target: String, value: &[u8]) {
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

    /// A request from its parts, as the edge hands it over (path decoded and normalised).
    fn owned(
        method: &str,
        uri: &str,
        headers: Vec<(String, Vec<u8>)>,
        body: Vec<u8>,
    ) -> crate::raw::OwnedRequest {
        let (path, query) = uri.split_once('?').unwrap_or((uri, ""));
        crate::raw::OwnedRequest {
            method: method.into(),
            uri: uri.as_bytes().to_vec(),
            path: crate::raw::decode_path(path.as_bytes()),
            query: query.as_bytes().to_vec(),
            headers,
            body,
            client_ip: Some("192.0.2.7".parse().expect("ip")),
        }
    }

    /// Every rule's own tests in each place a value can be, the regression corpus, and the
    /// CRS cases (when `../shared` is there).
    fn cases() -> Vec<crate::raw::OwnedRequest> {
        let pack = Pack::embedded().expect("pack");
        let mut cases = Vec::new();
        let header = |n: &str, v: &[u8]| (n.to_string(), v.to_vec());
        for rule in &pack.rules {
            for s in rule.tests.attack.iter().chain(&rule.tests.benign) {
                let q: String =
                    percent_encoding::utf8_percent_encode(s, percent_encoding::NON_ALPHANUMERIC)
                        .to_string();
                let json = serde_json::json!({ "q": s, "list": [s] }).to_string();
                // Values of one mask, as many records of a JSON array have: the second makes
                // the plan (from a value shorter than the rest) the others follow. The first
                // two are `s` without its letters, the third `s` with its letters shifted.
                let bare: String = s.chars().filter(|c| !c.is_ascii_alphabetic()).collect();
                let shifted: String = s
                    .chars()
                    .map(|c| match c {
                        'a'..='y' | 'A'..='Y' => char::from(c as u8 + 1),
                        'z' => 'a',
                        'Z' => 'A',
                        c => c,
                    })
                    .collect();
                let records = serde_json::json!([bare, bare, shifted, s]).to_string();
                let base = vec![header("Host", b"h"), header("User-Agent", s.as_bytes())];
                let cookie = header("Cookie", format!("c={s}").as_bytes());
                cases.push(owned(
                    "GET",
                    &format!("/search?q={q}&{q}=1"),
                    [base.clone(), vec![cookie]].concat(),
                    Vec::new(),
                ));
                for (ctype, body) in [
                    ("application/json", json.into_bytes()),
                    ("application/json", records.into_bytes()),
                    (
                        "application/x-www-form-urlencoded",
                        format!("a={q}").into_bytes(),
                    ),
                    ("text/plain", s.as_bytes().to_vec()),
                ] {
                    cases.push(owned(
                        "POST",
                        "/api/items",
                        [base.clone(), vec![header("Content-Type", ctype.as_bytes())]].concat(),
                        body,
                    ));
                }
            }
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        for file in ["tests/data/attacks.jsonl", "tests/data/benign.jsonl"] {
            let text = std::fs::read_to_string(root.join(file)).expect("corpus");
            for line in text.lines().filter(|l| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).expect("json");
                let raw = v["raw"].as_str().unwrap_or("");
                cases.extend(crate::raw::parse(raw.as_bytes()));
            }
        }
        let crs = root.join("../../shared/corpora/crs/crs_cases.jsonl");
        for line in std::fs::read_to_string(crs).unwrap_or_default().lines() {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
                continue;
            };
            let s = |k: &str| v[k].as_str().unwrap_or("").to_string();
            let headers = v["headers"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|h| Some(header(h[0].as_str()?, h[1].as_str()?.as_bytes())))
                .collect();
            cases.push(owned(
                &s("method"),
                &s("uri"),
                headers,
                s("data").into_bytes(),
            ));
        }
        cases
    }

    #[test]
    fn skipping_what_cannot_match_changes_no_report() {
        let pack = Pack::embedded().expect("pack");
        let cases = cases();
        assert!(cases.len() > 2000, "{} cases", cases.len());
        for paranoia in [1, 4] {
            let settings = Settings {
                paranoia,
                ..Settings::default()
            };
            let mut gated = Engine::new(&pack, settings.clone()).expect("engine");
            gated.planned = 0;
            let mut full = Engine::new(&pack, settings).expect("engine");
            full.skipping = false;
            let mut matched = 0;
            for case in &cases {
                let req = case.as_request();
                let (a, b) = (gated.inspect(&req), full.inspect(&req));
                assert_eq!(a, b, "PL{paranoia} {} {}", case.method, case.path);
                matched += usize::from(!a.matches.is_empty());
            }
            // The cases exercise the rules: most of them match something.
            assert!(
                matched * 2 > cases.len(),
                "PL{paranoia}: {matched} of {} matched",
                cases.len()
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

    /// `trim` gives a part of its input: the rules after it read that part, so white space
    /// around a value hides nothing from a rule anchored at its start (931100 here).
    #[test]
    fn a_trimmed_value_is_what_the_rules_after_trim_read() {
        let e = Engine::new(&Pack::embedded().expect("pack"), Settings::default()).expect("engine");
        for query in [
            &b"file=%20%20http://192.168.1.10/shell.txt"[..],
            b"file=http://192.168.1.10/shell.txt%20",
            b"file=%09HTTP://192.168.1.10/shell.txt",
        ] {
            let report = e.inspect(&Request {
                method: "GET",
                path: "/",
                query,
                headers: vec![("Host", b"h")],
                ..Request::default()
            });
            assert!(
                report.matches.iter().any(|m| m.rule == 931100),
                "{}: {:?}",
                String::from_utf8_lossy(query),
                report.matches
            );
        }
    }
}
