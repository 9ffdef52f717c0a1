//! Classification metrics from predicted probabilities: accuracy, macro-F1, per-class
//! precision/recall/F1, the confusion matrix, expected calibration error, mean loss; as
//! readable text and as JSON.

use std::fmt::Write as _;

use serde::Serialize;

/// Calibration bins of the expected calibration error (equal-width in confidence).
pub const ECE_BINS: usize = 15;

/// One class's figures.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassStats {
    pub label: String,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    /// Documents whose true label is this class.
    pub support: u64,
    /// Documents predicted as this class.
    pub predicted: u64,
}

impl ClassStats {
    /// Whether the split neither holds nor predicts the class: its figures are undefined,
    /// and it is left out of macro-F1.
    pub fn absent(&self) -> bool {
        self.support == 0 && self.predicted == 0
    }
}

/// The evaluation of one split.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EvalReport {
    /// The split evaluated.
    pub split: String,
    /// Documents evaluated (those with a label).
    pub documents: u64,
    pub accuracy: f64,
    /// Mean of the per-class F1 over classes with support or predictions.
    pub macro_f1: f64,
    /// Mean cross-entropy −log p_y.
    pub loss: f64,
    /// Expected calibration error over [`ECE_BINS`] confidence bins.
    pub ece: f64,
    pub per_class: Vec<ClassStats>,
    /// `confusion[true][predicted]`; empty above [`MAX_CONFUSION_CLASSES`] classes.
    pub confusion: Vec<Vec<u64>>,
}

/// The most classes whose confusion matrix an evaluation keeps (C² counts: 2 MiB here;
/// 30,000 classes would need 7 GB). Above it the report has per-class figures only.
pub const MAX_CONFUSION_CLASSES: usize = 512;

/// Accumulates predictions, then computes an [`EvalReport`].
#[derive(Debug, Clone)]
pub struct Accumulator {
    classes: usize,
    /// Per class: documents of it predicted right, documents of it, documents predicted as it.
    right: Vec<u64>,
    support: Vec<u64>,
    predicted: Vec<u64>,
    /// Kept up to [`MAX_CONFUSION_CLASSES`] classes.
    confusion: Vec<Vec<u64>>,
    loss_sum: f64,
    n: u64,
    bin_count: [u64; ECE_BINS],
    bin_conf: [f64; ECE_BINS],
    bin_correct: [u64; ECE_BINS],
}

impl Accumulator {
    /// An empty accumulator for `classes` classes.
    pub fn new(classes: usize) -> Self {
        Accumulator {
            classes,
            right: vec![0; classes],
            support: vec![0; classes],
            predicted: vec![0; classes],
            confusion: if classes <= MAX_CONFUSION_CLASSES {
                vec![vec![0; classes]; classes]
            } else {
                Vec::new()
            },
            loss_sum: 0.0,
            n: 0,
            bin_count: [0; ECE_BINS],
            bin_conf: [0.0; ECE_BINS],
            bin_correct: [0; ECE_BINS],
        }
    }

    /// Adds one document: its probabilities (length `classes`) and true label.
    pub fn add(&mut self, probs: &[f32], label: usize) {
        let (pred, conf) =
            probs
                .iter()
                .enumerate()
                .fold((0, f32::NEG_INFINITY), |best, (c, &p)| if p > best.1 { (c, p) } else { best });
        self.right[label] += u64::from(pred == label);
        self.support[label] += 1;
        self.predicted[pred] += 1;
        if let Some(row) = self.confusion.get_mut(label) {
            row[pred] += 1;
        }
        self.loss_sum += -(f64::from(probs[label]).max(1e-30)).ln();
        self.n += 1;
        let bin = ((f64::from(conf) * ECE_BINS as f64) as usize).min(ECE_BINS - 1);
        self.bin_count[bin] += 1;
        self.bin_conf[bin] += f64::from(conf);
        self.bin_correct[bin] += u64::from(pred == label);
    }

