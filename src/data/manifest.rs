//! `manifest.json`: what a prepared data set holds (labels, tokenizer, splits, shards,
//! checksums), written atomically and checked on every read.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64;

use crate::data::input::{Format, Role};
use crate::data::tokenize::TokenizerSpec;
use crate::error::{Error, Result};

/// The manifest's file name inside a data set directory.
pub const MANIFEST_FILE: &str = "manifest.json";
/// The value of the manifest's `format` field.
pub const MANIFEST_FORMAT: &str = "dtrain-dataset";
/// Current manifest format version.
pub const MANIFEST_VERSION: u32 = 2;

/// The whole manifest. Field order is the serialisation order, which the checksum relies on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Always [`MANIFEST_FORMAT`].
    pub format: String,
    /// [`MANIFEST_VERSION`] when written.
    pub format_version: u32,
    /// The dtrain version that wrote it.
    pub dtrain_version: String,
    /// Class names; a label id is an index into this list.
    pub labels: Vec<String>,
    /// The tokenizer, in full.
    pub tokenizer: TokenizerSpec,
    /// `TokenizerSpec::hash`, as 16 hex digits; every shard header carries it too.
    pub tokenizer_hash: String,
    /// Number of shards P of every split.
    pub num_shards: u32,
    /// How the splits were drawn.
    pub split: SplitRecord,
    /// Every input file and what came of its lines.
    pub inputs: Vec<InputRecord>,
    /// Totals over all inputs.
    pub stats: Stats,
    /// Each split with its shards, keyed by split name.
    pub splits: BTreeMap<String, SplitInfo>,
    /// The vocabulary file (`vocab.bin`) that the shards' word sequences index.
    pub vocab: VocabRecord,
    /// xxh3_64 (16 hex digits) of this manifest serialised with `checksum` set to "".
    pub checksum: String,
}

/// The split options, as applied.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitRecord {
    pub seed: u64,
    pub labels_per_class: Option<u32>,
    pub test_fraction: f64,
    pub val_fraction: f64,
    /// Whether the test split came from `--test-input` files instead of a held-out fraction.
    pub fixed_test: bool,
}

/// One input file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputRecord {
    pub path: String,
    pub format: Format,
    pub role: Role,
    /// Lines read.
    pub lines: u64,
    /// Documents accepted (before de-duplication).
    pub docs: u64,
    /// Bad lines skipped under `--skip-bad`.
    pub skipped: u64,
    /// Empty or all-whitespace lines.
    pub blank: u64,
    /// Bytes of text (uncompressed).
    pub bytes: u64,
}

/// Totals over the whole data set.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Stats {
    /// Documents written (all splits).
    pub documents: u64,
    /// Token ids written (all splits).
    pub tokens: u64,
    /// Documents cut by `max_words`.
    pub truncated: u64,
    /// Documents dropped because an identical one (same normalised words, see
    /// `Tokenized::key`) came earlier.
    pub duplicates: u64,
    /// Of those, labeled duplicates whose label differed from the kept copy's.
    pub label_conflicts: u64,
    /// Bad lines skipped.
    pub skipped: u64,
    /// Blank lines ignored.
    pub blank: u64,
    /// Documents with no feature at all (e.g. only punctuation, with punctuation dropped),
    /// skipped under `--skip-bad`.
    pub empty_after_tokenizing: u64,
    /// A subword data set's documents whose text has hashed features but no subword token
    /// of its own (only characters the subword tokenizer drops, such as lone combining
    /// marks): kept, as the special tokens alone, so that the rows match the hashed
    /// preparation's. Absent (0) in manifests written before it was counted.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub specials_only: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The vocabulary file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VocabRecord {
    /// Distinct words.
    pub words: u64,
    pub bytes: u64,
    /// Payload checksum, as in the file's header (16 hex digits).
    pub checksum: String,
}

/// One split.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitInfo {
    pub docs: u64,
    pub tokens: u64,
    /// Word units (the skip-gram sequences' length).
    pub words: u64,
    /// Documents per class (by label id): labels for train/val/test, hidden labels for
    /// unlabeled (documents with no known label are not counted here).
    pub per_class: Vec<u64>,
    pub shards: Vec<ShardInfo>,
}

/// One shard file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardInfo {
    pub file: String,
    pub docs: u64,
    pub ids: u64,
    pub words: u64,
    pub bytes: u64,
    /// Payload checksum, as in the shard header (16 hex digits).
    pub checksum: String,
}

/// 16 lower-case hex digits.
pub fn hex64(v: u64) -> String {
    format!("{v:016x}")
}

impl Manifest {
    fn body_checksum(&self) -> Result<String> {
        let mut copy = self.clone();
        copy.checksum.clear();
        let text = serde_json::to_string_pretty(&copy)
            .map_err(|e| Error::Data(format!("manifest serialisation: {e}")))?;
        Ok(hex64(xxh3_64(text.as_bytes())))
    }

