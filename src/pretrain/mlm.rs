//! Masked-LM continued pretraining of an encoder on a data set's own text (METHODS.md
//! §12b): 15% of each document's tokens are chosen (80% become [MASK], 10% a random token,
//! 10% stay), and a BERT prediction head over the last hidden rows, its decoder tied to the
//! word embeddings, learns to restore them. The result is a pretrained encoder directory
//! (`config.json`, `model.safetensors`, `tokenizer.json`) that `model.encoder.pretrained`
//! fine-tunes with any method.
//!
//! One process or several ranks (METHODS.md §15), on the CPU or any backend of `dispatch`.
//! Every rank computes the same global order of documents; the step's global batch of
//! `mlm.batch_size` documents is cut into W contiguous parts, one per rank, each rank's
//! rows keyed by their global place (masks by the document, dropout by the row), and the
//! gradients are averaged, scaled so that the loss is the mean over the global batch's
//! masked tokens. A run on 1, 2 or 4 ranks therefore takes the same steps, to float
//! rounding, and may resume on another world size.
//!
//! Every `mlm.checkpoint_every` steps a checkpoint (`checkpoints/step-N/`: the weights with
//! the run's state in their metadata, AdamW's moments, the config) lets `--resume auto`
//! continue bit for bit on the same world size: each step's batch, masks and dropout are
//! functions of the seed and the step. Rank 0 writes the checkpoints, the metrics and the
//! encoder (once, atomically, at the end), and then deletes the checkpoints.

use std::path::Path;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::backend::{
    mix64, Activation, Backend, DropoutKey, EncoderOps, GradSync, HostBatch, LossKind, RowMap,
};
use crate::checkpoint::{self, Storage};
use crate::config::PretrainConfig;
use crate::data::dataset::Dataset;
use crate::data::loader::{group_by_length, Grouping};
use crate::data::shard::SplitKind;
use crate::data::subword::SubwordTokenizer;
use crate::dist::Dist;
use crate::error::{Error, IoContext, Result};
use crate::model::encoder::{load_pretrained, Encoder, EncoderActs, Pooling, TokenBatch};
use crate::model::params::{fill_uniform, Layout, Slot};
use crate::optim::{OptimConfig, OptimKind, Optimizer, TableGrad};
use crate::train::Resume;

/// The name prefix of the head's tensors.
const HEAD_PREFIX: &str = "cls.predictions";

/// BERT's masked-LM prediction head (Hugging Face names `cls.predictions.*`): dense H→H,
/// GELU, LayerNorm, then the decoder, whose weight is the encoder's word embedding table
/// and whose bias is its own.
pub struct MlmHead {
    dense: (Slot, Slot),
    ln: (Slot, Slot),
    bias: Slot,
    word: Slot,
    hidden: usize,
    vocab: usize,
    eps: f64,
}

/// What the head's forward pass keeps for its backward pass.
pub struct MlmActs<B: Backend> {
    /// The gathered hidden rows (m×H), the dense layer's output, its activation, the LN
    /// output and statistics, and the logits (m×V).
    x: B::Buf,
    u: B::Buf,
    a: B::Buf,
    y: B::Buf,
    stats: B::Buf,
    pub logits: B::Buf,
}

impl<B: Backend> MlmActs<B> {
    pub fn new(be: &B) -> Self {
        MlmActs {
            x: be.zeros(0),
            u: be.zeros(0),
            a: be.zeros(0),
            y: be.zeros(0),
            stats: be.zeros(0),
            logits: be.zeros(0),
        }
    }
}

impl MlmHead {
    /// Adds the head's tensors to `layout` (after the encoder's).
    pub fn new(layout: &mut Layout, enc: &Encoder) -> MlmHead {
        let h = enc.spec.hidden;
        let p = HEAD_PREFIX;
        let dense = (
            layout.matrix(&format!("{p}.transform.dense.weight"), h, h),
            layout.vector(&format!("{p}.transform.dense.bias"), h),
        );
        let ln = (
            layout.vector(&format!("{p}.transform.LayerNorm.weight"), h),
            layout.vector(&format!("{p}.transform.LayerNorm.bias"), h),
        );
        let bias = layout.vector(&format!("{p}.bias"), enc.spec.vocab);
        MlmHead {
            dense,
            ln,
            bias,
            word: enc.word_slot(),
            hidden: h,
            vocab: enc.spec.vocab,
            eps: enc.spec.layer_norm_eps,
        }
    }

    /// Fresh head weights: the dense layer uniform in ±√3·0.02 (BERT's spread), LayerNorm
    /// scale 1, biases 0.
    pub fn init(&self, params: &mut [f32], seed: u64) {
        fill_uniform(&mut params[self.dense.0.range()], seed, 0x6d6c6d, 0.02 * 3f64.sqrt());
        params[self.dense.1.range()].iter_mut().for_each(|v| *v = 0.0);
        params[self.ln.0.range()].iter_mut().for_each(|v| *v = 1.0);
        params[self.ln.1.range()].iter_mut().for_each(|v| *v = 0.0);
        params[self.bias.range()].iter_mut().for_each(|v| *v = 0.0);
    }

