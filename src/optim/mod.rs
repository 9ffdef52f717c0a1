//! Optimizers over the flat buffer: per-tensor AdamW / LAMB / SGD for dense tensors, lazy
//! Adam or SGD for the embedding table's touched rows, per-tensor learning-rate
//! multipliers, global-norm clipping, and the learning-rate schedule.

pub mod schedule;

use serde::{Deserialize, Serialize};

use crate::backend::{AdamStep, Backend, SgdStep, SparseRows};
use crate::model::params::{Layout, Slot};

/// The optimizer of the dense tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OptimKind {
    Adamw,
    Sgd,
    Lamb,
}

/// The optimizer of the embedding table's touched rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TableOptim {
    /// Lazy Adam: moments of touched rows only, no weight decay.
    SparseAdam,
    /// Plain SGD on touched rows (fastText's update).
    Sgd,
}

/// `[optim]` of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimConfig {
    /// Optimizer of every tensor but the embedding table.
    pub kind: OptimKind,
    /// Optimizer of the embedding table.
    pub table: TableOptim,
    /// Peak learning rate.
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    /// Decoupled (AdamW, LAMB) or L2 (SGD) weight decay of dense tensors.
    pub weight_decay: f64,
    /// SGD momentum.
    pub momentum: f64,
    /// SGD Nesterov momentum.
    pub nesterov: bool,
    /// Clip the global gradient norm to this; 0 = no clipping.
    pub clip_norm: f64,
    /// Micro-batches accumulated per optimizer step.
    pub grad_accum: u32,
    /// Learning-rate multipliers by tensor-name prefix, e.g. `{ "embedding" = 10.0 }`; the
    /// longest matching prefix wins.
    pub lr_mult: std::collections::BTreeMap<String, f64>,
}

impl Default for OptimConfig {
    fn default() -> Self {
        OptimConfig {
            kind: OptimKind::Adamw,
            table: TableOptim::SparseAdam,
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            momentum: 0.9,
            nesterov: false,
            clip_norm: 0.0,
            grad_accum: 1,
            lr_mult: Default::default(),
        }
    }
}

impl OptimConfig {
    /// The learning-rate multiplier of tensor `name`.
    pub fn mult(&self, name: &str) -> f64 {
        self.lr_mult
            .iter()
            .filter(|(p, _)| name.starts_with(p.as_str()))
            .max_by_key(|(p, _)| p.len())
            .map_or(1.0, |(_, &m)| m)
    }
}

/// The optimizer's state: moments in the parameters' layout, and the step count.
pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// First moment (Adam, LAMB, lazy Adam) or momentum buffer (SGD); parameters' layout.
    pub m: B::Buf,
    /// Second moment (Adam, LAMB, lazy Adam); parameters' layout.
    pub v: B::Buf,
    /// Optimizer steps taken.
    pub t: u64,
}

impl<B: Backend> Optimizer<B> {
    /// Zero state for a model with `layout`.
    pub fn new(be: &B, layout: &Layout, cfg: OptimConfig) -> Self {
        let n = layout.total();
        Optimizer { cfg, m: be.zeros(n), v: be.zeros(n), t: 0 }
    }

    /// The global gradient norm of the dense part and the table's sparse rows.
    pub fn grad_norm(be: &B, dense: &B::Buf, dense_len: usize, sparse: &SparseRows<B::Buf>) -> f64 {
        let sparse_len = sparse.rows.len() * sparse.dim;
        (be.sq_norm(dense, 0..dense_len) + be.sq_norm(&sparse.values, 0..sparse_len)).sqrt()
    }

    /// One step with learning rate `lr` on `params`, from dense gradients `grads` (the
    /// layout up to `table.offset`) and the table's sparse gradient. Clips first when
    /// configured; returns the gradient norm before clipping. (Every buffer is an explicit
    /// argument, as in the backend interface.)
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        be: &B,
        layout: &Layout,
        table: Slot,
        params: &mut B::Buf,
        grads: &mut B::Buf,
        sparse: &mut SparseRows<B::Buf>,
        lr: f64,
    ) -> f64 {
        let norm = Self::grad_norm(be, grads, table.offset, sparse);
        if self.cfg.clip_norm > 0.0 && norm > self.cfg.clip_norm {
            let f = self.cfg.clip_norm / norm;
            be.scale(grads, 0..table.offset, f);
            let n = sparse.rows.len() * sparse.dim;
            be.scale(&mut sparse.values, 0..n, f);
        }
        self.t += 1;
        let c = &self.cfg;
        for tensor in layout.tensors() {
            let lr = lr * c.mult(&tensor.name);
            let adam = AdamStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                t: self.t,
            };
            if tensor.slot == table {
                match c.table {
                    TableOptim::SparseAdam => {
                        be.sparse_adam(params, table, sparse, &mut self.m, &mut self.v, adam)
                    }
                    TableOptim::Sgd => be.sparse_sgd(params, table, sparse, lr),
                }
                continue;
            }
            match c.kind {
                OptimKind::Adamw => be.adamw(params, grads, &mut self.m, &mut self.v, tensor.slot, adam),
                OptimKind::Lamb => be.lamb(params, grads, &mut self.m, &mut self.v, tensor.slot, adam),
                OptimKind::Sgd => {
                    let h = SgdStep {
                        lr,
                        momentum: c.momentum,
                        nesterov: c.nesterov,
                        weight_decay: c.weight_decay,
                    };
                    be.sgd(params, grads, &mut self.m, tensor.slot, h)
                }
            }
        }
        norm
    }
}
