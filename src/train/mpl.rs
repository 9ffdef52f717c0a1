//! Meta Pseudo Labels in the training loop: the teacher (a bag model, or reduced MPL's MLP
//! over exported logits) with its optimizer, each step's inputs cut from a micro-batch, the
//! logging sums, and the teacher's part of a checkpoint. The step itself is
//! [`crate::algo::mpl::step`].

use std::path::Path;

use crate::algo::mpl::{self, Draw, MplBatch, MplSettings, MplState, StepPlan};
use crate::algo::Recipe;
use crate::backend::{host_view, Activation, DropoutKey, EncoderOps, RowMap};
use crate::checkpoint::{self, LogWindow, ModelMeta, Part};
use crate::config::TrainConfig;
use crate::data::dataset::Dataset;
use crate::data::shard::SplitKind;
use crate::dist::Dist;
use crate::error::{Error, Result};
use crate::logits::LogitsFile;

use crate::model::params::{Layout, Slot};
use crate::model::Model;
use crate::optim::{moment_lens, Optimizer};

use super::net::{DenseNet, ModelBufs, ModelNet};
use super::step::{pseudo_label_diagnostics, Micro};

/// The pass bit of the teacher's noisy pass, apart from the student's.
const TEACHER_PASS: u32 = 2;

/// MPL's teacher. (One per run, so the variants' size difference costs nothing.)
#[allow(clippy::large_enum_variant)]
pub(super) enum Teacher<B: EncoderOps<F = f32>> {
    /// A bag model of its own spec (`[mpl.teacher]`), reading the text.
    Bag { model: Model, meta: ModelMeta, params: B::Buf, opt: Optimizer<B>, bufs: ModelBufs<B> },
    /// Reduced MPL: g(z) = z + MLP(z) over a fixed teacher's exported logits.
    Reduced { net: DenseNet<B>, logits: LogitsFile, train_logits: Option<LogitsFile>, labels: Vec<String> },
}

impl<B: EncoderOps<F = f32>> Teacher<B> {
    /// The teacher's parameters and optimizer, whichever kind it is.
    fn state_mut(&mut self) -> (&mut B::Buf, &mut Optimizer<B>) {
        match self {
            Teacher::Bag { params, opt, .. } => (params, opt),
            Teacher::Reduced { net, .. } => (&mut net.params, &mut net.opt),
        }
    }
}

/// MPL's state in a run besides the student's.
pub(super) struct MplRun<B: EncoderOps<F = f32>> {
    pub(super) teacher: Teacher<B>,
    settings: MplSettings,
    pub(super) state: MplState,
    student_bufs: ModelBufs<B>,
    /// The teacher's base learning rate over the student's (the schedule and the
    /// ramp-down scale both).
    teacher_lr_ratio: f64,
    /// The teacher's configured β₁, which the ramp-down pulls towards 0.5 as the student's.
    teacher_beta1: f64,
    uda_steps: u64,
    /// Steps from here on finetune the student on the labels alone.
    finetune_from: u64,
    seed: u64,
    /// What to try when a loss stops being finite ([`super::step::divergence_remedy`]).
    remedy: String,
}

/// What the loop needs of one MPL step.
pub(super) struct MplStepOut {
    /// The student's loss (pseudo-label CE, or labeled CE when finetuning).
    pub(super) loss: f64,
    /// The student's gradient norm.
    pub(super) norm: f64,
}

/// The exported logits files a run reads: Noisy Student's, reduced MPL's.
pub(super) fn logits_files(cfg: &TrainConfig) -> Vec<&Path> {
    use crate::algo::Method;
    match cfg.method {
        Method::NoisyStudent => cfg.noisy_student.logits.iter().map(|p| p.as_path()).collect(),
        Method::MplReduced => {
            cfg.mpl.logits.iter().chain(cfg.mpl.train_logits.iter()).map(|p| p.as_path()).collect()
        }
        _ => Vec::new(),
    }
}

