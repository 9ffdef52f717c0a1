//! Training of the bag model with any method of `algo`: the step loop (micro-batches of
//! labeled and unlabeled rows, the supervised and consistency losses, backward passes,
//! optimizer, EMA teacher), logging to a progress bar and `metrics.jsonl`, periodic evaluation and
//! checkpoints, and exact resume.

mod adversarial;
pub mod eval;
pub mod metrics;
mod mpl;
pub mod net;
mod step;

use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use crate::algo::adversarial::AdversarialKind;
use crate::algo::ramp;
use crate::algo::shadow::{AlphaRule, Shadow};
use crate::algo::stabilise::{AdaptiveThreshold, Stabiliser};
use crate::algo::{Method, TargetSource};
use crate::backend::{dispatch_with, host_view, Backend, Device, EncoderOps, GradSync, LossKind, OnBackend};
use crate::bank::{Bank, BankSettings};
use crate::checkpoint::{self, LogWindow, ModelMeta, TrainState};
use crate::config::{LossName, TrainConfig};
use crate::data::dataset::Dataset;
use crate::data::loader::Loader;
use crate::data::shard::SplitKind;
use crate::dist::Dist;
use crate::error::{Error, Result};
use crate::logits::LogitsFile;
use crate::model::bag::BagSpec;
use crate::model::Model;
use crate::optim::schedule::Plateau;
use crate::optim::{Optimizer, TableGrad};
use adversarial::AdversarialBuffers;
use metrics::EvalReport;
use mpl::MplRun;
use step::{next_micro, touched_rows, Pass, StepInputs, Stepper, StrongView, TableAcc};

/// Where to start from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// From scratch; an output directory with checkpoints is refused.
    No,
    /// From the newest complete checkpoint of the output directory, if any.
    Auto,
    /// From this checkpoint directory.
    From(PathBuf),
}

/// The directory `--resume DIR` names, refused when it is a file (naming its checkpoint,
/// where it lies in one) or missing (naming what `--resume` takes).
pub fn resume_dir(dir: &Path) -> Result<PathBuf> {
    if dir.is_file() {
        return Err(Error::bad_file(
            dir,
            format!(
                "--resume takes a checkpoint directory, and this is a file{}",
                dir.parent()
                    .filter(|d| d.join(checkpoint::DONE).is_file())
                    .map_or(String::new(), |d| format!(": give its checkpoint, {}", d.display()))
            ),
        ));
    }
    if !dir.exists() {
        return Err(Error::bad_file(
            dir,
            "--resume takes `auto`, `no` or a checkpoint directory, and there is no such directory",
        ));
    }
    Ok(dir.to_owned())
}

/// Options of one `train` call that are not part of the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub resume: Resume,
    /// Show the progress bar (rank 0, on a terminal).
    pub progress: bool,
    /// Stop after this step as if interrupted (after its checkpoint, if one is due).
    /// For tests of resume.
    pub stop_after: Option<u64>,
    /// Where the steps run (`--device`).
    pub device: Device,
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: u64,
    pub final_checkpoint: PathBuf,
    pub val: Option<EvalReport>,
    pub test: Option<EvalReport>,
    /// The metrics of the Mean Teacher and of EMA/SWA weights, those the run keeps.
    pub shadows: Vec<ShadowReport>,
    /// Training throughput: token ids per second of training steps (forward, backward,
    /// update; evaluation and checkpoints excluded).
    pub tokens_per_s: f64,
    pub seconds: f64,
    /// The step the run started from: 0, or the resumed checkpoint's (equal to `steps` when
    /// the run had already finished and nothing was trained).
    pub resumed_at: u64,
    /// The backend the steps ran on (`cpu`, `cuda:0`: [`crate::backend::Backend::name`]).
    pub backend: String,
}

/// The validation and test metrics of one shadow copy of the weights.
#[derive(Debug, Clone)]
pub struct ShadowReport {
    /// `teacher`, `ema` or `swa`.
    pub name: String,
    pub val: Option<EvalReport>,
    pub test: Option<EvalReport>,
}

/// A shadow copy of the weights that a run keeps: the Mean Teacher, or EMA/SWA weights.
struct Kept<B: Backend> {
    name: &'static str,
    file: checkpoint::Weights,
    shadow: Shadow<B>,
    last_alpha: Option<f64>,
    report: ShadowReport,
}

/// The loss of a config.
pub fn loss_kind(cfg: &TrainConfig) -> LossKind {
    match cfg.loss.kind {
        LossName::Ce => LossKind::CrossEntropy { smoothing: cfg.loss.label_smoothing },
        LossName::Focal => LossKind::Focal { gamma: cfg.loss.focal_gamma },
    }
}

