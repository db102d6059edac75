//! Unicode character classes for the hand-written split scanners.
//!
//! The classes (`\p{L}`, `\p{N}`, `\s`) and the case-insensitive letters of the contraction branch are read out of
//! `regex-syntax`, the same crate (and so the same Unicode tables) that fancy-regex compiles the patterns with, so the
//! scanners and the regex can never disagree about what a letter is. They are packed once into a two-level table:
//! 256-entry blocks of class bits, deduplicated, indexed by code point >> 8 (about 60 KB in all).

use std::collections::HashMap;
use std::sync::OnceLock;

pub const LETTER: u8 = 1;
pub const NUMBER: u8 = 2;
pub const SPACE: u8 = 4;

pub struct Classes {
    ascii: [u8; 128],
    index: Vec<u16>,
    blocks: Vec<u8>,
    /// Case-insensitive variants of the ASCII letters used by `(?i:[sdmt]|ll|ve|re)`, e.g. s -> {S, s, U+017F}.
    fold: Vec<(u8, Vec<u32>)>,
}

static CLASSES: OnceLock<Classes> = OnceLock::new();

pub fn classes() -> &'static Classes {
    CLASSES.get_or_init(build)
}

fn ranges(pattern: &str) -> Vec<(u32, u32)> {
    use regex_syntax::hir::{Class, HirKind};
    let hir = regex_syntax::parse(pattern).expect("built-in character class parses");
    match hir.kind() {
        HirKind::Class(Class::Unicode(c)) => {
            c.ranges().iter().map(|r| (r.start() as u32, r.end() as u32)).collect()
        }
        HirKind::Literal(lit) => {
            let c = std::str::from_utf8(&lit.0).expect("utf-8 literal").chars().next().unwrap() as u32;
            vec![(c, c)]
        }
        other => panic!("{pattern} is not a Unicode class: {other:?}"),
    }
}

fn build() -> Classes {
    let mut flat = vec![0u8; 0x110000];
    for (pattern, bit) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
        for (lo, hi) in ranges(pattern) {
            for cp in lo..=hi {
                flat[cp as usize] |= bit;
            }
        }
    }
    let mut ascii = [0u8; 128];
    ascii.copy_from_slice(&flat[..128]);
    let mut seen: HashMap<&[u8], u16> = HashMap::new();
    let mut blocks = Vec::new();
    let mut index = Vec::with_capacity(0x1100);
    for block in flat.chunks(256) {
        let next = (blocks.len() / 256) as u16;
        let id = *seen.entry(block).or_insert_with(|| {
            blocks.extend_from_slice(block);
            next
        });
        index.push(id);
    }
    let fold = b"sdmtlver"
        .iter()
        .map(|&c| {
            let chars = ranges(&format!("(?i:{})", c as char))
                .into_iter()
                .flat_map(|(lo, hi)| lo..=hi)
                .collect();
            (c, chars)
        })
        .collect();
    Classes { ascii, index, blocks, fold }
}

impl Classes {
    /// Class bits (LETTER | NUMBER | SPACE, or 0 for "anything else") of a code point.
    #[inline(always)]
    pub fn of(&self, cp: u32) -> u8 {
        if cp < 128 {
            self.ascii[cp as usize]
        } else {
            let block = self.index[(cp >> 8) as usize] as usize;
            self.blocks[(block << 8) | (cp & 0xFF) as usize]
        }
    }

    /// Whether `cp` matches the ASCII letter `lower` case-insensitively (Unicode simple case folding).
    #[inline]
    pub fn fold_eq(&self, cp: u32, lower: u8) -> bool {
        if cp == lower as u32 || cp == lower.to_ascii_uppercase() as u32 {
            return true;
        }
        cp >= 128 && self.fold.iter().any(|(c, set)| *c == lower && set.contains(&cp))
    }
}

/// Decodes the character starting at byte `i` of valid UTF-8; returns (code point, byte length).
#[inline(always)]
pub fn decode(b: &[u8], i: usize) -> (u32, usize) {
    let x = b[i];
    if x < 0x80 {
        (x as u32, 1)
    } else if x < 0xE0 {
        ((((x & 0x1F) as u32) << 6) | (b[i + 1] & 0x3F) as u32, 2)
    } else if x < 0xF0 {
        ((((x & 0x0F) as u32) << 12) | (((b[i + 1] & 0x3F) as u32) << 6) | (b[i + 2] & 0x3F) as u32, 3)
    } else {
        (
            (((x & 0x07) as u32) << 18)
                | (((b[i + 1] & 0x3F) as u32) << 12)
                | (((b[i + 2] & 0x3F) as u32) << 6)
                | (b[i + 3] & 0x3F) as u32,
            4,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_agree_with_std_on_stable_properties() {
        // White_Space is stable across Unicode versions; General_Category N and L grow, so spot-check those (the
        // scanners are compared with fancy-regex, which reads the same regex-syntax tables, in pretokenize's tests).
        let c = classes();
        for cp in 0..0x3000u32 {
            if let Some(ch) = char::from_u32(cp) {
                assert_eq!(c.of(cp) & SPACE != 0, ch.is_whitespace(), "whitespace {cp:#x}");
            }
        }
        for ch in ['7', '\u{661}', '½', 'Ⅻ'] {
            assert_eq!(c.of(ch as u32), NUMBER, "{ch}");
        }
        for ch in ['a', 'Z', 'é', 'ß', '中', 'ǅ', 'ʰ'] {
            assert_eq!(c.of(ch as u32), LETTER, "{ch}");
        }
        for ch in ['.', '\'', '\u{301}', '😀', '\u{0}'] {
            assert_eq!(c.of(ch as u32), 0, "{ch}");
        }
        assert!(c.fold_eq(0x17F, b's') && c.fold_eq('S' as u32, b's') && !c.fold_eq('x' as u32, b's'));
    }

    #[test]
    fn decode_matches_std() {
        let s = "aé中😀\u{85}";
        let b = s.as_bytes();
        let mut i = 0;
        for ch in s.chars() {
            let (cp, len) = decode(b, i);
            assert_eq!((cp, len), (ch as u32, ch.len_utf8()));
            i += len;
        }
    }
}
