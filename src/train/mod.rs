//! Supervised training of the bag model: the step loop (micro-batches, loss, backward,
//! optimizer), logging to a progress bar and `metrics.jsonl`, periodic evaluation and
//! checkpoints, and exact resume.

pub mod eval;
pub mod metrics;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::json;
use xxhash_rust::xxh3::xxh3_64;

use crate::backend::cpu::Cpu;
use crate::backend::{Backend, DropoutKey, LossKind, SparseRows};
use crate::checkpoint::{self, LogWindow, ModelMeta, TrainState};
use crate::config::{LossName, TrainConfig};
use crate::data::dataset::Dataset;
use crate::data::loader::Loader;
use crate::data::shard::SplitKind;
use crate::error::{Error, IoContext, Result};
use crate::model::bag::{Activations, BagModel, BagSpec};
use crate::optim::schedule::Plateau;
use crate::optim::{Optimizer, TableGrad};
use metrics::EvalReport;

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

/// Options of one `train` call that are not part of the config.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub resume: Resume,
    /// Show the progress bar (rank 0, on a terminal).
    pub progress: bool,
    /// Stop after this step as if interrupted (after its checkpoint, if one is due).
    /// For tests of resume.
    pub stop_after: Option<u64>,
}

/// What a training run produced.
#[derive(Debug, Clone)]
pub struct TrainReport {
    pub steps: u64,
    pub final_checkpoint: PathBuf,
    pub val: Option<EvalReport>,
    pub test: Option<EvalReport>,
    /// Training throughput: token ids per second of training steps (forward, backward,
    /// update; evaluation and checkpoints excluded).
    pub tokens_per_s: f64,
    pub seconds: f64,
}

/// The loss of a config.
pub fn loss_kind(cfg: &TrainConfig) -> LossKind {
    match cfg.loss.kind {
        LossName::Ce => LossKind::CrossEntropy { smoothing: cfg.loss.label_smoothing },
        LossName::Focal => LossKind::Focal { gamma: cfg.loss.focal_gamma },
    }
}

struct MetricsLog {
    file: std::fs::File,
    path: PathBuf,
}

impl MetricsLog {
    /// Opens `metrics.jsonl`, keeping only records up to `keep_until` (those a resumed run
    /// does not repeat), the final test record excepted.
    fn open(path: &Path, keep_until: u64) -> Result<Self> {
        let kept: String = match std::fs::read_to_string(path) {
            Ok(text) => text
                .lines()
                .filter(|l| {
                    // Records up to the resumed step, except the final test record, which
                    // the resumed run writes again.
                    serde_json::from_str::<serde_json::Value>(l).ok().is_some_and(|v| {
                        v.get("step").and_then(|s| s.as_u64()).is_some_and(|s| s <= keep_until)
                            && v.get("split").and_then(|s| s.as_str()) != Some("test")
                    })
                })
                .map(|l| format!("{l}\n"))
                .collect(),
            Err(_) => String::new(),
        };
        crate::fsutil::write_atomic(path, kept.as_bytes())?;
        let file = std::fs::OpenOptions::new().append(true).open(path).at(path)?;
        Ok(MetricsLog { file, path: path.to_owned() })
    }

    fn write(&mut self, value: serde_json::Value) -> Result<()> {
        writeln!(self.file, "{value}").at(&self.path)
    }
}

/// A hash of the config fields that shape the training trajectory. Where files go, how
/// often to log or checkpoint, and the evaluation batch size are left out, so a run can be
/// moved or re-tuned in those respects and still resume.
pub fn trajectory_hash(cfg: &TrainConfig) -> u64 {
    let mut c = cfg.clone();
    c.train.out_dir = PathBuf::new();
    c.train.log_every = 0;
    c.train.checkpoint_every = 0;
    c.train.keep_checkpoints = 0;
    c.train.eval_batch_size = 0;
    // The data is identified by its manifest checksum (in the state), not by its path.
    c.data.dir = PathBuf::new();
    xxh3_64(serde_json::to_string(&c).expect("config serialises").as_bytes())
}

