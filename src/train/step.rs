//! The parts of one training step that every method shares: a micro-batch's views
//! (labeled rows, unlabeled rows, strong and per-pass views), a forward pass's buffers, the
//! table gradient over several backward passes, training-signal annealing, and the
//! pseudo-label diagnostic.

use crate::backend::{Backend, HostBatch, SparseRows};
use crate::bank::RowId;
use crate::checkpoint::LogWindow;
use crate::data::dataset::Dataset;
use crate::data::loader::Loader;
use crate::error::Result;
use crate::model::bag::{Activations, BagModel};

/// The `pass` bit of a step's second forward pass (Π, R-Drop, the teacher), so that its
/// dropout masks differ from the first pass's.
pub(super) const SECOND_PASS: u32 = 1 << 20;

/// One forward pass's activations and the gradient of its logits.
pub(super) struct Pass<B: Backend> {
    pub(super) acts: Activations<B>,
    pub(super) dlogits: B::Buf,
}

impl<B: Backend> Pass<B> {
    pub(super) fn new(be: &B, model: &BagModel) -> Self {
        Pass { acts: Activations::new(be, model), dlogits: be.zeros(0) }
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
    /// step's, and, with `fused_lr`, the table's SGD update applied at once.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn backward(
        &mut self,
        be: &B,
        model: &BagModel,
        params: &mut B::Buf,
        dev: &B::Batch,
        acts: &Activations<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        fused_lr: Option<f64>,
    ) {
        model.backward_dense(be, params, acts, dlogits, grads, &mut self.dpooled);
        if !self.skip {
            if self.any {
                be.embedding_bag_backward(dev, &self.dpooled, model.spec.dim, &mut self.extra);
                let acc = std::mem::replace(&mut self.grad, SparseRows::new(be.zeros(0), model.spec.dim));
                self.grad = be.sparse_add(acc, &self.extra);
            } else {
                be.embedding_bag_backward(dev, &self.dpooled, model.spec.dim, &mut self.grad);
            }
            self.any = true;
        }
        if let Some(lr) = fused_lr {
            be.embedding_bag_sgd(params, model.table, dev, &self.dpooled, lr);
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
            crate::data::augment::strong(doc, self.buckets, &self.cfg, key, &mut ids_buf);
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
/// mean's denominator). Returns the loss removed.
pub(super) fn drop_confident_rows(
    logits: &[f32],
    labels: &[i32],
    classes: usize,
    eta: f64,
    dlogits: &mut [f32],
    row_loss: &[f32],
    win: &mut LogWindow,
) -> f64 {
    let mut removed = 0.0;
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
        }
    }
    removed
}

/// Pseudo-label accuracy against the hidden labels (diagnostics only): of every unlabeled
/// row with a known label, and of those that passed the mask.
pub(super) fn pseudo_label_diagnostics(
    win: &mut LogWindow,
    hidden: &[i32],
    label: &[f32],
    passed: impl Fn(usize) -> bool,
) {
    for (i, (&h, &l)) in hidden.iter().zip(label).enumerate() {
        if h < 0 {
            continue;
        }
        let right = u64::from(h == l as i32);
        win.pl_rows += 1;
        win.pl_correct += right;
        if passed(i) {
            win.pl_passed += 1;
            win.pl_passed_correct += right;
        }
    }
}
