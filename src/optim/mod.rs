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

/// The lengths of the first and second moment buffers for `cfg` on `layout`, whose last
/// tensor is the embedding table `table`. A moment buffer covers a prefix of the layout: the
/// whole of it when lazy Adam keeps moments for the table, the dense tensors (`..table.offset`)
/// when only their optimizer needs it, and nothing otherwise (plain SGD everywhere keeps no
/// state at all, so a run neither allocates nor checkpoints 2·B·D zeros).
pub fn moment_lens(cfg: &OptimConfig, layout: &Layout, table: Slot) -> (usize, usize) {
    assert_eq!(table.range().end, layout.total(), "the table must be the layout's last tensor");
    let table_moments = cfg.table == TableOptim::SparseAdam;
    let (dense_m, dense_v) = match cfg.kind {
        OptimKind::Adamw | OptimKind::Lamb => (true, true),
        OptimKind::Sgd => (cfg.momentum > 0.0, false),
    };
    let len = |dense: bool| {
        if table_moments {
            layout.total()
        } else if dense {
            table.offset
        } else {
            0
        }
    };
    (len(dense_m), len(dense_v))
}

/// The embedding table's gradient as it reaches [`Optimizer::step`].
pub enum TableGrad<'a, Buf> {
    /// The touched rows' gradient, clipped with the rest and applied by the step.
    Rows(&'a mut SparseRows<Buf>),
    /// Already applied by the fused backward ([`Optimizer::fuses_table`]), with the squared
    /// norm of the gradient if it was computed (for the reported norm).
    Applied(Option<f64>),
}

/// The optimizer's state: moments over a prefix of the parameters' layout ([`moment_lens`]),
/// and the step count.
pub struct Optimizer<B: Backend> {
    pub cfg: OptimConfig,
    /// First moment (Adam, LAMB, lazy Adam) or momentum buffer (SGD); a layout prefix.
    pub m: B::Buf,
    /// Second moment (Adam, LAMB, lazy Adam); a layout prefix.
    pub v: B::Buf,
    /// Optimizer steps taken.
    pub t: u64,
}

impl<B: Backend> Optimizer<B> {
    /// Zero state for a model with `layout`, whose last tensor is the embedding table at
    /// `table`. Moments exist only where an optimizer reads them (see [`moment_lens`]).
    pub fn new(be: &B, layout: &Layout, table: Slot, cfg: OptimConfig) -> Self {
        let (m, v) = moment_lens(&cfg, layout, table);
        Optimizer { cfg, m: be.zeros(m), v: be.zeros(v), t: 0 }
    }

    /// Whether the table's update may be fused into its backward pass
    /// ([`Backend::embedding_bag_sgd`], [`TableGrad::Applied`]): plain SGD on the table, no
    /// clipping (which needs the whole gradient first) and no accumulation (whose
    /// micro-batches must all see the same table).
    pub fn fuses_table(&self) -> bool {
        self.cfg.table == TableOptim::Sgd && self.cfg.clip_norm == 0.0 && self.cfg.grad_accum == 1
    }

    /// The learning rate of the tensor at `slot` when the schedule gives `lr`.
    pub fn lr_of(&self, layout: &Layout, slot: Slot, lr: f64) -> f64 {
        layout.tensors().iter().find(|t| t.slot == slot).map_or(lr, |t| lr * self.cfg.mult(&t.name))
    }

