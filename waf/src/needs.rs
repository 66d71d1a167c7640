//! What a value must hold for a rule to match it, decided before any rule runs. A value's
//! [`Mask`] is the set of significant bytes in it (ASCII punctuation, white space, controls,
//! "a digit" and "non-ASCII"; letters never count). A rule's [`Needs`] are read off its pattern,
//! per alternative: clauses of bytes, each of which a match must hold one of (`'\s*or\s+1=1`
//! needs `'` and `=`), and maybe a word (`union`). A value that misses every alternative cannot
//! match, so the engine skips the rule, and a chain none of whose rules can match is skipped
//! with its transformations. Benign values (prose,
//! names, e-mail addresses) hold few significant bytes, so most of the pack never runs on them.
//!
//! The analysis only ever drops clauses (a weaker condition), never invents one: a rule is
//! skipped only where it provably cannot match. [`Mask::after`] carries a mask through a
//! transformation the same way: a decoder that could produce any byte gives [`Mask::ALL`].

use regex_syntax::hir::{Class, Hir, HirKind};

use crate::rules::{Detector, Operator, Rule};
use crate::transform::Transform;

/// A set of significant bytes, one bit each (controls other than NUL, tab, CR and LF share one
/// bit, the ten digits share one, and so does every byte from 0x80 up).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mask(u64);

/// Bits 0..32: the 32 ASCII punctuation bytes; then space, NUL, tab, LF, CR, other controls,
/// non-ASCII and digits.
const SPACE: u64 = 1 << 32;
const NUL: u64 = 1 << 33;
const TAB: u64 = 1 << 34;
const LF: u64 = 1 << 35;
const CR: u64 = 1 << 36;
const CONTROL: u64 = 1 << 37;
const NON_ASCII: u64 = 1 << 38;
const DIGIT: u64 = 1 << 39;

/// Each byte's bit (0 for letters).
const BIT: [u64; 256] = {
    let mut t = [0u64; 256];
    let mut b = 0usize;
    let mut punct = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = if c.is_ascii_punctuation() {
            punct += 1;
            1 << (punct - 1)
        } else if c.is_ascii_digit() {
            DIGIT
        } else if c.is_ascii_alphabetic() {
            0
        } else {
            match c {
                b' ' => SPACE,
                0 => NUL,
                b'\t' => TAB,
                b'\n' => LF,
                b'\r' => CR,
                0x80..=0xff => NON_ASCII,
                _ => CONTROL,
            }
        };
        b += 1;
    }
    t
};

/// The bits of `bytes`.
const fn of(bytes: &[u8]) -> u64 {
    let mut m = 0;
    let mut i = 0;
    while i < bytes.len() {
        m |= BIT[bytes[i] as usize];
        i += 1;
    }
    m
}

/// How often a byte turns up in benign text (higher: more often): a clause of rare bytes
/// skips more values, so the analysis keeps the rarest.
fn weight(bit: u64) -> u32 {
    let of = |b: u8| BIT[b as usize];
    match bit {
        SPACE => 100,
        x if x == of(b'.') || x == of(b',') => 60,
        x if x == of(b':') || x == of(b'-') || x == of(b'/') => 40,
        x if x == of(b'@') || x == of(b'_') || x == of(b'\'') || x == of(b'(') || x == of(b')') => {
            25
        }
        DIGIT => 50,
        NON_ASCII | LF => 20,
        x if x == of(b'!') || x == of(b'?') || x == of(b'"') || x == of(b'&') || x == of(b'=') => {
            15
        }
        x if x == of(b';') || x == of(b'#') || x == of(b'+') || x == of(b'*') || x == of(b'%') => 8,
        _ => 3,
    }
}

impl Mask {
    /// Every byte: what a decoder may produce.
    pub const ALL: Mask = Mask(u64::MAX);
    /// The masks of most names, ids and words: letters only, and letters with digits.
    pub const SIMPLE: [Mask; 2] = [Mask(0), Mask(DIGIT)];

    /// The significant bytes of `value`.
    pub fn of(value: &[u8]) -> Mask {
        Mask(value.iter().fold(0, |m, &b| m | BIT[b as usize]))
    }

    fn byte(b: u8) -> u64 {
        BIT[b as usize]
    }

    fn has(self, b: u8) -> bool {
        self.0 & Self::byte(b) != 0
    }

