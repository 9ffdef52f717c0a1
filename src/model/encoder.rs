//! The Transformer encoder (BERT family): token, position and segment embeddings, layers of
//! multi-head self-attention and a GELU MLP with LayerNorm (post-LN as BERT, or pre-LN),
//! mean or [CLS] pooling and a classifier head, with an explicit forward pass over slots of
//! one flat buffer. Tensors carry Hugging Face's names, so a pretrained BERT checkpoint's
//! safetensors load as they are ([`load_pretrained`]).
//!
//! Shapes (b sequences padded to l tokens, n = b·l rows, H hidden, A heads of H/A, I the MLP
//! width, C classes):
//! ```text
//! x0   n×H  = LN_emb(word[ids] + position[t] + token_type[0])
//! per layer, post-LN (BERT):            pre-LN:
//!   a  n×H  = Attn(x)·Woᵀ + bo            x' = x + Attn(LN1(x))·Woᵀ + bo
//!   x' n×H  = LN1(x + a)                  x'' = x' + MLP(LN2(x'))
//!   x''n×H  = LN2(x' + MLP(x'))           (a final LN after the last layer)
//! MLP(x) = act(x·Wiᵀ + bi)·Wo2ᵀ + bo2;  Attn: q, k, v = x·W{q,k,v}ᵀ + b, softmax(q·kᵀ/√(H/A))·v
//! pooled b×H = mean of the valid tokens' rows (or the [CLS] row); logits b×C = pooled·Wcᵀ + bc
//! ```
//! Status: forward and backward passes run on the CPU (the `EncoderOps` backends; f64
//! finite-difference checks in tests/gradcheck.rs), with BERT's hidden dropout; the CUDA
//! backend implements its operations too (kernels/encoder.cu), but that path has never run
//! on a GPU. Dropout on the attention probabilities, training with the methods and
//! masked-LM pretraining are still to come (the encoder issue).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{
    Activation, AttnDropout, Backend, DropoutKey, EncoderOps, GradSync, HostBatch, SparseRows,
};
use crate::error::{Error, Result};
use crate::model::params::{fill_uniform, Layout, Slot};

/// How a sequence becomes one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    /// The first token's row ([CLS]).
    Cls,
    /// The mean of the rows of the sequence's real (unpadded) tokens.
    Mean,
}

/// The encoder's shape and settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EncoderSpec {
    pub vocab: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    /// The MLP's inner width.
    pub intermediate: usize,
    /// The most tokens a sequence may have (the position table's rows).
    pub max_positions: usize,
    pub type_vocab: usize,
    pub layer_norm_eps: f64,
    pub activation: Activation,
    /// LayerNorm before each sublayer (and once after the last layer) instead of after it.
    pub pre_ln: bool,
    pub pooling: Pooling,
    pub classes: usize,
    /// Hidden dropout in training: on the embeddings and on each sublayer's output before
    /// its residual sum (BERT's `hidden_dropout_prob`).
    #[serde(default)]
    pub dropout: f32,
    /// Dropout on the attention probabilities in training (BERT's
    /// `attention_probs_dropout_prob`); 0 in checkpoints written before it existed.
    #[serde(default)]
    pub attention_dropout: f32,
    /// Activation recomputation: a forward pass keeps only each layer's input, and the
    /// backward pass runs each layer's forward again (the same dropout masks, by key)
    /// before its backward. Saves most of the activations' memory for one more forward
    /// pass per layer; the gradients are bit for bit the same.
    #[serde(default)]
    pub recompute: bool,
}

impl EncoderSpec {
    /// Why this encoder cannot read every id or every sequence length of a data set
    /// prepared with subword tokenizer `sw` and `buckets` ids (its embedding rows and
    /// positions), as a sentence after the model's name; `None` when it can.
    pub fn uncovered(&self, buckets: u32, sw: &crate::data::tokenize::SubwordSpec) -> Option<String> {
        if self.vocab < buckets as usize {
            return Some(format!(
                "has {} token ids, and the data set's tokenizer has {buckets}: prepare the data with this model's \
                 tokenizer.json",
                self.vocab
            ));
        }
        (self.max_positions < sw.max_len as usize).then(|| {
            format!(
                "has {} positions, and the data set's documents run to {} tokens: prepare the data with a \
                 tokenizer.subword.max_len of at most {}",
                self.max_positions, sw.max_len, self.max_positions
            )
        })
    }

    /// Values the layers' tapes hold after a forward pass over `seqs` sequences padded to
    /// `len` tokens (what [`EncoderActs::layer_values`] then reports): per token and layer
    /// 8·H + 2·I + heads·len + 4 (one more H pre-LN) for a pass a backward pass follows,
    /// each layer's input alone (H) with recomputation, and one layer's tape for inference.
    pub fn tape_values(&self, seqs: usize, len: usize, backward: bool) -> u64 {
        let (h, i) = (self.hidden as u64, self.intermediate as u64);
        let tape = if self.pre_ln { 9 } else { 8 } * h + 2 * i + (self.heads * len) as u64 + 4;
        let per_token = match (backward, self.recompute) {
            (false, _) => tape,
            (true, false) => self.layers as u64 * tape,
            (true, true) => self.layers as u64 * h,
        };
        (seqs as u64).saturating_mul(len as u64).saturating_mul(per_token)
    }

    /// Bytes of a pass's activations at their peak, for a memory budget: the tapes of
    /// [`EncoderSpec::tape_values`], the one a recomputing backward pass refills, and 4·H
    /// per token for the rows beside them (the embeddings' sum, the forward's scratch row,
    /// the layer output being formed, the last hidden rows), plus one more H for pre-LN's
    /// final LayerNorm input. The backward pass's own temporaries (a few rows of H and I
    /// per token) are not counted.
    pub fn activation_bytes(&self, seqs: usize, len: usize, backward: bool) -> u64 {
        let extra = if backward && self.recompute { self.tape_values(seqs, len, false) } else { 0 };
        let beside = if self.pre_ln { 5 } else { 4 } * self.hidden as u64;
        let rows = (seqs as u64).saturating_mul(len as u64).saturating_mul(beside);
        self.tape_values(seqs, len, backward).saturating_add(extra).saturating_add(rows).saturating_mul(4)
    }

