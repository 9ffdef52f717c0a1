//! Checkpoints: one directory per step holding `model.safetensors`, `optimizer.safetensors`,
//! `state.bin` and a `DONE` marker written last, built in a temporary directory and renamed
//! into place; keeping the newest K; finding the newest complete one.
//!
//! `model.safetensors` holds every tensor of the layout under its name (f32, shapes as in
//! `model::bag`), and in its metadata (`__metadata__`) one key, `dtrain`, with a JSON
//! object: `format`, `model` (the spec), `labels`, `tokenizer` (the spec), so that a
//! checkpoint alone can classify raw text, `checksum`: the xxh3_64 of all tensor data
//! in layout order, and, appended to the stored text as its last key, `meta_checksum`: the
//! xxh3_64 of the text before it (closed with `}`), so a corrupted label name or spec is
//! refused too (files from before it have none, and load unchecked).
//! `optimizer.safetensors` holds `m.<name>` and `v.<name>` for the tensors
//! whose optimizer keeps that moment (`optim::moment_lens`: lazy Adam keeps both for every
//! tensor, AdamW/LAMB on the dense tensors only, plain SGD none), and
//! `dtrain` = `{"checksum": …}` (over `m.` then `v.`, then the row indices). A matrix with at
//! least a quarter of its bytes in rows zero in every moment that covers it (the table rows
//! no batch touched) is stored by its other rows: `rows.<name>` (U32, ascending) and `m.`/`v.<name>` of those
//! rows (`tensors::Storage::ByRows`; files from before it hold every tensor whole and read
//! as before). Loading checks names, shapes and sizes before allocating, then the checksum,
//! then the row indices, then that every value is finite.
//! With Temporal Ensembling, `bank/` holds a sealed copy of every bank file (`bank`).
//! With a Mean Teacher, `teacher.safetensors`, and with EMA or SWA weights,
//! `average.safetensors`, hold those weights in the same format as `model.safetensors` (so
//! `dtrain eval`, `predict` and `export-logits` read them as models with `--teacher` or
//! `--average`).
//! `state.bin` is a header (magic `DTSTATE\0`, version, payload length, xxh3_64 of the
//! payload) followed by the bincode encoding of [`TrainState`]. `config.json` holds the
//! training config as its trajectory hash reads it, so that a resume under another config
//! names the fields that differ.
//!
//! `DONE` holds the record of what was written (`Written`, JSON): every file of the
//! directory with its size and xxh3_64. Reading a checkpoint checks the files against it,
//! so a file copied in from another checkpoint (another step's weights, optimizer moments
//! or state) is refused rather than mixed in; checkpoints from before the record have an
//! empty `DONE` and are read unchecked. A resumed checkpoint's directory name must also
//! give its state's step, so a copy under a later step's name is not taken for the newest.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

use crate::data::loader::Cursor;
use crate::data::manifest::hex64;
use crate::data::tokenize::TokenizerSpec;
use crate::error::{Error, IoContext, Result};
use crate::fsutil;
use crate::model::params::Layout;
use crate::model::{Model, ModelSpec};
use crate::optim::schedule::Plateau;

mod tensors;
pub(crate) use tensors::{file_meta, tensors_from_file, tensors_to_file, write_stored, Storage, Stored};

/// Magic bytes of `state.bin`.
pub const STATE_MAGIC: &[u8; 8] = b"DTSTATE\0";
/// Version of `state.bin`.
pub const STATE_VERSION: u32 = 6;
/// Which weights of a checkpoint to read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Weights {
    /// The trained model (`model.safetensors`).
    Student,
    /// The Mean Teacher (`teacher.safetensors`).
    Teacher,
    /// The EMA or SWA weights (`average.safetensors`).
    Average,
}

impl Weights {
    /// The file in a checkpoint directory.
    pub fn file(self) -> &'static str {
        match self {
            Weights::Student => "model.safetensors",
            Weights::Teacher => "teacher.safetensors",
            Weights::Average => "average.safetensors",
        }
    }

    /// The command-line flag that asks for these weights.
    pub fn flag(self) -> &'static str {
        match self {
            Weights::Student => "the default (the student)",
            Weights::Teacher => "--teacher",
            Weights::Average => "--average",
        }
    }
}
/// The training config a checkpoint was written under (JSON; for naming what differs when
/// a resume is refused).
pub const CONFIG_FILE: &str = "config.json";
/// The marker of a snapshot checkpoint (the end of a cycle of cosine with restarts), which
/// pruning keeps.
pub const SNAPSHOT: &str = "SNAPSHOT";
/// The marker that makes a checkpoint directory complete; it holds a [`Written`] record.
pub const DONE: &str = "DONE";

/// What `DONE` records of a checkpoint directory: each file's path under it ('/'-joined),
/// size in bytes and xxh3_64 (16 hex digits). Unknown fields are ignored, so a later
/// version may record more.
#[derive(Debug, Serialize, Deserialize)]
struct Written {
    files: std::collections::BTreeMap<String, (u64, String)>,
}

/// The files under `dir` by their '/'-joined relative paths, `DONE` and the `SNAPSHOT`
/// marker (which a user may remove, to let pruning take the checkpoint) excepted. Symbolic
/// links are listed, never followed into.
fn files_under(dir: &Path, rel: &str, out: &mut Vec<(String, PathBuf)>) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let entry = entry.at(dir)?;
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().into_owned();
        let rel = if rel.is_empty() { name } else { format!("{rel}/{name}") };
        if entry.file_type().at(&path)?.is_dir() {
            files_under(&path, &rel, out)?;
        } else if rel != DONE && rel != SNAPSHOT {
            out.push((rel, path));
        }
    }
    Ok(())
}

/// The size and xxh3_64 of the file at `path`, read in 4 MiB blocks.
fn file_digest(path: &Path) -> Result<(u64, String)> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).at(path)?;
    let (mut sum, mut len) = (Xxh3::new(), 0u64);
    let mut block = vec![0u8; 4 << 20];
    loop {
        let n = f.read(&mut block).at(path)?;
        if n == 0 {
            return Ok((len, hex64(sum.digest())));
        }
        sum.update(&block[..n]);
        len += n as u64;
    }
}

/// Whether dtrain reads the file `rel` of a checkpoint directory by its name (weights,
/// optimizer moments, state, config, bank files); other files (notes, weights copied in
/// under a name of their own, read only when named) are no business of the record.
fn read_by_name(rel: &str) -> bool {
    // Weights and their optimizer moments ("optimizer", or a part's "<stem>.optimizer").
    let weights = [Weights::Student, Weights::Teacher, Weights::Average].map(Weights::file);
    let stem = rel.strip_suffix(".optimizer.safetensors").map(|s| format!("{s}.safetensors"));
    rel.starts_with(&format!("{}/", crate::bank::DIR))
        || ["state.bin", CONFIG_FILE, "optimizer.safetensors", "teacher_mlp.safetensors"].contains(&rel)
        || weights.contains(&rel)
        || stem.is_some_and(|s| weights.contains(&s.as_str()) || s == "teacher_mlp.safetensors")
}

