//! Finite-difference gradient checks in f64: every layer, every loss, the whole bag model.
//!
//! Each check builds a scalar L = Σ r ⊙ f(θ) (r random, so the upstream gradient is r) or a
//! loss, takes the backward pass's analytic gradient, and compares every checked coordinate
//! with the central difference (L(θ+h) − L(θ−h)) / 2h, h = 1e-5, by relative error (below
//! 1e-6, with an absolute floor of 1e-9 for gradients under 1e-3).

use dtrain::backend::cpu::Cpu;
use dtrain::backend::{
    Activation, AttnDropout, Backend, DropoutKey, EncoderOps, HostBatch, LossKind, RowMap, SparseRows,
};
use dtrain::model::bag::{Activations, BagModel, BagSpec};
use dtrain::model::params::Layout;
use dtrain::rng::{Purpose, Stream};

type B = Cpu<f64>;
const H: f64 = 1e-5;
const TOL: f64 = 1e-6;

fn randn(n: usize, seed: u64) -> Vec<f64> {
    let mut s = Stream::new(seed, Purpose::Init, 99);
    (0..n)
        .map(|_| {
            let u1 = ((s.next_u64() >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
            let u2 = (s.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Checks `analytic[i]` against the central difference of `f` in coordinate `i` of `x`.
fn check(name: &str, x: &mut [f64], coords: &[usize], analytic: &[f64], f: &mut dyn FnMut(&[f64]) -> f64) {
    let mut worst: f64 = 0.0;
    for &i in coords {
        let orig = x[i];
        x[i] = orig + H;
        let up = f(x);
        x[i] = orig - H;
        let down = f(x);
        x[i] = orig;
        let numeric = (up - down) / (2.0 * H);
        // Relative error, with an absolute floor of TOL·1e-3 for tiny gradients, where the
        // central difference's round-off (~1e-16/h) dominates.
        let rel = (numeric - analytic[i]).abs() / (numeric.abs() + analytic[i].abs()).max(1e-3);
        worst = worst.max(rel);
        assert!(
            rel < TOL,
            "{name}: coordinate {i}: analytic {} numeric {numeric} (rel {rel:e})",
            analytic[i]
        );
    }
    assert!(!coords.is_empty(), "{name}: nothing checked");
    eprintln!("{name}: {} coordinates, worst relative error {worst:.2e}", coords.len());
}

fn batch() -> HostBatch {
    let mut b = HostBatch::default();
    b.push(&[0, 3, 3, 5], 1);
    b.push(&[2], 0);
    b.push(&[5, 1, 4, 0, 2, 2], 2);
    b
}

#[test]
fn embedding_bag() {
    let be = B::new();
    let (buckets, dim) = (6, 4);
    let mut layout = Layout::new();
    let table = layout.matrix("t", buckets, dim);
    let mut params = randn(layout.total(), 1);
    let b = batch();
    let r = randn(b.len() * dim, 2);
    let mut out = vec![];
    be.embedding_bag_forward(&params, table, &b, &mut out);
    let mut sparse = dtrain::backend::SparseRows::new(vec![], dim);
    be.embedding_bag_backward(&b, &r, dim, &mut sparse);
    assert_eq!(sparse.rows, [0, 1, 2, 3, 4, 5]);
    let mut dense = vec![0.0; params.len()];
    for (k, &row) in sparse.rows.iter().enumerate() {
        dense[row as usize * dim..(row as usize + 1) * dim]
            .copy_from_slice(&sparse.values[k * dim..(k + 1) * dim]);
    }
    let coords: Vec<usize> = table.range().collect();
    check("embedding_bag", &mut params, &coords, &dense, &mut |p| {
        let mut o = vec![];
        be.embedding_bag_forward(&p.to_vec(), table, &b, &mut o);
        dot(&o, &r)
    });
}

/// The fused backward-and-SGD of the table moves every row by exactly −lr times the
/// gradient the backward pass forms (up to float order), and gives the same bits for any
/// thread count (each row's updates are applied in document order).
#[test]
fn fused_table_sgd_is_a_gradient_step() {
    let be = B::new();
    let (buckets, dim, lr) = (6, 4, 0.3);
    let mut layout = Layout::new();
    let table = layout.matrix("t", buckets, dim);
    let params = randn(layout.total(), 1);
    let b = batch();
    let r = randn(b.len() * dim, 2);
    let mut sparse = dtrain::backend::SparseRows::new(vec![], dim);
    be.embedding_bag_backward(&b, &r, dim, &mut sparse);
    let mut want = params.clone();
    be.sparse_sgd(&mut want, table, &sparse, lr);
    let fused = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let mut p = params.clone();
        pool.install(|| be.embedding_bag_sgd(&mut p, table, &b, &r, lr));
        p
    };
    let one = fused(1);
    for (i, (got, want)) in one.iter().zip(&want).enumerate() {
        assert!((got - want).abs() < 1e-12, "element {i}: fused {got}, backward then SGD {want}");
    }
    assert!(one != params, "the step moved the table");
    for threads in [2, 3, 7] {
        assert!(fused(threads) == one, "{threads} threads differ from 1");
    }
}

#[test]
fn linear_weights_bias_and_input() {
    let be = B::new();
    let (n, inp, out) = (3, 5, 4);
    let mut layout = Layout::new();
    let w = layout.matrix("w", out, inp);
    let bias = layout.vector("b", out);
    let mut params = randn(layout.total(), 3);
    let mut x = randn(n * inp, 4);
    let r = randn(n * out, 5);
    let mut grads = vec![0.0; params.len()];
    let mut dx = vec![];
    be.linear_backward(&x, n, &params, w, bias, &r, &mut grads, Some(&mut dx));
    let coords: Vec<usize> = w.range().chain(bias.range()).collect();
    let xs = x.clone();
    check("linear params", &mut params, &coords, &grads, &mut |p| {
        let mut y = vec![];
        be.linear_forward(&xs, n, &p.to_vec(), w, bias, &mut y);
        dot(&y, &r)
    });
    let all: Vec<usize> = (0..x.len()).collect();
    check("linear input", &mut x, &all, &dx, &mut |xv| {
        let mut y = vec![];
        be.linear_forward(&xv.to_vec(), n, &params, w, bias, &mut y);
        dot(&y, &r)
    });
    // The backward accumulates: a second call doubles the parameter gradient.
    let first = grads.clone();
    be.linear_backward(&x, n, &params, w, bias, &r, &mut grads, None);
    for i in coords {
        assert!((grads[i] - 2.0 * first[i]).abs() < 1e-12);
    }
}

#[test]
fn layer_norm_input_scale_and_shift() {
    let be = B::new();
    let (n, w) = (4, 7);
    let mut layout = Layout::new();
    let g = layout.vector("g", w);
    let b = layout.vector("b", w);
    let mut params: Vec<f64> = randn(layout.total(), 21).iter().map(|v| 1.0 + 0.3 * v).collect();
    let mut x: Vec<f64> = randn(n * w, 22).iter().map(|v| 2.0 * v + 0.5).collect();
    let r = randn(n * w, 23);
    let eps = 1e-5;
    let (mut y, mut stats) = (vec![], vec![]);
    be.layer_norm_forward(&x, n, &params, g, b, eps, &mut y, &mut stats);
    // With γ = 1 and β = 0 each output row is standardised: mean 0, variance 1 (less ε).
    let mut unit = params.clone();
    unit[g.range()].iter_mut().for_each(|v| *v = 1.0);
    unit[b.range()].iter_mut().for_each(|v| *v = 0.0);
    let mut z = vec![];
    be.layer_norm_forward(&x, n, &unit, g, b, eps, &mut z, &mut stats);
    for row in z.chunks(w) {
        let mean = row.iter().sum::<f64>() / w as f64;
        let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / w as f64;
        assert!(mean.abs() < 1e-12 && (var - 1.0).abs() < 1e-3, "mean {mean} var {var}");
    }
    be.layer_norm_forward(&x, n, &params, g, b, eps, &mut y, &mut stats);
    let mut grads = vec![0.0; params.len()];
    let mut dx = vec![];
    be.layer_norm_backward(&x, n, &params, g, b, &stats, &r, &mut grads, &mut dx);
    let xs = x.clone();
    let coords: Vec<usize> = g.range().chain(b.range()).collect();
    check("layer_norm params", &mut params, &coords, &grads, &mut |p| {
        let (mut y, mut st) = (vec![], vec![]);
        be.layer_norm_forward(&xs, n, &p.to_vec(), g, b, eps, &mut y, &mut st);
        dot(&y, &r)
    });
    let all: Vec<usize> = (0..x.len()).collect();
    check("layer_norm input", &mut x, &all, &dx, &mut |xv| {
        let (mut y, mut st) = (vec![], vec![]);
        be.layer_norm_forward(&xv.to_vec(), n, &params, g, b, eps, &mut y, &mut st);
        dot(&y, &r)
    });
}

/// Attention's q, k and v gradients, with padding: masked keys get no weight, and a
/// padded key's k and v get no gradient; and again with dropout on the probabilities.
#[test]
fn attention_queries_keys_and_values() {
    attention_check(None);
    attention_check(Some(AttnDropout { p: 0.3, base: 77, rows: dtrain::backend::RowMap::at(5) }));
}

fn attention_check(drop: Option<AttnDropout>) {
    let be = B::new();
    let (b, l, heads, d) = (2, 5, 3, 4);
    let hd = heads * d;
    let mut q = randn(b * l * hd, 31);
    let mut k = randn(b * l * hd, 32);
    let mut v = randn(b * l * hd, 33);
    // The second sequence has two padding tokens.
    let mask: Vec<f64> = (0..b * l).map(|i| if i >= l + 3 { 0.0 } else { 1.0 }).collect();
    let r = randn(b * l * hd, 34);
    let scale = 1.0 / (d as f64).sqrt();
    let fwd = |q: &Vec<f64>, k: &Vec<f64>, v: &Vec<f64>| {
        let (mut ctx, mut p) = (vec![], vec![]);
        be.attention_forward(q, k, v, &mask, (b, l, heads), scale, drop, &mut ctx, &mut p);
        (ctx, p)
    };
    let (_, probs) = fwd(&q, &k, &v);
    for (blk, row) in probs.chunks(l).enumerate() {
        let seq = blk / (heads * l);
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-12);
        if seq == 1 {
            assert!(row[3] == 0.0 && row[4] == 0.0, "a padded key got weight: {row:?}");
        }
    }
    let (mut dq, mut dk, mut dv) = (vec![], vec![], vec![]);
    be.attention_backward(&q, &k, &v, &probs, &r, (b, l, heads), scale, drop, &mut dq, &mut dk, &mut dv);
    if let Some(d) = drop {
        // The dropout changes ctx (some weights are zeroed, the rest scaled), not P.
        let clean = {
            let (mut ctx, mut p) = (vec![], vec![]);
            be.attention_forward(&q, &k, &v, &mask, (b, l, heads), scale, None, &mut ctx, &mut p);
            assert_eq!(p, probs, "probs are kept before dropout");
            ctx
        };
        let moved = clean.iter().zip(&fwd(&q, &k, &v).0).map(|(a, b)| (a - b).abs()).fold(0.0, f64::max);
        assert!(moved > 1e-3, "dropout at {} changed nothing", d.p);
    }
    for t in [l + 3, l + 4] {
        assert!(dk[t * hd..(t + 1) * hd].iter().chain(&dv[t * hd..(t + 1) * hd]).all(|&g| g == 0.0));
    }
    let all: Vec<usize> = (0..q.len()).collect();
    let (k0, v0, q0) = (k.clone(), v.clone(), q.clone());
    let what = if drop.is_some() { "attention with dropout" } else { "attention" };
    check(&format!("{what}: q"), &mut q, &all, &dq, &mut |x| dot(&fwd(&x.to_vec(), &k0, &v0).0, &r));
    check(&format!("{what}: k"), &mut k, &all, &dk, &mut |x| dot(&fwd(&q0, &x.to_vec(), &v0).0, &r));
    check(&format!("{what}: v"), &mut v, &all, &dv, &mut |x| dot(&fwd(&q0, &k0, &x.to_vec()).0, &r));
}

#[test]
fn activations() {
    let be = B::new();
    for act in [Activation::Relu, Activation::Gelu, Activation::Tanh, Activation::GeluErf] {
        // Keep ReLU inputs away from its kink at 0.
        let mut x: Vec<f64> =
            randn(20, 6).into_iter().map(|v| if v.abs() < 1e-3 { 0.5 } else { v }).collect();
        let r = randn(20, 7);
        let mut dx = vec![];
        be.activation_backward(act, &x, &r, &mut dx);
        let all: Vec<usize> = (0..x.len()).collect();
        check(&format!("{act:?}"), &mut x, &all, &dx, &mut |xv| {
            let mut y = vec![];
            be.activation_forward(act, &xv.to_vec(), &mut y);
            dot(&y, &r)
        });
    }
}

#[test]
fn dropout_is_its_own_backward_and_drops_at_its_rate() {
    let be = B::new();
    let key = DropoutKey { seed: 1, step: 2, site: 3, pass: 0, rows: RowMap::at(0) };
    let mut x = randn(30, 8);
    let r = randn(30, 9);
    let mut dx = r.clone();
    be.dropout(0.4, key, 10, &mut dx);
    let all: Vec<usize> = (0..x.len()).collect();
    check("dropout", &mut x, &all, &dx, &mut |xv| {
        let mut y = xv.to_vec();
        be.dropout(0.4, key, 10, &mut y);
        dot(&y, &r)
    });
    let mut ones = vec![1.0f64; 100_000];
    be.dropout(0.3, key, 100, &mut ones);
    let kept = ones.iter().filter(|&&v| v != 0.0).count() as f64 / 1e5;
    assert!((kept - 0.7).abs() < 0.01, "kept {kept}");
    let mean = ones.iter().sum::<f64>() / 1e5;
    assert!((mean - 1.0).abs() < 0.02, "inverted dropout keeps the mean: {mean}");
    let other = DropoutKey { pass: 1, ..key };
    let mut a = vec![1.0f64; 64];
    let mut b = vec![1.0f64; 64];
    be.dropout(0.5, key, 8, &mut a);
    be.dropout(0.5, other, 8, &mut b);
    assert_ne!(a, b, "another pass draws another mask");
    // Rows keep their masks when the batch is split: rows 2..4 of a batch of 4 equal a batch
    // of 2 that starts at row 2.
    let mut whole = vec![1.0f64; 4 * 8];
    be.dropout(0.5, key, 8, &mut whole);
    let mut tail = vec![1.0f64; 2 * 8];
    be.dropout(0.5, DropoutKey { rows: RowMap::at(2), ..key }, 8, &mut tail);
    assert_eq!(&whole[16..], &tail[..]);
}

#[test]
fn losses() {
    let be = B::new();
    let classes = 4;
    let mut b = HostBatch::default();
    for (i, y) in [2, 0, -1, 3, 1].into_iter().enumerate() {
        b.push(&[i as u32], y);
    }
    let kinds = [
        LossKind::CrossEntropy { smoothing: 0.0 },
        LossKind::CrossEntropy { smoothing: 0.1 },
        LossKind::Focal { gamma: 0.0 },
        LossKind::Focal { gamma: 2.0 },
        LossKind::Focal { gamma: 0.5 },
    ];
    for kind in kinds {
        let mut z = randn(5 * classes, 10);
        let (mut g, mut rl) = (vec![], vec![]);
        let total = be.softmax_loss(&z, classes, &b, kind, 1.0, &mut g, &mut rl);
        assert_eq!(rl[2], 0.0, "unlabeled rows have no loss");
        assert!(g[2 * classes..3 * classes].iter().all(|&v| v == 0.0), "and no gradient");
        assert!((total - rl.iter().sum::<f64>()).abs() < 1e-12);
        let all: Vec<usize> = (0..z.len()).collect();
        check(&format!("{kind:?}"), &mut z, &all, &g, &mut |zv| {
            let (mut g2, mut rl2) = (vec![], vec![]);
            be.softmax_loss(&zv.to_vec(), classes, &b, kind, 1.0, &mut g2, &mut rl2)
        });
    }
    // Focal with γ = 0 is cross-entropy, value and gradient.
    let z = randn(5 * classes, 11);
    let (mut g1, mut l1, mut g2, mut l2) = (vec![], vec![], vec![], vec![]);
    be.softmax_loss(&z, classes, &b, LossKind::Focal { gamma: 0.0 }, 0.5, &mut g1, &mut l1);
    be.softmax_loss(&z, classes, &b, LossKind::CrossEntropy { smoothing: 0.0 }, 0.5, &mut g2, &mut l2);
    for (a, c) in g1.iter().zip(&g2).chain(l1.iter().zip(&l2)) {
        assert!((a - c).abs() < 1e-12);
    }
    // The value of plain cross-entropy: −log softmax(z)_y.
    let row = &z[0..classes];
    let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
    assert!((l2[0] - (lse - row[2])).abs() < 1e-12);
}

#[test]
fn whole_model_with_hidden_layers_and_dropout() {
    let be = B::new();
    for (hidden, act) in
        [(vec![], Activation::Relu), (vec![7, 5], Activation::Gelu), (vec![6], Activation::Tanh)]
    {
        let spec = BagSpec {
            buckets: 6,
            dim: 4,
            hidden: hidden.clone(),
            activation: act,
            embed_dropout: 0.3,
            hidden_dropout: 0.2,
            classes: 3,
        };
        let model = BagModel::new(spec);
        // Random everywhere (the default init zeroes the output layer).
        let mut params = randn(model.layout.total(), 12);
        let b = batch();
        let key = Some(DropoutKey { seed: 5, step: 1, site: 0, pass: 0, rows: RowMap::at(0) });
        let kind = LossKind::CrossEntropy { smoothing: 0.1 };
        let loss_at = |p: &[f64]| {
            let mut acts = Activations::new(&be, &model);
            let p = p.to_vec();
            model.forward(&be, &p, &b, b.len(), key, &mut acts);
            let (mut g, mut rl) = (vec![], vec![]);
            be.softmax_loss(&acts.logits, 3, &b, kind, 1.0 / b.len() as f64, &mut g, &mut rl) / b.len() as f64
        };
        let mut acts = Activations::new(&be, &model);
        model.forward(&be, &params, &b, b.len(), key, &mut acts);
        let (mut dlogits, mut rl) = (vec![], vec![]);
        be.softmax_loss(&acts.logits, 3, &b, kind, 1.0 / b.len() as f64, &mut dlogits, &mut rl);
        let mut grads = vec![0.0; params.len()];
        let mut sparse = dtrain::backend::SparseRows::new(vec![], 4);
        model.backward(&be, &params, &b, &acts, &dlogits, &mut grads, &mut sparse);
        for (k, &row) in sparse.rows.iter().enumerate() {
            let dst = model.table.offset + row as usize * 4;
            grads[dst..dst + 4].copy_from_slice(&sparse.values[k * 4..(k + 1) * 4]);
        }
        let coords: Vec<usize> = model.layout.tensors().iter().flat_map(|t| t.slot.range()).collect();
        check(&format!("bag model hidden={hidden:?} {act:?}"), &mut params, &coords, &grads, &mut |p| {
            loss_at(p)
        });
    }
}

/// The adversarial perturbation's gradient: with `delta` added to the pooled embedding
/// (`BagModel::forward_perturbed`), the backward pass's ∂loss/∂pooled is ∂loss/∂delta, with
/// dropout and hidden layers in between.
#[test]
fn gradient_with_respect_to_the_adversarial_perturbation() {
    let be = B::new();
    let spec = BagSpec {
        buckets: 6,
        dim: 4,
        hidden: vec![5],
        activation: Activation::Tanh,
        embed_dropout: 0.3,
        hidden_dropout: 0.2,
        classes: 3,
    };
    let model = BagModel::new(spec);
    let params = randn(model.layout.total(), 31);
    let b = batch();
    let key = Some(DropoutKey { seed: 2, step: 4, site: 0, pass: 0, rows: RowMap::at(0) });
    let kind = LossKind::CrossEntropy { smoothing: 0.0 };
    let loss_at = |delta: &[f64]| {
        let mut acts = Activations::new(&be, &model);
        model.forward_perturbed(&be, &params, &b, b.len(), key, Some(&delta.to_vec()), &mut acts);
        let (mut g, mut rl) = (vec![], vec![]);
        be.softmax_loss(&acts.logits, 3, &b, kind, 1.0, &mut g, &mut rl)
    };
    let mut delta = randn(b.len() * 4, 32);
    let mut acts = Activations::new(&be, &model);
    model.forward_perturbed(&be, &params, &b, b.len(), key, Some(&delta), &mut acts);
    let (mut dlogits, mut rl) = (vec![], vec![]);
    be.softmax_loss(&acts.logits, 3, &b, kind, 1.0, &mut dlogits, &mut rl);
    let (mut grads, mut ddelta) = (vec![0.0; model.dense_len()], vec![]);
    model.backward_dense(&be, &params, &acts, &dlogits, &mut grads, &mut ddelta);
    let coords: Vec<usize> = (0..delta.len()).collect();
    check("∂loss/∂delta", &mut delta, &coords, &ddelta, &mut |d| loss_at(d));
}

mod consistency_op {
    //! The fused consistency op (`Backend::consistency`) by finite differences: every kind,
    //! both sides, temperatures, a bias, row weights, the confidence mask and class
    //! multipliers, a probability-form target, and a student block at a row offset.
    use super::*;
    use dtrain::algo::consistency::{ConsistencyKind, ConsistencyOp, TargetForm};
    use dtrain::backend::ConsistencyAux;

    const KINDS: [ConsistencyKind; 4] =
        [ConsistencyKind::Mse, ConsistencyKind::Kl, ConsistencyKind::CeHard, ConsistencyKind::SymKl];
    const N: usize = 6;
    const C: usize = 7;
    /// Student rows before the block the op reads.
    const OFFSET: usize = 2;

    struct Inputs {
        zs: Vec<f64>,
        zt: Vec<f64>,
        bias: Vec<f64>,
        weight: Vec<f64>,
        mult: Vec<f64>,
    }

    fn inputs() -> Inputs {
        Inputs {
            zs: randn((N + OFFSET) * C, 21).iter().map(|v| 2.0 * v).collect(),
            zt: randn(N * C, 22).iter().map(|v| 2.5 * v).collect(),
            bias: randn(C, 23).iter().map(|v| 0.3 * v).collect(),
            weight: vec![1.0, 0.5, 0.0, 1.0, 2.0, 1.0],
            mult: (0..C).map(|c| 0.8 + 0.05 * c as f64).collect(),
        }
    }

    /// Runs the op; returns (scale · Σ masked losses, ∂/∂z_s, ∂/∂z_t, row outputs).
    fn run(
        op: &ConsistencyOp,
        x: &Inputs,
        zs: &[f64],
        zt: &[f64],
        both: bool,
    ) -> (f64, Vec<f64>, Vec<f64>, Vec<f64>) {
        let be = B::new();
        let aux = ConsistencyAux {
            bias: Some(&x.bias),
            class_threshold: Some(&x.mult),
            row_weight: Some(&x.weight),
        };
        let mut ds = vec![0.0; zs.len()];
        let mut dt = vec![0.0; zt.len()];
        let mut rows = vec![];
        let (zs, zt) = (zs.to_vec(), zt.to_vec());
        let out =
            be.consistency(op, &zs, OFFSET, &zt, N, C, &aux, &mut ds, both.then_some(&mut dt), &mut rows);
        assert_eq!(out.loss_sum, rows[..N].iter().sum::<f64>());
        (out.loss_sum * op.scale, ds, dt, rows)
    }

    /// A threshold halfway between two rows' confidences, so that some rows pass, some do
    /// not, and no finite-difference step moves a row across it.
    fn threshold_between(op: &ConsistencyOp, x: &Inputs) -> f64 {
        let open = ConsistencyOp { threshold: 0.0, ..*op };
        let (_, _, _, rows) = run(&open, x, &x.zs, &x.zt, false);
        let mut conf: Vec<f64> = (0..N).map(|i| rows[N + i] / x.mult[rows[2 * N + i] as usize]).collect();
        conf.sort_by(f64::total_cmp);
        assert!(conf[3] - conf[2] > 1e-3, "confidences too close to split: {conf:?}");
        (conf[2] + conf[3]) / 2.0
    }

    fn check_op(op: ConsistencyOp, x: &mut Inputs, both: bool) {
        let name = format!("consistency {:?} T={} τ={}", op.kind, op.temperature, op.threshold);
        let (_, ds, dt, rows) = run(&op, x, &x.zs, &x.zt, both);
        // The rows before the block are untouched.
        assert!(ds[..OFFSET * C].iter().all(|&g| g == 0.0), "{name}: rows outside the block");
        let passed = (0..N).filter(|&i| rows[i] != 0.0).count();
        if op.threshold > 0.0 {
            assert!(passed > 0 && passed < N - 1, "{name}: the mask should split the rows ({passed} passed)");
        }
        let coords: Vec<usize> = (OFFSET * C..(N + OFFSET) * C).collect();
        let zt = x.zt.clone();
        let mut zs = x.zs.clone();
        check(&format!("{name}, student"), &mut zs, &coords, &ds, &mut |zs| run(&op, x, zs, &zt, false).0);
        if both {
            let mut zt = x.zt.clone();
            let coords: Vec<usize> = (0..N * C).collect();
            let zs = x.zs.clone();
            check(&format!("{name}, target"), &mut zt, &coords, &dt, &mut |zt| run(&op, x, &zs, zt, false).0);
        }
    }

    #[test]
    fn every_kind_both_sides_with_temperature_and_mask() {
        let mut x = inputs();
        for kind in KINDS {
            for temperature in [1.0, 0.4, 2.0] {
                for masked in [false, true] {
                    let mut op = ConsistencyOp {
                        kind,
                        form: TargetForm::Logits,
                        temperature,
                        threshold: 0.0,
                        scale: 0.7,
                    };
                    if masked {
                        op.threshold = threshold_between(&op, &x);
                    }
                    // ce_hard's target side has no gradient: the check asserts it is 0.
                    check_op(op, &mut x, true);
                }
            }
        }
    }

    #[test]
    fn probability_targets() {
        let mut x = inputs();
        // The target as probabilities (a bank row), with a zero among them.
        for row in x.zt.chunks_mut(C) {
            let m = row.iter().cloned().fold(f64::MIN, f64::max);
            let s: f64 = row.iter().map(|v| (v - m).exp()).sum();
            row.iter_mut().for_each(|v| *v = (*v - m).exp() / s);
        }
        x.zt[3] = 0.0;
        for kind in [ConsistencyKind::Mse, ConsistencyKind::Kl, ConsistencyKind::CeHard] {
            let op =
                ConsistencyOp { kind, form: TargetForm::Probs, temperature: 0.5, threshold: 0.0, scale: 1.3 };
            check_op(op, &mut x, false);
        }
    }
}

/// The whole encoder (embeddings, attention and MLP blocks, pooling, head), post-LN with
/// mean pooling, hidden and attention dropout, and pre-LN with [CLS] pooling, on a padded batch:
/// every parameter's gradient against finite differences (the dropout masks fixed by
/// their key).
#[test]
fn whole_encoder_post_ln_and_pre_ln() {
    use dtrain::model::encoder::{Encoder, EncoderActs, Pooling, TokenBatch};
    let be = B::new();
    let key = DropoutKey { seed: 5, step: 1, site: 0, pass: 0, rows: RowMap::at(0) };
    for (pre_ln, pooling, noise) in [(false, Pooling::Mean, Some((key, 0.3f32))), (true, Pooling::Cls, None)]
    {
        let spec = tiny_encoder(2, pre_ln, pooling, 3);
        let model = Encoder::new(dtrain::model::encoder::EncoderSpec { attention_dropout: 0.2, ..spec });
        let mut params: Vec<f64> = randn(model.layout.total(), 41).iter().map(|v| 0.5 * v).collect();
        for t in model.layout.tensors().iter().filter(|t| t.name.ends_with("LayerNorm.weight")) {
            params[t.slot.range()].iter_mut().for_each(|v| *v = 1.0 + 0.4 * *v);
        }
        let tb = TokenBatch::new(&[vec![1, 4, 4, 9, 2], vec![1, 7, 2]], 0);
        let r = randn(2 * 3, 42);
        let mut acts = EncoderActs::new(&be);
        let mut clean = EncoderActs::new(&be);
        model.forward(&be, &params, &tb, None, &mut clean);
        model.forward(&be, &params, &tb, noise, &mut acts);
        assert_eq!(noise.is_some(), clean.logits != acts.logits, "dropout changes the logits");
        let mut grads = vec![0.0; params.len()];
        model.backward(&be, &params, &tb, &acts, &r, &mut grads);
        // Rows of the word table that no token reads have no gradient.
        let word = model.layout.get("embeddings.word_embeddings.weight").unwrap().slot;
        assert!(grads[word.offset + 3 * 8..word.offset + 4 * 8].iter().all(|&g| g == 0.0));
        let coords: Vec<usize> = (0..params.len()).collect();
        check(&format!("encoder (pre_ln {pre_ln})"), &mut params, &coords, &grads, &mut |p| {
            let mut a = EncoderActs::new(&be);
            model.forward(&be, &p.to_vec(), &tb, noise, &mut a);
            dot(&a.logits, &r)
        });
    }
}

/// Masked-LM pretraining's loss (the prediction head over chosen hidden rows, its decoder
/// tied to the word table, softmax cross-entropy over the vocabulary), through the head
/// and the whole encoder: every parameter's gradient against finite differences. The word
/// table gets gradient from both ends (its lookups and the decoder).
#[test]
fn masked_lm_head_and_encoder() {
    use dtrain::model::encoder::{Encoder, EncoderActs, Pooling, TokenBatch};
    use dtrain::pretrain::mlm::{MlmActs, MlmHead};
    let be = B::new();
    let mut enc = Encoder::new(tiny_encoder(1, false, Pooling::Mean, 1));
    let body = enc.clone();
    let head = MlmHead::new(&mut enc.layout, &body);
    let mut params: Vec<f64> = randn(enc.layout.total(), 51).iter().map(|v| 0.5 * v).collect();
    for t in enc.layout.tensors().iter().filter(|t| t.name.ends_with("LayerNorm.weight")) {
        params[t.slot.range()].iter_mut().for_each(|v| *v = 1.0 + 0.4 * *v);
    }
    let tb = TokenBatch::new(&[vec![1, 10, 4, 9, 2], vec![1, 10, 2]], 0);
    // Masked rows (b·l + position) and their original ids: 1·5+1 = 6 is row 1's [MASK].
    let mut targets = HostBatch::default();
    for (row, id) in [(1u32, 5i32), (3, 9), (6, 7)] {
        targets.push(&[row], id);
    }
    let loss_of = |p: &[f64], grads: Option<&mut Vec<f64>>| -> f64 {
        let p = p.to_vec();
        let (mut acts, mut hacts) = (EncoderActs::new(&be), MlmActs::new(&be));
        enc.forward(&be, &p, &tb, None, &mut acts);
        let rows = be.upload_batch(&targets);
        head.forward(&be, &p, &acts.hidden, 10, &rows, 3, &mut hacts);
        let (mut dl, mut rl) = (Vec::new(), Vec::new());
        let ce = LossKind::CrossEntropy { smoothing: 0.0 };
        let loss = be.softmax_loss(&hacts.logits, 11, &rows, ce, 1.0 / 3.0, &mut dl, &mut rl) / 3.0;
        if let Some(g) = grads {
            let dh = head.backward(&be, &p, 10, &rows, 3, &hacts, &dl, g);
            enc.backward_hidden(&be, &p, &tb, &acts, dh, g, None, None);
        }
        loss
    };
    let mut grads = vec![0.0; params.len()];
    loss_of(&params, Some(&mut grads));
    // The classifier head takes no part.
    let cls = enc.layout.get("classifier.weight").unwrap().slot;
    assert!(grads[cls.range()].iter().all(|&g| g == 0.0));
    let coords: Vec<usize> = (0..params.len()).collect();
    check("masked LM", &mut params, &coords, &grads, &mut |p| loss_of(p, None));
}

/// The encoder's gradient at its adversarial perturbation site (the tokens' embedding sums,
/// `forward_perturbed`'s delta), with dropout, against finite differences in delta.
#[test]
fn encoder_gradient_at_the_token_embeddings() {
    use dtrain::model::encoder::{Encoder, EncoderActs, Pooling, TokenBatch};
    let be = B::new();
    let model = Encoder::new(tiny_encoder(1, false, Pooling::Mean, 3));
    let mut params: Vec<f64> = randn(model.layout.total(), 61).iter().map(|v| 0.5 * v).collect();
    for t in model.layout.tensors().iter().filter(|t| t.name.ends_with("LayerNorm.weight")) {
        params[t.slot.range()].iter_mut().for_each(|v| *v = 1.0 + 0.4 * *v);
    }
    let tb = TokenBatch::new(&[vec![1, 4, 4, 9, 2], vec![1, 7, 2]], 0);
    let noise = Some((DropoutKey { seed: 3, step: 2, site: 0, pass: 0, rows: RowMap::at(0) }, 0.2f32));
    let r = randn(2 * 3, 62);
    let mut delta = randn(10 * 8, 63).iter().map(|v| 0.1 * v).collect::<Vec<f64>>();
    let mut acts = EncoderActs::new(&be);
    model.forward_perturbed(&be, &params, &tb, noise, Some(&delta), &mut acts);
    let (mut grads, mut demb) = (vec![0.0; params.len()], Vec::new());
    model.backward_to_embeddings(&be, &params, &tb, &acts, &r, &mut grads, Some(&mut demb), None);
    // Padding tokens (row 1's last two) take no part.
    assert!(demb[8 * 8..].iter().all(|&g| g == 0.0));
    let coords: Vec<usize> = (0..delta.len()).collect();
    check("encoder ∂/∂embeddings", &mut delta, &coords, &demb, &mut |d| {
        let mut a = EncoderActs::new(&be);
        model.forward_perturbed(&be, &params, &tb, noise, Some(&d.to_vec()), &mut a);
        dot(&a.logits, &r)
    });
}

/// Activation recomputation changes nothing but memory: with hidden and attention dropout,
/// post-LN and pre-LN, the logits and every gradient (parameters, and the token embeddings'
/// for adversarial training) are bit for bit those of the pass that kept its activations,
/// which held more than 8 times the values. Inference buffers give the same logits from a
/// single layer's tape and refuse a backward pass.
#[test]
fn recomputation_gives_the_same_gradients() {
    use dtrain::model::encoder::{Encoder, EncoderActs, EncoderSpec, Pooling, TokenBatch};
    let be = B::new();
    let noise = Some((DropoutKey { seed: 9, step: 3, site: 0, pass: 0, rows: RowMap::at(0) }, 0.2f32));
    for pre_ln in [false, true] {
        let spec = dtrain::model::encoder::EncoderSpec {
            attention_dropout: 0.3,
            ..tiny_encoder(3, pre_ln, Pooling::Mean, 4)
        };
        let tb = TokenBatch::new(&[vec![1, 4, 4, 9, 2], vec![1, 7, 2], vec![3, 3, 5, 6]], 0);
        let r = randn(3 * 4, 51);
        let run = |recompute: bool| {
            let model = Encoder::new(dtrain::model::encoder::EncoderSpec { recompute, ..spec.clone() });
            let params: Vec<f64> = model.init(3);
            let mut acts = EncoderActs::new(&be);
            model.forward(&be, &params, &tb, noise, &mut acts);
            let mut grads = vec![0.0; params.len()];
            let mut demb = vec![];
            model.backward_to_embeddings(&be, &params, &tb, &acts, &r, &mut grads, Some(&mut demb), None);
            (acts.logits.clone(), grads, demb, acts.layer_values(&be))
        };
        let (kept, again) = (run(false), run(true));
        // Each layer keeps its input (n×8 values) and nothing else.
        assert_eq!(again.3, 3 * tb.b * tb.l * 8, "values held with recomputation");
        assert!(kept.3 > 8 * again.3, "values held without: {} (with: {})", kept.3, again.3);
        assert_eq!(kept.0, again.0, "logits (pre_ln {pre_ln})");
        assert_eq!(kept.1, again.1, "parameter gradients (pre_ln {pre_ln})");
        assert_eq!(kept.2, again.2, "embedding gradients (pre_ln {pre_ln})");
        assert!(kept.1.iter().any(|&g| g != 0.0));
        // Inference buffers (evaluation, a teacher's targets): the same logits from one
        // shared layer tape, a third of the 3 layers' values, refilled by a second batch.
        let model = Encoder::new(spec.clone());
        let params: Vec<f64> = model.init(3);
        let mut inf = EncoderActs::inference(&be);
        model.forward(&be, &params, &TokenBatch::new(&[vec![2, 2, 5]], 0), noise, &mut inf);
        model.forward(&be, &params, &tb, noise, &mut inf);
        assert_eq!(inf.logits, kept.0, "inference logits (pre_ln {pre_ln})");
        assert_eq!(inf.layer_values(&be) * 3, kept.3, "one layer's tape of three");
        // The memory budget's count of each (3 sequences padded to 5 tokens).
        let count = |recompute: bool, backward: bool| {
            EncoderSpec { recompute, ..spec.clone() }.tape_values(3, 5, backward) as usize
        };
        assert_eq!(
            (count(false, true), count(true, true)),
            (kept.3, again.3),
            "tape values (pre_ln {pre_ln})"
        );
        assert_eq!((count(false, false), count(true, false)), (kept.3 / 3, kept.3 / 3));
        let backward = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            model.backward(&be, &params, &tb, &inf, &r, &mut vec![0.0; params.len()])
        }));
        assert!(backward.is_err(), "a backward pass over inference buffers is refused");
    }
}

/// An encoder small enough for finite differences: vocabulary 11, width 8, 2 heads.
fn tiny_encoder(
    layers: usize,
    pre_ln: bool,
    pooling: dtrain::model::encoder::Pooling,
    classes: usize,
) -> dtrain::model::encoder::EncoderSpec {
    dtrain::model::encoder::EncoderSpec {
        vocab: 11,
        hidden: 8,
        layers,
        heads: 2,
        intermediate: 12,
        max_positions: 8,
        type_vocab: 2,
        layer_norm_eps: 1e-5,
        activation: Activation::GeluErf,
        pre_ln,
        pooling,
        classes,
        dropout: 0.0,
        attention_dropout: 0.0,
        recompute: false,
    }
}

/// Overlap's contract ([`GradSync::ready`]): during the step's last backward pass the
/// encoder reports each layer, top down, once its gradients and all above it are final —
/// and before the layers below are done, so that their averaging can start early.
#[test]
fn encoder_backward_reports_each_finished_layer_top_down() {
    use dtrain::backend::GradSync;
    use dtrain::model::encoder::{Encoder, EncoderActs, Pooling, TokenBatch};
    use std::cell::RefCell;
    struct Recorder(RefCell<Vec<(usize, Vec<f64>)>>);
    impl GradSync<B> for Recorder {
        fn average(&self, _: &B, _: &mut Vec<f64>, _: Option<&mut SparseRows<Vec<f64>>>, _: usize) {}
        fn ready(&self, _: &B, dense: &mut Vec<f64>, from: usize) {
            self.0.borrow_mut().push((from, dense.clone()));
        }
    }
    let be = B::new();
    for pre_ln in [false, true] {
        let spec =
            dtrain::model::encoder::EncoderSpec { dropout: 0.1, ..tiny_encoder(3, pre_ln, Pooling::Mean, 3) };
        let model = Encoder::new(spec);
        let params: Vec<f64> = randn(model.layout.total(), 71).iter().map(|v| 0.5 * v).collect();
        let tb = TokenBatch::new(&[vec![1, 4, 4, 9, 2], vec![1, 7, 2]], 0);
        let noise = Some((DropoutKey { seed: 3, step: 2, site: 0, pass: 0, rows: RowMap::at(0) }, 0.1f32));
        let mut acts = EncoderActs::new(&be);
        model.forward(&be, &params, &tb, noise, &mut acts);
        let rec = Recorder(RefCell::new(Vec::new()));
        let mut grads = vec![0.0; model.layout.total()];
        model.backward_to_embeddings(
            &be,
            &params,
            &tb,
            &acts,
            &randn(2 * 3, 72),
            &mut grads,
            None,
            Some(&rec),
        );
        let calls = rec.0.into_inner();
        let firsts: Vec<usize> = (0..3)
            .rev()
            .map(|k| {
                model
                    .layout
                    .get(&format!("encoder.layer.{k}.attention.self.query.weight"))
                    .unwrap()
                    .slot
                    .offset
            })
            .collect();
        assert_eq!(
            calls.iter().map(|c| c.0).collect::<Vec<_>>(),
            firsts,
            "pre_ln {pre_ln}: one call per layer, top down"
        );
        for (from, seen) in &calls {
            assert_eq!(
                &seen[*from..],
                &grads[*from..],
                "pre_ln {pre_ln}: reported at {from} before it was final"
            );
            assert_ne!(
                &seen[..*from],
                &grads[..*from],
                "pre_ln {pre_ln}: reported at {from} only after the layers below"
            );
        }
    }
}
