//! The CPU backend: the reference implementation of every operation, with rayon across rows
//! and a fixed reduction order, so results do not depend on the thread count.

use std::marker::PhantomData;

use rayon::prelude::*;

use super::{
    Activation, AdamStep, AttnDropout, Backend, ConsistencyAux, ConsistencyOut, DropoutKey, HostBatch,
    LossKind, Matmul, Real, SgdStep, SparseRows,
};
use crate::algo::consistency::{self, ConsistencyOp};
use crate::model::params::Slot;

/// The CPU backend for element type `F` (`f32` to train, `f64` for gradient checks).
#[derive(Debug, Default, Clone, Copy)]
pub struct Cpu<F> {
    matmul: Matmul,
    _f: PhantomData<F>,
}

impl<F> Cpu<F> {
    /// The CPU backend, with exact (f32 or f64) products.
    pub fn new() -> Self {
        Cpu { matmul: Matmul::F32, _f: PhantomData }
    }

    /// This backend with the linear layers' products reading operands rounded as `matmul`
    /// says: the reference for the GPU's TF32 and bf16 GEMMs (slower than f32 here, as
    /// every product first rounds copies of its operands).
    pub fn with_matmul(self, matmul: Matmul) -> Self {
        Cpu { matmul, ..self }
    }

    /// `v` as this backend's products read it: borrowed when exact, else a rounded copy.
    fn operand<'a>(&self, v: &'a [F]) -> std::borrow::Cow<'a, [F]>
    where
        F: Real,
    {
        match self.matmul {
            Matmul::F32 => std::borrow::Cow::Borrowed(v),
            m => v.par_iter().map(|&x| F::of(m.round(x.f64() as f32) as f64)).collect::<Vec<_>>().into(),
        }
    }
}

/// Runs `f` on a worker of the current rayon pool (the global one outside any pool), so
/// that the parallel loops inside it start from a worker instead of handing each loop to
/// the pool from outside and sleeping until it ends: with one thread the loops then run
/// inline, and a training step costs no thread switches.
pub fn on_worker<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    // `rayon::scope` called outside a pool runs its closure on a worker of the global pool.
    if rayon::current_thread_index().is_some() {
        f()
    } else {
        rayon::scope(|_| f())
    }
}

/// The fewest rows of C a task of [`par_gemm`] computes: below this a block no longer
/// amortises packing its share of B.
const GEMM_MIN_ROWS: usize = 64;

/// `F::gemm` with C's rows split into contiguous blocks of a multiple of 64 rows, one rayon
/// task each (C row-major, `csc == 1`, `rsc >= n`; anything else, or too few rows, runs as
/// one call). Each element of C is still the same kernel's sum over the same k in the same
/// order (matrixmultiply blocks k and n alike for every block of rows), so the result is
/// identical bit for bit for any thread count (`par_gemm_matches_one_call_bit_for_bit`).
#[allow(clippy::too_many_arguments)]
fn par_gemm<F: Real>(
    (m, k, n): (usize, usize, usize),
    alpha: F,
    a: &[F],
    (rsa, csa): (isize, isize),
    b: &[F],
    b_strides: (isize, isize),
    beta: F,
    c: &mut [F],
    (rsc, csc): (isize, isize),
) {
    let tasks = (m / GEMM_MIN_ROWS).min(rayon::current_num_threads());
    if tasks <= 1 || k == 0 || n == 0 || csc != 1 || rsa < 0 || rsc < 0 || (rsc as usize) < n {
        F::gemm(m, k, n, alpha, a, (rsa, csa), b, b_strides, beta, c, (rsc, csc));
        return;
    }
    // Blocks start at multiples of 64 rows, so they cut the kernel's row tiles (4 to 16
    // rows) and its blocks of MC = 64 rows (matrixmultiply 0.3's default) where one call
    // would: a tile cut short goes through the kernel's masked path, which rounds
    // alpha·AB + beta·C differently. The bitwise test guards this against a new version.
    let rows = m.div_ceil(tasks).next_multiple_of(GEMM_MIN_ROWS);
    let ldc = rsc as usize;
    c.par_chunks_mut(rows * ldc).enumerate().for_each(|(t, ct)| {
        let first = t * rows;
        if first >= m {
            return;
        }
        let mt = rows.min(m - first);
        let at = &a[first * rsa as usize..];
        F::gemm(mt, k, n, alpha, at, (rsa, csa), b, b_strides, beta, ct, (rsc, 1));
    });
}

/// How many rows ahead of the current one the table loops prefetch.
const PREFETCH_AHEAD: usize = 4;