/// Why the directory `path`, which has no [`DONE`] record, is no checkpoint: a run's
/// directory (or its checkpoints/) given for one of its checkpoints, one interrupted while it
/// was written, or another directory (a data set's).
fn not_a_checkpoint(path: &Path) -> Error {
    let newest = [path.join("checkpoints"), path.to_path_buf()].iter().find_map(|r| latest(r).ok().flatten());
    // A Hugging Face model's config.json describes the network (its `hidden_size`); a
    // checkpoint's is the run's config.
    let hf_config = || {
        std::fs::read(path.join(CONFIG_FILE))
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .is_some_and(|c| c.get("hidden_size").is_some())
    };
    let why = match newest {
        Some(c) => format!("is not a checkpoint directory: its newest checkpoint is {}", c.display()),
        None if path.join(Weights::Student.file()).is_file() && hf_config() => {
            "is a pretrained model's directory (Hugging Face config.json and model.safetensors), not a checkpoint: \
             a run reads it through model.encoder.pretrained or mlm.pretrained"
                .to_string()
        }
        None if path.join(Weights::Student.file()).is_file() => {
            "incomplete checkpoint (no DONE marker): it was interrupted while being written".to_string()
        }
        None => "is not a checkpoint directory (it has no DONE marker and no model.safetensors)".to_string(),
    };
    Error::bad_file(path, why)
}

/// Which files of a checkpoint a reader checks against its `DONE` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading<'a> {
    /// One file, by its path under the checkpoint (the weights that eval, predict and
    /// export read): a checkpoint trimmed for inference (its optimizer moments or bank
    /// removed) still reads.
    File(&'a str),
    /// Every file (resuming a run): each one recorded must be there.
    All,
}

/// Checks the files `reading` names of the checkpoint `dir` against its `DONE` record: each
/// with its recorded size and checksum, and none of a name dtrain reads that the record
/// lacks (a file copied in from another checkpoint). A `DONE` with nothing in it (a
/// checkpoint from before the record) passes. Each check is made once per process.
pub fn check_written(dir: &Path, reading: Reading<'_>) -> Result<()> {
    static CHECKED: std::sync::Mutex<Vec<(PathBuf, Option<String>)>> = std::sync::Mutex::new(Vec::new());
    if !dir.is_dir() {
        let why = if dir.exists() {
            "is a file, not a checkpoint directory"
        } else {
            "no such checkpoint directory"
        };
        return Err(Error::bad_file(dir, why));
    }
    let done = dir.join(DONE);
    if !done.is_file() {
        return Err(not_a_checkpoint(dir));
    }
    let key = dir.canonicalize().at(dir)?;
    let only = match reading {
        Reading::File(rel) => Some(rel.to_owned()),
        Reading::All => None,
    };
    let seen =
        |c: &Vec<(PathBuf, Option<String>)>| c.iter().any(|(d, o)| *d == key && (o.is_none() || *o == only));
    if CHECKED.lock().is_ok_and(|c| seen(&c)) {
        return Ok(());
    }
    let text = fsutil::read_text(&done, 64 << 20, "a checkpoint's DONE record")?;
    if !text.trim().is_empty() {
        let written: Written = serde_json::from_str(&text).map_err(|e| {
            Error::bad_file(&done, format!("corrupted: not the record of the checkpoint's files: {e}"))
        })?;
        let mut present = Vec::new();
        match &only {
            Some(rel) => present.extend(dir.join(rel).exists().then(|| (rel.clone(), dir.join(rel)))),
            None => files_under(dir, "", &mut present)?,
        }
        let foreign = present.iter().find(|(rel, _)| read_by_name(rel) && !written.files.contains_key(rel));
        if let Some((_, path)) = foreign {
            return Err(Error::bad_file(
                path,
                "was not written with this checkpoint (its DONE lists the files that were): copied in from \
                 elsewhere? Remove it",
            ));
        }
        let checked = written.files.iter().filter(|(rel, _)| only.as_ref().is_none_or(|o| o == *rel));
        for (rel, recorded) in checked {
            let path = dir.join(rel);
            if !path.is_file() {
                let what =
                    if path.symlink_metadata().is_ok() { "is not a regular file" } else { "is missing" };
                return Err(Error::bad_file(
                    &path,
                    format!("{what}: the checkpoint was written with it as a file (its DONE lists it)"),
                ));
            }
            if file_digest(&path)? != *recorded {
                return Err(Error::bad_file(
                    &path,
                    "differs from the file this checkpoint was written with (its DONE records the size and \
                     checksum): replaced by another checkpoint's file, or damaged",
                ));
            }
        }
    }
    if let Ok(mut c) = CHECKED.lock() {
        c.push((key, only));
    }
    Ok(())
}

/// What a model checkpoint needs besides its tensors to classify raw text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMeta {
    /// Format name, `dtrain-bag` or `dtrain-encoder`.
    pub format: String,
    pub model: ModelSpec,
    pub labels: Vec<String>,
    pub tokenizer: TokenizerSpec,
}

impl ModelMeta {
    /// [`ModelMeta::mismatch`] for this model about to read a data set of `labels` and
    /// `tokenizer`: an encoder also reads rows cut at another `subword.max_len` than its
    /// run's (a model fine-tuned on 64 tokens reading whole paragraphs), within its positions
    /// (past the run's length they are the pretrained ones, or untrained from scratch).
    pub fn mismatch_reading(
        &self,
        labels: &[String],
        tokenizer: &TokenizerSpec,
        other: &str,
    ) -> Option<String> {
        let mut at_run_length = tokenizer.clone();
        if let (Some(d), Some(t), crate::model::ModelSpec::Encoder(e)) =
            (at_run_length.subword.as_mut(), self.tokenizer.subword.as_ref(), &self.model)
        {
            if d.max_len as usize > e.max_positions {
                return Some(format!(
                    "tokenizer: rows of up to {} tokens ({other}'s subword.max_len), more than the model's {} positions",
                    d.max_len, e.max_positions
                ));
            }
            d.max_len = t.max_len;
        }
        self.mismatch(labels, &at_run_length, other)
    }

