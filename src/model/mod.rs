//! Models: the flat parameter layout, the layers' explicit forward/backward passes, and
//! [`Model`], the one classifier type the trainer, evaluation and prediction drive (a bag
//! model or a Transformer encoder).

pub mod bag;
pub mod encoder;
pub mod mlp;
pub mod params;

use serde::{Deserialize, Serialize};

use crate::backend::{Backend, DropoutKey, EncoderOps, GradSync, HostBatch};
use bag::{Activations, BagModel, BagSpec};
use encoder::{Encoder, EncoderActs, EncoderSpec, TokenBatch};
use params::{Layout, Slot};

/// The most classes a model has (a bag model's spec refuses more; a data set with more is
/// refused before training).
pub const MAX_CLASSES: usize = 1 << 20;

/// A classifier's hyperparameters, as checkpoints record them. Untagged: a bag spec (the
/// only kind older checkpoints hold) is recognised by its fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModelSpec {
    Bag(BagSpec),
    Encoder(EncoderSpec),
}

impl ModelSpec {
    /// Output classes.
    pub fn classes(&self) -> usize {
        match self {
            ModelSpec::Bag(s) => s.classes,
            ModelSpec::Encoder(s) => s.classes,
        }
    }

    /// Whether a forward pass in training has any dropout.
    pub fn has_dropout(&self) -> bool {
        match self {
            ModelSpec::Bag(s) => s.embed_dropout > 0.0 || s.hidden_dropout > 0.0,
            ModelSpec::Encoder(s) => s.dropout > 0.0 || s.attention_dropout > 0.0,
        }
    }

    /// The rows of the input id space: hash buckets of a bag model, the encoder's vocabulary.
    pub fn input_rows(&self) -> usize {
        match self {
            ModelSpec::Bag(s) => s.buckets,
            ModelSpec::Encoder(s) => s.vocab,
        }
    }

    /// Checks the spec's rules.
    pub fn validate(&self) -> std::result::Result<(), String> {
        match self {
            ModelSpec::Bag(s) => s.validate(),
            ModelSpec::Encoder(s) => s.validate().map_err(|(f, m)| format!("{f}: {m}")),
        }
    }

    /// The checkpoint format name of this kind of model.
    pub fn format(&self) -> &'static str {
        match self {
            ModelSpec::Bag(_) => "dtrain-bag",
            ModelSpec::Encoder(_) => "dtrain-encoder",
        }
    }
}

/// A classifier: a bag model or an encoder, over one flat parameter buffer.
#[derive(Debug, Clone)]
pub enum Model {
    Bag(BagModel),
    Encoder(Encoder),
}

/// A batch as a model reads it: a bag model's uploaded id lists, or an encoder's padded
/// token sequences (its lookups are built from them in the forward pass).
pub enum Input<B: Backend> {
    Bag(B::Batch),
    Tokens(TokenBatch),
}

impl<B: Backend> Input<B> {
    /// The bag model's batch (the adversarial pass and the table gradient read it).
    pub fn bag(&self) -> Option<&B::Batch> {
        match self {
            Input::Bag(b) => Some(b),
            Input::Tokens(_) => None,
        }
    }
}

/// One forward pass's saved activations, for its backward pass (or, from
/// [`Acts::inference`], only what the pass itself needs).
pub enum Acts<B: Backend> {
    Bag(Activations<B>),
    Encoder(EncoderActs<B>),
}

impl<B: Backend> Acts<B> {
    /// Empty buffers for `model`.
    pub fn new(be: &B, model: &Model) -> Self {
        match model {
            Model::Bag(m) => Acts::Bag(Activations::new(be, m)),
            Model::Encoder(_) => Acts::Encoder(EncoderActs::new(be)),
        }
    }

    /// Empty buffers for `model`'s forward passes that no backward pass follows: an
    /// encoder's layers share one tape ([`EncoderActs::inference`]).
    pub fn inference(be: &B, model: &Model) -> Self {
        match model {
            Model::Bag(m) => Acts::Bag(Activations::new(be, m)),
            Model::Encoder(_) => Acts::Encoder(EncoderActs::inference(be)),
        }
    }

    /// The n×C logits of the last forward pass.
    pub fn logits(&self) -> &B::Buf {
        match self {
            Acts::Bag(a) => &a.logits,
            Acts::Encoder(a) => &a.logits,
        }
    }

    /// The bag model's activations.
    pub fn bag(&self) -> &Activations<B> {
        match self {
            Acts::Bag(a) => a,
            Acts::Encoder(_) => panic!("bag activations asked of an encoder pass"),
        }
    }

    /// The bag model's activations, mutably.
    pub fn bag_mut(&mut self) -> &mut Activations<B> {
        match self {
            Acts::Bag(a) => a,
            Acts::Encoder(_) => panic!("bag activations asked of an encoder pass"),
        }
    }
}

impl Model {
    /// Lays out the model `spec` describes.
    pub fn new(spec: ModelSpec) -> Model {
        match spec {
            ModelSpec::Bag(s) => Model::Bag(BagModel::new(s)),
            ModelSpec::Encoder(s) => Model::Encoder(Encoder::new(s)),
        }
    }

