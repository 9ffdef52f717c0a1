//! `dtrain prepare`: raw input files → a data set directory (manifest + P shards per split).
//!
//! Order of work: the fixed test files, then the labeled files, are read, tokenized in
//! parallel and de-duplicated into memory; the pool is split (see `split`); train, val and
//! test are written; then the unlabeled split is streamed: the pool's leftovers first, then
//! each unlabeled file, chunk by chunk, straight into the shard writers. Memory is the
//! labeled documents' ids, a few chunks of lines in flight, and per document about 24
//! bytes of shard columns (offset, label, sample id, hidden label) plus 10–20 bytes of
//! de-duplication key: an unlabeled corpus whose text is far larger than RAM is fine.
//!
//! Rules the output keeps:
//! - a document is identified by its tokenizer key (its normalised, truncated words, before
//!   hashing); the first occurrence wins and later identical documents (in any split, any
//!   file) are dropped and counted, so no test or val text also appears in train or
//!   unlabeled. A labeled duplicate whose label differs is also counted as a label conflict;
//! - global sample ids number the kept documents in reading order (test files, labeled
//!   files, unlabeled files);
//! - within a split, documents go to shards round-robin in plan order, so every shard of a
//!   labeled split is stratified and shard sizes differ by at most one.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::config::PrepareConfig;
use crate::data::input::{label_name, parse_line, DiskCounter, Format, JsonFields, LineReader, Parsed, Role};
use crate::data::manifest::{
    hex64, InputRecord, Manifest, ShardInfo, SplitInfo, SplitRecord, Stats, VocabRecord, MANIFEST_FORMAT,
    MANIFEST_VERSION,
};
use crate::data::shard::{ShardWriter, SplitKind};
use crate::data::split;
use crate::data::subword::SubwordTokenizer;
use crate::data::tokenize::{Tokenizer, Words};
use crate::data::vocab::Vocab;
use crate::error::{Error, IoContext, Result};
use crate::fsutil;

/// Lines per parallel chunk.
const CHUNK_LINES: usize = 8192;

/// What `prepare` did, for the summary.
#[derive(Debug, Clone)]
pub struct PrepareReport {
    /// The manifest written.
    pub manifest: Manifest,
    /// The data set directory.
    pub dir: PathBuf,
    /// Wall time.
    pub elapsed: Duration,
    /// Uncompressed input bytes read.
    pub text_bytes: u64,
    /// Documents read (before de-duplication).
    pub docs_read: u64,
    /// The first few bad lines skipped, as `file:line: rule`.
    pub skipped_examples: Vec<String>,
    /// What the data set looks wrong for, though it was written (a subword tokenizer that
    /// reads most of the text as its unknown token).
    pub warnings: Vec<String>,
}

/// One tokenized document from an input line.
struct TokDoc {
    line: u64,
    label: Option<String>,
    ids: Vec<u32>,
    /// Word units in text order, as text (from the parallel tokenizer) …
    word_text: Words,
    /// … and as vocabulary indices (assigned in file order, for kept documents).
    words: Vec<u32>,
    truncated: bool,
    key: u64,
    /// A subword data set's document whose text has no subword token of its own: stored as
    /// the tokenizer's special tokens alone.
    specials_only: bool,
}

/// A labeled document kept in memory until the split is planned.
struct PoolDoc {
    label: u32,
    ids: Vec<u32>,
    words: Vec<u32>,
    sample_id: u64,
}

/// The state shared by every file of one `prepare` run.
struct Run<'a> {
    cfg: &'a PrepareConfig,
    tokenizer: Tokenizer,
    /// The subword tokenizer whose ids replace the hashed features, if any.
    subword: Option<SubwordTokenizer>,
    fields: JsonFields,
    /// Fixed label list (from the config), if any.
    fixed_labels: Option<HashMap<String, u32>>,
    /// Labels seen, in first-seen order (when no fixed list).
    seen_labels: Vec<String>,
    seen_index: HashMap<String, u32>,
    /// De-duplication keys and the provisional label of the first copy (-1: unlabeled).
    keys: HashMap<u64, i64>,
    /// Every word of the kept documents, in first-seen order.
    vocab: Vocab,
    next_sample_id: u64,
    stats: Stats,
    inputs: Vec<InputRecord>,
    skipped_examples: Vec<String>,
    disk: DiskCounter,
    bar: ProgressBar,
    docs_read: u64,
    /// With a subword tokenizer: the ids of the kept documents' text (special tokens left
    /// out), and those that are its unknown token.
    subword_ids: u64,
    unknown_ids: u64,
}

