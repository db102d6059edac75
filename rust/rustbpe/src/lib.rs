//! rustbpe: byte-level BPE for nanochat (training and encoding), in plain Rust.
//!
//! - `pretokenize`: the split patterns (hand-written scanners for the built-ins, fancy-regex for the rest).
//! - `train`: parallel piece counting and the incremental merge loop (merges identical to PyPI rustbpe 0.1.0).
//! - `encode`: tiktoken-identical encoding with id-pair lookups.
//! - `serialize`: the one-file save format.
//! - `pools`: a bounded cache of rayon pools for callers that choose a thread count.
//! - `python` (cargo feature "python"): the pyo3 binding `nanochat._rustbpe`; nothing else touches Python.

pub mod encode;
pub mod hash;
pub mod pools;
pub mod pretokenize;
pub mod serialize;
pub mod train;
pub mod unicode;

#[cfg(feature = "python")]
mod python;
#[cfg(test)]
mod testutil;

use rayon::prelude::*;

use encode::Encoder;
use pretokenize::{resolve_pattern, Splitter};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// Bad argument or bad data (ValueError in Python).
    Value(String),
    /// File system (OSError).
    Io(String),
    /// Anything else (RuntimeError).
    Runtime(String),
}

impl std::fmt::Display for Error {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Error::Value(m) | Error::Io(m) | Error::Runtime(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for Error {}

/// Which special-token strings `encode_with_special` may turn into special ids.
pub enum Allowed<'a> {
    None,
    All,
    Some(&'a [String]),
}

// ---------------------------------------------------------------------------------------------------------------

/// A trained tokenizer: split pattern, ranks (token bytes by id), the merges that built them, special tokens.
pub struct Tokenizer {
    pattern: String,
    splitter: Splitter,
    encoder: Encoder,
    merges: Vec<(u32, u32)>,
    specials: Vec<String>,
}

impl std::fmt::Debug for Tokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokenizer(vocab_size={}, pattern={:?})", self.vocab_size(), self.pattern)
    }
}

impl Tokenizer {
    /// From training merges: token 256 + i is the concatenation of merges[i]'s two tokens.
    pub fn from_merges(merges: Vec<(u32, u32)>, pattern: &str, specials: Vec<String>) -> Result<Tokenizer, Error> {
        let mut vocab: Vec<Vec<u8>> = (0..=255u8).map(|b| vec![b]).collect();
        for (i, &(a, b)) in merges.iter().enumerate() {
            let id = 256 + i;
            if a as usize >= id || b as usize >= id {
                return Err(Error::Value(format!("merge {i} ({a}, {b}) uses an id >= its own id {id}")));
            }
            let t = [vocab[a as usize].as_slice(), vocab[b as usize].as_slice()].concat();
            vocab.push(t);
        }
        Self::build(vocab, merges, pattern, specials)
    }

    /// From tiktoken-style ranks (bytes of rank i). The first 256 ranks must be the 256 single bytes, in any order.
    /// Merges are recovered by re-encoding each token with only the lower ranks (the usual tiktoken -> merges way);
    /// a token that does not end as two parts falls back to its first split into two lower-ranked tokens.
    pub fn from_ranks(vocab: Vec<Vec<u8>>, pattern: &str, specials: Vec<String>) -> Result<Tokenizer, Error> {
        if vocab.len() < 256 {
            return Err(Error::Value(format!("need at least the 256 single-byte ranks, got {} ranks", vocab.len())));
        }
        let mut seen = [false; 256];
        for (i, t) in vocab[..256].iter().enumerate() {
            if t.len() != 1 || seen[t[0] as usize] {
                return Err(Error::Value(format!(
                    "rank {i} must be a single byte not seen before (the first 256 ranks are the 256 bytes), got {:?}",
                    String::from_utf8_lossy(t)
                )));
            }
            seen[t[0] as usize] = true;
        }
        let mut lookup: std::collections::HashMap<&[u8], u32> = Default::default();
        for (i, t) in vocab.iter().enumerate() {
            lookup.insert(t.as_slice(), i as u32);
        }
        let mut merges = Vec::with_capacity(vocab.len() - 256);
        for (i, t) in vocab.iter().enumerate().skip(256) {
            // Parts as (start, end) byte ranges of t; merge the lowest-ranked adjacent pair below rank i.
            let mut parts: Vec<(usize, usize)> = (0..t.len()).map(|k| (k, k + 1)).collect();
            loop {
                let mut best: Option<(u32, usize)> = None;
                for k in 0..parts.len().saturating_sub(1) {
                    if let Some(&r) = lookup.get(&t[parts[k].0..parts[k + 1].1]) {
                        if (r as usize) < i && best.map_or(true, |(br, _)| r < br) {
                            best = Some((r, k));
                        }
                    }
                }
                let Some((_, k)) = best else { break };
                parts[k].1 = parts[k + 1].1;
                parts.remove(k + 1);
            }
            let pair = if parts.len() == 2 {
                Some((lookup[&t[parts[0].0..parts[0].1]], lookup[&t[parts[1].0..parts[1].1]]))
            } else {
                (1..t.len()).find_map(|k| match (lookup.get(&t[..k]), lookup.get(&t[k..])) {
                    (Some(&l), Some(&r)) if (l as usize) < i && (r as usize) < i => Some((l, r)),
                    _ => None,
                })
            };
            match pair {
                Some(p) => merges.push(p),
                None => {
                    let shown = String::from_utf8_lossy(t);
                    return Err(Error::Value(format!("rank {i} ({shown:?}) is not two lower-ranked tokens joined")));
                }
            }
        }
        Self::build(vocab, merges, pattern, specials)
    }

