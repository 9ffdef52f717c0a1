//! Label spreading over sentence vectors (`dtrain propagate`): every row of a data set is
//! embedded (by an encoder, as the mean of its pretrained word vectors, or as TF-IDF
//! weights of its words), linked to its nearest neighbours, and the labeled rows' labels
//! are spread over that graph; the unlabeled split's result is written as a logits file,
//! the targets of `method = "noisy_student"`.
//!
//! # Definition
//! Zhou et al.'s label spreading (2004) on a k-nearest-neighbour graph of cosine
//! similarities raised to γ = 3 (Iscen et al., "Label Propagation for Deep Semi-supervised
//! Learning", 2019):
//! - `v_i` = row i's vector divided by its norm, for every row of the train, unlabeled, val
//!   and test splits, in each view ([`Vectors`]): an encoder's pooled vector (no dropout),
//!   or the mean of the pretrained skip-gram vectors of the row's words that pretraining
//!   trained (a row with none has no vector in that view), or a bag model's pooled embedding
//!   (`Vectors::BagModel`: the mean of its table's rows over the row's feature ids, what its
//!   dense stack reads; e.g. a student of earlier spread labels, one round of Iscen et al.'s
//!   alternation), or the sparse TF-IDF vector of
//!   the row's words (punctuation is no word) over all rows of all splits
//!   (`Vectors::Tfidf`: weight
//!   `(1 + ln tf)·(ln((1 + n)/(1 + df)) + 1)` for a word `tf` times in the row and in `df`
//!   of the n rows, words of fewer than [`TFIDF_MIN_ROWS`] rows left out). Only the train
//!   split's labels seed the graph; val's choose the settings; test's and the hidden labels
//!   are only measured.
//! - A [`Shift`] of each dense view's unit vectors, then unit length again: none, minus their
//!   mean (`centre`), or minus their component along the top singular direction `u` of the
//!   n×H matrix of rows (`drop-top`: `v_i − (v_i·u)u`; power iteration, whose failure to
//!   settle within 1000 steps is reported). A row left with nothing has no vector (the run
//!   prints how many). TF-IDF vectors are never shifted (their weights already discount
//!   the words every row has); with TF-IDF views alone the grid has no shift. With m views
//!   of weights `w_v` summing to 1 ([`Weights`], `--weights`, divided by their sum; 1/m
//!   each by default), a row's vector is its views' side by side, each times `√w_v`, so
//!   `v_i·v_j = Σ_v w_v cos_v(i, j)`, the weighted mean of the views' cosines (0 where a view
//!   has no vector; the sparse views' dot products, times their weights, are added to the
//!   dense ones' in the search). A row with no vector has no edge; only its own label, if it
//!   is a training row, reaches it.
//! - `N_k(i)`: the k rows j ≠ i of largest `v_i·v_j` ([`Search::Exact`], the default), or of
//!   largest `v_i·v_j` among row i's candidates in an inverted file of k-means cells
//!   ([`Search::Cells`], `--search cells`: approximate; [`crate::knn`] defines it, and the run
//!   reports its recall). `A_ij = max(0, v_i·v_j)^γ`
//!   for j in `N_k(i)`, else 0; `W = A + Aᵀ`; `S = D^-½ W D^-½` with `D = diag(W 1)`.
//! - `Y_ic = 1/n_c` for a labeled training row of class c (n_c such rows), else 0.
//! - `F = (1 − α)(I − α S)⁻¹ Y`, solved column by column by conjugate gradients (`I − αS` is
//!   symmetric positive definite for α in (0, 1); α is at most 0.999) to a relative
//!   residual of 1e-6 within 1000 iterations; a setting that does not get there is reported
//!   and never chosen.
//! - Row i's probabilities `p_i = F_i / Σ_c F_ic` (negative round-off clipped to 0).
//! - Class-mass alignment (Zhu, Ghahramani and Lafferty's class mass normalisation, 2003;
//!   ReMixMatch's distribution alignment): with power `a` (`--align`), row i's
//!   probabilities become `q_ic = p_ic w_c / Σ_c' p_ic' w_c'` with `w_c = (π_c / m_c)^a`,
//!   where `π` is the class prior and `m_c` the mean of `p_ic` over the rows that are not
//!   training rows and that a label reaches (a class of no mass has nothing to scale; the
//!   weights are taken relative to the largest, in logarithms, so none overflows). `a = 0`
//!   is plain spreading, `q = p`. `Y` gives every class the same total mass, so where the
//!   classes' frequencies differ, spreading favours the rare ones; alignment moves each
//!   class's mean probability towards its prior share (to it exactly at `a = 1` only where
//!   the rows agree). `π` ([`ClassPrior`]) is the label frequencies of the val split (a
//!   random sample of every class in `prepare`'s splits) or of the training split, each
//!   count plus one. With the val prior, val's labels serve twice, for π and for choosing
//!   `a`: val accuracy then flatters the aligned settings a little, and test accuracy is
//!   the check.
//! - Row i's logits `ln max(q_ic, 1e-6)`, whose softmax gives `q_i` back up to that floor. A
//!   row that no labeled row reaches (a piece of the graph without one) gets 1/C each: its
//!   argmax says nothing, it counts as wrong in val and test accuracy, the run prints how
//!   many there are, and Noisy Student skips it at any `consistency.threshold` above 1/C.
//! - Every (weights, shift, k, α, a) of the grid is tried; the one of highest val accuracy
//!   (argmax q) wins, the first in grid order on a tie. With no val rows the grid must hold one
//!   setting.
//!
//! # Cost
//! The exact neighbour search: n²·H multiply-adds for n rows of width H (15.6k rows of
//! MiniLM's 384 take seconds; with one skip-gram view, 216k rows took 177 s on 2 cores and a
//! million had not finished after 76 minutes: bench/results/propagate-cells.md). By cells, about `probes/cells` of that,
//! more where the cells' sizes differ ([`crate::knn`]'s cost; a million rows in 73 s with
//! 16 probes). A TF-IDF view adds
//! Σ_w df_w² multiply-adds for each (weights, shift) of the grid to the exact search (about
//! 1.2·10⁹ for Brown's 15.6k paragraphs), and to the search by cells the entries of every
//! candidate's row; its vectors two copies of its entries (by row and by word; four while they
//! are built). The vectors take n·H floats (twice, while a shifted copy is searched), the
//! graph 2·n·k edges; each (weights, shift) of the grid searches once, a view of weight 0
//! included (leave such a view out instead). The encoder runs on the
//! `--device` backend, the rest on the CPU.

use std::path::Path;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use rayon::prelude::*;

use crate::backend::EncoderOps;
use crate::data::dataset::Dataset;
use crate::data::shard::{DocLimits, Shard, SplitKind};
use crate::error::{Error, Result};
pub use crate::knn::Search;
use crate::knn::{has_vector, Candidates, CellsReport};
use crate::logits::ExportReport;
use crate::model::bag::BagModel;
use crate::model::encoder::{Encoder, EncoderActs, TokenBatch};
use crate::pretrain::embeddings::Embeddings;
use crate::rowvec::RowVectors;

/// The edges' similarity exponent γ.
pub const GAMMA: i32 = 3;
/// The floor under a probability before its logarithm.
const FLOOR: f32 = 1e-6;
/// Conjugate gradients stop at this residual, relative to the right-hand side's norm.
const TOLERANCE: f64 = 1e-6;
const MAX_ITERS: usize = 1000;

/// The probabilities at which [`Report::val_by_confidence`] counts val rows.
pub const VAL_THRESHOLDS: [f64; 6] = [0.2, 0.3, 0.4, 0.5, 0.6, 0.8];

/// What `propagate` is asked to do.
#[derive(Debug, Clone)]
pub struct Options {
    /// Neighbour counts to try (each at least 1).
    pub ks: Vec<usize>,
    /// Spreading strengths to try (each in (0, 1)).
    pub alphas: Vec<f64>,
    /// What to do to the vectors before the search, to try (each once).
    pub shifts: Vec<Shift>,
    /// Class-mass alignment powers to try (each in [0, 2]; 0 is none).
    pub aligns: Vec<f64>,
    /// Where the alignment's class prior comes from.
    pub prior: ClassPrior,
    /// The views' weights in the graph's similarity to try, one [`Weights`] per setting (each
    /// as many as the views); none: every view weighs the same.
    pub weights: Vec<Weights>,
    /// How the neighbours are searched: exactly, or among k-means cells.
    pub search: Search,
    /// Documents per encoder batch.
    pub batch_size: usize,
    pub progress: bool,
}

/// The views' weights in the graph's similarity, in the order of the views (`propagate`'s
/// --model views, then --tfidf): two rows' similarity is `Σ_v w_v cos_v / Σ_v w_v`. Each
/// weight is finite and at least 0, one at least above 0.
#[derive(Debug, Clone, PartialEq)]
pub struct Weights(pub Vec<f64>);

impl Weights {
    /// What makes these no weighting: a weight that is not finite or below 0, or none above 0.
    fn problem(&self) -> Option<String> {
        if let Some(x) = self.0.iter().find(|x| !(x.is_finite() && **x >= 0.0)) {
            return Some(format!(
                "a view's weight must be finite and at least 0, not {}",
                crate::error::number(*x)
            ));
        }
        (!self.0.iter().any(|&x| x > 0.0)).then(|| "at least one view's weight must be above 0".to_string())
    }

    /// The weights divided by their sum (taken relative to the largest first, so that
    /// no sum of finite weights overflows).
    fn normalised(&self) -> Vec<f64> {
        let largest = self.0.iter().fold(0f64, |a, &w| a.max(w));
        let sum: f64 = self.0.iter().map(|w| w / largest).sum();
        self.0.iter().map(|w| w / largest / sum).collect()
    }

    /// The weights as `--weights` takes them.
    pub fn name(&self) -> String {
        self.0.iter().map(|&w| crate::error::number(w)).collect::<Vec<_>>().join(",")
    }
}

impl std::str::FromStr for Weights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Weights, String> {
        let mut w = Vec::new();
        for part in s.split(',') {
            let x: f64 = part.trim().parse().map_err(|_| {
                format!("`{part}` in `{s}`: expected a number (one weight per view, comma-separated)")
            })?;
            w.push(x);
        }
        let w = Weights(w);
        w.problem().map_or(Ok(w), |p| Err(format!("`{s}`: {p}")))
    }
}

/// What is done to the unit vectors before the neighbour search. Vectors that share a large
/// common component (averaged word vectors, and to a lesser degree an encoder's) are all
/// similar to each other by cosine, and that component, not the topic, decides who is whose
/// neighbour; taking it out leaves the differences. Each option is a setting of the grid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shift {
    /// The vectors as they are.
    Raw,
    /// Subtract the mean of the rows (those with a vector), then back to unit length.
    Centre,
    /// Take out every row's component along the rows' top singular direction (uncentred; the
    /// common direction of Arora et al.'s SIF embeddings, 2017), then back to unit length.
    DropTop,
}

impl Shift {
    pub const ALL: [Shift; 3] = [Shift::Raw, Shift::Centre, Shift::DropTop];

    /// The name `--shift` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            Shift::Raw => "raw",
            Shift::Centre => "centre",
            Shift::DropTop => "drop-top",
        }
    }

    /// Applies the shift to `v` (unit rows of width `h`; all-zero rows have no vector and
    /// stay so); returns what it did.
    fn apply(self, v: &mut [f32], h: usize) -> Shifted {
        match self {
            Shift::Raw => Shifted::default(),
            Shift::Centre => {
                let (mut mean, mut n) = (vec![0f64; h], 0usize);
                for row in v.chunks(h).filter(|r| has_vector(r)) {
                    n += 1;
                    for (m, &x) in mean.iter_mut().zip(row) {
                        *m += f64::from(x);
                    }
                }
                mean.iter_mut().for_each(|m| *m /= n.max(1) as f64);
                let emptied = subtract_and_renormalise(v, h, |row, out| {
                    for ((o, &x), m) in out.iter_mut().zip(row).zip(&mean) {
                        *o = f64::from(x) - m;
                    }
                });
                Shifted { emptied, unconverged: false }
            }
            Shift::DropTop => {
                let Some((u, converged)) = top_direction(v, h) else {
                    return Shifted::default();
                };
                let emptied = subtract_and_renormalise(v, h, |row, out| {
                    let d: f64 = row.iter().zip(&u).map(|(&x, &y)| f64::from(x) * y).sum();
                    for ((o, &x), y) in out.iter_mut().zip(row).zip(&u) {
                        *o = f64::from(x) - d * y;
                    }
                });
                Shifted { emptied, unconverged: !converged }
            }
        }
    }
}

/// The split whose label frequencies (each plus one) are the class prior of the class-mass
/// alignment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClassPrior {
    /// The val split's: `prepare` draws it at random from every class, so its frequencies
    /// are the corpus's, also where the training split holds the same number of each class.
    Val,
    /// The training split's: the corpus's where its labels were a random sample.
    Train,
}

impl ClassPrior {
    /// The name `--class-prior` takes and reports print.
    pub fn name(self) -> &'static str {
        match self {
            ClassPrior::Val => "val",
            ClassPrior::Train => "train",
        }
    }

    fn split(self) -> SplitKind {
        match self {
            ClassPrior::Val => SplitKind::Val,
            ClassPrior::Train => SplitKind::Train,
        }
    }
}

impl std::str::FromStr for ClassPrior {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<ClassPrior, String> {
        [ClassPrior::Val, ClassPrior::Train]
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("`{s}`: expected val or train"))
    }
}

/// What a [`Shift`] did to the rows of the views it moved.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Shifted {
    /// Rows it left with nothing (all common part): they lose their vector in that view.
    pub emptied: usize,
    /// Whether `drop-top`'s power iteration stopped at its limit before the top singular
    /// direction settled (the top two singular values nearly equal): it took out a mix of
    /// the two directions.
    pub unconverged: bool,
}

impl Shifted {
    fn and(self, other: Shifted) -> Shifted {
        Shifted { emptied: self.emptied + other.emptied, unconverged: self.unconverged || other.unconverged }
    }
}

