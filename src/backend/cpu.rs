//! The CPU backend: the reference implementation of every operation, with rayon across rows
//! and a fixed reduction order, so results do not depend on the thread count.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::{Activation, Backend, DropoutKey, HostBatch, LossKind, Real, SparseRows};
use crate::model::params::Slot;

/// The CPU backend for element type `F` (`f32` to train, `f64` for gradient checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu<F>(PhantomData<F>);

impl<F> Cpu<F> {
    /// The CPU backend.
    pub fn new() -> Self {
        Cpu(PhantomData)
    }
}

/// Rows per rayon task for row-parallel loops: large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;

fn gelu<F: Real>(x: F) -> (F, F) {
    // 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) and its derivative.
    let c = F::of((2.0 / std::f64::consts::PI).sqrt());
    let k = F::of(0.044715);
    let half = F::of(0.5);
    let one = F::one();
    let u = c * (x + k * x * x * x);
    let t = u.tanh();
    let y = half * x * (one + t);
    let du = c * (one + F::of(3.0) * k * x * x);
    let dy = half * (one + t) + half * x * (one - t * t) * du;
    (y, dy)
}

impl<F: Real> Backend for Cpu<F> {
    type F = F;
    type Buf = Vec<F>;
    type Batch = HostBatch;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn zeros(&self, len: usize) -> Vec<F> {
        vec![F::zero(); len]
    }

    fn upload(&self, host: &[F]) -> Vec<F> {
        host.to_vec()
    }

    fn download(&self, buf: &Vec<F>) -> Vec<F> {
        buf.clone()
    }

    fn fill_zero(&self, buf: &mut Vec<F>) {
        buf.iter_mut().for_each(|v| *v = F::zero());
    }

    fn upload_batch(&self, batch: &HostBatch) -> HostBatch {
        batch.clone()
    }

