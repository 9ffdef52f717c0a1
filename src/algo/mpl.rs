//! Meta Pseudo Labels (METHODS.md §12): the `[mpl]` config, and one MPL step of a teacher
//! and a student, generic over the two models ([`Net`]), so that the bag models of
//! `method = "mpl"`, the logits MLP of `method = "mpl_reduced"` and the small dense nets of
//! the tests all run the same code.
//!
//! One step, in order (every loss a mean over its rows):
//! 1. The teacher's noisy pass over its rows: the labeled rows (CE_T against the labels),
//!    the weak view of the unlabeled rows (the target of its UDA term) and the rows it makes
//!    pseudo-labels on (the strong view; the UDA term's student side).
//! 2. Pseudo-labels ŷ from those rows: argmax (hard, the default) or a class drawn from
//!    softmax(z/T) (sampled), either smoothed by ε towards uniform.
//! 3. CE_old = CE(S(x_l; θ), y), from a clean (dropout-free) student pass.
//! 4. The student's update on the pseudo-labels alone: one noisy pass over the strong view,
//!    CE(ŷ, S(u_s)), its own optimizer. The labeled rows never enter this gradient.
//! 5. CE_new = CE(S(x_l; θ'), y), clean again. Both passes are clean so that CE_old − CE_new
//!    measures the update, not two different dropout masks.
//! 6. h = CE_old − CE_new (`h_sign = "old_minus_new"`, the first-order Taylor form) or its
//!    negation (`"new_minus_old"`, the public implementations'); CE_old and CE_new are
//!    summed over ranks by `reduce` first. With the baseline, b ← b + r·(h − b), then h − b
//!    is used.
//! 7. The teacher's loss CE_T + λ_uda·min(1, t/uda_steps)·UDA_T + h·CE(ŷ, T(u_s)), ŷ held
//!    constant, and its own optimizer's update.
//!
//! Every cross-entropy against a distribution q is the fused consistency op (`kl` on
//! probabilities: gradient p − q) plus q's entropy for the reported value, so the CUDA
//! backend runs this step with the kernel it already has.

use serde::{Deserialize, Serialize};

use crate::algo::consistency::{ConsistencyKind, ConsistencyOp, TargetForm};
use crate::backend::{argmax, mix64, Backend, ConsistencyAux, DropoutKey, GradSync, RowMap};

/// The sign of the feedback coefficient h.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HSign {
    /// h = CE_old − CE_new: positive when the pseudo-labels helped (METHODS.md §12).
    #[default]
    OldMinusNew,
    /// h = CE_new − CE_old, as the two public reference implementations compute it.
    NewMinusOld,
}

/// The form of the teacher's pseudo-labels. There is no "soft" form (the teacher's own
/// softmax(z / T) as the target): the teacher's MPL term h·CE(ŷ, T(u)) would then have the
/// gradient h·(softmax(z) − softmax(z / T)), zero at T = 1, and not an MPL signal at any T;
/// softened targets are the hard or sampled ones with `label_smoothing` (METHODS.md §12
/// step 2's "soft targets with label smoothing").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PseudoLabels {
    /// One-hot argmax of the teacher's prediction.
    #[default]
    Hard,
    /// One label per row drawn from softmax(z / `temperature`) (METHODS.md §12 step 2's "a
    /// sample"): then, at temperature 1, h·∇CE(ŷ, T(u_s)) is the score-function
    /// (REINFORCE) estimate of how the teacher's distribution should move to lower the
    /// student's labeled loss (at another temperature ŷ is drawn from softmax(z / T) while
    /// the gradient is of softmax(z), METHODS.md §12's formula, not that estimate), where
    /// the argmax only ever sharpens or flattens what the teacher already says. The draw
    /// is counter-based: (seed, step, the row's global position), so any world size draws
    /// the same labels.
    Sampled,
}

