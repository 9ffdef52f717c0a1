//! Text augmentation on hashed feature ids (METHODS.md §10), deterministic per (seed,
//! epoch, sample): the strong view of UDA and FixMatch. The weak view is the text as it is
//! (the model's dropout is its only noise).
//!
//! The strong view of a document, in one pass over its ids in order:
//! - each id is deleted with probability `deletion` (a document keeps at least one id);
//! - each kept id is replaced with probability `replacement`: with probability
//!   `from_sample` by the id at another position of the same document, otherwise (and when
//!   that position holds the same id) by a uniform draw from the other buckets (the hashed
//!   vocabulary), so a replaced id never stays what it was;
//! - then adjacent spans of `span` ids are swapped, each pair with probability `swap`.
//!
//! A bag model pools its ids, so span swaps change nothing for it; they are here for
//! models that read order.

use serde::{Deserialize, Serialize};

use crate::backend::mix64;
use crate::data::loader::RowId;

/// `[augment]`: the strong augmentation's strengths.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Probability of deleting each id.
    pub deletion: f64,
    /// Probability of replacing each kept id.
    pub replacement: f64,
    /// Of the replacements, the fraction drawn from the same document (the rest: any bucket).
    pub from_sample: f64,
    /// Probability of swapping each pair of adjacent spans.
    pub swap: f64,
    /// Ids per swapped span.
    pub span: usize,
    /// Also give every pass of Π, Temporal Ensembling, Mean Teacher (student and teacher)
    /// and R-Drop its own strong view of every row, labeled ones included (METHODS.md §4:
    /// each pass has its own dropout and augmentation).
    pub consistency_passes: bool,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        AugmentConfig {
            deletion: 0.1,
            replacement: 0.1,
            from_sample: 0.5,
            swap: 0.1,
            span: 2,
            consistency_passes: false,
        }
    }
}

impl AugmentConfig {
    /// Whether a strong view can differ from its row: some deletion, replacement or swap.
    pub fn alters_rows(&self) -> bool {
        self.deletion > 0.0 || self.replacement > 0.0 || self.swap > 0.0
    }

    /// Checks the rules; errors name the field under `[augment]`.
    pub fn validate(&self) -> Result<(), (&'static str, &'static str)> {
        for (field, p) in [
            ("augment.deletion", self.deletion),
            ("augment.replacement", self.replacement),
            ("augment.from_sample", self.from_sample),
            ("augment.swap", self.swap),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err((field, "must be in [0, 1]"));
            }
        }
        if self.deletion >= 1.0 {
            return Err(("augment.deletion", "must be below 1 (a document keeps at least one id)"));
        }
        if self.span < 1 || self.span > 64 {
            return Err(("augment.span", "must be in 1..=64"));
        }
        Ok(())
    }
}

/// The augmentation key of one sample in one epoch of its split.
pub fn sample_key(seed: u64, epoch: u64, id: RowId) -> u64 {
    let place = (u64::from(id.shard) << 32) | u64::from(id.row);
    mix64(seed ^ mix64(epoch ^ mix64(place ^ ((id.split as u64) << 60) ^ 0xa5a5_0000_0000_0000)))
}

/// A counter-based stream of uniforms for one key.
struct Draws {
    key: u64,
    i: u64,
}

impl Draws {
    fn u64(&mut self) -> u64 {
        self.i += 1;
        mix64(self.key ^ mix64(self.i))
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.u64()) * u128::from(n)) >> 64) as u64
    }
}

/// The strong view of one document `doc` into `out`, as [`strong`] makes it, except that with
/// `keep_ends` its first and last ids stay in place (a subword document's [CLS] and [SEP],
/// which an encoder pools from or expects) and only the ids between are augmented.
pub fn strong_doc(
    doc: &[u32],
    buckets: u32,
    cfg: &AugmentConfig,
    key: u64,
    keep_ends: bool,
    out: &mut Vec<u32>,
) {
    if keep_ends && doc.len() > 2 {
        let (first, last) = (doc[0], doc[doc.len() - 1]);
        strong(&doc[1..doc.len() - 1], buckets, cfg, key, out);
        out.insert(0, first);
        out.push(last);
    } else {
        strong(doc, buckets, cfg, key, out);
    }
}

