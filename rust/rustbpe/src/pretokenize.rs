//! Splitting text into pieces ("pretokens") before BPE.
//!
//! - Three built-in patterns: `nanochat` (GPT-4's cl100k split with digit groups of 1-2, the default), `gpt4`
//!   (cl100k, 1-3 digits) and `gpt2`. Each has a hand-written scanner that returns exactly the pieces the regex would
//!   (tests/: a differential fuzz test against fancy-regex on random Unicode and real text). The scanners walk the
//!   text once, so a 100 MB run of one character is linear, where a backtracking engine can go quadratic.
//! - Any other pattern is compiled with fancy-regex (the engine tiktoken and PyPI rustbpe use); text between matches
//!   is dropped, as in tiktoken.

use crate::unicode::{classes, decode, Classes, LETTER, NUMBER, SPACE};
use crate::Error;

pub const NANOCHAT_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
pub const GPT4_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+";
pub const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+";

/// (name, regex) of the built-in patterns.
pub const PATTERNS: [(&str, &str); 3] = [("nanochat", NANOCHAT_PATTERN), ("gpt4", GPT4_PATTERN), ("gpt2", GPT2_PATTERN)];

/// Resolves a built-in name to its regex; any other string is returned as is.
pub fn resolve_pattern(pattern: &str) -> &str {
    PATTERNS.iter().find(|(name, _)| *name == pattern).map(|(_, re)| *re).unwrap_or(pattern)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Builtin {
    /// GPT-4 family; the field is the longest digit group (2 for nanochat, 3 for cl100k).
    Gpt4(usize),
    Gpt2,
}

pub enum Splitter {
    Scan(Builtin, &'static Classes),
    Regex(Box<fancy_regex::Regex>),
}

impl std::fmt::Debug for Splitter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Splitter::Scan(b, _) => write!(f, "Scan({b:?})"),
            Splitter::Regex(r) => write!(f, "Regex({:?})", r.as_str()),
        }
    }
}

impl Splitter {
    /// A splitter for a built-in name or any regex; a built-in regex string also gets its scanner.
    pub fn new(pattern: &str) -> Result<Splitter, Error> {
        let regex = resolve_pattern(pattern);
        let builtin = match regex {
            NANOCHAT_PATTERN => Some(Builtin::Gpt4(2)),
            GPT4_PATTERN => Some(Builtin::Gpt4(3)),
            GPT2_PATTERN => Some(Builtin::Gpt2),
            _ => None,
        };
        match builtin {
            Some(b) => Ok(Splitter::Scan(b, classes())),
            None => Splitter::regex(regex),
        }
    }

    /// Always the regex engine (the scanners' reference in tests).
    pub fn regex(regex: &str) -> Result<Splitter, Error> {
        fancy_regex::Regex::new(regex)
            .map(|r| Splitter::Regex(Box::new(r)))
            .map_err(|e| Error::Value(format!("invalid split pattern {regex:?}: {e}")))
    }

    /// Calls `f` on every piece of `text`, in order.
    #[inline]
    pub fn for_each<'a>(&self, text: &'a str, mut f: impl FnMut(&'a str)) -> Result<(), Error> {
        match self {
            Splitter::Scan(kind, cls) => {
                let b = text.as_bytes();
                let mut i = 0;
                while i < b.len() {
                    let end = match *kind {
                        Builtin::Gpt4(max_digits) => gpt4_end(cls, b, i, max_digits),
                        Builtin::Gpt2 => gpt2_end(cls, b, i),
                    };
                    // SAFETY-free: the scanners only stop on character boundaries, which `get` re-checks.
                    f(&text[i..end]);
                    i = end;
                }
                Ok(())
            }
            Splitter::Regex(re) => {
                for m in re.find_iter(text) {
                    let m = m.map_err(|e| Error::Runtime(format!("split pattern failed on the input: {e}")))?;
                    if !m.as_str().is_empty() {
                        f(m.as_str());
                    }
                }
                Ok(())
            }
        }
    }

