//! One-file save format, written atomically (temporary name in the same folder, fsync, rename).
//!
//! Layout (little-endian): magic `NANOCHAT-RUSTBPE` + u32 version, then pattern, ranks, merges and specials, each
//! length-prefixed, then a u64 FNV-1a checksum of everything before it, so a truncated or corrupted file is an error
//! naming the file, never a wrong tokenizer.

use std::io::Write;
use std::path::Path;

use crate::{Error, Tokenizer};

const MAGIC: &[u8] = b"NANOCHAT-RUSTBPE";
const VERSION: u32 = 1;

fn fnv1a(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf29ce484222325;
    for &b in data {
        h = (h ^ b as u64).wrapping_mul(0x100000001b3);
    }
    h
}

pub fn to_bytes(tok: &Tokenizer) -> Vec<u8> {
    let mut out = Vec::new();
    let put_u32 = |out: &mut Vec<u8>, v: u32| out.extend_from_slice(&v.to_le_bytes());
    let put_bytes = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u32).to_le_bytes());
        out.extend_from_slice(b);
    };
    out.extend_from_slice(MAGIC);
    put_u32(&mut out, VERSION);
    put_bytes(&mut out, tok.pattern().as_bytes());
    put_u32(&mut out, tok.ranks().len() as u32);
    for t in tok.ranks() {
        put_bytes(&mut out, t);
    }
    put_u32(&mut out, tok.merges().len() as u32);
    for &(a, b) in tok.merges() {
        put_u32(&mut out, a);
        put_u32(&mut out, b);
    }
    put_u32(&mut out, tok.specials().len() as u32);
    for s in tok.specials() {
        put_bytes(&mut out, s.as_bytes());
    }
    let sum = fnv1a(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out
}

struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
        if self.data.len() - self.at < n {
            return Err(format!("truncated at byte {}", self.at));
        }
        self.at += n;
        Ok(&self.data[self.at - n..self.at])
    }
    fn u32(&mut self) -> Result<u32, String> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().unwrap()))
    }
    fn bytes(&mut self) -> Result<&'a [u8], String> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn string(&mut self) -> Result<String, String> {
        String::from_utf8(self.bytes()?.to_vec()).map_err(|e| format!("bad UTF-8 string: {e}"))
    }
}

pub fn from_bytes(data: &[u8]) -> Result<Tokenizer, String> {
    if data.len() < MAGIC.len() + 12 || &data[..MAGIC.len()] != MAGIC {
        return Err("not a nanochat rustbpe tokenizer file (bad magic)".into());
    }
    let (body, sum) = data.split_at(data.len() - 8);
    if fnv1a(body) != u64::from_le_bytes(sum.try_into().unwrap()) {
        return Err("checksum mismatch (truncated or corrupted file)".into());
    }
    let mut r = Reader { data: body, at: MAGIC.len() };
    let version = r.u32()?;
    if version != VERSION {
        return Err(format!("unsupported format version {version}, expected {VERSION}"));
    }
    let pattern = r.string()?;
    let n = r.u32()? as usize;
    let mut ranks = Vec::with_capacity(n.min(1 << 24));
    for _ in 0..n {
        ranks.push(r.bytes()?.to_vec());
    }
    let m = r.u32()? as usize;
    let mut merges = Vec::with_capacity(m.min(1 << 24));
    for _ in 0..m {
        merges.push((r.u32()?, r.u32()?));
    }
    let s = r.u32()? as usize;
    let mut specials = Vec::with_capacity(s.min(1 << 16));
    for _ in 0..s {
        specials.push(r.string()?);
    }
    if r.at != body.len() {
        return Err(format!("{} trailing bytes", body.len() - r.at));
    }
    // Trained tokenizers are rebuilt from their merges (and must reproduce the stored ranks); others from ranks.
    let tok = if merges.len() + 256 == ranks.len() && ranks[..256].iter().enumerate().all(|(i, t)| t == &[i as u8]) {
        let tok = Tokenizer::from_merges(merges, &pattern, specials).map_err(|e| e.to_string())?;
        if tok.ranks() != ranks.as_slice() {
            return Err("stored ranks do not match the stored merges".into());
        }
        tok
    } else {
        Tokenizer::from_ranks(ranks, &pattern, specials).map_err(|e| e.to_string())?
    };
    Ok(tok)
}

pub fn save(tok: &Tokenizer, path: &Path) -> Result<(), Error> {
    let data = to_bytes(tok);
    let io = |e: std::io::Error| Error::Io(format!("cannot write tokenizer to {}: {e}", path.display()));
    let name = path.file_name().ok_or_else(|| Error::Value(format!("not a file path: {}", path.display())))?;
    let tmp = path.with_file_name(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

pub fn load(path: &Path) -> Result<Tokenizer, Error> {
    let data = std::fs::read(path).map_err(|e| Error::Io(format!("cannot read tokenizer {}: {e}", path.display())))?;
    from_bytes(&data).map_err(|e| Error::Value(format!("bad tokenizer file {}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Trainer;

    #[test]
    fn round_trip_and_corruption() {
        let mut t = Trainer::new("gpt4").unwrap();
        t.add_batch(&["some text to learn some merges from, some more text".repeat(5)]).unwrap();
        let tok = t.finish(300, vec!["<|bos|>".into()], false).unwrap();
        let dir = std::env::temp_dir().join(format!("rustbpe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tok.bin");
        save(&tok, &path).unwrap();
        let back = load(&path).unwrap();
        assert_eq!(back.ranks(), tok.ranks());
        assert_eq!(back.merges(), tok.merges());
        assert_eq!(back.specials(), tok.specials());
        assert_eq!(back.pattern(), tok.pattern());
        let mut data = std::fs::read(&path).unwrap();
        data[40] ^= 1;
        assert!(from_bytes(&data).unwrap_err().contains("checksum"));
        assert!(from_bytes(&data[..data.len() - 3]).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