impl std::str::FromStr for Shift {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Shift, String> {
        Shift::ALL
            .into_iter()
            .find(|x| x.name() == s)
            .ok_or_else(|| format!("`{s}`: expected raw, centre or drop-top"))
    }
}

/// Where a graph row comes from, and the labels it may be measured against.
#[derive(Debug, Clone, Copy)]
struct Row {
    split: SplitKind,
    /// The label: a training row's seeds the graph; val's and test's are measured; an
    /// unlabeled row's hidden label (a simulated split) is measured.
    label: Option<u32>,
}

/// One setting of the grid and its val accuracy (`None` without val rows).
#[derive(Debug, Clone, PartialEq)]
pub struct Setting {
    /// The views' weights (as given; every view 1 without `Options::weights`).
    pub weights: Weights,
    pub shift: Shift,
    pub k: usize,
    pub alpha: f64,
    /// The class-mass alignment's power (0: none).
    pub align: f64,
    pub val_accuracy: Option<f64>,
    /// Conjugate-gradient iterations taken (the most over the classes).
    pub iterations: usize,
    /// Whether every class column reached the residual; a setting that did not is never
    /// chosen.
    pub converged: bool,
    /// Rows that no labeled row reaches (uniform probabilities).
    pub unreached: usize,
}

/// What `propagate` measured and wrote.
#[derive(Debug, Clone)]
pub struct Report {
    /// Rows in the graph, by split: train, val, test, unlabeled.
    pub rows: [usize; 4],
    pub grid: Vec<Setting>,
    /// The index in `grid` of the setting written.
    pub chosen: usize,
    /// Test accuracy of the chosen setting (transductive: the test rows were graph nodes,
    /// their labels unread), where the test split has rows.
    pub test_accuracy: Option<f64>,
    /// Val rows of the chosen setting at or above each probability of [`VAL_THRESHOLDS`]:
    /// (threshold, rows, right among them). Spreading's probabilities are flatter than a
    /// classifier's softmax, so this table, not a classifier's habits, is what should pick
    /// Noisy Student's `consistency.threshold`.
    pub val_by_confidence: Vec<(f64, usize, usize)>,
    /// The unlabeled split's logits file, as `export-logits` measures it.
    pub export: ExportReport,
    pub embed_seconds: f64,
    pub search_seconds: f64,
    /// Per view, the rows that got no vector (a bag of words none of which pretraining
    /// trained; for TF-IDF, no word found in [`TFIDF_MIN_ROWS`] rows or more); with one
    /// view, no edge reaches them.
    pub without_vector: Vec<usize>,
    /// What each shift of the grid did (summed over the views it moved).
    pub shifted: Vec<(Shift, Shifted)>,
    /// With `Search::Cells`, each (weights, shift) of the grid's search.
    pub searches: Vec<(Weights, Shift, Searched)>,
    /// The class names, in the order of `prior` and `shares`.
    pub labels: Vec<String>,
    /// The class-mass alignment's prior π (sums to 1).
    pub prior: Vec<f64>,
    /// Each class's share of the argmaxes of the rows that are not training rows and that a
    /// label reaches: (with the chosen setting's shift, k and α unaligned, the chosen
    /// setting).
    pub shares: Vec<(f64, f64)>,
}

/// Checks the grid before anything runs.
pub fn check_options(o: &Options) -> Result<()> {
    if o.ks.is_empty() || o.alphas.is_empty() || o.shifts.is_empty() || o.aligns.is_empty() {
        return Err(Error::Data("--k, --alpha, --shift and --align each need at least one value".into()));
    }
    if let Some(s) = repeated(&o.shifts) {
        return Err(Error::Data(format!("--shift {}: given twice", s.name())));
    }
    if let Some(a) = o.aligns.iter().find(|&&a| !(0.0..=2.0).contains(&a)) {
        return Err(Error::Data(format!(
            "--align {a}: must be in [0, 2] (0: no alignment; 1: each class's mass scaled to its prior share)"
        )));
    }
    if let Some(a) = repeated(&o.aligns) {
        return Err(Error::Data(format!("--align {a}: given twice")));
    }
    if let Some(k) = o.ks.iter().find(|&&k| !(1..=1000).contains(&k)) {
        return Err(Error::Data(format!("--k {k}: must be in 1..=1000")));
    }
    if let Some(a) = o.alphas.iter().find(|&&a| !(a > 0.0 && a <= 0.999)) {
        return Err(Error::Data(format!(
            "--alpha {a}: must be in (0, 0.999] (nearer 1 the solve needs ever more iterations)"
        )));
    }
    if let Some(k) = repeated(&o.ks) {
        return Err(Error::Data(format!("--k {k}: given twice")));
    }
    if let Some(a) = repeated(&o.alphas) {
        return Err(Error::Data(format!("--alpha {a}: given twice")));
    }
    check_batch_size(o.batch_size)?;
    o.search.check()
}

/// Checks the documents per encoder batch (`--batch-size`).
pub fn check_batch_size(b: usize) -> Result<()> {
    if !(1..=1 << 16).contains(&b) {
        return Err(Error::Data(format!("--batch-size {b}: must be in 1..=65536")));
    }
    Ok(())
}

/// The first value of `xs` that an earlier one equals.
fn repeated<T: PartialEq>(xs: &[T]) -> Option<&T> {
    xs.iter().enumerate().find(|(i, x)| xs[..*i].contains(x)).map(|(_, x)| x)
}

/// Where one view of the rows' vectors comes from.
pub enum Vectors<'a> {
    /// An encoder's pooled vector (no dropout), on the backend `propagate` is given.
    Encoder { enc: &'a Encoder, params: &'a [f32] },
    /// The mean of the pretrained vectors of the row's words (its word sequence, whatever
    /// the data set's tokenizer: a word's vector is [`Embeddings::vector`], the mean of its
    /// pretraining features); words pretraining did not train are left out, and a row with
    /// none has no vector.
    Bag(&'a Embeddings),
    /// The row's words weighted by TF-IDF over the data set's rows (no model): a sparse
    /// vector that links rows by the words they share, rare words most. Words of fewer
    /// than [`TFIDF_MIN_ROWS`] rows are left out, and a row with none has no vector.
    Tfidf,
    /// A bag model's checkpoint (`model = "bag"`, e.g. a student of spread labels): the row's
    /// pooled embedding, the mean of the table's rows over the row's feature ids, which is
    /// what the model's dense stack reads (no dropout). A row with no id has no vector.
    BagModel { model: &'a BagModel, params: &'a [f32] },
    /// An encoder's or word vectors' view stored by `dtrain embed --data`
    /// ([`crate::rowvec`]): its vectors are read, not made, and the logits file records the
    /// source that embedding afresh would.
    Stored(&'a RowVectors),
}

/// One view of the rows: where its vectors come from, and the data set it reads them from.
pub struct View<'a> {
    pub vectors: Vectors<'a>,
    pub data: &'a Dataset,
}

impl View<'_> {
    /// The width of the view's dense vectors (0 for a TF-IDF view, whose vectors are
    /// sparse).
    pub fn width(&self) -> usize {
        match &self.vectors {
            Vectors::Encoder { enc, .. } => enc.spec.hidden,
            Vectors::Bag(emb) => emb.meta.dim,
            Vectors::BagModel { model, .. } => model.spec.dim,
            Vectors::Tfidf => 0,
            Vectors::Stored(r) => r.meta.width,
        }
    }

    /// The bytes that identify the view in a logits file's source: an encoder's weights and
    /// pooling, the word vectors' weights, TF-IDF's rule, or what a stored view recorded.
    pub fn source(&self) -> Vec<u8> {
        let mut bytes = Vec::new();
        match self.vectors {
            Vectors::Encoder { enc, params } => {
                bytes.extend(crate::logits::params_source(params).to_le_bytes());
                bytes.extend(format!("{:?}", enc.spec.pooling).as_bytes());
            }
            Vectors::Bag(emb) => {
                bytes.extend(crate::logits::params_source(&emb.params).to_le_bytes());
                bytes.extend(b"bag");
            }
            Vectors::BagModel { params, .. } => {
                bytes.extend(crate::logits::params_source(params).to_le_bytes());
                bytes.extend(b"bag model");
            }
            Vectors::Tfidf => {
                bytes.extend(b"tfidf");
                bytes.extend((TFIDF_MIN_ROWS as u64).to_le_bytes());
            }
            Vectors::Stored(r) => bytes.extend(r.source()),
        }
        bytes
    }

    /// Every row's vector in this view (n×[`View::width`], unit length or all zeros), for
    /// `dtrain embed --data` to store: an encoder runs on `be`, batched by length. A TF-IDF
    /// view has no dense vectors, and a stored one is already stored: both are refused.
    pub fn embed_rows<B: EncoderOps<F = f32>>(
        &self,
        be: &B,
        batch_size: usize,
        progress: bool,
    ) -> Result<Vec<f32>> {
        let opts = Options {
            ks: vec![],
            alphas: vec![],
            shifts: vec![],
            aligns: vec![],
            prior: ClassPrior::Val,
            weights: vec![],
            search: Search::Exact,
            batch_size,
            progress,
        };
        if let Vectors::Tfidf | Vectors::Stored(_) = self.vectors {
            return Err(Error::Data(
                "only an encoder's, a bag model's or word vectors' view can be stored".into(),
            ));
        }
        self.check()?;
        Ok(self.vectors_of(be, &opts)?.0)
    }

    /// Refuses a model that cannot read the view's data set: word vectors of words split
    /// otherwise, a bag model of another hashing, stored vectors of other rows.
    fn check(&self) -> Result<()> {
        match self.vectors {
            Vectors::Bag(emb) => check_words_match(self.data, emb),
            Vectors::BagModel { model, .. } => check_buckets(self.data, model),
            Vectors::Stored(r) => r.check_rows(self.data),
            Vectors::Encoder { .. } | Vectors::Tfidf => Ok(()),
        }
    }

    /// Every row's vector in this view ([`rows_of`]'s order): the dense n×width unit (or
    /// zero) vectors, or a TF-IDF view's sparse ones, and how many rows have none.
    fn vectors_of<B: EncoderOps<F = f32>>(
        &self,
        be: &B,
        opts: &Options,
    ) -> Result<(Vec<f32>, Option<Sparse>, usize)> {
        Ok(match self.vectors {
            Vectors::Encoder { enc, params } => (embed(be, enc, params, self.data, opts)?, None, 0),
            Vectors::Bag(emb) => {
                let (vectors, blank) = embed_bag(emb, self.data)?;
                (vectors, None, blank)
            }
            Vectors::BagModel { model, params } => {
                let (vectors, blank) = embed_bag_model(model, params, self.data)?;
                (vectors, None, blank)
            }
            Vectors::Tfidf => {
                let (sparse, blank) = Sparse::tfidf(self.data)?;
                (Vec::new(), Some(sparse), blank)
            }
            Vectors::Stored(r) => (r.vectors.clone(), None, r.meta.blank),
        })
    }
}

/// Refuses a bag model whose table is not indexed by the data set's feature ids.
fn check_buckets(ds: &Dataset, model: &BagModel) -> Result<()> {
    let buckets = ds.manifest().tokenizer.buckets;
    if buckets as usize != model.spec.buckets {
        return Err(Error::Data(format!(
            "{}: the data set hashes its features into {buckets} buckets and the bag model's table has {} rows: prepare it with the model's tokenizer",
            ds.dir().display(),
            model.spec.buckets
        )));
    }
    Ok(())
}

/// Refuses word vectors whose data set split or lowercased words otherwise than `ds`.
fn check_words_match(ds: &Dataset, emb: &Embeddings) -> Result<()> {
    let (a, b) = (&ds.manifest().tokenizer, &emb.meta.tokenizer);
    if a.lowercase != b.lowercase || a.punctuation != b.punctuation {
        return Err(Error::Data(format!(
            "{}: the data set splits or lowercases words otherwise than the embeddings' data (lowercase {} and {}, punctuation {:?} and {:?}), so its words would not be found: prepare it with the same tokenizer.lowercase and tokenizer.punctuation",
            ds.dir().display(),
            a.lowercase,
            b.lowercase,
            a.punctuation,
            b.punctuation
        )));
    }
    Ok(())
}

