//! Exported logits (METHODS.md §11): `dtrain export-logits` runs a trained model over
//! every sample of a split and writes one memory-mapped file of their logits, plus, on
//! request, pseudo-labels with confidences as JSONL; Noisy Student (and reduced MPL) read
//! the file as targets.
//!
//! # File format (little-endian)
//! ```text
//!   0  magic "DTLOGIT\0"            8  version u32          12  split u32 (0 train, 1 val, 2 test, 3 unlabeled)
//!  16  shards P u32                20  classes u32          24  rows u64 (all shards)
//!  32  the data set's manifest checksum (16 ASCII hex digits)
//!  48  xxh3_64 of the class names joined by '\n'
//!  56  body_checksum u64 (xxh3_64 of every byte from 128 on)
//!  64  rows fingerprint u64 (see [`rows_fingerprint`]; version 2 on)
//!  72  source u64: xxh3_64 of the exporting model's parameters (version 3 on; `dtrain
//!      propagate` records a hash of its encoder's parameters, pooling and grid instead)
//!  80  header_checksum u64 (xxh3_64 of bytes 0..80)           88..128 zero (checked on opening)
//! 128  rows per shard: P × u64
//!      logits: rows × classes × f32, shard by shard, each shard's rows in order
//! ```
//! Version 1 had no fingerprint: its header checksum sits at 64 and covers bytes 0..64.
//! Such files are still read, and match only the data set they were exported from.
//! Version 2 had no source: its header checksum sits at 72. The source tells whether two
//! files (reduced MPL's `mpl.logits` and `mpl.train_logits`) came from the same weights.
//!
//! The file is written under a temporary name, synced and renamed; rows that are not
//! finite (a diverged teacher's) write none. Opening checks the header, the length,
//! the body checksum and that every logit is finite (two streaming passes), then that the file was
//! made from this split and label set: either from this very data set (same manifest
//! checksum), or from another preparation of the same documents in the same rows, which
//! the rows fingerprint shows. The second case is what lets a teacher on one tokenizer
//! (a MiniLM encoder on WordPiece ids) give targets to a student on another (a bag model
//! on hashed n-grams): the fingerprint reads only what the tokenizer does not decide.
//!
//! # Safety
//! The reader maps the file read-only; as with shards, the mapping is sound only while no
//! process truncates or rewrites the file, and dtrain only ever replaces it by rename.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::data::dataset::Dataset;
use crate::data::loader::RowId;
use crate::data::shard::SplitKind;
use crate::error::{Error, IoContext, Result};
use crate::model::{Acts, Model};

/// Magic bytes of a logits file.
pub const MAGIC: &[u8; 8] = b"DTLOGIT\0";
/// Version of the logits file format.
pub const VERSION: u32 = 3;
const HEADER_LEN: usize = 128;

/// A tokenizer-independent identity of a split's rows: xxh3_64 over the vocabulary's
/// checksum and, shard by shard, the row count and for every row its global sample id,
/// label, hidden label and word sequence. Two preparations of the same input with the
/// same split, word rules and shard count agree on it whatever their feature ids; any
/// other difference in documents, order, labels or sharding changes it.
pub fn rows_fingerprint(ds: &Dataset, split: SplitKind) -> u64 {
    let mut h = Xxh3::new();
    h.update(ds.manifest().vocab.checksum.as_bytes());
    for shard in ds.shards(split) {
        h.update(&(shard.len() as u64).to_le_bytes());
        for i in 0..shard.len() {
            let doc = shard.doc(i);
            let code = |l: Option<u32>| l.map_or(-1i64, i64::from);
            h.update(&doc.sample_id.to_le_bytes());
            h.update(&code(doc.label).to_le_bytes());
            h.update(&code(shard.hidden_label(i)).to_le_bytes());
            let words = shard.doc_words(i);
            h.update(&(words.len() as u64).to_le_bytes());
            h.update(bytemuck::cast_slice(words));
        }
    }
    h.digest()
}

