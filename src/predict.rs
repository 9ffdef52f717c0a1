//! `dtrain predict`: raw text in, one JSON line per document out (label, confidence, top-k),
//! averaging MC-dropout passes and several checkpoints when asked.

use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use serde_json::json;

use crate::backend::{dispatch, mix64, Device, DropoutKey, EncoderOps, HostBatch, OnBackend};
use crate::checkpoint::{self, ModelMeta};
use crate::data::input::{
    parse_line, DiskCounter, Format, FormatChoice, JsonFields, LineReader, Parsed, Role,
};
use crate::data::subword::SubwordTokenizer;
use crate::data::tokenize::Tokenizer;
use crate::error::{Error, IoContext, Result};
use crate::model::{Acts, Model};

/// What to predict and how.
#[derive(Debug, Clone)]
pub struct PredictOptions {
    pub checkpoints: Vec<PathBuf>,
    pub input: PathBuf,
    pub output: PathBuf,
    pub format: FormatChoice,
    pub text_field: String,
    /// Probabilities listed per document.
    pub top_k: usize,
    /// Forward passes with dropout on, averaged (1 = one pass without dropout).
    pub mc_dropout: usize,
    /// Test-time augmentation (METHODS.md §13): also average over this many strong views
    /// of each document (`[augment]`'s default strengths; 0 = the text as it is only).
    pub augment_views: usize,
    /// Which weights of each checkpoint to read (student, Mean Teacher, EMA/SWA).
    pub weights: checkpoint::Weights,
    /// Seed of the MC-dropout masks.
    pub seed: u64,
    /// The subword tokenizer's file, in place of the path the checkpoint recorded.
    pub tokenizer: Option<PathBuf>,
    /// An encoder's tokens per document at most ([CLS] and [SEP] included), in place of its
    /// run's `subword.max_len`: from 3 to the model's positions.
    pub max_len: Option<usize>,
    pub batch_size: usize,
    pub skip_bad: bool,
    /// Where the forward passes run (`--device`).
    pub device: Device,
}

/// Counts of a prediction run.
#[derive(Debug, Clone, Default)]
pub struct PredictSummary {
    pub documents: u64,
    pub skipped: u64,
    pub blank: u64,
}

/// The views of a batch that [`average_probs`] averages over: the batch itself, then
/// `views` strong views of each document, keyed by the document's place in the input (so
/// they do not depend on the batch size) and the seed.
struct Views {
    views: usize,
    seed: u64,
    cfg: crate::data::augment::AugmentConfig,
    /// Ids are below it (the table's buckets, or the subword vocabulary).
    buckets: u32,
    /// Subword documents keep their [CLS] and [SEP].
    keep_ends: bool,
}

impl Views {
    fn of(&self, batch: &HostBatch, first_doc: u64) -> Vec<HostBatch> {
        let mut out = vec![batch.clone()];
        let mut buf = Vec::new();
        for v in 1..=self.views as u64 {
            let mut view = HostBatch::default();
            for i in 0..batch.len() {
                let doc = &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize];
                let key = mix64(self.seed ^ mix64(first_doc + i as u64) ^ mix64(v ^ 0x7e57_0000));
                crate::data::augment::strong_doc(doc, self.buckets, &self.cfg, key, self.keep_ends, &mut buf);
                view.push(&buf, batch.labels[i]);
            }
            out.push(view);
        }
        out
    }
}

/// Averages the class probabilities of `models` (each with `passes` passes, over each of
/// `views`) over `batch`, whose first document is document `first_doc` of the input
/// (MC-dropout masks and augmentations are keyed by it, so they do not depend on the batch
/// size).
fn average_probs<B: EncoderOps<F = f32>>(
    be: &B,
    models: &[(Model, B::Buf)],
    batch: &HostBatch,
    first_doc: u64,
    passes: usize,
    views: &Views,
) -> Vec<f32> {
    let classes = models[0].0.classes();
    let mut sum = vec![0f32; batch.len() * classes];
    let mut probs = be.zeros(0);
    let batches = views.of(batch, first_doc);
    for (mi, (model, params)) in models.iter().enumerate() {
        let mut acts = Acts::inference(be, model);
        // An encoder's activations grow with its tokens: it reads the batch in parts of at
        // most `eval_batch` documents, as evaluation does.
        let part_len = model.eval_batch(batch.len());
        for b in &batches {
            for start in (0..b.len()).step_by(part_len) {
                let end = (start + part_len).min(b.len());
                let part =
                    if end - start == b.len() { Cow::Borrowed(b) } else { Cow::Owned(b.slice(start..end)) };
                let dev = model.input(be, &part);
                for pass in 0..passes {
                    let key = (passes > 1).then_some(DropoutKey {
                        seed: views.seed,
                        step: mi as u64,
                        site: 0,
                        pass: pass as u32,
                        rows: crate::backend::RowMap::at(first_doc + start as u64),
                    });
                    model.forward(be, params, &dev, part.len(), key, &mut acts);
                    be.softmax(acts.logits(), classes, &mut probs);
                    let rows = &mut sum[start * classes..end * classes];
                    rows.iter_mut().zip(&be.download(&probs)).for_each(|(s, &p)| *s += p);
                }
            }
        }
    }
    let inv = 1.0 / (models.len() * passes * batches.len()) as f32;
    sum.iter_mut().for_each(|s| *s *= inv);
    sum
}