/// Asks the CPU to start loading `row` into its caches: a hint, with no effect on results.
/// The rows a batch touches are scattered over a table far larger than the caches, so the
/// hardware prefetcher cannot guess them; requesting a row a few rows ahead overlaps its
/// cache misses with the arithmetic on the current one.
#[inline(always)]
fn prefetch<F>(row: &[F]) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        let p = row.as_ptr().cast::<i8>();
        for offset in (0..std::mem::size_of_val(row)).step_by(64) {
            // SAFETY: a prefetch never faults and reads nothing architecturally; the address
            // lies inside `row`.
            unsafe { _mm_prefetch(p.wrapping_add(offset), _MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = row;
}

/// Rows per rayon task for row-parallel loops: large enough to amortise scheduling.
const ROWS_PER_TASK: usize = 16;
/// Below this many elements a sequential sort beats rayon's (measured: the parallel sort's
/// overhead dominated a batch of 16 documents).
const PARALLEL_SORT_MIN: usize = 1 << 16;

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

/// Φ(x) = 0.5·(1 + erf(x/√2)), the standard normal's distribution function.
fn normal_cdf<F: Real>(x: F) -> F {
    F::of(0.5) * (F::one() + (x * F::of(std::f64::consts::FRAC_1_SQRT_2)).erf())
}

/// BERT's exact GELU x·Φ(x) and its derivative Φ(x) + x·φ(x).
fn gelu_erf<F: Real>(x: F) -> (F, F) {
    let cdf = normal_cdf(x);
    let pdf = (F::of(-0.5) * x * x).exp() * F::of(1.0 / (2.0 * std::f64::consts::PI).sqrt());
    (x * cdf, cdf + x * pdf)
}

/// Adam's constants for one step, in `F`.
struct AdamConsts<F> {
    b1: F,
    b2: F,
    ob1: F,
    ob2: F,
    inv_c1: F,
    inv_sqrt_c2: F,
    eps: F,
    wd: F,
}

impl<F: Real> AdamConsts<F> {
    fn new(h: &AdamStep) -> Self {
        let (c1, c2) = (1.0 - h.beta1.powi(h.t as i32), 1.0 - h.beta2.powi(h.t as i32));
        AdamConsts {
            b1: F::of(h.beta1),
            b2: F::of(h.beta2),
            ob1: F::of(1.0 - h.beta1),
            ob2: F::of(1.0 - h.beta2),
            inv_c1: F::of(1.0 / c1),
            inv_sqrt_c2: F::of(1.0 / c2.sqrt()),
            eps: F::of(h.eps),
            wd: F::of(h.weight_decay),
        }
    }

    /// Updates one element's moments and returns the AdamW direction
    /// `m̂/(√v̂ + ε) + wd·p`, with `m̂ = m/(1−β₁ᵗ)`, `v̂ = v/(1−β₂ᵗ)`.
    #[inline(always)]
    fn direction(&self, p: F, g: F, m: &mut F, v: &mut F) -> F {
        *m = self.b1 * *m + self.ob1 * g;
        *v = self.b2 * *v + self.ob2 * g * g;
        *m * self.inv_c1 / (v.sqrt() * self.inv_sqrt_c2 + self.eps) + self.wd * p
    }
}

/// The Adam update of aligned slices in one vectorisable pass: `p −= lr·direction`.
fn adam_rows<F: Real>(p: &mut [F], g: &[F], m: &mut [F], v: &mut [F], h: AdamStep) {
    let k = AdamConsts::new(&h);
    let lr = F::of(h.lr);
    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
        *p = *p - lr * k.direction(*p, g, m, v);
    }
}

impl<F: Real> Backend for Cpu<F> {
    type F = F;
    type Buf = Vec<F>;
    type Batch = HostBatch;

    fn name(&self) -> String {
        "cpu".into()
    }

    fn buf_len(&self, buf: &Vec<F>) -> usize {
        buf.len()
    }

    fn zeros(&self, len: usize) -> Vec<F> {
        crate::hostmem::zeroed(len)
    }

    fn upload(&self, host: &[F]) -> Vec<F> {
        host.to_vec()
    }

    fn upload_vec(&self, host: Vec<F>) -> Vec<F> {
        host
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

    fn host<'a>(&self, buf: &'a Vec<F>) -> Option<&'a [F]> {
        Some(buf)
    }

    fn host_mut<'a>(&self, buf: &'a mut Vec<F>) -> Option<&'a mut [F]> {
        Some(buf)
    }

    fn embedding_bag_forward(&self, params: &Vec<F>, table: Slot, batch: &HostBatch, out: &mut Vec<F>) {
        let dim = table.cols;
        let t = &params[table.range()];
        let n = batch.len();
        out.resize(n * dim, F::zero());
        out.par_chunks_mut(dim).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(i, row)| {
            row.iter_mut().for_each(|v| *v = F::zero());
            let ids = &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize];
            for (j, &id) in ids.iter().enumerate() {
                if let Some(&ahead) = ids.get(j + PREFETCH_AHEAD) {
                    prefetch(&t[ahead as usize * dim..(ahead as usize + 1) * dim]);
                }
                let src = &t[id as usize * dim..(id as usize + 1) * dim];
                row.iter_mut().zip(src).for_each(|(r, &s)| *r += s);
            }
            if !ids.is_empty() {
                let inv = F::one() / F::of(ids.len() as f64);
                row.iter_mut().for_each(|r| *r = *r * inv);
            }
        });
    }

    fn embedding_bag_backward(
        &self,
        batch: &HostBatch,
        dout: &Vec<F>,
        dim: usize,
        out: &mut SparseRows<Vec<F>>,
    ) {
        // (id, document) for every occurrence, sorted: each id's contributions are then
        // contiguous and summed in document order, whatever the thread count.
        let mut occ: Vec<(u32, u32)> = Vec::with_capacity(batch.ids.len());
        for i in 0..batch.len() {
            for &id in &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize] {
                occ.push((id, i as u32));
            }
        }
        if occ.len() < PARALLEL_SORT_MIN {
            occ.sort_unstable();
        } else {
            occ.par_sort_unstable();
        }
        let mut starts: Vec<usize> = Vec::new();
        for (k, o) in occ.iter().enumerate() {
            if k == 0 || occ[k - 1].0 != o.0 {
                starts.push(k);
            }
        }
        starts.push(occ.len());
        out.dim = dim;
        out.rows.clear();
        out.rows.extend(starts[..starts.len() - 1].iter().map(|&k| occ[k].0));
        let values = &mut out.values;
        values.clear();
        values.resize(out.rows.len() * dim, F::zero());
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
    }

    fn embedding_bag_sgd(&self, params: &mut Vec<F>, table: Slot, batch: &HostBatch, dout: &Vec<F>, lr: f64) {
        let dim = table.cols;
        let n = batch.len();
        let scale: Vec<F> = (0..n)
            .map(|i| {
                let len = batch.offsets[i + 1] - batch.offsets[i];
                F::of(-lr / f64::from(len.max(1)))
            })
            .collect();
        // Each task owns a contiguous range of table rows and walks every occurrence,
        // applying those in its range: each row sees its updates in (document, position)
        // order for any number of tasks, and no two tasks write the same row.
        let tasks = rayon::current_num_threads().min(table.rows).max(1);
        let rows_per_task = table.rows.div_ceil(tasks);
        params[table.range()].par_chunks_mut(rows_per_task * dim).enumerate().for_each(|(k, rows)| {
            let first = k * rows_per_task;
            let end = first + rows.len() / dim;
            for i in 0..n {
                let g = &dout[i * dim..(i + 1) * dim];
                let s = scale[i];
                let ids = &batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize];
                for (j, &id) in ids.iter().enumerate() {
                    if let Some(&ahead) = ids.get(j + PREFETCH_AHEAD) {
                        let ahead = ahead as usize;
                        if (first..end).contains(&ahead) {
                            prefetch(&rows[(ahead - first) * dim..(ahead - first + 1) * dim]);
                        }
                    }
                    let id = id as usize;
                    if (first..end).contains(&id) {
                        let row = &mut rows[(id - first) * dim..(id - first + 1) * dim];
                        row.iter_mut().zip(g).for_each(|(r, &g)| *r += s * g);
                    }
                }
            }
        });
    }

    fn linear_forward(&self, x: &Vec<F>, n: usize, params: &Vec<F>, w: Slot, b: Slot, y: &mut Vec<F>) {
        let (out_dim, in_dim) = (w.rows, w.cols);
        y.resize(n * out_dim, F::zero());
        let bias = &params[b.range()];
        for row in y.chunks_mut(out_dim) {
            row.copy_from_slice(bias);
        }
        // y (n×out) += x (n×in) · Wᵀ (in×out); Wᵀ[k][j] = W[j][k].
        par_gemm(
            (n, in_dim, out_dim),
            F::one(),
            &self.operand(&x[..n * in_dim]),
            (in_dim as isize, 1),
            &self.operand(&params[w.range()]),
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
        let dy_op = self.operand(&dy[..n * out_dim]);
        if let Some(dx) = dx {
            dx.resize(n * in_dim, F::zero());
            // dx (n×in) = dy (n×out) · W (out×in)
            par_gemm(
                (n, out_dim, in_dim),
                F::one(),
                &dy_op,
                (out_dim as isize, 1),
                &self.operand(&params[w.range()]),
                (in_dim as isize, 1),
                F::zero(),
                dx,
                (in_dim as isize, 1),
            );
        }
        // dW (out×in) += dyᵀ (out×n) · x (n×in); dyᵀ[o][r] = dy[r][o].
        par_gemm(
            (out_dim, n, in_dim),
            F::one(),
            &dy_op,
            (1, out_dim as isize),
            &self.operand(&x[..n * in_dim]),
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
                Activation::GeluErf => x * normal_cdf(x),
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
                    Activation::GeluErf => gelu_erf(x).1,
                };
                *dx = d * dy;
            },
        );
    }

    fn dropout(&self, p: f32, key: DropoutKey, width: usize, x: &mut Vec<F>) {
        if p <= 0.0 {
            return;
        }
        let base = key.base();
        let scale = F::one() / F::of(1.0 - f64::from(p));
        let min_rows = (1024 / width.max(1)).max(1);
        x.par_chunks_mut(width.max(1)).enumerate().with_min_len(min_rows).for_each(|(r, row)| {
            let offset = key.rows.position(r) * width as u64;
            for (j, v) in row.iter_mut().enumerate() {
                *v = if DropoutKey::keep(base, offset + j as u64, p) { *v * scale } else { F::zero() };
            }
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

    fn sq_norm(&self, buf: &Vec<F>, range: std::ops::Range<usize>) -> f64 {
        // Fixed-size chunks summed in order: the same result for any thread count.
        let parts: Vec<f64> =
            buf[range].par_chunks(4096).map(|c| c.iter().map(|&x| x.f64() * x.f64()).sum::<f64>()).collect();
        parts.iter().sum()
    }

    fn scale(&self, buf: &mut Vec<F>, range: std::ops::Range<usize>, factor: f64) {
        let f = F::of(factor);
        buf[range].par_iter_mut().with_min_len(4096).for_each(|x| *x = *x * f);
    }

    fn axpy(&self, y: &mut Vec<F>, x: &Vec<F>, alpha: f64) {
        assert_eq!(y.len(), x.len(), "axpy: lengths differ");
        let a = F::of(alpha);
        y.par_iter_mut().with_min_len(4096).zip(x.par_iter()).for_each(|(y, &x)| *y += a * x);
    }

    fn adamw(
        &self,
        params: &mut Vec<F>,
        grads: &Vec<F>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
        slot: Slot,
        h: AdamStep,
    ) {
        let r = slot.range();
        adam_rows(&mut params[r.clone()], &grads[r.clone()], &mut m[r.clone()], &mut v[r], h);
    }

    fn lamb(
        &self,
        params: &mut Vec<F>,
        grads: &Vec<F>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
        slot: Slot,
        h: AdamStep,
    ) {
        let r = slot.range();
        let (p, g, m, v) = (&mut params[r.clone()], &grads[r.clone()], &mut m[r.clone()], &mut v[r]);
        // First pass: moments and the direction u (kept in a scratch buffer); second: the step.
        let k = AdamConsts::new(&h);
        let u: Vec<F> = p
            .iter()
            .zip(g)
            .zip(m.iter_mut())
            .zip(v.iter_mut())
            .map(|(((&p, &g), m), v)| k.direction(p, g, m, v))
            .collect();
        let pn = p.iter().map(|x| x.f64() * x.f64()).sum::<f64>().sqrt();
        let un = u.iter().map(|x| x.f64() * x.f64()).sum::<f64>().sqrt();
        let ratio = if pn > 0.0 && un > 0.0 { pn / un } else { 1.0 };
        let step = F::of(h.lr * ratio);
        p.iter_mut().zip(&u).for_each(|(p, &u)| *p = *p - step * u);
    }

    fn sgd(&self, params: &mut Vec<F>, grads: &Vec<F>, buf: &mut Vec<F>, slot: Slot, h: SgdStep) {
        let r = slot.range();
        let (p, g) = (&mut params[r.clone()], &grads[r.clone()]);
        let (lr, mu, wd) = (F::of(h.lr), F::of(h.momentum), F::of(h.weight_decay));
        if h.momentum == 0.0 {
            p.iter_mut().zip(g).for_each(|(p, &g)| *p = *p - lr * (g + wd * *p));
            return;
        }
        let b = &mut buf[r];
        for i in 0..p.len() {
            let gi = g[i] + wd * p[i];
            b[i] = mu * b[i] + gi;
            let step = if h.nesterov { gi + mu * b[i] } else { b[i] };
            p[i] = p[i] - lr * step;
        }
    }

    fn sparse_adam(
        &self,
        params: &mut Vec<F>,
        table: Slot,
        grad: &SparseRows<Vec<F>>,
        m: &mut Vec<F>,
        v: &mut Vec<F>,
        h: AdamStep,
    ) {
        let dim = grad.dim;
        let h = AdamStep { weight_decay: 0.0, ..h };
        // Rows are unique, so the per-row updates touch disjoint memory; they run in order
        // here (each row is only `dim` long) and are deterministic.
        for (k, &row) in grad.rows.iter().enumerate() {
            if let Some(&ahead) = grad.rows.get(k + PREFETCH_AHEAD) {
                let r = table.offset + ahead as usize * dim..table.offset + (ahead as usize + 1) * dim;
                prefetch(&params[r.clone()]);
                prefetch(&m[r.clone()]);
                prefetch(&v[r]);
            }
            let r = table.offset + row as usize * dim..table.offset + (row as usize + 1) * dim;
            let g = &grad.values[k * dim..(k + 1) * dim];
            adam_rows(&mut params[r.clone()], g, &mut m[r.clone()], &mut v[r], h);
        }
    }

    fn sparse_sgd(&self, params: &mut Vec<F>, table: Slot, grad: &SparseRows<Vec<F>>, lr: f64) {
        let dim = grad.dim;
        let lr = F::of(lr);
        for (k, &row) in grad.rows.iter().enumerate() {
            if let Some(&ahead) = grad.rows.get(k + PREFETCH_AHEAD) {
                let start = table.offset + ahead as usize * dim;
                prefetch(&params[start..start + dim]);
            }
            let start = table.offset + row as usize * dim;
            let g = &grad.values[k * dim..(k + 1) * dim];
            params[start..start + dim].iter_mut().zip(g).for_each(|(p, &g)| *p = *p - lr * g);
        }
    }

    fn sparse_add(&self, a: SparseRows<Vec<F>>, b: &SparseRows<Vec<F>>) -> SparseRows<Vec<F>> {
        let dim = a.dim;
        let (mut i, mut j) = (0, 0);
        let mut rows = Vec::with_capacity(a.rows.len() + b.rows.len());
        let mut values = Vec::with_capacity((a.rows.len() + b.rows.len()) * dim);
        while i < a.rows.len() || j < b.rows.len() {
            let take_a = j == b.rows.len() || (i < a.rows.len() && a.rows[i] <= b.rows[j]);
            let take_b = i == a.rows.len() || (j < b.rows.len() && b.rows[j] <= a.rows[i]);
            let row = if take_a { a.rows[i] } else { b.rows[j] };
            rows.push(row);
            let start = values.len();
            values.resize(start + dim, F::zero());
            if take_a {
                values[start..].iter_mut().zip(&a.values[i * dim..(i + 1) * dim]).for_each(|(o, &x)| *o += x);
                i += 1;
            }
            if take_b {
                values[start..].iter_mut().zip(&b.values[j * dim..(j + 1) * dim]).for_each(|(o, &x)| *o += x);
                j += 1;
            }
        }
        SparseRows { rows, values, dim }
    }

    fn consistency(
        &self,
        op: &ConsistencyOp,
        student: &Vec<F>,
        s_row0: usize,
        target: &Vec<F>,
        n: usize,
        classes: usize,
        aux: &ConsistencyAux<'_, Vec<F>>,
        dstudent: &mut Vec<F>,
        dtarget: Option<&mut Vec<F>>,
        rows: &mut Vec<F>,
    ) -> ConsistencyOut {
        let c = classes;
        assert!(
            student.len() >= (s_row0 + n) * c && dstudent.len() >= (s_row0 + n) * c,
            "consistency: student rows"
        );
        assert!(target.len() >= n * c, "consistency: target rows");
        let bias = aux.bias.map(|b| &b[..c]);
        let mult = aux.class_threshold.map(|m| &m[..c]);
        let ds = &mut dstudent[s_row0 * c..(s_row0 + n) * c];
        let out: Vec<consistency::RowOut<F>> = match dtarget {
            Some(dt) => ds
                .par_chunks_mut(c)
                .zip(dt[..n * c].par_chunks_mut(c))
                .enumerate()
                .map(|(i, (ds, dt))| {
                    let w = aux.row_weight.map_or(F::one(), |w| w[i]);
                    let zs = &student[(s_row0 + i) * c..(s_row0 + i + 1) * c];
                    consistency::row(op, zs, &target[i * c..(i + 1) * c], bias, mult, w, ds, Some(dt))
                })
                .collect(),
            None => ds
                .par_chunks_mut(c)
                .enumerate()
                .map(|(i, ds)| {
                    let w = aux.row_weight.map_or(F::one(), |w| w[i]);
                    let zs = &student[(s_row0 + i) * c..(s_row0 + i + 1) * c];
                    consistency::row(op, zs, &target[i * c..(i + 1) * c], bias, mult, w, ds, None)
                })
                .collect(),
        };
        rows.resize(3 * n, F::zero());
        let mut result = ConsistencyOut::default();
        for (i, r) in out.iter().enumerate() {
            rows[i] = r.loss;
            rows[n + i] = r.conf;
            rows[2 * n + i] = F::of(r.label as f64);
            result.loss_sum += r.loss.f64();
            result.passed += usize::from(r.passed);
        }
        result
    }

    fn ema(&self, shadow: &mut Vec<F>, params: &Vec<F>, range: std::ops::Range<usize>, alpha: f64) {
        let (a, b) = (F::of(alpha), F::of(1.0 - alpha));
        shadow[range.clone()]
            .par_iter_mut()
            .with_min_len(4096)
            .zip(params[range].par_iter())
            .for_each(|(s, &p)| *s = a * *s + b * p);
    }

    fn ema_rows(&self, shadow: &mut Vec<F>, params: &Vec<F>, table: Slot, rows: &[u32], factors: &[f64]) {
        let dim = table.cols;
        for (k, (&row, &f)) in rows.iter().zip(factors).enumerate() {
            if let Some(&ahead) = rows.get(k + PREFETCH_AHEAD) {
                let start = table.offset + ahead as usize * dim;
                prefetch(&shadow[start..start + dim]);
                prefetch(&params[start..start + dim]);
            }
            let start = table.offset + row as usize * dim;
            let (a, b) = (F::of(f), F::of(1.0 - f));
            shadow[start..start + dim]
                .iter_mut()
                .zip(&params[start..start + dim])
                .for_each(|(s, &p)| *s = a * *s + b * p);
        }
    }

    fn copy(&self, dst: &mut Vec<F>, src: &Vec<F>, range: std::ops::Range<usize>) {
        dst[range.clone()]
            .par_iter_mut()
            .with_min_len(4096)
            .zip(src[range].par_iter())
            .for_each(|(d, &s)| *d = s);
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

impl<F: Real> super::EncoderOps for Cpu<F> {
    fn layer_norm_forward(
        &self,
        x: &Vec<F>,
        n: usize,
        params: &Vec<F>,
        gamma: Slot,
        beta: Slot,
        eps: f64,
        y: &mut Vec<F>,
        stats: &mut Vec<F>,
    ) {
        let w = gamma.len();
        y.resize(n * w, F::zero());
        stats.resize(2 * n, F::zero());
        let (g, b) = (&params[gamma.range()], &params[beta.range()]);
        let eps = F::of(eps);
        let inv_w = F::one() / F::of(w as f64);
        y.par_chunks_mut(w).zip(stats.par_chunks_mut(2)).enumerate().with_min_len(ROWS_PER_TASK).for_each(
            |(r, (yr, st))| {
                let xr = &x[r * w..(r + 1) * w];
                let mu = xr.iter().copied().sum::<F>() * inv_w;
                let var = xr.iter().map(|&v| (v - mu) * (v - mu)).sum::<F>() * inv_w;
                let rstd = F::one() / (var + eps).sqrt();
                for j in 0..w {
                    yr[j] = (xr[j] - mu) * rstd * g[j] + b[j];
                }
                st[0] = mu;
                st[1] = rstd;
            },
        );
    }

    fn layer_norm_backward(
        &self,
        x: &Vec<F>,
        n: usize,
        params: &Vec<F>,
        gamma: Slot,
        beta: Slot,
        stats: &Vec<F>,
        dy: &Vec<F>,
        grads: &mut Vec<F>,
        dx: &mut Vec<F>,
    ) {
        let w = gamma.len();
        dx.resize(n * w, F::zero());
        let g = &params[gamma.range()];
        let inv_w = F::one() / F::of(w as f64);
        dx.par_chunks_mut(w).enumerate().with_min_len(ROWS_PER_TASK).for_each(|(r, dxr)| {
            let (mu, rstd) = (stats[2 * r], stats[2 * r + 1]);
            let (xr, dyr) = (&x[r * w..(r + 1) * w], &dy[r * w..(r + 1) * w]);
            // dx̂ = dy ⊙ γ; dx = rstd·(dx̂ − mean(dx̂) − x̂·mean(dx̂ ⊙ x̂)).
            let (mut s1, mut s2) = (F::zero(), F::zero());
            for j in 0..w {
                let xh = (xr[j] - mu) * rstd;
                let d = dyr[j] * g[j];
                s1 += d;
                s2 += d * xh;
            }
            let (m1, m2) = (s1 * inv_w, s2 * inv_w);
            for j in 0..w {
                let xh = (xr[j] - mu) * rstd;
                dxr[j] = rstd * (dyr[j] * g[j] - m1 - xh * m2);
            }
        });
        // dγ = Σ_rows dy ⊙ x̂ and dβ = Σ_rows dy, rows in order.
        let (gg, gb) = (gamma.range(), beta.range());
        for r in 0..n {
            let (mu, rstd) = (stats[2 * r], stats[2 * r + 1]);
            for j in 0..w {
                let d = dy[r * w + j];
                grads[gg.start + j] += d * (x[r * w + j] - mu) * rstd;
                grads[gb.start + j] += d;
            }
        }
    }

    fn attention_forward(
        &self,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        mask: &Vec<F>,
        (b, l, heads): (usize, usize, usize),
        scale: f64,
        dropout: Option<AttnDropout>,
        ctx: &mut Vec<F>,
        probs: &mut Vec<F>,
    ) {
        let hd = q.len() / (b * l).max(1);
        let d = hd / heads.max(1);
        ctx.resize(b * l * hd, F::zero());
        probs.resize(b * heads * l * l, F::zero());
        let scale = F::of(scale);
        // Each sequence owns its rows of ctx and its heads' blocks of probs.
        ctx.par_chunks_mut(l * hd).zip(probs.par_chunks_mut(heads * l * l)).enumerate().for_each(
            |(i, (ci, pi))| {
                let keep = &mask[i * l..(i + 1) * l];
                let mut factors = vec![F::zero(); if dropout.is_some() { l * l } else { 0 }];
                let mut dropped = vec![F::zero(); factors.len()];
                for h in 0..heads {
                    // This head's block: rows of the sequence, columns h·d.., rows hd apart.
                    let off = i * l * hd + h * d;
                    let p = &mut pi[h * l * l..(h + 1) * l * l];
                    // S = Q·Kᵀ·scale (l×l).
                    F::gemm(
                        l,
                        d,
                        l,
                        scale,
                        &q[off..],
                        (hd as isize, 1),
                        &k[off..],
                        (1, hd as isize),
                        F::zero(),
                        p,
                        (l as isize, 1),
                    );
                    for row in p.chunks_mut(l) {
                        let m = (0..l)
                            .filter(|&j| keep[j] != F::zero())
                            .map(|j| row[j])
                            .fold(F::neg_infinity(), |a, b| a.max(b));
                        let mut s = F::zero();
                        for j in 0..l {
                            row[j] = if keep[j] != F::zero() { (row[j] - m).exp() } else { F::zero() };
                            s += row[j];
                        }
                        // A sequence with no key (all padding) attends to nothing.
                        if s > F::zero() {
                            row.iter_mut().for_each(|x| *x = *x / s);
                        }
                    }
                    // ctx = (P ⊙ M)·V (l×d), into this head's columns.
                    let pm: &[F] = match dropout {
                        Some(drop) => {
                            attention_factors(&drop, i, h, (l, heads), &mut factors);
                            for ((o, &a), &m) in dropped.iter_mut().zip(p.iter()).zip(&factors) {
                                *o = a * m;
                            }
                            &dropped
                        }
                        None => p,
                    };
                    F::gemm(
                        l,
                        l,
                        d,
                        F::one(),
                        pm,
                        (l as isize, 1),
                        &v[off..],
                        (hd as isize, 1),
                        F::zero(),
                        &mut ci[h * d..],
                        (hd as isize, 1),
                    );
                }
            },
        );
    }

    fn attention_backward(
        &self,
        q: &Vec<F>,
        k: &Vec<F>,
        v: &Vec<F>,
        probs: &Vec<F>,
        dctx: &Vec<F>,
        (b, l, heads): (usize, usize, usize),
        scale: f64,
        dropout: Option<AttnDropout>,
        dq: &mut Vec<F>,
        dk: &mut Vec<F>,
        dv: &mut Vec<F>,
    ) {
        let hd = q.len() / (b * l).max(1);
        let d = hd / heads.max(1);
        for buf in [&mut *dq, &mut *dk, &mut *dv] {
            buf.resize(b * l * hd, F::zero());
        }
        let scale = F::of(scale);
        dq.par_chunks_mut(l * hd)
            .zip(dk.par_chunks_mut(l * hd))
            .zip(dv.par_chunks_mut(l * hd))
            .enumerate()
            .for_each(|(i, ((dqi, dki), dvi))| {
                let mut dp = vec![F::zero(); l * l];
                let mut factors = vec![F::zero(); if dropout.is_some() { l * l } else { 0 }];
                let mut dropped = vec![F::zero(); factors.len()];
                for h in 0..heads {
                    let off = i * l * hd + h * d;
                    let p = &probs[(i * heads + h) * l * l..(i * heads + h + 1) * l * l];
                    let st = (hd as isize, 1);
                    let pm: &[F] = match dropout {
                        Some(drop) => {
                            attention_factors(&drop, i, h, (l, heads), &mut factors);
                            for ((o, &a), &m) in dropped.iter_mut().zip(p).zip(&factors) {
                                *o = a * m;
                            }
                            &dropped
                        }
                        None => p,
                    };
                    // dV = (P ⊙ M)ᵀ·dctx (l×d).
                    F::gemm(
                        l,
                        l,
                        d,
                        F::one(),
                        pm,
                        (1, l as isize),
                        &dctx[off..],
                        st,
                        F::zero(),
                        &mut dvi[h * d..],
                        st,
                    );
                    // dP = dctx·Vᵀ (l×l).
                    F::gemm(
                        l,
                        d,
                        l,
                        F::one(),
                        &dctx[off..],
                        st,
                        &v[off..],
                        (1, hd as isize),
                        F::zero(),
                        &mut dp,
                        (l as isize, 1),
                    );
                    // Through the mask: ∂/∂P = M ⊙ ∂/∂(P ⊙ M).
                    if dropout.is_some() {
                        dp.iter_mut().zip(&factors).for_each(|(g, &m)| *g = *g * m);
                    }
                    // dS = P ⊙ (dP − Σ_j dP⊙P), times the scale.
                    for (pr, dr) in p.chunks(l).zip(dp.chunks_mut(l)) {
                        let dot = pr.iter().zip(dr.iter()).map(|(&a, &b)| a * b).sum::<F>();
                        for j in 0..l {
                            dr[j] = pr[j] * (dr[j] - dot) * scale;
                        }
                    }
                    // dQ = dS·K, dK = dSᵀ·Q (l×d).
                    F::gemm(
                        l,
                        l,
                        d,
                        F::one(),
                        &dp,
                        (l as isize, 1),
                        &k[off..],
                        st,
                        F::zero(),
                        &mut dqi[h * d..],
                        st,
                    );
                    F::gemm(
                        l,
                        l,
                        d,
                        F::one(),
                        &dp,
                        (1, l as isize),
                        &q[off..],
                        st,
                        F::zero(),
                        &mut dki[h * d..],
                        st,
                    );
                }
            });
    }
}

/// The dropout mask M (0 or 1/(1 − p), l×l) of head `h` of sequence `i` into `out`: element
/// (t, j) hashed at index (t·heads + h)·2^16 + j from the sequence's base (see
/// [`AttnDropout`]).
fn attention_factors<F: Real>(
    drop: &AttnDropout,
    i: usize,
    h: usize,
    (l, heads): (usize, usize),
    out: &mut [F],
) {
    let base = drop.sequence_base(i);
    for (t, row) in out.chunks_mut(l).enumerate() {
        for (j, m) in row.iter_mut().enumerate() {
            *m = F::of(f64::from(drop.factor(base, (((t * heads + h) as u64) << 16) + j as u64)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splitting C's rows across tasks changes no bit: `par_gemm` against one `F::gemm` call
    /// on the shapes and strides the linear layers use (transposed operands, beta 0 and 1,
    /// row counts that do not divide evenly, a C with spare rows, an empty k), in a pool of 1, 2 and 3
    /// threads. The 1-thread pool runs as one call, so it is the control.
    #[test]
    fn par_gemm_matches_one_call_bit_for_bit() {
        let wave = |k: usize, s: f32| (k as f32 * 0.6173 + s).sin() * 1.9;
        for &(m, k, n) in
            &[(1000usize, 96usize, 77usize), (193, 130, 64), (64, 5, 3), (130, 1, 1), (200, 0, 5)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| wave(i, 0.1)).collect();
            let b: Vec<f32> = (0..k * n).map(|i| wave(i, 0.2)).collect();
            let c0: Vec<f32> = (0..(m + 3) * n).map(|i| wave(i, 0.3)).collect();
            // (a row-major or its transpose read as m×k, b likewise, beta)
            for &(ta, tb, beta) in &[(false, false, 0.0f32), (true, false, 1.0), (false, true, 1.0)] {
                let sa = if ta { (1, m as isize) } else { (k as isize, 1) };
                let sb = if tb { (1, k as isize) } else { (n as isize, 1) };
                let mut want = c0.clone();
                f32::gemm(m, k, n, 0.7, &a, sa, &b, sb, beta, &mut want, (n as isize, 1));
                for threads in [1, 2, 3] {
                    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                    let mut got = c0.clone();
                    pool.install(|| {
                        par_gemm((m, k, n), 0.7, &a, sa, &b, sb, beta, &mut got, (n as isize, 1))
                    });
                    let same = got.iter().zip(&want).all(|(g, w)| g.to_bits() == w.to_bits());
                    assert!(same, "{m}x{k}x{n} ta {ta} tb {tb} beta {beta}, {threads} threads");
                }
            }
        }
    }

    /// TF32 and bf16 products are the exact product of rounded operands: the weights are
    /// rounded but not the bias, and the bias gradient sums the unrounded upstream gradient.
    #[test]
    fn reduced_precision_products_read_rounded_operands() {
        let (n, i, o) = (5usize, 7usize, 3usize);
        let w = Slot { offset: 0, rows: o, cols: i };
        let b = Slot { offset: o * i, rows: 1, cols: o };
        let wave = |k: usize, s: f32| (k as f32 * 0.7311 + s).sin() * 1.37;
        let params: Vec<f32> = (0..o * i + o).map(|k| wave(k, 0.1)).collect();
        let x: Vec<f32> = (0..n * i).map(|k| wave(k, 0.2)).collect();
        let dy: Vec<f32> = (0..n * o).map(|k| wave(k, 0.3)).collect();
        let exact = Cpu::<f32>::new();
        for m in [Matmul::Tf32, Matmul::Bf16] {
            let be = Cpu::<f32>::new().with_matmul(m);
            let round = |v: &[f32]| v.iter().map(|&x| m.round(x)).collect::<Vec<f32>>();
            let mut pr = params.clone();
            pr[w.range()].copy_from_slice(&round(&params[w.range()]));
            let (xr, dyr) = (round(&x), round(&dy));
            let (mut y, mut ye) = (Vec::new(), Vec::new());
            be.linear_forward(&x, n, &params, w, b, &mut y);
            exact.linear_forward(&xr, n, &pr, w, b, &mut ye);
            assert_eq!(y, ye, "{m:?} forward");
            let mut ye_exact = Vec::new();
            exact.linear_forward(&x, n, &params, w, b, &mut ye_exact);
            assert_ne!(y, ye_exact, "{m:?}: these operands are not all representable, so rounding shows");
            let (mut g, mut ge, mut gb) =
                (vec![0.0; params.len()], vec![0.0; params.len()], vec![0.0; params.len()]);
            let (mut dx, mut dxe) = (Vec::new(), Vec::new());
            be.linear_backward(&x, n, &params, w, b, &dy, &mut g, Some(&mut dx));
            exact.linear_backward(&xr, n, &pr, w, b, &dyr, &mut ge, Some(&mut dxe));
            exact.linear_backward(&x, n, &params, w, b, &dy, &mut gb, None);
            assert_eq!(dx, dxe, "{m:?} dx");
            assert_eq!(g[w.range()], ge[w.range()], "{m:?} dW");
            assert_eq!(g[b.range()], gb[b.range()], "{m:?} db sums the unrounded dy");
        }
    }
}