/// Checks the head of a logits file (`b`, its first bytes): magic bytes, a version this
/// dtrain reads, the header's checksum and the zero reserved bytes after it; returns the
/// version.
fn check_header(path: &Path, b: &[u8]) -> Result<u32> {
    let bad = |msg: String| Err(Error::bad_file(path, msg));
    crate::fsutil::check_file_head(path, b, MAGIC, HEADER_LEN, "logits")?;
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if !(1..=VERSION).contains(&version) {
        return bad(format!("logits format version {version}, this dtrain reads 1 to {VERSION}"));
    }
    let header_end = [64, 72, 80][version as usize - 1];
    if u64::from_le_bytes(b[header_end..header_end + 8].try_into().expect("8 bytes"))
        != xxh3_64(&b[..header_end])
    {
        return bad("corrupted: the header does not match its checksum".into());
    }
    crate::fsutil::check_reserved(path, &b[..HEADER_LEN], header_end + 8, "logits")?;
    Ok(version)
}

fn split_code(s: SplitKind) -> u32 {
    SplitKind::ALL.iter().position(|&x| x == s).expect("a split") as u32
}

fn labels_hash(labels: &[String]) -> u64 {
    xxh3_64(labels.join("\n").as_bytes())
}

/// A row's argmax and its softmax probability.
pub fn top_confidence(z: &[f32]) -> (usize, f64) {
    let top = crate::backend::argmax(z);
    let total: f64 = z.iter().map(|&v| f64::from(v - z[top]).exp()).sum();
    (top, 1.0 / total)
}

/// The class a row names, and its probability: the argmax, or none where every logit is
/// equal (label spreading's rows that no label reached) and no class is preferred. Such a
/// row is right about no label.
pub fn named_class(z: &[f32]) -> (Option<usize>, f64) {
    let (top, p) = top_confidence(z);
    ((z.len() == 1 || z.iter().any(|&v| v != z[0])).then_some(top), p)
}

/// Whether the file at `path` starts with the logits file's magic bytes (false when it
/// cannot be read: opening it then reports why).
pub fn has_magic(path: &Path) -> bool {
    let mut head = [0u8; 8];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head)).is_ok()
        && &head == MAGIC
}

/// A logits file, mapped.
pub struct LogitsFile {
    path: PathBuf,
    map: Mmap,
    pub split: SplitKind,
    pub classes: usize,
    /// First row of each shard, and the total at the end.
    starts: Vec<u64>,
    pub manifest_checksum: String,
    /// [`rows_fingerprint`] of the rows it was exported from (`None` in version 1 files).
    pub rows_fingerprint: Option<u64>,
    /// The exporting model's identity, [`params_source`] (`None` before version 3).
    pub source: Option<u64>,
}

/// The identity of a model's weights that an export records: xxh3_64 of the parameters.
pub fn params_source(params: &[f32]) -> u64 {
    xxh3_64(bytemuck::cast_slice(params))
}

/// Reads a logits file's contents after its header from `f`: their checksum (xxh3_64 of
/// every byte from `HEADER_LEN` on) and the index of the first non-finite logit, if any
/// (the logits start `counts` bytes in, after the shards' row counts), reading `chunk`
/// bytes at a time (a multiple of 4, so that every chunk holds whole logits).
fn scan_body(path: &Path, f: &std::fs::File, counts: usize, chunk: usize) -> Result<(u64, Option<usize>)> {
    let mut sum = Xxh3::new();
    let mut head = vec![0u8; counts];
    crate::fsutil::stream_file(f, path, HEADER_LEN as u64, Some(counts as u64), &mut head, |c| {
        sum.update(c);
        Ok(())
    })?;
    let (mut seen, mut non_finite) = (0usize, None);
    let from = (HEADER_LEN + counts) as u64;
    crate::fsutil::stream_file(f, path, from, None, &mut vec![0u8; chunk], |c| {
        sum.update(c);
        if non_finite.is_none() {
            non_finite = c
                .chunks_exact(4)
                .position(|v| !f32::from_le_bytes(v.try_into().expect("4 bytes")).is_finite())
                .map(|k| seen + k);
        }
        seen += c.len() / 4;
        Ok(())
    })?;
    Ok((sum.digest(), non_finite))
}