/// Trains a bag model as `cfg` says, on the CPU backend.
pub fn train(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainReport> {
    crate::backend::cpu::on_worker(|| train_on_worker(cfg, opts))
}

fn train_on_worker(cfg: &TrainConfig, opts: &RunOptions) -> Result<TrainReport> {
    let be = Cpu::<f32>::new();
    let started = Instant::now();
    let ds = Dataset::open(&cfg.data.dir)?;
    let manifest = ds.manifest();
    let p = manifest.num_shards as usize;
    let t = &cfg.train;
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
    let spec = BagSpec {
        buckets: manifest.tokenizer.buckets as usize,
        dim: cfg.model.dim,
        hidden: cfg.model.hidden.clone(),
        activation: cfg.model.activation,
        embed_dropout: cfg.model.embed_dropout,
        hidden_dropout: cfg.model.hidden_dropout,
        classes: manifest.labels.len(),
    };
    let model = BagModel::new(spec.clone());
    for prefix in cfg.optim.lr_mult.keys() {
        if !model.layout.tensors().iter().any(|t| t.name.starts_with(prefix.as_str())) {
            let names: Vec<&str> = model.layout.tensors().iter().map(|t| t.name.as_str()).collect();
            return Err(Error::config(
                "train",
                format!("optim.lr_mult.{prefix}"),
                format!("matches no tensor; the tensors are {}", names.join(", ")),
            ));
        }
    }
    let meta = ModelMeta {
        format: "dtrain-bag".into(),
        model: spec,
        labels: manifest.labels.clone(),
        tokenizer: manifest.tokenizer.clone(),
    };
    let accum = cfg.optim.grad_accum as u64;
    let steps_per_epoch = n_train.div_ceil(t.batch_size as u64 * accum).max(1);
    let total = t.steps.unwrap_or(steps_per_epoch * u64::from(t.epochs));
    let eval_every = if t.eval_every == 0 { steps_per_epoch } else { t.eval_every };
    let ckpt_every = if t.checkpoint_every == 0 { total } else { t.checkpoint_every };
    let config_hash = trajectory_hash(cfg);
    let ckpt_root = t.out_dir.join("checkpoints");

    let mut params: Vec<f32> = model.init(t.seed);
    let mut opt = Optimizer::new(&be, &model.layout, model.table, cfg.optim.clone());
    let mut loader = Loader::new(&ds, SplitKind::Train, t.seed, t.batch_size / p, (0..p).collect())?;
    let mut plateau = Plateau::default();
    let mut step = 0u64;
    let mut win = LogWindow::default();
    let resume_from = match &opts.resume {
        Resume::No => {
            if checkpoint::latest(&ckpt_root)?.is_some() {
                return Err(Error::bad_file(
                    &ckpt_root,
                    "holds checkpoints of an earlier run: pass --resume auto to continue it, or choose another train.out_dir",
                ));
            }
            None
        }
        Resume::Auto => checkpoint::latest(&ckpt_root)?,
        Resume::From(dir) => Some(dir.clone()),
    };
    if let (Some(path), None) = (&cfg.model.init_from, &resume_from) {
        let emb = crate::pretrain::embeddings::read(path)?;
        let s = emb.init_table(&manifest.tokenizer, model.spec.dim, &mut params[model.table.range()])?;
        if opts.progress {
            eprintln!(
                "init_from {}: {} rows of {} pretrained words loaded{}",
                path.display(),
                s.rows,
                s.words,
                if s.composed { " (word rows composed: the character n-gram ranges differ)" } else { "" }
            );
        }
    }
    if let Some(dir) = &resume_from {
        let (m, loaded_model, loaded) = checkpoint::load_model(dir)?;
        let differs = if m.model != meta.model || loaded_model.layout != model.layout {
            Some(format!("model ({:?} in the checkpoint, {:?} in the config)", m.model, meta.model))
        } else if m.labels != meta.labels {
            Some("class labels".to_string())
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
        let (mm, vv, state) = checkpoint::load_train(dir, &model, (opt.m.len(), opt.v.len()))?;
        if state.config_hash != config_hash {
            return Err(Error::bad_file(dir, "the checkpoint was written with a different training config"));
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
        params = loaded;
        opt.m = mm;
        opt.v = vv;
        opt.t = state.optim_t;
        loader.restore(&ds, &state.cursors)?;
        plateau = state.plateau;
        step = state.step;
        win = state.window;
    }
    std::fs::create_dir_all(&t.out_dir).at(&t.out_dir)?;
    let mut log = MetricsLog::open(&t.out_dir.join("metrics.jsonl"), step)?;

    let bar = if opts.progress && step < total {
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

    let kind = loss_kind(cfg);
    let classes = model.spec.classes;
    let mut acts = Activations::new(&be, &model);
    let mut grads = be.zeros(model.dense_len());
    let (mut dlogits, mut row_loss) = (be.zeros(0), be.zeros(0));
    // The table's sparse gradient (and a second one for accumulation), reused every step.
    let mut sparse = SparseRows::new(be.zeros(0), model.spec.dim);
    let mut extra = SparseRows::new(be.zeros(0), model.spec.dim);
    let mut dpooled = be.zeros(0);
    let fused = opt.fuses_table();
    let table_mult = opt.lr_of(&model.layout, model.table, 1.0);
    let mut total_tokens = 0u64;
    let mut win_start = Instant::now();
    let mut last_ckpt = resume_from.clone();
    let mut val_report = None;
    let mut step_secs = 0.0f64;
    // Tokens of a restored logging window were trained by an earlier process.
    let restored_tokens = win.tokens;
    while step < total {
        let step_start = Instant::now();
        let lr = cfg.optim.lr * cfg.schedule.at(step, total) * plateau.factor;
        let logs = (step + 1) % t.log_every == 0 || step + 1 == total;
        let mut table_sq = None;
        be.fill_zero(&mut grads);
        for micro in 0..accum {
            let batch = loader.next_batch(&ds)?;
            let n = batch.len();
            let key = DropoutKey { seed: t.seed, step, site: 0, pass: micro as u32, row: 0 };
            let dev = be.upload_batch(&batch);
            model.forward(&be, &params, &dev, n, Some(key), &mut acts);
            let scale = 1.0 / (n as f32 * accum as f32);
            let loss_sum =
                be.softmax_loss(&acts.logits, classes, &dev, kind, scale, &mut dlogits, &mut row_loss);
            if !loss_sum.is_finite() {
                return Err(Error::Data(format!(
                    "the loss became {loss_sum} at step {step}: lower optim.lr, or set optim.clip_norm"
                )));
            }
            if fused {
                // Plain SGD on the table, applied as its gradient is formed (accum is 1). The
                // gradient itself is formed only where its norm is logged.
                model.backward_dense(&be, &params, &acts, &dlogits, &mut grads, &mut dpooled);
                if logs {
                    be.embedding_bag_backward(&dev, &dpooled, model.spec.dim, &mut sparse);
                    table_sq = Some(be.sq_norm(&sparse.values, 0..sparse.rows.len() * sparse.dim));
                }
                be.embedding_bag_sgd(&mut params, model.table, &dev, &dpooled, lr * table_mult);
            } else if micro == 0 {
                model.backward(&be, &params, &dev, &acts, &dlogits, &mut grads, &mut sparse);
            } else {
                model.backward(&be, &params, &dev, &acts, &dlogits, &mut grads, &mut extra);
                let acc = std::mem::replace(&mut sparse, SparseRows::new(be.zeros(0), model.spec.dim));
                sparse = be.sparse_add(acc, &extra);
            }
            win.loss_sum += loss_sum;
            win.docs += n as u64;
            win.tokens += batch.ids.len() as u64;
            let logits = be.download(&acts.logits);
            for (i, row) in logits.chunks(classes).enumerate() {
                let pred = row.iter().enumerate().fold(0, |b, (c, &v)| if v > row[b] { c } else { b });
                win.correct += u64::from(batch.labels[i] == pred as i32);
            }
        }
        let table_grad = if fused { TableGrad::Applied(table_sq) } else { TableGrad::Rows(&mut sparse) };
        let norm = opt.step(&be, &model.layout, model.table, &mut params, &mut grads, table_grad, lr);
        step_secs += step_start.elapsed().as_secs_f64();
        step += 1;
        bar.set_position(step);

        if logs {
            let secs = win_start.elapsed().as_secs_f64().max(1e-9);
            let (loss, acc) =
                (win.loss_sum / win.docs.max(1) as f64, win.correct as f64 / win.docs.max(1) as f64);
            let tps = win.tokens as f64 / secs;
            log.write(json!({
                "step": step, "epoch": step as f64 / steps_per_epoch as f64, "lr": lr, "loss": loss,
                "train_accuracy": acc, "grad_norm": norm, "tokens_per_s": tps, "docs_per_s": win.docs as f64 / secs,
            }))?;
            bar.set_message(format!("loss {loss:.4} acc {acc:.3} {:.0}k tok/s", tps / 1e3));
            total_tokens += win.tokens;
            win = LogWindow::default();
            win_start = Instant::now();
        }
        if step % eval_every == 0 || step == total {
            let r = eval::evaluate(&be, &model, &params, &ds, SplitKind::Val, t.eval_batch_size)?;
            if let Some(r) = &r {
                let reduced = cfg.schedule.observe(&mut plateau, r.accuracy);
                log.write(json!({
                    "step": step, "split": "val", "accuracy": r.accuracy, "macro_f1": r.macro_f1,
                    "loss": r.loss, "ece": r.ece, "lr_factor": plateau.factor, "lr_reduced": reduced,
                }))?;
            }
            val_report = r;
        }
        if step % ckpt_every == 0 || step == total || opts.stop_after == Some(step) {
            let state = TrainState {
                step,
                optim_t: opt.t,
                cursors: loader.cursors().to_vec(),
                plateau,
                config_hash,
                data_checksum: manifest.checksum.clone(),
                window: win,
            };
            let dir = checkpoint::save(
                &ckpt_root,
                &model,
                &meta,
                &params,
                [&opt.m, &opt.v],
                &state,
                t.keep_checkpoints,
            )?;
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
        eval::evaluate(&be, &model, &params, &ds, SplitKind::Test, t.eval_batch_size)?
    } else {
        None
    };
    if let Some(r) = &test {
        log.write(json!({"step": step, "split": "test", "accuracy": r.accuracy, "macro_f1": r.macro_f1, "loss": r.loss, "ece": r.ece}))?;
    }
    Ok(TrainReport {
        steps: step,
        final_checkpoint,
        val: val_report,
        test,
        tokens_per_s: (total_tokens - restored_tokens.min(total_tokens)) as f64 / step_secs.max(1e-9),
        seconds: started.elapsed().as_secs_f64(),
    })
}
