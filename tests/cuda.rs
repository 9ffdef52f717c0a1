//! The CUDA backend against its CPU twin, operation by operation, and the kernels under
//! NVRTC.
//!
//! - `kernels_compile_*`: every `kernels/*.cu` compiles under NVRTC for compute capability
//!   8.0 and 9.0 and exports each entry point the backend loads. Needs only libnvrtc (the
//!   test suite's `.venv` has it from pip); skipped where it is not found.
//! - `twin_*`: each `Backend` operation on the GPU (f32) against `Cpu<f64>` on the same
//!   fresh random inputs, by ‖gpu − cpu‖ / ‖cpu‖, at odd shapes that are not multiples of a
//!   block size and at class counts from 2 to 32k. Outputs the kernel must write entirely
//!   are poisoned with NaN first (a NaN never passes); accumulated outputs start from random
//!   values. Skipped, and counted as skipped, when no CUDA device is present.
//!
//! - `whole_model_*`: training runs of several methods (Mean Teacher among them) on the GPU
//!   and on the CPU from the same initial parameters end within a relative error of 1e-3
//!   in every tensor of the final checkpoint. Skipped without a device.
//!
//! This file has its own harness (libtest-mimic), so that a test can be skipped at run
//! time and reported as ignored rather than passed.

use dtrain::algo::consistency::{ConsistencyKind, ConsistencyOp, TargetForm};
mod common;

use std::path::{Path, PathBuf};

use dtrain::backend::cpu::Cpu;
use dtrain::backend::cuda::{device, Cuda};
use dtrain::backend::{
    Activation, AdamStep, AttnDropout, Backend, ConsistencyAux, DropoutKey, HostBatch, LossKind, Matmul,
    RowMap, SgdStep, SparseRows,
};
use dtrain::model::params::Slot;
use libtest_mimic::{Arguments, Failed, Trial};
use std::sync::Arc;

type Ref = Cpu<f64>;

/// The relative error that f32 arithmetic stays far below (METHOD.md: float32 lands far
/// under 1e-3; we ask for 1e-4 everywhere).
const TOL: f64 = 1e-4;

/// Fresh random values: a splitmix64 stream, so each call gives new inputs.
struct Rand(u64);

impl Rand {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        dtrain::backend::mix64(self.0)
    }
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 24) as f32
    }
    /// Uniform in [-a, a).
    fn sym(&mut self, a: f32) -> f32 {
        (2.0 * self.unit() - 1.0) * a
    }
    fn vec(&mut self, n: usize, a: f32) -> Vec<f32> {
        (0..n).map(|_| self.sym(a)).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
}

fn to64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| f64::from(x)).collect()
}

/// ‖gpu − cpu‖ / ‖cpu‖ (absolute when ‖cpu‖ is 0) within `tol`, and every element within
/// 10·`tol` of the largest |cpu| (so that a few elements left unwritten in a large buffer
/// cannot hide in the norm); NaN anywhere fails.
fn check(what: &str, gpu: &[f32], cpu: &[f64], tol: f64) -> Result<(), Failed> {
    if gpu.len() != cpu.len() {
        return Err(format!("{what}: {} values on the GPU, {} on the CPU", gpu.len(), cpu.len()).into());
    }
    if let Some(i) = gpu.iter().position(|v| !v.is_finite()) {
        return Err(format!("{what}: element {i} is {} (not written, or not finite)", gpu[i]).into());
    }
    let diff: f64 = gpu.iter().zip(cpu).map(|(&g, &c)| (f64::from(g) - c).powi(2)).sum::<f64>().sqrt();
    let norm: f64 = cpu.iter().map(|c| c * c).sum::<f64>().sqrt();
    let rel = if norm > 0.0 { diff / norm } else { diff };
    if rel > tol {
        return Err(format!("{what}: relative error {rel:.3e} > {tol:.0e}").into());
    }
    let scale = cpu.iter().fold(0.0f64, |m, c| m.max(c.abs()));
    let scale = if scale > 0.0 { scale } else { 1.0 };
    let (worst, at) = gpu
        .iter()
        .zip(cpu)
        .enumerate()
        .map(|(i, (&g, &c))| ((f64::from(g) - c).abs() / scale, i))
        .fold((0.0, 0), |a, b| if b.0 > a.0 { b } else { a });
    if worst > 10.0 * tol {
        return Err(format!(
            "{what}: element {at} is {} against {}: off by {worst:.3e} of the largest |value|, > 10 × {tol:.0e}",
            gpu[at], cpu[at]
        )
        .into());
    }
    Ok(())
}

fn nan(be: &Cuda, n: usize) -> <Cuda as Backend>::Buf {
    be.upload(&vec![f32::NAN; n])
}

fn up64(v: &[f32]) -> Vec<f64> {
    to64(v)
}

/// A random batch of `n` documents over `rows` table rows: repeated ids, and empty
/// documents now and then.
fn batch(r: &mut Rand, n: usize, rows: usize) -> HostBatch {
    let mut b = HostBatch::default();
    for i in 0..n {
        let len = if i % 7 == 3 { 0 } else { 1 + r.below(40) };
        let ids: Vec<u32> = (0..len).map(|_| r.below(rows) as u32).collect();
        b.push(&ids, if i % 5 == 2 { -1 } else { r.below(9) as i32 });
    }
    b
}

type Test = fn(&Cuda, &mut Rand) -> Result<(), Failed>;