/// `metrics.jsonl`, written by rank 0 alone (other ranks hold a log that writes nothing).
struct MetricsLog {
    file: Option<std::fs::File>,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `metrics.jsonl`, keeping only records up to `keep_until` (those a resumed run
    /// does not repeat), the final test record excepted.
    fn open(path: &Path, keep_until: u64) -> Result<Self> {
        // Records up to the resumed step, except the final test record, which the resumed
        // run writes again.
        let file = crate::fsutil::reopen_metrics(path, "step", |s, v| {
            s <= keep_until && v.get("split").and_then(|s| s.as_str()) != Some("test")
        })?;
        Ok(MetricsLog { file: Some(file), path: path.to_owned() })
    }

    /// The log of a rank other than 0.
    fn none(path: &Path) -> Self {
        MetricsLog { file: None, path: path.to_owned() }
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        match &mut self.file {
            Some(f) => crate::fsutil::append_record(f, &value, &self.path),
            None => Ok(()),
        }
    }
}

/// A hash of the config fields that shape the training trajectory. Where files go, how
/// often to log or checkpoint (unless a lazily updated shadow table makes the checkpoint
/// cadence count), the evaluation batch size, and where pretrained encoders and embeddings
/// lie (a resumed run reads its weights from the checkpoint) are left out, so a run can be
/// moved or re-tuned in those respects and still resume.
pub fn trajectory_hash(cfg: &TrainConfig) -> u64 {
    xxh3_64(trajectory_config(cfg).as_bytes())
}

/// The pretrained paths [`trajectory_text`] blanks: checkpoints hold the hash of the
/// config of their day, so a resume accepts each earlier definition too.
#[derive(Clone, Copy)]
enum Blanked {
    /// None (checkpoints written before 2026-12-06).
    Nothing,
    /// The pretrained encoders' directories (before 2026-12-07).
    Encoders,
    /// Those and the pretrained embeddings of `init_from` (now).
    EncodersAndEmbeddings,
}

/// Whether `hash` is the trajectory hash of `cfg` under any definition checkpoints hold.
fn trajectory_matches(cfg: &TrainConfig, hash: u64) -> bool {
    [Blanked::EncodersAndEmbeddings, Blanked::Encoders, Blanked::Nothing]
        .into_iter()
        .any(|b| xxh3_64(trajectory_text(cfg, b).as_bytes()) == hash)
}

/// The config as [`trajectory_hash`] hashes it (paths and cadences that do not shape the
/// trajectory blanked), as JSON text: each checkpoint keeps it as `config.json`, so that a
/// resume under another config can name the fields that differ.
pub fn trajectory_config(cfg: &TrainConfig) -> String {
    trajectory_text(cfg, Blanked::EncodersAndEmbeddings)
}

/// [`trajectory_config`], with the pretrained paths `blank` says blanked.
fn trajectory_text(cfg: &TrainConfig, blank: Blanked) -> String {
    let mut c = cfg.clone();
    // A resumed run takes its weights and shape from the checkpoint, not from the
    // pretrained directory or embeddings: they may move.
    for m in std::iter::once(&mut c.model).chain(c.mpl.teacher.as_mut()) {
        if !matches!(blank, Blanked::Nothing) {
            m.encoder.pretrained = m.encoder.pretrained.take().map(|_| PathBuf::new());
        }
        if matches!(blank, Blanked::EncodersAndEmbeddings) {
            m.init_from = m.init_from.take().map(|_| PathBuf::new());
        }
    }
    c.train.out_dir = PathBuf::new();
    c.train.log_every = 0;
    if !lazy_shadow_table(cfg) {
        // With a lazily updated teacher or averaged table, a checkpoint brings every row up
        // to date (a different rounding from catching rows up when next touched), so the
        // cadence shapes the trajectory; otherwise it does not.
        c.train.checkpoint_every = 0;
    }
    c.train.keep_checkpoints = 0;
    c.train.eval_batch_size = 0;
    c.dist = crate::dist::DistConfig::default();
    // The data is identified by its manifest checksum (in the state), not by its path; so
    // is Noisy Student's logits file (by its contents' checksum).
    c.data.dir = PathBuf::new();
    c.noisy_student.logits = c.noisy_student.logits.map(|_| PathBuf::new());
    c.mpl.logits = c.mpl.logits.map(|_| PathBuf::new());
    c.mpl.train_logits = c.mpl.train_logits.map(|_| PathBuf::new());
    serde_json::to_string(&c).expect("config serialises")
}

/// Whether the run keeps a shadow of the embedding table whose rows are updated lazily
/// (a bag model's Mean Teacher or EMA/SWA weights with `lazy_table`).
fn lazy_shadow_table(cfg: &TrainConfig) -> bool {
    cfg.model.kind == crate::config::ModelKind::Bag
        && ((cfg.method == crate::algo::Method::MeanTeacher && cfg.mean_teacher.lazy_table)
            || (cfg.average.kind != crate::algo::AverageKind::None && cfg.average.lazy_table))
}

/// The bag model `m` describes, on the data set of `manifest`.
fn bag_spec(m: &crate::config::ModelConfig, manifest: &crate::data::manifest::Manifest) -> BagSpec {
    BagSpec {
        buckets: manifest.tokenizer.buckets as usize,
        dim: m.dim,
        hidden: m.hidden.clone(),
        activation: m.activation,
        embed_dropout: m.embed_dropout,
        hidden_dropout: m.hidden_dropout,
        classes: manifest.labels.len(),
    }
}

/// The classifier `m` describes on the data set of `manifest`, and its initial parameters
/// from `seed`: a bag model, or an encoder (its pretrained weights loaded, the head fresh).
/// `claim` sees the model before its parameters are allocated (except a pretrained
/// encoder's, read first: its shape comes from them) and may refuse it. `section` is `m`'s
/// config table, for messages. `resumed` is the model of the checkpoint a run resumes
/// from: a pretrained encoder takes its shape from it instead of reading its directory, and
/// is claimed before its parameters are allocated (the checkpoint's replace them).
fn build_model(
    m: &crate::config::ModelConfig,
    section: &str,
    manifest: &crate::data::manifest::Manifest,
    seed: u64,
    resumed: Option<crate::model::ModelSpec>,
    claim: impl FnOnce(&Model) -> Result<()>,
) -> Result<(Model, Vec<f32>)> {
    use crate::model::encoder::{Encoder, EncoderSpec};
    if manifest.labels.len() > crate::model::MAX_CLASSES {
        return Err(Error::config(
            "train",
            "data.dir",
            format!(
                "the data set has {} classes; a model has at most {} (2^20)",
                manifest.labels.len(),
                crate::model::MAX_CLASSES
            ),
        ));
    }
    if m.kind == crate::config::ModelKind::Bag {
        let spec = bag_spec(m, manifest);
        // What a checkpoint's reader checks, checked before anything is written.
        spec.validate().map_err(|msg| Error::config("train", section, msg))?;
        let model = Model::Bag(crate::model::bag::BagModel::new(spec));
        claim(&model)?;
        let params = model.init(seed);
        return Ok((model, params));
    }
    let e = &m.encoder;
    let Some(sw) = &manifest.tokenizer.subword else {
        return Err(Error::config(
            "train",
            format!("{section}.kind"),
            "an encoder reads subword ids: prepare the data with --set tokenizer.subword.path=models/minilm/tokenizer.json",
        ));
    };
    let classes = manifest.labels.len();
    let vocab = manifest.tokenizer.buckets as usize;
    let (spec, params) = match &e.pretrained {
        Some(dir) => {
            // A resumed run's shape comes from its checkpoint (with this config's pooling and
            // data set's classes, so that the resume check names a change), and its
            // parameters, replaced by the checkpoint's, are allocated after the claim.
            let (mut spec, params, source) = match resumed {
                Some(crate::model::ModelSpec::Encoder(mut spec)) => {
                    (spec.pooling, spec.classes) = (e.pooling, classes);
                    (spec, None, "the resumed checkpoint's encoder".to_string())
                }
                _ => {
                    crate::model::encoder::check_tokenizer(dir, sw).map_err(|err| {
                        Error::config("train", format!("{section}.encoder.pretrained"), err.to_string())
                    })?;
                    let (enc, params) =
                        crate::model::encoder::load_pretrained(dir, classes, e.pooling, seed)?;
                    (enc.spec, Some(params), dir.display().to_string())
                }
            };
            if let Some(why) = spec.uncovered(manifest.tokenizer.buckets, sw) {
                return Err(Error::config(
                    "train",
                    format!("{section}.encoder.pretrained"),
                    format!("{source} {why}"),
                ));
            }
            spec.dropout = e.dropout.unwrap_or(spec.dropout);
            spec.attention_dropout = e.attention_dropout.unwrap_or(spec.attention_dropout);
            spec.recompute = e.recompute;
            (spec, params)
        }
        None => {
            let spec = EncoderSpec {
                vocab,
                hidden: e.hidden,
                layers: e.layers,
                heads: e.heads,
                intermediate: e.intermediate,
                max_positions: sw.max_len as usize,
                type_vocab: 2,
                layer_norm_eps: 1e-12,
                activation: crate::backend::Activation::GeluErf,
                pre_ln: e.pre_ln,
                pooling: e.pooling,
                classes,
                dropout: e.dropout.unwrap_or(0.1),
                attention_dropout: e.attention_dropout.unwrap_or(0.1),
                recompute: e.recompute,
            };
            spec.validate().map_err(|(f, msg)| {
                // The vocabulary and positions come from the data set's tokenizer.
                let field = match f {
                    "vocab" => "the data set's tokenizer.buckets".to_string(),
                    "max_positions" => "the data set's tokenizer.subword.max_len".to_string(),
                    f => format!("{section}.encoder.{f}"),
                };
                Error::config("train", field, msg)
            })?;
            let enc = Encoder::new(spec.clone());
            claim(&Model::Encoder(enc.clone()))?;
            let params = enc.init(seed);
            return Ok((Model::Encoder(enc), params));
        }
    };
    let model = Model::Encoder(Encoder::new(spec));
    claim(&model)?;
    let params = params.unwrap_or_else(|| model.init(seed));
    Ok((model, params))
}

/// Claims in `acc` the activations of an encoder's `passes` (rows on this rank, and
/// whether a backward pass reads them), at their peak: every sequence `len` tokens long
/// ([`EncoderSpec::activation_bytes`]). A bag model's activations are small beside its
/// table and are not counted; on a device nothing is (device memory is not checked).
///
/// [`EncoderSpec::activation_bytes`]: crate::model::encoder::EncoderSpec::activation_bytes
fn claim_activations(
    acc: &mut Account,
    who: &str,
    model: &Model,
    len: usize,
    passes: &[(usize, bool)],
) -> Result<()> {
    let Model::Encoder(enc) = model else { return Ok(()) };
    if !acc.on_host || passes.is_empty() {
        return Ok(());
    }
    let bytes =
        passes.iter().map(|&(rows, bw)| model.activation_bytes(rows, len, bw)).fold(0, u64::saturating_add);
    let rows: Vec<String> = passes
        .iter()
        .map(|&(rows, bw)| format!("{rows}{}", if bw { "" } else { " (no backward)" }))
        .collect();
    let recompute = if enc.spec.recompute {
        String::new()
    } else {
        "; set model.encoder.recompute = true (each layer keeps only its input for the backward pass)".into()
    };
    acc.budget.add(
        format!("{who}'s activations (passes of {} sequences × {len} tokens)", rows.join(", ")),
        bytes,
        "train.batch_size",
        format!(
            "lower train.batch_size (raise optim.grad_accum to keep the step's batch), unlabeled.ratio or \
             train.eval_batch_size{recompute}; or prepare the data with a smaller tokenizer.subword.max_len"
        ),
    );
    acc.budget.check()
}

/// A run's memory account, which each model it trains joins ([`claim_training`]).
struct Account<'a> {
    budget: &'a mut crate::hostmem::Budget,
    /// Whether the backend's buffers live in host memory (the CPU).
    on_host: bool,
    /// The ranks: with several, each gradient has a send copy for MPI.
    world: usize,
}

/// Claims in `acc` the buffers of parameter size that training `model` keeps: its
/// parameters, optimizer moments (`optim`, from config table `optim_field`), its
/// dense-gradient buffers (the step's, one per name in `more_gradients`, and MPI's send
/// copy), and the shadow copies `shadows` (each a name, the config field that asks for it
/// and what to do about it). `who` names the model and `section` its config table. On a
/// device only the host copy of the parameters, held while they are uploaded, is checked,
/// and not kept in the account: device memory is not checked.
#[allow(clippy::too_many_arguments)]
fn claim_training(
    acc: &mut Account,
    who: &str,
    section: &str,
    model: &Model,
    optim: &crate::optim::OptimConfig,
    optim_field: &str,
    more_gradients: &[&str],
    shadows: &[(&str, &str, &str)],
) -> Result<()> {
    let budget = &mut *acc.budget;
    const F32: u64 = 4;
    let total = model.layout().total() as u64 * F32;
    // A bag model's size is its table's, unless wide hidden layers outweigh it.
    let table_rules = model.table().len() as u64 * F32 * 2 >= total;
    let (sized_by, shrink) = match model {
        Model::Bag(_) if table_rules => (
            format!("{section}.dim"),
            format!(
                "lower {section}.dim, or prepare the data with fewer tokenizer.buckets (the embedding table holds buckets × dim values)"
            ),
        ),
        Model::Bag(_) => (format!("{section}.hidden"), format!("fewer or narrower {section}.hidden layers")),
        Model::Encoder(_) => {
            (format!("{section}.encoder"), format!("choose a smaller encoder in {section}.encoder"))
        }
    };
    if !acc.on_host {
        budget.claim(format!("{who}'s parameters"), total, &sized_by, &shrink)?;
        budget.release_last();
        return Ok(());
    }
    budget.add(format!("{who}'s parameters"), total, &sized_by, &shrink);
    let (m, v) = crate::optim::moment_lens(optim, model.layout(), model.table());
    if m + v > 0 {
        // As `moment_lens` decides: lazy Adam keeps moments over the whole layout, else the
        // dense tensors' optimizer over them (SGD's momentum, Adam's and LAMB's moments).
        let table_moments = optim.table == crate::optim::TableOptim::SparseAdam;
        let f = optim_field;
        let (field, remedy) = if model.bag().is_some() && table_moments && table_rules {
            (format!("{f}.table"), format!("{f}.table = \"sgd\" keeps no moments for the embedding table"))
        } else {
            let table = if table_moments { format!(" and {f}.table = \"sgd\"") } else { String::new() };
            (format!("{f}.kind"), format!("{f}.kind = \"sgd\" with {f}.momentum = 0{table} keeps no moments"))
        };
        let remedy = format!("{remedy}; or {shrink}");
        budget.add(format!("{who}'s optimizer moments"), (m + v) as u64 * F32, field, remedy);
    }
    let mut gradients = vec!["the step's"];
    gradients.extend_from_slice(more_gradients);
    if acc.world > 1 {
        gradients.push("MPI's send copy");
    }
    let grads = model.dense_len() as u64 * F32 * gradients.len() as u64;
    let what = format!("{who}'s gradient buffers ({})", gradients.join(", "));
    budget.add(what, grads, &sized_by, &shrink);
    for &(name, field, remedy) in shadows {
        budget.add(name, total, field, format!("{remedy}; or {shrink}"));
    }
    budget.check()
}

/// The optimizer's settings for `model` (the student's, or MPL's teacher's): `optim`, with
/// an encoder's layer-wise decay `decay` (its `encoder.layer_lr_decay`) folded into the
/// learning-rate multipliers (one entry per tensor, the exact name being the longest
/// prefix, times the multiplier `optim` gives that tensor).
fn optim_config(optim: &crate::optim::OptimConfig, decay: f64, model: &Model) -> crate::optim::OptimConfig {
    let mut o = optim.clone();
    if let (Model::Encoder(enc), true) = (model, decay != 1.0) {
        for (name, m) in enc.layer_decay(decay) {
            let user = optim.mult(&name);
            o.lr_mult.insert(name, user * m);
        }
    }
    o
}