impl LogitsFile {
    /// Opens and fully checks `path`.
    pub fn open(path: &Path) -> Result<LogitsFile> {
        if path.is_dir() {
            return Err(Error::bad_file(
                path,
                "is a directory, not a logits file (`dtrain export-logits --out`)",
            ));
        }
        let f = std::fs::File::open(path).at(path)?;
        // SAFETY: see the module's Safety section.
        let map = unsafe { Mmap::map(&f) }.at(path)?;
        let bad = |msg: String| Err(Error::bad_file(path, msg));
        let b = &map[..];
        let version = check_header(path, b)?;
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let Some(split) = SplitKind::ALL.into_iter().find(|&s| split_code(s) == u32_at(12)) else {
            return bad(format!("unknown split code {}", u32_at(12)));
        };
        let (shards, classes, rows) = (u32_at(16) as usize, u32_at(20) as usize, u64_at(24));
        if shards == 0 || shards > 1 << 16 || classes == 0 || classes > 1 << 20 || rows > 1 << 40 {
            return bad(format!("absurd shape: {shards} shards, {classes} classes, {rows} rows"));
        }
        let want = HEADER_LEN as u64 + 8 * shards as u64 + rows * classes as u64 * 4;
        if b.len() as u64 != want {
            return bad(format!("truncated or padded: {} bytes, the header implies {want}", b.len()));
        }
        // The contents' checksum and finiteness, read with read() rather than through the
        // map: a pass through the map would leave the whole file mapped into this process,
        // which then reads rows at random (bench/results/scale-5m.md on shards).
        let (digest, non_finite) = scan_body(path, &f, 8 * shards, 1 << 22)?;
        if digest != u64_at(56) {
            return bad("corrupted: the contents do not match their checksum".into());
        }
        let mut starts = vec![0u64];
        for s in 0..shards {
            let n = u64_at(HEADER_LEN + 8 * s);
            let Some(end) = starts[s].checked_add(n) else {
                return bad(format!("corrupted: shard {s}'s row count {n} overflows"));
            };
            starts.push(end);
        }
        if starts[shards] != rows {
            return bad("corrupted: the shards' row counts do not add up".into());
        }
        if let Some(k) = non_finite {
            return bad(format!(
                "row {} holds a non-finite logit: the model that wrote it had diverged; export again from a sound checkpoint",
                k / classes
            ));
        }
        let manifest_checksum = String::from_utf8_lossy(&b[32..48]).into_owned();
        let rows_fingerprint = (version >= 2).then(|| u64_at(64));
        let source = (version >= 3).then(|| u64_at(72));
        Ok(LogitsFile {
            path: path.to_owned(),
            map,
            split,
            classes,
            starts,
            manifest_checksum,
            rows_fingerprint,
            source,
        })
    }

    /// The contents' checksum the header of the logits file at `path` records, with only
    /// the header read and checked: for a file that [`LogitsFile::open`] has checked whole
    /// in this run (a run's record of its teacher's logits), which is not read again.
    pub fn recorded_checksum(path: &Path) -> Result<u64> {
        let mut b = Vec::with_capacity(HEADER_LEN);
        std::fs::File::open(path).and_then(|f| f.take(HEADER_LEN as u64).read_to_end(&mut b)).at(path)?;
        check_header(path, &b)?;
        Ok(u64::from_le_bytes(b[56..64].try_into().expect("8 bytes")))
    }

