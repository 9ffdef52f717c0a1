//! The parts of one training step that every method shares: a micro-batch's views
//! (labeled rows, unlabeled rows, strong and per-pass views), a forward pass's buffers, the
//! table gradient over several backward passes, training-signal annealing, and the
//! pseudo-label diagnostic.

use crate::algo::adversarial::AdversarialKind;
use crate::algo::consistency::ConsistencyOp;
use crate::algo::stabilise::{tempered_softmax, Stabiliser};
use crate::algo::{Recipe, TargetSource};
use crate::backend::{
    argmax, with_host_mut, Backend, ConsistencyAux, DropoutKey, EncoderOps, GradSync, HostBatch, LossKind,
    RowMap, SparseRows,
};
use crate::bank::{Bank, RowId};
use crate::checkpoint::LogWindow;
use crate::config::TrainConfig;
use crate::data::dataset::Dataset;
use crate::data::loader::Loader;
use crate::data::shard::SplitKind;
use crate::dist::Dist;
use crate::error::{Error, Result};
use crate::logits::LogitsFile;
use crate::model::bag::{Activations, BagModel};
use crate::model::{Acts, Input, Model};

use super::adversarial::{AdversarialBuffers, AdversarialPass};

/// The `pass` bit of a step's second forward pass (Π, R-Drop, the teacher), so that its
/// dropout masks differ from the first pass's.
pub(super) const SECOND_PASS: u32 = 1 << 20;

/// One forward pass's activations and the gradient of its logits.
pub(super) struct Pass<B: Backend> {
    pub(super) acts: Acts<B>,
    pub(super) dlogits: B::Buf,
}

/// The step's second forward pass for a recipe whose targets come from `target`: its rows
/// per micro-batch on this rank (of `n_l` labeled and `n_u` unlabeled), and whether a
/// backward pass reads it. Only Π's or R-Drop's second student pass is backpropagated; a
/// teacher's or a weak view's pass only gives targets.
pub(super) fn second_pass(target: TargetSource, n_l: usize, n_u: usize) -> Option<(usize, bool)> {
    match target {
        TargetSource::SecondPass { grad } => Some((n_l + n_u, grad)),
        TargetSource::Teacher => Some((n_l + n_u, false)),
        TargetSource::WeakView => Some((n_u, false)),
        TargetSource::None | TargetSource::Bank | TargetSource::File => None,
    }
}

impl<B: Backend> Pass<B> {
    /// A pass's buffers; `backward`: whether a backward pass will read its activations
    /// (else an encoder keeps one layer's tape, [`Acts::inference`]).
    pub(super) fn new(be: &B, model: &Model, backward: bool) -> Self {
        let acts = if backward { Acts::new(be, model) } else { Acts::inference(be, model) };
        Pass { acts, dlogits: be.zeros(0) }
    }
}

/// The embedding table's gradient over the backward passes of one step: formed as sparse
/// rows (summed over passes and micro-batches), or applied by fused SGD as each pass goes.
pub(super) struct TableAcc<B: Backend> {
    pub(super) grad: SparseRows<B::Buf>,
    pub(super) extra: SparseRows<B::Buf>,
    pub(super) dpooled: B::Buf,
    /// Whether `grad` holds a pass's gradient yet.
    pub(super) any: bool,
    /// Skip forming the gradient (fused SGD at a step whose norm is not logged).
    pub(super) skip: bool,
}

impl<B: Backend> TableAcc<B> {
    pub(super) fn new(be: &B, dim: usize) -> Self {
        TableAcc {
            grad: SparseRows::new(be.zeros(0), dim),
            extra: SparseRows::new(be.zeros(0), dim),
            dpooled: be.zeros(0),
            any: false,
            skip: false,
        }
    }

    /// Starts a step; `skip`: do not form the gradient.
    pub(super) fn start(&mut self, skip: bool) {
        self.any = false;
        self.skip = skip;
        self.grad.rows.clear();
    }

    /// Whether the step's table gradient was formed.
    pub(super) fn formed(&self) -> bool {
        self.any
    }