fn twin_consistency(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    let kinds = [ConsistencyKind::Mse, ConsistencyKind::Kl, ConsistencyKind::CeHard, ConsistencyKind::SymKl];
    for &classes in &[2usize, 15, 33, 1000, 32768] {
        let n = if classes > 1000 { 5 } else { 67 };
        let s_row0 = 3;
        for &kind in &kinds {
            for &form in &[TargetForm::Logits, TargetForm::Probs] {
                for &(temperature, threshold, aux) in &[(1.0, 0.0, false), (0.4, 0.6, true)] {
                    if classes > 1000 && threshold > 0.0 {
                        continue; // 32k-way targets are never confident: nothing would pass.
                    }
                    let what =
                        format!("consistency {kind:?} {form:?} C={classes} T={temperature} tau={threshold}");
                    let zs = r.vec((s_row0 + n) * classes, 3.0);
                    let mut zt = r.vec(n * classes, 3.0);
                    if form == TargetForm::Probs {
                        for row in zt.chunks_mut(classes) {
                            let m = row.iter().cloned().fold(f32::MIN, f32::max);
                            let s: f32 = row.iter().map(|v| (v - m).exp()).sum();
                            row.iter_mut().for_each(|v| *v = (*v - m).exp() / s);
                        }
                    }
                    let bias = r.vec(classes, 0.5);
                    let mult: Vec<f32> = (0..classes).map(|_| 0.5 + r.unit()).collect();
                    let weight: Vec<f32> =
                        (0..n).map(|i| if i % 4 == 1 { 0.0 } else { r.unit() + 0.5 }).collect();
                    let ds0 = r.vec((s_row0 + n) * classes, 1.0);
                    let dt0 = r.vec(n * classes, 1.0);
                    let op = ConsistencyOp { kind, form, temperature, threshold, scale: 0.7 };
                    let with_dt = form == TargetForm::Logits && kind != ConsistencyKind::CeHard;
                    // CPU, f64.
                    let (bias64, mult64, w64) = (up64(&bias), up64(&mult), up64(&weight));
                    let aux_c = if aux {
                        ConsistencyAux {
                            bias: Some(&bias64),
                            class_threshold: Some(&mult64),
                            row_weight: Some(&w64),
                        }
                    } else {
                        ConsistencyAux::default()
                    };
                    let (mut ds_c, mut dt_c, mut rows_c) = (up64(&ds0), up64(&dt0), Vec::new());
                    let out_c = cpu.consistency(
                        &op,
                        &up64(&zs),
                        s_row0,
                        &up64(&zt),
                        n,
                        classes,
                        &aux_c,
                        &mut ds_c,
                        with_dt.then_some(&mut dt_c),
                        &mut rows_c,
                    );
                    // GPU, f32.
                    let (bias_g, mult_g, w_g) = (be.upload(&bias), be.upload(&mult), be.upload(&weight));
                    let aux_g = if aux {
                        ConsistencyAux {
                            bias: Some(&bias_g),
                            class_threshold: Some(&mult_g),
                            row_weight: Some(&w_g),
                        }
                    } else {
                        ConsistencyAux::default()
                    };
                    let (mut ds_g, mut dt_g, mut rows_g) = (be.upload(&ds0), be.upload(&dt0), nan(be, 3 * n));
                    let out_g = be.consistency(
                        &op,
                        &be.upload(&zs),
                        s_row0,
                        &be.upload(&zt),
                        n,
                        classes,
                        &aux_g,
                        &mut ds_g,
                        with_dt.then_some(&mut dt_g),
                        &mut rows_g,
                    );
                    check(&format!("{what}: dstudent"), &be.download(&ds_g), &ds_c, TOL)?;
                    if with_dt {
                        check(&format!("{what}: dtarget"), &be.download(&dt_g), &dt_c, TOL)?;
                    }
                    let rows_g = be.download(&rows_g);
                    check(&format!("{what}: row losses"), &rows_g[..n], &rows_c[..n], TOL)?;
                    check(&format!("{what}: confidences"), &rows_g[n..2 * n], &rows_c[n..2 * n], TOL)?;
                    if rows_g[2 * n..] != rows_c[2 * n..].iter().map(|&v| v as f32).collect::<Vec<_>>()[..] {
                        return Err(format!("{what}: labels differ").into());
                    }
                    if out_g.passed != out_c.passed {
                        return Err(format!(
                            "{what}: {} rows passed on the GPU, {} on the CPU",
                            out_g.passed, out_c.passed
                        )
                        .into());
                    }
                    check(&format!("{what}: loss sum"), &[out_g.loss_sum as f32], &[out_c.loss_sum], TOL)?;
                }
            }
        }
    }
    Ok(())
}

fn twin_softmax_and_loss(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    for &classes in &[2usize, 15, 257, 32768] {
        let n = if classes > 1000 { 9 } else { 131 };
        let mut hb = HostBatch::default();
        for i in 0..n {
            hb.push(&[], if i % 6 == 5 { -1 } else { r.below(classes) as i32 });
        }
        let z = r.vec(n * classes, 4.0);
        let (zc, zg) = (up64(&z), be.upload(&z));
        let (bc, bg) = (cpu.upload_batch(&hb), be.upload_batch(&hb));
        let mut pc = Vec::new();
        let mut pg = nan(be, n * classes);
        cpu.softmax(&zc, classes, &mut pc);
        be.softmax(&zg, classes, &mut pg);
        check(&format!("softmax C={classes}"), &be.download(&pg), &pc, TOL)?;
        for loss in [
            LossKind::CrossEntropy { smoothing: 0.0 },
            LossKind::CrossEntropy { smoothing: 0.1 },
            LossKind::Focal { gamma: 2.0 },
        ] {
            let what = format!("softmax_loss {loss:?} C={classes}");
            let (mut gc, mut lc) = (Vec::new(), Vec::new());
            let (mut gg, mut lg) = (nan(be, n * classes), nan(be, n));
            let sc = cpu.softmax_loss(&zc, classes, &bc, loss, 0.3, &mut gc, &mut lc);
            let sg = be.softmax_loss(&zg, classes, &bg, loss, 0.3, &mut gg, &mut lg);
            check(&format!("{what}: dlogits"), &be.download(&gg), &gc, TOL)?;
            check(&format!("{what}: row losses"), &be.download(&lg), &lc, TOL)?;
            check(&format!("{what}: sum"), &[sg as f32], &[sc], TOL)?;
        }
    }
    Ok(())
}

