//! A prepared data set opened for reading: the manifest plus every shard memory-mapped and
//! cross-checked, with full verification and a human-readable description.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use crate::data::manifest::{hex64, Manifest, MANIFEST_FILE};
use crate::data::shard::{Shard, SplitKind};
use crate::data::vocab::{Vocab, VOCAB_FILE};
use crate::error::{Error, Result};

/// An open data set: manifest and memory-mapped shards of every split.
pub struct Dataset {
    dir: PathBuf,
    manifest: Manifest,
    /// Shards per split, indexed by `SplitKind as usize`.
    shards: [Vec<Shard>; 4],
}

impl Dataset {
    /// Opens `dir`: reads and checks the manifest, opens every shard and checks that its
    /// header agrees with the manifest (counts, shard index, tokenizer, checksum value) and
    /// that its label columns follow the split's rules. Ids and payload checksums are read
    /// in full by [`verify`], payload checksums by [`Dataset::verify_payloads`] (which
    /// `train`, `eval` and `export-logits` call); the training loader checks each batch's ids.
    pub fn open(dir: &Path) -> Result<Dataset> {
        let manifest = Manifest::read(dir)?;
        let mut shards: [Vec<Shard>; 4] = Default::default();
        for kind in SplitKind::ALL {
            let mut per_class = vec![0u64; manifest.labels.len()];
            for index in 0..manifest.num_shards {
                let (shard, counts) = open_checked(dir, &manifest, kind, index)?;
                per_class.iter_mut().zip(counts).for_each(|(a, b)| *a += b);
                shards[kind as usize].push(shard);
            }
            if let Some(msg) = per_class_mismatch(&manifest, kind, &per_class) {
                return Err(Error::bad_file(dir.join(MANIFEST_FILE), msg));
            }
        }
        Ok(Dataset { dir: dir.to_owned(), manifest, shards })
    }

    /// Recomputes the payload checksum of every shard `which(split, index)` selects, in
    /// parallel (about one sequential read of them), so that a run reads no silently damaged
    /// document: the training loader checks ids, not every byte.
    pub fn verify_payloads(&self, which: impl Fn(SplitKind, usize) -> bool) -> Result<()> {
        use rayon::prelude::*;
        let mut chosen: Vec<&Shard> = Vec::new();
        for k in SplitKind::ALL {
            chosen.extend(self.shards(k).iter().enumerate().filter(|&(i, _)| which(k, i)).map(|(_, s)| s));
        }
        chosen.par_iter().try_for_each(|s| s.verify_checksum())
    }

    /// The manifest.
    pub fn manifest(&self) -> &Manifest {
        &self.manifest
    }

    /// The data set directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Class names, by label id.
    pub fn labels(&self) -> &[String] {
        &self.manifest.labels
    }

    /// The P shards of `split`.
    pub fn shards(&self, split: SplitKind) -> &[Shard] {
        &self.shards[split as usize]
    }

    /// Reads the vocabulary that the shards' word sequences index, checked against the
    /// manifest (checksum and size).
    pub fn vocab(&self) -> Result<Vocab> {
        read_vocab(&self.dir, &self.manifest)
    }
}

/// Reads `vocab.bin` and checks it against the manifest's record of it.
fn read_vocab(dir: &Path, manifest: &Manifest) -> Result<Vocab> {
    let (vocab, summary) = Vocab::read(dir)?;
    let path = dir.join(VOCAB_FILE);
    if summary.words != manifest.vocab.words || summary.bytes != manifest.vocab.bytes {
        return Err(Error::bad_file(
            &path,
            format!(
                "holds {} words in {} bytes, but the manifest lists {} words in {} bytes",
                summary.words, summary.bytes, manifest.vocab.words, manifest.vocab.bytes
            ),
        ));
    }
    if hex64(summary.checksum) != manifest.vocab.checksum {
        return Err(Error::bad_file(&path, "is not the vocabulary the manifest lists (checksum differs)"));
    }
    Ok(vocab)
}