    /// One backward pass: dense gradients into `grads`, the table's gradient added to the
    /// step's, and, with `fused_lr`, the table's SGD update applied at once. An encoder has
    /// no sparse table: its whole gradient goes into `grads`; `sync` is given in the step's
    /// last backward pass, to start averaging finished layers early.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &mut self,
        be: &B,
        model: &Model,
        params: &mut B::Buf,
        x: &Input<B>,
        acts: &Acts<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        fused_lr: Option<f64>,
        sync: Option<&dyn GradSync<B>>,
    ) where
        B: EncoderOps,
    {
        match (model.bag(), x.bag(), acts) {
            (Some(bag), Some(dev), Acts::Bag(a)) => {
                self.backward_bag(be, bag, params, dev, a, dlogits, grads, fused_lr)
            }
            _ => model.backward_dense(be, params, x, acts, dlogits, grads, &mut self.dpooled, sync),
        }
    }

    /// [`TableAcc::backward`] of a bag model's pass.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward_bag(
        &mut self,
        be: &B,
        bag: &BagModel,
        params: &mut B::Buf,
        dev: &B::Batch,
        acts: &Activations<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        fused_lr: Option<f64>,
    ) {
        bag.backward_dense(be, params, acts, dlogits, grads, &mut self.dpooled);
        if !self.skip {
            if self.any {
                be.embedding_bag_backward(dev, &self.dpooled, bag.spec.dim, &mut self.extra);
                let acc = std::mem::replace(&mut self.grad, SparseRows::new(be.zeros(0), bag.spec.dim));
                self.grad = be.sparse_add(acc, &self.extra);
            } else {
                be.embedding_bag_backward(dev, &self.dpooled, bag.spec.dim, &mut self.grad);
            }
            self.any = true;
        }
        if let Some(lr) = fused_lr {
            be.embedding_bag_sgd(params, bag.table, dev, &self.dpooled, lr);
        }
    }
}

/// The sorted, unique table rows the batches read.
pub(super) fn touched_rows<'a>(batches: impl Iterator<Item = &'a HostBatch>) -> Vec<u32> {
    let mut rows: Vec<u32> = batches.flat_map(|b| b.ids.iter().copied()).collect();
    rows.sort_unstable();
    rows.dedup();
    rows
}

/// One micro-batch: the student's view (labeled rows, then unlabeled rows, strongly
/// augmented for UDA and FixMatch), the weak view of the unlabeled rows where one is
/// needed, every row's sample id, and the unlabeled rows' hidden labels (diagnostics).
pub(super) struct Micro {
    pub(super) batch: HostBatch,
    /// The second pass's view when each pass has its own augmentation (Π, Temporal
    /// Ensembling has no second pass, Mean Teacher's teacher, R-Drop); `batch` is then the
    /// first pass's view.
    pub(super) second: Option<HostBatch>,
    pub(super) weak: Option<HostBatch>,
    pub(super) rows: Vec<RowId>,
    pub(super) hidden: Vec<i32>,
}

/// What the strong view needs: the augmentation, the seed, the bucket count, and whether
/// it applies to the unlabeled rows of the student (UDA, FixMatch, Noisy Student) or to
/// every row of each consistency pass, each pass with its own draw (Π, Temporal
/// Ensembling, Mean Teacher, R-Drop with `augment.consistency_passes`).
pub(super) struct StrongView {
    pub(super) cfg: crate::data::augment::AugmentConfig,
    pub(super) seed: u64,
    pub(super) buckets: u32,
    pub(super) per_pass: bool,
    /// Whether the step runs a second pass over the same rows (Π, Mean Teacher, R-Drop;
    /// Temporal Ensembling has none), which then gets its own view.
    pub(super) second_pass: bool,
    /// Keep each document's first and last id in place (a subword data set's [CLS] and
    /// [SEP], which an encoder pools from or expects): only the ids between are augmented.
    pub(super) keep_ends: bool,
}

impl StrongView {
    /// The strong view of the documents of `batch`, sample `ids[i]` drawn in `epochs[i]`,
    /// for pass `pass`.
    pub(super) fn view(&self, batch: &HostBatch, ids: &[RowId], epochs: &[u64], pass: u64) -> HostBatch {
        let mut out = HostBatch::default();
        let mut ids_buf = Vec::new();
        for (i, (&id, &epoch)) in ids.iter().zip(epochs).enumerate() {
            let doc = &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize];
            let key = crate::data::augment::sample_key(self.seed ^ crate::backend::mix64(pass), epoch, id);
            crate::data::augment::strong_doc(doc, self.buckets, &self.cfg, key, self.keep_ends, &mut ids_buf);
            out.push(&ids_buf, batch.labels[i]);
        }
        out
    }
}

pub(super) fn next_micro(
    ds: &Dataset,
    loader: &mut Loader,
    uloader: Option<&mut Loader>,
    strong: Option<&StrongView>,
) -> Result<Micro> {
    let mut batch = loader.next_batch(ds)?;
    let mut rows = loader.last_rows().to_vec();
    let mut epochs = loader.last_epochs().to_vec();
    let (mut weak, mut hidden) = (None, Vec::new());
    if let Some(u) = uloader {
        let ub = u.next_batch(ds)?;
        hidden = u.last_hidden_labels().to_vec();
        match strong {
            Some(sv) if !sv.per_pass => {
                batch.extend(&sv.view(&ub, u.last_rows(), u.last_epochs(), 0));
                weak = Some(ub);
            }
            _ => batch.extend(&ub),
        }
        rows.extend_from_slice(u.last_rows());
        epochs.extend_from_slice(u.last_epochs());
    }
    let mut second = None;
    if let Some(sv) = strong.filter(|sv| sv.per_pass) {
        second = sv.second_pass.then(|| sv.view(&batch, &rows, &epochs, 1));
        batch = sv.view(&batch, &rows, &epochs, 0);
    }
    Ok(Micro { batch, second, weak, rows, hidden })
}

