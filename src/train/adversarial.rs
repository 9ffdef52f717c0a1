//! The adversarial passes of a training step (METHODS.md §9, `algo::adversarial`): the
//! perturbation of the embeddings (a bag model's pooled vectors, an encoder's token
//! embeddings) and the pass at e + r that adds its gradient.

use crate::algo::adversarial::{self as advx, AdversarialConfig, AdversarialKind};
use crate::backend::{Backend, ConsistencyAux, DropoutKey, EncoderOps, LossKind};
use crate::dist::Dist;
use crate::model::{Acts, Input, Model};

use super::step::TableAcc;

/// Buffers of the adversarial passes, reused every step.
pub(super) struct AdversarialBuffers<B: Backend> {
    pub(super) acts: Acts<B>,
    pub(super) dlogits: B::Buf,
    pub(super) row_loss: B::Buf,
    pub(super) rows: B::Buf,
    /// Parameter gradients of the ascent passes, discarded: only ∂loss/∂r is wanted (empty
    /// until the first).
    pub(super) scratch: B::Buf,
    pub(super) dpooled: B::Buf,
    /// g of the micro-batch's direction (METHODS.md §9): ∂(the clean loss)/∂e, summed over
    /// the clean passes that read e and take gradient.
    pub(super) g: Vec<f32>,
}

impl<B: Backend> AdversarialBuffers<B> {
    pub(super) fn new(be: &B, model: &Model) -> Self {
        AdversarialBuffers {
            acts: Acts::new(be, model),
            dlogits: be.zeros(0),
            row_loss: be.zeros(0),
            rows: be.zeros(0),
            scratch: be.zeros(0),
            dpooled: be.zeros(0),
            g: Vec::new(),
        }
    }
}

/// One micro-batch's adversarial term (METHODS.md §9, `algo::adversarial`): the
/// perturbation r of the embeddings ([`Model::forward_perturbed`]; its norm is taken per
/// document: over a bag model's gathered vectors, over all of an encoder's token rows of the
/// sequence), then a pass at e + r whose loss's gradient is added to the step's. FGM's
/// direction is the whole clean loss's gradient; the loss at e + r is the supervised loss
/// on the labeled rows (VAT's: the KL on every row). Every pass
/// keeps the first pass's dropout masks, so only r differs. Across ranks r is what one
/// process computes for the global batch: random rows are drawn by their place in it
/// (`key.rows`), and `norm = "batch"` sums the squared norm over the ranks.
pub(super) struct AdversarialPass<'a, B: EncoderOps<F = f32>> {
    pub(super) be: &'a B,
    pub(super) model: &'a Model,
    pub(super) x: &'a Input<B>,
    /// The batch whose labels the supervised loss reads.
    pub(super) labels: &'a B::Batch,
    pub(super) n: usize,
    pub(super) n_l: usize,
    pub(super) key: DropoutKey,
    pub(super) accum: u64,
    pub(super) loss: LossKind,
    pub(super) dist: &'a Dist,
    /// A bag model's gathered vectors per document (each at least 1), which its pooled
    /// perturbation stands for; `None` for an encoder ([`advx::Space`]).
    pub(super) copies: Option<Vec<f64>>,
}