    /// Writes `dir/manifest.json` atomically, with its checksum filled in.
    pub fn write(&mut self, dir: &Path) -> Result<()> {
        self.checksum = self.body_checksum()?;
        let text = serde_json::to_string_pretty(self)
            .map_err(|e| Error::Data(format!("manifest serialisation: {e}")))?;
        crate::fsutil::write_atomic(&dir.join(MANIFEST_FILE), text.as_bytes())
    }

    /// Reads and checks `dir/manifest.json`: JSON shape, format, version, checksum.
    pub fn read(dir: &Path) -> Result<Manifest> {
        if dir.is_file() {
            let hint = crate::data::dataset::containing_dataset(dir)
                .map(|d| format!(": its data set is {}", d.display()))
                .unwrap_or_default();
            return Err(Error::bad_file(
                dir,
                format!("is a file, not a data set directory (one `dtrain prepare` made){hint}"),
            ));
        }
        let path = dir.join(MANIFEST_FILE);
        let missing =
            matches!(std::fs::symlink_metadata(&path), Err(e) if e.kind() == std::io::ErrorKind::NotFound);
        if dir.is_dir() && missing {
            return Err(Error::bad_file(
                dir,
                format!("is not a data set directory (one `dtrain prepare` made): it has no {MANIFEST_FILE}"),
            ));
        }
        let text = crate::fsutil::read_text(&path, 256 << 20, "a dtrain manifest")?;
        let m: Manifest = serde_json::from_str(&text)
            .map_err(|e| Error::bad_file(&path, format!("not a valid dtrain manifest: {e}")))?;
        if m.format != MANIFEST_FORMAT {
            return Err(Error::bad_file(
                &path,
                format!("format is `{}`, expected `{MANIFEST_FORMAT}`", m.format),
            ));
        }
        if m.format_version != MANIFEST_VERSION {
            return Err(Error::bad_file(&path, format!(
                "manifest format version {}, but this dtrain reads version {MANIFEST_VERSION}: prepare the data again",
                m.format_version
            )));
        }
        let want = m.body_checksum()?;
        if want != m.checksum {
            return Err(Error::bad_file(
                &path,
                format!("corrupted or edited: checksum {} does not match the content ({want})", m.checksum),
            ));
        }
        if m.tokenizer_hash != hex64(m.tokenizer.hash()) {
            return Err(Error::bad_file(&path, "tokenizer_hash does not match the tokenizer spec"));
        }
        m.check_consistency().map_err(|msg| Error::bad_file(&path, format!("inconsistent: {msg}")))?;
        Ok(m)
    }

    /// The rules between fields that the checksum alone does not enforce.
    fn check_consistency(&self) -> std::result::Result<(), String> {
        self.tokenizer.validate("manifest.json", "tokenizer").map_err(|e| e.to_string())?;
        if self.num_shards < 1 || self.num_shards > crate::config::MAX_SHARDS {
            return Err(format!(
                "num_shards {} is outside 1..={}",
                self.num_shards,
                crate::config::MAX_SHARDS
            ));
        }
        let mut seen = std::collections::HashSet::new();
        for l in &self.labels {
            if l.trim().is_empty() || l.chars().any(char::is_control) || l.trim() != l {
                return Err(format!(
                    "label {l:?} is not a class name this dtrain's prepare writes (empty, padded or with a control \
                     character): prepare the data again"
                ));
            }
            if !seen.insert(l.as_str()) {
                return Err(format!("label {l:?} is listed twice"));
            }
        }
        let names: Vec<&str> = self.splits.keys().map(String::as_str).collect();
        if names != ["test", "train", "unlabeled", "val"] {
            return Err(format!("splits are {names:?}, expected test, train, unlabeled and val"));
        }
        for (name, split) in &self.splits {
            if split.shards.len() != self.num_shards as usize {
                return Err(format!(
                    "split `{name}` lists {} shards, not {}",
                    split.shards.len(),
                    self.num_shards
                ));
            }
            if split.per_class.len() != self.labels.len() {
                return Err(format!(
                    "split `{name}` has {} per-class counts for {} labels",
                    split.per_class.len(),
                    self.labels.len()
                ));
            }
            let docs: u64 = split.shards.iter().map(|s| s.docs).sum();
            let ids: u64 = split.shards.iter().map(|s| s.ids).sum();
            let words: u64 = split.shards.iter().map(|s| s.words).sum();
            if docs != split.docs || ids != split.tokens || words != split.words {
                return Err(format!(
                    "split `{name}` totals ({} docs, {} ids, {} words) differ from its shards' ({docs}, {ids}, {words})",
                    split.docs, split.tokens, split.words
                ));
            }
        }
        Ok(())
    }
}

/// The width of a text report's class-name column: the longest name (in characters), at
/// least `min`, at most 60. A longer name overflows its column; a width from the name
/// itself could reach Rust's limit on format widths (65,535) and panic.
pub fn label_width<'a>(labels: impl IntoIterator<Item = &'a str>, min: usize) -> usize {
    labels.into_iter().map(|l| l.chars().count()).max().unwrap_or(0).clamp(min, 60.max(min))
}
