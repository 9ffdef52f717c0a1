//! The stabilisers that keep UDA's and FixMatch's pseudo-labels from collapsing (METHODS.md
//! §10b): distribution alignment, FlexMatch's class-adaptive thresholds and FreeMatch's
//! self-adaptive thresholds. They turn the weak view's predictions into the fused
//! consistency op's per-class inputs (a bias on the target's logits, threshold
//! multipliers); their running state is part of the checkpoint.
//!
//! The running means (distribution alignment's p̃, FreeMatch's τ_g and p̃) are of the weak
//! view's q = softmax(z_w / T), the distribution the op sharpens and masks (T = 1 for
//! FixMatch); alignment then multiplies that q by π / p̃.
//!
//! Order within a step: the running means take this batch's weak-view predictions first and are then used for this batch's
//! targets and mask, as FreeMatch's reference code does; FlexMatch's thresholds come from the
//! records before this batch, and the batch's confident predictions are recorded after the
//! op.

use serde::{Deserialize, Serialize};

use crate::data::loader::RowId;

/// Rows of `logits` (C each) to q = softmax(z / T), the target distribution the consistency
/// op sharpens: the stabilisers' running means are taken of it (in f64, rounded to f32).
pub fn tempered_softmax(logits: &[f32], classes: usize, temperature: f64) -> Vec<f32> {
    let mut q = Vec::with_capacity(logits.len());
    for row in logits.chunks_exact(classes) {
        let z: Vec<f64> = row.iter().map(|&v| f64::from(v) / temperature).collect();
        let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let s: f64 = z.iter().map(|v| (v - m).exp()).sum();
        q.extend(z.iter().map(|v| ((v - m).exp() / s) as f32));
    }
    q
}

/// The threshold rule of UDA and FixMatch.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AdaptiveThreshold {
    /// The fixed τ of `consistency.threshold`.
    #[default]
    Fixed,
    /// τ(c) = M(β(c))·τ, M(x) = x / (2 − x), β(c) = σ(c) / max(max_c' σ(c'), N_unused),
    /// σ(c) the unlabeled samples whose latest prediction above τ was c.
    Flexmatch,
    /// τ(c) = τ_g · p̃(c) / max_c' p̃(c'), with running means τ_g of max q and p̃ of q.
    Freematch,
}

/// A FlexMatch record of a sample never predicted above τ.
pub const UNUSED: u16 = u16::MAX;

/// The stabilisers' running state (checkpointed).
#[derive(Debug, Clone, Default, PartialEq, bincode::Encode, bincode::Decode)]
pub struct StabiliserState {
    /// Distribution alignment's running mean p̃ of the weak-view predictions.
    pub da_mean: Vec<f64>,
    /// FreeMatch's global threshold τ_g.
    pub free_tau: f64,
    /// FreeMatch's running mean p̃ of the weak-view predictions.
    pub free_mean: Vec<f64>,
    /// FlexMatch: per unlabeled shard, each sample's latest class predicted above τ
    /// ([`UNUSED`]: none yet).
    pub flex_last: Vec<Vec<u16>>,
}

/// What the consistency op gets for one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Prepared {
    /// Added to the target's logits: ln π − ln p̃ (distribution alignment).
    pub bias: Option<Vec<f32>>,
    /// Per-class multipliers of the threshold.
    pub class_threshold: Option<Vec<f32>>,
    /// The op's τ (FreeMatch: τ_g).
    pub threshold: f64,
}

/// The stabilisers of one run.
pub struct Stabiliser {
    align: bool,
    mode: AdaptiveThreshold,
    lambda: f64,
    tau: f64,
    /// The labeled class prior π.
    prior: Vec<f64>,
    pub state: StabiliserState,
    /// FlexMatch's σ(c) for each class, then N_unused, kept in step with `state.flex_last`.
    flex_counts: Vec<u64>,
}

impl Stabiliser {
    /// Fresh state: p̃ uniform, τ_g = 1/C (FreeMatch's start), every sample unused.
    /// `prior`: labeled documents per class; `unlabeled_shards`: each unlabeled shard's size.
    pub fn new(
        align: bool,
        mode: AdaptiveThreshold,
        lambda: f64,
        tau: f64,
        prior: &[u64],
        unlabeled_shards: &[usize],
    ) -> Stabiliser {
        let c = prior.len();
        let total = prior.iter().sum::<u64>().max(1) as f64;
        // A class absent from the labeled set would get ln 0: give it a floor of half a
        // document.
        let prior: Vec<f64> = prior.iter().map(|&k| (k as f64).max(0.5) / total).collect();
        let uniform = vec![1.0 / c as f64; c];
        let flex_last = if mode == AdaptiveThreshold::Flexmatch {
            unlabeled_shards.iter().map(|&n| vec![UNUSED; n]).collect()
        } else {
            Vec::new()
        };
        let state = StabiliserState {
            da_mean: if align { uniform.clone() } else { Vec::new() },
            free_tau: 1.0 / c as f64,
            free_mean: if mode == AdaptiveThreshold::Freematch { uniform } else { Vec::new() },
            flex_last,
        };
        let mut s = Stabiliser { align, mode, lambda, tau, prior, state, flex_counts: Vec::new() };
        s.recount();
        s
    }