    /// The logits (m×V) of the hidden rows that `rows` picks (one single-row bag per masked
    /// token) out of `hidden` (n×H).
    #[allow(clippy::too_many_arguments)]
    pub fn forward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        hidden: &B::Buf,
        n: usize,
        rows: &B::Batch,
        m: usize,
        acts: &mut MlmActs<B>,
    ) {
        let all = Slot { offset: 0, rows: n, cols: self.hidden };
        be.embedding_bag_forward(hidden, all, rows, &mut acts.x);
        be.linear_forward(&acts.x, m, params, self.dense.0, self.dense.1, &mut acts.u);
        be.activation_forward(Activation::GeluErf, &acts.u, &mut acts.a);
        be.layer_norm_forward(
            &acts.a,
            m,
            params,
            self.ln.0,
            self.ln.1,
            self.eps,
            &mut acts.y,
            &mut acts.stats,
        );
        be.linear_forward(&acts.y, m, params, self.word, self.bias, &mut acts.logits);
    }

    /// The backward pass for `dlogits`: the head's gradients (and the tied word table's)
    /// added into `grads`; returns the gradient of the encoder's hidden rows (n×H, zero
    /// where no token was masked).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        n: usize,
        rows: &B::Batch,
        m: usize,
        acts: &MlmActs<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
    ) -> B::Buf {
        let (mut dy, mut da, mut du, mut dx) = (be.zeros(0), be.zeros(0), be.zeros(0), be.zeros(0));
        be.linear_backward(&acts.y, m, params, self.word, self.bias, dlogits, grads, Some(&mut dy));
        be.layer_norm_backward(&acts.a, m, params, self.ln.0, self.ln.1, &acts.stats, &dy, grads, &mut da);
        be.activation_backward(Activation::GeluErf, &acts.u, &da, &mut du);
        be.linear_backward(&acts.x, m, params, self.dense.0, self.dense.1, &du, grads, Some(&mut dx));
        let mut sparse = crate::backend::SparseRows::new(be.zeros(0), self.hidden);
        be.embedding_bag_backward(rows, &dx, self.hidden, &mut sparse);
        let mut dhidden = be.zeros(n * self.hidden);
        // Sparse SGD at rate −1 adds the rows into the dense buffer.
        be.sparse_sgd(&mut dhidden, Slot { offset: 0, rows: n, cols: self.hidden }, &sparse, -1.0);
        dhidden
    }

    /// The vocabulary size (the logits' width).
    pub fn vocab(&self) -> usize {
        self.vocab
    }
}

/// A document's masked ids and its chosen (position, original id) pairs.
pub type Masked = (Vec<u32>, Vec<(usize, u32)>);

/// The masked view of one document: `seq` with the chosen positions replaced, and the
/// chosen positions with their original ids. Positions 1..len−1 are eligible (the first
/// and last are [CLS] and [SEP]); round(p·eligible) of them, at least one, are chosen by
/// a hash of (`key`, position); each becomes `mask_id` (80%), a uniform id below `vocab`
/// (10%) or stays (10%). A pure function of its arguments.
pub fn mask_tokens(seq: &[u32], p: f64, mask_id: u32, vocab: u32, key: u64) -> Masked {
    let mut out = seq.to_vec();
    let count = masked_count(seq.len(), p);
    if count == 0 {
        return (out, Vec::new());
    }
    let eligible: Vec<usize> = (1..seq.len() - 1).collect();
    let mut order: Vec<(u64, usize)> = eligible.iter().map(|&i| (mix64(key ^ mix64(i as u64)), i)).collect();
    order.sort_unstable();
    let mut chosen: Vec<(usize, u32)> = order[..count].iter().map(|&(_, i)| (i, seq[i])).collect();
    chosen.sort_unstable();
    for &(i, _) in &chosen {
        let r = mix64(key ^ mix64(i as u64) ^ 0x9e37_79b9_7f4a_7c15);
        let u = (r >> 11) as f64 / (1u64 << 53) as f64;
        if u < 0.8 {
            out[i] = mask_id;
        } else if u < 0.9 {
            out[i] = (mix64(r) % u64::from(vocab)) as u32;
        }
    }
    (out, chosen)
}

/// How many of a `len`-token document's inner tokens (all but the first and last) are
/// chosen for prediction: a share `p`, rounded, at least one; none with no inner token.
/// It never falls as `len` grows, so the data's longest documents bound a batch's count.
pub fn masked_count(len: usize, p: f64) -> usize {
    let inner = len.saturating_sub(2);
    if inner == 0 {
        return 0;
    }
    ((p * inner as f64).round() as usize).clamp(1, inner)
}

/// What a masked-LM run did.
#[derive(Debug, Clone)]
pub struct MlmReport {
    pub steps: u64,
    /// The mean masked-token loss and accuracy over the first and the last logged window
    /// (`first_loss` is `None` when the run logged a single window; the last are NaN when
    /// it logged none, as a run stopped before `mlm.log_every` steps).
    pub first_loss: Option<f64>,
    pub last_loss: f64,
    pub last_accuracy: f64,
    pub tokens_per_s: f64,
    /// The share of the run's padded token slots that were padding (`mlm.group_by_length`
    /// lowers it).
    pub padding: f64,
    /// The pretrained encoder directory written.
    pub out: std::path::PathBuf,
    /// The steps done before this call (the checkpoint resumed from; 0 for a fresh start).
    pub resumed_at: u64,
    /// `--resume auto` found this run's encoder already written: nothing was trained (the
    /// losses are NaN).
    pub already_finished: bool,
}

/// What a masked-LM checkpoint's weights file (`model.safetensors`) holds in its metadata
/// beside the tensors: where the run stands after `step` steps. The open metrics window and
/// the report's figures are kept (floats by their bits), so that a resumed run logs what an
/// uninterrupted one does.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct MlmState {
    /// [`CHECKPOINT_FORMAT`].
    format: String,
    step: u64,
    /// The step count of the optimizer in use (the head's during its warm-up), whose
    /// moments `optimizer.safetensors` holds.
    adam_t: u64,
    /// The config's trajectory hash (`super::config_hash`) and the data's checksum.
    config_hash: u64,
    data_checksum: String,
    /// The window's loss sum (bits), right predictions, masked tokens, tokens, steps, slots.
    window: [u64; 6],
    /// The first window's loss (bits), the last window's loss and accuracy (bits), the
    /// windows logged, and the run's tokens and padded slots.
    first_loss: Option<u64>,
    last: [u64; 2],
    windows: u64,
    all_tokens: u64,
    all_slots: u64,
}

