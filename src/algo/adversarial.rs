//! Adversarial training on the input embeddings (METHODS.md §9): FGM, PGD, Fast-FGSM and
//! VAT, added to any method. This module holds their settings and the perturbation
//! arithmetic (normalising a gradient into the ε-ball, projecting onto it); the training
//! step runs the extra passes.
//!
//! **Where the perturbation lives.** For a bag model the input embeddings are the vectors a
//! document gathers from the table; the pooled vector is their mean. The gradient with
//! respect to each gathered vector is the same, ∂L/∂pooled / len, so FGM's r is the same
//! vector for every position of a document, and adding it to every gathered vector adds it
//! to the pooled vector. dtrain therefore perturbs the pooled vector (before its dropout),
//! but measures norms over the gathered vectors, as METHODS.md §9 defines ε: a document's
//! perturbation r (the same at each of its `len` positions) has norm √len·‖r‖ there, so
//! FGM's r on the pooled vector is ε·ĝ/√len ([`Space`]'s `copies`). An encoder's token
//! embeddings are perturbed and normed as they are. (Before 2026-12-05 the bag model's norm
//! was taken on the pooled vector itself, ε·ĝ: √len times the specified perturbation.)

use serde::{Deserialize, Serialize};

use crate::backend::mix64;

/// Which adversarial term (`adversarial.kind`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdversarialKind {
    #[default]
    None,
    /// One step along the loss's gradient: r = ε·g/‖g‖.
    Fgm,
    /// `steps` ascent steps of size `step_size`, each projected back into the ε-ball.
    Pgd,
    /// A random start in the ε-ball, then one ascent step of size `step_size`.
    FastFgsm,
    /// Virtual adversarial training: no labels; r from one power iteration on
    /// KL(sg(p(e)) ‖ p(e + r)).
    Vat,
}

/// How ‖g‖ is taken.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormScope {
    /// Per document (the default): each document's r has norm ε, over its gathered vectors
    /// (a bag model's pooled row ε/√len) or its token embeddings.
    #[default]
    Sample,
    /// Over the whole batch: r has norm ε in all.
    Batch,
}

/// `[adversarial]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdversarialConfig {
    pub kind: AdversarialKind,
    /// The radius ε of the perturbation, measured over a bag model's gathered vectors or an
    /// encoder's token embeddings (the module's doc).
    pub epsilon: f64,
    pub norm: NormScope,
    /// PGD's ascent steps K.
    pub steps: u32,
    /// The size of each ascent step (PGD, Fast-FGSM); 0: ε/K·2.5 for PGD, 1.25·ε for
    /// Fast-FGSM (their papers' choices).
    pub step_size: f64,
    /// VAT's probe radius ξ.
    pub xi: f64,
    /// Weight of the adversarial pass's loss.
    pub weight: f64,
}

impl Default for AdversarialConfig {
    fn default() -> Self {
        AdversarialConfig {
            kind: AdversarialKind::None,
            epsilon: 1.0,
            norm: NormScope::Sample,
            steps: 3,
            step_size: 0.0,
            xi: 1e-6,
            weight: 1.0,
        }
    }
}

impl AdversarialConfig {
    /// Checks the rules; `Err((field, rule))`.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        let pos = |v: f64| v.is_finite() && v > 0.0;
        if !pos(self.epsilon) {
            return Err(("adversarial.epsilon", "must be a positive number"));
        }
        if self.steps < 1 || self.steps > 100 {
            return Err(("adversarial.steps", "must be in 1..=100"));
        }
        if !(self.step_size.is_finite() && self.step_size >= 0.0) {
            return Err(("adversarial.step_size", "must be at least 0 (0: the method's default)"));
        }
        if !pos(self.xi) {
            return Err(("adversarial.xi", "must be a positive number"));
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(("adversarial.weight", "must be at least 0"));
        }
        Ok(())
    }

    /// The ascent step size in effect.
    pub fn step(&self) -> f64 {
        match (self.step_size, self.kind) {
            (s, _) if s > 0.0 => s,
            (_, AdversarialKind::FastFgsm) => 1.25 * self.epsilon,
            _ => 2.5 * self.epsilon / f64::from(self.steps),
        }
    }
}

/// Sums a batch's squared norm over the ranks that share the global batch, in place
/// ([`ALONE`] on one process), so that `norm = "batch"` means the global batch's norm.
pub type Reduce<'a> = &'a dyn Fn(&mut [f64]);

/// The reduction of a single process: nothing to add.
pub const ALONE: Reduce<'static> = &|_: &mut [f64]| {};