fn twin_embedding_bag(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    for &(n, rows, dim) in &[(1usize, 5usize, 1usize), (37, 50, 100), (203, 4099, 33), (64, 1 << 12, 300)] {
        let what = format!("embedding bag n={n} rows={rows} dim={dim}");
        let hb = batch(r, n, rows);
        let table = Slot { offset: 16, rows, cols: dim };
        let params = r.vec(16 + rows * dim, 1.0);
        let (pc, pg) = (up64(&params), be.upload(&params));
        let (bc, bg) = (cpu.upload_batch(&hb), be.upload_batch(&hb));
        let (mut oc, mut og) = (Vec::new(), nan(be, n * dim));
        cpu.embedding_bag_forward(&pc, table, &bc, &mut oc);
        be.embedding_bag_forward(&pg, table, &bg, &mut og);
        check(&format!("{what}: forward"), &be.download(&og), &oc, TOL)?;
        let dout = r.vec(n * dim, 1.0);
        let (dc, dg) = (up64(&dout), be.upload(&dout));
        let mut sc = SparseRows::new(Vec::new(), dim);
        let mut sg = SparseRows::new(be.zeros(0), dim);
        cpu.embedding_bag_backward(&bc, &dc, dim, &mut sc);
        be.embedding_bag_backward(&bg, &dg, dim, &mut sg);
        if sc.rows != sg.rows {
            return Err(format!("{what}: touched rows differ").into());
        }
        check(&format!("{what}: backward"), &be.download(&sg.values), &sc.values, TOL)?;
        let (mut pc2, mut pg2) = (pc.clone(), be.upload(&params));
        cpu.embedding_bag_sgd(&mut pc2, table, &bc, &dc, 0.37);
        be.embedding_bag_sgd(&mut pg2, table, &bg, &dg, 0.37);
        check(&format!("{what}: fused sgd"), &be.download(&pg2), &pc2, TOL)?;
    }
    Ok(())
}

fn twin_linear(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    linear_against(be, &Ref::new(), r, TOL, None)
}

/// TF32 and bf16 GEMMs (`train.matmul`) against the CPU's emulation (operands rounded to
/// nearest even, exact f64 accumulation). TF32's tolerance allows cuBLAS another rounding
/// mode (one TF32 unit, 2^-10, per operand), or no rounding at all: TF32 permits tensor
/// cores, it does not force them. bf16's operands are rounded by dtrain's own kernel, the
/// same way as the CPU's, so only the accumulation order differs, and the result must
/// also lie farther from the exact product than that: the rounding did happen.
fn twin_linear_tf32_and_bf16(_: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    for (m, tol, off) in [(Matmul::Tf32, 2e-3, None), (Matmul::Bf16, 1e-4, Some(3e-4))] {
        let be = Cuda::new(0).map_err(|e| Failed::from(e.to_string()))?.with_matmul(m);
        linear_against(&be, &Ref::new().with_matmul(m), r, tol, off.map(|d| (d, m)))?;
    }
    Ok(())
}

/// The linear layer on `be` against `cpu` at shapes from 1×1 to 512×384×1000, within `tol`;
/// with `exact_off = Some((d, m))` the GPU must also differ from the exact product by more
/// than `d` (relative), labelled `m`.
fn linear_against(
    be: &Cuda,
    cpu: &Ref,
    r: &mut Rand,
    tol: f64,
    exact_off: Option<(f64, Matmul)>,
) -> Result<(), Failed> {
    let exact = Ref::new();
    for &(n, i, o) in &[(1usize, 1usize, 1usize), (67, 100, 15), (131, 257, 33), (512, 384, 1000)] {
        let what = format!(
            "linear n={n} in={i} out={o}{}",
            exact_off.map_or(String::new(), |(_, m)| format!(" {m:?}"))
        );
        let w = Slot { offset: 16, rows: o, cols: i };
        let b = Slot { offset: (16 + o * i).div_ceil(16) * 16, rows: 1, cols: o };
        let len = b.offset + o;
        let params = r.vec(len, 0.5);
        let x = r.vec(n * i, 1.0);
        let (pc, pg, xc, xg) = (up64(&params), be.upload(&params), up64(&x), be.upload(&x));
        let (mut yc, mut yg) = (Vec::new(), nan(be, n * o));
        cpu.linear_forward(&xc, n, &pc, w, b, &mut yc);
        be.linear_forward(&xg, n, &pg, w, b, &mut yg);
        check(&format!("{what}: forward"), &be.download(&yg), &yc, tol)?;
        if let Some((d, _)) = exact_off.filter(|_| n * i > 1) {
            let mut ye = Vec::new();
            exact.linear_forward(&xc, n, &pc, w, b, &mut ye);
            if check("", &be.download(&yg), &ye, d).is_ok() {
                return Err(format!(
                    "{what}: within {d:.0e} of the exact product: the operands were not rounded"
                )
                .into());
            }
        }
        let dy = r.vec(n * o, 1.0);
        let g0 = r.vec(len, 1.0);
        let (mut gc, mut gg) = (up64(&g0), be.upload(&g0));
        let (mut dxc, mut dxg) = (Vec::new(), nan(be, n * i));
        cpu.linear_backward(&xc, n, &pc, w, b, &up64(&dy), &mut gc, Some(&mut dxc));
        be.linear_backward(&xg, n, &pg, w, b, &be.upload(&dy), &mut gg, Some(&mut dxg));
        check(&format!("{what}: dx"), &be.download(&dxg), &dxc, tol)?;
        check(&format!("{what}: grads"), &be.download(&gg), &gc, tol)?;
    }
    Ok(())
}

