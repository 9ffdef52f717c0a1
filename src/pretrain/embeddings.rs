//! Pretrained embeddings on disk and in use: the `embeddings.safetensors` + `words.tsv` pair
//! that `dtrain pretrain` writes, word vectors composed from feature rows, nearest
//! neighbours, and loading into a classifier's embedding table (`model.init_from`).
//!
//! # Files
//! - `embeddings.safetensors`: `input` [B, D], the table of hashed features (row `i` is
//!   feature id `i`, exactly as the classifier hashes it), and `output` [V, D], one row per
//!   trained word in `words.tsv` order. Metadata key `dtrain`: [`EmbeddingsMeta`] as JSON,
//!   plus `checksum` (xxh3_64 of the tensor data).
//! - `words.tsv`: `word<TAB>count` per trained word, most frequent first. Its xxh3_64 is in
//!   the metadata (`words_checksum`), so the pair cannot be mixed up.
//!
//! A word's vector is the mean of the input rows of its features (the word and its
//! character n-grams), so words never seen in pretraining get a vector from their n-grams.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::checkpoint::{file_meta, tensors_from_file, tensors_to_file, Storage};
use crate::config::Objective;
use crate::data::manifest::hex64;
use crate::data::tokenize::{Tokenizer, TokenizerSpec, TOKENIZER_ALGORITHM};
use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::model::params::Layout;

/// The tensor file's name.
pub const EMBEDDINGS_FILE: &str = "embeddings.safetensors";
/// The word list's name.
pub const WORDS_FILE: &str = "words.tsv";
/// The metadata's `format` value.
pub const FORMAT: &str = "dtrain-embeddings";

/// What the tensors mean, stored in the safetensors metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingsMeta {
    /// [`FORMAT`].
    pub format: String,
    pub objective: Objective,
    pub dim: usize,
    /// The character n-gram range of the words' features (`char_ngram_max = 0`: none).
    pub char_ngram_min: u32,
    pub char_ngram_max: u32,
    /// The data set's tokenizer: its hashing (buckets, seed, case) defines the input rows.
    pub tokenizer: TokenizerSpec,
    pub tokenizer_algorithm: u32,
    /// Rows of `output` (trained words).
    pub words: usize,
    /// xxh3_64 (16 hex digits) of `words.tsv`.
    pub words_checksum: String,
    /// Epochs completed.
    pub epochs_done: u32,
    /// The pretraining config's trajectory hash and the data set's manifest checksum, which a
    /// resumed run must match.
    pub config_hash: u64,
    pub data_checksum: String,
    /// The pretraining config as the trajectory hash reads it (absent in files written
    /// before it was recorded), so that an output of another config can name the fields.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<serde_json::Value>,
}

/// Loaded embeddings.
pub struct Embeddings {
    pub meta: EmbeddingsMeta,
    pub layout: Layout,
    /// The flat buffer of [`layout`]: `input` then `output`.
    pub params: Vec<f32>,
    pub words: Vec<String>,
    pub counts: Vec<u64>,
}

/// The tensors: `input` [buckets, dim] then `output` [words, dim].
pub fn layout(buckets: usize, words: usize, dim: usize) -> Layout {
    let mut l = Layout::new();
    l.matrix("input", buckets, dim);
    l.matrix("output", words, dim);
    l
}

/// `words.tsv`'s bytes.
pub fn words_tsv(words: &[String], counts: &[u64]) -> Vec<u8> {
    let mut out = String::new();
    for (w, c) in words.iter().zip(counts) {
        out.push_str(w);
        out.push('\t');
        out.push_str(&c.to_string());
        out.push('\n');
    }
    out.into_bytes()
}

