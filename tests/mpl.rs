//! Meta Pseudo Labels' step (`algo::mpl`) on small dense nets: the labeled rows never reach
//! the student's gradient, the teacher's MPL term is h·∇CE(ŷ, T(u_s)) by finite
//! differences, h's sign and baseline follow the config, and on two moons MPL turns a bad
//! teacher into a better student than plain pseudo-labelling from the same teacher.

use dtrain::algo::mpl::{self, HSign, MplBatch, MplSettings, MplState, Net, PseudoLabels, StepPlan};
use dtrain::backend::cpu::Cpu;
use dtrain::backend::{Activation, Alone, Backend, DropoutKey, RowMap};
use dtrain::optim::{OptimConfig, OptimKind};
use dtrain::train::net::DenseNet;

type Be = Cpu<f32>;

/// A small deterministic generator for the tests' data.
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Self {
        Rng(seed)
    }

    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        (dtrain::backend::mix64(self.0) >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn sgd(lr: f64) -> OptimConfig {
    OptimConfig { kind: OptimKind::Sgd, lr, momentum: 0.0, weight_decay: 0.0, ..OptimConfig::default() }
}

fn adam(lr: f64) -> OptimConfig {
    OptimConfig { kind: OptimKind::Adamw, lr, weight_decay: 0.0, ..OptimConfig::default() }
}

fn net(be: &Be, input: usize, classes: usize, optim: OptimConfig, seed: u64) -> DenseNet<Be> {
    DenseNet::new(be, input, &[16], classes, Activation::Tanh, 0.0, false, optim, seed)
}

fn settings(sign: HSign, baseline: Option<f64>) -> MplSettings {
    MplSettings {
        h_sign: sign,
        baseline_rate: baseline,
        pseudo_labels: PseudoLabels::Hard,
        temperature: 1.0,
        pl_smoothing: 0.0,
        label_smoothing: 0.0,
        uda: None,
    }
}

fn plan(lr_t: f64, lr_s: f64) -> StepPlan {
    StepPlan { lr_teacher: lr_t, lr_student: lr_s, uda_weight: 0.0, teacher_noise: None, student_noise: None }
}

fn randn(rng: &mut Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| (rng.uniform() * 2.0 - 1.0) as f32).collect()
}

/// The rows of a step on random features: the teacher sees `n_l` labeled rows then `n_u`
/// unlabeled ones; the student the same rows split in two.
struct Rows {
    teacher: Vec<f32>,
    labeled: Vec<f32>,
    unlabeled: Vec<f32>,
    labels: Vec<i32>,
}

fn rows(seed: u64, d: usize, n_l: usize, n_u: usize, classes: usize) -> Rows {
    let mut rng = Rng::new(seed);
    let labeled = randn(&mut rng, n_l * d);
    let unlabeled = randn(&mut rng, n_u * d);
    let labels = (0..n_l).map(|i| (i % classes) as i32).collect();
    Rows { teacher: [labeled.clone(), unlabeled.clone()].concat(), labeled, unlabeled, labels }
}

fn run_step(
    be: &Be,
    t: &mut DenseNet<Be>,
    s: &mut DenseNet<Be>,
    r: &Rows,
    set: &MplSettings,
    state: &mut MplState,
    p: &StepPlan,
) -> mpl::MplOut {
    let b = MplBatch {
        teacher: &be.upload(&r.teacher),
        teacher_labeled: true,
        teacher_weak: false,
        student_labeled: &be.upload(&r.labeled),
        student_unlabeled: &be.upload(&r.unlabeled),
        labels: &r.labels,
        n_u: r.unlabeled.len() / (r.labeled.len() / r.labels.len()),
    };
    mpl::step(be, t, s, &b, set, state, p, &Alone, &mut |_| {})
}