    /// A superset of the mask of `t`'s output, for an input of mask `self`.
    pub fn after(self, t: Transform) -> Mask {
        let Mask(m) = self;
        let white = SPACE | TAB | LF | CR | CONTROL | NON_ASCII;
        Mask(match t {
            // Each decoder writes any byte, but only where its escape character is.
            Transform::UrlDecode if self.has(b'%') => u64::MAX,
            Transform::UrlDecode if self.has(b'+') => m | SPACE,
            Transform::HtmlEntityDecode if self.has(b'&') => u64::MAX,
            Transform::JsDecode if self.has(b'\\') => u64::MAX,
            Transform::Base64Decode if self.may_be_base64() => u64::MAX,
            Transform::UrlDecode
            | Transform::HtmlEntityDecode
            | Transform::JsDecode
            | Transform::Base64Decode => m,
            Transform::CompressWhitespace if m & white != 0 => m | SPACE,
            // Each writes a space only in place of what it removes.
            Transform::RemoveComments if m & of(b"/-#") != 0 => m | SPACE,
            Transform::CmdLine if m & (white | of(b",;$")) != 0 => m | SPACE,
            Transform::RemoveComments | Transform::CmdLine => m,
            Transform::NormalizePath if self.has(b'\\') => m | Self::byte(b'/'),
            Transform::Lowercase
            | Transform::CompressWhitespace
            | Transform::RemoveWhitespace
            | Transform::NormalizePath
            | Transform::RemoveNulls
            | Transform::Trim => m,
        })
    }

    /// Whether `t` leaves every value of this mask as it is: it holds none of the bytes `t`
    /// acts on (a letter is one only to `lowercase` and `cmd_line`).
    pub fn keeps(self, t: Transform) -> bool {
        let white = SPACE | TAB | LF | CR | CONTROL | NON_ASCII;
        let Mask(m) = self;
        match t {
            Transform::UrlDecode => m & of(b"%+") == 0,
            Transform::HtmlEntityDecode => m & of(b"&") == 0,
            Transform::JsDecode => m & of(b"\\") == 0,
            Transform::RemoveNulls => m & NUL == 0,
            Transform::RemoveComments => m & of(b"/-#") == 0,
            Transform::NormalizePath => m & of(b"/\\") == 0,
            Transform::CompressWhitespace | Transform::RemoveWhitespace | Transform::Trim => {
                m & white == 0
            }
            Transform::Base64Decode => !self.may_be_base64(),
            Transform::Lowercase | Transform::CmdLine => false,
        }
    }

    /// Whether a value of this mask may be base64 (its alphabets, white space at the ends):
    /// only such a value is decoded.
    fn may_be_base64(self) -> bool {
        let alphabet = SPACE | TAB | LF | CR | CONTROL | DIGIT | of(b"+/-_=");
        self.0 & !alphabet == 0
    }

    /// Whether `t` may write, into an input of this mask, a word the input does not hold: where
    /// it holds a decoder's escape, or a byte removed from between two letters (`c'a't`,
    /// `un\0ion`).
    pub fn writes_words(self, t: Transform) -> bool {
        match t {
            Transform::Base64Decode => self.may_be_base64(),
            t => self.meets(Mask::breakers(t)),
        }
    }

    fn breakers(t: Transform) -> Mask {
        let white = SPACE | TAB | LF | CR | CONTROL | NON_ASCII;
        Mask(match t {
            Transform::UrlDecode => of(b"%"),
            Transform::HtmlEntityDecode => of(b"&"),
            Transform::JsDecode => of(b"\\"),
            Transform::RemoveNulls => NUL,
            Transform::RemoveWhitespace => white,
            Transform::CmdLine => of(b"'\"\\^`$"),
            Transform::Lowercase
            | Transform::Base64Decode
            | Transform::CompressWhitespace
            | Transform::RemoveComments
            | Transform::NormalizePath
            | Transform::Trim => 0,
        })
    }

    /// Whether a value of this mask may hold a rule's word in a form the word search does not
    /// see: a non-ASCII letter that case-folds to an ASCII one (`ſ` is `s`, KELVIN SIGN `k`).
    pub fn hides_words(self) -> bool {
        self.0 & NON_ASCII != 0
    }