    /// The report; `labels` names the classes.
    pub fn report(&self, split: &str, labels: &[String]) -> EvalReport {
        let n = self.n.max(1) as f64;
        let correct: u64 = self.right.iter().sum();
        let mut per_class = Vec::new();
        let mut f1_sum = 0.0;
        let mut f1_count = 0;
        for (c, label) in labels.iter().enumerate().take(self.classes) {
            let (tp, support, predicted) = (self.right[c] as f64, self.support[c], self.predicted[c]);
            let precision = if predicted > 0 { tp / predicted as f64 } else { 0.0 };
            let recall = if support > 0 { tp / support as f64 } else { 0.0 };
            let f1 =
                if precision + recall > 0.0 { 2.0 * precision * recall / (precision + recall) } else { 0.0 };
            let stats = ClassStats { label: label.clone(), precision, recall, f1, support, predicted };
            if !stats.absent() {
                f1_sum += f1;
                f1_count += 1;
            }
            per_class.push(stats);
        }
        let ece = (0..ECE_BINS)
            .filter(|&b| self.bin_count[b] > 0)
            .map(|b| {
                let k = self.bin_count[b] as f64;
                (k / n) * (self.bin_conf[b] / k - self.bin_correct[b] as f64 / k).abs()
            })
            .sum();
        EvalReport {
            split: split.to_owned(),
            documents: self.n,
            accuracy: correct as f64 / n,
            macro_f1: if f1_count > 0 { f1_sum / f1_count as f64 } else { 0.0 },
            loss: self.loss_sum / n,
            ece,
            per_class,
            confusion: self.confusion.clone(),
        }
    }
}