impl<B: EncoderOps<F = f32>> AdversarialPass<'_, B> {
    /// The loss at `e + r` into `buf.dlogits` (scaled by `weight`): cross-entropy on the
    /// labeled rows, or for VAT KL(sg(p(e)) ‖ p(e + r)) on every row. Returns the loss's
    /// mean.
    pub(super) fn loss_at(
        &self,
        cfg: &AdversarialConfig,
        params: &B::Buf,
        clean: &B::Buf,
        r: &[f32],
        weight: f64,
        buf: &mut AdversarialBuffers<B>,
    ) -> f64 {
        let (be, classes) = (self.be, self.model.classes());
        let r = be.upload(r);
        self.model.forward_perturbed(be, params, self.x, self.n, Some(self.key), Some(&r), &mut buf.acts);
        if cfg.kind == AdversarialKind::Vat {
            buf.dlogits = be.zeros(self.n * classes);
            let op = crate::algo::consistency::ConsistencyOp {
                kind: crate::algo::consistency::ConsistencyKind::Kl,
                form: crate::algo::consistency::TargetForm::Logits,
                temperature: 1.0,
                threshold: 0.0,
                scale: weight / (self.n as f64 * self.accum as f64),
            };
            let out = be.consistency(
                &op,
                buf.acts.logits(),
                0,
                clean,
                self.n,
                classes,
                &ConsistencyAux::default(),
                &mut buf.dlogits,
                None,
                &mut buf.rows,
            );
            out.loss_sum / self.n as f64
        } else {
            let scale = (weight / (self.n_l as f64 * self.accum as f64)) as f32;
            let sum = be.softmax_loss(
                buf.acts.logits(),
                classes,
                self.labels,
                self.loss,
                scale,
                &mut buf.dlogits,
                &mut buf.row_loss,
            );
            sum / self.n_l as f64
        }
    }

    /// ∂loss/∂r at `r` (the ascent passes: parameter gradients discarded).
    pub(super) fn grad_at(
        &self,
        cfg: &AdversarialConfig,
        params: &mut B::Buf,
        clean: &B::Buf,
        r: &[f32],
        buf: &mut AdversarialBuffers<B>,
    ) -> Vec<f32> {
        self.loss_at(cfg, params, clean, r, 1.0, buf);
        // Allocated at the first ascent pass: a run without the adversarial term keeps no
        // gradient-sized scratch.
        if self.be.buf_len(&buf.scratch) == self.model.dense_len() {
            self.be.fill_zero(&mut buf.scratch);
        } else {
            buf.scratch = self.be.zeros(self.model.dense_len());
        }
        self.model.backward_dense(
            self.be,
            params,
            self.x,
            &buf.acts,
            &buf.dlogits,
            &mut buf.scratch,
            &mut buf.dpooled,
            None,
        );
        self.be.download(&buf.dpooled)
    }

    /// Finds r as `cfg` says (FGM's from `buf.g`), runs the adversarial pass and adds its gradient into `grads`
    /// and the table's; returns the weighted loss's mean.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn run(
        &self,
        cfg: &AdversarialConfig,
        params: &mut B::Buf,
        clean: &B::Buf,
        grads: &mut B::Buf,
        table: &mut TableAcc<B>,
        buf: &mut AdversarialBuffers<B>,
    ) -> f64 {
        let dim = self.model.perturbation_width(self.x);
        let eps = cfg.epsilon;
        let space = advx::Space { dim, scope: cfg.norm, copies: self.copies.as_deref() };
        let zero = || vec![0.0f32; self.n * dim];
        let noise_key = crate::backend::mix64(self.key.base() ^ 0xad5e_ed00);
        let reduce = |v: &mut [f64]| self.dist.sum("the adversarial perturbation's batch norm", v);
        // Each element's place for the random draws: a bag row's by its document's place in
        // the global batch; an encoder's by its document's and token's, so that padding
        // (each rank pads its own batch) moves nothing, and padding itself gets no noise.
        let element = |i: usize, j: usize| -> Option<u64> {
            let doc = self.key.rows.sequence(i);
            match self.x {
                Input::Tokens(tb) => {
                    let h = dim / tb.l.max(1);
                    let t = j / h;
                    (t < tb.lens[i]).then(|| ((doc << 16) + t as u64) * h as u64 + (j % h) as u64)
                }
                Input::Bag(_) => Some(doc * dim as u64 + j as u64),
            }
        };
        let r = match cfg.kind {
            AdversarialKind::None => return 0.0,
            AdversarialKind::Fgm => {
                let mut r = zero();
                advx::ascend(&mut r, &buf.g, space, eps, &reduce);
                r
            }
            AdversarialKind::Pgd | AdversarialKind::FastFgsm => {
                let (mut r, steps) = if cfg.kind == AdversarialKind::Pgd {
                    (zero(), cfg.steps)
                } else {
                    // A random start inside the ball: a random direction, radius ε·u.
                    let u = (noise_key >> 11) as f64 / (1u64 << 53) as f64;
                    (advx::random_direction(self.n, space, eps * u, noise_key, element, &reduce), 1)
                };
                for _ in 0..steps {
                    let g = self.grad_at(cfg, params, clean, &r, buf);
                    advx::ascend(&mut r, &g, space, cfg.step(), &reduce);
                    advx::project(&mut r, space, eps, &reduce);
                }
                r
            }
            AdversarialKind::Vat => {
                let d = advx::random_direction(self.n, space, cfg.xi, noise_key, element, &reduce);
                let g = self.grad_at(cfg, params, clean, &d, buf);
                let mut r = zero();
                advx::ascend(&mut r, &g, space, eps, &reduce);
                r
            }
        };
        let loss = self.loss_at(cfg, params, clean, &r, cfg.weight, buf);
        table.backward(self.be, self.model, params, self.x, &buf.acts, &buf.dlogits, grads, None, None);
        cfg.weight * loss
    }
}