/// Refuses a learning-rate multiplier (`{field}.lr_mult.<prefix>`) that names none of the
/// tensors of `layout`.
fn check_lr_mult(
    optim: &crate::optim::OptimConfig,
    field: &str,
    layout: &crate::model::params::Layout,
) -> Result<()> {
    let tensors = layout.tensors();
    for prefix in optim.lr_mult.keys() {
        if !tensors.iter().any(|t| t.name.starts_with(prefix.as_str())) {
            let names: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
            return Err(Error::config(
                "train",
                format!("{field}.lr_mult.{prefix}"),
                format!("matches no tensor; the tensors are {}", names.join(", ")),
            ));
        }
    }
    Ok(())
}

/// What a checkpoint of `model` records about it to classify raw text.
fn model_meta(model: &Model, manifest: &crate::data::manifest::Manifest) -> ModelMeta {
    let spec = model.spec();
    ModelMeta {
        format: spec.format().into(),
        model: spec,
        labels: manifest.labels.clone(),
        tokenizer: manifest.tokenizer.clone(),
    }
}

/// Loads pretrained embeddings (`{section}.init_from`) into the table of `params`, printing
/// a line about it with `report`; errors name the field.
fn init_table(
    path: &Path,
    manifest: &crate::data::manifest::Manifest,
    model: &crate::model::bag::BagModel,
    params: &mut [f32],
    section: &str,
    report: bool,
) -> Result<()> {
    let field = |e: Error| Error::config("train", format!("{section}.init_from"), e.to_string());
    let emb = crate::pretrain::embeddings::read(path).map_err(field)?;
    let s = emb
        .init_table(&manifest.tokenizer, model.spec.dim, &mut params[model.table.range()])
        .map_err(field)?;
    if report {
        eprintln!(
            "{section}.init_from {}: {} rows of {} pretrained words loaded{}",
            path.display(),
            s.rows,
            s.words,
            if s.composed { " (word rows composed: the character n-gram ranges differ)" } else { "" }
        );
    }
    Ok(())
}

/// Trains a bag model as `cfg` says, in this process alone.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainReport> {
    train_on(cfg, opts, &Dist::alone(&cfg.dist))
}

/// Trains one model on the ranks of `dist` (every rank calls it with the same config):
/// each rank reads the data shards it owns, gradients and the statistics a method needs
/// are averaged or summed over ranks, rank 0 prints and writes the shared files. The
/// steps run on `opts.device`; `cuda` without a device number takes the rank's local
/// rank.
pub fn train_on(cfg: &TrainConfig, opts: &RunOptions, dist: &Dist) -> Result<TrainReport> {
    struct Job<'a>(&'a TrainConfig, &'a RunOptions, &'a Dist);
    impl OnBackend for Job<'_> {
        type Out = TrainReport;
        fn run<B: EncoderOps<F = f32>>(self, be: &B) -> Result<TrainReport> {
            train_on_worker(be, self.0, self.1, self.2)
        }
    }
    let say = opts.progress && dist.is_root();
    dispatch_with(opts.device, dist.local_rank(), say, cfg.train.matmul, Job(cfg, opts, dist))
}

/// Warnings for settings that cannot do what they say on this data: a batch (with its
/// accumulation) larger than the `n_train` training documents reads documents more than
/// once a step; reduce-on-plateau without a val split (`n_val` documents) never acts.
fn data_warnings(cfg: &TrainConfig, n_train: u64, n_val: u64) -> Vec<String> {
    let mut out = Vec::new();
    let rows = cfg.train.batch_size as u64 * u64::from(cfg.optim.grad_accum);
    if rows > n_train {
        out.push(format!(
            "train.batch_size {} × optim.grad_accum {} is {rows} documents a step, more than the training split's {n_train}: \
             a step reads documents more than once, and a run of train.epochs passes over them more often than that",
            cfg.train.batch_size, cfg.optim.grad_accum
        ));
    }
    if cfg.schedule.plateau_patience > 0 && n_val == 0 {
        out.push(
            "schedule.plateau_patience is set, but the data set has no val split to watch: the learning rate is never lowered"
                .into(),
        );
    }
    out
}

/// A warning when the consistency weight's ramp-up outlasts the run of `total` steps, so
/// that the weight never reaches its maximum (a ramp is accepted: a short trial run of a
/// long schedule is a normal thing to do).
fn ramp_warning(recipe: &crate::algo::Recipe, ramp: &ramp::Ramp, total: u64) -> Option<String> {
    // The ramp is not shifted by a delay (`Ramp::factor`): it peaks at step up_steps.
    if recipe.weight == 0.0 || total == 0 || (ramp.up_steps <= total && ramp.delay_steps < total) {
        return None;
    }
    Some(format!(
        "consistency.ramp_epochs = {} ({} steps) outlasts the run's {total} steps: the consistency weight ends at {:.2} of its maximum",
        recipe.ramp_epochs,
        ramp.up_steps,
        ramp.factor(total - 1)
    ))
}

/// A warning when SWA's average over a run of `total` steps holds a single snapshot (its
/// interval outlasts the rest of the run): the "swa" weights are then the student's at
/// that step, not an average.
fn swa_warning(average: &crate::algo::AverageConfig, total: u64, steps_per_epoch: u64) -> Option<String> {
    let Some(crate::algo::shadow::AlphaRule::Swa { start, every }) = average.rule(total, steps_per_epoch)
    else {
        return None;
    };
    let snapshots = if total >= start { 1 + (total - start) / every } else { 0 };
    (snapshots <= 1).then(|| {
        format!(
            "SWA averages every {every} steps (average.swa_every{}) from step {start} (average.swa_start = {}): the run's \
             {total} steps give it {snapshots} snapshot{}, so the \"swa\" weights are no average; lower average.swa_every \
             or average.swa_start",
            if average.swa_every == 0 { " = 0: once per epoch" } else { "" },
            average.swa_start,
            if snapshots == 1 { "" } else { "s" }
        )
    })
}

/// A warning when the snapshot checkpoints of `cycles` cosine cycles, never pruned, each of
/// at least `weights` bytes, cannot fit in the `free` bytes of the run's file system.
fn snapshot_warning(cycles: u32, weights: u64, free: u64) -> Option<String> {
    let need = u64::from(cycles).saturating_mul(weights);
    let gb = |b: u64| b as f64 / 1e9;
    (need > free).then(|| {
        format!(
            "schedule.cycles = {cycles} keeps a snapshot checkpoint per cycle (never pruned), each with the {:.2} GB of \
             the weights at least: {:.1} GB or more, and train.out_dir's file system has {:.1} GB free; the run will \
             stop when it is full (what was written stays). Use fewer cycles, or delete snapshots as they come",
            gb(weights),
            gb(need),
            gb(free)
        )
    })
}

/// Refuses schedules longer than the run of `total` steps, which would leave it nothing of
/// what they schedule: a warm-up that never reaches the full learning rate, cosine cycles of
/// under one step each (and a snapshot checkpoint for every one), a ramp-down of
/// `down_steps` that starts before the first step.
fn check_schedule_lengths(cfg: &TrainConfig, total: u64, down_steps: u64) -> Result<()> {
    let s = &cfg.schedule;
    let refuse = |field: &str, msg: String| Err(Error::config("train", field, msg));
    if s.warmup_steps > 0 && s.warmup_steps >= total {
        return refuse(
            "schedule.warmup_steps",
            format!("{} leaves no step of the run's {total} at the full learning rate", s.warmup_steps),
        );
    }
    let after_warmup = total - s.warmup_steps;
    if u64::from(s.cycles) > after_warmup {
        return refuse(
            "schedule.cycles",
            format!(
                "{} cycles do not fit the run's {after_warmup} steps after warm-up (one step each at least)",
                s.cycles
            ),
        );
    }
    if down_steps > total {
        return refuse(
            "consistency.rampdown_epochs",
            format!(
                "a ramp-down of {:?} epochs ({}) is longer than the run's {total} steps",
                cfg.consistency.rampdown_epochs,
                if down_steps == u64::MAX {
                    "past 2^64 steps".to_string()
                } else {
                    format!("{down_steps} steps")
                }
            ),
        );
    }
    Ok(())
}

/// The sums of a logging window over ranks. Every rank adds its own rows' counts and sums,
/// and 1/W of each per-step mean, so the sum over ranks is the global window; the step
/// counters (steps, MPL steps, adversarial passes) are the same on every rank. The class
/// counts are padded to `classes` first, as a rank may not have seen the highest class.
fn window_sum(win: &LogWindow, dist: &Dist, classes: usize) -> LogWindow {
    if dist.world() == 1 {
        return win.clone();
    }
    let w = win;
    let mut v = vec![
        w.loss_sum,
        w.sup_sum,
        w.docs as f64,
        w.correct as f64,
        w.tokens as f64,
        w.cons_sum,
        w.cons_rows as f64,
        w.passed as f64,
        w.mpl_h,
        w.mpl_h_used,
        w.mpl_ce_old,
        w.mpl_ce_new,
        w.mpl_pseudo,
        w.mpl_teacher_ce,
        w.mpl_uda,
        w.mpl_teacher_docs as f64,
        w.mpl_teacher_correct as f64,
        w.adv_sum,
        w.tsa_rows as f64,
        w.tsa_dropped as f64,
        w.pl_rows as f64,
        w.pl_correct as f64,
        w.pl_passed as f64,
        w.pl_passed_correct as f64,
    ];
    let sums = v.len();
    v.extend(w.pl_classes.iter().map(|&c| c as f64));
    v.resize(sums + classes.max(w.pl_classes.len()), 0.0);
    dist.sum("the metrics window", &mut v);
    let n = |x: f64| x.round() as u64;
    LogWindow {
        loss_sum: v[0],
        sup_sum: v[1],
        docs: n(v[2]),
        correct: n(v[3]),
        tokens: n(v[4]),
        cons_sum: v[5],
        cons_rows: n(v[6]),
        passed: n(v[7]),
        steps: w.steps,
        mpl_h: v[8],
        mpl_h_used: v[9],
        mpl_ce_old: v[10],
        mpl_ce_new: v[11],
        mpl_pseudo: v[12],
        mpl_teacher_ce: v[13],
        mpl_uda: v[14],
        mpl_teacher_docs: n(v[15]),
        mpl_steps: w.mpl_steps,
        mpl_teacher_correct: n(v[16]),
        adv_sum: v[17],
        adv_count: w.adv_count,
        tsa_rows: n(v[18]),
        tsa_dropped: n(v[19]),
        pl_rows: n(v[20]),
        pl_correct: n(v[21]),
        pl_passed: n(v[22]),
        pl_passed_correct: n(v[23]),
        pl_classes: v[sums..].iter().map(|&c| n(c)).collect(),
    }
}