fn twin_activations_and_dropout(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    let n = 100_003;
    let x = r.vec(n, 4.0);
    let dy = r.vec(n, 1.0);
    for act in [Activation::Relu, Activation::Gelu, Activation::Tanh, Activation::GeluErf] {
        let (mut yc, mut yg) = (Vec::new(), nan(be, n));
        cpu.activation_forward(act, &up64(&x), &mut yc);
        be.activation_forward(act, &be.upload(&x), &mut yg);
        check(&format!("{act:?} forward"), &be.download(&yg), &yc, TOL)?;
        let (mut dc, mut dg) = (Vec::new(), nan(be, n));
        cpu.activation_backward(act, &up64(&x), &up64(&dy), &mut dc);
        be.activation_backward(act, &be.upload(&x), &be.upload(&dy), &mut dg);
        check(&format!("{act:?} backward"), &be.download(&dg), &dc, TOL)?;
    }
    // Dropout: the same mask element for element (three row segments, as on a rank).
    let width = 97;
    let rows = n / width;
    let xs = r.vec(rows * width, 1.0);
    let key = DropoutKey {
        seed: r.next(),
        step: 12345,
        site: 2,
        pass: 1 << 20,
        rows: RowMap::for_rank(&[rows / 3, rows / 3, rows - 2 * (rows / 3)], 1, 4),
    };
    // Then as an encoder's token rows: 7 tokens per sequence.
    let tokens = DropoutKey { rows: RowMap::for_rank(&[2, 3], 1, 2).per_token(7), ..key };
    for (what, key) in [("dropout", key), ("dropout on token rows", tokens)] {
        let (mut c, mut g) = (up64(&xs), be.upload(&xs));
        cpu.dropout(0.3, key, width, &mut c);
        be.dropout(0.3, key, width, &mut g);
        let g = be.download(&g);
        if let Some(i) = (0..c.len()).find(|&i| (c[i] == 0.0) != (g[i] == 0.0)) {
            return Err(format!("{what}: element {i} is kept on one side only").into());
        }
        check(&format!("{what} values"), &g, &c, TOL)?;
    }
    Ok(())
}

/// f32 → bf16 → f32 on the device against `half` on the host, bit for bit: ties to even,
/// NaN, infinities, subnormals, the largest values.
fn twin_bf16_conversions(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let mut xs = r.vec(100_003, 50.0);
    xs.extend([
        1.0 + 1.0 / 256.0,
        1.0 + 3.0 / 256.0,
        -0.0,
        f32::NAN,
        f32::INFINITY,
        f32::NEG_INFINITY,
        f32::MAX,
        f32::MIN_POSITIVE / 3.0,
        1e-40,
        -1e-45,
    ]);
    let src = be.upload(&xs);
    let mut wire =
        be.stream().alloc_zeros::<half::bf16>(xs.len()).map_err(|e| Failed::from(e.to_string()))?;
    // In two ranges (as buckets convert), the second one first.
    let mid = xs.len() / 3;
    be.to_bf16(&src, &mut wire, mid..xs.len());
    be.to_bf16(&src, &mut wire, 0..mid);
    let got: Vec<half::bf16> = be.stream().clone_dtoh(&wire).map_err(|e| Failed::from(e.to_string()))?;
    for (i, (&x, g)) in xs.iter().zip(&got).enumerate() {
        if g.to_bits() != half::bf16::from_f32(x).to_bits() {
            return Err(format!(
                "to_bf16: element {i} ({x:e}) gives {:#06x}, half gives {:#06x}",
                g.to_bits(),
                half::bf16::from_f32(x).to_bits()
            )
            .into());
        }
    }
    // Back exactly (scale 1), and as a mean of 3 ranks' bf16 sum (scaled, rounded again),
    // as the MPI path computes it.
    for scale in [1.0f32, 1.0 / 3.0] {
        let mut back = be.upload(&vec![0.0f32; xs.len()]);
        be.from_bf16(&wire, &mut back, scale);
        let back = be.download(&back);
        for (i, (b, g)) in back.iter().zip(&got).enumerate() {
            let want =
                if scale == 1.0 { g.to_f32() } else { half::bf16::from_f32(g.to_f32() * scale).to_f32() };
            if b.to_bits() != want.to_bits() && !(b.is_nan() && want.is_nan()) {
                return Err(format!("from_bf16 (scale {scale}): element {i}: {b:e} vs {want:e}").into());
            }
        }
    }
    Ok(())
}

fn twin_vector_ops(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    for &n in &[1usize, 1023, 1_000_003] {
        let a = r.vec(n + 5, 2.0);
        let b = r.vec(n + 5, 2.0);
        let range = 3..3 + n;
        // ema (a misaligned start, so the kernel takes its scalar path; then an aligned one)
        for rg in [range.clone(), 4..4 + n] {
            let (mut sc, mut sg) = (up64(&a), be.upload(&a));
            cpu.ema(&mut sc, &up64(&b), rg.clone(), 0.993);
            be.ema(&mut sg, &be.upload(&b), rg.clone(), 0.993);
            check(&format!("ema n={n} start={}", rg.start), &be.download(&sg), &sc, TOL)?;
        }
        let (mut cc, mut cg) = (up64(&a), be.upload(&a));
        cpu.copy(&mut cc, &up64(&b), range.clone());
        be.copy(&mut cg, &be.upload(&b), range.clone());
        check(&format!("copy n={n}"), &be.download(&cg), &cc, 0.0)?;
        let nc = cpu.sq_norm(&up64(&a), range.clone());
        let ng = be.sq_norm(&be.upload(&a), range.clone());
        check(&format!("sq_norm n={n}"), &[ng as f32], &[nc], TOL)?;
        let (mut sc, mut sg) = (up64(&a), be.upload(&a));
        cpu.scale(&mut sc, range.clone(), -0.37);
        be.scale(&mut sg, range.clone(), -0.37);
        check(&format!("scale n={n}"), &be.download(&sg), &sc, TOL)?;
        let (mut yc, mut yg) = (up64(&a), be.upload(&a));
        cpu.axpy(&mut yc, &up64(&b), 1.7);
        be.axpy(&mut yg, &be.upload(&b), 1.7);
        check(&format!("axpy n={n}"), &be.download(&yg), &yc, TOL)?;
    }
    Ok(())
}