/// The `format` of a masked-LM checkpoint's state.
const CHECKPOINT_FORMAT: &str = "dtrain-mlm-checkpoint";

/// What one masked-LM call is asked beside its config: where to resume, the progress bar,
/// and a stop after this many steps in all, with a checkpoint (a job's time limit; tests).
#[derive(Debug, Clone)]
pub struct MlmOptions {
    pub resume: Resume,
    pub progress: bool,
    pub stop_after: Option<u64>,
}

/// `dtrain pretrain` with `model.objective = "mlm"` as one rank of `dist` (`Dist::single()`
/// for one process), on `device` (a GPU by the rank's local rank).
pub fn pretrain(
    cfg: &PretrainConfig,
    opts: &MlmOptions,
    device: crate::backend::Device,
    dist: &Dist,
) -> Result<MlmReport> {
    struct Job<'a>(&'a PretrainConfig, &'a MlmOptions, &'a Dist);
    impl crate::backend::OnBackend for Job<'_> {
        type Out = MlmReport;
        fn run<B: EncoderOps<F = f32>>(self, be: &B) -> Result<MlmReport> {
            run(be, self.0, self.1, self.2)
        }
    }
    let say = opts.progress && dist.is_root();
    crate::backend::dispatch_with(device, dist.local_rank(), say, cfg.mlm.matmul, Job(cfg, opts, dist))
}

