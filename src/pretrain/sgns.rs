//! Skip-gram and CBOW with negative sampling: the per-thread update loop over word
//! sequences, writing into tables shared by all threads without locks (Hogwild), with its
//! samplers (window sizes, subsampling, the negative table).
//!
//! The update is fastText's (METHODS.md §12b). For an input bag `I` (a word's features for
//! skip-gram; the features of every context word for CBOW) and a target word `t`:
//! ```text
//! h     = mean of input[i], i ∈ I
//! loss  = −log σ(out[t]·h) − Σ_{n ∈ negatives} log σ(−out[n]·h)
//! out[t], out[n]  −= lr · ∂loss/∂out[·]                 (the exact gradient)
//! input[i]        −= lr · ∂loss/∂h   for every i ∈ I    (as fastText: not divided by |I|)
//! ```
//! The input rows receive `|I|` times their exact gradient, as in fastText, whose learning
//! rates and quality figures assume it; the gradient check in the tests pins both parts.
//!
//! # Hogwild
//! Threads read and write the shared tables with plain loads and stores, as fastText and
//! word2vec do: two threads touching the same row at once may lose one of the updates. This
//! is a data race, which Rust (like C++) formally leaves undefined; it is confined to
//! [`SharedTables`], whose raw pointers never become references that outlive one row
//! operation. On x86-64 and AArch64 aligned f32 stores do not tear, and the lost updates
//! are what Hogwild SGD tolerates by design. With one thread there is no race and a run is
//! deterministic.

use crate::config::Objective;
use crate::rng::{Fast, Stream};

/// Entries of the negative-sampling table (fastText's size).
pub const NEGATIVE_TABLE_SIZE: usize = 10_000_000;

/// The negative-sampling table: word indices, word `w` appearing about
/// `size · count_w^power / Σ count^power` times (at least once), shuffled. Drawing a uniform
/// entry draws word `w` with that probability.
pub fn negative_table(counts: &[u64], power: f64, size: usize, stream: &mut Stream) -> Vec<u32> {
    let z: f64 = counts.iter().map(|&c| (c as f64).powf(power)).sum();
    let mut table = Vec::with_capacity(size + counts.len());
    for (w, &c) in counts.iter().enumerate() {
        let share = (c as f64).powf(power) * size as f64 / z;
        let n = (share.ceil() as usize).max(1);
        table.extend(std::iter::repeat_n(w as u32, n));
    }
    stream.shuffle(&mut table);
    table
}

/// The probability of keeping one occurrence of a word of `count` among `total` tokens:
/// `min(1, √(t/f) + t/f)` with `f = count/total` (fastText's rule); 1 when `t = 0`.
pub fn keep_probability(count: u64, total: u64, t: f64) -> f32 {
    if t == 0.0 || count == 0 {
        return 1.0;
    }
    let f = count as f64 / total as f64;
    ((t / f).sqrt() + t / f).min(1.0) as f32
}

/// What the update loop reads and never writes: the trained words' features and samplers.
pub struct Lexicon {
    /// Feature ids of word `w`: `feat_ids[feat_offsets[w]..feat_offsets[w + 1]]`.
    pub feat_offsets: Vec<u32>,
    pub feat_ids: Vec<u32>,
    /// Data set vocabulary index → trained word index, or [`DROPPED`].
    pub keep: Vec<u32>,
    /// Keep probability of each trained word (subsampling).
    pub keep_prob: Vec<f32>,
    pub negatives: Vec<u32>,
}

/// Marks a vocabulary word that is not trained (below `min_count`).
pub const DROPPED: u32 = u32::MAX;

impl Lexicon {
    /// The feature ids of trained word `w`.
    #[inline]
    pub fn features(&self, w: u32) -> &[u32] {
        &self.feat_ids[self.feat_offsets[w as usize] as usize..self.feat_offsets[w as usize + 1] as usize]
    }
}

/// The input table (`rows_in × dim`) and the output matrix (`rows_out × dim`), shared by the
/// worker threads without locks for the lifetime `'t` of their borrow. See the module's
/// `# Hogwild` section.
pub struct SharedTables<'t> {
    input: *mut f32,
    output: *mut f32,
    rows_in: usize,
    rows_out: usize,
    dim: usize,
    _borrow: std::marker::PhantomData<&'t mut [f32]>,
}