/// Runs `dtrain prepare` with a validated config. `progress` shows a bar on stderr.
/// The config with `tokenizer.subword` resolved: the file read, its checksum and vocabulary
/// size recorded, `buckets` set to that size.
fn with_subword(cfg: &PrepareConfig) -> Result<PrepareConfig> {
    let mut cfg = cfg.clone();
    let Some(sw) = cfg.tokenizer.subword.as_mut() else { return Ok(cfg) };
    let path = Path::new(&sw.path);
    let bytes = std::fs::read(path).map_err(|e| {
        Error::config("prepare", "tokenizer.subword.path", format!("{}: {e}", path.display()))
    })?;
    let tok = SubwordTokenizer::open(path)?;
    let checksum = hex64(xxhash_rust::xxh3::xxh3_64(&bytes));
    if sw.checksum.as_ref().is_some_and(|c| *c != checksum) {
        return Err(Error::config(
            "prepare",
            "tokenizer.subword.checksum",
            format!(
                "{} has checksum {checksum}, not the {} asked for",
                path.display(),
                sw.checksum.as_ref().unwrap()
            ),
        ));
    }
    sw.checksum = Some(checksum);
    sw.vocab = Some(tok.vocab_size());
    cfg.tokenizer.buckets = tok.vocab_size();
    Ok(cfg)
}

pub fn prepare(cfg: &PrepareConfig, progress: bool) -> Result<PrepareReport> {
    let start = Instant::now();
    let cfg = &with_subword(cfg)?;
    let files: Vec<(PathBuf, Role)> = cfg
        .input
        .test
        .iter()
        .map(|p| (p.clone(), Role::Test))
        .chain(cfg.input.labeled.iter().map(|p| (p.clone(), Role::Labeled)))
        .chain(cfg.input.unlabeled.iter().map(|p| (p.clone(), Role::Unlabeled)))
        .collect();
    let mut formats = Vec::new();
    let mut total_bytes = 0u64;
    for (path, role) in &files {
        let format = Format::resolve(cfg.input.format, path)?;
        if format == Format::Text && *role != Role::Unlabeled {
            return Err(Error::bad_file(
                path,
                "plain text has no labels: pass plain-text files with --unlabeled",
            ));
        }
        formats.push(format);
        total_bytes += std::fs::metadata(path).at(path)?.len();
    }

    let out = &cfg.output.dir;
    fsutil::recover_dir(out)?;
    check_output(out, cfg.output.force, files.iter().map(|(p, _)| p.as_path()))?;
    let staged = fsutil::sibling(out, &format!(".tmp-{}", std::process::id()));
    if staged.exists() {
        std::fs::remove_dir_all(&staged).at(&staged)?;
    }
    if let Some(parent) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        crate::fsutil::create_dirs(parent)?;
    }
    std::fs::create_dir(&staged).at(&staged)?;
    let result = prepare_into(cfg, &files, &formats, total_bytes, progress, &staged);
    let mut report = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e);
        }
    };
    fsutil::install_dir(&staged, out, cfg.output.force).inspect_err(|_| {
        let _ = std::fs::remove_dir_all(&staged);
    })?;
    report.dir = out.clone();
    report.elapsed = start.elapsed();
    Ok(report)
}