    /// What differs between this model's classes and tokenizer and `labels` and `tokenizer`
    /// (another's, named `other`): `None` when they match, else the labels of both or the
    /// tokenizer's fields that differ, with both values.
    pub fn mismatch(&self, labels: &[String], tokenizer: &TokenizerSpec, other: &str) -> Option<String> {
        if self.labels != labels {
            let show = |l: &[String]| {
                let head: Vec<&str> = l.iter().take(4).map(String::as_str).collect();
                format!("{} ({}{})", l.len(), head.join(", "), if l.len() > 4 { ", …" } else { "" })
            };
            return Some(format!("labels: the model has {}, {other} {}", show(&self.labels), show(labels)));
        }
        if self.tokenizer == *tokenizer {
            return None;
        }
        let (a, b) = (serde_json::to_value(&self.tokenizer).ok()?, serde_json::to_value(tokenizer).ok()?);
        let (serde_json::Value::Object(a), serde_json::Value::Object(b)) = (a, b) else { return None };
        let fields: Vec<String> = a
            .iter()
            .filter(|(k, v)| b.get(*k) != Some(*v))
            .map(|(k, v)| {
                format!("{k} ({v} in the model, {} in {other})", b.get(k).unwrap_or(&serde_json::Value::Null))
            })
            .collect();
        Some(format!("tokenizer: {}", fields.join(", ")))
    }
}

/// The training loop's state at a step boundary.
#[derive(Debug, Clone, PartialEq, bincode::Encode, bincode::Decode)]
pub struct TrainState {
    /// Optimizer steps completed.
    pub step: u64,
    /// The optimizer's step counter (bias corrections).
    pub optim_t: u64,
    /// Every shard's cursor of the labeled training split.
    pub cursors: Vec<Cursor>,
    /// Every shard's cursor of the unlabeled split (empty when the method reads none).
    pub unlabeled_cursors: Vec<Cursor>,
    /// Σ ln α_t of each shadow copy of the weights (`algo::shadow`: the Mean Teacher, then
    /// EMA/SWA weights, those the run keeps), whose rows are all up to date in the
    /// checkpoint; 0 where not lazy.
    pub shadow_logs: Vec<f64>,
    /// The body checksum of Noisy Student's logits file (0 without one), so that a resume
    /// on a file replaced at the same path is refused.
    pub logits_checksum: u64,
    /// UDA's and FixMatch's stabilisers (distribution alignment, FlexMatch, FreeMatch).
    pub stabiliser: crate::algo::stabilise::StabiliserState,
    /// Meta Pseudo Labels: h's baseline, and the teacher's optimizer step counter.
    pub mpl: crate::algo::mpl::MplState,
    pub teacher_optim_t: u64,
    /// Reduce-on-plateau state.
    pub plateau: Plateau,
    /// `train::trajectory_hash` of the config, to refuse resuming with another config.
    pub config_hash: u64,
    /// The data set's manifest checksum, to refuse resuming on other data.
    pub data_checksum: String,
    /// The logging window in progress (loss sum, documents, correct, token ids), so that
    /// a resumed run logs exactly what an uninterrupted one would.
    pub window: LogWindow,
}

/// Running sums since the last metrics line.
#[derive(Debug, Clone, Default, PartialEq, bincode::Encode, bincode::Decode)]
pub struct LogWindow {
    /// Σ over steps of the step's total loss (supervised + weighted consistency).
    pub loss_sum: f64,
    /// Σ of the supervised loss over labeled rows.
    pub sup_sum: f64,
    /// Labeled documents.
    pub docs: u64,
    /// Labeled documents predicted right.
    pub correct: u64,
    /// Token ids of every row of the steps (labeled and unlabeled).
    pub tokens: u64,
    /// Σ of the consistency loss over its rows (unweighted).
    pub cons_sum: f64,
    /// Rows of the consistency term, and those that passed its mask.
    pub cons_rows: u64,
    pub passed: u64,
    /// Steps in the window.
    pub steps: u64,
    /// Meta Pseudo Labels, summed over steps: h, the h used (after the baseline), CE_old,
    /// CE_new, the student's pseudo-label loss, the teacher's CE_T and UDA term, and the
    /// teacher's labeled rows and those it predicted right.
    pub mpl_h: f64,
    pub mpl_h_used: f64,
    pub mpl_ce_old: f64,
    pub mpl_ce_new: f64,
    pub mpl_pseudo: f64,
    pub mpl_teacher_ce: f64,
    pub mpl_uda: f64,
    pub mpl_teacher_docs: u64,
    /// MPL steps in the window (finetuning steps excluded).
    pub mpl_steps: u64,
    pub mpl_teacher_correct: u64,
    /// The adversarial term: Σ of its weighted loss, and the micro-batches that had one.
    pub adv_sum: f64,
    pub adv_count: u64,
    /// Training-signal annealing: labeled rows seen and dropped.
    pub tsa_rows: u64,
    pub tsa_dropped: u64,
    /// Pseudo-label accuracy (diagnostics): unlabeled rows with a hidden label, those whose
    /// target's argmax was right, and the same among rows that passed the mask.
    pub pl_rows: u64,
    pub pl_correct: u64,
    pub pl_passed: u64,
    pub pl_passed_correct: u64,
    /// Unlabeled rows with a target, per class of the target's argmax (hidden label or
    /// not): the collapse diagnostic. Empty until the first such row; padded to the number
    /// of classes when summed over ranks.
    pub pl_classes: Vec<u64>,
}

/// Name of a checkpoint directory.
pub fn dir_name(step: u64) -> String {
    format!("step-{step:09}")
}

/// The metadata key of both files. safetensors keeps metadata in a `HashMap`, whose order
/// varies between processes, so each file has exactly one key to stay byte-identical.
pub const META_KEY: &str = "dtrain";