    /// One step with learning rate `lr` on `params`, from dense gradients `grads` (the
    /// layout up to `table.offset`) and the table's gradient. Clips first when configured;
    /// returns the gradient norm before clipping (of the dense tensors alone when the table's
    /// was applied and its norm not given). (Every buffer is an explicit argument, as in the
    /// backend interface.)
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        be: &B,
        layout: &Layout,
        table: Slot,
        params: &mut B::Buf,
        grads: &mut B::Buf,
        table_grad: TableGrad<'_, B::Buf>,
        lr: f64,
    ) -> f64 {
        let dense_sq = be.sq_norm(grads, 0..table.offset);
        let (rows, norm) = match table_grad {
            TableGrad::Rows(rows) => {
                let n = rows.rows.len() * rows.dim;
                let norm = (dense_sq + be.sq_norm(&rows.values, 0..n)).sqrt();
                if self.cfg.clip_norm > 0.0 && norm > self.cfg.clip_norm {
                    let f = self.cfg.clip_norm / norm;
                    be.scale(grads, 0..table.offset, f);
                    be.scale(&mut rows.values, 0..n, f);
                }
                (Some(rows), norm)
            }
            TableGrad::Applied(sq) => {
                assert!(
                    self.fuses_table(),
                    "the table's update was fused where the optimizer does not allow it"
                );
                (None, (dense_sq + sq.unwrap_or(0.0)).sqrt())
            }
        };
        self.t += 1;
        let c = &self.cfg;
        for tensor in layout.tensors() {
            let mult = c.mult(&tensor.name);
            if mult == 0.0 {
                // A frozen tensor: its update would change nothing but moments that no step
                // reads (the multiplier holds for the whole run). Skipping it saves a pass
                // over its parameters, gradients and moments.
                continue;
            }
            let lr = lr * mult;
            let adam = AdamStep {
                lr,
                beta1: c.beta1,
                beta2: c.beta2,
                eps: c.eps,
                weight_decay: c.weight_decay,
                t: self.t,
            };
            if tensor.slot == table {
                if let Some(rows) = &rows {
                    match c.table {
                        TableOptim::SparseAdam => {
                            be.sparse_adam(params, table, rows, &mut self.m, &mut self.v, adam)
                        }
                        TableOptim::Sgd => be.sparse_sgd(params, table, rows, lr),
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;

    fn layout() -> (Layout, Slot, Slot) {
        let mut l = Layout::new();
        let w = l.vector("output.weight", 3);
        let t = l.matrix("embedding.weight", 4, 2);
        (l, w, t)
    }

    fn sparse(rows: Vec<u32>, values: Vec<f64>) -> SparseRows<Vec<f64>> {
        SparseRows { rows, values, dim: 2 }
    }

    #[test]
    fn adamw_first_step_is_sign_of_gradient_plus_decay() {
        let be = Cpu::<f64>::new();
        let (l, w, t) = layout();
        let cfg = OptimConfig { lr: 0.1, weight_decay: 0.5, eps: 1e-12, ..OptimConfig::default() };
        let mut opt = Optimizer::new(&be, &l, t, cfg);
        let mut p = vec![1.0; l.total()];
        let mut g = vec![0.0; t.offset];
        g[w.offset..w.offset + 3].copy_from_slice(&[2.0, -0.5, 0.0]);
        let mut s = sparse(vec![], vec![]);
        opt.step(&be, &l, t, &mut p, &mut g, TableGrad::Rows(&mut s), 0.1);
        // t = 1: m̂ = g, v̂ = g², so the step is lr·(sign(g) + wd·p).
        let want = [1.0 - 0.1 * (1.0 + 0.5), 1.0 - 0.1 * (-1.0 + 0.5), 1.0 - 0.1 * 0.5];
        for (got, want) in p[w.range()].iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
        assert!(p[t.range()].iter().all(|&v| v == 1.0), "no table gradient: table untouched");
    }

    #[test]
    fn adamw_matches_a_scalar_reference_over_several_steps() {
        let be = Cpu::<f64>::new();
        let (l, w, t) = layout();
        let cfg = OptimConfig {
            lr: 0.05,
            beta1: 0.8,
            beta2: 0.9,
            eps: 1e-6,
            weight_decay: 0.1,
            ..OptimConfig::default()
        };
        let mut opt = Optimizer::new(&be, &l, t, cfg.clone());
        let mut p = vec![0.5; l.total()];
        let grads = [[0.3, -1.0, 2.0], [-0.2, 0.4, 1.0], [1.5, 0.0, -0.7]];
        let (mut rp, mut rm, mut rv) = ([0.5f64; 3], [0.0f64; 3], [0.0f64; 3]);
        for (step, g) in grads.iter().enumerate() {
            let mut gb = vec![0.0; t.offset];
            gb[w.range()].copy_from_slice(g);
            opt.step(&be, &l, t, &mut p, &mut gb, TableGrad::Rows(&mut sparse(vec![], vec![])), cfg.lr);
            let tt = step as i32 + 1;
            for i in 0..3 {
                rm[i] = cfg.beta1 * rm[i] + (1.0 - cfg.beta1) * g[i];
                rv[i] = cfg.beta2 * rv[i] + (1.0 - cfg.beta2) * g[i] * g[i];
                let (mh, vh) = (rm[i] / (1.0 - cfg.beta1.powi(tt)), rv[i] / (1.0 - cfg.beta2.powi(tt)));
                rp[i] -= cfg.lr * (mh / (vh.sqrt() + cfg.eps) + cfg.weight_decay * rp[i]);
            }
        }
        for (got, want) in p[w.range()].iter().zip(rp) {
            assert!((got - want).abs() < 1e-12, "{got} vs {want}");
        }
    }

    #[test]
    fn sparse_add_merges_sorted_rows() {
        let be = Cpu::<f64>::new();
        let a = sparse(vec![1, 4, 7], vec![1.0, 1.0, 2.0, 2.0, 3.0, 3.0]);
        let b = sparse(vec![0, 4, 9], vec![10.0, 10.0, 20.0, 20.0, 30.0, 30.0]);
        let c = be.sparse_add(a, &b);
        assert_eq!(c.rows, [0, 1, 4, 7, 9]);
        assert_eq!(c.values, [10.0, 10.0, 1.0, 1.0, 22.0, 22.0, 3.0, 3.0, 30.0, 30.0]);
    }

    #[test]
    fn lazy_adam_updates_only_touched_rows_and_takes_no_decay() {
        let be = Cpu::<f64>::new();
        let (l, _, t) = layout();
        let cfg = OptimConfig { weight_decay: 0.5, eps: 1e-12, ..OptimConfig::default() };
        let mut opt = Optimizer::new(&be, &l, t, cfg);
        let mut p = vec![1.0; l.total()];
        let mut g = vec![0.0; t.offset];
        let mut s = sparse(vec![1, 3], vec![1.0, -1.0, 0.5, 0.25]);
        opt.step(&be, &l, t, &mut p, &mut g, TableGrad::Rows(&mut s), 0.01);
        let row = |r: usize| &p[t.offset + 2 * r..t.offset + 2 * r + 2];
        assert_eq!(row(0), [1.0, 1.0]);
        assert_eq!(row(2), [1.0, 1.0]);
        assert!((row(1)[0] - 0.99).abs() < 1e-9 && (row(1)[1] - 1.01).abs() < 1e-9, "{:?}", row(1));
        assert!((row(3)[0] - 0.99).abs() < 1e-9 && (row(3)[1] - 0.99).abs() < 1e-9, "{:?}", row(3));
        assert!(opt.m[t.offset..t.offset + 2].iter().all(|&v| v == 0.0), "untouched moments stay zero");
    }

    #[test]
    fn sgd_nesterov_two_steps_by_hand() {
        let be = Cpu::<f64>::new();
        let (l, w, t) = layout();
        let cfg = OptimConfig {
            kind: OptimKind::Sgd,
            table: TableOptim::Sgd,
            momentum: 0.9,
            nesterov: true,
            ..Default::default()
        };
        let mut opt = Optimizer::new(&be, &l, t, cfg);
        let mut p = vec![0.0; l.total()];
        let mut s = sparse(vec![0], vec![1.0, 2.0]);
        for _ in 0..2 {
            let mut g = vec![0.0; t.offset];
            g[w.offset] = 1.0;
            opt.step(&be, &l, t, &mut p, &mut g, TableGrad::Rows(&mut s), 0.1);
        }
        // b1 = 1, step1 = 1 + 0.9 = 1.9; b2 = 1.9, step2 = 1 + 1.71 = 2.71.
        assert!((p[w.offset] + 0.1 * (1.9 + 2.71)).abs() < 1e-12, "{}", p[w.offset]);
        // Sparse SGD on the table: two plain steps of lr·g.
        assert!((p[t.offset] + 0.2).abs() < 1e-12 && (p[t.offset + 1] + 0.4).abs() < 1e-12);
    }

    #[test]
    fn lamb_scales_by_the_trust_ratio() {
        let be = Cpu::<f64>::new();
        let (l, w, t) = layout();
        let cfg = OptimConfig { kind: OptimKind::Lamb, eps: 1e-12, ..OptimConfig::default() };
        let mut opt = Optimizer::new(&be, &l, t, cfg);
        let mut p = vec![0.0; l.total()];
        p[w.offset..w.offset + 3].copy_from_slice(&[3.0, 4.0, 0.0]); // ‖p‖ = 5
        let mut g = vec![0.0; t.offset];
        g[w.offset..w.offset + 3].copy_from_slice(&[1.0, 1.0, -1.0]); // u = (1, 1, −1), ‖u‖ = √3
        opt.step(&be, &l, t, &mut p, &mut g, TableGrad::Rows(&mut sparse(vec![], vec![])), 0.1);
        let r = 0.1 * 5.0 / 3f64.sqrt();
        let want = [3.0 - r, 4.0 - r, r];
        for (got, want) in p[w.range()].iter().zip(want) {
            assert!((got - want).abs() < 1e-9, "{got} vs {want}");
        }
    }

    #[test]
    fn clipping_and_multipliers() {
        let be = Cpu::<f64>::new();
        let (l, w, t) = layout();
        let mut cfg = OptimConfig {
            kind: OptimKind::Sgd,
            table: TableOptim::Sgd,
            momentum: 0.0,
            clip_norm: 1.0,
            ..Default::default()
        };
        cfg.lr_mult.insert("output".into(), 2.0);
        cfg.lr_mult.insert("out".into(), 5.0);
        assert_eq!(cfg.mult("output.weight"), 2.0, "the longest prefix wins");
        assert_eq!(cfg.mult("embedding.weight"), 1.0);
        let mut opt = Optimizer::new(&be, &l, t, cfg);
        let mut p = vec![0.0; l.total()];
        let mut g = vec![0.0; t.offset];
        g[w.offset] = 3.0;
        let mut s = sparse(vec![2], vec![4.0, 0.0]); // global norm 5 → scaled by 1/5
        let norm = opt.step(&be, &l, t, &mut p, &mut g, TableGrad::Rows(&mut s), 0.1);
        assert!((norm - 5.0).abs() < 1e-12);
        assert!((p[w.offset] + 0.1 * 2.0 * 0.6).abs() < 1e-12, "clipped and multiplied: {}", p[w.offset]);
        assert!((p[t.offset + 4] + 0.1 * 0.8).abs() < 1e-12, "{}", p[t.offset + 4]);
    }

    /// A multiplier of 0 freezes its tensor: no update, no weight decay, no moments.
    #[test]
    fn a_zero_multiplier_freezes_its_tensor() {
        let be = Cpu::<f64>::new();
        let (l, w, t) = layout();
        let mut cfg = OptimConfig { weight_decay: 0.1, ..Default::default() };
        cfg.lr_mult.insert("embedding".into(), 0.0);
        let mut opt = Optimizer::new(&be, &l, t, cfg);
        let mut p = vec![1.0; l.total()];
        let mut g = vec![0.5; t.offset];
        let mut s = sparse(vec![1], vec![2.0, -1.0]);
        opt.step(&be, &l, t, &mut p, &mut g, TableGrad::Rows(&mut s), 0.1);
        assert!(p[w.range()].iter().all(|&x| x < 1.0), "the head moves: {p:?}");
        assert_eq!(&p[t.range()], &[1.0; 8], "the frozen table stays");
        assert!(opt.m[t.range()].iter().chain(&opt.v[t.range()]).all(|&x| x == 0.0));
    }
}