/// The strong view of `ids` into `out` (cleared first), for a table of `buckets` rows.
pub fn strong(ids: &[u32], buckets: u32, cfg: &AugmentConfig, key: u64, out: &mut Vec<u32>) {
    out.clear();
    let mut d = Draws { key, i: 0 };
    for (i, &id) in ids.iter().enumerate() {
        if d.unit() < cfg.deletion {
            continue;
        }
        let id = if d.unit() < cfg.replacement {
            // Another position's id, or another bucket: never the id itself. A one-id
            // document, or another position holding the same id, draws from the vocabulary.
            let other = (ids.len() > 1 && d.unit() < cfg.from_sample)
                .then(|| {
                    let j = d.below(ids.len() as u64 - 1) as usize;
                    ids[j + usize::from(j >= i)]
                })
                .filter(|&o| o != id);
            match other {
                Some(o) => o,
                None if buckets > 1 => {
                    let b = d.below(u64::from(buckets) - 1) as u32;
                    b + u32::from(b >= id)
                }
                None => id,
            }
        } else {
            id
        };
        out.push(id);
    }
    if out.is_empty() && !ids.is_empty() {
        out.push(ids[d.below(ids.len() as u64) as usize]);
    }
    let s = cfg.span;
    let mut i = 0;
    while i + 2 * s <= out.len() {
        if d.unit() < cfg.swap {
            out[i..i + 2 * s].rotate_left(s);
            i += 2 * s;
        } else {
            i += s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::shard::SplitKind;

    fn id(row: u32) -> RowId {
        RowId { split: SplitKind::Unlabeled, shard: 0, row }
    }

    #[test]
    fn deterministic_per_seed_epoch_and_sample() {
        let ids: Vec<u32> = (100..160).collect();
        let cfg = AugmentConfig::default();
        let view = |seed, epoch, row| {
            let mut out = Vec::new();
            strong(&ids, 1000, &cfg, sample_key(seed, epoch, id(row)), &mut out);
            out
        };
        assert_eq!(view(1, 0, 5), view(1, 0, 5));
        assert_ne!(view(1, 0, 5), view(2, 0, 5));
        assert_ne!(view(1, 0, 5), view(1, 1, 5));
        assert_ne!(view(1, 0, 5), view(1, 0, 6));
        assert_ne!(view(1, 0, 5), ids);
    }

    /// Over many documents the rates match the configuration.
    #[test]
    fn rates_match_the_configuration() {
        let ids: Vec<u32> = (0..100).map(|i| 10_000 + i).collect();
        let cfg = AugmentConfig { deletion: 0.2, replacement: 0.25, swap: 0.0, ..AugmentConfig::default() };
        let (mut kept, mut foreign, mut total) = (0usize, 0usize, 0usize);
        let mut out = Vec::new();
        for row in 0..2000 {
            strong(&ids, 5000, &cfg, sample_key(3, 0, id(row)), &mut out);
            kept += out.len();
            // Replacements from the vocabulary fall below 5000; the document's ids are ≥ 10000.
            foreign += out.iter().filter(|&&v| v < 5000).count();
            total += ids.len();
        }
        let keep_rate = kept as f64 / total as f64;
        let foreign_rate = foreign as f64 / kept as f64;
        assert!((keep_rate - 0.8).abs() < 0.01, "kept {keep_rate}");
        assert!((foreign_rate - 0.125).abs() < 0.01, "replaced from the vocabulary {foreign_rate}");
    }

    /// METHODS.md §10's replacement is by other ids: a replaced id is never itself, even
    /// where the document repeats it; from the sample it is another position's id.
    #[test]
    fn a_replacement_is_another_id() {
        let ids: Vec<u32> = (0..30).map(|i| 50 + i).collect();
        let mut out = Vec::new();
        for from_sample in [0.0, 0.5, 1.0] {
            let cfg = AugmentConfig {
                deletion: 0.0,
                replacement: 1.0,
                from_sample,
                swap: 0.0,
                ..AugmentConfig::default()
            };
            let mut from_doc = 0;
            for k in 0..200 {
                strong(&ids, 64, &cfg, k, &mut out);
                assert_eq!(out.len(), ids.len());
                for (a, b) in ids.iter().zip(&out) {
                    assert_ne!(a, b, "from_sample {from_sample}, key {k}: an id replaced by itself");
                    assert!(*b < 80, "outside the table and the document");
                    from_doc += usize::from(*b >= 50);
                }
                // A one-id document has no other position: its replacement is another bucket.
                strong(&[7], 8, &cfg, k, &mut out);
                assert!(out.len() == 1 && out[0] != 7 && out[0] < 8, "{out:?}");
                // A document that repeats its ids (common words).
                let repeats = [3, 3, 3, 9, 3, 9];
                strong(&repeats, 16, &cfg, k, &mut out);
                assert!(repeats.iter().zip(&out).all(|(a, b)| a != b), "{out:?}");
            }
            if from_sample == 1.0 {
                assert_eq!(from_doc, 200 * ids.len(), "every replacement from the document");
            }
        }
    }

    #[test]
    fn swaps_keep_the_bag_and_documents_keep_an_id() {
        let ids: Vec<u32> = (0..40).collect();
        let cfg =
            AugmentConfig { deletion: 0.0, replacement: 0.0, swap: 1.0, span: 3, ..AugmentConfig::default() };
        let mut out = Vec::new();
        strong(&ids, 100, &cfg, 7, &mut out);
        assert_ne!(out, ids);
        assert_eq!(&out[..6], &[3, 4, 5, 0, 1, 2]);
        let mut sorted = out.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, ids);
        let cfg = AugmentConfig { deletion: 0.999, ..AugmentConfig::default() };
        for k in 0..50 {
            strong(&[9, 8], 100, &cfg, k, &mut out);
            assert!(!out.is_empty());
        }
    }
}