#[test]
fn labeled_rows_never_enter_the_students_gradient() {
    let be = Be::new();
    let (d, c) = (5, 3);
    let base = rows(1, d, 6, 10, c);
    // The same unlabeled rows; other labeled features and other labels.
    let mut other = rows(2, d, 6, 10, c);
    other.unlabeled = base.unlabeled.clone();
    other.teacher = [other.labeled.clone(), base.unlabeled.clone()].concat();
    other.labels = base.labels.iter().map(|&y| (y + 1) % c as i32).collect();
    let set = settings(HSign::OldMinusNew, None);
    let mut students = Vec::new();
    let mut teachers = Vec::new();
    for r in [&base, &other] {
        let mut t = net(&be, d, c, adam(0.05), 7);
        let mut s = net(&be, d, c, adam(0.05), 8);
        let before = s.params.clone();
        let out = run_step(&be, &mut t, &mut s, r, &set, &mut MplState::default(), &plan(0.05, 0.05));
        assert!(s.params != before, "the student moved");
        assert!(out.h != 0.0, "h is measured");
        students.push(s.params.clone());
        teachers.push(t.params.clone());
    }
    assert_eq!(students[0], students[1], "the student's update does not depend on the labeled rows");
    assert!(teachers[0] != teachers[1], "the teacher's does (CE_T and h)");
}

/// Σ over rows of CE(onehot(labels), logits), in f64.
fn ce_sum(logits: &[f32], labels: &[usize], c: usize) -> f64 {
    logits
        .chunks(c)
        .zip(labels)
        .map(|(z, &y)| {
            let m = z.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let lse = m + z.iter().map(|&v| (v as f64 - m).exp()).sum::<f64>().ln();
            lse - z[y] as f64
        })
        .sum()
}

#[test]
fn the_teachers_mpl_term_is_h_times_the_pseudo_label_gradient() {
    let be = Be::new();
    let (d, c, n_u) = (4, 3, 12);
    // No labeled rows for the teacher and no UDA term: its gradient is h·∇ mean CE(ŷ, T(u)).
    let mut r = rows(3, d, 6, n_u, c);
    r.teacher = r.unlabeled.clone();
    let mut t = net(&be, d, c, sgd(1.0), 11);
    let mut s = net(&be, d, c, sgd(0.5), 12);
    let phi0 = t.params.clone();
    let b = MplBatch {
        teacher: &be.upload(&r.teacher),
        teacher_labeled: false,
        teacher_weak: false,
        student_labeled: &be.upload(&r.labeled),
        student_unlabeled: &be.upload(&r.unlabeled),
        labels: &r.labels,
        n_u,
    };
    let set = settings(HSign::OldMinusNew, None);
    let out = mpl::step(
        &be,
        &mut t,
        &mut s,
        &b,
        &set,
        &mut MplState::default(),
        &plan(1.0, 0.5),
        &Alone,
        &mut |_| {},
    );
    assert!(out.h.abs() > 1e-4, "h = {} is too small to test against", out.h);
    // Plain SGD at lr 1: the gradient is φ0 − φ1.
    let g: Vec<f64> = phi0.iter().zip(&t.params).map(|(a, b)| f64::from(a - b)).collect();
    let loss = |phi: &[f32]| {
        let mut probe = net(&be, d, c, sgd(1.0), 11);
        probe.params = phi.to_vec();
        let z = probe.forward(&be, &be.upload(&r.teacher), n_u, None).clone();
        out.h_used * ce_sum(&z, &out.labels, c) / n_u as f64
    };
    let mut rng = Rng::new(5);
    for _ in 0..3 {
        let v: Vec<f64> = (0..phi0.len()).map(|_| rng.uniform() * 2.0 - 1.0).collect();
        let eps = 1e-2;
        let shifted = |sgn: f64| -> Vec<f32> {
            phi0.iter().zip(&v).map(|(&p, &vi)| (f64::from(p) + sgn * eps * vi) as f32).collect()
        };
        let fd = (loss(&shifted(1.0)) - loss(&shifted(-1.0))) / (2.0 * eps);
        let an: f64 = g.iter().zip(&v).map(|(a, b)| a * b).sum();
        let rel = (fd - an).abs() / fd.abs().max(an.abs()).max(1e-12);
        assert!(rel < 2e-3, "directional derivative: finite differences {fd}, the step's {an} (rel {rel})");
    }
}