    /// Whether the two masks share a byte.
    pub fn meets(self, other: Mask) -> bool {
        self.0 & other.0 != 0
    }

    /// Whether every byte of this mask is in `other`.
    pub fn within(self, other: Mask) -> bool {
        self.0 & !other.0 == 0
    }

    /// Both masks' bytes.
    pub fn union(self, other: Mask) -> Mask {
        Mask(self.0 | other.0)
    }

    fn weight(self) -> u32 {
        (0..64)
            .map(|i| 1u64 << i)
            .filter(|bit| self.0 & bit != 0)
            .map(weight)
            .sum()
    }
}

/// What a chain of transformations does to a value's mask, in short, for a value none of whose
/// decoders has anything to decode: then only white space (and `/` for `\\`) is added, and a
/// word is written only where a byte is removed from between two letters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Passage {
    /// The decoders' escapes: a value holding one takes the long way.
    escapes: Mask,
    base64: bool,
    space_if: Mask,
    slash_if: Mask,
    breaks: Mask,
}

impl Passage {
    pub fn of(chain: &[Transform]) -> Passage {
        let white = Mask(TAB | LF | CR | CONTROL | NON_ASCII);
        let mut p = Passage::default();
        for &t in chain {
            let (escapes, space_if, slash_if) = match t {
                Transform::UrlDecode => (of(b"%"), of(b"+"), 0),
                Transform::HtmlEntityDecode => (of(b"&"), 0, 0),
                Transform::JsDecode => (of(b"\\"), 0, 0),
                Transform::CompressWhitespace => (0, white.0, 0),
                Transform::RemoveComments => (0, of(b"/-#"), 0),
                Transform::CmdLine => (0, white.0 | of(b",;$"), 0),
                Transform::NormalizePath => (0, 0, of(b"\\")),
                Transform::Base64Decode => {
                    p.base64 = true;
                    (0, 0, 0)
                }
                Transform::Lowercase
                | Transform::RemoveWhitespace
                | Transform::RemoveNulls
                | Transform::Trim => (0, 0, 0),
            };
            p.escapes.0 |= escapes;
            p.space_if.0 |= space_if;
            p.slash_if.0 |= slash_if;
            p.breaks.0 |= Mask::breakers(t).0;
        }
        p
    }

    /// For a value of mask `raw`: the transformed value's mask (a superset) and whether its
    /// words are all in the raw value; `None` when a decoder has something to decode.
    pub fn quick(&self, raw: Mask) -> Option<(Mask, bool)> {
        if raw.meets(self.escapes) || (self.base64 && raw.may_be_base64()) {
            return None;
        }
        let mut m = raw;
        if raw.meets(self.space_if) {
            m.0 |= SPACE;
        }
        if raw.meets(self.slash_if) {
            m.0 |= of(b"/");
        }
        Some((m, !raw.hides_words() && !m.meets(self.breaks)))
    }
}

/// What a rule needs of a value: one of its alternatives (its pattern's `|`s multiplied out),
/// and the fewest bytes a value it matches has (no transformation lengthens a value, so a
/// shorter value cannot match after its chain either). An alternative that needs nothing: any
/// value that long may match.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Needs(Vec<Need>, usize);

/// One alternative: clauses of bytes, all of which the value's mask must meet, and maybe
/// words (letters, digits and `_`, lower case), one of which the value must hold in any case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Need {
    bytes: Vec<Mask>,
    words: Option<Vec<Vec<u8>>>,
}

/// Clauses kept per pattern: checking one costs an AND.
const KEEP: usize = 4;
/// Words kept per alternative: more, and it needs no word.
const MAX_WORDS: usize = 512;
/// The shortest word worth looking for.
const MIN_WORD: usize = 3;
/// Alternatives kept per rule: more are merged, neighbours together.
const MAX_BRANCHES: usize = 128;

impl Default for Needs {
    fn default() -> Self {
        Needs(vec![Need::default()], 0)
    }
}

impl Needs {
    /// What a match of `pattern` (as `regex::bytes` reads it) needs. A pattern the analysis
    /// cannot parse needs nothing: it is then run on every value.
    pub fn of_regex(pattern: &str) -> Needs {
        let Ok(hir) = regex_syntax::ParserBuilder::new()
            .utf8(false)
            .build()
            .parse(pattern)
        else {
            return Needs::default();
        };
        let shortest = hir.properties().minimum_len().unwrap_or(0);
        Needs::of(walk(&hir)).at_least(shortest)
    }