/// Runs a prediction job.
pub fn predict(opts: &PredictOptions) -> Result<PredictSummary> {
    if opts.checkpoints.is_empty() {
        return Err(Error::config("predict", "--checkpoint", "at least one checkpoint is required"));
    }
    for (flag, v) in
        [("--mc-dropout", opts.mc_dropout), ("--top-k", opts.top_k), ("--batch-size", opts.batch_size)]
    {
        if v < 1 {
            return Err(Error::config("predict", flag, "must be at least 1"));
        }
    }
    for (flag, v) in [("--mc-dropout", opts.mc_dropout), ("--augment-views", opts.augment_views)] {
        if v > 256 {
            return Err(Error::config("predict", flag, "must be at most 256"));
        }
    }
    for (flag, p) in [("--input", &opts.input), ("--output", &opts.output)] {
        if p.as_os_str() == "-" {
            return Err(Error::config(
                "predict",
                flag,
                "`-` (standard input or output) is not supported: name a file (the output is written whole, then renamed into place)",
            ));
        }
    }
    let inputs: Vec<&Path> = std::iter::once(opts.input.as_path()).chain(opts.tokenizer.as_deref()).collect();
    crate::fsutil::check_output("--output", &opts.output, &inputs, Some(crate::fsutil::JSONL_MAGIC))?;
    let mut metas: Vec<ModelMeta> = Vec::new();
    let mut models = Vec::new();
    // Every checkpoint's weights stay in memory for the whole job.
    let mut budget = crate::hostmem::Budget::new("predict", 1)?;
    for path in &opts.checkpoints {
        let (meta, model, params) = checkpoint::load_weights_checked(path, opts.weights, |file, model| {
            let bytes = model.layout().total() as u64 * 4;
            let why =
                "average fewer checkpoints (one --checkpoint each), or predict on a machine with more memory";
            budget.claim(format!("{}'s weights", file.display()), bytes, "--checkpoint", why)
        })?;
        if let Some(first) = metas.first() {
            if let Some(what) = meta.mismatch(&first.labels, &first.tokenizer, "the first checkpoint") {
                return Err(Error::bad_file(
                    path,
                    format!("cannot be averaged with the first checkpoint: its {what}"),
                ));
            }
        }
        if opts.mc_dropout > 1 && !meta.model.has_dropout() {
            return Err(Error::bad_file(
                path,
                "--mc-dropout needs a model with dropout (model.embed_dropout, hidden_dropout or encoder.dropout > 0)",
            ));
        }
        metas.push(meta);
        models.push((model, params));
    }
    let meta = &metas[0];
    let max_len = max_len_of(opts, &metas)?;
    if let (Device::Cpu | Device::Auto, Some(len)) = (opts.device, max_len) {
        // An encoder's forward pass over a part of a batch (one model at a time); on a GPU
        // its activations live in device memory, which is not checked (`auto` is counted
        // as if it ran on the CPU).
        let bytes = models
            .iter()
            .map(|(m, _)| m.activation_bytes(m.eval_batch(opts.batch_size), len, false))
            .max()
            .unwrap_or(0);
        budget.claim(
            format!("the activations of a forward pass over {len} tokens per document"),
            bytes,
            "--batch-size",
            "lower --batch-size",
        )?;
    }
    let tokenizer = TextIds::new(meta, opts.tokenizer.as_deref(), max_len)?;
    let views = Views {
        views: opts.augment_views,
        seed: opts.seed,
        cfg: Default::default(),
        buckets: meta.tokenizer.buckets,
        keep_ends: meta.tokenizer.subword.is_some(),
    };
    struct Job<'a>(&'a PredictOptions, &'a TextIds, Vec<(Model, Vec<f32>)>, &'a [String], &'a Views);
    impl OnBackend for Job<'_> {
        type Out = PredictSummary;
        fn run<B: EncoderOps<F = f32>>(self, be: &B) -> Result<PredictSummary> {
            let models: Vec<(Model, B::Buf)> =
                self.2.into_iter().map(|(m, p)| (m, be.upload_vec(p))).collect();
            predict_on(be, self.0, self.1, &models, self.3, self.4)
        }
    }
    dispatch(opts.device, 0, false, Job(opts, &tokenizer, models, &meta.labels, &views))
}