    /// Checks the spec's rules; the error names the field.
    pub fn validate(&self) -> std::result::Result<(), (&'static str, String)> {
        let positive = [
            ("vocab", self.vocab),
            ("hidden", self.hidden),
            ("layers", self.layers),
            ("heads", self.heads),
            ("intermediate", self.intermediate),
            ("max_positions", self.max_positions),
            ("type_vocab", self.type_vocab),
        ];
        for (field, v) in positive {
            if v == 0 {
                return Err((field, "must be at least 1".into()));
            }
        }
        if self.hidden % self.heads != 0 {
            return Err(("heads", format!("{} does not divide hidden = {}", self.heads, self.hidden)));
        }
        // Bounds that keep every product of the layout's sizes far from overflowing.
        for (field, v) in
            [("vocab", self.vocab), ("hidden", self.hidden), ("intermediate", self.intermediate)]
        {
            if v > 1 << 32 {
                return Err((field, format!("{v} is more than 2^32")));
            }
        }
        for (field, v) in
            [("layers", self.layers), ("max_positions", self.max_positions), ("type_vocab", self.type_vocab)]
        {
            if v > 1 << 16 {
                return Err((field, format!("{v} is more than 65536")));
            }
        }
        let count = self.parameter_count();
        if count > 1 << 40 {
            return Err((
                "hidden",
                format!("the encoder would have {count} parameters, more than 2^40: its sizes are not a real model's"),
            ));
        }
        // An f32 holds it as a normal number (1e39 would be infinite, and every output the
        // same; 1e-50 would be 0, and a constant row would divide 0 by 0).
        if !(self.layer_norm_eps >= f64::from(f32::MIN_POSITIVE) && self.layer_norm_eps <= 1.0) {
            return Err((
                "layer_norm_eps",
                format!(
                    "{:e} is not in [{:e}, 1] (an f32 must hold it)",
                    self.layer_norm_eps,
                    f32::MIN_POSITIVE
                ),
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(("dropout", "must be in [0, 1)".into()));
        }
        if !(0.0..1.0).contains(&self.attention_dropout) {
            return Err(("attention_dropout", "must be in [0, 1)".into()));
        }
        if self.vocab > u32::MAX as usize {
            return Err(("vocab", format!("{} does not fit u32 ids", self.vocab)));
        }
        if self.classes > 1 << 20 || self.classes == 0 {
            return Err(("classes", format!("{} is not in 1..=2^20", self.classes)));
        }
        Ok(())
    }

    /// The parameters of the encoder with this spec (alignment padding aside), computed
    /// without overflow for any sizes.
    pub fn parameter_count(&self) -> u128 {
        let [v, h, l, i, p, t, c] = [
            self.vocab,
            self.hidden,
            self.layers,
            self.intermediate,
            self.max_positions,
            self.type_vocab,
            self.classes,
        ]
        .map(|x| x as u128);
        let layer = 4 * (h * h + h) + 2 * h * i + i + h + 4 * h;
        (v + p + t) * h + 2 * h + l * layer + if self.pre_ln { 2 * h } else { 0 } + c * h + c
    }
}

/// The slots of one layer.
#[derive(Debug, Clone, PartialEq)]
struct LayerSlots {
    query: (Slot, Slot),
    key: (Slot, Slot),
    value: (Slot, Slot),
    attn_out: (Slot, Slot),
    ln1: (Slot, Slot),
    inter: (Slot, Slot),
    out: (Slot, Slot),
    ln2: (Slot, Slot),
}

/// The encoder: its spec and where each tensor lives in the flat buffer.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoder {
    pub spec: EncoderSpec,
    pub layout: Layout,
    word: Slot,
    position: Slot,
    token_type: Slot,
    emb_ln: (Slot, Slot),
    layers: Vec<LayerSlots>,
    /// Pre-LN's LayerNorm after the last layer.
    final_ln: Option<(Slot, Slot)>,
    head: (Slot, Slot),
}

/// Sequences of token ids, padded to one length, as the encoder reads them.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenBatch {
    /// Sequences.
    pub b: usize,
    /// Tokens per sequence after padding.
    pub l: usize,
    /// b·l ids, padding with `pad`.
    pub ids: Vec<u32>,
    /// Each sequence's real length.
    pub lens: Vec<usize>,
}

impl TokenBatch {
    /// Pads `seqs` to the longest one's length with `pad`.
    pub fn new(seqs: &[Vec<u32>], pad: u32) -> TokenBatch {
        let l = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(seqs.len() * l);
        for s in seqs {
            ids.extend_from_slice(s);
            ids.extend(std::iter::repeat_n(pad, l - s.len()));
        }
        TokenBatch { b: seqs.len(), l, ids, lens: seqs.iter().map(|s| s.len()).collect() }
    }

    /// 1 for a real token, 0 for padding (b·l values).
    pub fn mask<F: crate::backend::Real>(&self) -> Vec<F> {
        (0..self.b * self.l)
            .map(|r| if r % self.l.max(1) < self.lens[r / self.l] { F::one() } else { F::zero() })
            .collect()
    }

    /// Single-id "documents" for an embedding lookup per token: `f(row, token)` gives the
    /// table row of token `token` of row `row`'s sequence.
    fn lookups(&self, f: impl Fn(usize, usize) -> u32) -> HostBatch {
        let mut h = HostBatch::default();
        for r in 0..self.b * self.l {
            h.push(&[f(r, r % self.l)], -1);
        }
        h
    }
}