impl<B: EncoderOps<F = f32>> MplRun<B> {
    /// The teacher and settings of `cfg`; the student is the run's `student` model.
    /// `account`: the run's memory account, which the teacher's buffers join.
    /// `resumed_teacher`: the teacher's model in the checkpoint the run resumes from (a
    /// pretrained encoder teacher takes its shape from it, not from its directory).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        be: &B,
        cfg: &TrainConfig,
        ds: &Dataset,
        student: &Model,
        recipe: &Recipe,
        total: u64,
        progress: bool,
        account: &mut super::Account,
        resumed_teacher: Option<crate::model::ModelSpec>,
    ) -> Result<Self> {
        let manifest = ds.manifest();
        let teacher_optim = cfg.mpl.teacher_optim.clone().unwrap_or_else(|| cfg.optim.clone());
        let seed = crate::backend::mix64(cfg.train.seed ^ 0x4d50_4c00);
        let teacher = match cfg.method {
            crate::algo::Method::Mpl => {
                let mcfg = cfg.mpl.teacher.clone().unwrap_or_else(|| cfg.model.clone());
                let (section, optim_field) = (
                    if cfg.mpl.teacher.is_some() { "mpl.teacher" } else { "model" },
                    if cfg.mpl.teacher_optim.is_some() { "mpl.teacher_optim" } else { "optim" },
                );
                let resuming = resumed_teacher.is_some();
                let (model, mut params) =
                    super::build_model(&mcfg, section, manifest, seed, resumed_teacher, |m| {
                        let o = &teacher_optim;
                        super::claim_training(account, "MPL's teacher", section, m, o, optim_field, &[], &[])
                    })?;
                // A resumed run's teacher takes its table from the checkpoint (the
                // embeddings' directory is not read: it may have moved).
                if let (Some(path), Some(bag), false) = (&mcfg.init_from, model.bag(), resuming) {
                    super::init_table(path, manifest, bag, &mut params, "mpl.teacher", progress)?;
                }
                // The teacher's own layer-wise decay (`mpl.teacher.encoder.layer_lr_decay`, or
                // the copied `model`'s); its own multipliers must name its own tensors (the
                // student's `[optim]`, when it serves both, was checked against the student's).
                if cfg.mpl.teacher_optim.is_some() {
                    super::check_lr_mult(&teacher_optim, optim_field, model.layout())?;
                }
                let o = super::optim_config(&teacher_optim, mcfg.encoder.layer_lr_decay, &model);
                let opt = Optimizer::new(be, model.layout(), model.table(), o);
                let bufs = ModelBufs::new(be, &model);
                let meta = super::model_meta(&model, manifest);
                let params = be.upload_vec(params);
                Teacher::Bag { model, meta, params, opt, bufs }
            }
            _ => {
                let path = cfg.mpl.logits.as_ref().expect("validated: mpl.logits");
                let logits = super::open_logits(path, "mpl.logits")?;
                logits.check_matches(ds, SplitKind::Unlabeled)?;
                // Its rows are gathered at random, as the unlabeled batches draw them.
                logits.advise_random();
                let train_logits = match &cfg.mpl.train_logits {
                    Some(p) => {
                        let f = super::open_logits(p, "mpl.train_logits")?;
                        f.check_matches(ds, SplitKind::Train)?;
                        f.advise_random();
                        // Both files must be one teacher's (where they record it).
                        if let (Some(a), Some(b)) = (logits.source, f.source) {
                            if a != b {
                                return Err(Error::config(
                                    "train",
                                    "mpl.train_logits",
                                    format!(
                                        "{} was exported by other weights ({b:016x}) than mpl.logits {} ({a:016x}): export both from the same checkpoint",
                                        p.display(),
                                        path.display()
                                    ),
                                ));
                            }
                        }
                        Some(f)
                    }
                    None => None,
                };
                let c = student.classes();
                // The MLP's parameters, gradient and optimizer moments.
                let mut layout = Layout::new();
                crate::model::mlp::Mlp::new(
                    &mut layout,
                    c,
                    &cfg.mpl.reduced_hidden,
                    c,
                    Activation::Relu,
                    0.0,
                );
                if cfg.mpl.teacher_optim.is_some() {
                    super::check_lr_mult(&teacher_optim, "mpl.teacher_optim", &layout)?;
                }
                let none = Slot { offset: layout.total(), rows: 0, cols: 0 };
                let (mm, mv) = moment_lens(&teacher_optim, &layout, none);
                let bytes = (2 * layout.total() + mm + mv) as u64 * 4;
                if account.on_host {
                    let why = "fewer or narrower mpl.reduced_hidden layers";
                    account.budget.claim("MPL's teacher MLP", bytes, "mpl.reduced_hidden", why)?;
                }
                let net = DenseNet::new(
                    be,
                    c,
                    &cfg.mpl.reduced_hidden,
                    c,
                    Activation::Relu,
                    0.0,
                    true,
                    teacher_optim.clone(),
                    seed,
                );
                Teacher::Reduced { net, logits, train_logits, labels: manifest.labels.clone() }
            }
        };
        let m = &cfg.mpl;
        if m.finetune_steps >= total {
            return Err(Error::config(
                "train",
                "mpl.finetune_steps",
                format!("{} leaves no MPL step of the run's {total}", m.finetune_steps),
            ));
        }
        let uda = (cfg.method == crate::algo::Method::Mpl).then_some(recipe.op);
        Ok(MplRun {
            teacher,
            settings: MplSettings {
                h_sign: m.h_sign,
                baseline_rate: m.baseline.then_some(m.baseline_rate),
                pseudo_labels: m.pseudo_labels,
                temperature: m.temperature,
                pl_smoothing: m.label_smoothing,
                label_smoothing: cfg.loss.label_smoothing,
                uda,
            },
            state: MplState::default(),
            student_bufs: ModelBufs::new(be, student),
            teacher_lr_ratio: teacher_optim.lr / cfg.optim.lr,
            teacher_beta1: teacher_optim.beta1,
            uda_steps: m.uda_steps,
            finetune_from: total - m.finetune_steps,
            seed: cfg.train.seed,
            remedy: super::step::divergence_remedy(cfg, true),
        })
    }

    /// The teacher's layout, (empty) table slot, parameters and optimizer.
    fn pieces(&self) -> (&Layout, Slot, &B::Buf, &Optimizer<B>) {
        match &self.teacher {
            Teacher::Bag { model, params, opt, .. } => (model.layout(), model.table(), params, opt),
            Teacher::Reduced { net, .. } => (&net.layout, net.table_slot(), &net.params, &net.opt),
        }
    }

    fn stem(&self) -> &'static str {
        match self.teacher {
            Teacher::Bag { .. } => "teacher",
            Teacher::Reduced { .. } => "teacher_mlp",
        }
    }

    /// The teacher's part of a checkpoint.
    pub(super) fn part(&self, be: &B) -> Part<'_> {
        let (layout, _, params, opt) = self.pieces();
        let meta = match &self.teacher {
            Teacher::Bag { meta, .. } => serde_json::to_value(meta).expect("metadata serialises"),
            Teacher::Reduced { net, labels, .. } => serde_json::json!({
                "format": "dtrain-logits-mlp",
                "hidden": net.mlp.widths,
                "labels": labels,
            }),
        };
        Part {
            stem: self.stem(),
            layout,
            meta,
            params: host_view(be, params),
            moments: [host_view(be, &opt.m), host_view(be, &opt.v)],
        }
    }

    /// The teacher's optimizer step counter.
    pub(super) fn teacher_optim_t(&self) -> u64 {
        self.pieces().3.t
    }

    /// Restores the teacher and the baseline from checkpoint `dir`.
    pub(super) fn restore(&mut self, be: &B, dir: &Path, state: &checkpoint::TrainState) -> Result<()> {
        let (layout, table, _, opt) = self.pieces();
        let lens = moment_lens(&opt.cfg, layout, table);
        let layout = layout.clone();
        let (p, o) = self.teacher.state_mut();
        // The fresh buffers go before the checkpoint's are read: a large teacher is never
        // held twice.
        (*p, o.m, o.v) = (be.zeros(0), be.zeros(0), be.zeros(0));
        let (lp, lm, lv) = checkpoint::load_part(dir, self.stem(), &layout, lens)?;
        let (p, o) = self.teacher.state_mut();
        (*p, o.m, o.v) = (be.upload_vec(lp), be.upload_vec(lm), be.upload_vec(lv));
        o.t = state.teacher_optim_t;
        self.state = state.mpl;
        Ok(())
    }

    /// Sets the teacher's β₁ for the ramp-down factor `down` (METHODS.md §3: the
    /// ramp-down applies to the learning rate and to Adam's β₁, the teacher's as the
    /// student's).
    pub(super) fn ramp_down_beta1(&mut self, down: f64) {
        self.teacher.state_mut().1.cfg.beta1 = crate::algo::ramp::ramped_beta1(self.teacher_beta1, down);
    }

    /// The teacher's optimizer's β₁ now.
    pub(super) fn beta1(&self) -> f64 {
        self.pieces().3.cfg.beta1
    }

    /// The teacher as a text classifier, when it is one.
    pub(super) fn teacher_bag(&self) -> Option<(&Model, &B::Buf)> {
        match &self.teacher {
            Teacher::Bag { model, params, .. } => Some((model, params)),
            Teacher::Reduced { .. } => None,
        }
    }

    /// The teacher's UDA weight and learning rate at `step`, given the step's (ramped)
    /// consistency weight `w` and the student's learning rate `lr`: the UDA term ramps in
    /// as min(1, step / uda_steps).
    pub(super) fn teacher_schedule(&self, step: u64, w: f64, lr: f64) -> (f64, f64) {
        let ramp = if self.uda_steps == 0 { 1.0 } else { (step as f64 / self.uda_steps as f64).min(1.0) };
        (w * ramp, lr * self.teacher_lr_ratio)
    }

    /// One step on micro-batch `m` (labeled rows, then the strong view of the unlabeled
    /// ones, and their weak view): the MPL step, or a finetuning step of the student.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn step(
        &mut self,
        be: &B,
        student: &Model,
        params: &mut B::Buf,
        opt: &mut Optimizer<B>,
        m: &Micro,
        n_l: usize,
        step: u64,
        lr: f64,
        uda_weight: f64,
        dist: &Dist,
        win: &mut LogWindow,
    ) -> Result<MplStepOut> {
        let n_u = m.batch.len() - n_l;
        let labeled = m.batch.slice(0..n_l);
        let labels = &m.batch.labels[..n_l];
        let (rank, world) = (dist.rank(), dist.world());
        // Each pass's rows keyed by their place in the global batch (world-size invariant).
        let noise = |pass, lens: &[usize]| {
            Some(DropoutKey {
                seed: self.seed,
                step,
                site: 0,
                pass,
                rows: RowMap::for_rank(lens, rank, world),
            })
        };
        // Means of this rank's rows count 1/W in the window, which ranks sum.
        let inv = 1.0 / world as f64;
        let (uda_weight, lr_teacher) = self.teacher_schedule(step, uda_weight, lr);
        let mut s_net = ModelNet { model: student, params, opt, bufs: &mut self.student_bufs };
        // A finetuning step reads the labeled rows alone.
        let read = if step >= self.finetune_from { &labeled } else { &m.batch };
        win.tokens += read.ids.len() as u64;
        if step >= self.finetune_from {
            let (ce, right, norm) = mpl::finetune(
                be,
                &mut s_net,
                &student.input(be, &labeled),
                labels,
                self.settings.label_smoothing,
                lr,
                noise(0, &[n_l]),
                dist,
            );
            win.sup_sum += ce * n_l as f64;
            win.docs += n_l as u64;
            win.correct += right;
            return finite(ce, step, "the student's finetuning loss", &self.remedy)
                .map(|loss| MplStepOut { loss, norm });
        }
        let unlabeled = m.batch.slice(n_l..n_l + n_u);
        let teacher_labeled = match &self.teacher {
            Teacher::Bag { .. } => true,
            Teacher::Reduced { train_logits, .. } => train_logits.is_some(),
        };
        // The teacher reads [labeled | weak view | strong view] (reduced: [labeled logits |
        // unlabeled logits]).
        let teacher_rows: &[usize] = match (&self.teacher, teacher_labeled) {
            (Teacher::Bag { .. }, _) => &[n_l, n_u, n_u],
            (Teacher::Reduced { .. }, true) => &[n_l, n_u],
            (Teacher::Reduced { .. }, false) => &[n_u],
        };
        let plan = StepPlan {
            lr_teacher,
            lr_student: lr,
            uda_weight,
            teacher_noise: noise(TEACHER_PASS, teacher_rows),
            student_noise: noise(0, &[n_u]),
            draw: Draw { seed: self.seed, step, rows: RowMap::for_rank(&[n_u], rank, world) },
        };
        let mut reduce = |v: &mut [f64]| dist.sum("MPL's CE_old and CE_new", v);
        let out = match &mut self.teacher {
            Teacher::Bag { model, params, opt, bufs, .. } => {
                let weak = m.weak.as_ref().expect("mpl reads the weak view");
                let mut t_in = labeled.clone();
                t_in.extend(weak);
                t_in.extend(&unlabeled);
                let (t_in, s_l, s_u) =
                    (model.input(be, &t_in), student.input(be, &labeled), student.input(be, &unlabeled));
                let batch = MplBatch {
                    teacher: &t_in,
                    teacher_labeled,
                    teacher_weak: true,
                    student_labeled: &s_l,
                    student_unlabeled: &s_u,
                    labels,
                    n_u,
                };
                let mut t_net = ModelNet { model, params, opt, bufs };
                mpl::step(
                    be,
                    &mut t_net,
                    &mut s_net,
                    &batch,
                    &self.settings,
                    &mut self.state,
                    &plan,
                    dist,
                    &mut reduce,
                )
            }
            Teacher::Reduced { net, logits, train_logits, .. } => {
                let mut rows = Vec::new();
                let mut t_in = Vec::new();
                if let Some(f) = train_logits {
                    f.gather(&m.rows[..n_l], &mut t_in);
                }
                logits.gather(&m.rows[n_l..], &mut rows);
                t_in.extend_from_slice(&rows);
                let (t_in, s_l, s_u) =
                    (be.upload(&t_in), student.input(be, &labeled), student.input(be, &unlabeled));
                let batch = MplBatch {
                    teacher: &t_in,
                    teacher_labeled,
                    teacher_weak: false,
                    student_labeled: &s_l,
                    student_unlabeled: &s_u,
                    labels,
                    n_u,
                };
                mpl::step(
                    be,
                    net,
                    &mut s_net,
                    &batch,
                    &self.settings,
                    &mut self.state,
                    &plan,
                    dist,
                    &mut reduce,
                )
            }
        };
        for (v, what) in [
            (out.ce_pseudo, "the student's pseudo-label loss"),
            (out.ce_teacher, "the teacher's labeled loss"),
            (out.h, "h"),
            (out.uda, "the teacher's UDA term"),
        ] {
            finite(v, step, what, &self.remedy)?;
        }
        // The teacher's update, as the student's: a loss can stay finite while the gradient
        // overflows Adam's second moment (found only when the checkpoint refused it).
        super::step::check_norm(out.teacher_norm, step, "the teacher's gradient's", || self.remedy.clone())?;
        win.sup_sum += out.ce_old * n_l as f64;
        win.docs += n_l as u64;
        win.correct += out.student_correct;
        win.mpl_steps += 1;
        win.mpl_h += out.h * inv;
        win.mpl_h_used += out.h_used * inv;
        win.mpl_ce_old += out.ce_old * inv;
        win.mpl_ce_new += out.ce_new * inv;
        win.mpl_pseudo += out.ce_pseudo * inv;
        win.mpl_teacher_ce += out.ce_teacher * inv;
        win.mpl_uda += out.uda * inv;
        win.mpl_teacher_docs += if teacher_labeled { n_l as u64 } else { 0 };
        win.mpl_teacher_correct += out.teacher_correct;
        if self.settings.uda.is_some() {
            win.cons_sum += out.uda * n_u as f64;
            win.cons_rows += n_u as u64;
            win.passed += out.uda_passed as u64;
        }
        let labels_f: Vec<f32> = out.labels.iter().map(|&l| l as f32).collect();
        pseudo_label_diagnostics(win, &m.hidden, &labels_f, |_| true, |_| true);
        Ok(MplStepOut { loss: out.ce_pseudo, norm: out.student_norm })
    }
}

/// `v`, or the error of a run that diverged at `step` (0-based; named 1-based, as the metrics
/// and checkpoints count), naming what became `v` and `remedy`.
fn finite(v: f64, step: u64, what: &str, remedy: &str) -> Result<f64> {
    if v.is_finite() {
        Ok(v)
    } else {
        Err(Error::Data(format!("{what} became {v} at step {}: {remedy}", step + 1)))
    }
}