/// Writes `embeddings.safetensors` and `words.tsv` into `dir`, each atomically (the words
/// first, so a complete tensor file always has its words beside it). `meta.words_checksum`
/// is filled in here.
pub fn write(
    dir: &Path,
    meta: &EmbeddingsMeta,
    layout: &Layout,
    params: &[f32],
    words_tsv: &[u8],
) -> Result<()> {
    let mut meta = meta.clone();
    meta.words_checksum = hex64(xxh3_64(words_tsv));
    fsutil::write_atomic(&dir.join(WORDS_FILE), words_tsv)?;
    let path = dir.join(EMBEDDINGS_FILE);
    let tmp = fsutil::sibling(&path, ".tmp");
    let json = serde_json::to_value(&meta).map_err(|e| Error::Data(format!("embeddings metadata: {e}")))?;
    tensors_to_file(&tmp, layout, &[("", params)], json, Storage::Whole)?;
    std::fs::File::open(&tmp).and_then(|f| f.sync_all()).at(&tmp)?;
    std::fs::rename(&tmp, &path).at(&path)?;
    fsutil::sync_parent(&path);
    Ok(())
}

/// Reads embeddings from a `dtrain pretrain` output directory (or checkpoint) or its
/// `embeddings.safetensors`, with `words.tsv` beside it; checks the metadata, shapes, data
/// checksum and the word list's checksum.
pub fn read(path: &Path) -> Result<Embeddings> {
    let (file, bytes, head) = read_head(path)?;
    let layout = layout(head.meta.tokenizer.buckets as usize, head.meta.words, head.meta.dim);
    let params =
        tensors_from_file(&file, &bytes, &layout, &[("", layout.total())], Storage::Whole)?.remove(0);
    let Head { meta, words, counts } = head;
    Ok(Embeddings { meta, layout, params, words, counts })
}

/// What embeddings say of themselves without their tables: the metadata and the word list.
pub struct Head {
    pub meta: EmbeddingsMeta,
    pub words: Vec<String>,
    pub counts: Vec<u64>,
}

/// [`read`] without the tables: the metadata and the word list, checked as `read` checks
/// them (the tables' values and their checksum are not read). Also returns the tensor
/// file's path and its mapping.
pub fn read_head(path: &Path) -> Result<(PathBuf, memmap2::Mmap, Head)> {
    let file: PathBuf = if path.is_dir() { path.join(EMBEDDINGS_FILE) } else { path.to_owned() };
    if file.file_name().is_some_and(|n| n == WORDS_FILE) {
        return Err(Error::bad_file(
            path,
            format!("is the word list beside the vectors: give its directory (or its {EMBEDDINGS_FILE})"),
        ));
    }
    if path.is_dir() && !file.is_file() {
        let why = if path.join("model.safetensors").is_file() {
            format!("has no {EMBEDDINGS_FILE}, but a model.safetensors: a masked-LM or training checkpoint (or a pretrained encoder), not skip-gram or CBOW embeddings")
        } else {
            format!("has no {EMBEDDINGS_FILE}: not a `dtrain pretrain` output")
        };
        return Err(Error::bad_file(path, why));
    }
    let bytes = crate::checkpoint::map(&file)?;
    let meta: EmbeddingsMeta = serde_json::from_value(file_meta(&file, &bytes)?).map_err(|e| {
        Error::bad_file(&file, format!("not dtrain embeddings (its metadata does not parse: {e})"))
    })?;
    if meta.format != FORMAT {
        return Err(Error::bad_file(&file, format!("format `{}`, expected `{FORMAT}`", meta.format)));
    }
    if meta.tokenizer_algorithm != TOKENIZER_ALGORITHM {
        return Err(Error::bad_file(
            &file,
            format!(
                "made with tokenizer algorithm {}, this dtrain hashes with {TOKENIZER_ALGORITHM}: pretrain again",
                meta.tokenizer_algorithm
            ),
        ));
    }
    meta.tokenizer
        .validate(&file.display().to_string(), "tokenizer")
        .map_err(|e| Error::bad_file(&file, format!("metadata: {e}")))?;
    if meta.dim < 1 || meta.dim > 65_536 || meta.words > u32::MAX as usize {
        return Err(Error::bad_file(&file, "metadata: dim or word count out of range"));
    }
    let words_path = file.with_file_name(WORDS_FILE);
    let tsv = std::fs::read(&words_path).at(&words_path)?;
    if hex64(xxh3_64(&tsv)) != meta.words_checksum {
        return Err(Error::bad_file(
            &words_path,
            format!("is not the word list of {} (checksum differs)", file.display()),
        ));
    }
    let (words, counts) = parse_words(&words_path, &tsv)?;
    if words.len() != meta.words {
        return Err(Error::bad_file(
            &words_path,
            format!("lists {} words, the tensors have {} rows", words.len(), meta.words),
        ));
    }
    Ok((file, bytes, Head { meta, words, counts }))
}