/// Refuses, before any work, an output that would lose data: an existing path without
/// `force`; with `force`, anything but a dtrain data set, a directory holding an input, or
/// one holding files prepare does not write.
fn check_output<'a>(out: &Path, force: bool, inputs: impl Iterator<Item = &'a Path>) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !force {
        return Err(Error::bad_file(
            out,
            "already exists: choose another --out, or pass --force to replace it",
        ));
    }
    if !out.join(crate::data::manifest::MANIFEST_FILE).is_file() {
        return Err(Error::bad_file(
            out,
            "exists and is not a dtrain data set (no manifest.json): refusing to replace it, even with --force",
        ));
    }
    let dest = out.canonicalize().at(out)?;
    for input in inputs {
        if input.canonicalize().at(input)?.starts_with(&dest) {
            return Err(Error::bad_file(
                input,
                format!("lies inside the output directory {}, which --force would delete", out.display()),
            ));
        }
    }
    // --force replaces what prepare wrote, not what a user put beside it.
    for entry in std::fs::read_dir(out).at(out)? {
        let entry = entry.at(out)?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let base = name.strip_suffix(".tmp").unwrap_or(&name);
        let ours = entry.file_type().at(out)?.is_file()
            && (base == crate::data::manifest::MANIFEST_FILE
                || base == crate::data::vocab::VOCAB_FILE
                || name.ends_with(".shard"));
        if !ours {
            return Err(Error::bad_file(
                entry.path(),
                "was not written by dtrain prepare: --force would delete it with the old data set; move it out first",
            ));
        }
    }
    Ok(())
}

