//! BPE training: count pieces, then merge the most frequent adjacent pair until the vocabulary is full.
//!
//! Merge rule (identical to PyPI rustbpe 0.1.0, checked by tests/test_rustbpe.py): take the pair with the highest
//! count over all piece occurrences (overlapping windows count, so "aaa" has two (a, a)); ties go to the smallest
//! (left id, right id); merge non-overlapping occurrences left to right inside each piece.
//!
//! Notable choices:
//! - Counting pieces is parallel: each rayon thread owns a map from piece to count for its share of each batch
//!   (pieces up to 15 bytes keyed inline as a u128); the maps are merged once at the end (no per-batch merge on one
//!   thread).
//! - Unique pieces become one doubly linked list of 20-byte symbol nodes (sym, prev, next, piece count, id of the
//!   pair starting here). Each pair keeps an exact count and a list of positions where it was created; merging a
//!   pair visits only those positions (`pid == id` says a position is still live), so training is linear in the
//!   number of merge applications, even for a single 100 MB piece, where re-scanning whole words is quadratic.
//! - Pairs of two bytes get ids a * 256 + b directly; other pairs get ids on creation (a small per-merge map finds
//!   the merge's new pairs, a global index finds a popped pair). A lazy max-heap holds (count, pair) packed in a
//!   u128; a stale entry is re-pushed with its current count when popped. Counts of existing pairs only ever fall
//!   (new occurrences always involve the new token), so the first popped entry whose count is current is the true
//!   maximum. Pairs below a falling count threshold wait outside the heap.
//!
//! Measured on the 47 MB corpus (see bench/RESULTS.md); tried and dropped or replaced:
//! - re-scanning each affected word as a whole (PyPI rustbpe's way): simpler, but quadratic on long pieces and
//!   allocates a Vec per word per merge;
//! - separate sym / prev / next / word arrays and a word -> count table: perf put ~70% of merge-loop samples on
//!   loads from those arrays; with one node struct per symbol the merge phase went from 2.5 s to 1.2-1.7 s wall
//!   (single runs on the busy machine);
//! - hash lookups for the pairs a merge removes: replaced by the pair id stored in each node;
//! - a map keyed by boxed strings for counting: replaced by inline u128 keys (perf showed the pointer chase and
//!   memcmp as ~40% of counting samples);
//! - a 4096-entry direct-mapped cache of frequent pieces in front of the counting map: no measurable change in
//!   CPU time (0.51-0.58 s with and without, 3 runs each; scanning, not hashing, dominates), so removed.
//!
//! Timing note: the shared 2-core machine runs at load 8-14, so wall times swing 2x between runs; the A/B numbers
//! above are process CPU seconds (utime + stime) of a standalone Rust driver on the corpus.

use rayon::prelude::*;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

use crate::hash::FastMap;
use crate::pretokenize::Splitter;
use crate::Error;

const NONE: u32 = u32::MAX;

// ---------------------------------------------------------------------------------------------------------------
// Counting pieces

/// Pieces of up to 15 bytes are keyed inline as a u128 (bytes, then the length in the top byte): no pointer to
/// chase on lookup. About 99% of pieces are that short; the rest go to a map of boxed strings.
#[derive(Default)]
struct Slot {
    short: FastMap<u128, u64>,
    long: FastMap<Box<[u8]>, u64>,
}

#[inline(always)]
fn short_key(b: &[u8]) -> u128 {
    let mut buf = [0u8; 16];
    buf[..b.len()].copy_from_slice(b);
    buf[15] = b.len() as u8;
    u128::from_le_bytes(buf)
}

impl Slot {
    #[inline(always)]
    fn add(&mut self, piece: &[u8]) {
        if piece.len() < 16 {
            *self.short.entry(short_key(piece)).or_insert(0) += 1;
        } else {
            match self.long.get_mut(piece) {
                Some(c) => *c += 1,
                None => {
                    self.long.insert(piece.into(), 1);
                }
            }
        }
    }
}

/// Counts of unique pieces, accumulated batch by batch.
pub struct PieceCounter {
    slots: Vec<Slot>,
    pub docs: u64,
    pub bytes: u64,
}