/// What a checkpoint holds besides the model's description.
pub struct Contents<'a> {
    /// The model's parameters (borrowed on the CPU, downloaded from a device:
    /// `backend::host_view`); likewise every buffer below.
    pub params: Cow<'a, [f32]>,
    /// Shadow copies of the weights (the Mean Teacher, EMA/SWA weights), each a complete
    /// model in its own file.
    pub shadows: Vec<(Weights, Cow<'a, [f32]>)>,
    /// The Temporal Ensembling bank, snapshotted into `bank/`.
    pub bank: Option<&'a crate::bank::Bank>,
    /// The optimizer's first and second moments.
    pub moments: [Cow<'a, [f32]>; 2],
    /// Further models with their own optimizer (Meta Pseudo Labels' teacher).
    pub parts: Vec<Part<'a>>,
    pub state: &'a TrainState,
    /// The training config as its trajectory hash reads it (`train::trajectory_config`),
    /// kept as [`CONFIG_FILE`].
    pub config: &'a str,
    /// A snapshot of cosine with restarts (a cycle's end): marked [`SNAPSHOT`], and never
    /// pruned to keep the newest K.
    pub snapshot: bool,
}

/// A model of its own in a checkpoint: `{stem}.safetensors` (its tensors, `meta` under
/// [`META_KEY`]) and `{stem}.optimizer.safetensors` (its moments, as `optimizer.safetensors`).
pub struct Part<'a> {
    pub stem: &'static str,
    pub layout: &'a Layout,
    pub meta: serde_json::Value,
    pub params: Cow<'a, [f32]>,
    pub moments: [Cow<'a, [f32]>; 2],
}

/// The bytes of safetensors file `path` (a checkpoint's, or a pretrained encoder's), mapped
/// rather than read: a large model's tensors are converted straight from the page cache
/// into their buffers, so loading holds no private copy of the file beside them.
pub(crate) fn map(path: &Path) -> Result<memmap2::Mmap> {
    let f = std::fs::File::open(path).at(path)?;
    if !f.metadata().at(path)?.is_file() {
        return Err(Error::bad_file(path, "is not a regular file"));
    }
    // SAFETY: checkpoint files are written under a temporary name and renamed into place,
    // never changed afterwards, and the map is read-only; as for data shards, a file another
    // process truncates while it is mapped (a pretrained model overwritten during loading)
    // is outside what dtrain supports.
    unsafe { memmap2::Mmap::map(&f) }.at(path)
}

/// Reads a [`Part`] of the checkpoint `dir`: its parameters (`layout.total()`) and moments
/// (`lens`, as `optim::moment_lens` gives).
pub fn load_part(
    dir: &Path,
    stem: &str,
    layout: &Layout,
    lens: (usize, usize),
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
    let file = dir.join(format!("{stem}.safetensors"));
    let bytes = map(&file)?;
    let params = tensors_from_file(&file, &bytes, layout, &[("", layout.total())], Storage::Whole)?.remove(0);
    let file = dir.join(format!("{stem}.optimizer.safetensors"));
    let bytes = map(&file)?;
    let mut moments =
        tensors_from_file(&file, &bytes, layout, &[("m.", lens.0), ("v.", lens.1)], Storage::ByRows)?;
    let v = moments.pop().expect("two buffers");
    let m = moments.pop().expect("two buffers");
    Ok((params, m, v))
}

/// Writes a complete checkpoint for `state.step` under `root`, then deletes all but the
/// newest `keep` complete checkpoints. Returns its directory. Every rank of `dist` calls
/// it: rank 0 makes the temporary directory, every rank writes its own Temporal Ensembling
/// bank files (those of the data shards it owns) into it, then rank 0 writes the shared
/// files, the DONE marker and renames the directory into place; barriers order the three.
pub fn save(
    root: &Path,
    model: &Model,
    meta: &ModelMeta,
    c: Contents<'_>,
    keep: usize,
    dist: &crate::dist::Dist,
) -> Result<PathBuf> {
    let Contents { params, shadows, bank, moments, parts, state, config, snapshot } = c;
    let name = dir_name(state.step);
    // A rank's failure ends the whole job (the caller aborts it), so no rank waits on a
    // barrier that another rank will never reach.
    let tmp = if dist.is_root() { stage_begin(root, &name)? } else { root.join(format!("{name}.tmp")) };
    dist.barrier("the checkpoint's start");
    if let Some(bank) = bank {
        // On an error the checkpoint's temporary directory goes too (rank 0's; another
        // rank's error ends the job, and the next run's first checkpoint removes it:
        // `recover`).
        let mine: &[&Path] = if dist.is_root() { &[&tmp] } else { &[] };
        fsutil::removing_on_error(mine, || bank.snapshot(&tmp.join(crate::bank::DIR), state.step))?;
    }
    dist.barrier("the ranks' bank files");
    let done = if dist.is_root() {
        fsutil::removing_on_error(&[&tmp], || {
            let json = serde_json::to_value(meta).map_err(|e| Error::Data(format!("model metadata: {e}")))?;
            tensors_to_file(
                &tmp.join("model.safetensors"),
                model.layout(),
                &[("", &params)],
                json.clone(),
                Storage::Whole,
            )?;
            for (which, weights) in shadows {
                tensors_to_file(
                    &tmp.join(which.file()),
                    model.layout(),
                    &[("", &weights)],
                    json.clone(),
                    Storage::Whole,
                )?;
            }
            let moments = [("m.", &*moments[0]), ("v.", &*moments[1])];
            tensors_to_file(
                &tmp.join("optimizer.safetensors"),
                model.layout(),
                &moments,
                serde_json::json!({}),
                Storage::ByRows,
            )?;
            for p in parts {
                tensors_to_file(
                    &tmp.join(format!("{}.safetensors", p.stem)),
                    p.layout,
                    &[("", &p.params)],
                    p.meta,
                    Storage::Whole,
                )?;
                let moments = [("m.", &*p.moments[0]), ("v.", &*p.moments[1])];
                let file = tmp.join(format!("{}.optimizer.safetensors", p.stem));
                tensors_to_file(&file, p.layout, &moments, serde_json::json!({}), Storage::ByRows)?;
            }
            let payload = bincode::encode_to_vec(state, bincode::config::standard())
                .map_err(|e| Error::Data(format!("state: {e}")))?;
            let mut bytes = Vec::with_capacity(28 + payload.len());
            bytes.extend_from_slice(STATE_MAGIC);
            bytes.extend_from_slice(&STATE_VERSION.to_le_bytes());
            bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
            bytes.extend_from_slice(&xxh3_64(&payload).to_le_bytes());
            bytes.extend_from_slice(&payload);
            fsutil::write_atomic(&tmp.join("state.bin"), &bytes)?;
            fsutil::write_atomic(&tmp.join(CONFIG_FILE), config.as_bytes())?;
            if snapshot {
                fsutil::write_atomic(&tmp.join(SNAPSHOT), b"")?;
            }
            stage_finish(root, &name, &tmp, keep)
        })?
    } else {
        root.join(&name)
    };
    dist.barrier("the checkpoint's DONE marker");
    Ok(done)
}

/// Writes one complete checkpoint directory `root/name`: `write` fills a temporary
/// directory, every file in it is synced, the [`DONE`] marker is written last, and the
/// directory is renamed into place. Then all but the newest `keep` complete checkpoints
/// with the same name prefix (the part before the first `-`) are deleted.
pub(crate) fn stage(
    root: &Path,
    name: &str,
    keep: usize,
    write: impl FnOnce(&Path) -> Result<()>,
) -> Result<PathBuf> {
    let tmp = stage_begin(root, name)?;
    fsutil::removing_on_error(&[&tmp], || {
        write(&tmp)?;
        stage_finish(root, name, &tmp, keep)
    })
}

/// Finishes what a run killed inside [`stage_finish`] left under `root`: a checkpoint being
/// pruned (`X.pruned.tmp`) is removed; one moved aside to be replaced (`X.old.tmp`) is
/// removed when its replacement `X` is complete, and put back otherwise. A checkpoint
/// that was being written when its run failed (`X.tmp` without [`DONE`]: another rank's
/// error, or a kill) is removed; it holds nothing complete.
fn recover(root: &Path) -> Result<()> {
    for entry in std::fs::read_dir(root).at(root)?.flatten() {
        let path = entry.path();
        let Some(name) = path.file_name().and_then(|n| n.to_str()).map(str::to_owned) else { continue };
        if name.ends_with(".pruned.tmp") {
            std::fs::remove_dir_all(&path).at(&path)?;
        } else if let Some(own) = name.strip_suffix(".old.tmp") {
            let own = root.join(own);
            if own.join(DONE).is_file() || !path.join(DONE).is_file() {
                std::fs::remove_dir_all(&path).at(&path)?;
            } else if !own.exists() {
                std::fs::rename(&path, &own).at(&path)?;
            }
        } else if name.ends_with(".tmp") && path.is_dir() && !path.join(DONE).exists() {
            std::fs::remove_dir_all(&path).at(&path)?;
        }
    }
    Ok(())
}

/// Makes the empty temporary directory of checkpoint `root/name` (replacing a stale one),
/// after [`recover`]ing what a killed run left.
fn stage_begin(root: &Path, name: &str) -> Result<PathBuf> {
    crate::fsutil::create_dirs(root)?;
    recover(root)?;
    let in_the_way = root.join(name);
    if in_the_way.symlink_metadata().is_ok_and(|m| !m.is_dir()) {
        return Err(Error::bad_file(
            &in_the_way,
            "is in the way of the checkpoint of that name, and is not a directory dtrain wrote: move it away",
        ));
    }
    let tmp = root.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).at(&tmp)?;
    }
    std::fs::create_dir(&tmp).at(&tmp)?;
    Ok(tmp)
}