/// What one layer's forward pass keeps for its backward pass.
struct LayerTape<B: Backend> {
    /// The layer's input.
    x_in: B::Buf,
    /// Pre-LN: LN1(x_in), the attention's input.
    h1: B::Buf,
    q: B::Buf,
    k: B::Buf,
    v: B::Buf,
    probs: B::Buf,
    ctx: B::Buf,
    /// Post-LN: LN1's input x_in + attention; pre-LN: x1 = x_in + attention.
    r1: B::Buf,
    stats1: B::Buf,
    /// The MLP's input: post-LN x1 = LN1(r1); pre-LN h2 = LN2(x1).
    mlp_in: B::Buf,
    /// The MLP's pre-activation and activation.
    u: B::Buf,
    a: B::Buf,
    /// Post-LN: LN2's input x1 + MLP.
    r2: B::Buf,
    stats2: B::Buf,
}

impl<B: Backend> LayerTape<B> {
    fn new(be: &B) -> Self {
        let z = || be.zeros(0);
        LayerTape {
            x_in: z(),
            h1: z(),
            q: z(),
            k: z(),
            v: z(),
            probs: z(),
            ctx: z(),
            r1: z(),
            stats1: z(),
            mlp_in: z(),
            u: z(),
            a: z(),
            r2: z(),
            stats2: z(),
        }
    }
}

impl<B: Backend> EncoderActs<B> {
    /// Values the layers' tapes hold (what recomputation saves).
    pub fn layer_values(&self, be: &B) -> usize {
        self.layers
            .iter()
            .map(|t| {
                [
                    &t.x_in, &t.h1, &t.q, &t.k, &t.v, &t.probs, &t.ctx, &t.r1, &t.stats1, &t.mlp_in, &t.u,
                    &t.a, &t.r2, &t.stats2,
                ]
                .iter()
                .map(|b| be.buf_len(b))
                .sum::<usize>()
            })
            .sum()
    }
}

/// The sizes every layer of one pass shares: token rows, (b, l, heads), and attention's
/// 1/√d.
#[derive(Debug, Clone, Copy)]
struct LayerDims {
    n: usize,
    shape: (usize, usize, usize),
    scale: f64,
}

/// Buffers of one forward pass, kept for the backward pass.
pub struct EncoderActs<B: Backend> {
    /// The last layer's output (n×H), the pooled vectors (b×H) and the logits (b×C).
    pub hidden: B::Buf,
    pub pooled: B::Buf,
    pub logits: B::Buf,
    /// The embeddings' sum (LN_emb's input) and its statistics.
    emb_sum: B::Buf,
    emb_stats: B::Buf,
    layers: Vec<LayerTape<B>>,
    /// Pre-LN: the last layer's output before the final LayerNorm, and its statistics.
    final_in: B::Buf,
    final_stats: B::Buf,
    /// The dropout of the last forward pass (its masks are recomputed in the backward).
    noise: Option<(DropoutKey, f32)>,
    /// Whether a backward pass will follow: every layer keeps its tape. Without, one tape
    /// serves the layers in turn ([`EncoderActs::inference`]).
    for_backward: bool,
}

impl<B: Backend> EncoderActs<B> {
    /// Buffers of a forward pass that a backward pass follows.
    pub fn new(be: &B) -> Self {
        EncoderActs {
            hidden: be.zeros(0),
            pooled: be.zeros(0),
            logits: be.zeros(0),
            emb_sum: be.zeros(0),
            emb_stats: be.zeros(0),
            layers: Vec::new(),
            final_in: be.zeros(0),
            final_stats: be.zeros(0),
            noise: None,
            for_backward: true,
        }
    }

    /// Buffers of forward passes with no backward pass (evaluation, prediction, a teacher's
    /// or a weak view's targets): the layers share one tape, so a pass holds one layer's
    /// activations instead of all of them. The backward passes refuse them (they would read
    /// one layer's tape as every layer's).
    pub fn inference(be: &B) -> Self {
        EncoderActs { for_backward: false, ..EncoderActs::new(be) }
    }
}

/// The host-built index batches of a token batch: each token's word, position and type
/// rows, and each sequence's pooled rows.
struct Lookups {
    word: HostBatch,
    position: HostBatch,
    token_type: HostBatch,
    pooled: HostBatch,
}

impl Encoder {
    /// The layout of `spec` with Hugging Face's tensor names (and `classifier.*` for the
    /// head).
    pub fn new(spec: EncoderSpec) -> Encoder {
        let (h, i) = (spec.hidden, spec.intermediate);
        let mut layout = Layout::new();
        let lin = |layout: &mut Layout, name: &str, out: usize, inp: usize| {
            (layout.matrix(&format!("{name}.weight"), out, inp), layout.vector(&format!("{name}.bias"), out))
        };
        let ln = |layout: &mut Layout, name: &str| {
            (layout.vector(&format!("{name}.weight"), h), layout.vector(&format!("{name}.bias"), h))
        };
        let word = layout.matrix("embeddings.word_embeddings.weight", spec.vocab, h);
        let position = layout.matrix("embeddings.position_embeddings.weight", spec.max_positions, h);
        let token_type = layout.matrix("embeddings.token_type_embeddings.weight", spec.type_vocab, h);
        let emb_ln = ln(&mut layout, "embeddings.LayerNorm");
        let mut layers = Vec::new();
        for k in 0..spec.layers {
            let p = format!("encoder.layer.{k}");
            layers.push(LayerSlots {
                query: lin(&mut layout, &format!("{p}.attention.self.query"), h, h),
                key: lin(&mut layout, &format!("{p}.attention.self.key"), h, h),
                value: lin(&mut layout, &format!("{p}.attention.self.value"), h, h),
                attn_out: lin(&mut layout, &format!("{p}.attention.output.dense"), h, h),
                ln1: ln(&mut layout, &format!("{p}.attention.output.LayerNorm")),
                inter: lin(&mut layout, &format!("{p}.intermediate.dense"), i, h),
                out: lin(&mut layout, &format!("{p}.output.dense"), h, i),
                ln2: ln(&mut layout, &format!("{p}.output.LayerNorm")),
            });
        }
        let final_ln = spec.pre_ln.then(|| ln(&mut layout, "encoder.LayerNorm"));
        let head = lin(&mut layout, "classifier", spec.classes, h);
        Encoder { spec, layout, word, position, token_type, emb_ln, layers, final_ln, head }
    }