impl PieceCounter {
    pub fn new() -> Self {
        let n = rayon::current_num_threads().max(1);
        PieceCounter { slots: (0..n).map(|_| Slot::default()).collect(), docs: 0, bytes: 0 }
    }

    /// Splits every document of the batch and counts its pieces, in parallel.
    pub fn add_batch<S: AsRef<str> + Sync>(&mut self, splitter: &Splitter, docs: &[S]) -> Result<(), Error> {
        let total: usize = docs.iter().map(|d| d.as_ref().len()).sum();
        self.docs += docs.len() as u64;
        self.bytes += total as u64;
        // Contiguous shares of about equal bytes, one per slot.
        let n = self.slots.len();
        let mut bounds = vec![0usize];
        let (mut acc, mut k) = (0usize, 1usize);
        for (i, d) in docs.iter().enumerate() {
            acc += d.as_ref().len();
            while k < n && acc * n >= total * k {
                bounds.push(i + 1);
                k += 1;
            }
        }
        while bounds.len() <= n {
            bounds.push(docs.len());
        }
        self.slots.par_iter_mut().enumerate().try_for_each(|(k, slot)| {
            for doc in &docs[bounds[k]..bounds[k + 1]] {
                splitter.for_each(doc.as_ref(), |piece| slot.add(piece.as_bytes()))?;
            }
            Ok(())
        })
    }

    /// Unique pieces of the largest slot (a lower bound of the total; cheap enough for progress lines).
    pub fn unique(&self) -> usize {
        self.slots.iter().map(|m| m.short.len() + m.long.len()).max().unwrap_or(0)
    }

