//! The fastText-style bag-of-n-grams classifier: embedding bag → optional hidden layers →
//! linear output, with explicit forward and backward passes over a flat parameter buffer.
//!
//! Shapes (n documents in the batch, D = dim, Hk = hidden sizes, C = classes):
//! ```text
//! pooled   n×D   = mean of embedding.weight[ids of each document]   (B×D table)
//! x0       n×D   = dropout(pooled, embed_dropout)                  site 0
//! h_k      n×Hk  = dropout(act(x_{k}·hidden.k.weightᵀ + hidden.k.bias), hidden_dropout)  site k+1
//! logits   n×C   = x_L·output.weightᵀ + output.bias
//! ```
//! Tensor names (also the safetensors names): `embedding.weight` [B, D],
//! `hidden.{k}.weight` [Hk, H(k−1)], `hidden.{k}.bias` [Hk], `output.weight` [C, H_last],
//! `output.bias` [C].

use serde::{Deserialize, Serialize};

use crate::backend::{Activation, Backend, DropoutKey, Real, SparseRows};
use crate::model::mlp::{Mlp, MlpActs};
use crate::model::params::{fill_uniform, Layout, Slot};

/// The bag model's hyperparameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BagSpec {
    /// Rows of the embedding table (the data set's hash buckets).
    pub buckets: usize,
    /// Embedding width D.
    pub dim: usize,
    /// Hidden layer widths; empty for the linear model.
    pub hidden: Vec<usize>,
    /// Non-linearity of the hidden layers.
    pub activation: Activation,
    /// Dropout on the pooled embedding.
    pub embed_dropout: f32,
    /// Dropout after each hidden layer.
    pub hidden_dropout: f32,
    /// Output classes C.
    pub classes: usize,
}

impl BagSpec {
    /// Checks the sizes, so that the layout's arithmetic cannot overflow and a corrupted
    /// spec cannot ask for an absurd allocation: ids are u32, widths at most 65536, classes
    /// at most 2^20.
    pub fn validate(&self) -> Result<(), String> {
        if self.buckets < 1 || self.buckets > u32::MAX as usize {
            return Err(format!("buckets {} outside 1..=2^32-1", self.buckets));
        }
        if self.dim < 1 || self.dim > 65_536 || self.hidden.iter().any(|&h| !(1..=65_536).contains(&h)) {
            return Err("widths must be in 1..=65536".into());
        }
        if self.classes < 1 || self.classes > super::MAX_CLASSES {
            return Err(format!("classes {} outside 1..=2^20", self.classes));
        }
        if self.hidden.len() > 64 {
            return Err("at most 64 hidden layers".into());
        }
        for p in [self.embed_dropout, self.hidden_dropout] {
            if !(0.0..1.0).contains(&p) {
                return Err("dropout must be in [0, 1)".into());
            }
        }
        Ok(())
    }
}

/// The model: its spec, the embedding table's slot and the dense stack.
#[derive(Debug, Clone)]
pub struct BagModel {
    pub spec: BagSpec,
    pub layout: Layout,
    pub table: Slot,
    pub mlp: Mlp,
}

/// Saved activations of one forward pass, for its backward pass.
pub struct Activations<B: Backend> {
    n: usize,
    /// x0 (after dropout).
    x0: B::Buf,
    mlp: MlpActs<B>,
    /// n×C logits.
    pub logits: B::Buf,
    key: Option<DropoutKey>,
}

impl<B: Backend> Activations<B> {
    /// Empty buffers; they grow to the batch's size on first use.
    pub fn new(be: &B, model: &BagModel) -> Self {
        Activations {
            n: 0,
            x0: be.zeros(0),
            mlp: MlpActs::new(be, &model.mlp),
            logits: be.zeros(0),
            key: None,
        }
    }

    /// Documents in the last forward pass.
    pub fn len(&self) -> usize {
        self.n
    }

    /// Whether the last forward pass had no document.
    pub fn is_empty(&self) -> bool {
        self.n == 0
    }
}