/// Syncs every file and directory of the filled temporary directory `tmp`, writes
/// [`DONE`], renames it to `root/name` and keeps the newest `keep` checkpoints.
///
/// Nothing complete is lost on the way: a checkpoint of the same name (a run resumed from
/// an earlier step that reaches it again) is first moved aside under a `.tmp` name, which
/// no listing takes for a checkpoint, and deleted only once the new one is in place;
/// pruning likewise renames before it deletes, and only prunes checkpoints older than the
/// one just written (a resumed run's abandoned later steps are replaced as it reaches
/// them, never pruned in its stead).
fn stage_finish(root: &Path, name: &str, tmp: &Path, keep: usize) -> Result<PathBuf> {
    let final_dir = root.join(name);
    sync_tree(tmp)?;
    let mut files = Vec::new();
    files_under(tmp, "", &mut files)?;
    let written = Written {
        files: files
            .iter()
            .map(|(rel, path)| Ok((rel.clone(), file_digest(path)?)))
            .collect::<Result<_>>()?,
    };
    let record = serde_json::to_vec(&written).map_err(|e| Error::Data(format!("the DONE record: {e}")))?;
    fsutil::write_atomic(&tmp.join(DONE), &record)?;
    let aside = fsutil::sibling(&final_dir, ".old.tmp");
    let replaced = final_dir.exists();
    if replaced {
        if aside.exists() {
            std::fs::remove_dir_all(&aside).at(&aside)?;
        }
        std::fs::rename(&final_dir, &aside).at(&final_dir)?;
    }
    std::fs::rename(tmp, &final_dir).at(&final_dir)?;
    fsutil::sync_dir(root)?;
    if replaced {
        std::fs::remove_dir_all(&aside).at(&aside)?;
    }
    let prefix = name.split_once('-').map_or(name, |(p, _)| p);
    // Older by the counter's value (names stop sorting as counters past nine digits).
    let this = counter(&final_dir, prefix);
    let older: Vec<PathBuf> = list_named(root, prefix)?
        .into_iter()
        .filter(|p| counter(p, prefix) < this && !p.join(SNAPSHOT).is_file())
        .collect();
    let excess = (older.len() + 1).saturating_sub(keep);
    for old in older.into_iter().take(excess) {
        let gone = fsutil::sibling(&old, ".pruned.tmp");
        std::fs::rename(&old, &gone).at(&old)?;
        std::fs::remove_dir_all(&gone).at(&gone)?;
    }
    Ok(final_dir)
}

/// Syncs every file under `dir`, and every directory (their entries) bottom up.
fn sync_tree(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).at(dir)? {
        let path = entry.at(dir)?.path();
        if path.is_dir() {
            sync_tree(&path)?;
        } else {
            std::fs::File::open(&path).and_then(|f| f.sync_all()).at(&path)?;
        }
    }
    fsutil::sync_dir(dir)
}

/// Complete checkpoints under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>> {
    list_named(root, "step")
}

/// Complete checkpoint directories `root/{prefix}-<counter>`, oldest first (by the counter's
/// value).
pub(crate) fn list_named(root: &Path, prefix: &str) -> Result<Vec<PathBuf>> {
    if !root.exists() {
        return Ok(Vec::new());
    }
    // Ordered by the number in the name, not the name: `step-1000000000` (ten digits) comes
    // after `step-999999999`.
    let mut out: Vec<(u64, PathBuf)> = std::fs::read_dir(root)
        .at(root)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter_map(|p| {
            let n = counter(&p, prefix)?;
            p.join(DONE).is_file().then_some((n, p))
        })
        .collect();
    out.sort();
    Ok(out.into_iter().map(|(_, p)| p).collect())
}

/// The counter of checkpoint directory `path` named `{prefix}-<counter>`; `None` for any
/// other name (a `.tmp` one included).
fn counter(path: &Path, prefix: &str) -> Option<u64> {
    path.file_name()?.to_str()?.strip_prefix(prefix)?.strip_prefix('-')?.parse().ok()
}

/// The newest complete checkpoint under `root`.
pub fn latest(root: &Path) -> Result<Option<PathBuf>> {
    Ok(list(root)?.pop())
}

/// Reads a checkpoint's model: its metadata, the model, and its parameters. `path` is a
/// checkpoint directory or a `model.safetensors` file.
pub fn load_model(path: &Path) -> Result<(ModelMeta, Model, Vec<f32>)> {
    load_weights(path, Weights::Student)
}

/// Like [`load_model`], reading `which` weights when `path` is a checkpoint directory.
pub fn load_weights(path: &Path, which: Weights) -> Result<(ModelMeta, Model, Vec<f32>)> {
    load_weights_checked(path, which, |_, _| Ok(()))
}

/// [`load_weights`], with `claim` shown the weights file and the model it describes (from the
/// file's metadata) before their buffer is allocated; its error is returned instead.
pub fn load_weights_checked(
    path: &Path,
    which: Weights,
    claim: impl FnOnce(&Path, &Model) -> Result<()>,
) -> Result<(ModelMeta, Model, Vec<f32>)> {
    let (file, bytes, meta) = open_weights(path, which)?;
    let model = Model::new(meta.model.clone());
    claim(&file, &model)?;
    let params =
        tensors_from_file(&file, &bytes, model.layout(), &[("", model.layout().total())], Storage::Whole)?
            .remove(0);
    Ok((meta, model, params))
}

/// The metadata of a checkpoint's `which` weights (`path` as [`load_weights`] takes it),
/// checked as loading checks it, without reading the tensors.
pub fn weights_meta(path: &Path, which: Weights) -> Result<ModelMeta> {
    Ok(open_weights(path, which)?.2)
}

