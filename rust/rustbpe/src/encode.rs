//! Encoding and decoding with tiktoken's semantics, faster.
//!
//! tiktoken encodes a piece as: the piece's own rank if the whole piece is a token; otherwise start from single
//! bytes and repeatedly merge the adjacent pair whose concatenation has the lowest rank (leftmost on ties). We do
//! exactly that, with these choices:
//! - Pair lookup by ids instead of hashing byte strings: `pair[(left id, right id)]` = rank of left + right, built
//!   from EVERY split of every token into two tokens (not only the training merge), so any concatenation tiktoken
//!   would find, we find.
//! - Pieces up to 128 bytes merge in stack arrays (no allocation; O(n^2) on tiny n like tiktoken); longer pieces use
//!   a min-heap of (rank, position) over a linked list, O(n log n), so a 100 MB run of one letter stays linear-ish
//!   where tiktoken is quadratic.
//!
//! Not built: a per-thread piece -> ids cache (tiktoken-style). Most pieces of English text are whole tokens, found
//! with one inline-key lookup, so a cache could only help the rest; untested for lack of time.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::hash::FastMap;
use crate::Error;

const NO_RANK: u32 = u32::MAX;
const SMALL: usize = 128;

pub struct Encoder {
    /// Token bytes by id (non-special ids only).
    pub vocab: Vec<Vec<u8>>,
    byte_id: [u32; 256],
    /// Whole-token lookup, the hot path (96% of pieces of English text are whole tokens): tokens up to 7 bytes
    /// (85% of pieces) keyed inline as a u64, up to 15 bytes as a u128, longer ones by their bytes. Inline keys
    /// avoid a pointer chase and memcmp (perf: ~12% of samples with boxed keys) and small entries keep more of the
    /// table in cache; the probe's cache miss is still the largest single cost of encoding.
    whole_tiny: FastMap<u64, u32>,
    whole_short: FastMap<u128, u32>,
    whole_long: FastMap<Box<[u8]>, u32>,
    pair: FastMap<u64, u32>,
}

#[inline(always)]
fn tiny_key(b: &[u8]) -> u64 {
    let mut buf = [0u8; 8];
    buf[..b.len()].copy_from_slice(b);
    buf[7] = b.len() as u8;
    u64::from_le_bytes(buf)
}