    /// The word embedding table (a masked-LM decoder's tied weight).
    pub fn word_slot(&self) -> Slot {
        self.word
    }

    /// Layer-wise learning-rate decay: each tensor's multiplier `decay^(L + 1 − depth)`, with
    /// depth 0 for the embeddings, k + 1 for layer k, and L + 1 for the final LayerNorm and
    /// the classifier head (multiplier 1): lower layers, closer to what pretraining
    /// learned, move less.
    pub fn layer_decay(&self, decay: f64) -> Vec<(String, f64)> {
        let top = self.spec.layers as i32 + 1;
        self.layout
            .tensors()
            .iter()
            .map(|t| {
                let depth = if t.name.starts_with("embeddings.") {
                    0
                } else if let Some(rest) = t.name.strip_prefix("encoder.layer.") {
                    rest.split('.').next().and_then(|k| k.parse::<i32>().ok()).map_or(top, |k| k + 1)
                } else {
                    top
                };
                (t.name.clone(), decay.powi(top - depth))
            })
            .collect()
    }

    /// Fresh parameters for training from scratch: weights uniform in ±√(3)·0.02 (BERT's
    /// N(0, 0.02) in spread), LayerNorm scales 1, biases 0; the head's weights too.
    pub fn init<F: crate::backend::Real>(&self, seed: u64) -> Vec<F> {
        let mut p = vec![F::zero(); self.layout.total()];
        let bound = 0.02 * 3f64.sqrt();
        for (k, t) in self.layout.tensors().iter().enumerate() {
            let r = t.slot.range();
            if t.name.ends_with("LayerNorm.weight") {
                p[r].iter_mut().for_each(|v| *v = F::one());
            } else if t.shape.len() == 2 {
                fill_uniform(&mut p[r], seed, k as u64, bound);
            }
        }
        p
    }

    fn lookups(&self, tb: &TokenBatch) -> Lookups {
        let mut pooled = HostBatch::default();
        for (i, &len) in tb.lens.iter().enumerate() {
            let ids: Vec<u32> = match self.spec.pooling {
                Pooling::Cls => vec![(i * tb.l) as u32],
                Pooling::Mean => (0..len).map(|t| (i * tb.l + t) as u32).collect(),
            };
            pooled.push(&ids, -1);
        }
        Lookups {
            word: tb.lookups(|r, _| tb.ids[r]),
            position: tb.lookups(|_, t| t as u32),
            token_type: tb.lookups(|_, _| 0),
            pooled,
        }
    }