    fn embedding_bag_forward(&self, params: &Vec<F>, table: Slot, batch: &HostBatch, out: &mut Vec<F>) {
        let dim = table.cols;
        let t = &params[table.range()];
        let n = batch.len();
        out.resize(n * dim, F::zero());
        out.par_chunks_mut(dim).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(i, row)| {
            row.iter_mut().for_each(|v| *v = F::zero());
            let ids = &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize];
            for &id in ids {
                let src = &t[id as usize * dim..(id as usize + 1) * dim];
                row.iter_mut().zip(src).for_each(|(r, &s)| *r += s);
            }
            if !ids.is_empty() {
                let inv = F::one() / F::of(ids.len() as f64);
                row.iter_mut().for_each(|r| *r = *r * inv);
            }
        });
    }

    fn embedding_bag_backward(&self, batch: &HostBatch, dout: &Vec<F>, dim: usize) -> SparseRows<Vec<F>> {
        // (id, document) for every occurrence, sorted: each id's contributions are then
        // contiguous and summed in document order, whatever the thread count.
        let mut occ: Vec<(u32, u32)> = Vec::with_capacity(batch.ids.len());
        for i in 0..batch.len() {
            for &id in &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize] {
                occ.push((id, i as u32));
            }
        }
        occ.par_sort_unstable();
        let mut starts: Vec<usize> = Vec::new();
        for (k, o) in occ.iter().enumerate() {
            if k == 0 || occ[k - 1].0 != o.0 {
                starts.push(k);
            }
        }
        starts.push(occ.len());
        let rows: Vec<u32> = starts[..starts.len() - 1].iter().map(|&k| occ[k].0).collect();
        let mut values = vec![F::zero(); rows.len() * dim];
        let inv_len: Vec<F> = (0..batch.len())
            .map(|i| {
                let len = batch.offsets[i + 1] - batch.offsets[i];
                F::one() / F::of(f64::from(len.max(1)))
            })
            .collect();
        values.par_chunks_mut(dim).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, out)| {
            for &(_, doc) in &occ[starts[r]..starts[r + 1]] {
                let d = doc as usize;
                let scale = inv_len[d];
                out.iter_mut().zip(&dout[d * dim..(d + 1) * dim]).for_each(|(o, &g)| *o += g * scale);
            }
        });
        SparseRows { rows, values, dim }
    }

    fn linear_forward(&self, x: &Vec<F>, n: usize, params: &Vec<F>, w: Slot, b: Slot, y: &mut Vec<F>) {
        let (out_dim, in_dim) = (w.rows, w.cols);
        y.resize(n * out_dim, F::zero());
        let bias = &params[b.range()];
        for row in y.chunks_mut(out_dim) {
            row.copy_from_slice(bias);
        }
        // y (n×out) += x (n×in) · Wᵀ (in×out); Wᵀ[k][j] = W[j][k].
        F::gemm(
            n,
            in_dim,
            out_dim,
            F::one(),
            x,
            (in_dim as isize, 1),
            &params[w.range()],
            (1, in_dim as isize),
            F::one(),
            y,
            (out_dim as isize, 1),
        );
    }

    fn linear_backward(
        &self,
        x: &Vec<F>,
        n: usize,
        params: &Vec<F>,
        w: Slot,
        b: Slot,
        dy: &Vec<F>,
        grads: &mut Vec<F>,
        dx: Option<&mut Vec<F>>,
    ) {
        let (out_dim, in_dim) = (w.rows, w.cols);
        if let Some(dx) = dx {
            dx.resize(n * in_dim, F::zero());
            // dx (n×in) = dy (n×out) · W (out×in)
            F::gemm(
                n,
                out_dim,
                in_dim,
                F::one(),
                dy,
                (out_dim as isize, 1),
                &params[w.range()],
                (in_dim as isize, 1),
                F::zero(),
                dx,
                (in_dim as isize, 1),
            );
        }
        // dW (out×in) += dyᵀ (out×n) · x (n×in); dyᵀ[o][r] = dy[r][o].
        F::gemm(
            out_dim,
            n,
            in_dim,
            F::one(),
            dy,
            (1, out_dim as isize),
            x,
            (in_dim as isize, 1),
            F::one(),
            &mut grads[w.range()],
            (in_dim as isize, 1),
        );
        let gb = &mut grads[b.range()];
        for row in dy.chunks(out_dim).take(n) {
            gb.iter_mut().zip(row).for_each(|(g, &d)| *g += d);
        }
    }

    fn activation_forward(&self, act: Activation, x: &Vec<F>, y: &mut Vec<F>) {
        y.resize(x.len(), F::zero());
        y.par_iter_mut().zip(x.par_iter()).with_min_len(1024).for_each(|(y, &x)| {
            *y = match act {
                Activation::Relu => x.max(F::zero()),
                Activation::Tanh => x.tanh(),
                Activation::Gelu => gelu(x).0,
            }
        });
    }

    fn activation_backward(&self, act: Activation, x: &Vec<F>, dy: &Vec<F>, dx: &mut Vec<F>) {
        dx.resize(x.len(), F::zero());
        dx.par_iter_mut().zip(x.par_iter().zip(dy.par_iter())).with_min_len(1024).for_each(
            |(dx, (&x, &dy))| {
                let d = match act {
                    Activation::Relu => {
                        if x > F::zero() {
                            F::one()
                        } else {
                            F::zero()
                        }
                    }
                    Activation::Tanh => {
                        let t = x.tanh();
                        F::one() - t * t
                    }
                    Activation::Gelu => gelu(x).1,
                };
                *dx = d * dy;
            },
        );
    }

    fn dropout(&self, p: f32, key: DropoutKey, x: &mut Vec<F>) {
        if p <= 0.0 {
            return;
        }
        let base = key.base();
        let scale = F::one() / F::of(1.0 - f64::from(p));
        x.par_iter_mut().enumerate().with_min_len(1024).for_each(|(i, v)| {
            *v = if DropoutKey::keep(base, i as u64, p) { *v * scale } else { F::zero() };
        });
    }

    fn softmax_loss(
        &self,
        logits: &Vec<F>,
        classes: usize,
        batch: &HostBatch,
        loss: LossKind,
        scale: F,
        dlogits: &mut Vec<F>,
        row_loss: &mut Vec<F>,
    ) -> f64 {
        let n = batch.len();
        dlogits.resize(n * classes, F::zero());
        row_loss.resize(n, F::zero());
        dlogits.par_chunks_mut(classes).zip(row_loss.par_iter_mut()).enumerate().for_each(|(i, (g, l))| {
            let z = &logits[i * classes..(i + 1) * classes];
            let Ok(y) = usize::try_from(batch.labels[i]) else {
                g.iter_mut().for_each(|v| *v = F::zero());
                *l = F::zero();
                return;
            };
            // Stable log-softmax: logp_c = z_c − m − ln Σ exp(z − m).
            let m = z.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
            let lse = z.iter().map(|&v| (v - m).exp()).sum::<F>().ln();
            for (gc, &zc) in g.iter_mut().zip(z) {
                *gc = (zc - m - lse).exp(); // p_c for now
            }
            let logp_y = z[y] - m - lse;
            match loss {
                LossKind::CrossEntropy { smoothing } => {
                    let eps = F::of(smoothing);
                    let off = eps / F::of(classes as f64);
                    let mut total = F::zero();
                    for (c, gc) in g.iter_mut().enumerate() {
                        let t = if c == y { F::one() - eps + off } else { off };
                        total += t * (z[c] - m - lse);
                        *gc = (*gc - t) * scale;
                    }
                    *l = -total;
                }
                LossKind::Focal { gamma } => {
                    let gm = F::of(gamma);
                    let p_y = logp_y.exp();
                    let q = (F::one() - p_y).max(F::zero());
                    *l = -q.powf(gm) * logp_y;
                    // p_y · dL/dp_y = γ(1−p_y)^{γ−1}·p_y·log p_y − (1−p_y)^γ
                    let mut pg = -q.powf(gm);
                    if gamma > 0.0 && q > F::zero() {
                        pg += gm * q.powf(gm - F::one()) * p_y * logp_y;
                    }
                    // dL/dz_c = (p_y·dL/dp_y)·(δ_yc − p_c)
                    for (c, gc) in g.iter_mut().enumerate() {
                        let delta = if c == y { F::one() } else { F::zero() };
                        *gc = pg * (delta - *gc) * scale;
                    }
                }
            }
        });
        row_loss.iter().map(|v| v.f64()).sum()
    }

    fn softmax(&self, logits: &Vec<F>, classes: usize, probs: &mut Vec<F>) {
        probs.resize(logits.len(), F::zero());
        probs.par_chunks_mut(classes).zip(logits.par_chunks(classes)).for_each(|(p, z)| {
            let m = z.iter().fold(F::neg_infinity(), |a, &b| a.max(b));
            let mut s = F::zero();
            for (pc, &zc) in p.iter_mut().zip(z) {
                *pc = (zc - m).exp();
                s += *pc;
            }
            p.iter_mut().for_each(|v| *v = *v / s);
        });
    }
}