fn parse_words(path: &Path, tsv: &[u8]) -> Result<(Vec<String>, Vec<u64>)> {
    let text = std::str::from_utf8(tsv).map_err(|e| Error::bad_file(path, format!("not UTF-8: {e}")))?;
    let (mut words, mut counts) = (Vec::new(), Vec::new());
    for (n, line) in text.lines().enumerate() {
        let bad = |msg: &str| Error::BadLine { path: path.to_owned(), line: n as u64 + 1, msg: msg.into() };
        let (w, c) = line.split_once('\t').ok_or_else(|| bad("expected word<TAB>count"))?;
        words.push(w.to_owned());
        counts.push(c.parse().map_err(|_| bad("the count is not a non-negative integer"))?);
    }
    Ok((words, counts))
}

impl Embeddings {
    /// Rows `input` [B, D].
    pub fn input(&self) -> &[f32] {
        &self.params[self.layout.tensors()[0].slot.range()]
    }

    /// The tokenizer that hashes features into the input rows.
    pub fn tokenizer(&self) -> Tokenizer {
        Tokenizer::new(self.meta.tokenizer.clone())
    }

    /// Feature ids of a (normalised) word, as pretraining used them.
    pub fn features(&self, tok: &Tokenizer, word: &str, out: &mut Vec<u32>) {
        tok.word_features(word, self.meta.char_ngram_min, self.meta.char_ngram_max, out);
    }

    /// The vector of a (normalised) word: the mean of its feature rows, into `out`.
    pub fn vector(&self, tok: &Tokenizer, word: &str, feats: &mut Vec<u32>, out: &mut [f32]) {
        let d = self.meta.dim;
        self.features(tok, word, feats);
        out.fill(0.0);
        let input = self.input();
        for &f in feats.iter() {
            for (o, v) in out.iter_mut().zip(&input[f as usize * d..(f as usize + 1) * d]) {
                *o += v;
            }
        }
        let inv = 1.0 / feats.len() as f32;
        out.iter_mut().for_each(|o| *o *= inv);
    }

    /// The unit-length vectors of every trained word (V×D, row-major), composed once for
    /// any number of [`Embeddings::neighbors`] queries.
    pub fn unit_vectors(&self) -> Vec<f32> {
        let (tok, d) = (self.tokenizer(), self.meta.dim);
        let mut out = vec![0.0f32; self.words.len() * d];
        let mut feats = Vec::new();
        for (w, row) in self.words.iter().zip(out.chunks_mut(d)) {
            self.vector(&tok, w, &mut feats, row);
            normalise(row);
        }
        out
    }

    /// The words of `query` as the tokenizer splits and normalises them (case).
    pub fn query_words(&self, query: &str) -> Vec<String> {
        self.tokenizer().tokenize_with_words(query).1.iter().map(|w| w.to_string()).collect()
    }

    /// The `k` trained words nearest to `query` by cosine (the query itself excluded), most
    /// similar first; `units` is [`Embeddings::unit_vectors`]. The query is normalised as the
    /// tokenizer does (case); a word never seen in pretraining is composed from its
    /// character n-grams. `None` unless the query holds exactly one word.
    pub fn neighbors(&self, units: &[f32], query: &str, k: usize) -> Option<(String, Vec<(String, f32)>)> {
        let tok = self.tokenizer();
        let (_, words) = tok.tokenize_with_words(query);
        if words.iter().count() != 1 {
            return None;
        }
        let word = words.iter().next()?.to_owned();
        let d = self.meta.dim;
        let mut q = vec![0.0f32; d];
        self.vector(&tok, &word, &mut Vec::new(), &mut q);
        normalise(&mut q);
        let mut scored: Vec<(f32, usize)> = units
            .chunks(d)
            .enumerate()
            .filter(|&(i, _)| self.words[i] != word)
            .map(|(i, v)| (q.iter().zip(v).map(|(a, b)| a * b).sum(), i))
            .collect();
        scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        scored.truncate(k);
        Some((word, scored.into_iter().map(|(s, i)| (self.words[i].clone(), s)).collect()))
    }