/// The commonest class of a window's pseudo-labels and its share of them, if any.
fn top_class_share(counts: &[u64]) -> Option<(usize, f64)> {
    let total: u64 = counts.iter().sum();
    let (top, &most) = counts.iter().enumerate().max_by_key(|&(c, &n)| (n, std::cmp::Reverse(c)))?;
    (total > 0).then(|| (top, most as f64 / total as f64))
}

/// Whether a window's top-class share of pseudo-labels signals a collapse: at least 90% on
/// one class, and at least halfway from the labeled set's largest class share to 1, so
/// that a pool as skewed as its labels is not flagged (`labeled`: documents per class).
fn collapsing(labeled: &[u64], share: f64) -> bool {
    let total = labeled.iter().sum::<u64>().max(1) as f64;
    let largest = labeled.iter().copied().max().unwrap_or(0) as f64 / total;
    share >= 0.9f64.max((1.0 + largest) / 2.0)
}

/// What the collapse warning suggests, by where the pseudo-labels come from and what the
/// run already has on (a stabiliser already on is not suggested again): with no
/// consistency target they are VAT's (its clean pass's argmax on the unlabeled rows).
/// Returns the term's name and the remedies.
fn collapse_remedies(recipe: &crate::algo::Recipe) -> (&'static str, String) {
    match recipe.target {
        // MPL's pseudo-labels are its teacher's, which takes no stabilisers; reduced MPL's
        // teacher (over exported logits) has no UDA term: its consistency.weight is 0.
        _ if recipe.method == crate::algo::Method::MplReduced => (
            "teacher's pseudo-labelling",
            "mpl.label_smoothing or mpl.pseudo_labels = \"sampled\", a lower mpl.teacher_optim.lr, or a shorter run".into(),
        ),
        TargetSource::WeakView if recipe.method.is_mpl() => (
            "teacher's pseudo-labelling",
            "mpl.label_smoothing or mpl.pseudo_labels = \"sampled\", a lower consistency.weight (the teacher's UDA term), or a shorter run".into(),
        ),
        TargetSource::WeakView => {
            let mut r = Vec::new();
            if !recipe.distribution_alignment {
                r.push("consistency.distribution_alignment = true".to_string());
            } else if recipe.stabiliser_momentum > 0.9 {
                r.push(format!(
                    "a lower consistency.stabiliser_momentum than {} (alignment then follows the predictions within tens of steps; 0.9 was chosen on Brown)",
                    recipe.stabiliser_momentum
                ));
            }
            r.push(
                match recipe.adaptive_threshold {
                    AdaptiveThreshold::Fixed => "a higher or adaptive consistency.threshold",
                    AdaptiveThreshold::Flexmatch => {
                        "another consistency.adaptive_threshold (FlexMatch passes every row until rows are predicted confidently)"
                    }
                    AdaptiveThreshold::Freematch => {
                        "another consistency.adaptive_threshold (FreeMatch's threshold starts at 1/C, which passes nearly every row)"
                    }
                }
                .to_string(),
            );
            r.push(format!("a lower consistency.weight than {}", recipe.weight));
            r.push("a shorter run".to_string());
            ("consistency term", r.join(", "))
        }
        TargetSource::None => {
            ("VAT term", "a lower adversarial.weight or adversarial.epsilon, or a shorter run".into())
        }
        _ => ("consistency term", "a lower consistency.weight or a shorter run".into()),
    }
}

/// A restored (global) logging window as rank `rank` continues it: rank 0 keeps the sums,
/// every rank keeps the step counters.
fn window_share(win: LogWindow, rank: usize) -> LogWindow {
    if rank == 0 {
        win
    } else {
        LogWindow {
            steps: win.steps,
            mpl_steps: win.mpl_steps,
            adv_count: win.adv_count,
            ..Default::default()
        }
    }
}

/// Sums every shard's cursors over ranks: each rank holds the cursors of the shards it
/// owns, the others at zero.
fn cursors_sum(cursors: &[crate::data::loader::Cursor], dist: &Dist) -> Vec<crate::data::loader::Cursor> {
    let mut v: Vec<u64> = cursors.iter().flat_map(|c| [c.epoch, c.pos]).collect();
    dist.sum("the loaders' cursors", &mut v);
    v.chunks(2).map(|c| crate::data::loader::Cursor { epoch: c[0], pos: c[1] }).collect()
}