/// Embeds every row of the first view's data set in every view, spreads the training labels
/// over the rows' neighbour graph for every setting of `opts`' grid, and writes the
/// unlabeled split's probabilities under the setting of best val accuracy to the logits
/// file `out` (and, with `jsonl`, pseudo-label lines). Encoders run on `be`. With several
/// views, their data sets must hold the same rows in the same order (the same input files
/// and split, prepared with each view's tokenizer), and the graph's similarity of two rows
/// is the mean of their cosines in the m views, weighted by each of `opts.weights` in turn
/// (1/m each without): the dense views' unit vectors (each shifted) side by side at √w, the
/// TF-IDF views' dot products added at w. With TF-IDF
/// views alone there is nothing to shift, and the grid's shifts are one (`raw`). The
/// logits file records the views' weights and the grid as its source.
pub fn propagate<B: EncoderOps<F = f32>>(
    be: &B,
    views: &[View],
    out: &Path,
    jsonl: Option<&Path>,
    opts: &Options,
) -> Result<Report> {
    let Some(first) = views.first() else {
        return Err(Error::Data(
            "propagate needs at least one view: a --model and its --data, or --tfidf".into(),
        ));
    };
    let ds = first.data;
    let unshifted;
    let opts = if views.iter().all(|v| matches!(v.vectors, Vectors::Tfidf)) {
        unshifted = Options { shifts: vec![Shift::Raw], ..opts.clone() };
        &unshifted
    } else {
        opts
    };
    for v in views {
        v.check()?;
    }
    let weightings = weightings(opts, views.len())?;
    let rows = check_data(ds, out, jsonl, opts)?;
    for v in &views[1..] {
        check_aligned(ds, v.data)?;
    }
    let k_max = *opts.ks.iter().max().expect("checked: not empty");
    let widths: Vec<usize> =
        views.iter().filter(|v| !matches!(v.vectors, Vectors::Tfidf)).map(View::width).collect();
    if widths.is_empty() && opts.search != Search::Exact {
        return Err(Error::Data(
            "--search cells draws its cells over the --model views' vectors, and there is none: with --tfidf alone the search is exact (leave --search out)".into(),
        ));
    }
    let total: usize = rows.iter().sum();
    let mut b = budget(total, &widths, views.len(), &opts.shifts, k_max, ds.labels().len(), opts.search)?;
    // The TF-IDF views, held from their embedding to the end: per entry (at most one per
    // word of each row) the counted words (8 bytes), the sorted triples (12) and the two
    // compressed copies (16); per row a counted list's header and two starts; per word of
    // the vocabulary its string, starts and count.
    let tfidf: u64 = views
        .iter()
        .filter(|v| matches!(v.vectors, Vectors::Tfidf))
        .map(|v| {
            let entries: u64 = rows_of(v.data).iter().map(|r| r.shard.doc_words(r.index).len() as u64).sum();
            entries * 36 + total as u64 * 40 + v.data.manifest().vocab.words * 52
        })
        .sum();
    if tfidf > 0 {
        b.add("the TF-IDF vectors", tfidf, "--tfidf", "a data set of fewer rows or words");
    }
    // A bag view's word vectors and the data set's words, while that view is embedded.
    let words = views
        .iter()
        .map(|v| match v.vectors {
            Vectors::Bag(emb) => {
                let vocab = v.data.manifest().vocab.words;
                (emb.words.len() as u64) * (emb.meta.dim as u64 * 4 + 48) + vocab * 40
            }
            Vectors::Encoder { .. } | Vectors::BagModel { .. } | Vectors::Tfidf | Vectors::Stored(_) => 0,
        })
        .max()
        .unwrap_or(0);
    if words > 0 {
        b.add("the word vectors", words, "--model", "embeddings of fewer words");
    }
    // Stored views as read (vectors, splits, labels, sample ids), beside their copies. They
    // are already in memory: this counts them, so that what comes next fits beside them.
    let stored: u64 = views
        .iter()
        .map(|v| match v.vectors {
            Vectors::Stored(r) => r.len() as u64 * (r.meta.width as u64 * 4 + 13),
            _ => 0,
        })
        .sum();
    if stored > 0 {
        b.add("the stored vectors as read", stored, "--model", "fewer stored views");
    }
    b.check()?;
    let mut embedded = Vec::with_capacity(views.len());
    for v in views {
        let started = std::time::Instant::now();
        let (vectors, sparse, blank) = v.vectors_of(be, opts)?;
        embedded.push(Embedded {
            vectors,
            width: v.width(),
            sparse,
            seconds: started.elapsed().as_secs_f64(),
            blank,
        });
    }
    let info: Vec<Row> = rows_of(ds).iter().map(|d| d.row).collect();
    spread_and_write(embedded, &weightings, &info, rows, source_of(views, opts), ds, out, jsonl, opts)
}

/// Every row's mean pretrained word vector, at unit length (all zeros for a row none of
/// whose words pretraining trained), in [`rows_of`]'s order, and how many rows have none.
fn embed_bag(emb: &Embeddings, ds: &Dataset) -> Result<(Vec<f32>, usize)> {
    let dim = emb.meta.dim;
    let vocab = verified_vocab(ds)?;
    // The trained words' vectors, and for each word of the data set's vocabulary its row
    // among them.
    let tok = emb.tokenizer();
    let mut table = vec![0f32; emb.words.len() * dim];
    let mut feats = Vec::new();
    for (w, row) in emb.words.iter().zip(table.chunks_mut(dim)) {
        emb.vector(&tok, w, &mut feats, row);
    }
    let trained: std::collections::HashMap<&str, usize> =
        emb.words.iter().enumerate().map(|(i, w)| (w.as_str(), i)).collect();
    let row_of: Vec<Option<usize>> =
        (0..vocab.len() as u32).map(|i| trained.get(vocab.word(i)).copied()).collect();
    pooled_rows(ds, dim, "the embeddings'", |d, sum| {
        for &w in d.shard.doc_words(d.index) {
            if let Some(at) = row_of[w as usize] {
                add(sum, &table[at * dim..(at + 1) * dim]);
            }
        }
        Ok(())
    })
}

/// Every row's pooled embedding under a bag model ([`Vectors::BagModel`]), at unit length
/// (all zeros for a row without a feature id), in [`rows_of`]'s order, and how many rows
/// have none. The ids are checked against the data set's bucket count, which
/// [`View::check`] ([`check_buckets`]) has checked against the table's rows before any
/// view is embedded.
fn embed_bag_model(model: &BagModel, params: &[f32], ds: &Dataset) -> Result<(Vec<f32>, usize)> {
    let limits = DocLimits::of(&ds.manifest().tokenizer);
    let (dim, table) = (model.spec.dim, &params[model.table.range()]);
    pooled_rows(ds, dim, "the bag model's", |d, sum| {
        for &id in d.shard.doc_checked(d.index, limits)?.ids {
            let at = id as usize * dim;
            add(sum, &table[at..at + dim]);
        }
        Ok(())
    })
}

/// `sum += row`, in f64.
fn add(sum: &mut [f64], row: &[f32]) {
    for (s, &x) in sum.iter_mut().zip(row) {
        *s += f64::from(x);
    }
}

/// Every row of `ds` ([`rows_of`]'s order) as the unit-length direction of the sum that
/// `gather` adds up for it (all zeros where the sum is zero), and how many rows have none.
/// A sum that is not finite is refused, naming `whose` vectors made it.
fn pooled_rows(
    ds: &Dataset,
    dim: usize,
    whose: &str,
    gather: impl Fn(&DocAt, &mut [f64]) -> Result<()> + Sync,
) -> Result<(Vec<f32>, usize)> {
    let docs = rows_of(ds);
    let mut vectors = vec![0f32; docs.len() * dim];
    vectors.par_chunks_mut(dim).zip(docs.par_iter()).try_for_each(|(v, d)| -> Result<()> {
        let mut sum = vec![0f64; dim];
        gather(d, &mut sum)?;
        let norm = sum.iter().map(|x| x * x).sum::<f64>().sqrt();
        if !norm.is_finite() {
            return Err(Error::Data(format!(
                "{}: {whose} vector of document {} is not finite: they are broken; nothing was written",
                d.shard.path().display(),
                d.index
            )));
        }
        if norm > 0.0 {
            for (o, s) in v.iter_mut().zip(&sum) {
                *o = (s / norm) as f32;
            }
        }
        Ok(())
    })?;
    let blank = vectors.chunks(dim).filter(|v| !has_vector(v)).count();
    Ok((vectors, blank))
}

/// The data set's word list, once every shard's word ids are checked against it.
fn verified_vocab(ds: &Dataset) -> Result<crate::data::vocab::Vocab> {
    let vocab = ds.vocab()?;
    for split in SplitKind::ALL {
        for shard in ds.shards(split) {
            shard.verify_words(vocab.len() as u64)?;
        }
    }
    Ok(vocab)
}

/// Checks that `other` holds the rows of `ds` in the same order: the same classes and, split
/// by split, the same [`crate::logits::rows_fingerprint`] (sample ids, labels, hidden
/// labels and word sequences, shard by shard), naming the first difference.
fn check_aligned(ds: &Dataset, other: &Dataset) -> Result<()> {
    let differ = |what: String| {
        Err(Error::Data(format!(
            "{} and {}: {what}; the views of one propagate run must hold the same rows in the same order (prepare them from the same inputs with the same [split], [output] shards and word rules, each with its own tokenizer)",
            ds.dir().display(),
            other.dir().display()
        )))
    };
    if ds.labels() != other.labels() {
        return differ("their classes differ".into());
    }
    for split in SplitKind::ALL {
        if crate::logits::rows_fingerprint(ds, split) == crate::logits::rows_fingerprint(other, split) {
            continue;
        }
        let (a, b) = (ds.shards(split), other.shards(split));
        let name = split.name();
        if a.len() != b.len() {
            return differ(format!("{} and {} shards of the {name} split", a.len(), b.len()));
        }
        for (si, (x, y)) in a.iter().zip(b).enumerate() {
            if x.len() != y.len() {
                return differ(format!(
                    "shard {si} of the {name} split holds {} and {} rows",
                    x.len(),
                    y.len()
                ));
            }
            for i in 0..x.len() {
                let (dx, dy) = (x.doc(i), y.doc(i));
                if dx.sample_id != dy.sample_id
                    || dx.label != dy.label
                    || x.hidden_label(i) != y.hidden_label(i)
                {
                    return differ(format!(
                        "row {i} of shard {si} of the {name} split is sample {} and sample {}, or their labels differ",
                        dx.sample_id, dy.sample_id
                    ));
                }
            }
        }
        return differ(format!(
            "the words of the {name} split differ (other texts, or other word rules: lowercasing, punctuation)"
        ));
    }
    Ok(())
}

/// One view's vectors of every row (n×`width`, unit length; all zeros for a row that has
/// none), in [`rows_of`]'s order, and what they took. A TF-IDF view's are `sparse` instead
/// (`vectors` empty, `width` 0).
struct Embedded {
    vectors: Vec<f32>,
    width: usize,
    sparse: Option<Sparse>,
    seconds: f64,
    /// Rows without a vector.
    blank: usize,
}

/// Checks `propagate`'s options, outputs and data set before anything is embedded; the rows
/// of each split (train, val, test, unlabeled).
fn check_data(ds: &Dataset, out: &Path, jsonl: Option<&Path>, opts: &Options) -> Result<[usize; 4]> {
    check_options(opts)?;
    crate::logits::check_outputs(out, jsonl)?;
    let count = |s: SplitKind| ds.shards(s).iter().map(|x| x.len()).sum::<usize>();
    let rows = [SplitKind::Train, SplitKind::Val, SplitKind::Test, SplitKind::Unlabeled].map(count);
    if rows[0] == 0 {
        return Err(Error::Data(format!(
            "{}: the train split is empty: there is no label to spread",
            ds.dir().display()
        )));
    }
    if rows[3] == 0 {
        return Err(Error::Data(format!(
            "{}: the unlabeled split is empty: there is nothing to give labels to",
            ds.dir().display()
        )));
    }
    let total: usize = rows.iter().sum();
    if let Some(&k) = opts.ks.iter().find(|&&k| k >= total) {
        return Err(Error::Data(format!(
            "--k {k}: the data set has only {total} rows, so at most {} neighbours",
            total - 1
        )));
    }
    let settings =
        opts.weights.len().max(1) * opts.ks.len() * opts.alphas.len() * opts.shifts.len() * opts.aligns.len();
    if rows[1] == 0 && settings > 1 {
        return Err(Error::Data(format!(
            "{}: the val split is empty, so nothing can choose among {settings} settings: give one --k, one --alpha, one --shift, one --align and at most one --weights",
            ds.dir().display(),
        )));
    }
    if rows[1] == 0 && opts.prior == ClassPrior::Val && opts.aligns.iter().any(|&a| a > 0.0) {
        return Err(Error::Data(format!(
            "{}: the val split is empty, so it gives no class prior to --align: use --class-prior train or --align 0",
            ds.dir().display(),
        )));
    }
    Ok(rows)
}

/// Searches the neighbours of the rows under each of `weightings` (as given, and divided by
/// their sum) and each shift, spreads the training labels for every setting of
/// the grid, and writes the unlabeled rows of the setting of best val accuracy.
#[allow(clippy::too_many_arguments)]
fn spread_and_write(
    views: Vec<Embedded>,
    weightings: &[(Weights, Vec<f64>)],
    info: &[Row],
    rows: [usize; 4],
    source: u64,
    ds: &Dataset,
    out: &Path,
    jsonl: Option<&Path>,
    opts: &Options,
) -> Result<Report> {
    let classes = ds.labels().len();
    let total: usize = rows.iter().sum();
    let k_max = *opts.ks.iter().max().expect("checked: not empty");
    let embed_seconds = views.iter().map(|e| e.seconds).sum();
    let seeds = seed_matrix(info, classes);
    let prior = class_prior(info, classes, opts.prior.split());
    let mut search_seconds = 0.0;
    let accuracy = |f: &[f64], split: SplitKind| -> Option<f64> {
        let (mut n, mut right) = (0usize, 0usize);
        for (i, r) in info.iter().enumerate() {
            if let (true, Some(l)) = (r.split == split, r.label) {
                n += 1;
                let row = &f[i * classes..(i + 1) * classes];
                right += usize::from(reached(row) && crate::backend::argmax(row) == l as usize);
            }
        }
        (n > 0).then(|| right as f64 / n as f64)
    };
    let mut grid = Vec::new();
    let mut best: Option<(usize, Vec<f64>, Vec<f64>)> = None;
    let mut shifted = Vec::new();
    let mut searches = Vec::new();
    for (given, weights) in weightings {
        for &shift in &opts.shifts {
            let started = std::time::Instant::now();
            // Each weighting shifts the views again (under a tenth of the search's time on
            // Brown's four views) rather than hold every shift's copies at once. A shift
            // moves every view whatever its weight, so the first weighting's report serves.
            let bar = search_bar(opts.progress, total, shift);
            let (neighbours, did, cells) =
                neighbours(&views, total, shift, k_max, weights, opts.search, &|r| bar.inc(r as u64));
            bar.finish_and_clear();
            if shifted.len() < opts.shifts.len() {
                shifted.push((shift, did));
            }
            searches.extend(cells.map(|c| (given.clone(), shift, c)));
            search_seconds += started.elapsed().as_secs_f64();
            for &k in &opts.ks {
                let graph = Graph::new(&neighbours, k_max, k);
                for &alpha in &opts.alphas {
                    let (f, iterations, converged) = graph.spread(&seeds, classes, alpha);
                    let unreached = f.chunks(classes).filter(|row| !reached(row)).count();
                    let p = normalised(&f, classes);
                    drop(f);
                    let (mass, plain) = class_mass(&p, info, classes);
                    for &align in &opts.aligns {
                        let q = aligned(&p, &prior, &mass, align);
                        let val_accuracy = accuracy(&q, SplitKind::Val);
                        grid.push(Setting {
                            weights: given.clone(),
                            shift,
                            k,
                            alpha,
                            align,
                            val_accuracy,
                            iterations,
                            converged,
                            unreached,
                        });
                        let better = converged
                            && match (&best, val_accuracy) {
                                (None, _) => true,
                                (Some((b, ..)), Some(v)) => v > grid[*b].val_accuracy.unwrap_or(-1.0),
                                (Some(_), None) => false,
                            };
                        if better {
                            best = Some((grid.len() - 1, q, plain.clone()));
                        }
                    }
                }
            }
        }
    }
    let Some((chosen, q, plain)) = best else {
        return Err(Error::Data(format!(
            "no setting of the grid converged within {MAX_ITERS} iterations: try smaller --alpha values"
        )));
    };
    let test_accuracy = accuracy(&q, SplitKind::Test);
    let shares = plain.into_iter().zip(class_mass(&q, info, classes).1).collect();
    let logits = to_logits(&q, classes);
    let mut val_by_confidence: Vec<(f64, usize, usize)> = VAL_THRESHOLDS.iter().map(|&t| (t, 0, 0)).collect();
    for (i, r) in info.iter().enumerate() {
        if let (SplitKind::Val, Some(l)) = (r.split, r.label) {
            let (top, p) = crate::logits::named_class(&logits[i * classes..(i + 1) * classes]);
            for (t, n, right) in &mut val_by_confidence {
                if p >= *t {
                    *n += 1;
                    *right += usize::from(top == Some(l as usize));
                }
            }
        }
    }
    // The unlabeled split's rows come last, in shard order (see `embed`).
    let mut at = total - rows[3];
    let export = crate::logits::write(
        ds,
        SplitKind::Unlabeled,
        out,
        jsonl,
        classes,
        source,
        |_, shard, start, out| {
            // Each shard is handed over whole, so `write` asks for each once, from its first row.
            debug_assert_eq!(start, 0);
            out.clear();
            out.extend_from_slice(&logits[at * classes..(at + shard.len()) * classes]);
            at += shard.len();
            Ok(())
        },
    )?;
    Ok(Report {
        rows,
        grid,
        chosen,
        test_accuracy,
        val_by_confidence,
        export,
        embed_seconds,
        search_seconds,
        without_vector: views.iter().map(|e| e.blank).collect(),
        shifted,
        searches,
        labels: ds.labels().to_vec(),
        prior,
        shares,
    })
}