fn twin_optimizers(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    let h = AdamStep { lr: 0.01, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01, t: 7 };
    for &n in &[1usize, 333, 100_001] {
        let slot = Slot { offset: 16, rows: 1, cols: n };
        let len = 16 + n + 3;
        let (p, g) = (r.vec(len, 1.0), r.vec(len, 1.0));
        let m = r.vec(len, 0.1);
        let v: Vec<f32> = (0..len).map(|_| r.unit() * 0.01).collect();
        for which in ["adamw", "lamb", "sgd", "sgd_momentum", "sgd_nesterov"] {
            let what = format!("{which} n={n}");
            let mut c = [up64(&p), up64(&g), up64(&m), up64(&v)];
            let mut gp = be.upload(&p);
            let gg = be.upload(&g);
            let (mut gm, mut gv) = (be.upload(&m), be.upload(&v));
            let sgd =
                |mu: f64, nesterov: bool| SgdStep { lr: 0.05, momentum: mu, nesterov, weight_decay: 0.001 };
            match which {
                "adamw" => {
                    let [cp, cg, cm, cv] = &mut c;
                    cpu.adamw(cp, cg, cm, cv, slot, h);
                    be.adamw(&mut gp, &gg, &mut gm, &mut gv, slot, h);
                }
                "lamb" => {
                    let [cp, cg, cm, cv] = &mut c;
                    cpu.lamb(cp, cg, cm, cv, slot, h);
                    be.lamb(&mut gp, &gg, &mut gm, &mut gv, slot, h);
                }
                _ => {
                    let s = match which {
                        "sgd" => sgd(0.0, false),
                        "sgd_momentum" => sgd(0.9, false),
                        _ => sgd(0.9, true),
                    };
                    let [cp, cg, cm, _] = &mut c;
                    cpu.sgd(cp, cg, cm, slot, s);
                    be.sgd(&mut gp, &gg, &mut gm, slot, s);
                }
            }
            check(&format!("{what}: params"), &be.download(&gp), &c[0], TOL)?;
            check(&format!("{what}: m"), &be.download(&gm), &c[2], TOL)?;
            check(&format!("{what}: v"), &be.download(&gv), &c[3], TOL)?;
        }
    }
    Ok(())
}

fn twin_sparse_rows(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    let cpu = Ref::new();
    let h = AdamStep { lr: 0.02, beta1: 0.9, beta2: 0.98, eps: 1e-6, weight_decay: 0.5, t: 3 };
    for &(rows, dim) in &[(10usize, 1usize), (5000, 100), (70_001, 33)] {
        let what = format!("table rows={rows} dim={dim}");
        let table = Slot { offset: 16, rows, cols: dim };
        let len = 16 + rows * dim;
        let pick = |k: usize, r: &mut Rand| {
            let mut ids: Vec<u32> = (0..k).map(|_| r.below(rows) as u32).collect();
            ids.sort_unstable();
            ids.dedup();
            ids
        };
        let ra = pick(rows.min(300), r);
        let rb = pick(rows.min(200), r);
        let va = r.vec(ra.len() * dim, 1.0);
        let vb = r.vec(rb.len() * dim, 1.0);
        let sa_c = SparseRows { rows: ra.clone(), values: up64(&va), dim };
        let sb_c = SparseRows { rows: rb.clone(), values: up64(&vb), dim };
        let sa_g = SparseRows { rows: ra.clone(), values: be.upload(&va), dim };
        let sb_g = SparseRows { rows: rb.clone(), values: be.upload(&vb), dim };
        let sum_c = cpu.sparse_add(sa_c, &sb_c);
        let sum_g = be.sparse_add(sa_g, &sb_g);
        if sum_c.rows != sum_g.rows {
            return Err(format!("{what}: sparse_add rows differ").into());
        }
        check(&format!("{what}: sparse_add"), &be.download(&sum_g.values), &sum_c.values, TOL)?;
        let p = r.vec(len, 1.0);
        let m = r.vec(len, 0.1);
        let v: Vec<f32> = (0..len).map(|_| r.unit() * 0.01).collect();
        let (mut pc, mut mc, mut vc) = (up64(&p), up64(&m), up64(&v));
        let (mut pg, mut mg, mut vg) = (be.upload(&p), be.upload(&m), be.upload(&v));
        cpu.sparse_adam(&mut pc, table, &sum_c, &mut mc, &mut vc, h);
        be.sparse_adam(&mut pg, table, &sum_g, &mut mg, &mut vg, h);
        check(&format!("{what}: sparse_adam params"), &be.download(&pg), &pc, TOL)?;
        check(&format!("{what}: sparse_adam m"), &be.download(&mg), &mc, TOL)?;
        check(&format!("{what}: sparse_adam v"), &be.download(&vg), &vc, TOL)?;
        cpu.sparse_sgd(&mut pc, table, &sum_c, 0.3);
        be.sparse_sgd(&mut pg, table, &sum_g, 0.3);
        check(&format!("{what}: sparse_sgd"), &be.download(&pg), &pc, TOL)?;
        let factors: Vec<f64> = sum_c.rows.iter().map(|_| 0.9 + 0.1 * f64::from(r.unit())).collect();
        let s = r.vec(len, 1.0);
        let (mut sc, mut sg) = (up64(&s), be.upload(&s));
        cpu.ema_rows(&mut sc, &pc, table, &sum_c.rows, &factors);
        be.ema_rows(&mut sg, &pg, table, &sum_g.rows, &factors);
        check(&format!("{what}: ema_rows"), &be.download(&sg), &sc, TOL)?;
    }
    Ok(())
}