/// The tokens per document an encoder checkpoint reads: `--max-len`, checked against every
/// model's positions, or its run's `subword.max_len`; `None` for a bag model (refusing
/// `--max-len`).
fn max_len_of(opts: &PredictOptions, metas: &[ModelMeta]) -> Result<Option<usize>> {
    let Some(sw) = &metas[0].tokenizer.subword else {
        return match opts.max_len {
            Some(_) => Err(Error::config(
                "predict",
                "--max-len",
                "applies to an encoder checkpoint; this one's model reads hashed features",
            )),
            None => Ok(None),
        };
    };
    let Some(n) = opts.max_len else { return Ok(Some(sw.max_len as usize)) };
    let positions = metas
        .iter()
        .filter_map(|m| match &m.model {
            crate::model::ModelSpec::Encoder(e) => Some(e.max_positions),
            crate::model::ModelSpec::Bag(_) => None,
        })
        .min()
        .unwrap_or(0);
    if !(3..=positions).contains(&n) {
        return Err(Error::config(
            "predict",
            "--max-len",
            format!("{n}: must be from 3 (the [CLS] and [SEP] tokens and one more) to the model's {positions} positions"),
        ));
    }
    Ok(Some(n))
}

/// Text to the ids a checkpoint's model reads: its hashed features, or its subword
/// tokenizer's ids (the tokenizer.json the data set was prepared with, checked by checksum).
enum TextIds {
    Hashed(Tokenizer),
    /// The subword tokenizer, the length it cuts at, and the hashing tokenizer that decides,
    /// as in `prepare`, whether a text is kept at all.
    Subword(Box<SubwordTokenizer>, usize, Tokenizer),
}

impl TextIds {
    /// The checkpoint's tokenizer; a subword one read from `file` when given, cutting
    /// documents at `max_len` ids (the run's `subword.max_len` unless --max-len).
    fn new(meta: &ModelMeta, file: Option<&Path>, max_len: Option<usize>) -> Result<Self> {
        Ok(match &meta.tokenizer.subword {
            None if file.is_some() => {
                return Err(Error::config(
                    "predict",
                    "--tokenizer",
                    "names a subword tokenizer.json; this checkpoint's model reads hashed features",
                ))
            }
            None => TextIds::Hashed(Tokenizer::new(meta.tokenizer.clone())),
            Some(sw) => {
                let mut sw = sw.clone();
                match file {
                    Some(f) => {
                        sw.path = f
                            .to_str()
                            .ok_or_else(|| {
                                Error::config("predict", "--tokenizer", "the path is not valid UTF-8: rename the file")
                            })?
                            .to_owned()
                    }
                    None if !Path::new(&sw.path).is_file() => {
                        return Err(Error::bad_file(
                            Path::new(&sw.path),
                            "the subword tokenizer the model was trained with is not there (moved, or a \
                             relative path from another working directory): --tokenizer names where it is now",
                        ))
                    }
                    None => {}
                }
                TextIds::Subword(
                    Box::new(SubwordTokenizer::for_spec(&sw)?),
                    max_len.unwrap_or(sw.max_len as usize),
                    Tokenizer::new(meta.tokenizer.clone()),
                )
            }
        })
    }

    fn ids(&self, text: &str) -> std::result::Result<Vec<u32>, String> {
        match self {
            TextIds::Hashed(t) => Ok(t.tokenize(text).ids),
            // As `prepare` keeps them: a text whose characters the subword tokenizer all
            // drops, but in which the hashing tokenizer finds features (lone combining
            // accents), is its special tokens alone.
            TextIds::Subword(t, max_len, hashed) => {
                let ids = t.encode(text, *max_len).map_err(|e| e.to_string())?;
                Ok(if ids.is_empty() && !hashed.tokenize(text).ids.is_empty() { t.specials() } else { ids })
            }
        }
    }
}

