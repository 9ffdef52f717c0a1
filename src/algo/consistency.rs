//! The fused consistency operation's definition (METHODS.md §2): for one row, the loss and
//! its gradients with respect to the student's and the target's logits, for `mse`, `kl`,
//! `ce_hard` and `sym_kl`, with target temperature, a per-class target bias, a confidence
//! mask and a weight. Backends run [`row`] over the rows of a batch (`Backend::consistency`);
//! this function is the reference every implementation (the CPU loop, the CUDA kernel)
//! must match.
//!
//! With `p = softmax(z_s)` and `q = softmax(z_t / T + b)` (or, for a target given as
//! probabilities, `q ∝ q_in^{1/T} · e^b`: the bias multiplies the sharpened target, as
//! distribution alignment's `q ⊙ π / p̃` of METHODS.md §10b), and the row's mask `m` (its weight when
//! `max q ≥ τ·τ_mult[argmax q]`, else 0):
//!
//! | kind | loss ℓ | ∂ℓ/∂z_s | ∂ℓ/∂z_t |
//! |---|---|---|---|
//! | `mse` | (1/C)·Σ(p−q)² | (2/C)·p⊙(d − ⟨d,p⟩), d = p−q | (1/T)(2/C)·q⊙(e − ⟨e,q⟩), e = q−p |
//! | `kl` | Σ q (log q − log p) | p − q | (1/T)·q⊙(log q − log p − ℓ) |
//! | `ce_hard` | −log p_ŷ, ŷ = argmax q | p − onehot(ŷ) | 0 |
//! | `sym_kl` | ½[KL(p‖q) + KL(q‖p)] | ½[(p−q) + p⊙(log p − log q − KL(p‖q))] | (1/T)·½[(q−p) + q⊙(log q − log p − KL(q‖p))] |
//!
//! Every log-probability comes from a log-sum-exp (never `log(softmax)`), and nothing of
//! length C is materialised: each quantity is recomputed from the logits in the sweep that
//! needs it. The mask's dependence on the target is piecewise constant and has no gradient.

use serde::{Deserialize, Serialize};

use crate::backend::Real;

/// The consistency loss of METHODS.md §2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyKind {
    /// Mean squared error between probabilities (Π, Temporal Ensembling, Mean Teacher).
    Mse,
    /// KL(q ‖ p) (UDA, soft Noisy Student).
    Kl,
    /// Cross-entropy against the target's argmax (FixMatch, hard Noisy Student).
    CeHard,
    /// Symmetric KL (R-Drop); its gradient flows to both sides.
    SymKl,
}

/// How the target rows are given.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetForm {
    /// Logits: the op takes the softmax itself.
    Logits,
    /// Probabilities (an ensemble bank, an exported distribution). Zeros are allowed
    /// except with `sym_kl`, where KL(p‖q) would be infinite.
    Probs,
}

/// The operation's settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConsistencyOp {
    pub kind: ConsistencyKind,
    pub form: TargetForm,
    /// Target temperature T (1: none; below 1 sharpens).
    pub temperature: f64,
    /// Confidence threshold τ: a row counts only if max q ≥ τ (times its class's multiplier
    /// when class multipliers are given). 0: every row counts.
    pub threshold: f64,
    /// Factor of every gradient: the term's weight divided by the rows in the loss's
    /// denominator (masked rows count there too).
    pub scale: f64,
}

/// What one row gives.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowOut<F> {
    /// The row's loss times its mask (not times `scale`).
    pub loss: F,
    /// max_c q_c.
    pub conf: F,
    /// argmax_c q_c (the lowest index among ties).
    pub label: usize,
    /// Whether the row passed the mask (and had a nonzero weight).
    pub passed: bool,
}

/// The log-sum-exp of `f(c)` over `0..classes`, with its maximum subtracted first.
fn lse<F: Real>(classes: usize, f: impl Fn(usize) -> F) -> (F, F) {
    let m = (0..classes).map(&f).fold(F::neg_infinity(), |a, b| a.max(b));
    let s = (0..classes).map(|c| (f(c) - m).exp()).sum::<F>();
    (m, s.ln())
}