fn prepare_into(
    cfg: &PrepareConfig,
    files: &[(PathBuf, Role)],
    formats: &[Format],
    total_bytes: u64,
    progress: bool,
    dir: &Path,
) -> Result<PrepareReport> {
    let bar = if progress {
        let b = ProgressBar::with_draw_target(Some(total_bytes), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template(
                "prepare {msg} [{wide_bar}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let fixed_labels = (!cfg.input.labels.is_empty())
        .then(|| cfg.input.labels.iter().enumerate().map(|(i, l)| (label_name(l), i as u32)).collect());
    let mut run = Run {
        cfg,
        tokenizer: Tokenizer::new(cfg.tokenizer.clone()),
        subword: match &cfg.tokenizer.subword {
            Some(sw) => Some(SubwordTokenizer::open(Path::new(&sw.path))?),
            None => None,
        },
        fields: JsonFields { text: cfg.input.text_field.clone(), label: cfg.input.label_field.clone() },
        fixed_labels,
        seen_labels: Vec::new(),
        seen_index: HashMap::new(),
        keys: HashMap::new(),
        vocab: Vocab::new(),
        next_sample_id: 0,
        stats: Stats::default(),
        inputs: Vec::new(),
        skipped_examples: Vec::new(),
        disk: DiskCounter::default(),
        bar,
        docs_read: 0,
        subword_ids: 0,
        unknown_ids: 0,
    };

    // 1. Fixed test files and labeled files, into memory.
    let mut test_docs: Vec<PoolDoc> = Vec::new();
    let mut pool: Vec<PoolDoc> = Vec::new();
    let n_labeled_files = cfg.input.test.len() + cfg.input.labeled.len();
    for ((path, role), &format) in files.iter().zip(formats).take(n_labeled_files) {
        let target = if *role == Role::Test { &mut test_docs } else { &mut pool };
        run.read_file(path, *role, format, |doc, sample_id, label| {
            let label = u32::try_from(label).expect("labeled roles always have a label id");
            target.push(PoolDoc { label, ids: doc.ids, words: doc.words, sample_id });
            Ok(())
        })?;
    }

    // 2. Final label ids: the fixed list, or every label seen sorted by name.
    let names: Vec<String> = match &run.fixed_labels {
        Some(_) => cfg.input.labels.iter().map(|l| label_name(l)).collect(),
        None => {
            let mut sorted = run.seen_labels.clone();
            sorted.sort();
            let remap: Vec<u32> = run
                .seen_labels
                .iter()
                .map(|l| sorted.binary_search(l).expect("sorted copy") as u32)
                .collect();
            for d in test_docs.iter_mut().chain(pool.iter_mut()) {
                d.label = remap[d.label as usize];
            }
            sorted
        }
    };
    if names.is_empty() && !cfg.input.labeled.is_empty() {
        return Err(Error::Data("the labeled inputs hold no document".into()));
    }
    let fixed_test = !cfg.input.test.is_empty();
    let test_counts = fixed_test.then(|| {
        let mut c = vec![0u64; names.len()];
        for d in &test_docs {
            c[d.label as usize] += 1;
        }
        c
    });
    let pool_labels: Vec<u32> = pool.iter().map(|d| d.label).collect();
    let plan = split::plan(&pool_labels, &names, &cfg.split, test_counts.as_deref())?;

    // 3. Train, val, test.
    let tok_hash = cfg.tokenizer.hash();
    let p = cfg.output.shards;
    let mut splits = std::collections::BTreeMap::new();
    for kind in [SplitKind::Train, SplitKind::Val, SplitKind::Test] {
        let mut w = SplitWriter::new(dir, kind, p, tok_hash, names.len())?;
        let docs: Vec<&PoolDoc> = if kind == SplitKind::Test && fixed_test {
            test_docs.iter().collect()
        } else {
            plan.get(kind).iter().map(|&i| &pool[i]).collect()
        };
        for d in docs {
            w.push(&d.ids, &d.words, d.label as i32, d.sample_id, -1)?;
        }
        splits.insert(kind.name().to_owned(), w.finish()?);
    }

    // 4. Unlabeled: the pool's leftovers (hidden labels kept), then the unlabeled files.
    let mut w = SplitWriter::new(dir, SplitKind::Unlabeled, p, tok_hash, names.len())?;
    for &i in plan.get(SplitKind::Unlabeled) {
        let d = &pool[i];
        w.push(&d.ids, &d.words, -1, d.sample_id, d.label as i32)?;
    }
    drop(pool);
    drop(test_docs);
    for ((path, role), &format) in files.iter().zip(formats).skip(n_labeled_files) {
        run.read_file(path, *role, format, |doc, sample_id, _| {
            w.push(&doc.ids, &doc.words, -1, sample_id, -1)
        })?;
    }
    splits.insert(SplitKind::Unlabeled.name().to_owned(), w.finish()?);
    run.bar.finish_and_clear();

    let vocab = run.vocab.write(dir)?;
    run.stats.documents = splits.values().map(|s: &SplitInfo| s.docs).sum();
    run.stats.tokens = splits.values().map(|s| s.tokens).sum();
    let mut manifest = Manifest {
        format: MANIFEST_FORMAT.into(),
        format_version: MANIFEST_VERSION,
        dtrain_version: env!("CARGO_PKG_VERSION").into(),
        labels: names,
        tokenizer: cfg.tokenizer.clone(),
        tokenizer_hash: hex64(tok_hash),
        num_shards: p,
        split: SplitRecord {
            seed: cfg.split.seed,
            labels_per_class: cfg.split.labels_per_class,
            test_fraction: cfg.split.test_fraction,
            val_fraction: cfg.split.val_fraction,
            fixed_test,
        },
        inputs: run.inputs,
        stats: run.stats,
        splits,
        vocab: VocabRecord { words: vocab.words, bytes: vocab.bytes, checksum: hex64(vocab.checksum) },
        checksum: String::new(),
    };
    manifest.write(dir)?;
    let text_bytes = manifest.inputs.iter().map(|i| i.bytes).sum();
    let mut warnings = Vec::new();
    if manifest.labels.len() == 1 {
        warnings.push(format!(
            "the labeled inputs hold one class ({:?}): a classifier has nothing to tell apart",
            manifest.labels[0]
        ));
    }
    // Labels that differ only in case or in invisible characters are separate classes;
    // usually a typo, or a zero-width space pasted in.
    let mut folded: Vec<(String, &String)> = manifest.labels.iter().map(|l| (fold_label(l), l)).collect();
    folded.sort();
    for pair in folded.windows(2).filter(|p| p[0].0 == p[1].0) {
        let (a, b) = (pair[0].1, pair[1].1);
        let (ha, hb) = (hidden_chars(a), hidden_chars(b));
        let how = if ha == hb {
            "only in case".to_string()
        } else {
            // The invisible characters one label has and the other lacks, once each.
            let mut odd: Vec<char> = ha
                .iter()
                .filter(|c| !hb.contains(c))
                .chain(hb.iter().filter(|c| !ha.contains(c)))
                .copied()
                .collect();
            odd.sort_unstable();
            odd.dedup();
            let odd: Vec<String> = odd.iter().map(|&c| format!("U+{:04X}", c as u32)).collect();
            let case = if fold_invisible(a) == fold_invisible(b) { "" } else { "case and " };
            format!("only in {case}invisible characters ({})", odd.join(", "))
        };
        warnings.push(format!("the labels {a:?} and {b:?} differ {how}, and are two classes"));
    }
    // A fraction of each class rounds down: classes too small hold out nothing.
    for (field, fraction, split) in [
        ("split.test_fraction", cfg.split.test_fraction, "test"),
        ("split.val_fraction", cfg.split.val_fraction, "val"),
    ] {
        if fraction > 0.0 && manifest.splits.get(split).is_some_and(|s| s.docs == 0) {
            warnings.push(format!(
                "{field} = {fraction} holds out no document: every class is too small for it to round to one, so the {split} split is empty"
            ));
        }
    }
    if let Some(sw) = &cfg.tokenizer.subword {
        // A sound tokenizer on text of its language reads a fraction of a percent as unknown.
        if run.unknown_ids * 2 > run.subword_ids {
            warnings.push(format!(
                "{} read {} of the documents' {} subword ids as its unknown token: is it the tokenizer of this text's language, and whole?",
                sw.path,
                run.unknown_ids,
                run.subword_ids
            ));
        }
    }
    Ok(PrepareReport {
        manifest,
        dir: dir.to_owned(),
        elapsed: Duration::ZERO,
        text_bytes,
        docs_read: run.docs_read,
        skipped_examples: run.skipped_examples,
        warnings,
    })
}

impl Run<'_> {
    /// The provisional label id of `name` (first-seen order, or the fixed list's order).
    fn label_id(&mut self, path: &Path, line: u64, name: &str) -> Result<u32> {
        if let Some(fixed) = &self.fixed_labels {
            // Unknown labels were already rejected per line in `read_file`.
            return fixed.get(name).copied().ok_or_else(|| Error::BadLine {
                path: path.to_owned(),
                line,
                msg: format!("unknown label `{name}`"),
            });
        }
        if let Some(&id) = self.seen_index.get(name) {
            return Ok(id);
        }
        let id = self.seen_labels.len() as u32;
        self.seen_labels.push(name.to_owned());
        self.seen_index.insert(name.to_owned(), id);
        Ok(id)
    }

    /// Records a bad line: an error, or skipped and counted under `skip_bad`.
    fn bad_line(&mut self, record: &mut InputRecord, path: &Path, line: u64, msg: String) -> Result<()> {
        if !self.cfg.input.skip_bad {
            return Err(Error::BadLine {
                path: path.to_owned(),
                line,
                msg: format!("{msg} (pass --skip-bad to skip such lines)"),
            });
        }
        record.skipped += 1;
        self.stats.skipped += 1;
        if self.skipped_examples.len() < 5 {
            self.skipped_examples.push(format!("{}:{line}: {msg}", path.display()));
        }
        Ok(())
    }

    /// Reads one file in chunks: a reader thread fills chunks of lines, rayon parses and
    /// tokenizes each chunk, then `sink` receives the kept documents in file order with their
    /// global sample ids and provisional label ids (-1 for unlabeled).
    fn read_file(
        &mut self,
        path: &Path,
        role: Role,
        format: Format,
        mut sink: impl FnMut(TokDoc, u64, i64) -> Result<()>,
    ) -> Result<()> {
        let mut record = InputRecord {
            path: path.display().to_string(),
            format,
            role,
            lines: 0,
            docs: 0,
            skipped: 0,
            blank: 0,
            bytes: 0,
        };
        self.bar.set_message(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        let mut reader = LineReader::open(path, self.disk.clone())?;
        let (tx, rx) = sync_channel::<Result<Vec<(u64, Vec<u8>)>>>(2);
        std::thread::scope(|scope| -> Result<()> {
            scope.spawn(move || loop {
                let mut chunk = Vec::with_capacity(CHUNK_LINES);
                let status = loop {
                    if chunk.len() == CHUNK_LINES {
                        break Ok(true);
                    }
                    let mut buf = Vec::new();
                    match reader.next_line(&mut buf) {
                        Ok(Some(n)) => chunk.push((n, buf)),
                        Ok(None) => break Ok(false),
                        Err(e) => break Err(e),
                    }
                };
                // A failed send means the consumer stopped (on an error): just end.
                if !chunk.is_empty() && tx.send(Ok(chunk)).is_err() {
                    return;
                }
                match status {
                    Ok(true) => continue,
                    Ok(false) => return,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                }
            });
            // Owned copies: the loop below mutates `self` while rayon reads these.
            let (fields, tokenizer, fixed) =
                (self.fields.clone(), self.tokenizer.clone(), self.fixed_labels.clone());
            let (fields, tokenizer, fixed) = (&fields, &tokenizer, fixed.as_ref());
            let subword = self.subword.clone();
            let max_len = self.cfg.tokenizer.subword.as_ref().map_or(0, |s| s.max_len as usize);
            for chunk in rx {
                let chunk = chunk?;
                record.lines += chunk.len() as u64;
                record.bytes += chunk.iter().map(|(_, b)| b.len() as u64 + 1).sum::<u64>();
                let parsed: Vec<std::result::Result<Option<TokDoc>, (u64, String)>> = chunk
                    .par_iter()
                    .map(|(line, bytes)| {
                        let doc =
                            match parse_line(bytes, *line, format, role, fields).map_err(|m| (*line, m))? {
                                Parsed::Blank => return Ok(None),
                                Parsed::Doc(d) => d,
                            };
                        if let (Some(fixed), Some(label)) = (fixed, &doc.label) {
                            if !fixed.contains_key(label) {
                                return Err((
                                    *line,
                                    format!("unknown label `{label}` (not in input.labels)"),
                                ));
                            }
                        }
                        let (mut t, word_text) = tokenizer.tokenize_with_words(&doc.text);
                        // Whether a document is kept is the hashing tokenizer's decision, with
                        // a subword tokenizer too: the rows match the hashed preparation's.
                        if t.ids.is_empty() {
                            return Err((
                                *line,
                                "no features after tokenizing (only punctuation or ignorable characters?)"
                                    .into(),
                            ));
                        }
                        let mut specials_only = false;
                        if let Some(sw) = &subword {
                            let ids = sw.encode(&doc.text, max_len).map_err(|e| (*line, e.to_string()))?;
                            t.truncated |= sw.was_cut(&doc.text, ids.len(), max_len);
                            // Text the hashing tokenizer gives features but the subword one
                            // drops (lone combining marks, U+FFFD) keeps its row, so that the
                            // rows match the hashed preparation's: its special tokens alone,
                            // counted in the manifest and shown.
                            specials_only = ids.is_empty();
                            t.ids = if specials_only { sw.specials() } else { ids };
                        }
                        if let Some(w) = word_text.iter().find(|w| w.len() > crate::data::vocab::MAX_WORD_BYTES) {
                            return Err((
                                *line,
                                format!(
                                    "a word of {} bytes, over the vocabulary's limit of {} (a long run of letters without spaces?)",
                                    w.len(),
                                    crate::data::vocab::MAX_WORD_BYTES
                                ),
                            ));
                        }
                        Ok(Some(TokDoc {
                            specials_only,
                            line: doc.line,
                            label: doc.label,
                            ids: t.ids,
                            word_text,
                            words: Vec::new(),
                            truncated: t.truncated,
                            key: t.key,
                        }))
                    })
                    .collect();
                for item in parsed {
                    match item {
                        Ok(None) => {
                            record.blank += 1;
                            self.stats.blank += 1;
                        }
                        Err((line, msg)) => {
                            if msg.starts_with("no features") {
                                self.stats.empty_after_tokenizing += u64::from(self.cfg.input.skip_bad);
                            }
                            self.bad_line(&mut record, path, line, msg)?;
                        }
                        Ok(Some(mut doc)) => {
                            record.docs += 1;
                            self.docs_read += 1;
                            // Register the label first, so that a class whose documents
                            // are all duplicates still exists (and fails the split clearly).
                            let label = match &doc.label {
                                Some(name) => self.label_id(path, doc.line, name)? as i64,
                                None => -1,
                            };
                            match self.keys.entry(doc.key) {
                                std::collections::hash_map::Entry::Occupied(first) => {
                                    self.stats.duplicates += 1;
                                    if label >= 0 && *first.get() >= 0 && *first.get() != label {
                                        self.stats.label_conflicts += 1;
                                    }
                                    continue;
                                }
                                std::collections::hash_map::Entry::Vacant(slot) => {
                                    slot.insert(label);
                                }
                            }
                            self.stats.truncated += u64::from(doc.truncated);
                            self.stats.specials_only += u64::from(doc.specials_only);
                            if let (Some(sw), false) = (&self.subword, doc.specials_only) {
                                let (text, unknown) = sw.count_text_ids(&doc.ids);
                                self.subword_ids += text;
                                self.unknown_ids += unknown;
                            }
                            doc.words = doc.word_text.iter().map(|w| self.vocab.intern(w)).collect();
                            let id = self.next_sample_id;
                            self.next_sample_id += 1;
                            sink(doc, id, label)?;
                        }
                    }
                }
                self.bar.set_position(self.disk.get());
            }
            Ok(())
        })?;
        if record.docs == 0 {
            return Err(Error::bad_file(
                path,
                format!(
                    "holds no document: {} lines, {} blank, {} skipped as bad",
                    record.lines, record.blank, record.skipped
                ),
            ));
        }
        self.inputs.push(record);
        Ok(())
    }
}

/// The P shard writers of one split, filled round-robin.
struct SplitWriter {
    writers: Vec<ShardWriter>,
    next: usize,
    docs: u64,
    tokens: u64,
    words: u64,
    per_class: Vec<u64>,
}

impl SplitWriter {
    fn new(dir: &Path, kind: SplitKind, p: u32, tok_hash: u64, classes: usize) -> Result<Self> {
        let writers =
            (0..p).map(|i| ShardWriter::create(dir, kind, i, p, tok_hash)).collect::<Result<_>>()?;
        Ok(SplitWriter { writers, next: 0, docs: 0, tokens: 0, words: 0, per_class: vec![0; classes] })
    }

    fn push(&mut self, ids: &[u32], words: &[u32], label: i32, sample_id: u64, hidden: i32) -> Result<()> {
        let n = self.writers.len();
        self.writers[self.next].push(ids, words, label, sample_id, hidden)?;
        self.next = (self.next + 1) % n;
        self.docs += 1;
        self.tokens += ids.len() as u64;
        self.words += words.len() as u64;
        if let Ok(c) = usize::try_from(label.max(hidden)) {
            self.per_class[c] += 1;
        }
        Ok(())
    }

    fn finish(self) -> Result<SplitInfo> {
        let shards = self
            .writers
            .into_iter()
            .map(|w| {
                w.finish().map(|s| ShardInfo {
                    file: s.file,
                    docs: s.docs,
                    ids: s.ids,
                    words: s.words,
                    bytes: s.bytes,
                    checksum: hex64(s.checksum),
                })
            })
            .collect::<Result<_>>()?;
        Ok(SplitInfo {
            docs: self.docs,
            tokens: self.tokens,
            words: self.words,
            per_class: self.per_class,
            shards,
        })
    }
}

/// Whether `c` is a character a reader does not see: a format character (general
/// category Cf: zero-width spaces and joiners, direction marks, the byte-order mark, the
/// soft hyphen).
fn invisible(c: char) -> bool {
    use unicode_properties::{GeneralCategory, UnicodeGeneralCategory};
    c.general_category() == GeneralCategory::Format
}

/// A label as a reader sees it, for finding labels that only look alike: lower case,
/// without invisible characters.
fn fold_label(label: &str) -> String {
    fold_invisible(label).to_lowercase()
}

/// `label` without its invisible characters.
fn fold_invisible(label: &str) -> String {
    label.chars().filter(|&c| !invisible(c)).collect()
}

/// `label`'s invisible characters, in order.
fn hidden_chars(label: &str) -> Vec<char> {
    label.chars().filter(|&c| invisible(c)).collect()
}