/// Where a perturbation's norm is measured: rows of `dim` values, normed per row or over
/// the (global) batch. `copies[i]`, when given, is how many input vectors row `i` stands
/// for, each perturbed by the row: a bag model's row is its document's pooled (mean)
/// vector, and its perturbation is added to each of the document's `len` gathered vectors,
/// so that METHODS.md §9's norm over the gathered vectors is `√len·‖r‖`, and the gradient
/// with respect to each gathered vector is `g/len`.
#[derive(Debug, Clone, Copy)]
pub struct Space<'a> {
    pub dim: usize,
    pub scope: NormScope,
    pub copies: Option<&'a [f64]>,
}

impl Space<'_> {
    /// Rows that are themselves the input vectors (as an encoder's token embeddings are).
    #[cfg(test)]
    pub fn flat(dim: usize, scope: NormScope) -> Space<'static> {
        Space { dim, scope, copies: None }
    }

    fn copies(&self, row: usize) -> f64 {
        self.copies.map_or(1.0, |c| c[row])
    }

    /// The input-space norms of `v` (rows of `dim`) that `scope` divides by, one per row:
    /// each row's squared norm is weighted by `copies^power` (1 for a perturbation, −1 for
    /// a gradient).
    fn norms(&self, v: &[f32], power: i32, reduce: Reduce) -> Vec<f64> {
        let rows: Vec<f64> = v
            .chunks(self.dim)
            .enumerate()
            .map(|(i, r)| {
                r.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() * self.copies(i).powi(power)
            })
            .collect();
        match self.scope {
            NormScope::Sample => rows.iter().map(|s| s.sqrt()).collect(),
            NormScope::Batch => {
                let mut total = [rows.iter().sum::<f64>()];
                reduce(&mut total);
                vec![total[0].sqrt(); rows.len()]
            }
        }
    }
}

/// `r ← r + size·g/‖g‖` in the input space (rows with a zero gradient stay), in place:
/// `g` is the gradient with respect to the rows, so each input vector's is `g/copies`.
pub fn ascend(r: &mut [f32], g: &[f32], space: Space, size: f64, reduce: Reduce) {
    let norms = space.norms(g, -1, reduce);
    for (i, ((rr, gr), n)) in r.chunks_mut(space.dim).zip(g.chunks(space.dim)).zip(norms).enumerate() {
        if n > 0.0 {
            let f = size / (n * space.copies(i));
            for (x, &v) in rr.iter_mut().zip(gr) {
                *x = (f64::from(*x) + f * f64::from(v)) as f32;
            }
        }
    }
}

/// Projects `r` back into the ε-ball of the input space (per row, or for the whole batch).
pub fn project(r: &mut [f32], space: Space, epsilon: f64, reduce: Reduce) {
    let n = space.norms(r, 1, reduce);
    for (rr, n) in r.chunks_mut(space.dim).zip(n) {
        if n > epsilon {
            let f = epsilon / n;
            rr.iter_mut().for_each(|x| *x = (f64::from(*x) * f) as f32);
        }
    }
}

