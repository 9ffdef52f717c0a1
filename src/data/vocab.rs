//! The data set's vocabulary: every distinct word unit in first-seen order, which the
//! shards' word sequences index (skip-gram and CBOW train on them); its checksummed file.
//!
//! # `vocab.bin` (version [`VOCAB_VERSION`], little-endian)
//! ```text
//! offset  field
//!   0     magic "DTVOCAB\0"
//!   8     u32 format version
//!  12     u32 header length (48)
//!  16     u64 number of words V
//!  24     u64 payload length in bytes
//!  32     u64 payload checksum        xxh3_64 of the payload
//!  40     u64 header checksum         xxh3_64 of bytes 0..40
//!  48     payload: V times (u32 byte length, UTF-8 bytes of the normalised word)
//! ```
//! Words are units of kind *word* of the tokenizer (lower-cased when the tokenizer is),
//! unique, each at most [`MAX_WORD_BYTES`] bytes (longer ones cannot come out of the
//! tokenizer's segmentation in practice; the writer refuses them rather than truncate).

use std::collections::HashMap;
use std::path::Path;

use xxhash_rust::xxh3::{xxh3_64, Xxh3DefaultBuilder};

use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// The vocabulary's file name inside a data set directory.
pub const VOCAB_FILE: &str = "vocab.bin";
/// Magic bytes of the vocabulary file.
pub const VOCAB_MAGIC: &[u8; 8] = b"DTVOCAB\0";
/// Current vocabulary format version.
pub const VOCAB_VERSION: u32 = 1;
const HEADER_LEN: usize = 48;
/// Longest word stored, in bytes.
pub const MAX_WORD_BYTES: usize = 1 << 16;

/// What a written vocabulary holds, for the manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabSummary {
    pub words: u64,
    pub bytes: u64,
    pub checksum: u64,
}

/// The vocabulary: word strings by index.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Vocab {
    words: Vec<String>,
    /// Word → index, hashed with XXH3 (SipHash was a tenth of `prepare`'s time).
    index: HashMap<String, u32, Xxh3DefaultBuilder>,
}

impl Vocab {
    /// An empty vocabulary.
    pub fn new() -> Self {
        Self::default()
    }

    /// The index of `word`, adding it at the end if new.
    pub fn intern(&mut self, word: &str) -> u32 {
        if let Some(&i) = self.index.get(word) {
            return i;
        }
        let i = u32::try_from(self.words.len()).expect("fewer than 2^32 distinct words");
        self.words.push(word.to_owned());
        self.index.insert(word.to_owned(), i);
        i
    }

    /// Number of words.
    pub fn len(&self) -> usize {
        self.words.len()
    }

    /// Whether the vocabulary is empty.
    pub fn is_empty(&self) -> bool {
        self.words.is_empty()
    }

    /// Word `i` (panics if out of range, like slice indexing).
    pub fn word(&self, i: u32) -> &str {
        &self.words[i as usize]
    }

    /// The index of `word`, if present.
    pub fn get(&self, word: &str) -> Option<u32> {
        self.index.get(word).copied()
    }

    /// All words in index order.
    pub fn words(&self) -> &[String] {
        &self.words
    }