/// Checks `Options::weights` against `m` views before anything is read or embedded.
pub fn check_weights(opts: &Options, m: usize) -> Result<()> {
    weightings(opts, m).map(|_| ())
}

/// The grid's view weightings for `m` views: each as given and divided by its sum. Without
/// `Options::weights`, one: every view 1. Each must give one weight per view, and no two
/// may be proportional (only the ratios count: they give the same graph).
fn weightings(opts: &Options, m: usize) -> Result<Vec<(Weights, Vec<f64>)>> {
    if opts.weights.is_empty() {
        let equal = Weights(vec![1.0; m]);
        let n = equal.normalised();
        return Ok(vec![(equal, n)]);
    }
    let mut out: Vec<(Weights, Vec<f64>)> = Vec::new();
    for w in &opts.weights {
        if let Some(p) = w.problem() {
            return Err(Error::Data(format!("--weights {}: {p}", w.name())));
        }
        if w.0.len() != m {
            return Err(Error::Data(format!(
                "--weights {}: {} weights for {m} views (one per view, in order: each --model, then --tfidf)",
                w.name(),
                w.0.len()
            )));
        }
        let n = w.normalised();
        if let Some((same, _)) =
            out.iter().find(|(_, o)| o.iter().zip(&n).all(|(a, b)| (a - b).abs() < 1e-12))
        {
            return Err(Error::Data(format!(
                "--weights {}: the same graph as --weights {} (only the weights' ratios count)",
                w.name(),
                same.name()
            )));
        }
        out.push((w.clone(), n));
    }
    Ok(out)
}

/// Each of the `n` rows' `k` nearest neighbours under `shift`: the similarity of two rows is
/// the mean of their cosines in the views weighted by `weights` (one per view, summing to
/// 1; the dense views shifted, side by side, the sparse views' dot products added; one
/// dense view alone and unshifted is searched as it is), searched by `search`; what the
/// shift did; with cells, what they were like and the search's recall.
fn neighbours(
    views: &[Embedded],
    n: usize,
    shift: Shift,
    k: usize,
    weights: &[f64],
    search: Search,
    done: &crate::knn::Done<'_>,
) -> (Vec<(u32, f32)>, Shifted, Option<Searched>) {
    debug_assert_eq!(views.len(), weights.len());
    let dense: Vec<(&Embedded, f64)> =
        views.iter().zip(weights).filter(|(e, _)| e.sparse.is_none()).map(|(e, &w)| (e, w)).collect();
    let sparse: Vec<(&Sparse, f32)> =
        views.iter().zip(weights).filter_map(|(e, &w)| e.sparse.as_ref().map(|s| (s, w as f32))).collect();
    let combined;
    let (v, h, did) = if let ([(e, _)], 1, Shift::Raw) = (dense.as_slice(), views.len(), shift) {
        (e.vectors.as_slice(), e.width, Shifted::default())
    } else {
        let (c, width, did) = combine(&dense, shift);
        combined = c;
        (combined.as_slice(), width, did)
    };
    let (found, cells) = nearest(n, v, h, &sparse, k, search, done);
    (found, did, cells)
}

/// The progress bar of one neighbour search over `n` rows (hidden without `progress`).
fn search_bar(progress: bool, n: usize, shift: Shift) -> ProgressBar {
    if !progress {
        return ProgressBar::hidden();
    }
    let b = ProgressBar::with_draw_target(Some(n as u64), ProgressDrawTarget::stderr());
    b.set_style(
        ProgressStyle::with_template(&format!(
            "neighbours ({}) [{{wide_bar}}] {{pos}}/{{len}} rows {{per_sec}} ETA {{eta}}",
            shift.name()
        ))
        .expect("valid template")
        .progress_chars("=> "),
    );
    b
}

/// The dense part of the rows' vectors for the neighbour search: each dense view's shifted
/// by `shift`, side by side and scaled by √w for its weight w (the views' weights, sparse
/// ones included, sum to 1: so a dot product is the dense views' share of the weighted mean
/// of the views' cosines; the sparse views add theirs in [`nearest`]); a view's rows
/// without a vector add zeros. Returns them, their width (nothing, width 0, without a dense
/// view) and what the shift did.
fn combine(views: &[(&Embedded, f64)], shift: Shift) -> (Vec<f32>, usize, Shifted) {
    if let [(e, w)] = views {
        if *w == 1.0 {
            let mut v = e.vectors.clone();
            let did = shift.apply(&mut v, e.width);
            return (v, e.width, did);
        }
    }
    let width: usize = views.iter().map(|(e, _)| e.width).sum();
    let Some((first, _)) = views.first() else {
        return (Vec::new(), 0, Shifted::default());
    };
    let n = first.vectors.len() / first.width;
    let mut out = vec![0f32; n * width];
    let mut at = 0;
    let mut did = Shifted::default();
    for &(e, w) in views {
        let scale = w.sqrt() as f32;
        let shifted;
        let v = if shift == Shift::Raw {
            &e.vectors
        } else {
            let mut copy = e.vectors.clone();
            did = did.and(shift.apply(&mut copy, e.width));
            shifted = copy;
            &shifted
        };
        for (dst, src) in out.chunks_mut(width).zip(v.chunks(e.width)) {
            for (d, &x) in dst[at..at + e.width].iter_mut().zip(src) {
                *d = x * scale;
            }
        }
        at += e.width;
    }
    (out, width, did)
}

/// The host memory `propagate` holds for `n` rows of `views` views, the dense ones of widths
/// `widths`, `k` neighbours, `classes` classes and the grid's `shifts`, as claims on this
/// machine's available memory (the encoders' weights and activations, already loaded, and
/// the TF-IDF views, claimed by `propagate`, are not counted).
fn budget(
    n: usize,
    widths: &[usize],
    views: usize,
    shifts: &[Shift],
    k: usize,
    classes: usize,
    search: Search,
) -> Result<crate::hostmem::Budget> {
    let mut b = crate::hostmem::Budget::new("propagate", 1)?;
    let h: u64 = widths.iter().sum::<usize>() as u64;
    let (n, k, c) = (n as u64, k as u64, classes as u64);
    let fewer = "a data set of fewer rows: every row's vector and neighbours are held at once";
    // The views' vectors; the searched copy (shifted, or views side by side) unless one
    // view is searched as it is; with several views and a shift, one view's shifted copy
    // while it is put in place.
    let shifted = shifts.iter().any(|&s| s != Shift::Raw);
    let searched = if views > 1 || shifted { n * h } else { 0 };
    let one_view = if views > 1 && shifted { n * *widths.iter().max().unwrap_or(&0) as u64 } else { 0 };
    b.add("the rows' vectors", (n * h + searched + one_view) * 4, "--data", fewer);
    b.add("their neighbour lists", n * k * 8, "--k", "a smaller largest --k");
    // The edge list (two 4-byte ends and an 8-byte weight) beside the compressed rows, their
    // starts and the degrees.
    b.add("the graph", 2 * n * k * (16 + 12) + 16 * n, "--k", "a smaller largest --k");
    // During a solve Y, the best so far and CG's five vectors; after it Y, the best, the
    // probabilities and an aligned copy.
    b.add(
        "the spreading's buffers",
        8 * n * c * 8,
        "--data",
        "a data set of fewer rows or classes: the spreading holds eight f64 values per row and class",
    );
    // Per thread: a block of similarities (at least one row of n) and a row's candidates.
    // (The search's own blocks are smaller now: a 4 MiB tile of similarities, at most 1,024
    // queries' rows, and by cells, per TF-IDF view, the index of a cell's words, which the
    // claim's surplus covers.)
    let threads = rayon::current_num_threads() as u64;
    let block = (1u64 << 26).min(n * n * 4).max(n * 4) + n * 8;
    b.add("the similarity blocks", threads * block, "--data", fewer);
    if let Search::Cells { cells, probes } = search {
        // Per row: its p nearest cells and its probed groups' list (p + 1 entries, with the
        // rows without a vector) while both are held, its place in `with`, its cell and its
        // list's start (crate::knn::by_cells), a flag. The centroids with k-means' f64 sums.
        // A wave's requests and partial lists (twice while they are put in place). Per
        // thread, a group's gathered rows, taken at four times the mean cell (an estimate:
        // the largest cell is not known beforehand).
        let c = crate::knn::cell_count(n as usize, n as usize, cells) as u64;
        let p = (probes as u64).clamp(1, c);
        let slots = (crate::knn::WAVE_PAIRS as u64 / k.max(1)).max(1).min(n * (p + 1));
        b.add(
            "the cells' lists",
            n * (8 * p + 25) + c * h * 12 + slots * (8 + 2 * k * 8) + threads * 4 * n.div_ceil(c) * h * 4,
            "--probes",
            "fewer --probes or --cells, or a smaller largest --k",
        );
    }
    Ok(b)
}

/// The identity recorded as the logits file's source: each view's weights (an encoder's and
/// its pooling, or the embeddings') and the grid's (two runs of other settings write files
/// of other sources).
fn source_of(views: &[View], opts: &Options) -> u64 {
    let mut bytes = b"propagate".to_vec();
    for v in views {
        bytes.extend(v.source());
    }
    for k in &opts.ks {
        bytes.extend((*k as u64).to_le_bytes());
    }
    for a in &opts.alphas {
        bytes.extend(a.to_le_bytes());
    }
    for t in &opts.shifts {
        bytes.extend(t.name().as_bytes());
    }
    // Without --weights, the source of the runs before weights existed.
    for w in &opts.weights {
        bytes.extend(b"weights");
        for x in w.normalised() {
            bytes.extend(x.to_le_bytes());
        }
    }
    // Plain spreading (one power, 0) keeps the source files of runs before alignment had.
    if opts.aligns != [0.0] {
        for a in &opts.aligns {
            bytes.extend(a.to_le_bytes());
        }
        bytes.extend(opts.prior.name().as_bytes());
    }
    // The exact search keeps the source of runs before cells existed.
    if let Search::Cells { cells, probes } = opts.search {
        bytes.extend(b"cells");
        bytes.extend((cells.unwrap_or(0) as u64).to_le_bytes());
        bytes.extend((probes as u64).to_le_bytes());
    }
    xxhash_rust::xxh3::xxh3_64(&bytes)
}

/// A graph row's document: where it is, and its split and label.
struct DocAt<'a> {
    shard: &'a Shard,
    index: usize,
    row: Row,
}

/// Every row of `ds`: train, val, test and unlabeled rows in that order, each split's shard
/// by shard (the unlabeled split's rows come last, in the order its logits file keeps).
fn rows_of(ds: &Dataset) -> Vec<DocAt<'_>> {
    let mut docs = Vec::new();
    for split in [SplitKind::Train, SplitKind::Val, SplitKind::Test, SplitKind::Unlabeled] {
        for shard in ds.shards(split) {
            for index in 0..shard.len() {
                let label = match split {
                    SplitKind::Unlabeled => shard.hidden_label(index),
                    _ => shard.doc(index).label,
                };
                docs.push(DocAt { shard, index, row: Row { split, label } });
            }
        }
    }
    docs
}

/// Every row's split, label as the data set gives it out (none for an unlabeled row, whose
/// hidden label is only measured) and sample id, in the graph's order ([`rows_of`]).
pub(crate) fn row_ids(ds: &Dataset) -> Vec<(SplitKind, Option<u32>, u64)> {
    rows_of(ds)
        .iter()
        .map(|d| {
            let label = if d.row.split == SplitKind::Unlabeled { None } else { d.row.label };
            (d.row.split, label, d.shard.doc(d.index).sample_id)
        })
        .collect()
}