fn twin_encoder_ops(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    use dtrain::backend::EncoderOps;
    let cpu = Ref::new();
    for &(n, w) in &[(1usize, 1usize), (67, 384), (131, 1000)] {
        let what = format!("layer norm n={n} w={w}");
        // β before γ in the buffer for one shape: both orders of the two gradient views.
        let (first, second) = (16, (16 + w).div_ceil(16) * 16 + 16);
        let (go, bo) = if w == 384 { (second, first) } else { (first, second) };
        let g = Slot { offset: go, rows: 1, cols: w };
        let b = Slot { offset: bo, rows: 1, cols: w };
        let len = second + w + 3;
        let params: Vec<f32> = (0..len).map(|_| 1.0 + r.sym(0.5)).collect();
        let x = r.vec(n * w, 3.0);
        let (mut yc, mut sc) = (Vec::new(), Vec::new());
        let (mut yg, mut sg) = (nan(be, n * w), nan(be, 2 * n));
        cpu.layer_norm_forward(&up64(&x), n, &up64(&params), g, b, 1e-5, &mut yc, &mut sc);
        be.layer_norm_forward(&be.upload(&x), n, &be.upload(&params), g, b, 1e-5, &mut yg, &mut sg);
        check(&format!("{what}: y"), &be.download(&yg), &yc, TOL)?;
        let dy = r.vec(n * w, 1.0);
        let g0 = r.vec(len, 1.0);
        let (mut gc, mut dxc) = (up64(&g0), Vec::new());
        let (mut gg, mut dxg) = (be.upload(&g0), nan(be, n * w));
        cpu.layer_norm_backward(&up64(&x), n, &up64(&params), g, b, &sc, &up64(&dy), &mut gc, &mut dxc);
        be.layer_norm_backward(
            &be.upload(&x),
            n,
            &be.upload(&params),
            g,
            b,
            &sg,
            &be.upload(&dy),
            &mut gg,
            &mut dxg,
        );
        check(&format!("{what}: dx"), &be.download(&dxg), &dxc, TOL)?;
        check(&format!("{what}: grads"), &be.download(&gg), &gc, TOL)?;
    }
    // Sequences placed as rank 1 of 2 with two segments (kernels map them as the host).
    let dropped = Some(AttnDropout { p: 0.1, base: 12345, rows: RowMap::for_rank(&[1, 1], 1, 2) });
    for &(b, l, heads, d, drop) in &[
        (1usize, 1usize, 1usize, 1usize, None),
        (3, 17, 3, 5, None),
        (2, 130, 12, 32, None),
        (3, 17, 3, 5, dropped),
        (2, 130, 12, 32, dropped),
    ] {
        let what = format!("attention b={b} l={l} heads={heads} d={d} dropout={:?}", drop.map(|d| d.p));
        let hd = heads * d;
        let (q, k, v) = (r.vec(b * l * hd, 1.0), r.vec(b * l * hd, 1.0), r.vec(b * l * hd, 1.0));
        // Each sequence but the first loses its last 3 tokens to padding (when it has more).
        let pad = if l > 3 { 3 } else { 0 };
        let mask: Vec<f32> =
            (0..b * l).map(|t| if t / l > 0 && t % l >= l - pad { 0.0 } else { 1.0 }).collect();
        let scale = 1.0 / (d as f64).sqrt();
        let (mut cc, mut pc) = (Vec::new(), Vec::new());
        let (mut cg, mut pg) = (nan(be, b * l * hd), nan(be, b * heads * l * l));
        cpu.attention_forward(
            &up64(&q),
            &up64(&k),
            &up64(&v),
            &up64(&mask),
            (b, l, heads),
            scale,
            drop,
            &mut cc,
            &mut pc,
        );
        let (qg, kg, vg) = (be.upload(&q), be.upload(&k), be.upload(&v));
        be.attention_forward(&qg, &kg, &vg, &be.upload(&mask), (b, l, heads), scale, drop, &mut cg, &mut pg);
        check(&format!("{what}: ctx"), &be.download(&cg), &cc, TOL)?;
        check(&format!("{what}: probs"), &be.download(&pg), &pc, TOL)?;
        let dctx = r.vec(b * l * hd, 1.0);
        let (mut dqc, mut dkc, mut dvc) = (Vec::new(), Vec::new(), Vec::new());
        cpu.attention_backward(
            &up64(&q),
            &up64(&k),
            &up64(&v),
            &pc,
            &up64(&dctx),
            (b, l, heads),
            scale,
            drop,
            &mut dqc,
            &mut dkc,
            &mut dvc,
        );
        let (mut dqg, mut dkg, mut dvg) = (nan(be, b * l * hd), nan(be, b * l * hd), nan(be, b * l * hd));
        be.attention_backward(
            &qg,
            &kg,
            &vg,
            &pg,
            &be.upload(&dctx),
            (b, l, heads),
            scale,
            drop,
            &mut dqg,
            &mut dkg,
            &mut dvg,
        );
        check(&format!("{what}: dq"), &be.download(&dqg), &dqc, TOL)?;
        check(&format!("{what}: dk"), &be.download(&dkg), &dkc, TOL)?;
        check(&format!("{what}: dv"), &be.download(&dvg), &dvc, TOL)?;
    }
    Ok(())
}

const TWINS: &[(&str, Test)] = &[
    ("twin_encoder_layer_norm_and_attention", twin_encoder_ops),
    ("twin_consistency_every_kind_form_mask_and_class_count", twin_consistency),
    ("twin_softmax_and_supervised_losses", twin_softmax_and_loss),
    ("twin_embedding_bag_forward_backward_and_fused_sgd", twin_embedding_bag),
    ("twin_linear_forward_and_backward_through_cublas", twin_linear),
    ("twin_linear_tf32_and_bf16_gemms_against_the_cpu_emulation", twin_linear_tf32_and_bf16),
    ("twin_activations_and_dropout_masks", twin_activations_and_dropout),
    ("twin_ema_copy_norm_scale_axpy", twin_vector_ops),
    ("twin_adamw_lamb_and_sgd", twin_optimizers),
    ("twin_sparse_add_lazy_adam_sparse_sgd_and_ema_rows", twin_sparse_rows),
    ("twin_bf16_conversions_match_half_bit_for_bit", twin_bf16_conversions),
    ("nccl_one_rank_average_and_run_match_no_communication", nccl_one_rank),
];