#[test]
fn h_takes_its_sign_and_baseline_from_the_config() {
    let be = Be::new();
    let (d, c) = (4, 3);
    let r = rows(9, d, 6, 10, c);
    let mut outs = Vec::new();
    for (sign, baseline) in
        [(HSign::OldMinusNew, None), (HSign::NewMinusOld, None), (HSign::OldMinusNew, Some(0.25))]
    {
        let mut t = net(&be, d, c, sgd(0.1), 1);
        let mut s = net(&be, d, c, sgd(0.5), 2);
        let mut state = MplState { baseline: 0.1 };
        let out = run_step(&be, &mut t, &mut s, &r, &settings(sign, baseline), &mut state, &plan(0.1, 0.5));
        assert_eq!(state.baseline, out.baseline);
        outs.push(out);
    }
    let (a, b, base) = (&outs[0], &outs[1], &outs[2]);
    assert_eq!(a.h, a.ce_old - a.ce_new);
    assert_eq!(a.h_used, a.h, "no baseline: h is used as it is");
    assert_eq!(b.h, -a.h, "new_minus_old negates h");
    let b_new = 0.1 + 0.25 * (base.h - 0.1);
    assert!((base.baseline - b_new).abs() < 1e-15 && (base.h_used - (base.h - b_new)).abs() < 1e-15);
    // The reduction hook sees CE_old, CE_new and the row count, and its sums are used.
    let mut t = net(&be, d, c, sgd(0.1), 1);
    let mut s = net(&be, d, c, sgd(0.5), 2);
    let b = MplBatch {
        teacher: &be.upload(&r.teacher),
        teacher_labeled: true,
        teacher_weak: false,
        student_labeled: &be.upload(&r.labeled),
        student_unlabeled: &be.upload(&r.unlabeled),
        labels: &r.labels,
        n_u: 10,
    };
    let set = settings(HSign::OldMinusNew, None);
    // A second "rank" with the same sums: the means do not change.
    let out = mpl::step(
        &be,
        &mut t,
        &mut s,
        &b,
        &set,
        &mut MplState::default(),
        &plan(0.1, 0.5),
        &Alone,
        &mut |v| {
            assert_eq!(v.len(), 3);
            assert_eq!(v[2], 6.0);
            v.iter_mut().for_each(|x| *x *= 2.0);
        },
    );
    assert!((out.h - a.h).abs() < 1e-12, "{} vs {}", out.h, a.h);
}