/// The weights file `path` names (with `which`), mapped, and its checked metadata.
fn open_weights(path: &Path, which: Weights) -> Result<(PathBuf, memmap2::Mmap, ModelMeta)> {
    let file = if path.is_dir() { path.join(which.file()) } else { path.to_owned() };
    // A file named for the teacher or the average must be that file: the student's
    // model.safetensors read in its stead would give the student's figures as theirs.
    if which != Weights::Student && !path.is_dir() && file.file_name() != Some(which.file().as_ref()) {
        return Err(Error::bad_file(
            path,
            format!(
                "names a weights file, and {} reads {}: give the checkpoint directory (or that file)",
                which.flag(),
                which.file()
            ),
        ));
    }
    // A Hugging Face model directory (a masked-LM run's encoder/ is one) has a config.json
    // beside its model.safetensors, as a checkpoint does, but no training state and no
    // dtrain metadata: named as what it is where it is refused.
    let pretrained = |d: &Path| {
        crate::model::encoder::is_pretrained_dir(d).then(|| {
            Error::bad_file(
                path,
                "is a pretrained encoder (Hugging Face config.json + model.safetensors), not a dtrain \
                     checkpoint: a run starts from it with model.encoder.pretrained (or mlm.pretrained)",
            )
        })
    };
    if path.is_dir() && !path.join(DONE).is_file() {
        if let Some(e) = pretrained(path) {
            return Err(e);
        }
        return Err(not_a_checkpoint(path));
    }
    // The weights of a complete checkpoint are checked against its DONE record.
    let home = file.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d });
    let name = file.file_name().and_then(|n| n.to_str());
    if let (Some(d), Some(name)) = (home.filter(|d| d.join(DONE).is_file()), name) {
        check_written(d, Reading::File(name))?;
    } else if let Some(d) = home.filter(|d| {
        d.join("state.bin").exists()
            || d.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(".tmp"))
    }) {
        // A file of a training checkpoint without its DONE record: one being written, or
        // interrupted while it was (a weights file copied out alone has no state beside it).
        return Err(Error::bad_file(
            d,
            "incomplete checkpoint (no DONE marker): it was interrupted while being written",
        ));
    }
    if which != Weights::Student && path.is_dir() && !file.is_file() {
        let why = match which {
            Weights::Teacher if path.join("teacher_mlp.safetensors").is_file() => {
                "its teacher is reduced MPL's MLP over exported logits, not a text classifier"
            }
            Weights::Teacher => "it was not trained with a Mean Teacher or Meta Pseudo Labels",
            _ => "it was trained without [average] EMA or SWA weights",
        };
        return Err(Error::bad_file(path, format!("has no {}: {why}", which.file())));
    }
    let bytes = map(&file)?;
    let meta: Result<ModelMeta> = file_meta(&file, &bytes).and_then(|v| {
        serde_json::from_value(v)
            .map_err(|e| Error::bad_file(&file, format!("invalid `{META_KEY}` metadata: {e}")))
    });
    // A file that is not weights, given for them: a pretrained model directory's is named
    // as such, and another file of a training checkpoint (its optimizer moments, state,
    // config) names the directory to pass instead.
    let meta = meta.map_err(|e| {
        let dir = file.parent().map(|d| if d.as_os_str().is_empty() { Path::new(".") } else { d });
        if let Some(named) = dir.and_then(pretrained) {
            return named;
        }
        let weights = [Weights::Student, Weights::Teacher, Weights::Average].map(Weights::file);
        let named_weights = file.file_name().and_then(|n| n.to_str()).is_some_and(|n| weights.contains(&n));
        match dir.filter(|d| !named_weights && d.join(DONE).is_file() && d.join("state.bin").is_file()) {
            Some(d) => Error::bad_file(
                &file,
                format!(
                    "holds no classifier's weights: it is another file of the checkpoint {} (whose weights \
                     are {}): pass the checkpoint directory",
                    d.display(),
                    weights.join(", ")
                ),
            ),
            None => e,
        }
    })?;
    if meta.labels.len() != meta.model.classes() {
        return Err(Error::bad_file(&file, "metadata: the label count differs from the model's classes"));
    }
    meta.model.validate().map_err(|e| Error::bad_file(&file, format!("metadata: {e}")))?;
    meta.tokenizer
        .validate(&file.display().to_string(), "tokenizer")
        .map_err(|e| Error::bad_file(&file, format!("metadata: {e}")))?;
    let rows = meta.model.input_rows();
    let ids = meta.tokenizer.buckets as usize;
    let fits = match meta.model {
        ModelSpec::Bag(_) => rows == ids,
        ModelSpec::Encoder(_) => rows >= ids && meta.tokenizer.subword.is_some(),
    };
    if !fits {
        return Err(Error::bad_file(
            &file,
            format!(
                "metadata: the model's {rows} input rows do not fit the tokenizer's {ids} ids (a bag model needs one row per bucket, an encoder a subword tokenizer within its vocabulary)"
            ),
        ));
    }
    if meta.format != meta.model.format() {
        return Err(Error::bad_file(
            &file,
            format!("metadata: format {:?} does not match a {} model", meta.format, meta.model.format()),
        ));
    }
    Ok((file, bytes, meta))
}

/// Reads a checkpoint's optimizer moments (buffers of `lens`, as `optim::moment_lens` gives)
/// and training state.
pub fn load_train(
    dir: &Path,
    model: &Model,
    lens: (usize, usize),
) -> Result<(Vec<f32>, Vec<f32>, TrainState)> {
    check_written(dir, Reading::All)?;
    let file = dir.join("optimizer.safetensors");
    let bytes = map(&file)?;
    let mut moments =
        tensors_from_file(&file, &bytes, model.layout(), &[("m.", lens.0), ("v.", lens.1)], Storage::ByRows)?;
    let v = moments.pop().expect("two buffers");
    let m = moments.pop().expect("two buffers");
    Ok((m, v, read_state(dir)?))
}

/// The data set a training checkpoint was trained on (its manifest checksum), when `dir`
/// is one with a readable state; `None` for a checkpoint without state (weights alone).
pub fn trained_on(dir: &Path) -> Option<String> {
    read_state(dir).ok().map(|s| s.data_checksum)
}