    /// The forward pass over `tb`: `acts.hidden` (n×H), `acts.pooled` (b×H) and
    /// `acts.logits` (b×C), keeping what [`Encoder::backward`] needs. `noise` is `Some((key,
    /// p))` in training: dropout at rate p on the embeddings (site 0) and on each layer's
    /// attention and MLP outputs before their residual sums (sites 1 + 2k and 2 + 2k), as
    /// BERT's hidden dropout; the key's `rows` places each token row.
    pub fn forward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        tb: &TokenBatch,
        noise: Option<(DropoutKey, f32)>,
        acts: &mut EncoderActs<B>,
    ) {
        self.forward_perturbed(be, params, tb, noise, None, acts)
    }

    /// [`Encoder::forward`] with `delta` (n×H, one row per token) added to each token's
    /// embedding sum before the embeddings' LayerNorm: an adversarial perturbation of the
    /// word embeddings. [`Encoder::backward_hidden`]'s `demb` is then `∂loss/∂delta`.
    pub fn forward_perturbed<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        tb: &TokenBatch,
        noise: Option<(DropoutKey, f32)>,
        delta: Option<&B::Buf>,
        acts: &mut EncoderActs<B>,
    ) {
        // Hidden dropout masks token rows by (the sequence's global position, the token):
        // independent of the batch's padded length and of the ranks.
        let noise = noise.map(|(key, p)| (DropoutKey { rows: key.rows.per_token(tb.l.max(1)), ..key }, p));
        acts.noise = noise;
        let s = &self.spec;
        let (n, h, eps) = (tb.b * tb.l, s.hidden, s.layer_norm_eps);
        assert!(
            tb.l <= s.max_positions,
            "a sequence of {} tokens is longer than the {} positions",
            tb.l,
            s.max_positions
        );
        let look = self.lookups(tb);
        let mask = be.upload(&tb.mask::<B::F>());
        // Embeddings: three single-id lookups per token, summed, then LayerNorm.
        let mut t = be.zeros(0);
        be.embedding_bag_forward(params, self.word, &be.upload_batch(&look.word), &mut acts.emb_sum);
        for (slot, batch) in [(self.position, &look.position), (self.token_type, &look.token_type)] {
            be.embedding_bag_forward(params, slot, &be.upload_batch(batch), &mut t);
            be.axpy(&mut acts.emb_sum, &t, 1.0);
        }
        if let Some(d) = delta {
            be.axpy(&mut acts.emb_sum, d, 1.0);
        }
        let mut x = be.zeros(0);
        be.layer_norm_forward(
            &acts.emb_sum,
            n,
            params,
            self.emb_ln.0,
            self.emb_ln.1,
            eps,
            &mut x,
            &mut acts.emb_stats,
        );
        self.hidden_dropout(be, noise, 0, &mut x);
        let dims = LayerDims { n, shape: (tb.b, tb.l, s.heads), scale: 1.0 / ((h / s.heads) as f64).sqrt() };
        let tapes = if acts.for_backward { self.layers.len() } else { 1 };
        acts.layers.truncate(tapes);
        acts.layers.resize_with(tapes, || LayerTape::new(be));
        for k in 0..self.layers.len() {
            let tp = &mut acts.layers[k.min(tapes - 1)];
            x = self.layer_forward(be, params, k, x, &mask, dims, noise, tp);
            if s.recompute && acts.for_backward {
                // Only the layer's input stays; the backward pass recomputes the rest.
                *tp = LayerTape { x_in: std::mem::replace(&mut tp.x_in, be.zeros(0)), ..LayerTape::new(be) };
            }
        }
        if let Some((g, b)) = self.final_ln {
            acts.final_in = x;
            x = be.zeros(0);
            be.layer_norm_forward(&acts.final_in, n, params, g, b, eps, &mut x, &mut acts.final_stats);
        }
        acts.hidden = x;
        // Pooling: a mean embedding bag over the hidden rows of each sequence's tokens.
        let all = Slot { offset: 0, rows: n, cols: h };
        be.embedding_bag_forward(&acts.hidden, all, &be.upload_batch(&look.pooled), &mut acts.pooled);
        be.linear_forward(&acts.pooled, tb.b, params, self.head.0, self.head.1, &mut acts.logits);
    }

    /// Layer `k`'s forward pass from `x_in` (n×H), filling its tape; returns its output.
    #[allow(clippy::too_many_arguments)]
    fn layer_forward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        k: usize,
        x_in: B::Buf,
        mask: &B::Buf,
        dims: LayerDims,
        noise: Option<(DropoutKey, f32)>,
        tp: &mut LayerTape<B>,
    ) -> B::Buf {
        let (s, n, eps) = (&self.spec, dims.n, self.spec.layer_norm_eps);
        let (shape, scale) = (dims.shape, dims.scale);
        let layer = &self.layers[k];
        let site = 1 + 2 * k as u32;
        tp.x_in = x_in;
        if s.pre_ln {
            be.layer_norm_forward(
                &tp.x_in,
                n,
                params,
                layer.ln1.0,
                layer.ln1.1,
                eps,
                &mut tp.h1,
                &mut tp.stats1,
            );
        }
        let attn_in = if s.pre_ln { &tp.h1 } else { &tp.x_in };
        be.linear_forward(attn_in, n, params, layer.query.0, layer.query.1, &mut tp.q);
        be.linear_forward(attn_in, n, params, layer.key.0, layer.key.1, &mut tp.k);
        be.linear_forward(attn_in, n, params, layer.value.0, layer.value.1, &mut tp.v);
        let adrop = self.attention_dropout(noise, k);
        be.attention_forward(&tp.q, &tp.k, &tp.v, mask, shape, scale, adrop, &mut tp.ctx, &mut tp.probs);
        be.linear_forward(&tp.ctx, n, params, layer.attn_out.0, layer.attn_out.1, &mut tp.r1);
        self.hidden_dropout(be, noise, site, &mut tp.r1);
        be.axpy(&mut tp.r1, &tp.x_in, 1.0);
        if s.pre_ln {
            be.layer_norm_forward(
                &tp.r1,
                n,
                params,
                layer.ln2.0,
                layer.ln2.1,
                eps,
                &mut tp.mlp_in,
                &mut tp.stats2,
            );
        } else {
            be.layer_norm_forward(
                &tp.r1,
                n,
                params,
                layer.ln1.0,
                layer.ln1.1,
                eps,
                &mut tp.mlp_in,
                &mut tp.stats1,
            );
        }
        be.linear_forward(&tp.mlp_in, n, params, layer.inter.0, layer.inter.1, &mut tp.u);
        be.activation_forward(s.activation, &tp.u, &mut tp.a);
        be.linear_forward(&tp.a, n, params, layer.out.0, layer.out.1, &mut tp.r2);
        self.hidden_dropout(be, noise, site + 1, &mut tp.r2);
        // The residual: x1 = r1 (pre-LN) or LN1(r1) (post-LN).
        be.axpy(&mut tp.r2, if s.pre_ln { &tp.r1 } else { &tp.mlp_in }, 1.0);
        let mut x = be.zeros(n * s.hidden);
        if s.pre_ln {
            be.copy(&mut x, &tp.r2, 0..n * s.hidden);
        } else {
            be.layer_norm_forward(&tp.r2, n, params, layer.ln2.0, layer.ln2.1, eps, &mut x, &mut tp.stats2);
        }
        x
    }

    /// The backward pass of the last [`Encoder::forward`] for `dlogits` (b×C): every
    /// parameter's gradient added into `grads` (the layout's length; the embedding tables'
    /// touched rows only).
    pub fn backward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        tb: &TokenBatch,
        acts: &EncoderActs<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
    ) {
        self.backward_to_embeddings(be, params, tb, acts, dlogits, grads, None, None)
    }

    /// [`Encoder::backward`], also writing the gradient of the tokens' embedding sums into
    /// `demb` (n×H) when given, and telling `sync` (the step's last backward pass) as each
    /// layer's gradients become final ([`GradSync::ready`]).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_to_embeddings<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        tb: &TokenBatch,
        acts: &EncoderActs<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        demb: Option<&mut B::Buf>,
        sync: Option<&dyn GradSync<B>>,
    ) {
        let (n, h, dim) = (tb.b * tb.l, self.spec.hidden, self.spec.hidden);
        let look = self.lookups(tb);
        // Head and pooling: d pooled, then d hidden rows (zero for padding).
        let mut dpooled = be.zeros(0);
        be.linear_backward(
            &acts.pooled,
            tb.b,
            params,
            self.head.0,
            self.head.1,
            dlogits,
            grads,
            Some(&mut dpooled),
        );
        let mut rows = SparseRows::new(be.zeros(0), dim);
        be.embedding_bag_backward(&be.upload_batch(&look.pooled), &dpooled, dim, &mut rows);
        let mut dx = be.zeros(n * h);
        be.sparse_sgd(&mut dx, Slot { offset: 0, rows: n, cols: h }, &rows, -1.0);
        self.backward_hidden(be, params, tb, acts, dx, grads, demb, sync);
    }

    /// The backward pass of the last [`Encoder::forward`] from `dx`, the gradient of the
    /// last hidden rows `acts.hidden` (n×H; a masked-LM head's, or the pooling's): every
    /// parameter's gradient below them added into `grads`, and with `demb` the gradient of
    /// the tokens' embedding sums (n×H, what [`Encoder::forward_perturbed`] perturbs).
    /// With `sync`, each layer's end calls [`GradSync::ready`] with the layer's first
    /// offset: the layout puts the embeddings first, then the layers in order, then the
    /// final LayerNorm and the head, so everything from there on is final.
    #[allow(clippy::too_many_arguments)]
    pub fn backward_hidden<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        tb: &TokenBatch,
        acts: &EncoderActs<B>,
        mut dx: B::Buf,
        grads: &mut B::Buf,
        demb: Option<&mut B::Buf>,
        sync: Option<&dyn GradSync<B>>,
    ) {
        assert!(acts.for_backward, "an encoder's backward pass after a forward pass into inference buffers");
        let s = &self.spec;
        let (n, h, dim) = (tb.b * tb.l, s.hidden, s.hidden);
        let look = self.lookups(tb);
        let shape = (tb.b, tb.l, s.heads);
        let scale = 1.0 / ((h / s.heads) as f64).sqrt();
        let mut rows = SparseRows::new(be.zeros(0), dim);
        let mut t = be.zeros(0);
        if let Some((g, b)) = self.final_ln {
            be.layer_norm_backward(&acts.final_in, n, params, g, b, &acts.final_stats, &dx, grads, &mut t);
            std::mem::swap(&mut dx, &mut t);
        }
        let (mut d1, mut d2, mut d3) = (be.zeros(0), be.zeros(0), be.zeros(0));
        let (mut dq, mut dk, mut dv) = (be.zeros(0), be.zeros(0), be.zeros(0));
        // With recomputation, each layer's tape is refilled from its kept input.
        let recompute = self.spec.recompute.then(|| {
            let dims = LayerDims { n, shape, scale };
            (be.upload(&tb.mask::<B::F>()), dims, LayerTape::new(be))
        });
        let mut recompute = recompute;
        for (k, (layer, kept)) in self.layers.iter().zip(&acts.layers).enumerate().rev() {
            let site = 1 + 2 * k as u32;
            let tp = match &mut recompute {
                Some((mask, dims, tape)) => {
                    let mut x_in = be.zeros(n * h);
                    be.copy(&mut x_in, &kept.x_in, 0..n * h);
                    self.layer_forward(be, params, k, x_in, mask, *dims, acts.noise, tape);
                    &*tape
                }
                None => kept,
            };
            // dx is d(layer output). d r2 (the MLP block's sum):
            let dr2 = if s.pre_ln {
                &dx
            } else {
                be.layer_norm_backward(
                    &tp.r2,
                    n,
                    params,
                    layer.ln2.0,
                    layer.ln2.1,
                    &tp.stats2,
                    &dx,
                    grads,
                    &mut d1,
                );
                &d1
            };
            let mut tmp = be.zeros(0);
            let dmlp = masked(be, dr2, n * h, h, acts.noise, site + 1, &mut tmp);
            be.linear_backward(&tp.a, n, params, layer.out.0, layer.out.1, dmlp, grads, Some(&mut d2));
            be.activation_backward(s.activation, &tp.u, &d2, &mut d3);
            be.linear_backward(
                &tp.mlp_in,
                n,
                params,
                layer.inter.0,
                layer.inter.1,
                &d3,
                grads,
                Some(&mut d2),
            );
            // d2 = d(MLP input). d x1: its residual share dr2, plus the MLP's path.
            let mut dx1 = be.zeros(0);
            if s.pre_ln {
                be.layer_norm_backward(
                    &tp.r1,
                    n,
                    params,
                    layer.ln2.0,
                    layer.ln2.1,
                    &tp.stats2,
                    &d2,
                    grads,
                    &mut dx1,
                );
            } else {
                dx1 = d2;
                d2 = be.zeros(0);
            }
            be.axpy(&mut dx1, dr2, 1.0);
            // d r1 (the attention block's sum).
            let dr1 = if s.pre_ln {
                dx1
            } else {
                let mut out = be.zeros(0);
                be.layer_norm_backward(
                    &tp.r1,
                    n,
                    params,
                    layer.ln1.0,
                    layer.ln1.1,
                    &tp.stats1,
                    &dx1,
                    grads,
                    &mut out,
                );
                out
            };
            let mut dctx = be.zeros(0);
            let mut tmp = be.zeros(0);
            let dattn = masked(be, &dr1, n * h, h, acts.noise, site, &mut tmp);
            be.linear_backward(
                &tp.ctx,
                n,
                params,
                layer.attn_out.0,
                layer.attn_out.1,
                dattn,
                grads,
                Some(&mut dctx),
            );
            let adrop = self.attention_dropout(acts.noise, k);
            be.attention_backward(
                &tp.q, &tp.k, &tp.v, &tp.probs, &dctx, shape, scale, adrop, &mut dq, &mut dk, &mut dv,
            );
            let attn_in = if s.pre_ln { &tp.h1 } else { &tp.x_in };
            let (mut din, mut part) = (be.zeros(0), be.zeros(0));
            be.linear_backward(attn_in, n, params, layer.query.0, layer.query.1, &dq, grads, Some(&mut din));
            for (lin, dy) in [(layer.key, &dk), (layer.value, &dv)] {
                be.linear_backward(attn_in, n, params, lin.0, lin.1, dy, grads, Some(&mut part));
                be.axpy(&mut din, &part, 1.0);
            }
            // d x_in: the residual's dr1 plus the attention's path (through LN1 for pre-LN).
            if s.pre_ln {
                be.layer_norm_backward(
                    &tp.x_in,
                    n,
                    params,
                    layer.ln1.0,
                    layer.ln1.1,
                    &tp.stats1,
                    &din,
                    grads,
                    &mut dx,
                );
            } else {
                dx = din;
            }
            be.axpy(&mut dx, &dr1, 1.0);
            // Layer k and everything above it are done.
            if let Some(sync) = sync {
                sync.ready(be, grads, layer.query.0.offset);
            }
        }
        // Embeddings: through their dropout and LN_emb, then each table's touched rows.
        if let Some((key, p)) = acts.noise {
            be.dropout(p, DropoutKey { site: 0, ..key }, h, &mut dx);
        }
        be.layer_norm_backward(
            &acts.emb_sum,
            n,
            params,
            self.emb_ln.0,
            self.emb_ln.1,
            &acts.emb_stats,
            &dx,
            grads,
            &mut t,
        );
        for (slot, batch) in
            [(self.word, &look.word), (self.position, &look.position), (self.token_type, &look.token_type)]
        {
            be.embedding_bag_backward(&be.upload_batch(batch), &t, dim, &mut rows);
            // sparse SGD at rate −1 adds the rows' gradients into the dense buffer.
            be.sparse_sgd(grads, slot, &rows, -1.0);
        }
        if let Some(d) = demb {
            *d = t;
        }
    }
}