// SAFETY: the pointers stay valid for `'t` (the borrow in `new`); concurrent access is the
// documented Hogwild race on f32 values, never on pointers or lengths.
unsafe impl Send for SharedTables<'_> {}
unsafe impl Sync for SharedTables<'_> {}

impl<'t> SharedTables<'t> {
    /// Shares `input` and `output` (row-major, `dim` columns) for the lifetime of the borrow.
    pub fn new(input: &'t mut [f32], output: &'t mut [f32], dim: usize) -> Self {
        assert!(dim > 0 && input.len() % dim == 0 && output.len() % dim == 0);
        SharedTables {
            rows_in: input.len() / dim,
            rows_out: output.len() / dim,
            input: input.as_mut_ptr(),
            output: output.as_mut_ptr(),
            dim,
            _borrow: std::marker::PhantomData,
        }
    }

    /// Row `r` of the input table, for the duration of one row operation.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    fn input_row(&self, r: u32) -> &mut [f32] {
        assert!((r as usize) < self.rows_in, "input row {r} out of range");
        // SAFETY: in bounds (checked above) of a live allocation; aliasing with other threads
        // is the documented Hogwild race, and no two live references come from one thread.
        unsafe { std::slice::from_raw_parts_mut(self.input.add(r as usize * self.dim), self.dim) }
    }

    /// Row `r` of the output matrix, for the duration of one row operation.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    fn output_row(&self, r: u32) -> &mut [f32] {
        assert!((r as usize) < self.rows_out, "output row {r} out of range");
        // SAFETY: as in `input_row`.
        unsafe { std::slice::from_raw_parts_mut(self.output.add(r as usize * self.dim), self.dim) }
    }
}

/// The hyperparameters the update loop reads.
#[derive(Debug, Clone, Copy)]
pub struct Hyper {
    pub objective: Objective,
    pub window: u32,
    pub negatives: u32,
}

/// `Σ a[i]·b[i]` with eight partial sums, so that the compiler vectorises it (a single f32
/// accumulator fixes the order of additions and keeps the loop scalar).
#[inline]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut s = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// `y += a·x`.
#[inline]
fn axpy(a: f32, x: &[f32], y: &mut [f32]) {
    for (y, x) in y.iter_mut().zip(x) {
        *y += a * x;
    }
}

/// `−log σ(s)` for label 1, `−log σ(−s)` for label 0, computed without overflow.
#[inline]
fn logistic_loss(s: f32, positive: bool) -> f32 {
    let z = if positive { -s } else { s };
    // log(1 + e^z) = max(z, 0) + log(1 + e^−|z|)
    z.max(0.0) + (-z.abs()).exp().ln_1p()
}

/// One thread's state: its random stream, scratch rows, and running loss.
pub struct Worker<'a> {
    hyper: Hyper,
    lex: &'a Lexicon,
    tables: &'a SharedTables<'a>,
    rng: Fast,
    hidden: Vec<f32>,
    grad: Vec<f32>,
    line: Vec<u32>,
    bow: Vec<u32>,
    negs: Vec<u32>,
    /// Sum of the loss over predicted words since the counters were last read.
    pub loss_sum: f64,
    /// Predicted words (positive targets) since the counters were last read.
    pub predictions: u64,
}

impl<'a> Worker<'a> {
    pub fn new(hyper: Hyper, lex: &'a Lexicon, tables: &'a SharedTables<'a>, rng: Fast) -> Self {
        let dim = tables.dim;
        Worker {
            hyper,
            lex,
            tables,
            rng,
            hidden: vec![0.0; dim],
            grad: vec![0.0; dim],
            line: Vec::new(),
            bow: Vec::new(),
            negs: Vec::new(),
            loss_sum: 0.0,
            predictions: 0,
        }
    }

    /// Ends the worker, handing back its random stream (a thread's stream runs on across
    /// the rounds of an epoch).
    pub fn into_rng(self) -> Fast {
        self.rng
    }