#[inline(always)]
fn short_key(b: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    buf[15] = b.len() as u8;
    u128::from_le_bytes(buf)
}

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Encoder {
    /// `vocab[i]` is the bytes of rank i. Every single byte must be a token. A byte string that appears at several
    /// ranks (possible in principle after BPE training, not seen on real text) encodes as its lowest rank, the
    /// convention of nanochat.tokenizer's tiktoken and HF exports.
    pub fn new(vocab: Vec<Vec<u8>>) -> Result<Encoder, Error> {
        if vocab.len() >= NO_RANK as usize {
            return Err(Error::Value(format!("too many tokens: {}", vocab.len())));
        }
        let mut enc = Encoder {
            vocab: Vec::new(),
            byte_id: [NO_RANK; 256],
            whole_tiny: FastMap::default(),
            whole_short: FastMap::default(),
            whole_long: FastMap::default(),
            pair: FastMap::default(),
        };
        for (id, bytes) in vocab.iter().enumerate() {
            if bytes.is_empty() {
                return Err(Error::Value(format!("token {id} is empty")));
            }
            if bytes.len() < 8 {
                enc.whole_tiny.entry(tiny_key(bytes)).or_insert(id as u32);
            } else if bytes.len() < 16 {
                enc.whole_short.entry(short_key(bytes)).or_insert(id as u32);
            } else {
                enc.whole_long.entry(bytes.clone().into_boxed_slice()).or_insert(id as u32);
            }
        }
        for b in 0..256usize {
            match enc.token_id(&[b as u8]) {
                Some(id) => enc.byte_id[b] = id,
                None => return Err(Error::Value(format!("byte {b} (0x{b:02x}) has no token; every single byte needs one"))),
            }
        }
        // Only split points where both sides have the length of some token: trying every split of every token
        // hashes O(len^2) bytes per token, which was quadratic for a vocabulary trained on one long run of a letter
        // (tokens of 2^k bytes); this keeps ordinary vocabularies (lengths 1..~40) unchanged.
        let mut has_len = vec![false; vocab.iter().map(|t| t.len()).max().unwrap_or(0) + 1];
        for t in &vocab {
            has_len[t.len()] = true;
        }
        let lens: Vec<usize> = (1..has_len.len()).filter(|&l| has_len[l]).collect();
        let mut pair: FastMap<u64, u32> = FastMap::default();
        for bytes in &vocab {
            let Some(id) = enc.token_id(bytes) else { continue };
            for &k in lens.iter().take_while(|&&k| k < bytes.len()) {
                if !has_len[bytes.len() - k] {
                    continue;
                }
                if let (Some(l), Some(r)) = (enc.token_id(&bytes[..k]), enc.token_id(&bytes[k..])) {
                    pair.insert(key(l, r), id);
                }
            }
        }
        enc.pair = pair;
        enc.vocab = vocab;
        Ok(enc)
    }

    #[inline(always)]
    fn rank(&self, a: u32, b: u32) -> u32 {
        *self.pair.get(&key(a, b)).unwrap_or(&NO_RANK)
    }

    /// Id of a whole byte string if it is a token.
    #[inline(always)]
    pub fn token_id(&self, bytes: &[u8]) -> Option<u32> {
        if bytes.len() < 8 {
            self.whole_tiny.get(&tiny_key(bytes)).copied()
        } else if bytes.len() < 16 {
            self.whole_short.get(&short_key(bytes)).copied()
        } else {
            self.whole_long.get(bytes).copied()
        }
    }

    /// Appends the ids of one piece.
    #[inline]
    pub fn encode_piece(&self, piece: &[u8], out: &mut Vec<u32>) {
        if piece.len() == 1 {
            out.push(self.byte_id[piece[0] as usize]);
        } else if let Some(id) = self.token_id(piece) {
            out.push(id);
        } else if piece.len() <= SMALL {
            self.merge_small(piece, out);
        } else {
            self.merge_long(piece, out);
        }
    }

    fn merge_small(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        let mut ids = [0u32; SMALL];
        let mut ranks = [NO_RANK; SMALL];
        for (k, &b) in piece.iter().enumerate() {
            ids[k] = self.byte_id[b as usize];
        }
        for k in 0..n - 1 {
            ranks[k] = self.rank(ids[k], ids[k + 1]);
        }
        let mut n = n;
        loop {
            // ranks[k] is the rank of merging ids[k] and ids[k + 1]; find the lowest, leftmost.
            let mut best = NO_RANK;
            let mut at = 0;
            for (k, &r) in ranks[..n - 1].iter().enumerate() {
                if r < best {
                    best = r;
                    at = k;
                }
            }
            if best == NO_RANK {
                break;
            }
            ids[at] = best;
            ids.copy_within(at + 2..n, at + 1);
            ranks.copy_within(at + 1..n - 1, at);
            n -= 1;
            ranks[n - 1] = NO_RANK;
            if at > 0 {
                ranks[at - 1] = self.rank(ids[at - 1], ids[at]);
            }
            if at + 1 < n {
                ranks[at] = self.rank(ids[at], ids[at + 1]);
            }
            if n == 1 {
                break;
            }
        }
        out.extend_from_slice(&ids[..n]);
    }

    fn merge_long(&self, piece: &[u8], out: &mut Vec<u32>) {
        let n = piece.len();
        let mut ids: Vec<u32> = piece.iter().map(|&b| self.byte_id[b as usize]).collect();
        let mut next: Vec<u32> = (1..=n as u32).collect();
        let mut prev: Vec<u32> = (0..n as u32).map(|k| k.wrapping_sub(1)).collect();
        let mut alive = vec![true; n];
        let mut heap: BinaryHeap<Reverse<(u32, u32)>> = BinaryHeap::new();
        for k in 0..n - 1 {
            let r = self.rank(ids[k], ids[k + 1]);
            if r != NO_RANK {
                heap.push(Reverse((r, k as u32)));
            }
        }
        while let Some(Reverse((r, k))) = heap.pop() {
            let k = k as usize;
            // Valid only if the pair at k is still the same pair with the same rank.
            if !alive[k] || next[k] as usize >= n {
                continue;
            }
            let j = next[k] as usize;
            if self.rank(ids[k], ids[j]) != r {
                continue;
            }
            ids[k] = r;
            alive[j] = false;
            next[k] = next[j];
            if (next[k] as usize) < n {
                prev[next[k] as usize] = k as u32;
                let r2 = self.rank(ids[k], ids[next[k] as usize]);
                if r2 != NO_RANK {
                    heap.push(Reverse((r2, k as u32)));
                }
            }
            let p = prev[k];
            if p != u32::MAX {
                let r2 = self.rank(ids[p as usize], ids[k]);
                if r2 != NO_RANK {
                    heap.push(Reverse((r2, p)));
                }
            }
        }
        let mut k = 0usize;
        while k < n {
            out.push(ids[k]);
            k = next[k] as usize;
        }
    }

    /// tiktoken's algorithm on byte strings, kept as the reference for tests.
    pub fn encode_piece_reference(&self, piece: &[u8]) -> Vec<u32> {
        if let Some(id) = self.token_id(piece) {
            return vec![id];
        }
        let mut parts: Vec<Vec<u8>> = piece.iter().map(|&b| vec![b]).collect();
        loop {
            let mut best: Option<(u32, usize)> = None;
            for k in 0..parts.len().saturating_sub(1) {
                let cat = [parts[k].as_slice(), parts[k + 1].as_slice()].concat();
                if let Some(r) = self.token_id(&cat) {
                    if best.map_or(true, |(br, _)| r < br) {
                        best = Some((r, k));
                    }
                }
            }
            let Some((_, k)) = best else { break };
            let right = parts.remove(k + 1);
            parts[k].extend(right);
        }
        parts.iter().map(|p| self.token_id(p).unwrap()).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pretokenize::Splitter;
    use crate::testutil::{random_text, Rng};
    use crate::train::{train_merges, PieceCounter};

    fn trained(texts: &[String], merges: usize) -> Encoder {
        let s = Splitter::new("nanochat").unwrap();
        let mut pc = PieceCounter::new();
        pc.add_batch(&s, texts).unwrap();
        let m = train_merges(pc.into_words(), merges, false);
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for (a, b) in m {
            let t = [vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat();
            vocab.push(t);
        }
        Encoder::new(vocab).unwrap()
    }

    #[test]
    fn matches_tiktoken_reference_on_random_pieces() {
        let mut rng = Rng(11);
        let texts: Vec<String> = (0..200).map(|_| random_text(&mut rng, 40)).collect();
        let enc = trained(&texts, 500);
        for _ in 0..3000 {
            let n = 1 + rng.below(12);
            let t = random_text(&mut rng, n);
            let mut out = Vec::new();
            enc.encode_piece(t.as_bytes(), &mut out);
            assert_eq!(out, enc.encode_piece_reference(t.as_bytes()), "{t:?}");
        }
    }

    #[test]
    fn long_pieces_use_the_same_rule() {
        let texts = vec!["ab".repeat(50) + " " + &"abc".repeat(30) + " aaaaaaaaaaaaaaaaa"; 3];
        let enc = trained(&texts, 60);
        for piece in ["ab".repeat(200), "a".repeat(1000), "abc".repeat(77), "aab".repeat(90)] {
            let mut small_or_long = Vec::new();
            enc.encode_piece(piece.as_bytes(), &mut small_or_long);
            assert_eq!(small_or_long, enc.encode_piece_reference(piece.as_bytes()));
            let mut long = Vec::new();
            enc.merge_long(piece.as_bytes(), &mut long);
            assert_eq!(long, small_or_long);
        }
    }

    #[test]
    fn missing_byte_is_an_error() {
        let vocab: Vec<Vec<u8>> = (0..=254u8).map(|b| vec![b]).collect();
        assert!(matches!(Encoder::new(vocab), Err(Error::Value(m)) if m.contains("255")));
    }
}