/// Every row's unit-length pooled vector (n×H), in [`rows_of`]'s order; documents are
/// batched by length to cut padding.
fn embed<B: EncoderOps<F = f32>>(
    be: &B,
    enc: &Encoder,
    params: &[f32],
    ds: &Dataset,
    opts: &Options,
) -> Result<Vec<f32>> {
    let limits = DocLimits::of(&ds.manifest().tokenizer);
    let hidden = enc.spec.hidden;
    let docs = rows_of(ds);
    let mut order: Vec<usize> = (0..docs.len()).collect();
    order.sort_by_key(|&r| docs[r].shard.doc(docs[r].index).ids.len());
    let bar = if opts.progress {
        let b = ProgressBar::with_draw_target(Some(docs.len() as u64), ProgressDrawTarget::stderr());
        b.set_style(
            ProgressStyle::with_template("embed [{wide_bar}] {pos}/{len} documents {per_sec} ETA {eta}")
                .expect("valid template")
                .progress_chars("=> "),
        );
        b
    } else {
        ProgressBar::hidden()
    };
    let params = be.upload(params);
    let mut acts = EncoderActs::inference(be);
    let mut vectors = vec![0f32; docs.len() * hidden];
    for batch in order.chunks(opts.batch_size) {
        let mut seqs = Vec::with_capacity(batch.len());
        for &r in batch {
            let (shard, i) = (docs[r].shard, docs[r].index);
            let ids = shard.doc_checked(i, limits)?.ids;
            if ids.is_empty() {
                return Err(Error::bad_file(shard.path(), format!("document {i} has no token id to embed")));
            }
            seqs.push(ids.to_vec());
        }
        enc.forward(be, &params, &TokenBatch::new(&seqs, 0), None, &mut acts);
        let pooled = be.download(&acts.pooled);
        for (&r, v) in batch.iter().zip(pooled.chunks(hidden)) {
            let norm = v.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            if !(norm.is_finite() && norm > 0.0) {
                let (shard, i) = (docs[r].shard, docs[r].index);
                return Err(Error::Data(format!(
                    "{}: the encoder's vector of document {i} has norm {norm}: its weights are broken (a diverged run?); nothing was written",
                    shard.path().display()
                )));
            }
            for (o, &x) in vectors[r * hidden..(r + 1) * hidden].iter_mut().zip(v) {
                *o = (f64::from(x) / norm) as f32;
            }
        }
        bar.inc(batch.len() as u64);
    }
    bar.finish_and_clear();
    Ok(vectors)
}

/// `Y`: `1/n_c` in column c of each labeled training row of class c (n×C).
fn seed_matrix(info: &[Row], classes: usize) -> Vec<f64> {
    let mut per_class = vec![0usize; classes];
    for r in info.iter().filter(|r| r.split == SplitKind::Train) {
        if let Some(l) = r.label {
            per_class[l as usize] += 1;
        }
    }
    let mut y = vec![0f64; info.len() * classes];
    for (i, r) in info.iter().enumerate().filter(|(_, r)| r.split == SplitKind::Train) {
        if let Some(l) = r.label {
            y[i * classes + l as usize] = 1.0 / per_class[l as usize] as f64;
        }
    }
    y
}

/// Each of the `n` rows' `k` most similar other rows, most similar first: n×k (index,
/// similarity) pairs, searched by `search` ([`crate::knn`]); with cells, what they were like
/// and the search's recall. A pair's similarity is the dot product of their dense rows of
/// `v` (n×h; none when h is 0) plus, for each of the `sparse` views, its weight times their
/// dot product there ([`combine`] scaled each dense view by the root of its weight).
fn nearest(
    n: usize,
    v: &[f32],
    h: usize,
    sparse: &[(&Sparse, f32)],
    k: usize,
    search: Search,
    done: &crate::knn::Done<'_>,
) -> (Vec<(u32, f32)>, Option<Searched>) {
    // A list index per sparse view, kept by the task across its queries.
    let extra = |i: usize, cands: Candidates, sim: &mut [f32], indexes: &mut Vec<ListIndex>| {
        indexes.resize_with(sparse.len(), ListIndex::default);
        for (&(s, scale), index) in sparse.iter().zip(indexes.iter_mut()) {
            s.add_dots(i, scale, cands, sim, index);
        }
    };
    match search {
        Search::Exact => (crate::knn::exact(n, v, h, k, extra, done), None),
        Search::Cells { cells, probes } => {
            let started = std::time::Instant::now();
            let (found, report) = crate::knn::by_cells(n, v, h, k, cells, probes, extra, done);
            let seconds = started.elapsed().as_secs_f64();
            let recall = crate::knn::recall(n, v, h, k, &found, extra);
            (found, Some(Searched { cells: report, seconds, recall }))
        }
    }
}

/// One search by cells: what the cells were like, its seconds (the recall's not counted),
/// and its recall ([`crate::knn::recall`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Searched {
    pub cells: CellsReport,
    pub seconds: f64,
    pub recall: Option<f64>,
}

/// Compressed sparse rows: row i's entries are columns `cols[starts[i]..starts[i + 1]]`, with
/// the values `vals` beside them.
struct Csr<T> {
    starts: Vec<usize>,
    cols: Vec<u32>,
    vals: Vec<T>,
}

impl<T: Copy> Csr<T> {
    /// `n` rows from (row, column, value) entries sorted by row.
    fn from_sorted(n: usize, entries: &[(u32, u32, T)]) -> Csr<T> {
        let mut starts = vec![0usize; n + 1];
        for &(i, _, _) in entries {
            starts[i as usize + 1] += 1;
        }
        for i in 0..n {
            starts[i + 1] += starts[i];
        }
        Csr {
            starts,
            cols: entries.iter().map(|e| e.1).collect(),
            vals: entries.iter().map(|e| e.2).collect(),
        }
    }

    /// Row i's (column, value) entries.
    fn row(&self, i: usize) -> impl Iterator<Item = (usize, T)> + '_ {
        (self.starts[i]..self.starts[i + 1]).map(|e| (self.cols[e] as usize, self.vals[e]))
    }

    /// Row i's entries of columns lo..hi (the columns of a row are sorted).
    fn row_within(&self, i: usize, lo: usize, hi: usize) -> impl Iterator<Item = (usize, T)> + '_ {
        let (cols, vals) =
            (&self.cols[self.starts[i]..self.starts[i + 1]], &self.vals[self.starts[i]..self.starts[i + 1]]);
        let from = if lo == 0 { 0 } else { cols.partition_point(|&c| (c as usize) < lo) };
        cols[from..]
            .iter()
            .zip(&vals[from..])
            .map(|(&c, &v)| (c as usize, v))
            .take_while(move |&(c, _)| c < hi)
    }
}

/// The words that weigh in a TF-IDF view occur in at least this many rows (a word of one
/// row links no two).
pub const TFIDF_MIN_ROWS: u32 = 2;

/// A TF-IDF view: every row's unit-length vector over the data set's words, kept by row and
/// by word (each word's rows), so that one row's dot products with all rows cost the rows of
/// its words.
struct Sparse {
    rows: Csr<f32>,
    words: Csr<f32>,
}

impl Sparse {
    /// The TF-IDF vectors of the rows of `ds` in [`rows_of`]'s order, over all its splits
    /// (no label is read) and their words (the data set's word sequences: punctuation is no
    /// word): entry `(1 + ln tf) · (ln((1 + n) / (1 + df)) + 1)` for a word
    /// occurring `tf` times in the row and in `df` of the n rows, over the words of at least
    /// [`TFIDF_MIN_ROWS`] rows, then unit length. Also how many rows have no such word (and
    /// so no vector).
    fn tfidf(ds: &Dataset) -> Result<(Sparse, usize)> {
        let vocab = verified_vocab(ds)?;
        // Each row's distinct words and their counts, in word order.
        let counted: Vec<Vec<(u32, u32)>> = rows_of(ds)
            .par_iter()
            .map(|d| {
                let mut words = d.shard.doc_words(d.index).to_vec();
                words.sort_unstable();
                let mut out: Vec<(u32, u32)> = Vec::new();
                for w in words {
                    match out.last_mut() {
                        Some((last, c)) if *last == w => *c += 1,
                        _ => out.push((w, 1)),
                    }
                }
                out
            })
            .collect();
        Ok(Sparse::from_counts(&counted, vocab.len()))
    }

    /// [`Sparse::tfidf`] of rows given as their distinct words (below `words`) and counts,
    /// in word order.
    fn from_counts(counted: &[Vec<(u32, u32)>], words: usize) -> (Sparse, usize) {
        let n = counted.len();
        let mut df = vec![0u32; words];
        for &(w, _) in counted.iter().flatten() {
            df[w as usize] += 1;
        }
        let mut entries: Vec<(u32, u32, f32)> = Vec::with_capacity(counted.iter().map(Vec::len).sum());
        let mut blank = 0;
        let mut row = Vec::new();
        for (i, words) in counted.iter().enumerate() {
            row.clear();
            for &(w, tf) in words.iter().filter(|(w, _)| df[*w as usize] >= TFIDF_MIN_ROWS) {
                let idf = ((1 + n) as f64 / f64::from(1 + df[w as usize])).ln() + 1.0;
                row.push((w, (1.0 + f64::from(tf).ln()) * idf));
            }
            let norm = row.iter().map(|(_, x)| x * x).sum::<f64>().sqrt();
            if norm > 0.0 {
                entries.extend(row.iter().map(|&(w, x)| (i as u32, w, (x / norm) as f32)));
            } else {
                blank += 1;
            }
        }
        let rows = Csr::from_sorted(n, &entries);
        for e in entries.iter_mut() {
            *e = (e.1, e.0, e.2);
        }
        entries.sort_unstable_by_key(|&(w, i, _)| (w, i));
        let words = Csr::from_sorted(words, &entries);
        (Sparse { rows, words }, blank)
    }

    /// `sim[x] += scale · (v_i · v_j)` for the candidates j: the consecutive rows from
    /// `start` (j = start + x), by the rows of row i's words in that span; or the listed rows
    /// (x their place in the list), by the `index` of their words (built for that list
    /// once, and kept while the same list comes again).
    fn add_dots(&self, i: usize, scale: f32, cands: Candidates, sim: &mut [f32], index: &mut ListIndex) {
        // Both add the same products to each similarity in the same (word) order, so both
        // give the same bits.
        match cands {
            Candidates::Span(start) => {
                let end = start + sim.len();
                for (w, a) in self.rows.row(i) {
                    let a = scale * a;
                    if a != 0.0 {
                        for (j, b) in self.words.row_within(w, start, end) {
                            sim[j - start] += a * b;
                        }
                    }
                }
            }
            Candidates::Among(ids) => {
                index.prepare(self, ids);
                for (w, a) in self.rows.row(i) {
                    let a = scale * a;
                    if a != 0.0 {
                        for &(x, b) in index.entries_of(w) {
                            sim[x as usize] += a * b;
                        }
                    }
                }
            }
        }
    }
}

/// The words of a list of rows of a [`Sparse`] view: for each word, the places in the list
/// of the rows that hold it and their values, so that one row's dot products with the list
/// cost the list's entries of its own words, not every entry of the list.
#[derive(Default)]
struct ListIndex {
    /// The list indexed (a group's tile of candidates, which [`crate::knn`] offers again for
    /// every query of a block); `None` before the first.
    of: Option<Vec<u32>>,
    /// The words, ascending, and where each one's entries start in `entries` (one more).
    words: Vec<u32>,
    starts: Vec<u32>,
    /// (place in the list, value), by word, then place.
    entries: Vec<(u32, f32)>,
}

impl ListIndex {
    /// Indexes `ids`, unless it is the list indexed last (compared whole: a few bytes a
    /// candidate, against the index's entries a candidate and word).
    fn prepare(&mut self, view: &Sparse, ids: &[u32]) {
        if self.of.as_deref() == Some(ids) {
            return;
        }
        let mut all: Vec<(u32, u32, f32)> = Vec::new();
        for (x, &j) in ids.iter().enumerate() {
            all.extend(view.rows.row(j as usize).map(|(w, b)| (w as u32, x as u32, b)));
        }
        all.sort_unstable_by_key(|&(w, x, _)| (w, x));
        self.words.clear();
        self.starts.clear();
        self.entries.clear();
        for (e, &(w, x, b)) in all.iter().enumerate() {
            if self.words.last() != Some(&w) {
                self.words.push(w);
                self.starts.push(e as u32);
            }
            self.entries.push((x, b));
        }
        self.starts.push(all.len() as u32);
        self.of = Some(ids.to_vec());
    }

    /// Word w's entries.
    fn entries_of(&self, w: usize) -> &[(u32, f32)] {
        match self.words.binary_search(&(w as u32)) {
            Ok(at) => &self.entries[self.starts[at] as usize..self.starts[at + 1] as usize],
            Err(_) => &[],
        }
    }
}

/// `S = D^-½ (A + Aᵀ) D^-½` over the first `k` of each row's neighbours, as compressed rows.
struct Graph(Csr<f64>);

impl Graph {
    fn new(neighbours: &[(u32, f32)], k_max: usize, k: usize) -> Graph {
        let n = neighbours.len() / k_max;
        let mut edges: Vec<(u32, u32, f64)> = Vec::with_capacity(2 * n * k);
        for i in 0..n {
            for &(j, s) in &neighbours[i * k_max..i * k_max + k] {
                let w = f64::from(s.max(0.0)).powi(GAMMA);
                if w > 0.0 {
                    edges.push((i as u32, j, w));
                    edges.push((j, i as u32, w));
                }
            }
        }
        edges.sort_unstable_by_key(|&(i, j, _)| (i, j));
        let mut degree = vec![0f64; n];
        for &(i, _, w) in &edges {
            degree[i as usize] += w;
        }
        for e in edges.iter_mut() {
            e.2 /= (degree[e.0 as usize] * degree[e.1 as usize]).sqrt();
        }
        Graph(Csr::from_sorted(n, &edges))
    }