    /// Checks that the file holds the logits of `split` of `ds`, every shard with its rows:
    /// exported from `ds` itself, or from another preparation of the same rows (another
    /// tokenizer), as the rows fingerprint shows.
    pub fn check_matches(&self, ds: &Dataset, split: SplitKind) -> Result<()> {
        let m = ds.manifest();
        let bad = |msg: String| Err(Error::bad_file(&self.path, msg));
        if self.split != split {
            return bad(format!(
                "holds the logits of split `{}`, this run reads `{}`",
                self.split.name(),
                split.name()
            ));
        }
        if self.manifest_checksum != m.checksum {
            let how = match self.rows_fingerprint {
                Some(f) if f == rows_fingerprint(ds, split) => None,
                Some(_) => Some(
                    "and its rows differ: other documents, order, labels or sharding, or other word rules (lowercasing, punctuation)",
                ),
                None => {
                    Some("and, as a version 1 file, cannot show that its rows are these; export it again")
                }
            };
            if let Some(how) = how {
                return bad(format!(
                    "was exported from another data set (manifest checksum {}, this one has {}) {how}",
                    self.manifest_checksum, m.checksum
                ));
            }
        }
        let b = &self.map[..];
        if u64::from_le_bytes(b[48..56].try_into().expect("8 bytes")) != labels_hash(&m.labels)
            || self.classes != m.labels.len()
        {
            return bad("its classes differ from the data set's".into());
        }
        let shards = ds.shards(split);
        if shards.len() + 1 != self.starts.len()
            || shards.iter().enumerate().any(|(s, sh)| self.starts[s + 1] - self.starts[s] != sh.len() as u64)
        {
            return bad("its shards' row counts differ from the data set's".into());
        }
        Ok(())
    }

    /// Advises the kernel that rows are read at random (training's gathers): no
    /// read-around on a page fault (see [`crate::data::shard::Shard::advise_random`]).
    pub fn advise_random(&self) {
        let _ = self.map.advise(memmap2::Advice::Random);
    }

    /// Every row's logits, shard by shard (rows × classes).
    pub fn all(&self) -> &[f32] {
        bytemuck::cast_slice(&self.map[HEADER_LEN + 8 * (self.starts.len() - 1)..])
    }