    /// Its spec.
    pub fn spec(&self) -> ModelSpec {
        match self {
            Model::Bag(m) => ModelSpec::Bag(m.spec.clone()),
            Model::Encoder(m) => ModelSpec::Encoder(m.spec.clone()),
        }
    }

    pub fn layout(&self) -> &Layout {
        match self {
            Model::Bag(m) => &m.layout,
            Model::Encoder(m) => &m.layout,
        }
    }

    /// The tensor whose gradient is sparse rows (the bag model's embedding table, last in
    /// the layout); the encoder's gradients are all dense, so its slot is empty, at the
    /// layout's end.
    pub fn table(&self) -> Slot {
        match self {
            Model::Bag(m) => m.table,
            Model::Encoder(m) => Slot { offset: m.layout.total(), rows: 0, cols: 0 },
        }
    }

    /// Width of the sparse table's rows (1 for the encoder's empty table).
    pub fn table_dim(&self) -> usize {
        match self {
            Model::Bag(m) => m.spec.dim,
            Model::Encoder(_) => 1,
        }
    }

    /// Rows of the sparse table (0 for the encoder).
    pub fn table_rows(&self) -> usize {
        self.table().rows
    }

    /// Length of a dense gradient buffer: the layout up to the sparse table.
    pub fn dense_len(&self) -> usize {
        self.table().offset
    }

    pub fn classes(&self) -> usize {
        match self {
            Model::Bag(m) => m.spec.classes,
            Model::Encoder(m) => m.spec.classes,
        }
    }

    /// Fresh parameters from `seed` (an encoder's pretrained weights are loaded over them).
    pub fn init(&self, seed: u64) -> Vec<f32> {
        match self {
            Model::Bag(m) => m.init(seed),
            Model::Encoder(m) => m.init(seed),
        }
    }

    /// The bag model, for what only it supports (adversarial passes, Meta Pseudo Labels,
    /// pretrained embedding tables).
    pub fn bag(&self) -> Option<&BagModel> {
        match self {
            Model::Bag(m) => Some(m),
            Model::Encoder(_) => None,
        }
    }

    /// The documents per evaluation batch when `requested` are asked for: an encoder's
    /// activations grow with tokens and its attention with their square, so it takes at most
    /// 16384 / positions documents at a time.
    pub fn eval_batch(&self, requested: usize) -> usize {
        match self {
            Model::Bag(_) => requested,
            Model::Encoder(m) => (16_384 / m.spec.max_positions.max(1)).clamp(1, requested.max(1)),
        }
    }

    /// Bytes of the activations of a pass over `seqs` sequences of `len` tokens, for a
    /// memory budget ([`EncoderSpec::activation_bytes`]); a bag model's are small beside its
    /// table and count as 0.
    ///
    /// [`EncoderSpec::activation_bytes`]: encoder::EncoderSpec::activation_bytes
    pub fn activation_bytes(&self, seqs: usize, len: usize, backward: bool) -> u64 {
        match self {
            Model::Bag(_) => 0,
            Model::Encoder(m) => m.spec.activation_bytes(seqs, len, backward),
        }
    }

    /// `batch` as this model reads it on `be`.
    pub fn input<B: Backend>(&self, be: &B, batch: &HostBatch) -> Input<B> {
        match self {
            Model::Bag(_) => Input::Bag(be.upload_batch(batch)),
            Model::Encoder(_) => {
                let seqs: Vec<Vec<u32>> = (0..batch.len())
                    .map(|i| batch.ids[batch.offsets[i] as usize..batch.offsets[i + 1] as usize].to_vec())
                    .collect();
                Input::Tokens(TokenBatch::new(&seqs, 0))
            }
        }
    }