impl BagModel {
    /// Lays out the tensors for `spec`.
    pub fn new(spec: BagSpec) -> Self {
        let mut layout = Layout::new();
        let mlp =
            Mlp::new(&mut layout, spec.dim, &spec.hidden, spec.classes, spec.activation, spec.hidden_dropout);
        // The table comes last: dense gradient buffers cover `0..dense_len()` only.
        let table = layout.matrix("embedding.weight", spec.buckets, spec.dim);
        BagModel { spec, layout, table, mlp }
    }

    /// Length of a dense gradient buffer: every tensor but the table, which comes last in
    /// the layout and whose gradient is sparse.
    pub fn dense_len(&self) -> usize {
        self.table.offset
    }

    /// Initial parameters: the table uniform in ±1/D (fastText), hidden weights uniform in
    /// ±√(6/fan_in) (He), biases and the output layer zero (fastText), from `seed`. Element
    /// `i` of tensor `k` is a function of `(seed, k, i)` alone (a counter-based hash), so the
    /// table is filled in parallel and the result does not depend on the thread count.
    pub fn init<F: Real>(&self, seed: u64) -> Vec<F> {
        let mut p = crate::hostmem::zeroed::<F>(self.layout.total());
        fill_uniform(&mut p[self.table.range()], seed, 0, 1.0 / self.spec.dim as f64);
        self.mlp.init(&mut p, seed);
        p
    }

    /// Forward pass over `batch`; `dropout` is `Some(key)` in training (the key's `site` is
    /// ignored: each dropout layer uses its own), `None` at evaluation. Logits end up in
    /// `acts.logits`.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        batch: &B::Batch,
        n: usize,
        dropout: Option<DropoutKey>,
        acts: &mut Activations<B>,
    ) {
        self.forward_perturbed(be, params, batch, n, dropout, None, acts)
    }

    /// [`BagModel::forward`] with `delta` (n×D) added to the pooled embedding before its
    /// dropout: the adversarial perturbation of the gathered embedding vectors (adding r to
    /// every vector a document gathers adds r to their mean). The backward pass's
    /// `∂loss/∂pooled` ([`BagModel::backward_dense`]) is then `∂loss/∂delta`.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_perturbed<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        batch: &B::Batch,
        n: usize,
        dropout: Option<DropoutKey>,
        delta: Option<&B::Buf>,
        acts: &mut Activations<B>,
    ) {
        acts.n = n;
        acts.key = dropout;
        let site = |s: u32| dropout.map(|k| DropoutKey { site: s, ..k });
        be.embedding_bag_forward(params, self.table, batch, &mut acts.x0);
        if let Some(d) = delta {
            be.axpy(&mut acts.x0, d, 1.0);
        }
        if let Some(key) = site(0) {
            be.dropout(self.spec.embed_dropout, key, self.spec.dim, &mut acts.x0);
        }
        self.mlp.forward(be, params, &acts.x0, n, dropout, &mut acts.mlp, &mut acts.logits);
    }

    /// Backward pass for `dlogits` (n×C): accumulates the dense gradients into `grads` (the
    /// parameters' layout up to [`BagModel::dense_len`]) and writes the table's sparse
    /// gradient into `table_grad` (its buffers are reused).
    #[allow(clippy::too_many_arguments)]
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        batch: &B::Batch,
        acts: &Activations<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        table_grad: &mut SparseRows<B::Buf>,
    ) {
        let mut dpooled = be.zeros(0);
        self.backward_dense(be, params, acts, dlogits, grads, &mut dpooled);
        be.embedding_bag_backward(batch, &dpooled, self.spec.dim, table_grad);
    }

    /// The backward pass down to the pooled embedding: accumulates the dense gradients into
    /// `grads` and writes `∂loss/∂pooled` (n×D) into `dpooled`, from which the table's
    /// gradient follows ([`Backend::embedding_bag_backward`]) or its fused SGD update
    /// ([`Backend::embedding_bag_sgd`]).
    pub fn backward_dense<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        acts: &Activations<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        dpooled: &mut B::Buf,
    ) {
        self.mlp.backward(be, params, &acts.x0, acts.n, acts.key, &acts.mlp, dlogits, grads, dpooled);
        if let Some(key) = acts.key.map(|k| DropoutKey { site: 0, ..k }) {
            be.dropout(self.spec.embed_dropout, key, self.spec.dim, dpooled);
        }
    }
}