    /// What a match of any of `phrases` (ASCII case-insensitive) needs.
    pub fn of_phrases(phrases: &[String]) -> Needs {
        let shortest = phrases.iter().map(String::len).min().unwrap_or(0);
        Needs::of(phrases.iter().map(|p| literal(p.as_bytes())).collect()).at_least(shortest)
    }

    /// `self`, for values of `len` bytes or more.
    fn at_least(self, len: usize) -> Needs {
        let shortest = self.1.max(len);
        Needs(self.0, shortest)
    }

    /// The fewest bytes of a value the rule may match.
    pub fn shortest(&self) -> usize {
        self.1
    }

    fn of(branches: Vec<Need>) -> Needs {
        let mut branches: Vec<Need> = branches.into_iter().map(Need::finish).collect();
        if branches.iter().any(Need::is_nothing) {
            return Needs::default();
        }
        if branches.len() > MAX_BRANCHES {
            branches = branches.into_iter().reduce(either).into_iter().collect();
        }
        Needs(branches, 0)
    }

    /// What a value must hold for `rule` to match it.
    pub fn of_rule(rule: &Rule) -> Needs {
        let n = match &rule.operator {
            Operator::Regex(p) => Needs::of_regex(p),
            Operator::Phrases { list, .. } => Needs::of_phrases(list),
            Operator::ByteRanges(ranges) => Needs::outside(ranges),
            // The XSS detector answers only for a tag, a comment or a doctype (`<`) or an
            // attribute's value (`=`): see `the_xss_detector_needs_a_tag_or_an_attribute`.
            Operator::Detect(Detector::Xss) => Needs::default().and_any_of(b"<="),
            Operator::Detect(Detector::Sqli) => Needs::default().at_least(1),
            Operator::LengthGt(n) => Needs::default().at_least(n + 1),
            // An empty value stands for the client's address.
            Operator::IpMatch(_) | Operator::Check(_) => Needs::default(),
        };
        match &rule.needs_any_of {
            Some(bytes) => n.and_any_of(bytes),
            None => n,
        }
    }

    /// What a value outside `ranges` needs: one byte outside them.
    pub fn outside(ranges: &[[u8; 2]]) -> Needs {
        let mut m = 0;
        for b in 0..=255u8 {
            if !ranges.iter().any(|[lo, hi]| (lo..=hi).contains(&&b)) {
                if b.is_ascii_alphabetic() {
                    return Needs::default().at_least(1);
                }
                m |= BIT[b as usize];
            }
        }
        Needs(
            vec![Need {
                bytes: vec![Mask(m)],
                words: None,
            }],
            1,
        )
    }

    /// `self`, and one byte of `bytes` too (a rule's `needs_any_of`). A letter in the list makes
    /// the clause one the mask cannot tell: it is left out.
    pub fn and_any_of(mut self, bytes: &[u8]) -> Needs {
        if !bytes.iter().any(u8::is_ascii_alphabetic) {
            let m = bytes.iter().fold(0, |m, &b| m | BIT[b as usize]);
            for n in &mut self.0 {
                n.bytes = rarest([std::mem::take(&mut n.bytes), vec![Mask(m)]].concat());
            }
        }
        self.at_least(1)
    }

    /// Whether any value may match.
    pub fn is_nothing(&self) -> bool {
        self.0.iter().any(Need::is_nothing)
    }

    /// Whether a value may match: one alternative's byte clauses met by the transformed
    /// value's mask `m` and, if it needs words and `by_words` (the value's words are all in
    /// the raw value), `has_word()`: the value holds one of the rule's words. What the
    /// engine's gates decide, compiled; here for the tests.
    #[cfg(test)]
    pub fn may_match(&self, m: Mask, by_words: bool, mut has_word: impl FnMut() -> bool) -> bool {
        self.0.iter().any(|n| {
            n.bytes.iter().all(|c| c.meets(m)) && (!by_words || n.words.is_none() || has_word())
        })
    }

    /// Each alternative: its byte clauses, and whether it needs one of the rule's words.
    pub fn alternatives(&self) -> impl Iterator<Item = (&[Mask], bool)> {
        self.0
            .iter()
            .map(|n| (n.bytes.as_slice(), n.words.is_some()))
    }