    /// `out = x − α S x` for n×C `x`.
    fn apply(&self, x: &[f64], classes: usize, alpha: f64, out: &mut [f64]) {
        out.par_chunks_mut(classes).enumerate().for_each(|(i, o)| {
            o.copy_from_slice(&x[i * classes..(i + 1) * classes]);
            for (j, w) in self.0.row(i) {
                let w = alpha * w;
                for (o, &xj) in o.iter_mut().zip(&x[j * classes..(j + 1) * classes]) {
                    *o -= w * xj;
                }
            }
        });
    }

    /// `F = (1 − α)(I − αS)⁻¹ Y` by conjugate gradients on every class column at once, the
    /// iterations the slowest column took, and whether every column reached the residual.
    fn spread(&self, y: &[f64], classes: usize, alpha: f64) -> (Vec<f64>, usize, bool) {
        let b: Vec<f64> = y.iter().map(|&v| (1.0 - alpha) * v).collect();
        let column_dots = |a: &[f64], c: &[f64]| {
            let mut d = vec![0f64; classes];
            for (ra, rc) in a.chunks(classes).zip(c.chunks(classes)) {
                for (d, (&x, &z)) in d.iter_mut().zip(ra.iter().zip(rc)) {
                    *d += x * z;
                }
            }
            d
        };
        let target: Vec<f64> = column_dots(&b, &b).iter().map(|&s| s.sqrt() * TOLERANCE).collect();
        let mut x = vec![0f64; b.len()];
        let mut r = b.clone();
        let mut p = r.clone();
        let mut ap = vec![0f64; b.len()];
        let mut rr = column_dots(&r, &r);
        let mut iterations = 0;
        while iterations < MAX_ITERS && rr.iter().zip(&target).any(|(&s, &t)| s.sqrt() > t) {
            self.apply(&p, classes, alpha, &mut ap);
            let pap = column_dots(&p, &ap);
            let step: Vec<f64> = (0..classes)
                .map(|c| if rr[c].sqrt() > target[c] && pap[c] > 0.0 { rr[c] / pap[c] } else { 0.0 })
                .collect();
            for i in 0..x.len() {
                let c = i % classes;
                x[i] += step[c] * p[i];
                r[i] -= step[c] * ap[i];
            }
            let next = column_dots(&r, &r);
            for i in 0..p.len() {
                let c = i % classes;
                let beta = if rr[c] > 0.0 { next[c] / rr[c] } else { 0.0 };
                p[i] = r[i] + beta * p[i];
            }
            rr = next;
            iterations += 1;
        }
        let converged = rr.iter().zip(&target).all(|(&s, &t)| s.sqrt() <= t);
        (x, iterations, converged)
    }
}

/// Replaces every row of `v` that has a vector by `shifted(row)` scaled to unit length; a row
/// left with (round-off of) nothing is zeroed instead. Returns how many were zeroed.
fn subtract_and_renormalise(v: &mut [f32], h: usize, shifted: impl Fn(&[f32], &mut [f64]) + Sync) -> usize {
    v.par_chunks_mut(h)
        .filter(|row| has_vector(row))
        .map(|row| {
            let mut rest = vec![0f64; h];
            shifted(row, &mut rest);
            let n = rest.iter().map(|x| x * x).sum::<f64>().sqrt();
            // The rows are unit f32 vectors: what is left below this is round-off (about
            // 1e-7·√h), or a row that was all common part.
            if n > 1e-4 {
                for (o, r) in row.iter_mut().zip(&rest) {
                    *o = (r / n) as f32;
                }
                0
            } else {
                row.fill(0.0);
                1
            }
        })
        .sum()
}

/// The top right singular vector of the rows of `v` (width `h`), by power iteration on `VᵀV`
/// started at the rows' sum, to a change below 1e-9 (at most 1000 iterations: where the top
/// two singular values are nearly equal it stops at a mix of their directions, which
/// `drop-top` then takes out; val accuracy judges the result like any setting), and whether
/// it got there; `None` when every row is zero.
fn top_direction(v: &[f32], h: usize) -> Option<(Vec<f64>, bool)> {
    let times_gram = |u: &[f64]| -> Vec<f64> {
        v.par_chunks(h)
            .fold(
                || vec![0f64; h],
                |mut acc, row| {
                    let d: f64 = row.iter().zip(u).map(|(&x, &y)| f64::from(x) * y).sum();
                    for (a, &x) in acc.iter_mut().zip(row) {
                        *a += d * f64::from(x);
                    }
                    acc
                },
            )
            .reduce(|| vec![0f64; h], |a, b| a.iter().zip(&b).map(|(x, y)| x + y).collect())
    };
    let unit = |w: Vec<f64>| -> Option<Vec<f64>> {
        let n = w.iter().map(|x| x * x).sum::<f64>().sqrt();
        (n > 0.0 && n.is_finite()).then(|| w.iter().map(|x| x / n).collect())
    };
    let mut sum = vec![0f64; h];
    for row in v.chunks(h) {
        for (s, &x) in sum.iter_mut().zip(row) {
            *s += f64::from(x);
        }
    }
    // Rows that sum to nothing (opposite pairs) still have a top direction: start elsewhere.
    let mut u = unit(sum).or_else(|| unit(times_gram(&vec![1.0; h])))?;
    for _ in 0..1000 {
        let next = unit(times_gram(&u))?;
        let change = next.iter().zip(&u).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt();
        u = next;
        if change < 1e-9 {
            return Some((u, true));
        }
    }
    Some((u, false))
}

/// The class prior π: the label frequencies of `split`'s rows, each count plus one (no class
/// gets weight 0), summing to 1.
fn class_prior(info: &[Row], classes: usize, split: SplitKind) -> Vec<f64> {
    let mut count = vec![1.0f64; classes];
    for r in info.iter().filter(|r| r.split == split) {
        if let Some(l) = r.label {
            count[l as usize] += 1.0;
        }
    }
    let total: f64 = count.iter().sum();
    count.iter().map(|c| c / total).collect()
}

/// Rows of `F` as probabilities `max(F, 0) / Σ max(F, 0)`; a row no label reaches stays 0.
fn normalised(f: &[f64], classes: usize) -> Vec<f64> {
    let mut p = Vec::with_capacity(f.len());
    for row in f.chunks(classes) {
        let total: f64 = row.iter().map(|&v| v.max(0.0)).sum();
        p.extend(row.iter().map(|&v| if total > 0.0 { v.max(0.0) / total } else { 0.0 }));
    }
    p
}

/// Over the rows of `p` (probabilities, rows of no label all 0) that are not training rows
/// and that a label reaches: each class's mean probability `m_c`, and its share of their
/// argmaxes.
fn class_mass(p: &[f64], info: &[Row], classes: usize) -> (Vec<f64>, Vec<f64>) {
    let (mut mass, mut top, mut n) = (vec![0f64; classes], vec![0f64; classes], 0usize);
    for (row, r) in p.chunks(classes).zip(info) {
        if r.split == SplitKind::Train || !reached(row) {
            continue;
        }
        n += 1;
        for (m, &v) in mass.iter_mut().zip(row) {
            *m += v;
        }
        top[crate::backend::argmax(row)] += 1.0;
    }
    let n = n.max(1) as f64;
    (mass.iter().map(|m| m / n).collect(), top.iter().map(|t| t / n).collect())
}

/// Class-mass alignment of power `a`: the rows of `p` (probabilities) times
/// `w_c = (π_c / m_c)^a`, normalised again; `p` itself at `a = 0`. The weights are taken in
/// logarithms relative to the largest (at most 1, so no product overflows); a class of no
/// mass has a column of zeros and gets weight 0.
fn aligned(p: &[f64], prior: &[f64], mass: &[f64], a: f64) -> Vec<f64> {
    if a == 0.0 {
        return p.to_vec();
    }
    let logs: Vec<f64> = prior
        .iter()
        .zip(mass)
        .map(|(&pi, &m)| if m > 0.0 { a * (pi.ln() - m.ln()) } else { f64::NEG_INFINITY })
        .collect();
    let top = logs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let w: Vec<f64> = logs.iter().map(|&l| (l - top).exp()).collect();
    let mut q = Vec::with_capacity(p.len());
    for row in p.chunks(w.len()) {
        let total: f64 = row.iter().zip(&w).map(|(&v, &w)| v * w).sum();
        q.extend(row.iter().zip(&w).map(|(&v, &w)| if total > 0.0 { v * w / total } else { 0.0 }));
    }
    q
}

/// Whether a row of `F` holds any label mass (a labeled row reaches it).
fn reached(row: &[f64]) -> bool {
    row.iter().any(|&v| v > 0.0)
}