/// Two interleaving half circles with Gaussian noise; labels 0 and 1.
fn moons(rng: &mut Rng, n: usize, noise: f64) -> (Vec<f32>, Vec<i32>) {
    let mut x = Vec::with_capacity(2 * n);
    let mut y = Vec::with_capacity(n);
    for i in 0..n {
        let t = std::f64::consts::PI * rng.uniform();
        let c = (i % 2) as i32;
        let (a, b) = if c == 0 { (t.cos(), t.sin()) } else { (1.0 - t.cos(), 0.5 - t.sin()) };
        let g = |rng: &mut Rng| {
            // Box–Muller.
            let (u1, u2) = (rng.uniform().max(1e-12), rng.uniform());
            (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
        };
        x.push((a + noise * g(rng) - 0.5) as f32);
        x.push((b + noise * g(rng) - 0.25) as f32);
        y.push(c);
    }
    (x, y)
}

fn accuracy(be: &Be, n: &mut DenseNet<Be>, x: &[f32], y: &[i32]) -> f64 {
    let z = n.forward(be, &be.upload(x), y.len(), None).clone();
    let right = z.chunks(2).zip(y).filter(|(z, &y)| (if z[1] > z[0] { 1 } else { 0 }) == y).count();
    right as f64 / y.len() as f64
}

/// Trains `n` on the rows `x` with targets `y` (full batch) for `steps` steps.
fn fit(be: &Be, n: &mut DenseNet<Be>, x: &[f32], y: &[i32], steps: usize) {
    for _ in 0..steps {
        mpl::finetune(be, n, &be.upload(x), y, 0.0, n.opt.cfg.lr, None, &Alone);
    }
}

/// The demonstration. It does not hold yet: the student tracks its teacher within a
/// point, and the teacher's change comes from its labeled loss far more than from h (see
/// docs/results.md, "Meta Pseudo Labels"). Run it with `cargo test --release --test mpl --
/// --ignored --nocapture` to see the figures. Also tried (2026-11-25), no better: random
/// batches of 32 unlabeled points for 3,000 steps, the same without the teacher's labeled
/// loss (h alone moves it), and batches of 16 for 4,000 steps at teacher lr 0.003; in
/// each the student ends within a point of its teacher, 1 or 2 of 5 seeds beat
/// pseudo-labelling by 2 points, and seed 2's teacher drifts down to about 0.62.
#[test]
#[ignore = "MPL does not yet beat pseudo-labelling from the same bad teacher on two moons (issue 6)"]
fn on_two_moons_mpl_beats_pseudo_labels_from_the_same_bad_teacher() {
    let be = Be::new();
    let mut wins = 0;
    let seeds = 5;
    let mut report = Vec::new();
    for seed in 0..seeds {
        let mut rng = Rng::new(100 + seed);
        let (xl, yl) = moons(&mut rng, 6, 0.05);
        let (xu, yu) = moons(&mut rng, 512, 0.1);
        let (xt, yt) = moons(&mut rng, 1000, 0.1);
        let wide = |s| DenseNet::new(&be, 2, &[32, 32], 2, Activation::Tanh, 0.0, false, adam(0.01), s);
        // A deliberately bad teacher: fitted to a straight boundary (the sign of the second
        // coordinate), which cuts off both moons' tips.
        let mut teacher = wide(seed * 10 + 1);
        let line: Vec<i32> = xu.chunks(2).map(|p| i32::from(p[1] < 0.0)).collect();
        fit(&be, &mut teacher, &xu, &line, 150);
        let teacher_acc = accuracy(&be, &mut teacher, &xt, &yt);
        let pl_targets: Vec<i32> = {
            let z = teacher.forward(&be, &be.upload(&xu), yu.len(), None).clone();
            z.chunks(2).map(|z| i32::from(z[1] > z[0])).collect()
        };
        // Pseudo-labelling: a student fitted to the fixed teacher's hard labels.
        let mut pl = wide(seed * 10 + 2);
        fit(&be, &mut pl, &xu, &pl_targets, 400);
        let pl_acc = accuracy(&be, &mut pl, &xt, &yt);
        // MPL from the same teacher and student initialisation.
        let mut t = teacher;
        let mut s = wide(seed * 10 + 2);
        let mut state = MplState::default();
        let set = MplSettings { baseline_rate: Some(0.01), ..settings(HSign::OldMinusNew, Some(0.01)) };
        let (xl_b, xu_b) = (be.upload(&xl), be.upload(&xu));
        let t_in = be.upload(&[xl.clone(), xu.clone()].concat());
        for k in 0..400u64 {
            let noise = Some(DropoutKey { seed, step: k, site: 0, pass: 0, rows: RowMap::at(0) });
            let b = MplBatch {
                teacher: &t_in,
                teacher_labeled: true,
                teacher_weak: false,
                student_labeled: &xl_b,
                student_unlabeled: &xu_b,
                labels: &yl,
                n_u: yu.len(),
            };
            let p = StepPlan { teacher_noise: noise, student_noise: noise, ..plan(0.01, 0.01) };
            mpl::step(&be, &mut t, &mut s, &b, &set, &mut state, &p, &Alone, &mut |_| {});
        }
        let mpl_acc = accuracy(&be, &mut s, &xt, &yt);
        let t_acc = accuracy(&be, &mut t, &xt, &yt);
        report.push(format!(
            "seed {seed}: teacher {teacher_acc:.3} → {t_acc:.3} after MPL; students: pseudo-labels {pl_acc:.3}, MPL {mpl_acc:.3}"
        ));
        wins += usize::from(mpl_acc > pl_acc + 0.02);
    }
    eprintln!("{}", report.join("\n"));
    assert!(
        wins >= 4,
        "MPL's student beat pseudo-labelling on {wins} of {seeds} seeds:\n{}",
        report.join("\n")
    );
}