/// Training-signal annealing (METHODS.md §1): drops the labeled rows whose p_y exceeds
/// `eta` from the supervised loss (their gradient rows are zeroed; they still count in the
/// mean's denominator). Returns the loss removed and the rows dropped.
pub(super) fn drop_confident_rows(
    logits: &[f32],
    labels: &[i32],
    classes: usize,
    eta: f64,
    dlogits: &mut [f32],
    row_loss: &[f32],
    win: &mut LogWindow,
) -> (f64, Vec<usize>) {
    let (mut removed, mut dropped) = (0.0, Vec::new());
    for (i, z) in logits.chunks(classes).enumerate() {
        let Ok(y) = usize::try_from(labels[i]) else { continue };
        let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f64 = z.iter().map(|&v| f64::from(v - m).exp()).sum();
        let p_y = f64::from(z[y] - m).exp() / s;
        win.tsa_rows += 1;
        if p_y > eta {
            dlogits[i * classes..(i + 1) * classes].iter_mut().for_each(|g| *g = 0.0);
            removed += f64::from(row_loss[i]);
            win.tsa_dropped += 1;
            dropped.push(i);
        }
    }
    (removed, dropped)
}

/// Pseudo-label diagnostics over the unlabeled rows that have a target (a Temporal Ensembling
/// row gets its first only once it was seen): how their targets spread over the classes
/// (hidden label or not), and their accuracy against the hidden labels, of every row with a
/// known label and of those that passed the mask.
pub(super) fn pseudo_label_diagnostics(
    win: &mut LogWindow,
    hidden: &[i32],
    label: &[f32],
    has_target: impl Fn(usize) -> bool,
    passed: impl Fn(usize) -> bool,
) {
    for (i, &l) in label.iter().enumerate() {
        if !has_target(i) {
            continue;
        }
        let c = l as usize;
        if win.pl_classes.len() <= c {
            win.pl_classes.resize(c + 1, 0);
        }
        win.pl_classes[c] += 1;
        let Some(&h) = hidden.get(i).filter(|&&h| h >= 0) else { continue };
        let right = u64::from(h == l as i32);
        win.pl_rows += 1;
        win.pl_correct += right;
        if passed(i) {
            win.pl_passed += 1;
            win.pl_passed_correct += right;
        }
    }
}

/// Records the batch's confident predictions in the stabiliser (FlexMatch): on several
/// ranks, every rank records the whole global batch's, in rank order (the global order).
fn record_confident(st: &mut Stabiliser, dist: &Dist, rows: &[RowId], conf: &[f32], label: &[f32]) {
    if dist.world() == 1 || !st.records() {
        st.record(rows, conf, label);
        return;
    }
    let ids: Vec<u64> = rows.iter().map(|r| (u64::from(r.shard) << 32) | u64::from(r.row)).collect();
    let ids = dist.all_gather("FlexMatch's records", &ids).concat();
    let conf = dist.all_gather("FlexMatch's records", conf).concat();
    let label = dist.all_gather("FlexMatch's records", label).concat();
    let rows: Vec<RowId> = ids
        .iter()
        .map(|&id| RowId { split: SplitKind::Unlabeled, shard: (id >> 32) as u32, row: id as u32 })
        .collect();
    st.record(&rows, &conf, &label);
}

/// What one micro-batch's step takes from the step it belongs to.
pub(super) struct StepInputs<'b, Buf> {
    pub(super) step: u64,
    /// The consistency weight w(t).
    pub(super) w: f64,
    pub(super) lr: f64,
    /// The micro-batch's index in the step.
    pub(super) mi: usize,
    /// The Mean Teacher's weights.
    pub(super) teacher: Option<&'b Buf>,
    pub(super) bank: Option<&'b Bank>,
    /// Noisy Student's exported logits.
    pub(super) logits: Option<&'b LogitsFile>,
}

/// The micro-batch step of every method, with its settings and the buffers it reuses:
/// the student pass, the supervised loss (and TSA), the method's consistency target and
/// the fused op, the adversarial term, the backward passes into `grads` and `table`.
pub(super) struct Stepper<'a, B: EncoderOps<F = f32>> {
    pub(super) be: &'a B,
    pub(super) model: &'a Model,
    pub(super) cfg: &'a TrainConfig,
    pub(super) recipe: &'a Recipe,
    pub(super) loss: LossKind,
    pub(super) accum: u64,
    pub(super) total: u64,
    /// This rank's labeled rows per micro-batch (the global batch over the world size).
    pub(super) batch_size: usize,
    pub(super) dist: &'a Dist,
    /// Plain SGD on the table applied during the backward pass.
    pub(super) fused: bool,
    /// The table's learning-rate multiplier.
    pub(super) table_mult: f64,
    pub(super) passes: [Pass<B>; 2],
    pub(super) row_loss: B::Buf,
    pub(super) cons_rows: B::Buf,
    /// Host copies of targets read from a file (the bank, exported logits) and row weights,
    /// and the targets on the backend.
    pub(super) target_host: Vec<f32>,
    pub(super) weight_host: Vec<f32>,
    pub(super) target_buf: B::Buf,
    pub(super) adv: AdversarialBuffers<B>,
    /// The dense gradient and the table's, summed over the step's micro-batches.
    pub(super) grads: B::Buf,
    pub(super) table: TableAcc<B>,
}