    /// What `dtrain inspect` prints of the file: its shape and provenance, then how its
    /// argmaxes spread over the classes with their mean confidence. The file keeps only a
    /// hash of the class names, so on its own it shows classes by index. Given the data set
    /// it was exported from (`inspect --data`, checked as a run checks it), it names them
    /// and measures the argmaxes against the split's labels, or against the unlabeled
    /// split's hidden labels where the data set recorded them: the share right per argmax
    /// class, overall, and among the rows each confidence threshold keeps (what Noisy
    /// Student's `consistency.threshold` would keep).
    pub fn describe(&self, data: Option<&Dataset>) -> Result<String> {
        let rows = self.starts.last().copied().unwrap_or(0);
        let mut s = format!(
            "{}: dtrain logits file of split `{}`: {rows} rows × {} classes in {} shards, from the data set \
             with manifest checksum {}; rows fingerprint {}; exported by the weights {}; contents match their checksum\n",
            self.path.display(),
            self.split.name(),
            self.classes,
            self.starts.len() - 1,
            self.manifest_checksum,
            self.rows_fingerprint.map_or("none (version 1)".into(), |f| format!("{f:016x}")),
            self.source.map_or("unrecorded (before version 3)".into(), |f| format!("{f:016x}")),
        );
        // The rows' labels, in the file's order, where the data set knows them.
        let truth: Vec<Option<u32>> = match data {
            None => Vec::new(),
            Some(ds) => {
                self.check_matches(ds, self.split)?;
                let hidden = self.split == SplitKind::Unlabeled;
                ds.shards(self.split)
                    .iter()
                    .flat_map(|sh| {
                        (0..sh.len()).map(move |i| if hidden { sh.hidden_label(i) } else { sh.doc(i).label })
                    })
                    .collect()
            }
        };
        let names = data.map(|ds| ds.labels());
        let width =
            names.map_or(0, |n| crate::data::manifest::label_width(n.iter().map(String::as_str), 0) + 1);
        const THRESHOLDS: [f64; 4] = [0.5, 0.8, 0.9, 0.95];
        let (mut count, mut conf) = (vec![0u64; self.classes], vec![0f64; self.classes]);
        let (mut known, mut right) = (vec![0u64; self.classes], vec![0u64; self.classes]);
        let (mut kept, mut kept_right) = ([0u64; THRESHOLDS.len()], [0u64; THRESHOLDS.len()]);
        // Rows that name no class (all logits equal), and those of them with a label.
        let (mut unnamed, mut unnamed_known) = (0u64, 0u64);
        for (r, z) in self.all().chunks(self.classes).enumerate() {
            let (top, p) = named_class(z);
            let label = truth.get(r).copied().flatten();
            let Some(top) = top else {
                unnamed += 1;
                unnamed_known += u64::from(label.is_some());
                continue;
            };
            count[top] += 1;
            conf[top] += p;
            if let Some(label) = label {
                let hit = label as usize == top;
                known[top] += 1;
                right[top] += u64::from(hit);
                for (t, &min) in THRESHOLDS.iter().enumerate() {
                    if p >= min {
                        kept[t] += 1;
                        kept_right[t] += u64::from(hit);
                    }
                }
            }
        }
        let pct = |a: u64, b: u64| 100.0 * a as f64 / b.max(1) as f64;
        let labeled: u64 = known.iter().sum::<u64>() + unnamed_known;
        s.push_str(&format!(
            "argmax class: rows (share), mean confidence{}\n",
            if labeled > 0 { ", right" } else { "" }
        ));
        for (c, &n) in count.iter().enumerate() {
            let name = names.map_or(String::new(), |l| format!("{:<width$}", l[c]));
            let mean = if n > 0 { conf[c] / n as f64 } else { 0.0 };
            let hits = match (labeled, known[c]) {
                (0, _) => String::new(),
                (_, 0) => "      -".into(),
                (_, k) => format!("  {:5.1}%", pct(right[c], k)),
            };
            s.push_str(&format!("  class {c:<4} {name}{n:>9} ({:5.1}%)  {mean:.3}{hits}\n", pct(n, rows)));
        }
        if unnamed > 0 {
            s.push_str(&format!(
                "  no class   {:width$}{unnamed:>9} ({:5.1}%)  (every logit equal: counted wrong)\n",
                "",
                pct(unnamed, rows)
            ));
        }
        if data.is_some() {
            let what = if self.split == SplitKind::Unlabeled { "hidden labels" } else { "labels" };
            if labeled == 0 {
                s.push_str(&format!("the data set records no {what} of these rows: nothing to measure\n"));
                return Ok(s);
            }
            s.push_str(&format!(
                "against the {what} of {labeled} rows: {:.1}% right\n",
                pct(right.iter().sum(), labeled)
            ));
            for (t, min) in THRESHOLDS.iter().enumerate() {
                let right = match kept[t] {
                    0 => "    -".to_string(),
                    k => format!("{:5.1}%", pct(kept_right[t], k)),
                };
                s.push_str(&format!(
                    "  confidence ≥ {min:.2}: {:>9} rows ({:5.1}%), {right} right\n",
                    kept[t],
                    pct(kept[t], labeled),
                ));
            }
        }
        Ok(s)
    }

    /// The logits of one sample.
    pub fn row(&self, id: RowId) -> &[f32] {
        let r = self.starts[id.shard as usize] + u64::from(id.row);
        let start = HEADER_LEN + 8 * (self.starts.len() - 1) + (r as usize) * self.classes * 4;
        bytemuck::cast_slice(&self.map[start..start + self.classes * 4])
    }

