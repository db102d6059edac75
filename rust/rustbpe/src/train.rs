//! BPE training: count pieces, then merge the most frequent adjacent pair until the vocabulary is full.
//!
//! Merge rule (identical to PyPI rustbpe 0.1.0, checked by tests/test_rustbpe.py): take the pair with the highest
//! count over all piece occurrences (overlapping windows count, so "aaa" has two (a, a)); ties go to the smallest
//! (left id, right id); merge non-overlapping occurrences left to right inside each piece.
//!
//! Notable choices:
//! - Counting pieces is parallel: each rayon thread owns a map from piece to count for its share of each batch;
//!   the maps are merged once at the end (no per-batch merge on one thread).
//! - Unique pieces become one doubly linked list of symbols (`sym`, `prev`, `next`, `word`: 16 bytes per byte of
//!   unique text). Each pair keeps an exact count and a list of positions where it was created; merging a pair
//!   visits only those positions (checking each is still live), so training is linear in the number of merge
//!   applications, even for a single 100 MB piece, where re-scanning whole words would be quadratic.
//! - Pairs of two bytes get ids a * 256 + b directly (no hashing for the initial counts); other pairs go through a
//!   hash map. A lazy max-heap holds (count, pair); a stale entry is re-pushed with its current count when popped.
//!   Counts of existing pairs only ever fall (new occurrences always involve the new token), so the first popped
//!   entry whose count is current is the true maximum.
//!
//! Tried and dropped: re-scanning each affected word as a whole (PyPI rustbpe's way) was simpler but quadratic on
//! long pieces and allocates a Vec per word per merge.

use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::hash::FastMap;
use crate::pretokenize::Splitter;
use crate::Error;

const NONE: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------------------------------
// Counting pieces

/// Counts of unique pieces, accumulated batch by batch.
pub struct PieceCounter {
    slots: Vec<FastMap<Box<str>, u64>>,
    pub docs: u64,
    pub bytes: u64,
}

impl PieceCounter {
    pub fn new() -> Self {
        let n = rayon::current_num_threads().max(1);
        PieceCounter { slots: (0..n).map(|_| FastMap::default()).collect(), docs: 0, bytes: 0 }
    }

    /// Splits every document of the batch and counts its pieces, in parallel.
    pub fn add_batch(&mut self, splitter: &Splitter, docs: &[String]) -> Result<(), Error> {
        let total: usize = docs.iter().map(|d| d.len()).sum();
        self.docs += docs.len() as u64;
        self.bytes += total as u64;
        // Contiguous shares of about equal bytes, one per slot.
        let n = self.slots.len();
        let mut bounds = vec![0usize];
        let (mut acc, mut k) = (0usize, 1usize);
        for (i, d) in docs.iter().enumerate() {
            acc += d.len();
            while k < n && acc * n >= total * k {
                bounds.push(i + 1);
                k += 1;
            }
        }
        while bounds.len() <= n {
            bounds.push(docs.len());
        }
        self.slots.par_iter_mut().enumerate().try_for_each(|(k, map)| {
            for doc in &docs[bounds[k]..bounds[k + 1]] {
                splitter.for_each(doc, |piece| match map.get_mut(piece) {
                    Some(c) => *c += 1,
                    None => {
                        map.insert(piece.into(), 1);
                    }
                })?;
            }
            Ok(())
        })
    }

    pub fn unique(&self) -> usize {
        self.slots.iter().map(|m| m.len()).max().unwrap_or(0)
    }

    /// All unique pieces with their counts (order unspecified; training does not depend on it).
    pub fn into_words(mut self) -> Vec<(Box<str>, u64)> {
        self.slots.sort_by_key(|m| Reverse(m.len()));
        let mut slots = self.slots.into_iter();
        let mut all = slots.next().unwrap_or_default();
        for map in slots {
            for (k, v) in map {
                *all.entry(k).or_insert(0) += v;
            }
        }
        all.into_iter().collect()
    }
}

impl Default for PieceCounter {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Merging

struct Pairs {
    index: FastMap<u64, u32>,
    key: Vec<u64>,
    count: Vec<i64>,
    pos: Vec<Vec<u32>>,
}

#[inline(always)]
fn key(a: u32, b: u32) -> u64 {
    ((a as u64) << 32) | b as u64
}

impl Pairs {
    fn new() -> Self {
        Pairs {
            index: FastMap::default(),
            key: (0..65536u32).map(|k| key(k >> 8, k & 255)).collect(),
            count: vec![0; 65536],
            pos: (0..65536).map(|_| Vec::new()).collect(),
        }
    }