    /// The words of every alternative.
    pub fn words(&self) -> impl Iterator<Item = &Vec<u8>> {
        self.0.iter().flat_map(|n| n.words.iter().flatten())
    }
}

impl Need {
    fn word(w: Vec<u8>) -> Need {
        Need {
            bytes: Vec::new(),
            words: Some(vec![w]),
        }
    }

    /// Words shorter than [`MIN_WORD`] (`or`, but not `0x`) are in too many values to be
    /// worth looking for.
    fn finish(mut self) -> Need {
        if self
            .words
            .as_ref()
            .is_some_and(|w| w.iter().any(|w| !worth(w)))
        {
            self.words = None;
        }
        self
    }

    fn is_nothing(&self) -> bool {
        self.bytes.is_empty() && self.words.is_none()
    }
}

/// What one HIR node needs, as alternatives (one of which a match meets): a `|` anywhere
/// multiplies out (`x(?:'|")` is `x'` or `x"`), up to [`MAX_BRANCHES`], past which they merge.
fn walk(hir: &Hir) -> Vec<Need> {
    match hir.kind() {
        HirKind::Empty | HirKind::Look(_) => vec![Need::default()],
        HirKind::Literal(lit) => vec![literal(&lit.0)],
        HirKind::Class(c) => {
            let ranges: Vec<(u32, u32)> = match c {
                Class::Bytes(c) => c
                    .ranges()
                    .iter()
                    .map(|r| (u32::from(r.start()), u32::from(r.end())))
                    .collect(),
                Class::Unicode(c) => c
                    .ranges()
                    .iter()
                    .map(|r| (u32::from(r.start()), u32::from(r.end())))
                    .collect(),
            };
            vec![Need {
                bytes: class(&ranges),
                words: word_char(&ranges).map(|b| vec![vec![b]]),
            }]
        }
        HirKind::Repetition(r) if r.min == 0 => vec![Need::default()],
        HirKind::Repetition(r) => walk(&r.sub),
        HirKind::Capture(c) => walk(&c.sub),
        HirKind::Concat(parts) => {
            // Runs of single word characters in a row spell a word (`(?i)union`) every
            // alternative needs; a part that is not one ends the run.
            let mut spelt = Need::default();
            let mut run = Vec::new();
            let mut end_run = |run: &mut Vec<u8>| {
                if !run.is_empty() {
                    spelt = both(&spelt, &Need::word(std::mem::take(run)));
                }
            };
            let mut all = vec![Need::default()];
            for p in parts {
                match p.kind() {
                    HirKind::Literal(lit) => {
                        for &b in lit.0.iter() {
                            if is_word(b) {
                                run.push(b.to_ascii_lowercase());
                            } else {
                                end_run(&mut run);
                            }
                        }
                    }
                    HirKind::Class(_) => {}
                    _ => end_run(&mut run),
                }
                let alts = walk(p);
                if let (HirKind::Class(_), [one]) = (p.kind(), alts.as_slice()) {
                    match &one.words {
                        Some(w) => run.push(w[0][0]),
                        None => end_run(&mut run),
                    }
                }
                all = bounded(
                    all.iter()
                        .flat_map(|a| alts.iter().map(move |b| both(a, b)))
                        .collect(),
                );
            }
            end_run(&mut run);
            all.iter().map(|a| both(a, &spelt)).collect()
        }
        HirKind::Alternation(branches) => bounded(branches.iter().flat_map(walk).collect()),
    }
}

/// At most [`MAX_BRANCHES`] alternatives: more merge, neighbours together. One that needs
/// nothing stands for all.
fn bounded(alts: Vec<Need>) -> Vec<Need> {
    if alts.iter().any(|a| a.clone().finish().is_nothing()) {
        return vec![Need::default()];
    }
    if alts.len() > MAX_BRANCHES {
        // Merge neighbours (they come from the same `|`), those with words apart from those
        // without, so a merged alternative keeps its words.
        let (worded, plain): (Vec<Need>, Vec<Need>) =
            alts.into_iter().partition(|a| a.words.is_some());
        let per = (worded.len() + plain.len()).div_ceil(MAX_BRANCHES);
        return [worded, plain]
            .iter()
            .flat_map(|group| {
                group
                    .chunks(per)
                    .filter_map(|c| c.iter().cloned().reduce(either))
            })
            .collect();
    }
    alts
}