    /// Copies the logits of `ids` into `out` (rows of C).
    pub fn gather(&self, ids: &[RowId], out: &mut Vec<f32>) {
        out.clear();
        for &id in ids {
            out.extend_from_slice(self.row(id));
        }
    }
}

/// What a logits file's writer ([`write`]: `export-logits`, `propagate`) wrote and measured.
#[derive(Debug, Clone, Default)]
pub struct ExportReport {
    pub rows: u64,
    /// Against the hidden labels, where the split has them (a simulated split): rows with
    /// one, right predictions, and per confidence threshold (0.5, 0.8, 0.9, 0.95) the rows
    /// at or above it and the right ones among them.
    pub known: u64,
    pub correct: u64,
    pub by_confidence: Vec<(f64, u64, u64)>,
}

/// Runs `model` without dropout over every sample of `split` of `ds`, on backend `be`, and
/// writes the logits file `out`; with `jsonl`, also one pseudo-label line per sample. Both
/// are written under temporary names and renamed into place when complete; on any error
/// neither is left behind, and files already at those paths are untouched.
#[allow(clippy::too_many_arguments)]
pub fn export<B: crate::backend::EncoderOps<F = f32>>(
    be: &B,
    model: &Model,
    params: &[f32],
    ds: &Dataset,
    split: SplitKind,
    out: &Path,
    jsonl: Option<&Path>,
    batch_size: usize,
) -> Result<ExportReport> {
    let source = params_source(params);
    let limits = crate::data::shard::DocLimits::of(&ds.manifest().tokenizer);
    let batch_size = model.eval_batch(batch_size);
    let mut state: Option<(B::Buf, Acts<B>)> = None;
    let rows = |si: usize, shard: &crate::data::shard::Shard, start: usize, out_rows: &mut Vec<f32>| {
        let (params, acts) = state.get_or_insert_with(|| (be.upload(params), Acts::inference(be, model)));
        let end = (start + batch_size).min(shard.len());
        let mut batch = crate::backend::HostBatch::default();
        for i in start..end {
            batch.push(shard.doc_checked(i, limits)?.ids, -1);
        }
        model.forward(be, params, &model.input(be, &batch), batch.len(), None, acts);
        let classes = model.classes();
        let logits = be.download(acts.logits());
        if let Some(k) = logits[..batch.len() * classes].iter().position(|v| !v.is_finite()) {
            return Err(Error::Data(format!(
                "{}: the model's logit for document {} of shard {si} is {}: its weights are broken (a diverged run?); no logits file was written",
                out.display(),
                start + k / classes,
                logits[k]
            )));
        }
        out_rows.clear();
        out_rows.extend_from_slice(&logits[..batch.len() * classes]);
        Ok(())
    };
    write(ds, split, out, jsonl, model.classes(), source, rows)
}

/// Refuses `out` (the logits file, `--out`) and `jsonl` (`--pseudo-labels`) where writing
/// them would replace something that is not such a file, or where they are one path: for
/// commands that check before long work, as [`write`] checks again.
pub fn check_outputs(out: &Path, jsonl: Option<&Path>) -> Result<()> {
    crate::fsutil::check_output("--out", out, &[], Some(MAGIC))?;
    if let Some(j) = jsonl {
        if crate::fsutil::same_file(j, out) {
            return Err(Error::Data(format!("--pseudo-labels {}: is also --out", j.display())));
        }
        crate::fsutil::check_output("--pseudo-labels", j, &[out], Some(crate::fsutil::JSONL_MAGIC))?;
    }
    Ok(())
}

