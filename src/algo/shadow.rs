//! Shadow copies of the weights, moved towards the student by an EMA after every optimizer
//! step (METHODS.md §6, §7): the Mean Teacher, EMA weights and SWA. θ' ← α_t θ' + (1 − α_t) θ
//! over the flat buffer, α_t from an [`AlphaRule`]; optionally lazy on the embedding table's
//! rows.
//!
//! **Lazy rows.** `log_now` is Σ ln α_t over the steps so far, and `row_log[r]` its value
//! when row r was last brought up to date. A row the optimizer has not changed since then
//! is brought up to date by one blend with a = exp(log_now − row_log[r]), the product of the
//! α_t in between, which is exact because the student's row stayed constant over those
//! steps. Rows a step reads or changes are brought up to date before the step
//! ([`Shadow::sync_rows`]), so every changed row is current when its own α_t is applied
//! ([`Shadow::update`]). Steps with α_t = 1 (SWA between its averages) change nothing and
//! add ln 1 = 0; a step with α_t = 0 (SWA's first average) copies the student whole.

use crate::backend::Backend;
use crate::model::params::Slot;

/// How α_t follows the step count t (optimizer steps completed, from 1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AlphaRule {
    /// α_t = min(1 − 1/(t + 1), α), α switching to a second value after the given step:
    /// the Mean Teacher (§6) and EMA weights (§7).
    WarmUp { alpha: f64, late: Option<(f64, u64)> },
    /// SWA (§7): the uniform average of the weights after steps `start`, `start + every`,
    /// …: α_t = n/(n + 1) at the (n+1)-th of them, 1 (no change) at every other step.
    Swa { start: u64, every: u64 },
}

impl AlphaRule {
    /// α_t after the `t`-th optimizer step (t ≥ 1).
    pub fn at(&self, t: u64) -> f64 {
        match *self {
            AlphaRule::WarmUp { alpha, late } => {
                let alpha = match late {
                    Some((a, from)) if t > from => a,
                    _ => alpha,
                };
                (1.0 - 1.0 / (t as f64 + 1.0)).min(alpha)
            }
            AlphaRule::Swa { start, every } => {
                if t < start || (t - start) % every != 0 {
                    return 1.0;
                }
                let n = ((t - start) / every) as f64;
                n / (n + 1.0)
            }
        }
    }
}

/// A shadow copy of the weights: its parameters (the student's layout) and its α rule.
pub struct Shadow<B: Backend> {
    pub params: B::Buf,
    rule: AlphaRule,
    lazy: Option<Lazy>,
}

struct Lazy {
    table: Slot,
    log_now: f64,
    row_log: Vec<f64>,
}

impl<B: Backend> Shadow<B> {
    /// A shadow equal to `student`; `table` is the slot updated lazily (None: every update
    /// covers the whole buffer).
    pub fn new(be: &B, student: &B::Buf, len: usize, rule: AlphaRule, table: Option<Slot>) -> Self {
        let mut params = be.zeros(len);
        be.copy(&mut params, student, 0..len);
        let lazy = table.map(|t| Lazy { table: t, log_now: 0.0, row_log: vec![0.0; t.rows] });
        Shadow { params, rule, lazy }
    }

    /// α_t after the `t`-th optimizer step (t ≥ 1).
    pub fn alpha_at(&self, t: u64) -> f64 {
        self.rule.at(t)
    }

    /// Brings table rows `rows` (sorted, unique) up to date, before a step reads or changes
    /// them. `student` must not have changed those rows since they were last brought up to
    /// date.
    pub fn sync_rows(&mut self, be: &B, student: &B::Buf, rows: &[u32]) {
        let Some(lazy) = &mut self.lazy else { return };
        let (mut ids, mut factors) = (Vec::new(), Vec::new());
        for &r in rows {
            let last = &mut lazy.row_log[r as usize];
            if *last != lazy.log_now {
                ids.push(r);
                factors.push((lazy.log_now - *last).exp());
                *last = lazy.log_now;
            }
        }
        be.ema_rows(&mut self.params, student, lazy.table, &ids, &factors);
    }

    /// Brings every row up to date (before an evaluation or a checkpoint).
    pub fn sync_all(&mut self, be: &B, student: &B::Buf) {
        let Some(rows) = self.lazy.as_ref().map(|l| l.table.rows as u32) else { return };
        let all: Vec<u32> = (0..rows).collect();
        self.sync_rows(be, student, &all);
    }

    /// The EMA after optimizer step `t` (1-based), given the table rows the step may have
    /// changed (sorted, unique; brought up to date before the step). Returns α_t.
    pub fn update(&mut self, be: &B, student: &B::Buf, len: usize, t: u64, rows: &[u32]) -> f64 {
        let a = self.alpha_at(t);
        if a == 1.0 {
            return a;
        }
        if a == 0.0 {
            be.copy(&mut self.params, student, 0..len);
            if let Some(lazy) = &mut self.lazy {
                let now = lazy.log_now;
                lazy.row_log.iter_mut().for_each(|v| *v = now);
            }
            return a;
        }
        match &mut self.lazy {
            None => be.ema(&mut self.params, student, 0..len, a),
            Some(lazy) => {
                be.ema(&mut self.params, student, 0..lazy.table.offset, a);
                be.ema(&mut self.params, student, lazy.table.range().end..len, a);
                let factors = vec![a; rows.len()];
                be.ema_rows(&mut self.params, student, lazy.table, rows, &factors);
                lazy.log_now += a.ln();
                for &r in rows {
                    lazy.row_log[r as usize] = lazy.log_now;
                }
            }
        }
        a
    }