/// Runs masked-LM pretraining as `cfg` says on backend `be`, as one rank of `dist`.
pub fn run<B: EncoderOps<F = f32>>(
    be: &B,
    cfg: &PretrainConfig,
    opts: &MlmOptions,
    dist: &Dist,
) -> Result<MlmReport> {
    let m = &cfg.mlm;
    let t = &cfg.train;
    let (root, rank, world) = (dist.is_root(), dist.rank(), dist.world());
    let progress = opts.progress && root;
    crate::fsutil::check_run_dir_place("pretrain", "train.out_dir", &t.out_dir)?;
    let ds = Dataset::open(&cfg.data.dir)?;
    let manifest = ds.manifest();
    dist.check_job(&serde_json::to_string(cfg).expect("config serialises"), &manifest.checksum)?;
    dist.check_stop_after(opts.stop_after)?;
    // Rank 0's lock, held to the run's end, so that no second run writes here meanwhile.
    let _lock = dist.lock_run_dir(&t.out_dir, "train.out_dir")?;
    let ckpt_root = t.out_dir.join("checkpoints");
    let resume_from = super::resume_point(&opts.resume, &ckpt_root, "step")?;
    dist.check_resume(resume_from.as_deref())?;
    let hash = super::config_hash(cfg);
    let encoder_dir = t.out_dir.join("encoder");
    // Under --resume auto, a run whose encoder is written (a job requeued after it
    // finished) has nothing left to do. (`unfinished`: why what is there is not that.)
    let unfinished = match resume_from.is_none() && opts.resume == Resume::Auto {
        true => unfinished_encoder(&encoder_dir, cfg, hash, &manifest.checksum).err(),
        false => Some(String::new()),
    };
    let finished = unfinished.is_none();
    dist.check_agree(
        &["finished masked-LM pretraining in train.out_dir"],
        &[u64::from(finished)],
        "Every rank must see the same train.out_dir: give it on a file system every node shares",
    )?;
    if resume_from.is_none() {
        if finished {
            let nan = f64::NAN;
            return Ok(MlmReport {
                steps: 0,
                first_loss: None,
                last_loss: nan,
                last_accuracy: nan,
                tokens_per_s: 0.0,
                padding: nan,
                out: encoder_dir,
                resumed_at: 0,
                already_finished: true,
            });
        }
        // A fresh start writes these, and at its end removes its checkpoints: nothing of
        // another run may be there (its encoder/ may even be this run's mlm.pretrained).
        // Under --resume auto, an interrupted run's metrics (before its first checkpoint)
        // are started over.
        let fresh = opts.resume == Resume::No;
        let earlier: Vec<&str> = [("metrics.jsonl", fresh), ("encoder", true), ("checkpoints", fresh)]
            .into_iter()
            .filter_map(|(name, refused)| refused.then_some(name))
            .collect();
        let why = unfinished.as_deref().filter(|_| opts.resume == Resume::Auto);
        let run = "masked-LM pretraining";
        super::check_fresh_start(&t.out_dir, &earlier, run, "step", "masked_accuracy", why)?;
        if encoder_dir.exists() && !encoder_dir.is_dir() {
            return Err(Error::bad_file(
                &encoder_dir,
                "is in the way of the encoder directory this run writes at its end: move it away",
            ));
        }
    }
    let Some(sw) = &manifest.tokenizer.subword else {
        return Err(Error::config(
            "pretrain",
            "model.objective",
            format!(
                "mlm reads subword ids, and {} holds hashed features: prepare it with --set tokenizer.subword.path=.../tokenizer.json",
                cfg.data.dir.display()
            ),
        ));
    };
    let tok = SubwordTokenizer::for_spec(sw)?;
    let mask_id = tok.token_id("[MASK]").or_else(|| tok.token_id("<mask>")).ok_or_else(|| {
        Error::bad_file(Path::new(&sw.path), "has no [MASK] (or <mask>) token for masked-LM pretraining")
    })?;
    let dir = m.pretrained.as_ref().expect("validated: mlm.pretrained");
    // Available memory is read before the pretrained weights take theirs; the ranks of a
    // node share it.
    let mut budget = crate::hostmem::Budget::new("pretrain", dist.local_size())?;
    crate::model::encoder::check_tokenizer(dir, sw)
        .map_err(|e| Error::config("pretrain", "mlm.pretrained", e.to_string()))?;
    let (enc, loaded) = load_pretrained(dir, 1, Pooling::Mean, t.seed)?;
    if let Some(why) = enc.spec.uncovered(manifest.tokenizer.buckets, sw) {
        return Err(Error::config("pretrain", "mlm.pretrained", format!("{} {why}", dir.display())));
    }
    let mut spec = enc.spec.clone();
    spec.dropout = m.dropout.unwrap_or(spec.dropout);
    spec.attention_dropout = m.attention_dropout.unwrap_or(spec.attention_dropout);
    let mut enc = Encoder::new(spec);
    let body = enc.clone();
    let head = MlmHead::new(&mut enc.layout, &body);
    // Parameters, gradient and AdamW's two moments, the head warm-up's moments beside them
    // while it lasts, and the activations; on a device only the host copy of the parameters.
    let params_bytes = enc.layout.total() as u64 * 4;
    let shrink = "pretrain a smaller encoder (mlm.pretrained)";
    budget.add("the encoder's parameters", params_bytes, "mlm.pretrained", shrink);
    if be.is_host() {
        budget.add("its gradient and optimizer moments", 3 * params_bytes, "mlm.pretrained", shrink);
        if m.head_warmup_steps > 0 {
            let why = "mlm.head_warmup_steps = 0 keeps no second optimizer";
            budget.add("the head warm-up's moments", 2 * params_bytes, "mlm.head_warmup_steps", why);
        }
        // This rank's part of a batch, its sequences at the data's longest, and the head's
        // logits and their gradient over the vocabulary for the tokens chosen for prediction.
        let len = sw.max_len as usize;
        let seqs = m.batch_size.div_ceil(world);
        let picked = (masked_count(len, m.mask_prob) * seqs) as u64;
        let acts =
            enc.spec.activation_bytes(seqs, len, true) + picked.saturating_mul(2 * enc.spec.vocab as u64 * 4);
        let why = "lower mlm.batch_size, or prepare the data with a smaller tokenizer.subword.max_len";
        let what = format!("the activations ({seqs} sequences × {len} tokens)");
        budget.add(what, acts, "mlm.batch_size", why);
    }
    budget.check()?;
    let layout = enc.layout.clone();
    let (state, host, moments) = match &resume_from {
        Some(dir) => {
            drop(loaded);
            let (state, weights, moments) = read_checkpoint(dir, cfg, &layout, hash, &manifest.checksum)?;
            (Some(state), weights, Some(moments))
        }
        None => {
            let mut host = vec![0f32; layout.total()];
            host[..loaded.len()].copy_from_slice(&loaded);
            drop(loaded);
            head.init(&mut host, t.seed);
            (None, host, None)
        }
    };
    let none = Slot { offset: layout.total(), rows: 0, cols: 0 };
    let ocfg = OptimConfig {
        kind: OptimKind::Adamw,
        lr: t.lr,
        weight_decay: m.weight_decay,
        ..OptimConfig::default()
    };
    // The head's warm-up has an optimizer of its own, whose multipliers give every tensor
    // but the head's a rate of 0 (no update, no weight decay); it is dropped when the
    // warm-up ends, with whatever moments it kept, and the full run starts from fresh ones.
    let hw = m.head_warmup_steps;
    let mut head_opt = (hw > 0).then(|| {
        let mut c = ocfg.clone();
        c.lr_mult = [(String::new(), 0.0), (HEAD_PREFIX.to_string(), 1.0)].into();
        Optimizer::new(be, &layout, none, c)
    });
    let mut opt = Optimizer::new(be, &layout, none, ocfg);
    let first_step = state.as_ref().map_or(0, |s| s.step);
    if let (Some(state), Some([mm, vv])) = (&state, moments) {
        // The moments are the optimizer's in use at that step: the head's during its
        // warm-up (the full run's are then still fresh), the full run's after it.
        let o = if first_step < hw {
            head_opt.as_mut().expect("a head optimizer while step < hw")
        } else {
            &mut opt
        };
        (o.m, o.v, o.t) = (be.upload_vec(mm), be.upload_vec(vv), state.adam_t);
    }
    if first_step >= hw {
        // A run resumed past the head's warm-up keeps no optimizer for it.
        head_opt = None;
    }
    let mut params = be.upload_vec(host);
    let mut grads = be.zeros(layout.total());
    let mut no_rows = crate::backend::SparseRows::new(be.zeros(0), 1);

    // Every document of the chosen splits, reshuffled each epoch: (split, shard, row), 12
    // bytes a document (shards and rows are below 2^32, as the shard format's counts).
    let mut docs: Vec<(SplitKind, u32, u32)> = Vec::new();
    // The loader checks each document's ids against the vocabulary, not every byte: the
    // payload checksums catch the rest before a step reads a damaged shard. Each rank
    // checks every W-th shard of a split (a failure on one ends the job).
    ds.verify_payloads(|split, i| i % world == rank && cfg.data.splits.iter().any(|n| n == split.name()))?;
    for name in &cfg.data.splits {
        let split = SplitKind::from_name(name).expect("validated split name");
        for (si, shard) in ds.shards(split).iter().enumerate() {
            // Read in a shuffled order, as a training loader's.
            shard.advise_random();
            docs.extend((0..shard.len() as u32).map(|i| (split, si as u32, i)));
        }
    }
    if docs.is_empty() {
        return Err(Error::Data(format!(
            "{}: the splits {:?} hold no document",
            cfg.data.dir.display(),
            cfg.data.splits
        )));
    }
    // A document of its special tokens alone ([CLS] [SEP]) has nothing to mask.
    let doc_at = |(split, si, i): (SplitKind, u32, u32)| ds.shards(split)[si as usize].doc(i as usize);
    if !docs.iter().any(|&at| doc_at(at).ids.len() > 2) {
        return Err(Error::Data(format!(
            "{}: no document of the splits {:?} has a token between its opening and closing special tokens to mask",
            cfg.data.dir.display(),
            cfg.data.splits
        )));
    }
    let per_epoch = docs.len().div_ceil(m.batch_size) as u64;
    let total = m.steps.unwrap_or(per_epoch * u64::from(t.epochs));
    // The warmup's last step reaches the full rate ((s + 1) / warmup_steps).
    if m.warmup_steps > total {
        return Err(Error::config(
            "pretrain",
            "mlm.warmup_steps",
            format!("{} is longer than the run's {total} steps: it never reaches train.lr", m.warmup_steps),
        ));
    }
    let steps = hw + total;
    if let Some(stop) = opts.stop_after {
        if stop <= first_step || stop >= steps {
            return Err(Error::Data(format!(
                "--stop-after {stop}: must be a step after the run's {first_step} and before its end at step {steps}"
            )));
        }
    }
    let log_path = t.out_dir.join("metrics.jsonl");
    // Rank 0's metrics; a resumed run's records past its checkpoint are written again.
    let mut log = if root {
        crate::fsutil::create_dirs(&t.out_dir)?;
        Some(crate::fsutil::reopen_metrics(&log_path, "step", |s, _| s <= first_step)?)
    } else {
        None
    };
    // The dense gradient's path between ranks (the same choice on every rank).
    dist.bind(be)?;
    let bar = if progress {
        let b = ProgressBar::with_draw_target(Some(steps), ProgressDrawTarget::stderr());
        b.set_position(first_step);
        b.set_style(
            ProgressStyle::with_template("mlm [{wide_bar}] {pos}/{len} {msg} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let vocab = head.vocab();
    let (mut acts, mut hacts) = (EncoderActs::new(be), MlmActs::new(be));
    let (mut dlogits, mut row_loss) = (be.zeros(0), be.zeros(0));
    let (mut win_loss, mut win_right, mut win_masked, mut win_tokens, mut win_steps) =
        (0.0, 0u64, 0u64, 0u64, 0u64);
    // (NaN until a window is logged.)
    let (mut first_loss, mut last_loss, mut last_acc, mut windows) = (None, f64::NAN, f64::NAN, 0u64);
    let (mut step_secs, mut all_tokens, mut all_slots, mut win_slots) = (0.0f64, 0u64, 0u64, 0u64);
    if let Some(st) = &state {
        let [l, r, k, tk, n, sl] = st.window;
        (win_loss, win_right, win_masked, win_tokens, win_steps, win_slots) =
            (f64::from_bits(l), r, k, tk, n, sl);
        (first_loss, windows) = (st.first_loss.map(f64::from_bits), st.windows);
        (last_loss, last_acc) = (f64::from_bits(st.last[0]), f64::from_bits(st.last[1]));
        (all_tokens, all_slots) = (st.all_tokens, st.all_slots);
    }
    let mut order = docs.clone();
    let limits = crate::data::shard::DocLimits::of(&manifest.tokenizer);
    // The throughput logged: tokens since `started` (a resumed window's earlier steps ran
    // in another process); and this call's tokens, for the report's.
    let (mut started, mut timed_tokens, tokens_before) = (Instant::now(), 0u64, all_tokens);
    // The step after which `--stop-after` stopped the run.
    let mut stopped = None;
    for step in first_step..steps {
        let epoch = step / per_epoch;
        if step % per_epoch == 0 || step == first_step {
            order.clone_from(&docs);
            shuffle(&mut order, mix64(t.seed ^ mix64(epoch)));
            let group = Grouping { batch: m.batch_size, window: m.group_by_length };
            let len = |at| doc_at(at).ids.len();
            group_by_length(&mut order, len, group, t.seed, epoch << 24);
        }
        dist.set_step(step);
        let at = (step % per_epoch) as usize * m.batch_size;
        let global = &order[at..(at + m.batch_size).min(order.len())];
        // This rank's contiguous part of the global batch, from global row `lo`.
        let (lo, hi) = (global.len() * rank / world, global.len() * (rank + 1) / world);
        let picked = &global[lo..hi];
        let step_start = Instant::now();
        let mut seqs = Vec::with_capacity(picked.len());
        let mut targets = HostBatch::default();
        let mut l = 0;
        let masked: Vec<Masked> = picked
            .iter()
            .map(|&(split, si, i)| {
                let doc = ds.shards(split)[si as usize].doc_checked(i as usize, limits)?;
                let key = mix64(t.seed ^ mix64(step) ^ mix64(doc.sample_id));
                Ok(mask_tokens(doc.ids, m.mask_prob, mask_id, manifest.tokenizer.buckets, key))
            })
            .collect::<Result<_>>()?;
        for (s, _) in &masked {
            l = l.max(s.len());
        }
        for (r, (s, chosen)) in masked.iter().enumerate() {
            for &(pos, id) in chosen {
                targets.push(&[(r * l + pos) as u32], id as i32);
            }
            seqs.push(s.clone());
        }
        let tb = TokenBatch::new(&seqs, 0);
        let n = tb.b * tb.l;
        let k = targets.len();
        let tokens: u64 = seqs.iter().map(|s| s.len() as u64).sum();
        // The global batch's masked tokens, tokens and padded slots.
        let mut counts = [k as u64, tokens, n as u64];
        dist.sum("the masked-LM batch's counts", &mut counts);
        let [k_all, tokens_all, slots_all] = counts;
        // The rate of this step: the head's constant one during its warm-up, then warmup
        // and linear decay over the full run.
        let lr = match step.checked_sub(hw) {
            None => m.head_warmup_lr,
            Some(s) => {
                let warm = if m.warmup_steps > 0 && s < m.warmup_steps {
                    (s + 1) as f64 / m.warmup_steps as f64
                } else {
                    1.0
                };
                let decay = if s >= m.warmup_steps {
                    1.0 - (s - m.warmup_steps) as f64 / (total - m.warmup_steps).max(1) as f64
                } else {
                    1.0
                };
                t.lr * warm * decay
            }
        };
        // A global batch in which no token was masked has nothing to learn from; the step
        // still counts (its schedule, the phase's end and the logging boundaries). A rank
        // whose part has none takes part in the averages with a zero gradient.
        if k_all > 0 {
            // Each rank's gradient is scaled by W/K (K the global batch's masked tokens): the
            // average over the ranks is then the gradient of the global mean loss.
            let scale = (world as f64 / k_all as f64) as f32;
            let rows = (k > 0).then(|| be.upload_batch(&targets));
            let (mut sums, mut dhidden) = ([0f64; 2], None);
            if let Some(rows) = &rows {
                let noise = (enc.spec.dropout > 0.0 || enc.spec.attention_dropout > 0.0).then(|| {
                    let rows = RowMap::at(lo as u64);
                    (DropoutKey { seed: t.seed, step, site: 0, pass: 0, rows }, enc.spec.dropout)
                });
                enc.forward(be, &params, &tb, noise, &mut acts);
                head.forward(be, &params, &acts.hidden, n, rows, k, &mut hacts);
                let smooth = LossKind::CrossEntropy { smoothing: 0.0 };
                sums[0] =
                    be.softmax_loss(&hacts.logits, vocab, rows, smooth, scale, &mut dlogits, &mut row_loss);
                let logits = be.download(&hacts.logits);
                sums[1] = logits
                    .chunks(vocab)
                    .zip(&targets.labels)
                    .filter(|(z, y)| crate::backend::argmax(z) as i32 == **y)
                    .count() as f64;
            }
            // The global mean loss and right predictions, the same on every rank (so that
            // all stop together on a divergence).
            dist.sum("the masked-LM loss", &mut sums);
            let loss = sums[0] / k_all as f64;
            // A guess uniform over the vocabulary costs ln(vocab) a token; ten times that
            // (as skip-gram's check) is a run that diverged.
            let uniform = (vocab as f64).ln();
            if !loss.is_finite() || loss > 10.0 * uniform {
                // The rate in use: the head warm-up's, or the run's.
                let field = if step < hw { "mlm.head_warmup_lr" } else { "train.lr" };
                return Err(Error::Data(format!(
                    "the masked-LM loss became {loss} at step {} (lr {lr:e}; a uniform guess over the {vocab} \
                     tokens costs {uniform:.2}): the run diverged; lower {field}",
                    step + 1
                )));
            }
            if let Some(rows) = &rows {
                dhidden = Some(head.backward(be, &params, n, rows, k, &hacts, &dlogits, &mut grads));
            }
            if step >= hw {
                // (During the head's warm-up, no backward pass through the body.)
                if let Some(dh) = dhidden {
                    enc.backward_hidden(be, &params, &tb, &acts, dh, &mut grads, None, None);
                }
            }
            <Dist as GradSync<B>>::average(dist, be, &mut grads, None, 0);
            if step < hw {
                // The head alone; the tied decoder's gradient on the word table meets a rate
                // of 0 (and is zeroed below).
                let ho = head_opt.as_mut().expect("a head optimizer while step < hw");
                ho.step(be, &layout, none, &mut params, &mut grads, TableGrad::Rows(&mut no_rows), lr);
            } else {
                opt.step(be, &layout, none, &mut params, &mut grads, TableGrad::Rows(&mut no_rows), lr);
            }
            be.fill_zero(&mut grads);
            (win_loss, win_right, win_masked, win_tokens, win_steps) = (
                win_loss + loss,
                win_right + sums[1] as u64,
                win_masked + k_all,
                win_tokens + tokens_all,
                win_steps + 1,
            );
            timed_tokens += tokens_all;
            all_tokens += tokens_all;
            all_slots += slots_all;
            win_slots += slots_all;
        }
        if step + 1 == hw {
            head_opt = None;
        }
        step_secs += step_start.elapsed().as_secs_f64();
        bar.set_position(step + 1);
        let boundary = (step + 1) % m.log_every == 0 || step + 1 == hw || step + 1 == steps;
        if boundary && win_steps > 0 {
            let secs = started.elapsed().as_secs_f64().max(1e-9);
            let (ml, acc) = (win_loss / win_steps as f64, win_right as f64 / win_masked.max(1) as f64);
            first_loss.get_or_insert(ml);
            (last_loss, last_acc, windows) = (ml, acc, windows + 1);
            let padding = 1.0 - win_tokens as f64 / win_slots.max(1) as f64;
            let phase = if step < hw { "head" } else { "full" };
            let rec = json!({"step": step + 1, "epoch": (step + 1) as f64 / per_epoch as f64, "phase": phase, "lr": lr,
                             "loss": ml, "masked_accuracy": acc, "tokens_per_s": timed_tokens as f64 / secs,
                             "padding": padding});
            if let Some(log) = &mut log {
                crate::fsutil::append_record(log, &rec, &log_path)?;
            }
            bar.set_message(format!("loss {ml:.3} acc {acc:.3} {:.0} tok/s", timed_tokens as f64 / secs));
            (win_loss, win_right, win_masked, win_tokens, win_steps, win_slots) = (0.0, 0, 0, 0, 0, 0);
            timed_tokens = 0;
            started = Instant::now();
        }
        let done = step + 1;
        let stop = opts.stop_after == Some(done);
        // Rank 0 writes (the ranks' weights and moments are the same).
        if root && (stop || m.checkpoint_every > 0 && done % m.checkpoint_every == 0) && done < steps {
            let o =
                if done < hw { head_opt.as_ref().expect("a head optimizer while step < hw") } else { &opt };
            let state = MlmState {
                format: CHECKPOINT_FORMAT.into(),
                step: done,
                adam_t: o.t,
                config_hash: hash,
                data_checksum: manifest.checksum.clone(),
                window: [win_loss.to_bits(), win_right, win_masked, win_tokens, win_steps, win_slots],
                first_loss: first_loss.map(f64::to_bits),
                last: [last_loss.to_bits(), last_acc.to_bits()],
                windows,
                all_tokens,
                all_slots,
            };
            write_checkpoint(be, &ckpt_root, t.keep_checkpoints, &layout, &params, o, &state, cfg)?;
        }
        if stop {
            stopped = Some(done);
            break;
        }
    }
    bar.finish_and_clear();
    let report = |steps, out| MlmReport {
        steps,
        first_loss: first_loss.filter(|_| windows > 1),
        last_loss,
        last_accuracy: last_acc,
        tokens_per_s: (all_tokens - tokens_before) as f64 / step_secs.max(1e-9),
        padding: 1.0 - all_tokens as f64 / all_slots.max(1) as f64,
        out,
        resumed_at: first_step,
        already_finished: false,
    };
    // Every rank waits for rank 0's last writes (a failed write ends the job), so the job
    // ends when its files are complete, whatever the launcher does with ranks that exit.
    let end = "the end of masked-LM pretraining";
    if let Some(done) = stopped {
        dist.barrier(end);
        return Ok(report(done, ckpt_root.join(checkpoint::dir_name(done))));
    }
    if !root {
        dist.barrier(end);
        return Ok(report(steps, encoder_dir));
    }
    // The pretrained encoder directory: the source's config.json with this data set's
    // tokenizer.json, and every tensor (the encoder's in Hugging Face names, plus the head).
    let host = crate::backend::host_view(be, &params).into_owned();
    let config_src = dir.join("config.json");
    let config_bytes = std::fs::read(&config_src).at(&config_src)?;
    let tok_bytes = std::fs::read(&sw.path).at(Path::new(&sw.path))?;
    let trajectory: serde_json::Value =
        serde_json::from_str(&super::trajectory_config(cfg)).expect("the config's own JSON");
    let meta = json!({"format": "dtrain-mlm", "source": dir.display().to_string(), "steps": steps,
                      "head_warmup_steps": hw, "config_hash": hash, "data_checksum": manifest.checksum,
                      "config": trajectory});
    let out = crate::checkpoint::stage(&t.out_dir, "encoder", 1, |tmp| {
        crate::fsutil::write_atomic(&tmp.join("config.json"), &config_bytes)?;
        crate::fsutil::write_atomic(&tmp.join("tokenizer.json"), &tok_bytes)?;
        crate::checkpoint::tensors_to_file(
            &tmp.join("model.safetensors"),
            &layout,
            &[("", &host)],
            meta,
            crate::checkpoint::Storage::Whole,
        )
    })?;
    // This run's step checkpoints (finished or interrupted), then the directory if nothing
    // else is in it.
    for c in checkpoint::list_named(&ckpt_root, "step")? {
        std::fs::remove_dir_all(&c).at(&c)?;
    }
    let _ = std::fs::remove_dir(&ckpt_root);
    dist.barrier(end);
    Ok(report(steps, out))
}

/// Whether `dir` holds the encoder of a finished masked-LM run of `cfg` (trajectory `hash`)
/// on this data (`data_checksum`), intact by its `DONE` record; if not, why.
fn unfinished_encoder(
    dir: &Path,
    cfg: &PretrainConfig,
    hash: u64,
    data_checksum: &str,
) -> std::result::Result<(), String> {
    checkpoint::check_written(dir, checkpoint::Reading::All).map_err(|e| e.to_string())?;
    // A masked-LM run always records its files in DONE: an empty one (which the check
    // above lets pass, for checkpoints older than the record) is damage here.
    let done = dir.join(checkpoint::DONE);
    if std::fs::metadata(&done).is_ok_and(|m| m.len() == 0) {
        return Err(format!("{} is empty, and a masked-LM run records its files there", done.display()));
    }
    let file = dir.join("model.safetensors");
    let meta = checkpoint::map(&file)
        .and_then(|bytes| checkpoint::file_meta(&file, &bytes))
        .map_err(|e| e.to_string())?;
    if meta["format"] != "dtrain-mlm" {
        return Err(format!(
            "{} is not a masked-LM run's encoder (format {})",
            file.display(),
            meta["format"]
        ));
    }
    let then = (
        meta["config_hash"].as_u64().unwrap_or(0),
        meta.get("config"),
        meta["data_checksum"].as_str().unwrap_or(""),
    );
    super::other_run(then, cfg, hash, data_checksum).map_or(Ok(()), Err)
}

/// Writes the checkpoint of the run after `state.step` steps under `root` (keeping the
/// newest `keep`): the weights with `state` in their metadata, the moments of `opt` (the
/// optimizer in use), and the config (so that a resume under another can name the fields
/// that differ).
#[allow(clippy::too_many_arguments)]
fn write_checkpoint<B: Backend<F = f32>>(
    be: &B,
    root: &Path,
    keep: usize,
    layout: &Layout,
    params: &B::Buf,
    opt: &Optimizer<B>,
    state: &MlmState,
    cfg: &PretrainConfig,
) -> Result<std::path::PathBuf> {
    let weights = crate::backend::host_view(be, params);
    let (m, v) = (crate::backend::host_view(be, &opt.m), crate::backend::host_view(be, &opt.v));
    let meta = serde_json::to_value(state).map_err(|e| Error::Data(format!("masked-LM state: {e}")))?;
    checkpoint::stage(root, &checkpoint::dir_name(state.step), keep, |dir| {
        checkpoint::tensors_to_file(
            &dir.join("model.safetensors"),
            layout,
            &[("", &*weights)],
            meta,
            Storage::Whole,
        )?;
        checkpoint::tensors_to_file(
            &dir.join("optimizer.safetensors"),
            layout,
            &[("m.", &*m), ("v.", &*v)],
            json!({}),
            Storage::ByRows,
        )?;
        crate::fsutil::write_atomic(
            &dir.join(checkpoint::CONFIG_FILE),
            super::trajectory_config(cfg).as_bytes(),
        )
    })
}

/// Reads the masked-LM checkpoint `dir` for a run of `cfg` (trajectory `hash`) on data of
/// `data_checksum` with parameters `layout`: its state, weights and the two moments.
fn read_checkpoint(
    dir: &Path,
    cfg: &PretrainConfig,
    layout: &Layout,
    hash: u64,
    data_checksum: &str,
) -> Result<(MlmState, Vec<f32>, [Vec<f32>; 2])> {
    checkpoint::check_written(dir, checkpoint::Reading::All)?;
    if dir.join(super::embeddings::EMBEDDINGS_FILE).is_file() {
        return Err(Error::bad_file(
            dir,
            "is a skip-gram or CBOW checkpoint (it holds embeddings.safetensors), not a masked-LM one",
        ));
    }
    let file = dir.join("model.safetensors");
    let bytes = checkpoint::map(&file)?;
    let meta = checkpoint::file_meta(&file, &bytes)?;
    match meta["format"].as_str() {
        Some(CHECKPOINT_FORMAT) => {}
        Some("dtrain-mlm") => {
            return Err(Error::bad_file(
                dir,
                "is a finished masked-LM run's encoder, not a checkpoint: fine-tune from it with \
                 model.encoder.pretrained, or continue pretraining it with mlm.pretrained",
            ))
        }
        other => {
            return Err(Error::bad_file(
                &file,
                format!(
                    "not a masked-LM checkpoint (format {}, expected `{CHECKPOINT_FORMAT}`)",
                    other.unwrap_or("none")
                ),
            ))
        }
    }
    let state: MlmState = serde_json::from_value(meta).map_err(|e| {
        Error::bad_file(&file, format!("not a masked-LM checkpoint (its metadata does not parse: {e})"))
    })?;
    if state.data_checksum != data_checksum {
        return Err(Error::bad_file(
            dir,
            format!(
                "the checkpoint was written on a different data set (checksum {}, {} has {data_checksum})",
                state.data_checksum,
                cfg.data.dir.display()
            ),
        ));
    }
    if state.config_hash != hash {
        return Err(Error::bad_file(dir, super::config_mismatch(dir, cfg)));
    }
    checkpoint::check_named(
        dir,
        "step",
        state.step,
        &checkpoint::dir_name(state.step),
        "the masked-LM state",
    )?;
    let n = layout.total();
    let weights = checkpoint::tensors_from_file(&file, &bytes, layout, &[("", n)], Storage::Whole)?.remove(0);
    let file = dir.join("optimizer.safetensors");
    let bytes = checkpoint::map(&file)?;
    let mut moments =
        checkpoint::tensors_from_file(&file, &bytes, layout, &[("m.", n), ("v.", n)], Storage::ByRows)?;
    let v = moments.pop().expect("two moments");
    let m = moments.pop().expect("two moments");
    Ok((state, weights, [m, v]))
}

/// Fisher–Yates with a counter-based stream from `key`.
fn shuffle<T>(v: &mut [T], key: u64) {
    for i in (1..v.len()).rev() {
        let j = (mix64(key ^ mix64(i as u64)) % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masking_picks_15_percent_of_the_inner_tokens_and_is_deterministic() {
        let seq: Vec<u32> = (0..102).map(|i| 1000 + i).collect();
        let (a, chosen) = mask_tokens(&seq, 0.15, 103, 30_000, 7);
        assert_eq!(chosen.len(), 15, "round(0.15 · 100 inner tokens)");
        assert!(chosen.iter().all(|&(i, id)| i > 0 && i < 101 && id == seq[i]));
        assert_eq!((a[0], a[101]), (seq[0], seq[101]), "[CLS] and [SEP] stay");
        let unchosen: Vec<usize> = (0..102).filter(|i| !chosen.iter().any(|c| c.0 == *i)).collect();
        assert!(unchosen.iter().all(|&i| a[i] == seq[i]));
        assert_eq!(mask_tokens(&seq, 0.15, 103, 30_000, 7), (a, chosen), "a pure function of its key");
        // Over many keys: about 80% [MASK], 10% random, 10% unchanged.
        let (mut mask, mut same, mut all) = (0, 0, 0);
        for key in 0..400 {
            let (a, chosen) = mask_tokens(&seq, 0.15, 103, 30_000, key);
            for (i, id) in chosen {
                all += 1;
                mask += usize::from(a[i] == 103);
                same += usize::from(a[i] == id);
            }
        }
        let (fm, fs) = (mask as f64 / all as f64, same as f64 / all as f64);
        assert!((fm - 0.8).abs() < 0.02 && (fs - 0.1).abs() < 0.02, "[MASK] {fm}, unchanged {fs}");
        // A document of [CLS] x [SEP] masks its one inner token; shorter ones nothing.
        assert_eq!(mask_tokens(&[1, 2, 3], 0.15, 9, 10, 0).1, vec![(1, 2)]);
        assert!(mask_tokens(&[1, 3], 0.15, 9, 10, 0).1.is_empty());
    }
}