    /// Trains on one document's words (data set vocabulary indices) at rate `lr`: drops
    /// untrained words, subsamples, then slides the window. Returns the tokens read (trained
    /// words before subsampling), which drive the learning-rate schedule.
    pub fn document(&mut self, words: &[u32], lr: f32) -> u64 {
        let mut line = std::mem::take(&mut self.line);
        line.clear();
        let mut read = 0u64;
        for &v in words {
            let w = self.lex.keep[v as usize];
            if w == DROPPED {
                continue;
            }
            read += 1;
            if self.rng.unit_f32() < self.lex.keep_prob[w as usize] {
                line.push(w);
            }
        }
        match self.hyper.objective {
            Objective::Skipgram => self.skipgram(&line, lr),
            Objective::Cbow => self.cbow(&line, lr),
            Objective::Mlm => unreachable!("pretrain_on refuses the mlm objective"),
        }
        self.line = line;
        read
    }

    /// The window around position `w` of a line of `len` words: a size `b` drawn uniformly
    /// in `1..=window`, clipped to the line; returns the position range `lo..hi`.
    fn window(&mut self, w: usize, len: usize) -> (usize, usize) {
        let b = 1 + self.rng.below(u64::from(self.hyper.window)) as usize;
        (w.saturating_sub(b), (w + b + 1).min(len))
    }

    fn skipgram(&mut self, line: &[u32], lr: f32) {
        for (w, &centre) in line.iter().enumerate() {
            let (lo, hi) = self.window(w, line.len());
            let inputs = self.lex.features(centre);
            for (c, &ctx) in line[lo..hi].iter().enumerate() {
                if lo + c != w {
                    self.update(inputs, ctx, lr);
                }
            }
        }
    }

    fn cbow(&mut self, line: &[u32], lr: f32) {
        let mut bow = std::mem::take(&mut self.bow);
        for (w, &centre) in line.iter().enumerate() {
            let (lo, hi) = self.window(w, line.len());
            bow.clear();
            for (c, &ctx) in line[lo..hi].iter().enumerate() {
                if lo + c != w {
                    bow.extend_from_slice(self.lex.features(ctx));
                }
            }
            self.update(&bow, centre, lr);
        }
        self.bow = bow;
    }

    /// Draws `negatives` words other than `target` from the negative table, then applies
    /// [`Worker::update_with`].
    fn update(&mut self, inputs: &[u32], target: u32, lr: f32) {
        let mut negs = std::mem::take(&mut self.negs);
        negs.clear();
        let table = &self.lex.negatives;
        // Bounded: where one word fills nearly the whole table, its own updates would
        // otherwise redraw for ever; they take the negatives found.
        let want = self.hyper.negatives as usize;
        for _ in 0..64 * want {
            if negs.len() == want {
                break;
            }
            let n = table[self.rng.below(table.len() as u64) as usize];
            if n != target {
                negs.push(n);
            }
        }
        self.update_with(inputs, target, &negs, lr);
        self.negs = negs;
    }