/// Reads and checks a checkpoint's `state.bin`: header, length, checksum, version, and that
/// the directory's name is its step's.
fn read_state(dir: &Path) -> Result<TrainState> {
    let path = dir.join("state.bin");
    let b = std::fs::read(&path).at(&path)?;
    if b.len() < 28 || &b[..8] != STATE_MAGIC {
        return Err(Error::bad_file(&path, "not a dtrain state file"));
    }
    let version = u32::from_le_bytes(b[8..12].try_into().expect("4 bytes"));
    if version != STATE_VERSION {
        return Err(Error::bad_file(
            &path,
            format!("state version {version}, this dtrain reads {STATE_VERSION}"),
        ));
    }
    let len = u64::from_le_bytes(b[12..20].try_into().expect("8 bytes"));
    let sum = u64::from_le_bytes(b[20..28].try_into().expect("8 bytes"));
    let payload = &b[28..];
    if payload.len() as u64 != len || xxh3_64(payload) != sum {
        return Err(Error::bad_file(&path, "truncated or corrupted (length or checksum mismatch)"));
    }
    let (state, _): (TrainState, usize) = bincode::decode_from_slice(payload, bincode::config::standard())
        .map_err(|e| Error::bad_file(&path, format!("undecodable: {e}")))?;
    check_named(dir, "step", state.step, &dir_name(state.step), "the training state")?;
    Ok(state)
}