/// Writes the logits file `out` of `split` of `ds` (and, with `jsonl`, one pseudo-label line
/// per sample), `classes` logits per row, recording `source` as the exporting weights'
/// identity. `rows(shard_index, shard, start, out)` fills `out` with the logits of one or
/// more rows of that shard from `start` on (rows × classes; a value that is not finite is
/// refused). Both files are written
/// under temporary names and renamed into place when complete; on any error neither is
/// left behind, and files already at those paths are untouched.
pub fn write(
    ds: &Dataset,
    split: SplitKind,
    out: &Path,
    jsonl: Option<&Path>,
    classes: usize,
    source: u64,
    mut rows_of: impl FnMut(usize, &crate::data::shard::Shard, usize, &mut Vec<f32>) -> Result<()>,
) -> Result<ExportReport> {
    check_outputs(out, jsonl)?;
    if classes == 0 {
        return Err(Error::Data(format!("{}: a logits file needs at least one class", out.display())));
    }
    let tmp = crate::fsutil::sibling(out, ".tmp");
    let jsonl_tmp = jsonl.map(|p| crate::fsutil::sibling(p, ".tmp"));
    let temporaries: Vec<&Path> = std::iter::once(tmp.as_path()).chain(jsonl_tmp.as_deref()).collect();
    crate::fsutil::removing_on_error(&temporaries, || {
        let (tmp, jsonl_final, jsonl) = (tmp.as_path(), jsonl, jsonl_tmp.as_deref());
        let m = ds.manifest();
        let shards = ds.shards(split);
        let rows: u64 = shards.iter().map(|s| s.len() as u64).sum();
        let mut w = std::io::BufWriter::new(std::fs::File::create(tmp).at(tmp)?);
        w.write_all(&[0u8; HEADER_LEN]).at(tmp)?;
        let mut sum = Xxh3::new();
        let mut put = |w: &mut std::io::BufWriter<std::fs::File>, bytes: &[u8]| -> Result<()> {
            sum.update(bytes);
            w.write_all(bytes).at(tmp)
        };
        for s in shards {
            put(&mut w, &(s.len() as u64).to_le_bytes())?;
        }
        let mut lines = match jsonl {
            Some(p) => Some((p, std::io::BufWriter::new(std::fs::File::create(p).at(p)?))),
            None => None,
        };
        let thresholds = [0.5, 0.8, 0.9, 0.95];
        let mut report = ExportReport {
            rows,
            by_confidence: thresholds.iter().map(|&t| (t, 0, 0)).collect(),
            ..Default::default()
        };
        let mut logits = Vec::new();
        for (si, shard) in shards.iter().enumerate() {
            let mut start = 0;
            while start < shard.len() {
                rows_of(si, shard, start, &mut logits)?;
                let n = logits.len() / classes;
                if n == 0 || logits.len() % classes != 0 || start + n > shard.len() {
                    return Err(Error::Data(format!(
                        "{}: {} logits for shard {si} from row {start} (of {}), not whole rows of {classes}",
                        out.display(),
                        logits.len(),
                        shard.len()
                    )));
                }
                if let Some(k) = logits.iter().position(|v| !v.is_finite()) {
                    return Err(Error::Data(format!(
                        "{}: logit {} of row {} of shard {si} is {}; no logits file was written",
                        out.display(),
                        k % classes,
                        start + k / classes,
                        logits[k]
                    )));
                }
                put(&mut w, bytemuck::cast_slice(&logits))?;
                for (k, z) in logits.chunks(classes).enumerate() {
                    let i = start + k;
                    let (label, conf) = named_class(z);
                    let hidden = match split {
                        SplitKind::Unlabeled => shard.hidden_label(i).map(|h| h as usize),
                        _ => shard.doc(i).label.map(|h| h as usize),
                    };
                    if let Some(h) = hidden {
                        report.known += 1;
                        report.correct += u64::from(label == Some(h));
                        for (t, n, right) in &mut report.by_confidence {
                            if conf >= *t {
                                *n += 1;
                                *right += u64::from(label == Some(h));
                            }
                        }
                    }
                    if let Some((p, f)) = &mut lines {
                        let line = serde_json::json!({
                            "sample_id": shard.doc(i).sample_id, "split": split.name(), "shard": si, "row": i,
                            "label": label.map(|l| &m.labels[l]), "confidence": conf,
                        });
                        writeln!(f, "{line}").at(p)?;
                    }
                }
                start += n;
            }
        }
        if let Some((p, f)) = lines {
            f.into_inner().map_err(|e| Error::io(p, e.into_error()))?.sync_all().at(p)?;
        }
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&split_code(split).to_le_bytes());
        h[16..20].copy_from_slice(&(shards.len() as u32).to_le_bytes());
        h[20..24].copy_from_slice(&(classes as u32).to_le_bytes());
        h[24..32].copy_from_slice(&rows.to_le_bytes());
        let checksum = m.checksum.as_bytes();
        if checksum.len() != 16 {
            return Err(Error::Data(format!("manifest checksum {:?} is not 16 hex digits", m.checksum)));
        }
        h[32..48].copy_from_slice(checksum);
        h[48..56].copy_from_slice(&labels_hash(&m.labels).to_le_bytes());
        h[56..64].copy_from_slice(&sum.digest().to_le_bytes());
        h[64..72].copy_from_slice(&rows_fingerprint(ds, split).to_le_bytes());
        h[72..80].copy_from_slice(&source.to_le_bytes());
        let hc = xxh3_64(&h[..80]);
        h[80..88].copy_from_slice(&hc.to_le_bytes());
        let mut f = w.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?;
        f.seek(SeekFrom::Start(0)).at(tmp)?;
        f.write_all(&h).at(tmp)?;
        f.sync_all().at(tmp)?;
        std::fs::rename(tmp, out).at(out)?;
        crate::fsutil::sync_parent(out);
        if let (Some(p), Some(t)) = (jsonl_final, jsonl) {
            std::fs::rename(t, p).at(p)?;
            crate::fsutil::sync_parent(p);
        }
        Ok(report)
    })
}