    /// Loads the pretrained rows into a classifier's embedding table (`table`: B×D,
    /// row-major) whose data set was prepared with `spec`. Hashing must agree (buckets,
    /// hash seed, case, and the widths must be equal). Rows pretraining never trained keep
    /// their values. When the classifier's character n-gram range equals pretraining's, the
    /// trained rows are copied as they are; otherwise each trained word's own row gets its
    /// composed vector (the mean over its pretraining features, which is what the word
    /// meant in pretraining), and the character n-gram rows both ranges share are copied.
    pub fn init_table(&self, spec: &TokenizerSpec, dim: usize, table: &mut [f32]) -> Result<InitSummary> {
        let t = &self.meta.tokenizer;
        let same_tokenizer = "pretrain on a data set prepared with the same tokenizer";
        let mismatch = if spec.subword.is_some() {
            Some(format!(
                "the data set holds subword ids, not the hashed features skip-gram trains; {same_tokenizer}"
            ))
        } else if dim != self.meta.dim {
            Some(format!("model.dim is {dim}, the embeddings have {0}: set model.dim = {0}", self.meta.dim))
        } else if spec.buckets != t.buckets {
            Some(format!(
                "the data set has {} buckets, the embeddings {}; {same_tokenizer}",
                spec.buckets, t.buckets
            ))
        } else if spec.hash_seed != t.hash_seed || spec.lowercase != t.lowercase {
            Some(format!("the data set's tokenizer hashes words differently (hash_seed or lowercase); {same_tokenizer}"))
        } else {
            None
        };
        if let Some(m) = mismatch {
            // The caller names the config field (`train::init_table`).
            return Err(Error::Data(m));
        }
        assert_eq!(table.len(), t.buckets as usize * dim, "table shape");
        let tok = self.tokenizer();
        let (cmin, cmax) = (spec.char_ngram_min, spec.char_ngram_max);
        let same_range = cmax == self.meta.char_ngram_max && (cmax == 0 || cmin == self.meta.char_ngram_min);
        let input = self.input();
        let (mut feats, mut theirs) = (Vec::new(), Vec::new());
        let mut vec = vec![0.0f32; dim];
        let mut rows = std::collections::HashSet::new();
        let mut copy = |f: u32, src: &[f32], table: &mut [f32]| {
            table[f as usize * dim..(f as usize + 1) * dim].copy_from_slice(src);
            rows.insert(f);
        };
        for w in &self.words {
            self.features(&tok, w, &mut feats);
            if same_range {
                for &f in &feats {
                    copy(f, &input[f as usize * dim..(f as usize + 1) * dim], table);
                }
            } else {
                self.vector(&tok, w, &mut theirs, &mut vec);
                copy(feats[0], &vec, table);
                tok.word_features(w, cmin, cmax, &mut theirs);
                for &f in theirs.iter().skip(1) {
                    if feats[1..].contains(&f) {
                        copy(f, &input[f as usize * dim..(f as usize + 1) * dim], table);
                    }
                }
            }
        }
        Ok(InitSummary { words: self.words.len(), rows: rows.len(), composed: !same_range })
    }
}

/// What [`Embeddings::init_table`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitSummary {
    /// Trained words whose features were loaded.
    pub words: usize,
    /// Distinct table rows written.
    pub rows: usize,
    /// Whether word rows got composed vectors (the n-gram ranges differ).
    pub composed: bool,
}

fn normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 0.0 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}