/// Refuses checkpoint `dir` named `{unit}-N` when N is not `n`, the step or epoch of the
/// `what` it holds (`own`: the name it should have). A copy under a later name would be
/// taken for the newest checkpoint (and the real newest pruned, or never resumed).
pub fn check_named(dir: &Path, unit: &str, n: u64, own: &str, what: &str) -> Result<()> {
    let named =
        dir.file_name().and_then(|s| s.to_str()).and_then(|s| s.strip_prefix(unit)?.strip_prefix('-'));
    if let Some(m) = named.and_then(|s| s.parse::<u64>().ok()).filter(|&m| m != n) {
        let there = dir.with_file_name(own);
        let fix = if there.exists() {
            format!("{} is there already: remove the copy", there.display())
        } else {
            format!("rename it to {own}")
        };
        return Err(Error::bad_file(
            dir,
            format!("holds {what} of {unit} {n}, but its name says {unit} {m}: a copy under another {unit}'s name; {fix}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Makes `root/name` with an empty `DONE` record.
    fn done_dir(root: &Path, name: &str) {
        std::fs::create_dir(root.join(name)).unwrap();
        std::fs::write(root.join(name).join(DONE), b"").unwrap();
    }

    /// What a run killed while it pruned or replaced a checkpoint left is finished at the
    /// next checkpoint: a pruned one goes, a replaced one goes once its replacement is
    /// complete, and comes back when the replacement never arrived.
    #[test]
    fn a_killed_prune_or_replacement_is_finished_at_the_next_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let make = |name: &str| done_dir(root, name);
        make("step-000000002.pruned.tmp");
        make("step-000000004");
        make("step-000000004.old.tmp");
        make("step-000000006.old.tmp");
        // A checkpoint a failed run was writing (no DONE) goes; a complete one is kept.
        std::fs::create_dir_all(root.join("step-000000005.tmp").join("bank")).unwrap();
        std::fs::write(root.join("step-000000005.tmp").join("bank").join("x"), b"x").unwrap();
        make("step-000000007.tmp");
        let written = stage(root, "step-000000008", 10, |d| std::fs::write(d.join("x"), b"x").at(d)).unwrap();
        let mut names: Vec<String> =
            std::fs::read_dir(root).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["step-000000004", "step-000000006", "step-000000007.tmp", "step-000000008"]);
        assert_eq!(written, root.join("step-000000008"));
    }

    /// Past nine digits the names stop sorting as the steps do; the order is the steps'.
    #[test]
    fn checkpoints_are_ordered_by_step_past_nine_digits() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["step-1000000000", "step-999999999", "step-000000005", "step-000000007.tmp", "step-x"] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join(DONE), b"").unwrap();
        }
        // A directory without its DONE record is not a checkpoint.
        std::fs::create_dir(dir.path().join(dir_name(2_000_000_000))).unwrap();
        let names: Vec<String> = list(dir.path())
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into())
            .collect();
        assert_eq!(names, ["step-000000005", "step-999999999", "step-1000000000"]);
        assert!(latest(dir.path()).unwrap().unwrap().ends_with("step-1000000000"));
    }

    /// Keep-K prunes by the step's value too: past nine digits the older checkpoint goes,
    /// and a newer one (a resumed run's abandoned later step) is never pruned.
    #[test]
    fn pruning_orders_by_step_past_nine_digits() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        let done = |name: &str| done_dir(root, name);
        let staged = |name: &str| {
            let tmp = root.join(format!("{name}.tmp"));
            std::fs::create_dir(&tmp).unwrap();
            std::fs::write(tmp.join("x"), b"x").unwrap();
            tmp
        };
        let names = || -> Vec<String> {
            list(root).unwrap().iter().map(|p| p.file_name().unwrap().to_string_lossy().into()).collect()
        };
        done("step-999999998");
        done("step-999999999");
        stage_finish(root, "step-1000000000", &staged("step-1000000000"), 2).unwrap();
        assert_eq!(names(), ["step-999999999", "step-1000000000"]);
        // A run resumed from an earlier step writes step 999999999 again, keeping 1: the
        // older 999999990 goes, the newer 1000000000 (not older than it) stays.
        std::fs::remove_dir_all(root.join("step-999999999")).unwrap();
        done("step-999999990");
        stage_finish(root, "step-999999999", &staged("step-999999999"), 1).unwrap();
        assert_eq!(names(), ["step-999999999", "step-1000000000"]);
    }

    /// A layout of one 2 × 3 matrix, and its tensors as a checkpoint directory's weights.
    fn write_weights(dir: &Path, values: &[f32]) -> Result<()> {
        let mut layout = Layout::new();
        layout.matrix("w", 2, 3);
        tensors_to_file(
            &dir.join("model.safetensors"),
            &layout,
            &[("", values)],
            serde_json::json!({}),
            Storage::Whole,
        )
    }

    #[test]
    fn diverged_weights_are_not_written_and_the_earlier_checkpoints_are_kept() {
        let root = tempfile::tempdir().unwrap();
        let ckpts = root.path().join("checkpoints");
        stage(&ckpts, &dir_name(2), 1, |tmp| write_weights(tmp, &[0.5; 6])).unwrap();
        let mut bad = [0.5f32; 6];
        bad[4] = f32::INFINITY;
        let e = stage(&ckpts, &dir_name(3), 1, |tmp| write_weights(tmp, &bad)).unwrap_err().to_string();
        assert!(e.contains("not written: tensor `w` holds inf at 4: the weights diverged"), "{e}");
        // Step 2 is neither pruned nor replaced, and no temporary directory is left.
        assert_eq!(list(&ckpts).unwrap(), [ckpts.join(dir_name(2))]);
        let left: Vec<_> = std::fs::read_dir(&ckpts).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from(dir_name(2))]);
        bad[4] = f32::NAN;
        let e = write_weights(root.path(), &bad).unwrap_err().to_string();
        assert!(e.contains("holds NaN at 4"), "{e}");
        assert!(!root.path().join("model.safetensors").exists());
    }

    #[test]
    fn done_records_the_files_and_reading_checks_them() {
        let root = tempfile::tempdir().unwrap();
        let ckpts = root.path().join("checkpoints");
        let write = |tmp: &Path, v: f32| {
            write_weights(tmp, &[v; 6])?;
            fsutil::write_atomic(&tmp.join("state.bin"), &[v.to_bits() as u8; 40])
        };
        let two = stage(&ckpts, &dir_name(2), 2, |tmp| write(tmp, 0.5)).unwrap();
        let three = stage(&ckpts, &dir_name(3), 2, |tmp| write(tmp, 0.25)).unwrap();
        let record: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(three.join(DONE)).unwrap()).unwrap();
        assert_eq!(record["files"].as_object().unwrap().len(), 2, "{record}");
        check_written(&three, Reading::All).unwrap();
        // Each case in a copy of its own (a directory is checked once per process).
        let case = |name: &str, edit: &dyn Fn(&Path)| -> String {
            let d = root.path().join(name);
            std::fs::create_dir(&d).unwrap();
            for f in ["model.safetensors", "state.bin", DONE] {
                std::fs::copy(three.join(f), d.join(f)).unwrap();
            }
            check_written(&d, Reading::All)
                .unwrap_or_else(|e| panic!("{name}: a faithful copy is accepted: {e}"));
            let d2 = root.path().join(format!("{name}-edited"));
            std::fs::rename(&d, &d2).unwrap();
            edit(&d2);
            check_written(&d2, Reading::All).map(|_| String::new()).unwrap_or_else(|e| e.to_string())
        };
        // Another checkpoint's weights copied in.
        let e = case("swapped", &|d| {
            std::fs::copy(two.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        });
        assert!(
            e.contains("model.safetensors") && e.contains("differs from the file this checkpoint"),
            "{e}"
        );
        // A file of a name dtrain reads, not written with it.
        let e = case("average", &|d| {
            std::fs::copy(d.join("model.safetensors"), d.join("average.safetensors")).unwrap();
        });
        assert!(
            e.contains("average.safetensors") && e.contains("was not written with this checkpoint"),
            "{e}"
        );
        // A file it was written with, gone.
        let e = case("missing", &|d| std::fs::remove_file(d.join("state.bin")).unwrap());
        assert!(e.contains("state.bin") && e.contains("is missing"), "{e}");
        // … or a directory in its place.
        let e = case("a directory", &|d| {
            std::fs::remove_file(d.join("state.bin")).unwrap();
            std::fs::create_dir(d.join("state.bin")).unwrap();
        });
        assert!(e.contains("state.bin") && e.contains("is not a regular file"), "{e}");
        // Notes, or weights under a name of their own, are left be.
        let e = case("notes", &|d| {
            std::fs::write(d.join("notes.txt"), "mine").unwrap();
            std::fs::copy(d.join("model.safetensors"), d.join("best.safetensors")).unwrap();
        });
        assert_eq!(e, "");
        // A checkpoint from before the record (an empty DONE) is read unchecked.
        let e = case("old", &|d| {
            std::fs::write(d.join(DONE), "\n").unwrap();
            std::fs::copy(two.join("model.safetensors"), d.join("model.safetensors")).unwrap();
        });
        assert_eq!(e, "");
        // The SNAPSHOT marker is no part of the record: a user may add or remove it.
        let e = case("snapshot", &|d| std::fs::write(d.join(SNAPSHOT), "").unwrap());
        assert_eq!(e, "");
        // Reading one file checks that file only: the others may be gone (a checkpoint
        // trimmed for inference), and an unlisted file is refused only when it is the one read.
        let d = root.path().join("missing-edited");
        check_written(&d, Reading::File("model.safetensors")).unwrap();
        let e = check_written(&root.path().join("average-edited"), Reading::File("average.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("was not written with this checkpoint"), "{e}");
        check_written(&root.path().join("average-edited"), Reading::File("model.safetensors")).unwrap();
        let e = check_written(&root.path().join("swapped-edited"), Reading::File("model.safetensors"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("differs from the file"), "{e}");
        // A directory without DONE (here the run's checkpoints/), or a file, is no complete
        // checkpoint.
        let e = check_written(&ckpts, Reading::All).unwrap_err().to_string();
        assert!(e.contains("is not a checkpoint directory: its newest checkpoint is"), "{e}");
        let bare = root.path().join("bare");
        std::fs::create_dir(&bare).unwrap();
        std::fs::write(bare.join("model.safetensors"), b"x").unwrap();
        let e = check_written(&bare, Reading::All).unwrap_err().to_string();
        assert!(e.contains("incomplete checkpoint (no DONE marker)"), "{e}");
        let e = check_written(&three.join("state.bin"), Reading::All).unwrap_err().to_string();
        assert!(e.contains("is a file, not a checkpoint directory"), "{e}");
        // A file where a checkpoint's directory goes is refused, and left as it was.
        std::fs::write(ckpts.join(dir_name(4)), "not mine").unwrap();
        let e = stage(&ckpts, &dir_name(4), 2, |tmp| write(tmp, 0.75)).unwrap_err().to_string();
        assert!(e.contains("is in the way of the checkpoint"), "{e}");
        assert_eq!(std::fs::read_to_string(ckpts.join(dir_name(4))).unwrap(), "not mine");
        assert_eq!(list(&ckpts).unwrap(), [two, three]);
    }

    #[test]
    fn a_mismatch_names_the_labels_or_the_tokenizer_fields_that_differ() {
        let labels = |n: usize| (0..n).map(|i| format!("c{i}")).collect::<Vec<_>>();
        let spec = crate::model::bag::BagSpec {
            buckets: 4096,
            dim: 4,
            hidden: vec![],
            activation: crate::backend::Activation::Relu,
            embed_dropout: 0.0,
            hidden_dropout: 0.0,
            classes: 6,
        };
        let tok = TokenizerSpec { buckets: 4096, ..Default::default() };
        let meta = ModelMeta {
            format: "dtrain-bag".into(),
            model: ModelSpec::Bag(spec),
            labels: labels(6),
            tokenizer: tok.clone(),
        };
        assert_eq!(meta.mismatch(&labels(6), &tok, "the data set"), None);
        let m = meta.mismatch(&labels(3), &tok, "the data set").unwrap();
        assert_eq!(m, "labels: the model has 6 (c0, c1, c2, c3, …), the data set 3 (c0, c1, c2)");
        let other = TokenizerSpec { buckets: 1024, word_ngrams: tok.word_ngrams + 1, ..tok.clone() };
        let m = meta.mismatch(&labels(6), &other, "the data set").unwrap();
        assert!(
            m.starts_with("tokenizer: ") && m.contains("buckets (4096 in the model, 1024 in the data set)"),
            "{m}"
        );
        assert!(m.contains("word_ngrams (") && !m.contains("lowercase"), "{m}");
    }
}