/// Whether the manifest's per-class counts of split `kind` differ from `found`, the counts
/// of its shards' label columns, and how.
fn per_class_mismatch(manifest: &Manifest, kind: SplitKind, found: &[u64]) -> Option<String> {
    let listed = &manifest.splits[kind.name()].per_class;
    (listed.as_slice() != found).then(|| {
        format!(
            "inconsistent: split `{}` lists {listed:?} documents per class, and its shards' label columns \
             hold {found:?}",
            kind.name()
        )
    })
}

/// Opens shard `index` of `kind` and checks it against the manifest; returns it with its
/// documents per class (as [`Shard::verify_labels`] counts them).
fn open_checked(dir: &Path, manifest: &Manifest, kind: SplitKind, index: u32) -> Result<(Shard, Vec<u64>)> {
    let info =
        manifest.splits.get(kind.name()).and_then(|s| s.shards.get(index as usize)).ok_or_else(|| {
            Error::bad_file(
                dir.join("manifest.json"),
                format!("no shard {index} listed for split `{}`", kind.name()),
            )
        })?;
    if info.file != kind.shard_file(index) {
        return Err(Error::bad_file(
            dir.join("manifest.json"),
            format!("shard {index} of `{}` is named `{}`", kind.name(), info.file),
        ));
    }
    let path = dir.join(&info.file);
    let shard = Shard::open(&path)?;
    let per_class = shard.verify_labels(manifest.labels.len() as u32)?;
    let h = shard.header();
    let mismatch = |what: &str, header: String, manifest: String| {
        Err(Error::bad_file(&path, format!("{what} is {header} in the shard but {manifest} in the manifest")))
    };
    if hex64(h.tokenizer_hash) != manifest.tokenizer_hash {
        return Err(Error::bad_file(
            &path,
            format!(
                "made with another tokenizer: hash {} in the shard, {} in the manifest",
                hex64(h.tokenizer_hash),
                manifest.tokenizer_hash
            ),
        ));
    }
    if h.split != kind || h.shard_index != index || h.num_shards != manifest.num_shards {
        return mismatch(
            "the shard identity",
            format!("{} {}/{}", h.split.name(), h.shard_index, h.num_shards),
            format!("{} {index}/{}", kind.name(), manifest.num_shards),
        );
    }
    if h.num_docs != info.docs || h.num_ids != info.ids || h.num_words != info.words {
        return mismatch(
            "the size",
            format!("{} docs / {} ids / {} words", h.num_docs, h.num_ids, h.num_words),
            format!("{} docs / {} ids / {} words", info.docs, info.ids, info.words),
        );
    }
    if hex64(h.payload_checksum) != info.checksum {
        return mismatch("the checksum", hex64(h.payload_checksum), info.checksum.clone());
    }
    Ok((shard, per_class))
}

/// The outcome of `dtrain verify`: one line per file checked.
#[derive(Debug, Default)]
pub struct VerifyReport {
    /// `(file, None)` when the file passed, `(file, Some(problem))` when not.
    pub files: Vec<(String, Option<String>)>,
}

impl VerifyReport {
    /// Whether every file passed.
    pub fn ok(&self) -> bool {
        self.files.iter().all(|(_, e)| e.is_none())
    }
}

/// The data set directory that `path` is one file of: its manifest, its vocabulary, or a
/// shard its manifest lists (a stray shard beside them is not one of its files).
pub fn containing_dataset(path: &Path) -> Option<PathBuf> {
    let name = path.file_name()?.to_str()?;
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    if !path.is_file() || !dir.join(MANIFEST_FILE).is_file() {
        return None;
    }
    let listed = name == MANIFEST_FILE
        || name == VOCAB_FILE
        || Manifest::read(dir)
            .is_ok_and(|m| SplitKind::ALL.iter().any(|k| (0..m.num_shards).any(|i| k.shard_file(i) == name)));
    listed.then(|| dir.to_path_buf())
}