/// What a match needs that meets both `a` and `b`: all their clauses, the better word list.
fn both(a: &Need, b: &Need) -> Need {
    let words = match (&a.words, &b.words) {
        (Some(x), Some(y)) => Some(if better(y, x) { y.clone() } else { x.clone() }),
        (x, y) => x.clone().or_else(|| y.clone()),
    };
    Need {
        bytes: rarest([a.bytes.clone(), b.bytes.clone()].concat()),
        words,
    }
}

/// What a match of `a` or of `b` needs: a clause of each, or'ed (the rarest such pairs); both
/// word lists.
fn either(a: Need, b: Need) -> Need {
    let bytes = rarest(
        a.bytes
            .iter()
            .flat_map(|x| b.bytes.iter().map(move |y| Mask(x.0 | y.0)))
            .collect(),
    );
    let words = match (a.words, b.words) {
        (Some(mut x), Some(y)) => {
            x.extend(y);
            x.sort();
            x.dedup();
            (x.len() <= MAX_WORDS).then_some(x)
        }
        _ => None,
    };
    Need { bytes, words }
}

/// Whether word list `a` skips more values than `b`: its shortest word is longer, or as long
/// with fewer words.
fn better(a: &[Vec<u8>], b: &[Vec<u8>]) -> bool {
    let shortest = |w: &[Vec<u8>]| w.iter().map(Vec::len).min().unwrap_or(0);
    (shortest(a), std::cmp::Reverse(a.len())) > (shortest(b), std::cmp::Reverse(b.len()))
}

/// Whether a word is rare enough to look for.
fn worth(w: &[u8]) -> bool {
    w.len() >= MIN_WORD || (w.len() + 1 == MIN_WORD && w.iter().any(u8::is_ascii_digit))
}

fn is_word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// A literal needs each of its significant bytes, and its longest run of word characters.
fn literal(bytes: &[u8]) -> Need {
    let clauses = bytes
        .iter()
        .map(|&b| BIT[b as usize])
        .filter(|&m| m != 0)
        .map(Mask)
        .collect();
    let words = bytes
        .split(|&b| !is_word(b))
        .max_by_key(|w| w.len())
        .filter(|w| !w.is_empty())
        .map(|w| vec![w.to_ascii_lowercase()]);
    Need {
        bytes: rarest(clauses),
        words,
    }
}

/// A class needs one of its bytes, unless it takes a letter.
fn class(ranges: &[(u32, u32)]) -> Vec<Mask> {
    let mut m = 0;
    for &(lo, hi) in ranges {
        for c in lo..=hi.min(0x7f) {
            if (c as u8).is_ascii_alphabetic() {
                return Vec::new();
            }
            m |= BIT[c as usize];
        }
        if hi >= 0x80 {
            m |= NON_ASCII;
        }
    }
    vec![Mask(m)]
}

/// The word character a class stands for when its ASCII part is that one only, in either case
/// (`[Uu]`; `(?i)k` also takes KELVIN SIGN, which [`Mask::hides_words`] accounts for).
fn word_char(ranges: &[(u32, u32)]) -> Option<u8> {
    let mut chars = Vec::new();
    for &(lo, hi) in ranges {
        if lo >= 0x80 {
            continue;
        }
        if hi >= 0x80 || hi - lo > 1 || chars.len() > 2 {
            return None;
        }
        chars.extend((lo..=hi).map(|c| c as u8));
    }
    let first = chars.first()?.to_ascii_lowercase();
    (is_word(first) && chars.iter().all(|c| c.to_ascii_lowercase() == first)).then_some(first)
}