fn train_on_worker<B: EncoderOps<F = f32>>(
    be: &B,
    cfg: &TrainConfig,
    opts: &RunOptions,
    dist: &Dist,
) -> Result<TrainReport>
where
    Dist: GradSync<B>,
{
    let started = Instant::now();
    // The memory this node's ranks share, read before any of them allocates.
    let mut budget = crate::hostmem::Budget::new("train", dist.local_size())?;
    let ds = Dataset::open(&cfg.data.dir)?;
    let manifest = ds.manifest();
    let p = manifest.num_shards as usize;
    let t = &cfg.train;
    let (rank, world) = (dist.rank(), dist.world());
    let root = dist.is_root();
    let progress = opts.progress && root;
    // Every rank must run the same binary on the same config and data.
    let config_json = serde_json::to_string(cfg).expect("config serialises");
    dist.check_job(&config_json, &manifest.checksum)?;
    for section in cfg.unread_sections() {
        if root {
            let reader = match section {
                "adversarial" => "adversarial.kind = \"none\"".to_string(),
                _ => format!("method = {:?}", cfg.method.name()),
            };
            eprintln!(
                "warning: [{section}] is set, but {reader} does not read it: its settings have no effect"
            );
        }
    }
    for (field, why) in cfg.ignored_fields().into_iter().filter(|_| root) {
        eprintln!("warning: {field} is set, but this run does not read it ({why}): it has no effect");
    }
    if p % world != 0 {
        return Err(Error::Data(format!(
            "{} has {p} shards, which {world} ranks cannot share equally: run on a world size that divides {p}, \
             or prepare the data with a shard count that {world} divides (--shards)",
            cfg.data.dir.display()
        )));
    }
    let owned = crate::dist::owned_shards(p, rank, world);
    // The shards this rank trains on, and every evaluation shard.
    ds.verify_payloads(|split, i| matches!(split, SplitKind::Val | SplitKind::Test) || owned.contains(&i))?;
    if t.batch_size % p != 0 {
        return Err(Error::config(
            "train",
            "train.batch_size",
            format!("{} is not a multiple of the data set's {p} shards (each shard gives batch_size/{p} rows per step)", t.batch_size),
        ));
    }
    let n_train = manifest.splits["train"].docs;
    if n_train == 0 {
        return Err(Error::Data(format!("{}: the train split is empty", cfg.data.dir.display())));
    }
    // The buffers of parameter size are claimed against the memory this node's ranks share
    // before any is allocated. A CPU buffer lives in host memory.
    let on_host = be.is_host();
    let mut shadow_claims = Vec::new();
    if cfg.recipe().target == TargetSource::Teacher {
        shadow_claims.push(("the Mean Teacher", "method", "a Mean Teacher keeps a copy of every parameter"));
    }
    if cfg.average.kind != crate::algo::AverageKind::None {
        shadow_claims.push((
            "the averaged weights",
            "average.kind",
            "average.kind = \"none\" keeps no averaged copy",
        ));
    }
    let mut gradients = Vec::new();
    if cfg.adversarial.kind != AdversarialKind::None {
        gradients.push("the adversarial passes'");
    }
    if cfg.method.is_mpl() {
        gradients.push("MPL's student step's");
    }
    let ckpt_root = t.out_dir.join("checkpoints");
    crate::fsutil::check_run_dir_place("train", "train.out_dir", &t.out_dir)?;
    // Held to the run's end: no second run reads or writes this directory meanwhile.
    let _lock = dist.lock_run_dir(&t.out_dir, "train.out_dir")?;
    let resume_from = match &opts.resume {
        Resume::No => {
            if checkpoint::latest(&ckpt_root)?.is_some() {
                return Err(Error::bad_file(
                    &ckpt_root,
                    "holds checkpoints of an earlier run: pass --resume auto to continue it, or choose another train.out_dir",
                ));
            }
            let metrics = t.out_dir.join("metrics.jsonl");
            if std::fs::metadata(&metrics).is_ok_and(|m| m.len() > 0) {
                return Err(Error::bad_file(
                    &metrics,
                    "holds the metrics of an earlier run (it left no complete checkpoint): remove it, pass --resume auto to start again over it, or choose another train.out_dir",
                ));
            }
            None
        }
        Resume::Auto => {
            let latest = checkpoint::latest(&ckpt_root)?;
            if latest.is_none() {
                // Starting over rewrites metrics.jsonl: not another command's run.
                crate::fsutil::check_no_earlier_outputs(
                    "train",
                    "train.out_dir",
                    &t.out_dir,
                    &[
                        crate::pretrain::embeddings::EMBEDDINGS_FILE,
                        crate::pretrain::embeddings::WORDS_FILE,
                        "encoder",
                    ],
                    "it is a pretraining's directory: choose another train.out_dir",
                )?;
                crate::fsutil::check_metrics_kind(&t.out_dir.join("metrics.jsonl"), "step", "training's")?;
            }
            if latest.is_none() && progress && ckpt_root.is_dir() {
                eprintln!(
                    "--resume auto: no complete checkpoint in {} (an interrupted one has no DONE marker): starting at step 0",
                    ckpt_root.display()
                );
            }
            latest
        }
        Resume::From(dir) => Some(resume_dir(dir)?),
    };
    dist.check_resume(resume_from.as_deref())?;
    // A resumed run takes its model's shape from the checkpoint, whose weights replace the
    // fresh ones: a pretrained encoder's directory is not read again (it may have moved).
    let resumed = |which| resume_from.as_deref().map(|d| checkpoint::weights_meta(d, which)).transpose();
    let resumed_spec = resumed(checkpoint::Weights::Student)?.map(|m| m.model);
    let mut account = Account { budget: &mut budget, on_host, world };
    let (model, mut host_params) = build_model(&cfg.model, "model", manifest, t.seed, resumed_spec, |m| {
        let optim = optim_config(&cfg.optim, cfg.model.encoder.layer_lr_decay, m);
        let (g, s) = (&gradients, &shadow_claims);
        claim_training(&mut account, "the model", "model", m, &optim, "optim", g, s)
    })?;
    check_lr_mult(&cfg.optim, "optim", model.layout())?;
    let meta = model_meta(&model, manifest);
    let accum = cfg.optim.grad_accum as u64;
    let steps_per_epoch = n_train.div_ceil(t.batch_size as u64 * accum).max(1);
    let total = t.steps.unwrap_or(steps_per_epoch * u64::from(t.epochs));
    let eval_every = if t.eval_every == 0 { steps_per_epoch } else { t.eval_every };
    let ckpt_every = if t.checkpoint_every == 0 { total } else { t.checkpoint_every };
    let config_hash = trajectory_hash(cfg);
    let trajectory_text = trajectory_config(cfg);

    let recipe = cfg.recipe();
    let b_u = t.batch_size * recipe.unlabeled_ratio as usize;
    let n_unlabeled = manifest.splits.get("unlabeled").map_or(0, |s| s.docs);
    if b_u > 0 && n_unlabeled == 0 {
        return Err(Error::config(
            "train",
            "unlabeled.ratio",
            format!(
                "{} reads unlabeled rows, but {} has no unlabeled split (prepare it with unlabeled inputs or split.labels_per_class)",
                recipe.method.name(),
                cfg.data.dir.display()
            ),
        ));
    }
    let down_steps = (recipe.rampdown_epochs * steps_per_epoch as f64).round() as u64;
    check_schedule_lengths(cfg, total, down_steps)?;
    let ramp = recipe.ramp(steps_per_epoch);
    let n_val = manifest.splits.get("val").map_or(0, |s| s.docs);
    for w in data_warnings(cfg, n_train, n_val).into_iter().filter(|_| root) {
        eprintln!("warning: {w}");
    }
    if let Some(w) = ramp_warning(&recipe, &ramp, total).filter(|_| root) {
        eprintln!("warning: {w}");
    }
    if let Some(w) = swa_warning(&cfg.average, total, steps_per_epoch).filter(|_| root) {
        eprintln!("warning: {w}");
    }
    if root && cfg.schedule.cycles > 1 {
        // Each cycle's snapshot checkpoint holds at least the model's weights.
        let weights = model.layout().total() as u64 * 4;
        let free = crate::fsutil::free_bytes(&t.out_dir);
        if let Some(w) = free.and_then(|free| snapshot_warning(cfg.schedule.cycles, weights, free)) {
            eprintln!("warning: {w}");
        }
    }
    let w_max = ramp::scaled_weight(recipe.weight, n_train, n_unlabeled, recipe.scale_by_labeled_ratio);

    let mut opt = Optimizer::new(
        be,
        model.layout(),
        model.table(),
        optim_config(&cfg.optim, cfg.model.encoder.layer_lr_decay, &model),
    );
    // Noisy Student's teacher logits, checked against the unlabeled rows before the loaders
    // mark those shards for random reads (the check may read every row in order).
    let teacher_logits = match (&cfg.noisy_student.logits, recipe.method) {
        (Some(path), Method::NoisyStudent) => {
            let f = open_logits(path, "noisy_student.logits")?;
            f.check_matches(&ds, SplitKind::Unlabeled)?;
            f.advise_random();
            Some(f)
        }
        _ => None,
    };
    let mut loader =
        Loader::new(&ds, SplitKind::Train, t.seed, t.batch_size / p, t.group_by_length, owned.clone())?;
    let mut uloader = if b_u > 0 {
        Some(Loader::new(&ds, SplitKind::Unlabeled, t.seed, b_u / p, t.group_by_length, owned.clone())?)
    } else {
        None
    };
    let mut plateau = Plateau::default();
    let mut step = 0u64;
    let mut win = LogWindow::default();
    // The collapse warning is printed once per process (a resumed run may print it again),
    // from the second labeled epoch on.
    let mut collapse_warned = false;
    let mut restored_stabiliser = None;
    if let (Some(path), None, Some(bag)) = (&cfg.model.init_from, &resume_from, model.bag()) {
        init_table(path, manifest, bag, &mut host_params, "model", progress)?;
    }
    let mut params = be.upload_vec(host_params);
    let layout_len = model.layout().total();
    let classes_n = model.classes();
    // The bag model's table is brought up to date lazily by shadows that ask for it.
    let lazy_table = model.bag().map(|b| b.table);
    // Shadow copies of the weights: the Mean Teacher first (the target of its method), then
    // EMA or SWA weights.
    let mut shadows: Vec<Kept<B>> = Vec::new();
    let kept = |name: &'static str, file, shadow: Shadow<B>| Kept {
        name,
        file,
        shadow,
        last_alpha: None,
        report: ShadowReport { name: name.into(), val: None, test: None },
    };
    if recipe.target == TargetSource::Teacher {
        let mt = &cfg.mean_teacher;
        let rule = AlphaRule::WarmUp { alpha: mt.alpha, late: mt.alpha_late.map(|a| (a, ramp.up_steps)) };
        let lazy = lazy_table.filter(|_| mt.lazy_table);
        shadows.push(kept(
            "teacher",
            checkpoint::Weights::Teacher,
            Shadow::new(be, &params, layout_len, rule, lazy),
        ));
    }
    if let Some(rule) = cfg.average.rule(total, steps_per_epoch) {
        let lazy = lazy_table.filter(|_| cfg.average.lazy_table);
        let shadow = Shadow::new(be, &params, layout_len, rule, lazy);
        shadows.push(kept(cfg.average.name(), checkpoint::Weights::Average, shadow));
    }
    // The bank covers the samples the step reads: the labeled split and, with μ > 0, the
    // unlabeled one.
    let bank_dir = t.out_dir.join(crate::bank::DIR);
    let bank_splits: Vec<SplitKind> =
        if b_u > 0 { vec![SplitKind::Train, SplitKind::Unlabeled] } else { vec![SplitKind::Train] };
    // `restore_from`: a checkpoint, and its step (its sealed bank files must be of it).
    let open_bank = |restore_from: Option<&Path>, at_step: u64| -> Result<Option<Bank>> {
        if recipe.target != TargetSource::Bank {
            return Ok(None);
        }
        let settings =
            BankSettings { classes: classes_n, storage: cfg.temporal.storage, alpha: cfg.temporal.alpha };
        Ok(Some(match restore_from {
            Some(ckpt) => {
                // Each rank restores the files of the shards it owns.
                let names: Vec<String> = bank_splits
                    .iter()
                    .flat_map(|&sp| owned.iter().map(move |&s| crate::bank::file_name(sp, s as u32)))
                    .collect();
                crate::bank::restore(&ckpt.join(crate::bank::DIR), &bank_dir, &names, at_step)?;
                Bank::open(&bank_dir, &ds, &bank_splits, &owned, settings)?
            }
            None => Bank::create(&bank_dir, &ds, &bank_splits, &owned, settings)?,
        }))
    };
    let mut mpl_run = if recipe.method.is_mpl() {
        let report = progress && resume_from.is_none();
        // Full MPL's teacher is a classifier with weights of its own in the checkpoint. A
        // checkpoint without them was another method's: the checks below name the difference.
        let has_teacher =
            resume_from.as_ref().is_some_and(|d| d.join(checkpoint::Weights::Teacher.file()).is_file());
        let teacher = match cfg.method {
            crate::algo::Method::Mpl if has_teacher => {
                resumed(checkpoint::Weights::Teacher)?.map(|m| m.model)
            }
            _ => None,
        };
        Some(MplRun::new(be, cfg, &ds, &model, &recipe, total, report, &mut account, teacher)?)
    } else {
        None
    };
    // An encoder's activations, claimed before the first step allocates them: the step's
    // passes over a micro-batch's rows on this rank, and an evaluation batch beside them.
    let seq_len = manifest.tokenizer.subword.as_ref().map_or(0, |sw| sw.max_len as usize);
    let (n_l, n_u) = (t.batch_size / world, b_u / world);
    let eval_pass = |m: &Model| (m.eval_batch(t.eval_batch_size), false);
    let eval_bytes = |m: &Model| m.activation_bytes(m.eval_batch(t.eval_batch_size), seq_len, false);
    let teacher = mpl_run.as_ref().and_then(|r| r.teacher_bag()).map(|(m, _)| m);
    // The models are evaluated one after the other, each batch's activations gone before
    // the next: one evaluation batch is claimed, the larger model's.
    let teacher_evaluates = teacher.is_some_and(|tm| eval_bytes(tm) > eval_bytes(&model));
    let second = step::second_pass(recipe.target, n_l, n_u);
    let mut passes: Vec<(usize, bool)> = if mpl_run.is_some() {
        // MPL's student reuses one pass's buffers for its unlabeled and labeled rows.
        vec![(n_l.max(n_u), true)]
    } else {
        let mut passes = vec![(n_l + n_u, true)];
        passes.extend(second);
        if cfg.adversarial.kind != AdversarialKind::None {
            passes.push((n_l + n_u, true));
        }
        passes
    };
    if !teacher_evaluates {
        passes.push(eval_pass(&model));
    }
    claim_activations(&mut account, "the model", &model, seq_len, &passes)?;
    if let Some(teacher) = teacher {
        // The teacher's pass: its labeled rows, the unlabeled rows' weak and strong views.
        let mut passes = vec![(n_l + 2 * n_u, true)];
        if teacher_evaluates {
            passes.push(eval_pass(teacher));
        }
        claim_activations(&mut account, "MPL's teacher", teacher, seq_len, &passes)?;
    }
    let logits_checksum = teacher_logits_checksum(cfg)?;
    if let Some(dir) = &resume_from {
        // The checkpoint's buffers replace the fresh ones, which go first: a large model is
        // never held twice.
        for buf in [&mut params, &mut opt.m, &mut opt.v] {
            *buf = be.zeros(0);
        }
        let (m, loaded_model, loaded) = checkpoint::load_model(dir)?;
        let differs = if m.model != meta.model || loaded_model.layout() != model.layout() {
            let json =
                |spec: &crate::model::ModelSpec| serde_json::to_value(spec).expect("a model spec serialises");
            let fields = crate::config::differences(&json(&m.model), &json(&meta.model), 8);
            Some(format!("model (checkpoint → config: {})", fields.join(", ")))
        } else if m.labels != meta.labels {
            Some("set of class labels".to_string())
        } else if m.tokenizer != meta.tokenizer {
            Some("tokenizer".to_string())
        } else {
            None
        };
        if let Some(what) = differs {
            return Err(Error::bad_file(
                dir,
                format!("the checkpoint's {what} differs from this config and data set"),
            ));
        }
        let lens = crate::optim::moment_lens(&opt.cfg, model.layout(), model.table());
        let (mm, vv, state) = checkpoint::load_train(dir, &model, lens)?;
        if state.logits_checksum != logits_checksum {
            return Err(Error::bad_file(
                dir,
                "the checkpoint was trained on another exported logits file (noisy_student.logits, mpl.logits or mpl.train_logits: the contents differ)",
            ));
        }
        if state.config_hash != config_hash && !trajectory_matches(cfg, state.config_hash) {
            let cadence = if lazy_shadow_table(cfg) {
                " (with a lazily updated teacher or averaged table, train.checkpoint_every counts too: each checkpoint brings its rows up to date)"
            } else {
                ""
            };
            // Checkpoints keep the config they were trained under (those from before it was
            // kept say only that it differs).
            let then = std::fs::read_to_string(dir.join(checkpoint::CONFIG_FILE))
                .ok()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            let now: serde_json::Value =
                serde_json::from_str(&trajectory_config(cfg)).expect("the config's own JSON");
            let fields = match then {
                Some(then) => {
                    let d = crate::config::differences(&then, &now, 8);
                    if d.is_empty() {
                        String::new()
                    } else {
                        format!(": {}", d.join("; "))
                    }
                }
                None if dir.join(checkpoint::CONFIG_FILE).exists() => {
                    format!(
                        " (its {} is unreadable, so the fields that differ cannot be named)",
                        checkpoint::CONFIG_FILE
                    )
                }
                None => String::new(),
            };
            return Err(Error::bad_file(
                dir,
                format!(
                    "the checkpoint was written with a different training config{fields} (a run resumes only \
                     under the config it started with; train.steps and train.epochs included){cadence}"
                ),
            ));
        }
        if !dir.join(checkpoint::CONFIG_FILE).is_file() && root {
            // Checkpoints without config.json predate the 2026-12-05 fixes to METHODS.md's
            // definitions (distribution alignment after the temperature, the stabilisers'
            // statistics, Temporal Ensembling's ramp, TSA in the adversarial pass, the bag
            // model's ε), which a resumed run now follows.
            eprintln!(
                "warning: {} has no config.json: it was written by a dtrain from before the method fixes of 2026-12-05 (or the file was removed): where the run uses distribution \
                 alignment or adaptive thresholds at a temperature other than 1, Temporal Ensembling, TSA with \
                 adversarial training, or a bag model's adversarial term, the resumed steps follow the corrected \
                 definitions, not the ones the run began with",
                dir.display()
            );
        }
        if state.data_checksum != manifest.checksum {
            return Err(Error::bad_file(
                dir,
                format!(
                    "the checkpoint was trained on another data set (manifest checksum {}, {} has {})",
                    state.data_checksum,
                    cfg.data.dir.display(),
                    manifest.checksum
                ),
            ));
        }
        if state.shadow_logs.len() != shadows.len() {
            return Err(Error::bad_file(dir, "the checkpoint's shadow weights differ from this config's"));
        }
        for (k, &log_now) in shadows.iter_mut().zip(&state.shadow_logs) {
            k.shadow.params = be.zeros(0);
            let (_, _, weights) = checkpoint::load_weights(dir, k.file)?;
            k.shadow.restore(be.upload_vec(weights), log_now);
        }
        (params, opt.m, opt.v) = (be.upload_vec(loaded), be.upload_vec(mm), be.upload_vec(vv));
        opt.t = state.optim_t;
        loader.restore(&ds, &state.cursors)?;
        if let Some(u) = &mut uloader {
            u.restore(&ds, &state.unlabeled_cursors)?;
        }
        plateau = state.plateau;
        step = state.step;
        win = window_share(state.window.clone(), rank);
        if let Some(run) = &mut mpl_run {
            run.restore(be, dir, &state)?;
        }
        restored_stabiliser = Some((dir.join("state.bin"), state.stabiliser));
    }
    crate::fsutil::create_dirs(&t.out_dir)?;
    let mut bank = open_bank(resume_from.as_deref(), step)?;
    let per_pass = cfg.augment.consistency_passes;
    let strong_view = (matches!(recipe.target, TargetSource::WeakView | TargetSource::File) || per_pass)
        .then(|| StrongView {
            cfg: cfg.augment.clone(),
            seed: t.seed,
            buckets: manifest.tokenizer.buckets,
            per_pass,
            second_pass: matches!(recipe.target, TargetSource::SecondPass { .. } | TargetSource::Teacher),
            keep_ends: manifest.tokenizer.subword.is_some(),
        });
    let mut stabiliser = (recipe.target == TargetSource::WeakView && !recipe.method.is_mpl()).then(|| {
        let sizes: Vec<usize> = ds.shards(SplitKind::Unlabeled).iter().map(|s| s.len()).collect();
        Stabiliser::new(
            recipe.distribution_alignment,
            recipe.adaptive_threshold,
            recipe.stabiliser_momentum,
            recipe.op.threshold,
            &manifest.splits["train"].per_class,
            &sizes,
        )
    });
    if let (Some(st), Some((file, state))) = (&mut stabiliser, &restored_stabiliser) {
        st.restore(state.clone()).map_err(|e| Error::bad_file(file, e))?;
    }
    let metrics_path = t.out_dir.join("metrics.jsonl");
    let mut log = if root { MetricsLog::open(&metrics_path, step)? } else { MetricsLog::none(&metrics_path) };
    // How gradients travel (NCCL, or MPI on the host): chosen together by every rank.
    dist.bind(be)?;
    if progress && step == 0 && (world > 1 || dist.path() != Some(&crate::dist::GradPath::Local)) {
        eprintln!("{}", dist.describe_path());
    }
    if progress && step == 0 && world > 1 {
        eprintln!(
            "{world} ranks: each reads {} of the {p} shards, {} labeled and {} unlabeled rows per step",
            p / world,
            t.batch_size / world,
            b_u / world
        );
    }
    if progress && step == 0 {
        eprintln!("memory: {}", budget.summary());
    }
    if progress && step == 0 && recipe.method != Method::Supervised {
        eprintln!(
            "method {}: {} unlabeled rows per step, consistency {:?} with w_max {w_max:.4} (ramp {} steps), T {}, τ {}",
            recipe.method.name(),
            b_u,
            recipe.op.kind,
            ramp.up_steps,
            recipe.op.temperature,
            recipe.op.threshold
        );
    }

    let bar = if progress && step < total {
        let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("train [{wide_bar}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b.set_position(step);
        b
    } else {
        ProgressBar::hidden()
    };

    // The fused table update changes the table during the backward pass; an adversarial pass
    // reads it afterwards, so it needs the update deferred to the optimizer step.
    // On several ranks the table's gradient must be averaged first: no fused update.
    let fused = opt.fuses_table()
        && cfg.adversarial.kind == AdversarialKind::None
        && world == 1
        && model.bag().is_some();
    let mut stepper = Stepper {
        be,
        model: &model,
        cfg,
        recipe: &recipe,
        loss: loss_kind(cfg),
        accum,
        total,
        batch_size: t.batch_size / world,
        dist,
        fused,
        table_mult: opt.lr_of(model.layout(), model.table(), 1.0),
        passes: [Pass::new(be, &model, true), Pass::new(be, &model, second.is_some_and(|(_, bw)| bw))],
        row_loss: be.zeros(0),
        cons_rows: be.zeros(0),
        target_host: Vec::new(),
        weight_host: Vec::new(),
        target_buf: be.zeros(0),
        adv: AdversarialBuffers::new(be, &model),
        grads: be.zeros(model.dense_len()),
        table: TableAcc::new(be, model.table_dim()),
    };
    let beta1 = cfg.optim.beta1;
    let mut total_tokens = 0u64;
    let mut win_start = Instant::now();
    let mut last_ckpt = resume_from.clone();
    let mut val_report = None;
    // MPL's teacher, evaluated beside the student when it is a text classifier.
    let mut mpl_teacher = ShadowReport { name: "teacher".into(), val: None, test: None };
    let mut step_secs = 0.0f64;
    // Time in training steps (no evaluation, no checkpoint) since the last metrics line, in
    // this process; not part of the checkpointed window, whose contents must not depend on
    // timing.
    let (mut win_step_secs, mut win_step_count) = (0.0f64, 0u64);
    // Tokens of a restored logging window were trained by an earlier process.
    let restored_tokens = win.tokens;
    let resumed_at = step;
    while step < total {
        dist.set_step(step + 1);
        let step_start = Instant::now();
        let down = ramp::ramp_down(step, total, down_steps);
        let lr = cfg.optim.lr * cfg.schedule.at(step, total) * plateau.factor * down;
        opt.cfg.beta1 = ramp::ramped_beta1(beta1, down);
        if let Some(run) = &mut mpl_run {
            run.ramp_down_beta1(down);
        }
        let w = w_max * ramp.factor(step);
        let logs = (step + 1) % t.log_every == 0 || step + 1 == total;
        let mut micro = Vec::with_capacity(accum as usize);
        for _ in 0..accum {
            micro.push(next_micro(&ds, &mut loader, uloader.as_mut(), strong_view.as_ref())?);
        }
        // Predictions for the bank, written after the step (METHODS.md §5).
        let mut bank_writes: Vec<(usize, Vec<f32>)> = Vec::new();
        // The table rows this step reads or changes: lazy shadows bring them up to date.
        // On several ranks: every rank's rows (the averaged gradient touches them all).
        let touched = (!shadows.is_empty()).then(|| {
            dist.union_rows(touched_rows(
                micro.iter().flat_map(|m| std::iter::once(&m.batch).chain(m.second.iter())),
            ))
        });
        for k in &mut shadows {
            k.shadow.sync_rows(be, &params, touched.as_deref().unwrap_or(&[]));
        }
        let mut step_loss = 0.0;
        let norm = if let Some(run) = &mut mpl_run {
            let n_l = t.batch_size / world;
            let out =
                run.step(be, &model, &mut params, &mut opt, &micro[0], n_l, step, lr, w, dist, &mut win)?;
            step_loss = out.loss;
            out.norm
        } else {
            be.fill_zero(&mut stepper.grads);
            stepper.table.start(fused && !logs);
            for (mi, m) in micro.iter().enumerate() {
                let inp = StepInputs {
                    step,
                    w,
                    lr,
                    mi,
                    teacher: shadows.first().filter(|k| k.name == "teacher").map(|k| &k.shadow.params),
                    bank: bank.as_ref(),
                    logits: teacher_logits.as_ref(),
                };
                let (loss, probs) = stepper.micro(&mut params, m, &inp, stabiliser.as_mut(), &mut win)?;
                step_loss += loss;
                if let Some(p) = probs {
                    bank_writes.push((mi, p));
                }
            }
            let Stepper { grads, table, .. } = &mut stepper;
            if !fused {
                dist.average(be, grads, Some(&mut table.grad), model.table_rows());
            }
            let table_grad = if fused {
                TableGrad::Applied(
                    table
                        .formed()
                        .then(|| be.sq_norm(&table.grad.values, 0..table.grad.rows.len() * table.grad.dim)),
                )
            } else {
                TableGrad::Rows(&mut table.grad)
            };
            opt.step(be, model.layout(), model.table(), &mut params, grads, table_grad, lr)
        };
        let norm = step::check_grad_norm(norm, step, cfg)?;
        win.loss_sum += step_loss / world as f64;
        win.steps += 1;
        if let Some(bank) = &mut bank {
            for (mi, probs) in &bank_writes {
                bank.update(&micro[*mi].rows, probs);
            }
        }
        for k in &mut shadows {
            k.last_alpha =
                Some(k.shadow.update(be, &params, layout_len, step + 1, touched.as_deref().unwrap_or(&[])));
        }
        let this_step = step_start.elapsed().as_secs_f64();
        step_secs += this_step;
        (win_step_secs, win_step_count) = (win_step_secs + this_step, win_step_count + 1);
        step += 1;
        bar.set_position(step);

        if logs {
            let local = std::mem::take(&mut win);
            let win = window_sum(&local, dist, classes_n);
            let secs = win_start.elapsed().as_secs_f64().max(1e-9);
            let (loss, acc) =
                (win.loss_sum / win.steps.max(1) as f64, win.correct as f64 / win.docs.max(1) as f64);
            let tps = win.tokens as f64 / secs;
            // MPL's finetuning steps read no unlabeled rows.
            let unlabeled_share = match &mpl_run {
                Some(_) => win.mpl_steps as f64 / win.steps.max(1) as f64,
                None => 1.0,
            };
            let docs_per_s = win.docs as f64 * (1.0 + recipe.unlabeled_ratio as f64 * unlabeled_share) / secs;
            let mut rec = json!({
                "step": step, "epoch": step as f64 / steps_per_epoch as f64, "lr": lr, "loss": loss,
                "loss_supervised": win.sup_sum / win.docs.max(1) as f64,
                "train_accuracy": acc, "grad_norm": norm, "tokens_per_s": tps,
                "step_ms": 1e3 * win_step_secs / win_step_count.max(1) as f64, "docs_per_s": docs_per_s,
            });
            // MPL's teacher has its own UDA ramp and learning rate (of the step just taken).
            let teacher_schedule = mpl_run.as_ref().map(|r| r.teacher_schedule(step - 1, w, lr));
            if win.cons_rows > 0 {
                rec["loss_consistency"] = json!(win.cons_sum / win.cons_rows.max(1) as f64);
                rec["consistency_weight"] = json!(teacher_schedule.map_or(w, |(uda, _)| uda));
                rec["mask_ratio"] = json!(win.passed as f64 / win.cons_rows.max(1) as f64);
            }
            for k in &shadows {
                if let Some(a) = k.last_alpha {
                    rec[format!("{}_alpha", k.name)] = json!(a);
                }
            }
            if win.pl_rows > 0 {
                // Diagnostics against the hidden labels of the unlabeled rows.
                rec["pseudo_label_accuracy"] = json!(win.pl_correct as f64 / win.pl_rows as f64);
                if win.pl_passed > 0 {
                    rec["pseudo_label_accuracy_masked"] =
                        json!(win.pl_passed_correct as f64 / win.pl_passed as f64);
                }
            }
            if let Some((top, share)) = top_class_share(&win.pl_classes) {
                // The collapse diagnostic: near 1, one class takes every pseudo-label.
                rec["pseudo_label_top_class"] = json!(manifest.labels[top]);
                rec["pseudo_label_top_share"] = json!(share);
                if !collapse_warned
                    && dist.is_root()
                    && step > steps_per_epoch
                    && collapsing(&manifest.splits["train"].per_class, share)
                {
                    collapse_warned = true;
                    let (term, remedies) = collapse_remedies(&recipe);
                    bar.suspend(|| {
                        eprintln!(
                            "warning: step {step}: {:.0}% of the unlabeled rows' pseudo-labels are '{}' (pseudo_label_top_share in metrics.jsonl): the {term} may be collapsing onto one class; consider {remedies} (docs/results.md, 'Why the consistency methods fade')",
                            100.0 * share,
                            manifest.labels[top]
                        )
                    });
                }
            }
            if win.adv_count > 0 {
                rec["loss_adversarial"] = json!(win.adv_sum / win.adv_count as f64);
            }
            if win.tsa_rows > 0 {
                rec["tsa_dropped"] = json!(win.tsa_dropped as f64 / win.tsa_rows as f64);
            }
            if let Some(st) = &stabiliser {
                if recipe.adaptive_threshold == AdaptiveThreshold::Freematch {
                    rec["freematch_tau"] = json!(st.state.free_tau);
                }
            }
            if down_steps > 0 {
                rec["beta1"] = json!(opt.cfg.beta1);
            }
            if let Some(run) = &mpl_run {
                let s = win.mpl_steps.max(1) as f64;
                rec["mpl_h"] = json!(win.mpl_h / s);
                rec["mpl_h_used"] = json!(win.mpl_h_used / s);
                rec["mpl_baseline"] = json!(run.state.baseline);
                rec["mpl_ce_old"] = json!(win.mpl_ce_old / s);
                rec["mpl_ce_new"] = json!(win.mpl_ce_new / s);
                rec["loss_pseudo"] = json!(win.mpl_pseudo / s);
                if win.mpl_teacher_docs > 0 {
                    rec["loss_teacher"] = json!(win.mpl_teacher_ce / s);
                    rec["teacher_train_accuracy"] =
                        json!(win.mpl_teacher_correct as f64 / win.mpl_teacher_docs as f64);
                }
                rec["mpl_steps"] = json!(win.mpl_steps);
                if let Some((_, teacher_lr)) = teacher_schedule {
                    rec["teacher_lr"] = json!(teacher_lr);
                }
                if down_steps > 0 {
                    rec["teacher_beta1"] = json!(run.beta1());
                }
            }
            log.write(rec)?;
            bar.set_message(format!("loss {loss:.4} acc {acc:.3} {:.0}k tok/s", tps / 1e3));
            total_tokens += win.tokens;
            win_start = Instant::now();
            (win_step_secs, win_step_count) = (0.0, 0);
        }
        let checkpoint_due = step % ckpt_every == 0
            || step == total
            || opts.stop_after == Some(step)
            || cfg.schedule.ends_cycle(step, total);
        let eval_due = step % eval_every == 0 || step == total;
        if checkpoint_due || eval_due {
            for k in &mut shadows {
                k.shadow.sync_all(be, &params);
            }
        }
        if eval_due {
            let r = eval::evaluate(be, &model, &params, &ds, SplitKind::Val, t.eval_batch_size)?;
            if let Some(r) = &r {
                let reduced = cfg.schedule.observe(&mut plateau, r.accuracy);
                log.write(json!({
                    "step": step, "split": "val", "accuracy": r.accuracy, "macro_f1": r.macro_f1,
                    "loss": r.loss, "ece": r.ece, "lr_factor": plateau.factor, "lr_reduced": reduced,
                }))?;
            }
            val_report = r;
            for k in &mut shadows {
                let r = eval::evaluate(be, &model, &k.shadow.params, &ds, SplitKind::Val, t.eval_batch_size)?;
                if let Some(r) = &r {
                    log.write(json!({
                        "step": step, "split": "val", "model": k.name, "accuracy": r.accuracy,
                        "macro_f1": r.macro_f1, "loss": r.loss, "ece": r.ece,
                    }))?;
                }
                k.report.val = r;
            }
            if let Some((tm, tp)) = mpl_run.as_ref().and_then(|r| r.teacher_bag()) {
                let r = eval::evaluate(be, tm, tp, &ds, SplitKind::Val, t.eval_batch_size)?;
                if let Some(r) = &r {
                    log.write(json!({
                        "step": step, "split": "val", "model": "teacher", "accuracy": r.accuracy,
                        "macro_f1": r.macro_f1, "loss": r.loss, "ece": r.ece,
                    }))?;
                }
                mpl_teacher.val = r;
            }
        }
        if checkpoint_due {
            let state = TrainState {
                step,
                optim_t: opt.t,
                cursors: cursors_sum(loader.cursors(), dist),
                unlabeled_cursors: uloader.as_ref().map_or(Vec::new(), |u| cursors_sum(u.cursors(), dist)),
                shadow_logs: shadows.iter().map(|k| k.shadow.log_now()).collect(),
                logits_checksum,
                mpl: mpl_run.as_ref().map_or_else(Default::default, |r| r.state),
                teacher_optim_t: mpl_run.as_ref().map_or(0, |r| r.teacher_optim_t()),
                stabiliser: stabiliser.as_ref().map_or_else(Default::default, |s| s.state.clone()),
                plateau,
                config_hash,
                data_checksum: manifest.checksum.clone(),
                window: window_sum(&win, dist, classes_n),
            };
            let contents = checkpoint::Contents {
                params: host_view(be, &params),
                shadows: shadows.iter().map(|k| (k.file, host_view(be, &k.shadow.params))).collect(),
                bank: bank.as_ref(),
                moments: [host_view(be, &opt.m), host_view(be, &opt.v)],
                parts: mpl_run.iter().map(|r| r.part(be)).collect(),
                state: &state,
                config: &trajectory_text,
                snapshot: cfg.schedule.cycles > 1 && (step == total || cfg.schedule.ends_cycle(step, total)),
            };
            let dir = checkpoint::save(&ckpt_root, &model, &meta, contents, t.keep_checkpoints, dist)?;
            last_ckpt = Some(dir);
        }
        if opts.stop_after == Some(step) {
            break;
        }
    }
    bar.finish_and_clear();
    total_tokens += win.tokens;
    let final_checkpoint =
        last_ckpt.ok_or_else(|| Error::Data("no step was run and no checkpoint exists".into()))?;
    let test = if step == total {
        eval::evaluate(be, &model, &params, &ds, SplitKind::Test, t.eval_batch_size)?
    } else {
        None
    };
    if let Some(r) = &test {
        log.write(json!({"step": step, "split": "test", "accuracy": r.accuracy, "macro_f1": r.macro_f1, "loss": r.loss, "ece": r.ece}))?;
        for k in &mut shadows {
            let r = eval::evaluate(be, &model, &k.shadow.params, &ds, SplitKind::Test, t.eval_batch_size)?;
            if let Some(r) = &r {
                log.write(json!({"step": step, "split": "test", "model": k.name, "accuracy": r.accuracy, "macro_f1": r.macro_f1, "loss": r.loss, "ece": r.ece}))?;
            }
            k.report.test = r;
        }
        if let Some((tm, tp)) = mpl_run.as_ref().and_then(|r| r.teacher_bag()) {
            let r = eval::evaluate(be, tm, tp, &ds, SplitKind::Test, t.eval_batch_size)?;
            if let Some(r) = &r {
                log.write(json!({"step": step, "split": "test", "model": "teacher", "accuracy": r.accuracy, "macro_f1": r.macro_f1, "loss": r.loss, "ece": r.ece}))?;
            }
            mpl_teacher.test = r;
        }
    }
    Ok(TrainReport {
        steps: step,
        final_checkpoint,
        val: val_report,
        test,
        shadows: shadows
            .into_iter()
            .map(|k| k.report)
            .chain(mpl_run.as_ref().and_then(|r| r.teacher_bag()).map(|_| mpl_teacher))
            .collect(),
        tokens_per_s: (total_tokens - restored_tokens.min(total_tokens)) as f64 / step_secs.max(1e-9),
        seconds: started.elapsed().as_secs_f64(),
        resumed_at,
        backend: be.name(),
    })
}