/// Checks everything in `dir`: the manifest's checksum, each shard's structure, its
/// agreement with the manifest, its payload checksum and the range of every value. Keeps
/// going past failures so the report names every bad file.
pub fn verify(dir: &Path) -> VerifyReport {
    let mut report = VerifyReport::default();
    let manifest = match Manifest::read(dir) {
        Ok(m) => {
            report.files.push(("manifest.json".into(), None));
            m
        }
        Err(e) => {
            report.files.push(("manifest.json".into(), Some(e.to_string())));
            return report;
        }
    };
    // Without a readable vocabulary the shards' word ids cannot be checked (and are not
    // blamed for it: the vocabulary's own line names the problem).
    let vocab_len = match read_vocab(dir, &manifest) {
        Ok(v) => {
            report.files.push((VOCAB_FILE.into(), None));
            Some(v.len() as u64)
        }
        Err(e) => {
            report.files.push((VOCAB_FILE.into(), Some(e.to_string())));
            None
        }
    };
    for kind in SplitKind::ALL {
        let mut per_class = Some(vec![0u64; manifest.labels.len()]);
        for index in 0..manifest.num_shards {
            let outcome = open_checked(dir, &manifest, kind, index).and_then(|(shard, counts)| {
                shard.verify_checksum()?;
                shard.verify_ids(manifest.tokenizer.buckets)?;
                vocab_len.map_or(Ok(()), |n| shard.verify_words(n))?;
                Ok(counts)
            });
            // The counts are compared only when every shard of the split could be read.
            match (&outcome, per_class.as_mut()) {
                (Ok(counts), Some(sum)) => sum.iter_mut().zip(counts).for_each(|(a, b)| *a += b),
                _ => per_class = None,
            }
            report.files.push((kind.shard_file(index), outcome.err().map(|e| e.to_string())));
        }
        if let Some(msg) = per_class.and_then(|found| per_class_mismatch(&manifest, kind, &found)) {
            report.files.push((MANIFEST_FILE.into(), Some(msg)));
        }
    }
    report
}

