//! Evaluation: the model without dropout over every document of a split → metrics.

use crate::backend::EncoderOps;
use crate::data::dataset::Dataset;
use crate::data::loader;
use crate::data::shard::SplitKind;
use crate::error::Result;
use crate::model::{Acts, Model};
use crate::train::metrics::{Accumulator, EvalReport};

/// Class probabilities of every document of `batch` (rows of `classes`), in order, without
/// dropout.
pub fn predict_probs<B: EncoderOps<F = f32>>(
    be: &B,
    model: &Model,
    params: &B::Buf,
    batch: &crate::backend::HostBatch,
) -> Vec<f32> {
    let mut acts = Acts::inference(be, model);
    model.forward(be, params, &model.input(be, batch), batch.len(), None, &mut acts);
    let mut probs = be.zeros(0);
    be.softmax(acts.logits(), model.classes(), &mut probs);
    be.download(&probs)
}

/// Metrics of `split`, or `None` when the split is empty.
pub fn evaluate<B: EncoderOps<F = f32>>(
    be: &B,
    model: &Model,
    params: &B::Buf,
    ds: &Dataset,
    split: SplitKind,
    batch_size: usize,
) -> Result<Option<EvalReport>> {
    let classes = model.classes();
    let mut acc = Accumulator::new(classes);
    let mut any = false;
    for batch in loader::sequential(ds, split, model.eval_batch(batch_size))? {
        let probs = predict_probs(be, model, params, &batch);
        for (i, row) in probs.chunks(classes).enumerate() {
            if let Ok(label) = usize::try_from(batch.labels[i]) {
                acc.add(row, label);
                any = true;
            }
        }
    }
    Ok(any.then(|| acc.report(split.name(), ds.labels())))
}
