//! The learning-rate schedule: linear warmup, then cosine, linear or constant decay toward
//! a floor (cosine optionally in several cycles, restarting at the peak: snapshot
//! ensembles), times a reduce-on-plateau factor driven by validation accuracy.

use serde::{Deserialize, Serialize};

/// The shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    Cosine,
    Linear,
    Constant,
}

/// `[schedule]` of a training config.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScheduleConfig {
    /// Steps of linear warmup: step s < W (0-based) uses peak·(s+1)/W.
    pub warmup_steps: u64,
    /// Decay after warmup: step s ≥ W uses the shape at x = (s−W)/(total−W), from the peak
    /// at x = 0 toward `min_lr_ratio` × peak at x = 1 (the step after the last).
    pub decay: Decay,
    /// Floor of the decay, as a fraction of the peak.
    pub min_lr_ratio: f64,
    /// Reduce-on-plateau: evaluations without a new best validation accuracy before the
    /// learning rate is multiplied by `plateau_factor`; 0 turns it off.
    pub plateau_patience: u32,
    pub plateau_factor: f64,
    /// Cosine with restarts (METHODS.md §13, snapshot ensembles): the decay after warmup runs
    /// in this many equal cycles, each from the peak down to the floor, and training writes
    /// a snapshot checkpoint at the end of each, which pruning keeps (`dtrain predict` given
    /// those checkpoints averages them). 1: no restarts. Left out of the saved config when 1, so earlier runs keep
    /// their trajectory hash.
    #[serde(skip_serializing_if = "is_one")]
    pub cycles: u32,
}

fn is_one(v: &u32) -> bool {
    *v == 1
}

impl Default for ScheduleConfig {
    fn default() -> Self {
        ScheduleConfig {
            warmup_steps: 0,
            decay: Decay::Linear,
            min_lr_ratio: 0.0,
            plateau_patience: 0,
            plateau_factor: 0.5,
            cycles: 1,
        }
    }
}

/// Reduce-on-plateau state; part of the checkpointed training state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, bincode::Encode, bincode::Decode)]
pub struct Plateau {
    /// Current multiplier (1 until the first reduction).
    pub factor: f64,
    /// Best validation accuracy so far.
    pub best: f64,
    /// Evaluations since the best.
    pub bad: u32,
}

impl Default for Plateau {
    fn default() -> Self {
        Plateau { factor: 1.0, best: f64::NEG_INFINITY, bad: 0 }
    }
}

impl ScheduleConfig {
    /// The multiplier of the peak learning rate at 0-based `step` of `total` steps (before
    /// the plateau factor).
    pub fn at(&self, step: u64, total: u64) -> f64 {
        if step < self.warmup_steps {
            return (step + 1) as f64 / self.warmup_steps as f64;
        }
        let span = total.saturating_sub(self.warmup_steps).max(1);
        let done = step - self.warmup_steps;
        let mut x = (done as f64 / span as f64).min(1.0);
        if self.cycles > 1 && done < span {
            // The position within the current cycle, in integers (as `ends_cycle` finds the
            // cycles), so that a restart lands exactly on the peak.
            x = ((done * u64::from(self.cycles)) % span) as f64 / span as f64;
        }
        let floor = self.min_lr_ratio;
        match self.decay {
            Decay::Constant => 1.0,
            Decay::Linear => floor + (1.0 - floor) * (1.0 - x),
            Decay::Cosine => floor + (1.0 - floor) * 0.5 * (1.0 + (std::f64::consts::PI * x).cos()),
        }
    }

    /// Whether `done` steps (of `total`) end a cycle of cosine with restarts before the last
    /// one: the next step starts again at the peak (training writes a snapshot checkpoint).
    pub fn ends_cycle(&self, done: u64, total: u64) -> bool {
        let w = self.warmup_steps;
        if self.cycles <= 1 || done <= w || done >= total {
            return false;
        }
        let (span, k) = (total - w, u64::from(self.cycles));
        (done - w) * k / span > (done - 1 - w) * k / span
    }

    /// Feeds one validation accuracy to the plateau rule; returns whether it reduced.
    pub fn observe(&self, p: &mut Plateau, accuracy: f64) -> bool {
        if accuracy > p.best {
            p.best = accuracy;
            p.bad = 0;
            return false;
        }
        p.bad += 1;
        if self.plateau_patience > 0 && p.bad >= self.plateau_patience {
            p.factor *= self.plateau_factor;
            p.bad = 0;
            return true;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_decays() {
        let s = ScheduleConfig {
            warmup_steps: 10,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
            ..Default::default()
        };
        assert!((s.at(0, 110) - 0.1).abs() < 1e-12);
        assert!((s.at(9, 110) - 1.0).abs() < 1e-12);
        assert!((s.at(10, 110) - 1.0).abs() < 1e-12);
        assert!((s.at(60, 110) - 0.55).abs() < 1e-12, "half-way: floor + half the range");
        assert!((s.at(110, 110) - 0.1).abs() < 1e-12);
        let l = ScheduleConfig { decay: Decay::Linear, ..Default::default() };
        assert!((l.at(25, 100) - 0.75).abs() < 1e-12);
        let c = ScheduleConfig { decay: Decay::Constant, ..Default::default() };
        assert_eq!(c.at(99, 100), 1.0);
    }

    /// Three cycles over 90 steps after 10 of warmup: the peak at steps 10, 40 and 70, the
    /// floor approached before each restart, and a cycle ending after 40 and 70 steps.
    #[test]
    fn cosine_restarts_in_equal_cycles() {
        let s = ScheduleConfig {
            warmup_steps: 10,
            decay: Decay::Cosine,
            min_lr_ratio: 0.1,
            cycles: 3,
            ..Default::default()
        };
        for peak in [10, 40, 70] {
            assert!((s.at(peak, 100) - 1.0).abs() < 1e-12, "step {peak}");
            assert!((s.at(peak + 15, 100) - 0.55).abs() < 1e-12, "half-way through the cycle at {peak}");
            assert!(s.at(peak + 29, 100) < 0.11, "the cycle's last step");
        }
        assert!((s.at(100, 100) - 0.1).abs() < 1e-12);
        let ends: Vec<u64> = (0..=100).filter(|&d| s.ends_cycle(d, 100)).collect();
        assert_eq!(ends, [40, 70]);
        // Where the float product (s−W)·k/span falls just below an integer (k 22, span
        // 22·7, step 15·7), the restart still lands on the peak.
        let k22 = ScheduleConfig { warmup_steps: 0, cycles: 22, ..s.clone() };
        assert!((k22.at(105, 154) - 1.0).abs() < 1e-12 && k22.ends_cycle(105, 154));
        let one = ScheduleConfig { cycles: 1, ..s.clone() };
        assert!((0..=100).all(|d| !one.ends_cycle(d, 100)));
        assert!((one.at(55, 100) - 0.55).abs() < 1e-12);
    }

    #[test]
    fn plateau_reduces_after_patience() {
        let s = ScheduleConfig { plateau_patience: 2, plateau_factor: 0.5, ..Default::default() };
        let mut p = Plateau::default();
        assert!(!s.observe(&mut p, 0.5));
        assert!(!s.observe(&mut p, 0.4));
        assert!(s.observe(&mut p, 0.5), "two evaluations without a new best");
        assert_eq!(p.factor, 0.5);
        assert!(!s.observe(&mut p, 0.6));
        assert_eq!(p.best, 0.6);
    }
}