/// Rows of probabilities as logits, `ln max(p, 1e-6)`; a row no label reaches (all 0)
/// gets 1/C each.
fn to_logits(p: &[f64], classes: usize) -> Vec<f32> {
    let uniform = 1.0 / classes as f32;
    let mut out = Vec::with_capacity(p.len());
    for row in p.chunks(classes) {
        let any = reached(row);
        out.extend(row.iter().map(|&v| {
            let v = if any { v as f32 } else { uniform };
            v.max(FLOOR).ln()
        }));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A million rows of MiniLM's width with 20 neighbours: vectors (and a shifted copy),
    /// neighbour lists, graph and spreading buffers come to about 5.3 GB, plus the similarity
    /// blocks.
    #[test]
    fn the_memory_budget_counts_vectors_graph_and_buffers() {
        let all = Shift::ALL;
        let total = budget(1_000_000, &[384], 1, &all, 20, 15, Search::Exact).unwrap().claimed();
        let floor = 1_000_000u64 * (2 * 384 * 4 + 20 * 8 + 2 * 20 * 28 + 16 + 8 * 15 * 8);
        let blocks = rayon::current_num_threads() as u64 * ((1 << 26) + 8_000_000);
        assert_eq!(total, floor + blocks);
        // One view searched as it is needs no copy; two views side by side need one, and
        // with a shift also the wider view's shifted copy.
        let raw = budget(1_000_000, &[384], 1, &[Shift::Raw], 20, 15, Search::Exact).unwrap().claimed();
        assert_eq!(total - raw, 1_000_000 * 384 * 4);
        let two = budget(1_000_000, &[384, 100], 2, &all, 20, 15, Search::Exact).unwrap().claimed();
        assert_eq!(two - total, 1_000_000 * (2 * 100 + 384) * 4);
        // A TF-IDF view beside one dense view: the dense view's scaled copy is searched, and
        // with a shift its shifted copy is held while it is put in place.
        let beside = budget(1_000_000, &[384], 2, &[Shift::Raw], 20, 15, Search::Exact).unwrap().claimed();
        assert_eq!(beside - raw, 1_000_000 * 384 * 4);
        let shifted = budget(1_000_000, &[384], 2, &all, 20, 15, Search::Exact).unwrap().claimed();
        assert_eq!(shifted - total, 1_000_000 * 384 * 4);
        // Cells (1000 of them, 16 probes): per row 16 probed cells twice and 25 bytes, the
        // centroids and their sums, a wave of 2^25 / 20 slots' requests and partial lists
        // (twice), and four mean cells of rows per thread.
        let cells = Search::Cells { cells: None, probes: 16 };
        let by_cells = budget(1_000_000, &[384], 1, &all, 20, 15, cells).unwrap().claimed();
        let slots = (1u64 << 25) / 20;
        let threads = rayon::current_num_threads() as u64;
        assert_eq!(
            by_cells - total,
            1_000_000 * (8 * 16 + 25)
                + 1000 * 384 * 12
                + slots * (8 + 2 * 20 * 8)
                + threads * 4 * 1000 * 384 * 4
        );
    }

    /// Two tight groups of vectors: each row's neighbours are its own group's, nearest first.
    #[test]
    fn nearest_finds_each_rows_own_group_in_order() {
        let h = 2;
        // Rows 0..3 near (1, 0), rows 3..6 near (0, 1); row 1 is exactly (1, 0).
        let raw = [[0.99f32, 0.14], [1.0, 0.0], [0.98, -0.2], [0.1, 0.995], [0.0, 1.0], [-0.15, 0.99]];
        let v: Vec<f32> = raw
            .iter()
            .flat_map(|r| {
                let n = (r[0] * r[0] + r[1] * r[1]).sqrt();
                [r[0] / n, r[1] / n]
            })
            .collect();
        let nb = nearest(6, &v, h, &[], 2, Search::Exact, &|_| {}).0;
        for i in 0..6 {
            let group = i / 3;
            for &(j, _) in &nb[i * 2..i * 2 + 2] {
                assert_ne!(j as usize, i, "row {i} is its own neighbour");
                assert_eq!(j as usize / 3, group, "row {i}'s neighbour {j} is in the other group");
            }
            assert!(nb[i * 2].1 >= nb[i * 2 + 1].1, "row {i}: not most similar first");
        }
        // Row 0's nearest is row 1 (cosine 0.99), then row 2.
        assert_eq!((nb[0].0, nb[1].0), (1, 2));
    }

    /// The conjugate-gradient solution satisfies `(I − αS) F = (1 − α) Y`, equals the
    /// fixed point of Zhou's iteration, and spreads each seed's label over its own chain.
    #[test]
    fn spreading_solves_the_linear_system_and_labels_each_chain() {
        // Two chains of 5 rows, each row's neighbours the adjacent rows of its chain.
        let n = 10;
        let k = 2;
        let mut nb = vec![(0u32, 0f32); n * k];
        for i in 0..n {
            let base = (i / 5) * 5;
            let p = i - base;
            let (a, b) = match p {
                0 => (1, 2),
                4 => (3, 2),
                _ => (p - 1, p + 1),
            };
            let near = |q: usize| 1.0 - 0.1 * (q as f32 - p as f32).abs();
            nb[i * k] = ((base + a) as u32, near(a));
            nb[i * k + 1] = ((base + b) as u32, near(b));
        }
        let g = Graph::new(&nb, k, k);
        let classes = 2;
        let mut y = vec![0f64; n * classes];
        y[0] = 1.0; // row 0: class 0
        y[5 * classes + 1] = 1.0; // row 5: class 1
        let alpha = 0.9;
        let (f, iters, converged) = g.spread(&y, classes, alpha);
        assert!(converged && iters > 0 && iters < MAX_ITERS, "{iters}");
        let mut lhs = vec![0f64; f.len()];
        g.apply(&f, classes, alpha, &mut lhs);
        for (i, (&l, &yv)) in lhs.iter().zip(&y).enumerate() {
            assert!((l - (1.0 - alpha) * yv).abs() < 1e-8, "entry {i}: {l} vs {}", (1.0 - alpha) * yv);
        }
        // Zhou's iteration F ← αSF + (1−α)Y converges to the same F.
        let mut it = y.clone();
        for _ in 0..2000 {
            let mut s = vec![0f64; it.len()];
            g.apply(&it, classes, 1.0, &mut s); // s = it − S it
            it = it
                .iter()
                .zip(&s)
                .zip(&y)
                .map(|((&v, &sv), &yv)| alpha * (v - sv) + (1.0 - alpha) * yv)
                .collect();
        }
        for (a, b) in f.iter().zip(&it) {
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        for i in 0..n {
            let want = i / 5;
            assert_eq!(crate::backend::argmax(&f[i * classes..(i + 1) * classes]), want, "row {i}: {f:?}");
        }
        // Rows far along a chain hold less of its seed's mass.
        assert!(f[0] > f[2 * classes] && f[2 * classes] > f[4 * classes]);
    }

    /// One chain of 100 rows, the first 80 of class 0 and the last 20 of class 1, one
    /// training label at each end: plain spreading puts the border at the middle, and
    /// class-mass alignment towards the val split's 80/20 moves it towards the truth.
    /// Alignment of power 0 changes nothing; rows sharing one probability vector are
    /// aligned to the prior exactly; a class of no mass stays 0, and one of almost none
    /// overflows nothing.
    #[test]
    fn class_mass_alignment_gives_each_class_its_share() {
        let n = 100;
        let truth = |i: usize| u32::from(i >= 80);
        let mut nb = Vec::new();
        for i in 0..n {
            let (a, b) = match i {
                0 => (1, 2),
                _ if i == n - 1 => (n - 2, n - 3),
                _ => (i - 1, i + 1),
            };
            nb.extend([(a as u32, 1.0f32), (b as u32, 1.0)]);
        }
        let info: Vec<Row> = (0..n)
            .map(|i| {
                let split = match i {
                    0 | 99 => SplitKind::Train,
                    _ if i % 5 == 2 => SplitKind::Val,
                    _ => SplitKind::Unlabeled,
                };
                Row { split, label: Some(truth(i)) }
            })
            .collect();
        let prior = class_prior(&info, 2, SplitKind::Val);
        // 16 and 4 val rows, each count plus one.
        assert!((prior[0] - 17.0 / 22.0).abs() < 1e-12 && (prior[1] - 5.0 / 22.0).abs() < 1e-12, "{prior:?}");
        assert_eq!(class_prior(&info, 2, SplitKind::Train), vec![0.5, 0.5]);
        let (f, _, converged) = Graph::new(&nb, 2, 2).spread(&seed_matrix(&info, 2), 2, 0.99);
        assert!(converged);
        let p = normalised(&f, 2);
        let (mass, plain) = class_mass(&p, &info, 2);
        assert!((mass[0] + mass[1] - 1.0).abs() < 1e-9 && (plain[0] + plain[1] - 1.0).abs() < 1e-9);
        let right = |q: &[f64]| {
            let rows =
                (1..n - 1).filter(|&i| crate::backend::argmax(&q[2 * i..2 * i + 2]) == truth(i) as usize);
            rows.count() as f64 / (n - 2) as f64
        };
        assert_eq!(aligned(&p, &prior, &mass, 0.0), p);
        let q = aligned(&p, &prior, &mass, 1.0);
        let (_, shares) = class_mass(&q, &info, 2);
        eprintln!(
            "plain: right {}, shares {plain:?}; aligned: right {}, shares {shares:?}",
            right(&p),
            right(&q)
        );
        // The border sits at the middle (rows 50 to 79 wrong: 68 of the 98 rows between the
        // seeds right, give or take one) and moves at least 3 rows towards class 1's end.
        assert!((right(&p) * 98.0 - 68.0).abs() <= 1.0 + 1e-9, "plain spreading: {}", right(&p));
        assert!(right(&q) >= right(&p) + 3.0 / 98.0, "aligned: {} against {}", right(&q), right(&p));
        assert!((shares[0] - prior[0]).abs() < (plain[0] - prior[0]).abs() - 0.03, "{shares:?} {plain:?}");
        // Rows of one probability vector become the prior itself.
        let same = [0.5, 0.3, 0.2].repeat(4);
        let three: Vec<Row> = (0..4).map(|_| Row { split: SplitKind::Unlabeled, label: None }).collect();
        let (m, _) = class_mass(&same, &three, 3);
        let pi = [0.2, 0.3, 0.5];
        for row in aligned(&same, &pi, &m, 1.0).chunks(3) {
            for (a, b) in row.iter().zip(&pi) {
                assert!((a - b).abs() < 1e-12, "{row:?}");
            }
        }
        // A class no row holds has a column of zeros, and it stays so.
        let none = [0.6, 0.4, 0.0].repeat(4);
        let (m, _) = class_mass(&none, &three, 3);
        assert_eq!(m[2], 0.0);
        let q = aligned(&none, &pi, &m, 1.0);
        assert!(q.iter().all(|v| v.is_finite()) && q.chunks(3).all(|r| r[2] == 0.0), "{q:?}");
        // A class of almost no mass at the largest power: its weight would overflow f64 as
        // a ratio; relative to the largest, in logarithms, every row stays a distribution.
        let tiny = [1.0 - 1e-300, 1e-300, 0.0].repeat(4);
        let (m, _) = class_mass(&tiny, &three, 3);
        let q = aligned(&tiny, &pi, &m, 2.0);
        for row in q.chunks(3) {
            assert!(
                row.iter().all(|v| v.is_finite()) && (row.iter().sum::<f64>() - 1.0).abs() < 1e-12,
                "{row:?}"
            );
        }
    }

    #[test]
    fn shifts_take_the_common_part_out() {
        let h = 4;
        let common = [0.0f64, 0.0, 0.0, 1.0];
        // Unit small parts summing to zero, so that the common direction is exactly `common`.
        let small = [[1.0f64, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]];
        let small: Vec<[f64; 3]> = small.iter().flat_map(|s| [*s, s.map(|x| -x)]).collect();
        let mut v = Vec::new();
        for s in &small {
            let row: Vec<f64> =
                (0..h).map(|j| 3.0 * common[j] + if j < 3 { 0.5 * s[j] } else { 0.0 }).collect();
            let n = row.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.extend(row.iter().map(|x| (x / n) as f32));
        }
        v.extend([0.0f32; 4]);
        v.extend([0.0f32, 0.0, 0.0, 1.0]);
        let mut centred = v.clone();
        let did = Shift::DropTop.apply(&mut v, h);
        assert_eq!(did, Shifted { emptied: 1, unconverged: false });
        let rows: Vec<&[f32]> = v.chunks(h).collect();
        for (i, s) in small.iter().enumerate() {
            assert!(rows[i][3].abs() < 1e-5, "row {i}: {:?}", rows[i]);
            for j in 0..3 {
                assert!((f64::from(rows[i][j]) - s[j]).abs() < 1e-5, "row {i}: {:?}", rows[i]);
            }
        }
        assert_eq!(rows[8], [0.0; 4]);
        assert_eq!(rows[9], [0.0; 4]);
        // Centring subtracts the mean of the rows with a vector (the zero row has none): the
        // small parts cancel, so the mean is along `common` and every row but the last
        // keeps its small part alone; the last becomes minus the mean.
        let mut raw = centred.clone();
        assert_eq!(Shift::Raw.apply(&mut raw, h), Shifted::default());
        assert_eq!(raw, centred);
        assert_eq!(Shift::Centre.apply(&mut centred, h), Shifted::default());
        let rows: Vec<&[f32]> = centred.chunks(h).collect();
        for (i, s) in small.iter().enumerate() {
            let dot: f64 = (0..3).map(|j| f64::from(rows[i][j]) * s[j]).sum();
            let norm: f64 = rows[i].iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5 && dot > 0.9, "row {i}: {:?}", rows[i]);
        }
        assert_eq!(rows[8], [0.0; 4]);
        assert!((rows[9][3] - 1.0).abs() < 1e-6, "{:?}", rows[9]);
    }

    /// Views side by side: a dot product of combined rows is the mean of the views' cosines
    /// (here weighted 1/2 each)
    /// (a view where a row has no vector adds 0), and a shift applies to each view alone.
    #[test]
    fn views_side_by_side_average_their_cosines() {
        let unit = |v: Vec<f32>| -> Vec<f32> {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.iter().map(|x| x / n).collect()
        };
        let a = [unit(vec![1.0, 2.0, 0.5]), unit(vec![-1.0, 0.5, 2.0]), unit(vec![0.3, 0.3, 0.3])].concat();
        let b = [unit(vec![1.0, 0.0]), unit(vec![0.6, 0.8]), vec![0.0, 0.0]].concat();
        let view =
            |vectors: Vec<f32>, width| Embedded { vectors, width, sparse: None, seconds: 0.0, blank: 0 };
        let owned = [view(a.clone(), 3), view(b.clone(), 2)];
        let views = [(&owned[0], 0.5), (&owned[1], 0.5)];
        let (c, width, _) = combine(&views, Shift::Raw);
        assert_eq!(width, 5);
        let dot = |x: &[f32], y: &[f32]| x.iter().zip(y).map(|(p, q)| p * q).sum::<f32>();
        for i in 0..3 {
            for j in 0..3 {
                let want = (dot(&a[i * 3..i * 3 + 3], &a[j * 3..j * 3 + 3])
                    + dot(&b[i * 2..i * 2 + 2], &b[j * 2..j * 2 + 2]))
                    / 2.0;
                let got = dot(&c[i * 5..i * 5 + 5], &c[j * 5..j * 5 + 5]);
                assert!((got - want).abs() < 1e-6, "rows {i}, {j}: {got} against {want}");
            }
        }
        // Centring each view: the combined rows are the centred views side by side.
        let (c, _, did) = combine(&views, Shift::Centre);
        assert_eq!(did, Shifted::default());
        let (mut ca, mut cb) = (a.clone(), b.clone());
        Shift::Centre.apply(&mut ca, 3);
        Shift::Centre.apply(&mut cb, 2);
        let s = 1.0 / 2f32.sqrt();
        for i in 0..3 {
            let want: Vec<f32> =
                ca[i * 3..i * 3 + 3].iter().chain(&cb[i * 2..i * 2 + 2]).map(|x| x * s).collect();
            assert_eq!(c[i * 5..i * 5 + 5], want[..], "row {i}");
        }
        assert_eq!(cb[4..6], [0.0, 0.0], "a row without a vector stays without");
        // One view is searched as it is (shifted alone); one dense view of two (the other
        // sparse) is scaled by 1/√2 all the same.
        assert_eq!(combine(&[(&owned[0], 1.0)], Shift::Raw), (a.clone(), 3, Shifted::default()));
        let (half, _, _) = combine(&views[..1], Shift::Raw);
        assert_eq!(half, a.iter().map(|x| x * s).collect::<Vec<f32>>());
        assert_eq!(combine(&[], Shift::Raw), (Vec::new(), 0, Shifted::default()));
    }

    /// TF-IDF by hand on three rows, and a search that adds it to a dense view: the
    /// similarity is the mean of the two views' cosines.
    #[test]
    fn tfidf_rows_weigh_rare_shared_words_and_join_dense_views() {
        // Words 0..4 in rows: 0 = {0, 0, 1, 3}, 1 = {0, 1, 2}, 2 = {0, 2, 4}; words 3 and 4
        // are in one row each and weigh nothing.
        let rows: Vec<Vec<(u32, u32)>> =
            vec![vec![(0, 2), (1, 1), (3, 1)], vec![(0, 1), (1, 1), (2, 1)], vec![(0, 1), (2, 1), (4, 1)]];
        let sp = Sparse::from_counts(&rows, 5);
        // n = 3 rows.
        let idf = |df: f64| ((1.0 + 3.0) / (1.0 + df)).ln() + 1.0;
        let unit = |v: Vec<f64>| -> Vec<f64> {
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt();
            v.iter().map(|x| x / norm).collect()
        };
        // Dense [w0, w1, w2] per row.
        let want = [
            unit(vec![(1.0 + 2f64.ln()) * idf(3.0), idf(2.0), 0.0]),
            unit(vec![idf(3.0), idf(2.0), idf(2.0)]),
            unit(vec![idf(3.0), 0.0, idf(2.0)]),
        ];
        for (i, w) in want.iter().enumerate() {
            let mut got = [0f64; 3];
            for (word, x) in sp.0.rows.row(i) {
                got[word] = f64::from(x);
            }
            for c in 0..3 {
                assert!((got[c] - w[c]).abs() < 1e-6, "row {i} word {c}: {} against {}", got[c], w[c]);
            }
        }
        assert_eq!(sp.1, 0);
        // add_dots: row 0 against every row.
        let mut sim = vec![0f32; 3];
        let mut index = ListIndex::default();
        sp.0.add_dots(0, 0.5, Candidates::Span(0), &mut sim, &mut index);
        for j in 0..3 {
            let d: f64 = want[0].iter().zip(&want[j]).map(|(a, b)| a * b).sum();
            assert!((f64::from(sim[j]) - 0.5 * d).abs() < 1e-6, "row 0 · row {j}");
        }
        // The same dots among listed rows, in the list's order, through the list's index: the
        // same bits, also when the index is kept for the same list and when another list,
        // even in the same place, replaces it.
        let mut list = vec![2u32, 1];
        for want in [[sim[2], sim[1]], [sim[2], sim[1]]] {
            let mut among = vec![1f32; 2];
            sp.0.add_dots(0, 0.5, Candidates::Among(&list), &mut among, &mut index);
            assert_eq!(among, [1.0 + want[0], 1.0 + want[1]]);
        }
        list.copy_from_slice(&[0, 2]);
        let mut among = vec![1f32; 2];
        sp.0.add_dots(1, 0.5, Candidates::Among(&list), &mut among, &mut index);
        let mut from_one = vec![1f32; 3];
        sp.0.add_dots(1, 0.5, Candidates::Span(0), &mut from_one, &mut index);
        assert_eq!(among, [from_one[0], from_one[2]]);
        // A span of rows (a tile of the exact search): rows 1 and 2 only, the same bits.
        let mut span = vec![1f32; 2];
        sp.0.add_dots(0, 0.5, Candidates::Span(1), &mut span, &mut index);
        assert_eq!(span, [1.0 + sim[1], 1.0 + sim[2]]);
        // A row of single-row words only has no vector.
        let lone = Sparse::from_counts(&[vec![(0, 1)], vec![(0, 1)], vec![(1, 3)]], 2);
        assert_eq!(lone.1, 1);
        assert_eq!(lone.0.rows.row(2).count(), 0);
        // Beside a dense view: dense rows scaled by 1/√2 plus half the TF-IDF dot.
        let dense = [1.0f32, 0.0, 0.6, 0.8, 0.0, 1.0];
        let e = Embedded { vectors: dense.to_vec(), width: 2, sparse: None, seconds: 0.0, blank: 0 };
        let (c, h, _) = combine(&[(&e, 0.5)], Shift::Raw);
        let nb = nearest(3, &c, h, &[(&sp.0, 0.5)], 2, Search::Exact, &|_| {}).0;
        for i in 0..3 {
            for &(j, s) in &nb[i * 2..i * 2 + 2] {
                let j = j as usize;
                let cos_dense = dense[i * 2] * dense[j * 2] + dense[i * 2 + 1] * dense[j * 2 + 1];
                let cos_sparse: f64 = want[i].iter().zip(&want[j]).map(|(a, b)| a * b).sum();
                let mean = (f64::from(cos_dense) + cos_sparse) / 2.0;
                assert!((f64::from(s) - mean).abs() < 1e-5, "rows {i}, {j}: {s} against {mean}");
            }
        }
        // Without a dense view the TF-IDF cosines alone rank the rows.
        let cos = |i: usize, j: usize| want[i].iter().zip(&want[j]).map(|(a, b)| a * b).sum::<f64>();
        let alone = nearest(3, &[], 0, &[(&sp.0, 1.0)], 1, Search::Exact, &|_| {}).0;
        for (i, &(j, s)) in alone.iter().enumerate() {
            let best = (0..3).filter(|&j| j != i).max_by(|&a, &b| cos(i, a).total_cmp(&cos(i, b))).unwrap();
            assert_eq!(j as usize, best, "row {i}");
            assert!((f64::from(s) - cos(i, best)).abs() < 1e-6, "row {i}");
        }
    }

    /// The search of a grid setting against brute force: with two dense views and a TF-IDF
    /// view, or one dense view and a TF-IDF view, shifted or not, every row's neighbours
    /// are the rows of largest mean cosine over the views, with those similarities.
    #[test]
    fn neighbours_rank_by_the_mean_of_every_views_cosine() {
        let n = 40;
        let mut rng = crate::rng::Stream::new(5, crate::rng::Purpose::Init, 0);
        let mut dense = |h: usize| -> Vec<f32> {
            let mut v: Vec<f32> = (0..n * h).map(|_| rng.below(9) as f32 - 3.5).collect();
            for row in v.chunks_mut(h) {
                let norm = row.iter().map(|x| x * x).sum::<f32>().sqrt();
                row.iter_mut().for_each(|x| *x /= norm);
            }
            v
        };
        let (a, b) = (dense(3), dense(2));
        // Words 0..12: each row holds three of them, so rows share some.
        let counts: Vec<Vec<(u32, u32)>> =
            (0..n as u32).map(|i| vec![(i % 4, 1 + i % 3), (4 + i % 5, 1), (9 + i % 3, 2)]).collect();
        let t = Sparse::from_counts(&counts, 12).0;
        let sparse_cos = |i: usize, j: usize| -> f64 {
            let mut sim = vec![0f32; n];
            t.add_dots(i, 1.0, Candidates::Span(0), &mut sim, &mut ListIndex::default());
            f64::from(sim[j])
        };
        let cos = |v: &[f32], h: usize, i: usize, j: usize| -> f64 {
            v[i * h..(i + 1) * h].iter().zip(&v[j * h..(j + 1) * h]).map(|(x, y)| f64::from(x * y)).sum()
        };
        let dense_view =
            |v: &[f32], h| Embedded { vectors: v.to_vec(), width: h, sparse: None, seconds: 0.0, blank: 0 };
        let sparse_view = || Embedded {
            vectors: Vec::new(),
            width: 0,
            sparse: Some(Sparse::from_counts(&counts, 12).0),
            seconds: 0.0,
            blank: 0,
        };
        let k = 5;
        for shift in Shift::ALL {
            let (mut sa, mut sb) = (a.clone(), b.clone());
            shift.apply(&mut sa, 3);
            shift.apply(&mut sb, 2);
            let three = [dense_view(&a, 3), dense_view(&b, 2), sparse_view()];
            let two = [dense_view(&a, 3), sparse_view()];
            let want3 = |i, j| (cos(&sa, 3, i, j) + cos(&sb, 2, i, j) + sparse_cos(i, j)) / 3.0;
            let want2 = |i, j| (cos(&sa, 3, i, j) + sparse_cos(i, j)) / 2.0;
            // Weighted 0.6, 0.1 and 0.3; and the first view alone, the others at weight 0.
            let weighted = |i, j| 0.6 * cos(&sa, 3, i, j) + 0.1 * cos(&sb, 2, i, j) + 0.3 * sparse_cos(i, j);
            let first = |i, j| cos(&sa, 3, i, j);
            type Want<'a> = &'a dyn Fn(usize, usize) -> f64;
            let third = 1.0 / 3.0;
            let cases: [(&[Embedded], &[f64], Want); 4] = [
                (&three, &[third, third, third], &want3),
                (&two, &[0.5, 0.5], &want2),
                (&three, &[0.6, 0.1, 0.3], &weighted),
                (&three, &[1.0, 0.0, 0.0], &first),
            ];
            // Cells that probe every cell compare every pair, as the exact search does (their
            // sparse dots through the listed rows' path).
            let searches = [Search::Exact, Search::Cells { cells: Some(4), probes: 4 }];
            for ((views, weights, want), search) in cases.iter().flat_map(|c| searches.map(|s| (c, s))) {
                let (got, _, cells) = neighbours(views, n, shift, k, weights, search, &|_| {});
                assert_eq!(cells.is_some(), search != Search::Exact);
                if let Some(c) = cells {
                    assert_eq!(c.recall, Some(1.0), "{search:?}: every exact neighbour found");
                }
                for i in 0..n {
                    let mut all: Vec<f64> = (0..n).filter(|&j| j != i).map(|j| want(i, j)).collect();
                    all.sort_by(|x, y| y.total_cmp(x));
                    for (r, &(j, s)) in got[i * k..(i + 1) * k].iter().enumerate() {
                        let j = j as usize;
                        assert_ne!(j, i);
                        let w = want(i, j);
                        assert!(
                            (f64::from(s) - w).abs() < 1e-5,
                            "{shift:?}, weights {weights:?}, rows {i}, {j}: {s} against {w}"
                        );
                        assert!(
                            (w - all[r]).abs() < 1e-5,
                            "{shift:?}, weights {weights:?}: row {i}'s neighbour {r} is not the nearest but {r}"
                        );
                    }
                }
            }
        }
    }

    /// Power iteration tells whether it settled: at once for one clear top direction; not
    /// within its limit when the top two singular values are 10 000 and 9 999 (squared),
    /// and `drop-top` says so.
    #[test]
    fn drop_top_reports_a_direction_that_did_not_settle() {
        let (u, converged) = top_direction(&[1.0, 0.0, 1.0, 0.0, 0.0, 1.0], 2).unwrap();
        assert!(converged && (u[0].abs() - 1.0).abs() < 1e-9, "{u:?}");
        let mut v: Vec<f32> = (0..10_000).flat_map(|_| [1.0f32, 0.0]).collect();
        v.extend((0..9_999).flat_map(|_| [0.0f32, 1.0]));
        let (_, converged) = top_direction(&v, 2).unwrap();
        assert!(!converged);
        assert!(Shift::DropTop.apply(&mut v, 2).unconverged);
        assert_eq!(top_direction(&[0.0; 4], 2), None);
    }

    #[test]
    fn logits_give_the_normalised_scores_back() {
        let f = [0.3, 0.1, 0.0, -1e-12, 0.0, 0.0];
        let z = to_logits(&normalised(&f, 3), 3);
        let p: Vec<f32> = z.iter().map(|v| v.exp()).collect();
        assert!((p[0] - 0.75).abs() < 1e-6 && (p[1] - 0.25).abs() < 1e-6 && p[2] <= FLOOR * 1.0001);
        // A row no seed reaches (negative round-off only) is uniform.
        for v in &p[3..] {
            assert!((v - 1.0 / 3.0).abs() < 1e-6, "{p:?}");
        }
        assert!(z.iter().all(|v| v.is_finite()));
    }

    /// `--weights` parses one weight per view and refuses what is no weighting; the grid's
    /// weightings must fit the views and differ in their ratios.
    #[test]
    fn view_weights_are_checked() {
        assert_eq!("2, 1,0.5".parse::<Weights>(), Ok(Weights(vec![2.0, 1.0, 0.5])));
        for (text, want) in [
            ("1,x", "`x` in `1,x`: expected a number"),
            ("1,-1", "`1,-1`: a view's weight must be finite and at least 0, not -1"),
            ("1,inf", "must be finite and at least 0, not inf"),
            ("1,NaN", "not NaN"),
            ("1,-1e300", "not -1e300"),
            ("0,0", "`0,0`: at least one view's weight must be above 0"),
            ("", "expected a number"),
        ] {
            let e = text.parse::<Weights>().unwrap_err();
            assert!(e.contains(want), "{text}: {e}");
        }
        let o = |w: &[&[f64]]| Options {
            ks: vec![5],
            alphas: vec![0.9],
            shifts: vec![Shift::Raw],
            aligns: vec![0.0],
            prior: ClassPrior::Val,
            weights: w.iter().map(|w| Weights(w.to_vec())).collect(),
            search: Search::Exact,
            batch_size: 64,
            progress: false,
        };
        // A weighting is named as --weights reads it, large numbers with their exponent.
        assert_eq!(Weights(vec![1e300, 0.5]).name(), "1e300,0.5");
        let got = weightings(&o(&[]), 4).unwrap();
        assert_eq!(got, vec![(Weights(vec![1.0; 4]), vec![0.25; 4])]);
        let got = weightings(&o(&[&[3.0, 1.0], &[1.0, 0.0]]), 2).unwrap();
        assert_eq!(got[0].1, vec![0.75, 0.25]);
        // Weights whose sum would overflow are still the same ratios.
        let e = weightings(&o(&[&[1.0, 1.0], &[1e308, 1e308]]), 2).unwrap_err().to_string();
        assert!(e.contains("the same graph as --weights 1,1"), "{e}");
        assert_eq!(got[1], (Weights(vec![1.0, 0.0]), vec![1.0, 0.0]));
        let e = weightings(&o(&[&[0.0, 0.0]]), 2).unwrap_err().to_string();
        assert!(e.contains("--weights 0,0: at least one view's weight must be above 0"), "{e}");
        let e = weightings(&o(&[&[1.0, 1.0, 1.0]]), 2).unwrap_err().to_string();
        assert!(
            e.contains(
                "--weights 1,1,1: 3 weights for 2 views (one per view, in order: each --model, then --tfidf)"
            ),
            "{e}"
        );
        let e = weightings(&o(&[&[2.0, 1.0], &[4.0, 2.0]]), 2).unwrap_err().to_string();
        assert!(e.contains("--weights 4,2: the same graph as --weights 2,1"), "{e}");
    }

    #[test]
    fn the_grid_is_checked() {
        let ok = Options {
            ks: vec![5],
            alphas: vec![0.9],
            shifts: vec![Shift::Raw],
            aligns: vec![0.0, 0.5],
            prior: ClassPrior::Val,
            weights: vec![],
            search: Search::Exact,
            batch_size: 64,
            progress: false,
        };
        check_options(&ok).unwrap();
        for (o, want) in [
            (Options { ks: vec![], ..ok.clone() }, "at least one value"),
            (Options { ks: vec![0], ..ok.clone() }, "--k 0"),
            (Options { alphas: vec![1.0], ..ok.clone() }, "--alpha 1"),
            (Options { alphas: vec![0.9999], ..ok.clone() }, "--alpha 0.9999: must be in (0, 0.999]"),
            (Options { alphas: vec![f64::NAN], ..ok.clone() }, "--alpha NaN"),
            (Options { batch_size: 0, ..ok.clone() }, "--batch-size 0"),
            (Options { shifts: vec![], ..ok.clone() }, "--align each need at least one value"),
            (Options { aligns: vec![], ..ok.clone() }, "--align each need at least one value"),
            (Options { aligns: vec![-0.5], ..ok.clone() }, "--align -0.5: must be in [0, 2]"),
            (Options { aligns: vec![f64::NAN], ..ok.clone() }, "--align NaN"),
            (Options { aligns: vec![0.5, 1.0, 0.5], ..ok.clone() }, "--align 0.5: given twice"),
            (Options { ks: vec![3, 3], ..ok.clone() }, "--k 3: given twice"),
            (Options { alphas: vec![0.9, 0.5, 0.9], ..ok.clone() }, "--alpha 0.9: given twice"),
            (
                Options { shifts: vec![Shift::Centre, Shift::Raw, Shift::Centre], ..ok.clone() },
                "--shift centre: given twice",
            ),
        ] {
            let e = check_options(&o).unwrap_err().to_string();
            assert!(e.contains(want), "{e}");
        }
    }
}