/// Clauses deduplicated, rarest first, at most [`KEEP`].
fn rarest(mut clauses: Vec<Mask>) -> Vec<Mask> {
    clauses.sort_by_key(|m| (m.weight(), m.0));
    clauses.dedup();
    clauses.truncate(KEEP);
    clauses
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(s: &str) -> Mask {
        Mask::of(s.as_bytes())
    }

    #[test]
    fn a_mask_holds_only_significant_bytes() {
        assert_eq!(bytes("Plain words 123"), Mask(SPACE | DIGIT));
        assert_eq!(bytes("abcXYZ"), Mask(0));
        assert!(bytes("a'b").has(b'\''));
        assert_eq!(bytes("é"), Mask(NON_ASCII));
        assert_eq!(bytes("\x01\x7f"), Mask(CONTROL));
    }

    fn words(n: &Needs) -> Vec<&str> {
        let mut w: Vec<&str> = n
            .words()
            .map(|w| std::str::from_utf8(w).unwrap_or("?"))
            .collect();
        w.sort_unstable();
        w
    }

    /// Whether a value of mask `m` may match, its words aside.
    fn met(n: &Needs, m: Mask) -> bool {
        n.may_match(m, false, || true)
    }

    /// Whether a value of mask `m`, holding none of the rule's words, may match.
    fn met_without_words(n: &Needs, m: Mask) -> bool {
        n.may_match(m, true, || false)
    }

    #[test]
    fn patterns_need_their_punctuation() {
        let n = Needs::of_regex(r"(?i)'\s*or\s+\d+=\d+");
        assert!(met(&n, bytes("' or 1=1")));
        assert!(!met(&n, bytes("it's or not")), "no `=`");
        assert!(!met(&n, bytes("a = b")), "no quote");
        // Either branch: `<script` or `javascript:`.
        let n = Needs::of_regex(r"(?i)<script|javascript:");
        assert!(met(&n, bytes("<")) && met(&n, bytes(":")));
        assert!(!met(&n, bytes("javascript is fun")));
        // A branch of letters alone needs no byte.
        assert!(met(&Needs::of_regex(r"(?i)union\s*select|<x"), Mask(0)));
        // Optional parts need nothing.
        assert!(met(&Needs::of_regex(r"a(?:;b)?c"), Mask(0)));
        assert!(!met(&Needs::of_regex(r"a(?:;b)+c"), bytes("abc")));
        // A negated class takes letters.
        assert!(Needs::of_regex(r"[^']+").is_nothing());
        // Non-ASCII needs the non-ASCII bit.
        assert!(!met(&Needs::of_regex("＜"), bytes("<")));
        assert!(met(&Needs::of_regex("＜"), bytes("＜")));
        // Each branch of a top-level `|` alone: one needs `%` and `{`, one a word.
        let n = Needs::of_regex(r"(?i)%\{\s*[(#@]|\bognlcontext\b");
        assert!(!met_without_words(&n, bytes("a % b")));
        assert!(met_without_words(&n, bytes("%{(")));
        assert!(n.may_match(Mask(0), true, || true));
        // Alternatives inside a concatenation: a clause from each, or'ed.
        let n = Needs::of_regex(r"x(?:'[a-z]*=|;\s+=)");
        assert!(!met(&n, bytes("x'")) && met(&n, bytes("x'=")) && met(&n, bytes("; =")));
    }

    #[test]
    fn patterns_need_their_words() {
        assert_eq!(
            words(&Needs::of_regex(r"(?i)\bunion\s*select\b")),
            ["select"]
        );
        assert_eq!(
            words(&Needs::of_regex(r"(?i)\b(?:sleep|benchmark)\s*\(")),
            ["benchmark", "sleep"]
        );
        // `(?i)k` and `(?i)s` also take KELVIN SIGN and LONG S: a value with non-ASCII is not
        // judged by its words.
        assert_eq!(words(&Needs::of_regex(r"(?i)kill")), ["kill"]);
        assert!(bytes("ſelect").hides_words() && !bytes("select").hides_words());
        assert_eq!(words(&Needs::of_regex(r"kill")), ["kill"]);
        assert_eq!(words(&Needs::of_regex(r"java\.lang\.Runtime")), ["runtime"]);
        assert_eq!(
            words(&Needs::of_regex(r"(?i)on(?:load|error)\s*=")),
            ["error", "load"]
        );
        // Without one of its words, a value cannot match...
        assert!(!met_without_words(
            &Needs::of_regex(r"(?i)union|<"),
            Mask(0)
        ));
        // ...unless a branch needs none, or the words are too short to look for.
        assert!(met_without_words(&Needs::of_regex(r"(?i)x?"), Mask(0)));
        assert!(met_without_words(&Needs::of_regex(r"(?i)\bx\b"), Mask(0)));
    }

    #[test]
    fn phrases_and_byte_lists() {
        let n = Needs::of_phrases(&["/etc/passwd".into(), "boot.ini".into()]);
        assert!(met(&n, bytes("/")) || met(&n, bytes(".")));
        assert!(!met(&n, bytes("etc passwd")));
        assert_eq!(words(&n), ["boot", "passwd"]);
        assert!(!met_without_words(
            &Needs::of_phrases(&["nikto".into(), ";".into()]),
            Mask(0)
        ));
        assert!(Needs::of_phrases(&["nikto".into(), "a".into()]).is_nothing());
        let n = Needs::default().and_any_of(b"'\"=");
        assert!(met(&n, bytes("a=b")) && !met(&n, bytes("a b")));
        assert!(Needs::default().and_any_of(b"a=").is_nothing());
        let n = Needs::outside(&[[1, 255]]);
        assert!(met(&n, bytes("a\0b")) && !met(&n, bytes("a\tb")));
        assert!(met(&Needs::outside(&[[32, 126]]), bytes("\t")));
        assert!(Needs::outside(&[[b'b', 255]]).is_nothing());
    }

    /// libinjection's XSS verdict comes from a tag, comment or doctype token (each opened by
    /// `<`) or from an attribute's value (after `=`): values dense in the rest of what its
    /// HTML5 tokenizer reads (quotes, event-handler names, URLs, `/`, `>`, entities) never
    /// have it, and most of them with `x onerror=` in front do.
    #[test]
    fn the_xss_detector_needs_a_tag_or_an_attribute() {
        let pieces = [
            " ",
            "'",
            "\"",
            "`",
            "/",
            ">",
            "!",
            "-",
            "?",
            "&",
            "#",
            ";",
            ":",
            "(",
            ")",
            "onerror",
            "onload",
            "style",
            "src",
            "href",
            "javascript",
            "vbscript",
            "data",
            "script",
            "svg",
            "xss",
            "alert(1)",
            "expression",
            "import",
            "entity",
            "[if",
            "xml",
            "\t",
            "\n",
            "\0",
            "\u{a0}",
            "x",
        ];
        let mut next = crate::draws(0x2545_f491_4f6c_dd1du64);
        let mut flagged_with = 0;
        for _ in 0..20_000 {
            let input: String = (0..1 + next(10))
                .map(|_| pieces[next(pieces.len())])
                .collect();
            assert!(
                !libinjectionrs::detect_xss(input.as_bytes()).is_injection(),
                "{input:?} is XSS without < or ="
            );
            let with = format!("x onerror={input}");
            flagged_with += usize::from(libinjectionrs::detect_xss(with.as_bytes()).is_injection());
        }
        assert!(flagged_with > 10_000, "{flagged_with}");
    }

    #[test]
    fn decoders_may_write_any_byte_but_only_at_their_escapes() {
        assert_eq!(bytes("a%27b").after(Transform::UrlDecode), Mask::ALL);
        assert_eq!(
            bytes("a+b").after(Transform::UrlDecode),
            Mask(SPACE | BIT[b'+' as usize])
        );
        assert_eq!(bytes("a&lt;").after(Transform::HtmlEntityDecode), Mask::ALL);
        assert_eq!(bytes("a\\x27").after(Transform::JsDecode), Mask::ALL);
        assert_eq!(bytes("YWJj").after(Transform::Base64Decode), Mask::ALL);
        assert_eq!(bytes(" YW+/Jj= ").after(Transform::Base64Decode), Mask::ALL);
        assert_eq!(bytes("Tzo4OiJ9").after(Transform::Base64Decode), Mask::ALL);
        assert_eq!(bytes("a.b").after(Transform::Base64Decode), bytes("."));
        assert!(bytes("YWJj").writes_words(Transform::Base64Decode));
        assert!(!bytes("a.b").writes_words(Transform::Base64Decode));
        assert!(bytes("c'a't").writes_words(Transform::CmdLine));
        assert!(!bytes("cat /etc").writes_words(Transform::CmdLine));
        assert!(bytes("un%69on").writes_words(Transform::UrlDecode));
        assert!(!bytes("a+b").writes_words(Transform::UrlDecode));
        assert_eq!(bytes("plain").after(Transform::UrlDecode), Mask(0));
        assert!(bytes("a\\b").after(Transform::NormalizePath).has(b'/'));
        assert!(bytes("a\tb").after(Transform::CompressWhitespace).has(b' '));
    }
}