    /// Σ ln α_t so far (lazy mode; part of the checkpointed state, 0 otherwise). After
    /// [`Shadow::sync_all`] every row is at this value.
    pub fn log_now(&self) -> f64 {
        self.lazy.as_ref().map_or(0.0, |l| l.log_now)
    }

    /// Restores a shadow saved after [`Shadow::sync_all`] at `log_now`.
    pub fn restore(&mut self, params: B::Buf, log_now: f64) {
        self.params = params;
        if let Some(lazy) = &mut self.lazy {
            lazy.log_now = log_now;
            lazy.row_log.iter_mut().for_each(|v| *v = log_now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::Cpu;
    use crate::model::params::Layout;

    #[test]
    fn alpha_rule_warms_up_then_switches() {
        let be = Cpu::<f64>::new();
        let t = Shadow::new(
            &be,
            &vec![0.0; 4],
            4,
            AlphaRule::WarmUp { alpha: 0.99, late: Some((0.999, 150)) },
            None,
        );
        assert_eq!(t.alpha_at(1), 0.5);
        assert!((t.alpha_at(2) - 2.0 / 3.0).abs() < 1e-15);
        assert_eq!(t.alpha_at(99), 1.0 - 1.0 / 100.0);
        assert_eq!(t.alpha_at(150), 0.99);
        // After the switch the warm-up term still applies: min(1 − 1/152, 0.999).
        assert_eq!(t.alpha_at(151), 1.0 - 1.0 / 152.0);
        assert_eq!(t.alpha_at(5000), 0.999);
    }

    #[test]
    fn one_update_is_the_ema_formula() {
        let be = Cpu::<f64>::new();
        let mut t =
            Shadow::new(&be, &vec![1.0, 2.0, 3.0], 3, AlphaRule::WarmUp { alpha: 0.9, late: None }, None);
        let student = vec![2.0, 0.0, 3.0];
        let a = t.update(&be, &student, 3, 1, &[]);
        assert_eq!(a, 0.5);
        assert_eq!(t.params, [1.5, 1.0, 3.0]);
        let a = t.update(&be, &student, 3, 50, &[]);
        assert_eq!(a, 0.9);
        assert!((t.params[0] - (0.9 * 1.5 + 0.1 * 2.0)).abs() < 1e-15);
    }

    /// A lazy shadow whose rows a step touches sparsely and unevenly equals the dense one
    /// whenever it is brought up to date, for the warm-up rule and for SWA.
    #[test]
    fn lazy_rows_equal_the_dense_update() {
        for rule in
            [AlphaRule::WarmUp { alpha: 0.95, late: Some((0.99, 12)) }, AlphaRule::Swa { start: 5, every: 3 }]
        {
            lazy_equals_dense(rule);
        }
    }

    #[test]
    fn swa_is_the_uniform_average_of_its_steps() {
        let be = Cpu::<f64>::new();
        let rule = AlphaRule::Swa { start: 2, every: 2 };
        assert_eq!(
            (rule.at(1), rule.at(2), rule.at(3), rule.at(4), rule.at(6)),
            (1.0, 0.0, 1.0, 0.5, 2.0 / 3.0)
        );
        let mut s = Shadow::new(&be, &vec![100.0], 1, rule, None);
        let mut taken = Vec::new();
        for t in 1..=7u64 {
            let student = vec![t as f64 * t as f64];
            s.update(&be, &student, 1, t, &[]);
            if t >= 2 && t % 2 == 0 {
                taken.push(student[0]);
            }
        }
        let mean = taken.iter().sum::<f64>() / taken.len() as f64;
        assert!((s.params[0] - mean).abs() < 1e-12, "{} vs {mean}", s.params[0]);
    }

    fn lazy_equals_dense(rule: AlphaRule) {
        let be = Cpu::<f64>::new();
        let mut layout = Layout::new();
        let dense = layout.vector("output.bias", 3);
        let table = layout.matrix("embedding.weight", 9, 2);
        let len = layout.total();
        let mut student: Vec<f64> = (0..len).map(|i| (i as f64 * 0.37).sin()).collect();
        let mut lazy = Shadow::new(&be, &student, len, rule, Some(table));
        let mut full = Shadow::new(&be, &student, len, rule, None);
        let mut rng = crate::rng::Stream::new(5, crate::rng::Purpose::Init, 0);
        for t in 1..=40u64 {
            // Rows 0 and 1 are touched every step, row 8 never, the rest now and then.
            let mut rows: Vec<u32> =
                (0..9).filter(|&r| r < 2 || (r != 8 && rng.next_u64() % 4 == 0)).collect();
            rows.sort_unstable();
            lazy.sync_rows(&be, &student, &rows);
            for &r in &rows {
                for j in 0..2 {
                    student[table.offset + r as usize * 2 + j] += 0.1 * ((t * 7 + r as u64) as f64).cos();
                }
            }
            for v in &mut student[dense.range()] {
                *v -= 0.01 * t as f64;
            }
            lazy.update(&be, &student, len, t, &rows);
            full.update(&be, &student, len, t, &rows);
            if t % 13 == 0 || t == 40 {
                lazy.sync_all(&be, &student);
                for (i, (a, b)) in lazy.params.iter().zip(&full.params).enumerate() {
                    assert!((a - b).abs() < 1e-12, "{rule:?}, step {t}, element {i}: lazy {a} dense {b}");
                }
            }
        }
        // Row 8 never changed: the shadow's row equals the student's.
        assert!((lazy.params[table.offset + 16] - student[table.offset + 16]).abs() < 1e-12);
    }
}
