//! Weight schedules of METHODS.md §3: the consistency weight's ramp-up w(t) = w_max·r(t/T),
//! the labeled-ratio scaling of w_max, and the ramp-down of the last steps.

use serde::{Deserialize, Serialize};

/// The shape r(x) of a ramp-up, for x in [0, 1); r(x) = 1 from x = 1 on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RampShape {
    /// exp(−5(1 − x)²), the Π-model and Mean Teacher papers' ramp.
    Sigmoid,
    /// x.
    Linear,
    /// ½(1 − cos πx): rises from 0 to 1.
    Cosine,
}

impl RampShape {
    /// r(x), with r(x) = 1 for x ≥ 1 and r(x) = r(0) for x < 0.
    pub fn at(self, x: f64) -> f64 {
        if x >= 1.0 {
            return 1.0;
        }
        let x = x.max(0.0);
        match self {
            RampShape::Sigmoid => (-5.0 * (1.0 - x) * (1.0 - x)).exp(),
            RampShape::Linear => x,
            RampShape::Cosine => 0.5 * (1.0 - (std::f64::consts::PI * x).cos()),
        }
    }
}

/// A resolved ramp, in optimizer steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Ramp {
    pub shape: RampShape,
    /// Steps T_ramp of the ramp-up (0: the full weight from the start).
    pub up_steps: u64,
    /// Steps held at weight 0 (Temporal Ensembling's first epoch). The ramp is not shifted
    /// by them: after the delay the factor is the shape's at step / up_steps, as METHODS.md
    /// §3 writes w(t) = w_max · r(t / T_ramp) with w = 0 through the first epoch.
    pub delay_steps: u64,
}

impl Ramp {
    /// r at 0-based step `step`: 0 during the delay, else the shape at step / `up_steps`.
    pub fn factor(&self, step: u64) -> f64 {
        if step < self.delay_steps {
            return 0.0;
        }
        if self.up_steps == 0 {
            return 1.0;
        }
        self.shape.at(step as f64 / self.up_steps as f64)
    }
}

/// The ramp-down factor of the last `down_steps` of `total` (the Π-model paper's
/// exp(−12.5 x²), x going from 0 to 1 over the ramp-down), applied to the learning rate and
/// to Adam's β₁ (which it pulls towards 0.5: β₁ = f·β₁ + (1 − f)·0.5).
pub fn ramp_down(step: u64, total: u64, down_steps: u64) -> f64 {
    if down_steps == 0 || step + down_steps < total {
        return 1.0;
    }
    let x = (step + down_steps - total) as f64 / down_steps as f64;
    (-12.5 * x * x).exp()
}

/// Adam's β₁ under the ramp-down factor `down` ([`ramp_down`]): pulled from `base` towards
/// 0.5.
pub fn ramped_beta1(base: f64, down: f64) -> f64 {
    down * base + (1.0 - down) * 0.5
}

/// w_max scaled by |L| / (|L| + |U|) when asked (fewer labels, smaller weight).
pub fn scaled_weight(w_max: f64, labeled: u64, unlabeled: u64, scale: bool) -> f64 {
    if scale && labeled + unlabeled > 0 {
        w_max * labeled as f64 / (labeled + unlabeled) as f64
    } else {
        w_max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_pinned() {
        // Pinned values: the ramps rise from ~0 to 1, and cosine increases.
        assert!((RampShape::Sigmoid.at(0.0) - (-5.0f64).exp()).abs() < 1e-15);
        assert!((RampShape::Sigmoid.at(0.5) - (-1.25f64).exp()).abs() < 1e-15);
        assert_eq!(RampShape::Sigmoid.at(1.0), 1.0);
        assert_eq!(RampShape::Linear.at(0.25), 0.25);
        assert!(
            (RampShape::Cosine.at(0.25) - (0.5 - 0.5 * (std::f64::consts::FRAC_PI_4).cos())).abs() < 1e-15
        );
        assert_eq!(RampShape::Cosine.at(0.0), 0.0);
        assert!((RampShape::Cosine.at(0.5) - 0.5).abs() < 1e-15);
        let mut last = -1.0;
        for i in 0..=100 {
            let v = RampShape::Cosine.at(i as f64 / 100.0);
            assert!(v >= last, "cosine ramp must increase");
            last = v;
        }
        for s in [RampShape::Sigmoid, RampShape::Linear, RampShape::Cosine] {
            assert_eq!(s.at(7.0), 1.0);
        }
    }

    #[test]
    fn delay_and_steps() {
        let r = Ramp { shape: RampShape::Linear, up_steps: 10, delay_steps: 5 };
        assert_eq!(r.factor(0), 0.0);
        assert_eq!(r.factor(4), 0.0);
        // After the delay, the unshifted ramp: r(5/10), not r(0).
        assert_eq!(r.factor(5), 0.5);
        assert_eq!(r.factor(7), 0.7);
        assert_eq!(r.factor(10), 1.0);
        assert_eq!(r.factor(15), 1.0);
        assert_eq!(Ramp { shape: RampShape::Sigmoid, up_steps: 0, delay_steps: 0 }.factor(0), 1.0);
    }

    #[test]
    fn ramp_down_and_scaling() {
        assert_eq!(ramp_down(0, 100, 10), 1.0);
        assert_eq!(ramp_down(89, 100, 10), 1.0);
        assert_eq!(ramp_down(90, 100, 10), 1.0);
        assert!((ramp_down(95, 100, 10) - (-12.5f64 * 0.25).exp()).abs() < 1e-15);
        assert_eq!(ramp_down(50, 100, 0), 1.0);
        assert_eq!(scaled_weight(10.0, 100, 900, true), 1.0);
        assert_eq!(scaled_weight(10.0, 100, 900, false), 10.0);
    }
}