/// The prediction loop on backend `be`: the output is written under a temporary name and
/// renamed into place at the end; on any error the temporary file is removed.
fn predict_on<B: EncoderOps<F = f32>>(
    be: &B,
    opts: &PredictOptions,
    tokenizer: &TextIds,
    models: &[(Model, B::Buf)],
    labels: &[String],
    views: &Views,
) -> Result<PredictSummary> {
    let format = Format::resolve(opts.format, &opts.input)?;
    let mut reader = LineReader::open(&opts.input, DiskCounter::default())?;
    let tmp = crate::fsutil::sibling(&opts.output, ".tmp");
    let tmp = tmp.as_path();
    crate::fsutil::removing_on_error(&[tmp], || {
        let fields = JsonFields { text: opts.text_field.clone(), label: "label".into() };
        let file = std::fs::File::create(tmp).at(tmp)?;
        let mut out = BufWriter::new(file);
        let mut summary = PredictSummary::default();
        let mut lines: Vec<(u64, Vec<u8>)> = Vec::new();
        loop {
            let mut buf = Vec::new();
            let next = reader.next_line(&mut buf)?;
            if let Some(n) = next {
                lines.push((n, buf));
            }
            if lines.len() == opts.batch_size || (next.is_none() && !lines.is_empty()) {
                let parsed: Vec<std::result::Result<Option<Vec<u32>>, String>> = lines
                    .par_iter()
                    .map(|(n, bytes)| match parse_line(bytes, *n, format, Role::Unlabeled, &fields)? {
                        Parsed::Blank => Ok(None),
                        Parsed::Doc(d) => {
                            let ids = tokenizer.ids(&d.text)?;
                            if ids.is_empty() {
                                Err("no features after tokenizing".to_string())
                            } else {
                                Ok(Some(ids))
                            }
                        }
                    })
                    .collect();
                let mut batch = HostBatch::default();
                let mut line_of = Vec::new();
                for ((n, _), p) in lines.iter().zip(parsed) {
                    match p {
                        Ok(None) => summary.blank += 1,
                        Ok(Some(ids)) => {
                            batch.push(&ids, -1);
                            line_of.push(*n);
                        }
                        Err(_) if opts.skip_bad => summary.skipped += 1,
                        Err(msg) => {
                            return Err(Error::BadLine {
                                path: opts.input.clone(),
                                line: *n,
                                msg: format!("{msg} (pass --skip-bad to skip)"),
                            });
                        }
                    }
                }
                if !batch.is_empty() {
                    let probs = average_probs(be, models, &batch, summary.documents, opts.mc_dropout, views);
                    write_rows(&mut out, tmp, &probs, &line_of, labels, opts.top_k)?;
                    summary.documents += batch.len() as u64;
                }
                lines.clear();
            }
            if next.is_none() {
                break;
            }
        }
        // Nothing to predict is an error, as in `prepare`, so that an earlier output under
        // that name is not replaced by an empty file.
        if summary.documents == 0 && summary.skipped > 0 {
            return Err(Error::bad_file(
                &opts.input,
                format!("every line was bad ({} skipped): nothing was predicted", summary.skipped),
            ));
        }
        if summary.documents == 0 {
            return Err(Error::bad_file(
                &opts.input,
                format!("holds no document ({} blank lines): nothing was predicted", summary.blank),
            ));
        }
        out.flush().at(tmp)?;
        out.into_inner().map_err(|e| Error::io(tmp, e.into_error()))?.sync_all().at(tmp)?;
        std::fs::rename(tmp, &opts.output).at(&opts.output)?;
        Ok(summary)
    })
}

fn write_rows(
    out: &mut impl Write,
    path: &Path,
    probs: &[f32],
    lines: &[u64],
    labels: &[String],
    top_k: usize,
) -> Result<()> {
    let classes = labels.len();
    for (row, &line) in probs.chunks(classes).zip(lines) {
        let mut order: Vec<usize> = (0..classes).collect();
        order.sort_by(|&a, &b| row[b].total_cmp(&row[a]).then(a.cmp(&b)));
        let top: Vec<serde_json::Value> =
            order.iter().take(top_k).map(|&c| json!({"label": labels[c], "p": row[c]})).collect();
        let v = json!({"line": line, "label": labels[order[0]], "confidence": row[order[0]], "top": top});
        writeln!(out, "{v}").at(path)?;
    }
    Ok(())
}