    fn build(vocab: Vec<Vec<u8>>, merges: Vec<(u32, u32)>, pattern: &str, specials: Vec<String>) -> Result<Tokenizer, Error> {
        let splitter = Splitter::new(pattern)?;
        for (j, s) in specials.iter().enumerate() {
            if s.is_empty() {
                return Err(Error::Value(format!("special token {j} is empty")));
            }
            if specials[..j].contains(s) {
                return Err(Error::Value(format!("special token {s:?} is repeated")));
            }
        }
        let encoder = Encoder::new(vocab)?;
        Ok(Tokenizer { pattern: resolve_pattern(pattern).to_string(), splitter, encoder, merges, specials })
    }

    pub fn pattern(&self) -> &str {
        &self.pattern
    }
    pub fn merges(&self) -> &[(u32, u32)] {
        &self.merges
    }
    pub fn ranks(&self) -> &[Vec<u8>] {
        &self.encoder.vocab
    }
    pub fn specials(&self) -> &[String] {
        &self.specials
    }
    /// Ids of all tokens, specials included.
    pub fn vocab_size(&self) -> usize {
        self.encoder.vocab.len() + self.specials.len()
    }
    pub fn special_id(&self, s: &str) -> Option<u32> {
        self.specials.iter().position(|x| x == s).map(|j| (self.encoder.vocab.len() + j) as u32)
    }

    /// Encodes text without special tokens: special-token strings in `text` are encoded as ordinary bytes.
    pub fn encode_ordinary(&self, text: &str) -> Result<Vec<u32>, Error> {
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        self.encode_into(text, &mut out)?;
        Ok(out)
    }

    fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), Error> {
        let enc = &self.encoder;
        self.splitter.for_each(text, |piece| enc.encode_piece(piece.as_bytes(), out))
    }

    /// Encodes text; only the allowed special-token strings become special ids (leftmost, longest first).
    pub fn encode_with_special(&self, text: &str, allowed: Allowed<'_>) -> Result<Vec<u32>, Error> {
        let allowed: Vec<&String> = match allowed {
            Allowed::None => return self.encode_ordinary(text),
            Allowed::All => self.specials.iter().collect(),
            Allowed::Some(list) => {
                for s in list {
                    if !self.specials.contains(s) {
                        return Err(Error::Value(format!("{s:?} is not a special token of this tokenizer")));
                    }
                }
                list.iter().collect()
            }
        };
        let mut out = Vec::with_capacity(text.len() / 4 + 1);
        let mut start = 0;
        loop {
            let mut hit: Option<(usize, &String)> = None;
            for s in &allowed {
                if let Some(at) = text[start..].find(s.as_str()) {
                    let at = start + at;
                    if hit.map_or(true, |(h, hs)| at < h || (at == h && s.len() > hs.len())) {
                        hit = Some((at, s));
                    }
                }
            }
            match hit {
                Some((at, s)) => {
                    self.encode_into(&text[start..at], &mut out)?;
                    out.push(self.special_id(s).unwrap());
                    start = at + s.len();
                }
                None => {
                    self.encode_into(&text[start..], &mut out)?;
                    return Ok(out);
                }
            }
        }
    }

    /// Ordinary encoding of many texts in parallel on the current rayon pool.
    pub fn encode_batch<S: AsRef<str> + Sync>(&self, texts: &[S]) -> Result<Vec<Vec<u32>>, Error> {
        texts.par_iter().map(|t| self.encode_ordinary(t.as_ref())).collect()
    }

    pub fn id_to_bytes(&self, id: u32) -> Result<&[u8], Error> {
        let n = self.encoder.vocab.len();
        if (id as usize) < n {
            Ok(&self.encoder.vocab[id as usize])
        } else if (id as usize) < self.vocab_size() {
            Ok(self.specials[id as usize - n].as_bytes())
        } else {
            Err(Error::Value(format!("token id {id} is out of range: vocab size is {}", self.vocab_size())))
        }
    }

    pub fn decode_bytes(&self, ids: &[u32]) -> Result<Vec<u8>, Error> {
        let mut out = Vec::with_capacity(ids.len() * 4);
        for &id in ids {
            out.extend_from_slice(self.id_to_bytes(id)?);
        }
        Ok(out)
    }

    /// Byte length of each id; 0 for special tokens.
    pub fn token_bytes(&self) -> Vec<u32> {
        let mut v: Vec<u32> = self.encoder.vocab.iter().map(|t| t.len() as u32).collect();
        v.resize(self.vocab_size(), 0);
        v
    }
}