    /// All unique pieces with their counts (order unspecified; training does not depend on it).
    pub fn into_words(mut self) -> Vec<(Box<[u8]>, u64)> {
        self.slots.sort_by_key(|m| Reverse(m.short.len()));
        let mut slots = self.slots.into_iter();
        let mut all = slots.next().unwrap_or_default();
        for slot in slots {
            for (k, v) in slot.short {
                *all.short.entry(k).or_insert(0) += v;
            }
            for (k, v) in slot.long {
                *all.long.entry(k).or_insert(0) += v;
            }
        }
        let mut words: Vec<(Box<[u8]>, u64)> = Vec::with_capacity(all.short.len() + all.long.len());
        for (k, v) in all.short {
            let b = k.to_le_bytes();
            words.push((b[..b[15] as usize].into(), v));
        }
        words.extend(all.long);
        words
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

    /// Id of a pair that has been counted.
    #[inline(always)]
    fn get(&self, a: u32, b: u32) -> usize {
        if a < 256 && b < 256 {
            (a * 256 + b) as usize
        } else {
            self.index[&key(a, b)] as usize
        }
    }

    /// Id of a pair that contains the newest token, created on first sight. `fresh` maps this merge's new pairs to
    /// their ids: it stays small and in cache, where the global index (hundreds of thousands of pairs) misses.
    #[inline(always)]
    fn get_or_create(&mut self, a: u32, b: u32, fresh: &mut FastMap<u64, u32>) -> usize {
        let k = key(a, b);
        if let Some(&id) = fresh.get(&k) {
            return id as usize;
        }
        let id = self.key.len() as u32;
        self.index.insert(k, id);
        self.key.push(k);
        self.count.push(0);
        self.pos.push(Vec::new());
        fresh.insert(k, id);
        id as usize
    }
}

/// One symbol of a unique piece: 20 bytes, so a merge touches one cache line per symbol (with separate arrays for
/// sym / prev / next / word count, cache misses were ~70% of the merge loop's time).
#[derive(Clone, Copy)]
struct Node {
    sym: u32,
    prev: u32,
    next: u32,
    /// Occurrences of the piece this symbol belongs to. A piece seen more than u32::MAX times is stored as several
    /// copies whose counts add up (pair counts only ever see the sum).
    count: u32,
    /// Id of the pair (this symbol, next symbol), NONE at a piece's end or for a merged-away symbol. Kept current,
    /// so merging needs no hash lookup for the pairs it removes, and `pid == id` validates a stored position.
    pid: u32,
}

/// Heap entry: count in the high 64 bits, then the bit-inverted pair key, so the max is the highest count and,
/// among equal counts, the smallest (left, right) pair.
#[inline(always)]
fn entry(count: i64, k: u64) -> u128 {
    ((count as u128) << 64) | (!k) as u128
}

/// Learns up to `num_merges` merges from unique pieces and their counts. Returns the (left, right) pair that made
/// token 256 + i; fewer than asked when no pair is left.
pub fn train_merges(words: Vec<(Box<[u8]>, u64)>, num_merges: usize, progress: bool) -> Vec<(u32, u32)> {
    let started = std::time::Instant::now();
    let total: usize = words.iter().filter(|(w, _)| w.len() > 1).map(|(w, c)| w.len() * (1 + (c >> 32) as usize)).sum();
    assert!(total < NONE as usize, "more than 4 G symbols of unique text");
    let mut nodes: Vec<Node> = Vec::with_capacity(total);
    let mut n_words = 0usize;
    for (w, c) in words {
        if w.len() < 2 {
            continue;
        }
        let mut left = c;
        while left > 0 {
            let part = left.min(u32::MAX as u64);
            left -= part;
            n_words += 1;
            let base = nodes.len() as u32;
            for (k, &byte) in w.iter().enumerate() {
                let k = k as u32;
                nodes.push(Node {
                    sym: byte as u32,
                    prev: if k == 0 { NONE } else { base + k - 1 },
                    next: if (k as usize) + 1 < w.len() { base + k + 1 } else { NONE },
                    count: part as u32,
                    pid: if (k as usize) + 1 < w.len() { byte as u32 * 256 + w[k as usize + 1] as u32 } else { NONE },
                });
            }
        }
    }

    let mut pairs = Pairs::new();
    for (p, n) in nodes.iter().enumerate() {
        if n.pid != NONE {
            pairs.count[n.pid as usize] += n.count as i64;
            pairs.pos[n.pid as usize].push(p as u32);
        }
    }
    // Only pairs with count >= `threshold` live in the heap; the rest wait in `deferred`. Counts of existing pairs
    // only fall, so a deferred pair can reach the threshold only when the threshold is lowered, which happens when
    // the heap runs dry (then deferred pairs at or above the new threshold move in). Most pairs occur a handful of
    // times and are never merged; on the 47 MB corpus this cut heap pops from 149 K to 83 K and the CPU time of
    // the merge phase by ~15% (0.53 vs 0.64 s, medians of 4 runs).
    let max_count = pairs.count.iter().copied().max().unwrap_or(0);
    let mut threshold = (max_count / 2).max(1);
    let mut deferred: Vec<u32> = Vec::new();
    let mut heap: BinaryHeap<u128> = BinaryHeap::new();
    for id in 0..65536usize {
        let c = pairs.count[id];
        if c >= threshold {
            heap.push(entry(c, pairs.key[id]));
        } else if c > 0 {
            deferred.push(id as u32);
        }
    }
    if progress {
        eprintln!(
            "rustbpe: {} symbols in {n_words} unique pieces, initial pairs counted in {:.2}s",
            nodes.len(),
            started.elapsed().as_secs_f64()
        );
    }

    let mut merges = Vec::with_capacity(num_merges);
    let mut fresh: FastMap<u64, u32> = FastMap::default();
    let mut last_report = started;
    let (mut pops, mut visited, mut applied) = (0u64, 0u64, 0u64);
    while merges.len() < num_merges {
        let top = match heap.peek() {
            Some(&top) if (top >> 64) as i64 >= threshold => {
                heap.pop();
                top
            }
            _ => {
                // Lower the threshold: to half, or to the largest deferred count if that is lower.
                deferred.retain(|&d| pairs.count[d as usize] > 0);
                if deferred.is_empty() && heap.is_empty() {
                    break;
                }
                let m = deferred.iter().map(|&d| pairs.count[d as usize]).max().unwrap_or(0);
                threshold = (threshold / 2).min(m).max(1);
                deferred.retain(|&d| {
                    let c = pairs.count[d as usize];
                    if c >= threshold {
                        heap.push(entry(c, pairs.key[d as usize]));
                    }
                    c < threshold
                });
                continue;
            }
        };
        pops += 1;
        let (cnt, k) = ((top >> 64) as i64, !(top as u64));
        let (a, b) = ((k >> 32) as u32, k as u32);
        let id = pairs.get(a, b);
        let current = pairs.count[id];
        if current != cnt {
            if current >= threshold {
                heap.push(entry(current, k));
            } else if current > 0 {
                deferred.push(id as u32);
            }
            continue;
        }
        let x = 256 + merges.len() as u32;
        merges.push((a, b));
        fresh.clear();
        let positions = std::mem::take(&mut pairs.pos[id]);
        visited += positions.len() as u64;
        for &p in &positions {
            let p = p as usize;
            let n = nodes[p];
            if n.pid != id as u32 {
                continue;
            }
            applied += 1;
            let q = n.next as usize;
            let nq = nodes[q];
            let c = n.count as i64;
            let (pp, nn) = (n.prev, nq.next);
            pairs.count[id] -= c;
            if pp != NONE {
                let left = &mut nodes[pp as usize];
                pairs.count[left.pid as usize] -= c;
                let new = pairs.get_or_create(left.sym, x, &mut fresh);
                left.pid = new as u32;
                pairs.count[new] += c;
                pairs.pos[new].push(pp);
            }
            if nn != NONE {
                pairs.count[nq.pid as usize] -= c;
                let new = pairs.get_or_create(x, nodes[nn as usize].sym, &mut fresh);
                pairs.count[new] += c;
                pairs.pos[new].push(p as u32);
                nodes[nn as usize].prev = p as u32;
                nodes[p].pid = new as u32;
            } else {
                nodes[p].pid = NONE;
            }
            nodes[p].sym = x;
            nodes[p].next = nn;
            nodes[q].sym = NONE;
            nodes[q].pid = NONE;
        }
        for &f in fresh.values() {
            let c = pairs.count[f as usize];
            if c >= threshold {
                heap.push(entry(c, pairs.key[f as usize]));
            } else if c > 0 {
                deferred.push(f);
            }
        }
        if progress && (last_report.elapsed().as_secs_f64() > 5.0 || merges.len() == num_merges) {
            last_report = std::time::Instant::now();
            eprintln!(
                "rustbpe: merge {}/{} ({:.1}s, last count {cnt}; {pops} heap pops, {visited} positions visited, \
                 {applied} applied, {} pairs)",
                merges.len(),
                num_merges,
                started.elapsed().as_secs_f64(),
                pairs.key.len()
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

    fn words_of(texts: &[String], pattern: &str) -> Vec<(Box<[u8]>, u64)> {
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
            let plain: Vec<(Vec<u8>, u64)> = words.iter().map(|(w, c)| (w.to_vec(), *c)).collect();
            let fast = train_merges(words, 300, false);
            assert_eq!(fast, train_merges_reference(&plain, 300));
        }
    }

    #[test]
    fn overlapping_pairs_and_long_pieces() {
        let texts = vec!["aaaaaaa".repeat(3), "abababab ab ba aaa".into(), "z".repeat(5000)];
        let words = words_of(&texts, "gpt2");
        let plain: Vec<(Vec<u8>, u64)> = words.iter().map(|(w, c)| (w.to_vec(), *c)).collect();
        assert_eq!(train_merges(words, 40, false), train_merges_reference(&plain, 40));
    }

    #[test]
    fn long_single_piece_is_linear() {
        let mut rng = Rng(3);
        // One 400 KB piece: re-scanning the word per merge would be 1000 x 400 K steps; we touch only occurrences.
        let text: String = (0..400_000).map(|_| (b'a' + rng.below(4) as u8) as char).collect();
        let t = std::time::Instant::now();
        let merges = train_merges(words_of(&[text], "nanochat"), 1000, false);
        assert_eq!(merges.len(), 1000);
        assert!(t.elapsed().as_secs_f64() < 10.0, "took {:?}", t.elapsed());
    }
}