/// Small separable data: 3 classes of their own words plus shared noise, 12 labels per
/// class kept and the rest unlabeled, 2 shards.
fn whole_model_data(dir: &Path) -> PathBuf {
    common::separable(dir, 80, &["output.shards=2", "split.labels_per_class=12"])
}

/// The same run (`sets` on top of a small config with dropout) on the CPU and on CUDA
/// device 0: every tensor of the final checkpoints within 1e-3 relative error.
fn whole_model(sets: &[&str]) -> Result<(), Failed> {
    use dtrain::backend::Device;
    same_runs(Data::Bag, &[("cpu", Device::Cpu, &[]), ("cuda", Device::Cuda(Some(0)), &[])], sets, 1e-3)
}

/// One rank on device 0 with its gradient averaged by NCCL (a communicator of one), with
/// and without overlap, and without communication: the same checkpoint bit for bit (an
/// average over one rank is the value itself), for Mean Teacher on the bag model and
/// FixMatch on a small encoder (whose layers start their buckets during the backward
/// pass); and the one-rank average of a buffer is the identity in f32 and bf16 rounding
/// in bf16.
fn nccl_one_rank(be: &Cuda, r: &mut Rand) -> Result<(), Failed> {
    use dtrain::backend::{Backend, Device, GradSync};
    use dtrain::dist::{CommBackend, Dist, DistConfig, GradPath, WireDtype};
    for dtype in [WireDtype::F32, WireDtype::Bf16] {
        let cfg = DistConfig {
            backend: CommBackend::Nccl,
            allreduce_dtype: dtype,
            bucket_mb: 0.001,
            ..Default::default()
        };
        let dist = Dist::from_env(&cfg).map_err(|e| Failed::from(e.to_string()))?;
        let path = dist.bind(be).map_err(|e| Failed::from(e.to_string()))?;
        if path != &GradPath::Nccl {
            return Err(format!("dist.backend = \"nccl\" on one GPU took {path:?}").into());
        }
        let g = r.vec(1000 + 3, 3.0);
        let mut buf = be.upload(&g);
        dist.average(be, &mut buf, None, 0);
        let want: Vec<f32> = match dtype {
            WireDtype::F32 => g.clone(),
            WireDtype::Bf16 => g.iter().map(|&x| half::bf16::from_f32(x).to_f32()).collect(),
        };
        check(
            &format!("NCCL average over one rank ({dtype:?}, 1003 values in buckets of 262)"),
            &be.download(&buf),
            &up64(&want),
            0.0,
        )?;
    }
    let runs: [(&str, Device, &[&str]); 3] = [
        ("cuda-alone", Device::Cuda(Some(0)), &["dist.backend=\"mpi\""]),
        // Buckets start during the backward pass (an encoder's layers report as they
        // finish), and, below, only after it.
        ("cuda-nccl", Device::Cuda(Some(0)), &["dist.backend=\"nccl\"", "dist.bucket_mb=0.0001"]),
        (
            "cuda-nccl-after",
            Device::Cuda(Some(0)),
            &["dist.backend=\"nccl\"", "dist.bucket_mb=0.0001", "dist.overlap=false"],
        ),
    ];
    same_runs(Data::Bag, &runs, &["method=\"mean_teacher\""], 0.0)?;
    same_runs(Data::WordPiece, &runs, &["method=\"fixmatch\""], 0.0)
}

/// The data and base settings of [`same_runs`]: the bag model on hashed features, or a
/// small encoder from scratch (2 layers, 16 wide, both dropouts on) on MiniLM's WordPiece
/// ids.
#[derive(Clone, Copy)]
enum Data {
    Bag,
    WordPiece,
}

impl Data {
    fn prepare(self, dir: &Path) -> PathBuf {
        match self {
            Data::Bag => whole_model_data(dir),
            Data::WordPiece => {
                let tok = common::minilm().join("tokenizer.json");
                let path = format!("tokenizer.subword.path={:?}", tok.display().to_string());
                common::separable(
                    dir,
                    40,
                    &[
                        path.as_str(),
                        "tokenizer.subword.max_len=16",
                        "output.shards=2",
                        "split.labels_per_class=12",
                    ],
                )
            }
        }
    }