// ---------------------------------------------------------------------------------------------------------------

/// Streaming trainer: feed batches of documents, then `finish`.
pub struct Trainer {
    splitter: Splitter,
    pattern: String,
    counter: train::PieceCounter,
}

impl Trainer {
    pub fn new(pattern: &str) -> Result<Trainer, Error> {
        Ok(Trainer { splitter: Splitter::new(pattern)?, pattern: pattern.to_string(), counter: train::PieceCounter::new() })
    }

    pub fn add_batch<S: AsRef<str> + Sync>(&mut self, docs: &[S]) -> Result<(), Error> {
        self.counter.add_batch(&self.splitter, docs)
    }

    pub fn stats(&self) -> (u64, u64, usize) {
        (self.counter.docs, self.counter.bytes, self.counter.unique())
    }

    /// `vocab_size` counts the specials, which take the last ids. Stops early (smaller vocab) when the text has no
    /// pairs left to merge.
    pub fn finish(self, vocab_size: usize, specials: Vec<String>, progress: bool) -> Result<Tokenizer, Error> {
        check_vocab_size(vocab_size, specials.len())?;
        if self.counter.docs == 0 {
            return Err(Error::Value("no text to train on: the iterator yielded no documents".into()));
        }
        let t = std::time::Instant::now();
        let words = self.counter.into_words();
        if progress {
            eprintln!("rustbpe: merged piece counts ({} unique) in {:.2}s", words.len(), t.elapsed().as_secs_f64());
        }
        let merges = train::train_merges(words, vocab_size - 256 - specials.len(), progress);
        Tokenizer::from_merges(merges, &self.pattern, specials)
    }
}

pub fn check_vocab_size(vocab_size: usize, n_specials: usize) -> Result<(), Error> {
    if vocab_size < 256 + n_specials {
        return Err(Error::Value(format!(
            "vocab_size must be >= 256 + {n_specials} special tokens = {}, got {vocab_size}",
            256 + n_specials
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small() -> Tokenizer {
        let mut t = Trainer::new("nanochat").unwrap();
        t.add_batch(&["hello world, hello there! <|bos|> 12345 hello".repeat(20)]).unwrap();
        t.finish(256 + 30 + 2, vec!["<|bos|>".into(), "<|end|>".into()], false).unwrap()
    }

    #[test]
    fn round_trip_and_specials() {
        let tok = small();
        let (bos, end) = (tok.special_id("<|bos|>").unwrap(), tok.special_id("<|end|>").unwrap());
        assert_eq!((bos as usize, end as usize), (tok.ranks().len(), tok.ranks().len() + 1));
        let text = "hello <|bos|> world<|end|>";
        let ids = tok.encode_ordinary(text).unwrap();
        assert!(ids.iter().all(|&i| i < bos), "user text became a special id");
        assert_eq!(tok.decode_bytes(&ids).unwrap(), text.as_bytes());
        let ids = tok.encode_with_special(text, Allowed::All).unwrap();
        assert!(ids.contains(&bos) && ids.contains(&end));
        assert_eq!(tok.decode_bytes(&ids).unwrap(), text.as_bytes());
        let only_bos = tok.encode_with_special(text, Allowed::Some(&["<|bos|>".to_string()])).unwrap();
        assert!(only_bos.contains(&bos) && !only_bos.contains(&end));
        assert_eq!(tok.token_bytes()[bos as usize], 0);
        assert!(tok.decode_bytes(&[end + 1]).is_err());
    }

    #[test]
    fn from_ranks_recovers_merges() {
        let tok = small();
        let again = Tokenizer::from_ranks(tok.ranks().to_vec(), tok.pattern(), vec![]).unwrap();
        assert_eq!(again.merges(), tok.merges());
    }

    #[test]
    fn vocab_too_small_names_values() {
        let t = Trainer::new("gpt2").unwrap();
        let e = t.finish(260, vec!["a".into(); 9], false).unwrap_err();
        assert_eq!(e, Error::Value("vocab_size must be >= 256 + 9 special tokens = 265, got 260".into()));
    }

    #[test]
    fn empty_input_is_an_error() {
        let t = Trainer::new("gpt2").unwrap();
        assert!(matches!(t.finish(300, vec![], false), Err(Error::Value(m)) if m.contains("no text")));
    }
}