    pub fn split<'a>(&self, text: &'a str) -> Result<Vec<&'a str>, Error> {
        let mut out = Vec::new();
        self.for_each(text, |p| out.push(p))?;
        Ok(out)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Scanners. Each returns the end of the piece that starts at byte `i`. Both patterns cover every character (every
// char is a letter, a number, whitespace or "other", and each class has a branch), so pieces are contiguous.

#[inline(always)]
fn run_end(cls: &Classes, b: &[u8], mut j: usize, bit: u8) -> usize {
    while j < b.len() {
        let (c, l) = decode(b, j);
        if cls.of(c) & bit == 0 {
            break;
        }
        j += l;
    }
    j
}

/// End of a run of "other" characters (not whitespace, letter or number).
#[inline(always)]
fn other_end(cls: &Classes, b: &[u8], mut j: usize) -> usize {
    while j < b.len() {
        let (c, l) = decode(b, j);
        if cls.of(c) != 0 {
            break;
        }
        j += l;
    }
    j
}

/// Scans a whitespace run from `i`; returns (end, end of its last \r or \n if any, start of its last char, chars).
#[inline(always)]
fn space_run(cls: &Classes, b: &[u8], i: usize) -> (usize, Option<usize>, usize, usize) {
    let (mut j, mut last_nl, mut last_start, mut count) = (i, None, i, 0);
    while j < b.len() {
        let (c, l) = decode(b, j);
        if cls.of(c) & SPACE == 0 {
            break;
        }
        if c == '\r' as u32 || c == '\n' as u32 {
            last_nl = Some(j + l);
        }
        last_start = j;
        j += l;
        count += 1;
    }
    (j, last_nl, last_start, count)
}

/// `'(?i:[sdmt]|ll|ve|re)` after the apostrophe at `j - 1`.
#[inline]
fn contraction_ci(cls: &Classes, b: &[u8], j: usize) -> Option<usize> {
    if j >= b.len() {
        return None;
    }
    let (c1, l1) = decode(b, j);
    if [b's', b'd', b'm', b't'].iter().any(|&x| cls.fold_eq(c1, x)) {
        return Some(j + l1);
    }
    if j + l1 >= b.len() {
        return None;
    }
    let (c2, l2) = decode(b, j + l1);
    for (x, y) in [(b'l', b'l'), (b'v', b'e'), (b'r', b'e')] {
        if cls.fold_eq(c1, x) && cls.fold_eq(c2, y) {
            return Some(j + l1 + l2);
        }
    }
    None
}

/// `'s|'t|'re|'ve|'m|'ll|'d` after the apostrophe at `j - 1` (case-sensitive).
#[inline]
fn contraction_cs(b: &[u8], j: usize) -> Option<usize> {
    let rest = &b[j.min(b.len())..];
    for suffix in [&b"s"[..], b"t", b"re", b"ve", b"m", b"ll", b"d"] {
        if rest.starts_with(suffix) {
            return Some(j + suffix.len());
        }
    }
    None
}

/// GPT-4 family: `'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,D}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+`
#[inline]
pub fn gpt4_end(cls: &Classes, b: &[u8], i: usize, max_digits: usize) -> usize {
    let (c, l) = decode(b, i);
    let k = cls.of(c);
    if k & LETTER != 0 {
        return run_end(cls, b, i + l, LETTER);
    }
    if k & NUMBER != 0 {
        let (mut j, mut n) = (i + l, 1);
        while n < max_digits && j < b.len() {
            let (c2, l2) = decode(b, j);
            if cls.of(c2) & NUMBER == 0 {
                break;
            }
            j += l2;
            n += 1;
        }
        return j;
    }
    if c == '\'' as u32 {
        if let Some(e) = contraction_ci(cls, b, i + l) {
            return e;
        }
    }
    let j = i + l;
    // [^\r\n\p{L}\p{N}]?+\p{L}+ with the optional char present, then ` ?[^\s\p{L}\p{N}]++` with the space present.
    if c != '\r' as u32 && c != '\n' as u32 && j < b.len() {
        let (c2, l2) = decode(b, j);
        let k2 = cls.of(c2);
        if k2 & LETTER != 0 {
            return run_end(cls, b, j + l2, LETTER);
        }
        if c == ' ' as u32 && k2 == 0 {
            return newlines_end(b, other_end(cls, b, j + l2));
        }
    }
    if k == 0 {
        return newlines_end(b, other_end(cls, b, j));
    }
    // Whitespace: \s*[\r\n] (up to the run's last newline), else \s+(?!\S) (all but the last char when a non-space
    // follows), else \s+ (a single char before a non-space).
    let (end, last_nl, last_start, count) = space_run(cls, b, i);
    if let Some(e) = last_nl {
        return e;
    }
    if end == b.len() || count == 1 {
        end
    } else {
        last_start
    }
}

#[inline(always)]
fn newlines_end(b: &[u8], mut j: usize) -> usize {
    while j < b.len() && (b[j] == b'\r' || b[j] == b'\n') {
        j += 1;
    }
    j
}

/// GPT-2: `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
#[inline]
pub fn gpt2_end(cls: &Classes, b: &[u8], i: usize) -> usize {
    let (c, l) = decode(b, i);
    if c == '\'' as u32 {
        if let Some(e) = contraction_cs(b, i + l) {
            return e;
        }
    }
    let mut k = cls.of(c);
    let mut j = i + l;
    if c == ' ' as u32 && j < b.len() {
        let (c2, l2) = decode(b, j);
        let k2 = cls.of(c2);
        if k2 & SPACE == 0 {
            k = k2;
            j += l2;
        }
    }
    if k & LETTER != 0 {
        return run_end(cls, b, j, LETTER);
    }
    if k & NUMBER != 0 {
        return run_end(cls, b, j, NUMBER);
    }
    if k == 0 {
        return other_end(cls, b, j);
    }
    let (end, _, last_start, count) = space_run(cls, b, i);
    if end == b.len() || count == 1 {
        end
    } else {
        last_start
    }
}

// ---------------------------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_text, Rng};

    /// (scanner, regex) for each built-in pattern, compiled once.
    fn pairs() -> Vec<(Splitter, Splitter)> {
        PATTERNS
            .iter()
            .map(|(name, re)| {
                let fast = Splitter::new(name).unwrap();
                assert!(matches!(fast, Splitter::Scan(..)));
                (fast, Splitter::regex(re).unwrap())
            })
            .collect()
    }

    fn check(pairs: &[(Splitter, Splitter)], text: &str) {
        for (fast, slow) in pairs {
            let (a, b) = (fast.split(text).unwrap(), slow.split(text).unwrap());
            assert_eq!(a, b, "{fast:?} disagrees with {slow:?} on {text:?}");
        }
    }

    #[test]
    fn known_splits() {
        let s = Splitter::new("nanochat").unwrap();
        assert_eq!(s.split("Hello world's 12345  \n\n  x!!\n").unwrap(),
                   vec!["Hello", " world", "'s", " ", "12", "34", "5", "  \n\n", " ", " x", "!!\n"]);
        let g2 = Splitter::new("gpt2").unwrap();
        assert_eq!(g2.split("I'm  12345 ok?!").unwrap(), vec!["I", "'m", " ", " 12345", " ok", "?!"]);
    }

    #[test]
    fn scanners_match_regex_on_random_unicode() {
        let mut rng = Rng(0x5eed);
        let pairs = pairs();
        for round in 0..3000 {
            check(&pairs, &random_text(&mut rng, 1 + round % 60));
        }
    }

    #[test]
    fn scanners_match_regex_on_edge_cases() {
        let cases = ["", " ", "\n", "  ", "'", "'S", "'ſ", "'LL", "'Ve", "'rE", "'x", "a'", "''s", " '", " 'll",
            "\r\n\r\n  ", "  \t\n x", "\u{85}a", "\u{a0}\u{a0}b", "1\u{661}\u{2155}", " 1", "  .", " .\n\n.",
            "x\u{300}y", "\t.", "a  ", "  a", "!!!\r\r", " \u{3000}", "'\u{17f}t", "don't I'LL", "\u{1F600}a"];
        let pairs = pairs();
        for text in cases {
            check(&pairs, text);
        }
    }

    #[test]
    fn scanners_match_regex_on_books_when_present() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/data/books/text");
        let Ok(entries) = std::fs::read_dir(&dir) else { return };
        let pairs = pairs();
        for e in entries.flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            // 40 KB from the middle of each book (debug-build regex is slow; the full books run in pytest).
            let mut start = text.len() / 2;
            while !text.is_char_boundary(start) {
                start -= 1;
            }
            let mut end = (start + 40_000).min(text.len());
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            check(&pairs, &text[start..end]);
        }
    }

    #[test]
    fn long_runs_are_linear() {
        let s = Splitter::new("nanochat").unwrap();
        for unit in ["a", " ", "1", "!", "\n", " \t"] {
            // 4 MB in one run: linear takes well under a second even in a debug build on a busy machine; a
            // quadratic scanner would take hours. (A ratio test of two sizes was flaky under parallel tests.)
            let text = unit.repeat(4_000_000 / unit.len());
            let t = std::time::Instant::now();
            let pieces = s.split(&text).unwrap();
            assert_eq!(pieces.concat(), text);
            assert!(t.elapsed().as_secs_f64() < 10.0, "{unit:?} took {:?}", t.elapsed());
        }
    }

    #[test]
    fn bad_pattern_names_the_error() {
        let e = Splitter::new("(unclosed").unwrap_err();
        assert!(matches!(e, Error::Value(ref m) if m.contains("(unclosed")), "{e:?}");
    }
}