#[cfg(test)]
mod tests {
    /// The streamed scan: the checksum of every byte after the header, and the first
    /// non-finite logit's index counted across reads (here of 8 bytes, two logits).
    #[test]
    fn the_body_scan_counts_logits_across_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.logits");
        let mut bytes = vec![0u8; super::HEADER_LEN];
        let counts = 16;
        bytes.extend(std::iter::repeat_n(7u8, counts));
        let mut logits = [1.0f32; 11];
        logits[9] = f32::NAN;
        logits[10] = f32::INFINITY;
        bytes.extend(logits.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let want = xxhash_rust::xxh3::xxh3_64(&bytes[super::HEADER_LEN..]);
        for chunk in [8, 12, 1 << 22] {
            assert_eq!(super::scan_body(&path, &f, counts, chunk).unwrap(), (want, Some(9)), "chunk {chunk}");
        }
        logits[9] = 2.0;
        logits[10] = 3.0;
        bytes.truncate(super::HEADER_LEN + counts);
        bytes.extend(logits.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(&path, &bytes).unwrap();
        let f = std::fs::File::open(&path).unwrap();
        let (_, none) = super::scan_body(&path, &f, counts, 8).unwrap();
        assert_eq!(none, None);
    }

    use super::*;

    #[test]
    fn a_row_of_equal_logits_names_no_class() {
        let (c, p) = named_class(&[0.5, 2.0, -1.0]);
        assert_eq!(c, Some(1));
        assert!((p - 1.0 / (1.0 + (-1.5f64).exp() + (-3.0f64).exp())).abs() < 1e-6);
        let (c, p) = named_class(&[-2.7, -2.7, -2.7, -2.7]);
        assert_eq!(c, None);
        assert!((p - 0.25).abs() < 1e-12);
        // One class is always named.
        assert_eq!(named_class(&[3.0]).0, Some(0));
    }
}