/// `[mpl]`: Meta Pseudo Labels (`method = "mpl"` or `"mpl_reduced"`). The teacher's UDA term
/// takes its kind, weight λ_uda, temperature and threshold from `[consistency]` (UDA's
/// defaults: kl, 1, 0.4, 0.8) and μ from `[unlabeled] ratio` (default 7).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MplConfig {
    /// `old_minus_new` (h = CE_old − CE_new) or `new_minus_old`.
    pub h_sign: HSign,
    /// Subtract a moving baseline b from h.
    pub baseline: bool,
    /// The baseline's rate r in b ← b + r·(h − b).
    pub baseline_rate: f64,
    /// `hard` or `sampled`.
    pub pseudo_labels: PseudoLabels,
    /// Temperature of sampled pseudo-labels.
    pub temperature: f64,
    /// ε: pseudo-labels become (1 − ε)·ŷ + ε/C.
    pub label_smoothing: f64,
    /// The teacher's UDA term ramps in as min(1, t / uda_steps); 0: full weight at once.
    pub uda_steps: u64,
    /// The last this-many steps train the student on the labels alone (the teacher is
    /// frozen): METHODS.md §12 step 8.
    pub finetune_steps: u64,
    /// The teacher's model (`mpl`); unset: the student's `[model]`.
    pub teacher: Option<crate::config::ModelConfig>,
    /// The teacher's optimizer; unset: the student's `[optim]`.
    pub teacher_optim: Option<crate::optim::OptimConfig>,
    /// `mpl_reduced`: the fixed teacher's logits of the unlabeled split (`dtrain
    /// export-logits --split unlabeled`).
    pub logits: Option<std::path::PathBuf>,
    /// `mpl_reduced`, optional: the fixed teacher's logits of the labeled split (`--split
    /// train`); with them the MLP also takes the supervised CE_T.
    pub train_logits: Option<std::path::PathBuf>,
    /// `mpl_reduced`: hidden widths of the MLP g(z) = z + MLP(z) over the fixed logits.
    pub reduced_hidden: Vec<usize>,
}

impl Default for MplConfig {
    fn default() -> Self {
        MplConfig {
            h_sign: HSign::OldMinusNew,
            baseline: false,
            baseline_rate: 0.01,
            pseudo_labels: PseudoLabels::Hard,
            temperature: 1.0,
            label_smoothing: 0.0,
            uda_steps: 0,
            finetune_steps: 0,
            teacher: None,
            teacher_optim: None,
            logits: None,
            train_logits: None,
            reduced_hidden: vec![128],
        }
    }
}

impl MplConfig {
    /// Checks the section's own rules; errors name the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(self.baseline_rate > 0.0 && self.baseline_rate <= 1.0) {
            return Err(("mpl.baseline_rate", "must be in (0, 1]".into()));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0 && self.temperature <= 100.0) {
            return Err(("mpl.temperature", "must be in (0, 100]".into()));
        }
        if !(0.0..1.0).contains(&self.label_smoothing) {
            return Err(("mpl.label_smoothing", "must be in [0, 1)".into()));
        }
        if self.reduced_hidden.iter().any(|h| !(1..=65_536).contains(h)) {
            return Err(("mpl.reduced_hidden", "every width must be in 1..=65536".into()));
        }
        Ok(())
    }
}

/// A trainable model as MPL uses it: its parameters, optimizer and the buffers of one
/// forward and one backward pass. At most one backward pass runs between two updates.
pub trait Net<B: Backend> {
    /// What a forward pass reads (a batch of documents, rows of features).
    type Input;
    /// Output classes C.
    fn classes(&self) -> usize;
    /// A forward pass over the `n` rows of `x`: noisy with `Some(key)`, clean with `None`.
    /// Returns the n×C logits.
    fn forward(&mut self, be: &B, x: &Self::Input, n: usize, noise: Option<DropoutKey>) -> &B::Buf;
    /// The backward pass of the last forward pass for `dlogits` (n×C): the gradient of
    /// Σ dlogits ⊙ logits with respect to the parameters, kept for [`Net::update`].
    fn backward(&mut self, be: &B, x: &Self::Input, dlogits: &B::Buf);
    /// One optimizer step at learning rate `lr` with the kept gradient, first averaged over
    /// the processes by `sync`, then cleared; returns the gradient's norm.
    fn update(&mut self, be: &B, lr: f64, sync: &dyn GradSync<B>) -> f64;
}

/// The knobs the step takes, resolved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MplSettings {
    pub h_sign: HSign,
    /// The baseline's rate; `None`: no baseline.
    pub baseline_rate: Option<f64>,
    pub pseudo_labels: PseudoLabels,
    pub temperature: f64,
    /// ε of the pseudo-labels.
    pub pl_smoothing: f64,
    /// ε of the labels in CE_T and CE_old/CE_new.
    pub label_smoothing: f64,
    /// The teacher's UDA term (its `scale` is set per step), or `None`.
    pub uda: Option<ConsistencyOp>,
}