    fn base(self) -> Vec<String> {
        match self {
            Data::Bag => [
                "train.steps=40",
                "model.dim=16",
                "model.hidden=[8]",
                "model.hidden_dropout=0.3",
                "model.embed_dropout=0.1",
                "optim.lr=0.05",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            Data::WordPiece => {
                let mut v = common::small_encoder(2);
                v.push("train.steps=12".into());
                v
            }
        }
    }
}

/// The same run (`sets` on top of a small config with dropout) once per entry of `runs`
/// (name, device, its own settings): every tensor of each final checkpoint within `tol`
/// relative error of the first's.
fn same_runs(
    data: Data,
    runs: &[(&str, dtrain::backend::Device, &[&str])],
    sets: &[&str],
    tol: f64,
) -> Result<(), Failed> {
    use dtrain::config::{self, Override};
    use dtrain::train::{train, Resume, RunOptions};
    let dir = tempfile::tempdir().map_err(|e| Failed::from(e.to_string()))?;
    let base = data.base();
    let data = data.prepare(dir.path());
    let mut outs = Vec::new();
    for &(name, device, own) in runs {
        let out = dir.path().join(name);
        let mut o: Vec<Override> = [
            format!("data.dir={:?}", data.display().to_string()),
            format!("train.out_dir={:?}", out.display().to_string()),
            "train.batch_size=8".into(),
        ]
        .iter()
        .map(|s| Override::parse(s).expect("override"))
        .collect();
        o.extend(
            base.iter()
                .map(|s| s.as_str())
                .chain(sets.iter().copied())
                .chain(own.iter().copied())
                .map(|s| Override::parse(s).expect("override")),
        );
        let cfg = config::load(None, &o).map_err(|e| Failed::from(e.to_string()))?;
        let report =
            train(&cfg, &RunOptions { resume: Resume::No, progress: false, stop_after: None, device })
                .map_err(|e| Failed::from(format!("{name}: {e}")))?;
        // A run that quietly fell back to another backend would match itself.
        let want = match device {
            dtrain::backend::Device::Cuda(Some(n)) => format!("cuda:{n}"),
            _ => "cpu".into(),
        };
        if report.backend != want {
            return Err(format!("the {name} run asked for {want} but ran on {}", report.backend).into());
        }
        outs.push(common::last_checkpoint(&out));
    }
    for (k, out) in outs.iter().enumerate().skip(1) {
        let err = common::max_rel_err(&outs[0], out);
        if err.is_nan() || err > tol {
            return Err(format!(
                "{sets:?}: the {} run's checkpoint differs from the {} run's by {err:.3e}",
                runs[k].0, runs[0].0
            )
            .into());
        }
    }
    Ok(())
}

const WHOLE_MODEL: &[(&str, &[&str])] = &[
    ("whole_model_supervised_gpu_matches_cpu", &[]),
    ("whole_model_mean_teacher_gpu_matches_cpu", &["method=\"mean_teacher\""]),
    ("whole_model_temporal_gpu_matches_cpu", &["method=\"temporal\""]),
    (
        "whole_model_fixmatch_with_stabilisers_gpu_matches_cpu",
        &[
            "method=\"fixmatch\"",
            "consistency.distribution_alignment=true",
            "consistency.adaptive_threshold=\"flexmatch\"",
        ],
    ),
    ("whole_model_mpl_gpu_matches_cpu", &["method=\"mpl\""]),
    ("whole_model_vat_gpu_matches_cpu", &["adversarial.kind=\"vat\"", "adversarial.epsilon=0.01"]),
];

/// Every source compiles for `arch` and exports what the backend loads, and every file of
/// kernels/ is one of the sources (a kernel file left out would never be compiled).
fn kernels_compile(arch: &'static str) -> Result<(), Failed> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    for entry in std::fs::read_dir(&dir).map_err(|e| Failed::from(e.to_string()))? {
        let name = entry.map_err(|e| Failed::from(e.to_string()))?.file_name().to_string_lossy().into_owned();
        if name.ends_with(".cu") && !device::SOURCES.iter().any(|s| s.0 == name) {
            return Err(format!("kernels/{name} is not in backend::cuda::device::SOURCES").into());
        }
    }
    for &(name, source, entries) in device::SOURCES {
        let ptx = device::compile(name, source, arch).map_err(|e| Failed::from(e.to_string()))?;
        let text = ptx.to_src();
        // The per-process cache gives the same PTX, the first time and after.
        for _ in 0..2 {
            let cached =
                device::compile_cached(name, source, arch).map_err(|e| Failed::from(e.to_string()))?;
            if cached.to_src() != text {
                return Err(format!("kernels/{name}: the cached PTX differs from a fresh compilation").into());
            }
        }
        for entry in entries {
            if !text.contains(&format!(".entry {entry}(")) {
                return Err(
                    format!("kernels/{name} (compute_{arch}): no entry point {entry} in the PTX").into()
                );
            }
        }
    }
    Ok(())
}

fn main() {
    let mut args = Arguments::from_args();
    // One device, one stream: run the trials one after another.
    args.test_threads = Some(1);
    let nvrtc = device::nvrtc_version();
    if nvrtc.is_none() {
        eprintln!("skipped: NVRTC compile checks (libnvrtc not found; launch/test puts the .venv's on LD_LIBRARY_PATH)");
    }
    // Skipped only where the driver lists no device: with a device, a backend that fails to
    // start (a kernel module the driver refuses, no cuBLAS) fails every GPU test instead.
    // A driver that is there but fails to start fails the tests too.
    let listed = device::device_count();
    let no_device = !device::driver_present() || matches!(listed, Ok(0));
    let cuda: Result<Arc<Cuda>, String> = if no_device {
        let why = listed.err().unwrap_or_else(|| "the driver lists no device".into());
        eprintln!("skipped: no CUDA device ({why})");
        Err(why)
    } else {
        Cuda::new(0)
            .map(Arc::new)
            .map_err(|e| format!("the CUDA driver is present but the backend failed to start: {e}"))
    };
    let started = cuda.clone().map(|_| ());
    let mut trials = Vec::new();
    for arch in ["80", "90"] {
        trials.push(
            Trial::test(format!("kernels_compile_under_nvrtc_for_compute_{arch}"), move || {
                kernels_compile(arch)
            })
            .with_ignored_flag(nvrtc.is_none()),
        );
    }
    for &(name, test) in TWINS {
        let cuda = cuda.clone();
        trials.push(
            Trial::test(name, move || {
                let be = cuda.as_ref().map_err(|e| Failed::from(e.clone()))?;
                let s = seed();
                test(be, &mut Rand(s))
                    .map_err(|e| Failed::from(format!("{} (seed {s})", e.message().unwrap_or(""))))
            })
            .with_ignored_flag(no_device),
        );
    }
    for &(name, sets) in WHOLE_MODEL {
        let started = started.clone();
        trials.push(
            Trial::test(name, move || {
                started.map_err(Failed::from)?;
                whole_model(sets)
            })
            .with_ignored_flag(no_device),
        );
    }
    libtest_mimic::run(&args, trials).exit();
}