impl EvalReport {
    /// The report as readable text: headline figures, a per-class table, the confusion
    /// matrix (rows: true class, columns: predicted, by class number).
    pub fn to_text(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(
            s,
            "{}: {} documents   accuracy {:.4}   macro-F1 {:.4}   loss {:.4}   ECE {:.4}",
            self.split, self.documents, self.accuracy, self.macro_f1, self.loss, self.ece
        );
        let w = crate::data::manifest::label_width(self.per_class.iter().map(|c| c.label.as_str()), 5);
        let _ = writeln!(
            s,
            "  {:>3} {:<w$} {:>9} {:>9} {:>9} {:>8}",
            "#", "class", "precision", "recall", "F1", "support"
        );
        for (i, c) in self.per_class.iter().enumerate() {
            if c.absent() {
                // Not in the split and never predicted: no figure (and not in macro-F1).
                let _ = writeln!(s, "  {i:>3} {:<w$} {:>9} {:>9} {:>9} {:>8}", c.label, "-", "-", "-", 0);
                continue;
            }
            let _ = writeln!(
                s,
                "  {i:>3} {:<w$} {:>9.4} {:>9.4} {:>9.4} {:>8}",
                c.label, c.precision, c.recall, c.f1, c.support
            );
        }
        if self.confusion.is_empty() {
            let _ = writeln!(
                s,
                "  confusion matrix not kept: {} classes (it is kept up to {MAX_CONFUSION_CLASSES})",
                self.per_class.len()
            );
            return s;
        }
        let _ = writeln!(s, "  confusion matrix (row: true class #, column: predicted class #)");
        let cw = self.confusion.iter().flatten().max().map_or(1, |m| m.to_string().len()).max(3);
        let _ = write!(s, "  {:>3} ", "");
        for c in 0..self.confusion.len() {
            let _ = write!(s, " {c:>cw$}");
        }
        let _ = writeln!(s);
        for (t, row) in self.confusion.iter().enumerate() {
            let _ = write!(s, "  {t:>3} ");
            for v in row {
                let _ = write!(s, " {v:>cw$}");
            }
            let _ = writeln!(s);
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_of_a_small_example() {
        let labels: Vec<String> = ["a", "b", "c"].iter().map(|s| s.to_string()).collect();
        let mut acc = Accumulator::new(3);
        // true a: predicted a, a, b; true b: b; true c: a.
        acc.add(&[0.9, 0.05, 0.05], 0);
        acc.add(&[0.6, 0.3, 0.1], 0);
        acc.add(&[0.2, 0.7, 0.1], 0);
        acc.add(&[0.1, 0.8, 0.1], 1);
        acc.add(&[0.5, 0.25, 0.25], 2);
        let r = acc.report("test", &labels);
        assert_eq!(r.documents, 5);
        assert!((r.accuracy - 0.6).abs() < 1e-12);
        assert_eq!(r.confusion, vec![vec![2, 1, 0], vec![0, 1, 0], vec![1, 0, 0]]);
        // a: P 2/3, R 2/3, F1 2/3; b: P 1/2, R 1, F1 2/3; c: 0.
        assert!((r.per_class[0].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert!((r.per_class[1].precision - 0.5).abs() < 1e-12);
        assert!((r.per_class[1].f1 - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(r.per_class[2].f1, 0.0);
        assert!((r.macro_f1 - 4.0 / 9.0).abs() < 1e-12);
        let loss = -(0.9f64.ln() + 0.6f64.ln() + 0.2f64.ln() + 0.8f64.ln() + 0.25f64.ln()) / 5.0;
        assert!((r.loss - loss).abs() < 1e-6);
        // ECE: bins of confidence 0.9 (1 doc, correct), 0.6 (correct), 0.7 (wrong), 0.8 (correct),
        // 0.5 (wrong); each bin alone: |conf − acc| weighted by 1/5.
        let ece = (0.1 + 0.4 + 0.7 + 0.2 + 0.5) / 5.0;
        assert!((r.ece - ece).abs() < 1e-6, "{}", r.ece);
        let text = r.to_text();
        assert!(text.contains("accuracy 0.6000") && text.contains("confusion matrix"));
        // A fourth class neither held nor predicted: dashes, and macro-F1 as before.
        let labels4: Vec<String> = ["a", "b", "c", "d"].iter().map(|s| s.to_string()).collect();
        let mut acc4 = Accumulator::new(4);
        for (p, y) in [([0.9, 0.05, 0.05, 0.0], 0), ([0.1, 0.8, 0.1, 0.0], 1), ([0.5, 0.25, 0.25, 0.0], 2)] {
            acc4.add(&p, y);
        }
        let r4 = acc4.report("test", &labels4);
        assert!(r4.per_class[3].absent() && !r4.per_class[2].absent());
        // a: P 1/2, R 1, F1 2/3; b: 1; c: 0; d left out.
        assert!((r4.macro_f1 - (2.0 / 3.0 + 1.0 + 0.0) / 3.0).abs() < 1e-12, "{}", r4.macro_f1);
        let line = r4.to_text().lines().find(|l| l.contains(" d ")).unwrap().to_string();
        assert!(line.contains(" - ") && !line.contains("0.0000"), "{line}");
    }

    /// Past [`MAX_CONFUSION_CLASSES`] classes no C × C matrix is allocated; the per-class
    /// figures are the same as with it.
    #[test]
    fn many_classes_keep_per_class_figures_without_the_matrix() {
        let c = MAX_CONFUSION_CLASSES + 1;
        let labels: Vec<String> = (0..c).map(|i| format!("k{i}")).collect();
        let mut acc = Accumulator::new(c);
        assert!(acc.confusion.is_empty());
        let one_hot =
            |k: usize| (0..c).map(|i| if i == k { 0.9 } else { 0.1 / c as f32 }).collect::<Vec<f32>>();
        // True 0 predicted 0 and 1; true 1 predicted 1; true c-1 predicted 0.
        acc.add(&one_hot(0), 0);
        acc.add(&one_hot(1), 0);
        acc.add(&one_hot(1), 1);
        acc.add(&one_hot(0), c - 1);
        let r = acc.report("test", &labels);
        assert!(r.confusion.is_empty());
        assert!((r.accuracy - 0.5).abs() < 1e-12);
        assert_eq!((r.per_class[0].support, r.per_class[c - 1].support), (2, 1));
        assert!(
            (r.per_class[0].precision - 0.5).abs() < 1e-12 && (r.per_class[0].recall - 0.5).abs() < 1e-12
        );
        assert!((r.per_class[1].precision - 0.5).abs() < 1e-12 && r.per_class[1].recall == 1.0);
        assert!(r.to_text().contains(&format!("confusion matrix not kept: {c} classes")));
    }
}