    /// Id of an existing pair.
    #[inline(always)]
    fn get(&self, a: u32, b: u32) -> usize {
        if a < 256 && b < 256 {
            (a * 256 + b) as usize
        } else {
            self.index[&key(a, b)] as usize
        }
    }

    /// Id of a pair that contains the newest token, created on first sight (then also pushed to `fresh`).
    #[inline(always)]
    fn get_or_create(&mut self, a: u32, b: u32, fresh: &mut Vec<u32>) -> usize {
        let next = self.key.len() as u32;
        let id = *self.index.entry(key(a, b)).or_insert(next);
        if id == next {
            self.key.push(key(a, b));
            self.count.push(0);
            self.pos.push(Vec::new());
            fresh.push(id);
        }
        id as usize
    }
}

/// Learns up to `num_merges` merges from unique pieces and their counts. Returns the (left, right) pair that made
/// token 256 + i; fewer than asked when no pair is left.
pub fn train_merges(words: Vec<(Box<str>, u64)>, num_merges: usize, progress: bool) -> Vec<(u32, u32)> {
    let total: usize = words.iter().filter(|(w, _)| w.len() > 1).map(|(w, _)| w.len()).sum();
    assert!(total < NONE as usize, "more than 4 G symbols of unique text");
    let mut sym: Vec<u32> = Vec::with_capacity(total);
    let mut prev: Vec<u32> = Vec::with_capacity(total);
    let mut next: Vec<u32> = Vec::with_capacity(total);
    let mut word: Vec<u32> = Vec::with_capacity(total);
    let mut counts: Vec<u64> = Vec::new();
    for (w, c) in words {
        let b = w.as_bytes();
        if b.len() < 2 {
            continue;
        }
        let base = sym.len() as u32;
        let wi = counts.len() as u32;
        counts.push(c);
        for (k, &byte) in b.iter().enumerate() {
            let k = k as u32;
            sym.push(byte as u32);
            prev.push(if k == 0 { NONE } else { base + k - 1 });
            next.push(if (k as usize) + 1 < b.len() { base + k + 1 } else { NONE });
            word.push(wi);
        }
    }

    let mut pairs = Pairs::new();
    for p in 0..sym.len() {
        let q = next[p];
        if q != NONE {
            let id = (sym[p] * 256 + sym[q as usize]) as usize;
            pairs.count[id] += counts[word[p] as usize] as i64;
            pairs.pos[id].push(p as u32);
        }
    }
    let mut heap: BinaryHeap<(i64, Reverse<u64>, u32)> = (0..65536u32)
        .filter(|&id| pairs.count[id as usize] > 0)
        .map(|id| (pairs.count[id as usize], Reverse(pairs.key[id as usize]), id))
        .collect();

    let mut merges = Vec::with_capacity(num_merges);
    let mut fresh: Vec<u32> = Vec::new();
    let started = std::time::Instant::now();
    let mut last_report = started;
    while merges.len() < num_merges {
        let Some((cnt, Reverse(k), id)) = heap.pop() else { break };
        let current = pairs.count[id as usize];
        if current != cnt {
            if current > 0 {
                heap.push((current, Reverse(k), id));
            }
            continue;
        }
        let (a, b) = ((k >> 32) as u32, k as u32);
        let x = 256 + merges.len() as u32;
        merges.push((a, b));
        fresh.clear();
        let positions = std::mem::take(&mut pairs.pos[id as usize]);
        for &p in &positions {
            let p = p as usize;
            if sym[p] != a {
                continue;
            }
            let q = next[p];
            if q == NONE || sym[q as usize] != b {
                continue;
            }
            let q = q as usize;
            let c = counts[word[p] as usize] as i64;
            let (pp, nn) = (prev[p], next[q]);
            if pp != NONE {
                let left = sym[pp as usize];
                let old = pairs.get(left, a);
                pairs.count[old] -= c;
                let new = pairs.get_or_create(left, x, &mut fresh);
                pairs.count[new] += c;
                pairs.pos[new].push(pp);
            }
            pairs.count[id as usize] -= c;
            if nn != NONE {
                let right = sym[nn as usize];
                let old = pairs.get(b, right);
                pairs.count[old] -= c;
                let new = pairs.get_or_create(x, right, &mut fresh);
                pairs.count[new] += c;
                pairs.pos[new].push(p as u32);
                prev[nn as usize] = p as u32;
            }
            sym[p] = x;
            next[p] = nn;
            sym[q] = NONE;
        }
        for &f in &fresh {
            let c = pairs.count[f as usize];
            if c > 0 {
                heap.push((c, Reverse(pairs.key[f as usize]), f));
            }
        }
        if progress && last_report.elapsed().as_secs_f64() > 5.0 {
            last_report = std::time::Instant::now();
            eprintln!(
                "rustbpe: merge {}/{} ({:.1}s, last count {})",
                merges.len(),
                num_merges,
                started.elapsed().as_secs_f64(),
                cnt
            );
        }
    }
    merges
}

/// The slow, obviously correct trainer: recount every pair of every word before each merge. Tests only.
pub fn train_merges_reference(words: &[(Vec<u8>, u64)], num_merges: usize) -> Vec<(u32, u32)> {
    let mut ws: Vec<(Vec<u32>, u64)> =
        words.iter().map(|(w, c)| (w.iter().map(|&b| b as u32).collect(), *c)).collect();
    let mut merges = Vec::new();
    while merges.len() < num_merges {
        let mut counts: std::collections::BTreeMap<(u32, u32), u64> = Default::default();
        for (w, c) in &ws {
            for win in w.windows(2) {
                *counts.entry((win[0], win[1])).or_default() += c;
            }
        }
        // Highest count; pairs iterate in ascending order and only a strictly higher count replaces the best, so
        // ties go to the smallest pair.
        let mut best: Option<((u32, u32), u64)> = None;
        for (&pair, &c) in &counts {
            if best.map_or(true, |(_, bc)| c > bc) {
                best = Some((pair, c));
            }
        }
        let Some((pair, _)) = best else { break };
        let x = 256 + merges.len() as u32;
        merges.push(pair);
        for (w, _) in ws.iter_mut() {
            let mut out = Vec::with_capacity(w.len());
            let mut i = 0;
            while i < w.len() {
                if i + 1 < w.len() && (w[i], w[i + 1]) == pair {
                    out.push(x);
                    i += 2;
                } else {
                    out.push(w[i]);
                    i += 1;
                }
            }
            *w = out;
        }
    }
    merges
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{random_text, Rng};

    fn words_of(texts: &[String], pattern: &str) -> Vec<(Box<str>, u64)> {
        let s = Splitter::new(pattern).unwrap();
        let mut pc = PieceCounter::new();
        pc.add_batch(&s, texts).unwrap();
        pc.into_words()
    }

    #[test]
    fn matches_reference_on_random_text() {
        let mut rng = Rng(7);
        for trial in 0..6 {
            let texts: Vec<String> = (0..40).map(|_| random_text(&mut rng, 30)).collect();
            let words = words_of(&texts, if trial % 2 == 0 { "nanochat" } else { "gpt2" });
            let plain: Vec<(Vec<u8>, u64)> = words.iter().map(|(w, c)| (w.as_bytes().to_vec(), *c)).collect();
            let fast = train_merges(words, 300, false);
            assert_eq!(fast, train_merges_reference(&plain, 300));
        }
    }

    #[test]
    fn overlapping_pairs_and_long_pieces() {
        let texts = vec!["aaaaaaa".repeat(3), "abababab ab ba aaa".into(), "z".repeat(5000)];
        let words = words_of(&texts, "gpt2");
        let plain: Vec<(Vec<u8>, u64)> = words.iter().map(|(w, c)| (w.as_bytes().to_vec(), *c)).collect();
        assert_eq!(train_merges(words, 40, false), train_merges_reference(&plain, 40));
    }

    #[test]
    fn long_single_piece_is_linear() {
        let mut rng = Rng(3);
        let text: String = (0..2_000_000).map(|_| (b'a' + rng.below(4) as u8) as char).collect();
        let t = std::time::Instant::now();
        let merges = train_merges(words_of(&[text], "nanochat"), 2000, false);
        assert_eq!(merges.len(), 2000);
        assert!(t.elapsed().as_secs_f64() < 20.0, "took {:?}", t.elapsed());
    }
}
