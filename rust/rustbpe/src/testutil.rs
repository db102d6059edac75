//! Deterministic random text for the crate's differential tests.

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545F4914F6CDD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

const FRAGMENTS: &[&str] = &[
    "a", "Z", "the", " quick", "Ünïcödé", "é", "ß", "ſ", "1", "42", "12345", "٣", "½", "Ⅻ", " ", "  ", "   ", "\t",
    "\n", "\r\n", "\n\n", " \n", "\u{85}", "\u{a0}", "\u{2028}", "\u{3000}", "'", "'s", "'S", "'t", "'LL", "'ll",
    "'Ve", "'re", "'d", "'M", "'x", "don't", "I'M", ".", "!", "?!", "...", "-", "_", "(", ")", "\"", "$", "€", "中文",
    "字", "😀", "👍🏽", "x\u{301}", "\u{301}", "\u{200d}", "\u{feff}", "ḁ", "Ω", "ω", "ǅ", "ʰ", "#", "\\", "\u{0}",
];

/// Text of about `n` fragments drawn from letters, digits, whitespace runs, newlines, contractions in mixed case,
/// punctuation, marks, CJK, emoji and random code points from the whole Unicode range.
pub fn random_text(rng: &mut Rng, n: usize) -> String {
    let mut s = String::new();
    for _ in 0..n {
        match rng.below(10) {
            0 => loop {
                if let Some(c) = char::from_u32(rng.below(0x110000) as u32) {
                    s.push(c);
                    break;
                }
            },
            1 => {
                if let Some(c) = char::from_u32(rng.below(0x3000) as u32) {
                    s.push(c)
                }
            }
            _ => s.push_str(FRAGMENTS[rng.below(FRAGMENTS.len())]),
        }
    }
    s
}