/// Computes one row: `zs` the student's logits, `zt` the target's (logits or
/// probabilities, as `op.form` says), `bias` a per-class term added to the target's logits
/// (log-probabilities for the `Probs` form) after the temperature, `class_mult` per-class
/// multipliers of τ, `weight` the row's weight (0 drops it). Adds `op.scale ·
/// weight · ∂ℓ/∂z_s` into `ds` and, when given, `op.scale · weight · ∂ℓ/∂z_t` into `dt`
/// (`Logits` form only).
#[allow(clippy::too_many_arguments)]
pub fn row<F: Real>(
    op: &ConsistencyOp,
    zs: &[F],
    zt: &[F],
    bias: Option<&[F]>,
    class_mult: Option<&[F]>,
    weight: F,
    ds: &mut [F],
    dt: Option<&mut [F]>,
) -> RowOut<F> {
    let c_n = zs.len();
    let inv_t = F::of(1.0 / op.temperature);
    let b = |c: usize| bias.map_or(F::zero(), |b| b[c]);
    // The target's tempered logit of class c: log q_c up to the normaliser.
    let tl = |c: usize| -> F {
        let base = match op.form {
            TargetForm::Logits => zt[c],
            TargetForm::Probs => zt[c].ln(),
        };
        base * inv_t + b(c)
    };
    let (ms, ls) = lse(c_n, |c| zs[c]);
    let (mt, lt) = lse(c_n, tl);
    let logp = |c: usize| zs[c] - ms - ls;
    let logq = |c: usize| tl(c) - mt - lt;
    // Confidence and label: the largest tempered logit is the largest q.
    let mut label = 0;
    for c in 1..c_n {
        if tl(c) > tl(label) {
            label = c;
        }
    }
    let conf = logq(label).exp();
    let tau = F::of(op.threshold) * class_mult.map_or(F::one(), |m| m[label]);
    let passed = weight != F::zero() && conf >= tau;
    if !passed {
        return RowOut { loss: F::zero(), conf, label, passed };
    }
    // q·log q and q·(…) with q = 0 are 0 (a zero probability in a `Probs` target).
    let qlog = |c: usize, x: F| {
        let q = logq(c).exp();
        if q == F::zero() {
            F::zero()
        } else {
            q * x
        }
    };
    let g = F::of(op.scale) * weight;
    let cf = F::of(c_n as f64);
    let two = F::of(2.0);
    let half = F::of(0.5);
    let loss = match op.kind {
        ConsistencyKind::Mse => {
            let d = |c: usize| logp(c).exp() - logq(c).exp();
            let dp = (0..c_n).map(|c| d(c) * logp(c).exp()).sum::<F>();
            let dq = (0..c_n).map(|c| -d(c) * logq(c).exp()).sum::<F>();
            for (c, v) in ds.iter_mut().enumerate() {
                *v += g * two / cf * logp(c).exp() * (d(c) - dp);
            }
            if let Some(dt) = dt {
                for (c, v) in dt.iter_mut().enumerate() {
                    *v += g * inv_t * two / cf * logq(c).exp() * (-d(c) - dq);
                }
            }
            (0..c_n).map(|c| d(c) * d(c)).sum::<F>() / cf
        }
        ConsistencyKind::Kl => {
            let kl = (0..c_n).map(|c| qlog(c, logq(c) - logp(c))).sum::<F>();
            for (c, v) in ds.iter_mut().enumerate() {
                *v += g * (logp(c).exp() - logq(c).exp());
            }
            if let Some(dt) = dt {
                for (c, v) in dt.iter_mut().enumerate() {
                    *v += g * inv_t * qlog(c, logq(c) - logp(c) - kl);
                }
            }
            kl
        }
        ConsistencyKind::CeHard => {
            for (c, v) in ds.iter_mut().enumerate() {
                let onehot = if c == label { F::one() } else { F::zero() };
                *v += g * (logp(c).exp() - onehot);
            }
            -logp(label)
        }
        ConsistencyKind::SymKl => {
            let kl_pq = (0..c_n).map(|c| logp(c).exp() * (logp(c) - logq(c))).sum::<F>();
            let kl_qp = (0..c_n).map(|c| qlog(c, logq(c) - logp(c))).sum::<F>();
            for (c, v) in ds.iter_mut().enumerate() {
                let p = logp(c).exp();
                *v += g * half * ((p - logq(c).exp()) + p * (logp(c) - logq(c) - kl_pq));
            }
            if let Some(dt) = dt {
                for (c, v) in dt.iter_mut().enumerate() {
                    let q = logq(c).exp();
                    *v += g * inv_t * half * ((q - logp(c).exp()) + qlog(c, logq(c) - logp(c) - kl_qp));
                }
            }
            half * (kl_pq + kl_qp)
        }
    };
    RowOut { loss: loss * weight, conf, label, passed }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(kind: ConsistencyKind) -> ConsistencyOp {
        ConsistencyOp { kind, form: TargetForm::Logits, temperature: 1.0, threshold: 0.0, scale: 1.0 }
    }

    #[test]
    fn identical_distributions_cost_nothing() {
        let z = [0.3f64, -1.2, 2.0, 0.0];
        for kind in [ConsistencyKind::Mse, ConsistencyKind::Kl, ConsistencyKind::SymKl] {
            let mut ds = [0.0; 4];
            let mut dt = [0.0; 4];
            let r = row(&op(kind), &z, &z, None, None, 1.0, &mut ds, Some(&mut dt));
            assert!(r.loss.abs() < 1e-15, "{kind:?}: {}", r.loss);
            assert!(ds.iter().chain(&dt).all(|g| g.abs() < 1e-15), "{kind:?}: {ds:?} {dt:?}");
            assert_eq!(r.label, 2);
        }
    }

    #[test]
    fn kl_and_ce_hard_values() {
        // Two classes, q = (0.75, 0.25) from logits (ln 3, 0); p = (0.5, 0.5).
        let zs = [0.0f64, 0.0];
        let zt = [3f64.ln(), 0.0];
        let mut ds = [0.0; 2];
        let r = row(&op(ConsistencyKind::Kl), &zs, &zt, None, None, 1.0, &mut ds, None);
        let want = 0.75 * (0.75f64 / 0.5).ln() + 0.25 * (0.25f64 / 0.5).ln();
        assert!((r.loss - want).abs() < 1e-14);
        assert!((ds[0] - (0.5 - 0.75)).abs() < 1e-14 && (ds[1] - (0.5 - 0.25)).abs() < 1e-14);
        assert!((r.conf - 0.75).abs() < 1e-14);
        let mut ds = [0.0; 2];
        let r = row(&op(ConsistencyKind::CeHard), &zs, &zt, None, None, 1.0, &mut ds, None);
        assert!((r.loss - 2f64.ln()).abs() < 1e-14);
        assert_eq!(ds, [-0.5, 0.5]);
    }

    #[test]
    fn mask_threshold_and_class_multipliers() {
        let zs = [0.0f64, 0.0];
        let zt = [3f64.ln(), 0.0]; // max q = 0.75, class 0
        let mut o = op(ConsistencyKind::Kl);
        o.threshold = 0.8;
        let mut ds = [0.0; 2];
        let r = row(&o, &zs, &zt, None, None, 1.0, &mut ds, None);
        assert!(!r.passed && r.loss == 0.0 && ds == [0.0, 0.0]);
        // A class multiplier of 0.9 lowers class 0's threshold to 0.72: the row passes.
        let r = row(&o, &zs, &zt, None, Some(&[0.9, 1.0]), 1.0, &mut ds, None);
        assert!(r.passed && r.loss > 0.0);
        // Weight 0 drops a row whatever its confidence.
        o.threshold = 0.0;
        let r = row(&o, &zs, &zt, None, None, 0.0, &mut [0.0; 2], None);
        assert!(!r.passed);
    }

    #[test]
    fn temperature_and_probability_targets_agree() {
        // A target given as logits and the same target given as probabilities give the
        // same row, with sharpening and a bias.
        let zs = [0.1f64, -0.4, 0.9];
        let zt = [1.0f64, 0.2, -0.5];
        let m = zt.iter().cloned().fold(f64::MIN, f64::max);
        let s: f64 = zt.iter().map(|v| (v - m).exp()).sum();
        let probs: Vec<f64> = zt.iter().map(|v| (v - m).exp() / s).collect();
        let bias = [0.3f64, -0.1, 0.0];
        for kind in [ConsistencyKind::Mse, ConsistencyKind::Kl, ConsistencyKind::CeHard] {
            let mut o = op(kind);
            o.temperature = 0.4;
            let (mut a, mut b) = ([0.0; 3], [0.0; 3]);
            let ra = row(&o, &zs, &zt, Some(&bias), None, 1.0, &mut a, None);
            o.form = TargetForm::Probs;
            let rb = row(&o, &zs, &probs, Some(&bias), None, 1.0, &mut b, None);
            assert!((ra.loss - rb.loss).abs() < 1e-12 && (ra.conf - rb.conf).abs() < 1e-12, "{kind:?}");
            assert!(a.iter().zip(&b).all(|(x, y)| (x - y).abs() < 1e-12), "{kind:?}");
        }
    }

    /// The bias multiplies the sharpened target (q ⊙ e^b, renormalised, with q =
    /// softmax(z_t/T)); it is not sharpened with it.
    #[test]
    fn the_bias_applies_after_the_temperature() {
        let zs = [0.1f64, -0.4, 0.9];
        let zt = [1.0f64, 0.2, -0.5];
        let bias = [0.3f64, -0.1, 0.7];
        let mut o = op(ConsistencyKind::Kl);
        o.temperature = 0.4;
        o.threshold = 0.0;
        let q: Vec<f64> = zt.iter().zip(&bias).map(|(z, b)| (z / 0.4).exp() * b.exp()).collect();
        let s: f64 = q.iter().sum();
        let (best, want) = q.iter().enumerate().fold((0, 0.0), |a, (c, &v)| if v > a.1 { (c, v) } else { a });
        let r = row(&o, &zs, &zt, Some(&bias), None, 1.0, &mut [0.0; 3], None);
        assert_eq!(r.label, best);
        assert!((r.conf - want / s).abs() < 1e-12, "{} vs {}", r.conf, want / s);
    }

    #[test]
    fn zero_probabilities_in_a_target_are_finite() {
        let zs = [0.5f64, 0.1, -0.2];
        let q = [0.0f64, 0.3, 0.7];
        let mut o = op(ConsistencyKind::Kl);
        o.form = TargetForm::Probs;
        let mut ds = [0.0; 3];
        let r = row(&o, &zs, &q, None, None, 1.0, &mut ds, None);
        assert!(r.loss.is_finite() && ds.iter().all(|v| v.is_finite()));
        o.kind = ConsistencyKind::Mse;
        let r = row(&o, &zs, &q, None, None, 1.0, &mut ds, None);
        assert!(r.loss.is_finite() && ds.iter().all(|v| v.is_finite()));
    }
}