    /// Replaces the state by a checkpoint's, refused unless it has the fresh state's shape
    /// (this run's classes, settings and unlabeled shards) and its records name classes.
    pub fn restore(&mut self, state: StabiliserState) -> Result<(), String> {
        let (fresh, c) = (&self.state, self.prior.len());
        let shaped = state.da_mean.len() == fresh.da_mean.len()
            && state.free_mean.len() == fresh.free_mean.len()
            && state.flex_last.len() == fresh.flex_last.len()
            && state.flex_last.iter().zip(&fresh.flex_last).all(|(a, b)| a.len() == b.len());
        if !shaped {
            return Err(
                "its stabilisers' state does not fit this run's classes, settings or unlabeled shards".into(),
            );
        }
        if let Some(r) = state.flex_last.iter().flatten().find(|&&r| r != UNUSED && r as usize >= c) {
            return Err(format!("its FlexMatch record names class {r} of {c}"));
        }
        self.state = state;
        self.recount();
        Ok(())
    }

    fn recount(&mut self) {
        let c = self.prior.len();
        self.flex_counts = vec![0; c + 1];
        for &r in self.state.flex_last.iter().flatten() {
            self.flex_counts[if r == UNUSED { c } else { r as usize }] += 1;
        }
    }

    /// Updates the running means with a batch's weak-view probabilities (`probs`, rows of
    /// C) and returns the op's inputs for the batch. `reduce` sums the batch's statistics
    /// over ranks (the identity on one process), so the means are the global batch's.
    pub fn prepare(&mut self, probs: &[f32], reduce: &mut dyn FnMut(&mut [f64])) -> Prepared {
        let c = self.prior.len();
        let lambda = self.lambda;
        // Σ q per class, Σ max q, and the row count.
        let mut sums = vec![0.0f64; c + 2];
        for row in probs.chunks_exact(c) {
            let mut best = 0.0f64;
            for (m, &p) in sums[..c].iter_mut().zip(row) {
                *m += f64::from(p);
                best = best.max(f64::from(p));
            }
            sums[c] += best;
        }
        sums[c + 1] = (probs.len() / c) as f64;
        reduce(&mut sums);
        let n = sums[c + 1];
        let mean: Vec<f64> = sums[..c].iter().map(|s| s / n.max(1.0)).collect();
        let mean_max = sums[c] / n.max(1.0);
        let mut out = Prepared { bias: None, class_threshold: None, threshold: self.tau };
        if n == 0.0 {
            return out;
        }
        if self.align {
            for (d, &m) in self.state.da_mean.iter_mut().zip(&mean) {
                *d = lambda * *d + (1.0 - lambda) * m;
            }
            out.bias = Some(
                self.prior
                    .iter()
                    .zip(&self.state.da_mean)
                    .map(|(&pi, &pt)| (pi.ln() - pt.max(1e-12).ln()) as f32)
                    .collect(),
            );
        }
        match self.mode {
            AdaptiveThreshold::Fixed => {}
            AdaptiveThreshold::Freematch => {
                let st = &mut self.state;
                st.free_tau = lambda * st.free_tau + (1.0 - lambda) * mean_max;
                for (f, &m) in st.free_mean.iter_mut().zip(&mean) {
                    *f = lambda * *f + (1.0 - lambda) * m;
                }
                let top = st.free_mean.iter().cloned().fold(0.0, f64::max).max(1e-12);
                out.threshold = st.free_tau;
                out.class_threshold = Some(st.free_mean.iter().map(|&f| (f / top) as f32).collect());
            }
            AdaptiveThreshold::Flexmatch => {
                let sigma = &self.flex_counts[..c];
                let unused = self.flex_counts[c];
                let denom = (*sigma.iter().max().unwrap_or(&0)).max(unused).max(1) as f64;
                out.class_threshold = Some(
                    sigma
                        .iter()
                        .map(|&s| {
                            let beta = s as f64 / denom;
                            (beta / (2.0 - beta)) as f32
                        })
                        .collect(),
                );
            }
        }
        out
    }

    /// Whether [`Stabiliser::record`] keeps anything (FlexMatch).
    pub fn records(&self) -> bool {
        self.mode == AdaptiveThreshold::Flexmatch
    }