/// The rows of one step. The teacher's rows are the labeled rows (when `teacher_labeled`),
/// then the weak view of the `n_u` unlabeled rows (when
/// `teacher_weak`), then the `n_u` rows its pseudo-labels come from.
pub struct MplBatch<'a, TI, SI> {
    pub teacher: &'a TI,
    pub teacher_labeled: bool,
    pub teacher_weak: bool,
    /// The student's labeled rows (CE_old, CE_new).
    pub student_labeled: &'a SI,
    /// The student's unlabeled rows (the strong view), in the teacher's order.
    pub student_unlabeled: &'a SI,
    /// Labels of the labeled rows.
    pub labels: &'a [i32],
    pub n_u: usize,
}

/// Learning rates, ramps and noise of one step.
#[derive(Debug, Clone, Copy)]
pub struct StepPlan {
    pub lr_teacher: f64,
    pub lr_student: f64,
    /// λ_uda·min(1, t/uda_steps).
    pub uda_weight: f64,
    pub teacher_noise: Option<DropoutKey>,
    pub student_noise: Option<DropoutKey>,
    /// Where sampled pseudo-labels draw from (unused by hard ones).
    pub draw: Draw,
}

/// The counter-based draws of [`PseudoLabels::Sampled`]: one uniform per unlabeled row from
/// (seed, step, the row's global position).
#[derive(Debug, Clone, Copy)]
pub struct Draw {
    pub seed: u64,
    pub step: u64,
    /// The global position of each local unlabeled row.
    pub rows: RowMap,
}

