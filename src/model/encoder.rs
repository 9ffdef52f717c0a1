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
//! Status: the forward pass runs on the CPU (the `EncoderOps` backends); its backward pass,
//! training with the methods, masked-LM pretraining and the CUDA kernels are still to come
//! (the encoder issue).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::backend::{Activation, Backend, EncoderOps, HostBatch};
use crate::error::{Error, IoContext, Result};
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
}

impl EncoderSpec {
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
        if self.layer_norm_eps.is_nan() || self.layer_norm_eps <= 0.0 {
            return Err(("layer_norm_eps", "must be positive".into()));
        }
        Ok(())
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

/// Buffers of one forward pass.
pub struct EncoderActs<B: Backend> {
    /// The last layer's output (n×H) and the pooled vectors (b×H).
    pub hidden: B::Buf,
    pub pooled: B::Buf,
    pub logits: B::Buf,
    scratch: [B::Buf; 8],
}

impl<B: Backend> EncoderActs<B> {
    pub fn new(be: &B) -> Self {
        EncoderActs {
            hidden: be.zeros(0),
            pooled: be.zeros(0),
            logits: be.zeros(0),
            scratch: std::array::from_fn(|_| be.zeros(0)),
        }
    }
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

    /// The forward pass over `tb` (dropout-free): `acts.hidden` (n×H), `acts.pooled`
    /// (b×H) and `acts.logits` (b×C).
    pub fn forward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        tb: &TokenBatch,
        acts: &mut EncoderActs<B>,
    ) {
        let s = &self.spec;
        let (n, h) = (tb.b * tb.l, s.hidden);
        assert!(
            tb.l <= s.max_positions,
            "a sequence of {} tokens is longer than the {} positions",
            tb.l,
            s.max_positions
        );
        let mask = be.upload(&tb.mask::<B::F>());
        let [x, t1, t2, q, k, v, ctx, stats] = &mut acts.scratch;
        // Embeddings: three single-id lookups per token, summed, then LayerNorm.
        be.embedding_bag_forward(params, self.word, &be.upload_batch(&tb.lookups(|r, _| tb.ids[r])), t1);
        be.embedding_bag_forward(params, self.position, &be.upload_batch(&tb.lookups(|_, t| t as u32)), t2);
        be.axpy(t1, t2, 1.0);
        be.embedding_bag_forward(params, self.token_type, &be.upload_batch(&tb.lookups(|_, _| 0)), t2);
        be.axpy(t1, t2, 1.0);
        be.layer_norm_forward(t1, n, params, self.emb_ln.0, self.emb_ln.1, s.layer_norm_eps, x, stats);
        let shape = (tb.b, tb.l, s.heads);
        let scale = 1.0 / ((h / s.heads) as f64).sqrt();
        let mut probs = be.zeros(0);
        let mut inner = be.zeros(0);
        let mut inner_act = be.zeros(0);
        for layer in &self.layers {
            // Attention, on x (post-LN) or LN1(x) (pre-LN); t1 = x + its output.
            if s.pre_ln {
                be.layer_norm_forward(x, n, params, layer.ln1.0, layer.ln1.1, s.layer_norm_eps, t2, stats);
            }
            let attn_in = if s.pre_ln { &*t2 } else { &*x };
            be.linear_forward(attn_in, n, params, layer.query.0, layer.query.1, q);
            be.linear_forward(attn_in, n, params, layer.key.0, layer.key.1, k);
            be.linear_forward(attn_in, n, params, layer.value.0, layer.value.1, v);
            be.attention_forward(q, k, v, &mask, shape, scale, ctx, &mut probs);
            be.linear_forward(ctx, n, params, layer.attn_out.0, layer.attn_out.1, t1);
            be.axpy(t1, x, 1.0);
            // x ← t1, normalised (post-LN) or as it is (pre-LN); the MLP reads x or LN2(x).
            if s.pre_ln {
                std::mem::swap(x, t1);
                be.layer_norm_forward(x, n, params, layer.ln2.0, layer.ln2.1, s.layer_norm_eps, t2, stats);
            } else {
                be.layer_norm_forward(t1, n, params, layer.ln1.0, layer.ln1.1, s.layer_norm_eps, x, stats);
            }
            let mlp_in = if s.pre_ln { &*t2 } else { &*x };
            be.linear_forward(mlp_in, n, params, layer.inter.0, layer.inter.1, &mut inner);
            be.activation_forward(s.activation, &inner, &mut inner_act);
            be.linear_forward(&inner_act, n, params, layer.out.0, layer.out.1, t1);
            be.axpy(t1, x, 1.0);
            if s.pre_ln {
                std::mem::swap(x, t1);
            } else {
                be.layer_norm_forward(t1, n, params, layer.ln2.0, layer.ln2.1, s.layer_norm_eps, x, stats);
            }
        }
        if let Some((g, b)) = self.final_ln {
            be.layer_norm_forward(x, n, params, g, b, s.layer_norm_eps, t1, stats);
            std::mem::swap(x, t1);
        }
        std::mem::swap(&mut acts.hidden, x);
        // Pooling: a mean embedding bag over the hidden rows of each sequence's tokens.
        let mut rows = HostBatch::default();
        for (i, &len) in tb.lens.iter().enumerate() {
            let ids: Vec<u32> = match s.pooling {
                Pooling::Cls => vec![(i * tb.l) as u32],
                Pooling::Mean => (0..len).map(|t| (i * tb.l + t) as u32).collect(),
            };
            rows.push(&ids, -1);
        }
        let all = Slot { offset: 0, rows: n, cols: h };
        be.embedding_bag_forward(&acts.hidden, all, &be.upload_batch(&rows), &mut acts.pooled);
        be.linear_forward(&acts.pooled, tb.b, params, self.head.0, self.head.1, &mut acts.logits);
    }
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
    let text = std::fs::read_to_string(&cfg_path).at(&cfg_path)?;
    let cfg: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| Error::bad_file(&cfg_path, format!("not JSON: {e}")))?;
    let field = |name: &str| -> Result<usize> {
        cfg.get(name)
            .and_then(|v| v.as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| Error::bad_file(&cfg_path, format!("`{name}` is missing or not a whole number")))
    };
    let activation = match cfg.get("hidden_act").and_then(|v| v.as_str()).unwrap_or("gelu") {
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
        layer_norm_eps: cfg.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-12),
        activation,
        pre_ln: false,
        pooling,
        classes,
    };
    spec.validate().map_err(|(f, m)| Error::bad_file(&cfg_path, format!("{f}: {m}")))?;
    let model = Encoder::new(spec);
    let mut params: Vec<f32> = model.init(seed);
    let st_path = dir.join("model.safetensors");
    let bytes = std::fs::read(&st_path).at(&st_path)?;
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| Error::bad_file(&st_path, format!("not a safetensors file: {e}")))?;
    for t in model.layout.tensors() {
        if t.name.starts_with("classifier.") || t.name.starts_with("encoder.LayerNorm.") {
            continue;
        }
        let view = st
            .tensor(&t.name)
            .or_else(|_| st.tensor(&format!("bert.{}", t.name)))
            .map_err(|_| Error::bad_file(&st_path, format!("no tensor {}", t.name)))?;
        if view.shape() != t.shape.as_slice() {
            return Err(Error::bad_file(
                &st_path,
                format!("tensor {} has shape {:?}; the config implies {:?}", t.name, view.shape(), t.shape),
            ));
        }
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
            other => {
                return Err(Error::bad_file(
                    &st_path,
                    format!("tensor {} is {other:?}; f32, f16 or bf16 expected", t.name),
                ))
            }
        }
    }
    Ok((model, params))
}