/// The first dropout site of the attention probabilities (layer k uses this + k); hidden
/// dropout uses sites 0..=2·layers.
const ATTENTION_SITE: u32 = 1 << 16;

impl Encoder {
    /// Hidden dropout at `site` on `x` (rows of H) in a pass with `noise`.
    fn hidden_dropout<B: Backend>(
        &self,
        be: &B,
        noise: Option<(DropoutKey, f32)>,
        site: u32,
        x: &mut B::Buf,
    ) {
        if let Some((key, p)) = noise {
            be.dropout(p, DropoutKey { site, ..key }, self.spec.hidden, x);
        }
    }

    /// Layer `k`'s attention dropout in a pass with `noise` (none at evaluation).
    fn attention_dropout(&self, noise: Option<(DropoutKey, f32)>, k: usize) -> Option<AttnDropout> {
        let p = self.spec.attention_dropout;
        noise.filter(|_| p > 0.0).map(|(key, _)| AttnDropout {
            p,
            base: DropoutKey { site: ATTENTION_SITE + k as u32, ..key }.base(),
            rows: key.rows,
        })
    }
}

/// `g` (the first `len` values) through dropout site `site`'s mask, into `tmp`; `g` itself
/// when the pass had no dropout. Dropout's backward pass is the same mask.
fn masked<'a, B: Backend>(
    be: &B,
    g: &'a B::Buf,
    len: usize,
    width: usize,
    noise: Option<(DropoutKey, f32)>,
    site: u32,
    tmp: &'a mut B::Buf,
) -> &'a B::Buf {
    match noise {
        None => g,
        Some((key, p)) => {
            *tmp = be.zeros(len);
            be.copy(tmp, g, 0..len);
            be.dropout(p, DropoutKey { site, ..key }, width, tmp);
            tmp
        }
    }
}