    /// The forward pass over `x` (`n` documents); `noise` is `Some(key)` in training
    /// (dropout on), `None` at evaluation. The logits end up in `acts.logits()`.
    ///
    /// An encoder's dropout covers token rows, which the key's row map (placing documents)
    /// cannot place: it keys its masks by the local token row, with the seed mixed with the
    /// global position of the batch's first document, so ranks draw different masks.
    pub fn forward<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &Input<B>,
        n: usize,
        noise: Option<DropoutKey>,
        acts: &mut Acts<B>,
    ) {
        self.forward_perturbed(be, params, x, n, noise, None, acts)
    }

    /// The width of one document's slice of the adversarial perturbation: a bag model's
    /// pooled embedding (D), an encoder's token embeddings (its tokens per sequence × H,
    /// padding included, where the gradient is zero).
    pub fn perturbation_width<B: Backend>(&self, x: &Input<B>) -> usize {
        match (self, x) {
            (Model::Bag(m), _) => m.spec.dim,
            (Model::Encoder(m), Input::Tokens(tb)) => tb.l * m.spec.hidden,
            _ => panic!("an encoder was given a bag model's input"),
        }
    }

    /// [`Model::forward`] with `delta` (n × [`Model::perturbation_width`]) added where
    /// adversarial training perturbs: a bag model's pooled embeddings, an encoder's token
    /// embedding sums.
    #[allow(clippy::too_many_arguments)]
    pub fn forward_perturbed<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &Input<B>,
        n: usize,
        noise: Option<DropoutKey>,
        delta: Option<&B::Buf>,
        acts: &mut Acts<B>,
    ) {
        match (self, x, acts) {
            (Model::Bag(m), Input::Bag(b), Acts::Bag(a)) => {
                m.forward_perturbed(be, params, b, n, noise, delta, a)
            }
            (Model::Encoder(m), Input::Tokens(tb), Acts::Encoder(a)) => {
                // The encoder keys its masks by each sequence's global position (`k.rows`)
                // and token: the same masks on any number of ranks.
                let noise = noise
                    .filter(|_| m.spec.dropout > 0.0 || m.spec.attention_dropout > 0.0)
                    .map(|k| (k, m.spec.dropout));
                m.forward_perturbed(be, params, tb, noise, delta, a)
            }
            _ => panic!("a model was given another kind of model's input or activations"),
        }
    }

    /// The backward pass of the forward pass that filled `acts`, for `dlogits`: dense
    /// gradients added into `grads` (length [`Model::dense_len`]), and the gradient at the
    /// perturbation site into `dpooled`: a bag model's `∂loss/∂pooled` (from which the
    /// caller forms the table's sparse gradient), an encoder's `∂loss/∂(token embedding
    /// sums)` (its gradients are all in `grads`). `sync`, in the step's last backward pass,
    /// hears as an encoder's layers finish ([`GradSync::ready`]; a bag model's dense part
    /// is too small to start early).
    #[allow(clippy::too_many_arguments)]
    pub fn backward_dense<B: EncoderOps>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &Input<B>,
        acts: &Acts<B>,
        dlogits: &B::Buf,
        grads: &mut B::Buf,
        dpooled: &mut B::Buf,
        sync: Option<&dyn GradSync<B>>,
    ) {
        match (self, x, acts) {
            (Model::Bag(m), Input::Bag(_), Acts::Bag(a)) => {
                m.backward_dense(be, params, a, dlogits, grads, dpooled)
            }
            (Model::Encoder(m), Input::Tokens(tb), Acts::Encoder(a)) => {
                m.backward_to_embeddings(be, params, tb, a, dlogits, grads, Some(dpooled), sync);
            }
            _ => panic!("a model was given another kind of model's input or activations"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Activation;

    #[test]
    fn specs_round_trip_and_a_bag_spec_reads_as_before() {
        let bag = BagSpec {
            buckets: 64,
            dim: 4,
            hidden: vec![],
            activation: Activation::Relu,
            embed_dropout: 0.0,
            hidden_dropout: 0.0,
            classes: 3,
        };
        // A bag checkpoint's metadata is the bag spec's own fields, as before encoders.
        let json = serde_json::to_value(ModelSpec::Bag(bag.clone())).unwrap();
        assert_eq!(json, serde_json::to_value(&bag).unwrap());
        assert_eq!(serde_json::from_value::<ModelSpec>(json).unwrap(), ModelSpec::Bag(bag));
        let enc = EncoderSpec {
            vocab: 50,
            hidden: 8,
            layers: 1,
            heads: 2,
            intermediate: 16,
            max_positions: 12,
            type_vocab: 2,
            layer_norm_eps: 1e-12,
            activation: Activation::GeluErf,
            pre_ln: true,
            pooling: encoder::Pooling::Cls,
            classes: 3,
            dropout: 0.1,
            attention_dropout: 0.1,
            recompute: false,
        };
        // Layer-wise decay 0.5 over 1 layer: embeddings 0.5², the layer 0.5, the head 1.
        let mults = Encoder::new(enc.clone()).layer_decay(0.5);
        let of = |name: &str| mults.iter().find(|(n, _)| n == name).unwrap().1;
        assert_eq!(of("embeddings.word_embeddings.weight"), 0.25);
        assert_eq!(of("embeddings.LayerNorm.bias"), 0.25);
        assert_eq!(of("encoder.layer.0.attention.self.query.weight"), 0.5);
        assert_eq!(of("encoder.layer.0.output.LayerNorm.weight"), 0.5);
        assert_eq!((of("encoder.LayerNorm.weight"), of("classifier.bias")), (1.0, 1.0));
        let spec = ModelSpec::Encoder(enc);
        let back: ModelSpec = serde_json::from_str(&serde_json::to_string(&spec).unwrap()).unwrap();
        assert_eq!(back, spec);
        assert_eq!(spec.format(), "dtrain-encoder");
        let m = Model::new(spec);
        // The encoder's gradients are all dense: an empty table at the layout's end.
        assert_eq!((m.dense_len(), m.table_rows()), (m.layout().total(), 0));
        assert_eq!((m.eval_batch(4096), m.eval_batch(8)), (16_384 / 12, 8));
    }
}