/// A random direction of `rows × dim`, each row (or the batch) scaled to input-space norm
/// `radius`, drawn from `key` (deterministic). `element(i, j)` is the place of row `i`'s
/// element `j` in the global batch, which its value depends on (so every rank draws what
/// one process would draw for the same rows), or `None` where the direction is 0 (padding).
pub fn random_direction(
    rows: usize,
    space: Space,
    radius: f64,
    key: u64,
    element: impl Fn(usize, usize) -> Option<u64>,
    reduce: Reduce,
) -> Vec<f32> {
    let dim = space.dim;
    let mut g = vec![0.0f32; rows * dim];
    for (row, out) in g.chunks_mut(dim).enumerate() {
        for (j, v) in out.iter_mut().enumerate() {
            let Some(i) = element(row, j) else { continue };
            // A standard normal (Box–Muller on two uniforms, the first in (0, 1]): normal
            // coordinates make the normalised direction uniform on the sphere.
            let a = ((mix64(key ^ mix64(2 * i)) >> 11) + 1) as f64 / (1u64 << 53) as f64;
            let b = (mix64(key ^ mix64(2 * i + 1)) >> 11) as f64 / (1u64 << 53) as f64;
            *v = ((-2.0 * a.ln()).sqrt() * (std::f64::consts::TAU * b).cos()) as f32;
        }
    }
    // An isotropic draw in the input space: a row standing for c input vectors has input
    // norm √c·‖row‖, so its draw is scaled by 1/√c (`ascend` divides by c; √c first).
    if let Some(c) = space.copies {
        for (row, &c) in g.chunks_mut(dim).zip(c) {
            let f = c.sqrt() as f32;
            row.iter_mut().for_each(|v| *v *= f);
        }
    }
    let mut d = vec![0.0f32; g.len()];
    ascend(&mut d, &g, space, radius, reduce);
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rows of `dim` elements, numbered row by row.
    fn flat(dim: usize) -> impl Fn(usize, usize) -> Option<u64> {
        move |i, j| Some((i * dim + j) as u64)
    }

    fn norm(v: &[f32]) -> f64 {
        v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt()
    }

    #[test]
    fn ascend_and_project_keep_the_ball() {
        let g = [3.0f32, 4.0, 0.0, 0.0, 1.0, 0.0];
        let mut r = vec![0.0f32; 6];
        ascend(&mut r, &g, Space::flat(3, NormScope::Sample), 2.0, ALONE);
        // Row 0: 2·(3,4,0)/5; row 1: 2·(0,1,0).
        assert_eq!(r, [1.2, 1.6, 0.0, 0.0, 2.0, 0.0]);
        ascend(&mut r, &g, Space::flat(3, NormScope::Sample), 2.0, ALONE);
        project(&mut r, Space::flat(3, NormScope::Sample), 2.0, ALONE);
        assert!((norm(&r[..3]) - 2.0).abs() < 1e-6 && (norm(&r[3..]) - 2.0).abs() < 1e-6);
        let mut b = vec![0.0f32; 6];
        ascend(&mut b, &g, Space::flat(3, NormScope::Batch), 1.0, ALONE);
        assert!((norm(&b) - 1.0).abs() < 1e-6);
        // A zero gradient leaves its row alone.
        let mut z = vec![0.5f32; 3];
        ascend(&mut z, &[0.0; 3], Space::flat(3, NormScope::Sample), 1.0, ALONE);
        assert_eq!(z, [0.5; 3]);
    }

    /// A row standing for 4 input vectors (a bag document of 4 gathered vectors): ε is
    /// their norm, √4·‖r‖, so FGM's row is ε·ĝ/2; projection measures the same way.
    #[test]
    fn copies_measure_the_norm_over_the_input_vectors() {
        let four = [4.0];
        let space = Space { dim: 3, scope: NormScope::Sample, copies: Some(&four) };
        let mut r = [0.0f32; 3];
        ascend(&mut r, &[3.0, 4.0, 0.0], space, 2.0, ALONE);
        assert!(close(&r, &[0.6, 0.8, 0.0]), "{r:?}");
        let mut far = [3.0f32, 4.0, 0.0];
        project(&mut far, space, 2.0, ALONE);
        assert!(close(&far, &[0.6, 0.8, 0.0]), "{far:?}");
        let d = random_direction(1, space, 2.0, 9, flat(3), ALONE);
        assert!((2.0 * norm(&d) - 2.0).abs() < 1e-6, "input-space norm {}", 2.0 * norm(&d));
        // Over a batch, the draw is isotropic in the input space: the same draw for rows of
        // 4 and 1 input vectors gives them equal input-space norms (√4·‖r₀‖ = ‖r₁‖), and
        // the batch's input-space norm is the radius.
        let copies = [4.0, 1.0];
        let batch = Space { dim: 3, scope: NormScope::Batch, copies: Some(&copies) };
        let same = |_: usize, j: usize| Some(j as u64);
        let d = random_direction(2, batch, 1.5, 9, same, ALONE);
        let (a, b) = (2.0 * norm(&d[..3]), norm(&d[3..]));
        assert!((a - b).abs() < 1e-6 && (a * a + b * b - 1.5 * 1.5).abs() < 1e-5, "{a} {b}");
    }

    #[test]
    fn random_directions_have_the_radius_and_depend_on_the_key() {
        let d = random_direction(4, Space::flat(10, NormScope::Sample), 0.5, 9, flat(10), ALONE);
        for row in d.chunks(10) {
            assert!((norm(row) - 0.5).abs() < 1e-6);
        }
        assert_eq!(d, random_direction(4, Space::flat(10, NormScope::Sample), 0.5, 9, flat(10), ALONE));
        assert_ne!(d, random_direction(4, Space::flat(10, NormScope::Sample), 0.5, 10, flat(10), ALONE));
    }

    /// The direction is uniform on the sphere: its coordinates, scaled by √dim, are standard
    /// normal. Their kurtosis tells a normal draw (3) from a sum of two uniforms (2.4).
    #[test]
    fn random_directions_have_normal_coordinates() {
        let dim = 40_000;
        let d = random_direction(1, Space::flat(dim, NormScope::Sample), 1.0, 3, flat(dim), ALONE);
        let x: Vec<f64> = d.iter().map(|&v| f64::from(v) * (dim as f64).sqrt()).collect();
        let mean = x.iter().sum::<f64>() / dim as f64;
        let m2 = x.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / dim as f64;
        let m4 = x.iter().map(|v| (v - mean).powi(4)).sum::<f64>() / dim as f64;
        let kurtosis = m4 / (m2 * m2);
        assert!(mean.abs() < 0.03 && (m2 - 1.0).abs() < 0.01, "mean {mean}, variance {m2}");
        assert!((kurtosis - 3.0).abs() < 0.15, "kurtosis {kurtosis}");
    }

    /// Runs `f(rank, reduce)` as two ranks on two threads, whose reduction sums over both.
    fn on_two_ranks<T: Send>(f: impl Fn(usize, Reduce) -> T + Sync) -> Vec<T> {
        let slots = std::sync::Mutex::new([0.0f64; 2]);
        let barrier = std::sync::Barrier::new(2);
        let run = |rank: usize| {
            let reduce = |v: &mut [f64]| {
                slots.lock().unwrap()[rank] = v[0];
                barrier.wait();
                let both = *slots.lock().unwrap();
                barrier.wait();
                v[0] = both[0] + both[1];
            };
            f(rank, &reduce)
        };
        std::thread::scope(|s| {
            let h = [s.spawn(|| run(0)), s.spawn(|| run(1))];
            h.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-6 * x.abs().max(1.0))
    }

    /// A batch split over two ranks (global rows 0–1 and 2–3) draws, steps and projects as
    /// one process does for the whole batch: the random rows by their global place, the
    /// batch norm over both ranks.
    #[test]
    fn a_batch_split_over_ranks_draws_and_norms_as_the_whole_batch() {
        for scope in [NormScope::Sample, NormScope::Batch] {
            let whole = random_direction(4, Space::flat(3, scope), 0.7, 5, flat(3), ALONE);
            let parts = on_two_ranks(|rank, reduce| {
                random_direction(2, Space::flat(3, scope), 0.7, 5, |i, j| flat(3)(2 * rank + i, j), reduce)
            })
            .concat();
            assert!(close(&parts, &whole), "{scope:?}: {parts:?} against {whole:?}");
            // A draw that ignored the global place would repeat rank 0's rows on rank 1.
            assert_ne!(parts[..6], parts[6..]);
        }
        let g = [3.0f32, 4.0, 0.0, 0.0, 1.0, 2.0];
        let mut whole = vec![0.0f32; 6];
        ascend(&mut whole, &g, Space::flat(3, NormScope::Batch), 1.5, ALONE);
        let split = on_two_ranks(|rank, reduce| {
            let mut r = vec![0.0f32; 3];
            ascend(&mut r, &g[3 * rank..3 * rank + 3], Space::flat(3, NormScope::Batch), 1.5, reduce);
            r
        })
        .concat();
        assert!(close(&split, &whole), "{split:?} against {whole:?}");
        // Two steps leave the ball; projecting brings the whole batch back to norm 1.5.
        let far: Vec<f32> = whole.iter().map(|x| 4.0 * x).collect();
        let mut one = far.clone();
        project(&mut one, Space::flat(3, NormScope::Batch), 1.5, ALONE);
        assert!((norm(&one) - 1.5).abs() < 1e-6);
        let two = on_two_ranks(|rank, reduce| {
            let mut r = far[3 * rank..3 * rank + 3].to_vec();
            project(&mut r, Space::flat(3, NormScope::Batch), 1.5, reduce);
            r
        })
        .concat();
        assert!(close(&two, &one), "{two:?} against {one:?}");
    }

    /// Elements without a place (padding) stay 0, and the radius is the real elements'.
    #[test]
    fn padding_gets_no_noise() {
        let real = |i: usize, j: usize| (j < 2 + i).then_some((10 * i + j) as u64);
        let d = random_direction(2, Space::flat(4, NormScope::Sample), 0.5, 3, real, ALONE);
        assert_eq!((d[2], d[3], d[7]), (0.0, 0.0, 0.0));
        assert!(d[..2].iter().chain(&d[4..7]).all(|&x| x != 0.0));
        assert!((norm(&d[..4]) - 0.5).abs() < 1e-6 && (norm(&d[4..]) - 0.5).abs() < 1e-6);
    }

    #[test]
    fn default_step_sizes() {
        let c =
            AdversarialConfig { kind: AdversarialKind::Pgd, epsilon: 1.0, steps: 5, ..Default::default() };
        assert_eq!(c.step(), 0.5);
        let c = AdversarialConfig { kind: AdversarialKind::FastFgsm, epsilon: 2.0, ..Default::default() };
        assert_eq!(c.step(), 2.5);
    }
}