impl Draw {
    /// The uniform in [0, 1) of local unlabeled row `r`.
    pub fn uniform(&self, r: usize) -> f64 {
        let x = mix64(mix64(self.seed ^ 0x4d50_4c5f_6472_6177) ^ mix64(self.step) ^ self.rows.position(r));
        (x >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// What one step measured (means over rows, after `reduce` for CE_old and CE_new).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MplOut {
    /// CE_T on the teacher's labeled rows (0 without them).
    pub ce_teacher: f64,
    /// The teacher's labeled rows it predicted right.
    pub teacher_correct: u64,
    /// The UDA term (unweighted) and the rows that passed its mask.
    pub uda: f64,
    pub uda_passed: usize,
    /// The student's CE against the pseudo-labels.
    pub ce_pseudo: f64,
    pub ce_old: f64,
    pub ce_new: f64,
    /// h before the baseline, the coefficient used, and the baseline after its update.
    pub h: f64,
    pub h_used: f64,
    pub baseline: f64,
    pub teacher_norm: f64,
    pub student_norm: f64,
    /// The student's labeled rows (clean pass before its update) it predicted right.
    pub student_correct: u64,
    /// The pseudo-label per unlabeled row (its argmax, or the drawn class).
    pub labels: Vec<usize>,
}

/// The target distribution (1 − ε)·onehot(y) + ε/C of each label.
pub fn label_targets(labels: &[i32], classes: usize, eps: f64) -> Vec<f32> {
    let mut q = vec![(eps / classes as f64) as f32; labels.len() * classes];
    for (i, &y) in labels.iter().enumerate() {
        q[i * classes + y as usize] += (1.0 - eps) as f32;
    }
    q
}

/// The pseudo-label distribution of each row of `logits` (n×C, host), and each row's label:
/// its argmax, or for sampled labels the class drawn by `draw`.
pub fn pseudo_targets(
    logits: &[f32],
    classes: usize,
    s: &MplSettings,
    draw: &Draw,
) -> (Vec<f32>, Vec<usize>) {
    let mut q = Vec::with_capacity(logits.len());
    let mut labels = Vec::with_capacity(logits.len() / classes);
    for (r, z) in logits.chunks(classes).enumerate() {
        let top = argmax(z);
        let start = q.len();
        // softmax(z / T) in f64.
        let probs = || {
            let m = f64::from(z[top]);
            let e: Vec<f64> = z.iter().map(|&v| ((f64::from(v) - m) / s.temperature).exp()).collect();
            let sum: f64 = e.iter().sum();
            e.into_iter().map(move |v| v / sum)
        };
        let one_hot = |k: usize| (0..classes).map(move |c| if c == k { 1.0f64 } else { 0.0 });
        match s.pseudo_labels {
            PseudoLabels::Hard => {
                labels.push(top);
                q.extend(one_hot(top));
            }
            PseudoLabels::Sampled => {
                // Inverse CDF; the last class takes what rounding leaves.
                let u = draw.uniform(r);
                let mut acc = 0.0;
                let k = probs().position(|p| {
                    acc += p;
                    u < acc
                });
                let k = k.unwrap_or(classes - 1);
                labels.push(k);
                q.extend(one_hot(k));
            }
        }
        let eps = s.pl_smoothing;
        for v in &mut q[start..] {
            *v = (1.0 - eps) * *v + eps / classes as f64;
        }
    }
    (q.into_iter().map(|v| v as f32).collect(), labels)
}

/// Distributions to take cross-entropy against: on the device, with Σ over rows of their
/// entropy (CE = KL + H, and the op computes the KL).
pub struct Targets<B: Backend> {
    pub probs: B::Buf,
    pub rows: usize,
    pub entropy: f64,
}

impl<B: Backend<F = f32>> Targets<B> {
    /// `q`: n×`classes` probabilities (host).
    pub fn new(be: &B, q: &[f32], classes: usize) -> Self {
        let entropy = q.iter().filter(|&&v| v > 0.0).map(|&v| -f64::from(v) * f64::from(v).ln()).sum();
        Targets { probs: be.upload(q), rows: q.len() / classes, entropy }
    }
}

/// Cross-entropy of rows `row0..row0 + n` of `logits` against the `n` distributions `q`:
/// adds `scale·(p − q)` into the same rows of `dlogits` and returns Σ over rows of CE.
#[allow(clippy::too_many_arguments)]
pub fn cross_entropy<B: Backend<F = f32>>(
    be: &B,
    logits: &B::Buf,
    row0: usize,
    q: &Targets<B>,
    classes: usize,
    scale: f64,
    dlogits: &mut B::Buf,
    scratch: &mut B::Buf,
) -> f64 {
    let op = ConsistencyOp {
        kind: ConsistencyKind::Kl,
        form: TargetForm::Probs,
        temperature: 1.0,
        threshold: 0.0,
        scale,
    };
    let aux = ConsistencyAux::default();
    let out = be.consistency(&op, logits, row0, &q.probs, q.rows, classes, &aux, dlogits, None, scratch);
    out.loss_sum + q.entropy
}

/// Rows `row0..row0 + n` of `logits` whose argmax is `labels[i]`.
fn correct(logits: &[f32], row0: usize, labels: &[i32], classes: usize) -> u64 {
    labels
        .iter()
        .enumerate()
        .filter(|&(i, &y)| argmax(&logits[(row0 + i) * classes..(row0 + i + 1) * classes]) as i32 == y)
        .count() as u64
}

/// The moving baseline of h (METHODS.md §12 step 6), kept across steps and checkpointed.
#[derive(Debug, Clone, Copy, Default, PartialEq, bincode::Encode, bincode::Decode)]
pub struct MplState {
    pub baseline: f64,
}

/// The student's clean labeled loss Σ CE against `y`, and, with `count`, the rows it
/// predicts right.
fn student_ce<B: Backend<F = f32>, S: Net<B>>(
    be: &B,
    student: &mut S,
    x: &S::Input,
    y: (&[i32], &Targets<B>),
    count: bool,
    scratch: &mut B::Buf,
) -> (f64, u64) {
    let c = student.classes();
    let n = y.0.len();
    let logits = student.forward(be, x, n, None);
    // The op adds a gradient, here scaled by 0 into a buffer nobody reads.
    let mut sink = be.zeros(n * c);
    let ce = cross_entropy(be, logits, 0, y.1, c, 0.0, &mut sink, scratch);
    (ce, if count { correct(&be.download(logits), 0, y.0, c) } else { 0 })
}

/// One MPL step (the module's doc gives the sequence). `sync` averages each update's
/// gradient over ranks and `reduce` sums a few f64 over ranks (both the identity on one
/// process): CE_old and CE_new are global before h is formed.
#[allow(clippy::too_many_arguments)]
pub fn step<B, T, S>(
    be: &B,
    teacher: &mut T,
    student: &mut S,
    b: &MplBatch<'_, T::Input, S::Input>,
    s: &MplSettings,
    state: &mut MplState,
    plan: &StepPlan,
    sync: &dyn GradSync<B>,
    reduce: &mut dyn FnMut(&mut [f64]),
) -> MplOut
where
    B: Backend<F = f32>,
    T: Net<B>,
    S: Net<B>,
{
    let c = teacher.classes();
    let (n_u, n_l) = (b.n_u, b.labels.len());
    let n_tl = if b.teacher_labeled { n_l } else { 0 };
    let y = Targets::new(be, &label_targets(b.labels, c, s.label_smoothing), c);
    let weak_row0 = n_tl;
    let pl_row0 = n_tl + if b.teacher_weak { n_u } else { 0 };
    let n_t = pl_row0 + n_u;
    let mut out = MplOut::default();
    let mut scratch = be.zeros(0);

    // 1. The teacher's pass; CE_T and UDA go into its gradient now, h's term later.
    let zt = teacher.forward(be, b.teacher, n_t, plan.teacher_noise);
    let zt_host = be.download(zt);
    let mut dt = be.zeros(n_t * c);
    if n_tl > 0 {
        out.ce_teacher =
            cross_entropy(be, zt, 0, &y, c, 1.0 / n_tl as f64, &mut dt, &mut scratch) / n_tl as f64;
        out.teacher_correct = correct(&zt_host, 0, b.labels, c);
    }
    if let (Some(op), true) = (s.uda, b.teacher_weak && plan.uda_weight > 0.0) {
        let weak = be.upload(&zt_host[weak_row0 * c..(weak_row0 + n_u) * c]);
        let op = ConsistencyOp { scale: plan.uda_weight / n_u as f64, ..op };
        let r = be.consistency(
            &op,
            zt,
            pl_row0,
            &weak,
            n_u,
            c,
            &ConsistencyAux::default(),
            &mut dt,
            None,
            &mut scratch,
        );
        out.uda = r.loss_sum / n_u as f64;
        out.uda_passed = r.passed;
    }
    // 2. Pseudo-labels, constants from here on.
    let (q_pl, labels) = pseudo_targets(&zt_host[pl_row0 * c..], c, s, &plan.draw);
    let q_pl = Targets::new(be, &q_pl, c);
    out.labels = labels;

    // 3–5. CE_old, the student's update on the pseudo-labels alone, CE_new.
    let (ce_old, right) = student_ce(be, student, b.student_labeled, (b.labels, &y), true, &mut scratch);
    out.student_correct = right;
    let zs = student.forward(be, b.student_unlabeled, n_u, plan.student_noise);
    let mut ds = be.zeros(n_u * c);
    out.ce_pseudo = cross_entropy(be, zs, 0, &q_pl, c, 1.0 / n_u as f64, &mut ds, &mut scratch) / n_u as f64;
    student.backward(be, b.student_unlabeled, &ds);
    out.student_norm = student.update(be, plan.lr_student, sync);
    let (ce_new, _) = student_ce(be, student, b.student_labeled, (b.labels, &y), false, &mut scratch);

    // 6. h from the global means.
    let mut sums = [ce_old, ce_new, n_l as f64];
    reduce(&mut sums);
    let rows = sums[2].max(1.0);
    (out.ce_old, out.ce_new) = (sums[0] / rows, sums[1] / rows);
    out.h = match s.h_sign {
        HSign::OldMinusNew => out.ce_old - out.ce_new,
        HSign::NewMinusOld => out.ce_new - out.ce_old,
    };
    out.h_used = match s.baseline_rate {
        Some(r) => {
            state.baseline += r * (out.h - state.baseline);
            out.h - state.baseline
        }
        None => out.h,
    };
    out.baseline = state.baseline;

    // 7. The teacher's MPL term h·CE(ŷ, T(u_s)), then its update.
    if out.h_used != 0.0 {
        cross_entropy(be, zt, pl_row0, &q_pl, c, out.h_used / n_u as f64, &mut dt, &mut scratch);
    }
    teacher.backward(be, b.teacher, &dt);
    out.teacher_norm = teacher.update(be, plan.lr_teacher, sync);
    out
}

/// A finetuning step of the student on the labels alone (METHODS.md §12 step 8): returns
/// (mean CE, rows right, gradient norm).
#[allow(clippy::too_many_arguments)]
pub fn finetune<B: Backend<F = f32>, S: Net<B>>(
    be: &B,
    student: &mut S,
    x: &S::Input,
    labels: &[i32],
    eps: f64,
    lr: f64,
    noise: Option<DropoutKey>,
    sync: &dyn GradSync<B>,
) -> (f64, u64, f64) {
    let c = student.classes();
    let n = labels.len();
    let mut scratch = be.zeros(0);
    let z = student.forward(be, x, n, noise);
    let right = correct(&be.download(z), 0, labels, c);
    let mut dz = be.zeros(n * c);
    let y = Targets::new(be, &label_targets(labels, c, eps), c);
    let ce = cross_entropy(be, z, 0, &y, c, 1.0 / n as f64, &mut dz, &mut scratch);
    student.backward(be, x, &dz);
    (ce / n as f64, right, student.update(be, lr, sync))
}