    /// FlexMatch: records each unlabeled row's class where its confidence (from the op's
    /// row outputs, after alignment and temperature) exceeds τ.
    pub fn record(&mut self, rows: &[RowId], conf: &[f32], label: &[f32]) {
        if self.mode != AdaptiveThreshold::Flexmatch {
            return;
        }
        let c = self.prior.len();
        for ((id, &q), &y) in rows.iter().zip(conf).zip(label) {
            if f64::from(q) > self.tau {
                let slot = &mut self.state.flex_last[id.shard as usize][id.row as usize];
                let old = if *slot == UNUSED { c } else { *slot as usize };
                self.flex_counts[old] -= 1;
                *slot = y as u16;
                self.flex_counts[y as usize] += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shard::SplitKind;

    fn id(shard: u32, row: u32) -> RowId {
        RowId { split: SplitKind::Unlabeled, shard, row }
    }

    #[test]
    fn tempered_softmax_sharpens_rows() {
        let q = tempered_softmax(&[1.0, 0.0, 0.0, 0.0, 2.0, 2.0], 3, 0.5);
        let e2 = 2f64.exp();
        let want0 = [e2 / (e2 + 2.0), 1.0 / (e2 + 2.0), 1.0 / (e2 + 2.0)];
        for (a, b) in q[..3].iter().zip(want0) {
            assert!((f64::from(*a) - b).abs() < 1e-7);
        }
        let e4 = 4f64.exp();
        assert!((f64::from(q[3]) - 1.0 / (1.0 + 2.0 * e4)).abs() < 1e-7);
        assert_eq!(q[4], q[5]);
    }

    #[test]
    fn distribution_alignment_divides_by_the_running_mean() {
        let mut s = Stabiliser::new(true, AdaptiveThreshold::Fixed, 0.5, 0.9, &[30, 10], &[]);
        // π = (0.75, 0.25); the batch predicts class 0 with 0.9 on average.
        let p = s.prepare(&[0.9, 0.1, 0.9, 0.1], &mut |_| {});
        // p̃ = 0.5·0.5 + 0.5·(0.9, 0.1) = (0.7, 0.3).
        let bias = p.bias.unwrap();
        assert!((bias[0] - (0.75f64.ln() - 0.7f64.ln()) as f32).abs() < 1e-6);
        assert!((bias[1] - (0.25f64.ln() - 0.3f64.ln()) as f32).abs() < 1e-6);
        assert_eq!(p.threshold, 0.9);
        assert!(p.class_threshold.is_none());
    }

    #[test]
    fn freematch_thresholds_follow_the_running_means() {
        let mut s = Stabiliser::new(false, AdaptiveThreshold::Freematch, 0.9, 0.95, &[1, 1, 1, 1], &[]);
        assert_eq!(s.state.free_tau, 0.25);
        let p = s.prepare(&[0.7, 0.1, 0.1, 0.1, 0.5, 0.3, 0.1, 0.1], &mut |_| {});
        // τ_g = 0.9·0.25 + 0.1·0.6; p̃ = 0.9·0.25 + 0.1·(0.6, 0.2, 0.1, 0.1).
        let tau = 0.9 * 0.25 + 0.1 * 0.6;
        assert!((p.threshold - tau).abs() < 1e-7);
        let mean = [0.285, 0.245, 0.235, 0.235];
        let mult = p.class_threshold.unwrap();
        for c in 0..4 {
            assert!((f64::from(mult[c]) - mean[c] / 0.285).abs() < 1e-6, "class {c}");
        }
    }

    #[test]
    fn flexmatch_warms_up_then_lowers_rare_classes_thresholds() {
        let mut s = Stabiliser::new(false, AdaptiveThreshold::Flexmatch, 0.9, 0.8, &[1, 1, 1], &[4, 4]);
        // Nothing predicted yet: β = 0 for every class, M(0) = 0 (the warm-up lets every
        // confident-enough row pass at first).
        assert_eq!(s.prepare(&[1.0, 0.0, 0.0], &mut |_| {}).class_threshold.unwrap(), [0.0, 0.0, 0.0]);
        // Rows 0..3 of shard 0 confidently class 0, row 0 of shard 1 class 2, one row below τ.
        let rows = [id(0, 0), id(0, 1), id(0, 2), id(0, 3), id(1, 0), id(1, 1)];
        s.record(&rows, &[0.9, 0.95, 0.85, 0.99, 0.9, 0.5], &[0.0, 0.0, 0.0, 0.0, 2.0, 1.0]);
        // σ = (4, 0, 1), N_unused = 3: β = σ / 4.
        let m = s.prepare(&[1.0, 0.0, 0.0], &mut |_| {}).class_threshold.unwrap();
        let mm = |b: f64| (b / (2.0 - b)) as f32;
        assert_eq!(m, [mm(1.0), mm(0.0), mm(0.25)]);
        // A sample's newer confident class replaces its old one; the counts follow, and a
        // restore recounts them from the records.
        s.record(&[id(0, 0)], &[0.9], &[1.0]);
        assert_eq!(s.flex_counts, [3, 1, 1, 3]);
        let state = s.state.clone();
        let mut t = Stabiliser::new(false, AdaptiveThreshold::Flexmatch, 0.9, 0.8, &[1, 1, 1], &[4, 4]);
        t.restore(state.clone()).unwrap();
        assert_eq!(t.flex_counts, [3, 1, 1, 3]);
        // A state of another shape, or naming a class past the last, is refused (it would
        // index past the counts).
        let mut other = Stabiliser::new(false, AdaptiveThreshold::Flexmatch, 0.9, 0.8, &[1, 1, 1], &[4, 5]);
        assert!(other.restore(state.clone()).unwrap_err().contains("does not fit"));
        let mut bad = state;
        bad.flex_last[0][1] = 7;
        assert!(t.restore(bad).unwrap_err().contains("names class 7 of 3"));
    }
}