/// Whether `dir` is a pretrained model's directory in Hugging Face's layout (config.json and
/// model.safetensors, as a masked-LM run's encoder/ is), not a dtrain training checkpoint
/// (which has a config.json and weights too, but also its training state).
pub fn is_pretrained_dir(dir: &Path) -> bool {
    dir.is_dir()
        && dir.join("config.json").is_file()
        && dir.join("model.safetensors").is_file()
        && !dir.join("state.bin").exists()
}

/// Refuses a pretrained model directory whose `tokenizer.json` is not the data set's (`sw`,
/// compared by checksum): the data's ids would index other rows of the model's embedding
/// table. A directory without a tokenizer.json cannot be checked, and is taken as it is.
pub fn check_tokenizer(dir: &Path, sw: &crate::data::tokenize::SubwordSpec) -> Result<()> {
    let path = dir.join("tokenizer.json");
    let (Some(want), true) = (&sw.checksum, path.is_file()) else { return Ok(()) };
    let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
    let sum = crate::data::manifest::hex64(xxhash_rust::xxh3::xxh3_64(&bytes));
    if sum != *want {
        return Err(Error::bad_file(
            &path,
            format!(
                "checksum {sum}, not the data set's tokenizer ({}, checksum {want}): its ids would index \
                 other rows of this model's embeddings; prepare the data with this model's tokenizer.json",
                sw.path
            ),
        ));
    }
    Ok(())
}