/// Opens the logits file that the config's `field` names; one that cannot be opened (a
/// wrong path) is named by the field, with the path as the process resolved it.
pub(super) fn open_logits(path: &std::path::Path, field: &str) -> Result<LogitsFile> {
    LogitsFile::open(path).map_err(|e| match e {
        Error::Io { path, err } => {
            let at = std::path::absolute(&path).unwrap_or(path);
            Error::config("train", field, format!("{}: {err}", at.display()))
        }
        other => other,
    })
}

/// The body checksum of the run's exported-logits files (Noisy Student's, reduced MPL's;
/// combined when there are two), 0 without any.
fn teacher_logits_checksum(cfg: &TrainConfig) -> Result<u64> {
    let mut sum = 0u64;
    for path in mpl::logits_files(cfg) {
        // Opened and checked whole above (Noisy Student's, or reduced MPL's teacher): the
        // header's record is that checksum.
        sum = crate::backend::mix64(sum ^ LogitsFile::recorded_checksum(path)?);
    }
    Ok(sum)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A training config of `sets` on top of the defaults.
    fn config(sets: &[&str]) -> TrainConfig {
        let mut all = vec!["data.dir=\"d\"", "train.out_dir=\"o\""];
        all.extend_from_slice(sets);
        let o: Vec<_> = all.iter().map(|s| crate::config::Override::parse(s).unwrap()).collect();
        crate::config::load::<TrainConfig>(None, &o).unwrap()
    }

    #[test]
    fn snapshots_past_the_free_disk_are_warned_about() {
        assert_eq!(snapshot_warning(10, 1_000_000_000, 20_000_000_000), None);
        let w = snapshot_warning(10_000, 32 << 20, 44_000_000_000).unwrap();
        assert!(
            w.contains("schedule.cycles = 10000")
                && w.contains("335.5 GB or more")
                && w.contains("44.0 GB free"),
            "{w}"
        );
        // The file system of a directory not made yet is its nearest ancestor's.
        let dir = tempfile::tempdir().unwrap();
        let free = crate::fsutil::free_bytes(&dir.path().join("not/yet")).unwrap();
        assert!(free > 0 && crate::fsutil::free_bytes(dir.path()).is_some_and(|f| f > 0));
    }

    #[test]
    fn an_swa_average_of_one_snapshot_is_warned_about() {
        let avg = |sets: &[&str]| config(&[&["average.kind=\"swa\""][..], sets].concat()).average;
        // 10 steps from step 7 (0.75 of them): every 1000 steps is one snapshot.
        let w = swa_warning(&avg(&["average.swa_every=1000"]), 10, 5).unwrap();
        assert!(
            w.contains("every 1000 steps") && w.contains("from step 7") && w.contains("1 snapshot,"),
            "{w}"
        );
        // Once per epoch of 19 steps, the same; of 2 steps, two snapshots (7 and 9).
        assert!(swa_warning(&avg(&[]), 10, 19).unwrap().contains("average.swa_every = 0: once per epoch"));
        assert_eq!(swa_warning(&avg(&[]), 10, 2), None);
        assert_eq!(swa_warning(&config(&[]).average, 10, 19), None, "no SWA, nothing to say");
    }

    #[test]
    fn a_ramp_up_that_outlasts_the_run_is_warned_about() {
        let load = |sets: &[&str]| config(sets).recipe();
        // Mean Teacher's 5-epoch ramp at 10 steps per epoch: 50 steps.
        let mt = load(&["method=\"mean_teacher\""]);
        let ramp = mt.ramp(10);
        assert_eq!(ramp_warning(&mt, &ramp, 50), None);
        let w = ramp_warning(&mt, &ramp, 20).unwrap();
        let end = ramp.factor(19);
        assert!(end > 0.0 && end < 1.0);
        assert!(w.contains("consistency.ramp_epochs = 5 (50 steps) outlasts the run's 20 steps"), "{w}");
        assert!(w.contains(&format!("ends at {end:.2} of its maximum")), "{w}");
        // No consistency term, or no ramp: nothing to say.
        let sup = load(&[]);
        assert_eq!(ramp_warning(&sup, &sup.ramp(10), 20), None);
        let flat = load(&["method=\"mean_teacher\"", "consistency.ramp_epochs=0"]);
        assert_eq!(ramp_warning(&flat, &flat.ramp(10), 20), None);
        // Temporal Ensembling's one-epoch delay does not shift its ramp: 55 steps see it end.
        let te = load(&["method=\"temporal\""]);
        assert_eq!((te.ramp(10).delay_steps, te.ramp(10).up_steps), (10, 50));
        assert_eq!(ramp_warning(&te, &te.ramp(10), 55), None);
        assert!(ramp_warning(&te, &te.ramp(10), 45).is_some());
        // A run within the delay never turns the term on.
        let short = load(&["method=\"temporal\"", "consistency.ramp_epochs=0.5"]);
        assert!(ramp_warning(&short, &short.ramp(10), 8).unwrap().contains("ends at 0.00"));
    }

    #[test]
    fn settings_the_data_cannot_honour_are_warned_about() {
        let cfg = config;
        let plain = cfg(&["train.batch_size=16"]);
        assert!(data_warnings(&plain, 16, 5).is_empty());
        let w = data_warnings(&cfg(&["train.batch_size=16", "optim.grad_accum=2"]), 20, 5);
        assert!(
            w.len() == 1 && w[0].contains("is 32 documents a step, more than the training split's 20"),
            "{w:?}"
        );
        let plateau = cfg(&["schedule.plateau_patience=2"]);
        assert!(data_warnings(&plateau, 100, 5).is_empty());
        let w = data_warnings(&plateau, 100, 0);
        assert!(w.len() == 1 && w[0].contains("no val split"), "{w:?}");
    }

    #[test]
    fn the_top_class_share_counts_and_breaks_ties_by_the_lower_class() {
        assert_eq!(top_class_share(&[]), None);
        assert_eq!(top_class_share(&[0, 0, 0]), None);
        assert_eq!(top_class_share(&[1, 3, 0, 4]), Some((3, 0.5)));
        assert_eq!(top_class_share(&[2, 0, 2]), Some((0, 0.5)));
        // Balanced labels: the bar is 90%. Labels 90% one class: 90% of the pseudo-labels
        // on it is ordinary, and the bar is halfway to 1.
        assert!(collapsing(&[5, 5, 5], 0.9) && !collapsing(&[5, 5, 5], 0.89) && collapsing(&[5, 5], 0.95));
        assert!(!collapsing(&[18, 1, 1], 0.94) && collapsing(&[18, 1, 1], 0.951));
    }

    /// The collapse warning does not suggest what the run already has on.
    #[test]
    fn collapse_remedies_name_what_is_not_on_yet() {
        let remedies = |sets: &[&str]| {
            let mut all = vec!["method=\"fixmatch\""];
            all.extend_from_slice(sets);
            collapse_remedies(&config(&all).recipe()).1
        };
        let plain = remedies(&[]);
        assert!(plain.contains("consistency.distribution_alignment = true"), "{plain}");
        assert!(plain.contains("a higher or adaptive consistency.threshold"), "{plain}");
        let on = remedies(&[
            "consistency.distribution_alignment=true",
            "consistency.adaptive_threshold=\"flexmatch\"",
        ]);
        assert!(!on.contains("distribution_alignment = true"), "{on}");
        assert!(on.contains("a lower consistency.stabiliser_momentum than 0.999"), "{on}");
        assert!(on.contains("FlexMatch passes every row"), "{on}");
        let fast = remedies(&[
            "consistency.distribution_alignment=true",
            "consistency.stabiliser_momentum=0.9",
            "consistency.weight=0.3",
        ]);
        assert!(
            !fast.contains("stabiliser_momentum") && fast.contains("a lower consistency.weight than 0.3"),
            "{fast}"
        );
        assert!(collapse_remedies(&config(&["method=\"mean_teacher\""]).recipe())
            .1
            .contains("a lower consistency.weight"));
        // MPL's teacher takes no stabilisers: none is suggested.
        let mpl = collapse_remedies(&config(&["method=\"mpl\""]).recipe()).1;
        assert!(mpl.contains("mpl.label_smoothing") && !mpl.contains("distribution_alignment"), "{mpl}");
        // Reduced MPL's teacher has no UDA term, so no consistency.weight to lower.
        let reduced =
            collapse_remedies(&config(&["method=\"mpl_reduced\"", "mpl.logits=\"u.logits\""]).recipe()).1;
        assert!(
            reduced.contains("mpl.teacher_optim.lr") && !reduced.contains("consistency.weight"),
            "{reduced}"
        );
    }

    #[test]
    fn diagnostics_skip_rows_without_a_target() {
        let mut win = LogWindow::default();
        // Four rows: hidden labels 1, unknown, 2, 1; targets 1, 0, 2, 2; row 2 has no target
        // and row 3 fails the mask.
        let (hidden, label) = ([1, -1, 2, 1], [1.0, 0.0, 2.0, 2.0]);
        step::pseudo_label_diagnostics(&mut win, &hidden, &label, |i| i != 2, |i| i < 2);
        assert_eq!(win.pl_classes, vec![1, 1, 1]);
        assert_eq!((win.pl_rows, win.pl_correct, win.pl_passed, win.pl_passed_correct), (2, 1, 1, 1));
    }
}