impl<B: EncoderOps<F = f32>> Stepper<'_, B> {
    /// One micro-batch: forward and backward passes, gradients added into `grads` and
    /// `table`; returns its share of the step's loss and, for Temporal Ensembling, the
    /// predictions to write into the bank after the step.
    pub(super) fn micro(
        &mut self,
        params: &mut B::Buf,
        m: &Micro,
        inp: &StepInputs<'_, B::Buf>,
        mut stabiliser: Option<&mut Stabiliser>,
        win: &mut LogWindow,
    ) -> Result<(f64, Option<Vec<f32>>)> {
        let (be, model, cfg, recipe) = (self.be, self.model, self.cfg, self.recipe);
        let (classes, kind, accum, total) = (model.classes(), self.loss, self.accum, self.total);
        let (step, w, lr, mi) = (inp.step, inp.w, inp.lr, inp.mi);
        let mut total_adv = 0.0;
        let batch = &m.batch;
        let n = batch.len();
        let n_l = self.batch_size;
        let n_u = n - n_l;
        let (rank, world) = (self.dist.rank(), self.dist.world());
        // Rows keyed by their place in the global batch: labeled rows, then unlabeled ones.
        let rows_map = RowMap::for_rank(&[n_l, n_u], rank, world);
        let key = DropoutKey { seed: cfg.train.seed, step, site: 0, pass: mi as u32, rows: rows_map };
        let dev = model.input(be, batch);
        // The batch as the loss reads its labels (a bag model's input is that upload).
        let labels_dev = dev.bag().is_none().then(|| be.upload_batch(batch));
        let labels = labels_dev.as_ref().or(dev.bag()).expect("one of the two");
        // The second pass's own augmented view (`augment.consistency_passes`), else the
        // same rows.
        let dev1 = m.second.as_ref().map(|b| model.input(be, b));
        let dev1 = dev1.as_ref().unwrap_or(&dev);
        let [p0, p1] = &mut self.passes;
        model.forward(be, params, &dev, n, Some(key), &mut p0.acts);
        let halves = if recipe.ce_both_passes { 0.5 } else { 1.0 };
        let ce_scale = (halves / (n_l as f64 * accum as f64)) as f32;
        let mut sup = be.softmax_loss(
            p0.acts.logits(),
            classes,
            labels,
            kind,
            ce_scale,
            &mut p0.dlogits,
            &mut self.row_loss,
        );
        let logits = be.download(p0.acts.logits());
        // The labeled rows TSA drops from this step's loss.
        let mut tsa_dropped: Vec<usize> = Vec::new();
        if let Some(tsa) = cfg.loss.tsa.threshold(step, total, classes) {
            let row_loss = be.download(&self.row_loss);
            let removed;
            (removed, tsa_dropped) = with_host_mut(be, &mut p0.dlogits, |g| {
                drop_confident_rows(&logits, &batch.labels, classes, tsa, g, &row_loss, win)
            });
            sup -= removed;
        }
        // The labels of every later supervised loss of this step (R-Drop's second pass,
        // the adversarial pass): the rows TSA dropped read as unlabeled there too
        // (METHODS.md §1 with §8 and §9).
        let later_labels = (!tsa_dropped.is_empty()
            && (recipe.ce_both_passes || cfg.adversarial.kind != AdversarialKind::None))
            .then(|| {
                let mut b = batch.clone();
                tsa_dropped.iter().for_each(|&i| b.labels[i] = -1);
                be.upload_batch(&b)
            });
        let later_labels = later_labels.as_ref().unwrap_or(labels);
        // The consistency term: its target, the student rows it covers, their count.
        let mut second_grad = false;
        let mut cons_term = 0.0;
        let (mut bias_buf, mut mult_buf, mut weight_buf) = (None, None, None);
        // The class thresholds' host copy, for the diagnostic's own mask test.
        let mut mult_host: Option<Vec<f32>> = None;
        let mut threshold = recipe.op.threshold;
        let target: Option<(&B::Buf, usize, usize)> = match recipe.target {
            TargetSource::None => None,
            TargetSource::Bank => {
                let bank = inp.bank.expect("a bank for temporal ensembling");
                bank.targets(&m.rows, &mut self.target_host, &mut self.weight_host);
                weight_buf = Some(be.upload(&self.weight_host));
                self.target_buf = be.upload(&self.target_host);
                Some((&self.target_buf, 0, n))
            }
            TargetSource::SecondPass { grad } => {
                let key1 = DropoutKey { pass: mi as u32 | SECOND_PASS, ..key };
                model.forward(be, params, dev1, n, Some(key1), &mut p1.acts);
                second_grad = grad;
                if recipe.ce_both_passes {
                    sup += be.softmax_loss(
                        p1.acts.logits(),
                        classes,
                        later_labels,
                        kind,
                        ce_scale,
                        &mut p1.dlogits,
                        &mut self.row_loss,
                    );
                } else if grad {
                    p1.dlogits = be.zeros(n * classes);
                }
                Some((p1.acts.logits(), 0, n))
            }
            TargetSource::Teacher => {
                let key1 = DropoutKey { pass: mi as u32 | SECOND_PASS, ..key };
                let teacher = inp.teacher.expect("a teacher for mean_teacher");
                model.forward(be, teacher, dev1, n, Some(key1), &mut p1.acts);
                Some((p1.acts.logits(), 0, n))
            }
            TargetSource::File => {
                let file = inp.logits.expect("a logits file for noisy_student");
                file.gather(&m.rows[n_l..], &mut self.target_host);
                self.target_buf = be.upload(&self.target_host);
                Some((&self.target_buf, n_l, n_u))
            }
            TargetSource::WeakView => {
                let weak = m.weak.as_ref().expect("a weak view for uda/fixmatch");
                let key1 = DropoutKey {
                    pass: mi as u32 | SECOND_PASS,
                    rows: RowMap::for_rank(&[n_u], rank, world),
                    ..key
                };
                model.forward(be, params, &model.input(be, weak), n_u, Some(key1), &mut p1.acts);
                if let Some(st) = stabiliser.as_deref_mut() {
                    // Their statistics are of the q the op sharpens, softmax(z_w / T), as the
                    // mask's (METHODS.md §10b).
                    let weak = be.download(p1.acts.logits());
                    let q = tempered_softmax(&weak[..n_u * classes], classes, recipe.op.temperature);
                    let mut reduce = |v: &mut [f64]| self.dist.sum("the stabilisers' batch means", v);
                    let prepared = st.prepare(&q, &mut reduce);
                    bias_buf = prepared.bias.map(|b| be.upload(&b));
                    mult_buf = prepared.class_threshold.as_ref().map(|m| be.upload(m));
                    mult_host = prepared.class_threshold;
                    threshold = prepared.threshold;
                }
                Some((p1.acts.logits(), n_l, n_u))
            }
        };
        if let Some((target, s_row0, rows)) = target {
            let aux = ConsistencyAux {
                bias: bias_buf.as_ref(),
                class_threshold: mult_buf.as_ref(),
                row_weight: weight_buf.as_ref(),
            };
            let op = ConsistencyOp { scale: w / (rows as f64 * accum as f64), threshold, ..recipe.op };
            let out = be.consistency(
                &op,
                p0.acts.logits(),
                s_row0,
                target,
                rows,
                classes,
                &aux,
                &mut p0.dlogits,
                second_grad.then_some(&mut p1.dlogits),
                &mut self.cons_rows,
            );
            cons_term = w * out.loss_sum / rows as f64;
            win.cons_sum += out.loss_sum;
            win.cons_rows += rows as u64;
            win.passed += out.passed as u64;
            // The unlabeled rows are the op's last n_u: their confidence and label.
            let stats = be.download(&self.cons_rows);
            let (conf, label) = (&stats[2 * rows - n_u..2 * rows], &stats[3 * rows - n_u..]);
            // A row passed where its weight is nonzero and its confidence reaches its
            // class's threshold: the op's own test, in the same f32 arithmetic.
            let mult = mult_host.as_ref();
            let has_target = |i: usize| weight_buf.is_none() || self.weight_host[rows - n_u + i] != 0.0;
            let passed = |i: usize| {
                let tau = threshold as f32 * mult.as_ref().map_or(1.0, |m| m[label[i] as usize]);
                has_target(i) && conf[i] >= tau
            };
            pseudo_label_diagnostics(win, &m.hidden, label, has_target, passed);
            if let Some(st) = stabiliser {
                record_confident(st, self.dist, &m.rows[n_l..], conf, label);
            }
        } else if cfg.adversarial.kind == AdversarialKind::Vat && n_u > 0 {
            // VAT's target on an unlabeled row is the clean pass's own prediction, sg(p(e)),
            // with no mask: its argmax is the row's pseudo-label for the same diagnostics.
            let label: Vec<f32> = logits[n_l * classes..].chunks(classes).map(|z| argmax(z) as f32).collect();
            pseudo_label_diagnostics(win, &m.hidden, &label, |_| true, |_| false);
        }
        let bank_probs = (recipe.target == TargetSource::Bank).then(|| {
            let mut probs = be.zeros(0);
            be.softmax(p0.acts.logits(), classes, &mut probs);
            be.download(&probs)
        });
        let sup_mean = sup * halves / n_l as f64;
        let total_loss = sup_mean + cons_term;
        if !total_loss.is_finite() {
            return Err(Error::Data(format!(
                "the loss became {total_loss} at step {} (supervised {sup_mean}, consistency {cons_term}): {}",
                step + 1,
                divergence_remedy(cfg, false)
            )));
        }

        let table_lr = self.fused.then_some(lr * self.table_mult);
        let adversarial = cfg.adversarial.kind != AdversarialKind::None;
        // The step's last backward pass may start averaging each finished layer's gradient
        // ([`GradSync::ready`]): the last micro-batch's last pass, when no adversarial pass
        // follows it.
        let last = mi as u64 + 1 == accum && !adversarial;
        let sync: Option<&dyn GradSync<B>> = last.then_some(self.dist as &dyn GradSync<B>);
        self.table.backward(
            be,
            model,
            params,
            &dev,
            &p0.acts,
            &p0.dlogits,
            &mut self.grads,
            table_lr,
            sync.filter(|_| !second_grad),
        );
        // Only FGM's direction is g; PGD, Fast-FGSM and VAT take theirs at e + r.
        let wants_g = cfg.adversarial.kind == AdversarialKind::Fgm;
        if wants_g {
            // METHODS.md §9's g = ∂(the whole clean loss)/∂e: the first pass's part here,
            // a second pass's below where it reads the same e.
            self.adv.g = be.download(&self.table.dpooled);
        }
        if second_grad {
            self.table.backward(
                be,
                model,
                params,
                dev1,
                &p1.acts,
                &p1.dlogits,
                &mut self.grads,
                table_lr,
                sync,
            );
            // The second pass reads e too (its own dropout after it), unless it has its own
            // augmented view: then its embeddings are another view's, not e.
            if wants_g && m.second.is_none() {
                let g1 = be.download(&self.table.dpooled);
                self.adv.g.iter_mut().zip(&g1).for_each(|(g, d)| *g += d);
            }
        }
        if adversarial {
            let a = AdversarialPass {
                be,
                model,
                x: &dev,
                labels: later_labels,
                n,
                n_l,
                key,
                accum,
                loss: kind,
                dist: self.dist,
                copies: dev.bag().is_some().then(|| {
                    batch.offsets.windows(2).map(|w| f64::from(w[1].saturating_sub(w[0]).max(1))).collect()
                }),
            };
            let (grads, table, adv) = (&mut self.grads, &mut self.table, &mut self.adv);
            let adv_loss = a.run(&cfg.adversarial, params, p0.acts.logits(), grads, table, adv);
            if !adv_loss.is_finite() {
                return Err(Error::Data(format!(
                    "the adversarial loss became {adv_loss} at step {}: lower adversarial.epsilon or adversarial.weight",
                    step + 1
                )));
            }
            total_adv += adv_loss / accum as f64;
            win.adv_sum += adv_loss / world as f64;
            win.adv_count += 1;
        }
        win.sup_sum += sup * halves;
        win.docs += n_l as u64;
        win.tokens += batch.ids.len() as u64;
        for (i, row) in logits.chunks(classes).enumerate().take(n_l) {
            let pred = crate::backend::argmax(row);
            win.correct += u64::from(batch.labels[i] == pred as i32);
        }
        Ok((total_loss / accum as f64 + total_adv, bank_probs))
    }
}