    /// One SGD step of the negative-sampling loss for input bag `inputs`, positive `target`
    /// and the given negatives (module docs). Returns the loss before the step.
    pub fn update_with(&mut self, inputs: &[u32], target: u32, negs: &[u32], lr: f32) -> f32 {
        if inputs.is_empty() {
            return 0.0;
        }
        let t = self.tables;
        self.hidden.fill(0.0);
        for &i in inputs {
            axpy(1.0, t.input_row(i), &mut self.hidden);
        }
        let inv = 1.0 / inputs.len() as f32;
        self.hidden.iter_mut().for_each(|h| *h *= inv);
        self.grad.fill(0.0);
        let mut loss = 0.0;
        for (k, &o) in std::iter::once(&target).chain(negs).enumerate() {
            let positive = k == 0;
            let row = t.output_row(o);
            let s = dot(row, &self.hidden);
            loss += logistic_loss(s, positive);
            // ∂loss/∂s = σ(s) − label; alpha = −lr·∂loss/∂s.
            let sigma = 1.0 / (1.0 + (-s).exp());
            let alpha = lr * (f32::from(u8::from(positive)) - sigma);
            axpy(alpha, row, &mut self.grad);
            axpy(alpha, &self.hidden, row);
        }
        for &i in inputs {
            axpy(1.0, &self.grad, t.input_row(i));
        }
        self.loss_sum += f64::from(loss);
        self.predictions += 1;
        loss
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Purpose;

    #[test]
    fn negative_table_follows_the_powered_unigram_distribution() {
        let counts = [1000u64, 100, 10, 1, 0];
        let size = 100_000;
        let table = negative_table(&counts, 0.75, size, &mut Stream::new(1, Purpose::NegativeTable, 0));
        let z: f64 = counts.iter().map(|&c| (c as f64).powf(0.75)).sum();
        let mut seen = [0usize; 5];
        for &w in &table {
            seen[w as usize] += 1;
        }
        for (w, &c) in counts.iter().enumerate() {
            let want = (c as f64).powf(0.75) / z * size as f64;
            // Each word's share is rounded up, and every word appears at least once.
            assert!(seen[w] as f64 >= want && seen[w] as f64 <= want.max(1.0) + 1.0, "{w}: {seen:?}");
        }
        // Power 0.75 flattens the distribution: word 0 is 10× word 1 in counts but
        // 10^0.75 ≈ 5.6× in the table.
        let ratio = seen[0] as f64 / seen[1] as f64;
        assert!((ratio - 10f64.powf(0.75)).abs() < 0.01, "{ratio}");
        // Shuffled: the first entries are not one block of word 0.
        assert!(table[..64].iter().any(|&w| w != 0));
        // Uniform draws from the table follow the same shares.
        let mut rng = Fast::from_stream(&mut Stream::new(2, Purpose::Pretrain, 0));
        let mut drawn = [0u32; 5];
        for _ in 0..200_000 {
            drawn[table[rng.below(table.len() as u64) as usize] as usize] += 1;
        }
        let p0 = drawn[0] as f64 / 200_000.0;
        assert!((p0 - 1000f64.powf(0.75) / z).abs() < 0.01, "{p0}");
    }

    #[test]
    fn subsampling_keeps_rare_words_and_thins_frequent_ones() {
        let total = 1_000_000;
        // f = 1e-4 = t: √1 + 1 = 2 → capped at 1.
        assert_eq!(keep_probability(100, total, 1e-4), 1.0);
        // f = 0.01: √0.01 + 0.01 = 0.11.
        assert!((keep_probability(10_000, total, 1e-4) - 0.11).abs() < 1e-6);
        // f = 0.25: √(4e-4) + 4e-4 = 0.0204.
        assert!((keep_probability(250_000, total, 1e-4) - 0.0204).abs() < 1e-6);
        assert_eq!(keep_probability(250_000, total, 0.0), 1.0);
        // Monotone: the more frequent, the less kept.
        let p: Vec<f32> =
            [1_000, 10_000, 100_000].iter().map(|&c| keep_probability(c, total, 1e-3)).collect();
        assert!(p[0] > p[1] && p[1] > p[2], "{p:?}");
        // And the sampler keeps about that fraction of occurrences.
        let lex = Lexicon {
            feat_offsets: vec![0, 1, 2],
            feat_ids: vec![0, 1],
            keep: vec![0, 1],
            keep_prob: vec![1.0, 0.11],
            negatives: vec![0, 1],
        };
        let (mut input, mut output) = (vec![0.0f32; 2 * 4], vec![0.0f32; 2 * 4]);
        let shared = SharedTables::new(&mut input, &mut output, 4);
        let hyper = Hyper { objective: Objective::Cbow, window: 1, negatives: 1 };
        let mut w =
            Worker::new(hyper, &lex, &shared, Fast::from_stream(&mut Stream::new(1, Purpose::Pretrain, 0)));
        let doc = vec![1u32; 100_000];
        assert_eq!(w.document(&doc, 0.0), 100_000);
        // Each kept word of the line is one CBOW prediction.
        let kept = w.predictions as f64 / 100_000.0;
        assert!((kept - 0.11).abs() < 0.005, "{kept}");
    }

    /// The loss of the module docs in f64, for finite differences.
    fn loss_f64(input: &[f64], output: &[f64], dim: usize, ids: &[u32], target: u32, negs: &[u32]) -> f64 {
        let mut h = vec![0.0; dim];
        for &i in ids {
            for d in 0..dim {
                h[d] += input[i as usize * dim + d] / ids.len() as f64;
            }
        }
        let score = |o: u32| (0..dim).map(|d| output[o as usize * dim + d] * h[d]).sum::<f64>();
        let sig = |x: f64| 1.0 / (1.0 + (-x).exp());
        -sig(score(target)).ln() - negs.iter().map(|&n| sig(-score(n)).ln()).sum::<f64>()
    }

    #[test]
    fn the_update_is_a_gradient_step_of_the_loss() {
        let dim = 5;
        let mut s = Stream::new(9, Purpose::Init, 0);
        let mut uni = |scale: f64| (s.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * 2.0 * scale - scale;
        let input: Vec<f32> = (0..4 * dim).map(|_| uni(0.8) as f32).collect();
        let output: Vec<f32> = (0..3 * dim).map(|_| uni(0.8) as f32).collect();
        let (ids, target, negs) = ([0u32, 2, 3], 1u32, [0u32, 2]);
        let lr = 1e-3f32;
        let (mut i2, mut o2) = (input.clone(), output.clone());
        let lex = Lexicon {
            feat_offsets: vec![0],
            feat_ids: vec![],
            keep: vec![],
            keep_prob: vec![],
            negatives: vec![],
        };
        let loss = {
            let shared = SharedTables::new(&mut i2, &mut o2, dim);
            let hyper = Hyper { objective: Objective::Skipgram, window: 1, negatives: 2 };
            let rng = Fast::from_stream(&mut Stream::new(1, Purpose::Pretrain, 0));
            Worker::new(hyper, &lex, &shared, rng).update_with(&ids, target, &negs, lr)
        };
        let (fi, fo): (Vec<f64>, Vec<f64>) =
            (input.iter().map(|&v| f64::from(v)).collect(), output.iter().map(|&v| f64::from(v)).collect());
        let l0 = loss_f64(&fi, &fo, dim, &ids, target, &negs);
        assert!((f64::from(loss) - l0).abs() < 1e-5, "{loss} vs {l0}");
        // Central differences of the loss in one coordinate of `x`.
        let numeric = |x: &[f64], k: usize, f: &dyn Fn(&[f64]) -> f64| {
            let (mut p, mut m) = (x.to_vec(), x.to_vec());
            p[k] += 1e-6;
            m[k] -= 1e-6;
            (f(&p) - f(&m)) / 2e-6
        };
        let lr64 = f64::from(lr);
        // Output rows: the step is −lr·∂loss/∂row.
        for k in 0..fo.len() {
            let g = numeric(&fo, k, &|o| loss_f64(&fi, o, dim, &ids, target, &negs));
            let step = f64::from(o2[k] - output[k]);
            assert!((step + lr64 * g).abs() < 2e-7, "output[{k}]: step {step}, −lr·g {}", -lr64 * g);
        }
        // Input rows: −lr·∂loss/∂h = −lr·|I|·∂loss/∂row (fastText's unnormalised update).
        for k in 0..fi.len() {
            let g = numeric(&fi, k, &|i| loss_f64(i, &fo, dim, &ids, target, &negs));
            let step = f64::from(i2[k] - input[k]);
            let want = -lr64 * ids.len() as f64 * g;
            assert!((step - want).abs() < 2e-7, "input[{k}]: step {step}, want {want}");
        }
        // Row 1 is no input: untouched.
        assert_eq!(&i2[dim..2 * dim], &input[dim..2 * dim]);
    }

    #[test]
    fn dot_matches_the_plain_sum() {
        let a: Vec<f32> = (0..37).map(|i| i as f32 * 0.25 - 3.0).collect();
        let b: Vec<f32> = (0..37).map(|i| (i % 7) as f32 - 2.5).collect();
        let plain: f64 = a.iter().zip(&b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
        assert!((f64::from(dot(&a, &b)) - plain).abs() < 1e-3);
        assert!((logistic_loss(0.0, true) - 2f32.ln()).abs() < 1e-6);
        assert!((logistic_loss(100.0, false) - 100.0).abs() < 1e-3);
        assert!(logistic_loss(100.0, true) < 1e-6);
    }
}