/// Reads a Hugging Face BERT checkpoint directory (`config.json`, `model.safetensors`):
/// the encoder for `classes` outputs with every pretrained tensor in place (a `bert.`
/// prefix is accepted; the pooler is not used), the classifier head freshly initialised
/// from `seed`. Errors name the file and the field or tensor.
pub fn load_pretrained(
    dir: &Path,
    classes: usize,
    pooling: Pooling,
    seed: u64,
) -> Result<(Encoder, Vec<f32>)> {
    let cfg_path = dir.join("config.json");
    if !dir.is_dir() {
        let why = match dir.is_file() {
            true => "is a file: name the model's directory (config.json and model.safetensors side by side)",
            false => "no such directory (a pretrained model's directory: config.json and model.safetensors)",
        };
        return Err(Error::bad_file(dir, why));
    }
    if dir.join("state.bin").is_file() {
        return Err(Error::bad_file(
            dir,
            "is a dtrain training checkpoint, not a pretrained encoder (Hugging Face config.json + \
             model.safetensors): a masked-LM run's encoder/ directory is one",
        ));
    }
    if dir.join(crate::pretrain::embeddings::EMBEDDINGS_FILE).is_file() {
        return Err(Error::bad_file(
            dir,
            "holds skip-gram embeddings (a `dtrain pretrain` output or checkpoint), not a pretrained \
             encoder: a bag model starts from them with model.init_from",
        ));
    }
    // A directory dtrain wrote (a masked-LM run's encoder/) records its files' sizes and
    // checksums: damage is refused here as in a checkpoint.
    if dir.join(crate::checkpoint::DONE).is_file() {
        crate::checkpoint::check_written(dir, crate::checkpoint::Reading::All)?;
    }
    let text = crate::fsutil::read_text(&cfg_path, 16 << 20, "a model's config.json")?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, format!("not JSON: {e}")))?;
    let field = |name: &str| -> Result<usize> {
        cfg.get(name)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::bad_file(&cfg_path, format!("`{name}` is missing or not a whole number")))
    };
    // An optional key: absent (or null) gives the default; present, it must have its type.
    let number = |name: &str, default: f64| -> Result<f64> {
        match cfg.get(name) {
            None | Some(serde_json::Value::Null) => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| Error::bad_file(&cfg_path, format!("`{name}` must be a number, not {v}"))),
        }
    };
    let text_of = |name: &str, default: &'static str| -> Result<String> {
        match cfg.get(name) {
            None | Some(serde_json::Value::Null) => Ok(default.to_string()),
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(v) => Err(Error::bad_file(&cfg_path, format!("`{name}` must be a string, not {v}"))),
        }
    };
    // Other families reuse BERT's keys with another layout (RoBERTa's positions start
    // after the padding id, ELECTRA projects its embeddings): refused, not misread.
    let family = text_of("model_type", "bert")?;
    if family != "bert" {
        return Err(Error::bad_file(
            &cfg_path,
            format!("`model_type` {family:?} is not supported: dtrain loads BERT-family checkpoints with BERT's layout (\"bert\")"),
        ));
    }
    let positions = text_of("position_embedding_type", "absolute")?;
    if positions != "absolute" {
        return Err(Error::bad_file(
            &cfg_path,
            format!("`position_embedding_type` {positions:?} is not supported: dtrain's encoder has absolute positions"),
        ));
    }
    let activation = match text_of("hidden_act", "gelu")?.as_str() {
        "gelu" => Activation::GeluErf,
        "gelu_new" | "gelu_pytorch_tanh" => Activation::Gelu,
        "relu" => Activation::Relu,
        other => {
            return Err(Error::bad_file(
                &cfg_path,
                format!("`hidden_act` {other:?} is not supported (gelu, gelu_new, relu)"),
            ))
        }
    };
    let spec = EncoderSpec {
        vocab: field("vocab_size")?,
        hidden: field("hidden_size")?,
        layers: field("num_hidden_layers")?,
        heads: field("num_attention_heads")?,
        intermediate: field("intermediate_size")?,
        max_positions: field("max_position_embeddings")?,
        type_vocab: field("type_vocab_size")?,
        layer_norm_eps: number("layer_norm_eps", 1e-12)?,
        activation,
        pre_ln: false,
        pooling,
        classes,
        dropout: number("hidden_dropout_prob", 0.1)? as f32,
        attention_dropout: number("attention_probs_dropout_prob", 0.1)? as f32,
        recompute: false,
    };
    spec.validate().map_err(|(f, m)| {
        let key = match f {
            "vocab" => "vocab_size",
            "hidden" => "hidden_size",
            "layers" => "num_hidden_layers",
            "heads" => "num_attention_heads",
            "intermediate" => "intermediate_size",
            "max_positions" => "max_position_embeddings",
            "type_vocab" => "type_vocab_size",
            "dropout" => "hidden_dropout_prob",
            "attention_dropout" => "attention_probs_dropout_prob",
            other => other,
        };
        Error::bad_file(&cfg_path, format!("`{key}`: {m}"))
    })?;
    let model = Encoder::new(spec);
    let st_path = dir.join("model.safetensors");
    let bytes = crate::checkpoint::map(&st_path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bad_file(&st_path, format!("not a safetensors file: {e}")))?;
    // Layers the file has beyond the config's would be dropped without a word.
    let layers = model.spec.layers;
    // (The first such name in sorted order, so the error is the same on every run.)
    if let Some(extra) = st
        .names()
        .into_iter()
        .filter(|n| {
            let n = n.strip_prefix("bert.").unwrap_or(n);
            n.strip_prefix("encoder.layer.")
                .and_then(|r| r.split('.').next())
                .and_then(|i| i.parse::<usize>().ok())
                .is_some_and(|i| i >= layers)
        })
        .min()
    {
        return Err(Error::bad_file(
            &st_path,
            format!("holds tensor {extra}, beyond the {layers} layers of config.json's `num_hidden_layers`"),
        ));
    }
    // Every tensor is found and its shape checked before the parameters are allocated: a
    // config.json whose sizes are not the file's is refused without allocating its model.
    let mut views = Vec::new();
    for t in model.layout.tensors() {
        if t.name.starts_with("classifier.") || t.name.starts_with("encoder.LayerNorm.") {
            continue;
        }
        let prefixed = format!("bert.{}", t.name);
        let view = match (st.tensor(&t.name), st.tensor(&prefixed)) {
            (Ok(v), Err(_)) | (Err(_), Ok(v)) => v,
            (Ok(_), Ok(_)) => {
                return Err(Error::bad_file(
                    &st_path,
                    format!("holds both {} and {prefixed}: which one is the encoder's is ambiguous", t.name),
                ))
            }
            (Err(_), Err(_)) => return Err(Error::bad_file(&st_path, format!("no tensor {}", t.name))),
        };
        if view.shape() != t.shape.as_slice() {
            return Err(Error::bad_file(
                &st_path,
                format!("tensor {} has shape {:?}; the config implies {:?}", t.name, view.shape(), t.shape),
            ));
        }
        if !matches!(
            view.dtype(),
            safetensors::Dtype::F32 | safetensors::Dtype::F16 | safetensors::Dtype::BF16
        ) {
            return Err(Error::bad_file(
                &st_path,
                format!("tensor {} is {:?}; f32, f16 or bf16 expected", t.name, view.dtype()),
            ));
        }
        views.push((t, view));
    }
    let mut params: Vec<f32> = model.init(seed);
    for (t, view) in views {
        let dst = &mut params[t.slot.range()];
        match view.dtype() {
            safetensors::Dtype::F32 => {
                for (d, c) in dst.iter_mut().zip(view.data().chunks_exact(4)) {
                    *d = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
            safetensors::Dtype::F16 => {
                for (d, c) in dst.iter_mut().zip(view.data().chunks_exact(2)) {
                    *d = half::f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            safetensors::Dtype::BF16 => {
                for (d, c) in dst.iter_mut().zip(view.data().chunks_exact(2)) {
                    *d = half::bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            other => unreachable!("dtype {other:?} was refused before allocating"),
        }
        if let Some(i) = dst.iter().position(|v| !v.is_finite()) {
            return Err(Error::bad_file(
                &st_path,
                format!("tensor {} holds a non-finite value ({}) at element {i}", t.name, dst[i]),
            ));
        }
    }
    Ok((model, params))
}