/// The step's gradient norm `norm` (step `step`, 0-based), or the error of a run whose
/// gradient left what f32 optimizer moments hold: not finite, or past √f32::MAX (≈1.8e19),
/// where the square of a gradient that large in one element overflows Adam's second moment.
/// The loss may still be finite there; the run stops at this step, not at the next
/// checkpoint's write.
pub(super) fn check_grad_norm(norm: f64, step: u64, cfg: &TrainConfig) -> Result<f64> {
    check_norm(norm, step, "the gradient's", || divergence_remedy(cfg, false))
}

/// [`check_grad_norm`] for the gradient `whose` names (MPL's teacher's too), with `remedy`
/// closing the error.
pub(super) fn check_norm(norm: f64, step: u64, whose: &str, remedy: impl FnOnce() -> String) -> Result<f64> {
    if norm.is_finite() && norm <= f64::from(f32::MAX).sqrt() {
        return Ok(norm);
    }
    Err(Error::Data(format!(
        "{whose} norm became {norm:e} at step {}, past what f32 optimizer moments hold: {}",
        step + 1,
        remedy()
    )))
}

/// What to try when a loss of `cfg`'s run stops being finite: lowering the learning rate and
/// every setting that raised a term's weight or a tensor's rate (with MPL's teacher's own
/// rate when `teacher`), or clipping the gradient.
pub(super) fn divergence_remedy(cfg: &TrainConfig, teacher: bool) -> String {
    // Plain below a million, in exponent form beyond (and for the very small).
    let num = |v: f64| if (1e-4..1e6).contains(&v.abs()) { format!("{v}") } else { format!("{v:e}") };
    let mut lower = vec![format!("optim.lr (now {})", num(cfg.optim.lr))];
    for (field, o) in [("optim", Some(&cfg.optim)), ("mpl.teacher_optim", cfg.mpl.teacher_optim.as_ref())] {
        let Some(o) = o.filter(|_| field == "optim" || teacher) else { continue };
        if field != "optim" {
            lower.push(format!("{field}.lr (now {})", num(o.lr)));
        }
        for (prefix, m) in &o.lr_mult {
            if *m > 1.0 {
                lower.push(format!("{field}.lr_mult.{prefix:?} (now {})", num(*m)));
            }
        }
    }
    let recipe = cfg.recipe();
    if recipe.weight > 0.0 {
        lower.push(format!("consistency.weight (now {})", num(recipe.weight)));
    }
    // A temperature far below 1 divides the logits by it (R-Drop's and the sharpened
    // targets' softmax).
    if let Some(t) = cfg.consistency.temperature.filter(|&t| recipe.weight > 0.0 && t < 0.1) {
        lower.push(format!("raise consistency.temperature (now {})", num(t)));
    }
    if cfg.adversarial.kind != AdversarialKind::None {
        let a = &cfg.adversarial;
        let (w, e) = (num(a.weight), num(a.epsilon));
        lower.push(format!("adversarial.weight (now {w}) or adversarial.epsilon (now {e})"));
    }
    // The clipping of each optimizer in the run: MPL's teacher clips with its own when it
    // has one.
    let mut clips = vec![("optim.clip_norm", cfg.optim.clip_norm)];
    if let Some(o) = cfg.mpl.teacher_optim.as_ref().filter(|_| teacher) {
        clips.push(("mpl.teacher_optim.clip_norm", o.clip_norm));
    }
    let mut clip = String::new();
    for (field, c) in clips.iter().filter(|c| c.1 > 0.0) {
        clip += &format!("; {field} is {}", num(*c));
    }
    let unset: Vec<&str> = clips.iter().filter(|c| c.1 <= 0.0).map(|c| c.0).collect();
    if !unset.is_empty() {
        clip += &format!("; or set {}", unset.join(" or "));
    }
    format!("lower {}{clip}", lower.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::backend::Activation;
    use crate::data::shard::SplitKind;
    use crate::model::bag::BagSpec;

    /// A micro-batch of 3 labeled and 3 unlabeled rows over a 16-bucket table.
    fn micro() -> Micro {
        let docs: [&[u32]; 6] = [&[1, 2, 3], &[4, 5], &[6, 1, 7, 8], &[9], &[10, 11, 2], &[12, 13, 14, 15]];
        let mut batch = HostBatch { ids: Vec::new(), offsets: vec![0], labels: vec![0, 2, 1, -1, -1, -1] };
        for d in docs {
            batch.ids.extend_from_slice(d);
            batch.offsets.push(batch.ids.len() as u32);
        }
        let rows = (0..6).map(|i| RowId { split: SplitKind::Train, shard: 0, row: i }).collect();
        Micro { batch, second: None, weak: None, rows, hidden: vec![-1; 6] }
    }

    /// FGM's g is ∂(the whole clean loss)/∂e (METHODS.md §9): with a second pass that takes
    /// gradient (R-Drop; Π without the stop-gradient), that pass's part is in it; with the
    /// stop-gradient (Π's default), the second pass is a constant target and is not; nor is
    /// it when the second pass reads its own augmented view (other embeddings than e). Checked
    /// against central differences of the clean loss in the pooled embedding, with both
    /// passes' dropout masks as the step drew them.
    #[test]
    fn fgm_direction_is_the_gradient_of_the_whole_clean_loss() {
        let be = Cpu::<f32>::new();
        let dist = Dist::single();
        let cases = [
            ("rdrop", None, false),
            ("pi", Some(false), false),
            ("pi", Some(true), false),
            ("rdrop", None, true),
        ];
        for (method, pi_sg, own_view) in cases {
            let mut sets = vec![
                "data.dir=\"d\"".to_string(),
                "train.out_dir=\"o\"".to_string(),
                format!("method={method:?}"),
                "model.embed_dropout=0.3".to_string(),
                "adversarial.kind=\"fgm\"".to_string(),
            ];
            if let Some(sg) = pi_sg {
                sets.push(format!("pi.stop_gradient_target={sg}"));
            }
            let o: Vec<_> = sets.iter().map(|s| crate::config::Override::parse(s).unwrap()).collect();
            let cfg: TrainConfig = crate::config::load(None, &o).unwrap();
            let recipe = cfg.recipe();
            let spec = BagSpec {
                buckets: 16,
                dim: 5,
                hidden: vec![],
                activation: Activation::Relu,
                embed_dropout: 0.3,
                hidden_dropout: 0.0,
                classes: 3,
            };
            let bag = BagModel::new(spec);
            // Random weights (the init's zero output layer would give g = 0).
            let len = bag.init::<f32>(7).len();
            let init: Vec<f32> = (0..len as u64)
                .map(|i| (crate::backend::mix64(i + 11) >> 40) as f32 / (1u64 << 24) as f32 - 0.5)
                .collect();
            let model = Model::Bag(bag);
            let mut params = be.upload(&init);
            let grad = matches!(recipe.target, TargetSource::SecondPass { grad: true });
            assert_eq!(grad, pi_sg != Some(true), "{method}");
            let mut st = Stepper {
                be: &be,
                model: &model,
                cfg: &cfg,
                recipe: &recipe,
                loss: super::super::loss_kind(&cfg),
                accum: 1,
                total: 10,
                batch_size: 3,
                dist: &dist,
                fused: false,
                table_mult: 1.0,
                passes: [Pass::new(&be, &model, true), Pass::new(&be, &model, grad)],
                row_loss: be.zeros(0),
                cons_rows: be.zeros(0),
                target_host: Vec::new(),
                weight_host: Vec::new(),
                target_buf: be.zeros(0),
                adv: AdversarialBuffers::new(&be, &model),
                grads: be.zeros(model.dense_len()),
                table: TableAcc::new(&be, model.table_dim()),
            };
            let mut m = micro();
            if own_view {
                let mut view = m.batch.clone();
                view.ids.iter_mut().for_each(|id| *id = (*id + 5) % 16);
                m.second = Some(view);
            }
            let w = 2.0;
            let inp = StepInputs { step: 3, w, lr: 0.1, mi: 0, teacher: None, bank: None, logits: None };
            st.micro(&mut params, &m, &inp, None, &mut LogWindow::default()).unwrap();
            let g = st.adv.g.clone();

            // The clean loss with `delta` added to the pooled embedding of the first pass,
            // and of the second where it takes gradient (else it stays a constant target).
            let (n, n_l, classes) = (6, 3, 3);
            let x = model.input(&be, &m.batch);
            let x1 = m.second.as_ref().map_or_else(|| model.input(&be, &m.batch), |v| model.input(&be, v));
            let grad_e = grad && !own_view;
            let key = DropoutKey {
                seed: cfg.train.seed,
                step: 3,
                site: 0,
                pass: 0,
                rows: RowMap::for_rank(&[n_l, n - n_l], 0, 1),
            };
            let key1 = DropoutKey { pass: SECOND_PASS, ..key };
            let halves = if recipe.ce_both_passes { 0.5 } else { 1.0 };
            // `both`: the second pass reads e + delta too (else e: a constant target).
            let loss = |delta: &[f32], both: bool| -> f64 {
                let d = be.upload(delta);
                let zero = be.zeros(delta.len());
                let (mut a0, mut a1) = (Acts::new(&be, &model), Acts::new(&be, &model));
                model.forward_perturbed(&be, &params, &x, n, Some(key), Some(&d), &mut a0);
                let d1 = if both { &d } else { &zero };
                model.forward_perturbed(&be, &params, &x1, n, Some(key1), Some(d1), &mut a1);
                let (mut dl, mut rl) = (be.zeros(0), be.zeros(0));
                let batch = x.bag().unwrap();
                let mut sup = be.softmax_loss(a0.logits(), classes, batch, st.loss, 1.0, &mut dl, &mut rl);
                if recipe.ce_both_passes {
                    sup += be.softmax_loss(a1.logits(), classes, batch, st.loss, 1.0, &mut dl, &mut rl);
                }
                let op = ConsistencyOp { scale: 1.0, ..recipe.op };
                let (mut ds, mut rows) = (be.zeros(n * classes), be.zeros(0));
                let aux = ConsistencyAux::default();
                let out = be.consistency(
                    &op,
                    a0.logits(),
                    0,
                    a1.logits(),
                    n,
                    classes,
                    &aux,
                    &mut ds,
                    None,
                    &mut rows,
                );
                sup * halves / n_l as f64 + w * out.loss_sum / n as f64
            };
            // The largest difference between g and central differences of the loss.
            let off_by = |both: bool| {
                let h = 1e-2f32;
                (0..g.len())
                    .map(|i| {
                        let mut d = vec![0.0f32; g.len()];
                        d[i] = h;
                        let up = loss(&d, both);
                        d[i] = -h;
                        let fd = (up - loss(&d, both)) / (2.0 * f64::from(h));
                        (fd - f64::from(g[i])).abs()
                    })
                    .fold(0.0, f64::max)
            };
            assert_eq!(g.len(), n * 5, "{method}");
            let scale = g.iter().fold(0.0f64, |a, &v| a.max(f64::from(v).abs()));
            let case = format!("{method} (stop-gradient {pi_sg:?}, own view {own_view})");
            assert!(scale > 1e-3, "{case}: g is all but zero");
            let tol = 1e-3 * scale;
            let err = off_by(grad_e);
            assert!(err < tol, "{case}: g is off by {err} (largest |g| {scale})");
            // Where the second pass reads e, its part is far above the tolerance: the
            // first pass's gradient alone would fail the check.
            if grad_e {
                let without = off_by(false);
                assert!(
                    without > 20.0 * tol,
                    "{case}: the second pass's part ({without}) is within the tolerance"
                );
            }
        }
    }
}