    /// Writes `dir/vocab.bin` atomically.
    pub fn write(&self, dir: &Path) -> Result<VocabSummary> {
        let path = dir.join(VOCAB_FILE);
        let mut payload = Vec::new();
        for w in &self.words {
            if w.len() > MAX_WORD_BYTES {
                return Err(Error::Data(format!(
                    "a word of {} bytes exceeds the vocabulary's limit of {MAX_WORD_BYTES}",
                    w.len()
                )));
            }
            payload.extend_from_slice(&(w.len() as u32).to_le_bytes());
            payload.extend_from_slice(w.as_bytes());
        }
        let mut bytes = Vec::with_capacity(HEADER_LEN + payload.len());
        bytes.extend_from_slice(VOCAB_MAGIC);
        bytes.extend_from_slice(&VOCAB_VERSION.to_le_bytes());
        bytes.extend_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        bytes.extend_from_slice(&(self.words.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        let checksum = xxh3_64(&payload);
        bytes.extend_from_slice(&checksum.to_le_bytes());
        let header_sum = xxh3_64(&bytes);
        bytes.extend_from_slice(&header_sum.to_le_bytes());
        bytes.extend_from_slice(&payload);
        fsutil::write_atomic(&path, &bytes)?;
        Ok(VocabSummary { words: self.words.len() as u64, bytes: bytes.len() as u64, checksum })
    }

    /// Reads and checks `dir/vocab.bin`: magic, version, both checksums, lengths, UTF-8
    /// and uniqueness of every word. Returns it with the file's summary.
    pub fn read(dir: &Path) -> Result<(Vocab, VocabSummary)> {
        let path = dir.join(VOCAB_FILE);
        let b = std::fs::read(&path).at(&path)?;
        let bad = |msg: String| Error::bad_file(&path, msg);
        crate::fsutil::check_file_head(&path, &b, VOCAB_MAGIC, HEADER_LEN, "vocabulary")?;
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"));
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
        let version = u32_at(8);
        if version != VOCAB_VERSION {
            return Err(bad(format!(
                "vocabulary format version {version}, but this dtrain reads {VOCAB_VERSION}: prepare the data again"
            )));
        }
        if xxh3_64(&b[..40]) != u64_at(40) {
            return Err(bad("corrupted: the header checksum does not match".into()));
        }
        let (count, len) = (u64_at(16), u64_at(24));
        let payload = &b[HEADER_LEN..];
        if payload.len() as u64 != len {
            return Err(bad(format!(
                "truncated or extended: the header says {len} payload bytes, the file has {}",
                payload.len()
            )));
        }
        if xxh3_64(payload) != u64_at(32) {
            return Err(bad("corrupted: the payload does not match its checksum".into()));
        }
        // Each word takes at least 4 bytes, so `count` is bounded before allocating.
        if count > len / 4 {
            return Err(bad(format!("corrupted: {count} words cannot fit in {len} bytes")));
        }
        let mut vocab = Vocab::new();
        let mut at = 0usize;
        for i in 0..count {
            let n = payload
                .get(at..at + 4)
                .map(|s| u32::from_le_bytes(s.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| bad(format!("corrupted: word {i} runs past the end")))?;
            let word = payload
                .get(at + 4..at + 4 + n)
                .ok_or_else(|| bad(format!("corrupted: word {i} runs past the end")))?;
            let word =
                std::str::from_utf8(word).map_err(|_| bad(format!("corrupted: word {i} is not UTF-8")))?;
            if vocab.intern(word) as u64 != i {
                return Err(bad(format!("corrupted: word {i} (`{word}`) appears twice")));
            }
            at += 4 + n;
        }
        if at != payload.len() {
            return Err(bad(format!("corrupted: {} bytes after the last word", payload.len() - at)));
        }
        Ok((vocab, VocabSummary { words: count, bytes: b.len() as u64, checksum: u64_at(32) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vocab::new();
        for w in ["the", "cat", "the", "naïve", "猫"] {
            v.intern(w);
        }
        assert_eq!(v.words(), ["the", "cat", "naïve", "猫"]);
        let s = v.write(dir.path()).unwrap();
        assert_eq!(s.words, 4);
        let v = v.clone();
        assert_eq!(Vocab::read(dir.path()).unwrap(), (v, s));
        let path = dir.path().join(VOCAB_FILE);
        let good = std::fs::read(&path).unwrap();
        let mut bad = good.clone();
        *bad.last_mut().unwrap() ^= 1;
        std::fs::write(&path, &bad).unwrap();
        let e = Vocab::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("vocab.bin") && e.contains("checksum"), "{e}");
        std::fs::write(&path, &good[..good.len() - 2]).unwrap();
        let e = Vocab::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
    }
}