/// A readable summary of a manifest: labels, tokenizer, splits with per-class counts.
pub fn describe(m: &Manifest) -> String {
    let mut s = String::new();
    let t = &m.tokenizer;
    let st = &m.stats;
    let _ = writeln!(
        s,
        "documents  {}   token ids {}   ({:.1} ids/doc)",
        st.documents,
        st.tokens,
        st.tokens as f64 / st.documents.max(1) as f64
    );
    let words: u64 = m.splits.values().map(|s| s.words).sum();
    let _ = writeln!(s, "words      {words} in sequence   vocabulary {} distinct words", m.vocab.words);
    // A subword data set's documents are cut by either limit.
    let limits = match &t.subword {
        Some(sw) => format!("max_words {} or subword.max_len {}", t.max_words, sw.max_len),
        None => format!("max_words {}", t.max_words),
    };
    let _ = writeln!(
        s,
        "dropped    {} duplicates ({} with another label)   {} bad lines skipped   {} blank lines   {} truncated docs ({limits})",
        st.duplicates, st.label_conflicts, st.skipped, st.blank, st.truncated
    );
    if let Some(sw) = &t.subword {
        let _ = writeln!(
            s,
            "subword    {}   max_len {}   (the ids the model reads; the hashing tokenizer below keys duplicates and words)",
            sw.path, sw.max_len
        );
        if st.specials_only > 0 {
            let _ = writeln!(
                s,
                "warning    {} documents have no subword token of their own (only characters the subword \
                 tokenizer drops): kept as its special tokens alone, as rows of the hashed preparation",
                st.specials_only
            );
        }
    }
    let _ = writeln!(
        s,
        "tokenizer  hash {}   lowercase {}   word n-grams ≤{}   char n-grams {}   cjk n-grams ≤{}   punctuation {:?}   buckets {}",
        m.tokenizer_hash,
        t.lowercase,
        t.word_ngrams,
        if t.char_ngram_max == 0 { "off".to_string() } else { format!("{}..{}", t.char_ngram_min, t.char_ngram_max) },
        t.cjk_ngram_max,
        t.punctuation,
        t.buckets
    );
    let sp = &m.split;
    let _ = writeln!(
        s,
        "split      seed {}   labels/class {}   test {}   val fraction {}   shards {}",
        sp.seed,
        sp.labels_per_class.map_or("all".into(), |k| k.to_string()),
        if sp.fixed_test {
            "fixed (--test-input)".to_string()
        } else {
            format!("fraction {}", sp.test_fraction)
        },
        sp.val_fraction,
        m.num_shards
    );
    let _ = writeln!(s, "inputs");
    for i in &m.inputs {
        let _ = writeln!(
            s,
            "  {:<10} {:<6} {}   {} lines, {} docs, {} skipped, {} blank",
            format!("{:?}", i.role).to_lowercase(),
            format!("{:?}", i.format).to_lowercase(),
            i.path,
            i.lines,
            i.docs,
            i.skipped,
            i.blank
        );
    }
    let width = crate::data::manifest::label_width(m.labels.iter().map(String::as_str), 5);
    let order = [SplitKind::Train, SplitKind::Val, SplitKind::Test, SplitKind::Unlabeled];
    let _ = write!(s, "{:<width$}", "class");
    for k in order {
        let head = if k == SplitKind::Unlabeled { "unlabeled*" } else { k.name() };
        let _ = write!(s, " {head:>10}");
    }
    let _ = writeln!(s);
    for (c, name) in m.labels.iter().enumerate() {
        let _ = write!(s, "{name:<width$}");
        for k in order {
            let n = m.splits.get(k.name()).map_or(0, |sp| sp.per_class[c]);
            let _ = write!(s, " {n:>10}");
        }
        let _ = writeln!(s);
    }
    let _ = write!(s, "{:<width$}", "total");
    for k in order {
        let n = m.splits.get(k.name()).map_or(0, |sp| sp.docs);
        let _ = write!(s, " {n:>10}");
    }
    let _ = writeln!(s);
    let _ =
        writeln!(s, "* unlabeled per class counts hidden labels (pool documents whose label was hidden);");
    let _ = writeln!(s, "  its total also counts documents from unlabeled files, whose label is unknown.");
    s
}

/// A few documents of `split`, decoded: sample id, label, hidden label, and their ids.
pub fn sample_lines(ds: &Dataset, split: SplitKind, count: usize) -> String {
    let mut s = String::new();
    let labels = ds.labels();
    let name = |l: Option<u32>| {
        l.map_or("-".to_string(), |l| labels.get(l as usize).cloned().unwrap_or_else(|| format!("#{l}?")))
    };
    let mut shown = 0;
    'outer: for (si, shard) in ds.shards(split).iter().enumerate() {
        // A shard is decoded only once its payload matches its checksum (one read of it):
        // a damaged one is named, not shown as if it were data.
        if shown < count && !shard.is_empty() {
            if let Err(e) = shard.verify_checksum() {
                let _ = writeln!(s, "  (not decoded: {e}; `dtrain verify` checks every shard)");
                continue;
            }
        }
        for i in 0..shard.len() {
            if shown == count {
                break 'outer;
            }
            let d = shard.doc(i);
            let head: Vec<String> = d.ids.iter().take(12).map(u32::to_string).collect();
            let more = if d.ids.len() > 12 { " …" } else { "" };
            let _ = writeln!(
                s,
                "  {}[{si}:{i}] sample {:<7} label {:<16} hidden {:<16} {} ids: {}{more}",
                split.name(),
                d.sample_id,
                name(d.label),
                name(shard.hidden_label(i)),
                d.ids.len(),
                head.join(" ")
            );
            shown += 1;
        }
    }
    if shown == 0 {
        let _ = writeln!(s, "  (split `{}` is empty)", split.name());
    }
    s
}
